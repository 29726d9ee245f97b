"""Widthwise growth: `width_direct`, `width_zero` and `width_random` (docs/method.md).

All three widen hidden size d -> D and FFN size f -> F (default: both times sqrt(factor),
so the parameter count grows about `factor`-fold) and keep head_dim, so attention grows
by whole heads: n_heads and n_kv_heads scale with D, and every new kv head serves a
group of new query heads of the original group size. The number of layers is unchanged.

New units (hidden channels, FFN neurons, heads) always go at the END of their axis: the
small model's weights are the leading block of every grown weight, and the growth spec
(old sizes) says which channels are new, so a ramp can be rebuilt from the spec alone.

The width of every weight axis is one of four *kinds* (WIDTH_AXES): "hidden" (the
residual stream), "ffn" (SwiGLU neurons), "heads" (query heads, the rows of q_proj and
the columns of o_proj) and "kv" (key/value heads). `expand_weights` widens all weights
by one matrix per kind and side, W' = B_out · W · B_inᵀ: width_direct uses it with
copy/split matrices, LiGO (learned.py) with learned ones.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from stackfast.config import ModelConfig
from stackfast.errors import GrowthError
from stackfast.growth.depth import add_noise, check_noise
from stackfast.growth.ramp import Ramp
from stackfast.growth.spec import Growth
from stackfast.growth_operators import width_scale
from stackfast.model import RMSNorm, Transformer, init_parameter

# How each weight widens (matched on the end of its name): (axis, kind, side). Side "out":
# the axis lists units the weight produces (expanded by B_out); "in": units it reads
# (expanded by B_in). Linear weights are (out, in); the embedding's columns are its outputs.
# The vocabulary axis of the embedding and LM head never grows.
WIDTH_AXES = {
    "embed_tokens.weight": [(1, "hidden", "out")],
    "q_proj.weight": [(0, "heads", "out"), (1, "hidden", "in")],
    "k_proj.weight": [(0, "kv", "out"), (1, "hidden", "in")],
    "v_proj.weight": [(0, "kv", "out"), (1, "hidden", "in")],
    "o_proj.weight": [(0, "hidden", "out"), (1, "heads", "in")],
    "gate_proj.weight": [(0, "ffn", "out"), (1, "hidden", "in")],
    "up_proj.weight": [(0, "ffn", "out"), (1, "hidden", "in")],
    "down_proj.weight": [(0, "hidden", "out"), (1, "ffn", "in")],
    "norm.weight": [(0, "hidden", "out")],  # the final norm and both layernorms of every block
    "lm_head.weight": [(1, "hidden", "in")],
}


def target_config(cfg: ModelConfig, factor: int, hidden_size: int | None = None,
                  ffn_size: int | None = None) -> ModelConfig:
    """The grown model's config: hidden and FFN sizes (default: times width_scale(factor), the
    rule OperatorSpec.small_model inverts), heads scaled with the hidden size at the same
    head_dim and query heads per kv head."""
    if hidden_size is None or ffn_size is None:
        scale = width_scale(factor)
        hidden_size = cfg.hidden_size * scale if hidden_size is None else hidden_size
        ffn_size = cfg.ffn_size * scale if ffn_size is None else ffn_size
    for name, new, old in (("hidden_size", hidden_size, cfg.hidden_size), ("ffn_size", ffn_size, cfg.ffn_size)):
        if new < old:
            raise GrowthError(f"width growth: target {name} {new} is smaller than the model's {old}")
    if hidden_size % cfg.head_dim:
        raise GrowthError(f"width growth keeps head_dim {cfg.head_dim}: target hidden_size {hidden_size} "
                          f"is not a multiple of it")
    n_heads = hidden_size // cfg.head_dim
    group = cfg.n_heads // cfg.n_kv_heads  # query heads per kv head, kept
    if n_heads % group:
        raise GrowthError(f"width growth: target hidden_size {hidden_size} gives {n_heads} heads of dim "
                          f"{cfg.head_dim}, not a multiple of the model's {group} query heads per kv head")
    return dataclasses.replace(cfg, preset="", hidden_size=hidden_size, ffn_size=ffn_size, n_heads=n_heads,
                               n_kv_heads=n_heads // group)


def unit_counts(old: ModelConfig, new: ModelConfig) -> dict[str, tuple[int, int]]:
    """(old, new) number of units of each width kind; a head counts as one unit."""
    return {"hidden": (old.hidden_size, new.hidden_size), "ffn": (old.ffn_size, new.ffn_size),
            "heads": (old.n_heads, new.n_heads), "kv": (old.n_kv_heads, new.n_kv_heads)}


def width_spec(operator: str, factor: int, old: ModelConfig, new: ModelConfig, seed: int, **options) -> dict:
    """The growth spec of a width operator: target and source sizes (new units are the trailing ones)."""
    return {"operator": operator, "factor": factor, "hidden_size": new.hidden_size, "ffn_size": new.ffn_size,
            "n_heads": new.n_heads, "n_kv_heads": new.n_kv_heads, "old_hidden_size": old.hidden_size,
            "old_ffn_size": old.ffn_size, "old_n_heads": old.n_heads, "old_n_kv_heads": old.n_kv_heads,
            "seed": seed, **options}


def expand_weights(weights: dict[str, torch.Tensor], b_out: dict[str, torch.Tensor],
                   b_in: dict[str, torch.Tensor], head_dim: int) -> dict[str, torch.Tensor]:
    """The widened weights W' = B_out · W · B_inᵀ, with one (new units, old units) matrix per
    width kind and side (WIDTH_AXES); a head unit spans head_dim consecutive rows or columns."""
    grown = {}
    for name, w in weights.items():
        for axis, kind, side in next(axes for suffix, axes in WIDTH_AXES.items() if name.endswith(suffix)):
            matrix = (b_out if side == "out" else b_in)[kind]
            w = _apply_along(w, axis, matrix, head_dim if kind in ("heads", "kv") else 1)
        grown[name] = w
    return grown


def _apply_along(w: torch.Tensor, axis: int, matrix: torch.Tensor, unit: int) -> torch.Tensor:
    """Multiply `matrix` (new units, old units) into `w` along `axis`, each unit `unit` entries wide."""
    w = w.movedim(axis, 0)
    rest = w.shape[1:]
    units = w.reshape(matrix.shape[1], unit, *rest)  # (old units, unit, *rest)
    grown = torch.einsum("no,o...->n...", matrix, units)  # (new units, unit, *rest)
    return grown.reshape(matrix.shape[0] * unit, *rest).movedim(0, axis)


def copy_maps(old: ModelConfig, new: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """width_direct's source unit of every grown unit, per kind (old units map to themselves).

    Copies are drawn without replacement, round after round, so the multiplicities of the
    old units differ by at most one (all equal when the new size is a multiple of the old).
    A new query head copies the head at the same place in the group of its kv head's source,
    so it attends exactly like its source head."""
    generator = torch.Generator().manual_seed(seed)

    def draw(n_old: int, n_new: int) -> torch.Tensor:
        rounds = -(-(n_new - n_old) // n_old)  # ceil
        return torch.cat([torch.arange(n_old)] + [torch.randperm(n_old, generator=generator)
                                                  for _ in range(rounds)])[:n_new]

    maps = {"hidden": draw(old.hidden_size, new.hidden_size), "ffn": draw(old.ffn_size, new.ffn_size),
            "kv": draw(old.n_kv_heads, new.n_kv_heads)}
    group = old.n_heads // old.n_kv_heads
    maps["heads"] = (maps["kv"][:, None] * group + torch.arange(group)).flatten()  # (n_heads',)
    return maps


def width_direct(model: Transformer, factor: int, *, hidden_size: int | None = None, ffn_size: int | None = None,
           seed: int = 0, noise: float = 0.0) -> Growth:
    """width_direct (Net2Net / bert2BERT split): every new unit copies an old one chosen at
    random (copy_maps): its fan-out rows (and its norm weight, its embedding column) are
    copies, and the fan-in columns of an old unit and all its copies are the original
    divided by their number, so the copies' outputs sum to the original's.

    What is preserved: every FFN neuron and attention head, exactly (any F; heads copied
    with their kv head). The residual stream keeps each copy equal to its source channel,
    but RMSNorm divides by the mean square over all D channels, which is unchanged only
    when every old channel has the same number of copies: exact function preservation
    when D is a multiple of d, otherwise a per-token scale at every norm (paper: exact
    preservation is impossible with RMSNorm in general).
    Symmetry: a unit and its copies have equal weights and get equal gradients, so they
    stay equal under training unless something breaks the tie: noise = alpha > 0 mixes every
    block matrix with the paper's noise recipe (depth.add_noise; Net2Net's remedy: a small
    alpha such as 0.01 breaks the tie and barely moves the function).
    """
    check_noise(noise)
    cfg = target_config(model.config, factor, hidden_size, ffn_size)
    param = next(model.parameters())
    b_out, b_in = {}, {}
    for kind, src in copy_maps(model.config, cfg, seed).items():
        copy = F.one_hot(src, unit_counts(model.config, cfg)[kind][0]).to(param)  # (new, old): row = its source
        b_out[kind] = copy
        b_in[kind] = copy / copy.sum(0)  # each entry divided by its source's number of copies
    weights = {name: p.detach() for name, p in model.named_parameters()}
    with torch.device(param.device):
        grown = Transformer(cfg)
    grown.load_state_dict(expand_weights(weights, b_out, b_in, cfg.head_dim))
    if noise > 0:
        add_noise(grown, noise, seed)
    return Growth(grown, width_spec("width_direct", factor, model.config, cfg, seed, noise=noise))


def _widen_fresh(model: Transformer, cfg: ModelConfig, generator: torch.Generator) -> Transformer:
    """The target model freshly initialised (init_parameter, seeded) with the small model's
    weights in the leading block of every parameter (new units come last on every axis)."""
    with torch.device(next(model.parameters()).device):
        grown = Transformer(cfg)
    with torch.no_grad():
        for name, p in grown.named_parameters():
            init_parameter(name, p, cfg, generator)
            old = model.get_parameter(name)
            p[tuple(slice(0, n) for n in old.shape)].copy_(old)
    return grown


def _new_outputs(model: Transformer, old_hidden: int, old_ffn: int, old_kv_heads: int) -> list:
    """(module, first new output channel) for every module whose outputs carry new units'
    contributions: silencing these outputs silences every new channel, neuron and head.
    New hidden channels come from the embedding, o_proj and down_proj; a new FFN neuron's
    output silu(gate) * up is zero when its up output is; a new head reads a new kv head
    and outputs a weighted average of its values, zero when the new v_proj outputs are."""
    kv = old_kv_heads * model.config.head_dim
    outputs = [(model.embed_tokens, old_hidden)]
    for block in model.layers:
        outputs += [(block.self_attn.v_proj, kv), (block.self_attn.o_proj, old_hidden),
                    (block.mlp.up_proj, old_ffn), (block.mlp.down_proj, old_hidden)]
    return outputs


def _norm_weights(model: Transformer) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, RMSNorm)]


def width_zero(model: Transformer, factor: int, *, hidden_size: int | None = None, ffn_size: int | None = None,
         seed: int = 0) -> Growth:
    """width_zero: new units' output rows are zero, their input columns (and all other new
    entries) random as at init, so every new channel is exactly zero at growth time.

    Zeroed: the weights of the new outputs of the embedding (its columns), o_proj and
    down_proj (hidden channels), v_proj (kv heads) and up_proj (FFN neurons). The q, k and gate rows of new heads and
    neurons stay random: the unit's output is already zero, and zeroing both factors of
    silu(gate) * up would leave both with zero gradient forever (a dead neuron).
    RMSNorm: the mean square over D channels of which D - d are zero is d/D times the
    small model's, so old entries of every norm weight are multiplied by sqrt(d/D); the
    logits then equal the small model's with norm_eps multiplied by D/d. New entries are
    small random (1e-3 N(0, 1)): nonzero so gradients reach the new residual channels
    (their only way to the loss is through the norms), small so they enter gently.
    """
    cfg = target_config(model.config, factor, hidden_size, ffn_size)
    old = model.config
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    grown = _widen_fresh(model, cfg, generator)
    with torch.no_grad():
        for module, start in _new_outputs(grown, old.hidden_size, old.ffn_size, old.n_kv_heads):
            # Output units are rows of a Linear weight (out, in) and columns of the embedding (vocab, d).
            rows = module.weight.T if isinstance(module, torch.nn.Embedding) else module.weight
            rows[start:].zero_()
        for weight in _norm_weights(grown):
            weight[:old.hidden_size] *= math.sqrt(old.hidden_size / cfg.hidden_size)
            weight[old.hidden_size:].normal_(0.0, 1e-3, generator=generator)
    return Growth(grown, width_spec("width_zero", factor, old, cfg, seed))


def width_random(model: Transformer, factor: int, *, hidden_size: int | None = None, ffn_size: int | None = None,
           ramp_steps: int = 100, seed: int = 0) -> Growth:
    """width_random (MSG): all new entries random as at init; the outputs that carry new
    units (those width_zero zeroes) are multiplied by a mask c ramping 0 -> 1 over
    ramp_steps, by forward hooks (random_ramp). Every norm weight is multiplied by
    sqrt(d/D) (new entries start at 1 * sqrt(d/D)), so at c = 0 the logits equal the small
    model's with norm_eps multiplied by D/d, as for width_zero."""
    cfg = target_config(model.config, factor, hidden_size, ffn_size)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    grown = _widen_fresh(model, cfg, generator)
    with torch.no_grad():
        for weight in _norm_weights(grown):
            weight *= math.sqrt(model.config.hidden_size / cfg.hidden_size)
    spec = width_spec("width_random", factor, model.config, cfg, seed, ramp_steps=ramp_steps)
    return Growth(grown, spec, width_random_ramp(grown, spec))


def width_random_ramp(model: Transformer, spec: dict) -> Ramp:
    """The fade-in of width_random's new units, from the spec's old sizes (also on resume)."""
    ramp = Ramp(spec["ramp_steps"])
    for module, start in _new_outputs(model, spec["old_hidden_size"], spec["old_ffn_size"],
                                      spec["old_n_kv_heads"]):
        ramp.fade_channels(module, start)
    return ramp
