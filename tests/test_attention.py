"""stackfast.ops.attention (Triton; the interpreter on CPU) against its fp64 reference."""
import importlib

import pytest
import torch

from stackfast.ops import _launch, attention, attention_ref

pytestmark = pytest.mark.usefixtures("on_kernel_device")  # the GPU when there is one (conftest.py)

# atol as a fraction of the largest reference value. fp16/bf16: one final rounding to the
# output dtype (half an ulp: 2**-11 / 2**-8 relative) at the largest value, where
# PyTorch's own error can happen to be 0. fp32: PyTorch's fp32 error is ~1e-7 and the
# kernel sums in another order (online softmax, blocked dots). The fraction is of at
# least 1 (inputs are O(1)): with seqlen 1 dq and dk are exactly 0, and the kernel's
# dp - delta leaves fp32 rounding noise (~1e-7) where PyTorch's fp16 result is exactly 0.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_within_torch_error(out, ref64, torch_out, what):
    """docs/design.md: |kernel - ref_fp64| <= 2 |torch_lowprec - ref_fp64| + atol."""
    err = (out.double() - ref64).abs()
    bound = 2 * (torch_out.double() - ref64).abs() + ATOL[out.dtype] * max(1.0, ref64.abs().max())
    assert (err <= bound).all(), \
        f"{what}: max error {err.max():.3g}, worst excess {(err - bound).max():.3g}"


def _forward_backward(fn, q, k, v, d_out, **kwargs):
    """Output and (dq, dk, dv) of one implementation."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), d_out.to(out.dtype))
    return [out.detach(), *grads]


# (dtype, batch, seqlen, heads, kv_heads, head_dim, causal)
CASES = [
    (torch.float32, 1, 97, 2, 2, 64, True),
    (torch.float32, 1, 130, 2, 1, 128, False),
    (torch.float16, 2, 130, 8, 2, 64, True),   # GQA 8 heads / 2 kv heads
    (torch.float16, 1, 97, 2, 2, 128, True),
    (torch.float16, 1, 1, 4, 2, 64, True),     # seqlen 1
    (torch.float16, 1, 1, 2, 2, 64, False),
    (torch.float16, 1, 65, 4, 1, 32, False),   # multi-query, another head dim
    (torch.bfloat16, 1, 33, 2, 1, 64, True),
    (torch.float16, 1, 257, 4, 1, 32, True),   # GQA group 4 (the dk/dv head loop), odd length
    (torch.bfloat16, 2, 100, 4, 2, 64, False),  # GQA group 2, not causal
    (torch.bfloat16, 1, 70, 2, 2, 256, True),  # the largest head dim (small tiles on a GPU)
]


@pytest.mark.parametrize("dtype, batch, seqlen, heads, kv_heads, head_dim, causal", CASES)
def test_matches_fp64_reference(dtype, batch, seqlen, heads, kv_heads, head_dim, causal):
    torch.manual_seed(0)
    q = torch.randn(batch, seqlen, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, dtype=dtype)
    v = torch.randn(batch, seqlen, kv_heads, head_dim, dtype=dtype)
    # An upstream gradient representable in dtype: every implementation sees the same one.
    d_out = torch.randn(batch, seqlen, heads, head_dim, dtype=dtype).double()

    got = _forward_backward(attention, q, k, v, d_out, causal=causal)
    torch_lowprec = _forward_backward(attention_ref, q, k, v, d_out, causal=causal)
    ref = _forward_backward(attention_ref, q, k, v, d_out, causal=causal, upcast=True)
    for name, out, torch_out, ref64 in zip(["out", "dq", "dk", "dv"], got, torch_lowprec, ref):
        assert out.dtype == dtype and out.shape == ref64.shape
        assert_within_torch_error(out, ref64, torch_out, name)


def test_deterministic_mode_uses_the_dq_kernel(monkeypatch):
    """torch.use_deterministic_algorithms(True): dq from its own kernel (no atomics), the same
    bits on every run, within the tolerance rule like the default (atomic) path."""
    module = attention_mod()
    torch.manual_seed(0)
    q = torch.randn(1, 97, 4, 32, dtype=torch.float16)
    k, v = (torch.randn(1, 97, 2, 32, dtype=torch.float16) for _ in range(2))
    d_out = torch.randn(1, 97, 4, 32, dtype=torch.float16).double()
    launched = []
    original = module._launcher
    monkeypatch.setattr(module, "_launcher", lambda kernel, q: launched.append(kernel) or original(kernel, q))
    atomic = _forward_backward(attention, q, k, v, d_out)
    assert launched == ["fwd", "dkdv-gqa"]
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_forward_backward(attention, q, k, v, d_out) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(was)
    assert launched[2:] == ["fwd", "dkdv-gqa", "dq"] * 2
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    torch_lowprec = _forward_backward(attention_ref, q, k, v, d_out)
    ref = _forward_backward(attention_ref, q, k, v, d_out, upcast=True)
    for name, out, det, torch_out, ref64 in zip(["out", "dq", "dk", "dv"], atomic, runs[0], torch_lowprec, ref):
        assert_within_torch_error(out, ref64, torch_out, name)
        assert_within_torch_error(det, ref64, torch_out, f"{name} (deterministic)")


def test_fp32_head_dim_256_is_refused():
    q = torch.zeros(1, 4, 2, 256)
    with pytest.raises(ValueError, match="head_dim 256 in float32"):
        attention(q, q, q)
    assert attention_mod().supports(256, torch.bfloat16) and not attention_mod().supports(256, torch.float32)


def attention_mod():
    return importlib.import_module("stackfast.ops.attention")


def test_softmax_scale_and_causality():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    out = attention(q, k, v, causal=False, softmax_scale=0.3)
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=False, softmax_scale=0.3))
    # causal: the first 10 positions do not see a change to the later keys and values
    k2, v2 = k.clone(), v.clone()
    k2[:, 10:], v2[:, 10:] = 5.0, -5.0
    torch.testing.assert_close(attention(q, k2, v2)[:, :10], attention(q, k, v)[:, :10])


@pytest.mark.parametrize("shapes, message", [
    (((2, 8, 4, 16), (2, 8, 4, 16), (2, 8, 4)), "must be 4-D"),
    (((2, 8, 4, 16), (2, 8, 3, 16), (2, 8, 3, 16)), "multiple of kv_heads"),
    (((2, 8, 4, 16), (1, 8, 2, 16), (1, 8, 2, 16)), "match q in batch, seqlen and head_dim"),
    (((2, 8, 4, 16), (2, 9, 2, 16), (2, 9, 2, 16)), "match q in batch, seqlen and head_dim"),
    (((2, 8, 4, 16), (2, 8, 2, 32), (2, 8, 2, 32)), "match q in batch, seqlen and head_dim"),
    (((2, 8, 4, 16), (2, 8, 2, 16), (2, 8, 1, 16)), "same shape"),
    (((2, 8, 4, 80), (2, 8, 2, 80), (2, 8, 2, 80)), "head_dim must be one of"),
])
def test_bad_shapes(shapes, message):
    q, k, v = (torch.zeros(shape) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v)


def test_bad_dtypes():
    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(ValueError, match="share one dtype"):
        attention(q, q.half(), q.half())
    with pytest.raises(ValueError, match="share one dtype"):
        attention(q.double(), q.double(), q.double())


def test_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", False)
    q = torch.zeros(1, 4, 2, 16, device="cpu")
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*attention_ref"):
        attention(q, q, q)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and autograd registration agree with the kernels."""
    torch.manual_seed(0)
    q = torch.randn(1, 5, 2, 16, requires_grad=True)
    k, v = (torch.randn(1, 5, 1, 16, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.stackfast.attention_fwd.default, (q, k, v, True, 0.25))


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    q = torch.randn(1, 20, 4, 32, requires_grad=True)
    k, v = (torch.randn(1, 20, 2, 32, requires_grad=True) for _ in range(2))

    def layer(q, k, v):
        return (attention(q, k, v) ** 2).sum()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(layer(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_autotune_can_be_switched_off(monkeypatch):
    """STACKFAST_AUTOTUNE=0: the first GPU config alone (one compile per new shape)."""
    module = attention_mod()
    monkeypatch.setattr(_launch, "INTERPRET", False)
    gpu_configs = [(128, 64, 4, 3), (64, 64, 4, 4)]
    assert len(module._configs(gpu_configs, (32, 32, 4, 1))) == 2
    monkeypatch.setenv("STACKFAST_AUTOTUNE", "0")
    [only] = module._configs(gpu_configs, (32, 32, 4, 1))
    assert only.kwargs == {"BLOCK_M": 128, "BLOCK_N": 64} and only.num_warps == 4 and only.num_stages == 3
