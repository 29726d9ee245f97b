"""The demo's sizing and verdicts, and its studies: the CPU sizing rule, the GPU study's plan,
and the GPU study's whole path rehearsed at tiny size on this machine."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stackfast.demo import (BEST, CPU_SIZING, NOISE_FLOOR, QUICK_DIVISOR, TOKENS_PER_PARAM, TUNED, demo_trials,
                            largest_hidden, summarize, target_model)
from stackfast.recipes import RECIPES

REPO = Path(__file__).resolve().parent.parent


def record(arm, seed, loss, flops=100.0):
    return {"arm": arm, "seed": seed, "val_loss": loss, "run_flops": flops}


def test_cpu_sizing_is_the_studies_choice():
    # 8 x 32 byte-level target (the sizing study's): 117k parameters, ~10 tokens per parameter at 1e12
    target = CPU_SIZING.target
    assert (target.vocab_size, target.n_layers, target.hidden_size, target.ffn_size) == (256, 8, 32, 88)
    assert target.num_params() == 117_280
    sizing = json.loads((REPO / "benchmarks" / "results" / "sizing_study.json").read_text())
    assert CPU_SIZING.flops == sizing["budget"] and sizing["target_params"] == target.num_params()
    for budget in sizing["at"].values():  # G_stack ahead of scratch and of the small model alone at both budgets
        assert budget["stack_vs_scratch"].startswith("lower") and budget["stack_vs_small"].startswith("lower")
    # every recipe's schedule and LR, the best recipe and the noise floor: the recipe study's
    study = json.loads((REPO / "benchmarks" / "results" / "recipe_study-cpu.json").read_text())
    assert {r["recipe"]: (r["schedule"], r["lr"]) for r in study["rows"]} == TUNED
    grown = [r for r in study["rows"] if RECIPES[r["recipe"]].grows]
    assert BEST == min(grown, key=lambda r: r["final_val_loss"])["recipe"]
    assert NOISE_FLOOR == pytest.approx(study["noise_floor"], abs=5e-6) and study["bit_reproducible"]
    assert CPU_SIZING.flops == study["sizing"]["flops"]


def test_demo_runs_every_arm_at_its_tuned_setting():
    trials = demo_trials(CPU_SIZING, 2)
    arms = [(arm, t.seed) for arm, t in trials]
    assert sorted(set(arms)) == sorted(arms)  # no run twice
    for recipe in dict.fromkeys(("scratch", "stack_paper", BEST)):
        assert {(recipe, 1), (recipe, 2)} <= set(arms)
    assert ("small", 1) in arms and ("small", 2) not in arms
    for arm, t in trials:
        assert (t.kind, t.lr) == TUNED[t.recipe] and t.threads == 1
        assert t.flops == (CPU_SIZING.flops / 2 if arm.endswith("_half") else CPU_SIZING.flops)
    assert CPU_SIZING.with_lr(1e-3).settings["scratch"] == (TUNED["scratch"][0], 1e-3)
    assert CPU_SIZING.flops / QUICK_DIVISOR >= CPU_SIZING.min_flops()  # `demo --quick` runs


def test_summary_gives_each_recipes_speedup_seed_by_seed():
    runs = [record("scratch", 1, 4.5), record("stack_paper", 1, 4.0), record("stack_paper_half", 1, 5.0, 50.0),
            record("scratch", 2, 4.2), record("stack_paper", 2, 4.0), record("stack_paper_half", 2, 5.0, 50.0),
            record("small", 1, 4.1)]
    s = summarize(runs, noise=0.01)
    # seed 1: 4.5 halfway between 5.0 and 4.0 -> budget sqrt(50 * 100); seed 2: 80% of the way
    expected = [100 / 70.7107 - 1, 100 / (50 * 2 ** 0.8) - 1]
    assert s["speedups"]["stack_paper"] == pytest.approx(expected, rel=1e-4)
    label = RECIPES["stack_paper"].label
    assert f"{label}: speedup to scratch's final loss +28% ± 13%" in s["verdict"][-1]
    assert s["verdict"][0].startswith(f"{label} vs scratch: 4.0000 ± 0.0000 vs 4.3500") \
        and s["verdict"][0].endswith("lower (every seed, beyond the noise floor)")
    assert s["verdict"][1] == f"{label} vs small alone: 4.0000 vs 4.1000: lower (one seed: no spread measured)"
    for r in runs:
        r["val_loss"] -= 0.9 * (r["arm"] == "stack_paper_half")  # both halves reach scratch's loss
    assert "speedup to scratch's final loss >= +100% in every seed" in summarize(runs)["verdict"][-1]
    runs[1]["val_loss"] = 4.6  # seed 1's G_stack misses scratch's loss: no speedup claimed
    s = summarize(runs)
    assert s["verdict"][-1] == f"{label}: no speedup: in 1 of 2 seeds it did not reach scratch's final loss " \
        "within the same budget"


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
    for recipe, (kind, lr) in sizing.settings.items():
        assert kind == TUNED[recipe][0]
        assert lr == pytest.approx(TUNED[recipe][1] * (32 / sizing.target.hidden_size) ** 0.5)


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
    assert sizing.seq_len == 1024 and sizing.settings["stack_paper"][1] < TUNED["stack_paper"][1]
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
    arms = {r["recipe"] for r in result["runs"]}
    assert {"scratch", "small", "stack_paper"} <= arms
    assert len(result["runs"]) >= 3 * result["seeds"]
    for r in result["runs"]:
        assert r["run_flops"] == pytest.approx(result["sizing"]["flops"], rel=0.05)
    # sized to its limit from the probe; twice the limit tolerates a noisy shared machine
    assert result["wall_s"] < 2 * 60 * result["preset"]["minutes"]
    assert (tmp_path / "out" / "growth_study_gpu-rehearsal.png").stat().st_size > 10_000
