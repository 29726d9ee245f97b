#!/usr/bin/env bash
# One-GPU check of the distributed path, in about two minutes:
#   torchrun + NCCL + FSDP2 (bf16 parameters for compute, fp32 reduction and master weights),
#   G_stack growth of the sharded model mid-run (local copies), DCP checkpoints, and
#   `--resume auto` after the newest checkpoint is lost (it must redo the same steps).
# The multi-process path is the same code; the CPU tests run it with gloo and 2 processes.
#
#     bash benchmarks/gpu_distributed.sh [OUT_DIR]      (default runs/gpu_distributed)
#
# NPROC (default 1) processes, one per GPU; SETS adds --set overrides to both runs, e.g. the
# H100 levers: SETS="--set train.float8=tensorwise --set checkpoint.async_save=true
# --set parallel.replicate_degree=2" (HSDP needs NPROC >= 2, a multiple of it).
#
# Prints the run's numbers and "OK" or "FAILED: <why>" last; exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_distributed}
rm -rf "$OUT"
PY=${PYTHON:-python}
COMMON=(--set model.preset=toy --set data.seq_len=256 --set train.global_batch_size=16
        --set train.max_steps=60 --set train.eval_every=30 --set checkpoint.every_steps=20
        --set checkpoint.keep_last=5 --set logging.log_every=10 --set logging.progress=false
        --set logging.tensorboard=false
        # grow the 2-layer toy-small into the 8-layer toy after 20 steps (20 * 16 * 256 tokens)
        --set growth.operator=stack --set growth.factor=4 --set growth.at_tokens=81920
        --set growth.optimizer=replicate --set "logging.run_dir=$OUT")
NPROC=${NPROC:-1}
read -r -a EXTRA <<< "${SETS:-}"
COMMON+=("${EXTRA[@]}")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

echo "== full run: 60 steps, growth at step 20, checkpoints at 20, 40, 60"
$PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" stackfast/train.py "${COMMON[@]}"
cp "$OUT/metrics.jsonl" "$OUT/metrics-full.jsonl"

echo "== lose the step-60 checkpoint, then --resume auto (restarts from step 40)"
rm -rf "$OUT/checkpoints/step_00000060"
$PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" stackfast/train.py "${COMMON[@]}" --resume auto

$PY - "$OUT" <<'EOF'
import json, math, sys
from pathlib import Path

out = Path(sys.argv[1])
read = lambda name: [json.loads(l) for l in (out / name).read_text().splitlines() if l.strip()]
full, resumed = read("metrics-full.jsonl"), read("metrics.jsonl")
train = {r["step"]: r for r in full if "loss" in r}
again = {r["step"]: r for r in resumed if "loss" in r}
growth = next(r for r in full if r.get("event") == "growth")
val = [r["val_loss"] for r in full if "val_loss" in r]
print(f"loss step 1 {train[1]['loss']:.4f} -> step 60 {train[60]['loss']:.4f}; val_loss {val}")
print(f"growth at step {growth['step']}: {growth['params_before'] / 1e6:.1f}M -> {growth['params_after'] / 1e6:.1f}M "
      f"in {growth['growth_s'] * 1e3:.1f} ms; probe loss {growth['loss_before']:.4f} -> {growth['loss_after']:.4f}")
print(f"tokens/s {train[60]['tokens_per_s']:.0f}, MFU {train[60]['mfu']}")
diff = max(abs(train[s]["loss"] - again[s]["loss"]) for s in range(41, 61))
print(f"resumed steps 41-60: max |loss - uninterrupted loss| = {diff:.2e}")
checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
print("checkpoints:", checkpoints)
problems = []
if not all(math.isfinite(r["loss"]) for r in train.values()):
    problems.append("non-finite loss")
if not train[60]["loss"] < train[1]["loss"] - 1.0:
    problems.append("loss did not fall by 1 nat")
if growth["params_after"] <= growth["params_before"] or not math.isfinite(growth["loss_after"]):
    problems.append("growth did not give the 8-layer model")
if sorted(again) != list(range(1, 61)) or diff > 2e-2:  # bf16 kernels may differ in the last bits
    problems.append("resumed trajectory differs")
if checkpoints != ["step_00000020", "step_00000040", "step_00000060"]:
    problems.append(f"unexpected checkpoints {checkpoints}")
print("OK" if not problems else "FAILED: " + "; ".join(problems))
sys.exit(1 if problems else 0)
EOF
