"""`stackfast demo`: the paper in miniature — G_stack against scratch at equal FLOPs.

On the built-in corpus (the standard library's source), at toy scale (an 8-layer target,
hidden 256, grown from its 2-layer small model with g = 4), within a fixed FLOP budget B:
  scratch      the target trained from scratch on B FLOPs;
  small alone  the 2-layer model trained on B FLOPs (at budgets far below compute-optimal
               a small model wins whatever growth does: this curve shows whether we are there);
  G_stack      the small model on `small_share` of B, stacked x4, the target on the rest;
  G_stack/2    the same on B/2, so that the speedup comes from complete schedules.
Every run uses its own complete warmup + cosine schedule. The speedup is taken at
scratch's final validation loss: the budget at which G_stack's final loss equals it,
interpolated (in log FLOPs) between the B/2 and B runs; sp = B / that budget - 1.
Whatever is measured is reported, favourable or not.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from stackfast.config import ModelConfig, StackfastError, load_config
from stackfast.growth_operators import OPERATORS
from stackfast.metrics import read_metrics
from stackfast.plot import plot_runs, val_curve
from stackfast.train import run

SEQ_LEN, BATCH = 128, 16
TOKENS_PER_STEP = SEQ_LEN * BATCH
# About 40 s of the target's training on 2 CPU cores (~160 GFLOP/s): the four runs fit in
# about 3 minutes.
DEFAULT_FLOPS = 6e12
COMMON = ["data.seq_len=128", "train.global_batch_size=16", "optim.lr=2e-3", "train.eval_batches=4",
          "logging.log_every=10", "logging.progress=false", "growth.small_lr=2e-3"]


def steps_for_flops(flops: float, cfg: ModelConfig) -> int:
    """Optimizer steps of TOKENS_PER_STEP tokens that spend `flops` on a model of shape cfg."""
    return max(2, round(flops / (cfg.flops_per_token(SEQ_LEN) * TOKENS_PER_STEP)))


def train_labeled(run_dir: Path, overrides: list[str], steps: int, label: str, device: str) -> dict:
    """One run of the comparison (its own complete schedule); prints and returns its summary."""
    started = time.perf_counter()
    cfg = load_config(None, COMMON + [f"train.max_steps={steps}", f"train.eval_every={max(1, steps // 8)}",
                                      f"schedule.warmup_steps={max(1, steps // 10)}", f'train.device="{device}"']
                      + overrides)
    cfg.logging.run_dir = str(run_dir)
    summary = run(cfg)
    curve = val_curve(read_metrics(run_dir))
    print(f"  {label:<24} {summary['tokens']:>9} tokens  {summary['flops']:.3g} FLOPs  "
          f"val loss {curve[-1][2]:.4f}  ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"label": label, "run_dir": str(run_dir), "tokens": summary["tokens"], "flops": summary["flops"],
            "val_loss": curve[-1][2], "growth_step": summary["growth_step"],
            "tokens_per_s": summary["tokens_per_s"]}


def growth_overrides(budget: float, small_share: float, operator: str) -> tuple[list[str], int]:
    """Config overrides and total steps of a toy run that grows with `operator` after
    spending `small_share` of `budget` FLOPs on the small model."""
    small = OPERATORS[operator].small_model(ModelConfig.from_preset("toy"), 4)
    small_steps = steps_for_flops(small_share * budget, small)
    steps = small_steps + steps_for_flops((1 - small_share) * budget, ModelConfig.from_preset("toy"))
    return (['model.preset="toy"', f'growth.operator="{operator}"', "growth.factor=4",
             f"growth.at_tokens={small_steps * TOKENS_PER_STEP}"], steps)


def speedup_from_budgets(scratch_loss: float, half: dict, full: dict, budget: float) -> tuple[float | None, str]:
    """The speedup at scratch's final loss from complete G_stack runs at B/2 and B."""
    if full["val_loss"] > scratch_loss:
        return None, "G_stack did not reach scratch's final loss within the same budget: speedup < 0"
    if half["val_loss"] <= scratch_loss:
        return 1.0, "G_stack reached scratch's final loss already at half the budget: speedup >= +100%"
    # log-linear interpolation of final loss in budget between the two complete runs
    t = (half["val_loss"] - scratch_loss) / (half["val_loss"] - full["val_loss"])
    needed = math.exp(math.log(half["flops"]) + t * (math.log(full["flops"]) - math.log(half["flops"])))
    sp = budget / needed - 1.0
    return sp, f"G_stack reaches scratch's final loss with {needed:.3g} FLOPs: speedup {100 * sp:+.1f}%"


def run_demo(out_dir: Path, flops: float = DEFAULT_FLOPS, small_share: float = 0.2, device: str = "auto") -> dict:
    target, small = ModelConfig.from_preset("toy"), ModelConfig.from_preset("toy-small")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens_per_param = flops / target.flops_per_token(SEQ_LEN) / target.num_params()
    print(f"stackfast demo: G_stack vs scratch at {flops:.3g} FLOPs on the Python standard library's source\n"
          f"  target {target.n_layers} layers x {target.hidden_size} ({target.num_params() / 1e6:.1f}M params), "
          f"small {small.n_layers} layers; {100 * small_share:.0f}% of the FLOPs on the small model\n"
          f"  budget: {tokens_per_param:.3f} tokens per target parameter", flush=True)
    if tokens_per_param < 20:
        print("  warning: far below the ~20 tokens per parameter of compute-optimal training; at such budgets\n"
              "  a small model beats a big one whatever growth does (see the 'small alone' run)", flush=True)

    runs = {"scratch": train_labeled(out_dir / "scratch", ['model.preset="toy"'], steps_for_flops(flops, target),
                            "scratch (8 layers)", device)}
    runs["small"] = train_labeled(out_dir / "small", ['model.preset="toy-small"'], steps_for_flops(flops, small),
                         "small alone (2 layers)", device)
    overrides, steps = growth_overrides(flops, small_share, "stack")
    runs["stack"] = train_labeled(out_dir / "stack", overrides, steps, "G_stack", device)
    overrides, steps = growth_overrides(flops / 2, small_share, "stack")
    runs["stack_half"] = train_labeled(out_dir / "stack-half", overrides, steps, "G_stack at half budget", device)

    sp, verdict = speedup_from_budgets(runs["scratch"]["val_loss"], runs["stack_half"], runs["stack"],
                                       runs["scratch"]["flops"])
    result = {"flops_budget": flops, "small_share": small_share, "tokens_per_param": tokens_per_param,
              "runs": runs, "speedup": sp, "verdict": verdict}
    (out_dir / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    try:
        png = plot_runs([runs[k]["run_dir"] for k in ("scratch", "small", "stack")], out_dir / "demo.png",
                        labels=["scratch", "small alone", "G_stack"],
                        title="stackfast demo: validation loss, G_stack vs scratch",
                        note=verdict + f"; {tokens_per_param:.3f} tokens per target parameter",
                        annotate_speedup=False)
        result["plot"] = str(png)
    except StackfastError as e:  # matplotlib missing: the numbers stand without the picture
        print(f"  (no plot: {e})")
    print("\n| run | tokens | FLOPs | final val loss |\n|---|---|---|---|")
    for r in runs.values():
        print(f"| {r['label']} | {r['tokens']} | {r['flops']:.3g} | {r['val_loss']:.4f} |")
    print(f"\n{verdict}")
    print(f"results: {out_dir / 'demo.json'}" + (f", plot: {result['plot']}" if "plot" in result else ""))
    return result
