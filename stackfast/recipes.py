"""Training recipes at an equal FLOP budget, and the protocol that compares them honestly.

A recipe is how a run spends its budget: the target from scratch, the small model alone,
or growth with its stages (when, by how much, which layers) and its schedule across them.
The protocol (`tune`, `finals`) gives every recipe the same treatment:

- the same search: each schedule kind (cosine, WSD) over a ladder of peak LRs, extended
  until the best LR of each kind is interior (never at the end of what was tried);
- the search on seed 1, the reported runs on FINAL_SEEDS, five seeds no study had used
  before: the search's winner is not also its own evidence;
- arms compared paired by seed (the same seed gives every arm the same data order and the
  same initialisation of what they share): `paired` takes the seed-by-seed differences and
  their Student t confidence interval (CONFIDENCE, n - 1 degrees of freedom); one arm beats
  another only when that interval excludes zero AND the mean difference exceeds the noise
  floor;
- a pinned thread count: the runs are bit-reproducible on one machine (the same CPU model
  and instruction set, `machine`) at a given setting (`run_many` checks one repeat); another
  thread count, or another CPU, changes a final loss by float rounding alone: the noise floor
  is the largest such change measured (the same seed at 2 threads instead of 1);
- speedups are stated against the strongest scratch measured, seed by seed.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import signal
import statistics
from dataclasses import dataclass
from pathlib import Path

from stackfast.config import ModelConfig, StackfastError, load_config
from stackfast.growth_operators import OPERATORS

# Peak LRs the search tries, in order; a search starts at START and steps out along it.
LR_LADDER = (1.2e-3, 2e-3, 3e-3, 5e-3, 8e-3, 1.2e-2, 2e-2, 3e-2, 5e-2, 8e-2)
START = (5e-3, 8e-3, 1.2e-2)
KINDS = ("cosine", "wsd")
SEARCH_SEED = 1
FINAL_SEEDS = (8, 9, 10, 11, 12)  # fresh: the earlier studies used 1-4, the issue 29 check 5-7
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Stage:
    """One growth event of a recipe: the growth factor (None: a MIDAS stage, one block of
    `block` layers added), the layers it repeats ('all'; 'middle': a window of `block`
    layers; 'midas') and, for recipes that place events by FLOPs, the share of the budget
    spent before it."""
    factor: int | None
    flop_share: float = 0.0
    layers: str = "all"
    block: int = 0


@dataclass(frozen=True)
class Recipe:
    """How a run spends its FLOP budget. Without stages: the target (or, small=True, the
    small model of a x4 depth growth) from scratch. With stages: growth events (operator,
    G_stack by default) at their FLOP shares, or (prop=True) at Prop-1 stage lengths in
    tokens (1 : 2 : 3 ...), under growth.schedule `schedule` (optim.py). `overrides`: --set
    overrides the recipe adds to every run (a data study's arms differ in data settings alone)."""
    name: str
    label: str
    stages: tuple[Stage, ...] = ()
    small: bool = False
    prop: bool = False
    schedule: str = "continue"
    operator: str = "stack"
    source: str = ""
    overrides: tuple[str, ...] = ()

    @property
    def grows(self) -> bool:
        return bool(self.stages)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The schedule kinds the search tries for this recipe: cosine alone under the paper's
        schedule (the paper's code runs cosine; a WSD arm would be another recipe), both
        otherwise. The baselines thus get at least the tuning a growth arm gets."""
        return ("cosine",) if self.schedule == "paper" else KINDS


# The LiGO operators train their expansion for LEARN_STEPS steps (each costs one grown-model
# step, so their runs train that many steps less: equal budgets); G_random's new parts fade
# in over RAMP_FRACTION of a run's steps.
LEARN_STEPS, RAMP_FRACTION = 20, 0.2

RECIPES = {r.name: r for r in [
    Recipe("scratch", "scratch", source="the baseline"),
    Recipe("small", "small alone", small=True, source="the x4 small model alone: what growth must beat too"),
    Recipe("stack_paper", "G_stack as the paper ran it", (Stage(4, 0.2),), schedule="paper",
           source="Du et al. 2024 as their code (prts) runs it: x4 at 20% of the FLOPs here; the small model on the "
                  "first part of a long cosine (near its peak LR at growth), the grown model a fresh warmup + cosine"),
    Recipe("stack_restart", "G_stack, small model on its own full schedule", (Stage(4, 0.2),), schedule="restart",
           source="the same growth; the small model runs a complete schedule of its own and grows at the floor"),
    Recipe("stack_continue", "G_stack, one schedule", (Stage(4, 0.2),),
           source="G_stack with one schedule over the run (no re-warm), as WSD runs use it"),
    Recipe("stack_late", "G_stack at 50%, one schedule", (Stage(4, 0.5),),
           source="the same, growing at half the FLOPs"),
    Recipe("doublings", "two doublings 2-4-8", (Stage(2), Stage(2)), prop=True,
           source="gradual stacking (Gong et al. 2019; MIDAS's Prop-1 stage lengths)"),
    Recipe("midas", "MIDAS 2-4-6-8", (Stage(None, layers="midas", block=2),) * 3, prop=True,
           source="Saunshi et al. 2024: each stage adds one copy of the middle block of 2 layers, Prop-1 lengths"),
    Recipe("middle_repeat", "middle window repeated 2-4-8", (Stage(2), Stage(2, layers="middle", block=2)),
           prop=True, source="x2, then the middle 2 of 4 layers repeated 3 times (0 1 2 1 2 1 2 3); Prop-1 lengths"),
    # The paper's other operators, each as its G_stack recipe: x4 at 20% of the FLOPs, the paper's schedule.
    *[Recipe(name, name, (Stage(4, 0.2),), schedule="paper", operator=name, source=spec.summary)
      for name, spec in OPERATORS.items() if name != "stack"],
    # The data study's arms (benchmarks/data_study.py): scratch, differing in how rows are read.
    Recipe("scratch_random", "scratch, random sampling", overrides=('data.sampling="random"',),
           source="windows drawn with replacement (the sampling before issue 28)"),
    Recipe("scratch_epoch", "scratch, epoch sampling", overrides=('data.sampling="epoch"',),
           source="every window once per epoch, in a shuffled order"),
    Recipe("scratch_docmask", "scratch, epoch sampling, document mask",
           overrides=('data.sampling="epoch"', "data.document_mask=true"),
           source="attention kept within each document of a row"),
    Recipe("scratch_rope_reset", "scratch, epoch sampling, document mask, RoPE reset",
           overrides=('data.sampling="epoch"', "data.document_mask=true", "model.rope_reset=true"),
           source="the same, positions restarting at 0 at each document"),
]}
DATA_RECIPES = ("scratch_random", "scratch_epoch", "scratch_docmask", "scratch_rope_reset")
# The recipe study's arms: the baselines, the paper's recipe and its schedule variants, the
# gradual recipes. stack_late and middle_repeat run by name (growth_study.py --recipes NAME ...).
GROWTH_RECIPES = ("scratch", "small", "stack_paper", "stack_restart", "stack_continue", "doublings", "midas")
OPERATOR_RECIPES = ("scratch", "small", "stack_paper", *(n for n in OPERATORS if n != "stack"))


def stage_models(target: ModelConfig, recipe: Recipe) -> list[ModelConfig]:
    """The model of each stage of the recipe, smallest first."""
    if recipe.small:
        return [OPERATORS["stack"].small_model(target, 4)]
    models = [target]
    for stage in reversed(recipe.stages):
        models.insert(0, OPERATORS[recipe.operator].small_model(models[0], stage.factor, stage.block))
    return models


def flop_shares(sizing, recipe: Recipe) -> list[float]:
    """The share of a run's FLOPs that each stage's model spends (one entry: all of it)."""
    if not recipe.grows:
        return [1.0]
    if recipe.prop:  # Prop-1: stage k trains on k / sum(1..K) of the tokens
        costs = [(k + 1) * m.flops_per_token(sizing.seq_len) for k, m in enumerate(stage_models(sizing.target, recipe))]
        return [c / sum(costs) for c in costs]
    ends = [s.flop_share for s in recipe.stages] + [1.0]
    return [b - a for a, b in zip([0.0] + ends[:-1], ends)]


def model_overrides(model: ModelConfig) -> list[str]:
    """--set overrides that give a run exactly this model shape."""
    fields = ("vocab_size", "n_layers", "hidden_size", "n_heads", "n_kv_heads", "ffn_size", "max_seq_len")
    return [f"model.{f}={getattr(model, f)}" for f in fields]


def recipe_config(sizing, recipe: Recipe, lr: float, kind: str, seed: int, device: str = "cpu",
                  flops: float | None = None) -> list[str]:
    """The --set overrides of one run of `recipe` spending `flops` (default: sizing.flops)
    at peak LR `lr` with schedule `kind`. sizing: a demo.Sizing (target, seq_len, batch, data)."""
    flops = sizing.flops if flops is None else flops
    models = stage_models(sizing.target, recipe)
    if recipe.prop:  # the steps that spend `flops` at Prop-1 lengths; the config's own timing places the events
        weights = range(1, len(models) + 1)
        per_token = sum(w * m.flops_per_token(sizing.seq_len) for w, m in zip(weights, models)) / sum(weights)
        steps = max(2 * len(models), round(flops / (per_token * sizing.tokens_per_step)))
        ats = ['"prop"'] * len(recipe.stages)
    else:  # each stage's steps spend its share of the FLOPs; an event after the steps before it
        per_stage = [sizing.steps(m, share * flops) for m, share in zip(models, flop_shares(sizing, recipe))]
        steps = sum(per_stage)
        ats = [str(sum(per_stage[:k + 1]) * sizing.tokens_per_step) for k in range(len(recipe.stages))]
    growth = []
    if recipe.grows:
        stack = recipe.operator == "stack"  # only G_stack takes layers and block
        tables = ", ".join(f'{{at = {at}' + (f", factor = {s.factor}" if s.factor else "")
                           + (f', layers = "{s.layers}", block = {s.block}}}' if stack else "}")
                           for at, s in zip(ats, recipe.stages))
        learns = OPERATORS[recipe.operator].learns
        steps -= LEARN_STEPS if learns else 0
        growth = [f"growth.stages=[{tables}]", f'growth.operator="{recipe.operator}"',
                  f'growth.schedule="{recipe.schedule}"', f"growth.learn_steps={LEARN_STEPS}",
                  f"growth.ramp_steps={max(1, int(RAMP_FRACTION * steps))}"]
    eval_every = max(1, steps // 8)
    return (model_overrides(models[-1]) + growth +
            [f'data.path="{sizing.data}"', f"data.seq_len={sizing.seq_len}", f"train.global_batch_size={sizing.batch}",
             f"optim.lr={lr}", f'schedule.kind="{kind}"', f"train.seed={seed}", f"train.max_steps={steps}",
             f"train.eval_every={eval_every}", "train.eval_batches=8", f"schedule.warmup_steps={max(1, steps // 10)}",
             f'train.device="{device}"', f"logging.log_every={eval_every}", "logging.progress=false",
             "logging.overwrite=true", *recipe.overrides])


@dataclass(frozen=True)
class Trial:
    """One run to do: a recipe at one setting, seed and budget."""
    recipe: str
    kind: str
    lr: float
    seed: int
    flops: float
    threads: int = 1

    @property
    def name(self) -> str:
        return f"{self.recipe}-{self.kind}-lr{self.lr:g}-seed{self.seed}-f{self.flops:.3g}-t{self.threads}"


def _pin(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _train_trial(trial: Trial, sizing, runs_dir: str, device: str) -> dict:
    """Run one trial (in a worker process pinned to trial.threads); its record."""
    from stackfast.metrics import read_metrics
    from stackfast.plot import val_curve
    from stackfast.train import run
    _pin(trial.threads)
    run_dir = Path(runs_dir) / trial.name
    cfg = load_config(None, recipe_config(sizing, RECIPES[trial.recipe], trial.lr, trial.kind, trial.seed, device,
                                          trial.flops))
    cfg.logging.run_dir = str(run_dir)
    summary = run(cfg)
    curve = val_curve(read_metrics(run_dir))
    return {**dataclasses.asdict(trial), "run_dir": str(run_dir), "val_loss": curve[-1][2],
            "run_flops": summary["flops"], "tokens": summary["tokens"], "growth_steps": summary["growth_steps"],
            "wall_s": summary["wall_s"]}


RECORDS = "records.jsonl"  # in a study's runs folder: every finished run, so a study can be continued


def load_records(runs_dir: Path) -> dict[Trial, dict]:
    """The runs a study finished before (run_many skips them)."""
    path = Path(runs_dir) / RECORDS
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    names = [f.name for f in dataclasses.fields(Trial)]
    return {Trial(**{n: r[n] for n in names}): r for r in records}


def run_many(trials: list[Trial], sizing, runs_dir: Path, device: str = "cpu", workers: int = 2,
             done: dict | None = None) -> dict[Trial, dict]:
    """Run the trials not in `done` (Trial -> record), `workers` at a time, each process
    pinned to its trial's thread count; returns `done` with theirs added (and appends their
    records to runs_dir/records.jsonl). The workers end with this process, whatever ends it
    (_end_with_parent; a SIGTERM here also stops them first)."""
    done = {} if done is None else done
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    todo = [t for t in dict.fromkeys(trials) if t not in done]
    if not todo:
        return done
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(t.threads for t in todo))  # read by the workers' OpenMP at start
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_end_with_parent,
                                                  initargs=(os.getpid(),))
    try:
        with _restore_env(threads), _sigterm_raises():
            futures = {pool.submit(_train_trial, t, sizing, str(runs_dir), device): t for t in todo}
            for future in concurrent.futures.as_completed(futures):
                trial = futures[future]
                record = future.result()
                done[trial] = record
                with open(Path(runs_dir) / RECORDS, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"  {trial.recipe:<15} {trial.kind:<6} lr {trial.lr:<7g} seed {trial.seed}  "
                      f"{record['run_flops']:.3g} FLOPs  {trial.threads} thread(s)  val loss "
                      f"{record['val_loss']:.4f}  ({record['wall_s']:.0f} s)", flush=True)
    except BaseException:  # a signal, Ctrl-C or a failed run: the other runs stop now, not when they finish
        # (the executor has no public way to stop work in progress: its processes are killed)
        for process in list((pool._processes or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return done


def _end_with_parent(parent: int) -> None:
    """A worker's first step: die with the process that started it. On Linux the kernel sends
    SIGKILL when the parent ends (prctl PR_SET_PDEATHSIG; a parent already gone is caught by
    the ppid check after it); elsewhere a thread polls the parent's pid once a second."""
    import ctypes
    import threading
    import time
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != parent:
        os._exit(1)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM (what `timeout` and job schedulers send) raises SystemExit(143) here, so that
    run_many stops its workers before the process ends; the handler before is restored."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def _restore_env(threads: str | None):
    """Give the caller back its OMP_NUM_THREADS once the workers have started and finished."""
    try:
        yield
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads


def tune(recipes: list[str], sizing, runs_dir: Path, device: str = "cpu", workers: int = 2,
         done: dict | None = None, kinds: tuple[str, ...] = KINDS) -> tuple[dict, dict]:
    """The search: every recipe, every schedule kind of `kinds` the recipe allows (Recipe.kinds),
    LRs from START stepped out along LR_LADDER until the best is interior; seed SEARCH_SEED.
    Returns ({recipe: {kind: best trial}}, every record)."""
    done = {} if done is None else done
    tried = {(r, k): list(START) for r in recipes for k in kinds if k in RECIPES[r].kinds}
    while True:
        trials = [Trial(r, k, lr, SEARCH_SEED, sizing.flops) for (r, k), lrs in tried.items() for lr in lrs]
        done = run_many(trials, sizing, runs_dir, device, workers, done)
        grown = False
        for (r, k), lrs in tried.items():
            losses = {lr: done[Trial(r, k, lr, SEARCH_SEED, sizing.flops)]["val_loss"] for lr in lrs}
            best = min(losses, key=losses.get)
            i = LR_LADDER.index(best)
            for j in (i - 1, i + 1):  # a best LR at the end of what was tried: try its neighbour
                if 0 <= j < len(LR_LADDER) and LR_LADDER[j] not in lrs:
                    lrs.append(LR_LADDER[j])
                    grown = True
        if not grown:
            break
    best = {}
    for (r, k), lrs in tried.items():
        trials = [Trial(r, k, lr, SEARCH_SEED, sizing.flops) for lr in lrs]
        best.setdefault(r, {})[k] = min(trials, key=lambda t: done[t]["val_loss"])
    return best, done


def chosen_settings(best: dict, done: dict) -> dict[str, Trial]:
    """Each recipe's search winner over both schedule kinds (tune's result)."""
    return {recipe: min(kinds.values(), key=lambda t: done[t]["val_loss"]) for recipe, kinds in best.items()}


def final_trials(chosen: dict[str, Trial], flops: float) -> dict[str, list[Trial]]:
    """The reported runs: each recipe at its chosen setting on FINAL_SEEDS, spending `flops`."""
    return {r: [dataclasses.replace(t, seed=s, flops=flops) for s in FINAL_SEEDS] for r, t in chosen.items()}


def search_table(best: dict, done: dict) -> dict:
    """{recipe: {kind: {lr: loss}}} of the search, and whether each best LR is interior."""
    out = {}
    for recipe, kinds in best.items():
        for kind, winner in kinds.items():
            losses = {t.lr: rec["val_loss"] for t, rec in done.items()
                      if (t.recipe, t.kind, t.seed, t.flops, t.threads) == (recipe, kind, SEARCH_SEED, winner.flops, 1)}
            lrs = sorted(losses)
            out.setdefault(recipe, {})[kind] = {"losses": {f"{lr:g}": losses[lr] for lr in lrs},
                                                "best_lr": winner.lr,
                                                "interior": lrs[0] < winner.lr < lrs[-1]
                                                or winner.lr in (LR_LADDER[0], LR_LADDER[-1])}
    return out


def stats(values: list[float]) -> dict:
    """Mean, sample std, min and max of final losses over seeds."""
    return {"values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p in (0.5, 1)) of Student's t distribution with `df` degrees of
    freedom: its density integrated by Simpson's rule and inverted by bisection (about 1e-9;
    no scipy)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:  # P(T <= x) for x >= 0
        h = x / n
        f = [c * (1 + (k * h) ** 2 / df) ** (-(df + 1) / 2) for k in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def t_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, tuple[float, float]]:
    """The mean of `values`, their sample std and the Student t interval on the mean (n - 1
    degrees of freedom; nan and an infinite interval below two values)."""
    n = len(values)
    mean = statistics.fmean(values) if values else math.nan
    sd = statistics.stdev(values) if n > 1 else math.nan
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) if n > 1 else math.inf
    return mean, sd, (mean - half, mean + half)


def paired(a: dict[int, float], b: dict[int, float], noise: float, confidence: float = CONFIDENCE) -> dict:
    """Arm a against arm b, paired by seed (a, b: seed -> final loss; the seeds both have):
    the differences a - b, their mean and its Student t interval (n - 1 degrees of freedom),
    and the verdict: 'lower' or 'higher' only when the interval excludes zero and the mean
    difference exceeds the noise floor, else a tie (and why)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    n = len(diffs)
    mean, sd, (low, high) = t_interval(diffs, confidence)
    if n < 2:
        verdict = "undecided (fewer than two seeds: no interval)"
    elif (high < 0 or low > 0) and abs(mean) > noise:
        verdict = "lower" if high < 0 else "higher"
    elif high < 0 or low > 0:
        verdict = f"a tie (the interval excludes zero, but the gap {abs(mean):.4f} is within the noise floor " \
                  f"{noise:.4f})"
    else:
        verdict = "a tie (the interval includes zero)"
    return {"seeds": seeds, "differences": diffs, "mean": mean, "std": sd, "interval": [low, high],
            "confidence": confidence, "noise_floor": noise, "verdict": verdict,
            "method": f"paired by seed; Student t interval on the mean difference, {n - 1} degrees of freedom"}


def paired_line(name_a: str, name_b: str, result: dict) -> str:
    """One line: a vs b, the mean paired difference with its interval, and the verdict."""
    low, high = result["interval"]
    return (f"{name_a} vs {name_b}: {result['mean']:+.4f} (a - b, {len(result['seeds'])} seeds paired, "
            f"{100 * result['confidence']:.0f}% t interval [{low:+.4f}, {high:+.4f}]): {result['verdict']}")


def losses_by_seed(runs: list[dict]) -> dict[int, float]:
    """seed -> final validation loss of run records (one arm's)."""
    return {r["seed"]: r["val_loss"] for r in runs}


def machine() -> dict:
    """The CPU the runs ran on, for bit-reproducibility: its model name and the vector
    instruction sets that change float rounding in torch's CPU kernels (from /proc/cpuinfo on
    Linux). A run is bit-reproducible on the same CPU model and instruction set at the same
    thread count and versions; on another CPU its final loss differs by float rounding (one
    rerun on another x86-64 moved 1.67654 to 1.67678)."""
    model, flags = "", []
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        if key.strip() == "flags" and not flags:
            have = set(value.split())
            flags = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
                     if f in have]
    import torch
    return {"cpu": model or platform.processor() or platform.machine(), "instruction_sets": flags, "machine": platform.machine(), "os_cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bit_reproducible": "on this CPU model and instruction set, at the pinned thread count and these "
                                "versions; elsewhere within the noise floor, not bit for bit"}


def speedups_per_seed(scratch: list[dict], half: list[dict], full: list[dict]) -> list[float | None]:
    """`speedup` seed by seed: each scratch run's final loss against the recipe's B/2 and B runs
    of the same seed (run records with seed, val_loss and run_flops)."""
    def of_seed(runs: list[dict], seed: int) -> dict:
        return next(r for r in runs if r["seed"] == seed)
    return [speedup(s["val_loss"], of_seed(half, s["seed"]), of_seed(full, s["seed"]), s["run_flops"])
            for s in scratch]


def speedup(scratch_loss: float, half: dict, full: dict, budget: float) -> float | None:
    """The speedup at scratch's final loss from complete runs of a recipe at B/2 and B:
    sp = B / (the budget at which the recipe reaches that loss, log-interpolated) - 1.
    None: the full run does not reach it; >= 1.0 is capped at 1.0 (the half run does)."""
    if full["val_loss"] > scratch_loss:
        return None
    if half["val_loss"] <= scratch_loss:
        return 1.0
    t = (half["val_loss"] - scratch_loss) / (half["val_loss"] - full["val_loss"])
    needed = math.exp(math.log(half["run_flops"]) + t * (math.log(full["run_flops"]) - math.log(half["run_flops"])))
    return budget / needed - 1.0


def check_recipes(names: list[str]) -> None:
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise StackfastError(f"unknown recipe {unknown[0]!r}; known: {', '.join(RECIPES)}")
