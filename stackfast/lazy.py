"""Lazy re-exports for a package's `__init__` (PEP 562): each public name is imported from
its submodule when first asked for, so importing the package imports nothing heavy (torch,
triton) until a name needs it. Used by stackfast.ops, stackfast.data and stackfast.checkpoint."""
import importlib
from typing import Callable


def lazy_exports(package: str, homes: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """The `__getattr__` and `__dir__` of `package`, whose public names live in the submodules
    that `homes` gives (name -> submodule); `namespace` is the package's globals()."""

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{homes[name]}"), name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        """dir() and tab completion list the lazy names before their first use."""
        return sorted(set(namespace) | set(homes))

    return __getattr__, __dir__
