"""Model growth: the eight operators of the paper, `grow()`, and the guidelines (`plan`).

    from stackfast.growth import grow
    big = grow(small, operator="stack", factor=4)      # G_stack: layers 0..n-1 repeated 4 times

OPERATORS maps each name to a function (model, factor, **options) -> Growth (the grown
model, its spec as plain data and, for the G_random operators, the fade-in ramp).
Width operators are in width.py, LiGO (depth_learn, width_learn) in learned.py.
"""
from __future__ import annotations

import inspect
import math
import types
from typing import Union, get_args, get_origin, get_type_hints

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


# Keyword arguments the callers set themselves (how to grow), not the user's options (what to grow).
INTERNAL_OPTIONS = ("shard", "in_place", "batches")


def check_growth(operator: str, factor: int, options: dict) -> None:
    """Refuse an unknown operator, a factor below 2, or an option the operator does not take
    or of the wrong type (one line naming the operator's options), before any work."""
    if operator not in OPERATORS:
        raise GrowthError(f"unknown growth operator {operator!r}; known: {', '.join(OPERATORS)}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise GrowthError(f"growth factor must be an integer >= 2, got {factor!r}")
    function = OPERATORS[operator]
    accepted = {name: p for name, p in inspect.signature(function).parameters.items()
                if p.kind == inspect.Parameter.KEYWORD_ONLY}
    hints = get_type_hints(function)
    valid = ", ".join(f"{name}={p.default!r}" for name, p in accepted.items() if name not in INTERNAL_OPTIONS)
    for name, value in options.items():
        if name not in accepted:
            raise GrowthError(f"{operator} takes no option {name!r}; its options: {valid or 'none'}")
        if name in hints and not _fits(hints[name], value):
            hint = hints[name]
            expected = "a finite number" if hint is float else hint.__name__ if isinstance(hint, type) else hint
            raise GrowthError(f"{operator} option {name}: expected {expected}, got {type(value).__name__} "
                              f"{value!r}"[:300])


def _fits(hint, value) -> bool:
    """Whether value is of the annotated type (a float may be given as an int; no bool for a number)."""
    if isinstance(hint, types.UnionType) or get_origin(hint) is Union:
        return any(_fits(member, value) for member in get_args(hint))
    if hint is type(None):
        return value is None
    if get_origin(hint) is list:
        return isinstance(value, list) and all(_fits(get_args(hint)[0], v) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    return True  # callables and other internal arguments: the operator checks them


def apply_growth(model: Transformer, operator: str = "stack", factor: int = GROWTH_FACTOR, **options) -> Growth:
    """Grow `model` with a named operator; returns the Growth (model, spec, ramp)."""
    check_growth(operator, factor, options)
    return OPERATORS[operator](model, factor, **options)


def grow(model: Transformer, operator: str = "stack", factor: int = GROWTH_FACTOR, **options) -> Transformer:
    """The grown model (see apply_growth for the spec and ramp as well)."""
    return apply_growth(model, operator, factor, **options).model


__all__ = ["GROWTH_FACTOR", "LAYER_MAP_OPERATORS", "LEARNED_OPERATORS", "OPERATORS", "RAMPS",
           "Growth", "GrowthError", "apply_growth", "check_growth", "grow", "growth_timing", "plan"]
