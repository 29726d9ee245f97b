"""Checkpoints: save, find, load; never unpickles arbitrary objects.

A checkpoint is a folder `<run_dir>/checkpoints/step_XXXXXXXX/` with
    model.safetensors   weights (fp32 master copy)
    optimizer.pt        the optimizer's state dict (tensors and numbers only; loaded with
                        torch.load(weights_only=True), so a crafted file cannot run code)
    rng.safetensors     CPU and CUDA random generator states
    state.json          step, tokens, FLOPs, data position and other loop state
    config.toml         the resolved config of the run
It is written into a hidden temporary folder and renamed into place when complete: a
crash mid-save leaves the previous checkpoint as the newest complete one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stackfast.config import Config, ConfigError, StackfastError, config_from_dict, tomllib

STEP_DIR = re.compile(r"^step_(\d{8})$")
MODEL_FILE, OPTIM_FILE, RNG_FILE, STATE_FILE, CONFIG_FILE = (
    "model.safetensors", "optimizer.pt", "rng.safetensors", "state.json", "config.toml")


class CheckpointError(StackfastError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer, state: dict,
                    config: Config, keep_last: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:08d}-", dir=ckpt_root))
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIM_FILE)
        save_file(rng_state(), str(tmp / RNG_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        (tmp / CONFIG_FILE).write_text(config.to_toml())
        if final.exists():  # re-saving the same step (e.g. at the end of a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints under ckpt_root, oldest first (temporary folders are skipped)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{i}"] = s
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a complete checkpoint ({name} missing)")
    return path


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint folder, as a state dict on the CPU."""
    path = _require(Path(folder), MODEL_FILE)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable weights ({e})") from None


def load_into_model(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy weights into the model; any missing, unexpected or misshaped tensor is an error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for name, tensor in weights.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model "
                                  f"expects {tuple(own[name].shape)}")
    model.load_state_dict(weights)


def load_optimizer_state(folder: Path) -> dict:
    path = _require(folder, OPTIM_FILE)
    try:
        # weights_only: tensors, numbers and containers only; a pickle that would build
        # any other object (and so could run code) is refused.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(f"{path}: refused or unreadable optimizer state "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_state(folder: Path) -> dict:
    path = _require(folder, STATE_FILE)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt ({e.msg})") from None


def load_rng(folder: Path) -> dict[str, torch.Tensor]:
    path = _require(folder, RNG_FILE)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def load_config_of(folder: str | Path) -> Config:
    """The resolved config saved with a checkpoint."""
    path = _require(Path(folder), CONFIG_FILE)
    try:
        return config_from_dict(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, ConfigError) as e:
        raise CheckpointError(f"{path}: unusable config ({e})") from None


# --------------------------------------------------------------------------------------
# Hugging Face LlamaForCausalLM naming (the model's names are HF's without "model.")
# --------------------------------------------------------------------------------------

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
