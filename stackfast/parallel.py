"""How the model is wrapped for speed and memory: activation checkpointing, torch.compile.

Kept out of model.py so the model stays a plain nn.Module. Both options act per
transformer block and keep parameter names unchanged, so checkpoints do not depend on them.
"""
from __future__ import annotations

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from stackfast.config import ParallelConfig
from stackfast.model import Transformer


def apply_block_options(model: Transformer, cfg: ParallelConfig) -> Transformer:
    """Wrap each block for activation checkpointing and/or compile it, in place."""
    for i, block in enumerate(model.layers):
        if cfg.activation_checkpointing == "full":
            # Recompute the block's activations in backward: memory O(layers * hidden) instead of
            # O(layers * everything the block keeps). The wrapper strips its own prefix from
            # state_dict keys, so checkpoints stay compatible.
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
