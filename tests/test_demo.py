"""The demo's sizing and verdicts, and its studies: the CPU sizing rule, the GPU study's plan,
and the GPU study's whole path rehearsed at tiny size on this machine."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stackfast.demo import (BEST, CPU_SIZING, DEMO_ARMS, NOISE_FLOOR, QUICK_DIVISOR, TOKENS_PER_PARAM, TUNED,
                            demo_trials, largest_hidden, summarize, target_model)
from stackfast.recipes import RECIPES

REPO = Path(__file__).resolve().parent.parent


def record(arm, seed, loss, flops=100.0):
    return {"arm": arm, "seed": seed, "val_loss": loss, "run_flops": flops}


def test_cpu_sizing_is_near_compute_optimal_and_takes_the_studies_settings():
    # 8 x 32 byte-level target (the studies'): 117k parameters, 20 tokens per parameter at 2e12
    target = CPU_SIZING.target
    assert (target.vocab_size, target.n_layers, target.hidden_size, target.ffn_size) == (256, 8, 32, 88)
    assert target.num_params() == 117_280 and CPU_SIZING.tokens_per_param() >= TOKENS_PER_PARAM == 20
    study = json.loads((REPO / "benchmarks" / "results" / "recipe_study-cpu.json").read_text())
    assert {r["recipe"]: (r["schedule"], r["lr"]) for r in study["rows"]} == TUNED
    assert CPU_SIZING.flops == study["sizing"]["flops"]
    grown = [r for r in study["rows"] if RECIPES[r["recipe"]].grows]
    assert BEST == min(grown, key=lambda r: r["final_val_loss"])["recipe"]
    assert NOISE_FLOOR == pytest.approx(study["noise_floor"], abs=5e-6) and study["bit_reproducible"]


def test_demo_runs_every_arm_on_every_seed_at_its_tuned_setting():
    trials = demo_trials(CPU_SIZING, 3)
    assert sorted((arm, t.seed) for arm, t in trials) == sorted((a, s) for a in DEMO_ARMS for s in (1, 2, 3))
    for arm, t in trials:
        assert arm == t.recipe and (t.kind, t.lr) == TUNED[t.recipe] and t.threads == 1 and t.flops == CPU_SIZING.flops
    assert CPU_SIZING.with_lr(1e-3).settings["scratch"] == (TUNED["scratch"][0], 1e-3)
    assert CPU_SIZING.flops / QUICK_DIVISOR >= CPU_SIZING.min_flops()  # `demo --quick` runs


def test_summary_compares_arms_paired_by_seed_and_says_when_it_cannot_tell():
    # G_stack 0.05 below the small model on every seed (the differences -0.04, -0.05, -0.06)
    runs = [record("scratch", s, 4.5 + 0.1 * s) for s in (1, 2, 3)]
    runs += [record("small", s, 4.2 + 0.1 * s) for s in (1, 2, 3)]
    runs += [record("stack_paper", s, 4.2 + 0.1 * s - 0.05 + 0.01 * (s - 2)) for s in (1, 2, 3)]
    s = summarize(runs, noise=0.01)
    versus = s["comparisons"]["stack_paper vs small"]
    half = 4.302653 * 0.01 / 3 ** 0.5  # t(0.975, 2 df) * sd / sqrt(3)
    assert versus["mean"] == pytest.approx(-0.05) and versus["interval"] == pytest.approx([-0.05 - half, -0.05 + half])
    assert versus["verdict"] == "lower" and s["comparisons"]["small vs scratch"]["verdict"] == "lower"
    label = RECIPES["stack_paper"].label
    assert s["verdict"][1].startswith(f"{label} vs small alone: -0.0500 (a - b, 3 seeds paired, 95% t interval")
    assert not any("cannot be told apart" in line for line in s["verdict"])
    runs[-1]["val_loss"] += 0.2  # seed 3 of G_stack now above the small model: the interval holds zero
    s = summarize(runs, noise=0.01)
    assert s["comparisons"]["stack_paper vs small"]["verdict"] == "a tie (the interval includes zero)"
    assert s["verdict"][-1].startswith(f"{label} cannot be told apart from (or loses to) the small model alone")


def test_largest_hidden_follows_the_tokens_per_parameter_rule():
    seq = 128
    # at the CPU budget the 8 x 32 target is the widest at >= 20 tokens per parameter
    assert largest_hidden(CPU_SIZING.flops, seq, 10**9, TOKENS_PER_PARAM) == 32
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
    # 8 minutes at 1 PFLOP/s: two seeds of a >= 20M target at >= 10 tokens/param fit (not at 20)
    sizing, seeds, why = growth_study.plan_gpu(1e15, 480, preset, 10**9)
    assert seeds == 2 and sizing.target.num_params() >= 20e6 and sizing.tokens_per_param() >= 10
    assert why == "2 seed(s) fit at >= 10 tokens/param"
    # at 4 PFLOP/s the rule itself: >= 20 tokens/param
    assert growth_study.plan_gpu(4e15, 480, preset, 10**10)[0].tokens_per_param() >= TOKENS_PER_PARAM
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
