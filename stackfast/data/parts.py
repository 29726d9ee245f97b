"""Tokenizing on several machines: the input files of part I of N, and the merge of the
parts' folders into one dataset."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from stackfast.data.readers import input_files, unique_files
from stackfast.data.shards import FORMAT, MERGED_FORMAT, TokenData, check_output
from stackfast.errors import DataError
from stackfast.files import write_folder


def input_part(inputs: Iterable[str | Path], patterns: Iterable[str], part: tuple[int, int],
               text_field: str, repeated: list[Path]) -> tuple[list[Path], dict]:
    """The input files of part I of N, and the part's record for the index.

    Parts are contiguous runs of the input files in the order tokenize reads them (inputs
    in the order given, each folder's files sorted by path): of n files, part I holds files
    I*n//N to (I+1)*n//N - 1, so the merged parts keep the order of one run. The record holds
    I, N and a fingerprint of the whole file list, each file's name (relative to the folder
    of the input that holds it, so machines may mount the data at different places) and
    size, and of the text field: `merge` joins only the parts of one list. A file given more
    than once is listed once, at its first place (see unique_files, which fills `repeated`).
    """
    i, count = part
    seen: set = set()  # the files listed so far, across the inputs
    listed = [(file, item) for item in inputs
              for file in unique_files(input_files([item], patterns), repeated, seen)]
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
        # Each part's validation split is its own tail: parts of different fractions would
        # make a merged split that is no fraction of anything.
        return {"part counts": data.index["part"]["count"], "input files": data.index["part"]["inputs"],
                "tokenizers": data.index["tokenizer"]["fingerprint"], "vocab sizes": data.vocab_size,
                "--allow-special-tokens": data.index["tokenizer"].get("allow_special_tokens", "unrecorded"),
                "--val-fraction": data.index.get("val_fraction", "unrecorded")}
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
        if "val_fraction" in first.index:
            index["val_fraction"] = first.index["val_fraction"]
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
