"""A run's checkpoint folders: their names, which ones are complete, pruning, stale saves,
and the two text files every checkpoint holds (state.json, config.toml).

No torch here: `stackfast.runs` and `--resume auto` find and read checkpoints without it.

    <run_dir>/checkpoints/step_XXXXXXXX/    a complete checkpoint (`step_folder`)
    <run_dir>/checkpoints/.step_XXXXXXXX.tmp a save in progress, or a crashed one's leftover
                                             (`temp_folder`): never listed, removed by the
                                             next job that holds the run folder
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from stackfast.config import Config, ConfigError, StackfastError, saved_config, tomllib

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_DIR = re.compile(r"^\.step_\d{8}\.tmp$")
MODEL_FILE, STATE_FILE, CONFIG_FILE, DCP_METADATA, CHECKSUM_FILE = (
    "model.safetensors", "state.json", "config.toml", ".metadata", "checksums.json")


class CheckpointError(StackfastError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


def step_folder(ckpt_root: Path, step: int) -> Path:
    """Where the complete checkpoint of `step` lives (matches STEP_DIR)."""
    return ckpt_root / f"step_{step:08d}"


def temp_folder(ckpt_root: Path, step: int) -> Path:
    """The hidden folder a save of `step` is built in before its rename (matches TMP_DIR)."""
    return ckpt_root / f".step_{step:08d}.tmp"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints under ckpt_root, oldest first (temporary folders are skipped)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def run_id_of(folder: Path) -> str | None:
    """The id of the run that wrote a checkpoint (None when unreadable)."""
    try:
        return json.loads((folder / STATE_FILE).read_text()).get("run_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def prune(ckpt_root: Path, run_id: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` of this run's own checkpoints (rank 0): one copied
    in from elsewhere stays."""
    lineage = [c for c in list_checkpoints(ckpt_root) if run_id_of(c) == run_id]
    for old in lineage[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_saves(ckpt_root: Path) -> list[Path]:
    """Remove the temporary folders of saves that a crash interrupted (`.step_XXXXXXXX.tmp`).

    For the job that holds the run folder's lock (rank 0, before its first save): no other
    job can be writing there, so every such folder is stale."""
    stale = [p for p in ckpt_root.iterdir() if TMP_DIR.match(p.name)] if ckpt_root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def require(folder: Path, name: str) -> Path:
    """folder/name, which must be a file: a checkpoint without it is incomplete."""
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a complete checkpoint ({name} missing)")
    return path


def load_state(folder: Path) -> dict:
    path = require(folder, STATE_FILE)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt ({e.msg})") from None


def load_config_of(folder: str | Path) -> Config:
    """The resolved config saved with a checkpoint."""
    path = require(Path(folder), CONFIG_FILE)
    try:
        return saved_config(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, ConfigError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unusable config ({e})") from None
