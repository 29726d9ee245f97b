"""Run folders and checkpoints that cannot be clobbered or silently changed: the fresh-run
refusal, the one-job lock, the step/name check, keep_last's lineage, the resume config
comparison, checksums required everywhere, and the finished-run resume."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stackfast.checkpoint import CheckpointError, list_checkpoints
from stackfast.config import ConfigError, load_config
from stackfast.metrics import read_metrics
from stackfast.runs import RunFolderError, RunLock
from stackfast.train import run

REPO = Path(__file__).resolve().parent.parent
TINY = ['model.preset="tiny"', "model.kernels=torch", "data.seq_len=32", "train.global_batch_size=2",
        "train.eval_batches=1", "train.eval_every=0", "logging.progress=false", "logging.tensorboard=false",
        "checkpoint.every_steps=2", "checkpoint.keep_last=2"]


def config(run_dir, *extra):
    return load_config(None, TINY + [f'logging.run_dir="{run_dir}"', *extra])


def stackfast(*args):
    return subprocess.run([sys.executable, "-m", "stackfast", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def snapshot(folder: Path) -> dict:
    """Every file under folder with its bytes: to prove that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4)."""
    run_dir = tmp_path_factory.mktemp("done")
    run(config(run_dir, "train.max_steps=4"))
    return run_dir


def test_a_fresh_run_refuses_a_folder_that_holds_a_run_and_force_starts_over(finished, tmp_path):
    run_dir = tmp_path / "r"
    shutil.copytree(finished, run_dir)
    before = snapshot(run_dir)
    with pytest.raises(RunFolderError, match="holds a run already.*--resume auto.*--force"):
        run(config(run_dir, "train.max_steps=2"))
    assert snapshot(run_dir) == before  # nothing written, nothing deleted
    out = stackfast("train", *[a for o in TINY + [f'logging.run_dir="{run_dir}"', "train.max_steps=2"]
                               for a in ("--set", o)], "--force")
    assert out.returncode == 0, out.stderr
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]  # the old rows are gone
    assert [c.name for c in list_checkpoints(run_dir / "checkpoints")] == ["step_00000002"]
    # Resuming another folder's checkpoint into it would mix two runs' logs: refused too.
    before = snapshot(run_dir)
    with pytest.raises(RunFolderError, match="holds a run already"):
        run(config(run_dir, "train.max_steps=4", f'checkpoint.resume="{finished / "checkpoints" / "step_00000002"}"'))
    assert snapshot(run_dir) == before


def test_one_job_per_run_folder_and_the_lock_dies_with_its_holder(tmp_path):
    run_dir = tmp_path / "r"
    with RunLock(run_dir):
        with pytest.raises(RunFolderError, match=f"in use by another job \\(pid {os.getpid()} on host "
                                                 f"{socket.gethostname()}"):
            run(config(run_dir, "train.max_steps=1"))
    assert not (run_dir / "metrics.jsonl").exists()
    # A holder killed with SIGKILL leaves no stale lock: the kernel releases it.
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(REPO)!r}); "
                               f"from stackfast.runs import RunLock; from pathlib import Path; "
                               f"held = RunLock(Path({str(run_dir)!r})).__enter__(); print('locked', flush=True); "
                               f"time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunFolderError, match=f"pid {holder.pid}"):
        run(config(run_dir, "train.max_steps=1"))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert run(config(run_dir, "train.max_steps=1"))["steps"] == 1


def test_a_renamed_step_folder_is_refused_and_keep_last_spares_other_runs(finished, tmp_path):
    run_dir = tmp_path / "r"
    shutil.copytree(finished, run_dir)
    ckpts = run_dir / "checkpoints"
    os.rename(ckpts / "step_00000004", ckpts / "step_00000099")
    with pytest.raises(CheckpointError, match="step_00000099: state.json is step 4, the folder name says 99"):
        run(config(run_dir, "train.max_steps=8", 'checkpoint.resume="auto"'))
    assert sorted(c.name for c in list_checkpoints(ckpts)) == ["step_00000002", "step_00000099"]
    os.rename(ckpts / "step_00000099", ckpts / "step_00000004")
    # A checkpoint of another run copied in (another run_id) is never deleted by keep_last.
    other = tmp_path / "other"
    run(config(other, "train.max_steps=2", "train.seed=9"))
    shutil.copytree(other / "checkpoints" / "step_00000002", ckpts / "step_00000001")
    run(config(run_dir, "train.max_steps=8", 'checkpoint.resume="auto"'))
    assert [c.name for c in list_checkpoints(ckpts)] == ["step_00000001", "step_00000006", "step_00000008"]


def test_resume_refuses_changed_run_settings_and_reports_the_safe_ones(finished, tmp_path, capsys):
    ckpt = finished / "checkpoints" / "step_00000002"
    # Same tensor shapes, another model: 8 heads of 8 and 4 KV heads instead of 4 of 16 and 2.
    with pytest.raises(ConfigError, match=r"model.n_heads: 4 -> 8; model.n_kv_heads: 2 -> 4; data.seq_len: 32 -> 16.*"
                                          r"allow_changes=\"model.n_heads,model.n_kv_heads,data.seq_len\""):
        run(config(tmp_path / "a", "train.max_steps=4", "model.n_heads=8", "model.n_kv_heads=4", "data.seq_len=16",
                   f'checkpoint.resume="{ckpt}"'))
    with pytest.raises(ConfigError, match="train.global_batch_size: 2 -> 4"):
        run(config(tmp_path / "b", "train.max_steps=4", "train.global_batch_size=4", f'checkpoint.resume="{ckpt}"'))
    assert not (tmp_path / "a" / "metrics.jsonl").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()
    # A deliberate change, named: the run goes on. Safe settings are reported and applied.
    summary = run(config(tmp_path / "c", "train.max_steps=4", "model.n_heads=8", "model.n_kv_heads=4",
                         "checkpoint.keep_last=3", 'checkpoint.allow_changes="model.n_heads,model.n_kv_heads"',
                         f'checkpoint.resume="{ckpt}"'))
    assert summary["steps"] == 4
    summary = run(config(tmp_path / "d", "train.max_steps=4", "optim.lr=1e-4", f'checkpoint.resume="{ckpt}"'))
    assert summary["steps"] == 4


def test_a_missing_resume_folder_or_an_unreadable_saved_config_is_one_error_and_writes_nothing(finished, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.resume: nope is not a checkpoint folder"):
        run(config(tmp_path / "r", 'checkpoint.resume="nope"'))
    assert not (tmp_path / "r").exists()
    ckpt = tmp_path / "c"
    shutil.copytree(finished / "checkpoints" / "step_00000004", ckpt)
    (ckpt / "config.toml").write_bytes(b"[model]\npreset = 'caf\xe9'\n")  # latin-1, not UTF-8
    with pytest.raises(CheckpointError, match="config.toml: unusable config"):
        run(config(tmp_path / "r", "checkpoint.allow_unverified=true", f'checkpoint.resume="{ckpt}"'))


def test_resume_auto_on_a_finished_run_says_so_and_exits_0(finished):
    before = snapshot(finished)
    out = stackfast("train", *[a for o in TINY + [f'logging.run_dir="{finished}"', "train.max_steps=4"]
                               for a in ("--set", o)], "--resume", "auto")
    assert out.returncode == 0, out.stderr
    assert "is finished (4 of 4 steps); nothing to do" in out.stdout
    assert snapshot(finished) == before


def test_checksums_are_required_unless_the_user_names_the_risk(finished, tmp_path):
    ckpt = tmp_path / "step_00000004"
    shutil.copytree(finished / "checkpoints" / "step_00000004", ckpt)
    (ckpt / "checksums.json").unlink()
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0xFF  # a flipped byte that nothing else would notice
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="no checksums.json, so a changed or corrupt file would go unnoticed"):
        run(config(tmp_path / "a", "train.max_steps=6", f'checkpoint.resume="{ckpt}"'))
    with pytest.raises(CheckpointError, match="no checksums.json"):
        run(config(tmp_path / "b", "train.max_steps=1", f'checkpoint.init_from="{ckpt}"'))
    for command in (["eval", "--batches", "1"], ["export-hf", "--out", tmp_path / "hf"],
                    ["grow", "--out", tmp_path / "g"]):
        out = stackfast(*command, "--checkpoint", ckpt)
        assert out.returncode == 2 and "no checksums.json" in out.stderr, out.stderr
    assert not (tmp_path / "hf").exists() and not (tmp_path / "g").exists()
    # Named explicitly, the risk is taken.
    out = stackfast("eval", "--batches", "1", "--checkpoint", ckpt, "--allow-unverified")
    assert out.returncode == 0, out.stderr
    assert run(config(tmp_path / "c", "train.max_steps=6", "checkpoint.allow_unverified=true",
                      f'checkpoint.resume="{ckpt}"'))["steps"] == 6


def test_grow_and_export_write_checksums_and_a_flipped_byte_is_caught(finished, tmp_path):
    ckpt = finished / "checkpoints" / "step_00000004"
    assert stackfast("grow", "--checkpoint", ckpt, "--out", tmp_path / "g").returncode == 0
    assert stackfast("export-hf", "--checkpoint", ckpt, "--out", tmp_path / "hf").returncode == 0
    for folder, weights in ((tmp_path / "g", "model.safetensors"), (tmp_path / "hf", "model.safetensors")):
        listed = json.loads((folder / "checksums.json").read_text())
        assert set(listed) == {p.name for p in folder.iterdir()} - {"checksums.json"}
        data = bytearray((folder / weights).read_bytes())
        data[-3] ^= 0x01
        (folder / weights).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"g/model.safetensors: checksum mismatch"):
        run(config(tmp_path / "r", "train.max_steps=1", "model.n_layers=8",
                   f'checkpoint.init_from="{tmp_path / "g"}"'))
    out = stackfast("eval", "--batches", "1", "--checkpoint", tmp_path / "hf", "--data", "builtin:python-stdlib")
    assert out.returncode == 2 and "hf/model.safetensors: checksum mismatch" in out.stderr


def test_export_never_replaces_its_own_input(finished, tmp_path):
    ckpt = tmp_path / "c"
    shutil.copytree(finished / "checkpoints" / "step_00000004", ckpt)
    before = snapshot(ckpt)
    for out_dir in (ckpt, tmp_path):
        out = stackfast("export-hf", "--checkpoint", ckpt, "--out", out_dir, "--force")
        assert out.returncode == 2 and "the input is never overwritten" in out.stderr
    assert snapshot(ckpt) == before


def test_a_changed_dcp_metadata_file_is_refused_by_its_checksum(finished, tmp_path):
    """DCP's .metadata (the index of every tensor's shard, offset and length) is covered by
    checksums.json like the shards: a change that still unpickles, which DCP would load
    without a word, is refused by name before anything is read."""
    from stackfast.checkpoint import load_weights
    ckpt = tmp_path / "step_00000004"
    shutil.copytree(finished / "checkpoints" / "step_00000004", ckpt)
    assert ".metadata" in json.loads((ckpt / "checksums.json").read_text())
    metadata = (ckpt / ".metadata").read_bytes()
    assert metadata.count(b".step_00000004.tmp") == 1  # the save's checkpoint id: a same-length change
    (ckpt / ".metadata").write_bytes(metadata.replace(b".step_00000004.tmp", b".step_00000004.tmq"))
    with pytest.raises(CheckpointError, match=r"step_00000004/\.metadata: checksum mismatch"):
        run(config(tmp_path / "r", "train.max_steps=6", f'checkpoint.resume="{ckpt}"'))
    with pytest.raises(CheckpointError, match=r"step_00000004/\.metadata: checksum mismatch"):
        load_weights(ckpt)  # grow, export-hf, eval, init_from
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
