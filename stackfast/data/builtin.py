"""The built-in corpus: the running Python's standard library source, tokenized once and cached."""
from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from stackfast.data.pipeline import tokenize
from stackfast.data.shards import FORMAT
from stackfast.data.tokenizer import train_bpe
from stackfast.errors import DataError

BUILTIN_STDLIB = "builtin:python-stdlib"
BUILTIN_STDLIB_BYTES = "builtin:python-stdlib-bytes"  # the same text, byte-level (vocab 256): the demo's
BUILTIN_VOCAB = 4096


def cache_dir() -> Path:
    """$STACKFAST_CACHE, else the user's cache folder: $XDG_CACHE_HOME/stackfast or ~/.cache/stackfast."""
    if os.environ.get("STACKFAST_CACHE"):
        return Path(os.environ["STACKFAST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stackfast"


def stdlib_files() -> list[Path]:
    """The running Python's standard library source, without its test suites (sorted)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skip]  # prune: site-packages can be huge
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(files)


def builtin_dataset(val_fraction: float = 0.01, byte_level: bool = False) -> Path:
    """Build (once, cached, under a lock) and return the folder of `builtin:python-stdlib`
    (or, with `byte_level`, of `builtin:python-stdlib-bytes`).

    A byte-level BPE with vocab 4096 is trained locally with `tokenizers` on the source
    text, so nothing is ever downloaded; the byte-level corpus needs no tokenizer at all.
    """
    files = stdlib_files()
    if not files:
        raise DataError(f"{BUILTIN_STDLIB}: no standard library source found under "
                        f"{sysconfig.get_paths()['stdlib']}")
    vocab = 256 if byte_level else BUILTIN_VOCAB
    key = hashlib.sha256(f"{FORMAT}|{vocab}|{val_fraction}|{sys.version}".encode())
    for f in files:
        key.update(f"{f}|{f.stat().st_size}".encode())
    name = "python-stdlib-bytes" if byte_level else "python-stdlib"
    folder = cache_dir() / f"{name}-{sys.version_info.major}.{sys.version_info.minor}-{key.hexdigest()[:12]}"
    if (folder / "index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (torchrun ranks, parallel tests) may ask at once: one builds.
    with open(folder.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "index.json").is_file():
            return folder
        texts = [(f, f.read_text(encoding="utf-8", errors="replace")) for f in files]
        if byte_level:
            tokenize([], "bytes", folder, val_fraction=val_fraction, documents=texts, force=True)
            return folder
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            tokenizer_path = Path(tmp) / "tokenizer.json"
            train_bpe([t for _, t in texts], BUILTIN_VOCAB, tokenizer_path)
            tokenize([], str(tokenizer_path), folder, val_fraction=val_fraction, documents=texts, force=True)
    return folder


def resolve_path(path: str, val_fraction: float = 0.01) -> Path:
    """A dataset folder for `data.path` (building the built-in corpus when asked for)."""
    if path in (BUILTIN_STDLIB, BUILTIN_STDLIB_BYTES):
        return builtin_dataset(val_fraction, byte_level=path == BUILTIN_STDLIB_BYTES)
    if path.startswith("builtin:"):
        raise DataError(f"data.path: unknown built-in corpus {path!r} (known: {BUILTIN_STDLIB}, "
                        f"{BUILTIN_STDLIB_BYTES})")
    return Path(path)
