"""The growth operators' registry (stackfast/growth_operators.py): every operator in it is
accepted by config, `stackfast grow`, the small-model rule of `plan` and training; a name
outside it by none of them."""
import dataclasses
import importlib
import inspect
import math

import pytest
import torch

from stackfast.cli import main as cli_main
from stackfast.config import Config, ConfigError, ModelConfig, load_config
from stackfast.growth import GrowthError, apply_growth
from stackfast.growth_operators import OPERATORS, operator_spec
from stackfast.model import Transformer
from stackfast.train import run

# Factors that every operator supports on the tiny preset: width scales by sqrt(factor).
FACTOR = {"depth": 2, "width": 4}
# A short growth: one LiGO step, a one-step fade-in.
FAST = {"steps": 1, "ramp_steps": 1}


def options_for(spec):
    return {k: v for k, v in FAST.items() if k in spec.accepted_options()}


@pytest.mark.parametrize("name", OPERATORS)
def test_the_table_matches_each_operators_function(name):
    spec = OPERATORS[name]
    function = getattr(importlib.import_module(f"stackfast.growth.{spec.module}"), name)
    params = inspect.signature(function).parameters
    assert set(list(params)[2:]) == set(spec.accepted_options())
    for option in spec.options:
        assert params[option.name].default == option.default, option.name
        if option.field:  # a config field that exists
            section, key = option.field.split(".")
            assert hasattr(getattr(Config(), section), key)
    assert hasattr(importlib.import_module(f"stackfast.growth.{spec.module}"), f"{name}_ramp") == spec.ramp


@pytest.mark.parametrize("name", OPERATORS)
def test_config_accepts_every_operator(name):
    assert load_config(None, [f'growth.operator="{name}"']).growth.operator == name


@pytest.mark.parametrize("name", OPERATORS)
def test_the_small_model_grows_into_the_target(name):
    """OperatorSpec.small_model (what plan and a run start from) inverts the operator."""
    spec, target = OPERATORS[name], ModelConfig.from_preset("tiny", kernels="torch", n_layers=4)
    factor = FACTOR[spec.direction]
    small = Transformer(spec.small_model(target, factor))
    batches = {"batches": lambda step: (torch.zeros(1, 8, dtype=torch.long),) * 2} if spec.learns else {}
    grown = apply_growth(small, name, factor, **options_for(spec), **batches).model.config
    assert dataclasses.replace(grown, preset="") == dataclasses.replace(target, preset="")


@pytest.mark.parametrize("name", OPERATORS)
def test_grow_command_takes_every_operator(name, tmp_path, capsys):
    spec = OPERATORS[name]
    source = tmp_path / "small"
    run(load_config(None, ['model.preset="tiny"', "model.kernels=torch", "data.seq_len=32", "train.max_steps=1",
                           "train.global_batch_size=2", "train.eval_batches=1", "logging.progress=false",
                           "logging.tensorboard=false", f'logging.run_dir="{source}"']))
    options = [a for k, v in options_for(spec).items() for a in ("--option", f"{k}={v}")]
    code = cli_main(["grow", "--checkpoint", str(source / "checkpoints" / "step_00000001"), "--operator", name,
                     "--factor", str(FACTOR[spec.direction]), "--out", str(tmp_path / "grown"), *options])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", OPERATORS)
def test_training_grows_with_every_operator(name, tmp_path):
    spec = OPERATORS[name]
    summary = run(load_config(None, [
        'model.preset="tiny"', "model.n_layers=4", "model.kernels=torch", "data.seq_len=32", "train.max_steps=2",
        "train.global_batch_size=2", "train.eval_batches=1", "logging.progress=false", "logging.tensorboard=false",
        f'logging.run_dir="{tmp_path}"', f'growth.operator="{name}"', f"growth.factor={FACTOR[spec.direction]}",
        "growth.at_tokens=64", "growth.learn_steps=1", "growth.ramp_steps=1"]))
    assert summary["growth_step"] == 1 and summary["steps"] == 2 and math.isfinite(summary["loss"])


def test_a_name_outside_the_registry_is_refused_everywhere(tmp_path, capsys):
    with pytest.raises(ConfigError, match="growth.operator"):
        load_config(None, ['growth.operator="depth.random"'])
    with pytest.raises(GrowthError, match="unknown growth operator 'random'; known: stack, depth_zero"):
        operator_spec("random")  # the small-model rule of plan and of a run
    with pytest.raises(GrowthError, match="unknown growth operator"):
        apply_growth(Transformer(ModelConfig.from_preset("tiny", kernels="torch")), "width", 4)
    code = cli_main(["grow", "--checkpoint", str(tmp_path), "--operator", "zero", "--out", str(tmp_path / "g")])
    assert code == 2 and "unknown growth operator 'zero'" in capsys.readouterr().err


def test_unknown_options_are_refused_with_the_valid_ones():
    model = Transformer(ModelConfig.from_preset("tiny", kernels="torch"))
    with pytest.raises(GrowthError, match=r"depth_zero takes no option 'noise'; its options: order='interpolate'"):
        apply_growth(model, "depth_zero", 2, noise=0.1)
