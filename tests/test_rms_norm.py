"""stackfast.ops.rms_norm (Triton; the interpreter on CPU) against its fp64 reference."""
import importlib

import pytest
import torch
from conftest import assert_views_match_fp64, assert_within_torch_error

from stackfast.ops import _launch, rms_norm, rms_norm_ref

pytestmark = pytest.mark.usefixtures("on_kernel_device")  # the GPU when there is one (conftest.py)


def _run(fn, x, weight, residual, d_normed, d_new_residual):
    """Forward and backward of one implementation: returns (outputs, gradients)."""
    inputs = [t.detach().clone().requires_grad_() for t in (x, weight)]
    if residual is not None:
        inputs.append(residual.detach().clone().requires_grad_())
        normed, new_residual = fn(*inputs[:2], residual=inputs[2])
        outputs = [normed, new_residual]
        loss = (normed.double() * d_normed).sum() + (new_residual.double() * d_new_residual).sum()
    else:
        outputs = [fn(*inputs)]
        loss = (outputs[0].double() * d_normed).sum()
    loss.backward()
    return [o.detach() for o in outputs], [t.grad for t in inputs]


@pytest.mark.parametrize("dtype, shape, with_residual, weight_dtype", [
    (torch.float32, (2, 3, 80), False, torch.float32),
    (torch.float32, (7, 1000), True, torch.float32),
    (torch.float16, (4, 1000), False, torch.float16),
    (torch.float16, (3, 5, 80), True, torch.float16),
    (torch.float16, (1, 5632), True, torch.float32),  # fp32 master weight, fp16 activations
    (torch.float16, (6, 4096), False, torch.float16),
])
def test_matches_fp64_reference(dtype, shape, with_residual, weight_dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1])).to(weight_dtype)
    residual = torch.randn(shape, dtype=dtype) if with_residual else None
    # Upstream gradients representable in dtype: every implementation sees the same ones.
    d_normed = torch.randn(shape, dtype=dtype).double()
    d_new_residual = torch.randn(shape, dtype=dtype).double()
    args = (x, weight, residual, d_normed, d_new_residual)

    outs, grads = _run(rms_norm, *args)
    torch_outs, torch_grads = _run(rms_norm_ref, *args)
    ref_outs, ref_grads = _run(lambda *a, **kw: rms_norm_ref(*a, **kw, upcast=True), *args)

    assert outs[0].dtype == dtype and grads[1].dtype == weight_dtype
    names = ["normed", "new_residual"][:len(outs)] + ["dx", "dweight", "dresidual"][:len(grads)]
    for name, out, torch_out, ref in zip(names, outs + grads, torch_outs + torch_grads,
                                         ref_outs + ref_grads):
        assert_within_torch_error(out, ref, torch_out, dtype, name)


def test_residual_outputs_are_exact_sum():
    x, residual = torch.randn(3, 80), torch.randn(3, 80)
    normed, new_residual = rms_norm(x, torch.ones(80), residual=residual)
    assert torch.equal(new_residual, x + residual)
    torch.testing.assert_close(normed, rms_norm(x + residual, torch.ones(80)))


def test_errors():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(x, torch.ones(8), residual=torch.randn(2, 7))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        rms_norm(x.double(), torch.ones(8))
    wide = rms_norm_mod().MAX_HIDDEN + 1  # would spill registers: refused, never launched
    with pytest.raises(ValueError, match=f"hidden size {wide} is above the supported"):
        rms_norm(torch.randn(1, wide), torch.ones(wide))


def rms_norm_mod():  # the module: stackfast.ops.rms_norm names the function
    return importlib.import_module("stackfast.ops.rms_norm")


def test_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*rms_norm_ref"):
        rms_norm(torch.randn(2, 8, device="cpu"), torch.ones(8, device="cpu"))


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration agree with the kernels."""
    x, residual = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)
    weight = torch.randn(16, requires_grad=True)
    torch.library.opcheck(torch.ops.stackfast.rms_norm_fwd.default, (x, weight, residual, 1e-5))
    torch.library.opcheck(torch.ops.stackfast.rms_norm_fwd.default, (x, weight, None, 1e-5))


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    x, residual = torch.randn(2, 5, 80, requires_grad=True), torch.randn(2, 5, 80)
    weight = torch.randn(80, requires_grad=True)

    def block(x, weight, residual):
        normed, new_residual = rms_norm(x, weight, residual=residual)
        return (normed * 2).sum() + new_residual.sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    grads_compiled = torch.autograd.grad(compiled(x, weight, residual), (x, weight))
    grads_eager = torch.autograd.grad(block(x, weight, residual), (x, weight))
    for got, want in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, want)


def _with_residual(fn):
    return lambda x, weight, residual=None: fn(x, weight, residual=residual)


# (name, dtype, leaf shapes, views of the leaves -> (x, weight[, residual]), upstream gradients)
STRIDED = [
    # a row-strided x (issue 21: the backward read the caller's strided x as if contiguous)
    ("sliced rows", torch.float32, [(6, 96), (64,)], lambda x, w: (x[:, :64], w),
     lambda: [torch.randn(6, 64)]),
    # the residual path with a transposed residual, a strided weight, a transposed d_normed and
    # an expanded d_new_residual (what a sum downstream sends back)
    ("residual, transposed", torch.float16, [(10, 96), (160,), (80, 10)],
     lambda x, w, r: (x[:, 8:88], w[::2], r.t()),
     lambda: [torch.randn(80, 10).t(), torch.randn(1, 80).expand(10, 80)]),
    # one row broadcast to all tokens, an upstream gradient transposed
    ("expanded", torch.float16, [(1, 48), (48,)], lambda x, w: (x.expand(2, 7, 48), w),
     lambda: [torch.randn(7, 48, 2).permute(2, 0, 1)]),
]


@pytest.mark.parametrize("name, dtype, shapes, views, grad_outputs", STRIDED, ids=[c[0] for c in STRIDED])
def test_strided_inputs_and_gradients(name, dtype, shapes, views, grad_outputs):
    """Non-contiguous x, weight, residual and upstream gradients, forward and backward, against
    the fp64 reference: the kernels index contiguous rows, so every view must be copied (and the
    copy, not the caller's view, saved for the backward)."""
    torch.manual_seed(0)
    leaves = [torch.randn(shape).to(dtype) for shape in shapes]
    leaves[1] = (1 + 0.1 * leaves[1].float()).to(dtype)  # the weight near 1
    grads = [g.to(dtype) for g in grad_outputs()]
    outputs = ["normed", "new_residual"] if len(shapes) == 3 else ["normed"]
    assert_views_match_fp64(_with_residual(rms_norm), _with_residual(rms_norm_ref), leaves, views, grads, dtype,
                            outputs + ["dx", "dweight", "dresidual"][:len(shapes)])


@pytest.mark.parametrize("shape, with_residual", [
    ((0, 64), False), ((2, 0, 48), True),  # no rows (an empty batch)
    ((3, 0), False), ((2, 5, 0), True), ((0,), False), ((0, 0), True),  # rows of width 0
])
def test_empty_inputs(shape, with_residual):
    """Zero rows or zero-width rows: what the reference (and F.rms_norm) give, empty outputs of x's
    shape, gradients of the inputs' shapes and an exactly zero weight gradient, forward and
    backward (zero-width rows used to raise torch's "cannot reshape tensor of 0 elements")."""
    x, weight = torch.randn(shape, requires_grad=True), torch.randn(shape[-1], requires_grad=True)
    residual = torch.randn(shape, requires_grad=True) if with_residual else None
    out = rms_norm(x, weight, residual=residual)
    outs = list(out) if with_residual else [out]
    ref = rms_norm_ref(x, weight, residual=residual)
    assert [o.shape for o in outs] == [o.shape for o in (ref if with_residual else [ref])]
    assert all(o.shape == shape for o in outs)
    sum(o.sum() for o in outs).backward()
    assert x.grad.shape == shape and torch.equal(weight.grad, torch.zeros_like(weight))
    assert residual is None or residual.grad.shape == shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_residual_rounds_the_sum_in_low_precision(dtype):
    """In fp16/bf16 the fused residual add is rounded to the dtype before the norm: new_residual
    is exactly x + residual as PyTorch adds them, and normed is exactly rms_norm(new_residual),
    the tensor the backward reads (normalising the unrounded fp32 sum would break both)."""
    torch.manual_seed(0)
    x, residual = torch.randn(6, 200, dtype=dtype), 8 * torch.randn(6, 200, dtype=dtype)
    weight = (1 + 0.1 * torch.randn(200)).to(dtype)
    normed, new_residual = rms_norm(x, weight, residual=residual)
    assert torch.equal(normed, rms_norm(new_residual, weight))
    if dtype == torch.float16 or not _launch.INTERPRET:
        assert torch.equal(new_residual, x + residual)
    else:  # the interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest even)
        torch.testing.assert_close(new_residual, x + residual, rtol=2**-7, atol=0)
