"""The paper's guidelines: when to grow (timing d) and by how much (g = 4).

growth_timing is the fitted formula of docs/method.md, from IsoFLOP sweeps at N in
{410M, 1.1B, 3B} with g = 4:

    log10(d) = 0.88 * log10(N) + 163.27 / log10(C) - 5.74,    C = 6 * N * D

The appendix's formula for g is called unreliable by its authors; g = 4 is their
recommendation and ours.
"""
from __future__ import annotations

import dataclasses
import math

from stackfast.config import PRESETS, ModelConfig
from stackfast.errors import GrowthError
from stackfast.growth_operators import OPERATORS

GROWTH_FACTOR = 4


def growth_timing(target_params: float, flops: float) -> float:
    """Tokens d to train the small model for, for a target of `target_params` parameters
    trained with a total budget of `flops` FLOPs (docs/method.md)."""
    if not target_params > 0 or not flops > 1:
        raise GrowthError(f"growth_timing needs positive parameters and FLOPs > 1, got {target_params}, {flops}")
    return 10 ** (0.88 * math.log10(target_params) + 163.27 / math.log10(flops) - 5.74)


PAPER_PRESETS = ("410m", "1.1b", "3b", "7b")
# Targets plan() answers for: within a factor of 2 of the smallest and largest paper presets.
PLAN_RANGE = (ModelConfig(**PRESETS["410m"]).num_params() / 2, ModelConfig(**PRESETS["7b"]).num_params() * 2)


def nearest_preset(params: float) -> str:
    """The paper preset whose parameter count is closest (in log scale) to `params`."""
    return min(PAPER_PRESETS, key=lambda name: abs(math.log(ModelConfig(**PRESETS[name]).num_params() / params)))


def budget(params: float, tokens: float | None = None, flops: float | None = None) -> dict:
    """A target size and budget (tokens or FLOPs, one of them), checked: the preset nearest
    the size, the budget in both units and its tokens per parameter."""
    if (tokens is None) == (flops is None):
        raise GrowthError("give exactly one of the token budget and the FLOP budget")
    for name, value in (("token budget", tokens), ("FLOP budget", flops), ("target parameters", params)):
        if value is not None and not 0 < value < math.inf:
            raise GrowthError(f"{name} must be a positive finite number, got {value}")
    low, high = PLAN_RANGE
    if not low <= params <= high:
        # The timing formula was fitted on 410M-3B targets and the config's model is a preset:
        # far outside them, any answer would be made up (a 1e30 target silently became 7b).
        raise GrowthError(f"target parameters {params:.3g}: plan covers {low:.2g} to {high:.2g} (the paper's "
                          f"formula was fitted on 410M-3B models; the presets are {', '.join(PAPER_PRESETS)})")
    flops = flops if flops is not None else 6.0 * params * tokens
    tokens = tokens if tokens is not None else flops / (6.0 * params)
    preset = nearest_preset(params)
    return {"target_params": params, "tokens": tokens, "flops": flops, "preset": preset,
            "target": dataclasses.asdict(ModelConfig.from_preset(preset)), "tokens_per_param": tokens / params}


def plan(params: float, tokens: float | None = None, flops: float | None = None) -> dict:
    """The recommended growth for a target size and budget (tokens or FLOPs).

    Returns the budget, d, g, the small model's shape and the expected compute split:
    the small model trains on d tokens, the grown model on the remaining tokens; total
    FLOPs include the small model's (docs/method.md).
    """
    p = budget(params, tokens, flops)
    tokens = p["tokens"]
    d = growth_timing(params, p["flops"])
    if d >= tokens:
        raise GrowthError(f"the recommended growth point d = {d:.3g} tokens is beyond the whole budget "
                          f"of {tokens:.3g} tokens: train a smaller target or with more tokens")
    target = ModelConfig(**p["target"])
    small = OPERATORS["stack"].small_model(target, GROWTH_FACTOR)
    small_flops = 6.0 * small.num_params() * d
    grown_flops = 6.0 * target.num_params() * (tokens - d)
    return {
        **p, "growth_tokens": d, "factor": GROWTH_FACTOR,
        "small": dataclasses.asdict(small), "small_params": small.num_params(),
        "small_flops": small_flops, "grown_flops": grown_flops,
        "small_flop_share": small_flops / (small_flops + grown_flops),
    }
