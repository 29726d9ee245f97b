"""stackfast kernels, importable by any project: `from stackfast.ops import ...`.

Each module holds the Triton (or C++/CUDA) kernel, its launcher, the autograd
function, the pure-PyTorch `*_ref` reference and the public function.
"""

from stackfast.ops.attention import attention, attention_ref
from stackfast.ops.hf import apply_stackfast_kernels, patch_llama, patch_mistral, patch_qwen2
from stackfast.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from stackfast.ops.replicate import extension_info, replicate_, replicate_ref
from stackfast.ops.rms_norm import rms_norm, rms_norm_ref
from stackfast.ops.rope import rope, rope_ref
from stackfast.ops.swiglu import swiglu, swiglu_ref

__all__ = ["apply_stackfast_kernels", "attention", "attention_ref", "extension_info", "linear_cross_entropy",
           "linear_cross_entropy_ref", "patch_llama", "patch_mistral", "patch_qwen2", "replicate_", "replicate_ref",
           "rms_norm", "rms_norm_ref", "rope", "rope_ref", "swiglu", "swiglu_ref"]
