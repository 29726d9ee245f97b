"""The `stackfast` command (also `python -m stackfast`).

Every user error (bad config key, missing file, refused overwrite) ends as one line on
stderr, `stackfast: error: ...`, and exit status 2; argparse's own usage errors exit 2 too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Callable

from stackfast import __version__
from stackfast.config import StackfastError, check_device, describe, load_config
from stackfast.errors import report_errors
from stackfast.files import first_line
from stackfast.growth_operators import OPERATORS, operator_spec


def cmd_demo(args) -> int:
    from stackfast.demo import CPU_SIZING, QUICK_DIVISOR, gpu_sizing, run_demo, run_equivalents
    from stackfast.train import resolve_device
    run_dir = Path(args.run_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise StackfastError(f"{run_dir} already exists and is not empty; choose another --run-dir")
    for name in ("flops", "lr", "minutes"):
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:
            raise StackfastError(f"--{name} must be a positive finite number, got {value}")
    if args.seeds < 1:
        raise StackfastError(f"--seeds must be at least 1, got {args.seeds}")
    check_device(args.device, "--device")
    device = resolve_device(args.device)
    sizing = CPU_SIZING
    if device.type == "cuda" and args.flops is None and not args.quick:
        import torch
        from stackfast.data import TokenData, builtin_dataset
        corpus = TokenData(builtin_dataset(byte_level=True)).train_tokens
        print(f"sizing the demo for {torch.cuda.get_device_name(device)}: measuring throughput ...", flush=True)
        sizing = gpu_sizing(str(device), args.minutes, corpus, runs=run_equivalents(args.seeds))
    if args.quick:
        sizing = dataclasses.replace(sizing, flops=sizing.flops / QUICK_DIVISOR)
    if args.flops is not None:
        sizing = dataclasses.replace(sizing, flops=args.flops)
    if args.lr is not None:
        sizing = sizing.with_lr(args.lr)
    run_demo(run_dir, sizing, seeds=args.seeds, device=str(device))
    return 0


def cmd_plot(args) -> int:
    from stackfast.plot import plot_runs
    out = plot_runs(args.runs, _output_file(args.out, args.force, create_parent=True), labels=args.label or None)
    print(f"wrote {out}")
    return 0


def cmd_tokenize(args) -> int:
    from stackfast.data import DEFAULT_PATTERNS, available_cores, merge, tokenize
    if args.merge:
        if args.input or args.tokenizer or args.out or args.part:
            raise StackfastError("--merge OUT PART... takes no --input, --tokenizer, --out or --part")
        if len(args.merge) < 2:
            raise StackfastError("--merge: expected the output folder, then the part folders")
        index = merge(args.merge[0], args.merge[1:], force=args.force)
        print(f"wrote {args.merge[0]}: {len(index['parts'])} parts, {index['total_tokens']} tokens (vocab "
              f"{index['vocab_size']}, tokenizer {index['tokenizer']['spec']}); it refers to the parts' shards: "
              f"keep the folders together")
        return 0
    missing = [f"--{name}" for name in ("input", "tokenizer", "out") if not getattr(args, name)]
    if missing:
        raise StackfastError(f"tokenize needs {', '.join(missing)} (or --merge OUT PART...)")
    if args.shard_tokens < 1:  # 0 would write empty shard files forever
        raise StackfastError(f"--shard-tokens must be a positive number of tokens, got {args.shard_tokens}")
    part = None
    if args.part is not None:
        i, slash, n = args.part.partition("/")
        if not (slash and i.isdigit() and n.isdigit()):
            raise StackfastError(f"--part: expected I/N such as 0/4 (part I of N, from 0), got {args.part!r}")
        part = (int(i), int(n))
    workers = available_cores() if args.workers is None else args.workers
    if workers < 1:
        raise StackfastError(f"--workers must be a positive number of processes, got {workers}")
    index = tokenize(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction,
                     shard_tokens=args.shard_tokens, force=args.force,
                     patterns=args.pattern or DEFAULT_PATTERNS, utf8_errors=args.utf8_errors,
                     text_field=args.text_field, strict=args.strict, workers=workers, part=part,
                     allow_special_tokens=args.allow_special_tokens)
    n_train = sum(s["tokens"] for s in index["train"])
    n_val = sum(s["tokens"] for s in index["val"])
    print(f"wrote {args.out}: {n_train} train + {n_val} val tokens ({index['dtype']}, vocab "
          f"{index['vocab_size']}, tokenizer {index['tokenizer']['spec']})"
          + (f", part {part[0]}/{part[1]}" if part else ""))
    if "skipped" in index:
        rows, field, first = index["skipped"]["rows"], index["skipped"]["text_field"], index["skipped"]["first"]
        print(f"note: skipped {rows} row{'s' * (rows != 1)} without a string '{field}' field (first: {first}); "
              f"--strict refuses them", file=sys.stderr)
    if "repeated" in index:
        files, first = index["repeated"]["files"], index["repeated"]["first"]
        print(f"note: {files} input file{'s' * (files != 1)} given more than once (first: {first}), each "
              f"tokenized once, at its first place", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    from stackfast.config import INT64_MAX, PAPER_LR, config_from_dict, dumps_toml
    from stackfast.growth.guidelines import budget, plan
    from stackfast.growth.stages import growth_steps, stage_models
    out = _output_file(args.out, args.force) if args.out else None
    recipe = PLAN_RECIPES[args.recipe]
    # Only a recipe that grows at the paper's d needs d to fit the budget.
    p = (plan if recipe.at_d else budget)(args.params, tokens=args.tokens, flops=args.flops)
    if out and not p["tokens"] <= INT64_MAX:  # checked before printing the plan: it could not be written
        raise StackfastError(f"--out: a budget of {p['tokens']:.3g} tokens does not fit train.total_tokens "
                             f"(TOML integers end at {INT64_MAX:.3g})")
    target = p["target"]
    cfg = config_from_dict({
        "model": {"preset": p["preset"]},
        "data": {"path": "data/tokens", "seq_len": 2048},
        "optim": {"lr": PAPER_LR[p["preset"]]},
        "schedule": {"warmup_steps": 3000, "min_lr_ratio": 0.1, **recipe.schedule},
        "train": {"total_tokens": int(min(p["tokens"], INT64_MAX)), "global_batch_size": 1024,
                  "micro_batch_size": 4},
        "growth": {"operator": "stack", "small_lr": 1e-3, **recipe.growth(p)},
        "parallel": {"activation_checkpointing": "full"},
        "checkpoint": {"every_steps": 1000, "resume": "auto"},
        "logging": {"run_dir": f"runs/{p['preset']}-{args.recipe}"},
    })
    print(f"target        {p['target_params'] / 1e9:.3g}B parameters (preset {p['preset']}: "
          f"{target['n_layers']} layers, hidden {target['hidden_size']})")
    print(f"budget        {p['tokens'] / 1e9:.4g}B tokens, {p['flops']:.3g} FLOPs "
          f"({p['tokens_per_param']:.1f} tokens per parameter)")
    print(f"recipe        {args.recipe}: {recipe.note}")
    if recipe.at_d:
        print(f"grow at       d = {p['growth_tokens'] / 1e9:.4g}B tokens (paper's timing formula), "
              f"factor g = {p['factor']}")
    # The stages of the config written: each model's layers, tokens and FLOPs (6 N per token).
    total = cfg.total_steps()
    bounds = [0, *growth_steps(cfg, total), total]
    stage_flops = []
    for k, model in enumerate(stage_models(cfg)):
        tokens = (bounds[k + 1] - bounds[k]) * cfg.tokens_per_step()
        stage_flops.append(6.0 * model.num_params() * tokens)
        print(f"{'small model' if k == 0 else 'grown model':<13} {model.n_layers} layers x hidden "
              f"{model.hidden_size} ({model.num_params() / 1e9:.3g}B parameters) for {tokens / 1e9:.4g}B tokens")
    print(f"compute       {' + '.join(f'{f:.3g}' for f in stage_flops)} FLOPs "
          f"({100 * sum(stage_flops[:-1]) / sum(stage_flops):.1f}% before the last growth)")
    if p["tokens_per_param"] < 10:
        print("warning       far below ~20 tokens per parameter: a smaller model may beat any grown one here")
    if out:
        out.write_text("# Written by `stackfast plan`; set data.path to your tokenized corpus.\n"
                       + dumps_toml(cfg.to_dict()))
        print(f"config        {out}")
    return 0


@dataclasses.dataclass(frozen=True)
class PlanRecipe:
    """A recipe `stackfast plan --recipe` writes: its [growth] (from the plan) and [schedule]."""
    note: str
    growth: Callable[[dict], dict]
    schedule: dict
    at_d: bool = True  # grows once at the paper's timing d (which must fit the budget)


# The paper's is the default (measured at 410M-7B); the others are the recipe study's
# (docs/method.md), measured at CPU scale only, and said so.
PLAN_RECIPES = {
    "paper": PlanRecipe("the paper's, as its code runs it: x4 at d; the small model on the first part of a long "
                        "cosine (near its peak LR when it grows), the grown model a fresh warmup + cosine",
                        lambda p: {"factor": p["factor"], "at_tokens": int(p["growth_tokens"]), "schedule": "paper"},
                        {"kind": "cosine"}),
    "wsd": PlanRecipe("x4 at d under one warmup-stable-decay schedule (no re-warm); measured at CPU scale only",
                      lambda p: {"factor": p["factor"], "at_tokens": int(p["growth_tokens"]), "schedule": "continue"},
                      {"kind": "wsd"}),
    "doublings": PlanRecipe("x2 twice at Prop-1 lengths (1/6 and 1/2 of the tokens) under one warmup-stable-decay "
                            "schedule (no timing d); measured at CPU scale only",
                            lambda p: {"factor": 2, "stages": [{"at": "prop"}, {"at": "prop"}], "schedule": "continue"},
                            {"kind": "wsd"}, at_d=False),
}


def _refuse_existing(out: Path, force: bool, source: Path) -> None:
    """An output folder must not be the input (or hold it, or lie inside it); an existing
    non-empty one is replaced only with --force, and only if stackfast wrote it."""
    out_r, source_r = out.resolve(), source.resolve()
    if out_r == source_r or out_r in source_r.parents or source_r in out_r.parents:
        raise StackfastError(f"--out {out} overlaps --checkpoint {source}: the input is never overwritten; "
                             f"choose another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise StackfastError(f"{out} already exists and is not empty (use --force to replace it)")
        if not (out / "checksums.json").is_file():
            raise StackfastError(f"{out}: --force replaces only a folder that stackfast wrote (with checksums.json); "
                                 f"this one holds other files: remove it yourself or choose another --out")


def _output_file(name: str, force: bool, create_parent: bool = False) -> Path:
    """An --out file that may be written: not a folder, not an existing file unless
    `force`, in a folder that exists (or, with create_parent, can be made)."""
    out = Path(name)
    if out.is_dir():
        raise StackfastError(f"--out {out}: is a folder; name a file")
    if out.exists() and not force:
        raise StackfastError(f"--out {out}: already exists (use --force to replace it)")
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("."))
    if not parent.is_dir() or (parent != out.parent and not create_parent):
        raise StackfastError(f"--out {out}: folder {out.parent} does not exist")
    return out


def _positive(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise StackfastError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")


def _learning_batches(data_path: str, seq_len: int, vocab_size: int):
    """LiGO's training batches from a dataset (the built-in corpus by default)."""
    from stackfast.config import DataConfig
    from stackfast.data import TokenLoader, open_data
    loader = TokenLoader(open_data(DataConfig(path=data_path, seq_len=seq_len), vocab_size), seq_len, 8)
    return lambda step: loader.batch(step)


def cmd_grow(args) -> int:
    from stackfast.checkpoint import is_hf_dir, load_config_of, load_model_source, model_from_weights, save_hf, \
        save_weights_folder
    from stackfast.config import Config, parse_value
    from stackfast.growth import apply_growth, check_growth
    spec = operator_spec(args.operator)  # an unknown name fails before anything is read
    source, out = Path(args.checkpoint), Path(args.out)
    _refuse_existing(out, args.force, source)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        if not key.strip() or not _:
            raise StackfastError(f"--option {item!r}: expected key=value")
        options[key.strip()] = parse_value(value.strip())
    check_growth(args.operator, args.factor, options)  # before the checkpoint is read
    model_cfg, weights = load_model_source(source, args.allow_unverified)
    model = model_from_weights(dataclasses.replace(model_cfg, kernels="torch"), weights, source)
    if spec.sharded:
        options.setdefault("in_place", True)  # the loaded model is used only to grow: adopt, do not copy it
    if spec.learns:
        options["batches"] = _learning_batches(args.data, min(256, model_cfg.max_seq_len), model_cfg.vocab_size)
    growth = apply_growth(model, args.operator, args.factor, **options)
    grown = growth.model
    grown.config = dataclasses.replace(grown.config, kernels=model_cfg.kernels)
    fmt = args.format or ("hf" if is_hf_dir(source) else "stackfast")
    if fmt == "hf":
        tokenizer = next((source / n for n in ("tokenizer.json", "tokenizer.model") if (source / n).is_file()), None)
        save_hf(out, grown, tokenizer)
    else:
        cfg = Config() if is_hf_dir(source) else load_config_of(source)
        cfg.model = grown.config
        save_weights_folder(out, grown, cfg, {"step": 0, "growth_spec": growth.spec})
    print(f"grew {model.num_params() / 1e6:.2f}M -> {grown.num_params() / 1e6:.2f}M parameters with "
          f"{args.operator} x{args.factor}: {grown.config.n_layers} layers, hidden {grown.config.hidden_size}")
    if "layer_map" in growth.spec:
        print(f"layer map     {growth.spec['layer_map']}  (grown layer i copies small layer map[i]; -1 = new)")
    if spec.ramp:
        print(f"note          {args.operator} fades new parts in during training; saved here at full strength. "
              f"Use [growth] in a run to get the fade-in.")
    print(f"wrote {out} ({fmt})")
    return 0


def _run_tokenizer(source: Path) -> Path | None:
    """The tokenizer file of a stackfast checkpoint's run (None for 'bytes' or missing data)."""
    from stackfast.checkpoint import load_config_of
    from stackfast.data import TokenData, resolve_path
    cfg = load_config_of(source)
    path = cfg.data.mixture()[0].path  # the sources of a mixture share their tokenizer (checked when it trained)
    try:  # the run's tokenizer goes alongside when its data folder is still there
        return TokenData(resolve_path(path, cfg.data.val_fraction)).tokenizer_file
    except StackfastError:
        print(f"note: the run's data ({path}) is not here; exported without a tokenizer", file=sys.stderr)
        return None


def cmd_export_hf(args) -> int:
    from stackfast.checkpoint import load_model, save_hf
    source, out = Path(args.checkpoint), Path(args.out)
    _refuse_existing(out, args.force, source)
    model = load_model(source, allow_unverified=args.allow_unverified)  # verifies config.toml before it is read
    tokenizer = _run_tokenizer(source)
    save_hf(out, model, tokenizer)
    print(f"wrote {out}: LlamaForCausalLM, {model.num_params() / 1e6:.2f}M parameters"
          + (f", tokenizer {tokenizer.name}" if tokenizer else ""))
    return 0


def cmd_eval(args) -> int:
    import torch
    from stackfast.checkpoint import is_hf_dir, load_config_of, load_model
    from stackfast.config import DataConfig
    from stackfast.data import TokenData, TokenLoader, resolve_path
    from stackfast.train import autocast_context, evaluate, resolve_device
    source = Path(args.checkpoint)
    # Every argument, the output file and the data are checked before the model is loaded.
    _positive(args, "batches", "batch_size", "seq_len")
    check_device(args.device, "--device")
    out = _output_file(args.out, args.force) if args.out else None
    device = resolve_device(args.device)
    if not source.is_dir():
        raise StackfastError(f"{source}: no such checkpoint folder")
    if args.tasks:
        return _lm_eval(args, source, device)
    if args.data:
        data_path = args.data
    elif not is_hf_dir(source):
        sources = load_config_of(source).data.mixture()
        if len(sources) > 1:
            raise StackfastError(f"{source} trained on a mixture ({', '.join(s.name for s in sources)}): give --data, "
                                 f"the tokenized folder to evaluate on")
        data_path = sources[0].path
    else:
        raise StackfastError("--data is needed for a Hugging Face checkpoint (a `stackfast tokenize` folder)")
    vocab_size, max_seq_len = _model_shape(source)
    seq_len = min(args.seq_len, max_seq_len)
    data = TokenData(resolve_path(data_path, DataConfig().val_fraction), vocab_size=vocab_size)
    loader = TokenLoader(data, seq_len, args.batch_size)
    loader.check_validation()
    model = load_model(source, "auto", args.allow_unverified).to(device)
    n_rows = args.batches * args.batch_size
    loss = evaluate(model, loader, n_rows, device, autocast_context("auto", device))
    n_tokens = sum(y.numel() for _, y in loader.val_batches(n_rows))
    result = {"checkpoint": str(source), "data": str(data.folder), "val_loss": loss, "perplexity": math.exp(loss),
              "tokens": n_tokens, "seq_len": seq_len, "params": model.num_params(), "device": str(device),
              "torch": torch.__version__}
    print(json.dumps(result))
    print(f"val_loss {loss:.4f}  perplexity {math.exp(loss):.2f}  ({n_tokens} held-out tokens, seq {seq_len})",
          file=sys.stderr)
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _model_shape(source: Path) -> tuple[int, int]:
    """(vocab_size, max_seq_len) of a checkpoint, read from its config without the weights."""
    from stackfast.checkpoint import is_hf_dir, load_config_of, load_hf
    if not is_hf_dir(source):
        model_cfg = load_config_of(source).model
        return model_cfg.vocab_size, model_cfg.max_seq_len
    try:
        hf = json.loads((source / "config.json").read_text())
        return int(hf["vocab_size"]), int(hf.get("max_position_embeddings", 2048))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # let the loader name what is wrong
        model_cfg = load_hf(source)[0]
        return model_cfg.vocab_size, model_cfg.max_seq_len


def _lm_eval(args, source: Path, device) -> int:
    """Score the checkpoint on lm-evaluation-harness tasks (`pip install 'stackfast[eval]'`).

    A stackfast checkpoint is exported to a temporary Hugging Face folder first, with its
    run's tokenizer; a Hugging Face folder is passed as it is. Prints one line per task
    and metric and the JSON of lm-eval's results (also written to --out)."""
    import tempfile
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise StackfastError("--tasks needs lm-evaluation-harness: pip install 'stackfast[eval]' (task data "
                             "must be available locally or downloadable)") from None
    from stackfast.checkpoint import is_hf_dir, load_model, save_hf
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise StackfastError(f"--tasks {args.tasks!r}: no task names (give a comma-separated list)")
    if args.limit is not None and args.limit < 1:
        raise StackfastError(f"--limit must be a positive integer, got {args.limit}")
    if args.task_path and not Path(args.task_path).is_dir():
        raise StackfastError(f"--task-path {args.task_path}: not a folder")
    task_manager = TaskManager(include_path=args.task_path)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise StackfastError(f"--tasks: unknown to lm-evaluation-harness: {', '.join(unknown)} "
                             "(`lm-eval ls tasks` lists them; --task-path adds a folder of task YAML files)")
    _load_tasks(tasks, task_manager)
    with tempfile.TemporaryDirectory() as tmp:
        folder = source
        if not is_hf_dir(source):
            folder = Path(tmp) / "hf"
            save_hf(folder, load_model(source, allow_unverified=args.allow_unverified), _run_tokenizer(source))
        results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32",
                                          tasks=tasks, task_manager=task_manager, device=str(device),
                                          batch_size=args.batch_size, limit=args.limit)
    scores = results["results"]
    for task, metrics in scores.items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not name.endswith("_stderr,none") and name != "alias":
                print(f"{task:24} {name.replace(',none', ''):14} {value:.4f}", file=sys.stderr)
    print(json.dumps(scores, indent=1, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(scores, indent=1, default=str) + "\n")
    return 0


def _load_tasks(tasks: list[str], task_manager) -> None:
    """Load every task and its data once before the model is exported, so a task whose data
    is missing or unreadable is one line naming the task, not a traceback from the middle of
    the evaluation. lm-eval loads them again in simple_evaluate (from the datasets cache)."""
    from lm_eval.tasks import get_task_dict
    load = getattr(task_manager, "load", None) or (lambda names: get_task_dict(names, task_manager))
    for task in tasks:
        try:
            load([task])
        except Exception as e:  # any failure of lm-eval or datasets while reading the task's files
            raise StackfastError(f"--tasks {task}: lm-evaluation-harness could not load the task: "
                                 f"{type(e).__name__}: {first_line(e)}") from None


def cmd_bench(args) -> int:
    from stackfast.bench import harness, run_all
    try:
        harness.results_folder(args.out)
    except ValueError as error:
        raise StackfastError(str(error)) from None
    return run_all.main((["--cpu"] if args.cpu else []) + (["--quick"] if args.quick else [])
                        + (["--out", args.out] if args.out else []))


def info() -> dict:
    """Versions, device, kernel selection and compiled parts."""
    import torch
    from stackfast.float8 import info as float8_info
    from stackfast.model import use_triton
    from stackfast.ops import extension_info, extension_summary
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    out = {
        "stackfast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "cuda": torch.version.cuda,
        "kernels_auto": "triton" if use_triton("auto", device) else "torch",
        "extension": extension_info(),  # which compiled parts of csrc/ import (cpu, cuda)
        "replicate_": extension_summary(),  # says so in one line when the PyTorch fallback runs
        # train.float8: torchao's version and whether float8 runs here (this GPU, or emulated on CPU)
        "float8": float8_info(device),
    }
    return out


def check_kernels_now(config: str | None, overrides: list[str]) -> tuple[str, dict]:
    """`info --check`: every Triton kernel checked now on the configured device, at the model's
    sizes and the run's dtype (stackfast.kernel_check); the cached verdicts are replaced.
    Returns what was checked (device, versions, shapes) and the verdicts."""
    import torch
    from stackfast import kernel_check
    from stackfast.model import check_kernels, triton_runs_on
    from stackfast.train import resolve_device, use_bf16
    cfg = load_config(config, overrides)
    device = resolve_device(cfg.train.device)
    if not triton_runs_on(device):  # said for this command, not model.kernels
        raise StackfastError(f"info --check runs the Triton kernels on train.device ({device.type}): it needs a CUDA "
                             f"device, or TRITON_INTERPRET=1 to check them in the (slow) Triton interpreter")
    check_kernels("triton", device)  # and the triton package
    shapes = kernel_check.Shapes.of(cfg.model, torch.bfloat16 if use_bf16(cfg.train.dtype, device) else torch.float32)
    verdicts = kernel_check.cached_checks(shapes, device, kernel_check.OPS, fresh=True)
    return kernel_check.cache_key(shapes, device), verdicts


def cmd_info(args) -> int:
    data = info()
    verdicts = {}
    if args.check:
        checked, verdicts = check_kernels_now(args.config, args.set)
        data["kernel_check"] = {"checked": checked, **{op: v.text() for op, v in verdicts.items()}}
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        for key, value in data.items():
            if key == "kernel_check":
                print(f"{key:14} {value.pop('checked')}")
                for op, text in value.items():
                    print(f"  {op:21} {text}")
            else:
                print(f"{key:14} {value}")
    return 1 if any(not v.ok for v in verdicts.values()) else 0


def cmd_config(args) -> int:
    if args.show:
        print(load_config(args.show, args.set).to_toml())
    else:
        print(describe())
    return 0


UNVERIFIED_HELP = "read a checkpoint that has no checksums.json (a changed or corrupt file would go unnoticed)"


def build_parser() -> argparse.ArgumentParser:
    # Here, not at the top: this module imports no torch, so that the workers of `stackfast tokenize`,
    # spawned processes that import the command's module again, do not load it.
    from stackfast.demo import BEST, CPU_SIZING, DEMO_SEEDS
    from stackfast.train import add_train_arguments
    parser = argparse.ArgumentParser(prog="stackfast", description="Pre-train LLMs by model growth (G_stack).")
    parser.add_argument("--version", action="version", version=f"stackfast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_train_arguments(sub.add_parser("train", help="train a model from a config"))

    p = sub.add_parser("demo", help="G_stack vs scratch vs small alone at equal FLOPs, with seeds, built-in corpus")
    p.add_argument("--run-dir", help="where runs go (default: a new runs/demo-<date>-<time>)")
    p.add_argument("--flops", type=float, help=f"FLOPs of a run (default {CPU_SIZING.flops:g} on CPU, the sizing "
                   "rule's 20 tokens per target parameter: about 5 minutes for all runs on 2 cores; on a GPU: sized from "
                   "measured throughput)")
    p.add_argument("--lr", type=float, help="one peak LR for every run (default: each arm's best schedule and LR in "
                   "the recipe study's search, e.g. " + ", ".join(f"{r} {k} {lr:g}" for r, (k, lr) in
                                                                  CPU_SIZING.settings.items() if r in ("scratch", BEST))
                   + f"; on a GPU scaled by sqrt({CPU_SIZING.target.hidden_size} / width))")
    p.add_argument("--seeds", type=int, default=DEMO_SEEDS, help=f"seeds, every arm on each, compared paired by "
                   f"seed (default {DEMO_SEEDS})")
    p.add_argument("--minutes", type=float, default=5.0, help="GPU: the time all runs may take (default 5)")
    p.add_argument("--quick", action="store_true",
                   help="a budget 10x smaller: checks the command in about a minute; says nothing about the method")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plot", help="validation loss vs tokens and FLOPs of runs (first = baseline)")
    p.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl)")
    p.add_argument("--out", required=True, help="image file to write (.png, .pdf, .svg, ...)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--label", action="append", default=[], help="a label per run, in order (repeatable)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("tokenize", help="turn text into token shards")
    p.add_argument("--input", nargs="+",
                   help="files (.jsonl: one document per line's --text-field; .parquet and a Hugging Face "
                        "dataset's folder (save_to_disk): one per row's --text-field; any other: one text "
                        "document) or folders, searched recursively for --pattern")
    p.add_argument("--pattern", action="append", metavar="GLOB",
                   help="file names to take from folders, e.g. '*.py' (repeatable; default '*.txt', '*.jsonl' "
                        "and '*.parquet')")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="the documents' field in .jsonl, Parquet and Arrow files (default 'text')")
    p.add_argument("--strict", action="store_true",
                   help="refuse a Parquet or Arrow row whose field is null or not a string (default: skip and "
                        "count it); a .jsonl line without it is always refused")
    p.add_argument("--utf8-errors", choices=("strict", "replace"), default="strict",
                   help="a file that is not UTF-8: refuse it (strict, the default) or read its bad bytes as U+FFFD")
    p.add_argument("--tokenizer", help="'bytes', a tokenizer.json or a SentencePiece .model")
    p.add_argument("--allow-special-tokens", action="store_true",
                   help="read a tokenizer.json's special tokens written in the text (e.g. '<|endoftext|>') as "
                        "their ids; by default they are text, and end-of-text comes only between documents")
    p.add_argument("--out", help="output folder (must be new or empty unless --force)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="held-out share (default 0.01)")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--workers", type=int, metavar="N",
                   help="processes that encode (default: the cores available); the output is the same at any N")
    p.add_argument("--part", metavar="I/N",
                   help="tokenize only part I of N (I from 0) of the input files, for several machines; "
                        "join the parts' folders with --merge")
    p.add_argument("--merge", nargs="+", metavar=("OUT", "PART"),
                   help="write the dataset folder OUT joining the folders of --part 0/N to N-1/N (it refers "
                        "to their shards: nothing is copied)")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("plan", help="the paper's growth timing and factor for a target size and budget")
    p.add_argument("--params", type=float, required=True, help="target model parameters, e.g. 7e9")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=float, help="total training tokens, e.g. 300e9")
    budget.add_argument("--flops", type=float, help="total training FLOPs")
    p.add_argument("--recipe", choices=PLAN_RECIPES, default="paper",
                   help="the growth recipe --out writes: " + "; ".join(f"{name}: {recipe.note}"
                                                                     for name, recipe in PLAN_RECIPES.items()))
    p.add_argument("--out", help="write a ready-to-run config (TOML) here")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("grow", help="grow a checkpoint (stackfast or Hugging Face) with an operator")
    p.add_argument("--checkpoint", required=True, help="stackfast checkpoint folder or Hugging Face Llama folder")
    p.add_argument("--operator", default="stack", help="growth operator (default stack): " + "; ".join(
        f"{name}: {spec.summary}" for name, spec in OPERATORS.items()))
    p.add_argument("--factor", type=int, default=4, help="growth factor g (default 4)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --force)")
    p.add_argument("--format", choices=("stackfast", "hf"), help="output format (default: the input's)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="operator option, e.g. layers=middle, noise=0.2, order=interpolate (repeatable)")
    p.add_argument("--data", default="builtin:python-stdlib", help="LiGO operators' training data")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--allow-unverified", action="store_true", help=UNVERIFIED_HELP)
    p.set_defaults(func=cmd_grow)

    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face LlamaForCausalLM folder")
    p.add_argument("--checkpoint", required=True, help="stackfast checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder that stackfast wrote")
    p.add_argument("--allow-unverified", action="store_true", help=UNVERIFIED_HELP)
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint (or lm-eval tasks)")
    p.add_argument("--checkpoint", required=True, help="stackfast checkpoint or Hugging Face Llama folder")
    p.add_argument("--data", help="tokenized folder or builtin:python-stdlib (default: the run's data)")
    p.add_argument("--batches", type=int, default=16, help="held-out batches (default 16)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the JSON result here")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks (pip install 'stackfast[eval]')")
    p.add_argument("--allow-unverified", action="store_true", help=UNVERIFIED_HELP)
    p.add_argument("--task-path", help="folder of extra lm-eval task YAML files (lm-eval's include_path)")
    p.add_argument("--limit", type=int, help="with --tasks: at most this many documents per task")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="the benchmark suite: ratios against baselines measured in the same run")
    p.add_argument("--cpu", action="store_true", help="the CPU subset (train step vs HF, replication, loader)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the suite")
    p.add_argument("--out", help="results folder (default: a checkout's benchmarks/results, else "
                   "./stackfast-bench-results)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="versions, device, kernels, compiled parts; --check: the kernel self-check")
    p.add_argument("--json", action="store_true")
    p.add_argument("--check", action="store_true",
                   help="check every Triton kernel against its PyTorch reference on this device now (forward and "
                   "backward, at the model and dtype of --config/--set), print each verdict, exit 1 if one fails")
    p.add_argument("--config", metavar="FILE", help="with --check: the run's config (default: the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="with --check")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("config", help="document every config field, or --show a resolved config")
    p.add_argument("--show", metavar="FILE", help="print FILE resolved (with --set applied) as TOML")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_errors(args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
