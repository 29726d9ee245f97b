"""checkpoint.async_save: checkpoints staged on the host and written in the background.

What must hold (and what each test breaks on): an async checkpoint of step N is the sync
one, tensor for tensor, although the loop updates the parameters in place while it is
written (the staged copy must be a real copy), and a resume from it reproduces the sync
run exactly; at most one save is in flight; a stop signal waits for it, then writes its
own checkpoint at once; a kill -9 during a background save leaves the previous checkpoint
as the newest and `--resume auto` ignores the partial one; a failed background write is
the sync save's one line and exit status 2; under torchrun (2 processes, gloo) the same.

How: the background writer (`stackfast.checkpoint.dcp_io.write_files`, which the sync save
calls too, as the background saver imports it: `async_save.write_files`) is slowed down or
held with monkeypatches, in this process or in a subprocess script.
"""
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed.checkpoint.filesystem as dcp_fs

import stackfast.checkpoint as ckpt
import stackfast.checkpoint.async_save as async_save
import stackfast.train as train_module
from stackfast import cli
from stackfast.checkpoint import list_checkpoints, verify_checksums
from stackfast.config import load_config
from stackfast.metrics import read_metrics
from stackfast.train import run

REPO = Path(__file__).resolve().parent.parent
TINY = ['model.preset="tiny"', "model.kernels=torch", "data.seq_len=32", "train.global_batch_size=2",
        "train.eval_batches=1", "train.eval_every=0", "logging.progress=false", "logging.tensorboard=false",
        "logging.log_every=1", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "train.max_steps=8",
        "schedule.warmup_steps=1"]  # shorter than the run: no warmup note beside the one-line errors
ASYNC = "checkpoint.async_save=true"


def config(run_dir, *extra):
    return load_config(None, TINY + [f'logging.run_dir="{run_dir}"', *extra])


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def checkpoint_rows(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir) if "checkpoint_blocked_s" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The sync run: checkpoints at steps 2, 4, 6, 8."""
    run_dir = tmp_path_factory.mktemp("sync")
    run(config(run_dir))
    return run_dir


def hold_writer(monkeypatch, step, until):
    """The background writer of checkpoint `step` starts only once until() is true (polled)."""
    write = async_save.write_files

    def held(tmp, *args, **kwargs):
        if tmp.name == f".step_{step:08d}.tmp":
            deadline = time.monotonic() + 60
            while not until():
                assert time.monotonic() < deadline, "the loop did not go on while the save was in flight"
                time.sleep(0.01)
        return write(tmp, *args, **kwargs)
    monkeypatch.setattr(async_save, "write_files", held)


def count_steps(monkeypatch, after=None):
    """Counts the loop's optimizer steps (done["n"]); after(n) runs after each one."""
    done = {"n": 0}
    step = train_module.train_step

    def counted(*args, **kwargs):
        out = step(*args, **kwargs)
        done["n"] += 1
        if after is not None:
            after(done["n"])
        return out
    monkeypatch.setattr(train_module, "train_step", counted)
    return done


def test_an_async_checkpoint_is_the_sync_one_bit_for_bit_and_resumes_exactly(reference, tmp_path, monkeypatch):
    """Step 4's background write is held until the loop has finished step 5, which updates
    every weight and Adam moment in place: a staged 'copy' sharing their memory would write
    step 5's values."""
    done = count_steps(monkeypatch)
    hold_writer(monkeypatch, 4, lambda: done["n"] >= 5)
    run_dir = tmp_path / "async"
    run(config(run_dir, ASYNC))
    assert losses(run_dir) == losses(reference)  # training is not disturbed by the background writes
    assert [c.name for c in list_checkpoints(run_dir / "checkpoints")] == [
        "step_00000002", "step_00000004", "step_00000006", "step_00000008"]
    assert sorted(os.listdir(run_dir / "checkpoints")) == [c.name for c in list_checkpoints(run_dir / "checkpoints")]
    for name in ("step_00000002", "step_00000004", "step_00000006"):  # written in the background (8: at once)
        ours, theirs = run_dir / "checkpoints" / name, reference / "checkpoints" / name
        verify_checksums(ours)
        assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
        # Every tensor (weights, both moments, steps) and the RNG state, byte for byte. .metadata
        # differs only in its save id; state.json in the run id, config.toml in async_save and run_dir.
        for file in ("__0_0.distcp", "rng_rank0.safetensors"):
            assert (ours / file).read_bytes() == (theirs / file).read_bytes(), f"{name}/{file}"
        state, sync_state = (ckpt.load_state(f) for f in (ours, theirs))
        assert {**state, "run_id": None} == {**sync_state, "run_id": None}
    # Resuming from the async step-4 checkpoint gives the sync run's losses, exactly.
    resumed = tmp_path / "resumed"
    monkeypatch.undo()
    run(config(resumed, f'checkpoint.resume="{run_dir / "checkpoints" / "step_00000004"}"'))
    assert sorted(losses(resumed)) == [5, 6, 7, 8]
    assert all(losses(resumed)[s] == losses(reference)[s] for s in losses(resumed))
    # The stall is logged at every checkpoint step, with the background time of the previous save.
    rows = checkpoint_rows(run_dir)
    assert sorted(rows) == [2, 4, 6, 8] and all(r["checkpoint_blocked_s"] >= 0 for r in rows.values())
    assert [rows[s].get("checkpoint_background_step") for s in (2, 4, 6, 8)] == [None, 2, 4, 6]


def test_at_most_one_save_in_flight(tmp_path, monkeypatch):
    """A checkpoint every step and a writer slower than a step: each save waits for the one
    before (logged as checkpoint_wait_s), never two writing at once, and every one completes."""
    active, most, lock = [0], [0], threading.Lock()
    write = async_save.write_files

    def slow(tmp, *args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.3)
            return write(tmp, *args, **kwargs)
        finally:
            with lock:
                active[0] -= 1
    monkeypatch.setattr(async_save, "write_files", slow)
    run(config(tmp_path, ASYNC, "checkpoint.every_steps=1", "train.max_steps=5", "checkpoint.keep_last=10"))
    assert most[0] == 1
    found = list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in found] == [f"step_{s:08d}" for s in range(1, 6)]
    for folder in found:
        verify_checksums(folder)
    rows = checkpoint_rows(tmp_path)
    assert all(rows[s]["checkpoint_wait_s"] > 0.1 for s in (2, 3, 4, 5)), rows


def test_a_stop_signal_waits_for_the_save_in_flight_then_writes_its_own(reference, tmp_path, monkeypatch, capsys):
    """SIGTERM after step 3 while step 2's checkpoint is still being written: the loop waits
    for it, writes step 3's at once and exits 0; both are complete, and the run resumes."""
    write = async_save.write_files

    def slow(tmp, *args, **kwargs):
        if tmp.name == ".step_00000002.tmp":
            time.sleep(1.0)
        return write(tmp, *args, **kwargs)
    monkeypatch.setattr(async_save, "write_files", slow)
    count_steps(monkeypatch, after=lambda n: n == 3 and signal.raise_signal(signal.SIGTERM))
    args = ["train"] + [a for o in TINY + [f'logging.run_dir="{tmp_path}"', ASYNC] for a in ("--set", o)]
    assert cli.main(args) == 0
    assert "stopped by a signal after step 3" in capsys.readouterr().out
    found = list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in found] == ["step_00000002", "step_00000003"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002", "step_00000003"]
    for folder in found:
        verify_checksums(folder)
    row = checkpoint_rows(tmp_path)[3]
    assert row["checkpoint_wait_s"] > 0.5 and row["checkpoint_background_step"] == 2
    monkeypatch.undo()
    run(config(tmp_path, 'checkpoint.resume="auto"'))
    assert losses(tmp_path) == losses(reference)


def test_a_second_signal_abandons_the_save_in_flight(tmp_path, monkeypatch, capsys):
    """Two SIGTERMs after step 3 while step 2's checkpoint is held in the background: the job
    stops at once (one line, 128 + 15) without waiting for the save; its writer is interrupted
    and has ended by the time the command returns, the save never lands under its final name
    and its temporary folder is gone."""
    release = threading.Event()
    write = async_save.write_files

    def held(tmp, *args, **kwargs):
        if tmp.name == ".step_00000002.tmp":
            deadline = time.monotonic() + 60
            while not release.is_set():  # Python between sleeps: where an interruption lands
                assert time.monotonic() < deadline, "the abandoned writer was not interrupted"
                time.sleep(0.01)
        return write(tmp, *args, **kwargs)
    monkeypatch.setattr(async_save, "write_files", held)

    def two_signals(n):
        if n == 3:
            signal.raise_signal(signal.SIGTERM)  # a stop is requested
            signal.raise_signal(signal.SIGTERM)  # and made immediate
    count_steps(monkeypatch, after=two_signals)
    args = ["train"] + [a for o in TINY + [f'logging.run_dir="{tmp_path}"', ASYNC] for a in ("--set", o)]
    status = cli.main(args)
    assert status == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines() == [
        "stackfast: stopped: second SIGTERM: stopped at once, without a checkpoint"]
    assert not [t for t in threading.enumerate() if t.name == "stackfast-checkpoint-2"]  # ended, not left behind
    assert os.listdir(tmp_path / "checkpoints") == []
    release.set()


SECOND_SIGNAL = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch
import stackfast.checkpoint.async_save as async_save
from stackfast import train

write = async_save.write_files

def held(tmp, *args, **kwargs):  # step 4's background write: busy inside torch calls, as a long write is
    if tmp.name == ".step_00000004.tmp":
        Path({mark!r}).touch()
        a, deadline = torch.randn(256, 256), time.monotonic() + 120
        while time.monotonic() < deadline:
            a = torch.tanh(a @ a)
    return write(tmp, *args, **kwargs)

async_save.write_files = held
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_second_sigterm_during_a_background_save_ends_in_one_line_and_143(tmp_path):
    """The real process, signalled from outside while its background writer is inside torch
    calls: the second SIGTERM gives the sync path's one line and 128 + 15, leaves no
    temporary folder and the previous checkpoint intact. (A writer left running as a daemon
    thread made the interpreter's shutdown abort the process: `terminate called without an
    active exception`, exit 134.)"""
    run_dir, mark = tmp_path / "run", tmp_path / "held"
    script = tmp_path / "second_signal.py"
    script.write_text(SECOND_SIGNAL.format(repo=str(REPO), mark=str(mark)))
    args = [a for o in TINY + [f'logging.run_dir="{run_dir}"', ASYNC, "train.max_steps=100"] for a in ("--set", o)]
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not mark.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # stop after this step: the loop then waits for step 4's save
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # stop now
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    line = err.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("stackfast: stopped: second SIGTERM"), err[-3000:]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000002"]
    verify_checksums(run_dir / "checkpoints" / "step_00000002")


KILLED = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import stackfast.checkpoint.async_save as async_save
from stackfast import train

merge = async_save.merge_checksums

def held(folder, *args, **kwargs):  # step 4's checkpoint: written and hashed, held just before its rename
    if folder.name == ".step_00000004.tmp":
        Path({mark!r}).touch()
        time.sleep(600)
    return merge(folder, *args, **kwargs)

async_save.merge_checksums = held
sys.exit(train.main(sys.argv[1:]))
"""


def test_kill_9_during_a_background_save_leaves_the_previous_checkpoint_and_resume_auto_ignores_it(
        reference, tmp_path):
    run_dir, mark = tmp_path / "run", tmp_path / "held"
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(repo=str(REPO), mark=str(mark)))
    args = [a for o in TINY + [f'logging.run_dir="{run_dir}"', ASYNC] for a in ("--set", o)]
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        # The loop trains on while step 4's save is held, up to step 6, whose save waits for it.
        while not (mark.exists() and 6 in losses_or_none(run_dir)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
    finally:
        proc.kill()  # SIGKILL
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(os.listdir(run_dir / "checkpoints")) == [".step_00000004.tmp", "step_00000002"]
    assert (run_dir / "checkpoints" / ".step_00000004.tmp" / "__0_0.distcp").is_file()  # a partial save indeed
    assert [c.name for c in list_checkpoints(run_dir / "checkpoints")] == ["step_00000002"]
    # The same command again resumes from step 2 (the partial folder removed) to the same losses.
    run(config(run_dir, ASYNC, 'checkpoint.resume="auto"'))
    assert losses(run_dir) == losses(reference)
    assert sorted(os.listdir(run_dir / "checkpoints")) == [
        "step_00000002", "step_00000004", "step_00000006", "step_00000008"]


def losses_or_none(run_dir):
    try:
        return losses(run_dir)
    except OSError:  # not written yet
        return {}


def test_a_failed_background_write_is_one_line_and_exit_2_with_the_previous_checkpoint_intact(
        reference, tmp_path, monkeypatch, capsys):
    """ENOSPC in step 4's background write: the loop trains on and the failure surfaces when
    it next waits for the save (step 6): the sync save's line, exit status 2, nothing of
    step 4 left, step 2 intact; --resume auto then finishes the run exactly."""
    write_item = dcp_fs._write_item

    def full(transforms, stream, *args, **kwargs):
        if ".step_00000004.tmp" in str(getattr(stream, "name", "")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_item(transforms, stream, *args, **kwargs)
    monkeypatch.setattr(dcp_fs, "_write_item", full)
    args = ["train"] + [a for o in TINY + [f'logging.run_dir="{tmp_path}"', ASYNC] for a in ("--set", o)]
    status = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"stackfast: error: {tmp_path / 'checkpoints'}: cannot write checkpoint step_00000004: "
                             f"no space left on device") and "the newest checkpoint, step_00000002, is intact" in err[0]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002"]
    assert max(losses(tmp_path)) == 6  # it trained on until the wait at the next checkpoint step
    verify_checksums(tmp_path / "checkpoints" / "step_00000002")
    monkeypatch.undo()
    status = cli.main(args + ["--resume", "auto"])
    assert status == 0, capsys.readouterr().err
    assert losses(tmp_path) == losses(reference)


TWO_RUNS = """
import sys, time
sys.path.insert(0, {repo!r})
import stackfast.checkpoint.async_save as async_save
import stackfast.train as train
from stackfast.config import load_config

done = [0]
step = train.train_step
def counted(*args, **kwargs):
    out = step(*args, **kwargs)
    done[0] += 1
    return out
train.train_step = counted

write = async_save.write_files
def held(tmp, *args, **kwargs):  # step 2's background write starts after step 3 updated everything in place
    if tmp.name == ".step_00000002.tmp":
        while done[0] < 3:
            time.sleep(0.01)
    return write(tmp, *args, **kwargs)
async_save.write_files = held

base = {base!r}
shutdown = train.shutdown
train.shutdown = lambda world: None  # the second run joins the same process group
train.run(load_config(None, base + ['logging.run_dir="{first}"']))
async_save.write_files, train.shutdown = write, shutdown
train.run(load_config(None, base + ['logging.run_dir="{second}"',
                                    'checkpoint.resume="{first}/checkpoints/step_00000002"']))
"""


def test_two_processes_async_checkpoint_resumes_exactly(tmp_path):
    """One torchrun launch of 2 processes (gloo, FSDP2) runs twice: an async run (its step-2
    checkpoint written in the background while step 3 updates the shards), then a resume
    from that checkpoint, which must give the same losses bit for bit."""
    first, second = tmp_path / "first", tmp_path / "second"
    base = TINY + ["train.global_batch_size=4", "train.max_steps=6", ASYNC]
    script = tmp_path / "two_runs.py"
    script.write_text(TWO_RUNS.format(repo=str(REPO), base=base, first=first, second=second))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, cwd=REPO, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert sorted(os.listdir(first / "checkpoints")) == ["step_00000002", "step_00000004", "step_00000006"]
    written = first / "checkpoints" / "step_00000002"
    assert {"__0_0.distcp", "__1_0.distcp", "rng_rank0.safetensors", "rng_rank1.safetensors"} <= set(
        os.listdir(written))
    verify_checksums(written)
    a, b = losses(first), losses(second)
    assert sorted(b) == [3, 4, 5, 6] and all(a[s] == b[s] for s in b)
