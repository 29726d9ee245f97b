"""The whole benchmark suite in one command (also `stackfast bench`).

On a GPU (about 6 minutes): the ceilings (bf16 matmul 8192^3, device copy), the kernels
(attention, RMSNorm, RoPE, SwiGLU: bf16 correctness at real sizes, then timing against every
SDPA backend / PyTorch eager / compile / Liger; the fused linear cross-entropy's time and
memory), layer replication, the 1.1B train step against HF, HF + stackfast kernels and
HF + Liger, the 7B train step (one-process FSDP, activation checkpointing; skipped
where its 95 GB of training state cannot fit, e.g. an 80 GB H100) and the G_stack growth
time of a 7B target, and the training loop's stall at a checkpoint step, sync against
checkpoint.async_save (a 134M model). With --cpu (or without a GPU, about 5 minutes): the
train step against HF, replication, loader throughput, the fused loss's peak memory against
the full logits and the checkpoint stall (a 134M model, fp32 + AdamW: 1.6 GB a checkpoint).
Every part writes its JSON under benchmarks/results/ (GPU name, versions, git revision);
the last thing printed is one markdown table of ratios against the baselines measured in
the same run, with the design targets beside them.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback


import torch

from stackfast.bench import (bench_checkpoint, bench_growth, bench_loader, bench_replicate, bench_train, harness)


MATMUL_SIZE = 8192  # the ceilings' bf16 matmul is MATMUL_SIZE^3 (the H200 reference figures in docs/design.md)


def ceilings(device: torch.device) -> list[dict]:
    """The two numbers every ratio is judged against: bf16 matmul TFLOP/s and copy GB/s."""
    n = MATMUL_SIZE
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul = harness.measure(lambda: a @ b, device=device, warmup=5, reps=30)
    copy_gbps, copy = harness.copy_bandwidth(device)
    return [{"what": f"bf16 matmul {n}^3", "median_ms": matmul["median_ms"],
             "tflops": harness.tflops(2 * n ** 3, matmul["median_ms"])},
            {"what": f"device copy {harness.COPY_BYTES / 2**30:.3g} GiB", "median_ms": copy["median_ms"],
             "gbps": copy_gbps}]


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
            rows.append({"what": f"rms_norm {r['pass']} {r['rows']}x{r['hidden']} {r['dtype']}",
                         "ours": f"{r['gbps']:.0f} GB/s ({100 * r['copy_fraction']:.0f}% of copy)",
                         "baseline": r.get("baseline"), "ratio": r.get("ratio"),
                         "target": ">= 1.5 (fwd+bwd), >= 60% of copy"})
    for r in parts.get("fused", []):
        if r.get("impl") == "stackfast":
            rows.append({"what": f"{r['op']} {r['pass']} {r['shape']} {r['dtype']}", "ours": f"{r['gbps']:.0f} GB/s",
                         "baseline": r.get("baseline"), "ratio": r.get("ratio"), "target": "> 1 (fewer passes)"})
    for r in parts.get("linear_cross_entropy", []):
        if r.get("impl") == "stackfast":
            what = f"linear_cross_entropy {r['tokens']}x{r['vocab']}x{r['hidden']} {r['dtype']} peak memory"
            ours = f"{r['peak_extra_bytes'] / 2**20:.0f} MiB" if r.get("peak_extra_bytes") is not None else None
            rows.append({"what": what, "ours": ours, "baseline": "torch", "ratio": r["memory_saving"],
                         "target": ">= 4 (less memory), same loss and grads"})
    for r in parts.get("replicate", []):
        if r.get("method") == "replicate_":
            rows.append({"what": f"replicate_ g={r['g']} ({r['source_bytes'] / 1e9:.2f} GB sources)",
                         "ours": f"{r['median_ms']:.1f} ms ({100 * r['roofline_fraction']:.0f}% of roofline)",
                         "baseline": "copy_ loop", "ratio": r["speedup_vs_copy_loop"],
                         "target": ">= 1.4, >= 90% of roofline"})
    for r in parts.get("train", []) + parts.get("train_7b", []):
        if not (r["name"].startswith("stackfast") or r["name"] == "hf-llama+stackfast"):
            continue
        what = f"train step {r['name']} {r['preset']} seq {r['seq_len']} x{r['batch']}" + (
            " (FSDP, AC)" if r.get("fsdp") else "")
        target = ">= 45% MFU (H200)" if r["preset"] == "7b" else ">= 1.15 vs HF+Liger, >= 50% MFU"
        if "skipped" in r:
            rows.append({"what": what, "ours": r["skipped"], "baseline": None, "ratio": None, "target": target})
            continue
        base = "hf-llama+liger" if r.get("ratio_vs_hf-llama+liger") is not None else "hf-llama-sdpa"
        mfu = f", MFU {100 * r['mfu']:.0f}%" if r.get("mfu") else ""
        rows.append({"what": what, "ours": f"{r['tokens_per_s']:.0f} tok/s{mfu}",
                     "baseline": base if r.get(f"ratio_vs_{base}") is not None else None,
                     "ratio": r.get(f"ratio_vs_{base}"), "target": target})
    for r in parts.get("growth", []):
        ours = r["skipped"] if "skipped" in r else f"{r['median_ms']:.0f} ms"
        rows.append({"what": f"{r['what']} ({r['small']} -> {r['target']})", "ours": ours,
                     "baseline": None, "ratio": None, "target": "< 1 s on GPU"})
    for r in parts.get("checkpoint", []):
        if r.get("mode") == "async":
            rows.append({"what": f"checkpoint stall, async_save ({r['params'] / 1e6:.0f}M params, "
                                 f"{r['checkpoint_bytes'] / 1e9:.2f} GB)",
                         "ours": f"{r['median_ms']:.0f} ms", "baseline": "sync save",
                         "ratio": r["stall_ratio_vs_sync"], "target": "> 1 (shorter stall)"})
    for r in parts.get("loader", []):
        if "ratio_vs_floor" in r:
            rows.append({"what": f"loader seq {r['seq_len']} x{r['batch']}", "ours": f"{r['tokens_per_s']:.3g} tok/s",
                         "baseline": "contiguous copy", "ratio": r["ratio_vs_floor"], "target": "feeds the GPU"})
    return rows


def gpu_parts(device: torch.device, out_dir: str | None) -> dict:
    """name -> function returning that part's rows, in the order they run on a GPU."""
    from stackfast.bench import bench_attention, bench_fused, bench_linear_cross_entropy, bench_rms_norm, gpu_kernels
    out = ["--out", out_dir] if out_dir else []

    def ceilings_part():
        rows = ceilings(device)
        harness.write_results("ceilings", rows, out_dir)
        return rows

    def checks_part():
        rows = (bench_attention.check(device, torch.bfloat16, gpu_kernels.ATTENTION_CHECKS)
                + bench_rms_norm.check(device, torch.bfloat16, gpu_kernels.RMS_NORM_CHECKS)
                + bench_fused.check(device, torch.bfloat16, bench_fused.GPU_CHECKS))
        harness.write_results("gpu_kernels_checks", rows, out_dir)
        if not all(r["ok"] for r in rows):
            raise RuntimeError("kernel correctness failed at real sizes: see the gpu_kernels_checks JSON")
        return rows

    def kernels_part(name, op):
        def part():
            rows = op.benchmark(device, quick=True)
            harness.write_results(f"bench_{name}", rows, out_dir)
            return rows
        return part

    return {
        "ceilings": ceilings_part,
        "checks": checks_part,
        "attention": kernels_part("attention", bench_attention),
        "rms_norm": kernels_part("rms_norm", bench_rms_norm),
        "fused": kernels_part("fused", bench_fused),
        "linear_cross_entropy": kernels_part("linear_cross_entropy", bench_linear_cross_entropy),
        "replicate": lambda: bench_replicate.main(out),
        "train": lambda: bench_train.main(["--reps", "10"] + out),
        "train_7b": lambda: bench_train.main(["--preset", "7b", "--batch", "4", "--activation-checkpointing", "--fsdp",
                                              "--only", "stackfast", "--reps", "5", "--name", "train-7b"] + out),
        "growth": lambda: bench_growth.main(out),
        "checkpoint": lambda: bench_checkpoint.main(["--saves", "3"] + out),
    }


def cpu_parts(out_dir: str | None, quick: bool) -> dict:
    """name -> function returning that part's rows: the CPU subset."""
    from stackfast.bench import bench_linear_cross_entropy
    out = ["--out", out_dir] if out_dir else []
    return {
        "train": lambda: bench_train.main(["--cpu", "--reps", "2" if quick else "5"] + out
                                          + (["--preset", "tiny", "--seq-len", "32"] if quick else [])),
        "replicate": lambda: bench_replicate.main(["--cpu"] + out + (["--scale", "64"] if quick else [])),
        "loader": lambda: bench_loader.main(out + (["--seq-len", "64", "--reps", "3"] if quick else [])),
        "growth": lambda: bench_growth.main(["--cpu"] + out + (["--reps", "1"] if quick else [])),
        "checkpoint": lambda: bench_checkpoint.main(["--cpu"] + out + (["--quick"] if quick else [])),
        # peak memory of the fused loss against the full logits (the 16384 x 32000 x 2048 figure: run it alone)
        "linear_cross_entropy": lambda: bench_linear_cross_entropy.main(
            ["--cpu"] + out + (["--sizes", "512", "2000", "128"] if quick else ["--quick"])),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the CPU subset, even with a GPU")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the suite)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    try:
        harness.results_folder(args.out)
    except ValueError as error:
        parser.error(str(error))
    device = harness.main_device(args.cpu)
    started = time.perf_counter()
    todo = gpu_parts(device, args.out) if device.type == "cuda" else cpu_parts(args.out, args.quick)
    parts: dict[str, list[dict]] = {}
    failed = []
    for name, part in todo.items():
        # A part that fails is reported and the rest still run: one GPU session gets one try.
        try:
            parts[name] = part()
        except Exception:
            traceback.print_exc()
            failed.append(name)
    rows = summary_rows(parts)
    harness.write_results("summary", rows, args.out)
    print(f"\nbenchmark suite on {harness.environment()['gpu'] or 'CPU'} in {time.perf_counter() - started:.0f} s")
    print(harness.markdown_table(rows, ["what", "ours", "baseline", "ratio", "target"]))
    if failed:
        print(f"FAILED parts (tracebacks above): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
