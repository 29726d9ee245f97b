"""The optimizer and the learning-rate schedule of a run (and of each growth stage).

Two shapes, both after a linear warmup (`[schedule] kind`):
  cosine  the LR follows half a cosine from the peak towards peak * min_lr_ratio, which it
          reaches one step after the last (the convention of the paper's code, tongxuluo/prts);
  wsd     warmup-stable-decay: the LR stays at the peak, then falls over the last `decay_share`
          of the steps, linearly or as 1 - sqrt (torchtitan, MiniCPM, OLMo 2): a decay of k steps
          takes k values below the peak, the last at peak * min_lr_ratio.
With growth (`growth.schedule`):
  paper     as the paper's code runs G_stack (prts base_model.sh, g_stack.sh): the small model
            follows the first steps of a long schedule (warmup 3,000 and a 300,000-step cosine,
            stacked at step 5,000: growth.small_warmup = 0.6 and growth.small_horizon = 60 of its
            stage), so it grows near its peak LR; each grown model starts a fresh warmup and the
            [schedule] over its stage;
  restart   every model, the small one included, a complete schedule of its own over its stage
            (the small model reaches growth at the floor);
  continue  one schedule over the whole job, growth events included (no re-warm).
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
    steps, then the cosine or WSD shape (module docstring) down to peak * min_ratio. A warmup
    longer than the schedule is clamped to it (the peak is reached at its last step;
    warmup_note says so at the start of a run)."""
    warmup = min(warmup, total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    # wsd: the decay takes the last decay_share of the steps (never the warmup's); its first
    # step is already below the peak and its last at the floor.
    decay_start = max(warmup, total_steps - round(decay_share * total_steps))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
    left = 1.0 - progress if decay_shape == "linear" else 1.0 - math.sqrt(progress)
    return peak * (min_ratio + (1.0 - min_ratio) * left)


def scheduled_lr(cfg, step: int, total_steps: int, growth_steps: list[int] = ()) -> float:
    """The LR at `step` of a run of `total_steps` that grows after each of `growth_steps`
    (sorted; empty: no growth). The small model trains at growth.small_lr (0: optim.lr)."""
    s, g = cfg.schedule, cfg.growth

    def shape(step: int, total: int, peak: float, warmup: int = s.warmup_steps) -> float:
        return lr_at(step, total, peak, warmup, s.min_lr_ratio, s.kind, s.decay_share, s.decay_shape)

    small = bool(growth_steps) and step < growth_steps[0]
    peak = (g.small_lr or cfg.optim.lr) if small else cfg.optim.lr
    if not growth_steps or g.schedule == "continue":
        return shape(step, total_steps, peak)
    if small and g.schedule == "paper":
        warmup, horizon = paper_small_schedule(g, growth_steps[0])
        return shape(step, horizon, peak, warmup)
    bounds = [0, *growth_steps, total_steps]
    stage = bisect.bisect_right(growth_steps, step)  # growth events at or before `step`
    start, end = bounds[stage], bounds[stage + 1]
    return shape(step - start, end - start, peak)


def paper_small_schedule(growth_cfg, stage_steps: int) -> tuple[int, int]:
    """growth.schedule = 'paper': (warmup steps, length) of the long schedule whose first
    `stage_steps` steps the small model trains on, in the paper's proportions."""
    return (max(1, round(growth_cfg.small_warmup * stage_steps)),
            max(stage_steps, round(growth_cfg.small_horizon * stage_steps)))


def warmup_note(cfg, total_steps: int, growth_steps: list[int]) -> str | None:
    """The line that says a warmup is longer than its run or stage, and so clamped to it
    (lr_at); None when every warmup fits."""
    w = cfg.schedule.warmup_steps
    if not growth_steps or cfg.growth.schedule == "continue":
        spans = [("the run", total_steps)]
    else:
        bounds = [0, *growth_steps, total_steps]
        spans = [(f"stage {k + 1} (steps {a + 1}-{b})", b - a) for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        if cfg.growth.schedule == "paper":
            spans = spans[1:]  # the small model warms up over growth.small_warmup of its stage
    short = [f"{where}, {length} steps" for where, length in spans if w > length]
    if not short:
        return None
    return (f"note: schedule.warmup_steps = {w} is longer than {'; '.join(short)}: the warmup is clamped to "
            f"each of them (the LR reaches its peak at their last step)")
