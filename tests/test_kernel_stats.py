"""benchmarks/kernel_stats.py: the offline compile report (sm_90, bf16, head dim 128 causal, and
the head-dim-256 dk/dv: the CI subset), compiled with the triton wheel's compiler and ptxas, no
GPU needed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_report(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the GPU configs
    result = subprocess.run([sys.executable, "benchmarks/kernel_stats.py", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    return result, [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def report():
    return run_report("--arch", "90", "--kernels", "attention", "--dtypes", "bf16", "--head-dims", "128",
                      "--causal", "true", "--default-only", "--json", "--jobs", "2")


def test_report_covers_every_attention_kernel(report):
    result, rows = report
    assert result.returncode == 0, result.stderr[-3000:]  # no default config spills or overflows
    keys = {"kernel", "arch", "head_dim", "dtype", "config", "registers", "spill_bytes", "shared_bytes", "fits",
            "wgmma", "tma"}
    assert rows and all(keys <= set(row) for row in rows)
    kernels = {row["kernel"] for row in rows}
    assert {"attention.fwd", "attention.dkdv", "attention.dkdv-deterministic", "attention.dq",
            "attention.preprocess"} <= kernels
    assert {row["group"] for row in rows if row["kernel"] == "attention.dkdv"} == {1, 4}  # GQA compiled too
    for row in rows:
        assert row["arch"] == 90 and row["head_dim"] == 128 and row["dtype"] == "bf16" and row["default"]
        assert 0 < row["registers"] <= 255 and 0 < row["shared_bytes"] <= 232448 and row["fits"]
        assert row["spill_bytes"] == 0, row
    # the matmul kernels use Hopper's tensor-core instructions, and only those: a dot whose M is
    # below wgmma's 64 rows falls back to mma.sync (the atomic dq of dk/dv at 32 query rows did)
    assert all(row["wgmma"] > 0 for row in rows if row["kernel"] != "attention.preprocess")
    assert [row for row in rows if row["mma"]] == []
    assert {(row["group"], row["kernel"]) for row in rows if row["kernel"].startswith("attention.dkdv")} == {
        (g, k) for g in (1, 4) for k in ("attention.dkdv", "attention.dkdv-deterministic")}


def test_head_dim_256_backward_runs_on_wgmma():
    """sm_90 at head dim 256: the dk/dv defaults (atomic dq or not, GQA or not) had no wgmma at
    all (32 x 32 and 16 x 16 blocks); now BLOCK_M 64 with the scores untransposed, no mma.sync."""
    result, rows = run_report("--arch", "90", "--kernels", "attention.dkdv", "--dtypes", "bf16", "--head-dims", "256",
                              "--causal", "true", "--default-only", "--json", "--jobs", "2")
    assert result.returncode == 0, result.stderr[-3000:]  # no spills, fits
    assert {(row["kernel"], row["group"]) for row in rows} == {
        (k, g) for g in (1, 4) for k in ("attention.dkdv", "attention.dkdv-deterministic")}
    assert all(row["wgmma"] > 0 and row["mma"] == 0 and row["spill_bytes"] == 0 for row in rows), rows


def test_the_fused_ops_kernels_join_the_report_and_compile_without_spills():
    """RoPE, SwiGLU and the cross-entropy chunk kernel: found through their modules'
    compile_specs, compiled for sm_90 in bf16 (the interpreter runs Python, not the compiler)."""
    result, rows = run_report("--arch", "90", "--dtypes", "bf16", "--kernels", "rope,swiglu,linear_cross_entropy",
                              "--json", "--jobs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert {row["kernel"] for row in rows} == {"rope", "swiglu.fwd", "swiglu.bwd", "linear_cross_entropy.chunk_grad"}
    assert {row["head_dim"] for row in rows if row["kernel"] == "rope"} == {64, 128}
    assert all(row["fits"] and row["spill_bytes"] == 0 and row["registers"] > 0 for row in rows), rows


def test_report_flags_a_spilling_or_oversized_default():
    from stackfast.bench import kernel_stats
    base = {"kernel": "k", "arch": 90, "head_dim": 128, "dtype": "bf16", "causal": True, "fits": True,
            "spill_bytes": 0, "default": False, "config": "c"}
    assert kernel_stats.problems([{**base, "default": True}, base]) == []
    assert kernel_stats.problems([{**base, "default": True, "spill_bytes": 8}])[0].startswith(
        "DEFAULT CONFIG SPILLS")
    assert kernel_stats.problems([{**base, "fits": False}])[0].startswith("NO CONFIG FITS")


def test_unknown_arch_is_refused():
    result, _ = run_report("--arch", "75")
    assert result.returncode == 2 and "unknown [75]" in result.stderr
