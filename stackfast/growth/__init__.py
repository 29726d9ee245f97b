"""Model growth: the eight operators of the paper, `grow()`, and the guidelines (`plan`).

    from stackfast.growth import grow
    big = grow(small, operator="stack", factor=4)      # G_stack: layers 0..n-1 repeated 4 times

OPERATORS (stackfast/growth_operators.py) holds one OperatorSpec per operator; the
function that grows is the one of the same name in depth.py (depth operators), width.py
(width operators) or learned.py (LiGO: depth_learn, width_learn): (model, factor,
**options) -> Growth (the grown model, its spec as plain data and, for the G_random
operators, the fade-in ramp).
"""
from __future__ import annotations

import importlib
import math
import types
from typing import Union, get_args, get_origin, get_type_hints

from stackfast.errors import GrowthError
from stackfast.growth.guidelines import GROWTH_FACTOR, growth_timing, plan
from stackfast.growth.ramp import Ramp
from stackfast.growth.spec import Growth
from stackfast.growth_operators import OPERATORS, operator_spec
from stackfast.model import Transformer


def _function(operator: str, suffix: str = ""):
    return getattr(importlib.import_module(f"stackfast.growth.{OPERATORS[operator].module}"), operator + suffix)


def check_growth(operator: str, factor: int, options: dict) -> None:
    """Refuse an unknown operator, a factor below 2, or an option the operator does not take
    or of the wrong type (one line naming the operator's options), before any work."""
    spec = operator_spec(operator)
    if factor is None and options.get("layers") == "midas":
        pass  # MIDAS adds one block: the block size, not a factor, sets the grown depth
    elif isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise GrowthError(f"growth factor must be an integer >= 2, got {factor!r}")
    hints = get_type_hints(_function(operator))
    valid = ", ".join(f"{o.name}={o.default!r}" for o in spec.options)
    for name, value in options.items():
        if name not in spec.accepted_options():
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
    return _function(operator)(model, factor, **options)


def rebuild_ramp(model: Transformer, growth_spec: dict) -> Ramp | None:
    """The fade-in of a grown model from its saved growth spec (resuming mid-ramp); None
    for an operator without one."""
    if not OPERATORS[growth_spec["operator"]].ramp:
        return None
    return _function(growth_spec["operator"], "_ramp")(model, growth_spec)


def grow(model: Transformer, operator: str = "stack", factor: int = GROWTH_FACTOR, **options) -> Transformer:
    """The grown model (see apply_growth for the spec and ramp as well)."""
    return apply_growth(model, operator, factor, **options).model


__all__ = ["GROWTH_FACTOR", "OPERATORS", "Growth", "GrowthError", "apply_growth", "check_growth", "grow",
           "growth_timing", "plan", "rebuild_ramp"]
