"""stackfast kernels, importable by any project: `from stackfast.ops import ...`.

Each module holds the Triton (or C++/CUDA) kernel, its launcher, the autograd
function, the pure-PyTorch `*_ref` reference and the public function.

The Triton modules are imported on first use (PEP 562 `__getattr__` below), so
`import stackfast.ops` and everything that runs with `kernels = "torch"` work where
triton is not installed; `from stackfast.ops import attention` then raises the
ImportError naming triton.
"""
import sys
import types

from stackfast.lazy import lazy_exports
from stackfast.ops.replicate import extension_info, extension_summary, replicate_, replicate_ref

# Public name -> the module that defines it, imported when the name is first asked for.
_LAZY = {"attention": "attention", "attention_ref": "attention",
         "attention_varlen": "attention",
         "rms_norm": "rms_norm", "rms_norm_ref": "rms_norm",
         "rope": "rope", "rope_ref": "rope",
         "swiglu": "swiglu", "swiglu_ref": "swiglu",
         "linear_cross_entropy": "linear_cross_entropy", "linear_cross_entropy_ref": "linear_cross_entropy",
         "apply_stackfast_kernels": "hf", "patch_llama": "hf", "patch_mistral": "hf", "patch_qwen2": "hf"}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


class _Ops(types.ModuleType):
    """Importing a submodule (`import stackfast.ops.attention`) binds it on this package
    under the function's name; keep the function there, as an eager import would."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Ops


# Every public name: the eager ones imported above and the lazy ones (tests/test_packaging.py
# checks that this list, _LAZY and dir() agree).
__all__ = ["apply_stackfast_kernels", "attention", "attention_ref", "attention_varlen", "extension_info",
           "extension_summary", "linear_cross_entropy", "linear_cross_entropy_ref", "patch_llama", "patch_mistral", "patch_qwen2",
           "replicate_", "replicate_ref", "rms_norm", "rms_norm_ref", "rope", "rope_ref", "swiglu", "swiglu_ref"]
