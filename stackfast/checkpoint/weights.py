"""Weights: a model's tensors read from any checkpoint folder, and weights-only folders.

Weights-only folders (`stackfast grow`'s output: model.safetensors, state.json, config.toml,
checksums.json) are read by `load_weights`, as are DCP training checkpoints, in one process
with the shapes from their config.toml. That is why no rank-0 model.safetensors is written
beside a training checkpoint's shards: it would gather the whole model into one process's
memory at every save. Hugging Face Llama folders are accepted wherever a checkpoint is
(`load_model_source`, through hf.py).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stackfast.checkpoint.checksums import verify_checksums, write_checksums
from stackfast.checkpoint.dcp_io import dcp_load
from stackfast.checkpoint.hf import is_hf_dir, load_hf
from stackfast.checkpoint.layout import (CONFIG_FILE, DCP_METADATA, MODEL_FILE, STATE_FILE, CheckpointError,
                                         load_config_of)
from stackfast.config import Config, ModelConfig
from stackfast.files import write_folder
from stackfast.model import Transformer


def load_weights(folder: str | Path, allow_unverified: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint folder, as a state dict on the CPU (whole tensors).

    Reads model.safetensors or, in a DCP checkpoint, the "model" shards (in this process
    alone, with no collective calls, whatever number of processes wrote them), after
    checking every file against checksums.json."""
    folder = Path(folder)
    path = folder / MODEL_FILE
    if not path.is_file() and not (folder / DCP_METADATA).is_file():
        raise CheckpointError(f"{folder}: not a complete checkpoint (neither {MODEL_FILE} nor {DCP_METADATA})")
    if not allow_unverified:
        verify_checksums(folder)
    if path.is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable weights ({e})") from None
    with torch.device("meta"):  # shapes only, no memory
        shapes = Transformer(load_config_of(folder).model).state_dict()
    weights = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in shapes.items()}
    dcp_load({"model": weights}, folder)
    return weights


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


def save_weights_folder(folder: Path, model: torch.nn.Module, config: Config, state: dict) -> None:
    """A weights-only stackfast checkpoint (no optimizer): usable as checkpoint.init_from."""
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / MODEL_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        (tmp / CONFIG_FILE).write_text(config.to_toml())
        write_checksums(tmp)  # last: it lists every file above
    write_folder(folder, write)


def load_model_source(folder: str | Path, allow_unverified: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and weights of a stackfast checkpoint folder or a Hugging Face Llama folder,
    checked against the folder's checksums unless allow_unverified."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    if is_hf_dir(folder):
        return load_hf(folder, allow_unverified)
    weights = load_weights(folder, allow_unverified)  # verifies config.toml too, before it is read
    return load_config_of(folder).model, weights


def model_from_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor], source: Path | str,
                       device: torch.device | str = "cpu") -> Transformer:
    """A Transformer of shape `cfg` holding `weights` (checked to fit), allocated once on
    `device`: built on the meta device, so no random init is drawn only to be overwritten."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.materialize(device)
    load_into_model(model, weights, source)
    return model


def load_model(folder: str | Path, kernels: str = "torch", allow_unverified: bool = False) -> Transformer:
    """A Transformer holding the weights of a stackfast or Hugging Face checkpoint folder."""
    cfg, weights = load_model_source(folder, allow_unverified)
    return model_from_weights(dataclasses.replace(cfg, kernels=kernels), weights, folder)
