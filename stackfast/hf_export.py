"""The Hugging Face files beside an exported model's weights, so that an export is a
complete folder: `AutoTokenizer`, `pipeline("text-generation")` and lm-evaluation-harness
load it without hand-written files.

    tokenizer_config.json    tokenizer class, bos/eos/pad/unk tokens, model_max_length
    special_tokens_map.json  the same special tokens (older loaders read this file)
    generation_config.json   bos/eos/pad ids for `generate`
and the special-token ids in config.json (`special_token_ids`).

The tokenizer is the run's own file: a `tokenizers` tokenizer.json (the built-in corpus'
byte-level BPE has one special token, `<|endoftext|>`, which then serves as bos, eos, pad
and unk, as GPT-2's does) or a SentencePiece tokenizer.model (its own <s>, </s>, <unk>).
Training separates documents with the end-of-text token and adds no beginning-of-text
token, so the exported tokenizer adds none either (`add_bos_token: false`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stackfast.data import EOS_NAMES

BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
UNK_NAMES = ("<unk>", "<|unk|>")


@dataclass
class SpecialTokens:
    """Special tokens as (text, id); None where the tokenizer has no such token."""
    bos: tuple[str, int] | None = None
    eos: tuple[str, int] | None = None
    pad: tuple[str, int] | None = None
    unk: tuple[str, int] | None = None
    tokenizer_class: str | None = None


def special_tokens(tokenizer_file: Path | None) -> SpecialTokens:
    """Read the special tokens of a tokenizer.json or SentencePiece .model (none for no file)."""
    if tokenizer_file is None:
        return SpecialTokens()
    if tokenizer_file.suffix == ".model":
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor()
        sp.Load(str(tokenizer_file))

        def piece(i: int) -> tuple[str, int] | None:
            return (sp.IdToPiece(i), i) if i >= 0 else None
        eos = piece(sp.eos_id())
        pad = piece(sp.pad_id()) or eos  # SentencePiece models rarely define pad: generation pads with eos
        return SpecialTokens(piece(sp.bos_id()), eos, pad, piece(sp.unk_id()), "LlamaTokenizer")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_file))

    def first(names: tuple[str, ...]) -> tuple[str, int] | None:
        return next(((n, tok.token_to_id(n)) for n in names if tok.token_to_id(n) is not None), None)
    eos = first(EOS_NAMES)
    # With a single end-of-text token (GPT-2 style) it also marks where a text begins.
    return SpecialTokens(first(BOS_NAMES) or eos, eos, eos, first(UNK_NAMES) or eos, "PreTrainedTokenizerFast")


def special_token_ids(tokens: SpecialTokens) -> dict:
    """bos/eos/pad ids for config.json and generation_config.json."""
    return {f"{kind}_token_id": (getattr(tokens, kind)[1] if getattr(tokens, kind) else None)
            for kind in ("bos", "eos", "pad")}


def tokenizer_files(tokens: SpecialTokens, max_seq_len: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json (nothing without a tokenizer)."""
    if tokens.tokenizer_class is None:
        return {}
    named = {f"{kind}_token": getattr(tokens, kind)[0] for kind in ("bos", "eos", "pad", "unk")
             if getattr(tokens, kind) is not None}
    config = {"tokenizer_class": tokens.tokenizer_class, **named, "model_max_length": max_seq_len,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if tokens.tokenizer_class == "LlamaTokenizer":
        config["legacy"] = False
    return {"tokenizer_config.json": config, "special_tokens_map.json": named}


def write_hf_metadata(folder: Path, model_config: dict, tokenizer_file: Path | None, max_seq_len: int) -> None:
    """Write config.json (with special-token ids), generation_config.json and the tokenizer's
    config files into `folder`, an export being assembled."""
    tokens = special_tokens(tokenizer_file)
    ids = special_token_ids(tokens)
    files = {"config.json": {**model_config, **ids},
             "generation_config.json": {"_from_model_config": True, **ids},
             **tokenizer_files(tokens, max_seq_len)}
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=1) + "\n")
