"""`stackfast demo`: the paper in miniature — growth against scratch at equal FLOPs, with seeds.

At a FLOP budget B, on the built-in corpus (the standard library's source, byte-level), at a
size where the target is near compute-optimal (TOKENS_PER_PARAM tokens per target parameter):
  scratch       the target (8 layers) trained from scratch on B FLOPs;
  small alone   its 2-layer small model trained on B FLOPs: what growth must beat too (a
                small model given the whole budget; at too small a budget it wins whatever
                growth does);
  G_stack       the paper's recipe as its code runs it: the small model on 20% of B, near its
                peak LR when it is stacked x4, the target on the rest with a fresh warmup and
                cosine (recipes.RECIPES["stack_paper"]).
Every arm runs on every seed, at its own best schedule (cosine or WSD) and peak LR from the
recipe study's search, the same search for all. Arms are compared paired by seed (the same
seed: the same data order and initialisation): a Student t interval on the mean difference,
and a verdict only when it excludes zero and the gap exceeds the noise floor the study
measured (recipes.paired). With the default two seeds the interval is wide (one degree of
freedom): when G_stack cannot be told from the small model alone, the demo says so; more
seeds (--seeds 5, about 2.5x the time) narrow it. The recipe study (benchmarks/growth_study.py
--recipes) compares every recipe, with speedups, on five seeds.

The runs go two at a time on a CPU, one thread each (one at a time on a GPU); the workers
end with the demo, however it is stopped. The sizing (CPU_SIZING) is the recipe study's; on
a GPU the demo sizes itself by the same rule (TOKENS_PER_PARAM) from throughput it measures
first (gpu_sizing). Whatever is measured is reported, favourable or not.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from stackfast.config import ModelConfig, StackfastError, load_config
from stackfast.data import BUILTIN_STDLIB_BYTES
from stackfast.metrics import read_metrics
from stackfast.plot import plot_runs
from stackfast.recipes import (RECIPES, Trial, flop_shares, load_records, losses_by_seed, machine, model_overrides,
                               paired, paired_line, run_many, stage_models, stats)
from stackfast.train import run

# The sizing rule: tokens per target parameter. At 10 and 15 (issue 29) the small model alone
# matched G_stack and beat scratch: nothing to tell growth from "train a small model". 20 is
# near compute-optimal (Chinchilla); the CPU demo and the recipe study run there.
TOKENS_PER_PARAM = 20.0
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

# The recipe study's result at 2e12 FLOPs (benchmarks/results/recipe_study-cpu.json;
# tests/test_demo.py checks these against it): each recipe's best schedule and peak LR, the
# recipe with the lowest final loss, and the noise floor (the largest change of a final loss
# from the thread count alone, same seeds).
TUNED = {"scratch": ("wsd", 8e-3), "small": ("wsd", 8e-3), "stack_paper": ("cosine", 8e-3),
         "stack_restart": ("cosine", 8e-3), "stack_continue": ("wsd", 8e-3), "doublings": ("wsd", 5e-3),
         "midas": ("cosine", 1.2e-2)}
BEST = "doublings"  # the lowest final loss at the budget among the growth recipes
NOISE_FLOOR = 0.02165
DEMO_ARMS = ("scratch", "small", "stack_paper")
DEMO_SEEDS = 2  # six runs, about 5 minutes on 2 cores; the interval then has one degree of freedom


@dataclass(frozen=True)
class Sizing:
    """One comparison: the target, the FLOP budget of each run and each recipe's schedule
    kind and peak LR (its best in the recipe study's search)."""
    target: ModelConfig
    flops: float
    settings: dict = field(default_factory=lambda: dict(TUNED))  # recipe -> (schedule kind, peak LR)
    seq_len: int = 128
    batch: int = 16
    data: str = BUILTIN_STDLIB_BYTES

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch

    def steps(self, model: ModelConfig, flops: float) -> int:
        """Optimizer steps that spend `flops` on a model of shape `model`."""
        return max(2, round(flops / (model.flops_per_token(self.seq_len) * self.tokens_per_step)))

    def with_lr(self, lr: float) -> "Sizing":
        """The same comparison with one peak LR for every recipe (each keeps its schedule kind)."""
        return dataclasses.replace(self, settings={r: (kind, lr) for r, (kind, _) in self.settings.items()})

    def scaled_lr(self, factor: float) -> "Sizing":
        return dataclasses.replace(self, settings={r: (kind, lr * factor) for r, (kind, lr) in self.settings.items()})

    def min_flops(self, recipes=("stack_paper",)) -> float:
        """The smallest budget a run may have: every stage of every growth recipe trains at
        least MIN_PHASE_STEPS steps, so rounding to whole steps keeps the arms' budgets
        within 10% of each other (the 2-step floor of `steps` would otherwise make the runs'
        budgets unequal)."""
        need = 0.0
        for name in recipes:
            recipe = RECIPES[name]
            for model, share in zip(stage_models(self.target, recipe), flop_shares(self, recipe)):
                need = max(need, model.flops_per_token(self.seq_len) * self.tokens_per_step / share)
        return MIN_PHASE_STEPS * need

    def tokens_per_param(self) -> float:
        return self.flops / self.target.flops_per_token(self.seq_len) / self.target.num_params()

    def describe(self) -> dict:
        return {"target": dataclasses.asdict(self.target), "target_params": self.target.num_params(),
                "flops": self.flops, "settings": {r: {"schedule": k, "lr": lr} for r, (k, lr) in self.settings.items()},
                "seq_len": self.seq_len, "batch": self.batch, "data": self.data,
                "tokens_per_param": self.tokens_per_param()}


# The CPU sizing: the studies' 8 x 32 byte-level target (117k parameters) at 20 tokens per
# parameter (2e12 FLOPs a run): the demo's six runs take about 5 minutes on 2 quiet cores.
CPU_SIZING = Sizing(target=target_model(32), flops=2e12)
QUICK_DIVISOR = 10  # `stackfast demo --quick`: the command end to end, not the method (above min_flops)
COLORS = {"scratch": "C0", "stack_paper": "C1", "small": "C2"}  # an arm's seeds share a color


def demo_trials(sizing: Sizing, seeds: int) -> list[tuple[str, Trial]]:
    """(arm, trial) of every run: each of DEMO_ARMS on every seed (paired)."""
    return [(recipe, Trial(recipe, *sizing.settings[recipe], seed, sizing.flops))
            for seed in range(1, seeds + 1) for recipe in DEMO_ARMS]


def summarize(runs: list[dict], noise: float = NOISE_FLOOR) -> dict:
    """Per-arm statistics, the paired comparisons (G_stack against scratch and against the
    small model alone, the small model against scratch) and the verdict lines."""
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in dict.fromkeys(r["arm"] for r in runs)}
    comparisons, lines = {}, []
    for a, b in (("stack_paper", "scratch"), ("stack_paper", "small"), ("small", "scratch")):
        result = paired(losses_by_seed(by_arm[a]), losses_by_seed(by_arm[b]), noise)
        comparisons[f"{a} vs {b}"] = result
        lines.append(paired_line(RECIPES[a].label, RECIPES[b].label, result))
    if comparisons["stack_paper vs small"]["verdict"] != "lower":
        lines.append(f"{RECIPES['stack_paper'].label} cannot be told apart from (or loses to) the small model alone "
                     f"here: at this size and with these seeds the demo does not show that growth beats training "
                     f"the small model")
    return {"arms": {arm: stats([r["val_loss"] for r in rs]) for arm, rs in by_arm.items()},
            "comparisons": comparisons, "verdict": lines, "noise_floor": noise}


def run_equivalents(seeds: int) -> float:
    """The demo's runs (demo_trials), with a 10% margin."""
    return 1.1 * seeds * len(DEMO_ARMS)


def gpu_sizing(device: str, minutes: float, corpus_tokens: int, runs: float = run_equivalents(DEMO_SEEDS),
               tokens_per_param: float = TOKENS_PER_PARAM) -> Sizing:
    """Scale the demo up for a GPU: the largest 8-layer target that sees `tokens_per_param`
    tokens per parameter, whose `runs` run-equivalents (run_equivalents) fit in `minutes` at
    the throughput measured here (two short probes), and whose runs do not repeat the corpus.

    The probes' own time comes out of `minutes`. The LRs follow the study's at CPU width (16) scaled by sqrt(16 / width)
    (an untested rule)."""
    started = time.perf_counter()
    hidden, sizing = 64, CPU_SIZING
    for _ in range(2):  # probe, size, probe the chosen size, size again
        flops_per_s = probe_flops_per_s(target_model(hidden), device, CPU_SIZING.seq_len, 64)
        budget = flops_per_s * (60.0 * minutes - (time.perf_counter() - started)) / runs
        hidden = largest_hidden(budget, CPU_SIZING.seq_len, corpus_tokens, tokens_per_param) or 32
        sizing = scaled_up(hidden, budget, corpus_tokens, CPU_SIZING.seq_len, 64)
    return sizing


def scaled_up(hidden: int, flops: float, corpus_tokens: int, seq_len: int, batch: int) -> Sizing:
    """CPU_SIZING carried to a target of width `hidden`: its schedules, its LRs scaled by
    sqrt(16 / width) (an untested rule: the study searched LRs at CPU sizes only), and no more
    than `flops` a run nor more FLOPs than the corpus's tokens pay for (data-bound: a run
    never repeats its data)."""
    target = target_model(hidden, max_seq_len=seq_len)
    return dataclasses.replace(CPU_SIZING, target=target, seq_len=seq_len, batch=batch,
                               flops=min(flops, corpus_tokens * target.flops_per_token(seq_len))) \
        .scaled_lr(math.sqrt(CPU_SIZING.target.hidden_size / hidden))


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
    """The demo's picture from its result: every seed's curve of each arm at B against FLOPs
    (an arm's seeds in one color), G_stack against the small model alone as the caption."""
    shown = result["runs"]
    versus = paired_line(RECIPES["stack_paper"].label, RECIPES["small"].label,
                         result["comparisons"]["stack_paper vs small"])
    return plot_runs([r["run_dir"] for r in shown], out,
                     labels=[f"{RECIPES[r['arm']].label} (seed {r['seed']})" for r in shown],
                     colors=[COLORS[r["arm"]] for r in shown],
                     title="stackfast demo: validation loss, growth recipes vs scratch vs small alone",
                     note=f"{versus}; {result['sizing']['tokens_per_param']:.1f} tokens per target parameter",
                     annotate_speedup=False)


def run_demo(out_dir: Path, sizing: Sizing = CPU_SIZING, seeds: int = DEMO_SEEDS, device: str = "auto") -> dict:
    """Run the comparison (demo_trials), write demo.json and demo.png into out_dir, print
    the verdict."""
    if sizing.flops < sizing.min_flops():
        raise StackfastError(f"a budget of {sizing.flops:.3g} FLOPs a run is too small for an equal-budget "
                             f"comparison: a growth recipe would train a stage for fewer than "
                             f"{MIN_PHASE_STEPS} steps; use --flops >= {sizing.min_flops():.3g}")
    started = time.perf_counter()
    target = sizing.target
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = 1 if device.startswith("cuda") else 2
    tuned = ", ".join(f"{RECIPES[r].label} {k} {lr:.3g}" for r, (k, lr) in sizing.settings.items()
                      if r in DEMO_ARMS)
    print(f"stackfast demo: growth vs scratch at {sizing.flops:.3g} FLOPs a run, "
          f"{'byte-level ' if target.vocab_size == 256 else ''}Python standard library source\n"
          f"  target {target.n_layers} layers x {target.hidden_size} ({target.num_params() / 1e3:.0f}k params, "
          f"{sizing.tokens_per_param():.1f} tokens per parameter); schedule and LR each arm's best ({tuned}); "
          f"{seeds} seeds, every arm on each (paired), {workers} run(s) at a time", flush=True)
    if sizing.tokens_per_param() < TOKENS_PER_PARAM:
        print(f"  warning: under {TOKENS_PER_PARAM:g} tokens per target parameter; at such budgets a small model "
              f"tends to\n  beat a big one whatever growth does (see the 'small alone' run)", flush=True)
    trials = demo_trials(sizing, seeds)
    # runs recorded in out_dir by an earlier call are not run again (the CLI starts in an empty folder)
    done = run_many([t for _, t in trials], sizing, out_dir, device, workers, load_records(out_dir))
    runs = [{**done[t], "arm": arm} for arm, t in trials]
    summary = summarize(runs)
    result = {"sizing": sizing.describe(), "device": device, "machine": machine(), "seeds": seeds, "runs": runs,
              **summary, "wall_s": time.perf_counter() - started}
    try:
        result["plot"] = str(plot_demo(result, out_dir / "demo.png"))
    except StackfastError as e:  # matplotlib missing: the numbers stand without the picture
        print(f"  (no plot: {e})")
    (out_dir / "demo.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n| run | seeds | FLOPs | final val loss (mean ± std) |\n|---|---|---|---|")
    for arm, s in summary["arms"].items():
        spread = f" ± {s['std']:.4f}" if len(s["values"]) > 1 else " (one seed)"
        print(f"| {RECIPES[arm].label} | {len(s['values'])} | {sizing.flops:.3g} | {s['mean']:.4f}{spread} |")
    print("\n" + "\n".join(summary["verdict"]))
    print(f"{result['wall_s']:.0f} s; results: {out_dir / 'demo.json'}"
          + (f", plot: {result['plot']}" if "plot" in result else ""))
    return result
