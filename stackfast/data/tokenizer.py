"""Tokenizers behind one interface ('bytes', a Hugging Face tokenizer.json, a SentencePiece
.model), and the training of a byte-level BPE (the built-in corpus's)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from stackfast.errors import DataError

EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")


class Tokenizer:
    """A tokenizer behind one interface: `encode_batch`, `vocab_size`, `eos_id`, `fingerprint`.

    spec is 'bytes', a path to a Hugging Face tokenizer.json, or a SentencePiece .model.

    Text is text: a special token's string inside a document (`<|endoftext|>` in a code
    corpus, `</s>`) is encoded as the characters it is, so the end-of-text id appears only
    where tokenize puts it, between documents. `allow_special_tokens` reads a Hugging Face
    tokenizer's special tokens in the text as their ids instead (the library's default), for
    corpora that mean them. SentencePiece never reads its control symbols (`<s>`, `</s>`)
    from text, so for a .model both settings encode the same.
    """

    def __init__(self, spec: str, *, allow_special_tokens: bool = False):
        self.spec, self.allow_special_tokens = spec, allow_special_tokens
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
            tok.encode_special_tokens = not allow_special_tokens  # True (tokenizers >= 0.15.1): their strings are text
            # encode_batch_fast (tokenizers >= 0.21): the same ids, without the character offsets
            encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
            self._encode = lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]
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
