"""The kernel self-check: each Triton kernel a model will run, forward and backward, against its
PyTorch reference on the device at hand, before the kernels train anything.

Why: the kernels are tested on CPU under the Triton interpreter and compiled offline, but a
GPU, driver or compiler they have not run on could compile one differently, and that would
show only as a silently wrong training run. So the first forward of a model that runs the
kernels (model.py) checks them at its dtype, head dim, widths and vocab, on small odd shapes,
with docs/design.md's tolerance rule (convention 2):

    |kernel - ref_fp64| <= 2 |torch_lowprec - ref_fp64| + atol * max |ref_fp64|

The verdicts are cached per GPU (name), driver, Triton, torch and stackfast versions and model
shape, in `kernel_check.json` of the user's cache folder: the check costs about a second the
first time and a file read afterwards. A kernel that fails (or raises) is reported in one line,
and the model runs PyTorch's path for that op alone. STACKFAST_KERNEL_CHECK=0 skips the check
(the kernels then run unchecked); `stackfast info --check` runs it on demand.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import sys
import tempfile
import types
from typing import Callable

import torch

from stackfast import __version__

OPS = ("attention", "rms_norm", "rope", "swiglu", "linear_cross_entropy")
CACHE_FILE = "kernel_check.json"
# atol as a fraction of the largest reference value, per input dtype (the tests use this table too).
# fp16: one final rounding to fp16 (half an ulp, 2**-11 relative) at the largest value, where
# PyTorch's own error can happen to be 0. fp32: PyTorch's fp32 error is ~1e-7 and the kernel
# sums in another order.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Part of the cache key: raised when a check changes, so that verdicts of an older check are not
# reused (2: attention checked with the document mask too).
CHECKS = 2


def enabled() -> bool:
    """Whether models run the check (STACKFAST_KERNEL_CHECK=0 turns it off)."""
    return os.environ.get("STACKFAST_KERNEL_CHECK", "1") != "0"


@dataclasses.dataclass
class Verdict:
    """One op's result: ok, and where it was worst: the output (e.g. "d weight"), its largest
    error against fp64 and what the rule allowed there; or the exception it raised."""
    op: str
    ok: bool
    output: str = ""
    error: float = 0.0
    allowed: float = 0.0
    raised: str = ""

    def text(self) -> str:
        if self.raised:
            return f"failed: {self.raised}"
        return (f"{'ok' if self.ok else 'wrong'}: {self.output} off by {self.error:.3g} from fp64 where "
                f"{self.allowed:.3g} is allowed")


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the kernels are checked at: the run's dtype and the model's sizes."""
    dtype: torch.dtype
    head_dim: int
    group: int  # query heads per kv head (GQA)
    hidden_size: int
    ffn_size: int
    vocab_size: int
    rope_theta: float
    norm_eps: float

    @classmethod
    def of(cls, cfg, dtype: torch.dtype) -> "Shapes":
        return cls(dtype, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads, cfg.hidden_size, cfg.ffn_size,
                   cfg.vocab_size, cfg.rope_theta, cfg.norm_eps)

    def key(self) -> str:
        return (f"{DTYPE_NAMES[self.dtype]}, head_dim {self.head_dim}, group {self.group}, hidden "
                f"{self.hidden_size}, ffn {self.ffn_size}, vocab {self.vocab_size}, theta {self.rope_theta:g}, "
                f"eps {self.norm_eps:g}")


def device_key(device: torch.device) -> str:
    """The GPU, its driver and the software versions: what a compiler difference depends on."""
    import triton
    if device.type == "cuda":
        driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: "unknown")()
        where = f"{torch.cuda.get_device_name(device)}, driver {driver}, cuda {torch.version.cuda}"
    else:
        where = f"{device.type} ({platform.machine()}), Triton interpreter"
    return f"{where}, triton {triton.__version__}, torch {torch.__version__}, stackfast {__version__}"


def cache_key(shapes: Shapes, device: torch.device) -> str:
    """What a cached verdict holds for: the device and versions, the shapes, the checks' version."""
    return f"{device_key(device)}; {shapes.key()}; checks {CHECKS}"


def _cases(shapes: Shapes, device: torch.device) -> dict[str, tuple]:
    """op -> (kernel function, reference function taking upcast=, inputs, names of the outputs and
    then of the inputs' gradients): small odd shapes
    (sequence lengths 97 and 37, 7 or 9 rows), drawn from a generator of their own so a
    run's random stream is untouched."""
    from stackfast.model import rope_tables
    # each function from its module (what the model's `from stackfast.ops import rope` binds
    # first), so a spy or patch on the package's attribute leaves the check alone
    fns = {name: getattr(importlib.import_module(f"stackfast.ops.{op}"), name)
           for op in OPS for name in (op, f"{op}_ref")}
    ops = types.SimpleNamespace(**fns)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, shapes.dtype)

    d, g, h = shapes.head_dim, shapes.group, 40
    cos, sin = (t.to(device) for t in rope_tables(d, 37, shapes.rope_theta))
    targets = torch.randint(0, shapes.vocab_size, (9,), generator=gen)
    targets[[2, 5]] = -100  # ignored rows
    targets = targets.to(device)
    eps = shapes.norm_eps

    def norm(fn):  # both forms the model runs: with the fused residual add, and without
        return lambda x, w, r, **kw: (*fn(x, w, eps, residual=r, **kw), fn(x, w, eps, **kw))

    # the document-masked kernel (data.document_mask) is compiled apart: documents of 30, 1, 50
    # and 16 positions, so boundaries fall inside key blocks and one document is a single token
    documents = torch.repeat_interleave(torch.arange(4), torch.tensor([30, 1, 50, 16]))[None].to(device)

    def attend(fn):  # both forms the model runs: causal, and causal within documents
        return lambda q, k, v, **kw: (fn(q, k, v, causal=True, **kw),
                                      fn(q, k, v, causal=True, document_ids=documents, **kw))
    return {
        "attention": (attend(ops.attention), attend(ops.attention_ref),
                      [randn(1, 97, g, d), randn(1, 97, 1, d), randn(1, 97, 1, d)],
                      ["out", "out (documents)", "dq", "dk", "dv"]),
        "rms_norm": (norm(ops.rms_norm), norm(ops.rms_norm_ref),
                     [randn(7, shapes.hidden_size), randn(shapes.hidden_size, scale=0.1) + 1,
                      randn(7, shapes.hidden_size)],
                     ["normed", "new residual", "normed (no residual)", "dx", "d weight", "d residual"]),
        "rope": (lambda q, k: ops.rope(q, k, cos, sin),
                 lambda q, k, upcast: ops.rope_ref(q, k, cos, sin, upcast=upcast),
                 [randn(1, 37, g, d), randn(1, 37, 1, d)], ["q out", "k out", "dq", "dk"]),
        "swiglu": (ops.swiglu, ops.swiglu_ref, [randn(7, shapes.ffn_size), randn(7, shapes.ffn_size)],
                   ["out", "d gate", "d up"]),
        # logits of spread ~3, so each row's running max moves across the kernel's vocab blocks
        "linear_cross_entropy": (
            lambda x, w: ops.linear_cross_entropy(x, w, targets, chunk_size=4, use_kernel=True),
            lambda x, w, upcast: ops.linear_cross_entropy_ref(x, w, targets, upcast=upcast),
            [randn(9, h), randn(shapes.vocab_size, h, scale=3 / h ** 0.5)], ["loss", "d hidden", "d weight"]),
    }


def _forward_backward(fn, inputs: list, grad_outputs: list | None, **kwargs):
    """Outputs of fn(*inputs) and the gradients of the inputs for `grad_outputs` (random ones,
    drawn in the inputs' dtype, when None): all detached, outputs first."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = fn(*leaves, **kwargs)
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    if grad_outputs is None:
        gen = torch.Generator().manual_seed(1)
        grad_outputs = [torch.randn(o.shape, generator=gen).to(o.device, inputs[0].dtype) for o in outputs]
    grads = torch.autograd.grad(outputs, leaves, [g.to(o.dtype) for g, o in zip(grad_outputs, outputs)])
    return [t.detach() for t in outputs + list(grads)], grad_outputs


def check_op(op: str, kernel: Callable, ref: Callable, inputs: list, names: list[str]) -> Verdict:
    """The kernel against the reference, forward and backward, by the tolerance rule above."""
    dtype = inputs[0].dtype
    try:
        ours, grad_outputs = _forward_backward(kernel, inputs, None)
    except Exception as e:  # a kernel that does not compile or run here: PyTorch's path then
        first = (str(e).strip().splitlines() or [""])[0]
        return Verdict(op, False, raised=f"{type(e).__name__}: {first}")
    low, _ = _forward_backward(ref, inputs, grad_outputs, upcast=False)
    ref64, _ = _forward_backward(ref, [t.double() for t in inputs], [g.double() for g in grad_outputs],
                                 upcast=True)
    worst = Verdict(op, True, error=-1.0)
    for name, out, torch_out, want in zip(names, ours, low, ref64):
        err = (out.double() - want).abs()
        allowed = 2 * (torch_out.double() - want).abs() + ATOL[dtype] * want.abs().max()
        # nan counts as the largest excess
        excess = torch.where(err <= allowed, err - allowed, torch.inf).flatten()
        i = int(excess.argmax())
        ok = bool(excess[i] <= 0)
        if (worst.ok and not ok) or (ok == worst.ok and float(err.flatten()[i]) > worst.error):
            worst = Verdict(op, ok, name, float(err.flatten()[i]), float(allowed.flatten()[i]))
    return worst


def run_checks(shapes: Shapes, device: torch.device, ops: tuple[str, ...] = OPS) -> dict[str, Verdict]:
    """Run the check of each op in `ops` (no cache)."""
    cases = _cases(shapes, device)
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        return {op: check_op(op, *cases[op]) for op in ops}


def _read(path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # none yet, unreadable or corrupt: checked again
        return {}


def _write(path, data: dict) -> None:
    """Atomically (a temporary file renamed over it): a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cached_checks(shapes: Shapes, device: torch.device, ops: tuple[str, ...] = OPS,
                  fresh: bool = False) -> dict[str, Verdict]:
    """The verdicts of `ops` at `shapes` on `device`: from the cache when this GPU, driver, versions
    and shapes were checked before (unless `fresh`), else checked now and cached. A cache folder
    that cannot be written only means checking again next time."""
    from stackfast.data import cache_dir
    path = cache_dir() / CACHE_FILE
    key = cache_key(shapes, device)
    entry = _read(path).get(key, {})
    missing = tuple(op for op in ops if fresh or op not in entry)
    if missing:
        entry.update({op: dataclasses.asdict(v) for op, v in run_checks(shapes, device, missing).items()})
        data = _read(path)  # again: another process may have added its own
        data[key] = entry
        try:
            _write(path, data)
        except OSError:
            pass
    return {op: Verdict(**entry[op]) for op in ops}


def failed_ops(shapes: Shapes, device: torch.device, ops: tuple[str, ...]) -> set[str]:
    """The ops of `ops` whose kernel failed the (cached) check, each said in one line on stderr."""
    failed = set()
    for op, verdict in cached_checks(shapes, device, ops).items():
        if not verdict.ok:
            failed.add(op)
            print(f"stackfast: kernel check on this device: {op} ({DTYPE_NAMES[shapes.dtype]}) {verdict.text()}; "
                  f"{op} runs PyTorch instead", file=sys.stderr, flush=True)
    return failed
