"""Test-wide environment, set before any stackfast kernel module is imported.

Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be
set before `triton.jit` functions are defined). HF_HUB_OFFLINE stops transformers
from retrying hub lookups on this offline machine.
"""
import os
import signal

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

# Where the Triton kernels run in these tests: the GPU when there is one, else the CPU
# under the interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def on_kernel_device():
    """Tensors a test makes default to KERNEL_DEVICE (used by the kernel test modules)."""
    with torch.device(KERNEL_DEVICE):
        yield


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A test that leaves a SIGTERM/SIGINT handler of its own behind (a run's StopSignal not
    uninstalled) would turn a later signal into a silent stop of another test's run: fail it."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    after = {sig: signal.getsignal(sig) for sig in before}
    for sig, handler in before.items():
        signal.signal(sig, handler)
    assert after == before, f"signal handlers changed by the test: {after} (were {before})"


@pytest.fixture(scope="session", autouse=True)
def stackfast_cache(tmp_path_factory):
    """A fresh cache per test session, so the built-in corpus is built from scratch as on a
    new machine (about 10 s) and the user's own cache is never touched."""
    path = tmp_path_factory.mktemp("stackfast-cache")
    os.environ["STACKFAST_CACHE"] = str(path)
    return path


@pytest.fixture
def poisoned_steps(monkeypatch):
    """Training forwards at these (0-based) optimizer steps return a NaN loss (runs with one
    micro-batch per step)."""
    from stackfast.model import Transformer  # here, not at the top: after the environment above is set
    steps, calls = set(), {"n": 0}
    forward = Transformer.forward

    def poisoned(self, input_ids, targets=None):
        out = forward(self, input_ids, targets)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] - 1 in steps:
                return out * float("nan")
        return out
    monkeypatch.setattr(Transformer, "forward", poisoned)
    return steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer tiny model trained for 3 steps on the built-in corpus (a stackfast checkpoint)."""
    from stackfast.config import load_config
    from stackfast.train import run
    run_dir = tmp_path_factory.mktemp("run")
    run(load_config(None, ['model.preset="tiny"', "model.kernels=torch", "data.seq_len=32", "train.max_steps=3",
                           "train.global_batch_size=2", "train.eval_batches=1", "logging.progress=false",
                           "logging.tensorboard=false", f'logging.run_dir="{run_dir}"']))
    return run_dir / "checkpoints" / "step_00000003"


# The tolerance table is the kernel self-check's (stackfast/kernel_check.py), one copy for both.
from stackfast.kernel_check import ATOL  # noqa: E402


def assert_within_torch_error(out, ref64, torch_out, dtype, what):
    """docs/design.md: |kernel - ref_fp64| <= 2 |torch_lowprec - ref_fp64| + atol (inputs in dtype).
    Imported by the kernel test modules (`from conftest import ...`)."""
    err = (out.double() - ref64).abs()
    allowed = 2 * (torch_out.double() - ref64).abs() + ATOL[dtype] * ref64.abs().max()
    assert (err <= allowed).all(), \
        f"{what}: max error {err.max():.3g}, worst excess {(err - allowed).max():.3g}"


def run_on_views(fn, leaves, views, grad_outputs, **kwargs):
    """Forward and backward of `fn(*views(*leaves), **kwargs)`: the op gets views of the leaves
    (sliced rows, transposes, expands), and `grad_outputs` (one per output, in any layout, cast
    to the output's dtype) flow back through it to the floating-point leaves. Returns
    (outputs, gradients of the floating-point leaves), detached."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
    outputs = fn(*views(*leaves), **kwargs)
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    grads = torch.autograd.grad(outputs, [t for t in leaves if t.requires_grad],
                                [g.to(o.dtype) for g, o in zip(grad_outputs, outputs)])
    return [o.detach() for o in outputs], list(grads)


def assert_views_match_fp64(op, ref, leaves, views, grad_outputs, dtype, names, **kwargs):
    """`op` on views of the leaves, forward and backward, within the tolerance rule of its
    PyTorch reference `ref` (run in dtype for torch's own error, and on fp64 copies of the
    leaves for the fp64 reference). `names` label the outputs, then the leaf gradients."""
    def as64(t):
        return t.double() if t.is_floating_point() else t
    ours = run_on_views(op, leaves, views, grad_outputs, **kwargs)
    low = run_on_views(ref, leaves, views, grad_outputs, **kwargs)
    ref64 = run_on_views(ref, [as64(t) for t in leaves], views, [as64(g) for g in grad_outputs], **kwargs)
    got = ours[0] + ours[1]
    assert len(names) == len(got)
    for name, out, torch_out, want in zip(names, got, low[0] + low[1], ref64[0] + ref64[1]):
        assert out.shape == want.shape, name
        assert_within_torch_error(out, want, torch_out, dtype, name)
