"""`stackfast tokenize` of real corpora: Parquet files and folders, Hugging Face datasets
(save_to_disk), --text-field and --strict, --workers (the same bytes at any number), --part
and --merge (several machines), and datasets written before these existed."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from stackfast.cli import main
from stackfast.data import DataError, TokenData, TokenLoader, tokenize, train_bpe

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

GOLDEN_V1 = Path(__file__).parent / "golden" / "tokens-v1"


def stream(folder) -> bytes:
    """A byte-level dataset's text: its train then val tokens, as bytes."""
    data = TokenData(folder)
    return np.concatenate([s.tokens for s in data.train + data.val]).astype(np.uint8).tobytes()


def error_line(capsys) -> str:
    """The one line a refused command printed (asserting that it is one)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stackfast: error: "), lines
    return lines[0].removeprefix("stackfast: error: ")


def tokenize_cli(*args) -> int:
    return main(["tokenize", *map(str, args)])


def test_parquet_rows_without_a_string_field_are_counted_or_refused(tmp_path, capsys):
    """A null row is skipped and counted; so is a row whose field is not a string (Parquet
    columns have one type: the int rows are another file's). --strict refuses the first."""
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["alpha ", None, "gamma "]}), folder / "a.parquet", row_group_size=2)
    pq.write_table(pa.table({"text": [5, 6]}), folder / "b.parquet")
    (folder / "c.txt").write_text("and text")
    assert tokenize_cli("--input", folder, "--tokenizer", "bytes", "--out", tmp_path / "ds",
                        "--val-fraction", "0.1", "--workers", "1") == 0
    assert capsys.readouterr().err.strip() == (f"note: skipped 3 rows without a string 'text' field (first: "
                                               f"{folder / 'a.parquet'} row 1); --strict refuses them")
    assert stream(tmp_path / "ds") == b"alpha gamma and text"
    index = TokenData(tmp_path / "ds").index
    assert index["skipped"] == {"rows": 3, "first": f"{folder / 'a.parquet'} row 1", "text_field": "text"}

    assert tokenize_cli("--input", folder, "--tokenizer", "bytes", "--out", tmp_path / "strict", "--strict") == 2
    assert error_line(capsys) == (f"{folder / 'a.parquet'} row 1: 'text' is null, not a string "
                                  f"(--strict refuses such rows)")
    assert tokenize_cli("--input", folder / "b.parquet", "--tokenizer", "bytes", "--out", tmp_path / "strict",
                        "--strict") == 2
    assert error_line(capsys).endswith("b.parquet row 0: 'text' is int, not a string (--strict refuses such rows)")
    assert not (tmp_path / "strict").exists()
    with pytest.raises(DataError, match=r"empty corpus: .*b\.parquet gave 0 tokens \(2 table rows without a "
                                        r"string 'text' field skipped\)"):
        tokenize([folder / "b.parquet"], "bytes", tmp_path / "none")


def test_text_field_in_parquet_and_jsonl_and_a_missing_column(tmp_path, capsys):
    pq.write_table(pa.table({"id": [1, 2], "content": ["one ", "two "]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "three", "text": "not this"}) + "\n")
    tokenize([tmp_path / "a.parquet", tmp_path / "b.jsonl"], "bytes", tmp_path / "ds", text_field="content",
             val_fraction=0.1)
    assert stream(tmp_path / "ds") == b"one two three"
    assert tokenize_cli("--input", tmp_path / "a.parquet", "--tokenizer", "bytes", "--out", tmp_path / "o",
                        "--text-field", "body") == 2
    assert error_line(capsys) == (f"{tmp_path / 'a.parquet'}: no column 'body' (columns: id, content); "
                                  f"choose one with --text-field")
    with pytest.raises(DataError, match=r"b\.jsonl:1: expected an object with a string 'body' field"):
        tokenize([tmp_path / "b.jsonl"], "bytes", tmp_path / "o", text_field="body")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"^\S*fake\.parquet: not a readable Parquet file \(Parquet magic bytes"):
        tokenize([tmp_path / "fake.parquet"], "bytes", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_parquet_strings_that_are_not_utf8_follow_utf8_errors(tmp_path):
    """Arrow strings should be UTF-8; a writer that did not check may have left other bytes."""
    column = pa.array([b"ok ", b"caf\xe9"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": column}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet rows 0-1: not UTF-8 text .*--utf8-errors replace"):
        tokenize([tmp_path / "bad.parquet"], "bytes", tmp_path / "strict")
    tokenize([tmp_path / "bad.parquet"], "bytes", tmp_path / "replaced", utf8_errors="replace", val_fraction=0.1)
    assert stream(tmp_path / "replaced") == "ok caf\ufffd".encode()


def test_missing_pyarrow_is_one_line(tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "a.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` fails, as when not installed
    with pytest.raises(DataError, match=r"a\.parquet: reading Parquet and Arrow files needs pyarrow: "
                                        r"pip install 'stackfast\[parquet\]'$"):
        tokenize([tmp_path / "a.parquet"], "bytes", tmp_path / "ds")


def test_hugging_face_dataset_saved_to_disk_and_its_parquet_export(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    texts = [f"document {i} " for i in range(7)]
    dataset = datasets.Dataset.from_dict({"text": texts[:3] + [None] + texts[3:], "n": list(range(8))})
    dataset.save_to_disk(str(tmp_path / "hf"), num_shards=2)  # data-00000-of-00002.arrow, ...
    # `map` on a dataset loaded from disk leaves cache files beside its data: not part of it.
    shutil.copyfile(tmp_path / "hf" / "data-00001-of-00002.arrow", tmp_path / "hf" / "cache-0123abcd.arrow")
    tokenize([tmp_path / "hf"], "bytes", tmp_path / "ds", val_fraction=0.1)
    assert stream(tmp_path / "ds") == "".join(texts).encode()
    first_skipped = TokenData(tmp_path / "ds").index["skipped"]["first"]
    assert first_skipped == f"{tmp_path / 'hf' / 'data-00000-of-00002.arrow'} row 3"
    (tmp_path / "export").mkdir()
    dataset.to_parquet(str(tmp_path / "export" / "train.parquet"))
    tokenize([tmp_path / "export"], "bytes", tmp_path / "ds2", val_fraction=0.1)
    assert stream(tmp_path / "ds2") == "".join(texts).encode()
    # A DatasetDict's folder holds all its splits: the split to train on is named, not guessed.
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "dict"))
    capsys.readouterr()
    assert tokenize_cli("--input", tmp_path / "dict", "--tokenizer", "bytes", "--out", tmp_path / "o") == 2
    assert error_line(capsys) == (f"{tmp_path / 'dict'}: a Hugging Face DatasetDict (splits test, train); give "
                                  f"the folder of the split to tokenize, e.g. {tmp_path / 'dict' / 'train'}")


@pytest.fixture
def bpe(tmp_path):
    path = tmp_path / "tokenizer.json"
    train_bpe(["def main(argv):\n    return parse(argv) + 1\n"] * 30, 300, path)
    return path


def test_workers_write_the_same_bytes_as_one_process(tmp_path, bpe, monkeypatch, capsys):
    """Batches of 3 pieces: many batches, so the 2 workers take turns, and the look-ahead
    fills up. Every file of the folder is compared."""
    import stackfast.data.pipeline as pipeline
    monkeypatch.setattr(pipeline, "BATCH_DOCUMENTS", 3)  # the batches are made in this process
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"def f{i}(x):\n    return x * {i}\n" * (1 + i % 5) for i in range(60)]
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    pq.write_table(pa.table({"text": lines[::-1]}), corpus / "b.parquet", row_group_size=7)
    (corpus / "c.txt").write_text("".join(lines))
    common = ["--input", corpus, "--tokenizer", bpe, "--shard-tokens", "500", "--val-fraction", "0.05"]
    assert tokenize_cli(*common, "--out", tmp_path / "one", "--workers", "1") == 0
    assert tokenize_cli(*common, "--out", tmp_path / "two", "--workers", "2") == 0
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(files) > 5 and files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    # An error in a worker is the one line of one process (here: an id past the vocabulary),
    # even when the reader, ahead, meets an error of its own in a later file.
    tokenizer = json.loads(bpe.read_text())
    tokenizer["model"]["vocab"]["Z"] = 70000
    (tmp_path / "bad.json").write_text(json.dumps(tokenizer))
    (corpus / "d.txt").write_text("at the end: Z")  # in a late batch: a worker's
    (corpus / "e.jsonl").write_text("{not json\n")
    monkeypatch.setattr(pipeline, "BATCH_CHARS", 10)  # a batch per piece: d.txt's is one of its own
    capsys.readouterr()
    messages = []
    for workers in ("1", "2"):
        assert tokenize_cli(*common[:3], tmp_path / "bad.json", "--out", tmp_path / "bad", "--workers", workers) == 2
        messages.append(error_line(capsys))
    assert messages[0] == messages[1] and "d.txt: tokenizer produced id 70000 >= vocab size" in messages[0]
    assert not (tmp_path / "bad").exists()


def make_parts(tmp_path, count=2):
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        corpus.mkdir(parents=True)
        for i in range(5):
            (corpus / f"{i}.txt").write_text(f"file {i} " * (20 + i))
        pq.write_table(pa.table({"text": ["a parquet row " * 5] * 3}), corpus / "5.parquet")
    for i in range(count):
        tokenize([corpus], "bytes", tmp_path / "parts" / f"p{i}", part=(i, count), val_fraction=0.1, shard_tokens=64)
    return corpus


def test_parts_merged_are_one_dataset(tmp_path, capsys):
    corpus = make_parts(tmp_path)
    parts = tmp_path / "parts"
    # Part I of N: the files I*n//N .. (I+1)*n//N - 1 of the sorted list (here 3 and 3 of 6).
    assert stream(parts / "p0") == b"".join((corpus / f"{i}.txt").read_bytes() for i in range(3))
    index0 = TokenData(parts / "p0").index
    assert index0["part"]["index"] == 0 and index0["part"]["count"] == 2
    assert index0["part"]["inputs"] == TokenData(parts / "p1").index["part"]["inputs"]
    assert main(["tokenize", "--merge", str(parts / "all"), str(parts / "p1"), str(parts / "p0")]) == 0
    assert "2 parts" in capsys.readouterr().out
    merged = TokenData(parts / "all")
    assert [p["folder"] for p in merged.index["parts"]] == ["../p0", "../p1"]  # part order, relative
    assert not list((parts / "all").glob("*.bin"))  # no token copied
    p0, p1 = TokenData(parts / "p0"), TokenData(parts / "p1")
    for split in ("train", "val"):
        tokens = [np.concatenate([s.tokens for s in getattr(d, split)]) for d in (merged, p0, p1)]
        assert np.array_equal(tokens[0], np.concatenate(tokens[1:]))
    assert merged.train_tokens == p0.train_tokens + p1.train_tokens
    assert merged.index["total_tokens"] == p0.index["total_tokens"] + p1.index["total_tokens"]
    # The folders move together; training reads the merged one as any dataset.
    shutil.move(parts, tmp_path / "moved")
    x, y = TokenLoader(TokenData(tmp_path / "moved" / "all"), 16, 4).batch(0)
    assert x.shape == (4, 16)
    # A part written again after the merge is noticed.
    make_parts(tmp_path, count=1)
    shutil.rmtree(tmp_path / "moved" / "p0")
    shutil.move(tmp_path / "parts" / "p0", tmp_path / "moved" / "p0")
    with pytest.raises(DataError, match=r"p0/index\.json: written again since .*all was merged; merge the parts"):
        TokenData(tmp_path / "moved" / "all")


def test_merge_refuses_missing_duplicated_and_foreign_parts(tmp_path, bpe, capsys):
    make_parts(tmp_path, count=3)
    parts = tmp_path / "parts"
    make_parts(tmp_path / "other", count=2)  # another file list
    (tmp_path / "other" / "parts" / "p0").rename(parts / "q0")
    (tmp_path / "other" / "corpus" / "6.txt").write_text("one more file")
    tokenize([tmp_path / "other" / "corpus"], "bytes", parts / "r2", part=(2, 3), val_fraction=0.1)
    tokenize([tmp_path / "corpus"], str(bpe), parts / "b1", part=(1, 3), val_fraction=0.1)
    tokenize([tmp_path / "corpus"], "bytes", parts / "whole", val_fraction=0.1)
    cases = [(["p0", "p2"], "part 1/3 missing: merge needs all 3 parts"),
             (["p0", "p1"], "part 2/3 missing: merge needs all 3 parts"),
             (["p0", "p1", "p2", "p1"], f"part 1/3 given twice: {parts / 'p1'} and {parts / 'p1'}"),
             (["p0", "b1", "p2"], f"{parts / 'b1'} and {parts / 'p0'} are not parts of one tokenize: their "
                                  f"tokenizers differ"),
             (["p0", "q0"], "are not parts of one tokenize: their part counts differ (2 vs 3)"),
             (["p0", "p1", "r2"], "are not parts of one tokenize: their input files differ"),
             (["whole"], f"{parts / 'whole'}: not a part (its index.json records no part"),
             ([], "--merge: expected the output folder, then the part folders")]
    for names, message in cases:
        assert main(["tokenize", "--merge", str(parts / "all"), *(str(parts / n) for n in names)]) == 2
        assert message in error_line(capsys), names
    assert not (parts / "all").exists()
    assert tokenize_cli("--input", tmp_path / "corpus", "--tokenizer", "bytes", "--out", tmp_path / "o",
                        "--part", "7/7") == 2
    assert error_line(capsys) == "part: expected I/N with 0 <= I < N, such as 0/4, got 7/7"
    assert tokenize_cli("--input", tmp_path / "corpus", "--tokenizer", "bytes", "--out", tmp_path / "o",
                        "--part", "3/7") == 2
    assert error_line(capsys) == "part 3/7: the inputs hold 6 files; parts split the list of files, so at most 6 parts"


def test_a_dataset_written_before_parquet_workers_and_parts_still_loads():
    """tests/golden/tokens-v1: written by `tokenize` as it was before issue 24 (bytes, shards
    of 32 tokens, val_fraction 0.2) from a.txt and b.jsonl."""
    data = TokenData(GOLDEN_V1)
    assert data.index["format"] == "stackfast-tokens-v1" and [s.tokens.size for s in data.train] == [32, 32, 6]
    assert stream(GOLDEN_V1) == ("stackfast golden tokens v1\nmade by the pre-issue-24 tokenize\n"
                                 "second documentthird, caf\u00e9").encode()
    x, _ = TokenLoader(data, 8, 2).batch(0)
    assert x.shape == (2, 8)


def test_tokenize_benchmark_runs_at_a_tiny_size(tmp_path):
    from stackfast.bench import bench_tokenize
    rows = bench_tokenize.main(["--mb", "0.2", "--vocab", "300", "--reps", "1", "--out", str(tmp_path)])
    assert [r["workers"] for r in rows] == [1, 2] and all(r["same_output"] for r in rows)
    assert all(r["tokens_per_s"] > 0 and r["mb_per_s"] > 0 for r in rows) and rows[0]["text_mb"] >= 0.2
    saved = json.loads((tmp_path / "tokenize-cpu.json").read_text())
    assert saved["rows"][1]["ratio_vs_workers_1"] > 0 and "standard library" in saved["rows"][0]["corpus"]


def test_a_tiny_tokenize_limit_benchmark_writes_the_same_ids(tmp_path):
    from stackfast.bench import bench_tokenize_limit
    rows = bench_tokenize_limit.main(["--mb", "0.1", "--vocab", "300", "--reps", "1", "--out", str(tmp_path)])
    assert [r["what"] for r in rows] == ["limit", "limit-fast", "stackfast"] and all(r["same_ids"] for r in rows)
    assert rows[0]["wall_ratio"] == 1 and all(r["peak_rss_mb"] > 10 and r["cpu_s"] > 0 for r in rows)


# Special tokens written in the text: text, unless --allow-special-tokens.
SPECIAL_DOCUMENTS = ["code that prints <|endoftext|> and </s> and <s>", "a second <|endoftext|></s> document"]


def hf_tokenizer(path: Path, specials: list[str]) -> Path:
    """A byte-level BPE whose special tokens are `specials` (GPT-2's <|endoftext|>, Llama's <s> and </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SPECIAL_DOCUMENTS * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path))
    return path


@pytest.mark.parametrize("specials", [["<|endoftext|>"], ["<s>", "</s>"]], ids=["gpt2", "llama"])
def test_special_token_strings_in_a_document_are_text(tmp_path, specials, monkeypatch, capsys):
    """One end-of-text per document, only after it; the text decodes back. With
    --allow-special-tokens the strings are the tokens (the tokenizers library's default),
    in one process as in the workers (batches of one document: the workers encode)."""
    from tokenizers import Tokenizer as HFTokenizer
    import stackfast.data.pipeline as pipeline
    path = hf_tokenizer(tmp_path / "tokenizer.json", specials)
    eos = HFTokenizer.from_file(str(path)).token_to_id(specials[-1])
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in SPECIAL_DOCUMENTS))

    def ids(out, *flags):
        assert tokenize_cli("--input", corpus, "--tokenizer", path, "--out", out, "--val-fraction", "0.01",
                            *flags) == 0
        return np.concatenate([s.tokens for s in TokenData(out).train + TokenData(out).val]).tolist()

    monkeypatch.setattr(pipeline, "BATCH_DOCUMENTS", 1)
    text = ids(tmp_path / "text", "--workers", "1")
    assert [i for i, t in enumerate(text) if t == eos] == [text.index(eos), len(text) - 1]  # two boundaries
    decoder = HFTokenizer.from_file(str(path))
    first = text.index(eos)
    assert [decoder.decode(text[:first]), decoder.decode(text[first + 1:-1])] == SPECIAL_DOCUMENTS
    assert ids(tmp_path / "text2", "--workers", "2") == text
    assert TokenData(tmp_path / "text").index["tokenizer"]["allow_special_tokens"] is False

    allowed = ids(tmp_path / "allowed", "--workers", "1", "--allow-special-tokens")
    assert allowed.count(eos) == 2 + sum(t.count(specials[-1]) for t in SPECIAL_DOCUMENTS)
    assert ids(tmp_path / "allowed2", "--workers", "2", "--allow-special-tokens") == allowed
    assert TokenData(tmp_path / "allowed").index["tokenizer"]["allow_special_tokens"] is True


def test_sentencepiece_reads_its_control_symbols_as_text_with_or_without_the_flag(tmp_path):
    """A Llama-style SentencePiece model (</s> is end-of-text, a control symbol): SentencePiece
    never matches control symbols in text, so '</s>' written in a document stays text."""
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "train.txt").write_text("\n".join(SPECIAL_DOCUMENTS * 20) + "\n")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=60, model_type="bpe", minloglevel=2)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in SPECIAL_DOCUMENTS))
    streams = []
    for allow in (False, True):
        out = tmp_path / f"out-{allow}"
        index = tokenize([corpus], str(tmp_path / "sp.model"), out, val_fraction=0.01, allow_special_tokens=allow)
        streams.append(np.concatenate([s.tokens for s in TokenData(out).train + TokenData(out).val]).tolist())
        assert streams[-1].count(index["tokenizer"]["eos_id"]) == 2 and streams[-1][-1] == index["tokenizer"]["eos_id"]
    assert streams[0] == streams[1]


def test_null_parquet_rows_are_no_documents_with_a_tokenizer_that_has_end_of_text(tmp_path, bpe):
    """The bytes tokenizer has no end-of-text, so an empty document would leave no trace: here
    it would add one end-of-text id."""
    pq.write_table(pa.table({"text": ["alpha ", None, None, "gamma "]}), tmp_path / "a.parquet")
    index = tokenize([tmp_path / "a.parquet"], str(bpe), tmp_path / "ds", val_fraction=0.01)
    data = TokenData(tmp_path / "ds")
    ids = np.concatenate([s.tokens for s in data.train + data.val]).tolist()
    assert ids.count(index["tokenizer"]["eos_id"]) == 2 and index["skipped"]["rows"] == 2


def test_bad_table_and_json_inputs_are_one_line(tmp_path, capsys):
    """Two columns named like --text-field; a .jsonl line nested past Python's recursion limit,
    and one holding an integer of more digits than Python converts: one line each."""
    t = pa.table([pa.array(["a", "b"]), pa.array(["c", "d"])], names=["text", "text"])
    pq.write_table(t, tmp_path / "dup.parquet")
    assert tokenize_cli("--input", tmp_path / "dup.parquet", "--tokenizer", "bytes", "--out", tmp_path / "o") == 2
    assert error_line(capsys) == (f"{tmp_path / 'dup.parquet'}: 2 columns named 'text', which to read is not "
                                  f"clear; rename them, or choose another column with --text-field")
    cases = {"deep": "[" * 100_000 + "]" * 100_000, "digits": '{"text": "a", "n": ' + "7" * 5000 + "}"}
    for name, line in cases.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
        assert tokenize_cli("--input", tmp_path / f"{name}.jsonl", "--tokenizer", "bytes", "--out",
                            tmp_path / "o") == 2
        assert error_line(capsys).startswith(f"{tmp_path / f'{name}.jsonl'}:2: invalid JSON (")
    assert not (tmp_path / "o").exists()


def test_arrow_ipc_files_and_streams_and_a_jsonl_byte_order_mark(tmp_path):
    table = pa.table({"text": ["first row ", None, "second row"]})
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)  # two record batches
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    for name in ("file", "stream"):
        index = tokenize([tmp_path / f"{name}.arrow"], "bytes", tmp_path / name, val_fraction=0.1)
        assert stream(tmp_path / name) == b"first row second row" and index["skipped"]["rows"] == 1
    (tmp_path / "bad.arrow").write_bytes(b"ARROW1\0\0 and then nothing")
    with pytest.raises(DataError, match=r"bad\.arrow: not a readable Arrow file \("):
        tokenize([tmp_path / "bad.arrow"], "bytes", tmp_path / "bad")
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + b'{"text": "caf\xc3\xa9 "}\n{"text": "au lait"}\n')
    tokenize([tmp_path / "bom.jsonl"], "bytes", tmp_path / "bom", val_fraction=0.1)
    assert stream(tmp_path / "bom") == "café au lait".encode()


def test_a_file_given_twice_is_tokenized_once_and_said(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha text ")
    (corpus / "b.txt").write_text("beta text")
    (tmp_path / "link.txt").symlink_to(corpus / "b.txt")
    assert tokenize_cli("--input", corpus / "a.txt", corpus, corpus / "a.txt", tmp_path / "link.txt",
                        "--tokenizer", "bytes", "--out", tmp_path / "ds", "--val-fraction", "0.1") == 0
    assert stream(tmp_path / "ds") == b"alpha text beta text"  # a.txt at its first place, b.txt once
    assert capsys.readouterr().err.strip() == (f"note: 3 input files given more than once (first: "
                                               f"{corpus / 'a.txt'}), each tokenized once, at its first place")
    assert TokenData(tmp_path / "ds").index["repeated"] == {"files": 3, "first": str(corpus / "a.txt")}
    # Parts list each file once too: the parts of the repeated inputs are those of the folder.
    for inputs, name in (([corpus, corpus / "b.txt"], "twice"), ([corpus], "once")):
        for i in range(2):
            tokenize(inputs, "bytes", tmp_path / name / str(i), part=(i, 2), val_fraction=0.1)
    for i in range(2):
        assert stream(tmp_path / "twice" / str(i)) == stream(tmp_path / "once" / str(i))


def test_merge_refuses_parts_of_different_validation_fractions(tmp_path, capsys):
    make_parts(tmp_path, count=2)
    parts = tmp_path / "parts"
    tokenize([tmp_path / "corpus"], "bytes", parts / "q1", part=(1, 2), val_fraction=0.2, shard_tokens=64)
    assert main(["tokenize", "--merge", str(parts / "all"), str(parts / "p0"), str(parts / "q1")]) == 2
    assert error_line(capsys) == (f"{parts / 'q1'} and {parts / 'p0'} are not parts of one tokenize: their "
                                  f"--val-fraction differ (0.2 vs 0.1)")
    assert main(["tokenize", "--merge", str(parts / "all"), str(parts / "p0"), str(parts / "p1")]) == 0
    assert TokenData(parts / "all").index["val_fraction"] == 0.1


ENDLESS = """
import sys, time
from pathlib import Path
import stackfast.data.pipeline as pipeline

def documents():  # a corpus that never ends: tokenize is always mid-way
    for i in range(10 ** 9):
        time.sleep(0.01)
        if i == 50:  # read 2 x 2 batches at most ahead of those encoded: the workers are at work
            print("mid-way", flush=True)
        yield Path("endless"), f"document {i} " * 20

if __name__ == "__main__":  # not again in the spawned workers, which import this file
    pipeline.BATCH_DOCUMENTS = 1
    pipeline.tokenize([], "bytes", sys.argv[1], documents=documents(), workers=2)
"""


def _children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_workers_and_resource_tracker_end_with_their_parent(tmp_path, signal_name):
    """kill -9 (or a plain kill) of tokenize --workers 2 mid-way: its two workers and the
    resource tracker of their queues are gone within seconds, not left running for good."""
    import os
    import signal
    import subprocess
    import time
    (tmp_path / "endless.py").write_text(ENDLESS)
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, str(tmp_path / "endless.py"), str(tmp_path / "out")],
                              env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE)
    children = []
    try:
        # (A worker still starting dies with its parent anyway: its start-up reads from it.)
        assert parent.stdout.readline() == b"mid-way\n"
        children = _children(parent.pid)
        assert len(children) == 3, children  # 2 workers + the tracker
        parent.send_signal(getattr(signal, signal_name))
        parent.wait(10)
        deadline = time.monotonic() + 10
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)]
    finally:
        for pid in [parent.pid, *children]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
