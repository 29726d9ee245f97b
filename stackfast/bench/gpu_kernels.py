"""One-command GPU check of the Triton kernels: bf16 correctness at real sizes against the
fp64 references, then the attention and rms_norm benchmarks; writes JSON under
benchmarks/results/ and prints the ratios last. Meant to finish in under 5 minutes.

    python -m stackfast.bench.gpu_kernels

Without CUDA it runs the interpreter smoke checks of both benchmarks and skips timing.
"""
import sys


import torch

from stackfast.bench import bench_attention, bench_rms_norm, harness

# Seqlens and head dims shared with the benchmark cases reuse their autotuning; seqlen 1000
# checks the partial blocks at a real size.
ATTENTION_CHECKS = [(2, 16, 4, 2048, 128, True), (1, 8, 8, 1000, 64, False)]
RMS_NORM_CHECKS = [(16384, 4096, True), (4096, 5632, False)]
RATIO_COLUMNS = ["op", "impl", "pass", "seqlen", "head_dim", "kv_heads", "median_ms", "tflops",
                 "gbps", "copy_fraction", "baseline", "ratio"]


def main() -> int:
    if not torch.cuda.is_available():
        print("No CUDA device: skipping correctness at real sizes and all timing; "
              "running the interpreter smoke checks instead.")
        return max(bench_attention.main([]), bench_rms_norm.main([]))
    device = harness.main_device()
    checks = (bench_attention.check(device, torch.bfloat16, ATTENTION_CHECKS)
              + bench_rms_norm.check(device, torch.bfloat16, RMS_NORM_CHECKS))
    print(harness.markdown_table(checks, bench_attention.CHECK_COLUMNS + ["rows", "hidden"]))
    print("wrote", harness.write_results("gpu_kernels_checks", checks))
    if not all(row["ok"] for row in checks):
        print("CORRECTNESS FAILED: see the rows with ok=False above")

    rows = bench_attention.benchmark(device) + bench_rms_norm.benchmark(device)
    print("wrote", harness.write_results("gpu_kernels", rows))
    print(harness.markdown_table(rows, RATIO_COLUMNS))
    return 0 if all(row["ok"] for row in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
