"""Fused linear cross-entropy: the mean cross-entropy of `hidden @ weight.T` against targets,
computed chunk by chunk over tokens, never holding the (tokens x vocab) logits.

    loss = mean over tokens t with targets[t] != ignore_index of
           lse_t - logits[t, targets[t]] + z_loss * lse_t**2,   lse_t = logsumexp(logits[t])
    (0 when there is no such token: see linear_cross_entropy)

The gradients of hidden and weight are computed in the forward, one chunk of tokens at a
time (the logits chunk is turned in place into the softmax gradient, then two matmuls),
and the backward only scales them by the upstream gradient: the peak holds one
(chunk x vocab) fp32 block instead of the full logits, their fp32 upcast and their
gradient (Liger-Kernel's FusedLinearCrossEntropy does the same).

Layers: the Triton kernel that turns a logits chunk into its loss rows and, in place,
its gradient (one program per row, two passes over the vocab with an online max) ->
its launcher registered as the custom op "stackfast::cross_entropy_grad_" (fake
implementation for torch.compile) -> the chunk loop in a torch.autograd.Function (the
matmuls stay cuBLAS / the CPU BLAS) -> the public `linear_cross_entropy`. On CPU tensors
the chunk step is plain PyTorch (the chunking is what saves memory there); the Triton
kernel runs on CUDA tensors, or where asked with `use_kernel=True` (the interpreter).
`linear_cross_entropy_ref` is the pure-PyTorch reference (the full logits).

Accumulation is fp32: logits chunks are upcast, the weight gradient is summed in fp32.
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from stackfast.ops import _launch

# Vocab columns the chunk kernel reads at a time (a row is swept in blocks, the last one
# ragged unless the vocab is a multiple): on a GPU 4096 at 8 warps; under the interpreter on
# CPU 1024. Module constants, so tests can run either under either.
GPU_BLOCK_V = 4096
CPU_BLOCK_V = 1024


@triton.jit
def _cross_entropy_grad_kernel(logits_ptr, targets_ptr, loss_ptr, n_cols, stride_row, ignore_index, z_loss,
                               BLOCK_V: tl.constexpr):
    # One program per row: pass 1 finds max and sum(exp) online, pass 2 overwrites the row
    # with d(loss_row)/d(logits) = softmax * (1 + 2 z lse) - onehot(target), 0 when ignored.
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    # An out-of-range target must not read outside the row: read column 0 instead. The row's
    # loss is then meaningless, and linear_cross_entropy raises for it (_check_targets).
    safe_target = tl.where(valid & (target >= 0) & (target < n_cols), target, 0)
    cols = tl.arange(0, BLOCK_V)
    # a finite floor, not -inf: lanes that have seen only padding then give exp(floor - m) = 0, never nan
    m = tl.full([BLOCK_V], -3.0e38, tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        x = tl.load(base + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
    lse = m_row + tl.log(s_row)
    x_target = tl.load(base + safe_target).to(tl.float32)
    loss = lse - x_target + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    scale = tl.where(valid, 1.0 + 2.0 * z_loss * lse, 0.0)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) * scale - tl.where((offs == safe_target) & valid, 1.0, 0.0)
        tl.store(base + offs, grad.to(logits_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("stackfast::cross_entropy_grad_", mutates_args=("logits",))
def _cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                         z_loss: float) -> torch.Tensor:
    """logits (rows, vocab), contiguous rows; targets (rows,). Returns the per-row loss (fp32,
    0 where ignored) and overwrites logits with the per-row gradient (not divided by the count)."""
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    if n_rows:
        block = min(triton.next_power_of_2(n_cols), GPU_BLOCK_V if logits.is_cuda else CPU_BLOCK_V)
        _cross_entropy_grad_kernel[(n_rows,)](logits, targets.contiguous(), loss, n_cols, logits.stride(0),
                                              ignore_index, z_loss, BLOCK_V=block, num_warps=8 if block >= 2048 else 4)
    return loss


@_cross_entropy_grad_.register_fake
def _(logits, targets, ignore_index, z_loss):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def _chunk_grad_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, z_loss: float,
                      need_grad: bool) -> torch.Tensor:
    """The PyTorch twin of the kernel on an fp32 chunk (rows, vocab): per-row loss, logits
    overwritten in place by their gradient when need_grad."""
    valid = targets != ignore_index
    # out-of-range targets read column 0, as in the kernel (linear_cross_entropy raises for
    # them; on CUDA a gather out of range would be a device-side assert, which ends the process)
    safe = torch.where(valid & (targets >= 0) & (targets < logits.shape[1]), targets, 0)
    lse = torch.logsumexp(logits, dim=-1)  # (rows,)
    loss = lse - logits.gather(1, safe[:, None]).squeeze(1)
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, 0.0)
    if need_grad:
        probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
        scale = torch.where(valid, 1.0 + 2.0 * z_loss * lse, 0.0)
        probs.mul_(scale[:, None])
        rows = torch.arange(len(safe), device=logits.device)
        probs[rows, safe] -= valid.to(probs.dtype)
    return loss


def default_chunk_size(n_tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk: the logits chunk about as large as the hidden states (Liger's rule,
    a power of two), so the extra memory stays near one copy of the input."""
    chunks = triton.cdiv(vocab, hidden)
    return max(1, min(n_tokens, triton.next_power_of_2(triton.cdiv(n_tokens, chunks))))


_ADDMM_OUT_DTYPE = [True]  # whether addmm(..., out_dtype=fp32) runs here (CUDA builds have it)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (fp32) + a @ b; for bf16/fp16 a, b the product is summed in fp32 by the matmul itself
    where torch offers it (no low-precision (vocab x hidden) temporary), else through one."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if a.is_cuda and _ADDMM_OUT_DTYPE[0]:
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # an older torch: no out_dtype overload
            _ADDMM_OUT_DTYPE[0] = False
    return acc.add_(a @ b)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, z_loss, chunk_size, use_kernel):
        # hidden (N, H), weight (V, H), targets (N,)
        n_tokens = hidden.shape[0]
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = hidden.new_empty(hidden.shape) if need_dh else None  # contiguous
        # fp32 accumulation of the weight gradient across chunks
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.promote_types(
            weight.dtype, torch.float32)) if need_dw else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        loss_sum = torch.zeros((), device=hidden.device, dtype=acc)
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            h_chunk = hidden[start:end]
            logits = (h_chunk @ weight.T).to(acc)  # (chunk, V) fp32: the only vocab-sized buffer
            if use_kernel:
                rows = _cross_entropy_grad_(logits, targets[start:end], ignore_index, z_loss)
            else:
                rows = _chunk_grad_torch(logits, targets[start:end], ignore_index, z_loss, need_dh or need_dw)
            loss_sum += rows.sum()
            if need_dh or need_dw:
                grad_logits = logits.to(hidden.dtype)  # (chunk, V)
                if need_dh:
                    torch.matmul(grad_logits, weight, out=grad_hidden[start:end])
                if need_dw:
                    grad_weight = _accumulate(grad_weight, grad_logits.T, h_chunk)
            del logits
        # Mean over the counted tokens, the count taken as at least 1 (no host sync): with no
        # counted token every row's loss and gradient is 0, so the loss is 0 and the gradients
        # exact zeros (1 / 0 would make them 0 * inf = nan). See linear_cross_entropy.
        count = (targets != ignore_index).sum().clamp_(min=1)
        inv_count = 1.0 / count.to(acc)
        if need_dw:
            grad_weight = grad_weight.mul_(inv_count).to(weight.dtype)  # scaled in fp32, then one rounding
        # Kept on ctx, not saved for backward: the backward scales them in place (no second
        # copy of the gradients; grad_hidden by 1 / count there too: one rounding) and hands
        # them over, so it can run once.
        ctx.grads = (grad_hidden, grad_weight)
        ctx.inv_count = inv_count
        return loss_sum * inv_count

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: the backward runs once (its gradients are computed in the "
                               "forward and handed over); recompute the loss to differentiate it again")
        grad_hidden, grad_weight = ctx.grads
        if grad_hidden is not None:
            grad_hidden.mul_((grad_loss * ctx.inv_count).to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        ctx.grads = None
        return grad_hidden, grad_weight, None, None, None, None, None


def _raise_for_target(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """The IndexError for the first counted target outside [0, vocab) (there is one)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    index = int(bad.nonzero()[0, 0])  # host sync, on the error path only
    raise IndexError(f"linear_cross_entropy: target {int(targets[index])} (token {index}) is out of range for a "
                     f"vocab of {vocab}: targets must lie in [0, {vocab}) or equal ignore_index ({ignore_index})")


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int):
    """Check that every target is in [0, vocab) or ignore_index; returns a function to call once
    the loss is queued, which raises IndexError naming the first bad target.

    CPU tensors are checked at once. CUDA tensors: the flag is computed on the device and
    copied without blocking into pinned host memory, behind an event; the returned function
    waits for that event (the host sync) after the caller has queued the whole loss, so the
    GPU has the loss to compute while the host waits. Meanwhile nothing reads out of range: the
    kernel and the PyTorch chunk step read column 0 for an out-of-range target. Not a device-side
    assert: tl.device_assert is compiled out unless Triton's debug mode is on, and a failed
    device assert (like F.cross_entropy's on CUDA) leaves the CUDA context unusable.
    """
    if targets.is_cuda and torch.cuda.is_current_stream_capturing():
        return lambda: None  # no host sync inside a CUDA graph; the reads stay in range regardless
    bad = ((targets != ignore_index) & ((targets < 0) | (targets >= vocab))).any()
    if not bad.is_cuda:
        if bad:
            _raise_for_target(targets, vocab, ignore_index)
        return lambda: None
    flag = torch.empty((), dtype=torch.bool, pin_memory=True)
    flag.copy_(bad, non_blocking=True)  # on the current stream of the targets' device
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(bad.device))

    def finish():
        copied.synchronize()  # host sync: waits for the work queued before the loss, not for the loss
        if flag.item():
            _raise_for_target(targets, vocab, ignore_index)
    return finish


def linear_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, z_loss: float = 0.0, chunk_size: Optional[int] = None,
                         use_kernel: Optional[bool] = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ lm_head_weight.T` against `targets` (+ z_loss * mean lse^2),
    as `F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)`, never holding the
    full logits. hidden (..., H), lm_head_weight (V, H), targets (...) int64. Returns an fp32 scalar
    (fp64 for fp64 inputs: then every step is fp64, a chunked accuracy reference).

    No counted token (every target is ignore_index, or no tokens at all): the loss is 0.0 and
    the gradients are exact zeros, where F.cross_entropy's mean over zero elements gives nan
    (0 / 0). The rule is sum / max(count, 1), the same as linear_cross_entropy_ref: a training
    loss needs it, since a fully masked micro-batch then adds nothing to an accumulated step
    instead of making it nan, and it is what Hugging Face's loss gives for such a batch with
    num_items_in_batch (its sum over no tokens, 0, divided by the step's count).

    A target outside [0, V) other than ignore_index raises IndexError, as F.cross_entropy does
    (the check: _check_targets; on CUDA one host sync, after the loss is queued).

    chunk_size: tokens per chunk (default: default_chunk_size). use_kernel: the Triton chunk
    kernel (default on CUDA tensors but fp64; True on CPU needs TRITON_INTERPRET=1), else PyTorch.
    Under autocast the matmuls run in the autocast dtype, as nn.Linear's would.
    """
    if lm_head_weight.ndim != 2 or hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: lm_head_weight must be (vocab, hidden={hidden.shape[-1]}), "
                         f"got {tuple(lm_head_weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets must have shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if use_kernel is None:
        use_kernel = hidden.is_cuda and hidden.dtype != torch.float64  # the kernel computes in fp32
    if use_kernel:
        _launch.check_device("linear_cross_entropy", hidden, lm_head_weight, targets)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, lm_head_weight = hidden.to(dtype), lm_head_weight.to(dtype)
    elif hidden.dtype != lm_head_weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden {hidden.dtype} and weight {lm_head_weight.dtype} differ "
                         f"(outside autocast)")
    hidden2d = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    n_tokens = hidden2d.shape[0]
    chunk = chunk_size or default_chunk_size(n_tokens, *lm_head_weight.shape)
    flat_targets = targets.reshape(-1)
    finish_check = _check_targets(flat_targets, lm_head_weight.shape[0], ignore_index)
    with torch.autocast(device_type, enabled=False):
        loss = _LinearCrossEntropy.apply(hidden2d, lm_head_weight, flat_targets, ignore_index,
                                         float(z_loss), max(1, chunk), bool(use_kernel))
    finish_check()
    return loss


def linear_cross_entropy_ref(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int = -100, z_loss: float = 0.0, upcast: bool = False) -> torch.Tensor:
    """Pure-PyTorch reference with the full logits: F.cross_entropy(lm_head(hidden).float()) (+ z-loss).

    The mean is sum / max(count, 1) as in linear_cross_entropy: 0.0 and zero gradients when no
    target is counted (F.cross_entropy's mean would be nan). Out-of-range targets raise
    (F.cross_entropy's own check). upcast=True computes in float64 (the accuracy reference)
    and returns float64.
    """
    if upcast:
        hidden, lm_head_weight = hidden.double(), lm_head_weight.double()
    logits = F.linear(hidden, lm_head_weight).reshape(-1, lm_head_weight.shape[0])  # (tokens, V)
    logits = logits if upcast else logits.float()
    flat = targets.flatten()
    valid = flat != ignore_index
    count = valid.sum().clamp(min=1)
    loss = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="sum") / count
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + z_loss * (lse * lse * valid).sum() / count
    return loss


def compile_specs(arch: int) -> list:
    """The chunk kernel of this module for benchmarks/kernel_stats.py (offline compiles): the
    launcher's GPU config (4096 columns a block at 8 warps, vocab 32000), every dtype."""
    del arch  # the same launch parameters on every architecture
    return [_launch.CompileSpec(
        "linear_cross_entropy.chunk_grad", _cross_entropy_grad_kernel,
        {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "loss_ptr": "*fp32", "n_cols": "i32", "stride_row": "i32",
         "ignore_index": "i32", "z_loss": "fp32"},
        ("logits_ptr", "targets_ptr", "loss_ptr", "n_cols", "stride_row"), {}, (({"BLOCK_V": GPU_BLOCK_V}, 8, 3),),
        {"dtype": dtype}) for dtype in ("bf16", "fp16", "fp32")]
