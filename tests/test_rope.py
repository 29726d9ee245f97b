"""stackfast.ops.rope (Triton; the interpreter on CPU) against its fp64 reference, and the
convention: the same rotation as stackfast.model.apply_rope and Hugging Face Llama."""
import pytest
import torch
from conftest import assert_views_match_fp64, assert_within_torch_error

from stackfast.model import apply_rope, rope_tables
from stackfast.ops import _launch, rope, rope_ref

pytestmark = pytest.mark.usefixtures("on_kernel_device")  # the GPU when there is one (conftest.py)


def _run(fn, q, k, cos, sin, dq_out, dk_out, **kwargs):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_out, k_out = fn(q, k, cos, sin, **kwargs)
    ((q_out.double() * dq_out).sum() + (k_out.double() * dk_out).sum()).backward()
    return [q_out.detach(), k_out.detach(), q.grad, k.grad]


@pytest.mark.parametrize("dtype, batch, seqlen, heads, kv_heads, head_dim, per_batch_tables", [
    (torch.float32, 2, 37, 4, 2, 16, False),
    (torch.float32, 1, 97, 3, 3, 80, True),    # head dim not a power of two, MHA
    (torch.float16, 3, 13, 6, 2, 32, True),
    (torch.float16, 2, 5, 5, 1, 128, False),    # odd head count, one kv head
])
def test_matches_fp64_reference(dtype, batch, seqlen, heads, kv_heads, head_dim, per_batch_tables):
    torch.manual_seed(0)
    q = torch.randn(batch, seqlen, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, dtype=dtype)
    cos, sin = rope_tables(head_dim, 128, 10000.0)
    if per_batch_tables:  # per-sequence positions, as Hugging Face's position_ids give
        positions = torch.stack([torch.randperm(128)[:seqlen] for _ in range(batch)])
        cos, sin = cos[positions], sin[positions]  # (B, S, D)
    else:
        cos, sin = cos[:seqlen], sin[:seqlen]
    grads = [torch.randn_like(q).double(), torch.randn_like(k).double()]
    args = (q, k, cos, sin, *grads)
    ours, low, ref = _run(rope, *args), _run(rope_ref, *args), _run(rope_ref, *args, upcast=True)
    assert ours[0].dtype == dtype and ours[2].dtype == dtype
    for name, got, torch_out, want in zip(["q", "k", "dq", "dk"], ours, low, ref):
        assert_within_torch_error(got, want, torch_out, dtype, name)


def test_same_convention_as_the_model_and_hugging_face():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    torch.manual_seed(0)
    q, k = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 2, 16)
    cos, sin = rope_tables(16, 9, 500000.0)
    q_out, k_out = rope(q, k, cos, sin)
    torch.testing.assert_close(q_out, apply_rope(q, cos, sin))
    torch.testing.assert_close(k_out, apply_rope(k, cos, sin))
    # Hugging Face: (B, H, S, D) with cos (B, S, D)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos.expand(2, 9, 16),
                                      sin.expand(2, 9, 16))
    torch.testing.assert_close(q_out, hf_q.transpose(1, 2))
    torch.testing.assert_close(k_out, hf_k.transpose(1, 2))


def test_inputs_left_alone_and_errors():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    cos, sin = rope_tables(8, 4, 10000.0)
    q_copy = q.clone()
    rope(q, k, cos, sin)
    assert torch.equal(q, q_copy)  # out of place
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope(torch.randn(1, 4, 2, 7), torch.randn(1, 4, 2, 7), torch.ones(4, 7), torch.ones(4, 7))
    with pytest.raises(ValueError, match="cos and sin must be"):
        rope(q, k, cos[:3], sin[:3])
    with pytest.raises(ValueError, match="q and k must be"):
        rope(q, torch.randn(1, 5, 2, 8), cos, sin)


def test_cpu_tensors_need_interpreter(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", False)
    cos, sin = rope_tables(8, 4, 10000.0)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*rope_ref"):
        rope(torch.randn(1, 4, 2, 8, device="cpu"), torch.randn(1, 4, 2, 8, device="cpu"), cos.cpu(), sin.cpu())


def test_custom_op_passes_opcheck():
    q, k = torch.randn(2, 5, 3, 8, requires_grad=True), torch.randn(2, 5, 1, 8, requires_grad=True)
    cos, sin = rope_tables(8, 5, 10000.0)
    for inverse in (False, True):
        torch.library.opcheck(torch.ops.stackfast.rope.default, (q, k, cos, sin, inverse))
        torch.library.opcheck(torch.ops.stackfast.rope.default, (q, k, cos[None].expand(2, 5, 8).contiguous(),
                                                                 sin[None].expand(2, 5, 8).contiguous(), inverse))



# (name, leaf shapes, views of the leaves and of the (26, 32) tables -> (q, k, cos, sin), upstream
# gradients of (q, k))
STRIDED = [
    # q and k sliced out of one fused qkv projection; upstream gradients transposed views
    ("fused qkv", [(2, 13, 10, 32)], lambda qkv, cos, sin: (qkv[:, :, :6], qkv[:, :, 6:8], cos[:13], sin[:13]),
     lambda: [torch.randn(2, 6, 13, 32).transpose(1, 2), torch.randn(2, 2, 13, 32).transpose(1, 2)]),
    # q transposed from (B, H, S, D), one kv head expanded, tables that are strided rows of a
    # longer table expanded over the batch; upstream gradients expanded
    ("transposed q, expanded k and tables", [(2, 6, 13, 32), (2, 13, 1, 32)],
     lambda q, k, cos, sin: (q.transpose(1, 2), k.expand(2, 13, 2, 32), cos[None, ::2].expand(2, 13, 32),
                             sin[None, ::2].expand(2, 13, 32)),
     lambda: [torch.randn(1, 13, 6, 32).expand(2, 13, 6, 32), torch.randn(2, 13, 1, 32).expand(2, 13, 2, 32)]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name, shapes, views, grad_outputs", STRIDED, ids=[c[0] for c in STRIDED])
def test_strided_inputs(name, shapes, views, grad_outputs, dtype):
    """Non-contiguous q, k, cos, sin and upstream gradients (sliced, transposed, expanded) against
    the fp64 reference, forward and backward. (rope takes tables, not positions: there is no
    index to range-check.)"""
    torch.manual_seed(0)
    cos, sin = rope_tables(32, 26, 10000.0)  # constants: not leaves, no gradient
    leaves = [torch.randn(shape).to(dtype) for shape in shapes]
    grads = [g.to(dtype) for g in grad_outputs()]
    names = ["q", "k"] + (["d qkv"] if len(leaves) == 1 else ["dq", "dk"])
    assert_views_match_fp64(rope, rope_ref, leaves, lambda *t: views(*t, cos, sin), grads, dtype, names)


@pytest.mark.parametrize("batch, seqlen", [(0, 5), (2, 0)])
def test_empty_inputs(batch, seqlen):
    """No tokens: empty rotated q and k and empty gradients, as the reference."""
    q = torch.randn(batch, seqlen, 4, 16, requires_grad=True)
    k = torch.randn(batch, seqlen, 2, 16, requires_grad=True)
    cos, sin = rope_tables(16, 8, 10000.0)
    q_out, k_out = rope(q, k, cos[:seqlen], sin[:seqlen])
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert [t.shape for t in rope_ref(q, k, cos[:seqlen], sin[:seqlen])] == [q.shape, k.shape]
    dq, dk = torch.autograd.grad((q_out.sum() + k_out.sum()), (q, k))
    assert dq.shape == q.shape and dk.shape == k.shape
