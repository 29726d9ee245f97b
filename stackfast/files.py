"""Folders written atomically: built under a temporary name, renamed into place when complete.

A crash mid-write leaves at most a hidden temporary folder, never a half-written one under
the final name, and an older folder of that name is removed only once the new one is there.
The writer holds an OS lock (`flock`) on its temporary folder while it works, which the
kernel releases however the process ends (kill -9 included): the next write of that folder
removes temporary folders of its own naming that nobody holds, so a killed job's partial
output does not take up the disk forever.

A write that fails (no space left, a read-only or forbidden place, an I/O error) removes its
temporary folder and ends in one line naming the problem and the place (`WriteError`).

The folder gets the mode the umask leaves (0755 under umask 022), like every folder the user
makes: other users of a shared cluster can read a dataset or an export (tempfile.mkdtemp
would make it 0700). A `folder` that is a symbolic link is written where the link points: the
target folder is replaced, the link stays as it was.
"""
from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

# PLACE_ERRNOS lives in errors.py (report_errors needs it) and is imported from here too.
from stackfast.errors import PLACE_ERRNOS, SPACE_ERRNOS, StackfastError, WriteError  # noqa: F401

# How libraries that lose the OSError word a full disk (safetensors: "I/O error: No space
# left on device (os error 28)").
SPACE_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
LOW_SPACE = 1 << 20  # bytes: below this, a failed write with no better explanation is a full disk


def replace_folder(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, replacing an existing one only after the move.

    `final` is a folder or absent, never a symbolic link: write_folder resolves one first (moved
    aside here, a link would be replaced by the folder and, as rmtree refuses links, stay behind
    under the hidden name forever)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Run write(tmp) in a temporary sibling folder, then move it to `folder`.

    A symbolic link `folder` is followed: its target is written (replaced), the link kept, so a
    user's link to another disk still leads to the new output. Stale temporary folders of
    `folder` (a killed writer's) are removed first. A failed write removes its temporary
    folder; a file-system failure (see `write_failure`) becomes one WriteError, any other error
    is raised as it is."""
    if folder.is_symlink():
        # The temporary folder must be a sibling of the target: a rename never crosses disks.
        folder = Path(os.path.realpath(folder))
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _locked(folder.parent):  # no writer's new temporary folder is taken for a stale one
            remove_stale_temps(folder)
            tmp = _make_temp(folder)
            held = _hold(tmp)
    except OSError as e:
        own = e.filename and Path(e.filename).name.startswith(f".{folder.name}.tmp-")  # not the user's name
        where = folder.parent if own or not e.filename else e.filename
        raise WriteError(f"{folder}: cannot write there ({e.strerror or e}: {where})") from None
    try:
        write(tmp)
        replace_folder(tmp, folder)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        problem = write_failure(error, folder.parent)
        if problem is None:
            raise
        raise WriteError(f"{folder}: not written: {problem}; the partial output was removed and nothing that "
                         f"was there changed") from None
    finally:
        if held is not None:
            os.close(held)


TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"


def _make_temp(folder: Path) -> Path:
    """A new empty temporary sibling of `folder` (name: `temp_pattern`), made by os.mkdir so
    that it has the mode the umask leaves, as the folder it becomes should (tempfile.mkdtemp
    makes 0700 folders: a dataset nobody else could read)."""
    while True:
        tmp = folder.with_name(f".{folder.name}.tmp-{''.join(secrets.choice(TEMP_CHARS) for _ in range(8))}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:  # 37^8 names: another writer's, drawn again
            continue


def temp_pattern(folder: Path) -> re.Pattern:
    """The names of `folder`'s temporary siblings (`_make_temp`'s 8 random characters)."""
    return re.compile(rf"^\.{re.escape(folder.name)}\.tmp-[{TEMP_CHARS}]{{8}}$")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary folders of `folder` that no live writer holds; returns them.

    Only names of write_folder's own pattern, only folders whose lock can be taken (a live
    writer holds its own until it ends). Where locks are not supported, nothing is removed."""
    pattern, removed = temp_pattern(folder), []
    try:
        candidates = [p for p in folder.parent.iterdir() if pattern.match(p.name)]
    except OSError:
        return removed
    for path in candidates:
        try:
            fd = _hold(path)
        except OSError:  # gone meanwhile, a symlink, not a folder: not ours to remove
            continue
        if fd is None:  # held by a live writer (or locks unsupported here)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _hold(folder: Path) -> int | None:
    """An open descriptor of `folder` (not a symlink) holding its lock; None when another
    process holds it or locks are unsupported here."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the lock of `folder` for the block (a no-op where locks are unsupported)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception behind it: causes, contexts and the per-rank failures that
    torch.distributed.checkpoint's CheckpointException wraps ({rank: (exception, traceback)})."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) and f else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]


def free_space(path: Path) -> int | None:
    """Bytes free to this user on the file system of `path` (or of its nearest existing parent)."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def write_failure(error: BaseException, place: Path, needed: int = 0) -> str | None:
    """What went wrong in a failed write into the folder `place`, as words for one line; None
    when `error` is not the file system's (a bug, a refusal, an interrupt): the caller raises
    it as it is.

    A full disk is recognised wherever it shows in the exception chain: ENOSPC or EDQUOT, or
    the words of a library that lost the OSError (safetensors). torch's zip writer loses it
    altogether (`RuntimeError: ... unexpected pos`) and numpy says only "N requested and M
    written", so a failure with no OSError naming another cause also counts as a full disk
    when the free space left is below `needed` bytes (or below 1 MB); its own words are kept
    in the line."""
    chain = list(error_chain(error))
    if any(isinstance(e, (KeyboardInterrupt, StackfastError)) for e in chain):
        return None
    oserror = next((e for e in chain if isinstance(e, OSError) and e.errno is not None), None)
    words = " ".join(str(e) for e in chain).lower()
    free = free_space(place)
    space = f"{size_text(free)} free" if free is not None else "free space unknown"
    if needed:
        space += f", about {size_text(needed)} needed"
    if (oserror is not None and oserror.errno in SPACE_ERRNOS) or any(t in words for t in SPACE_TEXTS):
        return f"no space left on device ({space})"
    if oserror is not None:
        return f"{oserror.strerror or os.strerror(oserror.errno)} ({oserror.filename or place})"
    if free is not None and free < max(needed, LOW_SPACE):
        return f"no space left on device ({space}; the writer said: {type(error).__name__}: {first_line(error)})"
    others = [e for e in chain if isinstance(e, OSError)]
    if others:  # an OSError without errno (numpy: "N requested and M written")
        return f"{first_line(others[0])} ({space})"
    return None


def first_line(error: BaseException) -> str:
    """The first line of an error's message, at most 300 characters (for one-line errors)."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""
