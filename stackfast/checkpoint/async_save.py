"""checkpoint.async_save (`AsyncSaver`): the loop waits only while each rank copies its state
into host memory; a background thread then writes the same files through the same writer
(dcp_io.write_files), hashes them and renames the folder (rank 0, once every rank's part is
written and hashed), while training goes on. One save is in flight at most; its failure is
raised when the loop next waits for it (the next checkpoint step, the final save, the end).
"""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import json
import pickle
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

from stackfast.checkpoint.checksums import hash_share, merge_checksums
from stackfast.checkpoint.dcp_io import rng_state, write_files
from stackfast.checkpoint.layout import prune, step_folder, temp_folder
from stackfast.checkpoint.save import needed_bytes, save_failure
from stackfast.config import Config
from stackfast.files import first_line, replace_folder
from stackfast.parallel import World

# How long abandoning a save waits for its interrupted writer to end: one tensor's write at
# most (the writer stops at its next Python instruction), or a peer rank's exit under torchrun.
ABANDON_WAIT_S = 60.0


class _Abandoned(BaseException):
    """A background save given up by the loop (a second stop signal): never renamed into place.
    Raised in the writer thread itself too (`_interrupt`); a BaseException, so that no
    library's `except Exception` on the way swallows it and writes on."""


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
    # Whether abandon() may still interrupt the writer: not yet renamed into place, not ended.
    cancellable: bool = True
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def final(self) -> Path:
        return step_folder(self.ckpt_root, self.step)

    @property
    def tmp(self) -> Path:
        return temp_folder(self.ckpt_root, self.step)


class AsyncSaver:
    """checkpoint.async_save: a save stages a host copy of every rank's state (model and
    optimizer shards, RNG states, state.json and config.toml as text) while the loop waits,
    then writes, hashes and renames it on a background thread while training goes on.

    The checkpoint it writes is the sync save's, file for file (the same writer,
    `dcp_io.write_files`, and the same checksums), and it appears the same way: built in the hidden
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
    (growth). A second stop signal abandons the save in flight (`abandon`): its writer is
    interrupted and waited for, and the temporary folder removed. The thread is a daemon, so
    nothing else waits for it: a kill leaves the temporary folder, never a checkpoint under its
    final name."""

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
                   state["run_id"], keep_last, needed_bytes(tensors, self.world))
        job.thread = threading.Thread(target=self._write, args=(job,), name=f"stackfast-checkpoint-{step}",
                                      daemon=True)
        job.thread.start()
        self.job = job  # recorded once started: abandon() only ever meets a writer that runs or ran
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
            failure = save_failure(job.error, job.ckpt_root, job.final.name, job.needed)
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
        """Give up the save in flight (a second stop signal): it is never renamed into place
        unless it already was. Its writer is interrupted (`_interrupt`: between two tensors'
        writes) and waited for, then rank 0 removes the temporary folder, to which nothing is
        added any more.

        Why interrupt and wait rather than leave the daemon thread to die with the process: a
        daemon thread still inside a torch call when the interpreter shuts down is ended as
        it returns, through C++ code that cannot be unwound, and the process aborts
        (`terminate called without an active exception`, exit 134) instead of ending with the
        second signal's one line and 128 + its number. A writer stuck in one call (a hung
        file system) is waited for ABANDON_WAIT_S at most."""
        job, self.job = self.job, None
        if job is None:
            return
        with job.lock:  # the thread renames, and ends, under this lock: either it did already, or it never will
            job.abandoned = True
            if job.cancellable:
                _interrupt(job.thread)
        job.thread.join(ABANDON_WAIT_S)
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
            try:
                self._write_steps(job)
            except BaseException as error:
                job.error = error
                if self.world.main:
                    shutil.rmtree(job.tmp, ignore_errors=True)  # the partial save would hold the space forever
            else:
                if self.world.main:
                    prune(job.ckpt_root, job.run_id, job.keep_last)
            job.tensors = None  # the buffers stay with the saver, for the next save
            job.seconds = time.perf_counter() - started
            with job.lock:  # the last step: an interruption sent before lands inside this try
                job.cancellable = False
        except _Abandoned:  # interrupted by abandon(), which removes the temporary folder
            pass

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
                merge_checksums(job.tmp, world)
                replace_folder(job.tmp, job.final)
                job.cancellable = False  # in place: pruning must not be cut short

        step(make_folder, main_only=True)  # the folder is there before anyone writes into it
        step(lambda: write_files(job.tmp, job.tensors, job.rng, job.state_text, job.config_text, world, group))
        step(lambda: hash_share(job.tmp, world))  # every rank's files are complete: only now hashed
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


def _interrupt(thread: threading.Thread) -> None:
    """Raise _Abandoned in `thread` at its next Python instruction (CPython's documented
    PyThreadState_SetAsyncExc). A thread inside a torch call gets it when the call returns:
    in a checkpoint write, once the tensor being written is written."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Abandoned))
