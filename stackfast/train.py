"""The training loop; an entry point for `python stackfast/train.py`, `python -m stackfast.train`,
`stackfast train` and `torchrun [...] stackfast/train.py`.

One optimizer step: train.global_batch_size sequences, each process's share of them in
micro-batches of at most train.micro_batch_size (forward/backward with bf16 autocast on
GPU, fp32 on CPU, gradients accumulated), global-norm clipping, fused AdamW at the
scheduled LR. Under torchrun every process trains an FSDP2-sharded copy of the model on
its share of the global batch; rank 0 writes logs and metrics. The global batch, and so
the run, does not depend on the number of processes.

Host syncs: at logging, validation and checkpoint steps, and one per micro-batch in the
fused loss on CUDA (its target range check, waited on once the loss is queued, so the GPU
is never idle for it). Per-step losses, gradient norms and skip flags stay on the device
until such a step flushes them with one transfer; a non-finite step is skipped on the
device (fused AdamW's found_inf).

Faults: SIGTERM or SIGINT finishes the current step (several processes: the next
logging, validation or checkpoint step, where they agree), writes a checkpoint and
returns (exit status 0); a second signal stops at once without a checkpoint (a save in
progress is abandoned and its temporary folder removed; one line, exit status 128 + the
signal); a failed write (a full disk, a read-only run folder) is one line, exit status 2,
the previous checkpoint intact; a step with a non-finite loss or gradient norm is skipped
(no update) and logged, and train.max_bad_steps of them in a row stop the run with an
error at the next flush, the last checkpoint untouched. Under torchrun, signal the
workers, not torchrun, which exits 1 after passing a signal on (docs/distributed.md, "Pre-emption").
With checkpoint.resume = "auto" a restarted job (torchrun --max-restarts, or the same
command again) continues from the newest checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not its folder
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import contextlib
import functools
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from stackfast.checkpoint import (STEP_DIR, AsyncSaver, CheckpointError, latest_checkpoint, load_checkpoint,
                                  load_config_of, load_model_source, load_state, model_from_weights,
                                  remove_stale_saves, save_checkpoint, verify_checksums)
from stackfast.config import Config, ConfigError, StackfastError, load_config
from stackfast.data import Prefetcher, TokenLoader, open_sources
from stackfast.data.sampling import attended_share
from stackfast.errors import StopNow, WriteError, report_errors
from stackfast.files import PLACE_ERRNOS
from stackfast.float8 import (check_convertible, check_float8, describe as describe_float8, precompute_scales,
                              with_float8)
from stackfast.growth import rebuild_ramp
from stackfast.growth.event import GrowthEvent, grow_stage
from stackfast.growth.stages import Stage, growth_steps, stage_models, stages_of
from stackfast.growth_operators import OPERATORS, operators_where
from stackfast.metrics import MFU_CONVENTION, MetricsLog, Progress, Throughput, peak_flops
from stackfast.model import Transformer, check_kernels
from stackfast.optim import build_optimizer, scheduled_lr, warmup_note
from stackfast.parallel import (World, barrier, init_distributed, init_parameters, set_gradient_sync, shutdown,
                                wrap_model)
from stackfast.runs import RunLock, check_resume, prepare_fresh, run_sampling


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} asked for, but CUDA is not available")
    return device


def use_bf16(dtype_name: str, device: torch.device) -> bool:
    """bf16 compute on GPU by default; fp32 on CPU or when asked."""
    return dtype_name == "bf16" or (dtype_name == "auto" and device.type == "cuda")


def autocast_context(dtype_name: str, device: torch.device):
    if not use_bf16(dtype_name, device):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def evaluate(model: torch.nn.Module, loader: TokenLoader, n_rows: int, device: torch.device,
             autocast, world: World = World()) -> float:
    """The validation loss: mean cross-entropy over the first n_rows fixed validation sequences
    (all ranks' share of them); of a mixture, its sources' losses averaged with their weights."""
    return mixed_loss(loader, evaluate_sources(model, loader, n_rows, device, autocast, world))


def mixed_loss(loader: TokenLoader, losses: dict[str, float]) -> float:
    """A mixture's validation loss: the sources' held-out losses averaged with their weights
    (the loss on held-out rows mixed as the training rows are); one source's own loss."""
    return sum(source.weight * losses[source.name] for source in loader.sources)


@torch.no_grad()
def evaluate_sources(model: torch.nn.Module, loader: TokenLoader, n_rows: int, device: torch.device,
                     autocast, world: World = World()) -> dict[str, float]:
    """Each source's mean cross-entropy over its first n_rows fixed validation sequences (all
    ranks' share of them), by source name."""
    was_training = model.training
    model.eval()
    sums = []
    for i in range(len(loader.sources)):
        total, count = torch.zeros((), device=device), 0
        for x, y, *ids in loader.val_batches(n_rows, source=i):  # ids: the document ids, with data.document_mask
            with autocast():
                loss = model_loss(model, x.to(device), y.to(device), *(t.to(device) for t in ids))
            total += loss * y.numel()
            count += y.numel()
        sums.append(torch.stack([total, total.new_tensor(count)]))
    model.train(was_training)
    sums = torch.stack(sums)
    if world.distributed:
        dist.all_reduce(sums)  # collective: every rank's held-out rows
    return {source.name: total / count  # host sync: validation result
            for source, (total, count) in zip(loader.sources, sums.tolist())}


def build_model(model_cfg, device: torch.device, shard, init_from: str = "", seeded: bool = True,
                allow_unverified: bool = False) -> Transformer:
    """The run's model, wrapped and sharded by `shard`, its weights allocated once, on the device.

    Built on the meta device first: no full-size copy on the host. init_from (a stackfast
    or Hugging Face checkpoint): whole weights loaded, then sharded. Else sharded first, and
    each rank allocates only its rows; seeded: the seeded init (parallel.init_parameters,
    the same weights at any world size), skipped for a resume that overwrites them.
    """
    if init_from:
        weights = load_model_source(init_from, allow_unverified)[1]
        return shard(model_from_weights(model_cfg, weights, init_from, device))
    with torch.device("meta"):
        model = Transformer(model_cfg)
    shard(model)
    model.materialize(device)
    if seeded:
        init_parameters(model.named_parameters(), model.config)
    return model


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


def run(cfg: Config) -> dict:
    """Train as configured (growing mid-run when [growth] says so); returns a summary.

    Under torchrun this joins the process group (and leaves it at the end); every
    process calls run() with the same config."""
    cfg.validate()
    device = resolve_device(cfg.train.device)
    check_kernels(cfg.model.kernels, device)  # before any process group or file
    check_float8(cfg.train.float8, device)  # so are torchao and the GPU for float8
    if cfg.train.float8 != "none":  # and a model without a linear float8 could take
        check_convertible(cfg.train.float8, stage_models(cfg))
    world, device = init_distributed(device, cfg.parallel.replicate_degree)
    try:
        cfg.batch_split(world.world_size)  # an uneven split is an error before anything is written
        find_resume(cfg)  # so is a resume folder that is not there (the lock below creates the run folder)
        # and a stage no model can grow into, or an impossible stage timing
        stage_models(cfg), growth_steps(cfg, cfg.total_steps())
        with StopSignal() as stop, contextlib.ExitStack() as held:
            lock = None
            if world.main:  # one job per run folder, for as long as this one runs
                lock = held.enter_context(RunLock(Path(cfg.logging.run_dir)))
                if not cfg.checkpoint.resume:  # a fresh run writes: refused now in a folder it cannot write
                    lock.refuse_read_only()
            return _train(cfg, world, device, stop, lock)
    except OSError as e:
        # The file system's refusals (a full disk, a read-only or forbidden place, an I/O
        # error) in writes without a handler of their own (logs, config.toml): one line.
        if e.errno not in PLACE_ERRNOS:
            raise
        raise WriteError(f"{e.filename or cfg.logging.run_dir}: {e.strerror}; the run stopped there, its "
                         f"checkpoints as they were (continue with --resume auto once this is fixed)") from None
    finally:
        shutdown(world)


class StopSignal:
    """SIGTERM and SIGINT set `requested` instead of ending the process, so the loop can
    finish its step and checkpoint (a cluster's warning before pre-emption). A second
    signal interrupts at once (StopNow, a KeyboardInterrupt; `interrupted` records it).
    Handlers can only be installed in the main thread; the previous ones come back on
    exit. The flags belong to this object, one per run(): nothing of a stop outlives it."""

    def __init__(self):
        self.requested = False
        self.received: signal.Signals | None = None  # the first signal, once it came
        self.interrupted: signal.Signals | None = None  # the second signal, once it came
        self.previous = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.interrupted = signal.Signals(signum)
            raise StopNow(f"second {self.interrupted.name}: stopped at once, without a checkpoint", signum)
        self.requested, self.received = True, signal.Signals(signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            # None: a handler installed outside Python, which cannot be put back: the default then.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self.previous.clear()


@dataclass
class TrainState:
    """Where the run is and what it has done: what state.json holds (state_dict), besides
    the weights, optimizer and RNG. A resume continues from it exactly."""
    seed: int  # train.seed; with `step` it says where the data continues
    world_size: int  # processes of the job that wrote it (recorded; a resume may use any count)
    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    skipped_steps: int = 0  # steps whose update a non-finite loss or gradient norm skipped
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # checkpoint lineage (keep_last)
    stage: int = 0  # growth events done: the model is the stage's (growth.stages)
    growth_steps: list[int] = field(default_factory=list)  # the step of each event done, kept if the budget changes
    growth_specs: list[dict] = field(default_factory=list)  # each event's operator spec (the last rebuilds a ramp)

    # What a checkpoint resumes from; seed and world_size are the resuming job's own.
    PROGRESS = ("step", "tokens", "flops", "skipped_steps", "run_id", "stage", "growth_steps", "growth_specs")

    def state_dict(self) -> dict:
        progress = {key: getattr(self, key) for key in self.PROGRESS}
        return {**progress, "data": {"seed": self.seed, "next_step": self.step}, "world_size": self.world_size}

    def load_state_dict(self, saved: dict) -> None:
        for key in self.PROGRESS:
            if key in saved:
                setattr(self, key, saved[key])
        if "growth_step" in saved:  # a checkpoint of a version with one growth event: it had happened
            self.stage, self.growth_steps, self.growth_specs = 1, [saved["growth_step"]], [saved["growth_spec"]]


@dataclass
class StepRecord:
    """One optimizer step as the metrics log shows it; loss, grad_norm and bad (1.0: the
    update was skipped) are still on the device until the next flush."""
    step: int
    tokens: int
    flops: float
    lr: float
    loss: torch.Tensor
    grad_norm: torch.Tensor
    bad: torch.Tensor
    attended: float | None = None  # with data.document_mask: the share of causal attention kept (host)


class PendingSteps:
    """The steps not yet logged, and the bad-step policy: flush() brings them to the host
    with one transfer, writes their rows, counts skipped steps and stops the run after
    train.max_bad_steps bad steps in a row (however many flushes they span)."""

    def __init__(self, log: MetricsLog, throughput: Throughput, progress: Progress, world: World,
                 max_bad_steps: int, checkpoints: Path):
        self.log, self.throughput, self.progress, self.world = log, throughput, progress, world
        self.max_bad_steps, self.checkpoints = max_bad_steps, checkpoints
        self.records: list[StepRecord] = []
        self.bad_in_row = 0
        self.last_loss: float | None = None  # mean over ranks, of the last flushed step

    def add(self, record: StepRecord) -> None:
        self.records.append(record)

    def flush(self, state: TrainState) -> None:
        if not self.records:
            return
        records, self.records = self.records, []
        losses = torch.stack([r.loss for r in records])
        if self.world.distributed:
            dist.all_reduce(losses)  # collective: sum of the ranks' losses (gloo has no average)
            losses /= self.world.world_size
        rows = torch.stack([losses, torch.stack([r.grad_norm for r in records]),
                            torch.stack([r.bad for r in records])], dim=1).tolist()  # host sync: logging
        tokens_per_s, mfu = self.throughput.update(records[-1].tokens)
        for record, (loss, norm, bad) in zip(records, rows):
            self.log.write({"step": record.step, "tokens": record.tokens, "flops": record.flops, "loss": loss,
                            "lr": record.lr, "grad_norm": norm, "tokens_per_s": tokens_per_s, "mfu": mfu,
                            **({"skipped": True} if bad else {}),
                            **({"attended": record.attended} if record.attended is not None else {})})
        self.last_loss = rows[-1][0]
        self.progress.update(records[-1].step, self.last_loss, tokens_per_s, mfu)
        for record, (_, _, bad) in zip(records, rows):  # in step order: a good step ends a bad run
            self.bad_in_row = self.bad_in_row + 1 if bad else 0
            if bad:
                self._skipped(state, record.step)

    def _skipped(self, state: TrainState, step: int) -> None:
        state.skipped_steps += 1
        self.progress.message(f"step {step}: non-finite loss or gradient norm; update skipped "
                              f"({self.bad_in_row} in a row, train.max_bad_steps = {self.max_bad_steps})")
        if self.bad_in_row >= self.max_bad_steps:
            self.log.close()
            last_good = latest_checkpoint(self.checkpoints)
            raise StackfastError(
                f"{self.bad_in_row} steps in a row (up to step {step}) had a non-finite loss or gradient norm "
                f"(train.max_bad_steps); stopped. Last checkpoint: {last_good or 'none'}; resume from it with a "
                f"lower optim.lr or other data")


def should_grow(state: TrainState, grow_at: list[int]) -> bool:
    return state.stage < len(grow_at) and state.step >= grow_at[state.stage]


def should_eval(cfg: Config, step: int, done: bool) -> bool:
    return bool(cfg.train.eval_every and step % cfg.train.eval_every == 0) or done


def should_save(cfg: Config, step: int, done: bool) -> bool:
    return bool(cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or done


def should_stop(stop: StopSignal, world: World, device: torch.device, host_sync: bool) -> bool:
    """Whether to checkpoint and stop after this step for a signal. One process acts on it
    at once; several must agree on the step, which they do (a collective) only at steps
    that sync with the host anyway (logging, validation, checkpoint)."""
    if not world.distributed:
        return stop.requested
    return host_sync and agree_to_stop(stop.requested, device)


def start_or_resume(cfg: Config, world: World, run_dir: Path, resume_from: Path | None,
                    lock: RunLock | None = None) -> tuple[TrainState, Path | None, list[str]]:
    """The run's state, fresh or read from `resume_from` (find_resume's; its checksums
    verified first); that checkpoint (None: a fresh start) and the settings changed since."""
    state = TrainState(seed=cfg.train.seed, world_size=world.world_size)
    # A fresh run, or a resume from another folder's checkpoint, must not mix into a run here.
    if resume_from is None or resume_from.resolve().parent != (run_dir / "checkpoints").resolve():
        if world.main:
            if lock is not None:
                lock.refuse_read_only()  # before prepare_fresh, which may delete a run's files
            prepare_fresh(run_dir, cfg)  # refuses to overwrite another run unless told to
        barrier(world)
    if resume_from is None:
        return state, None, []
    if not cfg.checkpoint.allow_unverified:
        verify_checksums(resume_from, world)  # collective: before anything of it is read
    state.load_state_dict(load_state(resume_from))
    named = STEP_DIR.match(resume_from.name)
    if named and int(named.group(1)) != state.step:
        raise CheckpointError(f"{resume_from}: state.json is step {state.step}, the folder name says "
                              f"{int(named.group(1))}: renamed or mixed up; not resuming from it")
    return state, resume_from, check_resume(load_config_of(resume_from), cfg, resume_from)


@dataclass
class Job:
    """A run set up to train (`setup`): what the loop works with."""
    run_dir: Path
    autocast: object
    loader: TokenLoader
    accum: int  # micro-batches per step on each process
    total_steps: int
    eval_rows: int
    state: TrainState
    stages: list[Stage]  # growth events, in order (empty: no growth)
    models: list  # the model config of each stage, the first (smallest) to [model]
    planned: list[int]  # the step of each growth event as the config plans it
    shard: object  # wraps a model as the run does (FSDP, compile, checkpointing, float8)
    model: Transformer
    optimizer: torch.optim.Optimizer
    ramp: object  # the fade-in of the last growth event (None without one)
    log: MetricsLog
    resume_from: Path | None
    changes: list[str]  # settings changed since the checkpoint resumed from

    @property
    def grow_at(self) -> list[int]:
        """The step of each growth event, as the start line announces it, the schedule uses it
        and the loop grows at it (`growth_schedule`)."""
        return growth_schedule(self.state, self.planned)


def growth_schedule(state: TrainState, planned: list[int]) -> list[int]:
    """The step after which each growth event happens: those done as they happened (a run
    keeps them even if its token budget changed since), the others as planned but never
    before the step the run is at, one step apart at least (a resume with a smaller budget
    can leave planned steps behind it: those events happen at once)."""
    steps = list(state.growth_steps)
    for step in planned[state.stage:]:
        steps.append(max(step, state.step, steps[-1] + 1 if steps else 0))
    return steps


def setup(cfg: Config, world: World, device: torch.device, lock: RunLock | None = None) -> Job | None:
    """Everything before the first step: data, run folder, state (fresh or resumed), growth
    stages, model and optimizer. None: the run resumed from is already finished."""
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(cfg.train.seed)
    operator = None if cfg.growth.operator == "none" else OPERATORS[cfg.growth.operator]
    if world.distributed and operator is not None and not operator.sharded:
        raise ConfigError(f"growth.operator: {operator.name!r} changes tensor shapes, which under torchrun "
                          f"(FSDP) would gather the whole model on every process; it runs in a single process "
                          f"only. Under torchrun use {', '.join(operators_where('sharded'))}, or grow with "
                          f"`stackfast grow` and continue from its output with checkpoint.init_from")
    stages, models = stages_of(cfg), stage_models(cfg)

    if not world.main:
        barrier(world)  # rank 0 opens the data first: it may build the built-in corpus's cache
    sources = open_sources(cfg.data, cfg.model.vocab_size)  # a mixture of two tokenizers: an error now
    if world.main:
        barrier(world)
    micro, accum = cfg.batch_split(world.world_size)
    total_steps = cfg.total_steps()
    planned = growth_steps(cfg, total_steps)
    note = warmup_note(cfg, total_steps, planned)
    if note and world.main:  # said once, where the run starts (the schedule clamps the warmup)
        print(f"stackfast: {note}", file=sys.stderr)

    # A run keeps the sampling it started with ('auto': the checkpoint's, epoch for a fresh run). Read
    # from the checkpoint's config now, so that the loader's checks below fail before
    # start_or_resume may clear the run folder (--force); its checksums are verified there.
    resuming = find_resume(cfg)
    cfg.data.sampling = run_sampling(load_config_of(resuming) if resuming else None, cfg)
    loader = TokenLoader(sources, cfg.data.seq_len, cfg.train.global_batch_size, micro, seed=cfg.train.seed,
                         rank=world.rank, world_size=world.world_size, sampling=cfg.data.sampling,
                         document_mask=cfg.data.document_mask)
    loader.check_validation()  # a validation split too short fails now, not after training

    state, resume_from, changes = start_or_resume(cfg, world, run_dir, resuming, lock)
    if resume_from is not None and state.step >= total_steps:
        if world.main:
            print(f"stackfast: the run in {resume_from} is finished ({state.step} of {total_steps} steps); "
                  f"nothing to do (raise train.total_tokens or train.max_steps to train on)")
        return None
    if state.stage > len(stages):
        raise ConfigError(f"resume from {resume_from}: the run has grown {state.stage} times, [growth] has "
                          f"{len(stages)} stages")
    grow_at = growth_schedule(state, planned)
    if grow_at and grow_at[-1] >= total_steps:  # planned stages left behind by a smaller budget, no room after
        raise ConfigError(f"resume from {resume_from} at step {state.step}: growth stage {len(grow_at)} would grow "
                          f"after step {grow_at[-1]}, with the run's {total_steps} steps done; raise "
                          f"train.max_steps or train.total_tokens")
    if lock is not None:
        lock.refuse_read_only()  # from here on the run writes
        remove_stale_saves(run_dir / "checkpoints")  # a killed save's partial folder: this job holds the lock
    shard = functools.partial(wrap_model, cfg=cfg.parallel, world=world, bf16=use_bf16(cfg.train.dtype, device))
    # float8: the block linears become Float8Linear before compile and FSDP, in every model `shard`
    # wraps (the first, one loaded from init_from, the grown one)
    shard = with_float8(shard, cfg.train.float8, device, world.distributed)
    init_from = cfg.checkpoint.init_from if resume_from is None else ""
    model = build_model(models[state.stage], device, shard, init_from, seeded=resume_from is None,
                        allow_unverified=cfg.checkpoint.allow_unverified)
    optimizer = build_optimizer(model, cfg.optim)
    log = MetricsLog(run_dir, cfg.logging.tensorboard, enabled=world.main)
    ramp = None
    if resume_from is not None:
        load_checkpoint(resume_from, model, optimizer, world)
        if state.growth_specs:
            ramp = rebuild_ramp(model, state.growth_specs[-1])
        if ramp is not None:
            ramp.set_step(state.step - state.growth_steps[-1])
        log.truncate_after(state.step, state.stage)
    if world.main:
        (run_dir / "config.toml").write_text(cfg.to_toml())
    return Job(run_dir, autocast_context(cfg.train.dtype, device), loader, accum, total_steps,
               cfg.train.eval_batches * cfg.train.global_batch_size, state, stages, models, planned, shard, model,
               optimizer, ramp, log, resume_from, changes)


def _train(cfg: Config, world: World, device: torch.device, stop: StopSignal, lock: RunLock | None = None) -> dict:
    job = setup(cfg, world, device, lock)
    if job is None:
        return {"rank": world.rank, "finished": True, "stopped": False}
    state, model, optimizer, ramp, run_dir = job.state, job.model, job.optimizer, job.ramp, job.run_dir
    loader, total_steps, accum = job.loader, job.total_steps, job.accum
    tokens_per_step = cfg.tokens_per_step()
    flops_per_token = model.config.flops_per_token(cfg.data.seq_len)
    throughput = Throughput(flops_per_token, peak_flops(device, cfg.train.peak_tflops))
    throughput.last_tokens = state.tokens
    progress = Progress(total_steps, cfg.logging.progress and world.main, initial=state.step)
    announce(cfg, job, world, device, progress, throughput.peak)
    pending = PendingSteps(job.log, throughput, progress, world, cfg.train.max_bad_steps, run_dir / "checkpoints")
    # checkpoint.async_save: saves written in the background (collective: a process group of its own).
    saver = AsyncSaver(world) if cfg.checkpoint.async_save else None
    val_loss = None
    started = time.perf_counter()
    start_tokens = state.tokens
    model.train()

    # The loader runs ahead on a background thread (pinned memory on GPU): the device never
    # waits for data. The keys are the loop's own (step, micro-step) order.
    keys = ((s, m) for s in range(state.step, total_steps) for m in range(accum))
    with contextlib.closing(Prefetcher(loader, keys, pin_memory=device.type == "cuda")) as batches, \
            (saver or contextlib.nullcontext()):  # leaving: waits for (or, on a second signal, drops) a save in flight
        while state.step < total_steps:
            if should_grow(state, job.grow_at):
                pending.flush(state)  # the smaller model's last steps: logged, bad ones counted
                event = grow_next_stage(cfg, job, model, optimizer, device, world, progress)
                model, optimizer, ramp = event.model, event.optimizer, event.ramp
                flops_per_token = model.config.flops_per_token(cfg.data.seq_len)
                throughput.flops_per_token = flops_per_token
            if ramp is not None:
                ramp.set_step(state.step - state.growth_steps[-1])
            lr = scheduled_lr(cfg, state.step, total_steps, job.grow_at)
            for group in optimizer.param_groups:
                group["lr"] = lr
            host_batches = [batches.batch(state.step, m) for m in range(accum)]
            micro_batches = [tuple(t.to(device, non_blocking=True) for t in b) for b in host_batches]
            for name, epoch in loader.epochs_begun(state.step):  # in the log's numbering: the step that reads it
                progress.message(f"step {state.step + 1}: data source {name} begins epoch {epoch}, in a new order")
            loss, grad_norm, bad = train_step(model, optimizer, micro_batches, job.autocast, cfg.optim.grad_clip,
                                              world, cfg.parallel.defer_grad_sync)
            state.step += 1
            state.tokens += tokens_per_step
            state.flops += flops_per_token * tokens_per_step
            pending.add(StepRecord(state.step, state.tokens, state.flops, lr, loss, grad_norm, bad,
                                   attended_of(host_batches)))

            step, done = state.step, state.step == total_steps
            eval_now, save_now = should_eval(cfg, step, done), should_save(cfg, step, done)
            host_sync = eval_now or save_now or step % cfg.logging.log_every == 0
            stopping = should_stop(stop, world, device, host_sync)
            if host_sync or stopping:
                pending.flush(state)
            if eval_now:
                val_loss = validate(job, model, device, world, progress)
            if save_now or stopping:  # the last one (or a signal's) written at once, the others maybe in the background
                saved = write_checkpoint(cfg, job, model, optimizer, world, stop, saver, now=done or stopping)
            if stopping and not done:
                say_stopped(stop, step, saved, progress, world)
                break

    progress.close()
    job.log.close()
    wall = time.perf_counter() - started
    tokens_per_s = (state.tokens - start_tokens) / wall if wall > 0 else 0.0
    return {"steps": state.step, "tokens": state.tokens, "flops": state.flops,
            "loss": pending.last_loss, "val_loss": val_loss, "wall_s": wall, "tokens_per_s": tokens_per_s,
            "params": model.num_params(), "device": str(device), "run_dir": str(run_dir),
            "growth_step": job.grow_at[0] if job.grow_at else None, "growth_steps": job.grow_at,
            "mfu_convention": MFU_CONVENTION, "world_size": world.world_size,
            "rank": world.rank, "stopped": state.step < total_steps, "skipped_steps": state.skipped_steps,
            "stop_signal": stop.received.name if stop.received else None}


def announce(cfg: Config, job: Job, world: World, device: torch.device, progress: Progress,
             peak: float | None) -> None:
    """The run's start lines: settings changed since the checkpoint, the start line (size,
    batch, where, growth to come, resume), float8, MFU's peak unknown, data read over."""
    state, model, total_steps = job.state, job.model, job.total_steps
    for change in job.changes:
        progress.message(f"resuming with a changed setting: {change}")
    where = f"{world.world_size} processes ({device.type}, {world.strategy})" if world.distributed else str(device)
    to_come = [f"x{stage.factor} after step {step}"
               for stage, step in list(zip(job.stages, job.grow_at))[state.stage:]]
    progress.message(f"stackfast: {model.num_params() / 1e6:.1f}M parameters, {total_steps} steps of "
                     f"{cfg.tokens_per_step()} tokens ({cfg.train.global_batch_size} sequences: {job.accum} x "
                     f"{job.loader.micro_batch} on each of {world.world_size} processes) on {where}; logs in "
                     f"{job.run_dir}" + (f"; grows ({cfg.growth.operator}) {', '.join(to_come)}" if to_come else "")
                     + (f"; resumed from {job.resume_from}" if job.resume_from else ""))
    if cfg.train.float8 != "none":
        progress.message(describe_float8(cfg.train.float8, device, world.distributed, model))
    if device.type == "cuda" and peak is None:
        progress.message(f"stackfast: no dense bf16 peak known for {torch.cuda.get_device_name(device)}: MFU not "
                         f"reported (set train.peak_tflops to the GPU's datasheet figure)")
    for name, epochs in job.loader.epochs(total_steps * cfg.tokens_per_step()).items():
        if epochs > cfg.data.max_epochs:  # a warning: repeating data may be deliberate
            progress.message(f"warning: the run reads data source {name} {epochs:.2f} times over, more than "
                             f"data.max_epochs = {cfg.data.max_epochs:g}")


def validate(job: Job, model: Transformer, device: torch.device, world: World, progress: Progress) -> float:
    """The validation step: the held-out loss, logged (of a mixture: each source's loss and
    the epochs read of it too); returns it."""
    state, loader = job.state, job.loader
    losses = evaluate_sources(model, loader, job.eval_rows, device, job.autocast, world)
    val_loss = mixed_loss(loader, losses)
    row, note = {"step": state.step, "tokens": state.tokens, "flops": state.flops, "val_loss": val_loss}, ""
    if len(losses) > 1:  # a mixture: each source's loss and epochs read (one source: the row of before)
        epochs = loader.epochs(state.tokens)
        row.update({f"val_loss/{name}": loss for name, loss in losses.items()})
        row.update({f"epochs/{name}": epochs[name] for name in losses})
        note = " (" + ", ".join(f"{name} {losses[name]:.4f} at {epochs[name]:.2f} epochs" for name in losses) + ")"
    job.log.write(row)
    progress.message(f"step {state.step}: val_loss {val_loss:.4f}{note}")
    return val_loss


def write_checkpoint(cfg: Config, job: Job, model: Transformer, optimizer, world: World, stop: StopSignal,
                     saver: AsyncSaver | None, now: bool) -> Path | None:
    """The checkpoint step: a checkpoint of this step, in the background with
    checkpoint.async_save unless `now` (the run's last, or a signal's); logs how long the loop
    stood still. Returns the folder written (None: still being written in the background).
    A second signal during the save is StopNow (one line), the newest checkpoint named."""
    state, checkpoints = job.state, job.run_dir / "checkpoints"
    blocked, waited, saved = time.perf_counter(), 0.0, None
    try:
        if saver is not None and not now:
            waited = saver.save(checkpoints, state.step, model, optimizer, state.state_dict(), cfg,
                                cfg.checkpoint.keep_last)
        else:
            waited = saver.wait() if saver is not None else 0.0  # the save in flight first
            saved = save_checkpoint(checkpoints, state.step, model, optimizer, state.state_dict(), cfg,
                                    cfg.checkpoint.keep_last, world)
    except BaseException:
        # A second signal in the save: DCP wraps it (CheckpointException), torch's zip writer
        # may turn it into a RuntimeError; the save removed its folder.
        if stop.interrupted is None:
            raise
        newest = latest_checkpoint(checkpoints)
        raise StopNow(f"second {stop.interrupted.name} during the checkpoint of step {state.step}: stopped at once "
                      f"without it; the newest checkpoint is {newest or 'none'} (continue from it with --resume "
                      f"auto)", stop.interrupted) from None
    # The loop's stall at this checkpoint (async: the wait for the previous save + the host copy).
    job.log.write({"step": state.step, "tokens": state.tokens, "flops": state.flops,
                   "checkpoint_blocked_s": time.perf_counter() - blocked,
                   **(saver.metrics(waited) if saver is not None else {})})
    return saved


def say_stopped(stop: StopSignal, step: int, saved: Path, progress: Progress, world: World) -> None:
    """The line of a run a signal stopped: said even without a progress display, as a run cut
    short must never look like a finished one."""
    which = stop.received.name if stop.received else "sent to another process"
    note = (f"step {step}: stopped by a signal ({which}); wrote {saved}. Run the same command with --resume auto "
            f"to continue")
    if progress.enabled:
        progress.message(note)
    elif world.main:
        print(note, file=sys.stderr, flush=True)


def attended_of(host_batches: list[tuple]) -> float | None:
    """The share of causal attention the document mask keeps in this process's rows of a step
    (None without data.document_mask), from the ids on the host: no device sync."""
    if len(host_batches[0]) < 3:
        return None
    return attended_share(torch.cat([b[2] for b in host_batches]).numpy())


def model_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *document_ids: torch.Tensor) -> torch.Tensor:
    """The mean loss of a micro-batch; `document_ids`, with data.document_mask, is the model's third argument."""
    return model(x, y, *document_ids)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[tuple],
               autocast, grad_clip: float, world: World = World(), defer_grad_sync: bool = True,
               loss_fn=model_loss) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step: forward/backward over the (x, y) micro-batches (on the device),
    global-norm clipping and the AdamW update. The loop runs it every step and
    stackfast/bench/bench_train.py times it, so the benchmark measures what training runs.

    Returns (mean loss, gradient norm, bad flag), all still on the device: no host sync.
    A step whose loss (local to each rank) or gradient norm is not finite is skipped on the
    device: fused AdamW leaves weights and state untouched when `found_inf` is nonzero (the
    mechanism torch's AMP grad scaler uses). Under FSDP the ranks agree on it through an
    all-reduce, asynchronous on NCCL. loss_fn(model, x, y) gives the loss (the default
    calls model(x, y); bench_train passes Hugging Face models' own loss).
    """
    accum = len(micro_batches)
    loss_sum = None
    for micro, (x, y, *ids) in enumerate(micro_batches):
        set_gradient_sync(model, micro == accum - 1 or not defer_grad_sync)
        with autocast():
            loss = loss_fn(model, x, y, *ids)
        (loss / accum).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    loss = loss_sum / accum  # this rank's mean; FSDP averages the gradients over ranks
    grad_norm = gradient_norm(model)
    bad = (torch.isfinite(loss) & torch.isfinite(grad_norm)).logical_not().float()
    if world.distributed:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # collective
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), grad_clip, grad_norm)
    optimizer.found_inf = bad
    optimizer.step()
    precompute_scales(model)  # float8 all-gather under FSDP: next step's weight scales, one all-reduce
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, bad


def gradient_norm(model: torch.nn.Module) -> torch.Tensor:
    """The global L2 norm of all gradients, a plain 0-d tensor on the device."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # collective: combines every rank's shard norms
    return norm


def grow_next_stage(cfg: Config, job: Job, model: Transformer, optimizer, device: torch.device, world: World,
                    progress: Progress) -> GrowthEvent:
    """The run's next growth event (growth/event.py), recorded in the state (saved with every
    later checkpoint), the metrics log and the progress display."""
    state, loader = job.state, job.loader
    probe_rows = loader.micro_batch * world.world_size  # one micro-batch on each process

    def batch(k):  # LiGO's training data: fresh batches of the step, not the run's own
        x, y = loader.extra_batch(state.step, k)[:2]  # growth/learned.py trains on (x, y) without document ids
        return x.to(device), y.to(device)

    event = grow_stage(cfg, job.stages[state.stage], job.models[state.stage + 1], model, optimizer,
                       probe=lambda m: evaluate(m, loader, probe_rows, device, job.autocast, world), batch=batch,
                       device=device, micro_batch=loader.micro_batch, world=world, shard=job.shard)
    row = event.row
    state.stage += 1
    state.growth_steps.append(state.step)
    state.growth_specs.append(row["spec"])
    state.flops += row["growth_flops"]
    job.log.write({"step": state.step, "tokens": state.tokens, "flops": state.flops, "stage": state.stage, **row})
    progress.message(f"step {state.step}: grew {row['params_before'] / 1e6:.1f}M -> "
                     f"{row['params_after'] / 1e6:.1f}M parameters ({row['spec']['operator']}, stage {state.stage} "
                     f"of {len(job.stages)}) in {row['growth_s']:.2f} s; probe loss {row['loss_before']:.4f} -> "
                     f"{row['loss_after']:.4f}")
    return event


def agree_to_stop(requested: bool, device: torch.device) -> bool:
    """Whether any rank saw a stop signal (collective; called at host-sync points only)."""
    flag = torch.tensor(float(requested), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0  # host sync: already at a logging, validation or checkpoint step


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `stackfast train` and `python stackfast/train.py` (the same command)."""
    parser.add_argument("--config", help="TOML config file (default: built-in toy settings)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--resume", help="'auto' or a checkpoint folder (same as --set checkpoint.resume=...)")
    parser.add_argument("--force", action="store_true", help="start over in a run folder that holds a run: delete "
                        "its checkpoints and logs first (same as --set logging.overwrite=true)")
    parser.set_defaults(func=run_from_args)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """`stackfast train`: run the configured job and print its one-line summary."""
    overrides = args.set + ([f'checkpoint.resume="{args.resume}"'] if args.resume else []) \
        + (["logging.overwrite=true"] if args.force else [])
    try:
        summary = run(load_config(args.config, overrides))  # a StackfastError is the CLI's to report
    except StopNow as e:  # a second signal: one line, and the status of a process that signal ended
        print(f"stackfast: stopped: {e}", file=sys.stderr)
        return e.exit_status
    if summary["rank"] != 0 or summary.get("finished"):
        return 0
    if summary["stopped"]:
        print(f"stopped by a signal after step {summary['steps']}; checkpoint written. "
              f"Continue with the same command and --resume auto")
        return 0
    print(f"done: {summary['steps']} steps, {summary['tokens']} tokens, loss {summary['loss']:.4f}, "
          f"val_loss {summary['val_loss']:.4f}, {summary['tokens_per_s']:.0f} tokens/s; "
          f"logs in {summary['run_dir']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python stackfast/train.py ARGS` (and torchrun's launch of it): `stackfast train ARGS`."""
    parser = add_train_arguments(argparse.ArgumentParser(prog="stackfast train", description="Train a model "
                                                         "from a config (growing mid-run when [growth] says so)."))
    return report_errors(run_from_args, parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
