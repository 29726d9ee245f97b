"""`stackfast tokenize` throughput: tokens/s and MB/s of text at --workers 1 and --workers 2.

The tokenizer is a real byte-level BPE (`--vocab`, default 32000), trained here with the
`tokenizers` library on the Python standard library's source (as the built-in corpus's is,
data.train_bpe). The corpus is that source again, the .py files repeated until it holds
`--mb` megabytes, one JSON line per file (.jsonl: parsed by the reader as users' corpora
are). Baseline in the same run: --workers 1, where one process reads and encodes (a
Hugging Face tokenizer still spreads a batch over the cores); every run's output is
checked to be the same bytes as the baseline's.

    python -m stackfast.bench.bench_tokenize            # 100 MB, the figures (minutes)
    python -m stackfast.bench.bench_tokenize --mb 5     # a check that it runs
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from stackfast.bench.harness import markdown_table, measure, results_folder, write_results
from stackfast.data import available_cores, stdlib_files, tokenize, train_bpe

TRAIN_MB = 10  # the BPE learns from at most this much of the source (the whole of it adds little)


def build_corpus(path: Path, mb: float) -> dict:
    """Write the standard library's .py files to `path` as .jsonl, repeated up to `mb`
    megabytes of text; return a description of it."""
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()]
    source_bytes = sum(len(t.encode()) for t in texts)
    target, written, documents = int(mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            for text in texts:
                out.write(json.dumps({"text": text}) + "\n")
                written += len(text.encode())
                documents += 1
                if written >= target:
                    break
    return {"what": f"Python {sys.version_info.major}.{sys.version_info.minor} standard library .py files "
                    f"({len(texts)} files, {source_bytes / 1e6:.1f} MB) repeated, one JSON line per file",
            "text_mb": written / 1e6, "file_mb": path.stat().st_size / 1e6, "documents": documents}


def digest(folder: Path) -> str:
    """One hash of every file of a dataset folder (names and bytes)."""
    h = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        h.update(file.name.encode() + b"\0" + file.read_bytes())
    return h.hexdigest()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100.0, help="megabytes of text in the corpus (default 100)")
    parser.add_argument("--vocab", type=int, default=32000, help="the BPE's vocabulary size (default 32000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (first: baseline)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    results_folder(args.out)  # a bad --out fails before the corpus is built
    cores = available_cores()
    with tempfile.TemporaryDirectory(prefix="stackfast-bench-tokenize-") as tmp:
        tmp = Path(tmp)
        corpus = build_corpus(tmp / "corpus.jsonl", args.mb)
        with open(tmp / "corpus.jsonl", encoding="utf-8") as f:
            sample, size = [], 0
            for line in f:
                sample.append(json.loads(line)["text"])
                size += len(sample[-1])
                if size >= TRAIN_MB * 1e6:
                    break
        train_bpe(sample, args.vocab, tmp / "tokenizer.json")
        del sample
        rows = []
        for workers in args.workers:
            out = tmp / f"out-{workers}"
            run = functools.partial(tokenize, [tmp / "corpus.jsonl"], str(tmp / "tokenizer.json"), out,
                                    workers=workers, force=True)
            timing = measure(run, warmup=0, reps=args.reps)
            tokens = json.loads((out / "index.json").read_text())["total_tokens"]
            seconds = timing["median_ms"] * 1e-3
            rows.append({"what": f"tokenize --workers {workers}", "workers": workers, "cores": cores,
                         "vocab": args.vocab, "corpus": corpus["what"], "text_mb": corpus["text_mb"],
                         "documents": corpus["documents"], "tokens": tokens, **timing,
                         "tokens_per_s": tokens / seconds, "mb_per_s": corpus["text_mb"] / seconds,
                         "output": digest(out)})
    baseline = rows[0]["output"]
    for row in rows:
        row["ratio_vs_workers_1"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["same_output"] = row.pop("output") == baseline
    path = write_results("tokenize", rows, args.out)
    print(markdown_table(rows, ["what", "cores", "text_mb", "tokens", "median_ms", "tokens_per_s", "mb_per_s",
                                "ratio_vs_workers_1", "same_output"]))
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
