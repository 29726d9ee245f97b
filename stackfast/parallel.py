"""How the model is spread over processes and wrapped for speed and memory.

Kept out of model.py so the model stays a plain nn.Module:
- `init_distributed` joins the process group when the job was launched by torchrun
  (RANK / WORLD_SIZE / LOCAL_RANK in the environment): NCCL on GPU, gloo on CPU, and a
  1-D device mesh over all processes. Without torchrun it returns a single-process
  World and creates no process group.
- `wrap_model` applies activation checkpointing and torch.compile per transformer block,
  then (under torchrun) FSDP2 `fully_shard` per block and on the root. Every parameter
  becomes a DTensor sharded on dim 0 across the mesh; with bf16 compute the shards are
  gathered as bf16 for forward/backward, gradients are reduced in fp32 and the
  optimizer updates the fp32 shards (the master weights).
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
from torch.distributed.tensor import DTensor

from stackfast.config import ConfigError, ParallelConfig
from stackfast.model import Transformer, init_parameter


@dataclass
class World:
    """This process's place in the job. mesh is None for a plain single-process run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: DeviceMesh | None = None

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


def init_distributed(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group (if launched by it); returns the World and this rank's device.

    On GPU each process takes cuda:LOCAL_RANK. The group is destroyed by `shutdown`.
    """
    if not launched_by_torchrun():
        return World(), device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index not in (None, local_rank):
            raise ConfigError(f"train.device: {device} under torchrun; use 'auto' or 'cuda' "
                              f"(each process takes cuda:LOCAL_RANK)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
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
    """This rank's part of a (possibly DTensor) tensor; in-place writes to it are local."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_part(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of `full` (the whole of parameter p) that this rank holds of p.

    FSDP2 shards dim 0 like torch.chunk (the last shards may be smaller or empty), so
    rank r's rows are chunk r of the full tensor: no communication needed.
    """
    if not isinstance(p, DTensor):
        return full
    mesh = p.device_mesh
    chunks = full.chunk(mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    return chunks[rank] if rank < len(chunks) else full[:0]


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
