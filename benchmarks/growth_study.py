"""Growth study: scratch and all eight growth operators at one FLOP budget (paper Figure 3 in
miniature), at toy scale on the built-in corpus.

Every run has its own complete warmup + cosine schedule over the same FLOP budget (the
grown runs' FLOPs include their small-model phase, which takes `--small-share` of it):
  scratch        the 8-layer toy target from scratch
  small alone    the small model of the depth operators (2 layers) on the whole budget
  <operator>     the small model grown into the target by that operator (depth: 2 -> 8
                 layers; width: hidden 128 -> 256, FFN 344 -> 688, heads 2 -> 4)
Reported per run: final validation loss, its difference to scratch's, and the speedup read
from its validation curve at scratch's final loss (FLOPs_scratch / FLOPs_run - 1; a
mid-schedule reading, and at budgets where scratch barely learns it is reached during the
small-model phase: a guide at best, not the demo's complete-schedule figure). The LiGO
operators' training of their expansion (--learn-steps steps, each a grown-model step on one
batch) counts in their FLOPs, and they get that many fewer training steps: equal budgets.

    python benchmarks/growth_study.py            # ~10 minutes on 2 CPU cores
    python benchmarks/growth_study.py --flops 3e11 --operators stack depth_zero   # a quick look
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stackfast.bench.harness import RESULTS_DIR, markdown_table, write_results  # noqa: E402
from stackfast.config import ModelConfig  # noqa: E402
from stackfast.demo import growth_overrides, steps_for_flops, train_labeled  # noqa: E402
from stackfast.growth_operators import OPERATORS  # noqa: E402
from stackfast.metrics import read_metrics  # noqa: E402
from stackfast.plot import plot_runs, speedup_vs, val_curve  # noqa: E402


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, default=9e12, help="FLOP budget of every run (default 9e12)")
    parser.add_argument("--small-share", type=float, default=0.2, help="share of the budget on the small model")
    parser.add_argument("--operators", nargs="+", default=list(OPERATORS), choices=OPERATORS)
    parser.add_argument("--learn-steps", type=int, default=20, help="LiGO training steps")
    parser.add_argument("--ramp-fraction", type=float, default=0.2,
                        help="G_random fade-in length as a fraction of the run's steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs-dir", default="runs/growth-study", help="where the runs go (replaced)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)

    runs_dir = Path(args.runs_dir)
    target, small = ModelConfig.from_preset("toy"), ModelConfig.from_preset("toy-small")
    print(f"growth study: {args.flops:.3g} FLOPs per run, {100 * args.small_share:.0f}% on the small model",
          flush=True)
    results = [("scratch", train_labeled(runs_dir / "scratch", ['model.preset="toy"'],
                                         steps_for_flops(args.flops, target), "scratch", args.device)),
               ("small alone", train_labeled(runs_dir / "small", ['model.preset="toy-small"'],
                                             steps_for_flops(args.flops, small), "small alone", args.device))]
    for op in args.operators:
        overrides, steps = growth_overrides(args.flops, args.small_share, op)
        if OPERATORS[op].learns:
            steps -= args.learn_steps  # one LiGO step costs one grown-model training step
        overrides += [f"growth.learn_steps={args.learn_steps}",
                      f"growth.ramp_steps={max(1, int(args.ramp_fraction * steps))}"]
        results.append((op, train_labeled(runs_dir / op, overrides, steps, op, args.device)))

    baseline = val_curve(read_metrics(results[0][1]["run_dir"]))
    rows = []
    for name, r in results:
        curve = val_curve(read_metrics(r["run_dir"]))
        sp = None if name == "scratch" else speedup_vs(baseline, curve)
        rows.append({"run": name, "tokens": r["tokens"], "flops": r["flops"], "final_val_loss": r["val_loss"],
                     "loss_vs_scratch": r["val_loss"] - results[0][1]["val_loss"],
                     "curve_speedup_pct": None if sp is None else 100 * sp,
                     "tokens_per_target_param": r["tokens"] / target.num_params()})
    path = write_results("growth_study", rows, args.out)
    png = plot_runs([r["run_dir"] for _, r in results], (Path(args.out) if args.out else RESULTS_DIR)
                    / "growth_study.png", labels=[n for n, _ in results],
                    title="growth study: scratch vs the eight operators at equal FLOPs (toy scale, CPU)",
                    annotate_speedup=False)
    print(markdown_table(rows, ["run", "tokens", "flops", "final_val_loss", "loss_vs_scratch", "curve_speedup_pct"]))
    print(f"results: {path}, plot: {png}")
    return rows


if __name__ == "__main__":
    main()
