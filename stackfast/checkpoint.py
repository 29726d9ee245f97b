"""Checkpoints: save, find, load; never unpickles arbitrary objects.

A training checkpoint is a folder `<run_dir>/checkpoints/step_XXXXXXXX/` with
    .metadata, *.distcp       model weights (fp32 master copy) and AdamW state in
                              torch.distributed.checkpoint (DCP) format under the keys
                              "model.<name>" and "optim.state.<name>.<moment>": every process
                              writes its own shards, and any number of processes (one included)
                              loads them, DCP resharding as needed
    rng_rank<R>.safetensors   CPU and CUDA random generator states of process R
    state.json                step, tokens, FLOPs, data position, growth spec: the loop state
    config.toml               the resolved config of the run
    checksums.json            sha256 of every other file: a resume or export re-hashes them
                              and refuses a file whose bytes changed (a flipped bit keeps
                              its size; DCP would load it silently). Each rank hashes its
                              share of the files, on save and on load; DCP's .metadata
                              (every tensor's shard, offset and length) is listed too
Every rank writes into the hidden folder `.step_XXXXXXXX.tmp`; rank 0 renames it into
place after a barrier, once all of it is complete. A crash mid-save leaves the previous
checkpoint as the newest complete one (the stale temporary folder is never listed, and the
next job that holds the run folder removes it). A save that fails (a full disk, a read-only
folder, an interrupt) removes its temporary folder itself. The checkpoint folder must be on a
filesystem that all nodes share.

checkpoint.async_save (`AsyncSaver`): the loop waits only while each rank copies its state
into host memory; a background thread then writes the same files through the same writer,
hashes them and renames the folder (rank 0, once every rank's part is written and hashed),
while training goes on. One save is in flight at most; its failure is raised when the loop
next waits for it (the next checkpoint step, the final save, the end).

Weights-only folders (`stackfast grow`'s output: model.safetensors, state.json,
config.toml, checksums.json) are read by `load_weights` too, as are DCP checkpoints in one
process with the shapes from their config.toml. That is why no rank-0 model.safetensors
is written beside the shards: it would gather the whole model into one process's memory
at every save.

Loading never runs code from the files. Tensors come from safetensors or DCP's raw
shards; DCP's pickled .metadata is read (by DCP itself too, through `_SafeReader`) with an
unpickler that builds only DCP's own metadata classes, torch dtypes and sizes; the
pickled non-tensor entries of the shards (optimizer settings such as lr and betas) are
read through torch.load(weights_only=True) by `_SafeLoadPlanner` (DCP's default planner
uses weights_only=False). Anything else is refused with an error naming the entry.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import pickle
import re
import shutil
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.tensor import DTensor

from stackfast.config import Config, ConfigError, ModelConfig, StackfastError, saved_config, tomllib
from stackfast.errors import WriteError
from stackfast.files import first_line, replace_folder, write_failure, write_folder
from stackfast.model import Transformer
from stackfast.parallel import World, barrier

# A single-process run saves and loads the same DCP format as a sharded one; DCP's note that
# it found no process group is expected there, not a problem to report to the user.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_DIR = re.compile(r"^\.step_\d{8}\.tmp$")
MODEL_FILE, STATE_FILE, CONFIG_FILE, DCP_METADATA, CHECKSUM_FILE = (
    "model.safetensors", "state.json", "config.toml", ".metadata", "checksums.json")


class CheckpointError(StackfastError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer, state: dict,
                    config: Config, keep_last: int, world: World = World()) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`.

    Collective: every rank calls it (each writes its own shards and RNG state). A save that
    fails for any reason (an interrupt included) removes its temporary folder and leaves the
    checkpoints that were there as they were; a full disk, a read-only or forbidden folder or
    an I/O error is one WriteError naming the problem, the folder and the newest complete
    checkpoint; any other error is raised as it is."""
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".{final.name}.tmp"
    # Plain tensors for a single process, DTensor shards under FSDP; keys are parameter names.
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)  # left behind by a crash during an earlier save
            tmp.mkdir(parents=True)
        barrier(world)
        _write_files(tmp, {"model": model_state, "optim": optim_state}, rng_state(),
                     json.dumps(state, indent=1) + "\n", config.to_toml(), world)  # collective under torchrun
        barrier(world)  # every rank's files are complete: only now may they be hashed
        write_checksums(tmp, world)  # collective
        if world.main:
            replace_folder(tmp, final)  # re-saving a step (the end of a resumed run) replaces it
    except BaseException as error:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)  # the partial save would hold the space forever
        failure = _save_failure(error, ckpt_root, final.name, _needed_bytes((model_state, optim_state), world))
        if failure is None:
            raise
        raise failure from None
    if world.main:
        _prune(ckpt_root, state["run_id"], keep_last)
    return final


def _write_files(tmp: Path, tensors: dict, rng: dict[str, torch.Tensor], state_text: str, config_text: str,
                 world: World, group=None) -> None:
    """This rank's files of a checkpoint in `tmp`: its DCP shards (collective under torchrun, on
    `group`: the default one, or the background save's own), its RNG state; rank 0 also
    state.json and config.toml. The sync and the background save both write through here."""
    dcp.save(tensors, checkpoint_id=tmp, process_group=group, no_dist=not world.distributed)
    save_file(rng, str(tmp / f"rng_rank{world.rank}.safetensors"))
    if world.main:
        (tmp / STATE_FILE).write_text(state_text)
        (tmp / CONFIG_FILE).write_text(config_text)


def _needed_bytes(tensors, world: World) -> int:
    """What the checkpoint takes on disk: every rank's share, a replicated shard (HSDP) saved once."""
    return _state_bytes(tensors) * world.world_size // world.replicate_degree


def _save_failure(error: BaseException, ckpt_root: Path, name: str, needed: int) -> WriteError | None:
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


def _prune(ckpt_root: Path, run_id: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` of this run's own checkpoints (rank 0): one copied
    in from elsewhere stays."""
    lineage = [c for c in list_checkpoints(ckpt_root) if run_id_of(c) == run_id]
    for old in lineage[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Background saves (checkpoint.async_save)
# --------------------------------------------------------------------------------------

class _Abandoned(Exception):
    """A background save given up by the loop (a second stop signal): never renamed into place."""


@dataclass
class _Job:
    """One background save: what was staged, where it goes, and how it ended."""
    ckpt_root: Path
    step: int
    tensors: dict  # the host copy: plain CPU tensors, or DTensors around CPU copies of the local shards
    rng: dict
    state_text: str
    config_text: str
    run_id: str
    keep_last: int
    needed: int
    thread: threading.Thread | None = None
    error: BaseException | None = None
    seconds: float = 0.0  # from the start of the background work to the rename
    abandoned: bool = False
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def final(self) -> Path:
        return self.ckpt_root / f"step_{self.step:08d}"

    @property
    def tmp(self) -> Path:
        return self.ckpt_root / f".step_{self.step:08d}.tmp"


class AsyncSaver:
    """checkpoint.async_save: a save stages a host copy of every rank's state (model and
    optimizer shards, RNG states, state.json and config.toml as text) while the loop waits,
    then writes, hashes and renames it on a background thread while training goes on.

    The checkpoint it writes is the sync save's, file for file (the same writer,
    `_write_files`, and the same checksums), and it appears the same way: built in the hidden
    `.step_XXXXXXXX.tmp` and renamed into place by rank 0 only when every rank's part is
    written and hashed; older ones are pruned then. The ranks' background threads agree on
    each stage (every file written, every share hashed, renamed) through an all-gather of
    their errors on a gloo group of their own (`group`): the loop's collectives on the default
    group go on meanwhile, and DCP's planning collectives of the save run on it too.

    At most one save is in flight: `save` first waits for the previous one (`wait`), which
    raises its failure: a file-system failure as the sync save's one-line WriteError (the
    previous checkpoint intact, the temporary folder removed), anything else as it is.
    Every rank's wait raises the same, at the same step. A crash or kill -9 meanwhile leaves
    only the temporary folder, which no resume lists and the next job removes.

    The host buffers are kept between saves (pinned memory on GPU): one host copy of this
    rank's model and optimizer state for the run's lifetime, reallocated when shapes change
    (growth). The thread is a daemon: a process that ends without waiting (kill, a second
    signal) leaves the temporary folder, never a checkpoint under its final name."""

    def __init__(self, world: World = World()):
        self.world = world
        # Collective under torchrun: every rank creates it at the same point, before the loop.
        self.group = dist.new_group(backend="gloo") if world.distributed else None
        self.job: _Job | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.finished: _Job | None = None  # the last background save that wait() collected

    def save(self, ckpt_root: Path, step: int, model: torch.nn.Module, optimizer, state: dict, config: Config,
             keep_last: int) -> float:
        """Wait for the save in flight, stage this one and start writing it in the background.
        Collective under torchrun (every rank calls it at the same step). Returns the seconds
        spent waiting for the previous save."""
        waited = self.wait()
        model_state, optim_state = get_state_dict(model, optimizer)
        tensors = self._stage({"model": model_state, "optim": optim_state})
        job = _Job(ckpt_root, step, tensors, rng_state(), json.dumps(state, indent=1) + "\n", config.to_toml(),
                   state["run_id"], keep_last, _needed_bytes(tensors, self.world))
        job.thread = threading.Thread(target=self._write, args=(job,), name=f"stackfast-checkpoint-{step}",
                                      daemon=True)
        self.job = job
        job.thread.start()
        return waited

    def wait(self) -> float:
        """Wait for the save in flight (if any) to be renamed into place; raise its failure.
        Returns the seconds waited. A signal handler may interrupt the wait (a second stop
        signal): the save then stays in flight, for `abandon`."""
        job = self.job
        if job is None:
            return 0.0
        started = time.perf_counter()
        job.thread.join()
        self.job, self.finished = None, job
        if job.error is not None:
            failure = _save_failure(job.error, job.ckpt_root, job.final.name, job.needed)
            if failure is None:
                raise job.error
            raise failure from None
        return time.perf_counter() - started

    def metrics(self, waited: float) -> dict:
        """The async fields of a checkpoint step's metrics row: the part of the loop's stall spent
        waiting for the previous save (`checkpoint_wait_s`; > 0: saves come faster than they are
        written) and, once collected, that save's step and background time (stage to rename)."""
        row = {"checkpoint_wait_s": waited}
        if self.finished is not None:
            row.update(checkpoint_background_step=self.finished.step,
                       checkpoint_background_s=self.finished.seconds)
            self.finished = None
        return row

    def abandon(self) -> None:
        """Give up the save in flight without waiting (a second stop signal): it is never renamed
        into place unless it already was; rank 0 removes its temporary folder (what a writer
        still adds to it meanwhile goes with the next job's cleanup of stale saves)."""
        job, self.job = self.job, None
        if job is None:
            return
        with job.lock:  # the thread renames under this lock: either renamed already, or never
            job.abandoned = True
        if self.world.main:
            shutil.rmtree(job.tmp, ignore_errors=True)

    def __enter__(self) -> "AsyncSaver":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Leaving the loop: on a stop-now interrupt the save in flight is abandoned; on any other
        error it is still waited for (a complete checkpoint of an earlier step is worth keeping),
        its own failure giving way to the error being raised."""
        if error is None:
            self.wait()
        elif isinstance(error, KeyboardInterrupt):
            self.abandon()
        else:
            try:
                self.wait()
            except BaseException:  # the error already on its way out is the one to report
                pass

    @torch.no_grad()
    def _stage(self, tree):
        """A copy of `tree` in host memory: every tensor copied into this saver's buffers (a
        DTensor as a DTensor around a copy of its local shard), other leaves deep-copied. The
        loop updates parameters and moments in place right after: the copy must be real."""
        buffers, used = self.buffers, {}
        on_gpu = []

        def copy_of(t: torch.Tensor, key: str) -> torch.Tensor:
            t = t.detach()
            pin = t.device.type == "cuda" and t.numel() > 0
            buf = buffers.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.is_pinned() != pin:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            buf.copy_(t, non_blocking=pin)
            if pin:
                on_gpu.append(t)
            used[key] = buf
            return buf

        def stage(node, key: str):
            if isinstance(node, DTensor):
                # The same placement and global shape; the local shard now a host copy.
                return DTensor(copy_of(node.to_local(), key), node._spec, requires_grad=False)
            if isinstance(node, torch.Tensor):
                return copy_of(node, key)
            if isinstance(node, dict):
                return {k: stage(v, f"{key}/{k}") for k, v in node.items()}
            if isinstance(node, (list, tuple)):
                return type(node)(stage(v, f"{key}/{i}") for i, v in enumerate(node))
            return copy.deepcopy(node)

        staged = stage(tree, "")
        if on_gpu:
            torch.cuda.synchronize()  # host sync: the copies must be complete before the loop moves on
        self.buffers = used  # buffers of tensors gone (growth changed the shapes) are freed
        return staged

    def _write(self, job: _Job) -> None:
        """The background thread: write, hash, rename (rank 0), prune. Every rank goes through
        the same agreements, so all of them end with the same error, or none; whatever fails
        (an agreement itself included: a rank gone) is the job's error, never a silent end."""
        started = time.perf_counter()
        try:
            self._write_steps(job)
        except BaseException as error:
            job.error = error
            if self.world.main:
                shutil.rmtree(job.tmp, ignore_errors=True)  # the partial save would hold the space forever
        else:
            if self.world.main:
                _prune(job.ckpt_root, job.run_id, job.keep_last)
        job.tensors = None  # the buffers stay with the saver, for the next save
        job.seconds = time.perf_counter() - started

    def _write_steps(self, job: _Job) -> None:
        world, group = self.world, self.group

        def step(work, main_only=False) -> None:
            """work() on this rank, then the agreement: any rank's error is raised on all."""
            error = None
            if world.main or not main_only:
                try:
                    work()
                except BaseException as e:
                    error = e
            error = _agree(error, world, group)
            if error is not None:
                raise error

        def make_folder() -> None:
            shutil.rmtree(job.tmp, ignore_errors=True)  # left behind by a crash during an earlier save
            job.tmp.mkdir(parents=True)

        def rename() -> None:
            with job.lock:  # abandon() takes it too: either renamed already, or never
                if job.abandoned:
                    raise _Abandoned(f"checkpoint {job.final.name} abandoned")
                _merge_checksums(job.tmp, world)
                replace_folder(job.tmp, job.final)

        step(make_folder, main_only=True)  # the folder is there before anyone writes into it
        step(lambda: _write_files(job.tmp, job.tensors, job.rng, job.state_text, job.config_text, world, group))
        step(lambda: _hash_share(job.tmp, world))  # every rank's files are complete: only now hashed
        step(rename, main_only=True)  # renamed into place, or not, for every rank


def _agree(error: BaseException | None, world: World, group) -> BaseException | None:
    """The first error of any rank (this rank's own first), or None: an all-gather on `group`,
    so it is also a barrier. Another rank's error arrives pickled (without its traceback; an
    unpicklable one as its type and first line), wrapped to say which rank it came from."""
    if not world.distributed:
        return error
    mine = None
    if error is not None:
        try:
            pickle.loads(pickle.dumps(error))  # some exceptions pickle but cannot be rebuilt (extra arguments)
            mine = error
        except Exception:
            mine = RuntimeError(f"{type(error).__name__}: {first_line(error)}")
    errors: list = [None] * world.world_size
    dist.all_gather_object(errors, mine, group=group)
    if error is not None:
        return error
    rank, first = next(((r, e) for r, e in enumerate(errors) if e is not None), (None, None))
    if first is None:
        return None
    wrapped = RuntimeError(f"rank {rank}: {type(first).__name__}: {first_line(first)}")
    wrapped.__cause__ = first  # write_failure looks through the chain for an OSError
    return wrapped


def remove_stale_saves(ckpt_root: Path) -> list[Path]:
    """Remove the temporary folders of saves that a crash interrupted (`.step_XXXXXXXX.tmp`).

    For the job that holds the run folder's lock (rank 0, before its first save): no other
    job can be writing there, so every such folder is stale."""
    stale = [p for p in ckpt_root.iterdir() if TMP_DIR.match(p.name)] if ckpt_root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


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


def run_id_of(folder: Path) -> str | None:
    """The id of the run that wrote a checkpoint (None when unreadable)."""
    try:
        return json.loads((folder / STATE_FILE).read_text()).get("run_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer, world: World = World()) -> None:
    """Restore weights, optimizer state and this rank's RNG into the (possibly sharded) model.

    Collective under FSDP: every rank calls it. The checkpoint may come from any number of
    processes. The caller verifies its checksums first (the training loop does, before it
    reads state.json)."""
    # get_state_dict gives the model's own (sharded) tensors and, for an optimizer that has not
    # stepped yet, freshly created moments: DCP reads every rank's part into them in place.
    model_state, optim_state = get_state_dict(model, optimizer)
    _dcp_load({"model": model_state, "optim": optim_state}, folder, world)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    rng = folder / f"rng_rank{world.rank}.safetensors"
    if rng.is_file():  # absent when resuming on more processes than saved: keep the seeded state
        set_rng_state(load_rng(rng))


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
    _dcp_load({"model": weights}, folder)
    return weights


def _dcp_load(state: dict, folder: Path, world: World = World()) -> None:
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: Path, world: World = World()) -> None:
    """checksums.json: the sha256 of every file in `folder`, each rank hashing every
    world_size-th one into a part file that rank 0 merges after a barrier (collective under
    FSDP; files and barriers only: no object collective at the end of a run's last save)."""
    _hash_share(folder, world)
    barrier(world)
    _merge_checksums(folder, world)


def _hash_share(folder: Path, world: World) -> None:
    """This rank's share of checksums.json (every world_size-th file) into its part file."""
    # Part files may already be there (a faster rank's): never hashed themselves.
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(CHECKSUM_FILE))
    part = folder / f"{CHECKSUM_FILE}.rank{world.rank}"
    part.write_text(json.dumps({name: _sha256(folder / name) for name in names[world.rank::world.world_size]}))


def _merge_checksums(folder: Path, world: World) -> None:
    """Rank 0, once every rank's part is written: the parts merged into checksums.json."""
    if world.main:
        parts = [folder / f"{CHECKSUM_FILE}.rank{r}" for r in range(world.world_size)]
        checksums = {name: digest for p in parts for name, digest in json.loads(p.read_text()).items()}
        (folder / CHECKSUM_FILE).write_text(json.dumps(checksums, indent=1, sort_keys=True) + "\n")
        for p in parts:
            p.unlink()


def verify_checksums(folder: Path, world: World = World(), required: list[str] | None = None) -> None:
    """Re-hash the files that checksums.json lists, each rank its share (collective under
    FSDP); a file whose bytes changed is an error naming it, raised on every rank.

    `required`: the files that must be listed (default: every file of the folder; a Hugging
    Face folder names the ones stackfast reads, so a README added later does no harm). A
    folder without checksums.json is refused: callers skip this check only when the user
    allowed unverified files explicitly."""
    path = folder / CHECKSUM_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CHECKSUM_FILE}, so a changed or corrupt file would go unnoticed; if "
                              f"you trust these files, allow that explicitly (--allow-unverified, or "
                              f"checkpoint.allow_unverified = true in a run's config)")
    try:
        expected = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt checksum list ({e.msg})") from None
    # Plain file names of this folder mapped to hex digests; anything else is not ours.
    if not (isinstance(expected, dict) and all(isinstance(v, str) and Path(k).name == k and k not in ("", ".", "..")
                                               for k, v in expected.items())):
        raise CheckpointError(f"{path}: corrupt checksum list (expected file names of this folder and their sha256)")
    if required is None:
        required = [p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(CHECKSUM_FILE)]
    unlisted = sorted(set(required) - set(expected))
    if unlisted:
        raise CheckpointError(f"{folder / unlisted[0]}: not in {CHECKSUM_FILE} (a file added or renamed after the "
                              f"folder was written)")
    missing = sorted(name for name in expected if not (folder / name).is_file())
    if missing:
        raise CheckpointError(f"{folder / missing[0]}: missing (listed in {CHECKSUM_FILE})")
    names = sorted(expected)
    bad = [name for name in names[world.rank::world.world_size] if _sha256(folder / name) != expected[name]]
    if world.distributed:
        parts = [None] * world.world_size
        dist.all_gather_object(parts, bad)
        bad = sorted(name for part in parts for name in part)
    if bad:
        more = f"; also {', '.join(bad[1:])}" if len(bad) > 1 else ""
        raise CheckpointError(f"{folder / bad[0]}: checksum mismatch: the file changed after the checkpoint "
                              f"was saved (disk or copy corruption){more}. Resume from an earlier checkpoint")


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
    path = _require(folder, DCP_METADATA)
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


def load_state(folder: Path) -> dict:
    path = _require(folder, STATE_FILE)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt ({e.msg})") from None


def load_rng(path: Path) -> dict[str, torch.Tensor]:
    _require(path.parent, path.name)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def load_config_of(folder: str | Path) -> Config:
    """The resolved config saved with a checkpoint."""
    path = _require(Path(folder), CONFIG_FILE)
    try:
        return saved_config(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, ConfigError, UnicodeDecodeError) as e:
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


def is_hf_dir(folder: str | Path) -> bool:
    return (Path(folder) / "config.json").is_file()


def load_hf(folder: str | Path, allow_unverified: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A Hugging Face Llama folder (config.json + model.safetensors or a sharded index) as a
    ModelConfig and stackfast-named weights. Features stackfast's model lacks are refused.
    The files read must match the folder's checksums.json (stackfast's exports write one;
    transformers ignores it) unless allow_unverified."""
    folder = Path(folder)
    try:
        hf = json.loads(_require(folder, "config.json").read_text())
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
        files = [_require(folder, "model.safetensors").name]
    if not allow_unverified:
        verify_checksums(folder, required=["config.json", *files] + ([index.name] if index.is_file() else []))
    weights = {}
    for name in files:
        path = _require(folder, name)
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
