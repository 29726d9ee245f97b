"""The dataset format: a folder of token shards and its index, opened for reading.

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
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from stackfast.data.tokenizer import Tokenizer
from stackfast.errors import DataError

FORMAT = "stackfast-tokens-v1"
# A merged dataset (`stackfast tokenize --merge`): an index of its parts' shards. A format of its own so
# that a stackfast older than merging refuses it as unknown, not as a corrupt index.
MERGED_FORMAT = "stackfast-tokens-merged-v1"


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
    if "val_fraction" in index and not 0.0 < require(index, "val_fraction", (float,), "val_fraction") < 0.5:
        raise DataError(f"{index_path}: corrupt index: val_fraction {index['val_fraction']} (expected 0 < x < 0.5)")
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
