"""Throughput and MFU, the metrics log (metrics.jsonl, TensorBoard) and the progress line.

MFU convention (docs/design.md; the reference figures use it too; stated wherever an MFU is printed):
model FLOPs per token = 6 * (non-embedding weights + LM head) + 6 * n_layers * hidden *
seq_len (causal attention counted at half), divided by the device's dense bf16 peak.
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import torch

MFU_CONVENTION = ("MFU = tokens/s * (6 * (non-embedding weights + LM head) + 6 * layers * hidden * seq_len) "
                  "/ peak dense bf16 FLOP/s")

# Dense bf16 peak FLOP/s (tensor cores, no sparsity) by GPU. Source: NVIDIA's datasheets,
# which print BF16 Tensor Core "with sparsity" figures, twice the dense ones: H100 SXM 1,979,
# H100 PCIe 1,513, H100 NVL 1,671 TFLOP/s (H100 datasheet); H200 SXM 1,979, H200 NVL 1,671
# (H200 datasheet); GH200 1,979 (its Hopper GPU); H800 as H100; L40 362.05, L40S 733,
# L4 242.5 (their datasheets); A100 312 dense, SXM and PCIe alike (A100 datasheet), A800 as
# A100; A10 125 dense; RTX 4090 165.2 and RTX 3090 71 with FP32 accumulate (the Ada and
# Ampere GA102 whitepapers). Keyed by the words of torch.cuda.get_device_name ("NVIDIA H100
# 80GB HBM3": H100 SXM): the entry whose words all occur in the name, the one with the most
# words where several do ("NVIDIA H100 NVL" is H100 NVL, not H100 HBM3; "NVIDIA L40" is L40,
# not L4). A name no entry matches (or two entries equally) has no peak: no MFU beats a
# wrong one (train.peak_tflops sets it).
PEAK_BF16 = {("H100", "HBM3"): 989e12, ("H100", "PCIE"): 756e12, ("H100", "NVL"): 835e12,
             ("H200",): 989e12, ("H200", "NVL"): 835e12, ("GH200",): 989e12,
             ("H800",): 989e12, ("H800", "PCIE"): 756e12,
             ("A100",): 312e12, ("A800",): 312e12, ("A10",): 125e12,
             ("L40",): 181e12, ("L40S",): 362e12, ("L4",): 121e12,
             ("RTX", "4090"): 165e12, ("RTX", "3090"): 71e12}


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak dense FLOP/s for MFU: the override when given, a known GPU's bf16 peak, else None."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return gpu_peak(torch.cuda.get_device_name(device))


def gpu_peak(name: str) -> float | None:
    """The dense bf16 peak of the GPU torch names `name` (PEAK_BF16), None if not known."""
    words = set(re.split(r"[\s_-]+", name.upper()))
    matches = [key for key in PEAK_BF16 if words.issuperset(key)]
    most = max(map(len, matches), default=0)
    best = [key for key in matches if len(key) == most]
    return PEAK_BF16[best[0]] if len(best) == 1 else None


class MetricsLog:
    """Appends JSON rows to <run_dir>/metrics.jsonl and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, row["step"])

    def truncate_after(self, step: int, stage: int) -> None:
        """Drop the rows a run resumed at `step` and growth stage `stage` rewrites: those past
        the step, and growth rows of stages past `stage` (an event at the checkpoint's own step
        comes after its save: the resumed run grows again and logs it)."""
        if self.enabled and self.path.is_file():
            rows = [r for r in read_metrics(self.path.parent) if r["step"] <= step and r.get("stage", 0) <= stage]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of a run's metrics.jsonl.

    A last line without its newline (a write cut short by a kill) is dropped; any other
    line that is not a JSON object is a one-line error naming it."""
    from stackfast.config import StackfastError
    path = Path(run_dir) / "metrics.jsonl"
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")  # rows end at \n only (JSON strings may hold other line breaks)
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # torn final write
                break
            raise StackfastError(f"{path}:{n}: corrupt metrics row ({e.msg})") from None
        if not isinstance(row, dict):
            raise StackfastError(f"{path}:{n}: corrupt metrics row (not a JSON object)")
        rows.append(row)
    return rows


class Throughput:
    """Tokens/s and MFU over the interval since the last call."""

    def __init__(self, flops_per_token: float, peak: float | None):
        self.flops_per_token, self.peak = flops_per_token, peak
        self.last_time, self.last_tokens = time.perf_counter(), 0

    def update(self, tokens: int) -> tuple[float, float | None]:
        now = time.perf_counter()
        rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        mfu = rate * self.flops_per_token / self.peak if self.peak else None
        return rate, mfu


class Progress:
    """A live tqdm bar on a terminal (step, loss, tokens/s, MFU, ETA); plain log lines otherwise."""

    def __init__(self, total_steps: int, enabled: bool = True, initial: int = 0):
        self.total_steps = total_steps
        self.enabled = enabled
        self.start = time.perf_counter()
        self.initial = initial
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, mfu: float | None) -> None:
        if not self.enabled:
            return
        mfu_text = f" | MFU {100 * mfu:4.1f}%" if mfu is not None else ""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.4f} | {format_count(tokens_per_s)} tok/s{mfu_text}")
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step - self.initial, 1) * (self.total_steps - step)
        print(f"step {step:>6}/{self.total_steps} | loss {loss:7.4f} | {format_count(tokens_per_s)} tok/s"
              f"{mfu_text} | ETA {format_duration(eta)}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
