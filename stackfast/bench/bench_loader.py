"""Data-loader throughput: tokens/s that TokenLoader.batch delivers from memory-mapped shards.

The loader must outrun the GPU: at 60k tokens/s of training (1.1B on one H100/H200) a
loader at 10M tokens/s costs well under 1% of a step. Baseline in the same run: a plain
copy of the same number of contiguous tokens out of the memory map (the floor any loader
pays).

    python -m stackfast.bench.bench_loader
"""
from __future__ import annotations

import argparse


import numpy as np
import torch

from stackfast.bench.harness import markdown_table, measure, write_results
from stackfast.data import TokenData, TokenLoader, builtin_dataset


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    data = TokenData(builtin_dataset())
    loader = TokenLoader(data, args.seq_len, args.batch, seed=0)
    tokens = args.batch * (args.seq_len + 1)
    shard = data.train[0].tokens
    counter = iter(range(1 << 62))
    rows = []
    for name, fn in (("TokenLoader.batch", lambda: loader.batch(next(counter))),
                     ("contiguous copy (floor)", lambda: torch.from_numpy(np.asarray(shard[:tokens], np.int64)))):
        timing = measure(fn, warmup=3, reps=args.reps)
        rows.append({"what": name, "seq_len": args.seq_len, "batch": args.batch, **timing,
                     "tokens_per_s": tokens / (timing["median_ms"] * 1e-3)})
    rows[0]["ratio_vs_floor"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    path = write_results("loader", rows, args.out)
    print(markdown_table(rows, ["what", "seq_len", "batch", "median_ms", "p20_ms", "p80_ms", "tokens_per_s",
                                "ratio_vs_floor"]))
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
