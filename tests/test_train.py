"""The training loop: loss falls, metrics rows, exact resume, checkpoints, schedule."""
import math

import pytest

from stackfast.checkpoint import CheckpointError, list_checkpoints
from stackfast.config import StackfastError, load_config
from stackfast.metrics import read_metrics
from stackfast.optim import lr_at
from stackfast.train import run

TINY = ['model.preset="tiny"', "model.kernels=torch", "data.seq_len=64", "train.global_batch_size=4",
        "schedule.warmup_steps=5", "optim.lr=3e-3", "train.eval_batches=2", "logging.progress=false",
        "logging.tensorboard=false", "logging.log_every=3"]


def tiny_config(run_dir, *extra):
    return load_config(None, TINY + [f'logging.run_dir="{run_dir}"', *extra])


def test_toy_run_loss_falls_and_logs_every_step(tmp_path):
    summary = run(tiny_config(tmp_path, "train.max_steps=40", "train.eval_every=20"))
    rows = read_metrics(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 41))
    assert {"step", "tokens", "flops", "loss", "lr", "tokens_per_s", "mfu"} <= set(train_rows[0])
    assert train_rows[0]["mfu"] is None  # no peak FLOP/s known on CPU
    first, last = sum(r["loss"] for r in train_rows[:3]) / 3, sum(r["loss"] for r in train_rows[-3:]) / 3
    assert first > math.log(4096) - 0.2 and last < first - 1.0
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    assert summary["tokens"] == 40 * 4 * 64 and train_rows[-1]["tokens"] == summary["tokens"]
    cfg = tiny_config(tmp_path)
    assert train_rows[-1]["flops"] == pytest.approx(summary["tokens"] * cfg.model.flops_per_token(64))
    assert (tmp_path / "config.toml").read_text() == cfg.to_toml().replace(
        "max_steps = 0", "max_steps = 40").replace("eval_every = 100", "eval_every = 20").replace(
        'sampling = "auto"', 'sampling = "epoch"')  # the resolved config: a fresh run reads by epoch


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    full = tmp_path / "full"
    run(tiny_config(full, "train.max_steps=10", "checkpoint.every_steps=4", "checkpoint.keep_last=5"))
    assert [p.name for p in list_checkpoints(full / "checkpoints")] == [
        "step_00000004", "step_00000008", "step_00000010"]
    # A second run starts from the step-4 checkpoint of the first and finishes the schedule.
    part = tmp_path / "part"
    run(tiny_config(part, "train.max_steps=10", f'checkpoint.resume="{full / "checkpoints" / "step_00000004"}"'))
    a = {r["step"]: r["loss"] for r in read_metrics(full) if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(part) if "loss" in r}
    assert sorted(b) == list(range(5, 11))
    assert all(a[s] == b[s] for s in b)  # bit-identical on CPU


def test_resume_auto_continues_and_rewrites_later_rows(tmp_path):
    run(tiny_config(tmp_path, "train.max_steps=6", "checkpoint.every_steps=3"))
    rows_before = read_metrics(tmp_path)
    # Make step 6's checkpoint look lost: auto-resume picks step 3 and redoes 4..6.
    for p in list_checkpoints(tmp_path / "checkpoints"):
        if p.name.endswith("6"):
            for f in p.iterdir():
                f.unlink()
            p.rmdir()
    run(tiny_config(tmp_path, "train.max_steps=6", 'checkpoint.resume="auto"'))
    rows_after = read_metrics(tmp_path)
    assert [r["step"] for r in rows_after if "loss" in r] == list(range(1, 7))
    assert [r["loss"] for r in rows_after if "loss" in r] == [r["loss"] for r in rows_before if "loss" in r]


def test_checkpoint_keep_last_and_no_temp_folders(tmp_path):
    run(tiny_config(tmp_path, "train.max_steps=6", "checkpoint.every_steps=1", "checkpoint.keep_last=2"))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000005", "step_00000006"]


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    run(tiny_config(tmp_path / "a", "train.max_steps=4"))
    run(tiny_config(tmp_path / "b", "train.max_steps=4", 'parallel.activation_checkpointing="full"'))
    run(tiny_config(tmp_path / "c", "train.max_steps=4", 'parallel.activation_checkpointing="selective"'))
    losses = [[r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in "abc"]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0] == pytest.approx(losses[2], rel=1e-6)


def test_init_from_loads_weights_and_mismatch_is_refused(tmp_path):
    run(tiny_config(tmp_path / "a", "train.max_steps=3"))
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000003"
    summary = run(tiny_config(tmp_path / "b", "train.max_steps=1", f'checkpoint.init_from="{ckpt}"'))
    first = read_metrics(tmp_path / "b")[0]["loss"]
    assert first < math.log(4096) - 0.3 and summary["steps"] == 1  # trained weights, not a fresh init
    with pytest.raises(CheckpointError, match="does not fit|do not fit"):
        run(tiny_config(tmp_path / "c", "train.max_steps=1", "model.n_layers=3", f'checkpoint.init_from="{ckpt}"'))


class Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_a_pickled_object_inside_a_dcp_shard_is_refused_without_running_code(tmp_path, monkeypatch):
    """A checkpoint whose optimizer settings (saved pickled in the shards) carry an object
    that runs code when unpickled, checksums recomputed so only the loader stands in the
    way: resume, init_from and load_weights refuse it and nothing runs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from stackfast.checkpoint import load_weights, write_checksums
    from stackfast.model import Transformer
    from stackfast.optim import build_optimizer
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path / "a", "train.max_steps=2")
    run(cfg)
    folder = tmp_path / "a" / "checkpoints" / "step_00000002"
    model = Transformer(cfg.model)
    model_state, optim_state = get_state_dict(model, build_optimizer(model, cfg.optim))
    for group in optim_state["param_groups"]:
        group["lr"] = Exploit()  # a value the loader reads back from the shards
    for path in folder.iterdir():
        if path.name not in ("state.json", "config.toml") and not path.name.startswith("rng_"):
            path.unlink()
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder, no_dist=True)
    write_checksums(folder)
    with pytest.raises(CheckpointError, match=r"step_00000002: entry optim.param_groups.0.lr refused: a pickled object"):
        run(tiny_config(tmp_path / "b", "train.max_steps=3", f'checkpoint.resume="{folder}"'))
    assert not (tmp_path / "PWNED").exists()
    load_weights(folder)  # the model's tensors alone are safe to read: no pickled entry among them
    assert not (tmp_path / "PWNED").exists()


GROW_AT_4 = ['growth.operator="stack"', "growth.factor=2", "growth.at_tokens=1024", "train.max_steps=6"]


def test_a_non_finite_step_just_before_growth_is_counted(poisoned_steps, tmp_path):
    # Steps 3 and 4 (1-based) are bad; log_every = 3 flushes step 3 with the loop's other
    # steps, and step 4 in the flush just before growth at step 4.
    poisoned_steps.update({2, 3})
    summary = run(tiny_config(tmp_path, *GROW_AT_4))
    assert summary["growth_step"] == 4 and summary["skipped_steps"] == 2
    assert [r["step"] for r in read_metrics(tmp_path) if r.get("skipped")] == [3, 4]


def test_bad_steps_up_to_growth_stop_the_run(poisoned_steps, tmp_path):
    poisoned_steps.update({2, 3})
    with pytest.raises(StackfastError, match=r"2 steps in a row \(up to step 4\)"):
        run(tiny_config(tmp_path, *GROW_AT_4, "train.max_bad_steps=2"))


def test_lr_schedule_warmup_then_cosine_to_floor():
    assert lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(150, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("content", ['["a"]', '{"../state.json": "00"}', '{"state.json": 1}'])
def test_a_malformed_checksum_list_is_refused(tmp_path, content):
    from stackfast.checkpoint import verify_checksums
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "checksums.json").write_text(content)
    with pytest.raises(CheckpointError, match="checksums.json: corrupt checksum list"):
        verify_checksums(tmp_path)


def test_a_stop_signal_never_outlives_its_run(tmp_path, monkeypatch, capsys):
    """Only SIGTERM or SIGINT delivered while a run() goes can stop it: the flag belongs to
    that run's StopSignal, whose handlers go when it ends, and the stop is said on stderr even
    with the progress display off (a run cut short never passes for a finished one). The
    signal is raised synchronously inside a step (signal.raise_signal runs the handler before
    it returns), so it cannot reach another test's run."""
    import signal
    from stackfast import train as train_module
    from stackfast.train import StopSignal
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    train_step, calls = train_module.train_step, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)
        return train_step(*args, **kwargs)
    monkeypatch.setattr(train_module, "train_step", signalled)
    summary = run(tiny_config(tmp_path / "a", "train.max_steps=4", "train.eval_batches=1"))
    assert summary["stopped"] and summary["steps"] == 2 and summary["stop_signal"] == "SIGTERM"
    assert "step 2: stopped by a signal (SIGTERM); wrote" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in before} == before
    monkeypatch.undo()
    summary = run(tiny_config(tmp_path / "b", "train.max_steps=4", "train.eval_batches=1"))
    assert summary["steps"] == 4 and not summary["stopped"] and summary["stop_signal"] is None
    # A handler that C code installed reads back as None, which signal.signal refuses: the
    # default comes back instead of a TypeError that would leave this run's handler in place.
    real_signal = signal.signal
    monkeypatch.setattr(signal, "signal", lambda sig, handler: (real_signal(sig, handler), None)[1])
    try:
        with StopSignal():
            pass
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    finally:
        for sig, handler in before.items():
            real_signal(sig, handler)


GROWS = ["data.seq_len=32", "train.global_batch_size=2", "train.eval_batches=1", "train.eval_every=0",
         "growth.operator=stack", "growth.factor=2", "growth.stages=[{at = 0.5}]"]  # after step 10 of 20


def growth_rows(run_dir) -> list[tuple[int, int]]:
    return [(r["step"], r["stage"]) for r in read_metrics(run_dir) if r.get("event") == "growth"]


def keep_checkpoints_up_to(run_dir, step: int) -> None:
    """A run as if killed after its checkpoint of `step`: later checkpoints gone (their rows stay)."""
    import shutil
    for folder in list_checkpoints(run_dir / "checkpoints"):
        if int(folder.name.split("_")[1]) > step:
            shutil.rmtree(folder)


@pytest.fixture(scope="module")
def grown_run(tmp_path_factory):
    """20 steps growing after step 10, a checkpoint at every step."""
    run_dir = tmp_path_factory.mktemp("grown")
    run(tiny_config(run_dir, *GROWS, "train.max_steps=20", "checkpoint.every_steps=1", "checkpoint.keep_last=20"))
    assert growth_rows(run_dir) == [(10, 1)]
    return run_dir


def test_a_resume_from_the_growth_steps_checkpoint_logs_the_growth_once(grown_run, tmp_path):
    # The checkpoint of step 10 is written before the model grows at that step: the resumed
    # run grows again, and its row replaces the first run's, as its step rows do theirs.
    import shutil
    shutil.copytree(grown_run, tmp_path / "run")
    keep_checkpoints_up_to(tmp_path / "run", 10)
    run(tiny_config(tmp_path / "run", *GROWS, "train.max_steps=20", 'checkpoint.resume="auto"'))
    assert growth_rows(tmp_path / "run") == [(10, 1)]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == list(range(1, 21))


def test_a_resume_with_a_smaller_budget_grows_where_its_start_line_says(grown_run, tmp_path, capsys):
    # Killed after step 9's checkpoint, resumed with 16 steps: the plan's step 8 is behind the
    # run, so it grows at once, after step 9, and says so.
    import re
    import shutil
    shutil.copytree(grown_run, tmp_path / "run")
    keep_checkpoints_up_to(tmp_path / "run", 9)
    capsys.readouterr()
    summary = run(tiny_config(tmp_path / "run", *GROWS, "train.max_steps=16", 'checkpoint.resume="auto"',
                              "logging.progress=true"))
    announced = re.search(r"; grows \(stack\) x2 after step (\d+);", capsys.readouterr().err)
    assert announced and growth_rows(tmp_path / "run") == [(int(announced.group(1)), 1)] == [(9, 1)]
    assert summary["growth_steps"] == [9]


def test_a_resume_leaving_no_room_for_the_stages_behind_it_is_refused(tmp_path):
    from stackfast.config import ConfigError
    stages = ["model.n_layers=4", "growth.stages=[{at = 0.5}, {at = 0.75}]"]  # 1 -> 2 -> 4 layers, steps 4 and 6
    run(tiny_config(tmp_path, *GROWS, *stages, "train.max_steps=8", "checkpoint.every_steps=3",
                    "checkpoint.keep_last=5"))
    keep_checkpoints_up_to(tmp_path, 3)
    # 4 steps: the plan's steps 2 and 3 are both due at the resume's step 3; the second stage
    # would then grow after step 4, the run's end
    with pytest.raises(ConfigError, match=r"at step 3: growth stage 2 would grow after step 4, with the run's "
                                          r"4 steps done"):
        run(tiny_config(tmp_path, *GROWS, *stages, "train.max_steps=4", 'checkpoint.resume="auto"'))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000003"]
    run(tiny_config(tmp_path, *GROWS, *stages, "train.max_steps=5", 'checkpoint.resume="auto"'))
    assert growth_rows(tmp_path) == [(3, 1), (4, 2)]


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-PCIE-40GB", 312),
    ("NVIDIA L40", 181), ("NVIDIA L40S", 362), ("NVIDIA L4", 121), ("NVIDIA GeForce RTX 4090", 165),
    # unknown: no MFU rather than a neighbour's peak
    ("NVIDIA A10G", None), ("NVIDIA H100", None), ("NVIDIA L20", None), ("Tesla V100-SXM2-16GB", None)])
def test_the_peak_flops_of_a_gpu_is_its_own(monkeypatch, name, tflops):
    import torch
    from stackfast.metrics import peak_flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda")) == (tflops * 1e12 if tflops else None)
    assert peak_flops(torch.device("cuda"), override_tflops=500) == 500e12


def test_document_masked_training_follows_the_same_trace_on_both_paths_and_logs_the_attended_share(tmp_path):
    import json

    import numpy as np

    from stackfast.data.sampling import attended_share, document_ids
    from stackfast.data.shards import FORMAT
    # byte-like tokens with an end-of-text (id 0) every 5 to 40 tokens: several documents per row
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 256, size=6000).astype(np.uint16)
    ends = np.cumsum(rng.integers(5, 40, size=400))
    tokens[ends[ends < tokens.size]] = 0
    folder = tmp_path / "ds"
    folder.mkdir()
    tokens[:5500].tofile(folder / "train_00000.bin")
    tokens[5500:].tofile(folder / "val_00000.bin")
    (folder / "index.json").write_text(json.dumps({
        "format": FORMAT, "dtype": "uint16", "vocab_size": 256, "total_tokens": 6000,
        "tokenizer": {"spec": "test", "fingerprint": "test", "eos_id": 0},
        "train": [{"file": "train_00000.bin", "tokens": 5500}], "val": [{"file": "val_00000.bin", "tokens": 500}]}))
    job = ['model.preset="tiny"', "model.vocab_size=256", "data.seq_len=32", "train.global_batch_size=2",
           "train.max_steps=4", "train.eval_batches=1", 'train.dtype="fp32"', "logging.progress=false",
           "logging.tensorboard=false", "logging.log_every=1", f'data.path="{folder}"', "data.document_mask=true",
           "model.rope_reset=true"]
    losses = {}
    for kernels in ("torch", "triton"):  # triton: under the interpreter on a CPU
        run(load_config(None, job + [f'model.kernels="{kernels}"', f'logging.run_dir="{tmp_path / kernels}"']))
        rows = [r for r in read_metrics(tmp_path / kernels) if "loss" in r]
        losses[kernels] = [r["loss"] for r in rows]
        shares = [r["attended"] for r in rows]
    assert losses["triton"] == pytest.approx(losses["torch"], abs=1e-4)
    # without the mask the same run trains on other numbers: the mask reached attention
    run(load_config(None, job[:-2] + [f'logging.run_dir="{tmp_path / "unmasked"}"']))
    unmasked = [r for r in read_metrics(tmp_path / "unmasked") if "loss" in r]
    assert "attended" not in unmasked[0] and [r["loss"] for r in unmasked] != pytest.approx(losses["torch"], abs=1e-4)
    assert all(0.2 < s < 0.95 for s in shares)  # documents of ~20 tokens in rows of 32
    # the share: documents of 1, 2 and 3 tokens in a row of 6 keep (1 + 3 + 6) of 21 causal pairs
    assert attended_share(document_ids(np.array([[0, 5, 0, 5, 6, 7]]), 0)) == pytest.approx(10 / 21)
