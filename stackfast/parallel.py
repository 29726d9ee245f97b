"""How the model is spread over processes and wrapped for speed and memory.

Kept out of model.py so the model stays a plain nn.Module:
- `init_distributed` joins the process group when the job was launched by torchrun
  (RANK / WORLD_SIZE / LOCAL_RANK in the environment): NCCL on GPU, gloo on CPU, and the
  device mesh: 1-D over all processes ("dp_shard") for FSDP, or, with
  parallel.replicate_degree = R > 1, 2-D (R, world_size / R) named ("dp_replicate",
  "dp_shard") for HSDP. Without torchrun it returns a single-process World and creates
  no process group.
- `wrap_model` applies activation checkpointing and torch.compile per transformer block,
  then (under torchrun) FSDP2 `fully_shard` per block and on the root. Every parameter
  becomes a DTensor sharded on dim 0 across the mesh's "dp_shard" dimension (placements
  (Shard(0),) for FSDP, (Replicate(), Shard(0)) for HSDP); with bf16 compute the shards are
  gathered as bf16 for forward/backward, gradients are reduced in fp32 and the
  optimizer updates the fp32 shards (the master weights).

HSDP: given a 2-D mesh, FSDP2 all-gathers parameters and reduce-scatters gradients within
a shard group (world_size / R consecutive ranks: one node when R is the number of nodes,
as torchrun numbers ranks node by node), then all-reduces each gradient shard across the
R groups, once per optimizer step (after the last micro-batch with defer_grad_sync): the
only traffic between nodes. The optimizer updates each group's identical copy of the
shards; the result is the same average gradient as FSDP over all processes. Everything
else holds unchanged: the data split, the all-reduces of metrics over the world, DCP
checkpoints (DCP saves each replicated shard once and reshards on load, so a checkpoint
resumes under FSDP, HSDP or one process), the gradient norm (a DTensor norm reduces over
the shard dimension only, so replicas are not counted twice) and G_stack's local copies
(a copy has its source's shape and placements, so its local shard is its source's).
Parameter names do not change (state-dict keys are the plain model's), so checkpoints do
not depend on these options.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from stackfast.config import ConfigError, ParallelConfig
from stackfast.float8 import plain
from stackfast.model import Transformer, init_parameter


@dataclass
class World:
    """This process's place in the job. mesh is None for a plain single-process run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: DeviceMesh | None = None  # 1-D ("dp_shard",) or, for HSDP, 2-D ("dp_replicate", "dp_shard")

    @property
    def replicate_degree(self) -> int:
        """Copies of the sharded model state (1 for FSDP, R for HSDP)."""
        return self.mesh["dp_replicate"].size() if self.mesh is not None and self.mesh.ndim == 2 else 1

    @property
    def strategy(self) -> str:
        """How parameters are spread, for the start-up line: 'FSDP', or 'HSDP 2 x 4' (replicas x shards)."""
        r = self.replicate_degree
        return f"HSDP {r} x {self.world_size // r}" if r > 1 else "FSDP"

    @property
    def distributed(self) -> bool:
        """Launched by torchrun: parameters are FSDP-sharded DTensors (even with one process)."""
        return self.mesh is not None

    @property
    def main(self) -> bool:
        """Rank 0 writes logs, metrics and the non-sharded checkpoint files."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def check_replicate_degree(replicate_degree: int, world_size: int) -> None:
    """parallel.replicate_degree must divide the number of processes (one line otherwise)."""
    if world_size == 1 and replicate_degree > 1:
        raise ConfigError(f"parallel.replicate_degree: {replicate_degree} needs torchrun with a multiple of "
                          f"{replicate_degree} processes (HSDP); this run has 1 process")
    if replicate_degree < 1 or world_size % replicate_degree:
        raise ConfigError(f"parallel.replicate_degree: {replicate_degree} does not divide the world size "
                          f"({world_size} process{'es' if world_size != 1 else ''}); use a divisor of "
                          f"{world_size}, e.g. the number of nodes")


def init_distributed(device: torch.device, replicate_degree: int = 1) -> tuple[World, torch.device]:
    """Join torchrun's process group (if launched by it); returns the World and this rank's device.

    On GPU each process takes cuda:LOCAL_RANK. The group is destroyed by `shutdown`.
    replicate_degree (parallel.replicate_degree): R > 1 builds the 2-D HSDP mesh
    (R, world_size / R); it must divide the world size (1 without torchrun), checked
    before the process group is joined, so a bad value is one error on every rank and
    nothing is written.
    """
    world_size = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1
    check_replicate_degree(replicate_degree, world_size)
    if not launched_by_torchrun():
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index not in (None, local_rank):
            raise ConfigError(f"train.device: {device} under torchrun; use 'auto' or 'cuda' "
                              f"(each process takes cuda:LOCAL_RANK)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if replicate_degree > 1:  # ranks r * shard + s: each shard group is consecutive ranks (a node)
        mesh = init_device_mesh(device.type, (replicate_degree, world_size // replicate_degree),
                                mesh_dim_names=("dp_replicate", "dp_shard"))
    else:
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp_shard",))
    return World(rank, world_size, local_rank, mesh), device


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank (collective; a no-op in a single process)."""
    if world.distributed:
        dist.barrier()


def wrap_model(model: Transformer, cfg: ParallelConfig, world: World, bf16: bool) -> Transformer:
    """Block options (activation checkpointing, compile), then FSDP2 under torchrun; in place.

    bf16: compute in bf16 (FSDP gathers bf16 parameters and reduces gradients in fp32;
    the sharded fp32 parameters stay the master weights).
    """
    apply_block_options(model, cfg)
    if not world.distributed:
        return model
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    # One FSDP unit per block: its parameters are all-gathered just before the block runs
    # and freed after it (reshard_after_forward), so only one block is ever unsharded.
    for block in model.layers:
        fully_shard(block, mesh=world.mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=mp)
    # The root unit holds what is left: embeddings, final norm, LM head.
    fully_shard(model, mesh=world.mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=mp)
    return model


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Whether this backward reduce-scatters gradients (FSDP only). Off on the non-final
    micro-steps of an accumulation: gradients then accumulate unsharded, and one reduction
    after the last micro-step averages all of them (less communication, more memory)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly DTensor) tensor; in-place writes to it are local. Under
    float8 all-gather the local shard is torchao's wrapper without storage: its data tensor
    is returned (float8.plain)."""
    return plain(t.to_local() if isinstance(t, DTensor) else t)


def local_part(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of `full` (the whole of parameter p) that this rank holds of p.

    FSDP2 shards dim 0 like torch.chunk (the last shards may be smaller or empty) over the
    mesh dimension whose placement is Shard(0) ("dp_shard"), and replicates over the others
    (HSDP's "dp_replicate"): this rank's rows are chunk k of the full tensor, k its
    coordinate on the shard dimension (not its global rank). No communication needed.
    """
    if not isinstance(p, DTensor):
        return full
    mesh = p.device_mesh
    part = full
    for dim, placement in enumerate(p.placements):  # mesh dimensions in order, as DTensor shards
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:  # e.g. _StridedShard (FSDP + TP), Partial: not produced here
            raise NotImplementedError(f"local_part: placement {placement} of a {tuple(p.shape)} parameter")
        chunks = part.chunk(mesh.size(dim), dim=placement.dim)
        k = mesh.get_local_rank(dim)
        part = chunks[k] if k < len(chunks) else part.narrow(placement.dim, 0, 0)
    return part


@torch.no_grad()
def init_parameters(named_parameters, cfg, generator: torch.Generator | None = None) -> None:
    """The seeded init (model.init_parameter) of materialised, possibly sharded parameters.

    Each parameter is drawn whole, in order, from `generator` (the global RNG without one),
    the same on every rank, and each rank keeps its rows of it: the same weights at any
    world size, with only one whole parameter at a time in memory.
    """
    for name, p in named_parameters:
        full = torch.empty(p.shape, device=local(p).device, dtype=p.dtype)
        init_parameter(name, full, cfg, generator)
        local(p).copy_(local_part(p, full))


def apply_block_options(model: Transformer, cfg: ParallelConfig) -> Transformer:
    """Wrap blocks for activation checkpointing and/or compile them, in place.

    'full' recomputes every block's activations in backward: memory O(layers * hidden)
    instead of O(layers * everything a block keeps). 'selective' does it for every other
    block (the even-numbered ones): about half the activation memory saved for half the
    recompute. The wrapper strips its own prefix from state_dict keys.
    """
    for i, block in enumerate(model.layers):
        if cfg.activation_checkpointing == "full" or (cfg.activation_checkpointing == "selective" and i % 2 == 0):
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if cfg.compile:
            block.compile()
        model.layers[i] = block
    return model


def strip_block_options(model: Transformer) -> Transformer:
    """Undo the checkpoint wrappers in place (growth copies plain blocks), keeping weights."""
    for i, block in enumerate(model.layers):
        model.layers[i] = getattr(block, "_checkpoint_wrapped_module", block)
    return model
