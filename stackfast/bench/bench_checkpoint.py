"""The training loop's stall at a checkpoint step: sync saves against checkpoint.async_save.

Runs the real loop (`stackfast.train.run`) twice in this process on the same model: first
with sync checkpoints (every step: the loop stands still for the whole write, fsync and
sha256), then with async ones (the loop waits only for the host copy of the model and
AdamW state, then trains on while a thread writes, hashes and renames it). Both numbers come
from the loop's own metrics (`checkpoint_blocked_s` on every checkpoint step). The async
run spaces its checkpoints so that each background save can finish before the next one
(from the sync run's save and step times): what is measured is the stall itself, not a
wait for the previous save (`checkpoint_wait_s`, reported too). The total save time is the
sync stall, and for async the background time from the copy to the rename. The writer
shares the machine with training, so async also slows the steps it overlaps:
`run_cost_s_per_save` is the loop's time beyond its steps (at the sync run's step time) per
background save, stall included.

CPU: a 134M-parameter Llama (hidden 768, 12 layers, vocab 32000; fp32 weights and two AdamW
moments: 1.6 GB a checkpoint), sequences of 32 tokens, one a step. GPU: the same shape, or
--preset. The run folders go to a temporary folder (--work-dir), removed afterwards.

    python -m stackfast.bench.bench_checkpoint [--cpu] [--saves 4] [--preset 1.1b]
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from stackfast.bench.harness import main_device, markdown_table, summarize, write_results

# A Llama of >= 100M parameters that a CPU trains a step of in about a second.
SHAPE = ["model.vocab_size=32000", "model.n_layers=12", "model.hidden_size=768", "model.n_heads=12",
         "model.n_kv_heads=12", "model.ffn_size=2048", "model.max_seq_len=256"]
QUICK_SHAPE = ['model.preset="tiny"']


def train(run_dir: Path, shape: list[str], device, seq_len: int, batch: int, steps: int, every: int,
          async_save: bool) -> tuple[dict, list[dict]]:
    """One run of the training loop; its summary and its checkpoint rows (metrics.jsonl)."""
    from stackfast.config import load_config
    from stackfast.metrics import read_metrics
    from stackfast.train import run
    cfg = load_config(None, shape + [
        f'model.kernels="{"torch" if device.type == "cpu" else "auto"}"', f'train.device="{device.type}"',
        f"data.seq_len={seq_len}", f"train.global_batch_size={batch}", f"train.max_steps={steps}",
        "train.eval_every=0", "train.eval_batches=1", f"checkpoint.every_steps={every}", "checkpoint.keep_last=1",
        f"checkpoint.async_save={'true' if async_save else 'false'}", f'logging.run_dir="{run_dir}"',
        "logging.log_every=1", "logging.progress=false", "logging.tensorboard=false"])
    summary = run(cfg)
    return summary, [r for r in read_metrics(run_dir) if "checkpoint_blocked_s" in r]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="on the CPU even with a GPU")
    parser.add_argument("--quick", action="store_true", help="the tiny model, two saves each (a smoke test)")
    parser.add_argument("--preset", default="", help="a model preset instead of the 134M shape (e.g. 1.1b on GPU)")
    parser.add_argument("--saves", type=int, default=4, help="checkpoint steps timed in each mode")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--work-dir", default=None, help="where the run folders go (default: the temp folder)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = main_device(args.cpu)
    shape = QUICK_SHAPE if args.quick else ([f'model.preset="{args.preset}"'] if args.preset else SHAPE)
    saves = 2 if args.quick else max(2, args.saves)
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="stackfast-bench-checkpoint-", dir=args.work_dir))
    try:
        # Sync: a checkpoint every step; the first is the warm-up (page cache, first allocations).
        started = time.perf_counter()
        summary, sync_rows = train(work / "sync", shape, device, args.seq_len, args.batch, saves + 1, 1, False)
        sync_wall = time.perf_counter() - started
        sync_blocked = [r["checkpoint_blocked_s"] for r in sync_rows]
        ckpt_bytes = folder_bytes(next((work / "sync" / "checkpoints").iterdir()))
        step_s = max(1e-3, (summary["wall_s"] - sum(sync_blocked)) / summary["steps"])
        # Async: checkpoints far enough apart for a background save to finish (it shares the
        # machine with training: 1.5 x the sync save), then one more step and the final save.
        every = 2 if args.quick else max(2, math.ceil(1.5 * median(sync_blocked[1:]) / step_s) + 1)
        started = time.perf_counter()
        async_summary, async_rows = train(work / "async", shape, device, args.seq_len, args.batch, every * saves + 1,
                                          every, True)
        async_wall = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()
    periodic = [r for r in async_rows if r["step"] % every == 0]  # the background saves (the last one is sync)
    final = async_rows[-1]
    common = {"what": "checkpoint stall", "device": str(device), "params": summary["params"],
              "model": args.preset or ("tiny" if args.quick else "hidden 768 x 12 layers, vocab 32000"),
              "checkpoint_bytes": ckpt_bytes, "seq_len": args.seq_len, "batch": args.batch, "step_s": step_s,
              "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in load_end],
              "cpu_count": os.cpu_count()}
    sync = {**common, "mode": "sync", "every_steps": 1, **summarize([1e3 * s for s in sync_blocked[1:]]),
            "first_ms": 1e3 * sync_blocked[0], "save_s": median(sync_blocked[1:]), "wall_s": sync_wall}
    stall = summarize([1e3 * r["checkpoint_blocked_s"] for r in periodic])
    background = [r["checkpoint_background_s"] for r in async_rows if "checkpoint_background_s" in r]
    asynchronous = {**common, "mode": "async", "every_steps": every, **stall, "baseline": "sync",
                    "first_ms": 1e3 * periodic[0]["checkpoint_blocked_s"],
                    "wait_ms_median": 1e3 * median([r["checkpoint_wait_s"] for r in periodic]),
                    "save_s": median(background), "final_sync_save_ms": 1e3 * final["checkpoint_blocked_s"],
                    "final_wait_ms": 1e3 * final["checkpoint_wait_s"], "wall_s": async_wall,
                    "stall_ratio_vs_sync": sync["median_ms"] / stall["median_ms"],
                    # What the run lost per background save, stall and slower steps alongside the writer
                    # together: the loop's time beyond its steps at the sync run's step time (a shared
                    # machine makes it rough), less the final sync save.
                    "run_cost_s_per_save": (async_summary["wall_s"] - async_summary["steps"] * step_s
                                            - final["checkpoint_blocked_s"]) / len(periodic)}
    rows = [sync, asynchronous]
    path = write_results("checkpoint_stall", rows, args.out)
    print(markdown_table(rows, ["mode", "params", "checkpoint_bytes", "every_steps", "median_ms", "p20_ms", "p80_ms",
                                "reps", "save_s", "wait_ms_median", "stall_ratio_vs_sync",
                                "run_cost_s_per_save"]))
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
