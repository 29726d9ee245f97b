"""The growth stages of a run: when each growth event happens, what it grows, and the model
each stage trains.

A run's [growth] is one stage (factor, at_tokens) or a list of them (growth.stages). Every
stage grows the model before it with growth.operator; [model] is the result of the last
one, so the run starts from the model that all of them, one after another, grow into it
(`stage_models`). When a stage grows is a step of the run (`growth_steps`): a token count,
a fraction of the run's tokens, the paper's timing formula ('auto', one stage) or MIDAS's
Prop-alpha lengths ('prop': stage k of K trains for a share proportional to k ** alpha).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from stackfast.config import Config, ConfigError, GrowthStage, ModelConfig
from stackfast.errors import GrowthError
from stackfast.growth import check_growth
from stackfast.growth.depth import MIDAS, layer_map
from stackfast.growth.guidelines import growth_timing
from stackfast.growth_operators import OPERATORS


@dataclass(frozen=True)
class Stage:
    """One growth event, resolved: its factor (None: a MIDAS stage, which adds one block) and
    the operator options it overrides."""
    factor: int | None
    options: dict  # stack: layers and block of this stage; {} for the other operators

    def small_model(self, operator: str, target: ModelConfig) -> ModelConfig:
        """The model that this stage grows into `target`."""
        return OPERATORS[operator].small_model(target, self.factor, self.options.get("block", 0))

    def operator_options(self, cfg: Config) -> dict:
        """The options the growth event passes: [growth]'s, then this stage's own over them."""
        return {**OPERATORS[cfg.growth.operator].options_from(cfg), **self.options}


def listed_stages(cfg: Config) -> list[GrowthStage]:
    """[growth] as the stages it lists: growth.stages, or one stage at growth.at_tokens (none
    without an operator)."""
    g = cfg.growth
    if g.operator == "none":
        return []
    return g.stages or [GrowthStage(at=g.at_tokens)]


def stages_of(cfg: Config) -> list[Stage]:
    """The run's growth events in order (empty: it does not grow)."""
    g = cfg.growth
    listed = listed_stages(cfg)
    takes_layers = bool(listed) and "layers" in OPERATORS[g.operator].accepted_options()
    stages = []
    for s in listed:
        layers = (s.layers or g.layers) if takes_layers else ""
        stages.append(Stage(factor=None if layers == MIDAS else s.factor or g.factor,
                            options={"layers": layers, "block": g.block if s.block == -1 else s.block}
                            if takes_layers else {}))
    return stages


def stage_models(cfg: Config) -> list[ModelConfig]:
    """The model of each stage, the first (smallest) to the last ([model]); one entry more
    than stages_of(cfg). Every stage's operator and options are checked against the shape it
    grows (a block of 6 layers in a 4-layer model, say): one line naming the stage, before
    the run starts rather than at the growth event."""
    models = [cfg.model]
    g = cfg.growth
    stages = stages_of(cfg)
    where = [f"growth.stages[{i}]" for i in range(len(stages))] if g.stages else ["[growth]"]
    for i in reversed(range(len(stages))):
        try:
            models.insert(0, stages[i].small_model(g.operator, models[0]))
        except GrowthError as e:
            raise ConfigError(f"{where[i]}: {e}") from None
    for i, stage in enumerate(stages):
        options = stage.operator_options(cfg)
        try:
            check_growth(g.operator, stage.factor, options)
            if "layers" in options:  # the stack operator: its layer map for this stage's model
                layer_map(models[i].n_layers, stage.factor, options["layers"], options["order"], options["block"])
        except GrowthError as e:
            raise ConfigError(f"{where[i]}: growing the {models[i].n_layers}-layer model: {e}") from None
    return models


def growth_steps(cfg: Config, total_steps: int) -> list[int]:
    """The optimizer step after which each stage grows, strictly increasing and within the
    run (one line naming the stage otherwise). A warmup longer than its stage is clamped by
    the schedule; optim.warmup_note says so, where the run starts."""
    g = cfg.growth
    listed = listed_stages(cfg)
    if not listed:
        return []
    tokens_per_step = cfg.tokens_per_step()
    where = [f"growth.stages[{i}].at" for i in range(len(listed))] if g.stages else ["growth.at_tokens"]
    if all(s.at == "prop" for s in listed):
        weights = [(k + 1) ** g.prop_alpha for k in range(len(listed) + 1)]
        steps = [round(total_steps * sum(weights[:k + 1]) / sum(weights)) for k in range(len(listed))]
    else:
        steps = []
        for stage in listed:
            if stage.at == "auto":  # the paper's formula: tokens for the target's size and the run's FLOPs
                target = cfg.model.num_params()
                steps.append(math.ceil(growth_timing(target, 6.0 * target * total_steps * tokens_per_step)
                                       / tokens_per_step))
            elif isinstance(stage.at, float):  # the nearest step boundary (at = 0.3 of 10 steps: after step 3)
                steps.append(round(stage.at * total_steps))
            else:
                steps.append(-(-stage.at // tokens_per_step))  # the first step boundary at or after the tokens
    for i, step in enumerate(steps):
        if step >= total_steps:
            raise ConfigError(f"{where[i]}: growing after step {step} ({step * tokens_per_step} tokens) leaves "
                              f"nothing of the run's {total_steps} steps ({total_steps * tokens_per_step} tokens) "
                              f"for the grown model"
                              + (" (the paper's formula is fitted at 410M-3B scale; set a token count)"
                                 if listed[i].at == "auto" else ""))
        if i and step <= steps[i - 1]:
            raise ConfigError(f"{where[i]}: grows after step {step}, not after the previous stage (step "
                              f"{steps[i - 1]}); each stage needs steps of its own")
    return steps
