"""Token data: tokenizers, `stackfast tokenize`, memory-mapped shards and the training loader.

The offline pipeline imports no torch, so that tokenize's worker processes never load it:
    tokenizer.py  Tokenizer ('bytes', tokenizer.json, SentencePiece), train_bpe
    readers.py    input files and their documents (.txt, .jsonl, Parquet, Arrow) in pieces
    shards.py     the dataset format: index checks, TokenData (memory-mapped shards)
    pipeline.py   tokenize(): encoding (worker processes), ShardWriter
    parts.py      tokenizing on several machines: input_part, merge
    builtin.py    the built-in corpus (the Python standard library), resolve_path
    sources.py    a run's datasets: open_data, open_sources (mixtures)
    sampling.py   which window each row reads: epoch orders, the mixture's blend, document ids
The training side imports torch:
    loader.py     TokenLoader (the global batch, split by rank)
    prefetch.py   Prefetcher (batches prepared on a background thread)

This package imports its modules when a name is first asked for (`from stackfast.data
import TokenLoader` loads loader.py and torch; `import stackfast.data.pipeline` does not).
The tunables read at call time (readers.PIECE_CHARS, pipeline.BATCH_DOCUMENTS...) are not
re-exported: set them on their own module, where the code reads them.
"""
from stackfast.errors import DataError
from stackfast.lazy import lazy_exports

_MODULES = {
    "tokenizer": ["EOS_NAMES", "Tokenizer", "train_bpe"],
    "readers": ["DEFAULT_PATTERNS", "Reading", "hf_dataset_files", "input_files", "iter_pieces", "split_document"],
    "shards": ["FORMAT", "MERGED_FORMAT", "Shard", "TokenData", "check_index", "check_output"],
    "pipeline": ["ShardWriter", "available_cores", "encode_in_order", "encode_pieces", "in_batches", "token_dtype",
                 "tokenize"],
    "parts": ["input_part", "merge"],
    "builtin": ["BUILTIN_STDLIB", "BUILTIN_STDLIB_BYTES", "BUILTIN_VOCAB", "builtin_dataset", "cache_dir",
                "resolve_path", "stdlib_files"],
    "sources": ["Source", "describe_tokenizer", "open_data", "open_sources", "tokenizer_identity"],
    "sampling": ["Blend", "document_ids", "epoch_windows", "permute"],
    "loader": ["TokenLoader"],
    "prefetch": ["Prefetcher"],
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}
__all__ = ["DataError", *_HOME]


__getattr__, __dir__ = lazy_exports(__name__, _HOME, globals())
