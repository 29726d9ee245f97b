"""stackfast.ops.swiglu (Triton; the interpreter on CPU) against its fp64 reference."""
import pytest
import torch
from conftest import assert_within_torch_error

from stackfast.ops import _launch, swiglu, swiglu_ref

pytestmark = pytest.mark.usefixtures("on_kernel_device")  # the GPU when there is one (conftest.py)


def _run(fn, gate, up, dy, **kwargs):
    gate, up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    y = fn(gate, up, **kwargs)
    (y.double() * dy).sum().backward()
    return [y.detach(), gate.grad, up.grad]


@pytest.mark.parametrize("dtype, shape", [
    (torch.float32, (3, 37, 176)),
    (torch.float32, (1, 5, 1)),
    (torch.float16, (2, 97, 350)),     # more blocks than programs: each program walks several
    (torch.float16, (1025,)),
])
def test_matches_fp64_reference(dtype, shape):
    torch.manual_seed(0)
    gate, up = 3 * torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    dy = torch.randn(shape, dtype=dtype).double()
    ours, low, ref = _run(swiglu, gate, up, dy), _run(swiglu_ref, gate, up, dy), _run(swiglu_ref, gate, up, dy,
                                                                                        upcast=True)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype
    for name, got, torch_out, want in zip(["y", "d gate", "d up"], ours, low, ref):
        assert_within_torch_error(got, want, torch_out, dtype, name)


def test_non_contiguous_inputs_and_errors():
    both = torch.randn(4, 6, 2 * 24)
    gate, up = both[..., :24], both[..., 24:]  # views of one fused projection
    torch.testing.assert_close(swiglu(gate, up), swiglu_ref(gate, up))
    with pytest.raises(ValueError, match="must match"):
        swiglu(gate, up[..., :5])
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        swiglu(gate.double(), up.double())


def test_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*swiglu_ref"):
        swiglu(torch.randn(2, 8, device="cpu"), torch.randn(2, 8, device="cpu"))


def test_custom_ops_pass_opcheck():
    gate, up = torch.randn(3, 40, requires_grad=True), torch.randn(3, 40, requires_grad=True)
    torch.library.opcheck(torch.ops.stackfast.swiglu_fwd.default, (gate, up))
    torch.library.opcheck(torch.ops.stackfast.swiglu_bwd.default, (torch.randn(3, 40), gate.detach(), up.detach()))


def test_torch_compile_fullgraph():
    gate, up = torch.randn(2, 5, 24, requires_grad=True), torch.randn(2, 5, 24, requires_grad=True)
    compiled = torch.compile(lambda g, u: swiglu(g, u).sum(), backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(gate, up), (gate, up))
    want = torch.autograd.grad(swiglu_ref(gate, up).sum(), (gate, up))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
