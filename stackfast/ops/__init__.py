"""stackfast kernels, importable by any project: `from stackfast.ops import ...`.

Each module holds the Triton (or C++/CUDA) kernel, its launcher, the autograd
function, the pure-PyTorch `*_ref` reference and the public function.
"""

from stackfast.ops.replicate import extension_info, replicate_, replicate_ref

__all__ = ["extension_info", "replicate_", "replicate_ref"]
