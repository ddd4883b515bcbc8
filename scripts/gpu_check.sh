#!/usr/bin/env bash
# One command for a lent GPU machine (an H100/H200 with python3, torch, triton, transformers and
# nvcc, and no network): build the extension with its CUDA kernel, run every GPU test, decide the
# Triton dot precision with numbers, and benchmark the pursuit at Mistral-7B and Llama-3-70B
# shapes and head edits on a random 1B Llama. Everything lands in ONE folder:
#
#   summary.txt            one line per step: name, exit status, seconds, time limit
#   gpu_check.log          every step's output, in order
#   pytest_gpu.xml         the GPU tests (JUnit XML)
#   precision.csv          benchmarks/bench_precision.py (the dot-precision decision)
#   bench_pursuit_cuda.csv benchmarks/bench_pursuit.py --gpu-only
#   bench_gains_cuda.csv   benchmarks/bench_gains.py --model random-1b --device cuda
#   RESULTS.md             the rows of all three, with the card's name, to merge into
#                          benchmarks/RESULTS.md
# (8 files at most: what the device tool brings back from $OUT.)
#
#   bash scripts/gpu_check.sh [--out DIR] [--budget SECONDS] [--dry-run]
#
# --out      the folder (default: $OUT when set, else gpu_check_out/)
# --budget   seconds for the whole run (default 470: under 8 minutes); each step gets at most
#            its own limit and what is left of the budget, and is killed by `timeout` past it
# --dry-run  no GPU: CPU, tiny shapes, the Triton interpreter, no build (the extension already
#            built here); tests/integration/test_gpu_check.py runs it so the script cannot rot
#
# Needs no package index: hp_fast is used from this checkout (PYTHONPATH), the extension is
# built in place (python setup.py build_ext --inplace, FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0),
# and wheels in .whl/ (if any) are installed with --no-index into /tmp/site.
set -u -o pipefail

DRY=0
OUT_DIR="${OUT:-gpu_check_out}"
BUDGET=470
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --out=*) OUT_DIR="${1#--out=}" ;;
    --budget) BUDGET="$2"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO" || exit 2
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
: >"$LOG"
: >"$SUMMARY"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
START=$(date +%s)
FAILED=0

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$REPO:${PYTHONPATH:-}"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DEV=cpu
else
  export TRITON_INTERPRET=0 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  DEV=cuda
fi

# step NAME LIMIT CMD...: run CMD under `timeout`, its output appended to the log
step() {
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  [ "$limit" -gt "$left" ] && limit="$left"
  if [ "$limit" -lt 5 ]; then
    echo "$name skipped (budget of ${BUDGET}s spent)" | tee -a "$SUMMARY"
    FAILED=1
    return
  fi
  echo "=== $name (limit ${limit}s): $*" >>"$LOG"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local line="$name rc=$rc $(( $(date +%s) - t0 ))s (limit ${limit}s)"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && line="$line TIMED OUT"
  [ "$rc" = 0 ] || FAILED=1
  echo "$line" | tee -a "$SUMMARY"
}

INFO_PY='
import os, platform, subprocess, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)")
try:
    import triton
    print("triton", triton.__version__, "| TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET"))
except Exception as e:
    print("triton not importable:", e)
import transformers
print("transformers", transformers.__version__)
import hp_fast.ops as o
print("hp_fast._C loaded:", o.extension_available(), "| head_gain on cpu:", o.op_backend("cpu"),
      "| on cuda:", o.op_backend("cuda"))
for cmd in (["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"],
            ["nvcc", "--version"]):
    try:
        print(subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip())
    except OSError:
        print(cmd[0], "not found")
'

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: no CUDA device here; use --dry-run on a machine without a GPU" | tee -a "$SUMMARY"
  exit 2
fi
if [ "$DRY" = 1 ]; then
  echo "build skipped (dry run: the extension built here is used)" | tee -a "$SUMMARY"
else
  step build 120 "$PY" setup.py build_ext --inplace --force
fi
step info 40 "$PY" -c "$INFO_PY"

# every test marked gpu (they live in tests/gpu); skipped with their reason without CUDA
step gpu_tests 120 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs \
  --junitxml="$OUT_DIR/pytest_gpu.xml"

if [ "$DRY" = 1 ]; then
  P_ARGS=(--device cpu --tiny --criteria l1 --repeats 1 --precisions ieee bf16x3)
  B_ARGS=(--device cpu --gpu-shapes tiny --criteria l1 --k 3 --naive-steps 2)
  G_ARGS=(--model random-tiny --device cpu --prefill-samples 2 --decode-samples 8
          --new-tokens 3 --config-tokens 2 --config-rounds 1 --skip-op-cost)
else
  P_ARGS=(--device cuda)
  B_ARGS=(--device cuda --gpu-shapes Mistral-7B Llama-3-70B --k 50 --naive-steps 3
          --criteria l2 ormp l1)
  G_ARGS=(--model random-1b --device cuda --dtype bfloat16 --threads 4 --prefill-samples 10
          --decode-samples 40 --new-tokens 32 --config-tokens 16 --config-rounds 2)
fi
step precision 50 "$PY" benchmarks/bench_precision.py "${P_ARGS[@]}" --out "$OUT_DIR" \
  --results-md "$OUT_DIR/RESULTS.md"
step bench_pursuit 120 "$PY" benchmarks/bench_pursuit.py --gpu-only "${B_ARGS[@]}" \
  --out "$OUT_DIR" --results-md "$OUT_DIR/RESULTS.md"
step bench_gains 50 "$PY" benchmarks/bench_gains.py "${G_ARGS[@]}" --config-sets random16 \
  --csv "$OUT_DIR/bench_gains_$DEV.csv" --results-md "$OUT_DIR/RESULTS.md"

echo "total $(( $(date +%s) - START ))s, $( [ $FAILED = 0 ] && echo 'all steps passed' \
  || echo 'SOME STEPS FAILED (see gpu_check.log)')" | tee -a "$SUMMARY"
exit $FAILED
