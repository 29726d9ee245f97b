"""The optimizer and the learning-rate schedule of a run (and of each growth stage).

Two shapes, both after a linear warmup (`[schedule] kind`):
  cosine  the LR follows half a cosine from the peak down to peak * min_lr_ratio at the last step;
  wsd     warmup-stable-decay: the LR stays at the peak, then falls to peak * min_lr_ratio over
          the last `decay_share` of the steps, linearly or as 1 - sqrt (torchtitan, MiniCPM, OLMo 2).
With growth, `growth.schedule = "restart"` gives every model (the small one and each grown
one) a complete schedule of its own over its stage, as the paper's code does; "continue"
runs one schedule over the whole job, growth events included (no re-warm).
"""
from __future__ import annotations

import bisect
import math

import torch


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights are 1-D and not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # Fused (one kernel for all parameters, on CPU too) and it honours `found_inf`: the loop
    # skips a non-finite step on the device, without a host sync.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def lr_at(step: int, total_steps: int, peak: float, warmup: int, min_ratio: float, kind: str = "cosine",
          decay_share: float = 0.2, decay_shape: str = "linear") -> float:
    """The LR at `step` of a schedule of `total_steps`: linear warmup to `peak` over `warmup`
    steps, then the cosine or WSD shape (module docstring) down to peak * min_ratio."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    # wsd: the decay takes the last decay_share of the steps (never the warmup's)
    decay_start = max(warmup, total_steps - round(decay_share * total_steps))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    left = 1.0 - progress if decay_shape == "linear" else 1.0 - math.sqrt(progress)
    return peak * (min_ratio + (1.0 - min_ratio) * left)


def scheduled_lr(cfg, step: int, total_steps: int, growth_steps: list[int] = ()) -> float:
    """The LR at `step` of a run of `total_steps` that grows after each of `growth_steps`
    (sorted; empty: no growth). The small model trains at growth.small_lr (0: optim.lr)."""
    s = cfg.schedule

    def shape(step: int, total: int, peak: float) -> float:
        return lr_at(step, total, peak, s.warmup_steps, s.min_lr_ratio, s.kind, s.decay_share, s.decay_shape)

    small = bool(growth_steps) and step < growth_steps[0]
    peak = (cfg.growth.small_lr or cfg.optim.lr) if small else cfg.optim.lr
    if not growth_steps or cfg.growth.schedule == "continue":
        return shape(step, total_steps, peak)
    bounds = [0, *growth_steps, total_steps]
    stage = bisect.bisect_right(growth_steps, step)  # growth events at or before `step`
    start, end = bounds[stage], bounds[stage + 1]
    return shape(step - start, end - start, peak)
