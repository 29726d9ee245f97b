"""Token data: tokenizers, `stackfast tokenize`, memory-mapped shards and the training loader.

On disk a dataset is a folder:
    index.json            format, dtype, vocab size, tokenizer spec + fingerprint, shard list
    train_00000.bin ...   flat token ids (uint16 when the vocab fits, else uint32)
    val_00000.bin         the held-out validation split
    tokenizer.json | tokenizer.model   a copy of the tokenizer (for export and audits)
It is written into a temporary folder and renamed into place when complete, so a
crash never leaves a half-written dataset under the final name (and the next write of that
name removes a killed writer's temporary folder: stackfast/files.py).

The loader draws seq_len+1 windows at positions that are a pure function of
(seed, step): resuming at a step reproduces the data exactly, and with W processes each
rank takes its share of the same global batch, so the global batch does not depend on
the number of processes or the micro-batch size.
"""
from __future__ import annotations

import codecs
import fcntl
import fnmatch
import hashlib
import io
import json
import os
import queue
import re
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


DEFAULT_PATTERNS = ("*.txt", "*.jsonl")


def input_files(inputs: Iterable[str | Path], patterns: Iterable[str] = DEFAULT_PATTERNS) -> Iterator[Path]:
    """The files of `inputs`: files named directly, and in folders (recursively, symlinked
    folders not followed, sorted for a deterministic order) the files whose name matches one
    of `patterns` (shell-style, e.g. '*.py'). A folder that cannot be read is an error, as an
    unreadable file is: skipping it would make a dataset without its text, silently."""
    patterns = tuple(patterns)

    def unreadable(error: OSError):
        raise DataError(f"{error.filename or path}: cannot read folder ({error.strerror or error})")

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = []
            for folder, _, names in os.walk(path, onerror=unreadable):
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


def iter_pieces(inputs: Iterable[str | Path], patterns: Iterable[str] = DEFAULT_PATTERNS,
                utf8_errors: str = "strict") -> Iterator[tuple[Path, str, bool]]:
    """Yield (source file, text, last) for every document of `inputs` (a .jsonl file holds one
    per line's `text` field; any other file is one document of text), cut into pieces of at
    most PIECE_CHARS characters; `last` marks a document's last piece. `utf8_errors`
    'replace' reads bytes that are not UTF-8 as U+FFFD instead of refusing the file."""
    for path in input_files(inputs, patterns):
        try:
            yield from (_read_jsonl(path, utf8_errors) if path.suffix == ".jsonl" else _read_txt(path, utf8_errors))
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


def _read_jsonl(path: Path, utf8_errors: str = "strict") -> Iterator[tuple[Path, str, bool]]:
    """The documents of a .jsonl file. `utf8_errors` 'replace' reads bytes that are not UTF-8,
    and lone surrogates of JSON escapes, as U+FFFD; 'strict' refuses them naming the line."""
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
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{n}: expected an object with a string 'text' field")
            text = record.pop("text")
            del record
            # Valid escaped pairs are joined by json into one character: only lone halves match.
            surrogate = LONE_SURROGATE.search(text)
            if surrogate and utf8_errors == "strict":
                raise DataError(f"{path}:{n}: 'text' holds a lone surrogate \\u{ord(surrogate.group()):04x} (an "
                                f"escape that is no Unicode character) at character {surrogate.start()}; "
                                f"--utf8-errors replace reads it as U+FFFD")
            if surrogate:
                text = LONE_SURROGATE.sub("\ufffd", text)
            for piece, last in split_document([text]):
                yield path, piece, last


# --------------------------------------------------------------------------------------
# Writing a dataset
# --------------------------------------------------------------------------------------

BATCH_DOCUMENTS, BATCH_CHARS = 256, 1 << 22  # tokenize's unit of work: whichever is reached first


def tokenize(inputs: list[str | Path], tokenizer: str | Tokenizer, out_dir: str | Path, *,
             val_fraction: float = 0.01, shard_tokens: int = 1 << 27, force: bool = False,
             documents: Iterable[tuple[Path, str]] | None = None, patterns: Iterable[str] = DEFAULT_PATTERNS,
             utf8_errors: str = "strict") -> dict:
    """Tokenize text files into a dataset folder; returns its index.

    Documents are separated by the tokenizer's end-of-text token when it has one. The
    last `val_fraction` of the token stream becomes the validation split. The stream goes
    to disk as it is made: memory holds one batch of document pieces (a long document is
    encoded PIECE_CHARS characters at a time, a .txt file read in chunks), whatever the
    size of the corpus, of a file or of a document; the validation tail is moved out of the
    last train shards at the end. An existing non-empty `out_dir` is refused unless `force`,
    and even then replaced (once the new one is complete) only when it is an earlier
    output of tokenize (see check_output). Folders among `inputs` contribute the files whose
    name matches `patterns` (see input_files); `utf8_errors` is 'strict' or 'replace'.
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
    out_dir = Path(out_dir)
    check_output(out_dir, inputs, force)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32

    def encode(batch: list[tuple[Path, str, bool]]) -> np.ndarray:
        """The batch's pieces as one token array, a document's last piece followed by end-of-text if any."""
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

    if documents is not None:
        stream = ((source, piece, last) for source, text in documents for piece, last in split_document([text]))
    else:
        stream = iter_pieces(inputs, patterns, utf8_errors)

    def write(tmp: Path) -> None:
        train = ShardWriter(tmp, "train", dtype, shard_tokens)
        batch: list[tuple[Path, str, bool]] = []
        chars = 0
        for item in stream:
            batch.append(item)
            chars += len(item[1])
            # Batches of pieces amortise the tokenizer's calls; their size bounds memory
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
        ours = json.loads((out_dir / "index.json").read_text()).get("format") == FORMAT
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
    """A dataset folder opened for reading: memory-mapped train and val shards."""

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
    if index.get("format") != FORMAT:
        raise DataError(f"{index_path}: unknown format {index.get('format')!r} (expected {FORMAT})")

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
    for name, file in files:  # the dataset's files live in its folder, not elsewhere
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise DataError(f"{index_path}: corrupt index: {name} {file!r} is not a file name")


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
        # (shard, offset) of every held-out window, consecutive and non-overlapping: fixed for
        # the loader's life, listed once for the check and every evaluation.
        self.val_rows = [(s, o) for s in data.val for o in range(0, s.tokens.size - window + 1, window)]

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

    def check_validation(self) -> None:
        """Raise DataError unless the validation split gives every process at least one
        window: to be called before training, not found at the first evaluation."""
        window, n_rows = self.seq_len + 1, len(self.val_rows)
        if n_rows < self.world_size:
            tokens = sum(s.tokens.size for s in self.data.val)
            raise DataError(f"{self.data.folder}: validation split has {tokens} tokens, {n_rows} windows of "
                            f"{window} (seq_len {self.seq_len} + 1); {self.world_size} needed"
                            + (f" for {self.world_size} processes" if self.world_size > 1 else "")
                            + ": a shorter seq_len, or tokenize with a larger val_fraction")

    def val_batches(self, n_rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's micro-batches of the first n_rows held-out windows (the whole split
        if it has fewer), cut to a multiple of the number of processes so that every process
        runs the same number of forwards (sharded forwards never wait on a rank that stopped)."""
        self.check_validation()
        rows = self.val_rows[:min(n_rows, len(self.val_rows) - len(self.val_rows) % self.world_size)]
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
