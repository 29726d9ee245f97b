"""The comparison protocol (stackfast/recipes.py): every recipe spends the budget it is
given, the LR search steps out until its best is interior, verdicts need the seed spread
and the noise floor, and runs in worker processes are bit-reproducible."""
import dataclasses
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import stackfast.recipes as recipes  # noqa: E402
from stackfast.config import load_config  # noqa: E402
from stackfast.demo import CPU_SIZING, target_model  # noqa: E402
from stackfast.growth.stages import growth_steps, stage_models  # noqa: E402
from stackfast.recipes import (LR_LADDER, RECIPES, Trial, load_records, recipe_config, run_many, speedup,  # noqa: E402
                               stats, verdict)


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
    if name == "stack_paper":  # 20% of the FLOPs on the 2-layer model, then x4, the schedule restarted
        assert [m.n_layers for m in models] == [2, 8] and cfg.growth.schedule == "restart"
        assert bounds[1] * models[0].flops_per_token(128) * tokens == pytest.approx(0.2 * CPU_SIZING.flops, rel=0.01)
    if name in ("doublings", "midas"):  # 2 -> 4 -> 8 layers, Prop-1 lengths 1 : 2 : 3, one schedule
        assert [m.n_layers for m in models] == [2, 4, 8] and cfg.growth.schedule == "continue"
        assert bounds[1:3] == [round(total / 6), round(total / 2)]
    if name == "midas":
        assert cfg.growth.stages[1].layers == "middle" and cfg.growth.stages[1].block == 2


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
    assert [t.seed for t in finals] == [2, 3, 4] and all(t.flops == 5.0 and t.lr == chosen.lr for t in finals)


def test_a_win_needs_every_seed_and_the_noise_floor():
    a, b = stats([1.40, 1.42]), stats([1.50, 1.55])
    assert a["std"] == pytest.approx(0.014142, rel=1e-3) and a["mean"] == pytest.approx(1.41)
    assert verdict(a, b, 0.01) == "lower (every seed, beyond the noise floor)"
    assert verdict(b, a, 0.01) == "higher (every seed, beyond the noise floor)"
    assert verdict(a, b, 0.2).startswith("a tie")  # beyond the seeds, not beyond the noise floor
    assert verdict(a, stats([1.41, 1.39]), 0.0).startswith("a tie")  # the seeds overlap
    assert verdict(a, stats([1.30]), 0.0) == "higher (one seed: no spread measured)"


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
