"""Wall time of G_stack: the 7B target (32 layers) from its 8-layer small model, g = 4.

Times `stackfast.growth.apply_growth(small, "stack", 4)` (allocate the grown model, copy
every layer 4 times with replicate_), and the same plus the two AdamW moments of every
parameter as a job with growth.optimizer = "replicate" copies them
(`stackfast.growth.depth.copy_optimizer_state`, replicate_ again). One process, no collective calls; the target is < 1 s on GPU
(design.md). On CPU a scaled-down shape keeps it quick.

    python benchmarks/bench_growth.py            # GPU: 7b-small -> 7b; CPU: toy-small -> toy
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.harness import main_device, markdown_table, measure, write_results  # noqa: E402
from stackfast.config import ModelConfig  # noqa: E402
from stackfast.growth import apply_growth  # noqa: E402
from stackfast.growth.depth import copy_optimizer_state  # noqa: E402
from stackfast.model import Transformer  # noqa: E402


def grow_with_moments(small: Transformer, moments: dict[str, dict]) -> Transformer:
    """G_stack plus the AdamW state, as a running job with growth.optimizer = "replicate"
    does it: each grown parameter's moments are copies of its source's."""
    growth = apply_growth(small, "stack", 4)
    copy_optimizer_state(moments, growth.model, growth.spec["layer_map"])
    return growth.model


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
    rows = []
    for label, fn in (("G_stack weights", lambda: apply_growth(small, "stack", 4)),
                      ("G_stack weights + Adam moments", lambda: grow_with_moments(small, moments))):
        timing = measure(fn, device=device, warmup=1, reps=args.reps)
        rows.append({"what": label, "small": f"{name}-small", "target": name, "target_params": target.num_params(),
                     "device": str(device), **timing, "target_s": 1.0,
                     "meets_target": timing["median_ms"] < 1000 if device.type == "cuda" else None})
    grown = apply_growth(small, "stack", 4).model
    n = small.config.n_layers  # a check that the timed growth really copied: layer n+1 is layer 1
    assert torch.equal(grown.layers[n + 1].mlp.up_proj.weight, small.layers[1].mlp.up_proj.weight)
    path = write_results("growth_time", rows, args.out)
    print(markdown_table(rows, ["what", "small", "target", "median_ms", "p20_ms", "p80_ms", "meets_target"]))
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
