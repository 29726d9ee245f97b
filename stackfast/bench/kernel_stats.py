"""Offline compile report of every Triton kernel in stackfast.ops (no GPU needed).

Each module of stackfast.ops that defines `compile_specs(arch)` lists its kernels: the
signature, the compile-time values of every variant the op advertises (head dim, dtype,
causal, ...) and the configs it autotunes over, the first being the default (what
STACKFAST_AUTOTUNE=0 runs). This script compiles each config for sm_<arch> with the
triton wheel's compiler and ptxas, giving the pointers and the 16-divisible sizes the
`tt.divisibility` 16 hint the runtime gives real tensors (as triton/tools/compile.py
does), and prints per config: registers, spill bytes (stores + loads), shared memory,
whether it fits the architecture's per-block limit, the CTAs per SM that registers and
shared memory allow, and the wgmma / mma.sync / TMA (cp.async.bulk.tensor) instructions
in the PTX.

    python benchmarks/kernel_stats.py --arch 80,90 [--json] [--kernels attention.fwd]
        [--dtypes bf16] [--head-dims 128] [--doc-mask true] [--jobs 2]

--json prints one JSON object per config (keys: kernel, arch, head_dim, dtype, config,
default, registers, spill_bytes, shared_bytes, fits, ctas_per_sm, wgmma, mma, tma, and the
variant's other keys). The exit status is 1 when some (kernel, arch, variant) has no
config that fits, or its default config spills or does not fit. These are compiler
figures, not measurements: nothing runs on a GPU here.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before stackfast.ops defines its kernels: compile them

import triton
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import stackfast.ops
from stackfast.bench.harness import markdown_table

# Opt-in shared memory per block and shared memory per SM (bytes): A100 (sm_80),
# H100/H200 (sm_90). Registers: 64K 32-bit registers per SM, 255 per thread at most.
SMEM_PER_BLOCK = {80: 166912, 90: 232448}
SMEM_PER_SM = {80: 167936, 90: 233472}
REGS_PER_SM = 65536
THREADS_PER_SM = 2048
PTX_COUNTS = {"wgmma": r"\bwgmma\.mma_async\b", "mma": r"\bmma\.sync\b", "tma": r"\bcp\.async\.bulk\.tensor\b"}
COLUMNS = ["kernel", "arch", "head_dim", "dtype", "causal", "doc_mask", "group", "hidden", "config", "default", "registers",
           "spill_bytes", "shared_bytes", "fits", "ctas_per_sm", "wgmma", "mma", "tma", "compile_s"]


@functools.cache
def specs(module_name: str, arch: int) -> list:
    """compile_specs(arch) of one stackfast.ops module ([] when it has none)."""
    module = importlib.import_module(f"stackfast.ops.{module_name}")
    return list(module.compile_specs(arch)) if hasattr(module, "compile_specs") else []


def modules() -> list[str]:
    """The modules of stackfast.ops (a kernel added later is found by its compile_specs)."""
    return sorted(m.name for m in pkgutil.iter_modules(stackfast.ops.__path__) if not m.name.startswith("_"))


def config_name(constexprs: dict, warps: int, stages: int) -> str:
    return " ".join(f"{k}={v}" for k, v in constexprs.items()) + f" w{warps} s{stages}"


def ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of the PTX, from ptxas -v (the flags triton's backend uses)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", str(path), "-o", str(path) + ".o"],
                             capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(registers.group(1)) if registers else 0,
            "spill_stores": int(spills.group(1)) if spills else 0,
            "spill_loads": int(spills.group(2)) if spills else 0}


def compile_one(module_name: str, arch: int, spec_index: int, config_index: int) -> dict:
    """The report row of one config of one spec."""
    spec = specs(module_name, arch)[spec_index]
    constexprs, warps, stages = spec.configs[config_index]
    fn = spec.fn.fn if isinstance(spec.fn, triton.runtime.Autotuner) else spec.fn  # the JITFunction
    values = {**spec.constexprs, **constexprs}
    signature = {**spec.signature, **{name: "constexpr" for name in values}}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.hinted}
    row = {"kernel": spec.kernel, "arch": arch, "head_dim": spec.variant.get("head_dim"),
           "dtype": spec.variant.get("dtype"), **spec.variant, "config": config_name(constexprs, warps, stages),
           "default": config_index == 0}
    started = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, signature, values, attrs), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": stages})
    except Exception as error:  # a config the compiler refuses is a row that does not fit
        return {**row, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}", "registers": 0,
                "spill_bytes": None, "shared_bytes": None, "fits": False, "ctas_per_sm": 0,
                "compile_s": round(time.perf_counter() - started, 1)}
    ptx = compiled.asm["ptx"]
    stats = ptxas_stats(ptx, arch)
    shared = compiled.metadata.shared
    fits = shared <= SMEM_PER_BLOCK[arch]
    threads = 32 * warps
    ctas = min(SMEM_PER_SM[arch] // max(shared + 1024, 1), REGS_PER_SM // max(stats["registers"] * threads, 1),
               THREADS_PER_SM // threads) if fits else 0
    return {**row, "registers": stats["registers"], "spill_bytes": stats["spill_stores"] + stats["spill_loads"],
            "spill_stores": stats["spill_stores"], "spill_loads": stats["spill_loads"], "shared_bytes": shared,
            "fits": fits, "ctas_per_sm": ctas,
            **{name: len(re.findall(pattern, ptx)) for name, pattern in PTX_COUNTS.items()},
            "compile_s": round(time.perf_counter() - started, 1)}


def problems(rows: list[dict]) -> list[str]:
    """Each (kernel, arch, variant) with no fitting config, or whose default config spills
    or does not fit."""
    out = []
    groups: dict = {}
    for row in rows:
        key = tuple((k, row[k]) for k in row if k not in COLUMNS[8:] and k not in (
            "spill_stores", "spill_loads", "error"))
        groups.setdefault(key, []).append(row)
    for key, group in groups.items():
        name = " ".join(f"{k}={v}" for k, v in key if v is not None)
        if not any(r["fits"] for r in group):
            out.append(f"NO CONFIG FITS: {name}")
        for r in group:
            if r["default"] and (not r["fits"] or r["spill_bytes"]):
                out.append(f"DEFAULT CONFIG {'SPILLS' if r['fits'] else 'DOES NOT FIT'}: {name} ({r['config']})")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,90", help="comma-separated: 80 (A100), 90 (H100/H200)")
    parser.add_argument("--json", action="store_true", help="one JSON object per config, nothing else on stdout")
    parser.add_argument("--kernels", default="", help="comma-separated kernel names or prefixes (attention.dkdv)")
    parser.add_argument("--dtypes", default="", help="comma-separated, e.g. bf16,fp16 (default: all advertised)")
    parser.add_argument("--head-dims", default="", help="comma-separated (default: all advertised)")
    parser.add_argument("--causal", choices=["true", "false"], help="only causal (or only non-causal) variants")
    parser.add_argument("--doc-mask", choices=["true", "false"],
                        help="only the document-masked (or only the unmasked) attention variants")
    parser.add_argument("--default-only", action="store_true", help="only the first config of each kernel")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compiles (processes)")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    if unknown := set(archs) - set(SMEM_PER_BLOCK):
        parser.error(f"--arch: unknown {sorted(unknown)}, known {sorted(SMEM_PER_BLOCK)}")

    def wanted(spec) -> bool:
        kernels, dtypes, dims = (s for s in (args.kernels, args.dtypes, args.head_dims))
        return ((not kernels or any(spec.kernel.startswith(k) for k in kernels.split(",")))
                and (not dtypes or spec.variant.get("dtype") in dtypes.split(","))
                and (not dims or spec.variant.get("head_dim") in {int(d) for d in dims.split(",")})
                and (args.causal is None or spec.variant.get("causal", True) == (args.causal == "true"))
                and (args.doc_mask is None or spec.variant.get("doc_mask", False) == (args.doc_mask == "true")))

    jobs = [(module, arch, i, j) for arch in archs for module in modules()
            for i, spec in enumerate(specs(module, arch)) if wanted(spec)
            for j in range(1 if args.default_only else len(spec.configs))]
    if not jobs:
        parser.error("no kernel matches the filters")
    jobs.sort(key=lambda job: specs(*job[:2])[job[2]].variant.get("dtype") == "fp32")  # the slow ones last
    log = sys.stderr if args.json else sys.stdout
    rows = []
    with concurrent.futures.ProcessPoolExecutor(args.jobs) if args.jobs > 1 else _Inline() as pool:
        for row in pool.map(compile_one, *zip(*jobs)):
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(markdown_table([row], [c for c in COLUMNS if c in row]).splitlines()[-1], flush=True)
    if not args.json:
        print(markdown_table(rows, [c for c in COLUMNS if any(c in r for r in rows)]))
    found = problems(rows)
    for line in found:
        print(line, file=log)
    print(f"{len(rows)} configs compiled offline (triton {triton.__version__}), {len(found)} problems", file=log)
    return 1 if found else 0


class _Inline:
    """A pool that runs in this process (--jobs 1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, *iterables):
        return map(fn, *iterables)


if __name__ == "__main__":
    sys.exit(main())
