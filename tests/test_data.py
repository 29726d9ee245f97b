"""Tokenizing, the dataset format, the built-in corpus and the deterministic loader."""
import json

import numpy as np
import pytest
import torch

from stackfast.config import DataConfig
from stackfast.data import (BUILTIN_STDLIB, BUILTIN_STDLIB_BYTES, DataError, TokenData, TokenLoader, Tokenizer, builtin_dataset,
                            open_data, tokenize, train_bpe)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "text"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("hello world\n" * 50)
    (folder / "sub" / "b.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    (folder / "c.jsonl").write_text(json.dumps({"text": "first document"}) + "\n\n"
                                    + json.dumps({"text": "second one"}) + "\n")
    return folder


def test_bytes_tokenize_writes_exact_tokens_and_split(corpus, tmp_path):
    out = tmp_path / "ds"
    index = tokenize([corpus], "bytes", out, val_fraction=0.1, shard_tokens=500)
    # Folder order is sorted by path: a.txt, c.jsonl, sub/b.txt.
    expected = (corpus / "a.txt").read_bytes() + b"first documentsecond one" + (corpus / "sub" / "b.txt").read_bytes()
    data = TokenData(out)
    stream = np.concatenate([s.tokens for s in data.train + data.val])
    assert bytes(stream.astype(np.uint8)) == expected
    assert index["dtype"] == "uint16" and index["vocab_size"] == 256
    assert len(index["train"]) > 1 and all(s["tokens"] <= 500 for s in index["train"])
    assert sum(s.tokens.size for s in data.val) == round(len(expected) * 0.1)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left


def test_hf_tokenizer_appends_end_of_text_and_copies_tokenizer(corpus, tmp_path):
    tok_path = tmp_path / "tokenizer.json"
    train_bpe(["hello world def return first second document"] * 20, 300, tok_path)
    tok = Tokenizer(str(tok_path))
    index = tokenize([corpus / "c.jsonl"], str(tok_path), tmp_path / "ds", val_fraction=0.2)
    data = TokenData(tmp_path / "ds", tokenizer=str(tok_path))
    stream = np.concatenate([s.tokens for s in data.train + data.val]).tolist()
    assert stream.count(tok.eos_id) == 2 and stream[-1] == tok.eos_id
    assert index["tokenizer"]["fingerprint"] == tok.fingerprint
    assert (tmp_path / "ds" / "tokenizer.json").read_bytes() == tok_path.read_bytes()


def test_sentencepiece_model(corpus, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "spm.txt"
    text.write_text("".join(f"line {i} hello world of tokens\n" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    index = tokenize([corpus / "a.txt"], str(tmp_path / "sp.model"), tmp_path / "ds")
    assert index["vocab_size"] == 60 and index["tokenizer"]["file"] == "tokenizer.model"
    data = TokenData(tmp_path / "ds")
    assert max(int(s.tokens.max()) for s in data.train) < 60


def test_source_trees_by_file_pattern(tmp_path):
    tree = tmp_path / "src"
    (tree / "pkg" / "sub").mkdir(parents=True)
    (tree / "pkg" / "a.py").write_text("x = 1\n")
    (tree / "pkg" / "sub" / "b.py").write_text("def f():\n    return 2\n")
    (tree / "pkg" / "c.pyi").write_text("y: int\n")
    (tree / "notes.txt").write_text("not code\n")
    (tree / "lib.so").write_bytes(b"\x7fELF\xff")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "z.py").write_text("outside = True\n")
    (tree / "link").symlink_to(outside, target_is_directory=True)  # a symlinked folder is not followed
    index = tokenize([tree], "bytes", tmp_path / "py", patterns=["*.py"], val_fraction=0.1)
    data = TokenData(tmp_path / "py")
    stream = np.concatenate([s.tokens for s in data.train + data.val]).astype(np.uint8).tobytes()
    assert stream == b"x = 1\ndef f():\n    return 2\n" and index["total_tokens"] == len(stream)
    index = tokenize([tree], "bytes", tmp_path / "both", patterns=["*.py", "*.pyi"], val_fraction=0.1)
    assert index["total_tokens"] == len(stream) + len("y: int\n")
    with pytest.raises(DataError, match=r"src: folder holds no files matching \*\.rs or \*\.go \(choose them"):
        tokenize([tree], "bytes", tmp_path / "none", patterns=["*.rs", "*.go"])
    with pytest.raises(DataError, match="pattern: expected file-name patterns"):
        tokenize([tree], "bytes", tmp_path / "empty", patterns=[""])


def test_not_utf8_source_is_refused_or_read_with_replacement(tmp_path):
    tree = tmp_path / "src"
    tree.mkdir()
    (tree / "good.py").write_text("ok = 1\n")
    (tree / "latin1.py").write_bytes(b"# caf\xe9\n")
    with pytest.raises(DataError, match=r"latin1\.py: not UTF-8 text \(invalid continuation byte at byte 5\)"):
        tokenize([tree], "bytes", tmp_path / "strict", patterns=["*.py"])
    assert not (tmp_path / "strict").exists()
    tokenize([tree], "bytes", tmp_path / "replaced", patterns=["*.py"], utf8_errors="replace", val_fraction=0.1)
    data = TokenData(tmp_path / "replaced")
    stream = np.concatenate([s.tokens for s in data.train + data.val]).astype(np.uint8).tobytes()
    assert stream == b"ok = 1\n# caf\xef\xbf\xbd\n"  # U+FFFD in UTF-8


def test_tokenize_command_takes_patterns(tmp_path):
    import subprocess
    import sys
    tree = tmp_path / "src"
    tree.mkdir()
    (tree / "m.py").write_text("print('hi')\n")
    cli = [sys.executable, "-m", "stackfast.cli", "tokenize", "--input", str(tree), "--tokenizer", "bytes"]
    out = subprocess.run(cli + ["--out", str(tmp_path / "o"), "--pattern", "*.py", "--val-fraction", "0.1"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "wrote" in out.stdout, out.stderr
    out = subprocess.run(cli + ["--out", str(tmp_path / "o2")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"stackfast: error: {tree}: folder holds no files matching *.txt or *.jsonl or *.parquet (choose them with --pattern)"]


def test_builtin_byte_level_corpus_is_the_source_bytes(stackfast_cache):
    from stackfast.data import stdlib_files
    folder = builtin_dataset(byte_level=True)
    data = open_data(DataConfig(path=BUILTIN_STDLIB_BYTES), 256)
    assert data.folder == folder and data.index["vocab_size"] == 256 and data.index["tokenizer"]["spec"] == "bytes"
    expected = sum(len(f.read_text(encoding="utf-8", errors="replace").encode()) for f in stdlib_files())
    assert data.index["total_tokens"] == expected
    assert folder != builtin_dataset()  # the BPE corpus is a folder of its own


def test_input_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        tokenize([tmp_path / "empty.txt"], "bytes", tmp_path / "o1")
    with pytest.raises(DataError, match="input not found: .*nope.txt"):
        tokenize([tmp_path / "nope.txt"], "bytes", tmp_path / "o2")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a string 'text'"):
        tokenize([tmp_path / "bad.jsonl"], "bytes", tmp_path / "o3")
    with pytest.raises(DataError, match="tokenizer not found"):
        tokenize([tmp_path / "empty.txt"], "missing.json", tmp_path / "o4")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_existing_output_is_refused_and_force_replaces_only_an_earlier_output(corpus, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="already exists and is not empty"):
        tokenize([corpus], "bytes", out)
    # --force replaces an earlier tokenize output or an empty folder, never a folder of other files.
    with pytest.raises(DataError, match="is not an earlier `stackfast tokenize` output"):
        tokenize([corpus], "bytes", out, force=True)
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    tokenize([corpus], "bytes", out, force=True)
    tokenize([corpus / "a.txt"], "bytes", out, force=True)
    assert TokenData(out).index["total_tokens"] == len((corpus / "a.txt").read_bytes())
    # Nor the inputs, a folder holding them, a file, or the current folder.
    for bad, message in ((corpus, "is or contains the input"), (corpus / "sub", "is or contains the input"),
                         (corpus / "a.txt", "exists and is not a folder")):
        with pytest.raises(DataError, match=message):
            tokenize([corpus / "sub" / "b.txt", corpus / "a.txt"], "bytes", bad, force=True)
    (out / "here").mkdir()
    monkeypatch.chdir(out / "here")
    for cwd_or_above in (".", out):
        with pytest.raises(DataError, match="is or contains the current folder"):
            tokenize([corpus / "a.txt"], "bytes", cwd_or_above, force=True)
    assert (corpus / "a.txt").is_file() and (out / "index.json").is_file()


@pytest.mark.parametrize("shard_tokens", [0, -1, 2.5, True])
def test_shard_tokens_must_be_a_positive_integer(corpus, tmp_path, shard_tokens):
    with pytest.raises(DataError, match="shard_tokens: must be a positive number"):
        tokenize([corpus], "bytes", tmp_path / "ds", shard_tokens=shard_tokens)
    assert not (tmp_path / "ds").exists()


def test_jsonl_lines_end_at_newline_only(tmp_path):
    # Raw U+2028, U+2029, U+0085 and a form feed are valid inside JSON strings; \r\n line ends too.
    texts = ["one\u2028two", "three\x85four\u2029", "five\x0csix"]
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"\r\n".join(json.dumps({"text": t}, ensure_ascii=False).encode() for t in texts) + b"\r\n")
    tokenize([path], "bytes", tmp_path / "ds", val_fraction=0.1)
    data = TokenData(tmp_path / "ds")
    stream = np.concatenate([s.tokens for s in data.train + data.val])
    assert bytes(stream.astype(np.uint8)) == "".join(texts).encode()
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"odd.jsonl:2: not UTF-8 text"):
        tokenize([path], "bytes", tmp_path / "ds2")


def _spy_encoder(monkeypatch, tok):
    """Record the length of every text the tokenizer is given."""
    lengths, encode = [], tok._encode
    monkeypatch.setattr(tok, "_encode", lambda texts: (lengths.extend(map(len, texts)), encode(texts))[1])
    return lengths


def test_long_documents_are_encoded_in_bounded_pieces(tmp_path, monkeypatch):
    import stackfast.data.readers as readers
    monkeypatch.setattr(readers, "PIECE_CHARS", 64)
    monkeypatch.setattr(readers, "READ_BYTES", 10)
    big = "".join(f"line {i} " + "x" * (i % 90) + "\n" for i in range(300))  # some lines longer than a piece
    (tmp_path / "big.txt").write_text(big)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": big.replace("\n", " ")}) + "\n")  # no newline
    tok = Tokenizer("bytes")
    lengths = _spy_encoder(monkeypatch, tok)
    tokenize([tmp_path / "big.txt", tmp_path / "big.jsonl"], tok, tmp_path / "ds", val_fraction=0.1)
    assert max(lengths) == 64 and len(lengths) > 2 * len(big) / 64
    data = TokenData(tmp_path / "ds")
    stream = bytes(np.concatenate([s.tokens for s in data.train + data.val]).astype(np.uint8))
    assert stream == (big + big.replace("\n", " ")).encode()
    # Pieces end after the window's last newline when it has one; they do not depend on the reads.
    pieces = list(readers.split_document([big]))
    assert [p for p, _ in pieces] == [p for p, _ in readers.split_document(big[i:i + 7] for i in range(0, len(big), 7))]
    assert all(p.endswith("\n") or len(p) == 64 for p, _ in pieces[:-1]) and [last for _, last in pieces].count(True) == 1
    assert sum(p.endswith("\n") for p, _ in pieces[:-1]) > len(pieces) // 2


def test_end_of_text_follows_a_documents_last_piece_only(tmp_path, monkeypatch):
    import stackfast.data.readers as readers
    tok_path = tmp_path / "tokenizer.json"
    train_bpe(["hello world, one document after another\n"] * 20, 300, tok_path)
    tok = Tokenizer(str(tok_path))
    docs = ["hello world\n" * 30, "one document after another\n" * 20]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    small = tokenize([tmp_path / "a.jsonl"], tok, tmp_path / "small", val_fraction=0.1)
    # A document that fits in a piece is encoded whole, as before pieces existed.
    whole = [i for d in docs for i in tok.encode_batch([d])[0] + [tok.eos_id]]
    data = TokenData(tmp_path / "small")
    assert np.concatenate([s.tokens for s in data.train + data.val]).tolist() == whole
    monkeypatch.setattr(readers, "PIECE_CHARS", 50)
    lengths = _spy_encoder(monkeypatch, tok)
    tokenize([tmp_path / "a.jsonl"], tok, tmp_path / "cut", val_fraction=0.1)
    data = TokenData(tmp_path / "cut")
    stream = np.concatenate([s.tokens for s in data.train + data.val]).tolist()
    assert max(lengths) <= 50 and len(lengths) > 10
    assert stream.count(tok.eos_id) == 2 and stream[-1] == tok.eos_id and small["total_tokens"] == len(whole)


def test_not_utf8_text_names_the_byte_across_reads(tmp_path, monkeypatch):
    import stackfast.data.readers as readers
    monkeypatch.setattr(readers, "READ_BYTES", 8)
    # Reads of 8 bytes cut the 2-byte characters in two: the decoder holds a byte between reads.
    (tmp_path / "bad.txt").write_bytes(b"a" + "é".encode() * 20 + b"\xff" + b"abc")
    with pytest.raises(DataError, match="bad.txt: not UTF-8 text .* at byte 41"):
        tokenize([tmp_path / "bad.txt"], "bytes", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("change, message", [
    (lambda i: i.pop("vocab_size"), "vocab_size missing"),
    (lambda i: i.update(vocab_size="256"), "vocab_size str '256'"),
    (lambda i: i.update(vocab_size=0), "vocab_size 0"),
    (lambda i: i.update(dtype="int8"), "dtype 'int8'"),
    (lambda i: i.pop("tokenizer"), "tokenizer missing"),
    (lambda i: i["tokenizer"].pop("fingerprint"), "tokenizer.fingerprint missing"),
    (lambda i: i.update(train={}), "train dict"),
    (lambda i: i["val"][0].update(tokens=None), r"val\[0\].tokens NoneType"),
    (lambda i: i["train"][0].update(file="../../etc/passwd"), r"train\[0\].file '../../etc/passwd' is not a file"),
    (lambda i: i["tokenizer"].update(file="/tmp/x.json"), "tokenizer.file '/tmp/x.json' is not a file"),
    (lambda i: i.update(val_fraction="0.1"), "val_fraction str '0.1'"),
    (lambda i: i.update(val_fraction=0.7), r"val_fraction 0.7 \(expected 0 < x < 0.5\)"),
])
def test_index_with_a_missing_or_wrong_key_names_the_file_and_key(corpus, tmp_path, change, message):
    tokenize([corpus], "bytes", tmp_path / "ds")
    path = tmp_path / "ds" / "index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))
    with pytest.raises(DataError, match=f"index.json: corrupt index: {message}"):
        TokenData(tmp_path / "ds")


def test_short_validation_split_is_found_before_training(corpus, tmp_path):
    tokenize([corpus], "bytes", tmp_path / "ds", val_fraction=0.01)  # 17 held-out tokens
    data = TokenData(tmp_path / "ds")
    TokenLoader(data, 16, 2).check_validation()  # one window of 17 tokens: enough
    with pytest.raises(DataError, match=r"validation split has 17 tokens, 0 windows of 18 \(seq_len 17 \+ 1\)"):
        TokenLoader(data, 17, 2).check_validation()
    with pytest.raises(DataError, match="validation split has 17 tokens"):
        next(TokenLoader(data, 17, 2).val_batches(1))


def test_every_rank_gets_the_same_number_of_validation_batches(corpus, tmp_path):
    tokenize([corpus], "bytes", tmp_path / "ds", val_fraction=0.3)
    data = TokenData(tmp_path / "ds")
    n_windows = len(TokenLoader(data, 16, 2).val_rows)  # 511 held-out tokens: 30 windows of 17
    assert n_windows == 30
    # 4 processes: the 30 windows cut to 28, 7 each, in micro-batches of 5 and 2 on every rank (a
    # rank with a forward more than the others would wait forever on a sharded model).
    sizes = [[len(x) for x, _ in TokenLoader(data, 16, 20, 5, rank=r, world_size=4).val_batches(40)] for r in range(4)]
    assert sizes == [[5, 2]] * 4
    assert [len(x) for x, _ in TokenLoader(data, 16, 7).val_batches(63)] == [7, 7, 7, 7, 2]  # one process: all
    TokenLoader(data, 16, 30, world_size=30).check_validation()  # a window for each of 30 processes
    with pytest.raises(DataError, match="40 needed for 40 processes"):
        TokenLoader(data, 16, 40, world_size=40).check_validation()


def test_truncated_shard_and_bad_ids_name_the_file(corpus, tmp_path):
    out = tmp_path / "ds"
    tokenize([corpus], "bytes", out)
    shard = out / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(DataError, match="train_00000.bin: truncated or corrupt shard"):
        TokenData(out)
    # A shard holding an id beyond the index's vocabulary is caught when a window is read.
    tokenize([corpus], "bytes", out, force=True)
    np.full(2000, 300, dtype=np.uint16).tofile(shard)
    index = json.loads((out / "index.json").read_text())
    index["train"] = [{"file": "train_00000.bin", "tokens": 2000}]
    (out / "index.json").write_text(json.dumps(index))
    loader = TokenLoader(TokenData(out), 16, 2)
    with pytest.raises(DataError, match="train_00000.bin: token id 300 >= vocab size 256"):
        loader.batch(0)


def test_vocab_and_tokenizer_mismatch_with_config(corpus, tmp_path):
    tokenize([corpus], "bytes", tmp_path / "ds")
    with pytest.raises(DataError, match="vocab size 256 exceeds model.vocab_size 100"):
        TokenData(tmp_path / "ds", vocab_size=100)
    tok_path = tmp_path / "t.json"
    train_bpe(["abc"] * 5, 270, tok_path)
    with pytest.raises(DataError, match="shards were made with tokenizer bytes"):
        open_data(DataConfig(path=str(tmp_path / "ds"), tokenizer=str(tok_path)), 4096)
    with pytest.raises(DataError, match="not a dataset folder"):
        TokenData(tmp_path)


@pytest.mark.parametrize("sampling", ["epoch", "random"])
def test_loader_is_deterministic_resumable_and_rank_aware(corpus, tmp_path, sampling):
    tokenize([corpus], "bytes", tmp_path / "ds")
    data = TokenData(tmp_path / "ds")
    one = TokenLoader(data, 32, 8, seed=7, sampling=sampling)  # a global batch of 8 rows in one pass
    x, y = one.batch(3)
    assert x.shape == (8, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    # Exact resume: a batch depends only on (seed, step), not on history.
    fresh = TokenLoader(data, 32, 8, seed=7, sampling=sampling)
    assert torch.equal(fresh.batch(3)[0], x)
    assert not torch.equal(one.batch(4)[0], x)
    assert not torch.equal(TokenLoader(data, 32, 8, seed=8, sampling=sampling).batch(3)[0], x)
    # The same global batch at any number of processes and micro-batch size: 2 ranks x 2
    # micro-batches of 2 rows hold the one-process batch of 8, in order.
    parts = [TokenLoader(data, 32, 8, 2, seed=7, rank=r, world_size=2, sampling=sampling).batch(3, m)[0]
             for r in range(2) for m in range(2)]
    assert all(p.shape == (2, 32) for p in parts) and torch.equal(torch.cat(parts), x)
    # Extra batches (LiGO's) are fresh data, drawn at random (under "random", never a row of the step's own batch).
    extra = one.extra_batch(3, 0)[0]
    assert extra.shape == (8, 32) and torch.equal(extra, TokenLoader(data, 32, 8, seed=7, sampling="random").extra_batch(3, 0)[0])
    assert sampling == "epoch" or not any(torch.equal(row, r) for row in extra for r in x)


def test_validation_batches_are_fixed_and_held_out(corpus, tmp_path):
    tokenize([corpus], "bytes", tmp_path / "ds", val_fraction=0.3)
    loader = TokenLoader(TokenData(tmp_path / "ds"), 16, 4, 2)
    first = [x for x, _ in loader.val_batches(6)]
    again = [x for x, _ in loader.val_batches(6)]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again))
    val_stream = torch.from_numpy(np.concatenate([s.tokens for s in loader.data.val]).astype(np.int64))
    assert torch.equal(first[0][0], val_stream[:16]) and torch.equal(first[0][1], val_stream[17:33])
    # Two processes split the same rows between them, each in micro-batches.
    ranks = [torch.cat([x for x, _ in TokenLoader(loader.data, 16, 4, 2, rank=r, world_size=2).val_batches(6)])
             for r in range(2)]
    assert torch.equal(torch.cat(ranks), torch.cat(first))


def test_builtin_corpus_is_built_once_and_cached(stackfast_cache):
    folder = builtin_dataset()
    assert folder.parent == stackfast_cache
    data = open_data(DataConfig(path=BUILTIN_STDLIB), 4096)
    assert data.vocab_size == 4096 and data.index["total_tokens"] > 1_000_000
    assert (folder / "tokenizer.json").is_file()
    mtime = (folder / "index.json").stat().st_mtime_ns
    assert builtin_dataset() == folder and (folder / "index.json").stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="unknown built-in corpus"):
        open_data(DataConfig(path="builtin:wikipedia"), 4096)


def test_prefetcher_yields_the_loaders_batches_in_order(corpus, tmp_path):
    from stackfast.data import Prefetcher
    tokenize([corpus], "bytes", tmp_path / "ds")
    loader = TokenLoader(TokenData(tmp_path / "ds"), 16, 6, 3, seed=5)
    keys = [(s, m) for s in range(4, 9) for m in range(2)]
    prefetcher = Prefetcher(loader, keys, depth=2)
    for s, m in keys:
        x, y = prefetcher.batch(s, m)
        assert torch.equal(x, loader.batch(s, m)[0]) and torch.equal(y, loader.batch(s, m)[1])
    prefetcher.close()
    out_of_order = Prefetcher(loader, keys)
    with pytest.raises(RuntimeError, match="out of order"):
        out_of_order.batch(5, 0)
    out_of_order.close()
    # A loader error (here: a window past the vocabulary) reaches the training thread.
    bad = TokenLoader(TokenData(tmp_path / "ds"), 16, 6, 3, seed=5)
    bad.data.vocab_size = 1
    failing = Prefetcher(bad, keys)
    with pytest.raises(DataError, match="token id"):
        failing.batch(4, 0)
    failing.close()


@pytest.mark.parametrize("shard_tokens, val_fraction", [(7, 0.3), (50, 0.2), (1000, 0.01), (193, 0.1)])
def test_streamed_shards_and_validation_tail_match_the_token_stream(corpus, tmp_path, shard_tokens, val_fraction):
    """Tokens go to disk as they are made; the validation split is cut from the end of the
    stream afterwards, across shard boundaries: the same bytes, in order, as one stream."""
    out = tmp_path / "ds"
    index = tokenize([corpus], "bytes", out, val_fraction=val_fraction, shard_tokens=shard_tokens)
    expected = (corpus / "a.txt").read_bytes() + b"first documentsecond one" + (corpus / "sub" / "b.txt").read_bytes()
    data = TokenData(out)
    train = np.concatenate([s.tokens for s in data.train])
    val = np.concatenate([s.tokens for s in data.val])
    assert bytes(np.concatenate([train, val]).astype(np.uint8)) == expected
    assert val.size == round(len(expected) * val_fraction) and index["total_tokens"] == len(expected)
    for split in ("train", "val"):  # full shards then one partial one, no empty files
        sizes = [s["tokens"] for s in index[split]]
        assert all(size == shard_tokens for size in sizes[:-1]) and 0 < sizes[-1] <= shard_tokens
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(s["file"] for s in index["train"] + index["val"])


def test_an_unreadable_subfolder_is_refused_like_an_unreadable_file(corpus, tmp_path, monkeypatch):
    """os.walk skips a folder it cannot list unless told otherwise: a dataset would silently
    lack its text. Unreadable is simulated by monkeypatching os.scandir (the test may run as
    root, whom permissions do not stop)."""
    import os
    scandir = os.scandir

    def forbidden(path="."):
        if not isinstance(path, int) and os.fspath(path) == str(corpus / "sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", forbidden)
    with pytest.raises(DataError, match=rf"^{corpus / 'sub'}: cannot read folder \(Permission denied\)$"):
        tokenize([corpus], "bytes", tmp_path / "ds")
    assert not (tmp_path / "ds").exists() and not any(p.name.startswith(".ds") for p in tmp_path.iterdir())


def test_a_lone_surrogate_in_jsonl_names_the_line_or_is_replaced(tmp_path):
    """JSON can escape half of a UTF-16 pair alone ("\\ud800"): no character, no UTF-8. Strict
    refuses it naming file and line; --utf8-errors replace reads it as U+FFFD, as it reads bytes
    that are not UTF-8. An escaped pair is one character and is fine."""
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "pair \\ud83d\\ude00"}\n{"text": "a\\ud800b"}\n{"text": "c\\udfffd"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: 'text' holds a lone surrogate \\ud800 .* at character 1; "
                                        rf"--utf8-errors replace reads it as U\+FFFD$"):
        tokenize([path], "bytes", tmp_path / "strict")
    assert not (tmp_path / "strict").exists()
    tokenize([path], "bytes", tmp_path / "replaced", utf8_errors="replace", val_fraction=0.1)
    data = TokenData(tmp_path / "replaced")
    stream = np.concatenate([s.tokens for s in data.train + data.val]).astype(np.uint8).tobytes()
    assert stream.decode("utf-8") == "pair \U0001F600a\ufffdbc\ufffdd"


def test_jsonl_bytes_that_are_not_utf8_follow_utf8_errors(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:1: not UTF-8 text"):
        tokenize([path], "bytes", tmp_path / "strict")
    tokenize([path], "bytes", tmp_path / "replaced", utf8_errors="replace", val_fraction=0.2)
    data = TokenData(tmp_path / "replaced")
    assert np.concatenate([s.tokens for s in data.train + data.val]).astype(np.uint8).tobytes() == "caf\ufffd".encode()


def test_an_output_inside_an_input_folder_is_refused(corpus, tmp_path):
    """A second run with --pattern '*' --force would read the first output's shards as text."""
    tokenize([corpus], "bytes", tmp_path / "ds")  # outside: fine
    for out in (corpus / "tokens", corpus / "sub" / "tokens"):
        with pytest.raises(DataError, match=rf"^{out}: is inside the input folder {corpus}, whose files would be "
                                            rf"read back as text"):
            tokenize([corpus], "bytes", out, patterns=["*"], force=True)
        assert not out.exists()
    assert sorted(p.name for p in corpus.iterdir()) == ["a.txt", "c.jsonl", "sub"]


def test_stale_temporary_folders_of_the_output_are_removed_and_live_ones_kept(corpus, tmp_path):
    """A tokenize killed with kill -9 leaves `.OUT.tmp-XXXXXXXX` (its lock released by the
    kernel): the next write of OUT removes it. One whose writer still holds its lock stays,
    and so does anything not of that naming."""
    import fcntl
    import os
    stale, live = tmp_path / ".ds.tmp-abcd1234", tmp_path / ".ds.tmp-live_567"
    others = [tmp_path / ".ds.tmp-short", tmp_path / ".other.tmp-abcd1234", tmp_path / "ds.tmp-abcd1234"]
    for folder in [stale, live, *others]:
        folder.mkdir()
        (folder / "train_00000.bin").write_bytes(b"\0" * 100)
    held = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live writer holds its folder
    try:
        tokenize([corpus], "bytes", tmp_path / "ds")
    finally:
        os.close(held)
    assert not stale.exists() and live.exists() and all(o.exists() for o in others)
    assert TokenData(tmp_path / "ds").index["total_tokens"] > 0
