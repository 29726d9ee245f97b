"""stackfast.ops.rms_norm (Triton; the interpreter on CPU) against its fp64 reference."""
import importlib

import pytest
import torch
from conftest import assert_within_torch_error

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
