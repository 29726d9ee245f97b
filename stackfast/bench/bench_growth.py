"""Wall time of G_stack: the 7B target (32 layers) from its 8-layer small model, g = 4.

Times `stackfast.growth.apply_growth(small, "stack", 4, in_place=True)` as the training loop
runs it in one process: the small model's modules become the grown model's first copies,
the 24 further layers are allocated and written with replicate_. Then the same plus the
two AdamW moments of every parameter, as a job with growth.optimizer = "replicate" copies
them (`stackfast.growth.depth.copy_optimizer_state`, replicate_ again). One process, no
collective calls; the target is < 1 s on GPU (docs/design.md). fp32 weights and moments: the
7B target with moments needs 12 bytes a parameter (71 GB); a case that does not fit the
GPU's free memory is reported as skipped. On CPU a scaled-down shape keeps it quick.

    python -m stackfast.bench.bench_growth            # GPU: 7b-small -> 7b; CPU: toy-small -> toy
"""
from __future__ import annotations

import argparse


import torch

from stackfast.bench.harness import main_device, markdown_table, measure, write_results
from stackfast.config import ModelConfig
from stackfast.growth import apply_growth
from stackfast.growth.depth import copy_optimizer_state
from stackfast.model import Transformer

FACTOR = 4


def grow_weights(small: Transformer) -> Transformer:
    return apply_growth(small, "stack", FACTOR, in_place=True).model


def grow_with_moments(small: Transformer, moments: dict[str, dict]) -> tuple[Transformer, dict]:
    """G_stack plus the AdamW state, as a running job with growth.optimizer = "replicate"
    does it: each grown parameter's moments are copies of its source's."""
    growth = apply_growth(small, "stack", FACTOR, in_place=True)
    return growth.model, copy_optimizer_state(moments, growth.model, growth.spec["layer_map"], small)


def check_copies(small: Transformer, moments: dict[str, dict]) -> None:
    """The timed growth really copies: layer n + 1 equals layer 1, weights and moments."""
    grown, state = grow_with_moments(small, moments)
    n = small.config.n_layers
    copy, source = grown.layers[n + 1].mlp.up_proj.weight, small.layers[1].mlp.up_proj.weight
    assert grown.layers[1] is small.layers[1] and copy is not source and torch.equal(copy, source)
    assert torch.equal(state[copy]["exp_avg"], moments["layers.1.mlp.up_proj.weight"]["exp_avg"])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = main_device(args.cpu)
    name = "7b" if device.type == "cuda" else "toy"
    target = ModelConfig.from_preset(name, kernels="torch")
    with torch.device(device):
        small = Transformer(ModelConfig.from_preset(f"{name}-small", kernels="torch"))
        moments = {n: {"step": torch.tensor(100.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
                   for n, p in small.named_parameters()}
    added = target.num_params() - small.num_params()  # parameters that growth allocates
    rows = []
    for label, fn, new_bytes in (("G_stack weights", lambda: grow_weights(small), 4 * added),
                                 ("G_stack weights + Adam moments", lambda: grow_with_moments(small, moments),
                                  12 * added)):
        row = {"what": label, "small": f"{name}-small", "target": name, "target_params": target.num_params(),
               "device": str(device), "bytes_written": new_bytes, "target_s": 1.0}
        free = None
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous row's freed blocks count as free
            free = torch.cuda.mem_get_info(device)[0]
        if free is not None and new_bytes > 0.95 * free:
            row["skipped"] = f"needs {new_bytes / 2**30:.1f} GiB more, {free / 2**30:.1f} GiB free"
            print(f"{label}: skipped, {row['skipped']}")
        else:
            timing = measure(fn, device=device, warmup=1, reps=args.reps)
            row.update(timing, meets_target=timing["median_ms"] < 1000 if device.type == "cuda" else None)
        rows.append(row)
    if "skipped" not in rows[-1]:
        check_copies(small, moments)
    path = write_results("growth_time", rows, args.out)
    print(markdown_table(rows, ["what", "small", "target", "median_ms", "p20_ms", "p80_ms", "meets_target", "skipped"]))
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
