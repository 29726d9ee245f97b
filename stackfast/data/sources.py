"""A run's datasets: data.path, or the sources of a mixture (data.sources), opened and checked."""
from __future__ import annotations

from dataclasses import dataclass

from stackfast.data.builtin import resolve_path
from stackfast.data.shards import TokenData
from stackfast.errors import DataError


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
