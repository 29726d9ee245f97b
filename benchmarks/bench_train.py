"""Training-step throughput: stackfast against Hugging Face LlamaForCausalLM, same run.

All candidates get the identical config and initial weights, the same batches and the same
optimizer (fused AdamW; fp32 master weights, bf16 autocast on GPU, fp32 on CPU).
One timed call is a full optimizer step: forward, backward, clipping, AdamW.
Candidates: stackfast (kernels 'auto': Triton on GPU), stackfast + torch.compile (GPU, or
--compile), HF with SDPA, and HF + Liger-Kernel (RMSNorm, RoPE, SwiGLU, fused linear
cross-entropy) when liger_kernel imports. The HF models compute their own loss
(`labels=`), so Liger's fused cross-entropy is in play.

    python benchmarks/bench_train.py                  # CPU: toy model, seq 256, batch 8
    python benchmarks/bench_train.py --preset tinyllama-1.1b --seq-len 2048 --batch 8   # GPU default
    python benchmarks/bench_train.py --preset 7b --batch 2 --activation-checkpointing --no-hf

Prints tokens/s, MFU (convention in stackfast.metrics.MFU_CONVENTION; null on CPU), peak
memory and the ratio to HF (and to HF + Liger); writes benchmarks/results/train-<device>.json.
On CPU the candidates are timed in interleaved rounds (a shared machine's slow spells hit
all alike); on GPU one after another, each freed before the next is built (memory).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.harness import main_device, markdown_table, measure, summarize, write_results  # noqa: E402
from stackfast.checkpoint import hf_llama_config, to_hf_state_dict  # noqa: E402
from stackfast.config import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from stackfast.metrics import MFU_CONVENTION, peak_flops  # noqa: E402
from stackfast.model import Transformer  # noqa: E402
from stackfast.parallel import apply_block_options  # noqa: E402
from stackfast.train import autocast_context, build_optimizer  # noqa: E402


def make_step(model: torch.nn.Module, loss_fn, batches, device: torch.device):
    """A closure running one optimizer step on the next batch (cycling through `batches`)."""
    optimizer = build_optimizer(model, OptimConfig())
    autocast = autocast_context("auto", device)
    params = list(model.parameters())
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
    # HF's own loss path (it shifts labels itself), which Liger replaces by its fused
    # linear cross-entropy: what a user of HF + Liger runs.
    return model(input_ids=x, labels=x).loss


def seeded_model(cfg: ModelConfig, device: torch.device) -> Transformer:
    """The same initial weights for every candidate: the seeded init, built on the device."""
    torch.manual_seed(0)
    with torch.device(device):
        return Transformer(cfg)


def candidates(cfg: ModelConfig, device: torch.device, args) -> list[tuple]:
    """(name, factory) pairs; a factory builds the model with the shared initial weights."""
    ac = "full" if args.activation_checkpointing else "none"

    def ours(compile_blocks: bool):
        def build():
            model = seeded_model(cfg, device)
            return apply_block_options(model, ParallelConfig(compile=compile_blocks, activation_checkpointing=ac))
        return build

    out = [("stackfast", ours(False))]
    if args.compile or device.type == "cuda":
        out.append(("stackfast+compile", ours(True)))
    if args.no_hf:
        return out
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: no Hugging Face baseline (pip install 'stackfast[hf]')")
        return out

    def hf(liger: bool):
        def build():
            if liger:  # patches transformers' Llama classes in this process: time it last
                from liger_kernel.transformers import apply_liger_kernel_to_llama
                apply_liger_kernel_to_llama()
            with torch.device(device):
                model = transformers.LlamaForCausalLM(
                    transformers.LlamaConfig(**hf_llama_config(cfg), attn_implementation="sdpa"))
            model.load_state_dict(to_hf_state_dict(seeded_model(cfg, device).state_dict()), strict=False)
            if args.activation_checkpointing:
                model.gradient_checkpointing_enable()
            return model
        return build

    out.append(("hf-llama-sdpa", hf(False)))
    try:
        import liger_kernel  # noqa: F401
        out.append(("hf-llama+liger", hf(True)))
    except ImportError:
        print("liger_kernel is not installed: no HF + Liger baseline")
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="model preset (default: toy on CPU, tinyllama-1.1b on GPU)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default 5 on CPU, 20 on GPU)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--compile", action="store_true", help="also time stackfast with torch.compile on CPU")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    parser.add_argument("--no-hf", action="store_true", help="time stackfast only (e.g. 7B: one model fits)")
    parser.add_argument("--name", default="train", help="results file name (default train)")
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
    built = candidates(cfg, device, args)

    def loss_fn(name):
        return stackfast_loss if name.startswith("stackfast") else hf_loss

    results = []
    if gpu:  # one at a time: two 1.1B models with optimizer states and activations may not fit
        for name, build in built:
            model = build()
            step = make_step(model, loss_fn(name), batches, device)
            results.append((name, measure(step, device=device, warmup=3, reps=reps)))
            del model, step
            gc.collect()
            torch.cuda.empty_cache()
    else:
        steps = [make_step(build(), loss_fn(name), batches, device) for name, build in built]
        for step in steps:
            measure(step, device=device, warmup=2, reps=1)
        times: list[list[float]] = [[] for _ in steps]
        for _ in range(reps):
            for i, step in enumerate(steps):
                times[i].append(measure(step, device=device, warmup=0, reps=1)["median_ms"])
        results = [(name, {**summarize(t), "peak_mem_bytes": None}) for (name, _), t in zip(built, times)]

    rows = []
    for name, timing in results:
        tokens_per_s = tokens_per_step / (timing["median_ms"] * 1e-3)
        rows.append({"name": name, "preset": preset, "seq_len": seq_len, "batch": args.batch, "device": str(device),
                     **timing, "tokens_per_s": tokens_per_s,
                     "mfu": flops_per_step / (timing["median_ms"] * 1e-3) / peak if peak else None,
                     "mfu_convention": MFU_CONVENTION})
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        for base in ("hf-llama-sdpa", "hf-llama+liger"):
            if base in by_name:
                row[f"ratio_vs_{base}"] = row["tokens_per_s"] / by_name[base]["tokens_per_s"]
    path = write_results(args.name, rows, args.out)
    print(markdown_table(rows, ["name", "preset", "seq_len", "batch", "median_ms", "p20_ms", "p80_ms",
                                "tokens_per_s", "mfu", "peak_mem_bytes", "ratio_vs_hf-llama-sdpa",
                                "ratio_vs_hf-llama+liger"]))
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
