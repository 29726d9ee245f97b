"""HSDP (parallel.replicate_degree) on CPU: 4 gloo processes as 2 replicas x 2 shards.

One 4-process HSDP run with G_stack growth (the small model for 4 steps, then stacked
2 -> 4 layers, Adam moments replicated) is compared with the same run in one process, at
test_distributed.py's tolerance (rel 1e-4; the reductions differ in order only) on the
losses, gradient norms (a norm that counted the replicas twice would be sqrt(2) off),
validation losses and the probe loss right after growth. Its checkpoints resume under
4-process FSDP (through the growth step) and in one process, and the FSDP run's
checkpoint resumes under HSDP, all on the same trajectory. Three 4-process launches in
all (~25 s each on 2 cores). The mesh layout and `local_part` are checked in-process on
a fake process group of 4 (no launch).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from stackfast.checkpoint import load_weights
from stackfast.cli import main as cli_main
from stackfast.config import ConfigError, ModelConfig, ParallelConfig, load_config
from stackfast.metrics import read_metrics
from stackfast.train import run
from test_distributed import BASE, REPO, TRAIN, losses

STEPS = 12
# The global batch is 8 rows at any number of processes. Growth after 1024 tokens = 4 steps of
# 8 x 32; checkpoints at steps 4 (the small model), 8, 12.
GROWTH = ["model.n_layers=4", 'growth.operator="stack"', "growth.factor=2", "growth.at_tokens=1024",
          'growth.optimizer="replicate"', f"train.max_steps={STEPS}", "train.global_batch_size=8"]
# 4 processes run their 2 rows as 2 accumulated micro-batches of 1 (the gradient reduction,
# within and across the shard groups, deferred to the second); one process as 2 of 4, so
# that growth's probe batch (one micro-batch on each process) is the same 4 rows.
MICRO4, MICRO1 = "train.micro_batch_size=1", "train.micro_batch_size=4"


def settings(run_dir, *extra):
    return BASE + GROWTH + [f'logging.run_dir="{run_dir}"', *extra]


def launch4(run_dir, *extra):
    """`torchrun --standalone --nproc_per_node=4 stackfast/train.py --set ...`; returns the output
    (with the start-up line, which names the mesh: progress lines go to stderr off a terminal)."""
    args = [a for o in settings(run_dir, MICRO4, "logging.progress=true", *extra) for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(TRAIN), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout + out.stderr


def ckpt(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}"


def assert_same_trajectory(run_dir, reference, steps):
    a, b = losses(reference), losses(run_dir)
    assert sorted(b) == list(steps)
    assert [b[s] for s in steps] == pytest.approx([a[s] for s in steps], rel=1e-4)
    g, h = losses(reference, "grad_norm"), losses(run_dir, "grad_norm")
    assert [h[s] for s in steps] == pytest.approx([g[s] for s in steps], rel=1e-4)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    run(load_config(None, settings(run_dir, MICRO1)))
    return run_dir


@pytest.fixture(scope="module")
def hsdp(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hsdp")
    return run_dir, launch4(run_dir, "parallel.replicate_degree=2")


@pytest.fixture(scope="module")
def fsdp_from_hsdp(hsdp, tmp_path_factory):
    """4-process FSDP resumed from HSDP's step 4 (the small model): it grows at step 5."""
    run_dir = tmp_path_factory.mktemp("fsdp")
    return run_dir, launch4(run_dir, f'checkpoint.resume="{ckpt(hsdp[0], 4)}"')


def test_hsdp_with_growth_follows_the_one_process_trajectory(hsdp, one):
    run_dir, output = hsdp
    assert "4 processes (cpu, HSDP 2 x 2)" in output  # the 2-D mesh was built (else this is plain FSDP)
    assert_same_trajectory(run_dir, one, range(1, STEPS + 1))
    assert losses(run_dir, "val_loss") == pytest.approx(losses(one, "val_loss"), rel=1e-4)
    assert losses(run_dir)[STEPS] < losses(run_dir)[1] - 0.2  # it trains
    rows = [[r for r in read_metrics(d) if r.get("event") == "growth"][0] for d in (one, run_dir)]
    assert rows[0]["spec"] == rows[1]["spec"] and rows[1]["spec"]["layer_map"] == [0, 1, 0, 1]
    assert rows[1]["loss_after"] == pytest.approx(rows[0]["loss_after"], rel=1e-5)  # the grown weights
    # Every rank writes its shards, and each replicated shard is saved once (not R times).
    folder, single = ckpt(run_dir, STEPS), ckpt(one, STEPS)
    assert {f"__{r}_0.distcp" for r in range(4)} | {f"rng_rank{r}.safetensors" for r in range(4)} <= {
        p.name for p in folder.iterdir()}
    sizes = [sum(p.stat().st_size for p in f.glob("*.distcp")) for f in (folder, single)]
    assert sizes[0] < 1.05 * sizes[1]
    whole, reference = load_weights(folder), load_weights(single)
    assert whole.keys() == reference.keys()
    assert len({k.split(".")[1] for k in whole if k.startswith("layers.")}) == 4
    # Adam turns last-bit gradient differences into update differences of up to ~lr on
    # elements whose gradient is near 0 (1 of 262144 moved 7e-5 here); a wrong shard moves
    # whole rows by the weights' own size (~1e-2).
    for name in whole:
        torch.testing.assert_close(whole[name], reference[name], rtol=1e-3, atol=1e-4)


def test_hsdp_checkpoint_resumes_under_fsdp_and_in_one_process(hsdp, fsdp_from_hsdp, one, tmp_path):
    run_dir, output = fsdp_from_hsdp
    assert "4 processes (cpu, FSDP)" in output
    assert_same_trajectory(run_dir, one, range(5, STEPS + 1))  # grown under FSDP from HSDP's small model
    run(load_config(None, settings(tmp_path, f'checkpoint.resume="{ckpt(hsdp[0], 8)}"')))
    assert_same_trajectory(tmp_path, one, range(9, STEPS + 1))


def test_fsdp_checkpoint_resumes_under_hsdp(fsdp_from_hsdp, one, tmp_path):
    output = launch4(tmp_path, "parallel.replicate_degree=2", f'checkpoint.resume="{ckpt(fsdp_from_hsdp[0], 8)}"')
    assert "HSDP 2 x 2" in output
    assert_same_trajectory(tmp_path, one, range(9, STEPS + 1))


def test_replicate_degree_must_divide_the_world_size(tmp_path, monkeypatch, capsys):
    def joined(*args, **kwargs):
        raise AssertionError("joined the process group before checking parallel.replicate_degree")
    monkeypatch.setattr(dist, "init_process_group", joined)
    # A worker of `torchrun --nproc_per_node=4` (its environment), then a run without torchrun.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    run_dir = tmp_path / "run"
    args = [a for o in settings(run_dir, "parallel.replicate_degree=3") for a in ("--set", o)]
    assert cli_main(["train", *args]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "stackfast: error: parallel.replicate_degree: 3 does not divide the world size (4 processes); use a "
        "divisor of 4, e.g. the number of nodes"]
    assert not run_dir.exists()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    args = [a for o in settings(run_dir, "parallel.replicate_degree=2") for a in ("--set", o)]
    assert cli_main(["train", *args]) == 2
    assert "replicate_degree: 2 needs torchrun with a multiple of 2 processes (HSDP); this run has 1 process" \
        in capsys.readouterr().err
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match="parallel.replicate_degree: must be positive, got 0"):
        load_config(None, ["parallel.replicate_degree=0"])


def test_mesh_layout_and_local_part_on_a_fake_group_of_4(monkeypatch):
    """Without communication: the 2 x 2 mesh as rank 3 of a fake process group of 4 sees it
    (replica 1, shard 1: neither coordinate is 0, and neither is the global rank)."""
    rank = 3
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from stackfast.model import Transformer
    from stackfast.parallel import init_distributed, local, local_part, wrap_model
    for name, value in (("RANK", rank), ("WORLD_SIZE", 4), ("LOCAL_RANK", rank)):
        monkeypatch.setenv(name, str(value))
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=4)
    try:
        world, _ = init_distributed(torch.device("cpu"), replicate_degree=2)
        assert world.mesh.mesh_dim_names == ("dp_replicate", "dp_shard") and world.strategy == "HSDP 2 x 2"
        # A shard group is consecutive ranks (one node when replicate_degree is the number of nodes).
        assert world.mesh["dp_shard"].mesh.tolist() == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert world.mesh["dp_replicate"].mesh.tolist() == [rank % 2, rank % 2 + 2]
        with torch.device("meta"):
            model = Transformer(ModelConfig.from_preset("tiny"))
        wrap_model(model, ParallelConfig(replicate_degree=2), world, bf16=False).materialize("cpu")
        p = model.layers[0].self_attn.q_proj.weight
        assert isinstance(p, DTensor) and p.placements == (Replicate(), Shard(0))
        full = torch.arange(p.numel(), dtype=p.dtype).view(p.shape)
        half = p.shape[0] // 2
        expected = full[half:] if rank % 2 else full[:half]  # the rank's chunk on dp_shard, not of 4
        assert torch.equal(local_part(p, full), expected) and local(p).shape == expected.shape
        # Uneven rows, as torch.chunk splits them: 5 rows are 3 + 2.
        odd = DTensor.from_local(torch.zeros(3 - rank % 2, 2), world.mesh, (Replicate(), Shard(0)),
                                 shape=torch.Size([5, 2]), stride=(2, 1))
        rows = torch.arange(10.0).view(5, 2)
        assert torch.equal(local_part(odd, rows), rows[3:] if rank % 2 else rows[:3])
        world4, _ = init_distributed(torch.device("cpu"), replicate_degree=4)  # pure replication: shards of 1
        assert world4.strategy == "HSDP 4 x 1" and world4.mesh["dp_shard"].size() == 1
    finally:
        dist.destroy_process_group()
