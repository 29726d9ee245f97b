#!/usr/bin/env bash
# Everything a GPU machine should check, in one command:
#   1. build the replication extension (C++ and CUDA, for this GPU) in place against the
#      machine's own torch (~1-2 min);
#   2. install wheels carried in .whl/ (Liger-Kernel for the HF + Liger baseline), if any;
#   3. `stackfast bench` (benchmarks/run_all.py): correctness at real sizes, every timing,
#      the summary table last (~6 min);
#   4. with TESTS=1, the tests that need a GPU: CUDA replication, the Triton kernels
#      compiled for the GPU, the golden trace with the kernels on the GPU (~3 min);
#   5. with DISTRIBUTED=1, benchmarks/gpu_distributed.sh (torchrun + NCCL + FSDP2, ~2 min),
#      then again with the H100 levers (float8 tensorwise, async checkpoints, and HSDP
#      2 x N/2 when the machine has N >= 2 GPUs; ~2 min). The float8 train step and the
#      checkpoint stall (sync vs async) are candidates of step 3.
# The default (1-3) fits one 10-minute call of a lent machine; run TESTS=1 DISTRIBUTED=1
# in a second call while the machine is still warm (the build is kept), or on any GPU box.
# JSON results go to OUT_DIR/results, logs to OUT_DIR; OUT_DIR/gpu_check.tgz packs them
# all into one file (a lent machine returns few files). Copy the JSON into
# benchmarks/results/ and commit it.
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#     TESTS=1 DISTRIBUTED=1 BENCH=0 bash benchmarks/gpu_check.sh OUT_DIR
#
# Exits non-zero if a step failed; every step runs regardless.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run it with a time limit, log to OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name FAILED (exit $rc)"; status=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# This GPU's architecture only (a build for two takes twice as long); the build is required.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export STACKFAST_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
if ! compgen -G "stackfast/_C_cuda*.so" > /dev/null; then  # kept from an earlier call on this machine
    step build 240 $PY setup.py build_ext --inplace
fi
if [ "${BENCH:-1}" = 1 ]; then
    step bench 420 $PY benchmarks/run_all.py --out "$OUT/results"
fi
if [ "${TESTS:-0}" = 1 ]; then
    # One config per kernel, no autotuning: the tests' many sequence lengths would each tune.
    step tests 240 env STACKFAST_AUTOTUNE=0 $PY -m pytest -q tests/test_replicate.py tests/test_attention.py \
        tests/test_rms_norm.py tests/test_golden.py
fi
if [ "${DISTRIBUTED:-0}" = 1 ]; then
    step distributed 200 bash benchmarks/gpu_distributed.sh "$OUT/distributed"
    gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
    levers="--set train.float8=tensorwise --set checkpoint.async_save=true"
    [ "$gpus" -ge 2 ] && [ $((gpus % 2)) -eq 0 ] && levers+=" --set parallel.replicate_degree=2"
    step levers 180 env NPROC="$gpus" SETS="$levers" bash benchmarks/gpu_distributed.sh "$OUT/levers"
fi
archive=$(mktemp --suffix=.tgz)  # written outside OUT, then moved in: tar must not read its own output
tar -C "$OUT" -czf "$archive" --exclude ./distributed/checkpoints --exclude ./levers/checkpoints . && mv "$archive" "$OUT/gpu_check.tgz"
echo "packed $OUT/gpu_check.tgz; exit $status"
exit $status
