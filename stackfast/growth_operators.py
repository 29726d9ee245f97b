"""The growth operators' registry: one OperatorSpec per operator, in one table (OPERATORS).

Everything that treats operators differently reads it: config validation (the names, which
ones copy layers), the training loop (which options come from [growth], which operators run
sharded under FSDP, which learn and so cost FLOPs, which fade in), `stackfast grow` and
`plan` (the small model's shape), `growth.apply_growth` (the function to call and the
options it accepts) and the docs.

Adding an operator: write its function `NAME(model, factor, **options) -> Growth` (and
`NAME_ramp(model, spec)` if it fades in) in growth/depth.py, width.py or learned.py, add
one entry below, and tests. The function's name is the operator's public name.

This module imports neither torch, the model nor config.py: config.py reads it at import time.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from stackfast.errors import GrowthError


@dataclass(frozen=True)
class Option:
    """An option of an operator: its name, default, and the config field ('section.key')
    that feeds it in a training run ('' = not settable from a config; `stackfast grow
    --option` and the Python API can still set it)."""
    name: str
    default: Any
    field: str = ""


@dataclass(frozen=True)
class OperatorSpec:
    name: str
    module: str  # the stackfast.growth module that defines the function `name` (and `name`_ramp)
    direction: str  # "depth": more layers; "width": wider layers (hidden, FFN, heads)
    # Built from a layer map (depth.build_from_map): grows an FSDP-sharded model by local
    # copies (option `shard`), so it runs under torchrun; in one process it can consume the
    # small model (option `in_place`). The others change tensor shapes: one process only.
    sharded: bool
    learns: bool  # trains its expansion (LiGO, option `batches`): FLOPs a run counts
    copies_layers: bool  # grown layers are copies of small ones: Adam moments can be copied too
    ramp: bool  # new parts fade in (function `name`_ramp rebuilds the fade-in from a saved spec)
    options: tuple[Option, ...]
    summary: str

    def accepted_options(self) -> tuple[str, ...]:
        """Every keyword the operator's function takes: its options and the job's own."""
        job = (("shard", "in_place") if self.sharded else ()) + (("batches",) if self.learns else ())
        return tuple(o.name for o in self.options) + job

    def options_from(self, cfg) -> dict:
        """The options a training run with config `cfg` passes: those fed by a config field."""
        return {o.name: getattr(getattr(cfg, o.field.split(".")[0]), o.field.split(".")[1])
                for o in self.options if o.field}

    def small_model(self, target, factor: int | None, midas_block: int = 0):
        """The ModelConfig that growing by `factor` turns into `target` (a ModelConfig); factor
        None: a MIDAS step, which adds one block of `midas_block` layers."""
        if factor is None:
            if midas_block < 1 or target.n_layers % midas_block or target.n_layers < 2 * midas_block:
                raise GrowthError(f"a MIDAS stage adds one block of block={midas_block} layers: model.n_layers "
                                  f"{target.n_layers} must be a multiple of it, at least two blocks")
            return dataclasses.replace(target, preset="", n_layers=target.n_layers - midas_block)
        if self.direction == "width":
            scale = width_scale(factor)
            sizes = {"hidden_size": target.hidden_size, "ffn_size": target.ffn_size,
                     "n_heads": target.n_heads, "n_kv_heads": target.n_kv_heads}
            bad = [k for k, v in sizes.items() if v % scale]
            if bad:
                raise GrowthError(f"width growth by factor {factor}: model.{bad[0]} {sizes[bad[0]]} is not "
                                  f"divisible by {scale}")
            return dataclasses.replace(target, preset="", **{k: v // scale for k, v in sizes.items()})
        if target.n_layers % factor:
            raise GrowthError(f"depth growth by factor {factor}: model.n_layers {target.n_layers} is not "
                              f"divisible by {factor}")
        return dataclasses.replace(target, preset="", n_layers=target.n_layers // factor)


def width_scale(factor: int) -> int:
    """Width operators multiply hidden size, FFN size and head counts by sqrt(factor), so
    the parameters grow about `factor`-fold (head_dim kept): both directions of that rule
    (small model from target, width.target_config) use this."""
    scale = math.isqrt(factor)
    if scale * scale != factor:
        raise GrowthError(f"width growth by factor {factor}: hidden and FFN sizes scale by sqrt({factor}), "
                          f"which is not an integer (give hidden_size and ffn_size to grow by other ratios)")
    return scale


SEED = Option("seed", 0, "train.seed")
WIDTH_TARGET = (Option("hidden_size", None), Option("ffn_size", None))  # None: times width_scale(factor)
LIGO = (Option("steps", 100, "growth.learn_steps"), Option("lr", 1e-3), SEED)

OPERATORS = {spec.name: spec for spec in [
    OperatorSpec("stack", "depth", "depth", sharded=True, learns=False, copies_layers=True, ramp=False,
                 options=(Option("layers", "all", "growth.layers"), Option("order", "stack", "growth.order"),
                          Option("block", 0, "growth.block"), Option("noise", 0.0, "growth.noise"), SEED),
                 summary="G_stack: the layers repeated factor times (the paper's operator)"),
    OperatorSpec("depth_zero", "depth", "depth", sharded=True, learns=False, copies_layers=True, ramp=False,
                 options=(Option("order", "interpolate"),),
                 summary="layers duplicated, each copy's output projections zeroed: function preserving"),
    OperatorSpec("depth_random", "depth", "depth", sharded=True, learns=False, copies_layers=False, ramp=True,
                 options=(Option("ramp_steps", 100, "growth.ramp_steps"), SEED),
                 summary="fresh layers after each small one, faded in over ramp_steps (MSG)"),
    OperatorSpec("depth_learn", "learned", "depth", sharded=False, learns=True, copies_layers=False, ramp=False,
                 options=LIGO, summary="LiGO depth: layer mixing learned for learn_steps steps from G_stack's"),
    OperatorSpec("width_direct", "width", "width", sharded=False, learns=False, copies_layers=False, ramp=False,
                 options=WIDTH_TARGET + (SEED, Option("noise", 0.0, "growth.noise")),
                 summary="Net2Net split: new units copy old ones (noise > 0 lets copies diverge)"),
    OperatorSpec("width_zero", "width", "width", sharded=False, learns=False, copies_layers=False, ramp=False,
                 options=WIDTH_TARGET + (SEED,), summary="new units random, their outputs zero"),
    OperatorSpec("width_random", "width", "width", sharded=False, learns=False, copies_layers=False, ramp=True,
                 options=WIDTH_TARGET + (Option("ramp_steps", 100, "growth.ramp_steps"), SEED),
                 summary="new units random, faded in over ramp_steps (MSG)"),
    OperatorSpec("width_learn", "learned", "width", sharded=False, learns=True, copies_layers=False, ramp=False,
                 options=LIGO[:2] + WIDTH_TARGET + (SEED,),
                 summary="LiGO width: expansion learned for learn_steps steps"),
]}


def operators_where(flag: str) -> list[str]:
    """The names of the operators whose spec has `flag` ("sharded", "learns", ...) set."""
    return [name for name, spec in OPERATORS.items() if getattr(spec, flag)]


def operator_spec(name: str) -> OperatorSpec:
    """The spec of operator `name`; a GrowthError naming the known ones otherwise."""
    if name not in OPERATORS:
        raise GrowthError(f"unknown growth operator {name!r}; known: {', '.join(OPERATORS)}")
    return OPERATORS[name]
