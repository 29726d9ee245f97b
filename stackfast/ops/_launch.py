"""What every Triton op module in stackfast.ops needs at launch time.

`INTERPRET` is read once at import, like `triton.jit` does: the kernels are compiled
for the GPU or run by the Triton interpreter depending on TRITON_INTERPRET at import.
"""
import dataclasses
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def check_device(op_name: str, *tensors: torch.Tensor) -> None:
    """Raise unless the Triton kernels of `op_name` can run on these tensors."""
    if INTERPRET:
        return  # the interpreter runs on CPU tensors (and on CUDA tensors)
    for tensor in tensors:
        if tensor.device.type != "cuda":
            raise RuntimeError(
                f"stackfast.ops.{op_name} needs CUDA tensors (or TRITON_INTERPRET=1 for the "
                f"Triton interpreter); use stackfast.ops.{op_name}_ref for a PyTorch fallback")


def programs_per_device(device: torch.device, per_sm: int) -> int:
    """How many persistent programs fill the device: `per_sm` per SM on a GPU.

    Under the interpreter programs run one after another, so a few are enough.
    """
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count * per_sm


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One kernel at one set of compile-time values, described for an offline compile
    (benchmarks/kernel_stats.py): every Triton op module lists its kernels in a
    `compile_specs(arch)` function that returns these.

    kernel: the report's name ("attention.fwd"); fn: the @triton.jit function;
    signature: argument -> Triton type ("*bf16", "i32", "fp32") of the runtime arguments;
    hinted: the arguments the runtime sees 16-divisible at real sizes (pointers of
    torch's allocations, sizes such as seqlen 4096 or 32 heads), given `tt.divisibility`
    16 as the launcher's specialisation does; constexprs: the compile-time values other
    than the config's; configs: (config constexprs, num_warps, num_stages), the first is
    the default (what STACKFAST_AUTOTUNE=0 runs); variant: what the report prints beside
    the kernel name (head_dim, dtype, causal, ...).
    """
    kernel: str
    fn: object
    signature: dict
    hinted: tuple
    constexprs: dict
    configs: tuple
    variant: dict
