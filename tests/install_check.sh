#!/usr/bin/env bash
# A user's install on a clean machine, run by CI (`make install-check`, from .ci/run):
#   1. build a wheel with build isolation (pip's default: the build environment has
#      setuptools and wheel only, no torch), so it is the pure-Python package;
#   2. install it with its [hf] extra into a fresh virtual environment (no system
#      site-packages, no checkout on the path): only what the wheel declares gets in.
#      A constraints file pins torch and triton to the CPU builds `make install` uses; a
#      constraint never installs anything, so a dependency the wheel forgets to declare
#      still fails here;
#   3. from a folder outside the checkout: `stackfast info` (which must report the
#      PyTorch fallback in one line), a 5-step `stackfast train` of the tiny preset on the
#      built-in corpus, `stackfast export-hf`, and transformers loading the export
#      (AutoTokenizer + AutoModelForCausalLM + generate).
# Reuses pip's cache. PYTHON picks the interpreter of the fresh venv; TORCH_SPEC and
# TRITON_SPEC the pins (as in the Makefile); KEEP=1 keeps the work folder.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
TRITON_SPEC="${TRITON_SPEC-triton==3.7.1}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/stackfast-install-check.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
t0=$(date +%s)
step() { echo "install-check [$(( $(date +%s) - t0 )) s] $*"; }

step "building a wheel with build isolation"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WORK/dist" "$REPO"
WHEEL="$(ls "$WORK"/dist/stackfast-*.whl)"
case "$WHEEL" in
  *-py3-none-any.whl) ;;
  *) echo "install-check: expected a pure-Python wheel from an isolated build, got $WHEEL" >&2; exit 1 ;;
esac

step "installing $(basename "$WHEEL")[hf] into a fresh venv"
"$PYTHON" -m venv "$WORK/venv"
BIN="$WORK/venv/bin"
printf '%s\n' $TORCH_SPEC $TRITON_SPEC > "$WORK/constraints.txt"
"$BIN/python" -m pip install --quiet -c "$WORK/constraints.txt" "stackfast[hf] @ file://$WHEEL"

mkdir "$WORK/outside"
cd "$WORK/outside"
export STACKFAST_CACHE="$WORK/cache" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step "stackfast info"
"$BIN/stackfast" info | tee info.txt
grep -q "^replicate_ *PyTorch fallback" info.txt
"$BIN/python" - <<'EOF'
import importlib.metadata, pathlib, stackfast
assert "site-packages" in pathlib.Path(stackfast.__file__).parts, stackfast.__file__  # the wheel, not the checkout
assert importlib.metadata.version("stackfast") == stackfast.__version__
EOF

step "stackfast train: 5 steps of the tiny preset"
"$BIN/stackfast" train --set 'model.preset="tiny"' --set model.kernels=torch --set data.seq_len=32 \
    --set train.micro_batch_size=2 --set train.max_steps=5 --set train.eval_batches=1 \
    --set logging.tensorboard=false --set logging.progress=false --set 'logging.run_dir="run"'
test -d run/checkpoints/step_00000005

step "stackfast export-hf, then transformers loads the export"
"$BIN/stackfast" export-hf --checkpoint run/checkpoints/step_00000005 --out exported
"$BIN/python" - <<'EOF'
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("exported")
model = AutoModelForCausalLM.from_pretrained("exported").eval()
assert tokenizer.eos_token_id is not None and model.config.eos_token_id == tokenizer.eos_token_id
prompt = tokenizer("import os\n", return_tensors="pt")
out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
assert out.shape[1] == prompt["input_ids"].shape[1] + 4
print("transformers:", type(model).__name__, model.num_parameters(), "parameters, generated",
      repr(tokenizer.decode(out[0, -4:])))
EOF

step "stackfast bench --cpu --quick"
"$BIN/stackfast" bench --cpu --quick --out bench
test -s bench/summary-cpu.json  # the suite wrote its results

step "passed"
