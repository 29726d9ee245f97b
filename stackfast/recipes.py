"""Training recipes at an equal FLOP budget, and the protocol that compares them honestly.

A recipe is how a run spends its budget: the target from scratch, the small model alone,
or growth with its stages (when, by how much, which layers) and its schedule across them.
The protocol (`tune`, `finals`) gives every recipe the same treatment:

- the same search: each schedule kind (cosine, WSD) over a ladder of peak LRs, extended
  until the best LR of each kind is interior (never at the end of what was tried);
- the search on seed 1, the reported runs on fresh seeds (2, 3, 4): the search's winner is
  not also its own evidence;
- a pinned thread count: the runs are bit-reproducible at a given setting (`run_many`
  checks one repeat), and the thread count itself is the run-to-run noise floor: the same
  seed at another thread count differs by float rounding alone (`noise_floor`);
- a recipe beats another only beyond both the seed spread (lower in every seed) and that
  noise floor; speedups are stated against the strongest scratch measured.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
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
FINAL_SEEDS = (2, 3, 4)


@dataclass(frozen=True)
class Stage:
    """One growth event of a recipe: the growth factor, the layers it repeats ('all', or
    'middle' with a block of `block` layers: MIDAS) and, for recipes that place events by
    FLOPs, the share of the budget spent before it."""
    factor: int
    flop_share: float = 0.0
    layers: str = "all"
    block: int = 0


@dataclass(frozen=True)
class Recipe:
    """How a run spends its FLOP budget. Without stages: the target (or, small=True, the
    small model of a x4 depth growth) from scratch. With stages: growth events (operator,
    G_stack by default) at their FLOP shares, or (prop=True) at Prop-1 stage lengths in
    tokens (1 : 2 : 3 ...)."""
    name: str
    label: str
    stages: tuple[Stage, ...] = ()
    small: bool = False
    prop: bool = False
    schedule: str = "continue"  # growth.schedule: one schedule over the run, or 'restart' at each event
    operator: str = "stack"
    source: str = ""

    @property
    def grows(self) -> bool:
        return bool(self.stages)


# The LiGO operators train their expansion for LEARN_STEPS steps (each costs one grown-model
# step, so their runs train that many steps less: equal budgets); G_random's new parts fade
# in over RAMP_FRACTION of a run's steps.
LEARN_STEPS, RAMP_FRACTION = 20, 0.2

RECIPES = {r.name: r for r in [
    Recipe("scratch", "scratch", source="the baseline"),
    Recipe("small", "small alone", small=True, source="the x4 small model alone: what growth must beat too"),
    Recipe("stack_paper", "G_stack, the paper's (restart)", (Stage(4, 0.2),), schedule="restart",
           source="Du et al. 2024: x4 at 20% of the FLOPs here, a fresh schedule after growth"),
    Recipe("stack_continue", "G_stack, one schedule", (Stage(4, 0.2),),
           source="G_stack with one schedule over the run (no re-warm), as WSD runs use it"),
    Recipe("stack_late", "G_stack at 50%", (Stage(4, 0.5),), source="the same, growing at half the FLOPs"),
    Recipe("doublings", "two doublings 2-4-8", (Stage(2), Stage(2)), prop=True,
           source="gradual stacking (Gong et al. 2019; MIDAS's Prop-1 stage lengths)"),
    Recipe("midas", "MIDAS middle copies", (Stage(2), Stage(2, layers="middle", block=2)), prop=True,
           source="Saunshi et al. 2024: the middle block repeated, Prop-1 stage lengths"),
    # The paper's other operators, each as its G_stack recipe: x4 at 20% of the FLOPs, restart.
    *[Recipe(name, name, (Stage(4, 0.2),), schedule="restart", operator=name, source=spec.summary)
      for name, spec in OPERATORS.items() if name != "stack"],
]}
GROWTH_RECIPES = ("scratch", "small", "stack_paper", "stack_continue", "stack_late", "doublings", "midas")
OPERATOR_RECIPES = ("scratch", "small", "stack_paper", *(n for n in OPERATORS if n != "stack"))


def stage_models(target: ModelConfig, recipe: Recipe) -> list[ModelConfig]:
    """The model of each stage of the recipe, smallest first."""
    if recipe.small:
        return [OPERATORS["stack"].small_model(target, 4)]
    models = [target]
    for stage in reversed(recipe.stages):
        models.insert(0, OPERATORS[recipe.operator].small_model(models[0], stage.factor))
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
        tables = ", ".join(f'{{at = {at}, factor = {s.factor}'
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
             "logging.overwrite=true"])


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
    records to runs_dir/records.jsonl)."""
    done = {} if done is None else done
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    todo = [t for t in dict.fromkeys(trials) if t not in done]
    if not todo:
        return done
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(t.threads for t in todo))  # read by the workers' OpenMP at start
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool, _restore_env(threads):
        futures = {pool.submit(_train_trial, t, sizing, str(runs_dir), device): t for t in todo}
        for future in concurrent.futures.as_completed(futures):
            trial = futures[future]
            record = future.result()
            done[trial] = record
            with open(Path(runs_dir) / RECORDS, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"  {trial.recipe:<15} {trial.kind:<6} lr {trial.lr:<7g} seed {trial.seed}  "
                  f"{record['run_flops']:.3g} FLOPs  {trial.threads} thread(s)  val loss {record['val_loss']:.4f}  "
                  f"({record['wall_s']:.0f} s)", flush=True)
    return done


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
         done: dict | None = None) -> tuple[dict, dict]:
    """The search: every recipe, every schedule kind, LRs from START stepped out along
    LR_LADDER until the best is interior; seed SEARCH_SEED. Returns ({recipe: {kind: best
    trial}}, every record)."""
    done = {} if done is None else done
    tried = {(r, k): list(START) for r in recipes for k in KINDS}
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


def verdict(a: dict, b: dict, noise: float) -> str:
    """How losses `a` stand against `b`: lower or higher only beyond the seed spread (every
    seed) and the noise floor (the means differ by more than it)."""
    gap = a["mean"] - b["mean"]
    if len(a["values"]) < 2 or len(b["values"]) < 2:
        return ("lower" if gap < 0 else "higher") + " (one seed: no spread measured)"
    if a["max"] < b["min"] and -gap > noise:
        return "lower (every seed, beyond the noise floor)"
    if a["min"] > b["max"] and gap > noise:
        return "higher (every seed, beyond the noise floor)"
    return "a tie (within the seed spread or the noise floor)"


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
