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
from stackfast.growth.spec import GrowthError

GROWTH_FACTOR = 4


def growth_timing(target_params: float, flops: float) -> float:
    """Tokens d to train the small model for, for a target of `target_params` parameters
    trained with a total budget of `flops` FLOPs (docs/method.md)."""
    if not target_params > 0 or not flops > 1:
        raise GrowthError(f"growth_timing needs positive parameters and FLOPs > 1, got {target_params}, {flops}")
    return 10 ** (0.88 * math.log10(target_params) + 163.27 / math.log10(flops) - 5.74)


def small_model(target: ModelConfig, operator: str = "stack", factor: int = GROWTH_FACTOR) -> ModelConfig:
    """The small model a job starts from so that growing it by `factor` gives `target`.

    Depth operators divide the layers by factor; width operators divide hidden size, FFN
    size and head counts by sqrt(factor) (a factor in parameters), keeping head_dim.
    """
    if operator.startswith("width"):
        scale = math.isqrt(factor)
        if scale * scale != factor:
            raise GrowthError(f"width growth by factor {factor}: the small model needs an integer "
                              f"width ratio sqrt({factor})")
        fields = {"hidden_size": target.hidden_size, "ffn_size": target.ffn_size,
                  "n_heads": target.n_heads, "n_kv_heads": target.n_kv_heads}
        bad = [k for k, v in fields.items() if v % scale]
        if bad:
            raise GrowthError(f"width growth by factor {factor}: model.{bad[0]} {fields[bad[0]]} is not "
                              f"divisible by {scale}")
        return dataclasses.replace(target, preset="", **{k: v // scale for k, v in fields.items()})
    if target.n_layers % factor:
        raise GrowthError(f"depth growth by factor {factor}: model.n_layers {target.n_layers} is not "
                          f"divisible by {factor}")
    return dataclasses.replace(target, preset="", n_layers=target.n_layers // factor)


def nearest_preset(params: float) -> str:
    """The paper preset whose parameter count is closest (in log scale) to `params`."""
    paper = ["410m", "1.1b", "3b", "7b"]
    return min(paper, key=lambda name: abs(math.log(ModelConfig(**PRESETS[name]).num_params() / params)))


def plan(params: float, tokens: float | None = None, flops: float | None = None) -> dict:
    """The recommended growth for a target size and budget (tokens or FLOPs).

    Returns the budget, d, g, the small model's shape and the expected compute split:
    the small model trains on d tokens, the grown model on the remaining tokens; total
    FLOPs include the small model's (docs/method.md).
    """
    if (tokens is None) == (flops is None):
        raise GrowthError("give exactly one of the token budget and the FLOP budget")
    if tokens is not None and not tokens > 0:
        raise GrowthError(f"token budget must be positive, got {tokens}")
    if not params > 0:
        raise GrowthError(f"target parameters must be positive, got {params}")
    flops = flops if flops is not None else 6.0 * params * tokens
    tokens = tokens if tokens is not None else flops / (6.0 * params)
    d = growth_timing(params, flops)
    if d >= tokens:
        raise GrowthError(f"the recommended growth point d = {d:.3g} tokens is beyond the whole budget "
                          f"of {tokens:.3g} tokens: train a smaller target or with more tokens")
    preset = nearest_preset(params)
    target = ModelConfig.from_preset(preset)
    small = small_model(target)
    small_flops = 6.0 * small.num_params() * d
    grown_flops = 6.0 * target.num_params() * (tokens - d)
    return {
        "target_params": params, "tokens": tokens, "flops": flops, "growth_tokens": d,
        "factor": GROWTH_FACTOR, "preset": preset, "target": dataclasses.asdict(target),
        "small": dataclasses.asdict(small), "small_params": small.num_params(),
        "small_flops": small_flops, "grown_flops": grown_flops,
        "small_flop_share": small_flops / (small_flops + grown_flops),
        "tokens_per_param": tokens / params,
    }
