"""Fade-in masks for the G_random operators (MSG style): new parts enter as c * part, c: 0 -> 1.

A Ramp holds the current c and a list of forward hooks that apply it; the model code
is untouched. The training loop calls `ramp.set_step(steps_since_growth)` before each
step; once c reaches 1 the hooks are removed and the model is a plain model again.
The masks are derived from the growth spec alone (which blocks or channels are new), so
a run resumed mid-ramp re-creates the same ramp.
"""
from __future__ import annotations

import torch

from stackfast.errors import GrowthError
from stackfast.model import Transformer


class Ramp:
    def __init__(self, steps: int):
        if steps < 1:
            raise GrowthError(f"ramp_steps must be >= 1, got {steps}")
        self.steps = steps
        self.value = 0.0
        self.handles: list = []

    def set_step(self, step: int) -> None:
        """c = step / steps, clamped to [0, 1]; removes the hooks once c reaches 1."""
        self.value = min(1.0, max(0.0, step / self.steps))
        if self.value >= 1.0:
            self.remove()

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def fade_blocks(self, model: Transformer, new_layers: list[int]) -> None:
        """New blocks contribute c * (Block(x) - x): y = x + c * residual update."""
        def hook(module, inputs, output):
            x = inputs[0]
            return x + self.value * (output - x)
        for i in new_layers:
            self.handles.append(model.layers[i].register_forward_hook(hook))

    def fade_channels(self, module: torch.nn.Module, new_from: int, dim: int = -1) -> None:
        """Scale the output channels [new_from:] of `module` along `dim` by c."""
        def hook(mod, inputs, output):
            size = output.shape[dim]
            mask = torch.ones(size, dtype=output.dtype, device=output.device)
            mask[new_from:] = self.value
            shape = [1] * output.ndim
            shape[dim] = size
            return output * mask.view(shape)
        self.handles.append(module.register_forward_hook(hook))
