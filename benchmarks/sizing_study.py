"""Sizing study: the demo's target shape, budget, small-model share and LR on 2 CPU cores.

The question: at a budget the demo can afford (a few minutes for all its runs), which
settings let G_stack beat scratch beyond the seed spread without losing to the small model
alone? Every arm gets the same LR search, and every cell runs with two seeds:
  1. LR search at the demo's budget (1e12 FLOPs, 8 x 32 byte-level target, 20% small share):
     LR 3e-3, 5e-3, 8e-3 for scratch, small alone and G_stack;
  2. at each arm's best LR: the small share 0.35 instead of 0.2, and G_stack at half the
     budget (the demo's speedup reading);
  3. the same three arms at 1.5e12 FLOPs (15 tokens per parameter), each at its best LR.
Results accumulate in --out (one record per run, written as it finishes), so an
interrupted study resumes where it stopped. ~20 minutes on 2 quiet CPU cores.

    python benchmarks/sizing_study.py
    python benchmarks/sizing_study.py --budget 1e11 --lrs 3e-3 --seeds 1   # a quick look
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stackfast.bench.harness import RESULTS_DIR, environment  # noqa: E402
from stackfast.demo import Sizing, compare, loss_stats, speedup_from_budgets, target_model, train_arm  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1e12, help="FLOPs of a demo run (default 1e12)")
    parser.add_argument("--large-budget", type=float, default=1.5e12, help="the larger budget of phase 3")
    parser.add_argument("--hidden", type=int, default=32, help="target width (8 layers, byte-level)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 5e-3, 8e-3])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--runs-dir", default="runs/sizing-study")
    parser.add_argument("--out", default=str(RESULTS_DIR / "sizing_study.json"))
    args = parser.parse_args(argv)
    if args.seeds < 1 or min(args.lrs + [args.budget, args.large_budget]) <= 0:
        parser.error("--seeds must be at least 1, and --lrs, --budget and --large-budget positive")

    out = Path(args.out)
    study = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    done = {(r["cell"], r["seed"]): r for r in study["runs"]}
    seeds = range(1, args.seeds + 1)

    def cell(name: str, arm: str, flops: float, lr: float, share: float = 0.2) -> list[dict]:
        """Run (or take from --out) one cell's seeds."""
        sizing = Sizing(target=target_model(args.hidden), flops=args.budget, small_share=share, lr_scratch=lr,
                        lr_small=lr, lr_grown=lr)
        records = []
        for seed in seeds:
            if (name, seed) not in done:
                r = train_arm(Path(args.runs_dir) / f"{name}-seed{seed}", sizing, arm, seed, "cpu", flops, name)
                done[(name, seed)] = {**r, "cell": name, "lr": lr, "small_share": share, "budget": flops}
                study["runs"] = list(done.values())
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(study, indent=1) + "\n")
            records.append(done[(name, seed)])
        return records

    # 1. the same LR search for every arm
    search = {arm: {lr: loss_stats(cell(f"{arm}-lr{lr:g}", arm, args.budget, lr)) for lr in args.lrs}
              for arm in ("scratch", "small", "stack")}
    best_lr = {arm: min(by_lr, key=lambda lr: by_lr[lr]["mean"]) for arm, by_lr in search.items()}
    # 2. the small share, and the half budget for the speedup, at G_stack's best LR
    lr = best_lr["stack"]
    share = loss_stats(cell(f"stack-lr{lr:g}-share0.35", "stack", args.budget, lr, 0.35))
    half = cell(f"stack-lr{lr:g}-half", "stack", args.budget / 2, lr)
    scratch = cell(f"scratch-lr{best_lr['scratch']:g}", "scratch", args.budget, best_lr["scratch"])
    full = cell(f"stack-lr{lr:g}", "stack", args.budget, lr)
    speedups = [speedup_from_budgets(s["val_loss"], h, f, s["flops"])[0] for s, h, f in zip(scratch, half, full)]
    # 3. the larger budget, every arm at its best LR
    large = {arm: loss_stats(cell(f"{arm}-lr{best_lr[arm]:g}-large", arm, args.large_budget, best_lr[arm]))
             for arm in ("scratch", "small", "stack")}

    def verdict(stats: dict) -> dict:
        return {"stack_vs_scratch": compare(stats["stack"], stats["scratch"]),
                "stack_vs_small": compare(stats["stack"], stats["small"])}

    at_budget = {arm: search[arm][best_lr[arm]] for arm in search}
    study["summary"] = {
        "target": dataclasses.asdict(target_model(args.hidden)),
        "target_params": target_model(args.hidden).num_params(),
        "budget": args.budget, "large_budget": args.large_budget,
        "lr_search": {arm: {f"{lr:g}": s for lr, s in by_lr.items()} for arm, by_lr in search.items()},
        "best_lr": best_lr,
        "at_budget": at_budget, "verdict_at_budget": verdict(at_budget),
        "share_0.35": share,
        "best_share": 0.35 if share["mean"] < at_budget["stack"]["mean"] else 0.2,
        "speedup_per_seed": speedups,
        "speedup_mean": statistics.fmean(speedups) if None not in speedups else None,
        "at_large_budget": large, "verdict_at_large_budget": verdict(large),
        "environment": environment(),
    }
    out.write_text(json.dumps(study, indent=1) + "\n")
    print(f"\nLR search at {args.budget:.3g} FLOPs (final val loss, nats/byte, mean ± std over {args.seeds} seeds)")
    print("| arm | " + " | ".join(f"LR {lr:g}" for lr in args.lrs) + " |\n|---|" + "---|" * len(args.lrs))
    for arm, by_lr in search.items():
        print(f"| {arm} | " + " | ".join(f"{s['mean']:.4f} ± {s['std']:.4f}" for s in by_lr.values()) + " |")
    print(f"best LR: {best_lr}; G_stack at {args.budget:.3g}: {verdict(at_budget)}")
    print(f"small share 0.35: {share['mean']:.4f} ± {share['std']:.4f} (0.2: {at_budget['stack']['mean']:.4f})")
    print("speedup per seed: " + ", ".join("none" if s is None else f"{100 * s:+.0f}%" for s in speedups))
    print(f"at {args.large_budget:.3g}: " + ", ".join(f"{a} {s['mean']:.4f} ± {s['std']:.4f}" for a, s in large.items())
          + f"; {verdict(large)}")
    print(f"results: {out}")
    return study


if __name__ == "__main__":
    main()
