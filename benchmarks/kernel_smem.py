"""Shared memory of every attention kernel config, compiled offline (no GPU needed).

Triton compiles each config of the attention kernels for an NVIDIA architecture here,
with ptxas from the triton wheel, and reads the shared memory it needs. A config over the
device's limit cannot launch: the autotuner skips it, and a (head dim, dtype) with no
config left would fail on that GPU. The first config of each kernel is what
STACKFAST_AUTOTUNE=0 runs, so it must fit everything the tests use.

    python benchmarks/kernel_smem.py --arch 90 --head-dims 128,256 --dtypes bf16,fp32

fp32 compiles are slow (up to minutes each: large register tiles).
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks.harness import markdown_table  # noqa: E402

attention = importlib.import_module("stackfast.ops.attention")  # the module, not the function

# Opt-in shared memory per block (bytes): A100 (sm_80), H100/H200 (sm_90).
SMEM_LIMIT = {80: 166912, 90: 232448}
# kernel -> (autotuned kernel, pointer args, fp32 pointer args, int args, float args)
KERNELS = {
    "fwd": (attention._attn_fwd_kernel, ["q_ptr", "k_ptr", "v_ptr", "o_ptr", "lse_ptr"], ["lse_ptr"],
            ["n_heads", "n_kv_heads", "seqlen"], ["qk_scale"]),
    "dkdv": (attention._attn_bwd_dkdv_kernel,
             ["q_ptr", "k_ptr", "v_ptr", "do_ptr", "lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr"],
             ["lse_ptr", "delta_ptr"], ["n_heads", "n_kv_heads", "seqlen"], ["qk_scale", "sm_scale"]),
    "dq": (attention._attn_bwd_dq_kernel, ["q_ptr", "k_ptr", "v_ptr", "do_ptr", "lse_ptr", "delta_ptr", "dq_ptr"],
           ["lse_ptr", "delta_ptr"], ["n_heads", "n_kv_heads", "seqlen"], ["qk_scale", "sm_scale"]),
}


def shared_memory(kernel: str, config: triton.Config, head_dim: int, dtype: str, arch: int) -> int:
    """Bytes of shared memory one program of `kernel` needs with `config` on sm_<arch>."""
    tuner, pointers, fp32_pointers, ints, floats = KERNELS[kernel]
    signature = {p: "*fp32" if p in fp32_pointers else f"*{dtype}" for p in pointers}
    signature.update({name: "i32" for name in ints})
    signature.update({name: "fp32" for name in floats})
    constants = {"HEAD_DIM": head_dim, "CAUSAL": True, "UPCAST": False,
                 "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", **config.kwargs}
    signature.update({name: "constexpr" for name in constants})
    compiled = triton.compile(ASTSource(fn=tuner.fn, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return compiled.metadata.shared


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, choices=sorted(SMEM_LIMIT), default=90)
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--dtypes", default="bf16")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    args = parser.parse_args(argv)
    if attention._launch.INTERPRET:
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels have one config")
    rows = []
    for kernel in args.kernels.split(","):
        for head_dim, dtype in itertools.product(map(int, args.head_dims.split(",")), args.dtypes.split(",")):
            for i, config in enumerate(KERNELS[kernel][0].configs):
                started = time.perf_counter()
                smem = shared_memory(kernel, config, head_dim, dtype, args.arch)
                rows.append({"kernel": kernel, "config": f"{config.kwargs} w{config.num_warps} s{config.num_stages}",
                             "first": i == 0, "head_dim": head_dim, "dtype": dtype, "smem": smem,
                             "fits": smem <= SMEM_LIMIT[args.arch], "compile_s": time.perf_counter() - started})
                print(markdown_table(rows[-1:], list(rows[-1])).splitlines()[-1], flush=True)
    print(markdown_table(rows, list(rows[0])))
    unlaunchable = {(r["kernel"], r["head_dim"], r["dtype"]) for r in rows} - {
        (r["kernel"], r["head_dim"], r["dtype"]) for r in rows if r["fits"]}
    for kernel, head_dim, dtype in sorted(unlaunchable):
        print(f"NO CONFIG FITS sm_{args.arch}: {kernel} head_dim {head_dim} {dtype}")
    return 1 if unlaunchable else 0


if __name__ == "__main__":
    sys.exit(main())
