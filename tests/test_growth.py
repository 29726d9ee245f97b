"""Depth growth (G_stack, depth_zero, depth_random), the guidelines, and growth inside a run."""
import math

import pytest
import torch

from stackfast.config import ModelConfig, load_config
from stackfast.growth import OPERATORS, GrowthError, apply_growth, grow, growth_timing, plan
from stackfast.growth.depth import layer_map
from stackfast.metrics import read_metrics
from stackfast.model import Transformer
from stackfast.optim import scheduled_lr
from stackfast.train import run


def small(n_layers=2, **kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", kernels="torch", n_layers=n_layers, **kw))


def test_stack_copies_layers_by_map_and_keeps_embeddings_norm_head():
    model = small(3)
    grown = grow(model, "stack", 4)
    assert grown.config.n_layers == 12
    src = model.state_dict()
    for i, block in enumerate(grown.layers):
        for name, p in block.state_dict().items():
            assert torch.equal(p, src[f"layers.{i % 3}.{name}"]), (i, name)
    for name in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
        assert torch.equal(grown.state_dict()[name], src[name])


@pytest.mark.parametrize("layers,order,expected", [
    ("all", "stack", [0, 1, 2, 3, 4, 5] * 4),
    ("all", "interpolate", [i for i in range(6) for _ in range(4)]),
    ("front", "stack", [0, 1, 2] * 7 + [3, 4, 5]),
    ("middle", "stack", [0] + [1, 2, 3] * 7 + [4, 5]),
    ("back", "stack", [0, 1, 2] + [3, 4, 5] * 7),
    ([5, 0, 0, 1, 2, 3, 4, 5], "stack", [5, 0, 0, 1, 2, 3, 4, 5]),
])
def test_layer_maps_of_the_paper_ablations(layers, order, expected):
    assert layer_map(6, 4, layers, order) == expected


def test_bad_growth_input():
    model = small(2)
    with pytest.raises(GrowthError, match="integer >= 2"):
        grow(model, "stack", 1)
    with pytest.raises(GrowthError, match="integer >= 2"):
        grow(model, "stack", 2.5)
    with pytest.raises(GrowthError, match="layer map index 7 out of range for a 2-layer model"):
        grow(model, "stack", 2, layers=[0, 7])
    with pytest.raises(GrowthError, match="unknown growth operator 'stak'"):
        grow(model, "stak", 4)
    with pytest.raises(GrowthError, match="noise"):
        grow(model, "stack", 4, noise=1.5)
    with pytest.raises(GrowthError, match="cannot fill"):
        layer_map(5, 2, "front")


def test_noise_follows_the_paper_recipe():
    model = small(2, hidden_size=256, n_heads=4, n_kv_heads=2, ffn_size=512)
    alpha = 0.2
    plain, noisy = grow(model, "stack", 4), grow(model, "stack", 4, noise=alpha, seed=1)
    d, L = 256, 8
    for name in ("layers.5.self_attn.q_proj.weight", "layers.5.mlp.down_proj.weight"):
        eps = (noisy.state_dict()[name] - (1 - alpha) * plain.state_dict()[name]) / alpha
        std = math.sqrt(1 / (d * L * L)) if "down_proj" in name else math.sqrt(2 / (5 * d))
        assert eps.std().item() == pytest.approx(std, rel=0.05) and abs(eps.mean().item()) < std / 20
    assert torch.equal(noisy.layers[5].input_layernorm.weight, plain.layers[5].input_layernorm.weight)
    assert torch.equal(grow(model, "stack", 4, noise=alpha, seed=1).layers[0].mlp.up_proj.weight,
                       noisy.layers[0].mlp.up_proj.weight)  # seeded


def test_depth_zero_preserves_the_function():
    model = small(2).eval()
    growth = apply_growth(model, "depth_zero", 4)
    assert growth.spec["layer_map"] == [0, 0, 0, 0, 1, 1, 1, 1]
    x = torch.randint(0, 4096, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(growth.model.eval()(x), model(x), rtol=0, atol=0)
    assert growth.model.layers[1].mlp.down_proj.weight.abs().sum() == 0
    assert growth.model.layers[0].mlp.down_proj.weight.abs().sum() > 0


def test_depth_random_fades_new_blocks_in():
    model = small(2).eval()
    growth = apply_growth(model, "depth_random", 3, ramp_steps=10, seed=3)
    grown = growth.model.eval()
    assert growth.spec["layer_map"] == [0, -1, -1, 1, -1, -1]
    assert not torch.equal(grown.layers[1].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight)
    x = torch.randint(0, 4096, (1, 15))
    with torch.no_grad():
        torch.testing.assert_close(grown(x), model(x), rtol=0, atol=0)  # c = 0: new blocks silent
        growth.ramp.set_step(5)
        half = grown(x)
        assert growth.ramp.value == 0.5 and not torch.allclose(half, model(x))
        growth.ramp.set_step(10)
        assert not growth.ramp.active  # hooks gone: a plain model again
        assert not torch.allclose(grown(x), half)


def test_growth_timing_worked_values():
    # log10 d = 0.88 * 9 + 163.27 / 21 - 5.74 = 9.954762 -> d = 9.0109e9 tokens
    assert growth_timing(1e9, 1e21) == pytest.approx(9.0109e9, rel=1e-4)
    # 7B, 300B tokens: C = 1.26e22, log10 d = 0.88*9.845098 + 163.27/22.100371 - 5.74 = 10.3114
    assert growth_timing(7e9, 6 * 7e9 * 300e9) == pytest.approx(2.048e10, rel=1e-3)
    with pytest.raises(GrowthError):
        growth_timing(0, 1e20)


def test_plan_for_7b():
    p = plan(7e9, tokens=300e9)
    assert p["preset"] == "7b" and p["factor"] == 4 and p["small"]["n_layers"] == 8
    assert p["growth_tokens"] == pytest.approx(growth_timing(7e9, 6 * 7e9 * 300e9))
    small_params = ModelConfig.from_preset("7b-small").num_params()
    assert p["small_flops"] == pytest.approx(6 * small_params * p["growth_tokens"])
    assert 0 < p["small_flop_share"] < 0.05
    assert plan(7e9, flops=6 * 7e9 * 300e9)["tokens"] == pytest.approx(300e9)
    with pytest.raises(GrowthError, match="beyond the whole budget"):
        plan(7e9, tokens=1e9)


def test_small_model_shapes():
    target = ModelConfig.from_preset("toy")
    assert OPERATORS["stack"].small_model(target, 4).n_layers == 2
    wide = OPERATORS["width_direct"].small_model(target, 4)
    assert (wide.hidden_size, wide.ffn_size, wide.n_heads, wide.head_dim) == (128, 344, 2, 64)
    with pytest.raises(GrowthError, match="not divisible by 3"):
        OPERATORS["stack"].small_model(target, 3)


JOB = ['model.preset="tiny"', "model.n_layers=4", "model.kernels=torch", "data.seq_len=32",
       "train.global_batch_size=4", "schedule.warmup_steps=2", "train.eval_batches=1", "logging.log_every=2",
       "logging.progress=false", "logging.tensorboard=false", "growth.operator=stack", "growth.factor=2",
       "growth.at_tokens=512", "train.max_steps=8"]


def job(run_dir, *extra):
    return load_config(None, JOB + [f'logging.run_dir="{run_dir}"', *extra])


@pytest.mark.parametrize("operator,options", [("stack", {}), ("stack", {"order": "interpolate"}),
                                              ("stack", {"layers": "middle"}), ("depth_zero", {}),
                                              ("depth_random", {"seed": 3})])
def test_in_place_growth_equals_copying_and_allocates_only_the_copies(operator, options):
    model = small(3)
    copied = apply_growth(model, operator, 4, **options)
    adopted = apply_growth(model, operator, 4, in_place=True, **options)
    assert adopted.spec == copied.spec
    for (name, a), (_, b) in zip(adopted.model.state_dict().items(), copied.model.state_dict().items()):
        assert torch.equal(a, b), name
    grown, mapping = adopted.model, adopted.spec["layer_map"]
    small_params = {id(p) for p in model.parameters()}
    firsts = [mapping.index(j) for j in range(3)]  # each small layer's first place in the map
    for i, block in enumerate(grown.layers):
        assert (block is model.layers[mapping[i]]) == (i in firsts)
    assert grown.lm_head is model.lm_head and grown.embed_tokens is model.embed_tokens
    new = sum(p.numel() for p in grown.parameters() if id(p) not in small_params)
    assert new == grown.num_params() - model.num_params()
    x = torch.randint(0, 4096, (1, 9))
    with torch.no_grad():  # the adopted model computes what the copied one does
        torch.testing.assert_close(adopted.model(x), copied.model(x), rtol=0, atol=0)


def test_in_place_moments_keep_the_adopted_state_and_copy_the_rest():
    from stackfast.growth.depth import copy_optimizer_state
    model = small(2)
    moments = {n: {"step": torch.tensor(7.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
               for n, p in model.named_parameters()}
    growth = apply_growth(model, "stack", 2, in_place=True)
    state = copy_optimizer_state(moments, growth.model, growth.spec["layer_map"], model)
    grown = growth.model
    assert state[grown.layers[1].mlp.up_proj.weight] is moments["layers.1.mlp.up_proj.weight"]  # adopted
    copy = state[grown.layers[3].mlp.up_proj.weight]
    source = moments["layers.1.mlp.up_proj.weight"]
    assert copy["exp_avg"] is not source["exp_avg"] and torch.equal(copy["exp_avg"], source["exp_avg"])
    assert torch.equal(copy["exp_avg_sq"], source["exp_avg_sq"]) and copy["step"] == 7.0
    assert len(state) == len(list(grown.parameters()))


def test_in_place_growth_refuses_a_sharded_model():
    with pytest.raises(GrowthError, match="in_place growth adopts"):
        apply_growth(small(2), "stack", 2, in_place=True, shard=lambda m: m)


def test_job_grows_mid_run_and_counts_small_model_flops(tmp_path):
    cfg = job(tmp_path)
    summary = run(cfg)
    rows = read_metrics(tmp_path)
    event = next(r for r in rows if r.get("event") == "growth")
    assert event["step"] == 4 and event["spec"]["layer_map"] == [0, 1, 0, 1]
    assert event["params_after"] > event["params_before"] and event["growth_s"] >= 0
    small_fpt = OPERATORS["stack"].small_model(cfg.model, 2).flops_per_token(32)
    tokens = 4 * 32
    flops = {r["step"]: r["flops"] for r in rows if "loss" in r}
    assert flops[4] == pytest.approx(4 * tokens * small_fpt)
    assert flops[8] == pytest.approx(4 * tokens * small_fpt + 4 * tokens * cfg.model.flops_per_token(32))
    assert summary["params"] == cfg.model.num_params() and summary["growth_step"] == 4


def test_ligo_training_counts_in_the_runs_flops(tmp_path):
    cfg = job(tmp_path, 'growth.operator="depth_learn"', "growth.learn_steps=3")
    run(cfg)
    rows = read_metrics(tmp_path)
    event = next(r for r in rows if r.get("event") == "growth")
    tokens = 4 * 32  # micro-batch 4 x seq 32: one LiGO step and one optimizer step alike
    assert event["growth_flops"] == pytest.approx(3 * tokens * cfg.model.flops_per_token(32))
    small_fpt = OPERATORS["depth_learn"].small_model(cfg.model, 2).flops_per_token(32)
    flops = {r["step"]: r["flops"] for r in rows if "loss" in r}
    assert flops[8] == pytest.approx(4 * tokens * small_fpt + event["growth_flops"]
                                     + 4 * tokens * cfg.model.flops_per_token(32))


@pytest.mark.parametrize("resume_step", [2, 4, 6])
def test_resume_before_at_or_after_growth_reproduces_the_run(tmp_path, resume_step):
    full = tmp_path / "full"
    run(job(full, "checkpoint.every_steps=2", "checkpoint.keep_last=10", "growth.operator=depth_random",
            "growth.ramp_steps=3"))
    part = tmp_path / "part"
    ckpt = full / "checkpoints" / f"step_{resume_step:08d}"
    run(job(part, f'checkpoint.resume="{ckpt}"', "growth.operator=depth_random", "growth.ramp_steps=3"))
    a = {r["step"]: r["loss"] for r in read_metrics(full) if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(part) if "loss" in r}
    assert sorted(b) == list(range(resume_step + 1, 9))
    assert all(a[s] == b[s] for s in b), (a, b)


def test_replicate_optimizer_copies_adam_moments(tmp_path, monkeypatch):
    import stackfast.train as train
    captured = {}
    real = train.grow_stage

    def states(opt, model):
        return {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}

    def spy(cfg, stage, target, model, optimizer, **kwargs):
        old = states(optimizer, model)  # before growth: in-place growth adopts the small model's modules
        event = real(cfg, stage, target, model, optimizer, **kwargs)
        captured.update(old=old, new=states(event.optimizer, event.model))
        return event
    monkeypatch.setattr(train, "grow_stage", spy)
    run(job(tmp_path, 'growth.optimizer="replicate"'))
    old, new = captured["old"], captured["new"]
    for grown_name, source in (("layers.3.mlp.up_proj.weight", "layers.1.mlp.up_proj.weight"),
                               ("layers.2.input_layernorm.weight", "layers.0.input_layernorm.weight"),
                               ("lm_head.weight", "lm_head.weight")):
        assert set(new[grown_name]) == {"step", "exp_avg", "exp_avg_sq"}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(new[grown_name][key], old[source][key]), (grown_name, key)


def test_schedule_restart_and_continue():
    cfg = job("unused", "optim.lr=1.0", "growth.small_lr=2.0")
    assert scheduled_lr(cfg, 0, 8, [4]) == pytest.approx(1.0)  # small model: its own warmup, peak 2.0
    assert scheduled_lr(cfg, 1, 8, [4]) == pytest.approx(2.0)
    assert scheduled_lr(cfg, 4, 8, [4]) == pytest.approx(0.5)  # grown: warmup restarts at peak 1.0
    cont = job("unused", "optim.lr=1.0", 'growth.schedule="continue"')
    assert scheduled_lr(cont, 4, 8, [4]) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 6)))


def test_auto_timing_beyond_the_budget_is_a_clear_error(tmp_path):
    from stackfast.config import ConfigError
    with pytest.raises(ConfigError, match="paper's formula is fitted"):
        run(job(tmp_path, 'growth.at_tokens="auto"'))


def test_flops_to_reach_interpolates_a_curve():
    # (the speedup from complete runs: tests/test_recipes.py)
    from stackfast.plot import flops_to_reach
    curve = [(0, 10.0, 6.0), (0, 20.0, 5.0), (0, 30.0, 4.0)]
    assert flops_to_reach(curve, 4.5) == pytest.approx(25.0) and flops_to_reach(curve, 3.0) is None


@pytest.mark.parametrize("operator, options, message", [
    ("depth_zero", {"noise": 0.2}, "depth_zero takes no option 'noise'; its options: order='interpolate'"),
    ("stack", {"bogus": 1}, "stack takes no option 'bogus'; its options: layers='all', order='stack'"),
    ("stack", {"layers": 2}, "stack option layers: expected str | list[int], got int 2"),
    ("width_direct", {"noise": float("nan")}, "width_direct option noise: expected a finite number, got float nan"),
    ("width_zero", {"seed": True}, "width_zero option seed: expected int, got bool True"),
    ("depth_random", {"ramp_steps": 0}, "ramp_steps must be >= 1, got 0"),
    ("width_random", {"ramp_steps": -1}, "ramp_steps must be >= 1, got -1"),
])
def test_operator_options_are_checked_against_the_operator(operator, options, message):
    with pytest.raises(GrowthError) as e:
        apply_growth(small(2), operator, 4, **options)
    assert message in str(e.value)
