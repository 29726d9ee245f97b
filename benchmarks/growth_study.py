"""Growth studies at equal FLOPs under one protocol (stackfast/recipes.py): every arm gets the
same search over schedule (cosine, WSD; cosine alone for the paper's schedule, which runs
cosine) and peak LR, extended until each best LR is interior (seed 1), then five fresh seeds
(recipes.FINAL_SEEDS) at its best setting; in the recipe study the grown arms run at half the
budget too (the speedup, read from complete runs against the strongest scratch,
seed by seed); arms are compared paired by seed, with a Student t interval on the mean
difference, and a verdict only beyond zero and the noise floor (recipes.paired); the strongest
scratch again at 2 threads (the noise floor: every run is pinned to 1 thread and
bit-reproducible on this CPU, which one repeat checks; the results name the CPU). Two runs at
a time on 2 cores; the workers end with the study, however it is stopped.

CPU, the demo's sizing (stackfast.demo.CPU_SIZING: an 8 x 32 byte-level target, 2e12 FLOPs a
run, 20 tokens per parameter) on the built-in byte-level corpus:

    python benchmarks/growth_study.py             # the operators: scratch, small alone and the
                                                  # paper's eight, each x4 at 20% of the FLOPs
                                                  # (losses at B alone: no half-budget runs)
    python benchmarks/growth_study.py --recipes   # the recipes: G_stack as the paper ran it, on its
                                                  # own full schedule, under one schedule; two
                                                  # doublings, MIDAS (recipes.GROWTH_RECIPES)
    python benchmarks/growth_study.py --recipes scratch doublings --flops 3e11   # a quick look

Each study continues where it stopped (its runs folder keeps a record of every finished run).
Results: benchmarks/results/growth_study-cpu.json and recipe_study-cpu.json (+ PNG).

GPU (--gpu): one short run that can settle the question at a size where the large model is
the right model: a target of >= 20M parameters at >= 10 tokens per parameter, trained on the
machine's own Python sources (standard library and site-packages: .py, .pyi and C/C++/CUDA
sources and headers; byte-level, tokenized at the start with stackfast's tokenizer; ~400M
tokens, so the runs do not repeat it), all within --minutes (9) including the tokenization.
The size comes from throughput measured at the start (a short probe), by the demo's rule
(15 tokens per parameter, never under 10): scratch, small alone and the paper's G_stack with
two seeds where they fit (else one, and the JSON says so), then, while time remains, the
recipe study's best recipe and G_stack under one schedule. No search fits in minutes: every
arm runs at the CPU study's best schedule and LR, scaled by sqrt(16 / width) (stated, not
tuned). --rehearse runs that path at tiny size (about a minute on a CPU), as CI does.

    python benchmarks/growth_study.py --gpu              # one H100/H200, <= 9 minutes
    python benchmarks/growth_study.py --gpu --rehearse   # the same path, tiny, on any machine
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
from stackfast.data import TokenData, builtin_dataset, stdlib_files, tokenize  # noqa: E402
from stackfast.demo import (BEST, CPU_SIZING, TOKENS_PER_PARAM, Sizing, largest_hidden, probe_flops_per_s,  # noqa: E402
                            scaled_up, target_model)
from stackfast.metrics import read_metrics  # noqa: E402
from stackfast.plot import plot_runs, speedup_vs, val_curve  # noqa: E402
from stackfast.recipes import (CONFIDENCE, FINAL_SEEDS, GROWTH_RECIPES, LR_LADDER, OPERATOR_RECIPES,  # noqa: E402
                               RECIPES, Trial, check_recipes, chosen_settings, final_trials, load_records,
                               losses_by_seed, machine, paired, run_many, search_table, speedups_per_seed, stats,
                               t_interval, tune)
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
# The GPU study's runs: the required three, then the recipe study's best and G_stack under one
# schedule while time remains.
REQUIRED = ("scratch", "small", "stack_paper")
OPTIONAL = tuple(dict.fromkeys((BEST, "stack_continue")))
MARGIN_S = 20.0  # the end of the study: summary, plot, JSON


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
    """The GPU study's per-arm statistics, verdicts (paired by seed; no noise floor is
    measured there) and curve speedups; JSON + PNG + a table."""
    arms = list(dict.fromkeys(r["recipe"] for r in runs))
    arm_stats = {arm: stats([r["val_loss"] for r in runs if r["recipe"] == arm]) for arm in arms}
    baseline = val_curve(read_metrics(next(r for r in runs if r["recipe"] == "scratch")["run_dir"]))
    rows = []
    for arm in arms:
        first = next(r for r in runs if r["recipe"] == arm)
        sp = None if not RECIPES[arm].grows else speedup_vs(baseline, val_curve(read_metrics(first["run_dir"])))
        rows.append({"run": arm, "schedule": first["kind"], "lr": first["lr"], "seeds": len(arm_stats[arm]["values"]),
                     "tokens": first["tokens"], "flops": first["run_flops"], "final_val_loss": arm_stats[arm]["mean"],
                     "std": arm_stats[arm]["std"],
                     "loss_vs_scratch": arm_stats[arm]["mean"] - arm_stats["scratch"]["mean"],
                     "vs_scratch": "" if arm == "scratch" else paired(
                         losses_by_seed([r for r in runs if r["recipe"] == arm]),
                         losses_by_seed([r for r in runs if r["recipe"] == "scratch"]), 0.0)["verdict"],
                     "curve_speedup_pct": None if sp is None else 100 * sp})
    folder = results_folder(out)
    result = {"environment": environment(), "machine": machine(), **extra, "arms": arm_stats, "rows": rows,
              "runs": runs}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    firsts = [next(r for r in runs if r["recipe"] == arm) for arm in arms]
    try:
        png = plot_runs([r["run_dir"] for r in firsts], folder / f"{name}.png", labels=arms, title=title,
                        annotate_speedup=False)
    except StackfastError as e:  # matplotlib missing: the JSON stands alone
        png = f"none ({e})"
    print(markdown_table(rows, ["run", "schedule", "lr", "seeds", "tokens", "final_val_loss", "std",
                                "loss_vs_scratch", "vs_scratch", "curve_speedup_pct"]))
    print(f"results: {path}, plot: {png}")
    return result


def protocol_study(args, names: list[str], result_name: str, title: str, speedups: bool = True) -> dict:
    """Every arm (a recipe) through the same search, then the best setting of each on fresh
    seeds at B (and, with `speedups`, B/2 for the grown ones: the speedup), the strongest
    scratch again at another thread count (the noise floor) and one repeat (the runs are
    bit-reproducible)."""
    started = time.perf_counter()
    check_recipes(names)
    if "scratch" not in names:
        raise StackfastError("the comparison needs the scratch recipe")
    sizing = dataclasses.replace(CPU_SIZING, **({"flops": args.flops} if args.flops else {}))
    runs_dir = Path(args.runs_dir)
    device = str(resolve_device(args.device))
    builtin_dataset(byte_level=True)  # built once here, not by two workers at the same time
    done = load_records(runs_dir)
    reused = len(done)
    print(f"{title}: {', '.join(names)}; {sizing.flops:.3g} FLOPs a run, {args.workers} runs at a time, "
          f"1 thread each{f'; {len(done)} runs already done' if done else ''}", flush=True)
    best, done = tune(names, sizing, runs_dir, device, args.workers, done)
    chosen = chosen_settings(best, done)
    finals = final_trials(chosen, sizing.flops)
    halves = {r: [dataclasses.replace(t, flops=t.flops / 2) for t in finals[r]] for r in names
              if RECIPES[r].grows and speedups}
    done = run_many([t for ts in [*finals.values(), *halves.values()] for t in ts], sizing, runs_dir, device,
                    args.workers, done)
    final_stats = {r: stats([done[t]["val_loss"] for t in ts]) for r, ts in finals.items()}
    scratch = finals["scratch"]
    # The noise floor: the strongest scratch's final seeds at 2 threads instead of 1 (float
    # rounding alone), and one of them repeated at 1 thread in a fresh process (must be equal).
    noisy = [dataclasses.replace(t, threads=2) for t in scratch]
    done = run_many(noisy, sizing, runs_dir, device, 1, done)
    noise = max(abs(done[a]["val_loss"] - done[b]["val_loss"]) for a, b in zip(scratch, noisy))
    repeat = run_many([scratch[0]], sizing, runs_dir / "repeat", device, 1, {})[scratch[0]]
    reproducible = repeat["val_loss"] == done[scratch[0]]["val_loss"]
    by_seed = {r: {t.seed: done[t]["val_loss"] for t in ts} for r, ts in finals.items()}
    rows = []
    for r in names:
        st = final_stats[r]
        row = {"recipe": r, "label": RECIPES[r].label, "schedule": chosen[r].kind, "lr": chosen[r].lr,
               "seeds": len(st["values"]), "final_val_loss": st["mean"], "std": st["std"]}
        # paired by seed against the baselines and the paper's recipe: the mean difference, its
        # interval, the verdict
        for other in ("scratch", "small", "stack_paper"):
            if r != other and other in by_seed:
                versus = paired(by_seed[r], by_seed[other], noise)
                row[f"vs_{other}"], row[f"vs_{other}_interval"] = versus["mean"], versus["interval"]
                row[f"verdict_vs_{other}"] = versus["verdict"]
        if r in halves:
            sps = speedups_per_seed([done[t] for t in scratch], [done[t] for t in halves[r]],
                                    [done[t] for t in finals[r]])
            row["speedup_per_seed"] = sps
            if all(sp is not None for sp in sps):
                mean, _, interval = t_interval(sps)
                row["speedup_pct"], row["speedup_interval_pct"] = 100 * mean, [100 * x for x in interval]
                row["speedup_half_range_pct"] = 100 * (max(sps) - min(sps)) / 2
        rows.append(row)
    runs = [r for t, r in done.items() if t.recipe in names]  # a shared runs folder holds other studies' too
    result = {"environment": environment(), "machine": machine(), "sizing": sizing.describe(), "threads": 1,
              "workers": args.workers,
              "protocol": {"kinds": ["cosine", "wsd"], "search_seed": 1, "final_seeds": list(FINAL_SEEDS),
                           "lr_ladder": list(LR_LADDER), "comparison": f"paired by seed, {100 * CONFIDENCE:.0f}% "
                           f"Student t interval on the mean difference; a verdict only beyond zero and the noise "
                           f"floor"},
              "recipes": {r: {"label": RECIPES[r].label, "source": RECIPES[r].source} for r in names},
              "search": search_table(best, done), "noise_floor": noise, "bit_reproducible": reproducible,
              "rows": rows, "runs": runs, "wall_s": time.perf_counter() - started,
              # runs recorded by an earlier invocation (a study continued) are not in wall_s; every
              # run's own seconds are in run_seconds (2 at a time: about twice the wall time)
              "runs_reused": reused, "run_seconds": sum(r["wall_s"] for r in runs)}
    folder = results_folder(args.out)
    path = folder / f"{result_name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    try:
        png = plot_runs([done[finals[r][0]]["run_dir"] for r in names], folder / f"{result_name}.png",
                        labels=[f"{RECIPES[r].label} ({chosen[r].kind}, lr {chosen[r].lr:g})" for r in names],
                        title=f"{title}: every arm at its best schedule and LR, seed {FINAL_SEEDS[0]} (CPU)",
                        annotate_speedup=False)
    except StackfastError as e:  # matplotlib missing: the JSON stands alone
        png = f"none ({e})"
    print(markdown_table(rows, ["label", "schedule", "lr", "seeds", "final_val_loss", "std", "vs_scratch",
                                "verdict_vs_scratch", "vs_small", "verdict_vs_small", "vs_stack_paper",
                                "verdict_vs_stack_paper", "speedup_pct", "speedup_interval_pct",
                                "speedup_half_range_pct"]))
    print(f"noise floor (1 vs 2 threads, same seeds): {noise:.4f}; bit-reproducible at 1 thread: {reproducible}")
    print(f"results: {path}, plot: {png}; {result['wall_s'] / 60:.0f} minutes")
    return result


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

    def trial(recipe: str, seed: int) -> Trial:  # at the CPU study's best schedule and LR, scaled
        kind, lr = sizing.settings[recipe]
        return Trial(recipe, kind, lr, seed, sizing.flops)
    # one run at a time on the one device; the runs folder is the study's own (replaced)
    done = run_many([trial(r, s) for s in range(1, seeds + 1) for r in REQUIRED], sizing, runs_dir, device, 1)
    skipped = []
    for name in OPTIONAL:
        longest = max(r["wall_s"] for r in done.values())
        if time.perf_counter() + longest > deadline - MARGIN_S:
            skipped.append(name)
            continue
        done = run_many([trial(name, 1)], sizing, runs_dir, device, 1, done)
    runs = list(done.values())
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
    parser.add_argument("--recipes", nargs="*", metavar="RECIPE", choices=RECIPES,
                        help="CPU: the recipe study instead of the operators' (no names: " + ", ".join(GROWTH_RECIPES)
                             + "; results in recipe_study-cpu.json)")
    parser.add_argument("--workers", type=int, default=2, help="CPU: runs at a time, 1 thread each (default 2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs-dir", default="runs/growth-study",
                        help="where the runs go (a CPU study continues the runs recorded there)")
    parser.add_argument("--out", default=None, help=f"results folder (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    if args.rehearse and not args.gpu:
        parser.error("--rehearse goes with --gpu")
    if args.gpu and not args.rehearse and resolve_device(args.device).type != "cuda":
        parser.error("--gpu: no CUDA device here; --gpu --rehearse runs the same path at tiny size")
    if args.minutes is not None and not 0 < args.minutes < 60:
        parser.error(f"--minutes must be in (0, 60), got {args.minutes}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.gpu:
        return gpu_study(args)
    if args.recipes is not None:
        return protocol_study(args, args.recipes or list(GROWTH_RECIPES), "recipe_study-cpu", "recipe study")
    # the operators compared by their losses at B (the recipe study measures the speedups)
    return protocol_study(args, list(OPERATOR_RECIPES), "growth_study-cpu", "growth study", speedups=False)


if __name__ == "__main__":
    main()
