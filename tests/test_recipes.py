"""The comparison protocol (stackfast/recipes.py): every recipe spends the budget it is
given, the LR search steps out until its best is interior, verdicts need a paired t interval
that excludes zero and a gap beyond the noise floor, runs in worker processes are
bit-reproducible, and the workers end with their parent."""
import dataclasses
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import stackfast.recipes as recipes  # noqa: E402
from stackfast.config import load_config  # noqa: E402
from stackfast.demo import CPU_SIZING, target_model  # noqa: E402
from stackfast.growth.stages import growth_steps, stage_models  # noqa: E402
from stackfast.recipes import (LR_LADDER, RECIPES, Trial, load_records, machine, paired, recipe_config,  # noqa: E402
                               run_many, speedup, stats, t_interval, t_quantile)


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_spends_the_budget(name):
    recipe = RECIPES[name]
    cfg = load_config(None, recipe_config(CPU_SIZING, recipe, 5e-3, "wsd", 3))
    assert (cfg.optim.lr, cfg.schedule.kind, cfg.train.seed) == (5e-3, "wsd", 3)
    total = cfg.total_steps()
    bounds = [0, *growth_steps(cfg, total), total]
    models = stage_models(cfg)
    tokens = CPU_SIZING.tokens_per_step
    spent = sum((b - a) * m.flops_per_token(128) * tokens for a, b, m in zip(bounds, bounds[1:], models))
    if recipe.grows and cfg.growth.operator in ("depth_learn", "width_learn"):  # LiGO's learning steps
        spent += cfg.growth.learn_steps * 16 * 128 * cfg.model.flops_per_token(128)
    assert spent == pytest.approx(CPU_SIZING.flops, rel=0.01)
    target = CPU_SIZING.target
    if name == "small":
        assert (cfg.model.n_layers, cfg.model.hidden_size) == (2, 32)
    else:
        assert (cfg.model.n_layers, cfg.model.hidden_size) == (target.n_layers, target.hidden_size)
    if name in ("stack_paper", "stack_restart"):  # 20% of the FLOPs on the 2-layer model, then x4
        assert [m.n_layers for m in models] == [2, 8]
        assert cfg.growth.schedule == {"stack_paper": "paper", "stack_restart": "restart"}[name]
        assert bounds[1] * models[0].flops_per_token(128) * tokens == pytest.approx(0.2 * CPU_SIZING.flops, rel=0.01)
    if name in ("doublings", "middle_repeat"):  # 2 -> 4 -> 8 layers, Prop-1 lengths 1 : 2 : 3, one schedule
        assert [m.n_layers for m in models] == [2, 4, 8] and cfg.growth.schedule == "continue"
        assert bounds[1:3] == [round(total / 6), round(total / 2)]
    if name == "middle_repeat":
        assert cfg.growth.stages[1].layers == "middle" and cfg.growth.stages[1].block == 2
    if name == "midas":  # MIDAS: one middle block of 2 added per stage, 2-4-6-8, Prop-1 lengths 1 : 2 : 3 : 4
        assert [m.n_layers for m in models] == [2, 4, 6, 8] and cfg.growth.schedule == "continue"
        assert [(s.layers, s.block, s.factor) for s in cfg.growth.stages] == [("midas", 2, 0)] * 3
        assert bounds[1:4] == [round(total / 10), round(total * 3 / 10), round(total * 6 / 10)]
    data = {"scratch_random": ("random", False, False), "scratch_epoch": ("epoch", False, False),
            "scratch_docmask": ("epoch", True, False), "scratch_rope_reset": ("epoch", True, True)}
    assert (cfg.data.sampling, cfg.data.document_mask, cfg.model.rope_reset) == data.get(name, ("auto", False, False))


def test_the_search_steps_out_until_each_best_lr_is_interior(monkeypatch, tmp_path):
    # fake runs: cosine is best at 2e-2 (beyond START), WSD at 3e-3 (below it)
    best_at = {"cosine": 2e-2, "wsd": 3e-3}
    ran = []

    def fake_run_many(trials, sizing, runs_dir, device="cpu", workers=2, done=None):
        done = {} if done is None else done
        for t in trials:
            if t not in done:
                ran.append(t)
                distance = abs(LR_LADDER.index(t.lr) - LR_LADDER.index(best_at[t.kind]))
                done[t] = {"val_loss": 1.0 + 0.1 * distance}
        return done
    monkeypatch.setattr(recipes, "run_many", fake_run_many)
    best, done = recipes.tune(["scratch"], CPU_SIZING, tmp_path)
    assert {k: t.lr for k, t in best["scratch"].items()} == best_at
    tried = {k: sorted(t.lr for t in ran if t.kind == k) for k in best_at}
    assert tried == {"cosine": [5e-3, 8e-3, 1.2e-2, 2e-2, 3e-2], "wsd": [2e-3, 3e-3, 5e-3, 8e-3, 1.2e-2]}
    assert len(ran) == len(set(ran)) and all(t.seed == 1 for t in ran)  # each run once, the search seed
    table = recipes.search_table(best, done)["scratch"]
    assert table["cosine"]["best_lr"] == 2e-2 and table["cosine"]["interior"] and table["wsd"]["interior"]
    chosen = recipes.chosen_settings(best, done)["scratch"]
    assert chosen.lr in (2e-2, 3e-3)
    finals = recipes.final_trials({"scratch": chosen}, 5.0)["scratch"]
    assert [t.seed for t in finals] == [8, 9, 10, 11, 12] and all(t.flops == 5.0 and t.lr == chosen.lr for t in finals)
    # the paper's schedule runs cosine (its code's): its arm and the operators' search no WSD
    ran.clear()
    best, _ = recipes.tune(["stack_paper", "depth_zero"], CPU_SIZING, tmp_path)
    assert {r: list(kinds) for r, kinds in best.items()} == {"stack_paper": ["cosine"], "depth_zero": ["cosine"]}
    assert {t.kind for t in ran} == {"cosine"}


@pytest.mark.parametrize("df,expected", [(1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157),
                                         (30, 2.042272)])
def test_t_quantiles_match_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-6)


def test_a_win_needs_a_paired_interval_beyond_zero_and_the_noise_floor():
    # differences a - b by seed: -0.10, -0.08, -0.12, -0.09, -0.11: mean -0.10, sd 0.015811
    a = {8: 1.40, 9: 1.42, 10: 1.38, 11: 1.41, 12: 1.39}
    b = {s: v + d for (s, v), d in zip(a.items(), (0.10, 0.08, 0.12, 0.09, 0.11))}
    b[99] = 1.0  # a seed only one arm has is not paired
    result = paired(a, b, noise=0.01)
    half = 2.776445 * 0.0158114 / 5 ** 0.5  # t(0.975, 4 df) * sd / sqrt(n)
    assert result["seeds"] == [8, 9, 10, 11, 12] and result["mean"] == pytest.approx(-0.10)
    assert result["interval"] == pytest.approx([-0.10 - half, -0.10 + half], abs=1e-6)
    assert result["verdict"] == "lower" and paired(b, a, noise=0.01)["verdict"] == "higher"
    assert paired(a, b, noise=0.2)["verdict"].startswith("a tie (the interval excludes zero, but the gap")
    # the same means with the pairing broken up: the seeds disagree and the interval holds zero
    mixed = {8: 1.50, 9: 1.30, 10: 1.60, 11: 1.25, 12: 1.44}
    assert paired(a, mixed, noise=0.0)["verdict"] == "a tie (the interval includes zero)"
    assert paired({1: 1.0}, {1: 2.0}, noise=0.0)["verdict"].startswith("undecided")
    assert stats([1.40, 1.42])["std"] == pytest.approx(0.014142, rel=1e-3)
    mean, sd, interval = t_interval([0.3, 0.4, 0.5])  # a one-sample interval: the speedups' over seeds
    assert (mean, sd) == pytest.approx((0.4, 0.1)) and interval == pytest.approx((0.4 - 0.248414, 0.4 + 0.248414), abs=1e-6)


def test_results_say_which_cpu_they_are_reproducible_on():
    m = machine()
    assert m["cpu"] and isinstance(m["instruction_sets"], list) and "bit_reproducible" in m
    if os.path.exists("/proc/cpuinfo"):
        flags = open("/proc/cpuinfo").read()
        assert ("avx2" in m["instruction_sets"]) == (" avx2" in flags)


WORKERS_SCRIPT = """
import sys
from pathlib import Path
from stackfast.demo import Sizing, target_model
from stackfast.recipes import Trial, run_many
sizing = Sizing(target=target_model(16), flops=1e15, seq_len=32, batch=4)  # runs far longer than the test
run_many([Trial("scratch", "cosine", 1e-3, seed, 1e15) for seed in (1, 2)], sizing, Path(sys.argv[1]), "cpu", 2)
"""


def children(pid: int) -> list[int]:
    found = []
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(stat))
    return found


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_workers_end_with_their_parent(tmp_path, sig):
    """`timeout` (SIGTERM) or kill -9 of a study's process: its worker processes end too."""
    import signal
    import subprocess
    import sys
    import time
    parent = subprocess.Popen([sys.executable, "-c", WORKERS_SCRIPT, str(tmp_path)],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    workers = []
    try:
        deadline = time.monotonic() + 120
        while len([d for d in tmp_path.iterdir() if d.is_dir()]) < 2:  # both runs have started training
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        workers = children(parent.pid)
        assert len(workers) >= 2
        parent.send_signal(getattr(signal, sig))
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if alive(w)]
    finally:  # whatever happened, nothing of the test is left running
        for pid in [parent.pid, *children(parent.pid), *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_speedup_from_complete_runs_at_half_and_full_budget():
    half, full = {"val_loss": 5.0, "run_flops": 50.0}, {"val_loss": 4.0, "run_flops": 100.0}
    # 4.5 is halfway in log FLOPs: the recipe reaches it with sqrt(50 * 100) FLOPs
    assert speedup(4.5, half, full, 100.0) == pytest.approx(100 / (50 * 100) ** 0.5 - 1)
    assert speedup(3.9, half, full, 100.0) is None  # not reached at all
    assert speedup(5.5, half, full, 100.0) == 1.0  # reached at half the budget: >= +100%


def test_runs_in_worker_processes_are_recorded_and_reproducible(tmp_path):
    sizing = dataclasses.replace(CPU_SIZING, target=target_model(16), flops=4e9, seq_len=32, batch=4)
    trials = [Trial("scratch", "wsd", 5e-3, 1, sizing.flops), Trial("stack_paper", "cosine", 5e-3, 1, sizing.flops)]
    done = run_many(trials, sizing, tmp_path / "a", workers=2)
    assert set(done) == set(trials) and load_records(tmp_path / "a") == done
    assert done[trials[1]]["growth_steps"] and done[trials[0]]["growth_steps"] == []
    for t in trials:
        assert done[t]["run_flops"] == pytest.approx(sizing.flops, rel=0.1) and done[t]["threads"] == 1
    again = run_many(trials[:1], sizing, tmp_path / "b", workers=1)
    assert again[trials[0]]["val_loss"] == done[trials[0]]["val_loss"]  # bit for bit, in another process
    assert run_many(trials, sizing, tmp_path / "a", workers=2, done=done) is done  # nothing left to run
