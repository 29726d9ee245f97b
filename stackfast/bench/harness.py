"""The one benchmark harness every bench_*.py uses (docs/design.md, convention 7).

Each benchmark times callables with `measure`, builds rows (dicts) that carry the
baseline measured in the same run, and writes them with `write_results` as JSON
together with `environment()`: GPU name, versions and git revision. Claims are ratios
to a baseline timed in the same process, never absolute numbers from another run.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

# Where results go by default: a source checkout's benchmarks/results (committed there); from
# an installed package, a folder in the current directory.
_CHECKOUT_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
RESULTS_DIR = _CHECKOUT_RESULTS if _CHECKOUT_RESULTS.is_dir() else Path("stackfast-bench-results")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], *, device: torch.device | str = "cpu",
            warmup: int = 3, reps: int = 10, min_time_s: float = 0.0) -> dict:
    """Time `fn()` and return median / p20 / p80 in milliseconds plus peak memory.

    On CUDA each repetition is bracketed by CUDA events (device time, no host clock
    skew); on CPU by perf_counter. `warmup` calls run first so compilation, autotuning
    and allocator growth stay out of the numbers. With `min_time_s` the repetitions are
    extended until that much time has been measured (short ops need many samples).
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times_ms: list[float] = []
    while len(times_ms) < reps or sum(times_ms) < min_time_s * 1e3:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()  # host sync: needed to read the event time
            times_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {**summarize(times_ms), "peak_mem_bytes": peak}


def summarize(times_ms: list[float]) -> dict:
    """Median, p20 and p80 of a list of times in milliseconds."""
    times_ms = sorted(times_ms)
    return {
        "median_ms": statistics.median(times_ms),
        "p20_ms": _quantile(times_ms, 0.2),
        "p80_ms": _quantile(times_ms, 0.8),
        "reps": len(times_ms),
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def tflops(flop_count: float, ms: float) -> float:
    """Analytic FLOPs over measured milliseconds, in TFLOP/s."""
    return flop_count / (ms * 1e-3) / 1e12


def gbps(byte_count: float, ms: float) -> float:
    """Analytic bytes moved (read + written) over measured milliseconds, in GB/s."""
    return byte_count / (ms * 1e-3) / 1e9


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent, timeout=10)
        rev = out.stdout.strip() or "unknown"
        return rev + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """Where the numbers come from: device, versions, git revision, date."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_revision": git_revision(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    return env


def results_folder(out_dir: Path | str | None = None) -> Path:
    """The folder results are written to (RESULTS_DIR by default), created; ValueError if it
    names an existing file. Suites call it first, so a bad --out fails before any timing."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_results(name: str, rows: list[dict], out_dir: Path | str | None = None) -> Path:
    """Write rows plus the environment to `<out_dir>/<name>-<device>.json`; return the path."""
    out_dir = results_folder(out_dir)
    env = environment()
    device_tag = (env["gpu"] or "cpu").replace(" ", "-").lower()
    path = out_dir / f"{name}-{device_tag}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as a markdown table over `columns` (floats to 3 significant digits)."""
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


COPY_BYTES = 1 << 30  # the default size of copy_bandwidth's copy


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> tuple[float, dict]:
    """GB/s (bytes read + written) of one large device copy: the memory roofline, and its timing."""
    src = torch.empty((nbytes or COPY_BYTES) // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device=device, warmup=3, reps=20)
    return gbps(2 * src.nbytes, timing["median_ms"]), timing


def main_device(cpu: bool = False) -> torch.device:
    """The device a benchmark runs on: the GPU when present unless `cpu` is asked."""
    return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")


if __name__ == "__main__":  # pragma: no cover - manual check
    json.dump(environment(), sys.stdout, indent=1)


def op_benchmark_main(name: str, description: str, check, smoke_cases: list, benchmark,
                      check_columns: list[str], bench_columns: list[str], argv=None) -> int:
    """The command line of a kernel benchmark (bench_<op>.py): on a GPU, time and write
    results; without one, run `check` on `smoke_cases` under the interpreter and say so."""
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    args = parser.parse_args(argv)
    device = main_device()
    if device.type != "cuda":
        print(f"The {name} benchmark needs CUDA; no timing here. Interpreter smoke check:")
        rows = check(device, torch.float32, smoke_cases)
        print(markdown_table(rows, check_columns))
        return 0 if all(r["ok"] for r in rows) else 1
    rows = benchmark(device, quick=args.quick)
    print("wrote", write_results(f"bench_{name}", rows))
    print(markdown_table(rows, bench_columns))
    return 0
