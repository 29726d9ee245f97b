"""stackfast.ops.linear_cross_entropy (PyTorch chunks, and the Triton chunk kernel under the
interpreter on CPU) against the fp64 full-logits reference: loss, d hidden, d weight."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_views_match_fp64, assert_within_torch_error

from stackfast.ops import _launch, linear_cross_entropy, linear_cross_entropy_ref
from stackfast.ops.linear_cross_entropy import default_chunk_size

lce_module = importlib.import_module("stackfast.ops.linear_cross_entropy")  # the package binds the function
pytestmark = pytest.mark.usefixtures("on_kernel_device")  # the GPU when there is one (conftest.py)


def _run(fn, hidden, weight, targets, **kwargs):
    h, w = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    loss = fn(h, w, targets, **kwargs)
    loss.backward()
    return [loss.detach(), h.grad, w.grad]


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("dtype, shape, vocab, chunk, z_loss, n_ignored", [
    (torch.float32, (3, 37), 97, 16, 0.0, 5),     # odd sizes, a ragged last chunk
    (torch.float32, (50,), 1000, None, 1e-3, 0),   # z-loss, the default chunk
    (torch.float16, (2, 21), 300, 8, 0.0, 7),
    (torch.float32, (5,), 33, 2, 1e-2, 5),        # all tokens ignored but one
])
def test_matches_fp64_reference(dtype, shape, vocab, chunk, z_loss, n_ignored, use_kernel):
    torch.manual_seed(0)
    hidden_size = 48
    hidden = torch.randn(*shape, hidden_size, dtype=dtype)
    weight = (torch.randn(vocab, hidden_size) / hidden_size ** 0.5).to(dtype)
    targets = torch.randint(0, vocab, shape)
    flat = targets.view(-1)
    flat[torch.randperm(flat.numel())[:min(n_ignored, flat.numel() - 1)]] = -100
    args = (hidden, weight, targets)
    ours = _run(linear_cross_entropy, *args, z_loss=z_loss, chunk_size=chunk, use_kernel=use_kernel)
    low = _run(linear_cross_entropy_ref, *args, z_loss=z_loss)
    ref = _run(linear_cross_entropy_ref, *args, z_loss=z_loss, upcast=True)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    for name, got, torch_out, want in zip(["loss", "d hidden", "d weight"], ours, low, ref):
        assert_within_torch_error(got, want, torch_out, dtype, name)


@pytest.mark.parametrize("block, vocab, z_loss", [
    (1024, 3500, 0.0),     # the CPU block: 3 full blocks and a ragged 428
    (1024, 1025, 1e-3),    # a ragged last block of one column
    (4096, 13288, 0.0),    # the GPU block: 3 full blocks and a ragged 1000 (vocab 32000 is 7 x 4096 + 3328)
], ids=["cpu block", "one-column tail", "gpu block"])
def test_vocab_of_several_blocks_with_a_ragged_last_one(block, vocab, z_loss, monkeypatch):
    """The chunk kernel sweeps a row in blocks of `block` columns with an online logsumexp: the
    running sums are rescaled when a block raises the running max, and the last block is
    ragged. Forced to each block size (the interpreter runs the GPU's 4096 too), against the
    fp64 reference: loss, d hidden and d weight, with ignored rows. Logits of spread ~3, so the
    max of a row moves from block to block."""
    monkeypatch.setattr(lce_module, "GPU_BLOCK_V", block)
    monkeypatch.setattr(lce_module, "CPU_BLOCK_V", block)
    torch.manual_seed(0)
    hidden_size, n_tokens = 16, 7
    hidden = torch.randn(n_tokens, hidden_size)
    weight = 3 * torch.randn(vocab, hidden_size) / hidden_size ** 0.5
    targets = torch.randint(0, vocab, (n_tokens,))
    targets[[1, 4]] = -100
    targets[0] = vocab - 1  # a target in the ragged last block
    args = (hidden, weight, targets)
    ours = _run(linear_cross_entropy, *args, z_loss=z_loss, chunk_size=3, use_kernel=True)
    low = _run(linear_cross_entropy_ref, *args, z_loss=z_loss)
    ref = _run(linear_cross_entropy_ref, *args, z_loss=z_loss, upcast=True)
    for name, got, torch_out, want in zip(["loss", "d hidden", "d weight"], ours, low, ref):
        assert_within_torch_error(got, want, torch_out, torch.float32, name)


def test_same_as_f_cross_entropy_with_ignore_index_and_upstream_grad():
    torch.manual_seed(1)
    hidden, weight = torch.randn(2, 9, 16), torch.randn(40, 16)
    targets = torch.randint(0, 40, (2, 9))
    targets[0, :4] = 7
    targets[1, 2:] = 7
    got = _run(lambda h, w, t: 3 * linear_cross_entropy(h, w, t, ignore_index=7, chunk_size=5), hidden, weight,
               targets)
    want = _run(lambda h, w, t: 3 * F.cross_entropy((h @ w.T).flatten(0, 1), t.flatten(), ignore_index=7),
                hidden, weight, targets)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("tokens", [(4,), (2, 3), (0,), (2, 0)], ids=["all ignored", "all ignored 2-D", "no tokens",
                                                                   "no tokens 2-D"])
def test_no_counted_token_gives_zero_loss_and_zero_gradients(tokens, use_kernel):
    """Every target ignored, or no tokens: loss 0.0 and exact zero gradients (sum / max(count, 1),
    the documented rule; F.cross_entropy's mean over zero elements is nan, 0 * inf in the
    gradients), for the kernel, the PyTorch chunks and the reference. A training step that
    accumulates such a micro-batch with a normal one stays finite."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(*tokens, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    targets = torch.full(tokens, -100)
    assert torch.isnan(F.cross_entropy((hidden @ weight.T).reshape(-1, 10), targets.reshape(-1)))
    for fn in (lambda *a: linear_cross_entropy(*a, chunk_size=2, use_kernel=use_kernel), linear_cross_entropy_ref):
        loss, d_hidden, d_weight = _run(fn, hidden, weight, targets)
        assert loss.item() == 0.0 and d_hidden.shape == hidden.shape
        assert not d_hidden.any() and not d_weight.any() and not d_weight.isnan().any()
    # gradient accumulation over two micro-batches, the second fully masked
    other = torch.randint(0, 10, (3,))
    step = (linear_cross_entropy(torch.randn(3, 8), weight, other, use_kernel=use_kernel)
            + linear_cross_entropy(hidden, weight, targets, use_kernel=use_kernel)) / 2
    step.backward()
    assert step.isfinite() and weight.grad.isfinite().all()


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("bad", [10, 1010, -5])
def test_out_of_range_targets_raise(bad, use_kernel):
    """A target outside [0, vocab) that is not ignore_index raises, as F.cross_entropy does: the
    kernel used to read outside the logits row and return a finite loss."""
    hidden, weight = torch.randn(2, 3, 8), torch.randn(10, 8)
    targets = torch.tensor([[1, -100, 9], [0, bad, 3]])
    with pytest.raises(IndexError, match=rf"target {bad} \(token 4\) is out of range for a vocab of 10"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=2, use_kernel=use_kernel)
    if not targets.is_cuda:  # on a GPU, F.cross_entropy's device-side assert would end the test session
        with pytest.raises(IndexError):
            linear_cross_entropy_ref(hidden, weight, targets)
    # the same target is fine as the ignore_index
    targets[0, 1] = 2
    loss = linear_cross_entropy(hidden, weight, targets, ignore_index=bad, use_kernel=use_kernel)
    want = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), ignore_index=bad)
    torch.testing.assert_close(loss, want)


# (name, leaf shapes, views of (hidden, weight, targets)): each a non-contiguous layout
STRIDED = [
    ("sliced hidden, transposed weight", [(2, 9, 64), (48, 97), (2, 9)], lambda h, w, t: (h[..., 8:56], w.t(), t)),
    ("transposed hidden, sliced weight", [(48, 7), (97, 80), (7, 3)], lambda h, w, t: (h.t(), w[:, :48], t[:, 1])),
    ("expanded hidden and targets", [(1, 48), (97, 48), (1,)], lambda h, w, t: (h.expand(5, 48), w, t.expand(5))),
]


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name, shapes, views", STRIDED, ids=[c[0] for c in STRIDED])
def test_strided_inputs(name, shapes, views, dtype, use_kernel):
    """Sliced, transposed and expanded hidden states, weights and targets against the fp64
    reference, forward and backward (with an upstream gradient other than 1)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(shapes[0]).to(dtype), (torch.randn(shapes[1]) / 48 ** 0.5).to(dtype)
    targets = torch.randint(0, 97, shapes[2])
    targets.view(-1)[-1] = -100  # one ignored token (none in the expanded case: one target)
    targets.view(-1)[0] = 5
    assert_views_match_fp64(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=3, use_kernel=use_kernel),
                            linear_cross_entropy_ref, [hidden, weight, targets], views, [torch.tensor(3.0)], dtype,
                            ["loss", "d hidden", "d weight"])


def test_no_grad_and_one_sided_grad():
    hidden, weight = torch.randn(6, 8), torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 10, (6,))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets))
    assert weight.grad is not None and weight.grad.shape == weight.shape
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), loss.detach())


def test_default_chunk_keeps_the_logits_chunk_near_the_input_size():
    assert default_chunk_size(16384, 32000, 2048) == 1024
    assert default_chunk_size(5, 100, 64) == 4
    assert default_chunk_size(3, 10, 64) == 3


def test_errors():
    with pytest.raises(ValueError, match="lm_head_weight must be"):
        linear_cross_entropy(torch.randn(2, 8), torch.randn(10, 7), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(torch.randn(2, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long))


def test_cpu_kernel_needs_interpreter(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*linear_cross_entropy_ref"):
        linear_cross_entropy(torch.randn(2, 8, device="cpu"), torch.randn(10, 8, device="cpu"),
                             torch.zeros(2, dtype=torch.long, device="cpu"), use_kernel=True)


def test_chunk_kernel_passes_opcheck():
    logits = torch.randn(5, 37)
    targets = torch.tensor([0, 36, -100, 5, 9])
    torch.library.opcheck(torch.ops.stackfast.cross_entropy_grad_.default, (logits, targets, -100, 1e-3))


def test_torch_compile_fullgraph():
    hidden, weight = torch.randn(6, 16, requires_grad=True), torch.randn(20, 16, requires_grad=True)
    targets = torch.randint(0, 20, (6,))
    compiled = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=4, use_kernel=True),
                             backend="aot_eager", fullgraph=False)
    got = torch.autograd.grad(compiled(hidden, weight, targets), (hidden, weight))
    want = torch.autograd.grad(F.cross_entropy(hidden @ weight.T, targets), (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_backward_runs_once():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(10, 8), torch.randint(0, 10, (4,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


def test_fp64_inputs_stay_fp64_throughout():
    """The chunked fp64 path is an accuracy reference (the benchmark's at full size): no fp32 step."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(7, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (7,))
    got = _run(linear_cross_entropy, hidden, weight, targets, chunk_size=3, z_loss=1e-3)
    want = _run(linear_cross_entropy_ref, hidden, weight, targets, z_loss=1e-3, upcast=True)
    assert got[0].dtype == torch.float64
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
