"""The `stackfast` command (also `python -m stackfast`).

Every user error (bad config key, missing file, refused overwrite) ends as one line on
stderr, `stackfast: error: ...`, and exit status 2; argparse's own usage errors exit 2 too.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from stackfast import __version__
from stackfast.config import StackfastError, describe, load_config


def cmd_train(args) -> int:
    from stackfast import train
    argv = (["--config", args.config] if args.config else []) + [x for s in args.set for x in ("--set", s)]
    argv += ["--resume", args.resume] if args.resume else []
    return train.main(argv)


DEMO_OVERRIDES = [
    # The toy model (8 layers, hidden 256, vocab 4096) on the standard library's source:
    # about 2 minutes on 2 CPU cores, a few seconds on a GPU.
    'model.preset="toy"', "data.seq_len=128", "train.micro_batch_size=16", "train.max_steps=150",
    "schedule.warmup_steps=15", "optim.lr=2e-3", "train.eval_every=50", "train.eval_batches=4",
    "logging.log_every=10",
]


def cmd_demo(args) -> int:
    from stackfast.metrics import read_metrics, sparkline
    from stackfast.train import run
    run_dir = Path(args.run_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    if run_dir.exists() and any(run_dir.iterdir()):
        raise StackfastError(f"{run_dir} already exists and is not empty; choose another --run-dir")
    cfg = load_config(None, DEMO_OVERRIDES + args.set)
    cfg.logging.run_dir = str(run_dir)
    print("stackfast demo: training the toy Llama (8 layers, hidden 256) on the Python standard "
          "library's source (built-in corpus, no download).", flush=True)
    summary = run(cfg)
    rows = read_metrics(run_dir)
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    print()
    print(f"  train loss   {losses[0]:.3f} -> {losses[-1]:.3f}   {sparkline(losses)}")
    print("  val loss     " + "  ".join(f"step {s}: {v:.3f}" for s, v in vals))
    print(f"  throughput   {summary['tokens_per_s']:.0f} tokens/s on {summary['device']} "
          f"({summary['tokens']} tokens in {summary['wall_s']:.0f} s, {summary['params'] / 1e6:.1f}M params)")
    print(f"  logs         {run_dir / 'metrics.jsonl'}; checkpoint in {run_dir / 'checkpoints'}")
    return 0


def cmd_tokenize(args) -> int:
    from stackfast.data import tokenize
    index = tokenize(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction,
                     shard_tokens=args.shard_tokens, force=args.force)
    n_train = sum(s["tokens"] for s in index["train"])
    n_val = sum(s["tokens"] for s in index["val"])
    print(f"wrote {args.out}: {n_train} train + {n_val} val tokens ({index['dtype']}, vocab "
          f"{index['vocab_size']}, tokenizer {index['tokenizer']['spec']})")
    return 0


def info() -> dict:
    """Versions, device, kernel selection and compiled parts."""
    import torch
    from stackfast.model import use_triton
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
    }
    return out


def cmd_info(args) -> int:
    data = info()
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        for key, value in data.items():
            print(f"{key:14} {value}")
    return 0


def cmd_config(args) -> int:
    if args.show:
        print(load_config(args.show, args.set).to_toml())
    else:
        print(describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stackfast", description="Pre-train LLMs by model growth (G_stack).")
    parser.add_argument("--version", action="version", version=f"stackfast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a config")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--resume", help="'auto' or a checkpoint folder")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train the toy model on the built-in corpus and summarise")
    p.add_argument("--run-dir", help="where logs go (default: a new runs/demo-<date>-<time>)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tokenize", help="turn text into token shards")
    p.add_argument("--input", nargs="+", required=True, help=".txt / .jsonl files or folders of them")
    p.add_argument("--tokenizer", required=True, help="'bytes', a tokenizer.json or a SentencePiece .model")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --force)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="held-out share (default 0.01)")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard file")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("info", help="versions, device, kernels, compiled parts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("config", help="document every config field, or --show a resolved config")
    p.add_argument("--show", metavar="FILE", help="print FILE resolved (with --set applied) as TOML")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StackfastError as e:
        print(f"stackfast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stackfast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
