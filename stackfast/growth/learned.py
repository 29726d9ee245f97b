"""LiGO, the paper's G_learn: the grown weights are a learned linear map of the small ones.

depth_learn: W'_l = sum_j D[l, j] W_j, one mixing matrix D (new layers, old layers) per
weight kind of a block, starting as G_stack's layer map.
width_learn: W' = B_out · W · B_inᵀ with B_out = B_in = B, one expansion matrix B (new
units, old units) per width kind (width.WIDTH_AXES), starting as [I; small random].

Both follow one recipe: a function builds the grown model's weights from the frozen
small weights and the growth parameters (D or B); a short AdamW phase trains only those
parameters on the grown model's LM loss, run with torch.func.functional_call on the built
weights; the final build is loaded into a plain Transformer.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from stackfast.errors import GrowthError
from stackfast.growth import width
from stackfast.growth.depth import layer_map
from stackfast.growth.spec import Growth
from stackfast.model import Transformer

# batches(step) -> (inputs, targets): int64 (batch, seq) tensors on the model's device.
Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def _check_schedule(steps: int, lr: float) -> None:
    if steps < 0 or not lr > 0:
        raise GrowthError(f"LiGO needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")


def _learn(grown: Transformer, build: Callable[[], dict[str, torch.Tensor]], parameters: list[torch.Tensor],
           batches: Batches, steps: int, lr: float) -> None:
    """Train `parameters` for `steps` AdamW steps on the LM loss of `grown` run with the
    weights build() makes, then load the final build into `grown`. No weight decay: it
    would pull the maps towards zero, away from their stacking / identity start."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    for step in range(steps):
        inputs, targets = batches(step)
        loss = functional_call(grown, build(), (inputs, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        grown.load_state_dict(build())


def mix_layers(shared: dict[str, torch.Tensor], layers: dict[str, torch.Tensor],
               mixing: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The grown model's weights: `shared` (embedding, final norm, LM head) as they are, and
    block l's weight `name` = sum_j D[l, j] W_j, with layers[name] the small blocks' W_j
    stacked (n, *shape) and D = mixing[module name] (new layers, n)."""
    weights = dict(shared)
    for name, stacked in layers.items():
        grown = torch.einsum("lj,j...->l...", mixing[name.split(".")[-2]], stacked)  # (new layers, *shape)
        weights.update({f"layers.{i}.{name}": w for i, w in enumerate(grown)})
    return weights


def depth_learn(model: Transformer, factor: int, *, batches: Batches, steps: int = 100, lr: float = 1e-3,
                seed: int = 0) -> Growth:
    """LiGO depth: grown block l's weight of each kind (q, k, v, o, the two norms, gate,
    up, down) is sum_j D_kind[l, j] W_j over the small model's blocks j. Every D starts
    as G_stack's map (D[l, j] = 1 if j == l % n), so steps=0 gives exactly stack();
    embedding, final norm and LM head are copied. The start is deterministic: `seed` is
    only recorded in the spec (the operators share one set of options)."""
    _check_schedule(steps, lr)
    param = next(model.parameters())
    n = model.config.n_layers
    mapping = layer_map(n, factor)
    shared = {name: p.detach() for name, p in model.named_parameters() if not name.startswith("layers.")}
    # Each block weight of all small layers at once: name -> (n, *shape), frozen.
    layers = {name: torch.stack([block.get_parameter(name).detach() for block in model.layers])
              for name, _ in model.layers[0].named_parameters()}
    stacking = F.one_hot(torch.tensor(mapping), n).to(param)  # (n * factor, n)
    # One D per weight kind, keyed by the module name ("q_proj", "input_layernorm", ...).
    mixing = {name.split(".")[-2]: stacking.clone().requires_grad_() for name in layers}
    with torch.device(param.device):
        grown = Transformer(dataclasses.replace(model.config, n_layers=len(mapping)))
    _learn(grown, lambda: mix_layers(shared, layers, mixing), list(mixing.values()), batches, steps, lr)
    spec = {"operator": "depth_learn", "factor": factor, "steps": steps, "lr": lr, "seed": seed,
            "layer_map": mapping}
    return Growth(grown, spec)


def width_learn(model: Transformer, factor: int, *, batches: Batches, steps: int = 100, lr: float = 1e-3,
                hidden_size: int | None = None, ffn_size: int | None = None, seed: int = 0) -> Growth:
    """LiGO width: W' = B · W · Bᵀ with one B (new units, old units) per width kind
    (hidden, ffn, heads, kv; a head is one unit, so new heads mix whole old heads and RoPE
    pairs stay intact), shared by all layers (the hidden one must be: the residual stream
    adds their outputs) and used on both sides, as LiGO ties a layer's input expansion to
    the output expansion of what feeds it. Target sizes as for the other width operators.

    B starts as [I; R], R ~ N(0, (0.01 / sqrt(old units))^2): a new unit is a random mix
    of the old ones about 1% of their size, so the grown model starts near the small one.
    R = 0 would be a saddle: new units' values and their read-out weights are both
    proportional to R, so the loss would depend on R only at second or higher order.
    steps=0 gives this initial expansion: the old block of every weight is the small
    model's. It is not function preserving: RMSNorm over D channels, D - d of them nearly
    zero, scales the old channels by about sqrt(D/d); the learning phase can correct it.
    """
    _check_schedule(steps, lr)
    param = next(model.parameters())
    cfg = width.target_config(model.config, factor, hidden_size, ffn_size)
    generator = torch.Generator(device=param.device).manual_seed(seed)
    expansions = {}
    for kind, (old, new) in width.unit_counts(model.config, cfg).items():
        noise = torch.randn(new - old, old, generator=generator, device=param.device) * (0.01 / math.sqrt(old))
        expansions[kind] = torch.cat([torch.eye(old, device=param.device), noise]).to(param).requires_grad_()
    weights = {name: p.detach() for name, p in model.named_parameters()}
    with torch.device(param.device):
        grown = Transformer(cfg)
    _learn(grown, lambda: width.expand_weights(weights, expansions, expansions, cfg.head_dim),
           list(expansions.values()), batches, steps, lr)
    spec = width.width_spec("width_learn", factor, model.config, cfg, seed, steps=steps, lr=lr)
    return Growth(grown, spec)
