"""Rotary position embedding (RoPE) of q and k in one Triton kernel, forward and backward.

The rotate-half convention of stackfast.model.apply_rope and Hugging Face Llama:

    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

q is (batch, seqlen, heads, head_dim) and k (batch, seqlen, kv_heads, head_dim) (the
flash-attn layout of stackfast.ops.attention); cos and sin are (seqlen, head_dim), or
(batch or 1, seqlen, head_dim) for per-sequence positions (Hugging Face's position_ids).
Out of place: new q and k are returned, the inputs are left alone (safe under autograd
whatever else reads them; the write is the same one traffic-wise as an in-place one).

One program walks a run of token rows; per row it loads the cos/sin halves once and
rotates every head of q and of k. The backward is the same kernel rotating by minus the
angle: for y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 the input gradient is
dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1.

Layers: kernel -> launcher registered as the torch custom op "stackfast::rope" (fake
implementation, autograd formula) -> the public `rope`. `rope_ref` is the pure-PyTorch
reference. Arithmetic is fp32 in the kernel; outputs have the input's dtype.
"""
import torch
import triton
import triton.language as tl

from stackfast.ops import _launch


@triton.jit
def _rotate_heads(x_ptr, y_ptr, row, n_heads, c1, c2, s1, s2, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr):
    # every head of one token row: x1 (BLOCK_H, BLOCK_HALF) is the first half of each head
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < HEAD_DIM // 2)
    offs = row * n_heads * HEAD_DIM + heads * HEAD_DIM + dims
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + HEAD_DIM // 2, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y_ptr + offs, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + offs + HEAD_DIM // 2, y2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, n_rows, seqlen, cos_batch_stride,
                 n_q_heads, n_k_heads, rows_per_program, HEAD_DIM: tl.constexpr, BLOCK_HQ: tl.constexpr,
                 BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr):
    pid = tl.program_id(0)
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = dims < HEAD_DIM // 2
    first_row = pid * rows_per_program
    for row in range(first_row, tl.minimum(first_row + rows_per_program, n_rows)):
        row64 = row + tl.zeros([], tl.int64)  # int64: rows * heads * head_dim may pass 2**31
        table = (row64 // seqlen) * cos_batch_stride + (row64 % seqlen) * HEAD_DIM
        c1 = tl.load(cos_ptr + table + dims, mask=dmask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + table + HEAD_DIM // 2 + dims, mask=dmask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + table + dims, mask=dmask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + table + HEAD_DIM // 2 + dims, mask=dmask, other=0.0).to(tl.float32)
        _rotate_heads(q_ptr, q_out_ptr, row64, n_q_heads, c1, c2, s1, s2, HEAD_DIM, BLOCK_HQ, BLOCK_HALF, INVERSE)
        _rotate_heads(k_ptr, k_out_ptr, row64, n_k_heads, c1, c2, s1, s2, HEAD_DIM, BLOCK_HK, BLOCK_HALF, INVERSE)


@torch.library.custom_op("stackfast::rope", mutates_args=())
def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, S, H, D), k (B, S, Hk, D); cos, sin (S, D) or (B|1, S, D). Returns rotated (q, k);
    inverse rotates by minus the angle (the backward)."""
    q, k = q.contiguous(), k.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    batch, seqlen, n_q_heads, head_dim = q.shape
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    n_rows = batch * seqlen
    if n_rows == 0:
        return q_out, k_out
    cos_batch_stride = seqlen * head_dim if cos.ndim == 3 and cos.shape[0] > 1 else 0
    n_programs = max(1, min(n_rows, _launch.programs_per_device(q.device, per_sm=8)))
    rows_per_program = triton.cdiv(n_rows, n_programs)
    _rope_kernel[(triton.cdiv(n_rows, rows_per_program),)](
        q, k, cos, sin, q_out, k_out, n_rows, seqlen, cos_batch_stride, n_q_heads, k.shape[2], rows_per_program,
        HEAD_DIM=head_dim, BLOCK_HQ=triton.next_power_of_2(n_q_heads), BLOCK_HK=triton.next_power_of_2(k.shape[2]),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2), INVERSE=inverse, num_warps=4)
    return q_out, k_out


@_rope.register_fake
def _(q, k, cos, sin, inverse):
    return torch.empty_like(q), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope(dq, dk, cos, sin, not ctx.inverse)
    return dq, dk, None, None, None


_rope.register_autograd(_backward, setup_context=_setup_context)


def _validate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"rope: q and k must be (batch, seqlen, heads, head_dim) with the same batch, seqlen "
                         f"and head_dim, got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, seqlen, _, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"rope: head_dim must be even, got {head_dim}")
    ok = cos.shape == sin.shape and cos.shape[-2:] == (seqlen, head_dim) and (
        cos.ndim == 2 or (cos.ndim == 3 and cos.shape[0] in (1, batch)))
    if not ok:
        raise ValueError(f"rope: cos and sin must be ({seqlen}, {head_dim}) or ({batch} or 1, {seqlen}, "
                         f"{head_dim}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        raise ValueError(f"rope: q and k must share a dtype among float16, bfloat16 and float32, got "
                         f"{q.dtype} and {k.dtype}")


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rope(q), rope(k)) in Triton (forward and backward), out of place. q (B, S, H, D),
    k (B, S, Hk, D); cos, sin (S, D) or (B|1, S, D), treated as constants (no gradient)."""
    _validate(q, k, cos, sin)
    _launch.check_device("rope", q, k, cos, sin)
    return _rope(q, k, cos.detach(), sin.detach(), False)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch rope with rope's signature: in the input dtype op by op (cos and sin cast
    to it, as stackfast.model.apply_rope and Hugging Face do), or with upcast=True in float64
    (returned as float64: the accuracy reference)."""
    if upcast:
        q, k, cos, sin = q.double(), k.double(), cos.double(), sin.double()
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :].to(q.dtype), sin[:, :, None, :].to(q.dtype)  # (B|1, S, 1, D) over heads

    def rotate(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
    return rotate(q), rotate(k)


def compile_specs(arch: int) -> list:
    """The kernel of this module for benchmarks/kernel_stats.py (offline compiles): the
    forward rotation (the backward is the same kernel with INVERSE) at the launcher's
    choices for Llama's head dims, 32 query and 8 KV heads (GQA), every dtype."""
    del arch  # the same launch parameters on every architecture
    specs = []
    for head_dim in (64, 128):
        for dtype in ("bf16", "fp16", "fp32"):
            t = f"*{dtype}"
            specs.append(_launch.CompileSpec(
                "rope", _rope_kernel,
                {"q_ptr": t, "k_ptr": t, "cos_ptr": "*fp32", "sin_ptr": "*fp32", "q_out_ptr": t, "k_out_ptr": t,
                 "n_rows": "i32", "seqlen": "i32", "cos_batch_stride": "i32", "n_q_heads": "i32",
                 "n_k_heads": "i32", "rows_per_program": "i32"},
                ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "q_out_ptr", "k_out_ptr", "n_rows", "seqlen",
                 "n_q_heads", "n_k_heads"),
                {"HEAD_DIM": head_dim, "BLOCK_HQ": 32, "BLOCK_HK": 8, "BLOCK_HALF": head_dim // 2, "INVERSE": False},
                (({}, 4, 3),), {"head_dim": head_dim, "dtype": dtype}))
    return specs
