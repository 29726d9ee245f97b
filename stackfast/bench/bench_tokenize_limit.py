"""`stackfast tokenize` against its limit: the tokenizer's own batch encode writing the same ids.

The limit is what a script of a dozen lines does with the same tokenizer: read the .jsonl a
line at a time, `tokenizers.Tokenizer.encode_batch` BATCH_DOCUMENTS documents at a time,
append the end-of-text id to each, write the ids to one .bin with numpy. `stackfast
tokenize --workers 1` does that plus its checks, shards and validation split; its output
(train then val shards) must be the limit's bytes exactly, which is checked. Each side runs
in a fresh process of its own, in turn, `--reps` times: wall time is the process's (its
interpreter and imports included), CPU time its user + system seconds (steadier than wall
time on a shared machine), peak memory its maximum resident set (VmHWM). The ratios are of
medians, ours over the limit: 1.0 is the limit, the goal is <= 1.1 for wall time and memory.
A second limit, `limit-fast`, calls encode_batch_fast (tokenizers >= 0.21: no character
offsets), as stackfast does where it can: against it the comparison is like for like.

    python -m stackfast.bench.bench_tokenize_limit            # 20 MB of .jsonl, the figures
    python -m stackfast.bench.bench_tokenize_limit --mb 1     # a check that it runs

The corpus and tokenizer are bench_tokenize's: the standard library's .py files as .jsonl,
a byte-level BPE of 32000 tokens trained on them.
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def limit(corpus: Path, tokenizer: Path, out: Path, batch_documents: int, encode: str = "encode_batch") -> None:
    """The baseline: the tokenizer's own batch encode, appending end-of-text, ids to one .bin."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer))
    tok.encode_special_tokens = True  # as tokenize: text is text
    eos = tok.token_to_id("<|endoftext|>")
    with open(corpus, "rb") as f, open(out, "wb") as o:
        batch: list[str] = []
        for line in [*f, None]:
            if line is not None:
                batch.append(json.loads(line)["text"])
            if batch and (line is None or len(batch) == batch_documents):
                ids = [i for e in getattr(tok, encode)(batch, add_special_tokens=False) for i in (*e.ids, eos)]
                np.array(ids, dtype=np.uint16).tofile(o)
                batch = []


def ours(corpus: Path, tokenizer: Path, out: Path, batch_documents: int) -> None:
    """stackfast tokenize --workers 1, into the folder `out` without its suffix."""
    from stackfast.data.pipeline import tokenize
    tokenize([corpus], str(tokenizer), out.with_suffix(""), workers=1, force=True)


def written_ids(side: str, out: Path) -> bytes:
    """The ids a side wrote: the limit's .bin, stackfast's train then val shards."""
    if side != "stackfast":
        return out.read_bytes()
    from stackfast.data.shards import TokenData
    data = TokenData(out.with_suffix(""))
    return b"".join(shard.tokens.tobytes() for shard in data.train + data.val)


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started its program. Linux's VmHWM, not
    getrusage's ru_maxrss, which keeps the peak of the forked parent (torch and all) across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")


# The first is the baseline. stackfast encodes with encode_batch_fast (no character offsets)
# where tokenizers has it: the limit with it too is the strictest comparison.
SIDES = {"limit": limit, "limit-fast": functools.partial(limit, encode="encode_batch_fast"), "stackfast": ours}


def run_side(side: str, corpus: Path, tokenizer: Path, out: Path) -> dict:
    """One side in a fresh process: its wall seconds, CPU seconds and peak resident memory."""
    from stackfast.data.pipeline import BATCH_DOCUMENTS  # here, not in the children: the limit imports no stackfast
    command = [sys.executable, "-m", "stackfast.bench.bench_tokenize_limit",
               "--side", side, str(corpus), str(tokenizer), str(out), str(BATCH_DOCUMENTS)]
    cpu = _children_cpu_s()
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    cpu = _children_cpu_s() - cpu
    if done.returncode != 0:
        raise RuntimeError(f"{side} failed: {done.stderr[-2000:]}")
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": json.loads(done.stdout.splitlines()[-1])["peak_rss_mb"]}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # of the children waited for: sums, unlike ru_maxrss
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20.0, help="megabytes of text in the corpus (default 20)")
    parser.add_argument("--vocab", type=int, default=32000, help="the BPE's vocabulary size (default 32000)")
    parser.add_argument("--reps", type=int, default=3, help="runs of each side, in turn (default 3)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--side", nargs=5, metavar=("SIDE", "CORPUS", "TOKENIZER", "OUT", "BATCH"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:  # a child: one side, then its peak memory
        side, corpus, tokenizer, out, batch = args.side
        SIDES[side](Path(corpus), Path(tokenizer), Path(out), int(batch))
        print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
        return []
    from stackfast.bench.bench_tokenize import TRAIN_MB, build_corpus
    from stackfast.bench.harness import markdown_table, results_folder, write_results
    from stackfast.data import train_bpe
    results_folder(args.out)
    with tempfile.TemporaryDirectory(prefix="stackfast-bench-tokenize-limit-") as tmp:
        tmp = Path(tmp)
        corpus = build_corpus(tmp / "corpus.jsonl", args.mb)
        with open(tmp / "corpus.jsonl", encoding="utf-8") as f:
            sample = [json.loads(line)["text"] for line in f]
        sample = sample[:max(1, int(len(sample) * min(1.0, TRAIN_MB / corpus["text_mb"])))]  # as bench_tokenize
        train_bpe(sample, args.vocab, tmp / "tokenizer.json")
        del sample
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for _ in range(args.reps):
            for side in SIDES:
                runs[side].append(run_side(side, tmp / "corpus.jsonl", tmp / "tokenizer.json", tmp / f"{side}.bin"))
        same = len({written_ids(side, tmp / f"{side}.bin") for side in SIDES}) == 1
        tokens = (tmp / "limit.bin").stat().st_size // 2
    rows = []
    for side, measured in runs.items():
        seconds = statistics.median(r["seconds"] for r in measured)
        cpu = statistics.median(r["cpu_s"] for r in measured)
        peak = statistics.median(r["peak_rss_mb"] for r in measured)
        rows.append({"what": side, "corpus": corpus["what"], "text_mb": corpus["text_mb"],
                     "file_mb": corpus["file_mb"], "documents": corpus["documents"], "tokens": tokens,
                     "vocab": args.vocab, "reps": args.reps, "median_s": seconds, "cpu_s": cpu, "peak_rss_mb": peak,
                     "all_s": [r["seconds"] for r in measured], "all_cpu_s": [r["cpu_s"] for r in measured],
                     "all_peak_rss_mb": [r["peak_rss_mb"] for r in measured]})
    for row in rows:
        row["wall_ratio"] = row["median_s"] / rows[0]["median_s"]
        row["memory_ratio"] = row["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        row["cpu_ratio"] = row["cpu_s"] / rows[0]["cpu_s"]
        row["wall_ratio_vs_fast"] = row["median_s"] / rows[1]["median_s"]
        row["memory_ratio_vs_fast"] = row["peak_rss_mb"] / rows[1]["peak_rss_mb"]
        row["same_ids"] = same
    path = write_results("tokenize-limit", rows, args.out)
    print(markdown_table(rows, ["what", "text_mb", "tokens", "median_s", "cpu_s", "peak_rss_mb", "wall_ratio",
                                "cpu_ratio", "memory_ratio", "wall_ratio_vs_fast", "memory_ratio_vs_fast", "same_ids"]))
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
