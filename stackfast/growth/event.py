"""A growth event inside a running job: the one place that grows the weights, builds the
grown model's optimizer (fresh, or with the Adam moments copied along with the layers),
its fade-in ramp and the metrics row. The training loop calls `grow_stage` once per stage.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from stackfast.config import Config, ModelConfig
from stackfast.growth import apply_growth
from stackfast.growth.depth import copy_optimizer_state
from stackfast.growth.ramp import Ramp
from stackfast.growth.stages import Stage
from stackfast.growth_operators import OPERATORS
from stackfast.model import Transformer
from stackfast.optim import build_optimizer
from stackfast.parallel import World, apply_block_options, strip_block_options


@dataclass
class GrowthEvent:
    """What a growth event gives the loop: the grown model, its optimizer and ramp (None
    without a fade-in), and the row the metrics log records."""
    model: Transformer
    optimizer: torch.optim.Optimizer
    ramp: Ramp | None
    row: dict


def grow_stage(cfg: Config, stage: Stage, target: ModelConfig, model: Transformer, optimizer, *,
               probe: Callable[[Transformer], float], batch: Callable[[int], tuple], device: torch.device,
               micro_batch: int, world: World = World(), shard=apply_block_options) -> GrowthEvent:
    """Grow `model` by `stage` into `target` (this stage's model shape).

    probe(model): the loss on one fixed held-out batch, before and after, to show the
    (small) jump that growth causes. batch(k): the k-th fresh training batch of this step
    (LiGO's training data). `shard` wraps a model as the run does (wrap_model): under
    FSDP the depth operators build the grown model with it and copy local shards (no
    communication); in one process the grown model is wrapped afterwards.
    """
    operator = OPERATORS[cfg.growth.operator]
    if not world.distributed:
        strip_block_options(model)  # operators copy plain blocks
    loss_before = probe(model)
    started = time.perf_counter()
    options = stage.operator_options(cfg)  # the stage's layers and block over [growth]'s
    if operator.learns:
        options["batches"] = batch
    if world.distributed:
        options["shard"] = shard
    elif operator.sharded:
        options["in_place"] = True  # the small model is dropped after growth: adopt its modules, copy the rest
    growth = apply_growth(model, operator.name, stage.factor, **options)
    grown = growth.model
    grown.config = target  # the same shape (OperatorSpec.small_model inverts the operator), and [model]'s kernels
    new_optimizer = build_optimizer(grown, cfg.optim)
    if cfg.growth.optimizer == "replicate":
        old_state = {name: optimizer.state[p] for name, p in model.named_parameters() if p in optimizer.state}
        new_optimizer.state.update(copy_optimizer_state(old_state, grown, growth.spec["layer_map"], model))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: time the growth itself
    growth_s = time.perf_counter() - started
    if not world.distributed:
        shard(grown)
    loss_after = probe(grown)
    # LiGO's training steps run the grown model on one micro-batch each: counted like training.
    learned_tokens = cfg.growth.learn_steps * micro_batch * cfg.data.seq_len
    growth_flops = learned_tokens * target.flops_per_token(cfg.data.seq_len) if operator.learns else 0.0
    row = {"event": "growth", "spec": growth.spec, "loss_before": loss_before, "loss_after": loss_after,
           "growth_s": growth_s, "growth_flops": growth_flops, "params_before": model.num_params(),
           "params_after": grown.num_params()}
    grown.train()
    return GrowthEvent(grown, new_optimizer, growth.ramp, row)
