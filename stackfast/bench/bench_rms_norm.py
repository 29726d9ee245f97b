"""RMSNorm benchmark: stackfast's Triton rms_norm against F.rms_norm, torch.compile of an
F.rms_norm module, Liger-Kernel's LigerRMSNorm when it imports and HF-style eager code;
forward and forward+backward ms and GB/s at 16384 x 4096 bf16, with the ratio to F.rms_norm
and the fraction of the device copy bandwidth measured in the same run.

    python -m stackfast.bench.bench_rms_norm [--quick]

Without CUDA it runs a tiny correctness check under the Triton interpreter instead.
Bytes are the minimum traffic: forward reads x and writes y; backward reads x and dy and
writes dx (the weight is negligible).
"""
import os
import sys

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before stackfast.ops defines its kernels

from stackfast.bench import harness
from stackfast.ops import rms_norm, rms_norm_ref

ROWS, HIDDEN, EPS = 16384, 4096, 1e-5


def hf_rms_norm(x, weight):
    """Hugging Face LlamaRMSNorm's forward, as eager code."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * h.to(x.dtype)


def implementations(weight: torch.nn.Parameter) -> tuple[dict, list[str]]:
    """name -> fn(x, weight), and notes on the baselines that are missing. `weight` becomes
    the weight of the module-style baselines, so every fn differentiates the same tensor."""
    impls = {
        "stackfast": lambda x, w: rms_norm(x, w, EPS),
        "F.rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS),
        "torch.compile": torch.compile(lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS)),
        "hf-eager": hf_rms_norm,
    }
    notes = []
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        liger = LigerRMSNorm(weight.shape[0], eps=EPS)
        liger.weight = weight
        impls["liger"] = lambda x, w: liger(x)
    except ImportError as error:
        notes.append(f"liger: not importable ({error})")
    return impls, notes


def benchmark(device: torch.device, quick: bool = False) -> list[dict]:
    copy_gbps = harness.copy_bandwidth(device)[0]
    x = torch.randn(ROWS, HIDDEN, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.nn.Parameter(torch.ones(HIDDEN, device=device, dtype=torch.bfloat16))
    impls, notes = implementations(weight)
    for note in notes:
        print("skipped", note)
    dy = torch.randn_like(x)
    tensor_bytes = x.numel() * x.element_size()
    rows = []
    for name, fn in impls.items():
        for backward in (False, True):
            if backward:
                def step(fn=fn):
                    return torch.autograd.grad(fn(x, weight), (x, weight), dy)
            else:
                def step(fn=fn):
                    with torch.no_grad():
                        return fn(x, weight)
            timing = harness.measure(step, device=device, warmup=5, reps=10 if quick else 50)
            moved = tensor_bytes * (5 if backward else 2)
            gbps = harness.gbps(moved, timing["median_ms"])
            rows.append({"op": "rms_norm", "impl": name, "rows": ROWS, "hidden": HIDDEN,
                         "dtype": "bf16", "pass": "fwd+bwd" if backward else "fwd", **timing,
                         "gbps": gbps, "copy_gbps": copy_gbps, "copy_fraction": gbps / copy_gbps})
    for row in rows:
        base = next(r for r in rows if r["impl"] == "F.rms_norm" and r["pass"] == row["pass"])
        row["baseline"] = "F.rms_norm"
        row["ratio"] = base["median_ms"] / row["median_ms"]
    return rows


# atol of the check as a fraction of max|ref64|: about one final rounding to the dtype
CHECK_ATOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}


def check(device: torch.device, dtype: torch.dtype, cases) -> list[dict]:
    """Outputs and gradients against the fp64 reference with docs/design.md's rule:
    |kernel - ref64| <= 2 |torch - ref64| + atol. cases: (rows, hidden, with_residual)."""
    rows = []
    for n_rows, hidden, with_residual in cases:
        x = torch.randn(n_rows, hidden, device=device, dtype=dtype)
        residual = torch.randn_like(x) if with_residual else None
        weight = 1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)
        d_outs = [torch.randn_like(x) for _ in range(2 if with_residual else 1)]
        results = []
        for fn, kwargs in [(rms_norm, {}), (rms_norm_ref, {}), (rms_norm_ref, {"upcast": True})]:
            inputs = [t.clone().requires_grad_() for t in (x, weight, residual) if t is not None]
            outs = fn(*inputs[:2], EPS, residual=inputs[2] if with_residual else None, **kwargs)
            outs = list(outs) if with_residual else [outs]
            grads = torch.autograd.grad(outs, inputs, [d.to(outs[0].dtype) for d in d_outs])
            results.append([o.detach() for o in outs] + list(grads))
        names = ["normed", "new_residual"][:len(d_outs)] + ["dx", "dweight", "dresidual"]
        for name, got, low, ref in zip(names, *results):
            err = (got.double() - ref).abs()
            bound = 2 * (low.double() - ref).abs() + CHECK_ATOL[dtype] * ref.abs().max()
            rows.append({"op": "rms_norm", "check": name, "dtype": str(dtype), "rows": n_rows,
                         "hidden": hidden, "residual": with_residual,
                         "max_err": err.max().item(), "worst_excess": (err - bound).max().item(),
                         "ok": bool((err <= bound).all())})
    return rows


CHECK_COLUMNS = ["op", "check", "dtype", "rows", "hidden", "residual", "max_err", "ok"]
BENCH_COLUMNS = ["impl", "pass", "median_ms", "gbps", "copy_fraction", "baseline", "ratio"]


def main(argv=None) -> int:
    return harness.op_benchmark_main("rms_norm", __doc__.splitlines()[0], check, [(5, 80, True), (3, 1000, False)],
                                     benchmark,
                                     CHECK_COLUMNS, BENCH_COLUMNS, argv)


if __name__ == "__main__":
    sys.exit(main())
