"""Learning-rate schedules (cosine, WSD) and multi-stage growth: validation, stage
boundaries, exact resume between stages, FLOPs accounting, the CLI's one-line errors."""
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stackfast.cli import main as cli_main  # noqa: E402
from stackfast.config import ConfigError, load_config  # noqa: E402
from stackfast.growth.depth import layer_map  # noqa: E402
from stackfast.growth.stages import growth_steps, stage_models, stages_of  # noqa: E402
from stackfast.metrics import read_metrics  # noqa: E402
from stackfast.optim import lr_at, scheduled_lr, warmup_note  # noqa: E402
from stackfast.train import run  # noqa: E402

# tiny target of 4 layers: 1 -> 2 -> 4 layers in two doublings; 4 x 32 = 128 tokens a step
JOB = ['model.preset="tiny"', "model.n_layers=4", "model.kernels=torch", "data.seq_len=32",
       "train.global_batch_size=4", "schedule.warmup_steps=1", "train.eval_batches=1", "train.eval_every=0",
       "logging.log_every=1", "logging.progress=false", "logging.tensorboard=false", "train.max_steps=8",
       'growth.operator="stack"', "growth.factor=2", "growth.stages=[{at = 256}, {at = 0.625}]"]


def job(run_dir, *extra):
    return load_config(None, JOB + [f'logging.run_dir="{run_dir}"', *extra])


def test_wsd_is_flat_then_decays_over_the_last_share():
    # 100 steps, warmup 10, decay over the last 20 (steps 80..99) to 0.1 of the peak
    wsd = dict(peak=2.0, warmup=10, min_ratio=0.1, kind="wsd", decay_share=0.2)
    assert lr_at(4, 100, **wsd) == pytest.approx(1.0)  # warmup as for cosine
    assert [lr_at(s, 100, **wsd) for s in (10, 50, 79)] == [2.0, 2.0, 2.0]
    assert lr_at(80, 100, **wsd) == pytest.approx(2.0 * (0.1 + 0.9 * 19 / 20))  # the decay's first step: below
    assert lr_at(89, 100, **wsd) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # halfway down, linear
    assert lr_at(89, 100, **wsd, decay_shape="1-sqrt") == pytest.approx(2.0 * (0.1 + 0.9 * (1 - math.sqrt(0.5))))
    assert lr_at(99, 100, **wsd) == pytest.approx(0.2)  # the last step at the floor
    # a decay longer than what follows the warmup starts right after it
    assert lr_at(10, 20, 1.0, 10, 0.0, "wsd", 0.9) == pytest.approx(0.9)
    assert lr_at(19, 20, 1.0, 10, 0.0, "wsd", 0.9) == pytest.approx(0.0)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_a_wsd_decay_of_k_steps_takes_k_values_below_the_peak_ending_at_the_floor(k, shape):
    total = 20  # decay_share k / 20: the last k steps decay
    lrs = [lr_at(s, total, 1e-3, 2, 0.1, "wsd", k / total, shape) for s in range(total)]
    assert lrs[2:total - k] == [1e-3] * (total - k - 2)
    decay = lrs[total - k:]
    assert all(a > b for a, b in zip([1e-3] + decay, decay))  # k values, each below the one before
    assert decay[-1] == pytest.approx(1e-4, rel=1e-12)
    if k == 4 and shape == "linear":
        assert decay == pytest.approx([1e-4 + 9e-4 * f for f in (0.75, 0.5, 0.25, 0.0)], rel=1e-12)


def prts_lr(it, learning_rate=1e-3, min_lr=1e-4, warmup_iters=3000, lr_decay_iters=300_000):
    """get_lr of the paper's code (tongxuluo/prts, pretrain/run_pretrain.py) as base_model.sh runs it."""
    if it < warmup_iters:
        return learning_rate * it / warmup_iters
    if it > lr_decay_iters:
        return min_lr
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - warmup_iters) / (lr_decay_iters - warmup_iters)))
    return min_lr + coeff * (learning_rate - min_lr)


def test_paper_schedule_grows_the_small_model_near_its_peak(tmp_path):
    """The paper's proportions: the small model on a 300,000-step cosine (warmup 3,000, 1e-3 ->
    1e-4) stacked at step 5,000; the grown model a fresh warmup and cosine (3e-4 -> 3e-5)."""
    cfg = job(tmp_path, "train.max_steps=20000", 'growth.stages=[{at = 0.25}]', "growth.small_lr=1e-3",
              "optim.lr=3e-4", "schedule.warmup_steps=300", "schedule.min_lr_ratio=0.1")
    assert cfg.growth.schedule == "paper"  # the default
    steps = growth_steps(cfg, 20000)
    assert steps == [5000]
    lrs = {s: scheduled_lr(cfg, s, 20000, steps) for s in (0, 2999, 3000, 4000, 4999, 5000, 5299, 5300, 19999)}
    for s in (3000, 4000, 4999):  # past the warmup: the paper's cosine, step for step
        assert lrs[s] == pytest.approx(prts_lr(s), rel=1e-12)
    assert lrs[2999] == pytest.approx(1e-3)  # warmup over 0.6 of the stage ends at the peak
    assert lrs[4999] / 1e-3 == pytest.approx(0.99990, abs=1e-5)  # grown near the peak, not at the floor
    assert lrs[5000] == pytest.approx(3e-4 / 300)  # the grown model: a fresh warmup ...
    assert lrs[5299] == pytest.approx(3e-4)
    assert lrs[19999] == pytest.approx(lr_at(14999, 15000, 3e-4, 300, 0.1))  # ... and its own cosine to the end
    assert lrs[19999] < 3.01e-5
    cfg.growth.schedule = "restart"  # the small model on its own full cosine: at the floor when it grows
    assert scheduled_lr(cfg, 4999, 20000, steps) == pytest.approx(lr_at(4999, 5000, 1e-3, 300, 0.1))
    assert scheduled_lr(cfg, 4999, 20000, steps) < 1.01e-4


def test_the_grown_model_continues_the_data_stream(tmp_path, monkeypatch):
    """The first batch the grown model trains on is the one after the small model's last: the
    growing run reads exactly the batches of a run that never grows (same seed)."""
    from stackfast import train as train_module
    real, seen = train_module.train_step, []

    def recording(model, optimizer, micro_batches, *args, **kwargs):
        seen.append((model.config.n_layers, micro_batches[0][0].clone()))
        return real(model, optimizer, micro_batches, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", recording)
    run(job(tmp_path / "grows", "growth.stages=[{at = 0.5}]"))
    grows, seen[:] = list(seen), []
    run(job(tmp_path / "scratch", 'growth.operator="none"', "growth.stages=[]"))
    assert [n for n, _ in grows] == [2] * 4 + [4] * 4  # grown after step 4 of 8
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(grows, seen)) and len(seen) == 8


def test_schedule_over_two_stages_restarts_or_continues(tmp_path):
    cfg = job(tmp_path, "optim.lr=1.0", "growth.small_lr=3.0", 'schedule.kind="wsd"', "schedule.decay_share=0.5",
              "schedule.min_lr_ratio=0.0", 'growth.schedule="restart"')
    # stages grow after steps 2 and 5 of 8: three schedules of 2, 3 and 3 steps
    lrs = [scheduled_lr(cfg, s, 8, [2, 5]) for s in range(8)]
    assert lrs == pytest.approx([3.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.0])
    cfg.growth.schedule = "continue"  # one WSD over 8 steps; the first model at its own peak
    lrs = [scheduled_lr(cfg, s, 8, [2, 5]) for s in range(8)]
    assert lrs == pytest.approx([3.0, 3.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_a_warmup_longer_than_its_stage_is_clamped_and_said(tmp_path):
    cfg = job(tmp_path, "schedule.warmup_steps=4", 'growth.schedule="restart"', "optim.lr=1.0", "growth.small_lr=1.0")
    assert growth_steps(cfg, 8) == [2, 5]
    assert "warmup_steps = 4 is longer than stage 1 (steps 1-2), 2 steps; stage 2 (steps 3-5), 3 steps; stage 3 " \
           "(steps 6-8), 3 steps: the warmup is clamped" in warmup_note(cfg, 8, [2, 5])
    lrs = [scheduled_lr(cfg, s, 8, [2, 5]) for s in range(8)]
    assert lrs == pytest.approx([0.5, 1.0, 1 / 3, 2 / 3, 1.0, 1 / 3, 2 / 3, 1.0])  # every stage reaches its peak
    paper = job(tmp_path, "schedule.warmup_steps=3", 'growth.schedule="paper"')
    assert not warmup_note(paper, 8, growth_steps(paper, 8))  # the paper's small model warms up over its own share
    alone = job(tmp_path, 'growth.operator="none"', "growth.stages=[]", "schedule.warmup_steps=9")
    assert "longer than the run, 8 steps" in warmup_note(alone, 8, growth_steps(alone, 8))


def test_the_warmup_note_is_said_once_and_a_bad_stage_refused_before_anything_is_written(tmp_path, capsys):
    run(job(tmp_path / "ok", "schedule.warmup_steps=4", 'growth.schedule="restart"', "train.max_steps=8"))
    assert capsys.readouterr().err.count("the warmup is clamped") == 1
    with pytest.raises(ConfigError, match="block"):  # a block of 6 layers in a 4-layer stage
        run(job(tmp_path / "bad", 'growth.stages=[{at = 2, layers = "middle", block = 6}]', "train.max_steps=8"))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("total,expected", [(10, 3), (9, 3), (7, 2), (20, 6), (11, 3)])
def test_a_fraction_grows_at_the_nearest_step(tmp_path, total, expected):
    # 0.3 * 10 is 3.0000000000000004 in floats (ceil: 4); 0.3 * 9 = 2.7 (int: 2); 0.3 * 11 = 3.3
    cfg = job(tmp_path, "growth.stages=[{at = 0.3}]", f"train.max_steps={total}")
    assert growth_steps(cfg, total) == [expected]


def test_at_one_point_zero_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"at: a fraction of the run must be in \(0, 1\), got 1.0; for a token "
                                          r"count write an integer \(at = 1\)"):
        job(tmp_path, "growth.stages=[{at = 1.0}]")
    assert job(tmp_path, "growth.stages=[{at = 1}]").growth.stages[0].at == 1  # an integer: tokens


def test_stage_timing_tokens_fractions_and_prop(tmp_path):
    cfg = job(tmp_path)
    assert growth_steps(cfg, 8) == [2, 5]
    assert [m.n_layers for m in stage_models(cfg)] == [1, 2, 4]
    assert [s.factor for s in stages_of(cfg)] == [2, 2]
    prop = job(tmp_path, 'growth.stages=[{at = "prop"}, {at = "prop"}]', "train.max_steps=60")
    assert growth_steps(prop, 60) == [10, 30]  # Prop-1: stage lengths 1 : 2 : 3
    prop.growth.prop_alpha = 0.0
    assert growth_steps(prop, 60) == [20, 40]  # equal lengths
    one = load_config(None, JOB[:-1] + ["growth.at_tokens=300"])  # the single-stage form: one stage
    assert growth_steps(one, 8) == [3] and [m.n_layers for m in stage_models(one)] == [2, 4]
    midas = job(tmp_path, 'growth.stages=[{at = 0.25, factor = 2, layers = "middle", block = 1}]',
                "model.n_layers=6")
    assert stages_of(midas)[0].options == {"layers": "middle", "block": 1}


@pytest.mark.parametrize("stages,message", [
    ("[{at = 0.5}, {at = 0.25}]", r"growth.stages\[1\].at: grows after step 2, not after the previous stage"),
    ("[{at = 200}, {at = 256}]", r"growth.stages\[1\].at: .*each stage needs steps of its own"),
    ("[{at = 256}, {at = 1024}]", r"growth.stages\[1\].at: growing after step 8 .* leaves nothing"),
])
def test_impossible_stage_timings_are_one_line(tmp_path, capsys, stages, message):
    with pytest.raises(ConfigError, match=message):
        growth_steps(job(tmp_path, f"growth.stages={stages}"), 8)
    status = cli_main(["train", *[a for o in JOB + [f"growth.stages={stages}", f'logging.run_dir="{tmp_path}/r"']
                                  for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("stackfast: error: growth.stages[1].at")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # refused before anything was written


@pytest.mark.parametrize("extra,message", [
    (["growth.stages=[{at = 0.5, factor = 1}]"], r"growth.stages\[0\].factor: must be an integer >= 2"),
    (["growth.stages=[{at = 1.5}]"], r"growth.stages\[0\].at: a fraction of the run must be in \(0, 1\)"),
    (['growth.stages=[{at = "prop"}, {at = 0.5}]'], "'prop' sets every stage's length"),
    (['growth.stages=[{at = 0.2, layer = "middle"}]'], r"growth.stages\[0\].layer: unknown key"),
    (['growth.operator="depth_random"'], "'depth_random' takes one stage"),
    (['growth.operator="depth_zero"', 'growth.stages=[{at = 0.5, layers = "middle"}]'], "takes neither"),
    (['growth.operator="none"'], "growth.stages: set growth.operator"),
    (['schedule.kind="linear"'], "schedule.kind: expected one of 'cosine', 'wsd'"),
    (['growth.schedule="paper-ish"'], "growth.schedule: expected one of 'paper', 'restart', 'continue'"),
    (["growth.small_horizon=0.5"], r"growth.small_horizon: the long schedule spans at least .* \(>= 1\), got 0.5"),
    (["growth.small_warmup=1.5"], r"growth.small_warmup: a share of the small model's stage, in \[0, 1\], got 1.5"),
    (["schedule.decay_share=0"], r"schedule.decay_share: must be in \(0, 1\]"),
    (['schedule.decay_shape="sqrt"'], "schedule.decay_shape: expected one of 'linear', '1-sqrt'"),
])
def test_bad_stage_and_schedule_settings_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        job(tmp_path, *extra)


def test_a_shape_no_stage_can_grow_into_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"growth.stages\[0\]: depth growth by factor 2: .* 3 is not divisible"):
        stage_models(job(tmp_path, "model.n_layers=6"))  # 6 -> 3 -> 1.5


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    """A run growing 1 -> 2 -> 4 layers after steps 2 and 5, a checkpoint at every step."""
    run_dir = tmp_path_factory.mktemp("two-stages")
    summary = run(job(run_dir, "checkpoint.every_steps=1", "checkpoint.keep_last=10", 'schedule.kind="wsd"',
                      'growth.schedule="continue"', 'growth.optimizer="replicate"'))
    return run_dir, summary


def test_two_stages_grow_log_and_count_flops(two_stages):
    run_dir, summary = two_stages
    rows = read_metrics(run_dir)
    events = [r for r in rows if r.get("event") == "growth"]
    assert [(e["step"], e["stage"]) for e in events] == [(2, 1), (5, 2)]
    assert [e["spec"]["layer_map"] for e in events] == [[0, 0], [0, 1, 0, 1]]
    assert summary["growth_steps"] == [2, 5] and summary["growth_step"] == 2
    cfg = job(run_dir)
    tokens = 128
    fpt = [m.flops_per_token(32) for m in stage_models(cfg)]
    flops = {r["step"]: r["flops"] for r in rows if "loss" in r}
    assert flops[2] == pytest.approx(2 * tokens * fpt[0])
    assert flops[5] == pytest.approx(2 * tokens * fpt[0] + 3 * tokens * fpt[1])
    assert flops[8] == pytest.approx(2 * tokens * fpt[0] + 3 * tokens * fpt[1] + 3 * tokens * fpt[2])
    assert summary["params"] == cfg.model.num_params()


@pytest.mark.parametrize("resume_step", [2, 3, 5, 6])
def test_resume_at_and_between_stages_reproduces_the_run(two_stages, tmp_path, resume_step):
    run_dir, _ = two_stages
    ckpt = run_dir / "checkpoints" / f"step_{resume_step:08d}"
    run(job(tmp_path, f'checkpoint.resume="{ckpt}"', 'schedule.kind="wsd"', 'growth.schedule="continue"',
            'growth.optimizer="replicate"'))
    full = {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(run_dir) if "loss" in r}
    part = {r["step"]: (r["loss"], r["lr"]) for r in read_metrics(tmp_path) if "loss" in r}
    assert sorted(part) == list(range(resume_step + 1, 9))
    assert all(full[s] == part[s] for s in part), (full, part)  # bit for bit
    events = [r["step"] for r in read_metrics(tmp_path) if r.get("event") == "growth"]
    # a checkpoint at a stage's step is written before that stage grows: the resumed run grows it
    assert events == [s for s in (2, 5) if s >= resume_step]


def test_changing_the_stages_on_resume_is_refused(two_stages, tmp_path):
    run_dir, _ = two_stages
    ckpt = run_dir / "checkpoints" / "step_00000003"
    with pytest.raises(ConfigError, match="growth.stages"):
        run(job(tmp_path, f'checkpoint.resume="{ckpt}"', 'schedule.kind="wsd"', 'growth.schedule="continue"',
                'growth.optimizer="replicate"', "growth.stages=[{at = 256}, {at = 0.75}]"))


@pytest.mark.parametrize("n_layers,block,expected", [
    (2, 2, [0, 1, 0, 1]),                      # B1 -> B1 B1
    (4, 2, [0, 1, 0, 1, 2, 3]),                # B1 B2 -> B1 B1 B2 (the middle of 2 blocks: ceil(2/2) = 1)
    (6, 2, [0, 1, 2, 3, 2, 3, 4, 5]),          # B1 B2 B3 -> B1 B2 B2 B3
    (8, 2, [0, 1, 2, 3, 2, 3, 4, 5, 6, 7]),    # 4 blocks: the 2nd copied
    (3, 1, [0, 1, 1, 2]),
])
def test_midas_adds_one_copy_of_the_middle_block(n_layers, block, expected):
    assert layer_map(n_layers, None, "midas", block=block) == expected


def test_midas_stages_grow_2_4_6_8_at_prop_1(tmp_path):
    cfg = job(tmp_path, "model.n_layers=8", 'growth.layers="midas"', "growth.block=2", "train.max_steps=10",
              'growth.stages=[{at = "prop"}, {at = "prop"}, {at = "prop"}]')
    assert [m.n_layers for m in stage_models(cfg)] == [2, 4, 6, 8]
    assert [s.factor for s in stages_of(cfg)] == [None] * 3
    assert growth_steps(cfg, 10) == [1, 3, 6]  # Prop-1: stage lengths 1 : 2 : 3 : 4
    run(cfg)
    maps = [r["spec"]["layer_map"] for r in read_metrics(tmp_path) if r.get("event") == "growth"]
    assert maps == [[0, 1, 0, 1], [0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 2, 3, 4, 5]]


def test_a_stages_layers_and_block_beat_growths(tmp_path):
    """[growth]'s layers/block are defaults: a stage's own are the ones its growth event uses
    (otherwise a MIDAS or middle-window stage silently stacks the whole model)."""
    cfg = job(tmp_path, 'growth.layers="all"', "growth.block=0", 'growth.stages=[{at = 0.5, layers = "middle", '
              'block = 1}]')
    run(cfg)
    (event,) = [r for r in read_metrics(tmp_path) if r.get("event") == "growth"]
    assert event["spec"]["layer_map"] == [0, 0, 0, 1] and event["spec"]["layers"] == "middle"


@pytest.mark.parametrize("stages,message", [
    ('[{at = 0.5, layers = "middle", block = 6}]', r"growth.stages\[0\]: growing the 2-layer model: block=6"),
    ('[{at = 0.25, layers = "midas", block = 3}]', r"growth.stages\[0\]: a MIDAS stage adds one block of block=3"),
    ('[{at = 0.25, layers = "front", block = 2}, {at = 0.5}]',
     r"growth.stages\[0\]: growing the 1-layer model: block=2"),
])
def test_impossible_stage_options_are_refused_at_startup(tmp_path, capsys, stages, message):
    with pytest.raises(ConfigError, match=message):
        stage_models(job(tmp_path, f"growth.stages={stages}"))
    status = cli_main(["train", *[a for o in JOB + [f"growth.stages={stages}", f'logging.run_dir="{tmp_path}/r"']
                                  for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("stackfast: error: growth.stages[0]")
    assert not [p for p in (tmp_path / "r").glob("*") if p.name != ".lock"]  # refused before anything was written


def test_a_midas_stage_takes_no_factor(tmp_path):
    with pytest.raises(ConfigError, match=r"growth.stages\[0\].factor: a 'midas' stage adds one copy"):
        job(tmp_path, 'growth.stages=[{at = 0.5, layers = "midas", block = 1, factor = 2}]')
