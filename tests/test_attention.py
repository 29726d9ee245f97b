"""stackfast.ops.attention (Triton; the interpreter on CPU) against its fp64 reference."""
import contextlib
import importlib
import math

import pytest
import torch
from conftest import run_on_views

from stackfast.ops import _launch, attention, attention_ref, attention_varlen
from stackfast.ops._documents import document_bounds

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
    (torch.float16, 1, 45, 4, 2, 256, False),  # head dim 256 with GQA, not causal
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


@pytest.mark.parametrize("seqlen, head_dim", [(97, 32), (45, 256)])
def test_deterministic_mode_uses_the_dq_kernel(monkeypatch, seqlen, head_dim):
    """torch.use_deterministic_algorithms(True): dq from its own kernel (no atomics), the same
    bits on every run, within the tolerance rule like the default (atomic) path."""
    module = attention_mod()
    torch.manual_seed(0)
    q = torch.randn(1, seqlen, 4, head_dim, dtype=torch.float16)
    k, v = (torch.randn(1, seqlen, 2, head_dim, dtype=torch.float16) for _ in range(2))
    d_out = torch.randn(1, seqlen, 4, head_dim, dtype=torch.float16).double()
    launched = []
    original = module._launcher
    monkeypatch.setattr(module, "_launcher",
                        lambda kernel, q, doc_mask: launched.append(kernel) or original(kernel, q, doc_mask))
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


def test_dkdv_kernel_gets_the_dq_orientation_of_its_architecture(monkeypatch):
    """The dk/dv kernel orients its dq matmul for sm_90's wgmma (M >= 64) only where the dots run
    on it: 16-bit inputs on sm_90 (the interpreter counts as sm_90); fp32 dots are FMA loops, and
    on sm_80 the swapped form spilled."""
    module = attention_mod()
    launches = []
    monkeypatch.setattr(module, "_launcher", lambda kernel, q, doc_mask: _RecordKwargs(kernel, launches))
    monkeypatch.setattr(module, "_bwd_preprocess_kernel", _RecordKwargs("preprocess", launches))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q = torch.zeros(1, 8, 2, 64, dtype=dtype)
        lse = torch.zeros(1, 2, 8)
        module._attention_bwd(q, q, q, q, q, lse, True, 0.125, None, None)
    hopper = module._arch(q.device) >= 90
    assert [kwargs["WGMMA"] for kernel, kwargs in launches if kernel == "dkdv"] == [hopper, hopper, False]
    assert module._wgmma(90, torch.bfloat16) and module._wgmma(90, torch.float16)
    assert not module._wgmma(80, torch.bfloat16) and not module._wgmma(90, torch.float32)


def test_interpreter_runs_the_dkdv_layouts_of_the_gpu_defaults():
    """_dkdv_inner has two layouts, scores transposed (BLOCK_N >= BLOCK_M) or not (BLOCK_M >
    BLOCK_N, sm_90 at head dim 256): the interpreter's config at each head dim takes the layout of
    the sm_90 default, so the tests above run the code the GPUs run."""
    module = attention_mod()
    for head_dim in module.HEAD_DIMS:
        for kernel in ("dkdv", "dkdv-gqa"):
            bm, bn, _, _ = module.CONFIGS[kernel][90][head_dim][0]
            ibm, ibn, _, _ = module._INTERPRETER_CONFIGS_BY_HEAD_DIM.get(head_dim, {}).get(
                kernel, module._INTERPRETER_CONFIGS[kernel])
            assert (ibm > ibn) == (bm > bn), (kernel, head_dim)
    assert any(bm > bn for bm, bn, _, _ in module.CONFIGS["dkdv"][90][256])  # both layouts are in use


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
    torch.library.opcheck(torch.ops.stackfast.attention_fwd.default, (q, k, v, True, 0.25, None, None))
    doc_start, doc_end = document_bounds(torch.tensor([[0, 0, 1, 2, 2]]))
    torch.library.opcheck(torch.ops.stackfast.attention_fwd.default, (q, k, v, False, 0.25, doc_start, doc_end))


@pytest.mark.parametrize("documents", [False, True])
def test_torch_compile_fullgraph(documents):
    torch.manual_seed(0)
    q = torch.randn(1, 20, 4, 32, requires_grad=True)
    k, v = (torch.randn(1, 20, 2, 32, requires_grad=True) for _ in range(2))
    ids = torch.tensor([[0] * 7 + [1] * 13]) if documents else None

    def layer(q, k, v):
        return (attention(q, k, v, document_ids=ids) ** 2).sum()

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


class _RecordKwargs:
    """Stands in for a kernel (or its autotuned launcher): records the keyword arguments of each
    launch and runs nothing."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, kwargs))


class _RecordLaunch:
    """Stands in for a kernel (or its autotuned launcher): records the grid of each launch,
    evaluated at `meta`'s block sizes, and runs nothing."""

    def __init__(self, name, grids, meta):
        self.name, self.grids, self.meta = name, grids, meta

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append((self.name, tuple(grid({**kwargs, **self.meta}) if callable(grid) else grid)))
        return launch


@pytest.mark.parametrize("batch, heads, kv_heads", [(2048, 32, 8), (70000, 2, 1)])
def test_launch_grids_stay_within_cuda_limits(monkeypatch, batch, heads, kv_heads):
    """CUDA allows 2**31 - 1 blocks on grid axis x but 65535 on y and z, and Triton does not check
    (nor does the interpreter): batch 2048 x 32 heads = 65536 (batch, head) pairs did not fit on
    axis y. Every kernel of the forward and of both backward paths must get grids within the
    limits that together cover every (block, head, sequence), also for a batch above 65535."""
    module = attention_mod()
    grids = []
    block = 16  # the smallest blocks of any config: the most programs
    meta = {"BLOCK_M": block, "BLOCK_N": block}
    monkeypatch.setattr(module, "_launcher", lambda kernel, q, doc_mask: _RecordLaunch(kernel, grids, meta))
    monkeypatch.setattr(module, "_bwd_preprocess_kernel", _RecordLaunch("preprocess", grids, {}))
    seqlen, head_dim = 3, 16  # a short sequence: a few MB of tensors
    q = torch.empty(batch, seqlen, heads, head_dim, dtype=torch.float16)
    k = torch.empty(batch, seqlen, kv_heads, head_dim, dtype=torch.float16)
    o, lse = module._attention_fwd(q, k, k, True, 0.25, None, None)
    module._attention_bwd(q, q, k, k, o, lse, True, 0.25, None, None)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        module._attention_bwd(q, q, k, k, o, lse, True, 0.25, None, None)
    finally:
        torch.use_deterministic_algorithms(was)
    blocks = -(-seqlen // block)
    want = {"fwd": blocks * heads, "preprocess": -(-seqlen // module._PREPROCESS_BLOCK) * heads * 2,
            "dkdv-gqa": blocks * kv_heads * 2, "dq": blocks * heads}  # the backward ran twice
    got = dict.fromkeys(want, 0)
    for name, grid in grids:
        assert len(grid) <= 3 and grid[0] <= 2**31 - 1 and all(n <= 65535 for n in grid[1:]), (name, grid)
        got[name] += math.prod(grid)
    assert got == {name: n * batch for name, n in want.items()}
    with pytest.raises(ValueError, match="exceeds CUDA's limits"):
        module.launch_grid(16, 16, 70000, 1)


def test_batch_launched_in_slices(monkeypatch):
    """A batch above the grid's z limit is launched in slices: the same results (the limit made 1
    here, so each sequence is its own launch)."""
    module = attention_mod()
    torch.manual_seed(0)
    q = torch.randn(3, 37, 4, 32, dtype=torch.float16)
    k, v = (torch.randn(3, 37, 2, 32, dtype=torch.float16) for _ in range(2))
    d_out = torch.randn(3, 37, 4, 32, dtype=torch.float16).double()
    whole = _forward_backward(attention, q, k, v, d_out)
    monkeypatch.setattr(module, "MAX_GRID", module.MAX_GRID[:2] + (1,))
    for got, want in zip(_forward_backward(attention, q, k, v, d_out), whole):
        torch.testing.assert_close(got, want)


# (name, leaf shapes, views -> (q, k, v), upstream gradient (batch, seqlen, heads, head_dim))
STRIDED = [
    # q from a (batch, heads, seqlen, head_dim) tensor; k and v halves of one fused kv projection
    ("transposed q, fused kv", [(2, 4, 37, 32), (2, 37, 2, 2, 32)],
     lambda q, kv: (q.transpose(1, 2), kv[:, :, 0], kv[:, :, 1]), lambda: torch.randn(2, 4, 37, 32).transpose(1, 2)),
    # q sliced out of a fused qkv projection; one kv head expanded to four (MQA as MHA)
    ("sliced q, expanded kv", [(1, 37, 6, 32), (1, 37, 1, 32)],
     lambda qkv, kv: (qkv[:, :, :4], kv.expand(1, 37, 4, 32), kv.expand(1, 37, 4, 32)),
     lambda: torch.randn(1, 1, 4, 32).expand(1, 37, 4, 32)),
]


@pytest.mark.parametrize("name, shapes, views, grad", STRIDED, ids=[c[0] for c in STRIDED])
def test_strided_inputs(name, shapes, views, grad):
    """Non-contiguous q, k, v (transposed, sliced, expanded) and upstream gradients (transposed,
    expanded), fp16, against the fp64 reference, forward and backward."""
    torch.manual_seed(0)
    leaves = [torch.randn(shape, dtype=torch.float16) for shape in shapes]
    grads = [grad().half()]
    names = ["out"] + [f"d leaf {i}" for i in range(len(leaves))]
    ours = run_on_views(attention, leaves, views, grads)
    low = run_on_views(attention_ref, leaves, views, grads)
    ref = run_on_views(attention_ref, [t.double() for t in leaves], views, [g.double() for g in grads])
    for name, out, torch_out, ref64 in zip(names, ours[0] + ours[1], low[0] + low[1], ref[0] + ref[1]):
        assert_within_torch_error(out, ref64, torch_out, name)


@pytest.mark.parametrize("shape", [(0, 16, 4, 32), (2, 0, 4, 32)], ids=["batch 0", "seqlen 0"])
def test_empty_inputs(monkeypatch, shape):
    """Batch 0 or seqlen 0: empty output and gradients, as the reference, and no launch (on a
    GPU the autotuner would otherwise time its configs on an empty problem and keep a winner
    for that seqlen)."""
    module = attention_mod()
    monkeypatch.setattr(module, "_launcher", lambda *a: pytest.fail("launched a kernel on an empty input"))
    q = torch.randn(shape, requires_grad=True)
    k = torch.randn(*shape[:2], 2, 32, requires_grad=True)
    out = attention(q, k, k)
    assert out.shape == shape and attention_ref(q, k, k).shape == shape
    dq, dk = torch.autograd.grad(out.sum(), (q, k))
    assert dq.shape == q.shape and dk.shape == k.shape


def _max_error(out, ref64):
    return (out.double() - ref64).abs().max().item()


# (dtype, batch, seqlen, heads, kv_heads, head_dim, causal): odd lengths, head dims other than 64, GQA
FLASH_CASES = [
    (torch.float16, 1, 97, 4, 2, 32, True),
    (torch.bfloat16, 1, 97, 4, 2, 32, False),
    (torch.float16, 2, 101, 3, 1, 128, False),
    (torch.bfloat16, 1, 93, 6, 2, 16, True),
]


@pytest.mark.parametrize("dtype, batch, seqlen, heads, kv_heads, head_dim, causal", FLASH_CASES)
def test_flash_attention_error_rule(dtype, batch, seqlen, heads, kv_heads, head_dim, causal):
    """flash-attn's accuracy rule: the largest error against the fp64 reference at most twice a
    plain PyTorch implementation's at the same precision for the output, three times for dq, dk
    and dv, plus the rounding of the reference to the dtype (flash-attn's atol, 2 |r + 0.3 - 0.3 - r|).
    Under the interpreter the kernels compute in fp32 (no bf16 arithmetic there): the rule
    bites on a GPU."""
    torch.manual_seed(0)
    q = torch.randn(batch, seqlen, heads, head_dim, dtype=dtype)
    k, v = (torch.randn(batch, seqlen, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    d_out = torch.randn(batch, seqlen, heads, head_dim, dtype=dtype).double()
    got = _forward_backward(attention, q, k, v, d_out, causal=causal)
    torch_lowprec = _forward_backward(attention_ref, q, k, v, d_out, causal=causal)
    ref = _forward_backward(attention_ref, q, k, v, d_out, causal=causal, upcast=True)
    for name, factor, out, torch_out, ref64 in zip(["out", "dq", "dk", "dv"], [2, 3, 3, 3], got, torch_lowprec, ref):
        rounded = ref64.to(dtype)
        atol = 2 * (rounded + 0.3 - 0.3 - rounded).abs().max().item()
        err, torch_err = _max_error(out, ref64), _max_error(torch_out, ref64)
        assert err <= factor * torch_err + atol, f"{name}: error {err:.3g}, PyTorch's {torch_err:.3g}, atol {atol:.3g}"


# Document masking. Rows of document ids (non-decreasing), each a pattern the kernels must get
# right: 1-token documents, documents crossing the interpreter's tile edges (32 and 64), one
# document, a row made only of EOS (every token its own document).
def document_rows(seqlen, *kinds):
    rows = {"ones": [0, 1, 2] + [3] * 30 + list(range(4, 10)),  # 1-token documents, then longer
            "edges": [0] * 31 + [1] * 2 + [2] * 31 + [3] * 2 + [4] * 40,  # ends at 30, 32, 63, 65
            "one": [7] * seqlen,
            "eos": list(range(seqlen))}
    return torch.tensor([(rows[kind] + [rows[kind][-1] + 1] * seqlen)[:seqlen] for kind in kinds])


# (dtype, seqlen, heads, kv_heads, head_dim, causal, rows)
DOC_CASES = [
    (torch.float32, 97, 2, 2, 64, True, ("ones", "edges")),
    (torch.float32, 130, 2, 1, 32, False, ("edges", "eos")),
    (torch.float16, 130, 4, 2, 64, True, ("one", "eos")),      # GQA
    (torch.bfloat16, 97, 4, 1, 128, False, ("ones", "one")),   # GQA group 4, not causal
    (torch.float16, 70, 2, 2, 256, True, ("edges", "ones")),    # dk/dv's untransposed layout
    (torch.bfloat16, 45, 4, 2, 256, False, ("eos", "edges")),
]


@pytest.mark.parametrize("dtype, seqlen, heads, kv_heads, head_dim, causal, rows", DOC_CASES)
def test_document_mask_matches_fp64_reference(dtype, seqlen, heads, kv_heads, head_dim, causal, rows):
    """Output and dq, dk, dv against the fp64 masked reference by flash-attn's rule (2x PyTorch's
    own error for the output, 3x for the gradients, plus the reference's rounding)."""
    torch.manual_seed(0)
    ids = document_rows(seqlen, *rows)
    q = torch.randn(len(rows), seqlen, heads, head_dim, dtype=dtype)
    k, v = (torch.randn(len(rows), seqlen, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    d_out = torch.randn(len(rows), seqlen, heads, head_dim, dtype=dtype).double()
    got = _forward_backward(attention, q, k, v, d_out, causal=causal, document_ids=ids)
    torch_lowprec = _forward_backward(attention_ref, q, k, v, d_out, causal=causal, document_ids=ids)
    ref = _forward_backward(attention_ref, q, k, v, d_out, causal=causal, document_ids=ids, upcast=True)
    for name, factor, out, torch_out, ref64 in zip(["out", "dq", "dk", "dv"], [2, 3, 3, 3], got, torch_lowprec, ref):
        rounded = ref64.to(dtype)
        atol = 2 * (rounded + 0.3 - 0.3 - rounded).abs().max().item() + ATOL[dtype]
        err, torch_err = _max_error(out, ref64), _max_error(torch_out, ref64)
        assert err <= factor * torch_err + atol, f"{name}: error {err:.3g}, PyTorch's {torch_err:.3g}, atol {atol:.3g}"


def test_document_mask_deterministic_dq_kernel():
    """The dq kernel of torch.use_deterministic_algorithms(True) masks (and skips) too."""
    torch.manual_seed(0)
    ids = document_rows(97, "edges", "ones")
    q = torch.randn(2, 97, 4, 32)
    k, v = (torch.randn(2, 97, 2, 32) for _ in range(2))
    d_out = torch.randn(2, 97, 4, 32).double()
    ref = _forward_backward(attention_ref, q, k, v, d_out, document_ids=ids, upcast=True)
    with deterministic_algorithms():
        got = _forward_backward(attention, q, k, v, d_out, document_ids=ids)
    for out, ref64 in zip(got, ref):
        assert _max_error(out, ref64) < 1e-5


@contextlib.contextmanager
def deterministic_algorithms():
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def count_dots(monkeypatch):
    """A list that grows by one at every tl.dot the interpreter runs."""
    from triton.runtime import interpreter
    calls = []
    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    return calls


@pytest.mark.skipif(not _launch.INTERPRET, reason="counts the interpreter's dots")
@pytest.mark.parametrize("causal", [True, False])
def test_kernels_skip_the_tiles_document_tiles_counts(monkeypatch, causal):
    """The kernels compute exactly the tiles document_tiles counts, fewer than without the mask:
    2 dots per tile in the forward, 5 in dk/dv (with the atomic dq), 3 in the dq kernel."""
    module = attention_mod()
    ids = document_rows(130, "edges", "ones", "eos")
    heads = 2
    q, k, v = (torch.randn(3, 130, heads, 32, requires_grad=True) for _ in range(3))
    dots = count_dots(monkeypatch)
    out = attention(q, k, v, causal=causal, document_ids=ids)
    fwd_m, fwd_n = module._INTERPRETER_CONFIGS["fwd"][:2]
    masked, plain = module.document_tiles(ids, fwd_m, fwd_n, causal)
    assert masked < plain and len(dots) == 2 * heads * masked
    dots.clear()
    out.sum().backward()
    bwd_m, bwd_n = module._INTERPRETER_CONFIGS["dkdv"][:2]
    masked, plain = module.document_tiles(ids, bwd_m, bwd_n, causal, keys_outer=True)
    assert masked < plain and len(dots) == 5 * heads * masked
    dots.clear()
    with deterministic_algorithms():  # dk/dv without its dq matmul, then the dq kernel
        attention(q, k, v, causal=causal, document_ids=ids).sum().backward()
    dq_m, dq_n = module._INTERPRETER_CONFIGS["dq"][:2]
    assert len(dots) == 2 * heads * module.document_tiles(ids, fwd_m, fwd_n, causal)[0] + heads * (
        4 * masked + 3 * module.document_tiles(ids, dq_m, dq_n, causal)[0])


def test_document_tiles_without_documents_is_the_plain_count():
    """One document per row: every tile of the plain kernel (causal: the lower triangle), no skip."""
    module = attention_mod()
    ids = torch.zeros(2, 200, dtype=torch.long)
    assert module.document_tiles(ids, 64, 32, False) == (2 * 4 * 7, 2 * 4 * 7)
    # causal forward: query block i (rows 64i..) reads key blocks up to its last row
    assert module.document_tiles(ids, 64, 32, True) == (2 * (2 + 4 + 6 + 7),) * 2
    assert module.document_tiles(ids, 32, 64, True, keys_outer=True) == (2 * (7 + 5 + 3 + 1),) * 2
    # every token its own document: causal, the diagonal tiles alone
    masked, plain = module.document_tiles(torch.arange(200)[None], 64, 32, True)
    assert (masked, plain) == (7, 19)


def test_varlen_equals_attention_per_sequence():
    """attention_varlen on sequences laid end to end (one empty) = attention on each alone."""
    torch.manual_seed(0)
    lengths = [5, 0, 40, 52]
    cu_seqlens = torch.tensor([0, 5, 5, 45, 97], dtype=torch.int32)
    q = torch.randn(97, 4, 64)
    k, v = (torch.randn(97, 2, 64) for _ in range(2))
    for causal in (True, False):
        got = attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max(lengths), max(lengths), causal=causal)
        want = torch.cat([attention(q[None, a:b], k[None, a:b], v[None, a:b], causal=causal)[0]
                          for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()) if b > a])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ids, message", [
    (torch.zeros(2, 8, dtype=torch.long), r"document_ids must be \(batch, seqlen\) = \(1, 8\), got \(2, 8\)"),
    (torch.zeros(8, dtype=torch.long), r"must be \(batch, seqlen\)"),
    (torch.zeros(1, 8), "must be an integer tensor, got torch.float32"),
    (torch.zeros(1, 8, dtype=torch.bool), "must be an integer tensor, got torch.bool"),
    ([[0] * 8], "must be a tensor, got list"),
])
def test_bad_document_ids(ids, message):
    q = torch.zeros(1, 8, 2, 16)
    for fn in (attention, attention_ref):
        with pytest.raises(ValueError, match=message):
            fn(q, q, q, document_ids=ids)


@pytest.mark.parametrize("cu_seqlens, message", [
    (torch.tensor([0, 4, 8]), "must be a 1-D int32 tensor, got torch.int64"),
    (torch.tensor([[0, 4, 8]], dtype=torch.int32), "must be a 1-D int32 tensor"),
    (torch.tensor([1, 4, 8], dtype=torch.int32), "must start at 0"),
    (torch.tensor([0, 5, 4, 8], dtype=torch.int32), "must be non-decreasing"),
    (torch.tensor([0, 4, 7], dtype=torch.int32), "must end at the total token count 8, got 7"),
])
def test_bad_cu_seqlens(cu_seqlens, message):
    q = torch.zeros(8, 2, 16)
    with pytest.raises(ValueError, match=message):
        attention_varlen(q, q, q, cu_seqlens, cu_seqlens, 8, 8)
    good = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k must equal cu_seqlens_q"):
        attention_varlen(q, q, q, good, torch.tensor([0, 3, 8], dtype=torch.int32), 8, 8)
    with pytest.raises(ValueError, match="below the longest sequence"):
        attention_varlen(q, q, q, good, good, 3, 8)
    with pytest.raises(ValueError, match=r"must be 3-D \(total_tokens, heads, head_dim\), got \(8, 2, 16\), \(1, 8"):
        attention_varlen(q, q[None], q, good, good, 8, 8)
