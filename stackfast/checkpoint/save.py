"""The sync save: every rank writes its part of checkpoint `step` into its hidden temporary
folder, and rank 0 renames it into place once all of it is complete.

Every rank writes into `.step_XXXXXXXX.tmp` (layout.temp_folder); rank 0 renames it into
place after a barrier, once all of it is written and hashed (checksums.json). A crash
mid-save leaves the previous checkpoint as the newest complete one (the stale temporary
folder is never listed, and the next job that holds the run folder removes it). A save that
fails (a full disk, a read-only folder, an interrupt) removes its temporary folder itself.
The checkpoint folder must be on a filesystem that all nodes share.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from stackfast.checkpoint.checksums import write_checksums
from stackfast.checkpoint.dcp_io import rng_state, write_files
from stackfast.checkpoint.layout import latest_checkpoint, prune, step_folder, temp_folder
from stackfast.config import Config
from stackfast.errors import WriteError
from stackfast.files import replace_folder, write_failure
from stackfast.parallel import World, barrier


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer, state: dict,
                    config: Config, keep_last: int, world: World = World()) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`.

    Collective: every rank calls it (each writes its own shards and RNG state). A save that
    fails for any reason (an interrupt included) removes its temporary folder and leaves the
    checkpoints that were there as they were; a full disk, a read-only or forbidden folder or
    an I/O error is one WriteError naming the problem, the folder and the newest complete
    checkpoint; any other error is raised as it is."""
    final, tmp = step_folder(ckpt_root, step), temp_folder(ckpt_root, step)
    # Plain tensors for a single process, DTensor shards under FSDP; keys are parameter names.
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)  # left behind by a crash during an earlier save
            tmp.mkdir(parents=True)
        barrier(world)
        write_files(tmp, {"model": model_state, "optim": optim_state}, rng_state(),
                    json.dumps(state, indent=1) + "\n", config.to_toml(), world)  # collective under torchrun
        barrier(world)  # every rank's files are complete: only now may they be hashed
        write_checksums(tmp, world)  # collective
        if world.main:
            replace_folder(tmp, final)  # re-saving a step (the end of a resumed run) replaces it
    except BaseException as error:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)  # the partial save would hold the space forever
        failure = save_failure(error, ckpt_root, final.name, needed_bytes((model_state, optim_state), world))
        if failure is None:
            raise
        raise failure from None
    if world.main:
        prune(ckpt_root, state["run_id"], keep_last)
    return final


def needed_bytes(tensors, world: World) -> int:
    """What the checkpoint takes on disk: every rank's share, a replicated shard (HSDP) saved once."""
    return _state_bytes(tensors) * world.world_size // world.replicate_degree


def save_failure(error: BaseException, ckpt_root: Path, name: str, needed: int) -> WriteError | None:
    """The one-line WriteError for a checkpoint save that failed with `error`; None when the
    error is not the file system's (the caller raises it as it is)."""
    problem = write_failure(error, ckpt_root, needed=needed)
    if problem is None:
        return None
    newest = latest_checkpoint(ckpt_root)
    fix = ("make room (older checkpoints go only after a new one is complete, so a save needs room for one "
           "more whatever checkpoint.keep_last is)" if problem.startswith("no space") else
           "make the folder writable")
    return WriteError(f"{ckpt_root}: cannot write checkpoint {name}: {problem}. Nothing of it was left "
                      + (f"and the newest checkpoint, {newest.name}, is intact" if newest else
                         "(there is no earlier checkpoint)")
                      + f"; {fix} or move logging.run_dir, then continue with --resume auto")


def _state_bytes(tree) -> int:
    """Bytes of the tensors in a (nested) state dict: this rank's share of a checkpoint."""
    if isinstance(tree, dict):
        return sum(_state_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_state_bytes(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        return local.numel() * local.element_size()
    return 0
