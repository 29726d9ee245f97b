"""stackfast.ops.swiglu (Triton; the interpreter on CPU) against its fp64 reference."""
import pytest
import torch
from conftest import assert_views_match_fp64, assert_within_torch_error

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


# (name, leaf shapes, views -> (gate, up), upstream gradient)
STRIDED = [
    # gate and up halves of one fused projection; the gradient a transposed view
    ("fused gate-up", [(3, 7, 2 * 40)], lambda both: (both[..., :40], both[..., 40:]),
     lambda: torch.randn(40, 7, 3).permute(2, 1, 0)),
    # a transposed gate, an up broadcast over the tokens; the gradient expanded
    ("transposed, expanded", [(40, 21), (1, 40)], lambda gate, up: (gate.t(), up.expand(21, 40)),
     lambda: torch.randn(21, 1).expand(21, 40)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name, shapes, views, grad", STRIDED, ids=[c[0] for c in STRIDED])
def test_strided_inputs(name, shapes, views, grad, dtype):
    """Non-contiguous gate, up and upstream gradient against the fp64 reference, forward and backward."""
    torch.manual_seed(0)
    leaves = [(3 * torch.randn(shape)).to(dtype) for shape in shapes]
    names = ["y"] + [f"d leaf {i}" for i in range(len(leaves))]
    assert_views_match_fp64(swiglu, swiglu_ref, leaves, views, [grad().to(dtype)], dtype, names)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_empty_inputs(shape):
    gate, up = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    y = swiglu(gate, up)
    assert y.shape == shape and swiglu_ref(gate, up).shape == shape
    d_gate, d_up = torch.autograd.grad(y.sum(), (gate, up))
    assert d_gate.shape == shape and d_up.shape == shape
