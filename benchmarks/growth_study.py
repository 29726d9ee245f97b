"""Growth study: scratch, the small model alone and the growth operators at equal FLOPs, with
seeds (paper Figure 3 in miniature).

Every run has its own complete warmup + cosine schedule over the same FLOP budget (a grown
run's FLOPs include its small-model phase, `small_share` of the budget) and the same LR.

CPU (the default): the demo's sizing from the sizing study (stackfast.demo.CPU_SIZING: an
8 x 32 byte-level target, 1e12 FLOPs a run: 10 tokens per parameter, 20% small share, LR 5e-3
for scratch and small alone, 8e-3 for every grown run) on the built-in byte-level corpus;
scratch, small alone and all eight operators, two seeds each (~15 minutes on 2 cores):

    python benchmarks/growth_study.py
    python benchmarks/growth_study.py --operators stack depth_zero --seeds 1 --flops 3e11   # a quick look
    python benchmarks/growth_study.py --operators stack --choices   # G_stack's optimizer and schedule choices

GPU (--gpu): one short run that can settle the question at a size where the large model is
the right model: a target of >= 20M parameters at >= 10 tokens per parameter, trained on the
machine's own Python sources (standard library and site-packages: .py, .pyi and C/C++/CUDA
sources and headers; byte-level, tokenized at the start with stackfast's tokenizer; ~400M
tokens, so the runs do not repeat it), all within --minutes (9) including
the tokenization. The size comes from throughput measured at the start (a short probe), by
the demo's rule (15 tokens per parameter, never under 10): scratch, small alone and G_stack
with two seeds where they fit (else one, and the JSON says so), then, while time remains,
G_stack with the optimizer state replicated and with the schedule continued (the two choices
the paper did not try). --rehearse runs that path at tiny size (about a minute on a CPU),
as CI does.

    python benchmarks/growth_study.py --gpu              # one H100/H200, <= 9 minutes
    python benchmarks/growth_study.py --gpu --rehearse   # the same path, tiny, on any machine

Reported per run: final validation loss (mean ± std over seeds) and, for the grown runs,
the speedup read from the validation curve at scratch's final loss (a mid-schedule reading:
a guide, not the demo's complete-schedule figure).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stackfast.bench.harness import RESULTS_DIR, environment, markdown_table, results_folder  # noqa: E402
from stackfast.config import StackfastError  # noqa: E402
from stackfast.data import TokenData, stdlib_files, tokenize  # noqa: E402
from stackfast.demo import (CPU_SIZING, TOKENS_PER_PARAM, Sizing, compare, largest_hidden, loss_stats,  # noqa: E402
                            probe_flops_per_s, scaled_up, target_model, train_arm)
from stackfast.growth_operators import OPERATORS  # noqa: E402
from stackfast.metrics import read_metrics  # noqa: E402
from stackfast.plot import plot_runs, speedup_vs, val_curve  # noqa: E402
from stackfast.train import resolve_device  # noqa: E402


@dataclasses.dataclass(frozen=True)
class GpuPreset:
    """What the GPU study must reach, and its time limit."""
    minutes: float = 9.0
    min_params: float = 20e6
    min_tokens_per_param: float = 10.0
    seq_len: int = 1024
    batch: int = 64
    min_width: int = 512  # the probe's width: the narrowest 8-layer target of >= 20M parameters


# The GPU path at a size a CPU runs in about a minute (CI's rehearsal): same steps, tiny numbers.
REHEARSAL = GpuPreset(minutes=1.5, min_params=30e3, min_tokens_per_param=10.0, seq_len=128, batch=16,
                      min_width=16)
# The GPU study's runs: the required three, then the paper's open choices while time remains.
REQUIRED = ("scratch", "small", "stack")
OPTIONAL = {"stack_replicate": ['growth.optimizer="replicate"'], "stack_continue": ['growth.schedule="continue"']}
MARGIN_S = 20.0  # the end of the study: summary, plot, JSON
REPLACE = ("logging.overwrite=true",)  # --runs-dir is the study's own: earlier runs there are replaced


# The GPU study's corpus: the source code the machine's own Python carries. site-packages'
# .py alone is ~190 MB on a machine with torch and transformers; with the standard library,
# stubs and C/C++ headers it was 426M byte tokens on the CPU development machine (8 s to
# tokenize): enough for a 25M-parameter target at >= 10 tokens per parameter, never repeated.
SOURCE_PATTERNS = ("*.py", "*.pyi", "*.h", "*.hpp", "*.cuh", "*.c", "*.cc", "*.cpp", "*.cu")


def python_sources() -> list[Path]:
    """The running Python's standard library and site-packages folders, none inside another
    (a system Python keeps site-packages inside its standard library folder)."""
    paths = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "purelib", "platlib")}
    return sorted(p for p in paths if p.is_dir() and not any(q in p.parents for q in paths))


def report(name: str, runs: list[dict], extra: dict, out: str | None, title: str) -> dict:
    """Per-arm statistics, verdicts and curve speedups; JSON + PNG + a table."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    stats = {arm: loss_stats([r for r in runs if r["arm"] == arm]) for arm in arms}
    baseline = val_curve(read_metrics(next(r for r in runs if r["arm"] == "scratch")["run_dir"]))
    rows = []
    for arm in arms:
        first = next(r for r in runs if r["arm"] == arm)
        sp = None if arm in ("scratch", "small") else speedup_vs(baseline, val_curve(read_metrics(first["run_dir"])))
        rows.append({"run": arm, "seeds": len(stats[arm]["values"]), "tokens": first["tokens"], "flops": first["flops"],
                     "params": first["params"], "final_val_loss": stats[arm]["mean"], "std": stats[arm]["std"],
                     "loss_vs_scratch": stats[arm]["mean"] - stats["scratch"]["mean"],
                     "vs_scratch": "" if arm == "scratch" else compare(stats[arm], stats["scratch"]),
                     "curve_speedup_pct": None if sp is None else 100 * sp})
    folder = results_folder(out)
    result = {"environment": environment(), **extra, "arms": stats, "rows": rows, "runs": runs}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    firsts = [next(r for r in runs if r["arm"] == arm) for arm in arms]
    try:
        png = plot_runs([r["run_dir"] for r in firsts], folder / f"{name}.png", labels=arms, title=title,
                        annotate_speedup=False)
    except StackfastError as e:  # matplotlib missing: the JSON stands alone
        png = f"none ({e})"
    print(markdown_table(rows, ["run", "seeds", "tokens", "final_val_loss", "std", "loss_vs_scratch", "vs_scratch",
                                "curve_speedup_pct"]))
    print(f"results: {path}, plot: {png}")
    return result


def train_choice(runs_dir: Path, sizing: Sizing, name: str, seed: int, device: str) -> dict:
    """One G_stack run with one of OPTIONAL's choices, recorded under the choice's name."""
    record = train_arm(runs_dir / f"{name}-seed{seed}", sizing, "stack", seed, device, label=name,
                       extra=REPLACE + tuple(OPTIONAL[name]))
    return {**record, "arm": name}


def cpu_study(args) -> dict:
    sizing = dataclasses.replace(CPU_SIZING, **({"flops": args.flops} if args.flops else {}))
    runs_dir = Path(args.runs_dir)
    print(f"growth study: {sizing.flops:.3g} FLOPs a run ({sizing.tokens_per_param():.1f} tokens per target "
          f"parameter), {100 * sizing.small_share:.0f}% on the small model, LR {sizing.lr_scratch:g} / "
          f"{sizing.lr_small:g} / {sizing.lr_grown:g} (scratch / small alone / grown), {args.seeds} seeds",
          flush=True)
    seeds = range(1, args.seeds + 1)
    runs = [train_arm(runs_dir / f"{arm}-seed{seed}", sizing, arm, seed, args.device, extra=REPLACE)
            for arm in ["scratch", "small", *args.operators] for seed in seeds]
    if args.choices:
        runs += [train_choice(runs_dir, sizing, name, seed, args.device) for name in OPTIONAL for seed in seeds]
    name = "growth_study_choices-cpu" if args.choices else "growth_study-cpu"
    return report(name, runs, {"sizing": sizing.describe(), "seeds": args.seeds}, args.out,
                  "growth study: scratch vs small alone vs growth at equal FLOPs (CPU)")


def plan_gpu(flops_per_s: float, seconds: float, preset: GpuPreset, corpus_tokens: int) -> tuple[Sizing, int, str]:
    """The target size and seed count for the required runs in `seconds`: two seeds if a
    target of >= min_params then sees >= min_tokens_per_param tokens per parameter, else one."""
    for seeds in (2, 1):
        run_flops = flops_per_s * seconds / (len(REQUIRED) * seeds)
        for rule in (TOKENS_PER_PARAM, preset.min_tokens_per_param):
            hidden = largest_hidden(run_flops, preset.seq_len, corpus_tokens, rule)
            if hidden and target_model(hidden).num_params() >= preset.min_params:
                return (scaled_up(hidden, run_flops, corpus_tokens, preset.seq_len, preset.batch), seeds,
                        f"{seeds} seed(s) fit at >= {rule:g} tokens/param")
    sizing = scaled_up(preset.min_width, flops_per_s * seconds / len(REQUIRED), corpus_tokens, preset.seq_len,
                       preset.batch)
    return sizing, 1, (f"under-sized: at the measured throughput a {sizing.target.num_params() / 1e6:.3g}M target "
                       f"sees only {sizing.tokens_per_param():.1f} tokens per parameter in the time")


def gpu_study(args) -> dict:
    started = time.perf_counter()
    preset = REHEARSAL if args.rehearse else GpuPreset()
    preset = dataclasses.replace(preset, **({"minutes": args.minutes} if args.minutes else {}))
    deadline = started + 60 * preset.minutes
    device = str(resolve_device(args.device))
    corpus = [Path(c) for c in args.corpus] if args.corpus else (stdlib_files() if args.rehearse else python_sources())
    data_dir = Path(args.runs_dir) / "corpus"
    tokenize(corpus, "bytes", data_dir, patterns=SOURCE_PATTERNS, utf8_errors="replace", force=True)
    corpus_tokens = TokenData(data_dir).train_tokens
    tokenized = time.perf_counter() - started
    print(f"growth study --gpu{' --rehearse' if args.rehearse else ''}: {corpus_tokens / 1e6:.1f}M byte tokens "
          f"from {len(corpus)} inputs ({corpus[0]}, ...) in {tokenized:.0f} s", flush=True)

    probe = target_model(preset.min_width, max_seq_len=preset.seq_len)
    flops_per_s = probe_flops_per_s(probe, device, preset.seq_len, preset.batch, data=str(data_dir))
    seconds = deadline - time.perf_counter() - MARGIN_S
    sizing, seeds, why = plan_gpu(flops_per_s, seconds, preset, corpus_tokens)
    sizing = dataclasses.replace(sizing, data=str(data_dir))
    print(f"probe: {flops_per_s / 1e12:.3g} TFLOP/s at width {preset.min_width}; {seconds:.0f} s left -> target "
          f"{sizing.target.n_layers} x {sizing.target.hidden_size} ({sizing.target.num_params() / 1e6:.3g}M params), "
          f"{sizing.flops:.3g} FLOPs a run, {sizing.tokens_per_param():.1f} tokens/param, {why}", flush=True)

    runs_dir = Path(args.runs_dir)
    runs = [train_arm(runs_dir / f"{arm}-seed{seed}", sizing, arm, seed, device, extra=REPLACE)
            for seed in range(1, seeds + 1) for arm in REQUIRED]
    skipped = []
    for name in OPTIONAL:
        longest = max(r["wall_s"] for r in runs)
        if time.perf_counter() + longest > deadline - MARGIN_S:
            skipped.append(name)
            continue
        runs.append(train_choice(runs_dir, sizing, name, 1, device))
    plan = {"preset": dataclasses.asdict(preset), "rehearsal": args.rehearse, "corpus": [str(c) for c in corpus],
            "corpus_tokens": corpus_tokens, "tokenize_s": tokenized, "probe_tflops": flops_per_s / 1e12,
            "sizing": sizing.describe(), "seeds": seeds, "seeds_reason": why, "skipped_for_time": skipped,
            "wall_s": time.perf_counter() - started}
    name = "growth_study_gpu-rehearsal" if args.rehearse else "growth_study_gpu"
    result = report(name, runs, plan, args.out,
                    f"growth study on GPU: {sizing.target.num_params() / 1e6:.3g}M target, "
                    f"{sizing.tokens_per_param():.0f} tokens/param, {seeds} seed(s)")
    print(f"{result['wall_s']:.0f} s in all (limit {60 * preset.minutes:.0f} s)"
          + (f"; skipped for time: {', '.join(skipped)}" if skipped else ""))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="the GPU study (see above)")
    parser.add_argument("--rehearse", action="store_true", help="with --gpu: the same path at tiny size")
    parser.add_argument("--minutes", type=float, help="with --gpu: the time limit (default 9; rehearsal 1.5)")
    parser.add_argument("--corpus", nargs="+", help="with --gpu: source folders (default: the standard library "
                        "and site-packages)")
    parser.add_argument("--flops", type=float, help="CPU: FLOPs of a run (default: the demo's)")
    parser.add_argument("--seeds", type=int, default=2, help="CPU: seeds of every run (default 2)")
    parser.add_argument("--operators", nargs="+", default=list(OPERATORS), choices=OPERATORS)
    parser.add_argument("--choices", action="store_true",
                        help="CPU: also G_stack with the optimizer state replicated and with the schedule "
                             "continued (results go to growth_study_choices-cpu.json)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs-dir", default="runs/growth-study", help="where the runs go (replaced)")
    parser.add_argument("--out", default=None, help=f"results folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    if args.rehearse and not args.gpu:
        parser.error("--rehearse goes with --gpu")
    if args.gpu and not args.rehearse and resolve_device(args.device).type != "cuda":
        parser.error("--gpu: no CUDA device here; --gpu --rehearse runs the same path at tiny size")
    if args.minutes is not None and not 0 < args.minutes < 60:
        parser.error(f"--minutes must be in (0, 60), got {args.minutes}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    return gpu_study(args) if args.gpu else cpu_study(args)


if __name__ == "__main__":
    main()
