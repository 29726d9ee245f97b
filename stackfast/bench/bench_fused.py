"""RoPE and SwiGLU benchmark: stackfast's Triton rope and swiglu against the PyTorch eager code
the model runs with kernels='torch' (rope_ref, swiglu_ref), torch.compile of it, and
Liger-Kernel's kernels when liger_kernel imports; forward and forward+backward ms and GB/s,
bf16, at the 1.1B step's shapes (8 x 2048 tokens; 32 query / 4 kv heads of 64; ffn 5632),
with the ratio to eager measured in the same run. The fused loss has its own benchmark
(bench_linear_cross_entropy.py: memory and time).

    python -m stackfast.bench.bench_fused [--quick]

Without CUDA it runs a small correctness check under the Triton interpreter instead.
Bytes are the minimum traffic: rope reads and writes q and k each pass; swiglu reads gate
and up and writes y forward, reads dy, gate and up and writes two gradients backward.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before stackfast.ops defines its kernels

from stackfast.bench import harness
from stackfast.model import rope_tables
from stackfast.ops import rope, rope_ref, swiglu, swiglu_ref

TOKENS = (8, 2048)  # batch, seqlen
ROPE_HEADS = (32, 4, 64)  # heads, kv_heads, head_dim
FFN = 5632


def rope_setup(device, dtype, batch, seqlen, heads, kv_heads, head_dim):
    """(inputs needing grad, fn(*inputs) -> outputs per impl, notes, bytes of one pass)."""
    q = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=dtype)
    cos, sin = (t.to(device) for t in rope_tables(head_dim, seqlen, 10000.0))
    impls = {"stackfast": lambda q, k: rope(q, k, cos, sin), "eager": lambda q, k: rope_ref(q, k, cos, sin)}
    notes = []
    if device.type == "cuda":
        impls["torch.compile"] = torch.compile(lambda q, k: rope_ref(q, k, cos, sin))
        try:
            from liger_kernel.transformers.rope import liger_rotary_pos_emb
            # Liger takes Hugging Face's (B, H, S, D) layout; the transposes are views
            impls["liger"] = lambda q, k: liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        except ImportError as error:
            notes.append(f"liger rope: not importable ({error})")
    return [q, k], impls, notes, 2 * (q.nbytes + k.nbytes)


def swiglu_setup(device, dtype, rows, ffn):
    gate = torch.randn(rows, ffn, device=device, dtype=dtype)
    up = torch.randn(rows, ffn, device=device, dtype=dtype)
    impls = {"stackfast": swiglu, "eager": swiglu_ref}
    notes = []
    if device.type == "cuda":
        impls["torch.compile"] = torch.compile(swiglu_ref)
        try:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            impls["liger"] = LigerSiLUMulFunction.apply
        except ImportError as error:
            notes.append(f"liger swiglu: not importable ({error})")
    return [gate, up], impls, notes, 3 * gate.nbytes


def _time_op(op: str, device, inputs, impls, pass_bytes, shape: str, quick: bool) -> list[dict]:
    rows = []
    inputs = [t.requires_grad_() for t in inputs]
    for name, fn in impls.items():
        for backward in (False, True):
            if backward:
                def step(fn=fn):
                    outs = fn(*inputs)
                    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
                    return torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])
            else:
                def step(fn=fn):
                    with torch.no_grad():
                        return fn(*inputs)
            timing = harness.measure(step, device=device, warmup=5, reps=10 if quick else 50)
            # fwd+bwd: the forward pass, then a backward that moves about 5/3 (swiglu) or 1 (rope) of it
            moved = pass_bytes * ((1 + (5 / 3 if op == "swiglu" else 1)) if backward else 1)
            rows.append({"op": op, "impl": name, "shape": shape, "dtype": str(inputs[0].dtype).replace("torch.", ""),
                         "pass": "fwd+bwd" if backward else "fwd", **timing,
                         "gbps": harness.gbps(moved, timing["median_ms"])})
    for row in rows:
        base = next(r for r in rows if r["impl"] == "eager" and r["pass"] == row["pass"])
        row["baseline"] = "eager"
        row["ratio"] = base["median_ms"] / row["median_ms"]
    return rows


def benchmark(device: torch.device, quick: bool = False) -> list[dict]:
    batch, seqlen = TOKENS
    rows = []
    for op, (inputs, impls, notes, pass_bytes), shape in [
            ("rope", rope_setup(device, torch.bfloat16, batch, seqlen, *ROPE_HEADS),
             f"{batch}x{seqlen}x{ROPE_HEADS[0]}/{ROPE_HEADS[1]}x{ROPE_HEADS[2]}"),
            ("swiglu", swiglu_setup(device, torch.bfloat16, batch * seqlen, FFN), f"{batch * seqlen}x{FFN}")]:
        for note in notes:
            print("skipped", note)
        rows += _time_op(op, device, inputs, impls, pass_bytes, shape, quick)
    return rows


# atol of the check as a fraction of max|ref64|: about one final rounding to the dtype
CHECK_ATOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}
# (op, setup arguments after device and dtype)
SMOKE_CASES = [("rope", (2, 37, 4, 2, 16)), ("swiglu", (37, 176))]
GPU_CHECKS = [("rope", (2, 2048, 32, 4, 64)), ("rope", (1, 1000, 12, 12, 128)), ("swiglu", (16384, 5632))]


def check(device: torch.device, dtype: torch.dtype, cases) -> list[dict]:
    """Outputs and input gradients against the fp64 reference with docs/design.md's rule:
    |kernel - ref64| <= 2 |eager - ref64| + atol."""
    rows = []
    for op, sizes in cases:
        inputs, _, _, _ = (rope_setup if op == "rope" else swiglu_setup)(device, dtype, *sizes)
        ours = rope if op == "rope" else swiglu
        ref = rope_ref if op == "rope" else swiglu_ref
        results = []
        for fn, kwargs in [(ours, {}), (ref, {}), (ref, {"upcast": True})]:
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            extra = rope_tables(sizes[-1], sizes[1], 10000.0) if op == "rope" else ()
            outs = fn(*leaves, *(t.to(device) for t in extra), **kwargs)
            outs = list(outs) if isinstance(outs, tuple) else [outs]
            torch.manual_seed(1)
            grads = torch.autograd.grad(outs, leaves, [torch.randn_like(o, dtype=dtype).to(o.dtype) for o in outs])
            results.append([o.detach() for o in outs] + list(grads))
        names = ["q", "k", "dq", "dk"] if op == "rope" else ["y", "d gate", "d up"]
        for name, got, low, want in zip(names, *results):
            err = (got.double() - want).abs()
            bound = 2 * (low.double() - want).abs() + CHECK_ATOL[dtype] * want.abs().max()
            rows.append({"op": op, "check": name, "dtype": str(dtype), "sizes": str(sizes),
                         "max_err": err.max().item(), "worst_excess": (err - bound).max().item(),
                         "ok": bool((err <= bound).all())})
    return rows


CHECK_COLUMNS = ["op", "check", "dtype", "sizes", "max_err", "ok"]
BENCH_COLUMNS = ["op", "impl", "shape", "pass", "median_ms", "gbps", "baseline", "ratio"]


def main(argv=None) -> int:
    return harness.op_benchmark_main("fused", __doc__.splitlines()[0], check, SMOKE_CASES, benchmark,
                                     CHECK_COLUMNS, BENCH_COLUMNS, argv)


if __name__ == "__main__":
    sys.exit(main())
