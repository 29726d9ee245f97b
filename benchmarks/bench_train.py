"""Training-step throughput: stackfast against Hugging Face LlamaForCausalLM, same run.

Both models get the identical config and initial weights, the same batches and the same
optimizer (AdamW, fused on CUDA; fp32 master weights, bf16 autocast on GPU, fp32 on CPU).
One timed call is a full optimizer step: forward, backward, clipping, AdamW.

    python benchmarks/bench_train.py                  # CPU: toy model, seq 256, batch 8
    python benchmarks/bench_train.py --preset tinyllama-1.1b --seq-len 2048 --batch 8   # GPU

Prints tokens/s, MFU (convention in stackfast.metrics.MFU_CONVENTION; null on CPU) and the
ratio stackfast / HF, and writes benchmarks/results/train-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.harness import main_device, markdown_table, measure, summarize, write_results  # noqa: E402
from stackfast.checkpoint import hf_llama_config, to_hf_state_dict  # noqa: E402
from stackfast.config import ModelConfig, OptimConfig  # noqa: E402
from stackfast.metrics import MFU_CONVENTION, peak_flops  # noqa: E402
from stackfast.model import Transformer  # noqa: E402
from stackfast.train import autocast_context, build_optimizer  # noqa: E402


def make_step(model: torch.nn.Module, loss_fn, batches, device: torch.device):
    """A closure running one optimizer step on the next batch (cycling through `batches`)."""
    optimizer = build_optimizer(model, OptimConfig(), device)
    autocast = autocast_context("auto", device)
    params = [p for p in model.parameters()]
    counter = iter(range(1 << 62))

    def step():
        x, y = batches[next(counter) % len(batches)]
        with autocast():
            loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def stackfast_loss(model, x, y):
    return model(x, y)


def hf_loss(model, x, y):
    # Same loss as stackfast: mean cross-entropy over all positions, logits upcast to fp32.
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="model preset (default: toy on CPU, tinyllama-1.1b on GPU)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default 5 on CPU, 20 on GPU)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--compile", action="store_true", help="also time stackfast with torch.compile")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)

    device = main_device(args.cpu)
    gpu = device.type == "cuda"
    preset = args.preset or ("tinyllama-1.1b" if gpu else "toy")
    seq_len = args.seq_len or (2048 if gpu else 256)
    reps = args.reps or (20 if gpu else 5)
    cfg = ModelConfig.from_preset(preset, kernels="auto", max_seq_len=max(seq_len, 2048))
    tokens_per_step = args.batch * seq_len
    peak = peak_flops(device)
    flops_per_step = cfg.flops_per_token(seq_len) * tokens_per_step
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, seq_len + 1), generator=generator)
        batches.append((tokens[:, :-1].to(device), tokens[:, 1:].to(device)))

    torch.manual_seed(0)
    ours = Transformer(cfg).to(device)
    candidates = [("stackfast", ours, stackfast_loss)]
    if args.compile:
        compiled = Transformer(cfg).to(device)
        compiled.load_state_dict(ours.state_dict())
        for block in compiled.layers:
            block.compile()
        candidates.append(("stackfast+compile", compiled, stackfast_loss))
    try:
        import transformers
        hf_cfg = transformers.LlamaConfig(**hf_llama_config(cfg), attn_implementation="sdpa")
        hf = transformers.LlamaForCausalLM(hf_cfg).to(device)
        hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)
        candidates.append(("hf-llama-sdpa", hf, hf_loss))
    except ImportError:
        print("transformers is not installed: no Hugging Face baseline (pip install 'stackfast[hf]')")

    # Interleaved rounds: every candidate is timed once per round, so a slow spell of a
    # shared machine hits all of them alike instead of whichever ran during it.
    steps = [make_step(model, loss_fn, batches, device) for _, model, loss_fn in candidates]
    for step in steps:
        measure(step, device=device, warmup=2, reps=1)
    samples: list[list[float]] = [[] for _ in candidates]
    peaks = [None] * len(candidates)
    for _ in range(reps):
        for i, step in enumerate(steps):
            timing = measure(step, device=device, warmup=0, reps=1)
            samples[i].append(timing["median_ms"])
            peaks[i] = max(peaks[i] or 0, timing["peak_mem_bytes"] or 0) or None
    rows = []
    for (name, _, _), times, peak_mem in zip(candidates, samples, peaks):
        timing = summarize(times)
        tokens_per_s = tokens_per_step / (timing["median_ms"] * 1e-3)
        rows.append({"name": name, "preset": preset, "seq_len": seq_len, "batch": args.batch,
                     "device": str(device), **timing, "peak_mem_bytes": peak_mem, "tokens_per_s": tokens_per_s,
                     "mfu": flops_per_step / (timing["median_ms"] * 1e-3) / peak if peak else None})
    baseline = next((r for r in rows if r["name"].startswith("hf")), None)
    for row in rows:
        row["ratio_vs_hf"] = row["tokens_per_s"] / baseline["tokens_per_s"] if baseline else None
        row["mfu_convention"] = MFU_CONVENTION
    path = write_results("train", rows, args.out)
    print(markdown_table(rows, ["name", "preset", "seq_len", "batch", "median_ms", "p20_ms", "p80_ms",
                                "tokens_per_s", "mfu", "ratio_vs_hf"]))
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
