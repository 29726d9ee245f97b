"""Model growth: the eight operators of the paper, `grow()`, and the guidelines (`plan`).

    from stackfast.growth import grow
    big = grow(small, operator="stack", factor=4)      # G_stack: layers 0..n-1 repeated 4 times

OPERATORS maps each name to a function (model, factor, **options) -> Growth (the grown
model, its spec as plain data and, for the G_random operators, the fade-in ramp).
Width operators are in width.py, LiGO (depth_learn, width_learn) in learned.py.
"""
from __future__ import annotations

from stackfast.growth import depth, learned, width
from stackfast.growth.guidelines import GROWTH_FACTOR, growth_timing, plan
from stackfast.growth.spec import Growth, GrowthError
from stackfast.model import Transformer

OPERATORS = {
    "stack": depth.stack,
    "depth_zero": depth.zero,
    "depth_random": depth.random,
    "depth_learn": learned.depth_learn,
    "width_direct": width.direct,
    "width_zero": width.zero,
    "width_random": width.random,
    "width_learn": learned.width_learn,
}

# The depth operators, built from a layer map (depth.build_from_map): they grow an
# FSDP-sharded model by local copies (`shard=`) and can consume the small model
# (`in_place=True`); the others change tensor shapes.
LAYER_MAP_OPERATORS = ("stack", "depth_zero", "depth_random")
# The LiGO operators: they train their expansion on the LM loss (growth.learn_steps steps of
# one micro-batch on the grown model), compute that a run counts in its FLOPs.
LEARNED_OPERATORS = ("depth_learn", "width_learn")

# Operators whose new parts fade in: rebuild the ramp from a saved spec (resume mid-ramp).
RAMPS = {
    "depth_random": depth.random_ramp,
    "width_random": width.random_ramp,
}


def apply_growth(model: Transformer, operator: str = "stack", factor: int = GROWTH_FACTOR, **options) -> Growth:
    """Grow `model` with a named operator; returns the Growth (model, spec, ramp)."""
    if operator not in OPERATORS:
        raise GrowthError(f"unknown growth operator {operator!r}; known: {', '.join(OPERATORS)}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise GrowthError(f"growth factor must be an integer >= 2, got {factor!r}")
    return OPERATORS[operator](model, factor, **options)


def grow(model: Transformer, operator: str = "stack", factor: int = GROWTH_FACTOR, **options) -> Transformer:
    """The grown model (see apply_growth for the spec and ramp as well)."""
    return apply_growth(model, operator, factor, **options).model


__all__ = ["GROWTH_FACTOR", "LAYER_MAP_OPERATORS", "LEARNED_OPERATORS", "OPERATORS", "RAMPS",
           "Growth", "GrowthError", "apply_growth", "grow", "growth_timing", "plan"]
