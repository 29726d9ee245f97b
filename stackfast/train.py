"""The training loop; an entry point for `python stackfast/train.py`, `python -m stackfast.train`,
`stackfast train` (and torchrun).

One optimizer step: grad_accum_steps micro-batches forward/backward (bf16 autocast on
GPU, fp32 on CPU), global-norm clipping, AdamW (fused on CUDA) at the scheduled LR.
The host synchronises with the device only at logging, validation and checkpoint
steps: per-step losses stay on the device until a logging interval flushes them.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not its folder
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import contextlib
import math
import time

import torch

from stackfast.checkpoint import (latest_checkpoint, load_into_model, load_optimizer_state, load_rng,
                                  load_state, load_weights, save_checkpoint, set_rng_state)
from stackfast.config import Config, ConfigError, StackfastError, load_config
from stackfast.data import TokenLoader, open_data
from stackfast.growth import RAMPS, GrowthError, apply_growth, growth_timing
from stackfast.growth.guidelines import small_model
from stackfast.metrics import MFU_CONVENTION, MetricsLog, Progress, Throughput, peak_flops
from stackfast.model import Transformer
from stackfast.parallel import apply_block_options, strip_block_options


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} asked for, but CUDA is not available")
    return device


def autocast_context(dtype_name: str, device: torch.device):
    """bf16 autocast on GPU by default; fp32 (no autocast) on CPU or when asked."""
    use_bf16 = dtype_name == "bf16" or (dtype_name == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def lr_at(step: int, total_steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine to peak * min_ratio at total_steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights are 1-D and not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type == "cuda")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: TokenLoader, n_batches: int, device: torch.device,
             autocast) -> float:
    """Mean cross-entropy over the fixed validation batches."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for x, y in loader.val_batches(n_batches):
        with autocast():
            loss = model(x.to(device), y.to(device))
        total += loss * y.numel()
        count += y.numel()
    model.train(was_training)
    return total.item() / count  # host sync: validation result


def find_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from: '' none, 'auto' the newest in the run dir, or a folder."""
    resume = cfg.checkpoint.resume
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(Path(cfg.logging.run_dir) / "checkpoints")
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"checkpoint.resume: {resume} is not a checkpoint folder")
    return path


def growth_step(cfg: Config, total_steps: int) -> int | None:
    """Optimizer steps of the small model before growth (None: the run does not grow)."""
    g = cfg.growth
    if g.operator == "none":
        return None
    tokens_per_step = cfg.tokens_per_step()
    if g.at_tokens == "auto":
        target = cfg.model.num_params()
        d = growth_timing(target, 6.0 * target * total_steps * tokens_per_step)
    else:
        d = g.at_tokens
    step = math.ceil(d / tokens_per_step)
    if step >= total_steps:
        raise ConfigError(f"growth.at_tokens: growing after {d:.4g} tokens leaves nothing of the run's "
                          f"{total_steps * tokens_per_step} tokens for the grown model"
                          + (" (the paper's formula is fitted at 410M-3B scale; set a token count)"
                             if g.at_tokens == "auto" else ""))
    return step


def scheduled_lr(cfg: Config, step: int, total_steps: int, grow_at: int | None) -> float:
    """The LR at `step`. With growth and schedule='restart', the small model gets its own
    complete warmup + cosine over its phase and the grown model a fresh one over the rest
    (the paper's reference code); 'continue' runs one schedule over the whole job."""
    s = cfg.schedule
    if grow_at is None:
        return lr_at(step, total_steps, cfg.optim.lr, s.warmup_steps, s.min_lr_ratio)
    small = step < grow_at
    peak = (cfg.growth.small_lr or cfg.optim.lr) if small else cfg.optim.lr
    if cfg.growth.schedule == "continue":
        return lr_at(step, total_steps, peak, s.warmup_steps, s.min_lr_ratio)
    if small:
        return lr_at(step, grow_at, peak, s.warmup_steps, s.min_lr_ratio)
    return lr_at(step - grow_at, total_steps - grow_at, peak, s.warmup_steps, s.min_lr_ratio)


def growth_options(cfg: Config, batches) -> dict:
    """The [growth] fields that the configured operator takes."""
    g, seed = cfg.growth, cfg.train.seed
    return {
        "stack": dict(layers=g.layers, order=g.order, noise=g.noise, seed=seed),
        "depth_zero": {},
        "depth_random": dict(ramp_steps=g.ramp_steps, seed=seed),
        "depth_learn": dict(batches=batches, steps=g.learn_steps, seed=seed),
        "width_direct": dict(seed=seed),
        "width_zero": dict(seed=seed),
        "width_random": dict(ramp_steps=g.ramp_steps, seed=seed),
        "width_learn": dict(batches=batches, steps=g.learn_steps, seed=seed),
    }[g.operator]


def source_name(name: str, mapping: list[int]) -> str:
    """The small-model parameter that grown parameter `name` was copied from."""
    if not name.startswith("layers."):
        return name
    _, index, rest = name.split(".", 2)
    return f"layers.{mapping[int(index)]}.{rest}"


def replicate_optimizer_state(old_opt, old_model, new_opt, new_model, mapping: list[int]) -> None:
    """Give every grown parameter a copy of its source parameter's AdamW state (moments, step)."""
    old_state = {name: old_opt.state[p] for name, p in old_model.named_parameters() if p in old_opt.state}
    for name, p in new_model.named_parameters():
        source = old_state.get(source_name(name, mapping))
        if source is not None:
            new_opt.state[p] = {k: v.clone() for k, v in source.items()}


def shape_of(cfg) -> tuple:
    return (cfg.vocab_size, cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_size)


def run(cfg: Config) -> dict:
    """Train as configured (growing mid-run when [growth] says so); returns a summary."""
    cfg.validate()
    device = resolve_device(cfg.train.device)
    autocast = autocast_context(cfg.train.dtype, device)
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.train.seed)

    data = open_data(cfg.data, cfg.model.vocab_size)
    loader = TokenLoader(data, cfg.data.seq_len, cfg.train.micro_batch_size, seed=cfg.train.seed)
    total_steps = cfg.total_steps()
    tokens_per_step = cfg.tokens_per_step()
    grow_at = growth_step(cfg, total_steps)
    small_cfg = small_model(cfg.model, cfg.growth.operator, cfg.growth.factor) if grow_at is not None else None

    resume_from = find_resume(cfg)
    state = {"step": 0, "tokens": 0, "flops": 0.0, "grown": grow_at is None}
    if resume_from is not None:
        state.update(load_state(resume_from))
    model = Transformer(cfg.model if state["grown"] else small_cfg).to(device)
    ramp = None
    if resume_from is not None:
        load_into_model(model, load_weights(resume_from), resume_from)
        if state.get("growth_spec", {}).get("operator") in RAMPS:
            spec = state["growth_spec"]
            ramp = RAMPS[spec["operator"]](model, spec)
            ramp.set_step(state["step"] - grow_at)
    elif cfg.checkpoint.init_from:
        load_into_model(model, load_weights(cfg.checkpoint.init_from), cfg.checkpoint.init_from)
    apply_block_options(model, cfg.parallel)
    optimizer = build_optimizer(model, cfg.optim, device)
    log = MetricsLog(run_dir, cfg.logging.tensorboard)
    if resume_from is not None:
        optimizer.load_state_dict(load_optimizer_state(resume_from))
        set_rng_state(load_rng(resume_from))
        log.truncate_after(state["step"])
    (run_dir / "config.toml").write_text(cfg.to_toml())

    flops_per_token = model.config.flops_per_token(cfg.data.seq_len)
    throughput = Throughput(flops_per_token, peak_flops(device, cfg.train.peak_tflops))
    throughput.last_tokens = state["tokens"]
    progress = Progress(total_steps, cfg.logging.progress)
    progress.message(f"stackfast: {model.num_params() / 1e6:.1f}M parameters, {total_steps} steps of "
                     f"{tokens_per_step} tokens on {device}; logs in {run_dir}"
                     + (f"; grows ({cfg.growth.operator}, x{cfg.growth.factor}) after step {grow_at}"
                        if grow_at is not None and not state["grown"] else "")
                     + (f"; resumed from {resume_from}" if resume_from else ""))
    pending: list[tuple] = []  # per-step values still on the device, flushed at log steps
    last_loss = val_loss = None
    started = time.perf_counter()
    start_tokens = state["tokens"]
    model.train()

    while state["step"] < total_steps:
        step = state["step"]
        if not state["grown"] and step >= grow_at:
            if pending:
                last_loss = _flush(pending, log, throughput, progress)
            model, optimizer, ramp, row = grow_in_job(cfg, model, optimizer, loader, device, autocast, step)
            state.update(grown=True, growth_spec=row["spec"])
            log.write({"step": step, "tokens": state["tokens"], "flops": state["flops"], **row})
            progress.message(f"step {step}: grew {row['params_before'] / 1e6:.1f}M -> "
                             f"{row['params_after'] / 1e6:.1f}M parameters ({row['spec']['operator']}) in "
                             f"{row['growth_s']:.2f} s; probe loss {row['loss_before']:.4f} -> {row['loss_after']:.4f}")
            flops_per_token = model.config.flops_per_token(cfg.data.seq_len)
            throughput.flops_per_token = flops_per_token
        if ramp is not None:
            ramp.set_step(step - grow_at)
        lr = scheduled_lr(cfg, step, total_steps, grow_at)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.train.grad_accum_steps):
            x, y = loader.batch(step, micro)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                loss = model(x, y)
            (loss / cfg.train.grad_accum_steps).backward()
            loss_sum += loss.detach()
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                     if cfg.optim.grad_clip > 0 else None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += tokens_per_step
        state["flops"] += flops_per_token * tokens_per_step
        pending.append((dict(state), loss_sum / cfg.train.grad_accum_steps, lr, grad_norm))

        step = state["step"]
        done = step == total_steps
        if step % cfg.logging.log_every == 0 or done:
            last_loss = _flush(pending, log, throughput, progress)
        if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or done:
            val_loss = evaluate(model, loader, cfg.train.eval_batches, device, autocast)
            log.write({"step": step, "tokens": state["tokens"], "flops": state["flops"], "val_loss": val_loss})
            progress.message(f"step {step}: val_loss {val_loss:.4f}")
        if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or done:
            save_checkpoint(run_dir / "checkpoints", step, model, optimizer,
                            {**state, "data": {"seed": cfg.train.seed, "next_step": step}},
                            cfg, cfg.checkpoint.keep_last)

    progress.close()
    log.close()
    wall = time.perf_counter() - started
    tokens_per_s = (state["tokens"] - start_tokens) / wall if wall > 0 else 0.0
    return {"steps": state["step"], "tokens": state["tokens"], "flops": state["flops"],
            "loss": last_loss, "val_loss": val_loss, "wall_s": wall, "tokens_per_s": tokens_per_s,
            "params": model.num_params(), "device": str(device), "run_dir": str(run_dir),
            "growth_step": grow_at, "mfu_convention": MFU_CONVENTION}


def grow_in_job(cfg: Config, model: Transformer, optimizer, loader: TokenLoader, device: torch.device,
                autocast, step: int):
    """Grow the small model at `step`: new model, optimizer (fresh or with copied moments), ramp.

    Returns (model, optimizer, ramp, log row). The probe loss is one fixed held-out batch,
    before and after, to show the (small) jump that growth causes.
    """
    strip_block_options(model)
    loss_before = evaluate(model, loader, 1, device, autocast)
    started = time.perf_counter()

    def batches(k):  # LiGO's training data: the run's own stream, past the micro-steps in use
        x, y = loader.batch(step, cfg.train.grad_accum_steps + k)
        return x.to(device), y.to(device)

    growth = apply_growth(model, cfg.growth.operator, cfg.growth.factor, **growth_options(cfg, batches))
    grown = growth.model
    if shape_of(grown.config) != shape_of(cfg.model):
        raise GrowthError(f"growth produced shape {shape_of(grown.config)}, not the [model] target "
                          f"{shape_of(cfg.model)}")
    grown.config = cfg.model
    new_optimizer = build_optimizer(grown, cfg.optim, device)
    if cfg.growth.optimizer == "replicate":
        replicate_optimizer_state(optimizer, model, new_optimizer, grown, growth.spec["layer_map"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: time the growth itself
    growth_s = time.perf_counter() - started
    apply_block_options(grown, cfg.parallel)
    loss_after = evaluate(grown, loader, 1, device, autocast)
    row = {"event": "growth", "spec": growth.spec, "loss_before": loss_before, "loss_after": loss_after,
           "growth_s": growth_s, "params_before": model.num_params(), "params_after": grown.num_params()}
    grown.train()
    return grown, new_optimizer, growth.ramp, row


def _flush(pending: list, log: MetricsLog, throughput: Throughput, progress: Progress) -> float:
    """Write the pending steps' rows with one host sync; returns the last loss."""
    losses = torch.stack([p[1] for p in pending]).tolist()  # host sync: logging interval
    clipped = pending[0][3] is not None
    norms = torch.stack([p[3] for p in pending]).tolist() if clipped else [None] * len(pending)
    tokens_per_s, mfu = throughput.update(pending[-1][0]["tokens"])
    for (state, _, lr, _), loss, norm in zip(pending, losses, norms):
        log.write({"step": state["step"], "tokens": state["tokens"], "flops": state["flops"], "loss": loss,
                   "lr": lr, "grad_norm": norm, "tokens_per_s": tokens_per_s, "mfu": mfu})
    progress.update(pending[-1][0]["step"], losses[-1], tokens_per_s, mfu)
    pending.clear()
    return losses[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stackfast train", description="Train (and grow) a model.")
    parser.add_argument("--config", help="TOML config file (default: built-in toy settings)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--resume", help="'auto' or a checkpoint folder (same as --set checkpoint.resume=...)")
    args = parser.parse_args(argv)
    overrides = args.set + ([f'checkpoint.resume="{args.resume}"'] if args.resume else [])
    try:
        summary = run(load_config(args.config, overrides))
    except StackfastError as e:
        print(f"stackfast: error: {e}", file=sys.stderr)
        return 2
    print(f"done: {summary['steps']} steps, {summary['tokens']} tokens, loss {summary['loss']:.4f}, "
          f"val_loss {summary['val_loss']:.4f}, {summary['tokens_per_s']:.0f} tokens/s; "
          f"logs in {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
