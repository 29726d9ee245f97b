"""Depthwise growth: G_stack (`stack`), `depth_zero` and `depth_random` (docs/method.md).

All three build the grown model from a *layer map*: entry i says which small-model layer
block i of the grown model copies (-1: a freshly initialised block). Embedding, final
norm and LM head are copied unchanged. The copy reads each source tensor once and
writes all its copies (stackfast.ops.replicate_).

in_place=True (one process; what the training loop does, the small model being dropped
after growth) consumes the small model instead of copying it: its embedding, final norm,
LM head and each layer's first occurrence in the map become the grown model's own
modules, and only the g - 1 further copies are allocated and written. Growth then needs
the memory of the grown model alone (plus its optimizer state), not of both models, and
moves a quarter less data at g = 4.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from stackfast.errors import GrowthError
from stackfast.growth.ramp import Ramp
from stackfast.growth.spec import Growth
from stackfast.model import Transformer
from stackfast.ops import replicate_
from stackfast.parallel import init_parameters, local, local_part

PARTIAL = ("all", "front", "middle", "back")
MIDAS = "midas"


def midas_map(n_layers: int, block: int) -> list[int]:
    """MIDAS's growth step (Saunshi et al. 2024): a model of i blocks of `block` layers,
    B_1 ... B_i, becomes B_1 ... B_m B_m ... B_i with m = ceil(i / 2), one copy of its middle
    block beside it: i + 1 blocks (b -> 2b -> 3b ... over the stages)."""
    if block < 1 or n_layers % block:
        raise GrowthError(f"layers='midas': the model's {n_layers} layers are not a whole number of blocks of "
                          f"block={block} layers")
    middle = math.ceil(n_layers // block / 2)  # the middle block, counted from 1
    end = middle * block
    return list(range(end)) + list(range(end - block, n_layers))


def layer_map(n_layers: int, factor: int | None, layers: str | list[int] = "all", order: str = "stack",
              block: int = 0) -> list[int]:
    """The grown model's layer map.

    layers: 'all' repeats the whole stack (the paper's best); 'front', 'middle', 'back'
    repeat only a window of `block` layers (0: half the layers) so that the grown depth is
    still n_layers * factor (the partial-stacking ablation; 'middle' is the middle-window
    repeat); 'midas' adds one copy of the middle block of `block` layers (midas_map; no
    factor: None); an explicit list is the map itself.
    order: 'stack' repeats the block of layers as a whole (0 1 2 0 1 2 ...),
    'interpolate' repeats each layer in place (0 0 1 1 2 2 ...).
    """
    if layers == MIDAS:
        if factor is not None or order != "stack":
            raise GrowthError("layers='midas' adds one copy of the middle block: it takes no factor (None) and "
                              "order 'stack'")
        return midas_map(n_layers, block)
    if factor is None:
        raise GrowthError(f"layers={layers!r} needs a growth factor (only layers='midas' takes none)")
    if isinstance(layers, (list, tuple)):
        bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < n_layers)]
        if bad:
            raise GrowthError(f"layer map index {bad[0]} out of range for a {n_layers}-layer model")
        if len(layers) <= n_layers:
            raise GrowthError(f"an explicit layer map must be longer than the model's {n_layers} layers, "
                              f"got {len(layers)} entries")
        return list(layers)
    if layers not in PARTIAL:
        raise GrowthError(f"layers: expected one of {', '.join(PARTIAL)}, {MIDAS} or a list of indices, got "
                          f"{layers!r}")
    if order not in ("stack", "interpolate"):
        raise GrowthError(f"order: expected 'stack' or 'interpolate', got {order!r}")
    if block and layers == "all":
        raise GrowthError(f"block={block}: a block size needs layers='front', 'middle' or 'back' ('all' repeats "
                          f"every layer)")
    if not 0 <= block <= n_layers:
        raise GrowthError(f"block={block}: must be between 1 and the model's {n_layers} layers (0: half of them)")
    half = block or max(1, n_layers // 2)
    start = {"all": 0, "front": 0, "middle": (n_layers - half) // 2, "back": n_layers - half}[layers]
    chosen = list(range(n_layers)) if layers == "all" else list(range(start, start + half))
    # The chosen layers appear `repeat` times, the others once, for n_layers * factor in all.
    extra = n_layers * factor - n_layers
    if extra % len(chosen):
        raise GrowthError(f"layers={layers!r}: {len(chosen)} repeated layers cannot fill "
                          f"{n_layers * factor} layers exactly")
    repeat = 1 + extra // len(chosen)
    if order == "interpolate":
        return [i for i in range(n_layers) for _ in range(repeat if i in chosen else 1)]
    return list(range(start)) + chosen * repeat + list(range(start + len(chosen), n_layers))


@torch.no_grad()
def build_from_map(model: Transformer, mapping: list[int], shard=None,
                   generator: torch.Generator | None = None, in_place: bool = False) -> Transformer:
    """A model with len(mapping) blocks, block i a copy of model.layers[mapping[i]]; a -1 entry
    is a freshly initialised block (drawn from `generator`).

    The grown model is built on the meta device and materialised without random init: every
    weight is copied or initialised below. shard: for an FSDP-sharded model, the function that
    wrapped and sharded it (stackfast.parallel.wrap_model with the run's settings); the grown
    model is sharded the same way before materialising, so each rank allocates only its own
    shards. Every parameter is sharded on dim 0 and a copy has its source's shape, so a copy's
    local shard is exactly its source's local shard: the copy is local on every rank, with no
    communication. in_place: adopt the small model's modules (module docstring); not with
    shard (FSDP units cannot move between models).
    """
    if in_place and shard is not None:
        raise GrowthError("in_place growth adopts the small model's modules, which FSDP-sharded models cannot "
                          "give away; grow a sharded model by copying (in_place=False)")
    cfg = dataclasses.replace(model.config, n_layers=len(mapping))
    device = next(model.parameters()).device
    with torch.device("meta"):
        grown = Transformer(cfg)
        if shard is not None:
            grown = shard(grown)
    adopted = set()
    if in_place:
        grown.embed_tokens, grown.norm, grown.lm_head = model.embed_tokens, model.norm, model.lm_head
        grown.rope_cos, grown.rope_sin = model.rope_cos, model.rope_sin  # same head_dim and max_seq_len
        for i, source in enumerate(mapping):
            if source != -1 and source not in adopted:
                grown.layers[i] = model.layers[source]
                adopted.add(source)
        for block in grown.layers:  # only the blocks still on meta get memory
            if next(block.parameters()).is_meta:
                block.to_empty(device=device)
    else:
        grown.materialize(device)
    for i, source in enumerate(mapping):
        if source == -1:
            init_parameters(((f"layers.{i}.{name}", p) for name, p in grown.layers[i].named_parameters()), cfg,
                            generator)
    sources, copies = [], []
    if not in_place:
        for name, src in model.named_parameters():
            if not name.startswith("layers."):
                sources.append(local(src))
                copies.append([local(grown.get_parameter(name))])
    for j, block in enumerate(model.layers):
        dests = [grown.layers[i] for i, m in enumerate(mapping) if m == j and grown.layers[i] is not block]
        if not dests:
            continue
        for name, src in block.named_parameters():
            sources.append(local(src))
            copies.append([local(d.get_parameter(name)) for d in dests])
    _replicate_grouped(sources, copies)
    return grown


def _replicate_grouped(sources: list[torch.Tensor], copies: list[list[torch.Tensor]]) -> None:
    """Copy each source into all its copies, reading it once (replicate_ takes one destination
    list per copy, parallel to the sources): sources are grouped by how many copies they get,
    the same for all with whole-model stacking."""
    by_count: dict[int, list[int]] = {}
    for i, dests in enumerate(copies):
        by_count.setdefault(len(dests), []).append(i)
    for count, idx in by_count.items():
        replicate_([sources[i] for i in idx], [[copies[i][c] for i in idx] for c in range(count)])


def source_name(name: str, mapping: list[int]) -> str:
    """The small-model parameter that grown parameter `name` was copied from."""
    if not name.startswith("layers."):
        return name
    _, index, rest = name.split(".", 2)
    return f"layers.{mapping[int(index)]}.{rest}"


@torch.no_grad()
def copy_optimizer_state(old_state: dict[str, dict], grown: Transformer, mapping: list[int],
                         small: Transformer | None = None) -> dict:
    """Optimizer state for the grown model's parameters: copies of their sources' states.

    old_state maps small-model parameter names to their AdamW state (step, exp_avg,
    exp_avg_sq). Each moment is read once and written to all its copies (replicate_), on
    each rank's local shards under FSDP (a copy's shard is its source's shard). A grown
    parameter that is the small model's own (in_place growth; pass `small`) keeps its state
    as it is, uncopied. Returns {grown parameter: state}, ready for optimizer.state.
    """
    small_params = dict(small.named_parameters()) if small is not None else {}
    new_state, targets = {}, {}
    for name, p in grown.named_parameters():
        source = source_name(name, mapping)
        if source not in old_state:
            continue
        if small_params.get(source) is p:  # adopted, not copied: its state comes along as it is
            new_state[p] = old_state[source]
            continue
        new_state[p] = {k: v.clone() if v.ndim == 0 else torch.empty_like(v) for k, v in old_state[source].items()}
        targets.setdefault(source, []).append(p)
    sources, copies = [], []
    for source, params in targets.items():
        for key, value in old_state[source].items():
            if value.ndim > 0:  # the moments; the 0-d step counter was cloned above
                sources.append(local(value))
                copies.append([local(new_state[p][key]) for p in params])
    _replicate_grouped(sources, copies)
    return new_state


def stack(model: Transformer, factor: int | None, *, layers: str | list[int] = "all", order: str = "stack",
          block: int = 0, noise: float = 0.0, seed: int = 0, shard=None, in_place: bool = False) -> Growth:
    """G_stack: the grown model's blocks are copies of the small model's, by layer map.

    noise = alpha > 0 mixes every block matrix with Gaussian noise, W <- (1 - alpha) W +
    alpha * eps, eps ~ N(0, 2 / (5 d)), and N(0, 1 / (d L^2)) for the output and down
    projections (docs/method.md; alpha = 0.2 was slightly better than none).
    shard, in_place: see build_from_map (the depth operators take both).
    """
    check_noise(noise)
    mapping = layer_map(model.config.n_layers, factor, layers, order, block)
    grown = build_from_map(model, mapping, shard, in_place=in_place)
    if noise > 0:
        add_noise(grown, noise, seed)
    spec = {"operator": "stack", "factor": factor, "layer_map": mapping,
            "layers": layers, "order": order, "block": block, "noise": noise, "seed": seed}
    return Growth(grown, spec)


def check_noise(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise GrowthError(f"noise: alpha must be in [0, 1), got {alpha}")


@torch.no_grad()
def add_noise(model: Transformer, alpha: float, seed: int) -> None:
    """The paper's noise recipe on every block matrix: W <- (1 - alpha) W + alpha * eps (see stack)."""
    d, n_layers = model.config.hidden_size, model.config.n_layers
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.layers.named_parameters():
        if p.ndim < 2:
            continue
        out_proj = name.endswith(("o_proj.weight", "down_proj.weight"))
        std = math.sqrt(1.0 / (d * n_layers ** 2)) if out_proj else math.sqrt(2.0 / (5 * d))
        # Drawn whole, as in one process, and each rank takes its rows: same noise at any world size.
        eps = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * std
        local(p).mul_(1.0 - alpha).add_(local_part(p, eps), alpha=alpha)


def depth_zero(model: Transformer, factor: int, *, order: str = "interpolate", shard=None,
               in_place: bool = False) -> Growth:
    """depth_zero: duplicate blocks; each new copy's attention output and MLP down
    projections are zero, so it is the identity at growth time (function preserving).
    The reference code interleaves copies (1,1,2,2,...), the default order here."""
    mapping = layer_map(model.config.n_layers, factor, "all", order)
    grown = build_from_map(model, mapping, shard, in_place=in_place)
    seen = set()
    with torch.no_grad():
        for block, source in zip(grown.layers, mapping):
            if source in seen:  # a copy, not the first occurrence of that layer
                local(block.self_attn.o_proj.weight).zero_()
                local(block.mlp.down_proj.weight).zero_()
            seen.add(source)
    return Growth(grown, {"operator": "depth_zero", "factor": factor, "layer_map": mapping, "order": order})


def depth_random(model: Transformer, factor: int, *, ramp_steps: int = 100, seed: int = 0, shard=None,
           in_place: bool = False) -> Growth:
    """depth_random: each small-model layer is followed by factor-1 freshly initialised
    blocks, faded in as y = x + c * Block(x) with c ramping 0 -> 1 over ramp_steps (MSG)."""
    n = model.config.n_layers
    mapping = [i if k == 0 else -1 for i in range(n) for k in range(factor)]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    grown = build_from_map(model, mapping, shard, generator, in_place)
    spec = {"operator": "depth_random", "factor": factor, "layer_map": mapping, "ramp_steps": ramp_steps,
            "seed": seed}
    return Growth(grown, spec, depth_random_ramp(grown, spec))


def depth_random_ramp(model: Transformer, spec: dict) -> Ramp:
    """The fade-in of depth_random's new blocks (also re-created on resume)."""
    ramp = Ramp(spec["ramp_steps"])
    ramp.fade_blocks(model, [i for i, m in enumerate(spec["layer_map"]) if m == -1])
    return ramp
