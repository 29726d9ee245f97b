"""Training-step throughput: stackfast against Hugging Face LlamaForCausalLM, same run.

All candidates get the identical config and initial weights, the same batches and the same
optimizer step, `stackfast.train.train_step` (the loop's own: forward, backward, global-norm
clipping, fused AdamW with the non-finite skip; fp32 master weights, bf16 autocast on GPU,
fp32 on CPU). One timed call is one full optimizer step.
Candidates: stackfast (kernels 'auto': Triton on GPU), stackfast + torch.compile (GPU, or
--compile), stackfast with kernels = 'torch' (GPU: SDPA and F.rms_norm instead of Triton,
to show what the Triton kernels add), HF with SDPA, HF + stackfast kernels (GPU: the same HF
model patched by stackfast.ops.apply_stackfast_kernels: RMSNorm, RoPE, attention, SwiGLU,
fused linear cross-entropy) and HF + Liger-Kernel (RMSNorm, RoPE, SwiGLU, fused linear
cross-entropy) when liger_kernel imports. The HF models compute their
own loss (`labels=`), so Liger's fused cross-entropy is in play.
stackfast+float8 (GPU of compute capability 8.9+, torchao installed; otherwise a row
`skipped` with the reason): train.float8 = 'tensorwise', the block linears in float8
(stackfast.float8.convert; float8 all-gather with --fsdp), compiled per block as torchao
recommends (its scaling and casts fuse only under torch.compile), so its ratio is to
stackfast+compile of the same run (`ratio_vs_stackfast+compile`).

    python -m stackfast.bench.bench_train                  # CPU: toy model, seq 256, batch 8
    python -m stackfast.bench.bench_train --preset tinyllama-1.1b --seq-len 2048 --batch 8   # GPU default
    python -m stackfast.bench.bench_train --preset 7b --batch 4 --activation-checkpointing --fsdp --only stackfast

--fsdp wraps stackfast as a one-process FSDP2 job (what each rank of `torchrun` runs: bf16
parameters gathered per block, fp32 gradient reduction, fp32 master shards). A candidate
whose weights, gradients and AdamW moments (16 bytes a parameter) cannot fit the GPU is
reported as skipped, one that runs out of memory or fails (its traceback printed) as such;
the others still run.

Prints tokens/s, MFU (convention in stackfast.metrics.MFU_CONVENTION; null on CPU), peak
memory and the ratio to HF (and to HF + Liger); writes benchmarks/results/<name>-<device>.json.
On CPU the candidates are timed in interleaved rounds (a shared machine's slow spells hit
all alike); on GPU one after another, each freed before the next is built (memory).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import os
import socket
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from stackfast import float8
from stackfast.bench.harness import main_device, markdown_table, measure, summarize, write_results
from stackfast.checkpoint import hf_llama_config, to_hf_state_dict
from stackfast.config import ConfigError, ModelConfig, OptimConfig, ParallelConfig
from stackfast.metrics import MFU_CONVENTION, peak_flops
from stackfast.model import Transformer
from stackfast.optim import build_optimizer
from stackfast.parallel import World, init_distributed, shutdown, wrap_model
from stackfast.train import autocast_context, model_loss, train_step

STATE_BYTES_PER_PARAM = 16  # fp32 weights, gradients and the two AdamW moments


def make_step(model: torch.nn.Module, loss_fn, batches, device: torch.device, world: World = World()):
    """A closure running one training step (train_step) on the next batch, cycling through `batches`."""
    optim = OptimConfig()
    optimizer = build_optimizer(model, optim)
    autocast = autocast_context("auto", device)
    counter = itertools.count()

    def step():
        train_step(model, optimizer, [batches[next(counter) % len(batches)]], autocast, optim.grad_clip, world,
                   loss_fn=loss_fn)
    return step


def hf_loss(model, x, y):
    # HF's own loss path (it shifts labels itself), which Liger replaces by its fused
    # linear cross-entropy: what a user of HF + Liger runs.
    return model(input_ids=x, labels=x).loss


def seeded_model(cfg: ModelConfig, device: torch.device) -> Transformer:
    """The same initial weights for every candidate: the seeded init, built on the device."""
    torch.manual_seed(0)
    with torch.device(device):
        return Transformer(cfg)


@contextlib.contextmanager
def one_process_world(device: torch.device):
    """(World, device) of a one-process torchrun job (FSDP on one rank), made in this process
    when it was not launched by torchrun; the process group and environment are undone after."""
    added = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:  # a free port for the one-member process group
            s.bind(("127.0.0.1", 0))
            added["MASTER_PORT"] = str(s.getsockname()[1])
    added = {k: v for k, v in added.items() if k not in os.environ}
    os.environ.update(added)
    try:
        world, device = init_distributed(device)
        try:
            yield world, device
        finally:
            shutdown(world)
    finally:
        for key in added:
            del os.environ[key]


def candidates(cfg: ModelConfig, device: torch.device, world: World, args, gpu: bool | None = None) -> list[tuple]:
    """(name, factory, loss_fn): a factory builds the model with the shared initial weights.
    gpu: include the GPU set (default: whether `device` is a GPU)."""
    ac = "full" if args.activation_checkpointing else "none"
    gpu = device.type == "cuda" if gpu is None else gpu

    def ours(compile_blocks: bool, kernels: str = cfg.kernels, float8_mode: str = "none"):
        def build():
            model = seeded_model(dataclasses.replace(cfg, kernels=kernels), device)
            # before compile and FSDP, as in training (train.py's shard)
            float8.convert(model, float8_mode, device, fsdp=world.distributed)
            return wrap_model(model, ParallelConfig(compile=compile_blocks, activation_checkpointing=ac), world,
                              bf16=gpu)
        return build

    out = [("stackfast", ours(False), model_loss)]
    if args.compile or gpu:
        out.append(("stackfast+compile", ours(True), model_loss))
    if gpu:  # on CPU 'auto' already means the PyTorch ops
        out.append(("stackfast(kernels=torch)", ours(False, "torch"), model_loss))
    # Compiled on a GPU (or with --compile); a CPU rehearsal of the GPU set (gpu=True on a CPU
    # device) builds it emulated and eager.
    extra = []
    skip = float8_skip_reason(device, gpu)
    if skip is None:
        extra.append(("stackfast+float8", ours(args.compile or device.type == "cuda", float8_mode="tensorwise"),
                      model_loss))
    else:
        print(f"stackfast+float8: {skip}")
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: no Hugging Face baseline (pip install 'stackfast[hf]')")
        return out + extra

    def hf(liger: bool, stackfast_kernels: bool = False):
        def build():
            if liger:  # patches transformers' Llama classes in this process: time it last
                from liger_kernel.transformers import apply_liger_kernel_to_llama
                apply_liger_kernel_to_llama()
            with torch.device(device):
                model = transformers.LlamaForCausalLM(
                    transformers.LlamaConfig(**hf_llama_config(cfg), attn_implementation="sdpa"))
            # strict: every weight must come from the shared init (the RoPE tables are buffers)
            model.load_state_dict(to_hf_state_dict(seeded_model(cfg, device).state_dict()))
            if stackfast_kernels:  # this instance only (Liger's class patch comes last)
                from stackfast.ops import apply_stackfast_kernels
                apply_stackfast_kernels(model)
            if args.activation_checkpointing:  # renamed in transformers 5
                enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
                enable()
            return model
        return build

    out.append(("hf-llama-sdpa", hf(False), hf_loss))
    if gpu:  # the kernels need a GPU (on CPU only the slow interpreter runs them)
        out.append(("hf-llama+stackfast", hf(False, stackfast_kernels=True), hf_loss))
    out += extra  # before Liger, whose patch of transformers' classes must come last
    try:
        import liger_kernel  # noqa: F401
        out.append(("hf-llama+liger", hf(True), hf_loss))
    except ImportError:
        print("liger_kernel is not installed: no HF + Liger baseline (benchmarks/NOTES.md: carrying it to a GPU)")
    return out


def float8_skip_reason(device: torch.device, gpu: bool) -> str | None:
    """Why the stackfast+float8 candidate is not timed here (None: it is): float8 matmuls
    need an sm_89+ GPU (a CPU would only emulate them) and torchao."""
    if not gpu:
        return "skipped: float8 training needs an sm_89+ GPU (on the CPU it is only emulated)"
    try:
        float8.check_float8("tensorwise", device)
    except ConfigError as error:
        return f"skipped: {error}"
    return None


def chosen(built: list[tuple], only: str | None) -> list[tuple]:
    """The candidates named in --only (all without it); an unknown name is an error."""
    if only is None:
        return built
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = [name for name, _, _ in built]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--only: unknown candidate {', '.join(unknown)}; here: {', '.join(known)}")
    return [c for c in built if c[0] in names]


def memory_problem(cfg: ModelConfig, device: torch.device) -> str | None:
    """Why the model's training state cannot fit the GPU, or None (a lower bound: activations come on top)."""
    if device.type != "cuda":
        return None
    need = STATE_BYTES_PER_PARAM * cfg.num_params()
    total = torch.cuda.get_device_properties(device).total_memory
    if need > 0.95 * total:
        return (f"skipped: weights, gradients and AdamW moments need {need / 2**30:.0f} GiB, "
                f"the GPU has {total / 2**30:.0f} GiB")
    return None


def time_candidates(cfg: ModelConfig, built: list[tuple], batches, device: torch.device, world: World,
                    reps: int, one_at_a_time: bool | None = None) -> list[tuple]:
    """(name, timing or None, note) per candidate.

    one_at_a_time (the default on GPU): each candidate built, timed and freed before the next
    (two 1.1B models with optimizer states and activations may not fit); one that cannot fit,
    runs out of memory or fails gets a note instead of a timing. Otherwise (CPU):
    interleaved rounds, all models alive, so a shared machine's slow spells hit all alike.
    """
    if one_at_a_time is None:
        one_at_a_time = device.type == "cuda"
    if not one_at_a_time:
        steps = [make_step(build(), loss_fn, batches, device, world) for _, build, loss_fn in built]
        for step in steps:
            measure(step, device=device, warmup=2, reps=1)
        times: list[list[float]] = [[] for _ in steps]
        for _ in range(reps):
            for i, step in enumerate(steps):
                times[i].append(measure(step, device=device, warmup=0, reps=1)["median_ms"])
        return [(name, {**summarize(t), "peak_mem_bytes": None}, None) for (name, _, _), t in zip(built, times)]
    results = []
    for name, build, loss_fn in built:
        note, timing = memory_problem(cfg, device), None
        if note is None:
            try:
                step = make_step(build(), loss_fn, batches, device, world)
                timing = measure(step, device=device, warmup=3, reps=reps)
            except torch.cuda.OutOfMemoryError as error:
                note = f"out of memory: {str(error).splitlines()[0]}"
            except Exception as error:  # one broken candidate (a baseline's version, say) must not end the suite
                traceback.print_exc()
                note = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            step = None  # frees the model, its gradients and optimizer state
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if note:
            print(f"{name}: {note}")
        results.append((name, timing, note))
    return results


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="model preset (default: toy on CPU, tinyllama-1.1b on GPU)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default 5 on CPU, 20 on GPU)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--compile", action="store_true", help="also time stackfast with torch.compile on CPU")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    parser.add_argument("--fsdp", action="store_true", help="stackfast as a one-process FSDP2 job (a torchrun rank)")
    parser.add_argument("--only", default=None, help="comma-separated candidate names to time (default: all)")
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
    with contextlib.ExitStack() as stack:
        world = World()
        if args.fsdp:
            world, device = stack.enter_context(one_process_world(device))
        try:
            built = chosen(candidates(cfg, device, world, args), args.only)
        except ValueError as error:
            parser.error(str(error))
        results = time_candidates(cfg, built, batches, device, world, reps)
        skip = float8_skip_reason(device, gpu)
        if skip is not None and args.only is None:
            results.append(("stackfast+float8", None, skip))
    rows = []
    for name, timing, note in results:
        row = {"name": name, "preset": preset, "seq_len": seq_len, "batch": args.batch, "device": str(device),
               "fsdp": args.fsdp and name.startswith("stackfast"),
               "activation_checkpointing": args.activation_checkpointing}
        if timing is None:
            rows.append({**row, "skipped": note})
            continue
        seconds = timing["median_ms"] * 1e-3
        rows.append({**row, **timing, "tokens_per_s": tokens_per_step / seconds,
                     "mfu": flops_per_step / seconds / peak if peak else None, "mfu_convention": MFU_CONVENTION})
    timed = {r["name"]: r for r in rows if "tokens_per_s" in r}
    for row in timed.values():
        for base in ("hf-llama-sdpa", "hf-llama+liger"):
            if base in timed:
                row[f"ratio_vs_{base}"] = row["tokens_per_s"] / timed[base]["tokens_per_s"]
    if "stackfast+float8" in timed:  # float8 against the same compiled model in bf16, same run
        base = "stackfast+compile" if "stackfast+compile" in timed else "stackfast"
        timed["stackfast+float8"][f"ratio_vs_{base}"] = (timed["stackfast+float8"]["tokens_per_s"]
                                                         / timed[base]["tokens_per_s"])
    path = write_results(args.name, rows, args.out)
    print(markdown_table(rows, ["name", "preset", "seq_len", "batch", "median_ms", "p20_ms", "p80_ms",
                                "tokens_per_s", "mfu", "peak_mem_bytes", "ratio_vs_hf-llama-sdpa",
                                "ratio_vs_hf-llama+liger", "ratio_vs_stackfast+compile", "skipped"]))
    print(f"results: {path}")
    return rows


if __name__ == "__main__":
    main()
