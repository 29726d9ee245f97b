"""Attention benchmark: stackfast's Triton flash attention against every torch SDPA backend
(flash, cuDNN, memory-efficient) and flash-attn when it imports; forward and forward+backward
TFLOP/s, bf16, causal, with ratios to the best SDPA backend measured in the same run.

    python -m stackfast.bench.bench_attention [--quick]

Without CUDA it runs a tiny correctness check under the Triton interpreter instead.
FLOPs: forward 4*B*H*S^2*D (half of it when causal); backward 2.5x the forward.

Document masking (one shape, DOCUMENT_CASE): causal attention without and with the document
ids of rows of the built-in corpus (a new document after each EOS), and flash-attn's
flash_attn_varlen_func on the same documents where flash-attn imports; each row's TFLOP/s
counts the causal FLOPs (the convention of the MFU), its ratio is to the unmasked kernel, and
`skipped` is the share of the forward's tiles the mask skips (document_tiles).
"""
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before stackfast.ops defines its kernels

from stackfast.bench import harness
from stackfast.ops import attention, attention_ref
from stackfast.ops.attention import CONFIGS, document_tiles

# (batch, heads, kv_heads, seqlen, head_dim), all causal. The quick set (what `stackfast
# bench` runs): head dims 128 and 64 without GQA, and GQA with 32 query heads on 8 kv heads.
CASES = [(4, 32, 32, 4096, 128), (8, 32, 32, 2048, 64), (8, 32, 32, 2048, 128), (2, 32, 32, 8192, 128),
         (4, 32, 8, 4096, 128)]
QUICK_CASES = CASES[:2] + CASES[-1:]
DOCUMENT_CASE = (4, 32, 32, 8192, 128)  # (batch, heads, kv_heads, seqlen, head_dim), causal


def attention_flops(batch, heads, seqlen, head_dim, causal, backward):
    forward = 4 * batch * heads * seqlen ** 2 * head_dim * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)  # backward = 2.5x forward


def _sdpa(backend):
    """SDPA restricted to one backend, in flash-attn layout (the transposes are views)."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)
    return run


# stackfast's backward under torch.use_deterministic_algorithms(True) (7 matmuls per block
# pair, no atomics) against its default (5 matmuls, dq by fp32 atomics): which is cheaper is
# a GPU question the offline report cannot answer.
DETERMINISTIC = "stackfast-deterministic"


@contextlib.contextmanager
def deterministic(on: bool):
    """torch.use_deterministic_algorithms(on) inside the block, the previous setting after."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def implementations() -> tuple[dict, list[str]]:
    """name -> fn(q, k, v) in (batch, seqlen, heads, head_dim) layout, and notes on the
    baselines that are missing."""
    from torch.nn.attention import SDPBackend
    impls = {"stackfast": lambda q, k, v: attention(q, k, v, causal=True)}
    impls[DETERMINISTIC] = impls["stackfast"]  # fwd+bwd only: dq by its own kernel, no atomics
    notes = []
    for name, backend in [("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION"),
                          ("sdpa-efficient", "EFFICIENT_ATTENTION")]:
        if hasattr(SDPBackend, backend):
            impls[name] = _sdpa(getattr(SDPBackend, backend))
        else:
            notes.append(f"{name}: SDPBackend.{backend} missing in torch {torch.__version__}")
    try:
        from flash_attn import flash_attn_func
        impls["flash-attn"] = lambda q, k, v: flash_attn_func(q, k, v, causal=True)
    except ImportError as error:
        notes.append(f"flash-attn: not importable ({error})")
    return impls, notes


def benchmark(device: torch.device, quick: bool = False) -> list[dict]:
    impls, notes = implementations()
    for note in notes:
        print("skipped", note)
    rows = []
    for batch, heads, kv_heads, seqlen, head_dim in (QUICK_CASES if quick else CASES):
        shape = {"batch": batch, "heads": heads, "kv_heads": kv_heads, "seqlen": seqlen,
                 "head_dim": head_dim, "causal": True}
        q = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=torch.bfloat16,
                        requires_grad=True)
        k, v = (torch.randn(batch, seqlen, kv_heads, head_dim, device=device,
                            dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        d_out = torch.randn_like(q)
        case_rows = []
        for name, fn in impls.items():
            try:
                fn(q, k, v)  # a backend may refuse the shape (GQA, head dim): skip it
            except RuntimeError as error:
                print(f"skipped {name} at {shape}: {str(error).splitlines()[0]}")
                continue
            for backward in (False, True) if name != DETERMINISTIC else (True,):
                if backward:
                    def step(fn=fn, q=q, k=k, v=v, d_out=d_out, on=name == DETERMINISTIC):
                        with deterministic(on):
                            return torch.autograd.grad(fn(q, k, v), (q, k, v), d_out)
                else:
                    def step(fn=fn, q=q, k=k, v=v):
                        with torch.no_grad():
                            return fn(q, k, v)
                timing = harness.measure(step, device=device, warmup=3, reps=10)
                flops = attention_flops(batch, heads, seqlen, head_dim, True, backward)
                case_rows.append({"op": "attention", "impl": name, **shape,
                                  "pass": "fwd+bwd" if backward else "fwd", **timing,
                                  "tflops": harness.tflops(flops, timing["median_ms"])})
        for pass_name in ("fwd", "fwd+bwd"):
            same_pass = [r for r in case_rows if r["pass"] == pass_name]
            sdpa = [r for r in same_pass if r["impl"].startswith("sdpa-")]
            best = max(sdpa, key=lambda r: r["tflops"]) if sdpa else None
            for row in same_pass:
                row["baseline"] = best["impl"] if best else None
                row["ratio"] = row["tflops"] / best["tflops"] if best else None
        rows += case_rows
    return rows + documents(device)


def builtin_document_ids(batch: int, seqlen: int) -> torch.Tensor:
    """(batch, seqlen): the document ids of the built-in corpus's first windows."""
    from stackfast.bench.document_tiles import builtin_stream, window_document_ids
    return torch.from_numpy(window_document_ids(*builtin_stream(), seqlen)[:batch])


def documents(device: torch.device, ids: torch.Tensor | None = None) -> list[dict]:
    """Causal attention fwd+bwd, bf16, at DOCUMENT_CASE, without and with document masking (and
    flash-attn varlen); the documents of `ids` (batch, seqlen), or of the built-in corpus."""
    batch, heads, kv_heads, seqlen, head_dim = DOCUMENT_CASE
    ids = (builtin_document_ids(batch, seqlen) if ids is None else ids).to(device)
    q = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    impls = {"stackfast-causal": lambda q, k, v: attention(q, k, v),
             "stackfast-documents": lambda q, k, v: attention(q, k, v, document_ids=ids)}
    try:
        from flash_attn import flash_attn_varlen_func
        # the documents of every row laid end to end: lengths where the id changes
        flat = (ids + torch.arange(batch, device=device)[:, None] * (int(ids.max()) + 1)).flatten()
        lengths = torch.unique_consecutive(flat, return_counts=True)[1]
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(lengths.max())
        impls["flash-attn-varlen"] = lambda q, k, v: flash_attn_varlen_func(
            q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, longest, longest, causal=True).view_as(q)
    except ImportError as error:
        print(f"skipped flash-attn-varlen: not importable ({error})")
    block_m, block_n = CONFIGS["fwd"][90 if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9
                                      else 80][head_dim][0][:2]
    computed, plain = document_tiles(ids, block_m, block_n, causal=True)
    d_out = torch.randn_like(q)
    rows = []
    for name, fn in impls.items():
        def step(fn=fn):
            return torch.autograd.grad(fn(q, k, v), (q, k, v), d_out)
        timing = harness.measure(step, device=device, warmup=3, reps=10)
        rows.append({"op": "attention", "impl": name, "batch": batch, "heads": heads, "kv_heads": kv_heads,
                     "seqlen": seqlen, "head_dim": head_dim, "causal": True, "pass": "fwd+bwd",
                     "documents": int((ids[:, -1] - ids[:, 0] + 1).sum()), "skipped": round(1 - computed / plain, 4),
                     **timing, "tflops": harness.tflops(attention_flops(batch, heads, seqlen, head_dim, True, True),
                                                        timing["median_ms"])})
    for row in rows:
        row["baseline"], row["ratio"] = "stackfast-causal", row["tflops"] / rows[0]["tflops"]
    return rows


# atol of the check as a fraction of max|ref64|: about one final rounding to the dtype
CHECK_ATOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}


def check(device: torch.device, dtype: torch.dtype, cases) -> list[dict]:
    """Forward and gradients against the fp64 reference with docs/design.md's rule:
    |kernel - ref64| <= 2 |torch - ref64| + atol. cases: (batch, heads, kv_heads, seqlen,
    head_dim, causal)."""
    rows = []
    for batch, heads, kv_heads, seqlen, head_dim, causal in cases:
        q = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=dtype)
                for _ in range(2))
        d_out = torch.randn_like(q)
        results = []
        for fn, kwargs in [(attention, {}), (attention_ref, {}), (attention_ref, {"upcast": True})]:
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            out = fn(*inputs, causal=causal, **kwargs)
            results.append([out.detach(), *torch.autograd.grad(out, inputs, d_out.to(out.dtype))])
        for name, got, low, ref in zip(["out", "dq", "dk", "dv"], *results):
            err = (got.double() - ref).abs()
            bound = 2 * (low.double() - ref).abs() + CHECK_ATOL[dtype] * ref.abs().max()
            rows.append({"op": "attention", "check": name, "dtype": str(dtype), "batch": batch,
                         "heads": heads, "kv_heads": kv_heads, "seqlen": seqlen,
                         "head_dim": head_dim, "causal": causal, "max_err": err.max().item(),
                         "worst_excess": (err - bound).max().item(),
                         "ok": bool((err <= bound).all())})
    return rows


CHECK_COLUMNS = ["op", "check", "dtype", "heads", "kv_heads", "seqlen", "head_dim", "causal",
                 "max_err", "ok"]
BENCH_COLUMNS = ["impl", "batch", "heads", "kv_heads", "seqlen", "head_dim", "pass", "documents", "skipped",
                 "median_ms", "tflops", "baseline", "ratio"]


def main(argv=None) -> int:
    return harness.op_benchmark_main("attention", __doc__.splitlines()[0], check, [(1, 4, 2, 40, 32, True)], benchmark,
                                     CHECK_COLUMNS, BENCH_COLUMNS, argv)


if __name__ == "__main__":
    sys.exit(main())
