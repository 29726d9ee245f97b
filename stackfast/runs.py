"""Run folders: one job at a time, never clobbered, resumed only with the settings they were made with.

A run folder (`logging.run_dir`) holds metrics.jsonl, config.toml, tensorboard/ and
checkpoints/. Three rules keep what is in it safe:
- One job per folder: rank 0 holds an OS-level lock (`flock` on `.lock`) for the whole run.
  The kernel releases it when the process ends, however it ends (kill -9 included), so a
  stale lock never blocks a restart; the refusal names the holder's host and pid.
- A fresh run refuses a folder that already holds a run (checkpoints or metrics); it
  starts over there only when told to (`logging.overwrite`, `stackfast train --force`),
  and then deletes that run's files explicitly first.
- A resume compares the checkpoint's config.toml with the new config: what defines the
  run (model, data, growth, global batch, seed) must match unless named in
  `checkpoint.allow_changes`; other differences are reported and applied. A mixture is
  compared by its normalised weights, and data.sampling 'auto' keeps the run's own.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path

from stackfast.checkpoint import list_checkpoints, load_config_of
from stackfast.config import Config, ConfigError, StackfastError
from stackfast.errors import WriteError

LOCK_FILE = ".lock"
# Settings that define the run: a resume with another value would silently train another run.
DEFINING = ("model.", "data.", "growth.", "train.global_batch_size", "train.seed")
# Settings that choose how a run executes, not what it computes.
OPERATIONAL = ("model.kernels", "checkpoint.resume", "checkpoint.allow_changes", "checkpoint.allow_unverified",
               "logging.overwrite")


class RunFolderError(StackfastError):
    """The run folder is in use, or holds a run that this command would overwrite."""


class RunLock:
    """An exclusive lock on a run folder, held while the job runs (rank 0 only).

    A folder this process may not write (a read-only mount, no permission) is locked through
    a read-only descriptor of an existing .lock, or not at all when there is none, and
    `writable` is False: the job may still read the run (a finished run says so and writes
    nothing), and refuses to train there with one line (`refuse_read_only`)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.file = None
        self.writable = True
        self.why = ""  # why the folder is not writable: the OSError's words

    def __enter__(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")
        except OSError as e:
            if not self.path.parent.is_dir():
                raise WriteError(f"{self.path.parent}: cannot create the run folder ({e.strerror or e}); choose "
                                 f"another logging.run_dir") from None
            self.writable, self.why = False, f"{e.strerror or e}: {e.filename or self.path}"
            try:
                self.file = open(self.path, "r")
            except OSError:  # no .lock to hold: nothing can have been written there by a job since
                self.file = None
                return self
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            try:
                holder = json.loads(self.file.read())
                who = f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
            except (json.JSONDecodeError, KeyError, TypeError):
                who = "another process"
            self.file.close()
            raise RunFolderError(f"{self.path.parent}: in use by another job ({who}); wait for it to end or "
                                 f"choose another logging.run_dir") from None
        except OSError:
            if self.writable:
                raise
            self.file.close()  # a file system without locks on read-only files: read without one
            self.file = None
        if self.writable:
            try:
                self.file.seek(0)
                self.file.truncate()
                self.file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
                self.file.flush()
            except OSError as e:  # a full disk: the lock is held all the same, only its note is missing
                self.why = f"{e.strerror or e}: {self.path}"
        return self

    def refuse_read_only(self) -> None:
        """Raise WriteError unless the run folder can be written (a job that would train there)."""
        if not self.writable:
            raise WriteError(f"{self.path.parent}: cannot write the run folder ({self.why}); a run writes its "
                             f"checkpoints and logs there: choose another logging.run_dir")

    def __exit__(self, *exc) -> None:
        # The file stays: deleting it would let a job waiting on the old inode and a new one
        # that creates a fresh file both hold "the" lock.
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def run_files(run_dir: Path) -> list[Path]:
    """The files and folders of a run in run_dir (what a fresh start there would overwrite)."""
    names = ("checkpoints", "metrics.jsonl", "config.toml", "tensorboard")
    return [run_dir / n for n in names if (run_dir / n).exists()]


def holds_a_run(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return (run_dir / "metrics.jsonl").exists() or (ckpts.is_dir() and any(ckpts.iterdir()))


def clear_run(run_dir: Path) -> None:
    for path in run_files(run_dir):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def prepare_fresh(run_dir: Path, cfg: Config) -> None:
    """Make run_dir ready for a run that does not continue the one in it (a fresh run, or
    a resume from a checkpoint of another folder), refusing to overwrite a run (rank 0).

    resume = "auto" that found no checkpoint is the restart of a job stopped before its
    first checkpoint: its partial logs are replaced when its settings are the same."""
    if not holds_a_run(run_dir):
        return
    if cfg.logging.overwrite:
        clear_run(run_dir)
        return
    if cfg.checkpoint.resume == "auto" and not list_checkpoints(run_dir / "checkpoints") \
            and (run_dir / "config.toml").is_file():
        blocked, _ = config_changes(load_config_of(run_dir), cfg)
        if not blocked:
            clear_run(run_dir)
            return
    raise RunFolderError(f"{run_dir}: holds a run already (checkpoints or metrics.jsonl); continue it with "
                         f"--resume auto, choose another logging.run_dir, or start over with --force "
                         f"(logging.overwrite = true), which deletes that run's files")


def run_sampling(saved: Config | None, new: Config) -> str:
    """The run's data.sampling: as set, or for 'auto' the checkpoint's when resuming (a run keeps
    the sampling it started with; a config.toml without one means 'random') and 'epoch' for a
    new run."""
    if new.data.sampling != "auto":
        return new.data.sampling
    return saved.data.sampling if saved is not None and saved.data.sampling != "auto" else "epoch"


def same_mixture(saved: Config, new: Config) -> bool:
    """Whether two configs' data.sources are one mixture: the same sources in the same order
    with the same normalised weights (7 and 3 are 0.7 and 0.3), to rounding."""
    old, now = saved.data.mixture(), new.data.mixture()
    return len(old) == len(now) and all(
        (a.path, a.name) == (b.path, b.name) and math.isclose(a.weight, b.weight, rel_tol=1e-9)
        for a, b in zip(old, now))


def config_changes(saved: Config, new: Config) -> tuple[list[str], list[str]]:
    """The differences between a checkpoint's config and the new one, as 'key: old -> new'
    lines: (those that change what the run computes and are not allowed, the others)."""
    allowed = new.allowed_changes()
    old_values, new_values = saved.flat(), new.flat()
    blocked, noted = [], []
    for key, value in new_values.items():
        old = old_values.get(key)
        if old == value or key in OPERATIONAL:
            continue
        if key == "data.sampling" and value == "auto":  # the run keeps its own (run_sampling)
            continue
        if key == "data.sources" and same_mixture(saved, new):
            continue
        line = f"{key}: {old!r} -> {value!r}"
        defining = any(key == d or (d.endswith(".") and key.startswith(d)) for d in DEFINING)
        section = key.split(".")[0]
        (blocked if defining and key not in allowed and section not in allowed else noted).append(line)
    return blocked, noted


def check_resume(saved: Config, new: Config, folder: Path) -> list[str]:
    """Refuse a resume whose config changes what the run computes; return the other changes."""
    blocked, noted = config_changes(saved, new)
    if blocked:
        keys = ",".join(line.split(":")[0] for line in blocked)
        raise ConfigError(f"resume from {folder}: the run's settings changed ({'; '.join(blocked)}); resume with "
                          f"the checkpoint's settings, or allow the change deliberately with "
                          f"--set checkpoint.allow_changes=\"{keys}\"")
    return noted
