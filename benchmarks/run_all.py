"""The whole benchmark suite in one command (also `stackfast bench`).

On a GPU (about 6 minutes): the ceilings (bf16 matmul 8192^3, device copy), the kernels
(attention and RMSNorm: bf16 correctness at real sizes, then timing against every SDPA
backend / F.rms_norm / compile / Liger), layer replication, the 1.1B train step against
HF and HF + Liger, and the G_stack growth time of a 7B target. With --cpu (or without a
GPU, about 3 minutes): the train step against HF, replication and loader throughput.
Every part writes its JSON under benchmarks/results/ (GPU name, versions, git revision);
the last thing printed is one markdown table of ratios against the baselines measured in
the same run, with the design targets beside them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import (bench_growth, bench_loader, bench_replicate, bench_train, harness)  # noqa: E402


def ceilings(device: torch.device) -> list[dict]:
    """The two numbers every ratio is judged against: bf16 matmul TFLOP/s and copy GB/s."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    matmul = harness.measure(lambda: a @ b, device=device, warmup=5, reps=30)
    copy_gbps, copy = harness.copy_bandwidth(device)
    return [{"what": "bf16 matmul 8192^3", "median_ms": matmul["median_ms"],
             "tflops": harness.tflops(2 * 8192 ** 3, matmul["median_ms"])},
            {"what": "device copy 1 GiB", "median_ms": copy["median_ms"], "gbps": copy_gbps}]


def summary_rows(parts: dict) -> list[dict]:
    """One row per claim: what was measured, ours, the baseline, the ratio, the target."""
    rows = []
    for r in parts.get("attention", []):
        if r.get("impl") == "stackfast" and r.get("pass") == "fwd+bwd":
            rows.append({"what": f"attention fwd+bwd {r['batch']}x{r['heads']}/{r['kv_heads']}x{r['seqlen']}"
                                 f"x{r['head_dim']}", "ours": f"{r['tflops']:.0f} TFLOP/s",
                         "baseline": r.get("baseline"), "ratio": r.get("ratio"), "target": ">= 1.0"})
    for r in parts.get("rms_norm", []):
        if r.get("impl") == "stackfast":
            rows.append({"what": f"rms_norm {r['pass']} 16384x4096 bf16", "ours": f"{r['gbps']:.0f} GB/s "
                         f"({100 * r['copy_fraction']:.0f}% of copy)", "baseline": r.get("baseline"),
                         "ratio": r.get("ratio"), "target": ">= 1.5 (fwd+bwd), >= 60% of copy"})
    for r in parts.get("replicate", []):
        if r.get("method") == "replicate_":
            rows.append({"what": f"replicate_ g={r['g']} ({r['source_bytes'] / 1e9:.2f} GB sources)",
                         "ours": f"{r['median_ms']:.1f} ms ({100 * r['roofline_fraction']:.0f}% of roofline)",
                         "baseline": "copy_ loop", "ratio": r["speedup_vs_copy_loop"],
                         "target": ">= 1.4, >= 90% of roofline"})
    for r in parts.get("train", []):
        if r["name"].startswith("stackfast"):
            base = "hf-llama+liger" if r.get("ratio_vs_hf-llama+liger") is not None else "hf-llama-sdpa"
            mfu = f", MFU {100 * r['mfu']:.0f}%" if r.get("mfu") else ""
            rows.append({"what": f"train step {r['name']} {r['preset']} seq {r['seq_len']} x{r['batch']}",
                         "ours": f"{r['tokens_per_s']:.0f} tok/s{mfu}", "baseline": base,
                         "ratio": r.get(f"ratio_vs_{base}"), "target": ">= 1.15 vs HF+Liger, >= 50% MFU"})
    for r in parts.get("growth", []):
        rows.append({"what": f"{r['what']} ({r['small']} -> {r['target']})", "ours": f"{r['median_ms']:.0f} ms",
                     "baseline": None, "ratio": None, "target": "< 1 s on GPU"})
    for r in parts.get("loader", []):
        if "ratio_vs_floor" in r:
            rows.append({"what": f"loader seq {r['seq_len']} x{r['batch']}", "ours": f"{r['tokens_per_s']:.3g} tok/s",
                         "baseline": "contiguous copy", "ratio": r["ratio_vs_floor"], "target": "feeds the GPU"})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the CPU subset, even with a GPU")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the suite)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    out = ["--out", args.out] if args.out else []
    device = harness.main_device(args.cpu)
    started = time.perf_counter()
    parts: dict[str, list[dict]] = {}
    if device.type == "cuda":
        from benchmarks import bench_attention, bench_rms_norm, gpu_kernels
        parts["ceilings"] = ceilings(device)
        harness.write_results("ceilings", parts["ceilings"], args.out)
        checks = (bench_attention.check(device, torch.bfloat16, gpu_kernels.ATTENTION_CHECKS)
                  + bench_rms_norm.check(device, torch.bfloat16, gpu_kernels.RMS_NORM_CHECKS))
        harness.write_results("gpu_kernels_checks", checks, args.out)
        if not all(r["ok"] for r in checks):
            print("KERNEL CORRECTNESS FAILED: see gpu_kernels_checks JSON")
        parts["attention"] = bench_attention.benchmark(device, quick=True)
        parts["rms_norm"] = bench_rms_norm.benchmark(device, quick=True)
        harness.write_results("gpu_kernels", parts["attention"] + parts["rms_norm"], args.out)
        parts["replicate"] = bench_replicate.main(out)
        parts["train"] = bench_train.main(["--reps", "10"] + out)
        parts["growth"] = bench_growth.main(out)
    else:
        quick = args.quick
        parts["train"] = bench_train.main(["--cpu", "--reps", "2" if quick else "5"] + out
                                          + (["--preset", "tiny", "--seq-len", "32"] if quick else []))
        parts["replicate"] = bench_replicate.main(["--cpu"] + out + (["--scale", "64"] if quick else []))
        parts["loader"] = bench_loader.main(out + (["--seq-len", "64", "--reps", "3"] if quick else []))
        parts["growth"] = bench_growth.main(["--cpu"] + out + (["--reps", "1"] if quick else []))
    rows = summary_rows(parts)
    harness.write_results("summary", rows, args.out)
    print(f"\nbenchmark suite on {harness.environment()['gpu'] or 'CPU'} in {time.perf_counter() - started:.0f} s")
    print(harness.markdown_table(rows, ["what", "ours", "baseline", "ratio", "target"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
