"""Hugging Face LlamaForCausalLM folders: read as a stackfast model (`load_hf`), written from
one (`save_hf`, `stackfast export-hf`). The model's parameter names are HF's without "model."."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stackfast.checkpoint.checksums import verify_checksums, write_checksums
from stackfast.checkpoint.layout import CheckpointError, require
from stackfast.config import ConfigError, ModelConfig
from stackfast.files import write_folder


def to_hf_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """stackfast parameter names -> LlamaForCausalLM names (a rename, no reshaping)."""
    return {(k if k.startswith("lm_head.") else "model." + k): v for k, v in weights.items()}


def hf_llama_config(cfg) -> dict:
    """Keyword arguments of transformers.LlamaConfig for a ModelConfig."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                attention_bias=False, mlp_bias=False, hidden_act="silu")


def is_hf_dir(folder: str | Path) -> bool:
    return (Path(folder) / "config.json").is_file()


def load_hf(folder: str | Path, allow_unverified: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A Hugging Face Llama folder (config.json + model.safetensors or a sharded index) as a
    ModelConfig and stackfast-named weights. Features stackfast's model lacks are refused.
    The files read must match the folder's checksums.json (stackfast's exports write one;
    transformers ignores it) unless allow_unverified."""
    folder = Path(folder)
    try:
        hf = json.loads(require(folder, "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / 'config.json'}: corrupt ({e.msg})") from None
    arch = hf.get("model_type")
    if arch != "llama":
        raise CheckpointError(f"{folder}: model_type {arch!r} is not supported (only 'llama')")
    unsupported = [key for key in ("attention_bias", "mlp_bias", "tie_word_embeddings") if hf.get(key)]
    if hf.get("rope_scaling"):
        unsupported.append("rope_scaling")
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf['hidden_act']}")
    if unsupported:
        raise CheckpointError(f"{folder}: unsupported Llama features: {', '.join(unsupported)}")
    try:
        heads = hf["num_attention_heads"]
        if hf.get("head_dim", hf["hidden_size"] // heads) != hf["hidden_size"] // heads:
            raise CheckpointError(f"{folder}: head_dim {hf['head_dim']} != hidden_size / heads is not supported")
        rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        cfg = ModelConfig(vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"],
                          hidden_size=hf["hidden_size"], n_heads=heads,
                          n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_size=hf["intermediate_size"],
                          max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(rope_theta),
                          norm_eps=hf.get("rms_norm_eps", 1e-5))
    except KeyError as e:
        raise CheckpointError(f"{folder / 'config.json'}: missing {e.args[0]!r}") from None
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [require(folder, "model.safetensors").name]
    if not allow_unverified:
        verify_checksums(folder, required=["config.json", *files] + ([index.name] if index.is_file() else []))
    weights = {}
    for name in files:
        path = require(folder, name)
        try:
            weights.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable weights ({e})") from None
    # HF names -> stackfast names; rotary caches some versions store are derived, not weights.
    ours = {(k[len("model."):] if k.startswith("model.") else k): v.float() for k, v in weights.items()
            if "rotary_emb" not in k}
    return cfg, ours


def save_hf(folder: Path, model: torch.nn.Module, tokenizer_file: Path | None = None) -> None:
    """Write model as a LlamaForCausalLM folder (config.json, model.safetensors, tokenizer).

    With the tokenizer come its tokenizer_config.json and the special-token ids in
    config.json and generation_config.json (stackfast/hf_export.py).
    `folder` must not exist yet (callers refuse or clear it); written atomically."""
    from stackfast.hf_export import write_hf_metadata
    cfg = model.config
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
              **hf_llama_config(cfg)}
    weights = {k: v.detach().contiguous().cpu() for k, v in to_hf_state_dict(model.state_dict()).items()}

    def write(tmp: Path) -> None:
        write_hf_metadata(tmp, config, tokenizer_file, cfg.max_seq_len)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / tokenizer_file.name)
        write_checksums(tmp)  # last: it lists every file above
    write_folder(folder, write)
