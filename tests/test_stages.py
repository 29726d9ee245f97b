"""Learning-rate schedules (cosine, WSD) and multi-stage growth: validation, stage
boundaries, exact resume between stages, FLOPs accounting, the CLI's one-line errors."""
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stackfast.cli import main as cli_main  # noqa: E402
from stackfast.config import ConfigError, load_config  # noqa: E402
from stackfast.errors import GrowthError  # noqa: E402
from stackfast.growth.stages import growth_steps, stage_models, stages_of  # noqa: E402
from stackfast.metrics import read_metrics  # noqa: E402
from stackfast.optim import lr_at, scheduled_lr  # noqa: E402
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
    assert lr_at(80, 100, **wsd) == pytest.approx(2.0)
    assert lr_at(90, 100, **wsd) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # halfway down, linear
    assert lr_at(90, 100, **wsd, decay_shape="1-sqrt") == pytest.approx(2.0 * (0.1 + 0.9 * (1 - math.sqrt(0.5))))
    assert lr_at(100, 100, **wsd) == pytest.approx(0.2)
    # a decay longer than what follows the warmup starts right after it
    assert lr_at(10, 20, 1.0, 10, 0.0, "wsd", 0.9) == pytest.approx(1.0)
    assert lr_at(15, 20, 1.0, 10, 0.0, "wsd", 0.9) == pytest.approx(0.5)


def test_schedule_over_two_stages_restarts_or_continues(tmp_path):
    cfg = job(tmp_path, "optim.lr=1.0", "growth.small_lr=3.0", 'schedule.kind="wsd"', "schedule.decay_share=0.5",
              "schedule.min_lr_ratio=0.0")
    # stages grow after steps 2 and 5 of 8: three schedules of 2, 3 and 3 steps
    lrs = [scheduled_lr(cfg, s, 8, [2, 5]) for s in range(8)]
    assert lrs == pytest.approx([3.0, 3.0, 1.0, 1.0, 0.5, 1.0, 1.0, 0.5])
    cfg.growth.schedule = "continue"  # one WSD over 8 steps; the first model at its own peak
    lrs = [scheduled_lr(cfg, s, 8, [2, 5]) for s in range(8)]
    assert lrs == pytest.approx([3.0, 3.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25])


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
    (["schedule.decay_share=0"], r"schedule.decay_share: must be in \(0, 1\]"),
    (['schedule.decay_shape="sqrt"'], "schedule.decay_shape: expected one of 'linear', '1-sqrt'"),
])
def test_bad_stage_and_schedule_settings_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        job(tmp_path, *extra)


def test_a_shape_no_stage_can_grow_into_is_an_error(tmp_path):
    with pytest.raises(GrowthError, match="not divisible by 2"):
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
