"""Layer replication for G_stack growth: write g-1 exact copies of a list of tensors.

`replicate_(sources, destinations)` copies `sources[i]` into `destinations[c][i]` for
every copy c: `destinations` holds one list per copy, each parallel to `sources`, so the
growth factor is g = len(destinations) + 1. A per-tensor `copy_` loop reads every source
g-1 times; the compiled kernels (csrc/) read it once and write all its copies, moving
1 + (g-1) instead of 2(g-1) tensors' worth of bytes.

Dispatch, decided at each call: CPU tensors go to the C++ extension `stackfast._C`,
CUDA tensors to `stackfast._C_cuda`. Where that module is not built, for other devices,
or with the environment variable STACKFAST_NO_EXTENSION=1, a PyTorch fallback runs
`torch._foreach_copy_` once per copy list. Both paths check the arguments in the same
order and raise the same errors, naming the offending tensor (the dtype is spelt
`Float` by C++ and `torch.float32` by Python).

Copies are not recorded by autograd (like `tensor.data.copy_`), but they bump each
destination's version counter as any in-place op does.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

__all__ = ["replicate_", "replicate_ref", "extension_info", "extension_summary"]

_MODULES = {"cpu": "stackfast._C", "cuda": "stackfast._C_cuda"}


@functools.cache
def _load(module_name: str) -> ModuleType | None:
    # ImportError also covers a module built against another torch (undefined symbols).
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None


def extension_info() -> dict:
    """Which compiled parts import: {"cpu": bool, "cuda": bool} (for `stackfast info`)."""
    return {device: _load(name) is not None for device, name in _MODULES.items()}


def extension_summary() -> str:
    """One line for `stackfast info`: which implementation replicate_ runs on this machine."""
    built = [device for device, present in extension_info().items() if present]
    if os.environ.get("STACKFAST_NO_EXTENSION") == "1":
        return "PyTorch fallback (STACKFAST_NO_EXTENSION=1)"
    if built:
        return f"compiled extension ({', '.join(built)}; other devices: PyTorch fallback)"
    return ("PyTorch fallback (torch._foreach_copy_): the C++/CUDA extension is not built; "
            "`pip install --no-build-isolation .` builds it against the installed torch")


def _extension_for(device: torch.device) -> ModuleType | None:
    if os.environ.get("STACKFAST_NO_EXTENSION") == "1" or device.type not in _MODULES:
        return None
    return _load(_MODULES[device.type])


def replicate_(sources: list[torch.Tensor], destinations: list[list[torch.Tensor]]) -> None:
    """Copy `sources[i]` into `destinations[c][i]` for every copy c, reading each source once.

    All tensors must be on one device and contiguous; each destination must have its
    source's dtype and shape and must not overlap it. Any dtype works (bytes are copied).
    Raises TypeError or ValueError for a malformed list structure and RuntimeError for
    a tensor that breaks the rules, naming it (e.g. `destinations[2][7]`).
    """
    _check_structure(sources, destinations)
    if not sources:
        return
    extension = _extension_for(sources[0].device)
    with torch.no_grad():
        if extension is not None:
            extension.replicate_(sources, destinations)
            return
        _check_tensors(sources, destinations)
        for copies in destinations:
            torch._foreach_copy_(copies, sources)


def replicate_ref(sources: list[torch.Tensor], destinations: list[list[torch.Tensor]]) -> None:
    """Reference: a per-tensor `copy_` loop, reading each source once per copy.

    No checks beyond `copy_`'s own (which also broadcasts and casts); tests and
    benchmarks compare `replicate_` with it.
    """
    with torch.no_grad():
        for copies in destinations:
            for source, destination in zip(sources, copies):
                destination.copy_(source)


def _check_structure(sources, destinations) -> None:
    """The list structure, which the C++ binding cannot report by index."""
    if not isinstance(sources, (list, tuple)):
        raise TypeError(f"replicate_: sources must be a list of tensors, got {type(sources).__name__}")
    for i, source in enumerate(sources):
        if not isinstance(source, torch.Tensor):
            raise TypeError(f"replicate_: sources[{i}] is a {type(source).__name__}, not a tensor")
    if not isinstance(destinations, (list, tuple)):
        raise TypeError("replicate_: destinations must be a list of lists of tensors (one list "
                        f"per copy), got {type(destinations).__name__}")
    for c, copies in enumerate(destinations):
        if not isinstance(copies, (list, tuple)):
            raise TypeError(f"replicate_: destinations[{c}] is a {type(copies).__name__}, not a "
                            "list of tensors")
        if len(copies) != len(sources):
            raise ValueError(f"replicate_: destinations[{c}] holds {len(copies)} tensors but "
                             f"sources holds {len(sources)}")
        for i, destination in enumerate(copies):
            if not isinstance(destination, torch.Tensor):
                raise TypeError(f"replicate_: destinations[{c}][{i}] is a "
                                f"{type(destination).__name__}, not a tensor")


def _check_tensors(sources: list[torch.Tensor], destinations: list[list[torch.Tensor]]) -> None:
    """The checks of csrc/replicate.cpp (check_arguments), in the same order and words."""
    device = sources[0].device
    for i, source in enumerate(sources):
        if source.device != device:
            raise RuntimeError(f"replicate_: sources[{i}] is on {source.device} but sources[0] "
                               f"is on {device}")
        if not source.is_contiguous():
            raise RuntimeError(f"replicate_: sources[{i}] is not contiguous")
        for c, copies in enumerate(destinations):
            destination, name = copies[i], f"destinations[{c}][{i}]"
            if destination.device != source.device:
                raise RuntimeError(f"replicate_: {name} is on {destination.device} but "
                                   f"sources[{i}] is on {source.device}")
            if destination.dtype != source.dtype:
                raise RuntimeError(f"replicate_: {name} has dtype {destination.dtype} but "
                                   f"sources[{i}] has dtype {source.dtype}")
            if destination.shape != source.shape:
                raise RuntimeError(f"replicate_: {name} has shape {list(destination.shape)} but "
                                   f"sources[{i}] has shape {list(source.shape)}")
            if not destination.is_contiguous():
                raise RuntimeError(f"replicate_: {name} is not contiguous")
            if _overlap(source, destination):
                raise RuntimeError(f"replicate_: {name} overlaps sources[{i}]")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory of two contiguous tensors intersects (empty ones never do)."""
    return (a.data_ptr() < b.data_ptr() + b.nbytes and b.data_ptr() < a.data_ptr() + a.nbytes
            and a.nbytes > 0 and b.nbytes > 0)
