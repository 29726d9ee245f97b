"""RMSNorm over the last dimension, optionally fused with the residual add, in Triton.

    normed = h / sqrt(mean(h**2) + eps) * weight,   h = x (+ residual)

Layers: Triton kernels -> launchers registered as torch custom ops
("stackfast::rms_norm_fwd", "stackfast::rms_norm_bwd", with fake implementations so
torch.compile traces through and an autograd formula) -> the public `rms_norm`.
`rms_norm_ref` is the pure-PyTorch reference that tests and benchmarks compare with.

All arithmetic is fp32 inside the kernels; outputs have the input's dtype.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from stackfast.ops import _launch

# One row lives in registers as a single block, so the hidden size is capped: at 8192 (16
# warps) the backward takes 100-128 registers of the 128 a thread may have and does not
# spill (benchmarks/kernel_stats.py, triton 3.7.1); 16384 at 16 warps spills 352-384 B,
# 65536 at 32 warps 5 KB (32 warps leave 64 registers a thread). Wider rows are refused
# here and left to PyTorch by the model and the Hugging Face patch.
MAX_HIDDEN = 8192


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, res_ptr, w_ptr, y_ptr, h_ptr, rstd_ptr, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per row of the (rows, n_cols) contiguous input.
    row_start = tl.program_id(0).to(tl.int64) * n_cols
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    h = tl.load(x_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the output dtype first so normed == rms_norm(new_residual)
        # exactly, and the backward (which reads new_residual) matches the forward.
        h_out = (h + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row_start + cols, h_out, mask=mask)
        h = h_out.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + tl.program_id(0), rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row_start + cols, (h * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, dres_ptr, h_ptr, w_ptr, rstd_ptr, dh_ptr, dw_partial_ptr,
                         n_rows, n_cols, rows_per_program,
                         HAS_DRES: tl.constexpr, BLOCK_N: tl.constexpr):
    # Each program walks a contiguous block of rows and keeps its share of the weight
    # gradient in registers; it writes one partial row, summed on the host side later
    # (no atomics, no contention).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    first_row = pid * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, n_rows)
    row_start = first_row.to(tl.int64) * n_cols  # int64: rows * n_cols may pass 2**31
    for row in range(first_row, last_row):
        dy = tl.load(dy_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        h_hat = h * rstd
        dy_w = dy * w
        # d/dh of h * rstd(h): rstd * (g - h_hat * mean(g * h_hat)), with g = dy * w
        dh = rstd * (dy_w - h_hat * (tl.sum(dy_w * h_hat, axis=0) / n_cols))
        if HAS_DRES:
            # the new_residual output is h itself: its gradient adds straight through
            dh += tl.load(dres_ptr + row_start + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dh_ptr + row_start + cols, dh.to(dh_ptr.dtype.element_ty), mask=mask)
        dw += dy * h_hat
        row_start += n_cols
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    """One power-of-two block covers the row; wider rows get more warps."""
    block = triton.next_power_of_2(n_cols)
    warps = 4 if block < 2048 else 8 if block < 8192 else 16
    return block, warps


@torch.library.custom_op("stackfast::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor],
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: (rows, hidden). Returns (normed, new_residual, rstd (rows,) fp32).

    new_residual is an empty tensor when residual is None: a custom op can return
    neither None nor an alias of its input.
    """
    # The kernel indexes contiguous rows; `rms_norm` passes contiguous x already (so the x
    # saved for the backward is the one the kernel read), this guards direct calls.
    x = x.contiguous()
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    if x.numel() == 0:  # no tokens, or rows of width 0: nothing to launch, nothing to compute
        return y, h, rstd
    block, warps = _block_and_warps(n_cols)
    res = residual.contiguous() if residual is not None else x  # x: an unused placeholder
    _rms_norm_fwd_kernel[(n_rows,)](
        x, res, weight.contiguous(), y, h, rstd, n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block, num_warps=warps)
    return y, h, rstd


@_rms_norm_fwd.register_fake
def _(x, weight, residual, eps):
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), h, x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("stackfast::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, dres: Optional[torch.Tensor], h: torch.Tensor,
                  weight: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, dres, h: (rows, hidden) with h the normalised input. Returns (dh, dweight)."""
    # The kernel indexes contiguous rows: a gradient arriving as a strided or expanded view
    # (slicing, .t() or a sum downstream) is copied here, and so is an h saved non-contiguous
    # by a direct call of the forward op.
    dy, h = dy.contiguous(), h.contiguous()
    n_rows, n_cols = h.shape
    dh = torch.empty_like(h)
    if h.numel() == 0:  # no tokens (the weight gradient is zero), or rows of width 0
        return dh, torch.zeros_like(weight)
    n_programs = max(1, min(n_rows, _launch.programs_per_device(h.device, per_sm=4)))
    rows_per_program = triton.cdiv(n_rows, n_programs)
    dw_partial = torch.empty((n_programs, n_cols), device=h.device, dtype=torch.float32)
    block, warps = _block_and_warps(n_cols)
    _rms_norm_bwd_kernel[(n_programs,)](
        dy, dres.contiguous() if dres is not None else dy, h, weight.contiguous(), rstd, dh,
        dw_partial, n_rows, n_cols, rows_per_program,
        HAS_DRES=dres is not None, BLOCK_N=block, num_warps=warps)
    return dh, dw_partial.sum(0).to(weight.dtype)


@_rms_norm_bwd.register_fake
def _(dy, dres, h, weight, rstd):
    return torch.empty_like(h), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, residual, _ = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)


def _backward(ctx, d_normed, d_new_residual, _d_rstd):
    h, weight, rstd = ctx.saved_tensors
    dres = d_new_residual if ctx.has_residual else None
    dh, dweight = _rms_norm_bwd(d_normed, dres, h, weight, rstd)
    # x and residual enter only through their sum h, so both get dh.
    return dh, dweight, (dh if ctx.has_residual else None), None


_rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _validate(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
    if x.ndim < 1 or weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must have shape (hidden,) matching x's last dim, "
                         f"got weight {tuple(weight.shape)} for x {tuple(x.shape)}")
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} is above the supported "
                         f"{MAX_HIDDEN} (a wider row spills registers); use torch's "
                         f"F.rms_norm for it")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual must match x in shape and dtype, got "
                         f"{tuple(residual.shape)} {residual.dtype} for x {tuple(x.shape)} "
                         f"{x.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"rms_norm: x must be float16, bfloat16 or float32, got {x.dtype}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
             residual: Optional[torch.Tensor] = None):
    """RMSNorm of x (..., hidden) times weight (hidden,), in Triton (forward and backward).

    With `residual` (same shape as x) returns `(normed, new_residual)` where
    `new_residual = x + residual` and `normed = rms_norm(new_residual)`; otherwise `normed`.
    """
    _validate(x, weight, residual)
    _launch.check_device("rms_norm", x, weight, *([] if residual is None else [residual]))
    # (rows, hidden), contiguous: the custom op saves its x input for the backward, which must
    # be the rows the forward kernel read (a strided x, e.g. x[:, :hidden] of a wider tensor,
    # is copied once here, and that copy is the one saved). The row count is spelled out:
    # reshape(-1, 0) is ambiguous and raises for rows of width 0.
    shape2d = (math.prod(x.shape[:-1]), x.shape[-1])
    x2d = x.reshape(shape2d).contiguous()
    res2d = residual.reshape(shape2d).contiguous() if residual is not None else None
    normed, new_residual, _ = _rms_norm_fwd(x2d, weight, res2d, eps)
    if residual is None:
        return normed.view(x.shape)
    return normed.view(x.shape), new_residual.view(x.shape)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                 residual: Optional[torch.Tensor] = None, upcast: bool = False):
    """Pure-PyTorch RMSNorm with rms_norm's signature and returns.

    upcast=False computes in the input dtype, op by op, like plain PyTorch code does;
    upcast=True computes in float64 and returns float64 (the accuracy reference: casting
    back would hide the errors that tests measure).
    """
    if upcast:
        x, weight = x.double(), weight.double()
        residual = residual.double() if residual is not None else None
    h = x + residual if residual is not None else x
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(h.dtype))
    return normed if residual is None else (normed, h)


def compile_specs(arch: int) -> list:
    """The kernels of this module for benchmarks/kernel_stats.py (offline compiles): every
    dtype at hidden sizes that take 4, 8 and 16 warps (the largest: MAX_HIDDEN); one config each (no autotuning)."""
    del arch  # the same launch parameters on every architecture
    specs = []
    for hidden in (1024, 4096, MAX_HIDDEN):
        block, warps = _block_and_warps(hidden)
        for dtype in ("bf16", "fp16", "fp32"):
            t = f"*{dtype}"
            variant = {"hidden": hidden, "dtype": dtype}
            specs.append(_launch.CompileSpec(
                "rms_norm.fwd", _rms_norm_fwd_kernel,
                {"x_ptr": t, "res_ptr": t, "w_ptr": t, "y_ptr": t, "h_ptr": t, "rstd_ptr": "*fp32",
                 "n_cols": "i32", "eps": "fp32"},
                ("x_ptr", "res_ptr", "w_ptr", "y_ptr", "h_ptr", "rstd_ptr", "n_cols"),
                {"HAS_RESIDUAL": True}, (({"BLOCK_N": block}, warps, 3),), variant))
            specs.append(_launch.CompileSpec(
                "rms_norm.bwd", _rms_norm_bwd_kernel,
                {"dy_ptr": t, "dres_ptr": t, "h_ptr": t, "w_ptr": t, "rstd_ptr": "*fp32", "dh_ptr": t,
                 "dw_partial_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32"},
                ("dy_ptr", "dres_ptr", "h_ptr", "w_ptr", "rstd_ptr", "dh_ptr", "dw_partial_ptr", "n_rows",
                 "n_cols"),
                {"HAS_DRES": True}, (({"BLOCK_N": block}, warps, 3),), variant))
    return specs
