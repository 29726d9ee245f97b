"""Sizing study: the demo's target shape and budget on 2 CPU cores.

The question: at a budget the demo can afford (a few minutes for all its runs), does the
paper's G_stack beat scratch beyond the seed spread without losing to the small model
alone? Under the protocol of stackfast/recipes.py (docs/method.md): scratch, small alone
and the paper's G_stack (x4 at 20% of the FLOPs) through the same search over schedule
(cosine, WSD) and peak LR at --budget (seed 1), then each at its best setting on 3 fresh
seeds (recipes.FINAL_SEEDS) at --budget and at --large-budget. Verdicts are paired by seed
(a Student t interval on the mean difference, beyond zero and the recipe study's noise
floor); the results name the CPU they are bit-reproducible on. Runs continue where they stopped (the
runs folder records every finished run).

    python benchmarks/sizing_study.py
    python benchmarks/sizing_study.py --budget 1e11 --large-budget 1.5e11   # a quick look
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stackfast.bench.harness import RESULTS_DIR, environment  # noqa: E402
from stackfast.data import builtin_dataset  # noqa: E402
from stackfast.demo import NOISE_FLOOR, Sizing, target_model  # noqa: E402
from stackfast.recipes import (chosen_settings, final_trials, load_records, machine, paired, run_many,  # noqa: E402
                               search_table, stats, tune)

ARMS = ("scratch", "small", "stack_paper")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=2e12, help="FLOPs of a demo run (default 2e12: 20 tokens "
                        "per parameter)")
    parser.add_argument("--large-budget", type=float, default=3e12, help="the larger budget (default 3e12)")
    parser.add_argument("--hidden", type=int, default=32, help="target width (8 layers, byte-level)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, 1 thread each")
    parser.add_argument("--runs-dir", default="runs/sizing-study")
    parser.add_argument("--out", default=str(RESULTS_DIR / "sizing_study.json"))
    args = parser.parse_args(argv)
    if min(args.budget, args.large_budget) <= 0 or args.workers < 1:
        parser.error("--budget and --large-budget must be positive, --workers at least 1")

    sizing = Sizing(target=target_model(args.hidden), flops=args.budget)
    runs_dir = Path(args.runs_dir)
    builtin_dataset(byte_level=True)  # built once here, not by two workers at the same time
    best, done = tune(list(ARMS), sizing, runs_dir, "cpu", args.workers, load_records(runs_dir))
    chosen = chosen_settings(best, done)
    at = {}
    for flops in (args.budget, args.large_budget):
        finals = final_trials(chosen, flops)
        done = run_many([t for ts in finals.values() for t in ts], sizing, runs_dir, "cpu", args.workers, done)
        arm_stats = {r: stats([done[t]["val_loss"] for t in ts]) for r, ts in finals.items()}
        by_seed = {r: {t.seed: done[t]["val_loss"] for t in ts} for r, ts in finals.items()}
        at[f"{flops:g}"] = {"stats": arm_stats,
                            "stack_vs_scratch": paired(by_seed["stack_paper"], by_seed["scratch"], NOISE_FLOOR),
                            "stack_vs_small": paired(by_seed["stack_paper"], by_seed["small"], NOISE_FLOOR)}
    target = target_model(args.hidden)
    study = {"environment": environment(), "machine": machine(), "target": dataclasses.asdict(target), "target_params": target.num_params(),
             "budget": args.budget, "large_budget": args.large_budget, "noise_floor": NOISE_FLOOR,
             "search": search_table(best, done), "chosen": {r: {"schedule": t.kind, "lr": t.lr} for r, t in chosen.items()},
             "at": at, "runs": list(done.values())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(study, indent=1) + "\n")
    for budget, result in at.items():
        print(f"at {budget} FLOPs: " + ", ".join(f"{r} {s['mean']:.4f} ± {s['std']:.4f}" for r, s in result["stats"].items())
              + f"; G_stack vs scratch: {result['stack_vs_scratch']['verdict']}; vs small alone: "
              f"{result['stack_vs_small']['verdict']}")
    print(f"results: {out}")
    return study


if __name__ == "__main__":
    main()
