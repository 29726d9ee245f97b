"""`stackfast demo`: the paper in miniature — G_stack against scratch at equal FLOPs, with seeds.

At a FLOP budget B, on the built-in corpus (the standard library's source, byte-level):
  scratch      the target (8 layers) trained from scratch on B FLOPs;
  small alone  its 2-layer small model trained on B FLOPs (at small budgets a small model
               can win whatever growth does: this curve shows where we stand);
  G_stack      the small model on `small_share` of B, stacked x4, the target on the rest;
  G_stack/2    the same on B/2, so that the speedup comes from complete schedules.
Every run has its own complete warmup + cosine schedule; each arm runs at its own best LR
from the study's search (the same search for all). The speedup is
taken at scratch's final validation loss, seed by seed: the budget at which G_stack's final
loss equals it, interpolated (in log FLOPs) between the B/2 and B runs; sp = B / that - 1.

The defaults (CPU_SIZING) come from the sizing study, benchmarks/sizing_study.py, whose
results are in benchmarks/results/sizing_study.json and the README. On a GPU the demo sizes
itself by the same rule (TOKENS_PER_PARAM) from throughput it measures first (gpu_sizing).
Whatever is measured is reported, favourable or not.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from stackfast.config import ModelConfig, StackfastError, load_config
from stackfast.data import BUILTIN_STDLIB_BYTES
from stackfast.growth_operators import OPERATORS
from stackfast.metrics import read_metrics
from stackfast.plot import plot_runs, val_curve
from stackfast.train import run

# The sizing rule: tokens per target parameter. In the study G_stack beat scratch and the
# small model alone at both 10 and 15; the CPU demo affords 10, a GPU sizes its target for 15
# (the paper's own runs see 20 and far more).
TOKENS_PER_PARAM = 15.0
GROWTH_FACTOR = 4
TARGET_LAYERS = 8


def target_model(hidden: int, vocab_size: int = 256, n_layers: int = TARGET_LAYERS,
                 max_seq_len: int = 1024) -> ModelConfig:
    """The demo's target family: Llama blocks of width `hidden` (a multiple of 16), head
    dim 16 below width 256 and 64 from there, SwiGLU FFN of ~8/3 width rounded to 8."""
    head_dim = 16 if hidden < 256 else 64
    if hidden % head_dim:
        raise StackfastError(f"target hidden size {hidden}: must be a multiple of {head_dim}")
    heads = hidden // head_dim
    model = ModelConfig(vocab_size=vocab_size, n_layers=n_layers, hidden_size=hidden, n_heads=heads,
                        n_kv_heads=heads, ffn_size=8 * round(hidden / 3), max_seq_len=max_seq_len)
    model.validate()
    return model


MIN_PHASE_STEPS = 5


@dataclass(frozen=True)
class Sizing:
    """One comparison: the target, the FLOP budget of each run, the small model's share of
    it and each arm's peak LR (its best in the same search; a grown run's LR serves both its
    phases)."""
    target: ModelConfig
    flops: float
    small_share: float
    lr_scratch: float
    lr_small: float
    lr_grown: float
    seq_len: int = 128
    batch: int = 16
    data: str = BUILTIN_STDLIB_BYTES

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch

    def steps(self, model: ModelConfig, flops: float) -> int:
        """Optimizer steps that spend `flops` on a model of shape `model`."""
        return max(2, round(flops / (model.flops_per_token(self.seq_len) * self.tokens_per_step)))

    def lr(self, arm: str) -> float:
        """The peak LR of an arm: 'scratch', 'small', or a growth operator (the grown LR)."""
        return {"scratch": self.lr_scratch, "small": self.lr_small}.get(arm, self.lr_grown)

    def with_lr(self, lr: float) -> "Sizing":
        """The same comparison with one LR for every arm."""
        return dataclasses.replace(self, lr_scratch=lr, lr_small=lr, lr_grown=lr)

    def min_flops(self) -> float:
        """The smallest budget a run may have: every phase of every arm (G_stack at half the
        budget has the shortest) trains at least MIN_PHASE_STEPS steps, so rounding to whole
        steps keeps the arms' budgets within 10% of each other (the 2-step floor of `steps`
        would otherwise make the runs' budgets unequal and the speedup meaningless)."""
        small = OPERATORS["stack"].small_model(self.target, GROWTH_FACTOR)
        small_step, target_step = (m.flops_per_token(self.seq_len) * self.tokens_per_step for m in (small, self.target))
        return 2 * MIN_PHASE_STEPS * max(small_step / self.small_share, target_step / (1 - self.small_share))

    def tokens_per_param(self) -> float:
        return self.flops / self.target.flops_per_token(self.seq_len) / self.target.num_params()

    def describe(self) -> dict:
        return {"target": dataclasses.asdict(self.target), "target_params": self.target.num_params(),
                "flops": self.flops, "small_share": self.small_share,
                "lr": {"scratch": self.lr_scratch, "small": self.lr_small, "grown": self.lr_grown},
                "seq_len": self.seq_len, "batch": self.batch, "data": self.data,
                "tokens_per_param": self.tokens_per_param()}


# The study's choice for 2 CPU cores (benchmarks/results/sizing_study.json): 8 x 32 byte-level
# target (117k parameters, 10 tokens per parameter at 1e12 FLOPs: seven runs in ~4.5 minutes),
# 20% of the FLOPs on the 2-layer small model (35% did worse), each arm at its best LR of the
# same search (3e-3, 5e-3, 8e-3): the grown model wants a larger one than either model alone.
CPU_SIZING = Sizing(target=target_model(32), flops=1e12, small_share=0.2, lr_scratch=5e-3, lr_small=5e-3,
                    lr_grown=8e-3)
QUICK_DIVISOR = 30  # `stackfast demo --quick`: the command end to end, not the method
ARMS = ("scratch", "small", "stack", "stack_half")
LABELS = {"scratch": "scratch", "small": "small alone", "stack": "G_stack", "stack_half": "G_stack at B/2"}
COLORS = {"scratch": "C0", "small": "C2", "stack": "C1"}  # an arm's seeds share its color in the plot


def model_overrides(model: ModelConfig) -> list[str]:
    """--set overrides that give a run exactly this model shape."""
    fields = ("vocab_size", "n_layers", "hidden_size", "n_heads", "n_kv_heads", "ffn_size", "max_seq_len")
    return [f"model.{f}={getattr(model, f)}" for f in fields]


# The LiGO operators train their expansion for LEARN_STEPS steps (each costs one grown-model
# step, so their runs train that many steps less: equal budgets); G_random's new parts fade
# in over RAMP_FRACTION of a run's steps.
LEARN_STEPS, RAMP_FRACTION = 20, 0.2


def arm_config(sizing: Sizing, arm: str, seed: int, device: str, flops: float | None = None,
               extra: tuple[str, ...] = ()) -> tuple[list[str], int]:
    """Overrides and steps of one run: 'scratch', 'small' (the g = 4 depth small model alone)
    or a growth operator's name (the small model on small_share of the budget, then grown);
    `extra` overrides come last (e.g. growth.optimizer, schedule choices)."""
    flops = sizing.flops if flops is None else flops
    if arm == "scratch":
        model, steps, growth = sizing.target, sizing.steps(sizing.target, flops), []
    elif arm == "small":
        model = OPERATORS["stack"].small_model(sizing.target, GROWTH_FACTOR)
        steps, growth = sizing.steps(model, flops), []
    elif arm in OPERATORS:
        small = OPERATORS[arm].small_model(sizing.target, GROWTH_FACTOR)
        small_steps = sizing.steps(small, sizing.small_share * flops)
        model = sizing.target
        steps = small_steps + sizing.steps(sizing.target, (1 - sizing.small_share) * flops)
        steps -= LEARN_STEPS if OPERATORS[arm].learns else 0
        growth = [f'growth.operator="{arm}"', f"growth.factor={GROWTH_FACTOR}",
                  f"growth.at_tokens={small_steps * sizing.tokens_per_step}", f"growth.small_lr={sizing.lr(arm)}",
                  f"growth.learn_steps={LEARN_STEPS}", f"growth.ramp_steps={max(1, int(RAMP_FRACTION * steps))}"]
    else:
        raise StackfastError(f"unknown arm {arm!r}: 'scratch', 'small' or a growth operator")
    eval_every = max(1, steps // 8)
    overrides = (model_overrides(model) + growth +
                 [f'data.path="{sizing.data}"', f"data.seq_len={sizing.seq_len}",
                  f"train.global_batch_size={sizing.batch}", f"optim.lr={sizing.lr(arm)}", f"train.seed={seed}",
                  f"train.max_steps={steps}", f"train.eval_every={eval_every}", "train.eval_batches=8",
                  f"schedule.warmup_steps={max(1, steps // 10)}", f'train.device="{device}"',
                  f"logging.log_every={eval_every}", "logging.progress=false"] + list(extra))
    return overrides, steps


def train_arm(run_dir: Path, sizing: Sizing, arm: str, seed: int, device: str, flops: float | None = None,
              label: str = "", extra: tuple[str, ...] = ()) -> dict:
    """One run of a comparison (its own complete schedule); prints and returns its record."""
    started = time.perf_counter()
    overrides, _ = arm_config(sizing, arm, seed, device, flops, extra)
    cfg = load_config(None, overrides)
    cfg.logging.run_dir = str(run_dir)
    summary = run(cfg)
    curve = val_curve(read_metrics(run_dir))
    wall = time.perf_counter() - started
    record = {"arm": arm, "seed": seed, "run_dir": str(run_dir), "tokens": summary["tokens"],
              "flops": summary["flops"], "val_loss": curve[-1][2], "growth_step": summary["growth_step"],
              "params": summary["params"], "tokens_per_s": summary["tokens_per_s"], "wall_s": wall}
    print(f"  {label or arm:<22} seed {seed}  {summary['tokens']:>9} tokens  {summary['flops']:.3g} FLOPs  "
          f"val loss {record['val_loss']:.4f}  ({wall:.0f} s)", flush=True)
    return record


def speedup_from_budgets(scratch_loss: float, half: dict, full: dict, budget: float) -> tuple[float | None, str]:
    """The speedup at scratch's final loss from complete G_stack runs at B/2 and B: None when
    G_stack's full run does not reach it, 1.0 (i.e. >= +100%) when the half run already does."""
    if full["val_loss"] > scratch_loss:
        return None, "G_stack did not reach scratch's final loss within the same budget: speedup < 0"
    if half["val_loss"] <= scratch_loss:
        return 1.0, "G_stack reached scratch's final loss already at half the budget: speedup >= +100%"
    # log-linear interpolation of final loss in budget between the two complete runs
    t = (half["val_loss"] - scratch_loss) / (half["val_loss"] - full["val_loss"])
    needed = math.exp(math.log(half["flops"]) + t * (math.log(full["flops"]) - math.log(half["flops"])))
    sp = budget / needed - 1.0
    return sp, f"G_stack reaches scratch's final loss with {needed:.3g} FLOPs: speedup {100 * sp:+.1f}%"


def loss_stats(records: list[dict]) -> dict:
    """Final validation losses of one arm's seeds: values, mean, sample std (0 for one seed)."""
    values = [r["val_loss"] for r in records]
    return {"seeds": [r["seed"] for r in records], "values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def compare(a: dict, b: dict) -> str:
    """How arm a's final losses stand against arm b's, read against the seed spread."""
    if len(a["values"]) < 2 or len(b["values"]) < 2:
        return ("lower" if a["mean"] < b["mean"] else "higher") + " (one seed: no spread measured)"
    if a["max"] < b["min"]:
        return "lower in every seed (beyond the seed spread)"
    if a["min"] > b["max"]:
        return "higher in every seed (beyond the seed spread)"
    return "within the seed spread (a tie)"


def summarize(runs: list[dict], budget: float) -> dict:
    """Per-arm statistics, the per-seed speedup and the verdict lines."""
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    stats = {arm: loss_stats(rs) for arm, rs in by_arm.items() if rs}
    per_seed = []
    for scratch in by_arm["scratch"]:
        full = next((r for r in by_arm["stack"] if r["seed"] == scratch["seed"]), None)
        half = next((r for r in by_arm["stack_half"] if r["seed"] == scratch["seed"]), None)
        if full and half:
            sp, _ = speedup_from_budgets(scratch["val_loss"], half, full, scratch["flops"])
            per_seed.append({"seed": scratch["seed"], "speedup": sp})
    speedups = [s["speedup"] for s in per_seed]
    lines = [f"G_stack vs scratch: {stats['stack']['mean']:.4f} ± {stats['stack']['std']:.4f} vs "
             f"{stats['scratch']['mean']:.4f} ± {stats['scratch']['std']:.4f}: "
             f"{compare(stats['stack'], stats['scratch'])}"]
    if "small" in stats:
        small = stats["small"]
        spread = f" ± {small['std']:.4f}" if len(small["values"]) > 1 else ""
        lines.append(f"G_stack vs small alone: {stats['stack']['mean']:.4f} vs {small['mean']:.4f}{spread}: "
                     f"{compare(stats['stack'], small)}")
    if speedups and all(s == 1.0 for s in speedups):
        lines.append("speedup to scratch's final loss: >= +100% in every seed (G_stack at half the budget "
                     "already reaches it)")
    elif speedups and all(s is not None for s in speedups):
        shown = ", ".join(">= +100%" if s >= 1.0 else f"{100 * s:+.0f}%" for s in speedups)
        mean = statistics.fmean(speedups)
        spread = (max(speedups) - min(speedups)) / 2
        lines.append(f"speedup to scratch's final loss: {100 * mean:+.0f}% ± {100 * spread:.0f}% "
                     f"(half the range over seeds: {shown}; >= +100% counts as +100%)")
    elif speedups:
        lines.append("no speedup: in " + f"{sum(s is None for s in speedups)} of {len(speedups)} seeds "
                     "G_stack did not reach scratch's final loss within the same budget")
    return {"arms": stats, "speedup_per_seed": per_seed,
            "speedup_mean": statistics.fmean(speedups) if speedups and None not in speedups else None,
            "verdict": lines, "budget": budget}


def gpu_sizing(device: str, minutes: float, corpus_tokens: int, runs: float = 7.0,
               tokens_per_param: float = TOKENS_PER_PARAM) -> Sizing:
    """Scale the demo up for a GPU: the largest 8-layer target that sees `tokens_per_param`
    tokens per parameter, whose `runs` run-equivalents fit in `minutes` at the throughput
    measured here (two short probes), and whose runs do not repeat the corpus.

    The probes' own time comes out of `minutes`; `runs` (7) leaves a margin over the demo's
    six run-equivalents (two seeds of scratch and G_stack, two halves, one small alone).
    The LR follows the study's at width 32 scaled by sqrt(32 / width) (an untested rule)."""
    started = time.perf_counter()
    hidden, sizing = 64, CPU_SIZING
    for _ in range(2):  # probe, size, probe the chosen size, size again
        flops_per_s = probe_flops_per_s(target_model(hidden), device, CPU_SIZING.seq_len, 64)
        budget = flops_per_s * (60.0 * minutes - (time.perf_counter() - started)) / runs
        hidden = largest_hidden(budget, CPU_SIZING.seq_len, corpus_tokens, tokens_per_param) or 32
        sizing = scaled_up(hidden, budget, corpus_tokens, CPU_SIZING.seq_len, 64)
    return sizing


def scaled_up(hidden: int, flops: float, corpus_tokens: int, seq_len: int, batch: int) -> Sizing:
    """CPU_SIZING carried to a target of width `hidden`: its small share, its LRs scaled by
    sqrt(32 / width) (an untested rule: the study searched LRs at CPU sizes only), and no more
    than `flops` a run nor more FLOPs than the corpus's tokens pay for (data-bound: a run
    never repeats its data)."""
    target = target_model(hidden, max_seq_len=seq_len)
    factor = math.sqrt(CPU_SIZING.target.hidden_size / hidden)
    return dataclasses.replace(CPU_SIZING, target=target, seq_len=seq_len, batch=batch,
                               flops=min(flops, corpus_tokens * target.flops_per_token(seq_len)),
                               lr_scratch=CPU_SIZING.lr_scratch * factor, lr_small=CPU_SIZING.lr_small * factor,
                               lr_grown=CPU_SIZING.lr_grown * factor)


def largest_hidden(flops: float, seq_len: int, corpus_tokens: int, tokens_per_param: float) -> int | None:
    """The widest target (a multiple of 16, from 256 a multiple of 64) that `flops` trains at >=
    tokens_per_param tokens per parameter on at most corpus_tokens tokens (None: not even width 16)."""
    best = None
    for hidden in list(range(16, 256, 16)) + list(range(256, 4097, 64)):
        model = target_model(hidden)
        tokens = min(flops / model.flops_per_token(seq_len), corpus_tokens)
        if tokens / model.num_params() >= tokens_per_param:
            best = hidden
    return best


def probe_flops_per_s(model: ModelConfig, device: str, seq_len: int, batch: int, data: str = BUILTIN_STDLIB_BYTES,
                      steps: int = 30) -> float:
    """Training FLOP/s of `model` measured on `device`: a short run, timed over its last
    steps (kernel compilation and autotuning in the first ones are not throughput)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, model_overrides(model) + [
            f'data.path="{data}"', f"data.seq_len={seq_len}", f"train.global_batch_size={batch}",
            f"train.max_steps={steps}", "train.eval_every=0", "train.eval_batches=1", f'train.device="{device}"',
            f"logging.log_every={steps // 3}", "logging.progress=false"])
        cfg.logging.run_dir = tmp
        run(cfg)
        rows = [r for r in read_metrics(tmp) if "tokens_per_s" in r]
    return rows[-1]["tokens_per_s"] * model.flops_per_token(seq_len)


def plot_demo(result: dict, out: Path) -> Path:
    """The demo's picture from its result: every seed's curve of scratch, small alone and
    G_stack against FLOPs (an arm's seeds in one color), the speedup line as the caption."""
    shown = [r for r in result["runs"] if r["arm"] != "stack_half"]
    return plot_runs([r["run_dir"] for r in shown], out,
                     labels=[f"{LABELS[r['arm']]} (seed {r['seed']})" for r in shown],
                     colors=[COLORS[r["arm"]] for r in shown],
                     title="stackfast demo: validation loss, G_stack vs scratch vs small alone",
                     note=f"{result['verdict'][-1]}; {result['sizing']['tokens_per_param']:.1f} tokens per "
                          "target parameter", annotate_speedup=False)


def run_demo(out_dir: Path, sizing: Sizing = CPU_SIZING, seeds: int = 2, device: str = "auto") -> dict:
    """Run the comparison (scratch, G_stack and G_stack at B/2 for every seed, small alone
    for the first), write demo.json and demo.png into out_dir, print the verdict."""
    if sizing.flops < sizing.min_flops():
        raise StackfastError(f"a budget of {sizing.flops:.3g} FLOPs a run is too small for an equal-budget "
                             f"comparison: G_stack at half of it would train a phase for fewer than "
                             f"{MIN_PHASE_STEPS} steps; use --flops >= {sizing.min_flops():.3g}")
    started = time.perf_counter()
    target = sizing.target
    small = OPERATORS["stack"].small_model(target, GROWTH_FACTOR)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"stackfast demo: G_stack vs scratch at {sizing.flops:.3g} FLOPs a run, "
          f"{'byte-level ' if target.vocab_size == 256 else ''}Python standard library source\n"
          f"  target {target.n_layers} layers x {target.hidden_size} ({target.num_params() / 1e3:.0f}k params, "
          f"{sizing.tokens_per_param():.1f} tokens per parameter), small {small.n_layers} layers; "
          f"{100 * sizing.small_share:.0f}% of the FLOPs on the small model; LR {sizing.lr_scratch:.3g} (scratch), "
          f"{sizing.lr_small:.3g} (small alone), {sizing.lr_grown:.3g} (G_stack); {seeds} seeds",
          flush=True)
    if sizing.tokens_per_param() < 10:
        print("  warning: under 10 tokens per target parameter; at such budgets a small model tends to\n"
              "  beat a big one whatever growth does (see the 'small alone' run)", flush=True)
    runs = []
    for seed in range(1, seeds + 1):
        for arm in ("scratch", "stack", "stack_half") + (("small",) if seed == 1 else ()):
            flops = sizing.flops / 2 if arm == "stack_half" else sizing.flops
            runs.append(train_arm(out_dir / f"{arm}-seed{seed}", sizing, "stack" if arm == "stack_half" else arm,
                                  seed, device, flops, LABELS[arm]))
            runs[-1]["arm"] = arm
    summary = summarize(runs, sizing.flops)
    result = {"sizing": sizing.describe(), "device": device, "seeds": seeds, "runs": runs, **summary,
              "wall_s": time.perf_counter() - started}
    try:
        result["plot"] = str(plot_demo(result, out_dir / "demo.png"))
    except StackfastError as e:  # matplotlib missing: the numbers stand without the picture
        print(f"  (no plot: {e})")
    (out_dir / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n| run | seeds | FLOPs | final val loss (mean ± std) |\n|---|---|---|---|")
    for arm, s in summary["arms"].items():
        flops = sizing.flops / 2 if arm == "stack_half" else sizing.flops
        spread = f" ± {s['std']:.4f}" if len(s["values"]) > 1 else " (one seed)"
        print(f"| {LABELS[arm]} | {len(s['values'])} | {flops:.3g} | {s['mean']:.4f}{spread} |")
    print("\n" + "\n".join(summary["verdict"]))
    print(f"{result['wall_s']:.0f} s; results: {out_dir / 'demo.json'}"
          + (f", plot: {result['plot']}" if "plot" in result else ""))
    return result
