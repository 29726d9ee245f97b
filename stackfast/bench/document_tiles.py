"""The share of attention tiles the document mask skips, exact, on the CPU (no GPU needed).

    python -m stackfast.bench.document_tiles [--json]

For every window of `seqlen` consecutive tokens of a corpus (non-overlapping, as packed rows),
the document ids the loader gives (a new document begins after each EOS) go through
stackfast.ops.attention.document_tiles at the GPU block sizes of the causal bf16 kernels at head
dim 128 on sm_90 (the forward's query x key blocks; the dk/dv kernel's key x query blocks), and
the tiles computed are summed against those of the unmasked causal kernel. Corpora: the built-in
one (the Python standard library's files, one document each, BPE-tokenized as
`builtin:python-stdlib`) and a corpus of short documents (log-normal lengths, median 200 tokens,
sigma 1, seeded): the share skipped grows as documents get shorter than the sequence.
"""
import argparse
import json
import os

import numpy as np

os.environ.setdefault("TRITON_INTERPRET", "1")  # the count needs no GPU; the module imports triton

from stackfast.bench.harness import markdown_table  # noqa: E402
from stackfast.ops.attention import CONFIGS, document_tiles  # noqa: E402

SEQLENS = (2048, 4096, 8192)
ARCH, HEAD_DIM = 90, 128


def builtin_stream() -> tuple[np.ndarray, int]:
    """(the built-in corpus's training tokens end to end, its EOS id)."""
    from stackfast.data import TokenData, builtin_dataset
    data = TokenData(builtin_dataset())
    return np.concatenate([np.asarray(shard.tokens) for shard in data.train]), data.index["tokenizer"]["eos_id"]


def short_documents_stream(tokens: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """(a token stream of short documents, each ended by EOS (id 1; other tokens 0), its EOS id)."""
    lengths = np.maximum(1, np.random.default_rng(seed).lognormal(np.log(200), 1.0, tokens // 100).astype(int))
    stream = np.zeros(int(lengths.sum()), dtype=np.int64)
    stream[np.cumsum(lengths) - 1] = 1
    return stream[:tokens], 1


def window_document_ids(stream: np.ndarray, eos: int, seqlen: int) -> np.ndarray:
    """(windows, seqlen): the loader's document ids of each non-overlapping window."""
    from stackfast.data.sampling import document_ids
    return document_ids(stream[: len(stream) // seqlen * seqlen].reshape(-1, seqlen), eos)


def rows(corpus: str, stream: np.ndarray, eos: int) -> list[dict]:
    fwd_m, fwd_n = CONFIGS["fwd"][ARCH][HEAD_DIM][0][:2]
    bwd_m, bwd_n = CONFIGS["dkdv"][ARCH][HEAD_DIM][0][:2]
    out = []
    for seqlen in SEQLENS:
        ids = window_document_ids(stream, eos, seqlen)
        fwd, fwd_plain = document_tiles(ids, fwd_m, fwd_n, causal=True)
        bwd, bwd_plain = document_tiles(ids, bwd_m, bwd_n, causal=True, keys_outer=True)
        out.append({"corpus": corpus, "seqlen": seqlen, "windows": len(ids),
                    "mean_documents": round(float((ids[:, -1] + 1).mean()), 2),
                    "fwd_skipped": round(1 - fwd / fwd_plain, 4), "bwd_skipped": round(1 - bwd / bwd_plain, 4),
                    "fwd_blocks": f"{fwd_m}x{fwd_n}", "bwd_blocks": f"{bwd_m}x{bwd_n}"})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args(argv)
    stream, eos = builtin_stream()
    results = rows("builtin:python-stdlib", stream, eos) + rows("short documents", *short_documents_stream(len(stream)))
    if args.json:
        for row in results:
            print(json.dumps(row))
    else:
        print(markdown_table(results, list(results[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
