"""stackfast kernels, importable by any project: `from stackfast.ops import ...`.

Each module holds the Triton (or C++/CUDA) kernel, its launcher, the autograd
function, the pure-PyTorch `*_ref` reference and the public function.
"""

from stackfast.ops.attention import attention, attention_ref
from stackfast.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from stackfast.ops.replicate import extension_info, replicate_, replicate_ref
from stackfast.ops.rms_norm import rms_norm, rms_norm_ref
from stackfast.ops.rope import rope, rope_ref
from stackfast.ops.swiglu import swiglu, swiglu_ref

__all__ = ["attention", "attention_ref", "extension_info", "linear_cross_entropy", "linear_cross_entropy_ref",
           "replicate_", "replicate_ref", "rms_norm", "rms_norm_ref", "rope", "rope_ref", "swiglu", "swiglu_ref"]
