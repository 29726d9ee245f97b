"""Reading raw text for tokenize: the input files (folders, Hugging Face datasets saved to
disk) and their documents (.txt, .jsonl, Parquet, Arrow), cut into bounded pieces."""
from __future__ import annotations

import codecs
import fnmatch
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from stackfast.errors import DataError
from stackfast.files import first_line

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


def unique_files(files: Iterable[Path], repeated: list[Path], seen: set | None = None) -> Iterator[Path]:
    """`files` with each file once, at its first place: a file named twice, or named and found
    in a folder also given (or reached by another link), would be tokenized twice. The
    repeats are appended to `repeated`, for the user to be told; `seen` (the files' device and
    inode numbers) carries the files already listed from one call to the next."""
    seen = set() if seen is None else seen
    for file in files:
        st = file.stat()
        if (st.st_dev, st.st_ino) in seen:
            repeated.append(file)
        else:
            seen.add((st.st_dev, st.st_ino))
            yield file


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
    naming the line. A UTF-8 byte order mark opening the file (Windows editors write one) is
    dropped."""
    # Lines end at \n only: read as bytes, not with splitlines(), which also splits at
    # U+2028, U+0085 and other characters that JSON strings may hold raw.
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                decoded = line.decode("utf-8", utf8_errors)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            del line  # a long line is held once as text, not also as bytes
            if n == 1:
                decoded = decoded.removeprefix("\ufeff")
            if not decoded.strip():
                continue
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: invalid JSON (nested too deeply to read)") from None
            except ValueError as e:  # an integer of more digits than Python converts (sys.int_info)
                raise DataError(f"{path}:{n}: invalid JSON ({first_line(e)})") from None
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


ARROW_FILE_MAGIC = b"ARROW1"  # how an Arrow IPC file begins; an Arrow IPC stream has no such mark


def _read_table(path: Path, reading: Reading) -> Iterator[tuple[Path, str, bool]]:
    """The documents of a Parquet file or an Arrow IPC stream or file (a Hugging Face
    dataset's .arrow files are streams; pyarrow.ipc.new_file and Feather v2 write files):
    each row's `reading.text_field`. A Parquet file is read TABLE_ROWS rows at a time
    (pyarrow decodes one row group at a time), an Arrow one record batch at a time: memory
    does not grow with the file. Rows count from 0, as `dataset[row]`."""
    pa = _pyarrow(path)
    field, parquet = reading.text_field, path.suffix == ".parquet"
    what = "Parquet file" if parquet else "Arrow stream"
    try:
        with pa.OSFile(str(path)) as source:
            if parquet:
                table = pa.parquet.ParquetFile(source)
                schema, batches = table.schema_arrow, table.iter_batches(batch_size=TABLE_ROWS, columns=[field])
            elif source.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC:
                what = "Arrow file"
                table = pa.ipc.open_file(source)
                schema, batches = table.schema, (table.get_batch(i) for i in range(table.num_record_batches))
            else:
                source.seek(0)
                table = pa.ipc.open_stream(source)
                schema, batches = table.schema, table
            columns = schema.names
            if field not in columns:
                raise DataError(f"{path}: no column '{field}' (columns: {', '.join(columns)}); "
                                f"choose one with --text-field")
            if columns.count(field) > 1:
                raise DataError(f"{path}: {columns.count(field)} columns named '{field}', which to read is not "
                                f"clear; rename them, or choose another column with --text-field")
            row = 0
            for batch in batches:
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
    except pa.ArrowException as e:  # not Parquet or not Arrow, truncated, corrupt
        raise DataError(f"{path}: not a readable {what} ({first_line(e)})") from None


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
