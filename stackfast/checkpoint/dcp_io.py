"""The DCP format of training checkpoints: the one writer of a checkpoint's files (the sync
save and the background save both write through `write_files`) and the safe reader.

In a checkpoint folder:
    .metadata, *.distcp       model weights (fp32 master copy) and AdamW state in
                              torch.distributed.checkpoint (DCP) format under the keys
                              "model.<name>" and "optim.state.<name>.<moment>": every process
                              writes its own shards, and any number of processes (one included)
                              loads them, DCP resharding as needed
    rng_rank<R>.safetensors   CPU and CUDA random generator states of process R
    state.json, config.toml   the loop state and the resolved config (rank 0)

Loading never runs code from the files. Tensors come from DCP's raw shards; DCP's pickled
.metadata is read (by DCP itself too, through `_SafeReader`) with an unpickler that builds
only DCP's own metadata classes, torch dtypes and sizes; the pickled non-tensor entries of
the shards (optimizer settings such as lr and betas) are read through
torch.load(weights_only=True) by `_SafeLoadPlanner` (DCP's default planner uses
weights_only=False). Anything else is refused with an error naming the entry.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint._traverse import set_element

from stackfast.checkpoint.layout import CONFIG_FILE, DCP_METADATA, STATE_FILE, CheckpointError, require
from stackfast.files import first_line
from stackfast.parallel import World

# A single-process run saves and loads the same DCP format as a sharded one; DCP's note that
# it found no process group is expected there, not a problem to report to the user.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def write_files(tmp: Path, tensors: dict, rng: dict[str, torch.Tensor], state_text: str, config_text: str,
                world: World, group=None) -> None:
    """This rank's files of a checkpoint in `tmp`: its DCP shards (collective under torchrun, on
    `group`: the default one, or the background save's own), its RNG state; rank 0 also
    state.json and config.toml. The sync and the background save both write through here."""
    dcp.save(tensors, checkpoint_id=tmp, process_group=group, no_dist=not world.distributed)
    save_file(rng, str(tmp / f"rng_rank{world.rank}.safetensors"))
    if world.main:
        (tmp / STATE_FILE).write_text(state_text)
        (tmp / CONFIG_FILE).write_text(config_text)


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer, world: World = World()) -> None:
    """Restore weights, optimizer state and this rank's RNG into the (possibly sharded) model.

    Collective under FSDP: every rank calls it. The checkpoint may come from any number of
    processes. The caller verifies its checksums first (the training loop does, before it
    reads state.json)."""
    # get_state_dict gives the model's own (sharded) tensors and, for an optimizer that has not
    # stepped yet, freshly created moments: DCP reads every rank's part into them in place.
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp_load({"model": model_state, "optim": optim_state}, folder, world)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    rng = folder / f"rng_rank{world.rank}.safetensors"
    if rng.is_file():  # absent when resuming on more processes than saved: keep the seeded state
        set_rng_state(load_rng(rng))


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


def load_rng(path: Path) -> dict[str, torch.Tensor]:
    require(path.parent, path.name)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def dcp_load(state: dict, folder: Path, world: World = World()) -> None:
    """DCP-load `state` in place from folder (collective under FSDP), after checking that
    .metadata is safe to unpickle and every shard it names is there and long enough.
    Checksums are the caller's to verify, once per folder, before anything is read."""
    for path, size in _shard_sizes(folder).items():
        if not path.is_file():
            raise CheckpointError(f"{path}: missing shard of checkpoint {folder}")
        if path.stat().st_size < size:
            raise CheckpointError(f"{path}: truncated shard ({path.stat().st_size} bytes, the checkpoint "
                                  f"index needs {size})")
    try:
        dcp.load(state, storage_reader=_SafeReader(folder), planner=_SafeLoadPlanner(),
                 no_dist=not world.distributed)
    # DCP wraps every rank's failure (missing key, shape, read error) in CheckpointException,
    # which derives from BaseException, not Exception.
    except CheckpointException as e:
        # The first failing rank's own error; ours (a refused entry) is passed on as it is.
        error = next(iter(e.failures.values()))[0] if e.failures else e
        if isinstance(error, CheckpointError):
            raise CheckpointError(f"{folder}: {error}") from None
        raise CheckpointError(f"{folder}: does not fit the model or is unreadable "
                              f"({type(error).__name__}: {first_line(error)})") from None
    except Exception as e:
        raise CheckpointError(f"{folder}: does not fit the model or is unreadable "
                              f"({type(e).__name__}: {first_line(e)})") from None


class _SafeReader(FileSystemReader):
    """DCP's file reader with .metadata read by the restricted unpickler (its own reader
    calls pickle.load, which would build any object the file names)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        with open(Path(self.path) / DCP_METADATA, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with its non-tensor entries (optimizer settings such as lr and
    betas, saved pickled) read by torch.load(weights_only=True): numbers, strings and
    containers only. The default planner unpickles them with weights_only=False, so a
    crafted entry would run code."""

    def load_bytes(self, read_item, value) -> None:
        try:
            loaded = torch.load(value, map_location="cpu", weights_only=True)
        except Exception:  # UnpicklingError for a refused global, and corrupt data
            raise CheckpointError(f"entry {read_item.dest_index.fqn} refused: a pickled object that is not plain "
                                  f"data (numbers, strings, containers, tensors) or a corrupt one") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch dtypes/sizes and paths; refuses any other global
    (a crafted pickle's os.system, exec, ...), so reading .metadata cannot run code."""
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module: str, name: str):
        if module in ("pathlib", "pathlib._local") and name in ("PosixPath", "PurePosixPath", "WindowsPath"):
            return super().find_class(module, name)  # the checkpoint id DCP records (Python 3.13: _local)
        found = super().find_class(module, name) if module == "torch" or module.startswith("torch.") else None
        ok = ((module, name) in self.ALLOWED
              or (module == "torch" and isinstance(found, torch.dtype))
              or (module == "torch.distributed.checkpoint.metadata" and isinstance(found, type)
                  and found.__module__ == module))
        if not ok:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in checkpoint metadata")
        return found


def _shard_sizes(folder: Path) -> dict[Path, int]:
    """Each shard file that DCP's .metadata refers to, with the size it must have at least."""
    path = require(folder, DCP_METADATA)
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
        sizes: dict[Path, int] = {}
        for info in metadata.storage_data.values():
            shard = folder / info.relative_path
            sizes[shard] = max(sizes.get(shard, 0), info.offset + info.length)
    except Exception as e:  # refused global, truncated or corrupt pickle, unexpected content
        raise CheckpointError(f"{path}: refused or corrupt checkpoint metadata "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return sizes
