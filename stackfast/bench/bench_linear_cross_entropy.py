"""Fused linear cross-entropy: peak memory (CPU and GPU) and time (GPU) of loss + backward,
stackfast.ops.linear_cross_entropy against F.cross_entropy(lm_head(h).float()) and, when it
imports, Liger-Kernel's LigerFusedLinearCrossEntropyLoss; the same loss and gradients
checked against an fp64 reference (docs/design.md's rule).

    python -m stackfast.bench.bench_linear_cross_entropy            # CPU: 16384 tokens x 32000 vocab x 2048 hidden, fp32
    python -m stackfast.bench.bench_linear_cross_entropy --quick    # CPU: 2048 x 8000 x 512
    python -m stackfast.bench.bench_linear_cross_entropy --sizes 512 2000 256   # any CPU sizes

CPU memory is measured for real: each candidate runs in its own fresh process, which
reads its resident set size once the inputs exist (RSS from /proc/self/statm) and its
high-water mark after loss + backward (getrusage ru_maxrss); the peak is the difference,
i.e. what the loss and its gradients add on top of hidden and weight. (PyTorch's CPU
allocator returns large blocks to the OS, so the RSS follows the tensors alive.) On a GPU
the peak is torch.cuda.max_memory_allocated above the inputs, bf16 inputs, and the time is
harness.measure's. The fp64 reference is the chunked computation in float64 (the full fp64
logits would need 4 GB more; the chunking itself is checked against full fp64 logits in
tests/test_linear_cross_entropy.py).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before stackfast.ops defines its kernels

from stackfast.bench import harness
from stackfast.ops import linear_cross_entropy

FULL = (16384, 32000, 2048)  # tokens, vocab, hidden: the 1.1B benchmark step's loss
QUICK = (2048, 8000, 512)
GPU_QUICK = (4096, 32000, 2048)
IMPLS = ("stackfast", "torch")


def make_inputs(tokens: int, vocab: int, hidden: int, device="cpu", dtype=torch.float32):
    """Seeded hidden (tokens, hidden), weight (vocab, hidden) and targets (tokens,), some ignored."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
    t = torch.randint(0, vocab, (tokens,), generator=g)
    t[::97] = -100
    return h, w, t.to(device)


def loss_fn(impl: str):
    if impl == "stackfast":
        return linear_cross_entropy
    if impl == "torch":
        return lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t)
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, t: liger(w, h, t)
    raise ValueError(impl)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(impl: str, sizes, save: str) -> dict:
    """One candidate in this (fresh) process: loss + backward, peak RSS above the inputs."""
    dtype = torch.float64 if impl == "ref64" else torch.float32
    h, w, t = make_inputs(*sizes, dtype=dtype)
    h.requires_grad_()
    w.requires_grad_()
    fn = loss_fn("stackfast" if impl == "ref64" else impl)
    before = _rss_bytes()
    started = time.perf_counter()
    loss = fn(h, w, t)
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    torch.save({"loss": loss.detach(), "dh": h.grad, "dw": w.grad}, save)
    return {"impl": impl, "peak_extra_bytes": max(0, peak - before), "rss_inputs_bytes": before,
            "loss_backward_s": seconds, "loss": loss.item()}


def run_child(impl: str, sizes, save: str) -> dict:
    cmd = [sys.executable, "-m", "stackfast.bench.bench_linear_cross_entropy", "--child", impl, "--sizes", *map(str, sizes), "--save", save]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def compare(ours: dict, low: dict, ref: dict, atol: float = 1e-5) -> list[dict]:
    """docs/design.md's rule on loss, d hidden and d weight: |ours - ref64| <= 2 |torch - ref64| + atol max|ref64|."""
    rows = []
    for key in ("loss", "dh", "dw"):
        err = (ours[key].double() - ref[key]).abs()
        torch_err = (low[key].double() - ref[key]).abs()
        bound = 2 * torch_err + atol * ref[key].abs().max()
        rows.append({"check": key, "max_err": err.max().item(), "torch_max_err": torch_err.max().item(),
                     "ok": bool((err <= bound).all())})
    return rows


def cpu_memory(sizes) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = {impl: run_child(impl, sizes, str(folder / f"{impl}.pt")) for impl in (*IMPLS, "ref64")}
        checks = compare(*(torch.load(folder / f"{k}.pt") for k in ("stackfast", "torch", "ref64")))
    tokens, vocab, hidden = sizes
    base = results["torch"]["peak_extra_bytes"]
    for impl in IMPLS:
        r = results[impl]
        rows.append({"op": "linear_cross_entropy", "impl": impl, "device": "cpu", "dtype": "fp32", "tokens": tokens,
                     "vocab": vocab, "hidden": hidden, **{k: v for k, v in r.items() if k != "impl"},
                     "baseline": "torch", "memory_saving": base / max(r["peak_extra_bytes"], 1)})
    ok = all(c["ok"] for c in checks)
    for row in rows:
        row["checks"] = checks
        row["same_loss_and_grads"] = ok
    return rows


def benchmark(device: torch.device, quick: bool = False) -> list[dict]:
    """GPU: time and peak memory above the inputs of loss + backward, bf16 inputs; stackfast's loss
    and gradients checked against the fp64 reference with torch's own bf16 error as the bound."""
    tokens, vocab, hidden = GPU_QUICK if quick else FULL
    h, w, t = make_inputs(tokens, vocab, hidden, device, torch.bfloat16)
    impls = list(IMPLS)
    try:
        loss_fn("liger")
        impls.append("liger")
    except ImportError as error:
        print(f"skipped liger: not importable ({error})")
    rows, outputs = [], {}
    for impl in impls:
        fn = loss_fn(impl)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()

        def step(fn=fn, hh=hh, ww=ww):
            return torch.autograd.grad(fn(hh, ww, t), (hh, ww))
        if impl in IMPLS:  # same loss and gradients: kept for the check against fp64 below
            loss = fn(hh, ww, t)
            outputs[impl] = dict(zip(("loss", "dh", "dw"), (loss.detach(), *torch.autograd.grad(loss, (hh, ww)))))
        gpu = device.type == "cuda"  # (the CPU runs this only in the suite's rehearsal test)
        if gpu:
            torch.cuda.synchronize()
        inputs = torch.cuda.memory_allocated(device) if gpu else 0
        timing = harness.measure(step, device=device, warmup=2, reps=5 if quick else 20)
        rows.append({"op": "linear_cross_entropy", "impl": impl, "device": str(device), "dtype": "bf16",
                     "tokens": tokens, "vocab": vocab, "hidden": hidden, **timing,
                     "peak_extra_bytes": timing["peak_mem_bytes"] - inputs if gpu else None,
                     "tflops": harness.tflops(6 * tokens * vocab * hidden, timing["median_ms"])})
        del hh, ww
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    loss = linear_cross_entropy(h64, w64, t, use_kernel=False)  # chunked fp64: the full fp64 logits would not fit
    ref = dict(zip(("loss", "dh", "dw"), (loss.detach(), *torch.autograd.grad(loss, (h64, w64)))))
    checks = compare(outputs["stackfast"], outputs["torch"], ref, atol=1e-2)  # bf16: one final rounding
    del outputs, ref, h64, w64
    base = next(r for r in rows if r["impl"] == "torch")
    for row in rows:
        row.update(checks=checks, same_loss_and_grads=all(c["ok"] for c in checks))
        row.update(baseline="torch", ratio=base["median_ms"] / row["median_ms"],
                   memory_saving=base["peak_extra_bytes"] / max(row["peak_extra_bytes"], 1)
                   if row["peak_extra_bytes"] is not None else None)
    return rows


COLUMNS = ["impl", "device", "tokens", "vocab", "hidden", "peak_extra_bytes", "memory_saving", "loss_backward_s",
           "median_ms", "ratio", "same_loss_and_grads"]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"smaller sizes ({QUICK} on CPU)")
    parser.add_argument("--cpu", action="store_true", help="the CPU memory measurement even with a GPU")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs=3, default=None, metavar=("TOKENS", "VOCAB", "HIDDEN"),
                        help=f"CPU sizes (default {FULL}; --quick {QUICK})")
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.sizes, args.save)))
        return []
    harness.results_folder(args.out)
    device = harness.main_device(args.cpu)
    if device.type == "cuda":
        rows = benchmark(device, args.quick)
    else:
        rows = cpu_memory(args.sizes or (QUICK if args.quick else FULL))
    print("wrote", harness.write_results("bench_linear_cross_entropy", rows, args.out))
    print(harness.markdown_table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
