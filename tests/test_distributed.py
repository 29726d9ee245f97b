"""Distributed training on CPU: torchrun with 2 processes (gloo, FSDP2), DCP checkpoints,
resume across world sizes, kills, signals, non-finite steps, growth under FSDP.

Tolerance of 2-process vs 1-process trajectories: rel 1e-4 on losses. The same global
batch and the same fp32 arithmetic are used, but the order of the reductions differs
(each rank averages its own rows, then FSDP averages the ranks' gradients in a
reduce-scatter; one process averages all rows at once), so results differ in the last
bits (~1e-7 relative at step 1) and Adam carries that forward; over a dozen steps the
gap measured here stays under 1e-5. A real bug (a wrong batch row, a missing gradient
average, a shard copied to the wrong place) moves the loss by 1e-2 or more.
"""
import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stackfast.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_weights, write_checksums
from stackfast.config import StackfastError, load_config
from stackfast.metrics import read_metrics
from stackfast.model import Transformer
from stackfast.train import run

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "stackfast" / "train.py"
STEPS = 12
BASE = ['model.preset="tiny"', "model.kernels=torch", "data.seq_len=32", f"train.max_steps={STEPS}",
        "train.eval_batches=2", "train.eval_every=6", "schedule.warmup_steps=3", "optim.lr=3e-3",
        "logging.progress=false", "logging.tensorboard=false", "logging.log_every=1",
        "checkpoint.every_steps=4", "checkpoint.keep_last=5"]
# The global batch is 4 rows at any number of processes: 4 in one pass on one process, 2 on
# each of two.
PER_RANK = {1: "train.global_batch_size=4", 2: "train.global_batch_size=4"}


def overrides(run_dir, nproc, *extra):
    return BASE + [PER_RANK[nproc], f'logging.run_dir="{run_dir}"', *extra]


def launch(nproc, run_dir, *extra, script=TRAIN, torchrun_args=(), check=True):
    """`torchrun --standalone --nproc_per_node=nproc stackfast/train.py --set ...` as a user runs it."""
    args = [a for o in overrides(run_dir, nproc, *extra) for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *torchrun_args, str(script), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def losses(run_dir, key="loss"):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory):
    """An uninterrupted 2-process run (checkpoints at steps 4, 8, 12)."""
    run_dir = tmp_path_factory.mktemp("two")
    launch(2, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    run(load_config(None, overrides(run_dir, 1)))
    return run_dir


def test_two_processes_follow_the_one_process_trajectory(two_proc, one_proc):
    a, b = losses(one_proc), losses(two_proc)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert [b[s] for s in b] == pytest.approx([a[s] for s in b], rel=1e-4)
    assert losses(two_proc, "val_loss") == pytest.approx(losses(one_proc, "val_loss"), rel=1e-4)
    assert b[STEPS] < b[1] - 0.2  # it trains
    # Each rank wrote its own shards and RNG state; rank 0 the rest. No temporary folders remain.
    ckpt = two_proc / "checkpoints" / "step_00000012"
    assert {p.name for p in ckpt.iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp", "rng_rank0.safetensors",
                                                "rng_rank1.safetensors", "state.json", "config.toml"}
    assert sorted(p.name for p in (two_proc / "checkpoints").iterdir()) == [
        "step_00000004", "step_00000008", "step_00000012"]
    # The sharded checkpoint reads as whole weights in one process (grow, export-hf, init_from).
    whole, single = load_weights(ckpt), load_weights(one_proc / "checkpoints" / "step_00000012")
    assert whole.keys() == single.keys()
    for name in whole:
        # atol 1e-4: the two runs sum gradients in another order, and AdamW divides a rarely seen
        # token's tiny gradient by its tiny second moment, so an update there can differ by a few
        # 1e-5 (one element in 262,144 did under epoch sampling); the losses above agree to 1e-4
        torch.testing.assert_close(whole[name], single[name], rtol=1e-3, atol=1e-4)


def test_two_process_checkpoint_resumes_in_one_process(two_proc, tmp_path):
    ckpt = two_proc / "checkpoints" / "step_00000004"
    run(load_config(None, overrides(tmp_path, 1, f'checkpoint.resume="{ckpt}"')))
    a, b = losses(two_proc), losses(tmp_path)
    assert sorted(b) == list(range(5, STEPS + 1))
    assert [b[s] for s in b] == pytest.approx([a[s] for s in b], rel=1e-4)


def test_one_process_stop_and_resume_is_exact(one_proc, tmp_path):
    ckpt = one_proc / "checkpoints" / "step_00000008"
    run(load_config(None, overrides(tmp_path, 1, f'checkpoint.resume="{ckpt}"')))
    a, b = losses(one_proc), losses(tmp_path)
    assert sorted(b) == [9, 10, 11, 12] and all(a[s] == b[s] for s in b)  # bit-identical on CPU


def test_two_process_stop_and_resume_is_exact(two_proc, tmp_path):
    launch(2, tmp_path, f'checkpoint.resume="{two_proc / "checkpoints" / "step_00000004"}"')
    a, b = losses(two_proc), losses(tmp_path)
    assert sorted(b) == list(range(5, STEPS + 1))
    assert all(a[s] == b[s] for s in b)  # bit-identical: gloo's reductions are deterministic on CPU


KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch.distributed.checkpoint as dcp
from stackfast import train

real_save = dcp.save

def save(state, *, checkpoint_id, **kw):  # killed by SIGKILL in the middle of step 8's save
    real_save(state, checkpoint_id=checkpoint_id, **kw)
    if checkpoint_id.name == ".step_00000008.tmp":
        os.kill(os.getpid(), signal.SIGKILL)

dcp.save = save
sys.exit(train.main(sys.argv[1:]))
"""


def test_kill_9_during_a_checkpoint_write_then_resume_auto_uses_the_previous_one(one_proc, tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=str(REPO)))
    args = [a for o in overrides(tmp_path, 1, 'checkpoint.resume="auto"') for a in ("--set", o)]
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".step_00000008.tmp", "step_00000004"]
    # The same command again (what torchrun --max-restarts does after a crash) resumes at step 4.
    run(load_config(None, overrides(tmp_path, 1, 'checkpoint.resume="auto"')))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000004", "step_00000008", "step_00000012"]
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == list(range(1, STEPS + 1))
    a, b = losses(one_proc), losses(tmp_path)
    assert all(a[s] == b[s] for s in b)


def test_two_processes_killed_then_one_process_resumes_to_the_same_losses(two_proc, tmp_path):
    """2 processes, SIGKILL in the middle of step 8's checkpoint, then the unchanged config
    on 1 process with --resume auto: the global batch (the config's) is the same, so the
    run ends on the uninterrupted 2-process run's losses."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=str(REPO)))
    out = launch(2, tmp_path, 'checkpoint.resume="auto"', script=script, check=False)
    assert out.returncode != 0
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000004"]
    run(load_config(None, overrides(tmp_path, 1, 'checkpoint.resume="auto"')))
    a, b = losses(two_proc), losses(tmp_path)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert [b[s] for s in b] == pytest.approx([a[s] for s in b], rel=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(run_dir, *extra):
    """The multi-node command of docs/distributed.md on one machine: 2 torchrun agents ("nodes") of 1
    process each, meeting through the c10d rendezvous on 127.0.0.1."""
    port = free_port()
    args = [a for o in overrides(run_dir, 2, *extra) for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               f"--rdzv_id=stackfast-test-{port}", "--max-restarts=0", str(TRAIN), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
             for rank in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)


def test_two_nodes_through_c10d_rendezvous_train_checkpoint_and_resume(two_proc, tmp_path):
    launch_nodes(tmp_path)
    a = losses(two_proc)
    assert [losses(tmp_path)[s] for s in a] == pytest.approx([a[s] for s in a], rel=1e-4)
    # As after a crash past step 4: the later checkpoints gone, the same command resumes.
    for ckpt in list_checkpoints(tmp_path / "checkpoints")[1:]:
        shutil.rmtree(ckpt)
    launch_nodes(tmp_path, 'checkpoint.resume="auto"')
    b = losses(tmp_path)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert [b[s] for s in b] == pytest.approx([a[s] for s in b], rel=1e-4)


def test_sigterm_finishes_the_step_checkpoints_and_exits_0_then_resume_finishes(one_proc, tmp_path):
    args = [a for o in overrides(tmp_path, 1, "train.max_steps=100") for a in ("--set", o)]
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 6) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by a signal" in stdout
    last = max(losses(tmp_path))
    assert 6 <= last < 100 and list_checkpoints(tmp_path / "checkpoints")[-1].name == f"step_{last:08d}"
    summary = run(load_config(None, overrides(tmp_path, 1, "train.max_steps=100", "train.eval_every=0",
                                              'checkpoint.resume="auto"')))
    assert summary["steps"] == 100 and not summary["stopped"]
    assert sorted(losses(tmp_path)) == list(range(1, 101))


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (read from /proc: Linux)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_sigterm_to_the_workers_under_torchrun_exits_0(tmp_path):
    """The clean stop under torchrun of docs/distributed.md: signal the workers (torchrun's children), not
    torchrun (which exits 1 after passing a signal on, whatever its workers did). Every
    worker checkpoints and exits 0, so torchrun exits 0 too."""
    args = [a for o in overrides(tmp_path, 2, "train.max_steps=100") for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(TRAIN), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    workers = children(proc.pid)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by a signal" in stdout
    last = max(losses(tmp_path))
    assert 3 <= last < 100 and list_checkpoints(tmp_path / "checkpoints")[-1].name == f"step_{last:08d}"


class Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_malicious_dcp_metadata_is_refused_without_running_code(one_proc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "step_00000004"
    shutil.copytree(one_proc / "checkpoints" / "step_00000004", folder)
    (folder / ".metadata").write_bytes(pickle.dumps(Exploit()))
    write_checksums(folder)  # so that only the loader stands in the way
    with pytest.raises(CheckpointError, match=r"\.metadata: refused or corrupt .*builtins\.exec is not allowed"):
        load_weights(folder)
    cfg = load_config(None, overrides(tmp_path / "run", 1, f'checkpoint.resume="{folder}"'))
    with pytest.raises(CheckpointError, match="refused"):
        run(cfg)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_or_missing_shard_is_an_error_naming_the_file(two_proc, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(two_proc / "checkpoints" / "step_00000008", folder)
    shard = folder / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: checksum mismatch"):
        load_weights(folder)
    write_checksums(folder)  # what DCP's own checks find, once the checksums agree
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: truncated shard \(1000 bytes"):
        load_weights(folder)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: missing \(listed in checksums.json\)"):
        load_weights(folder)
    write_checksums(folder)
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: missing shard"):
        load_weights(folder)
    (folder / "state.json").write_text("{")
    write_checksums(folder)
    with pytest.raises(CheckpointError, match=r"state\.json: corrupt"):
        run(load_config(None, overrides(tmp_path / "r", 1, f'checkpoint.resume="{folder}"')))


def test_a_flipped_bit_in_a_shard_is_caught_by_its_checksum(two_proc, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(two_proc / "checkpoints" / "step_00000008", folder)
    listed = set(json.loads((folder / "checksums.json").read_text()))
    assert listed == {p.name for p in folder.iterdir()} - {"checksums.json"}  # every file, both ranks'
    shard = folder / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: DCP alone would load it
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: checksum mismatch"):
        load_weights(folder)
    # Two processes: each re-hashes its share of the files, and both stop with the same error.
    out = launch(2, tmp_path / "resumed", f'checkpoint.resume="{folder}"', check=False)
    assert out.returncode != 0 and "__1_0.distcp: checksum mismatch" in out.stdout + out.stderr
    assert not list_checkpoints(tmp_path / "resumed" / "checkpoints")  # nothing trained on the bad shard


def test_non_finite_steps_are_skipped_logged_and_counted(poisoned_steps, tmp_path):
    poisoned_steps.update({2, 3})
    summary = run(load_config(None, overrides(tmp_path, 1, "train.max_steps=6", "train.max_bad_steps=3")))
    rows = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6 and math.isfinite(summary["loss"])
    assert [s for s, r in rows.items() if r.get("skipped")] == [3, 4]
    assert math.isnan(rows[3]["loss"]) and math.isfinite(rows[5]["loss"])


def test_too_many_non_finite_steps_in_a_row_stop_with_the_last_checkpoint_intact(poisoned_steps, tmp_path):
    poisoned_steps.update(range(5, 100))
    with pytest.raises(StackfastError, match=r"3 steps in a row \(up to step 8\).*step_00000004"):
        run(load_config(None, overrides(tmp_path, 1, "train.max_bad_steps=3")))
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000004"]
    model = Transformer(load_config(None, overrides(tmp_path, 1)).model)
    load_checkpoint(ckpts[-1], model, torch.optim.AdamW(model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# Two stages, 1 -> 2 -> 4 layers after steps 2 and 5, Adam moments copied each time.
GROWTH = ["model.n_layers=4", 'growth.operator="stack"', "growth.factor=2",
          "growth.stages=[{at = 256}, {at = 640}]", 'growth.optimizer="replicate"', "train.max_steps=8"]


def test_two_stage_stack_growth_under_fsdp_matches_one_process(tmp_path):
    launch(2, tmp_path / "two", *GROWTH)
    run(load_config(None, overrides(tmp_path / "one", 1, *GROWTH)))
    events = [[r for r in read_metrics(tmp_path / d) if r.get("event") == "growth"] for d in ("one", "two")]
    assert [r["step"] for r in events[1]] == [r["step"] for r in events[0]] == [2, 5]
    assert [r["spec"] for r in events[1]] == [r["spec"] for r in events[0]]
    assert [r["spec"]["layer_map"] for r in events[0]] == [[0, 0], [0, 1, 0, 1]]
    # The probe loss right after growth depends only on the grown weights.
    for one, two in zip(*events):
        assert two["loss_after"] == pytest.approx(one["loss_after"], rel=1e-5)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [b[s] for s in b] == pytest.approx([a[s] for s in b], rel=1e-4)
    grown = load_weights(tmp_path / "two" / "checkpoints" / "step_00000008")
    assert len({k.split(".")[1] for k in grown if k.startswith("layers.")}) == 4
