"""Token data: tokenizers, `stackfast tokenize`, memory-mapped shards and the training loader.

On disk a dataset is a folder:
    index.json            format, dtype, vocab size, tokenizer spec + fingerprint, shard list
    train_00000.bin ...   flat token ids (uint16 when the vocab fits, else uint32)
    val_00000.bin         the held-out validation split
    tokenizer.json | tokenizer.model   a copy of the tokenizer (for export and audits)
A merged dataset (`stackfast tokenize --merge`, of parts tokenized on several machines) is
an index.json and the tokenizer, whose shard entries are paths into its parts' folders.
It is written into a temporary folder and renamed into place when complete, so a
crash never leaves a half-written dataset under the final name (and the next write of that
name removes a killed writer's temporary folder: stackfast/files.py).

The loader draws seq_len+1 windows at positions that are a pure function of
(seed, step): resuming at a step reproduces the data exactly, and with W processes each
rank takes its share of the same global batch, so the global batch does not depend on
the number of processes or the micro-batch size. A mixture of datasets (data.sources)
draws each row's source by the weights first, from the same generator (TokenLoader.picks).
"""
from __future__ import annotations

import codecs
import collections
import contextlib
import fcntl
import fnmatch
import hashlib
import io
import json
import multiprocessing
import os
import queue
import re
import shutil
import signal
import sys
import sysconfig
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from stackfast.config import StackfastError
from stackfast.files import first_line, write_folder

FORMAT = "stackfast-tokens-v1"
# A merged dataset (`stackfast tokenize --merge`): an index of its parts' shards. A format of its own so
# that a stackfast older than merging refuses it as unknown, not as a corrupt index.
MERGED_FORMAT = "stackfast-tokens-merged-v1"
BUILTIN_STDLIB = "builtin:python-stdlib"
BUILTIN_STDLIB_BYTES = "builtin:python-stdlib-bytes"  # the same text, byte-level (vocab 256): the demo's
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
            # numpy views, not lists: a list holds a ~40-byte Python int per byte of text
            self._encode = lambda texts: [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
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

# Memory bounds of tokenizing, whatever the size of a file or of one document in it: a
# document longer than PIECE_CHARS characters goes to the tokenizer piece by piece (token
# ids are ~40-byte Python ints and a Hugging Face encoding keeps offsets and strings per
# token, so encoding a 50 MB document at once took 7 GB), and a .txt file is read
# READ_BYTES bytes at a time.
PIECE_CHARS = 1 << 20
READ_BYTES = 1 << 20


DEFAULT_PATTERNS = ("*.txt", "*.jsonl", "*.parquet")
TABLE_ROWS = 1024  # rows of a Parquet file converted to Python strings at a time
PARQUET_HELP = "pip install 'stackfast[parquet]'"


def input_files(inputs: Iterable[str | Path], patterns: Iterable[str] = DEFAULT_PATTERNS) -> Iterator[Path]:
    """The files of `inputs`: files named directly, and in folders (recursively, symlinked
    folders not followed, sorted for a deterministic order) the files whose name matches one
    of `patterns` (shell-style, e.g. '*.py') and the .arrow files of Hugging Face datasets
    saved there with `save_to_disk`. A folder that cannot be read is an error, as an
    unreadable file is: skipping it would make a dataset without its text, silently."""
    patterns = tuple(patterns)

    def unreadable(error: OSError):
        raise DataError(f"{error.filename or path}: cannot read folder ({error.strerror or error})")

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = []
            for folder, subfolders, names in os.walk(path, onerror=unreadable):
                if "state.json" in names and "dataset_info.json" in names:
                    files += hf_dataset_files(Path(folder))
                    subfolders.clear()
                    continue
                if "dataset_dict.json" in names:  # its splits would all become training text
                    raise DataError(f"{folder}: a Hugging Face DatasetDict (splits {', '.join(sorted(subfolders))}); "
                                    f"give the folder of the split to tokenize, e.g. {Path(folder) / 'train'}")
                files += [Path(folder) / n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
            files = sorted(f for f in files if f.is_file())
            if not files:
                raise DataError(f"{path}: folder holds no files matching {' or '.join(patterns)} "
                                f"(choose them with --pattern)")
            yield from files
        elif path.is_file():
            yield path
        else:
            raise DataError(f"input not found: {path}")


def hf_dataset_files(folder: Path) -> list[Path]:
    """The data files of a dataset saved by Hugging Face `datasets` (save_to_disk), as its
    state.json lists them: not every .arrow file there (`map` leaves cache-*.arrow files)."""
    try:
        state = json.loads((folder / "state.json").read_text())
        files = [folder / entry["filename"] for entry in state["_data_files"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{folder / 'state.json'}: not a Hugging Face dataset state ({type(e).__name__}: {e})") \
            from None
    for file in files:
        if not file.is_file():
            raise DataError(f"{file}: missing (listed by {folder / 'state.json'})")
    return files


@dataclass
class Reading:
    """How tokenize reads documents, and the table rows it left out.

    A document is a .txt file, a .jsonl line's `text_field`, or a Parquet or Arrow row's
    `text_field` column. A table row whose field is null or not a string is counted in
    `skipped` (the first one's place in `first_skipped`), or refused when `strict`; a .jsonl
    line without it is refused, as it always was."""
    text_field: str = "text"
    strict: bool = False
    utf8_errors: str = "strict"
    skipped: int = 0
    first_skipped: str = ""


def iter_pieces(files: Iterable[Path], reading: Reading) -> Iterator[tuple[Path, str, bool]]:
    """Yield (source file, text, last) for every document of `files` (see Reading), cut into
    pieces of at most PIECE_CHARS characters; `last` marks a document's last piece.
    `reading.utf8_errors` 'replace' reads bytes that are not UTF-8 as U+FFFD instead of
    refusing the file."""
    for path in files:
        try:
            if path.suffix == ".jsonl":
                yield from _read_jsonl(path, reading.utf8_errors, reading.text_field)
            elif path.suffix in (".parquet", ".arrow"):
                yield from _read_table(path, reading)
            else:
                yield from _read_txt(path, reading.utf8_errors)
        except OSError as e:  # unreadable (permissions, a FIFO gone, an I/O error)
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def split_document(chunks: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """Cut one document, given as consecutive chunks of any size, into (piece, last) pairs of
    at most PIECE_CHARS characters: each cut follows the window's last newline, or falls at
    the window's end when it has none. The pieces depend on the text only, not on how it was
    chunked, and a document that fits in the window is one piece (encoded as before)."""
    window = PIECE_CHARS
    buffer, start = "", 0
    for chunk in chunks:
        buffer = buffer[start:] + chunk if start < len(buffer) else chunk
        start = 0
        while len(buffer) - start > window:
            cut = buffer.rfind("\n", start, start + window) + 1 or start + window
            yield buffer[start:cut], False
            start = cut
    yield buffer[start:], True


def _read_txt(path: Path, utf8_errors: str = "strict") -> Iterator[tuple[Path, str, bool]]:
    # Universal newlines, as Path.read_text: \r\n and \r become \n.
    with open(path, "rb") as f:
        decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(utf8_errors), translate=True)

        def chunks() -> Iterator[str]:
            offset = 0  # bytes of the file handed to the decoder so far
            while True:
                data = f.read(READ_BYTES)
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the last read
                try:
                    yield decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {offset - pending + e.start})") \
                        from None
                offset += len(data)
                if not data:
                    return

        for piece, last in split_document(chunks()):
            yield path, piece, last


# A UTF-16 surrogate code point: JSON may write one alone ("\ud800"), which is no character
# and cannot be encoded (UTF-8 tokenizers would fail on it without naming the line).
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _read_jsonl(path: Path, utf8_errors: str = "strict", field: str = "text") -> Iterator[tuple[Path, str, bool]]:
    """The documents of a .jsonl file: each line's `field`. `utf8_errors` 'replace' reads bytes
    that are not UTF-8, and lone surrogates of JSON escapes, as U+FFFD; 'strict' refuses them
    naming the line."""
    # Lines end at \n only: read as bytes, not with splitlines(), which also splits at
    # U+2028, U+0085 and other characters that JSON strings may hold raw.
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                decoded = line.decode("utf-8", utf8_errors)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            del line  # a long line is held once as text, not also as bytes
            if not decoded.strip():
                continue
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            del decoded
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{n}: expected an object with a string '{field}' field")
            text = record.pop(field)
            del record
            # Valid escaped pairs are joined by json into one character: only lone halves match.
            surrogate = LONE_SURROGATE.search(text)
            if surrogate and utf8_errors == "strict":
                raise DataError(f"{path}:{n}: '{field}' holds a lone surrogate \\u{ord(surrogate.group()):04x} (an "
                                f"escape that is no Unicode character) at character {surrogate.start()}; "
                                f"--utf8-errors replace reads it as U+FFFD")
            if surrogate:
                text = LONE_SURROGATE.sub("\ufffd", text)
            for piece, last in split_document([text]):
                yield path, piece, last


def _pyarrow(path: Path):
    """pyarrow, with its Parquet and IPC modules: an optional dependency, imported when a table is read."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{path}: reading Parquet and Arrow files needs pyarrow: {PARQUET_HELP}") from None
    return pyarrow


def _read_table(path: Path, reading: Reading) -> Iterator[tuple[Path, str, bool]]:
    """The documents of a Parquet file or an Arrow stream (the .arrow files of a Hugging Face
    dataset): each row's `reading.text_field`. A Parquet file is read TABLE_ROWS rows at a
    time (pyarrow decodes one row group at a time), an Arrow stream one record batch at a
    time: memory does not grow with the file. Rows count from 0, as `dataset[row]`."""
    pa = _pyarrow(path)
    field, parquet = reading.text_field, path.suffix == ".parquet"
    try:
        with pa.OSFile(str(path)) as source:
            table = pa.parquet.ParquetFile(source) if parquet else pa.ipc.open_stream(source)
            columns = (table.schema_arrow if parquet else table.schema).names
            if field not in columns:
                raise DataError(f"{path}: no column '{field}' (columns: {', '.join(columns)}); "
                                f"choose one with --text-field")
            row = 0
            for batch in table.iter_batches(batch_size=TABLE_ROWS, columns=[field]) if parquet else table:
                rows = f"{path} rows {row}-{row + batch.num_rows - 1}"
                for value in _column_values(batch.column(field), reading.utf8_errors, rows):
                    if isinstance(value, str):
                        for piece, last in split_document([value]):
                            yield path, piece, last
                    elif reading.strict:
                        what = "null" if value is None else type(value).__name__
                        raise DataError(f"{path} row {row}: '{field}' is {what}, not a string "
                                        f"(--strict refuses such rows)")
                    else:
                        reading.skipped += 1
                        reading.first_skipped = reading.first_skipped or f"{path} row {row}"
                    row += 1
    except pa.ArrowException as e:  # not Parquet or not an Arrow stream, truncated, corrupt
        raise DataError(f"{path}: not a readable {'Parquet file' if parquet else 'Arrow stream'} "
                        f"({first_line(e)})") from None


def _column_values(column, utf8_errors: str, rows: str) -> list:
    """A table column's values as Python objects. Arrow strings are UTF-8 by definition, but
    not every writer checks: one that is not is refused naming the rows, or read with U+FFFD
    for its bad bytes when `utf8_errors` is 'replace'."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError as e:
        if utf8_errors == "strict":
            raise DataError(f"{rows}: not UTF-8 text ({e.reason}); --utf8-errors replace reads it as U+FFFD") \
                from None
        import pyarrow
        raw = column.cast(pyarrow.large_binary()).to_pylist()
        return [v if v is None else v.decode("utf-8", "replace") for v in raw]


# --------------------------------------------------------------------------------------
# Writing a dataset
# --------------------------------------------------------------------------------------

BATCH_DOCUMENTS, BATCH_CHARS = 256, 1 << 22  # tokenize's unit of work: whichever is reached first


def tokenize(inputs: list[str | Path], tokenizer: str | Tokenizer, out_dir: str | Path, *,
             val_fraction: float = 0.01, shard_tokens: int = 1 << 27, force: bool = False,
             documents: Iterable[tuple[Path, str]] | None = None, patterns: Iterable[str] = DEFAULT_PATTERNS,
             utf8_errors: str = "strict", text_field: str = "text", strict: bool = False, workers: int = 1,
             part: tuple[int, int] | None = None) -> dict:
    """Tokenize text files into a dataset folder; returns its index.

    Documents are separated by the tokenizer's end-of-text token when it has one. The
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
    rows skipped ("skipped").

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
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    reading = Reading(text_field, strict, utf8_errors)
    index: dict = {}
    if documents is not None:
        stream = ((source, piece, last) for source, text in documents for piece, last in split_document([text]))
    elif part is not None:
        files, part_record = input_part(inputs, patterns, part, text_field)
        stream = iter_pieces(files, reading)
    else:
        stream = iter_pieces(input_files(inputs, patterns), reading)

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
                          "file": tok.file_name},
            "train": train.entries(),
            "val": val.entries(),
            "total_tokens": total,
        })
        if part is not None:
            index["part"] = part_record
        if reading.skipped:
            index["skipped"] = {"rows": reading.skipped, "first": reading.first_skipped, "text_field": text_field}
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
    dtype = token_dtype(tok.vocab_size)
    pieces = [np.zeros(0, dtype=dtype)]
    for (source, _, last), ids in zip(batch, tok.encode_batch([text for _, text, _ in batch])):
        if last and tok.eos_id is not None:
            ids = list(ids) + [tok.eos_id]
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.max() >= tok.vocab_size or arr.min() < 0):
            raise DataError(f"{source}: tokenizer produced id {int(arr.max())} >= vocab size "
                            f"{tok.vocab_size}")
        pieces.append(arr.astype(dtype))
    return np.concatenate(pieces)


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
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker)
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
            pending.append(pool.submit(_encode_in_worker, tok.spec, batch))
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


_worker_tokenizers: dict[str, Tokenizer] = {}  # a worker's tokenizer, loaded by its first batch


def _start_worker() -> None:
    """A tokenize worker: one thread (the workers share the cores; a Hugging Face tokenizer
    would start a thread per core in each), no Ctrl-C of its own (the parent stops the pool)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_in_worker(spec: str, batch: list[tuple[Path, str, bool]]) -> np.ndarray:
    # Loaded here, not in the pool's initializer, whose error would reach the parent as a
    # broken pool: an error here reaches it as itself, with the batch's result.
    if spec not in _worker_tokenizers:
        _worker_tokenizers[spec] = Tokenizer(spec)
    return encode_pieces(_worker_tokenizers[spec], batch)


def input_part(inputs: Iterable[str | Path], patterns: Iterable[str], part: tuple[int, int],
               text_field: str) -> tuple[list[Path], dict]:
    """The input files of part I of N, and the part's record for the index.

    Parts are contiguous runs of the input files in the order tokenize reads them (inputs
    in the order given, each folder's files sorted by path): of n files, part I holds files
    I*n//N to (I+1)*n//N - 1, so the merged parts keep the order of one run. The record holds
    I, N and a fingerprint of the whole file list, each file's name (relative to the folder
    of the input that holds it, so machines may mount the data at different places) and
    size, and of the text field: `merge` joins only the parts of one list.
    """
    i, count = part
    listed = [(file, item) for item in inputs for file in input_files([item], patterns)]
    if len(listed) < count:
        raise DataError(f"part {i}/{count}: the inputs hold {len(listed)} files; parts split the list of files, "
                        f"so at most {len(listed)} parts")
    fingerprint = hashlib.sha256(f"{text_field}\n".encode())
    for file, item in listed:
        fingerprint.update(f"{os.path.relpath(file, Path(item).parent)}\0{file.stat().st_size}\n".encode())
    n = len(listed)
    files = [file for file, _ in listed[i * n // count:(i + 1) * n // count]]
    return files, {"index": i, "count": count, "inputs": fingerprint.hexdigest()[:16]}


def merge(out_dir: str | Path, parts: Iterable[str | Path], *, force: bool = False) -> dict:
    """Join the folders of `tokenize --part I/N`, I = 0 .. N-1, into one dataset; returns its index.

    The folder written holds an index.json (and a copy of the tokenizer), no tokens: its
    shard entries are the parts' shards, by paths relative to it (the folders can move
    together), in part order (train: each part's train shards; val: their val shards).
    Every part must be there exactly once, all of the same inputs and tokenizer; TokenData
    opens the folder as one dataset and checks that no part was written again since.
    """
    out_dir = Path(out_dir)
    parts = [Path(p) for p in parts]
    if not parts:
        raise DataError("merge: no part folders given")
    check_output(out_dir, parts, force)
    opened = [TokenData(folder) for folder in parts]  # checks each index and that its shards are whole
    for data in opened:
        if data.index["format"] != FORMAT or "part" not in data.index:
            raise DataError(f"{data.folder}: not a part (its index.json records no part: make parts with "
                            f"`stackfast tokenize --part I/N`)")

    def identity(data: TokenData) -> dict:  # what the parts of one tokenize share
        return {"part counts": data.index["part"]["count"], "input files": data.index["part"]["inputs"],
                "tokenizers": data.index["tokenizer"]["fingerprint"], "vocab sizes": data.vocab_size}
    first = opened[0]
    for data in opened[1:]:
        for key, value in identity(data).items():
            if value != identity(first)[key]:
                raise DataError(f"{data.folder} and {first.folder} are not parts of one tokenize: their {key} "
                                f"differ ({value} vs {identity(first)[key]})")
    count = first.index["part"]["count"]
    by_index: dict[int, TokenData] = {}
    for data in opened:
        i = data.index["part"]["index"]
        if i in by_index:
            raise DataError(f"part {i}/{count} given twice: {by_index[i].folder} and {data.folder}")
        by_index[i] = data
    missing = [f"{i}/{count}" for i in range(count) if i not in by_index]
    if missing:
        raise DataError(f"part{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing: merge needs all "
                        f"{count} parts")

    def write(tmp: Path) -> None:
        index.update({"format": MERGED_FORMAT, "dtype": first.index["dtype"], "vocab_size": first.vocab_size,
                      "tokenizer": first.index["tokenizer"], "train": [], "val": [], "total_tokens": 0,
                      "parts": []})
        for data in (by_index[i] for i in range(count)):
            # Resolved: '..' in the index is followed on disk, through symbolic links.
            folder = Path(os.path.relpath(data.folder.resolve(), out_dir.resolve())).as_posix()
            digest = hashlib.sha256((data.folder / "index.json").read_bytes()).hexdigest()
            index["parts"].append({"folder": folder, "index_sha256": digest})
            for split in ("train", "val"):
                index[split] += [{"file": f"{folder}/{s['file']}", "tokens": s["tokens"]} for s in data.index[split]]
            index["total_tokens"] += data.index["total_tokens"]
        if first.tokenizer_file is not None:
            shutil.copyfile(first.tokenizer_file, tmp / first.tokenizer_file.name)
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")

    index: dict = {}
    write_folder(out_dir, write)
    return index


def check_output(out_dir: Path, inputs: Iterable[str | Path], force: bool) -> None:
    """Refuse an output folder whose replacement could lose the user's files.

    An existing non-empty folder needs `force`, and `force` replaces only an earlier output
    of tokenize (an index.json of our format) or an empty folder: never a file, another
    folder, one that is or holds an input, or the current folder. An output inside an input
    folder is refused whether it exists or not: its files would be read back as text.
    """
    resolved = out_dir.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if source in resolved.parents and source.is_dir():
            raise DataError(f"{out_dir}: is inside the input folder {item}, whose files would be read back as text "
                            f"(an earlier output's shards, its temporary folder); choose an --out outside the inputs")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder (choose another --out)")
    for item in inputs:
        source = Path(item).resolve()
        if source == resolved or resolved in source.parents:
            raise DataError(f"{out_dir}: is or contains the input {item}; choose another --out "
                            f"(inputs are never replaced)")
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise DataError(f"{out_dir}: is or contains the current folder; choose another --out")
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise DataError(f"{out_dir}: already exists and is not empty (use --force to replace it)")
    try:
        ours = json.loads((out_dir / "index.json").read_text()).get("format") in (FORMAT, MERGED_FORMAT)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        ours = False
    if not ours:
        raise DataError(f"{out_dir}: exists and is not an earlier `stackfast tokenize` output (no index.json "
                        f"of format {FORMAT}); --force replaces only such a folder or an empty one: "
                        f"choose another --out")


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
    if path in (BUILTIN_STDLIB, BUILTIN_STDLIB_BYTES):
        return builtin_dataset(val_fraction, byte_level=path == BUILTIN_STDLIB_BYTES)
    if path.startswith("builtin:"):
        raise DataError(f"data.path: unknown built-in corpus {path!r} (known: {BUILTIN_STDLIB}, "
                        f"{BUILTIN_STDLIB_BYTES})")
    return Path(path)


# --------------------------------------------------------------------------------------
# Reading a dataset
# --------------------------------------------------------------------------------------

@dataclass
class Shard:
    path: Path
    tokens: np.ndarray  # memory-mapped, 1-D


class TokenData:
    """A dataset folder opened for reading: memory-mapped train and val shards (a merged
    folder's: its parts' shards, train and val each in part order)."""

    def __init__(self, folder: str | Path, *, vocab_size: int | None = None, tokenizer: str = ""):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise DataError(f"{self.folder}: not a dataset folder (no index.json; make one with "
                            f"`stackfast tokenize`)")
        try:
            self.index = json.loads(index_path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{index_path}: corrupt index (not UTF-8: {e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{index_path}: corrupt index ({e.msg})") from None
        check_index(self.index, index_path)
        self.vocab_size = self.index["vocab_size"]
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
        for part in self.index.get("parts", []):  # a merged dataset: its parts as they were when merged
            part_index = self.folder / part["folder"] / "index.json"
            try:
                digest = hashlib.sha256(part_index.read_bytes()).hexdigest()
            except OSError as e:
                raise DataError(f"{part_index}: cannot read ({e.strerror or e}); a merged dataset refers to its "
                                f"parts by relative path: move the folders together") from None
            if digest != part["index_sha256"]:
                raise DataError(f"{part_index}: written again since {self.folder} was merged; merge the parts "
                                f"again (`stackfast tokenize --merge`)")
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
    def train_tokens(self) -> int:
        """Tokens in the train split: what a run can read once without repeating."""
        return sum(s.tokens.size for s in self.train)

    @property
    def tokenizer_file(self) -> Path | None:
        name = self.index["tokenizer"].get("file")
        return self.folder / name if name else None


def check_index(index, index_path: Path) -> None:
    """Refuse an index.json that lacks a key or holds a value of the wrong type: one line
    naming the file and the key (not a KeyError or TypeError later on)."""
    if not isinstance(index, dict):
        raise DataError(f"{index_path}: corrupt index (expected a JSON object, got {type(index).__name__})")
    if index.get("format") not in (FORMAT, MERGED_FORMAT):
        raise DataError(f"{index_path}: unknown format {index.get('format')!r} (expected {FORMAT} or "
                        f"{MERGED_FORMAT})")

    def require(tree: dict, key: str, types: tuple, name: str):
        value = tree.get(key)
        # bool is an int in Python, never a count here
        if key not in tree or isinstance(value, bool) or not isinstance(value, types):
            what = "missing" if key not in tree else f"{type(value).__name__} {value!r}"[:80]
            raise DataError(f"{index_path}: corrupt index: {name} {what} (expected "
                            f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)})")
        return value

    if require(index, "vocab_size", (int,), "vocab_size") < 1:
        raise DataError(f"{index_path}: corrupt index: vocab_size {index['vocab_size']} (expected >= 1)")
    if require(index, "dtype", (str,), "dtype") not in ("uint16", "uint32"):
        raise DataError(f"{index_path}: corrupt index: dtype {index['dtype']!r} (expected 'uint16' or 'uint32')")
    tokenizer = require(index, "tokenizer", (dict,), "tokenizer")
    require(tokenizer, "spec", (str,), "tokenizer.spec")
    require(tokenizer, "fingerprint", (str,), "tokenizer.fingerprint")
    files = [("tokenizer.file", tokenizer.get("file"))] if tokenizer.get("file") is not None else []
    if "file" in tokenizer:
        require(tokenizer, "file", (str, type(None)), "tokenizer.file")
    for split in ("train", "val"):
        for i, entry in enumerate(require(index, split, (list,), split)):
            if not isinstance(entry, dict):
                raise DataError(f"{index_path}: corrupt index: {split}[{i}] is not an object")
            files.append((f"{split}[{i}].file", require(entry, "file", (str,), f"{split}[{i}].file")))
            if require(entry, "tokens", (int,), f"{split}[{i}].tokens") < 0:
                raise DataError(f"{index_path}: corrupt index: {split}[{i}].tokens {entry['tokens']} < 0")
    if "part" in index:  # a part of `tokenize --part I/N`
        part = require(index, "part", (dict,), "part")
        count = require(part, "count", (int,), "part.count")
        if not 0 <= require(part, "index", (int,), "part.index") < count:
            raise DataError(f"{index_path}: corrupt index: part {part['index']}/{count} (expected I/N, 0 <= I < N)")
        require(part, "inputs", (str,), "part.inputs")
    folders = []  # a merged dataset's shards live in its parts' folders, by relative path
    if index["format"] == MERGED_FORMAT:
        for i, part in enumerate(require(index, "parts", (list,), "parts")):
            if not isinstance(part, dict):
                raise DataError(f"{index_path}: corrupt index: parts[{i}] is not an object")
            folders.append(require(part, "folder", (str,), f"parts[{i}].folder"))
            require(part, "index_sha256", (str,), f"parts[{i}].index_sha256")
            if Path(folders[-1]).is_absolute() or folders[-1] in ("", "."):
                raise DataError(f"{index_path}: corrupt index: parts[{i}].folder {folders[-1]!r} is not a relative "
                                f"path to another folder")
    for name, file in files:  # the dataset's files live in its folder (or its parts'), not elsewhere
        folder, _, base = file.rpartition("/") if isinstance(file, str) else ("", "", file)
        if (folder and folder not in folders) or not isinstance(base, str) or Path(base).name != base \
                or base in ("", ".", ".."):
            raise DataError(f"{index_path}: corrupt index: {name} {file!r} is not a file name"
                            + (" in a part's folder" if folders else ""))


def open_data(data_cfg, vocab_size: int, path: str = "") -> TokenData:
    """The dataset of a DataConfig (or, given `path`, of one of its sources), checked against
    the model's vocabulary."""
    folder = resolve_path(path or data_cfg.path, data_cfg.val_fraction)
    return TokenData(folder, vocab_size=vocab_size, tokenizer=data_cfg.tokenizer)


@dataclass
class Source:
    """One dataset of the run's mixture: its name, its data and its share of the rows."""
    name: str
    data: TokenData
    weight: float  # normalised: the sources' weights sum to 1


def open_sources(data_cfg, vocab_size: int) -> list[Source]:
    """The datasets of a DataConfig (data.sources, or data.path alone), each checked against
    the model's vocabulary, and all made with one tokenizer: a mixture of token ids of two
    vocabularies would train on nonsense."""
    sources = []
    for entry in data_cfg.mixture():
        source = Source(entry.name, open_data(data_cfg, vocab_size, entry.path), entry.weight)
        if sources:
            first = sources[0]
            if tokenizer_identity(source.data) != tokenizer_identity(first.data):
                raise DataError(f"data.sources: {source.name} ({source.data.folder}) was tokenized with "
                                f"{describe_tokenizer(source.data)}, {first.name} ({first.data.folder}) with "
                                f"{describe_tokenizer(first.data)}; the sources of a mixture must share one "
                                f"tokenizer (tokenize them again with the same one)")
        sources.append(source)
    return sources


def tokenizer_identity(data: TokenData) -> tuple[int, str]:
    """What the token ids of a dataset mean: its vocabulary size and tokenizer fingerprint."""
    return data.vocab_size, data.index["tokenizer"]["fingerprint"]


def describe_tokenizer(data: TokenData) -> str:
    return (f"tokenizer {data.index['tokenizer']['spec']} (fingerprint {data.index['tokenizer']['fingerprint']}, "
            f"vocab {data.vocab_size})")


class TokenLoader:
    """Deterministic, rank-aware batches of (inputs, targets), each (micro_batch, seq_len) int64.

    The global batch of a step is `global_batch` windows whose starts come from a generator
    seeded with (seed, step): no state, so resuming at a step is exact. Process r of
    world_size takes the r-th contiguous share of them, in micro-batches of `micro_batch`
    rows (0: the whole share at once). The global batch, and so the run, is the same at any
    number of processes and any micro-batch size.

    `data` is one dataset, or the sources of a mixture (open_sources), which must share a
    vocabulary: then each row's source is drawn by the weights before its window (picks).
    """

    def __init__(self, data: TokenData | list[Source], seq_len: int, global_batch: int, micro_batch: int = 0, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.sources = data if isinstance(data, list) else [Source(data.folder.name, data, 1.0)]
        self.data = self.sources[0].data  # the dataset (a mixture's first: all share its vocabulary)
        self.seq_len, self.global_batch = seq_len, global_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.share = global_batch // world_size  # rows of each process per step
        self.micro_batch = micro_batch or self.share
        window = seq_len + 1
        # The sources' shards in one list, and their held-out windows in another, source after
        # source: source i owns the global window starts [first[i], first[i] + counts[i]) and the
        # held-out windows val_rows[val_first[i]:val_first[i + 1]].
        self.shards, counts, self.val_rows, val_first = [], [], [], [0]
        for source in self.sources:
            shards = [s for s in source.data.train if s.tokens.size >= window]
            if not shards:
                raise DataError(f"{source.data.folder}: no training shard holds {window} tokens "
                                f"(data.seq_len {seq_len} + 1)")
            self.shards += shards
            counts.append(sum(s.tokens.size - window + 1 for s in shards))
            # (shard, offset) of every held-out window, consecutive and non-overlapping: fixed for
            # the loader's life, listed once for the check and every evaluation.
            self.val_rows += [(s, o) for s in source.data.val for o in range(0, s.tokens.size - window + 1, window)]
            val_first.append(len(self.val_rows))
        # Number of valid window starts per shard; a global start index maps into them.
        self.starts = np.cumsum([0] + [s.tokens.size - window + 1 for s in self.shards])
        self.counts = np.array(counts, dtype=np.int64)
        self.first = np.cumsum([0] + counts[:-1])
        self.val_first = val_first
        # A row's source: the first whose cumulative weight exceeds a uniform draw in [0, 1)
        # (the last bound left out, so that rounding never sends a draw past the last source).
        self.bounds = np.cumsum([s.weight for s in self.sources])[:-1]

    def _window(self, shard: Shard, start: int) -> np.ndarray:
        w = np.asarray(shard.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        if w.max() >= self.data.vocab_size:
            raise DataError(f"{shard.path}: token id {int(w.max())} >= vocab size {self.data.vocab_size}")
        return w

    def picks(self, key: list[int], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The n_rows windows drawn by the generator `key` (a step's: [seed, step, 0]): each row's
        source, and its window as a global start index. A function of the key alone, the same
        on every process: each process computes all of a step's picks and takes its share."""
        rng = np.random.default_rng(key)
        if len(self.sources) == 1:  # no draw of sources: the windows of the loader before mixtures, bit for bit
            return np.zeros(n_rows, dtype=np.int64), rng.integers(0, self.starts[-1], size=n_rows)
        which = np.searchsorted(self.bounds, rng.random(n_rows), side="right")  # every row's source first
        return which, self.first[which] + rng.integers(0, self.counts[which])  # then a window within it

    def _rows(self, key: list[int], n_rows: int, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [first, first + count) of the n_rows windows drawn by the generator `key`."""
        picks = self.picks(key, n_rows)[1][first:first + count]
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

    def epochs(self, tokens: int) -> dict[str, float]:
        """How many times over each source has been read after `tokens` training tokens: the
        expected value, tokens * weight / the source's train tokens (not counted from the picks)."""
        return {s.name: tokens * s.weight / s.data.train_tokens for s in self.sources}

    def check_validation(self) -> None:
        """Raise DataError unless every source's validation split gives every process at least
        one window: to be called before training, not found at the first evaluation."""
        window = self.seq_len + 1
        for i, source in enumerate(self.sources):
            n_rows = self.val_first[i + 1] - self.val_first[i]
            if n_rows < self.world_size:
                tokens = sum(s.tokens.size for s in source.data.val)
                raise DataError(f"{source.data.folder}: validation split has {tokens} tokens, {n_rows} windows of "
                                f"{window} (seq_len {self.seq_len} + 1); {self.world_size} needed"
                                + (f" for {self.world_size} processes" if self.world_size > 1 else "")
                                + ": a shorter seq_len, or tokenize with a larger val_fraction")

    def val_batches(self, n_rows: int, source: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's micro-batches of the first n_rows held-out windows of a source (the
        whole split if it has fewer), cut to a multiple of the number of processes so that every
        process runs the same number of forwards (sharded forwards never wait on a rank that
        stopped)."""
        self.check_validation()
        held_out = self.val_rows[self.val_first[source]:self.val_first[source + 1]]
        rows = held_out[:min(n_rows, len(held_out) - len(held_out) % self.world_size)]
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
