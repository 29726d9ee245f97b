"""Token data: tokenizers, `stackfast tokenize`, memory-mapped shards and the training loader.

On disk a dataset is a folder:
    index.json            format, dtype, vocab size, tokenizer spec + fingerprint, shard list
    train_00000.bin ...   flat token ids (uint16 when the vocab fits, else uint32)
    val_00000.bin         the held-out validation split
    tokenizer.json | tokenizer.model   a copy of the tokenizer (for export and audits)
It is written into a temporary folder and renamed into place when complete, so a
crash never leaves a half-written dataset under the final name.

The loader draws seq_len+1 windows at positions that are a pure function of
(seed, step): resuming at a step reproduces the data exactly, and with W processes each
rank takes its share of the same global batch, so the global batch does not depend on
the number of processes or the micro-batch size.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue
import shutil
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from stackfast.config import StackfastError
from stackfast.files import write_folder

FORMAT = "stackfast-tokens-v1"
BUILTIN_STDLIB = "builtin:python-stdlib"
BUILTIN_VOCAB = 4096
EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")


class DataError(StackfastError):
    """Unusable data: missing, empty, truncated or inconsistent files."""


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------

class Tokenizer:
    """A tokenizer behind one interface: `encode_batch`, `vocab_size`, `eos_id`, `fingerprint`.

    spec is 'bytes', a path to a Hugging Face tokenizer.json, or a SentencePiece .model.
    """

    def __init__(self, spec: str):
        self.spec = spec
        self.path: Path | None = None
        if spec == "bytes":
            self.vocab_size, self.eos_id, self.fingerprint = 256, None, "bytes"
            self._encode = lambda texts: [list(t.encode("utf-8")) for t in texts]
            return
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"tokenizer not found: {spec} (expected 'bytes', a tokenizer.json or a "
                            f"SentencePiece .model)")
        self.path = path
        self.fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        if path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer
            try:
                tok = HFTokenizer.from_file(str(path))
            except Exception as e:  # the tokenizers library raises bare Exceptions
                raise DataError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
            self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
            self.eos_id = next((tok.token_to_id(n) for n in EOS_NAMES if tok.token_to_id(n) is not None), None)
            self._encode = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        elif path.suffix == ".model":
            try:
                import sentencepiece
            except ImportError:
                raise DataError("a SentencePiece .model needs the sentencepiece package "
                                "(pip install 'stackfast[hf]')") from None
            sp = sentencepiece.SentencePieceProcessor()
            try:
                sp.Load(str(path))
            except (OSError, RuntimeError) as e:
                raise DataError(f"{path}: not a SentencePiece model ({e})") from None
            self.vocab_size = sp.GetPieceSize()
            self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
            self._encode = lambda texts: sp.EncodeAsIds(list(texts))
        else:
            raise DataError(f"tokenizer {spec}: expected 'bytes', a .json or a .model file")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encode(texts)

    @property
    def file_name(self) -> str | None:
        """Name of the tokenizer file's copy inside a dataset folder."""
        if self.path is None:
            return None
        return "tokenizer.json" if self.path.suffix == ".json" else "tokenizer.model"


# --------------------------------------------------------------------------------------
# Reading raw text
# --------------------------------------------------------------------------------------

def iter_documents(inputs: Iterable[str | Path]) -> Iterator[tuple[Path, str]]:
    """Yield (source file, text) for .txt files, .jsonl files (a `text` field per line) and
    folders of them (recursively, sorted for a deterministic order)."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not files:
                raise DataError(f"{path}: folder holds no .txt or .jsonl files")
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"input not found: {path}")
        for f in files:
            yield from _read_file(f)


def _read_file(path: Path) -> Iterator[tuple[Path, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix != ".jsonl":
        yield path, text
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{n}: expected an object with a string 'text' field")
        yield path, record["text"]


# --------------------------------------------------------------------------------------
# Writing a dataset
# --------------------------------------------------------------------------------------

BATCH_DOCUMENTS, BATCH_CHARS = 256, 1 << 22  # tokenize's unit of work: whichever is reached first


def tokenize(inputs: list[str | Path], tokenizer: str | Tokenizer, out_dir: str | Path, *,
             val_fraction: float = 0.01, shard_tokens: int = 1 << 27, force: bool = False,
             documents: Iterable[tuple[Path, str]] | None = None) -> dict:
    """Tokenize text files into a dataset folder; returns its index.

    Documents are separated by the tokenizer's end-of-text token when it has one. The
    last `val_fraction` of the token stream becomes the validation split. The stream goes
    to disk as it is made (memory holds one batch of documents, whatever the corpus size);
    the validation tail is moved out of the last train shards at the end. An existing
    non-empty `out_dir` is refused unless `force` (then replaced only once the new one
    is complete).
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise DataError(f"{out_dir}: already exists and is not empty (use --force to replace it)")
    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32

    def encode(batch: list[tuple[Path, str]]) -> np.ndarray:
        """The batch's documents as one token array, each followed by end-of-text if any."""
        pieces = [np.zeros(0, dtype=dtype)]
        for (source, _), ids in zip(batch, tok.encode_batch([text for _, text in batch])):
            if tok.eos_id is not None:
                ids = list(ids) + [tok.eos_id]
            arr = np.asarray(ids, dtype=np.int64)
            if arr.size and (arr.max() >= tok.vocab_size or arr.min() < 0):
                raise DataError(f"{source}: tokenizer produced id {int(arr.max())} >= vocab size "
                                f"{tok.vocab_size}")
            pieces.append(arr.astype(dtype))
        return np.concatenate(pieces)

    def write(tmp: Path) -> None:
        train = ShardWriter(tmp, "train", dtype, shard_tokens)
        batch: list[tuple[Path, str]] = []
        chars = 0
        for doc in (documents if documents is not None else iter_documents(inputs)):
            batch.append(doc)
            chars += len(doc[1])
            # Batches of documents amortise the tokenizer's calls; their size bounds memory
            # (token ids are Python ints until they reach numpy: ~40 bytes each).
            if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
                train.append(encode(batch))
                batch.clear()
                chars = 0
        train.append(encode(batch))
        total = train.tokens
        if total < 2:
            raise DataError(f"empty corpus: {', '.join(map(str, inputs)) or 'no inputs'} gave {total} tokens")
        val = ShardWriter(tmp, "val", dtype, shard_tokens)
        for piece in train.take_tail(max(1, int(round(total * val_fraction)))):  # one shard's part at a time
            val.append(piece)
        index.update({
            "format": FORMAT,
            "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size,
            "tokenizer": {"spec": tok.spec, "fingerprint": tok.fingerprint, "eos_id": tok.eos_id,
                          "file": tok.file_name},
            "train": train.entries(),
            "val": val.entries(),
            "total_tokens": total,
        })
        if tok.path is not None:
            shutil.copyfile(tok.path, tmp / tok.file_name)
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")

    index: dict = {}
    write_folder(out_dir, write)
    return index


class ShardWriter:
    """Appends a token stream to `<split>_<i>.bin` files of at most `shard_tokens` each."""

    def __init__(self, folder: Path, split: str, dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, np.dtype(dtype), shard_tokens
        self.sizes: list[int] = []  # tokens in each shard so far

    @property
    def tokens(self) -> int:
        return sum(self.sizes)

    def path(self, i: int) -> Path:
        return self.folder / f"{self.split}_{i:05d}.bin"

    def append(self, tokens: np.ndarray) -> None:
        """Append tokens to the stream: to the last shard file, then to new ones when it is full."""
        while tokens.size:
            if not self.sizes or self.sizes[-1] == self.shard_tokens:
                self.sizes.append(0)
            room = self.shard_tokens - self.sizes[-1]
            with open(self.path(len(self.sizes) - 1), "ab") as f:
                tokens[:room].tofile(f)
            self.sizes[-1] += min(room, tokens.size)
            tokens = tokens[room:]

    def take_tail(self, n: int) -> Iterator[np.ndarray]:
        """Yield the last n tokens, shard by shard in stream order, and cut them from the files."""
        start = self.tokens - n  # stream offset where the tail begins
        offset = 0
        for i, size in enumerate(list(self.sizes)):
            if offset + size > start:
                keep = max(0, start - offset)
                yield np.fromfile(self.path(i), dtype=self.dtype, offset=keep * self.dtype.itemsize)
                os.truncate(self.path(i), keep * self.dtype.itemsize)
                self.sizes[i] = keep
            offset += size
        while len(self.sizes) > 1 and self.sizes[-1] == 0:  # shards left empty by the cut
            self.path(len(self.sizes) - 1).unlink()
            self.sizes.pop()

    def entries(self) -> list[dict]:
        """The index's list of shards; a split without tokens still gets one (empty) file."""
        if not self.sizes:
            self.path(0).touch()
            self.sizes.append(0)
        return [{"file": self.path(i).name, "tokens": size} for i, size in enumerate(self.sizes)]


# --------------------------------------------------------------------------------------
# The built-in corpus
# --------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("STACKFAST_CACHE", Path.home() / ".cache" / "stackfast"))


def stdlib_files() -> list[Path]:
    """The running Python's standard library source, without its test suites (sorted)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skip]  # prune: site-packages can be huge
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(files)


def builtin_dataset(val_fraction: float = 0.01) -> Path:
    """Build (once, cached, under a lock) and return the folder of `builtin:python-stdlib`.

    A byte-level BPE with vocab 4096 is trained locally with `tokenizers` on the source
    text, so nothing is ever downloaded.
    """
    files = stdlib_files()
    if not files:
        raise DataError(f"{BUILTIN_STDLIB}: no standard library source found under "
                        f"{sysconfig.get_paths()['stdlib']}")
    key = hashlib.sha256(f"{FORMAT}|{BUILTIN_VOCAB}|{val_fraction}|{sys.version}".encode())
    for f in files:
        key.update(f"{f}|{f.stat().st_size}".encode())
    folder = cache_dir() / f"python-stdlib-{sys.version_info.major}.{sys.version_info.minor}-{key.hexdigest()[:12]}"
    if (folder / "index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (torchrun ranks, parallel tests) may ask at once: one builds.
    with open(folder.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "index.json").is_file():
            return folder
        texts = [(f, f.read_text(encoding="utf-8", errors="replace")) for f in files]
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            tokenizer_path = Path(tmp) / "tokenizer.json"
            train_bpe([t for _, t in texts], BUILTIN_VOCAB, tokenizer_path)
            tokenize([], str(tokenizer_path), folder, val_fraction=val_fraction, documents=texts, force=True)
    return folder


def train_bpe(texts: list[str], vocab_size: int, out_path: Path) -> None:
    """Train a byte-level BPE (with an <|endoftext|> token) and save it as tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out_path))


def resolve_path(path: str, val_fraction: float = 0.01) -> Path:
    """A dataset folder for `data.path` (building the built-in corpus when asked for)."""
    if path == BUILTIN_STDLIB:
        return builtin_dataset(val_fraction)
    if path.startswith("builtin:"):
        raise DataError(f"data.path: unknown built-in corpus {path!r} (known: {BUILTIN_STDLIB})")
    return Path(path)


# --------------------------------------------------------------------------------------
# Reading a dataset
# --------------------------------------------------------------------------------------

@dataclass
class Shard:
    path: Path
    tokens: np.ndarray  # memory-mapped, 1-D


class TokenData:
    """A dataset folder opened for reading: memory-mapped train and val shards."""

    def __init__(self, folder: str | Path, *, vocab_size: int | None = None, tokenizer: str = ""):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise DataError(f"{self.folder}: not a dataset folder (no index.json; make one with "
                            f"`stackfast tokenize`)")
        try:
            self.index = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{index_path}: corrupt index ({e.msg})") from None
        if self.index.get("format") != FORMAT:
            raise DataError(f"{index_path}: unknown format {self.index.get('format')!r} (expected {FORMAT})")
        self.vocab_size = int(self.index["vocab_size"])
        self.dtype = np.dtype(self.index["dtype"])
        if vocab_size is not None and self.vocab_size > vocab_size:
            raise DataError(f"{index_path}: tokenizer vocab size {self.vocab_size} exceeds "
                            f"model.vocab_size {vocab_size}")
        if tokenizer:
            expected = "bytes" if tokenizer == "bytes" else Tokenizer(tokenizer).fingerprint
            found = self.index["tokenizer"]["fingerprint"]
            if expected != found:
                raise DataError(f"{index_path}: shards were made with tokenizer "
                                f"{self.index['tokenizer']['spec']} ({found}), not data.tokenizer "
                                f"{tokenizer} ({expected})")
        self.train = [self._open(s) for s in self.index["train"]]
        self.val = [self._open(s) for s in self.index["val"]]

    def _open(self, entry: dict) -> Shard:
        path = self.folder / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard missing")
        expected = int(entry["tokens"]) * self.dtype.itemsize
        if path.stat().st_size != expected:
            raise DataError(f"{path}: truncated or corrupt shard ({path.stat().st_size} bytes, "
                            f"index says {expected})")
        if expected == 0:
            return Shard(path, np.zeros(0, dtype=self.dtype))
        return Shard(path, np.memmap(path, dtype=self.dtype, mode="r"))

    @property
    def tokenizer_file(self) -> Path | None:
        name = self.index["tokenizer"].get("file")
        return self.folder / name if name else None


def open_data(data_cfg, vocab_size: int) -> TokenData:
    """The dataset of a DataConfig, checked against the model's vocabulary."""
    folder = resolve_path(data_cfg.path, data_cfg.val_fraction)
    return TokenData(folder, vocab_size=vocab_size, tokenizer=data_cfg.tokenizer)


class TokenLoader:
    """Deterministic, rank-aware batches of (inputs, targets), each (micro_batch, seq_len) int64.

    The global batch of a step is `global_batch` windows whose starts come from a generator
    seeded with (seed, step): no state, so resuming at a step is exact. Process r of
    world_size takes the r-th contiguous share of them, in micro-batches of `micro_batch`
    rows (0: the whole share at once). The global batch, and so the run, is the same at any
    number of processes and any micro-batch size.
    """

    def __init__(self, data: TokenData, seq_len: int, global_batch: int, micro_batch: int = 0, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.data, self.seq_len, self.global_batch = data, seq_len, global_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.share = global_batch // world_size  # rows of each process per step
        self.micro_batch = micro_batch or self.share
        window = seq_len + 1
        self.shards = [s for s in data.train if s.tokens.size >= window]
        if not self.shards:
            raise DataError(f"{data.folder}: no training shard holds {window} tokens "
                            f"(data.seq_len {seq_len} + 1)")
        # Number of valid window starts per shard; a global start index maps into them.
        self.starts = np.cumsum([0] + [s.tokens.size - window + 1 for s in self.shards])

    def _window(self, shard: Shard, start: int) -> np.ndarray:
        w = np.asarray(shard.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        if w.max() >= self.data.vocab_size:
            raise DataError(f"{shard.path}: token id {int(w.max())} >= vocab size {self.data.vocab_size}")
        return w

    def _rows(self, key: list[int], n_rows: int, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [first, first + count) of the n_rows windows drawn by the generator `key`."""
        picks = np.random.default_rng(key).integers(0, self.starts[-1], size=n_rows)[first:first + count]
        rows = []
        for g in picks:
            i = int(np.searchsorted(self.starts, g, side="right")) - 1
            rows.append(self._window(self.shards[i], int(g - self.starts[i])))
        windows = torch.from_numpy(np.stack(rows))  # (rows, seq_len + 1)
        return windows[:, :-1], windows[:, 1:]

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's micro-batch `micro_step` of the global batch of `step`."""
        first = self.rank * self.share + micro_step * self.micro_batch
        return self._rows([self.seed, step, 0], self.global_batch, first, self.micro_batch)

    def extra_batch(self, step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch beyond the training stream of `step` (k = 0, 1, ...), for work that
        needs fresh data at a step without taking the run's own (LiGO's expansion training)."""
        n = self.micro_batch * self.world_size
        return self._rows([self.seed, step, 1 + k], n, self.rank * self.micro_batch, self.micro_batch)

    def val_batches(self, n_rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's micro-batches of the first n_rows held-out windows (consecutive and
        non-overlapping; the whole split if it has fewer), cut to a multiple of the number of
        processes so that every process runs the same number of forwards."""
        window = self.seq_len + 1
        rows = [(s, o) for s in self.data.val for o in range(0, s.tokens.size - window + 1, window)]
        rows = rows[:min(n_rows, len(rows) - len(rows) % self.world_size)]
        if not rows:
            raise DataError(f"{self.data.folder}: validation split has fewer than {self.world_size} windows of "
                            f"{window} tokens (data.seq_len + 1)")
        share = len(rows) // self.world_size
        mine = rows[self.rank * share:(self.rank + 1) * share]
        for i in range(0, share, self.micro_batch):
            windows = torch.from_numpy(np.stack([self._window(s, o) for s, o in mine[i:i + self.micro_batch]]))
            yield windows[:, :-1], windows[:, 1:]


class Prefetcher:
    """Prepares the training batches of a fixed sequence of (step, micro_step) keys on a
    background thread, `depth` ahead, in pinned memory when they go to a GPU, so the
    accelerator never waits on the loader (the copy to the device is then asynchronous).
    Batches are the loader's own: prefetching changes timing, never data."""

    def __init__(self, loader: TokenLoader, keys: Iterable[tuple[int, int]], *, pin_memory: bool = False,
                 depth: int = 4):
        self.loader, self.pin_memory = loader, pin_memory
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._work, args=(iter(keys),), daemon=True)
        self.thread.start()

    def _work(self, keys: Iterator[tuple[int, int]]) -> None:
        for key in keys:
            try:
                x, y = self.loader.batch(*key)
                if self.pin_memory:
                    x, y = x.pin_memory(), y.pin_memory()
                item = (x, y)
            except Exception as error:  # handed to the training thread, which raises it
                item = error
            while not self.stopped.is_set():
                try:
                    self.queue.put((key, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self.stopped.is_set() or isinstance(item, Exception):
                return

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of (step, micro_step); keys must be asked for in the order given."""
        key, item = self.queue.get()
        if isinstance(item, Exception):
            raise item
        if key != (step, micro_step):
            raise RuntimeError(f"prefetcher out of order: asked for {(step, micro_step)}, next is {key}")
        return item

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
