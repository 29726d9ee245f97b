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

from stackfast.errors import GrowthError
from stackfast.growth.guidelines import GROWTH_FACTOR, growth_timing, plan
from stackfast.growth.ramp import Ramp
from stackfast.growth.spec import Growth
from stackfast.growth_operators import OPERATORS, operator_spec
from stackfast.model import Transformer


def _function(operator: str, suffix: str = ""):
    return getattr(importlib.import_module(f"stackfast.growth.{OPERATORS[operator].module}"), operator + suffix)


def apply_growth(model: Transformer, operator: str = "stack", factor: int = GROWTH_FACTOR, **options) -> Growth:
    """Grow `model` with a named operator; returns the Growth (model, spec, ramp)."""
    spec = operator_spec(operator)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise GrowthError(f"growth factor must be an integer >= 2, got {factor!r}")
    unknown = sorted(set(options) - set(spec.accepted_options()))
    if unknown:
        raise GrowthError(f"{operator}: unknown option {unknown[0]!r}; it takes "
                          f"{', '.join(spec.accepted_options())}")
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


__all__ = ["GROWTH_FACTOR", "OPERATORS", "Growth", "GrowthError", "apply_growth", "grow", "growth_timing", "plan",
           "rebuild_ramp"]
