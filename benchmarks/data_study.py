"""Data study: epoch sampling and document masking (issue 28).

The question: at the demo's target shape, does reading every window once per epoch
(data.sampling = "epoch") train better than drawing windows with replacement ("random"),
and does keeping attention within documents (data.document_mask) train better than
attending across them? Under the protocol of stackfast/recipes.py (docs/method.md): the
arms (recipes.DATA_RECIPES, scratch runs differing only in their data settings) go
through the same search over peak LR (the schedule kinds of --kinds) at --budget on the
search seed, then each at its best setting on fresh seeds (recipes.FINAL_SEEDS), compared
paired by seed: epoch vs random, document mask vs none (and RoPE reset vs none, when that
arm runs).

The corpus is the built-in BPE one (builtin:python-stdlib, vocab 4096): the byte corpus
has no end-of-text token, so it has no documents to mask. Its training split is cut to the
tokens that --budget reads in --epochs epochs (0: the whole corpus), so that epoch and
random sampling differ in what they cover and not only in drawing without or with
replacement; the validation split is the corpus's own. Runs continue where they stopped
(the runs folder records every finished run, one folder per corpus slice).

    python benchmarks/data_study.py
    python benchmarks/data_study.py --budget 1e11 --seeds 2   # a quick look
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stackfast.bench.harness import RESULTS_DIR, environment  # noqa: E402
from stackfast.data import BUILTIN_VOCAB, builtin_dataset  # noqa: E402
from stackfast.demo import CPU_SIZING, NOISE_FLOOR, target_model  # noqa: E402
from stackfast.recipes import (DATA_RECIPES, FINAL_SEEDS, KINDS, RECIPES, chosen_settings, load_records,  # noqa: E402
                               losses_by_seed, machine, paired, paired_line, run_many, search_table, stats, tune)

ARMS = ("scratch_random", "scratch_epoch", "scratch_docmask")
# Each comparison changes one thing: (arm, the arm it is compared against).
COMPARISONS = (("scratch_epoch", "scratch_random"), ("scratch_docmask", "scratch_epoch"),
               ("scratch_rope_reset", "scratch_docmask"))


def corpus_slice(source: Path, tokens: int, out: Path) -> Path:
    """A dataset folder holding the first `tokens` training tokens of `source` (one shard),
    its tokenizer and its whole validation split."""
    index = json.loads((source / "index.json").read_text())
    dtype = np.dtype(index["dtype"])
    train = np.concatenate([np.fromfile(source / s["file"], dtype=dtype) for s in index["train"]])[:tokens]
    out.mkdir(parents=True, exist_ok=True)
    train.tofile(out / "train_00000.bin")
    for item in [s["file"] for s in index["val"]] + [index["tokenizer"]["file"]]:
        shutil.copyfile(source / item, out / item)
    index["train"] = [{"file": "train_00000.bin", "tokens": int(train.size)}]
    index["total_tokens"] = int(train.size) + sum(s["tokens"] for s in index["val"])
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return out


def coverage(folder: Path, sizing, steps: int) -> dict:
    """What a run of `steps` steps reads of the training split in `folder`: epochs (rows over
    windows), the share of windows random sampling is expected to visit at least once, and the
    share of windows that hold an end-of-text token (only those rows have documents to mask)."""
    index = json.loads((folder / "index.json").read_text())
    train = np.concatenate([np.fromfile(folder / s["file"], dtype=index["dtype"]) for s in index["train"]])
    windows = (train.size - 1) // sizing.seq_len
    rows = steps * sizing.batch
    eos = train[:windows * sizing.seq_len].reshape(windows, sizing.seq_len) == index["tokenizer"]["eos_id"]
    return {"train_tokens": int(train.size), "windows": int(windows), "rows_read": rows, "epochs": rows / windows,
            "random_expected_coverage": 1 - (1 - 1 / windows) ** rows,
            "windows_with_a_document_boundary": float(eos.any(axis=1).mean())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=5e11, help="FLOPs of a run (default 5e11: what 2 loaded "
                        "cores run for the whole study in about half an hour)")
    parser.add_argument("--epochs", type=float, default=1.0, help="cut the training split to what --budget reads "
                        "in this many epochs (default 1; 0: the whole corpus)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(DATA_RECIPES)}")
    parser.add_argument("--kinds", default="wsd", help=f"schedule kinds the search tries (of {', '.join(KINDS)})")
    parser.add_argument("--seeds", type=int, default=len(FINAL_SEEDS), help="final seeds per arm (the first N "
                        "of recipes.FINAL_SEEDS)")
    parser.add_argument("--noise-run", action=argparse.BooleanOptionalAction, default=True,
                        help="rerun one final run at 2 threads: this corpus's thread-count noise floor")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, 1 thread each")
    parser.add_argument("--runs-dir", default="runs/data-study")
    parser.add_argument("--out", default=str(RESULTS_DIR / "data_study-cpu.json"))
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if args.budget <= 0 or args.epochs < 0 or args.workers < 1:
        parser.error("--budget must be positive, --epochs at least 0, --workers at least 1")
    if not arms or any(a not in DATA_RECIPES for a in arms) or len(set(arms)) < len(arms):
        parser.error(f"--arms {args.arms!r}: distinct names of {', '.join(DATA_RECIPES)}")
    if not kinds or any(k not in KINDS for k in kinds):
        parser.error(f"--kinds {args.kinds!r}: of {', '.join(KINDS)}")
    if not 1 <= args.seeds <= len(FINAL_SEEDS):
        parser.error(f"--seeds {args.seeds}: from 1 to {len(FINAL_SEEDS)}")

    target = target_model(CPU_SIZING.target.hidden_size, vocab_size=BUILTIN_VOCAB)
    sizing = dataclasses.replace(CPU_SIZING, target=target, flops=args.budget)
    steps = sizing.steps(target, args.budget)
    source = builtin_dataset()  # built once here, not by two workers at the same time
    runs_root = Path(args.runs_dir)
    if args.epochs:  # one window per row and epoch: the windows of `epochs` epochs, and the token they share
        tokens = round(steps * sizing.batch / args.epochs) * sizing.seq_len + 1
        data = corpus_slice(source, tokens, runs_root / f"corpus-{tokens}")
        runs_dir = runs_root / f"slice-{tokens}"
    else:
        data, runs_dir = source, runs_root / "whole"
    sizing = dataclasses.replace(sizing, data=str(data))

    best, done = tune(arms, sizing, runs_dir, "cpu", args.workers, load_records(runs_dir), kinds)
    chosen = chosen_settings(best, done)
    finals = {a: [dataclasses.replace(t, seed=s) for s in FINAL_SEEDS[:args.seeds]] for a, t in chosen.items()}
    done = run_many([t for ts in finals.values() for t in ts], sizing, runs_dir, "cpu", args.workers, done)
    noise = {"recipe_study": NOISE_FLOOR}
    if args.noise_run:  # the same run at 2 threads: the change float rounding alone makes on this corpus
        one = finals[arms[0]][0]
        twice = dataclasses.replace(one, threads=2)
        done = run_many([twice], sizing, runs_dir, "cpu", 1, done)
        noise["this_corpus"] = abs(done[twice]["val_loss"] - done[one]["val_loss"])
    floor = max(noise.values())
    by_seed = {a: losses_by_seed([done[t] for t in ts]) for a, ts in finals.items()}
    comparisons = {f"{a} vs {b}": paired(by_seed[a], by_seed[b], floor) for a, b in COMPARISONS
                   if a in by_seed and b in by_seed}
    study = {"environment": environment(), "machine": machine(), "target": dataclasses.asdict(target),
             "target_params": target.num_params(), "budget": args.budget, "steps": steps,
             "seq_len": sizing.seq_len, "batch": sizing.batch, "corpus": "builtin:python-stdlib",
             "slice_epochs": args.epochs, "reads": coverage(Path(data), sizing, steps),
             "arms": {a: {"label": RECIPES[a].label, "overrides": list(RECIPES[a].overrides)} for a in arms},
             "search_kinds": list(kinds), "search": search_table(best, done),
             "chosen": {a: {"schedule": t.kind, "lr": t.lr} for a, t in chosen.items()},
             "noise_floor": floor, "noise_floors": noise,
             "stats": {a: stats(list(s.values())) for a, s in by_seed.items()}, "final_losses": by_seed,
             "comparisons": comparisons, "runs": list(done.values())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(study, indent=1) + "\n")
    reads = study["reads"]
    print(f"{steps} steps read {reads['epochs']:.2f} epochs of {reads['train_tokens']} tokens (random sampling "
          f"visits {100 * reads['random_expected_coverage']:.0f}% of the windows); "
          f"{100 * reads['windows_with_a_document_boundary']:.1f}% of the windows cross a document boundary")
    for a, s in study["stats"].items():
        print(f"{a:<18} {chosen[a].kind} lr {chosen[a].lr:g}: {s['mean']:.4f} ± {s['std']:.4f}")
    for name, result in comparisons.items():
        print(paired_line(*name.split(" vs "), result))
    print(f"results: {out}")
    return study


if __name__ == "__main__":
    main()
