"""Flash attention (forward and backward) in Triton, flash-attn layout, causal or not, GQA.

q: (batch, seqlen, heads, head_dim); k, v: (batch, seqlen, kv_heads, head_dim), with
heads a multiple of kv_heads: query head h reads kv head h // GROUP, GROUP = heads //
kv_heads, a compile-time constant of every kernel.

Forward: each program owns a block of query rows and streams the key/value blocks
through an online softmax (the Triton tutorial's arithmetic: scores scaled and shifted by
the row maximum in one FMA, exp2, an additive mask on the blocks that need one), so no
seqlen x seqlen matrix is ever stored. It saves the log-sum-exp of each row (base 2, with
the softmax scale folded in) for the backward.

Backward (FlashAttention-2/3): a preprocess kernel computes delta = rowsum(dO * O); a
dk/dv kernel where each program owns a key block of one kv head and loops over the query
blocks (and over the query heads of its group when GROUP > 1: the GQA reduction happens in
registers). By default it also computes dq there, five matmuls per block pair (S, dP, dV,
dK, dQ), adding each block's dq to an fp32 buffer with atomics; on sm_90 every one of them
is a wgmma (each oriented so that its M is at least 64 rows, see _dkdv_inner). Under
`torch.use_deterministic_algorithms(True)` dq comes instead from a separate kernel where
each program owns a query block (seven matmuls per block pair, as S and dP are computed
twice, but the same bits on every run).

Causal blocks are split into a part fully below the diagonal (no mask computed) and
the blocks that cross the diagonal (masked); the forward and dq kernels also mask the keys
past the end of the sequence, while the dk/dv kernel's padding rows (keys or queries past the
end, loaded as zeros) add nothing that is stored, so it masks neither (see _dkdv_one_head).

Document masking (document_ids, see `attention`): a DOC_MASK constexpr (the unmasked kernels
compile as before) and two (batch, seqlen) int32 tables, the first position of each position's
document and the position past its last (document_bounds). Since documents are contiguous, the
key blocks a query block can share a document with are one range, from the block holding its
first row's document start to its last row's document end (causal: its last row), and the
query blocks of a key block likewise: the loops run over that range only, every tile of it
masked, so the tiles between documents are never computed (document_tiles counts them).

Configs are listed per architecture (sm_80: A100, 163 KB of shared memory per block;
sm_90: H100/H200, 227 KB) and head dim; `compile_specs` hands them to
benchmarks/kernel_stats.py, whose offline compiles (registers, spills, shared memory)
chose them: the first config of each list has no spills.

Layers: kernels -> launchers registered as torch custom ops ("stackfast::attention_fwd",
"stackfast::attention_bwd") with fake implementations and an autograd formula ->
`attention`. `attention_ref` is the pure-PyTorch reference.
"""
import dataclasses
import functools
import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

from stackfast.ops import _launch
from stackfast.ops._documents import document_bounds, same_document

HEAD_DIMS = (16, 32, 64, 128, 256)
# fp32 (the exact path, for tests) holds every tile in 4 bytes: at head dim 256 no config
# fits; see _validate.
FP32_HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E)


def _configs(gpu_configs, interpreter_config):
    """Autotune over `gpu_configs` on a GPU; the interpreter runs one config (it cannot tune).
    STACKFAST_AUTOTUNE=0 takes the first GPU config without tuning: each new sequence
    length then costs one compile instead of one per config (tests, quick checks).

    Each config is (BLOCK_M, BLOCK_N, num_warps, num_stages).
    """
    if _launch.INTERPRET:
        chosen = [interpreter_config]
    else:
        chosen = gpu_configs[:1] if os.environ.get("STACKFAST_AUTOTUNE") == "0" else gpu_configs
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in chosen]


# kernel -> arch -> head dim -> [(BLOCK_M, BLOCK_N, num_warps, num_stages)], the first being
# the default. BLOCK_M counts query rows, BLOCK_N keys; the causal block split needs
# BLOCK_M % BLOCK_N == 0 (forward, dq) and, in dk/dv, one to divide the other. Configs that do
# not fit a device's shared memory are skipped by the autotuner; the lists keep only
# configs without spills in benchmarks/kernel_stats.py (triton 3.7.1, bf16 and fp16; the
# configs that spilled were dropped: 128x128 fwd at head dim 128, 64x32 4-warp fwd at 256).
_SMALL = (16, 32, 64)
CONFIGS = {
    "fwd": {
        90: {**dict.fromkeys(_SMALL, [(128, 64, 8, 3), (128, 128, 8, 3)]),
             128: [(128, 64, 8, 3), (64, 64, 4, 3)],
             256: [(64, 64, 8, 2)]},
        # sm_80 at head dims 16 and 32: ptxas caps 8-warp programs at 128 registers there
        # (and spills); 4 warps do not spill
        80: {16: [(128, 64, 4, 3), (128, 32, 4, 3)], 32: [(128, 64, 4, 3), (128, 32, 4, 3)],
             64: [(128, 64, 8, 3), (64, 64, 4, 3)],
             128: [(64, 64, 8, 2)],
             256: [(64, 32, 8, 2), (32, 32, 4, 2)]},
    },
    # dk/dv (and the atomic dq): dk and dv accumulate in registers, so BLOCK_N * HEAD_DIM
    # bounds the tile; small BLOCK_M (query rows per step) keeps the transient tiles small.
    # sm_90: every matmul has M >= 64 (wgmma; see _dkdv_inner): BLOCK_N >= 64, or at head dim 256
    # BLOCK_M = 64 with the scores untransposed. The second configs trade wgmma N for fewer dq
    # atomics (BLOCK_N 128: half the atomics, 16 query rows per step) or registers for CTAs.
    "dkdv": {
        90: {**dict.fromkeys(_SMALL, [(64, 128, 8, 2), (64, 64, 4, 2)]),
             128: [(32, 64, 8, 2), (16, 128, 8, 2)],
             256: [(64, 32, 8, 2), (64, 16, 8, 2)]},
        80: {**dict.fromkeys(_SMALL, [(32, 128, 8, 2)]),
             128: [(32, 64, 8, 2), (16, 64, 8, 2)],
             256: [(32, 32, 8, 2)]},
    },
    # dk/dv with GQA (GROUP > 1): the runtime loop over the group's query heads costs registers
    "dkdv-gqa": {
        90: {16: [(64, 128, 8, 2), (64, 64, 8, 2)], 32: [(64, 128, 8, 2), (64, 64, 8, 2)],
             64: [(32, 64, 8, 2), (32, 128, 8, 2)],
             128: [(16, 64, 8, 2), (16, 128, 8, 2)],
             256: [(64, 16, 8, 2)]},
        80: {**dict.fromkeys(_SMALL, [(32, 64, 8, 2)]),
             128: [(16, 64, 8, 2)],
             256: [(16, 32, 8, 2), (16, 16, 8, 2)]},
    },
    "dq": {
        90: {**dict.fromkeys(_SMALL, [(128, 64, 8, 3), (64, 64, 4, 3)]),
             128: [(128, 64, 8, 2), (64, 64, 4, 3)],
             256: [(64, 32, 8, 2)]},
        80: {16: [(64, 64, 4, 3), (64, 32, 4, 2)], 32: [(64, 64, 4, 3), (64, 32, 4, 2)],
             64: [(128, 64, 8, 2), (64, 64, 4, 3)],
             128: [(64, 64, 4, 2)],
             256: [(64, 32, 8, 1)]},
    },
}
# fp32 (exact "ieee" dots, no tensor cores; for tests), shaped like CONFIGS: the dots are
# FMA loops whose operands sit in registers, so the tiles are small. At head dim 128 (the
# worst) 32x32 fwd and dq spilled 1.8-2.3 KB on sm_90 (64x64 fwd: 5.6 KB at head dim 64);
# dk/dv spilled 8-96 B at 16x16 with 2 stages, one stage does not. With GQA ptxas spills a
# few bytes at some warp counts and not others (also without GQA at two points below), so
# each head dim keeps the one the report shows spill-free (at head dim 32 with GQA: 8 warps
# and one stage, on sm_80 the one of six spill-free in all four variants, atomic dq or not,
# causal or not; on sm_90 4 warps spilled 16 B with triton 3.6).
def _fp32_everywhere(config):
    return {arch: dict.fromkeys(FP32_HEAD_DIMS, [config]) for arch in (80, 90)}


FP32_CONFIGS = {
    "fwd": _fp32_everywhere((32, 16, 4, 2)),
    "dkdv": _fp32_everywhere((16, 16, 4, 1)),
    "dkdv-gqa": {90: {16: [(16, 16, 8, 1)], 32: [(16, 16, 8, 1)], 64: [(16, 16, 8, 1)], 128: [(16, 16, 2, 1)]},
                 80: {16: [(16, 16, 4, 1)], 32: [(16, 16, 8, 1)], 64: [(16, 16, 8, 1)], 128: [(16, 16, 2, 1)]}},
    "dq": _fp32_everywhere((32, 16, 4, 2)),
}
# the general configs spill 8-16 B here (non-causal), another warp count does not
FP32_CONFIGS["fwd"][80][32] = [(32, 16, 2, 2)]
FP32_CONFIGS["dkdv"][90][16] = [(16, 16, 8, 1)]
# since the (blocks, heads, batch) grid (no division in the kernels), 32x16 4-warp dq spilled
# 32 B at head dim 128, causal, on sm_90 (and 8-warp 8 B); 16x16 does not
FP32_CONFIGS["dq"][90][128] = [(16, 16, 4, 2)]
# The document-masked kernels (DOC_MASK) take the same configs but where the mask's registers
# made the default spill (benchmarks/kernel_stats.py --doc-mask true): (kernel, arch, head dim)
# -> configs. sm_80 dq at head dim 128: 64x64 with 4 warps spilled 40 B masked (255 registers).
DOC_MASK_CONFIGS = {("dq", 80, 128): [(64, 64, 8, 2)]}
_INTERPRETER_CONFIGS = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dkdv-gqa": (32, 64, 4, 1),
                        "dq": (64, 32, 4, 1)}
# dk/dv at head dim 256 in the GPUs' sm_90 shape (BLOCK_M > BLOCK_N: untransposed scores), so the
# tests run that code path too; (32, 64) runs the transposed one, with the swapped dq from head
# dim 64 (see _dkdv_inner)
_INTERPRETER_CONFIGS_BY_HEAD_DIM = {256: {"dkdv": (64, 32, 4, 1), "dkdv-gqa": (64, 32, 4, 1)}}
# Few configs: every new key costs one compile and one timing per config (seconds).
_TUNE_KEY = ["seqlen", "HEAD_DIM", "CAUSAL", "GROUP", "DOC_MASK"]


def configs_for(kernel: str, arch: int, head_dim: int, dtype: torch.dtype, doc_mask: bool = False) -> list:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) list of `kernel` on sm_<arch>."""
    if doc_mask and dtype != torch.float32 and (kernel, arch, head_dim) in DOC_MASK_CONFIGS:
        return DOC_MASK_CONFIGS[kernel, arch, head_dim]
    return (FP32_CONFIGS if dtype == torch.float32 else CONFIGS)[kernel][arch][head_dim]


def _arch(device: torch.device) -> int:
    """The config table's architecture for a device: 90 for Hopper and later, else 80."""
    if device.type != "cuda":
        return 90  # the interpreter: its one config does not depend on it
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _wgmma(arch: int, dtype: torch.dtype) -> bool:
    """Whether the dots run on sm_90's warpgroup MMA (wgmma), whose M is a multiple of 64: the
    dk/dv kernel then orients its dq matmul for it (_dkdv_inner). fp32 ("ieee") dots are FMA
    loops on every architecture."""
    return arch >= 90 and dtype != torch.float32


@functools.cache
def _tuner(kernel: str, arch: int, head_dim: int, dtype: torch.dtype, doc_mask: bool):
    """The autotuned launcher of `kernel` for one architecture, head dim, dtype and document mask."""
    fn = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dkdv-gqa": _attn_bwd_dkdv_kernel,
          "dq": _attn_bwd_dq_kernel}[kernel]
    # the atomic dq buffer is summed into: zeroed before each timing run of a config
    extra = {"reset_to_zero": ["dq_ptr"]} if kernel.startswith("dkdv") else {}
    interpreter = _INTERPRETER_CONFIGS_BY_HEAD_DIM.get(head_dim, {}).get(kernel, _INTERPRETER_CONFIGS[kernel])
    configs = _configs(configs_for(kernel, arch, head_dim, dtype, doc_mask), interpreter)
    return triton.autotune(configs=configs, key=_TUNE_KEY, **extra)(fn)


@triton.jit
def _tile_ptrs(base_ptr, batch, head, offs_s, seqlen, n_heads, HEAD_DIM: tl.constexpr):
    """Pointers to rows offs_s of one head of a contiguous (batch, seqlen, n_heads, HEAD_DIM)
    tensor: a (len(offs_s), HEAD_DIM) tile. int64 row index: the tensor may pass 2**31."""
    rows = (batch.to(tl.int64) * seqlen + offs_s) * n_heads + head
    return base_ptr + rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _row_offset(batch, head, start, seqlen, n_heads, HEAD_DIM: tl.constexpr):
    """Offset (int64 scalar) of row `start` of one head of a contiguous (batch, seqlen, n_heads,
    HEAD_DIM) tensor; with _block_offsets, the same tile as _tile_ptrs."""
    return ((batch.to(tl.int64) * seqlen + start) * n_heads + head) * HEAD_DIM


@triton.jit
def _block_offsets(n_heads, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """int32 offsets of a (BLOCK, HEAD_DIM) tile from its first row: BLOCK rows of one head
    (below 2**31: 128 rows x 65535 heads, the grid's limit, x 256)."""
    return tl.arange(0, BLOCK)[:, None] * (n_heads * HEAD_DIM) + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _load_tile(ptrs, offs_s, seqlen, UPCAST: tl.constexpr):
    """A tile, zero past the end of the sequence; fp32 under the interpreter (no bf16 math)."""
    tile = tl.load(ptrs, mask=offs_s[:, None] < seqlen, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _load_tile_pair(a_ptr, b_ptr, batch, head, offs_s, seqlen, n_heads,
                    HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """The same rows of the same head of two tensors (k and v, q and dO, o and dO)."""
    a = _load_tile(_tile_ptrs(a_ptr, batch, head, offs_s, seqlen, n_heads, HEAD_DIM),
                   offs_s, seqlen, UPCAST)
    b = _load_tile(_tile_ptrs(b_ptr, batch, head, offs_s, seqlen, n_heads, HEAD_DIM),
                   offs_s, seqlen, UPCAST)
    return a, b


@triton.jit
def _load_row_stats(lse_ptr, delta_ptr, row_base, offs_m, seqlen):
    """lse and delta of query rows offs_m; row_base indexes the (batch, heads, seqlen) layout."""
    lse = tl.load(lse_ptr + row_base + offs_m, mask=offs_m < seqlen, other=0.0)
    delta = tl.load(delta_ptr + row_base + offs_m, mask=offs_m < seqlen, other=0.0)
    return lse, delta


@triton.jit
def _keep(offs_rows, offs_cols, seqlen, CAUSAL: tl.constexpr):
    """(rows, cols) mask of the score entries that exist: key inside the sequence and, when
    causal, key position <= query position. offs_rows are query positions."""
    keep = offs_cols[None, :] < seqlen
    if CAUSAL:
        keep = keep & (offs_rows[:, None] >= offs_cols[None, :])
    return keep


@triton.jit
def _doc_bounds(doc_start_ptr, doc_end_ptr, batch, offs, seqlen):
    """For rows offs of one sequence: the first position of each row's document and the position
    past its end, from the (batch, seqlen) int32 tables of document_bounds (0 and 0 past
    seqlen: such a padding row keeps no key)."""
    base = batch.to(tl.int64) * seqlen
    start = tl.load(doc_start_ptr + base + offs, mask=offs < seqlen, other=0)
    end = tl.load(doc_end_ptr + base + offs, mask=offs < seqlen, other=0)
    return start, end


@triton.jit
def _doc_keep(offs_rows, offs_cols, start, end, CAUSAL: tl.constexpr):
    """(rows, cols) mask of the score entries a query row of a document keeps: the keys of its
    own document, [start, end) (so inside the sequence), and when causal none after it."""
    keep = offs_cols[None, :] >= start[:, None]
    if CAUSAL:  # a key at or before its query is before the end of the query's document: end unread
        keep = keep & (offs_rows[:, None] >= offs_cols[None, :])
    else:
        keep = keep & (offs_cols[None, :] < end[:, None])
    return keep


@triton.jit
def _doc_key_range(doc_start_ptr, doc_end_ptr, batch, start_m, seqlen, CAUSAL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks [lo, hi) that query rows start_m + [0, BLOCK_M) can share a document with:
    from the key block holding the start of the first row's document to the end of the last
    row's document (causal: the last row). The ids are non-decreasing, so every key block
    outside is skipped, and every block inside holds a key some row keeps."""
    base = batch.to(tl.int64) * seqlen
    last = tl.minimum(start_m + BLOCK_M, seqlen) - 1
    lo = (tl.load(doc_start_ptr + base + start_m) // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = last + 1
    else:
        hi = tl.load(doc_end_ptr + base + last)
    return lo, hi


@triton.jit
def _query_block(GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """(start_m, batch, head, kv_head) of this program in the (query blocks, heads, batch) grid
    of launch_grid. The last query blocks (the heaviest when causal) are started first."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    head = tl.program_id(1)
    return start_m, tl.program_id(2), head, head // GROUP


@triton.jit
def _row_stats_base(batch, head, n_heads, seqlen):
    """Offset of row 0 of (batch, head) in the (batch, heads, seqlen) lse and delta, in int64."""
    return (batch.to(tl.int64) * n_heads + head) * seqlen


@triton.jit
def _key_ranges(start_m, seqlen, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """For the query rows start_m + [0, BLOCK_M): keys [0, full_end) need no mask, keys
    [full_end, masked_end) cross the diagonal (causal) or the end of the sequence."""
    if CAUSAL:
        # keys before start_m are visible to all rows
        full_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, seqlen)
    else:
        full_end = (seqlen // BLOCK_N) * BLOCK_N
        masked_end = seqlen
    return full_end, masked_end


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, batch, kv_head, offs_m, seqlen, n_kv_heads,
               qk_scale, lo, hi, doc_start, doc_end, CAUSAL: tl.constexpr, MASK: tl.constexpr,
               DOC_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi): updates acc (BLOCK_M, HEAD_DIM), the row sums
    l_i and the row maxima m_i (base-2 units). DOC_MASK: the mask is _doc_keep's, from the
    rows' document bounds doc_start, doc_end."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_tile_pair(k_ptr, v_ptr, batch, kv_head, offs_n, seqlen, n_kv_heads,
                              HEAD_DIM, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if MASK:
            # Additive mask (diagonal and last blocks only): -1e6 in base-2 units is an exact
            # 0 after exp2. Every row has a finite maximum: key 0 is visible to every row
            # (also to the padding rows past seqlen) and lies in the first block. With
            # DOC_MASK a row may keep no key of a block before its document's first: its
            # maximum is then about -1e6, and the first kept key (the row itself, at the
            # latest) rescales what it summed by exp2(-1e6 - m) = 0.
            if DOC_MASK:
                keep = _doc_keep(offs_m, offs_n, doc_start, doc_end, CAUSAL)
            else:
                keep = _keep(offs_m, offs_n, seqlen, CAUSAL)
            qk = qk * qk_scale + tl.where(keep, 0.0, -1.0e6)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_new[:, None]  # one FMA per score
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, doc_start_ptr, doc_end_ptr, n_heads, seqlen,
                     qk_scale, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                     DOC_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # DOC_MASK: doc_start_ptr and doc_end_ptr hold document_bounds (else None, unread).
    start_m, batch, head, kv_head = _query_block(GROUP, BLOCK_M)
    n_kv_heads = n_heads // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(_tile_ptrs(q_ptr, batch, head, offs_m, seqlen, n_heads, HEAD_DIM),
                   offs_m, seqlen, UPCAST)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if DOC_MASK:  # only the key blocks of the rows' documents, every one masked
        doc_start, doc_end = _doc_bounds(doc_start_ptr, doc_end_ptr, batch, offs_m, seqlen)
        lo, hi = _doc_key_range(doc_start_ptr, doc_end_ptr, batch, start_m, seqlen, CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, batch, kv_head, offs_m, seqlen,
                                   n_kv_heads, qk_scale, lo, hi, doc_start, doc_end, CAUSAL, True, True,
                                   HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION)
    else:
        full_end, masked_end = _key_ranges(start_m, seqlen, CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, batch, kv_head, offs_m, seqlen,
                                   n_kv_heads, qk_scale, 0, full_end, 0, 0, CAUSAL, False, False,
                                   HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, batch, kv_head, offs_m, seqlen,
                                   n_kv_heads, qk_scale, full_end, masked_end, 0, 0, CAUSAL, True, False,
                                   HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION)

    o = acc / l_i[:, None]
    o_ptrs = _tile_ptrs(o_ptr, batch, head, offs_m, seqlen, n_heads, HEAD_DIM)
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < seqlen)
    # lse: (batch, heads, seqlen) fp32, base 2, scale folded in
    tl.store(lse_ptr + _row_stats_base(batch, head, n_heads, seqlen) + offs_m, m_i + tl.math.log2(l_i),
             mask=offs_m < seqlen)


@triton.jit
def _bwd_preprocess_kernel(o_ptr, do_ptr, delta_ptr, n_heads, seqlen,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta[b, h, s] = sum_d o * do, the softmax-backward term shared by dq and dk.
    # Grid: (query blocks, heads, batch) (launch_grid).
    head = tl.program_id(1)
    batch = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o, do = _load_tile_pair(o_ptr, do_ptr, batch, head, offs_m, seqlen, n_heads, HEAD_DIM,
                          True)
    tl.store(delta_ptr + _row_stats_base(batch, head, n_heads, seqlen) + offs_m, tl.sum(o * do, 1),
             mask=offs_m < seqlen)


_PREPROCESS_BLOCK = 32  # rows per program (64 spilled 8 bytes at head dim 128 in fp16)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_start_ptr, doc_end_ptr,
                batch, head, offs_n, seqlen, n_heads, qk_scale, lo, hi, DIAGONAL: tl.constexpr,
                DOC_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                ATOMIC_DQ: tl.constexpr, WGMMA: tl.constexpr):
    """Accumulate into dk, dv the query blocks [lo, hi) of one query head, and with ATOMIC_DQ
    add each block's dq (unscaled) to the fp32 buffer at dq_ptr. DIAGONAL: the causal mask;
    DOC_MASK: the document mask of the query rows (_doc_keep; with DIAGONAL, causal too).

    The matmuls are oriented (at compile time, from the block shape) so that on sm_90 each
    result has M >= 64 rows: wgmma's M is a multiple of 64 (a warpgroup's rows), and Triton
    falls back to mma.sync below that.
    - BLOCK_N >= BLOCK_M (the configs up to head dim 128, and sm_80's): scores transposed
      (BLOCK_N, BLOCK_M), dk and dv (BLOCK_N, HEAD_DIM): M = BLOCK_N in four matmuls. dq is
      ds k (M = BLOCK_M) or, with WGMMA when BLOCK_M < 64 <= HEAD_DIM, dq^T = k^T ds^T
      (M = HEAD_DIM; FlashAttention-3's dQ_swapAB), transposed back. On sm_80 (mma.sync) the
      swapped form cost registers and spilled, so it is sm_90's only.
    - BLOCK_M > BLOCK_N (sm_90 at head dim 256, where 64 keys x 256 of fp32 dk and dv spill):
      scores (BLOCK_M, BLOCK_N), dk and dv accumulated transposed, (HEAD_DIM, BLOCK_N)
      (FlashAttention-3's dKV_swapAB), dq = ds k: M = BLOCK_M or HEAD_DIM in all five."""
    row_base = (batch * n_heads + head).to(tl.int64) * seqlen  # into lse / delta (b, h, s)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, do = _load_tile_pair(q_ptr, do_ptr, batch, head, offs_m, seqlen, n_heads, HEAD_DIM,
                              UPCAST)
        lse, delta = _load_row_stats(lse_ptr, delta_ptr, row_base, offs_m, seqlen)
        if DOC_MASK:
            doc_start, doc_end = _doc_bounds(doc_start_ptr, doc_end_ptr, batch, offs_m, seqlen)
        if BLOCK_M > BLOCK_N:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            p = tl.math.exp2(qk * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
            if DOC_MASK:
                p = tl.where(_doc_keep(offs_m, offs_n, doc_start, doc_end, DIAGONAL), p, 0.0)
            elif DIAGONAL:
                p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
            dv += tl.dot(tl.trans(do), p.to(do.dtype), input_precision=DOT_PRECISION)  # dv^T
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dk += tl.dot(tl.trans(q), ds, input_precision=DOT_PRECISION)  # dk^T
            if ATOMIC_DQ:
                dq = tl.dot(ds, k, input_precision=DOT_PRECISION)  # (BLOCK_M, HEAD_DIM)
                dq_ptrs = _tile_ptrs(dq_ptr, batch, head, offs_m, seqlen, n_heads, HEAD_DIM)
                tl.atomic_add(dq_ptrs, dq, mask=offs_m[:, None] < seqlen, sem="relaxed")
        else:
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
            p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M): P transposed
            if DOC_MASK:  # _doc_keep transposed
                keep_t = offs_n[:, None] >= doc_start[None, :]
                if DIAGONAL:
                    keep_t = keep_t & (offs_m[None, :] >= offs_n[:, None])
                else:
                    keep_t = keep_t & (offs_n[:, None] < doc_end[None, :])
                p_t = tl.where(keep_t, p_t, 0.0)
            elif DIAGONAL:
                p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
            if ATOMIC_DQ:
                if WGMMA and BLOCK_M < 64 and HEAD_DIM >= 64:
                    dq = tl.trans(tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION))
                else:
                    dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)  # (BLOCK_M, HEAD_DIM)
                dq_ptrs = _tile_ptrs(dq_ptr, batch, head, offs_m, seqlen, n_heads, HEAD_DIM)
                tl.atomic_add(dq_ptrs, dq, mask=offs_m[:, None] < seqlen, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_one_head(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_start_ptr, doc_end_ptr,
                   batch, head, start_n, offs_n, seqlen, n_heads, qk_scale, CAUSAL: tl.constexpr,
                   DOC_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   ATOMIC_DQ: tl.constexpr, WGMMA: tl.constexpr):
    """All the query blocks of one query head. Causal: the queries before start_n see none of
    these keys; the query blocks that overlap the key block [start_n, start_n + BLOCK_N) cross
    the diagonal (masked), the later ones see all of it. When BLOCK_M > BLOCK_N the key block
    lies inside the first query block and one loop applies the mask to every block: a second
    (pipelined) loop cost registers that spilled at head dim 256, and the mask is two
    instructions per score against 2 * 5 * 256 matmul FLOPs there.
    Query rows past seqlen (in the last block) need no mask: their q, do, lse and delta load as
    0, so P is 1 and dS 0 there, which adds 0 to dk and dv, and their dq is not stored.
    DOC_MASK: only the query rows that share a document with these keys, from the first key's
    document start (causal: start_n) to the end of the last key's document, every block masked;
    the query blocks outside are skipped."""
    if DOC_MASK:
        base = batch.to(tl.int64) * seqlen
        hi = tl.load(doc_end_ptr + base + tl.minimum(start_n + BLOCK_N, seqlen) - 1)
        if CAUSAL:
            lo = start_n
        else:
            lo = tl.load(doc_start_ptr + base + start_n)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_start_ptr, doc_end_ptr,
                             batch, head, offs_n, seqlen, n_heads, qk_scale, lo, hi, CAUSAL, True, HEAD_DIM,
                             BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION, ATOMIC_DQ, WGMMA)
    elif CAUSAL and BLOCK_M > BLOCK_N:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_start_ptr, doc_end_ptr, batch,
                             head, offs_n, seqlen, n_heads, qk_scale, start_n, seqlen, True, False, HEAD_DIM,
                             BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION, ATOMIC_DQ, WGMMA)
    elif CAUSAL:
        full_start = tl.minimum(start_n + BLOCK_N, seqlen)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_start_ptr, doc_end_ptr, batch,
                             head, offs_n, seqlen, n_heads, qk_scale, start_n, full_start, True, False, HEAD_DIM,
                             BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION, ATOMIC_DQ, WGMMA)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_start_ptr, doc_end_ptr, batch,
                             head, offs_n, seqlen, n_heads, qk_scale, full_start, seqlen, False, False, HEAD_DIM,
                             BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION, ATOMIC_DQ, WGMMA)
    else:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_start_ptr, doc_end_ptr, batch,
                             head, offs_n, seqlen, n_heads, qk_scale, 0, seqlen, False, False, HEAD_DIM, BLOCK_M,
                             BLOCK_N, UPCAST, DOT_PRECISION, ATOMIC_DQ, WGMMA)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr,
                          doc_start_ptr, doc_end_ptr, n_heads, seqlen, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                          DOC_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          ATOMIC_DQ: tl.constexpr, WGMMA: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    # Grid: (key blocks, kv_heads, batch) (launch_grid). WGMMA: sm_90 and later (see _dkdv_inner).
    n_kv_heads = n_heads // GROUP
    start_n = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v = _load_tile_pair(k_ptr, v_ptr, batch, kv_head, offs_n, seqlen, n_kv_heads,
                          HEAD_DIM, UPCAST)
    if BLOCK_M > BLOCK_N:  # dk and dv accumulated transposed (see _dkdv_inner)
        dk = tl.zeros([HEAD_DIM, BLOCK_N], dtype=tl.float32)
        dv = tl.zeros([HEAD_DIM, BLOCK_N], dtype=tl.float32)
    else:
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if GROUP == 1:  # no head loop (compile time)
        dk, dv = _dkdv_one_head(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_start_ptr,
                                doc_end_ptr, batch, kv_head, start_n, offs_n, seqlen, n_heads, qk_scale,
                                CAUSAL, DOC_MASK, HEAD_DIM, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION, ATOMIC_DQ,
                                WGMMA)
    else:
        for head in range(kv_head * GROUP, kv_head * GROUP + GROUP):  # GQA: sum over the group
            dk, dv = _dkdv_one_head(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_start_ptr,
                                    doc_end_ptr, batch, head, start_n, offs_n, seqlen, n_heads, qk_scale,
                                    CAUSAL, DOC_MASK, HEAD_DIM, BLOCK_M, BLOCK_N, UPCAST, DOT_PRECISION, ATOMIC_DQ,
                                    WGMMA)
    if BLOCK_M > BLOCK_N:
        dk = tl.trans(dk)
        dv = tl.trans(dv)

    # The stores' addresses from a scalar base: computed here, not kept from the k and v loads
    # (the same rows) in registers through the loops.
    store_mask = offs_n[:, None] < seqlen
    tile = _block_offsets(n_kv_heads, BLOCK_N, HEAD_DIM)
    row = _row_offset(batch, kv_head, start_n, seqlen, n_kv_heads, HEAD_DIM)
    tl.store(dk_ptr + row + tile, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptr + row + tile, dv.to(dv_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, batch, kv_head, offs_m, seqlen, n_kv_heads,
              qk_scale, lo, hi, doc_start, doc_end, CAUSAL: tl.constexpr, MASK: tl.constexpr,
              DOC_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate into dq (BLOCK_M, HEAD_DIM) the key blocks [lo, hi) (masks as _fwd_inner's)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_tile_pair(k_ptr, v_ptr, batch, kv_head, offs_n, seqlen, n_kv_heads,
                              HEAD_DIM, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if DOC_MASK:
            p = tl.where(_doc_keep(offs_m, offs_n, doc_start, doc_end, CAUSAL), p, 0.0)
        elif MASK:
            p = tl.where(_keep(offs_m, offs_n, seqlen, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_start_ptr, doc_end_ptr,
                        n_heads, seqlen, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                        DOC_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The deterministic path's dq (see the module docstring).
    start_m, batch, head, kv_head = _query_block(GROUP, BLOCK_M)
    n_kv_heads = n_heads // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q, do = _load_tile_pair(q_ptr, do_ptr, batch, head, offs_m, seqlen, n_heads, HEAD_DIM,
                          UPCAST)
    row_base = _row_stats_base(batch, head, n_heads, seqlen)  # into lse / delta (b, h, s)
    lse, delta = _load_row_stats(lse_ptr, delta_ptr, row_base, offs_m, seqlen)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if DOC_MASK:  # as the forward: only the key blocks of the rows' documents
        doc_start, doc_end = _doc_bounds(doc_start_ptr, doc_end_ptr, batch, offs_m, seqlen)
        lo, hi = _doc_key_range(doc_start_ptr, doc_end_ptr, batch, start_m, seqlen, CAUSAL, BLOCK_M, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, batch, kv_head, offs_m, seqlen,
                       n_kv_heads, qk_scale, lo, hi, doc_start, doc_end, CAUSAL, True, True, HEAD_DIM,
                       BLOCK_N, UPCAST, DOT_PRECISION)
    else:
        full_end, masked_end = _key_ranges(start_m, seqlen, CAUSAL, BLOCK_M, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, batch, kv_head, offs_m, seqlen,
                       n_kv_heads, qk_scale, 0, full_end, 0, 0, CAUSAL, False, False, HEAD_DIM,
                       BLOCK_N, UPCAST, DOT_PRECISION)
        dq = _dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, batch, kv_head, offs_m, seqlen,
                       n_kv_heads, qk_scale, full_end, masked_end, 0, 0, CAUSAL, True, False, HEAD_DIM,
                       BLOCK_N, UPCAST, DOT_PRECISION)
    dq_ptrs = _tile_ptrs(dq_ptr, batch, head, offs_m, seqlen, n_heads, HEAD_DIM)
    tl.store(dq_ptrs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=offs_m[:, None] < seqlen)


def _kernel_options(q: torch.Tensor, k: torch.Tensor) -> dict:
    """Constexprs shared by all kernels: fp32 inputs get exact fp32 dots (tests), the others
    the tensor-core default; the interpreter computes in fp32."""
    return {"HEAD_DIM": q.shape[-1], "GROUP": q.shape[2] // k.shape[2], "UPCAST": _launch.INTERPRET,
            "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32"}


# CUDA's grid limits (x, y, z), which Triton does not check: batch * heads on y, as the kernels
# once had it, cannot launch batch 2048 with 32 heads. The kernels take a (sequence blocks,
# heads, batch) grid instead: the blocks of one head run together (sharing its keys and values
# in L2, as before), nothing is divided in the kernel, and a batch above 65535 is launched in
# slices (_batch_slices).
MAX_GRID = (2**31 - 1, 65535, 65535)


def launch_grid(seqlen: int, block: int, heads: int, batch: int) -> tuple[int, int, int]:
    """The grid of a kernel whose programs each own `block` rows of one head of one sequence:
    (cdiv(seqlen, block), heads, batch), checked against CUDA's limits."""
    grid = (triton.cdiv(seqlen, block), heads, batch)
    if any(n > limit for n, limit in zip(grid, MAX_GRID)):
        raise ValueError(f"attention: the launch grid {grid} (sequence blocks, heads, batch) exceeds CUDA's "
                         f"limits {MAX_GRID}")
    return grid


def _batch_slices(batch: int) -> list[slice]:
    """Slices of the batch that a grid's z axis takes (one in all but huge batches)."""
    step = MAX_GRID[2]
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def _launcher(kernel: str, q: torch.Tensor, doc_mask: bool):
    return _tuner(kernel, _arch(q.device), q.shape[-1], q.dtype, doc_mask)


def _rows(table: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """A batch slice of a document table (None: no document mask)."""
    return None if table is None else table[rows]


@torch.library.custom_op("stackfast::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   softmax_scale: float, doc_start: torch.Tensor | None,
                   doc_end: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (o like q, lse (batch, heads, seqlen) fp32 in base 2 with the scale folded in).
    doc_start, doc_end: document_bounds of the document ids, or None (no document mask)."""
    # The kernels index contiguous (batch, seqlen, heads, head_dim) tensors; q, k and v
    # straight out of a projection's .view are contiguous already (no copy).
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    batch, seqlen, n_heads, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((batch, n_heads, seqlen), device=q.device, dtype=torch.float32)

    if o.numel() == 0:  # batch 0 or seqlen 0: nothing to launch (nor to autotune)
        return o, lse
    options = _kernel_options(q, k)
    doc_mask = doc_start is not None
    for rows in _batch_slices(batch):
        def grid(meta, n=rows.stop - rows.start):
            return launch_grid(seqlen, meta["BLOCK_M"], n_heads, n)

        _launcher("fwd", q, doc_mask)[grid](q[rows], k[rows], v[rows], o[rows], lse[rows], _rows(doc_start, rows),
                                            _rows(doc_end, rows), n_heads, seqlen, softmax_scale * LOG2E,
                                            CAUSAL=causal, DOC_MASK=doc_mask, **options)
    return o, lse


@_attention_fwd.register_fake
def _(q, k, v, causal, softmax_scale, doc_start, doc_end):
    batch, seqlen, n_heads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, n_heads, seqlen), dtype=torch.float32)


@torch.library.custom_op("stackfast::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   o: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                   doc_start: torch.Tensor | None,
                   doc_end: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) shaped like q, k, v. dq is summed with fp32 atomics (run-to-run
    differences of fp32 rounding) unless torch.use_deterministic_algorithms(True) is on."""
    do, q, k, v = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    batch, seqlen, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    if q.numel() == 0:  # batch 0 or seqlen 0: empty gradients, nothing to launch
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)  # (batch, heads, seqlen) fp32
    atomic_dq = not torch.are_deterministic_algorithms_enabled()
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    # atomic path: unscaled dq summed in fp32; deterministic path: written by the dq kernel
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic_dq else torch.empty_like(q)
    doc_mask = doc_start is not None
    options = {**_kernel_options(q, k), "CAUSAL": causal, "DOC_MASK": doc_mask}
    scales = (softmax_scale * LOG2E, softmax_scale)
    for rows in _batch_slices(batch):
        n = rows.stop - rows.start
        _bwd_preprocess_kernel[launch_grid(seqlen, _PREPROCESS_BLOCK, n_heads, n)](
            o[rows], do[rows], delta[rows], n_heads, seqlen, HEAD_DIM=head_dim, BLOCK_M=_PREPROCESS_BLOCK)

        def dkdv_grid(meta, n=n):
            return launch_grid(seqlen, meta["BLOCK_N"], n_kv_heads, n)

        _launcher("dkdv" if n_heads == n_kv_heads else "dkdv-gqa", q, doc_mask)[dkdv_grid](
            q[rows], k[rows], v[rows], do[rows], lse[rows], delta[rows], dk[rows], dv[rows], dq[rows],
            _rows(doc_start, rows), _rows(doc_end, rows), n_heads, seqlen, *scales, ATOMIC_DQ=atomic_dq,
            WGMMA=_wgmma(_arch(q.device), q.dtype), **options)
        if not atomic_dq:
            def dq_grid(meta, n=n):
                return launch_grid(seqlen, meta["BLOCK_M"], n_heads, n)

            _launcher("dq", q, doc_mask)[dq_grid](q[rows], k[rows], v[rows], do[rows], lse[rows], delta[rows],
                                                  dq[rows], _rows(doc_start, rows), _rows(doc_end, rows), n_heads,
                                                  seqlen, *scales, **options)
    if atomic_dq:
        return (dq * softmax_scale).to(q.dtype), dk, dv
    return dq, dk, dv


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, causal, softmax_scale, doc_start, doc_end):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.causal, ctx.softmax_scale, doc_start, doc_end = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, doc_start, doc_end)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, doc_start, doc_end = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.softmax_scale, doc_start, doc_end)
    return dq, dk, dv, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("attention: q, k and v must be 4-D (batch, seqlen, heads, head_dim), "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    batch, seqlen, n_heads, head_dim = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, seqlen, head_dim):
        raise ValueError(f"attention: k and v must match q in batch, seqlen and head_dim, got "
                         f"q {tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[2] == 0 or n_heads % k.shape[2] != 0:
        raise ValueError(f"attention: heads ({n_heads}) must be a multiple of kv_heads "
                         f"({k.shape[2]})")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"attention: head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (
            q.dtype == k.dtype == v.dtype):
        raise ValueError("attention: q, k and v must share one dtype among float16, bfloat16 and "
                         f"float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not supports(head_dim, q.dtype):
        raise ValueError(f"attention: head_dim {head_dim} in float32 needs more shared memory than a "
                         f"GPU has (float32 takes head_dim in {FP32_HEAD_DIMS}); use float16 or "
                         "bfloat16, or attention_ref / SDPA")


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take this head dim and dtype (on every supported GPU, sm_80 and up:
    benchmarks/kernel_stats.py compiles them all offline)."""
    return head_dim in (FP32_HEAD_DIMS if dtype == torch.float32 else HEAD_DIMS)


def _validate_document_ids(document_ids, q: torch.Tensor) -> None:
    if not isinstance(document_ids, torch.Tensor):
        raise ValueError(f"attention: document_ids must be a tensor, got {type(document_ids).__name__}")
    if document_ids.shape != q.shape[:2]:
        raise ValueError(f"attention: document_ids must be (batch, seqlen) = {tuple(q.shape[:2])}, got "
                         f"{tuple(document_ids.shape)}")
    if document_ids.dtype.is_floating_point or document_ids.dtype.is_complex or document_ids.dtype == torch.bool:
        raise ValueError(f"attention: document_ids must be an integer tensor, got {document_ids.dtype}")
    if document_ids.device != q.device:
        raise ValueError(f"attention: document_ids is on {document_ids.device}, q on {q.device}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * softmax_scale [+ causal mask] [+ document mask]) v, in Triton, flash-attn layout.

    q: (batch, seqlen, heads, head_dim); k, v: (batch, seqlen, kv_heads, head_dim) with
    heads a multiple of kv_heads. softmax_scale defaults to 1/sqrt(head_dim). Returns q's
    shape and dtype. fp16/bf16 compute with fp32 accumulation.

    document_ids: (batch, seqlen) integers, the document of each position of sequences packed
    from several (non-decreasing in each row, e.g. the count of EOS tokens before it); a query
    then attends only to the keys of its own document, a run of equal ids (an id that comes
    back after another starts a new document), and the kernels skip the tiles of queries and
    keys that share none (see document_tiles).
    """
    _validate(q, k, v)
    _launch.check_device("attention", q, k, v)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    doc_start = doc_end = None
    if document_ids is not None:
        _validate_document_ids(document_ids, q)
        doc_start, doc_end = document_bounds(document_ids)
    # The op saves its inputs for the backward: contiguous here (a no-op for q, k and v straight
    # out of a projection's .view), so a strided view is copied once and the backward reuses it.
    o, _ = _attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), causal, softmax_scale, doc_start,
                          doc_end)
    return o


def _validate_cu_seqlens(name: str, cu_seqlens, total: int) -> list[int]:
    """cu_seqlens as a list (a host sync), after the checks flash-attention's convention implies."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32:
        what = (f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor)
                else type(cu_seqlens).__name__)
        raise ValueError(f"attention_varlen: {name} must be a 1-D int32 tensor, got {what}")
    bounds = cu_seqlens.tolist()
    if not bounds or bounds[0] != 0:
        raise ValueError(f"attention_varlen: {name} must start at 0, got {bounds[:1]}")
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"attention_varlen: {name} must be non-decreasing, got {bounds}")
    if bounds[-1] != total:
        raise ValueError(f"attention_varlen: {name} must end at the total token count {total}, got {bounds[-1]}")
    return bounds


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                     softmax_scale: float | None = None, causal: bool = True) -> torch.Tensor:
    """flash-attention's varlen form (flash_attn_varlen_func) of `attention`: the sequences laid
    end to end, q (total_tokens, heads, head_dim), k and v (total_tokens, kv_heads, head_dim),
    sequence i at rows cu_seqlens[i]:cu_seqlens[i + 1] (int32, from 0 to total_tokens). Self-
    attention only: cu_seqlens_k must equal cu_seqlens_q. Runs `attention` on one row of all
    the tokens with the sequences as its documents. Unlike flash-attention, causal defaults to
    True (as `attention`'s). Returns q's shape and dtype."""
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"attention_varlen: q, k and v must be 3-D (total_tokens, heads, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bounds = _validate_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    if _validate_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0]) != bounds:
        raise ValueError("attention_varlen: cu_seqlens_k must equal cu_seqlens_q (self-attention only)")
    longest = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
    if min(max_seqlen_q, max_seqlen_k) < longest:
        raise ValueError(f"attention_varlen: max_seqlen_q / max_seqlen_k ({max_seqlen_q}, {max_seqlen_k}) are "
                         f"below the longest sequence ({longest})")
    lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], device=q.device)
    document_ids = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)
    return attention(q[None], k[None], v[None], causal=causal, softmax_scale=softmax_scale,
                     document_ids=document_ids[None])[0]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  softmax_scale: float | None = None, upcast: bool = False,
                  document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch attention with attention's signature and layout (materialises the scores).

    document_ids: as `attention`'s (the same-document mask, materialised).
    upcast=False computes in the input dtype, op by op, like plain PyTorch code does;
    upcast=True computes in float64 (on any device) and returns float64: the accuracy
    reference, not cast back, since casting would hide the errors that tests measure.
    """
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[2] // k.shape[2]
    # (batch, seqlen, heads, head_dim) -> (batch, heads, seqlen, head_dim); kv heads repeated
    q = q.transpose(1, 2)
    k = k.transpose(1, 2).repeat_interleave(group, dim=1)
    v = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * softmax_scale  # (batch, heads, seqlen, seqlen)
    seqlen = q.shape[2]
    if causal:
        hidden = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    if document_ids is not None:
        _validate_document_ids(document_ids, q.transpose(1, 2))
        scores = scores.masked_fill(~same_document(document_ids)[:, None], float("-inf"))  # over heads
    return (scores.softmax(-1) @ v).transpose(1, 2)


def document_tiles(document_ids, block_m: int, block_n: int, causal: bool,
                   keys_outer: bool = False) -> tuple[int, int]:
    """(tiles computed with the document mask, tiles computed without it) by the attention
    kernels for these document ids ((batch, seqlen), numpy or torch), per head: exact, on the
    CPU. A tile is one (BLOCK_M query rows, BLOCK_N keys) block pair. keys_outer=False counts the
    forward's (and the deterministic dq kernel's) loops, a program per query block over key
    blocks; keys_outer=True the dk/dv kernel's, a program per key block over query blocks
    starting at its first query row (not a multiple of BLOCK_M)."""
    ids = np.asarray(document_ids.cpu() if isinstance(document_ids, torch.Tensor) else document_ids)
    start, end = (np.asarray(t) for t in document_bounds(torch.from_numpy(ids.astype(np.int64))))
    seqlen = ids.shape[1]
    masked = plain = 0
    if not keys_outer:
        first = np.arange(0, seqlen, block_m)
        last = np.minimum(first + block_m, seqlen) - 1
        lo = start[:, first] // block_n  # in blocks
        hi = last + 1 if causal else end[:, last]
        masked = int((-(-hi // block_n) - lo).sum())
        plain_hi = last + 1 if causal else np.full_like(first, seqlen)
        plain = ids.shape[0] * int((-(-plain_hi // block_n)).sum())
        return masked, plain
    first = np.arange(0, seqlen, block_n)
    last = np.minimum(first + block_n, seqlen) - 1
    lo = first if causal else start[:, first]
    masked = int((-(-(end[:, last] - lo) // block_m)).sum())
    if not causal:
        plain_rows = np.full(len(first), -(-seqlen // block_m))
    elif block_m > block_n:  # one loop from the key block to the end
        plain_rows = -(-(seqlen - first) // block_m)
    else:  # the loop over the diagonal blocks, then the one below it
        plain_rows = -(-(last + 1 - first) // block_m) + -(-(seqlen - last - 1) // block_m)
    return masked, ids.shape[0] * int(plain_rows.sum())


def compile_specs(arch: int) -> list:
    """The kernels of this module for benchmarks/kernel_stats.py (offline compiles): every
    advertised head dim, bf16 and fp16, causal and not, without and with the document mask
    (doc_mask), no GQA (GROUP 1), with the config lists of `arch`; dk/dv also with GQA (GROUP 4),
    each with the atomic dq and in its deterministic form (no atomic dq, with the dq kernel);
    fp32 (the exact path of the tests) at every head dim it takes."""
    sizes = ("n_heads", "seqlen")  # 16-divisible at real sizes (32 heads, seqlen 4096)
    documents = ("doc_start_ptr", "doc_end_ptr")
    specs = []

    def add(name, fn, configs, variant, **constexprs):
        dtype = variant["dtype"]
        fp32 = {"lse_ptr", "delta_ptr"} | ({"dq_ptr"} if constexprs.get("ATOMIC_DQ") else set())
        signature = {a: "*fp32" if a in fp32 else "*i32" if a in documents else f"*{dtype}"
                     for a in fn.arg_names if a.endswith("_ptr")}
        if not constexprs.get("DOC_MASK", True):  # the launcher passes None: a constexpr, unread
            constexprs.update(dict.fromkeys(documents))
            signature = {a: t for a, t in signature.items() if a not in documents}
        hinted = (*signature, *sizes)
        signature.update({a: "i32" for a in sizes})
        signature.update({a: "fp32" for a in ("qk_scale", "sm_scale") if a in fn.arg_names})
        signature = {a: signature[a] for a in fn.arg_names if a in signature}
        configs = tuple(({"BLOCK_M": bm, "BLOCK_N": bn}, w, st) for bm, bn, w, st in configs)
        specs.append(_launch.CompileSpec(f"attention.{name}", fn, signature, hinted, constexprs, configs, variant))

    for dtype, head_dims in [("bf16", HEAD_DIMS), ("fp16", HEAD_DIMS), ("fp32", FP32_HEAD_DIMS)]:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        for head_dim in head_dims:
            for causal in (True, False):
                for doc_mask in (False, True):
                    variant = {"head_dim": head_dim, "dtype": dtype, "causal": causal, "doc_mask": doc_mask,
                               "group": 1}
                    common = {"HEAD_DIM": head_dim, "CAUSAL": causal, "DOC_MASK": doc_mask, "UPCAST": False,
                              "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}

                    def configs(kernel):
                        return configs_for(kernel, arch, head_dim, torch_dtype, doc_mask)

                    add("fwd", _attn_fwd_kernel, configs("fwd"), variant, GROUP=1, **common)
                    for atomic in (True, False):
                        name = "dkdv" if atomic else "dkdv-deterministic"
                        wgmma = _wgmma(arch, torch_dtype)
                        add(name, _attn_bwd_dkdv_kernel, configs("dkdv"), variant, GROUP=1, ATOMIC_DQ=atomic,
                            WGMMA=wgmma, **common)
                        add(name, _attn_bwd_dkdv_kernel, configs("dkdv-gqa"), {**variant, "group": 4}, GROUP=4,
                            ATOMIC_DQ=atomic, WGMMA=wgmma, **common)
                    add("dq", _attn_bwd_dq_kernel, configs("dq"), variant, GROUP=1, **common)
            add("preprocess", _bwd_preprocess_kernel, (), {"head_dim": head_dim, "dtype": dtype}, HEAD_DIM=head_dim,
                BLOCK_M=_PREPROCESS_BLOCK)
            specs[-1] = dataclasses.replace(specs[-1], configs=(({}, 4, 1),))
    return specs
