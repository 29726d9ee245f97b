"""Benchmark replicate_ against a per-tensor copy_ loop and torch._foreach_copy_.

    python -m stackfast.bench.bench_replicate          # GPU when present, else CPU
    python -m stackfast.bench.bench_replicate --cpu    # scaled-down set on CPU (under a minute)
    python -m stackfast.bench.bench_replicate --cpu --threads 1   # CPU without OpenMP effects

Workload (docs/design.md target): G_stack with g = 4 on 4 layers of a 7B Llama (hidden 4096,
FFN 11008, 32 heads, 8 KV heads), fp32 weights plus the two Adam moments, so every tensor
gets g-1 = 3 copies. On CPU the widths are divided by 4.

Every method is reported against the same analytic count, the bytes of one read and g-1
writes of every source, as GB/s and as a fraction of the roofline: that count over the
copy bandwidth of one large `copy_` (read + write bytes) measured in the same run.
"""
from __future__ import annotations

import argparse

import torch

from stackfast.bench.harness import copy_bandwidth as harness_copy_bandwidth
from stackfast.bench.harness import gbps, main_device, markdown_table, measure, write_results
from stackfast.ops.replicate import extension_info, replicate_, replicate_ref

LAYERS = 4
ADAM_MOMENTS = 2


def layer_shapes(hidden: int, ffn: int, heads: int, kv_heads: int) -> list[tuple[int, ...]]:
    """Weight shapes of one Llama block: attention (GQA), SwiGLU MLP, two RMSNorms."""
    kv_dim = hidden // heads * kv_heads
    return [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden),  # wq wk wv wo
            (ffn, hidden), (ffn, hidden), (hidden, ffn),  # w1 w3 w2
            (hidden,), (hidden,)]  # attention_norm ffn_norm


def foreach_copy(sources, destinations):
    for copies in destinations:
        torch._foreach_copy_(copies, sources)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU even with a GPU")
    parser.add_argument("--g", type=int, default=4, help="growth factor (g-1 copies)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--scale", type=int, default=None,
                        help="divide the widths by this (default 1 on GPU, 4 on CPU)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = main_device(cpu=args.cpu)
    scale = args.scale or (1 if device.type == "cuda" else 4)
    shapes = layer_shapes(4096 // scale, 11008 // scale, 32, 8) * LAYERS * (1 + ADAM_MOMENTS)

    sources = [torch.randn(shape, device=device) for shape in shapes]
    destinations = [[torch.empty_like(s) for s in sources] for _ in range(args.g - 1)]
    source_bytes = sum(s.nbytes for s in sources)
    moved_bytes = args.g * source_bytes  # one read and g-1 writes of every source

    # Copy bandwidth on this device: one tensor as large as all sources together.
    copy_bandwidth, copy_time = harness_copy_bandwidth(device, source_bytes)
    roofline_ms = moved_bytes / (copy_bandwidth * 1e9) * 1e3

    replicate_(sources, destinations)
    assert all(torch.equal(d, s) for copies in destinations for d, s in zip(copies, sources))

    common = {"device": str(device), "g": args.g, "tensors": len(sources),
              "source_bytes": source_bytes, "moved_bytes": moved_bytes,
              "copy_bandwidth_gbps": copy_bandwidth, "roofline_ms": roofline_ms,
              "extension": extension_info()}
    rows = [{"method": "one large copy_ (bandwidth)", **common, **copy_time}]
    methods = {"copy_ loop": replicate_ref, "torch._foreach_copy_": foreach_copy,
               "replicate_": replicate_}
    for name, fn in methods.items():
        timing = measure(lambda fn=fn: fn(sources, destinations), device=device)
        rows.append({"method": name, **common, **timing,
                     "gbps": gbps(moved_bytes, timing["median_ms"]),
                     "roofline_fraction": roofline_ms / timing["median_ms"]})
    loop_ms = rows[1]["median_ms"]
    for row in rows[1:]:
        row["speedup_vs_copy_loop"] = loop_ms / row["median_ms"]

    path = write_results(f"replicate-threads{args.threads}" if args.threads else "replicate", rows, args.out)
    print(f"{len(sources)} tensors, {source_bytes / 1e9:.2f} GB of sources, g = {args.g}, "
          f"{device}; copy bandwidth {copy_bandwidth:.1f} GB/s, roofline {roofline_ms:.2f} ms")
    print(markdown_table(rows, ["method", "median_ms", "p20_ms", "p80_ms", "gbps",
                                "roofline_fraction", "speedup_vs_copy_loop"]))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
