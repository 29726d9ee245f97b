"""`stackfast tokenize`: text files to a dataset folder, encoded by worker processes.

Nothing here imports torch, nor does anything a spawned worker imports (this module and
those it imports): a worker holds numpy and a tokenizer only.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from stackfast.data.parts import input_part
from stackfast.data.readers import DEFAULT_PATTERNS, Reading, input_files, iter_pieces, split_document, unique_files
from stackfast.data.shards import FORMAT, check_output
from stackfast.data.tokenizer import Tokenizer
from stackfast.errors import DataError
from stackfast.files import write_folder

# tokenize's unit of work: whichever is reached first. While a batch is encoded its text, a
# Hugging Face tokenizer's encodings and the ids as Python ints are all held: at 1M
# characters, ~60 MB above the imports (~240 MB at 4M, 4.4 characters a token of code).
BATCH_DOCUMENTS, BATCH_CHARS = 256, 1 << 20


def tokenize(inputs: list[str | Path], tokenizer: str | Tokenizer, out_dir: str | Path, *,
             val_fraction: float = 0.01, shard_tokens: int = 1 << 27, force: bool = False,
             documents: Iterable[tuple[Path, str]] | None = None, patterns: Iterable[str] = DEFAULT_PATTERNS,
             utf8_errors: str = "strict", text_field: str = "text", strict: bool = False, workers: int = 1,
             part: tuple[int, int] | None = None, allow_special_tokens: bool = False) -> dict:
    """Tokenize text files into a dataset folder; returns its index.

    Documents are separated by the tokenizer's end-of-text token when it has one, and only
    there: a special token's string in a document is encoded as text unless
    `allow_special_tokens` (see Tokenizer; a Tokenizer given keeps its own setting). The
    last `val_fraction` of the token stream becomes the validation split. The stream goes
    to disk as it is made: memory holds a few batches of document pieces (a long document is
    encoded PIECE_CHARS characters at a time, a .txt file read in chunks, a table a batch of
    rows at a time), whatever the size of the corpus, of a file or of a document; the
    validation tail is moved out of the last train shards at the end. An existing non-empty
    `out_dir` is refused unless `force`, and even then replaced (once the new one is
    complete) only when it is an earlier output of tokenize (see check_output). Folders
    among `inputs` contribute the files whose name matches `patterns` (see input_files);
    `utf8_errors` is 'strict' or 'replace'; `text_field` and `strict` say how documents are
    taken from .jsonl, Parquet and Arrow files (see Reading): the index records the table
    rows skipped ("skipped"). A file given more than once (twice by name, or by name and in a
    folder given too) is read once, at its first place: the index records the repeats
    ("repeated").

    `workers` processes encode the batches that this one reads, and their tokens are written
    in the batches' order: the folder is the same, byte for byte, at any number of workers.
    `part` (I, N) tokenizes only part I of N of the input files (see input_part), for
    machines that share the work; `merge` joins the parts' folders into one dataset.
    """
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError(f"shard_tokens: must be a positive number of tokens per shard file, got {shard_tokens!r}")
    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    patterns = tuple(patterns)
    if not patterns or not all(isinstance(p, str) and p.strip() for p in patterns):
        raise DataError(f"pattern: expected file-name patterns such as '*.py', got {list(patterns)!r}")
    if utf8_errors not in ("strict", "replace"):
        raise DataError(f"utf8_errors: expected 'strict' or 'replace', got {utf8_errors!r}")
    if not isinstance(text_field, str) or not text_field:
        raise DataError(f"text_field: expected a field name such as 'text', got {text_field!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DataError(f"workers: expected a positive number of processes, got {workers!r}")
    if part is not None and not (len(part) == 2 and all(isinstance(n, int) and not isinstance(n, bool) for n in part)
                                 and 0 <= part[0] < part[1]):
        raise DataError(f"part: expected I/N with 0 <= I < N, such as 0/4, got {'/'.join(map(str, part))}")
    if part is not None and documents is not None:
        raise DataError("part: parts split the input files; documents given directly have none")
    out_dir = Path(out_dir)
    check_output(out_dir, inputs, force)
    tok = tokenizer
    if not isinstance(tok, Tokenizer):
        tok = Tokenizer(tok, allow_special_tokens=allow_special_tokens)
    dtype = token_dtype(tok.vocab_size)
    reading = Reading(text_field, strict, utf8_errors)
    index: dict = {}
    repeated: list[Path] = []  # input files given more than once, read at their first place only
    if documents is not None:
        stream = ((source, piece, last) for source, text in documents for piece, last in split_document([text]))
    elif part is not None:
        files, part_record = input_part(inputs, patterns, part, text_field, repeated)
        stream = iter_pieces(files, reading)
    else:
        stream = iter_pieces(unique_files(input_files(inputs, patterns), repeated), reading)

    def write(tmp: Path) -> None:
        train = ShardWriter(tmp, "train", dtype, shard_tokens)
        with contextlib.closing(encode_in_order(in_batches(stream), tok, workers)) as encoded:
            for tokens in encoded:
                train.append(tokens)
        total = train.tokens
        if total < 2:
            raise DataError(f"empty corpus: {', '.join(map(str, inputs)) or 'no inputs'} gave {total} tokens"
                            + (f" ({reading.skipped} table rows without a string '{text_field}' field skipped)"
                               if reading.skipped else ""))
        val = ShardWriter(tmp, "val", dtype, shard_tokens)
        for piece in train.take_tail(max(1, int(round(total * val_fraction)))):  # one shard's part at a time
            val.append(piece)
        index.update({
            "format": FORMAT,
            "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size,
            "tokenizer": {"spec": tok.spec, "fingerprint": tok.fingerprint, "eos_id": tok.eos_id,
                          "file": tok.file_name, "allow_special_tokens": tok.allow_special_tokens},
            "train": train.entries(),
            "val": val.entries(),
            "total_tokens": total,
            "val_fraction": val_fraction,
        })
        if part is not None:
            index["part"] = part_record
        if reading.skipped:
            index["skipped"] = {"rows": reading.skipped, "first": reading.first_skipped, "text_field": text_field}
        if repeated:
            index["repeated"] = {"files": len(repeated), "first": str(repeated[0])}
        if tok.path is not None:
            shutil.copyfile(tok.path, tmp / tok.file_name)
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")

    write_folder(out_dir, write)
    return index


def token_dtype(vocab_size: int):
    """The shards' integer type: uint16 when the vocabulary fits, else uint32."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def in_batches(stream: Iterable[tuple[Path, str, bool]]) -> Iterator[list[tuple[Path, str, bool]]]:
    """Pieces in batches of BATCH_DOCUMENTS, or fewer when they reach BATCH_CHARS characters.
    Batches amortise the tokenizer's calls; their size bounds memory (token ids are Python
    ints until they reach numpy: ~40 bytes each)."""
    batch: list[tuple[Path, str, bool]] = []
    chars = 0
    for item in stream:
        batch.append(item)
        chars += len(item[1])
        if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_pieces(tok: Tokenizer, batch: list[tuple[Path, str, bool]]) -> np.ndarray:
    """The batch's pieces as one token array, a document's last piece followed by end-of-text if any."""
    eos = tok.eos_id is not None
    encoded = tok.encode_batch([text for _, text, _ in batch])
    ends = np.cumsum([len(ids) + (eos and last) for (_, _, last), ids in zip(batch, encoded)])
    # Filled piece by piece (one conversion in C each), not concatenated from an array per
    # piece; int64 until the ids are checked, since narrowing would wrap a bad one around.
    tokens = np.empty(int(ends[-1]), dtype=np.int64)
    start = 0
    for (_, _, last), ids, end in zip(batch, encoded, ends):
        tokens[start:start + len(ids)] = ids
        if eos and last:
            tokens[end - 1] = tok.eos_id
        start = end
    del encoded
    if tokens.max(initial=0) >= tok.vocab_size or tokens.min(initial=0) < 0:
        bad = int(np.argmax((tokens >= tok.vocab_size) | (tokens < 0)))
        source = batch[int(np.searchsorted(ends, bad, side="right"))][0]
        raise DataError(f"{source}: tokenizer produced id {int(tokens[bad])} >= vocab size {tok.vocab_size}")
    return tokens.astype(token_dtype(tok.vocab_size))


def encode_in_order(batches: Iterable[list[tuple[Path, str, bool]]], tok: Tokenizer,
                    workers: int) -> Iterator[np.ndarray]:
    """The token arrays of `batches`, in their order, encoded by `workers` processes.

    This process reads the batches (the readers keep their order and their errors) and
    workers only encode them, so the tokens are those of one process. It reads at most
    2 x `workers` batches ahead of the one it yields: enough to keep the workers busy, few
    enough that memory stays flat (Pool.imap would read the whole corpus ahead). Workers
    are spawned, not forked: a fork copies the state of torch's and the tokenizer's threads.
    """
    batches = iter(batches)
    if workers == 1:
        yield from (encode_pieces(tok, batch) for batch in batches)
        return
    first = next(batches, None)
    if first is None:
        return
    yield encode_pieces(tok, first)  # here: a corpus of one batch does not wait for workers to start
    pending: collections.deque = collections.deque()
    # Not multiprocessing.Pool: a worker killed (out of memory) leaves it waiting forever.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(os.getpid(),))
    try:
        while True:
            try:
                batch = next(batches, None)
            except Exception:  # a reading error: an earlier batch's encoding error comes first, as in one process
                for result in pending:
                    result.result()
                raise
            if batch is None:
                break
            pending.append(pool.submit(_encode_in_worker, tok.spec, tok.allow_special_tokens, batch))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise DataError(f"a tokenize worker process died (killed, perhaps for lack of memory: each of the {workers} "
                        f"--workers holds a tokenizer and a batch)") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def available_cores() -> int:
    """The cores this process may run on (its share of the machine, as a job scheduler set it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_worker_tokenizers: dict[tuple[str, bool], Tokenizer] = {}  # a worker's tokenizer, loaded by its first batch
PR_SET_PDEATHSIG = 1  # Linux prctl: the signal a process gets when its parent ends
PARENT_POLL_S = 1.0  # elsewhere, how often a worker checks that its parent is alive


def _start_worker(parent: int) -> None:
    """A tokenize worker: one thread (the workers share the cores; a Hugging Face tokenizer
    would start a thread per core in each), no Ctrl-C of its own (the parent stops the pool),
    and no life of its own: it ends with its parent, whatever ended that (kill -9 included),
    so that neither it nor the pool's resource tracker (which ends when the last process
    holding its pipe does) is left behind."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        threading.Thread(target=_end_with_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent ended before the line above could take effect
        os._exit(1)


def _end_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        threading.Event().wait(PARENT_POLL_S)
    os._exit(1)


def _encode_in_worker(spec: str, allow_special_tokens: bool, batch: list[tuple[Path, str, bool]]) -> np.ndarray:
    # Loaded here, not in the pool's initializer, whose error would reach the parent as a
    # broken pool: an error here reaches it as itself, with the batch's result.
    key = (spec, allow_special_tokens)
    if key not in _worker_tokenizers:
        _worker_tokenizers[key] = Tokenizer(spec, allow_special_tokens=allow_special_tokens)
    return encode_pieces(_worker_tokenizers[key], batch)


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
