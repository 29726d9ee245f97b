"""Failed writes and interrupted saves: a full disk, a read-only place, a second signal in the
middle of a checkpoint. Each ends in one line (exit 2, or 128 + the signal for a second
signal), leaves no temporary folder behind, and the previous checkpoint stays intact and
resumes exactly.

How faults are made: DCP's file writer is monkeypatched to raise the OSError a full or
read-only disk gives (ENOSPC, EROFS), or the RuntimeError that torch's zip writer turns a
full disk into; signals are raised synchronously (signal.raise_signal) from inside the
writer, so no signal can arrive after its test. A read-only folder is real where the machine
allows it (a read-only bind mount as root: EROFS; chmod as another user: EACCES), and
elsewhere simulated by monkeypatching os.open, os.mkdir, open & co to raise EROFS.
"""
import builtins
import errno
import os
import signal
import subprocess

import pytest
import torch.distributed.checkpoint.filesystem as dcp_fs

from stackfast import cli
from stackfast.checkpoint import verify_checksums
from stackfast.metrics import read_metrics

TINY = ['model.preset="tiny"', "model.kernels=torch", "data.seq_len=32", "train.global_batch_size=2",
        "train.eval_batches=1", "train.eval_every=0", "logging.progress=false", "logging.tensorboard=false",
        "checkpoint.every_steps=2", "checkpoint.keep_last=1", "train.max_steps=4",
        "schedule.warmup_steps=1"]  # shorter than the run: no warmup note beside the one-line errors


def train(capsys, run_dir, *extra):
    """`stackfast train` in this process: (exit status, stdout, stderr lines)."""
    args = ["train"] + [a for o in TINY + [f'logging.run_dir="{run_dir}"', *extra] for a in ("--set", o)]
    status = cli.main(args)
    out = capsys.readouterr()
    return status, out.out, out.err.strip().splitlines()


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's losses."""
    from stackfast.config import load_config
    from stackfast.train import run
    run_dir = tmp_path_factory.mktemp("reference")
    run(load_config(None, TINY + [f'logging.run_dir="{run_dir}"']))
    return losses(run_dir)


def fail_at_step_4(monkeypatch, error):
    """DCP's writer raises `error` (an exception, or a function that raises) when it writes
    step 4's checkpoint; earlier saves go through."""
    write_item = dcp_fs._write_item

    def failing(transforms, stream, data, write_item_, storage_key, serialization_format):
        if ".step_00000004.tmp" in str(getattr(stream, "name", "")):
            if isinstance(error, BaseException):
                raise error
            error()
        return write_item(transforms, stream, data, write_item_, storage_key, serialization_format)
    monkeypatch.setattr(dcp_fs, "_write_item", failing)


def full_disk_as_torch_reports_it():
    # What torch.save into a full disk raises: the OSError is lost in the zip writer.
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("fault, words", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (full_disk_as_torch_reports_it, "no space left on device"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
], ids=["ENOSPC", "ENOSPC-lost-by-the-zip-writer", "EROFS"])
def test_a_failed_checkpoint_write_is_one_line_and_the_previous_checkpoint_resumes(
        fault, words, reference, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "r"
    fail_at_step_4(monkeypatch, fault)
    if fault is full_disk_as_torch_reports_it:  # the disk is full: what the error alone does not say
        monkeypatch.setattr("stackfast.files.free_space", lambda path: 4096)
    status, _, err = train(capsys, run_dir)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"stackfast: error: {run_dir / 'checkpoints'}: cannot write checkpoint step_00000004: "
                             f"{words}") and "the newest checkpoint, step_00000002, is intact" in err[0], err
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000002"]  # no temporary folder left
    verify_checksums(run_dir / "checkpoints" / "step_00000002")
    monkeypatch.undo()
    status, out, err = train(capsys, run_dir, 'checkpoint.resume="auto"')
    assert status == 0 and out.startswith("done: 4 steps"), err
    assert losses(run_dir) == reference  # resumed exactly
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000004"]


def test_an_unrelated_error_in_a_save_is_not_disguised(tmp_path, monkeypatch):
    """Plenty of space and no OSError: the writer's own error is raised as it is, and the
    temporary folder still goes."""
    from stackfast.config import load_config
    from stackfast.errors import WriteError
    from stackfast.train import run
    fail_at_step_4(monkeypatch, ValueError("a bug in the writer"))
    with pytest.raises(BaseException, match="a bug in the writer") as caught:
        run(load_config(None, TINY + [f'logging.run_dir="{tmp_path}"']))
    assert not isinstance(caught.value, WriteError)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002"]


def test_a_second_signal_during_a_save_stops_at_once_without_leftovers(reference, tmp_path, monkeypatch, capsys):
    """SIGTERM, then a second one while the checkpoint of step 4 is written (DCP wraps the
    interrupt in a CheckpointException): one line, exit status 128 + 15 (the status of a
    process that SIGTERM ended: the second signal means "stop now, without a checkpoint"),
    no temporary folder, step 2 intact; --resume auto finishes the run exactly."""
    run_dir = tmp_path / "r"

    def two_signals():
        signal.raise_signal(signal.SIGTERM)  # handled at once: a stop is requested
        signal.raise_signal(signal.SIGTERM)  # the second one interrupts the save
    fail_at_step_4(monkeypatch, two_signals)
    status, _, err = train(capsys, run_dir)
    assert status == 128 + signal.SIGTERM, err
    assert err == [f"stackfast: stopped: second SIGTERM during the checkpoint of step 4: stopped at once without it; "
                   f"the newest checkpoint is {run_dir / 'checkpoints' / 'step_00000002'} (continue from it with "
                   f"--resume auto)"]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000002"]
    monkeypatch.undo()
    status, out, err = train(capsys, run_dir, 'checkpoint.resume="auto"')
    assert status == 0 and out.startswith("done: 4 steps"), err
    assert losses(run_dir) == reference


def test_a_stale_temporary_save_is_removed_by_the_next_run(tmp_path, capsys):
    """A save killed with kill -9 leaves `.step_XXXXXXXX.tmp`; the next job to hold the run
    folder removes it (no other job can be writing there), whatever step it was."""
    status, _, _ = train(capsys, tmp_path, "train.max_steps=2")
    stale = tmp_path / "checkpoints" / ".step_00000099.tmp"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"\0" * 1000)
    status, _, err = train(capsys, tmp_path, 'checkpoint.resume="auto"')
    assert status == 0, err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000004"]


# --------------------------------------------------------------------------------------
# Read-only places
# --------------------------------------------------------------------------------------

def _mount_read_only(folder) -> bool:
    try:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    done = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True, timeout=30)
    if done.returncode != 0:
        subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)
        return False
    return True


def _patch_read_only(monkeypatch, folder) -> None:
    """Writes under `folder` raise EROFS (open for writing, mkdir, rename, remove, truncate)."""
    root = str(folder.resolve())

    def inside(path) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(root)
        except TypeError:  # a file descriptor
            return False

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real = {name: getattr(os, name) for name in ("open", "mkdir", "replace", "rename", "unlink", "rmdir",
                                                 "truncate")}
    real_open = builtins.open
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open(path, flags, *args, **kwargs):
        if flags & writes and inside(path):
            refuse(path)
        return real["open"](path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not isinstance(file, int) and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guard(name):
        def guarded(path, *args, **kwargs):
            if name == "mkdir" and inside(path) and os.path.lexists(path):  # the kernel says EEXIST first
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
            if inside(path) or (args and isinstance(args[0], (str, os.PathLike)) and inside(args[0])):
                refuse(path)
            return real[name](path, *args, **kwargs)
        return guarded
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    for name in ("mkdir", "replace", "rename", "unlink", "rmdir", "truncate"):
        monkeypatch.setattr(os, name, guard(name))


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): nothing under folder can be written from now on (see the module
    docstring for how). Undone at the end of the test."""
    mounted, chmodded = [], []

    def make(folder):
        if os.geteuid() != 0:
            for path in [folder, *folder.rglob("*")]:
                chmodded.append((path, path.stat().st_mode))
                path.chmod(path.stat().st_mode & ~0o222)
        elif _mount_read_only(folder):
            mounted.append(folder)
        else:
            _patch_read_only(monkeypatch, folder)
    yield make
    monkeypatch.undo()
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)
    for path, mode in reversed(chmodded):
        path.chmod(mode)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_read_only_run_folder_finished_run_says_so_and_training_is_one_line(tmp_path, read_only, capsys):
    place = tmp_path / "ro"
    run_dir = place / "run"
    status, _, _ = train(capsys, run_dir)
    assert status == 0
    before = snapshot(place)
    read_only(place)
    # Resuming a finished run reads only: it says so and exits 0.
    status, out, err = train(capsys, run_dir, 'checkpoint.resume="auto"')
    assert status == 0 and "is finished (4 of 4 steps); nothing to do" in out and err == [], err
    # Training on there, starting over there, or a new run inside: one line each, exit 2.
    for extra in (['checkpoint.resume="auto"', "train.max_steps=6"], ["logging.overwrite=true"]):
        status, _, err = train(capsys, run_dir, *extra)
        assert status == 2 and len(err) == 1 and err[0].startswith(
            f"stackfast: error: {run_dir}: cannot write the run folder ("), err
    status, _, err = train(capsys, place / "new")
    assert status == 2 and len(err) == 1 and err[0].startswith(
        f"stackfast: error: {place / 'new'}: cannot create the run folder ("), err
    assert snapshot(place) == before


def test_tokenize_and_export_into_a_read_only_place_are_one_line(tmp_path, read_only, capsys):
    from stackfast.config import load_config
    from stackfast.train import run
    text = tmp_path / "in.txt"
    text.write_text("hello world\n" * 20)
    run(load_config(None, TINY + [f'logging.run_dir="{tmp_path / "run"}"', "train.max_steps=2"]))
    place = tmp_path / "ro"
    place.mkdir()
    read_only(place)
    for args, out in ((["tokenize", "--input", str(text), "--tokenizer", "bytes"], place / "tokens"),
                      (["export-hf", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "step_00000002")],
                       place / "hf"),
                      (["tokenize", "--input", str(text), "--tokenizer", "bytes"], place / "deeper" / "tokens")):
        status = cli.main(args + ["--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and err[0].startswith(f"stackfast: error: {out}: cannot write there ("), err
    assert os.listdir(place) == []


def test_tokenize_into_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """numpy's tofile into a full disk says only "N requested and M written" (no errno): the
    free space left tells it apart."""
    from stackfast.data import ShardWriter
    text = tmp_path / "in.txt"
    text.write_text("hello world\n" * 20)

    def full(self, tokens):
        raise OSError("24 requested and 12 written")
    monkeypatch.setattr(ShardWriter, "append", full)
    monkeypatch.setattr("stackfast.files.free_space", lambda path: 0)
    status = cli.main(["tokenize", "--input", str(text), "--tokenizer", "bytes", "--out", str(tmp_path / "tok")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == [f"stackfast: error: {tmp_path / 'tok'}: not written: no space left on device "
                                   f"(0 bytes free; the writer said: OSError: 24 requested and 12 written); the "
                                   f"partial output was removed and nothing that was there changed"], err
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]


def test_a_full_disk_under_the_logs_is_one_line(tmp_path, monkeypatch, capsys):
    """metrics.jsonl cannot be appended to at step 3 (ENOSPC, raised by a monkeypatched
    MetricsLog.write): one line naming the file, exit 2, the step-2 checkpoint intact."""
    from stackfast.metrics import MetricsLog
    write = MetricsLog.write

    def full(self, row):
        if row.get("step") == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        write(self, row)
    monkeypatch.setattr(MetricsLog, "write", full)
    status, _, err = train(capsys, tmp_path, "logging.log_every=1")
    assert status == 2 and err == [f"stackfast: error: {tmp_path / 'metrics.jsonl'}: No space left on device; the run "
                                   f"stopped there, its checkpoints as they were (continue with --resume auto once "
                                   f"this is fixed)"], err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002"]
