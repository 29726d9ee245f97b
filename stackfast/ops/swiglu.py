"""SwiGLU's gate, silu(gate) * up, in one Triton kernel, forward and backward.

    y = silu(g) * u = g * sigmoid(g) * u
    dg = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),   du = dy * silu(g)

PyTorch's `F.silu(gate) * up` reads and writes the (tokens x ffn) activations three
times forward and more backward; here the forward reads g and u once and writes y, the
backward reads dy, g and u once and writes dg and du (recomputing the sigmoid, nothing
saved but the inputs). Elementwise over the flattened tensors: each program walks a run
of blocks.

Layers: kernels -> launchers registered as torch custom ops ("stackfast::swiglu_fwd",
"stackfast::swiglu_bwd", fake implementations, autograd formula) -> the public `swiglu`.
`swiglu_ref` is the pure-PyTorch reference. Arithmetic is fp32 in the kernels.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from stackfast.ops import _launch

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, blocks_per_program, BLOCK: tl.constexpr):
    first = tl.program_id(0).to(tl.int64) * blocks_per_program * BLOCK
    for i in range(blocks_per_program):
        offs = first + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, blocks_per_program, BLOCK: tl.constexpr):
    first = tl.program_id(0).to(tl.int64) * blocks_per_program * BLOCK
    for i in range(blocks_per_program):
        offs = first + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        tl.store(du_ptr + offs, (dy * silu).to(du_ptr.dtype.element_ty), mask=mask)
        dg = dy * u * (sig + silu * (1.0 - sig))
        tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)


def _grid(t: torch.Tensor) -> tuple[int, int]:
    """(programs, blocks per program) covering t's elements: 8 programs per SM on a GPU."""
    n_blocks = triton.cdiv(t.numel(), BLOCK)
    n_programs = max(1, min(n_blocks, _launch.programs_per_device(t.device, per_sm=8)))
    per_program = triton.cdiv(n_blocks, n_programs)
    return triton.cdiv(n_blocks, per_program), per_program


@torch.library.custom_op("stackfast::swiglu_fwd", mutates_args=())
def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    if gate.numel():
        programs, per_program = _grid(gate)
        _swiglu_fwd_kernel[(programs,)](gate, up, y, gate.numel(), per_program, BLOCK=BLOCK, num_warps=4)
    return y


@_swiglu_fwd.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("stackfast::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    if gate.numel():
        programs, per_program = _grid(gate)
        _swiglu_bwd_kernel[(programs,)](dy, gate, up, dg, du, gate.numel(), per_program, BLOCK=BLOCK, num_warps=4)
    return dg, du


@_swiglu_bwd.register_fake
def _(dy, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    return _swiglu_bwd(dy, *ctx.saved_tensors)


_swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in Triton (forward and backward); gate and up of one shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up must match in shape and dtype, got {tuple(gate.shape)} "
                         f"{gate.dtype} and {tuple(up.shape)} {up.dtype}")
    if gate.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"swiglu: gate must be float16, bfloat16 or float32, got {gate.dtype}")
    _launch.check_device("swiglu", gate, up)
    # The op saves its inputs for the backward: contiguous here, so views (the halves of a fused
    # gate-up projection) are copied once, in the forward, and the backward reuses the copies.
    return _swiglu_fwd(gate.contiguous(), up.contiguous())


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """F.silu(gate) * up in the input dtype, or in float64 with upcast=True (returned as float64)."""
    if upcast:
        gate, up = gate.double(), up.double()
    return F.silu(gate) * up


def compile_specs(arch: int) -> list:
    """The kernels of this module for benchmarks/kernel_stats.py (offline compiles): the
    launcher's one config, every dtype."""
    del arch  # the same launch parameters on every architecture
    specs = []
    for dtype in ("bf16", "fp16", "fp32"):
        t = f"*{dtype}"
        specs.append(_launch.CompileSpec(
            "swiglu.fwd", _swiglu_fwd_kernel,
            {"g_ptr": t, "u_ptr": t, "y_ptr": t, "n": "i64", "blocks_per_program": "i32"},
            ("g_ptr", "u_ptr", "y_ptr", "n"), {}, (({"BLOCK": BLOCK}, 4, 3),), {"dtype": dtype}))
        specs.append(_launch.CompileSpec(
            "swiglu.bwd", _swiglu_bwd_kernel,
            {"dy_ptr": t, "g_ptr": t, "u_ptr": t, "dg_ptr": t, "du_ptr": t, "n": "i64", "blocks_per_program": "i32"},
            ("dy_ptr", "g_ptr", "u_ptr", "dg_ptr", "du_ptr", "n"), {}, (({"BLOCK": BLOCK}, 4, 3),),
            {"dtype": dtype}))
    return specs
