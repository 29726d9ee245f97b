"""The demo's sizing and verdicts, and its studies: the CPU sizing rule, the GPU study's plan,
and the GPU study's whole path rehearsed at tiny size on this machine."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stackfast.demo import (CPU_SIZING, TOKENS_PER_PARAM, arm_config, compare, largest_hidden, loss_stats, summarize,
                            target_model)

REPO = Path(__file__).resolve().parent.parent


def record(arm, seed, loss, flops=100.0):
    return {"arm": arm, "seed": seed, "val_loss": loss, "flops": flops}


def test_cpu_sizing_is_the_studys_shape():
    # 8 x 32 byte-level target (the study's): 117k parameters, ~10 tokens per parameter at 1e12
    target = CPU_SIZING.target
    assert (target.vocab_size, target.n_layers, target.hidden_size, target.ffn_size) == (256, 8, 32, 88)
    assert target.num_params() == 117_280
    study = json.loads((REPO / "benchmarks" / "results" / "sizing_study.json").read_text())["summary"]
    assert (CPU_SIZING.lr_scratch, CPU_SIZING.lr_small, CPU_SIZING.lr_grown) == \
        (study["best_lr"]["scratch"], study["best_lr"]["small"], study["best_lr"]["stack"])
    assert CPU_SIZING.flops == study["budget"] and CPU_SIZING.small_share == study["best_share"]


def test_arm_configs_spend_the_same_budget():
    flops = {}
    for arm in ("scratch", "small", "stack"):
        overrides, steps = arm_config(CPU_SIZING, arm, 1, "cpu")
        from stackfast.config import load_config
        cfg = load_config(None, overrides)
        assert cfg.train.seed == 1 and cfg.optim.lr == CPU_SIZING.lr(arm) and cfg.data.path.endswith("-bytes")
        if arm == "stack":
            small_steps = cfg.growth.at_tokens // CPU_SIZING.tokens_per_step
            small = target_model(32, n_layers=2)
            flops[arm] = (small_steps * small.flops_per_token(128) + (steps - small_steps)
                          * CPU_SIZING.target.flops_per_token(128)) * CPU_SIZING.tokens_per_step
            assert cfg.growth.small_lr == CPU_SIZING.lr_grown  # the grown run's LR in both phases
            assert small_steps * small.flops_per_token(128) * CPU_SIZING.tokens_per_step \
                == pytest.approx(0.2 * CPU_SIZING.flops, rel=0.01)
        else:
            flops[arm] = steps * cfg.model.flops_per_token(128) * CPU_SIZING.tokens_per_step
    for arm, spent in flops.items():
        assert spent == pytest.approx(CPU_SIZING.flops, rel=0.01), arm


def test_verdicts_read_the_seed_spread():
    a, b = loss_stats([record("stack", 1, 1.40), record("stack", 2, 1.42)]), \
        loss_stats([record("scratch", 1, 1.50), record("scratch", 2, 1.55)])
    assert a["std"] == pytest.approx(0.014142, rel=1e-3) and a["mean"] == pytest.approx(1.41)
    assert compare(a, b) == "lower in every seed (beyond the seed spread)"
    assert compare(b, a) == "higher in every seed (beyond the seed spread)"
    tie = loss_stats([record("scratch", 1, 1.41), record("scratch", 2, 1.39)])
    assert compare(a, tie) == "within the seed spread (a tie)"
    one = loss_stats([record("small", 1, 1.30)])
    assert compare(a, one) == "higher (one seed: no spread measured)"


def test_summary_gives_the_speedup_seed_by_seed():
    runs = [record("scratch", 1, 4.5), record("stack", 1, 4.0), record("stack_half", 1, 5.0, 50.0),
            record("scratch", 2, 4.2), record("stack", 2, 4.0), record("stack_half", 2, 5.0, 50.0),
            record("small", 1, 4.1)]
    s = summarize(runs, 100.0)
    # seed 1: 4.5 halfway between 5.0 and 4.0 -> budget sqrt(50 * 100); seed 2: 80% of the way
    expected = [100 / 70.7107 - 1, 100 / (50 * 2 ** 0.8) - 1]
    assert [p["speedup"] for p in s["speedup_per_seed"]] == pytest.approx(expected, rel=1e-4)
    assert s["speedup_mean"] == pytest.approx(sum(expected) / 2, rel=1e-4)
    assert "speedup to scratch's final loss: +28% ± 13%" in s["verdict"][-1]
    assert "G_stack vs small alone" in s["verdict"][1]
    for r in runs:
        r["val_loss"] -= 0.9 * (r["arm"] == "stack_half")  # both halves reach scratch's loss
    assert summarize(runs, 100.0)["verdict"][-1].startswith("speedup to scratch's final loss: >= +100% in every")
    runs[1]["val_loss"] = 4.6  # seed 1's G_stack misses scratch's loss: no speedup claimed
    s = summarize(runs, 100.0)
    assert s["speedup_mean"] is None and s["verdict"][-1].startswith("no speedup: in 1 of 2 seeds")


def test_largest_hidden_follows_the_tokens_per_parameter_rule():
    seq = 128
    # at the CPU budget the 8 x 32 target is the widest at >= 10 tokens per parameter
    assert largest_hidden(CPU_SIZING.flops, seq, 10**9, 10.0) == 32
    hidden = largest_hidden(1e16, seq, 10**12, TOKENS_PER_PARAM)
    model, wider = target_model(hidden), target_model(hidden + (64 if hidden >= 256 else 16))
    assert 1e16 / model.flops_per_token(seq) / model.num_params() >= TOKENS_PER_PARAM
    assert 1e16 / wider.flops_per_token(seq) / wider.num_params() < TOKENS_PER_PARAM
    # the corpus caps the target whatever the FLOPs: 1M tokens allow width 16 (32k parameters),
    # 100k tokens not even that
    assert largest_hidden(1e18, seq, 10**6, TOKENS_PER_PARAM) == 16
    assert largest_hidden(1e18, seq, 10**5, TOKENS_PER_PARAM) is None


def test_demo_scales_itself_up_on_a_gpu_by_the_same_rule(monkeypatch):
    import stackfast.demo as demo
    probed = []

    def probe(model, device, seq_len, batch, data=None, steps=30):
        probed.append(model.hidden_size)
        return 5e12  # FLOP/s: a launch-bound GPU on a tiny model
    monkeypatch.setattr(demo, "probe_flops_per_s", probe)
    corpus = 11_000_000
    sizing = demo.gpu_sizing("cuda", 5.0, corpus)
    tokens = sizing.flops / sizing.target.flops_per_token(sizing.seq_len)
    assert probed[0] == 64 and probed[1] == sizing.target.hidden_size  # the second probe is of the chosen size
    assert sizing.target.hidden_size > CPU_SIZING.target.hidden_size  # larger than the CPU target
    assert tokens <= corpus and tokens / sizing.target.num_params() >= TOKENS_PER_PARAM
    # the corpus bounds it: 5 minutes would buy far more FLOPs than 11M tokens need
    assert sizing.flops < 5e12 * 300 / 7
    assert sizing.lr_grown == pytest.approx(CPU_SIZING.lr_grown * (32 / sizing.target.hidden_size) ** 0.5)


def test_gpu_plan_prefers_two_seeds_then_one_then_says_under_sized():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import growth_study
    finally:
        sys.path.pop(0)
    preset = growth_study.GpuPreset()
    # 8 minutes at 1 PFLOP/s: two seeds of a >= 20M target (width 512: 25.5M) at >= 15 tokens/param fit
    sizing, seeds, why = growth_study.plan_gpu(1e15, 480, preset, 10**9)
    assert seeds == 2 and sizing.target.num_params() >= 20e6 and sizing.tokens_per_param() >= TOKENS_PER_PARAM
    assert sizing.seq_len == 1024 and sizing.lr_grown < CPU_SIZING.lr_grown
    # at 300 TFLOP/s: one seed, at >= 10 tokens/param
    sizing, seeds, why = growth_study.plan_gpu(3e14, 480, preset, 10**9)
    assert seeds == 1 and sizing.target.num_params() >= 20e6 and sizing.tokens_per_param() >= 10
    # at 100 TFLOP/s: under-sized, and the plan says so
    sizing, seeds, why = growth_study.plan_gpu(1e14, 480, preset, 10**9)
    assert seeds == 1 and why.startswith("under-sized") and sizing.tokens_per_param() < 10
    # a corpus of 100M bytes caps the tokens: under-sized whatever the throughput
    sizing, seeds, why = growth_study.plan_gpu(1e16, 480, preset, 10**8)
    assert why.startswith("under-sized")
    assert sizing.flops / sizing.target.flops_per_token(1024) == pytest.approx(10**8)  # the corpus once, not more


@pytest.mark.slow
def test_gpu_growth_study_rehearsed_at_tiny_size(tmp_path):
    # The whole --gpu path on this CPU: tokenize source files, probe, plan, runs, JSON + PNG.
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "growth_study.py"), "--gpu", "--rehearse",
                          "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "growth_study_gpu-rehearsal.json").read_text())
    assert result["rehearsal"] and result["corpus_tokens"] > 10**6 and result["probe_tflops"] > 0
    arms = {r["arm"] for r in result["runs"]}
    assert {"scratch", "small", "stack"} <= arms
    assert len(result["runs"]) >= 3 * result["seeds"]
    for r in result["runs"]:
        assert r["flops"] == pytest.approx(result["sizing"]["flops"], rel=0.05)
    # sized to its limit from the probe; twice the limit tolerates a noisy shared machine
    assert result["wall_s"] < 2 * 60 * result["preset"]["minutes"]
    assert (tmp_path / "out" / "growth_study_gpu-rehearsal.png").stat().st_size > 10_000
