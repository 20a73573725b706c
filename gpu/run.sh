#!/usr/bin/env bash
# The GPU check in one call (see docs/gpu.md): Triton 2.51 serving the model fp16 on cuda through
# LocalTriton with a numpy<2 stub environment, fp16-vs-fp32 label parity, the benchmark (the product against
# the in-process peers, perf_analyzer sweeps of 1- and 64-sentence requests), and the serving-layout sweep.
# Results in $OUT: summary.md, summary.json, perf.png, sweep_b64.png, sweep_b1.png, results.tar.gz, run.log.
#   bash gpu/run.sh                      # on the GPU machine, with .carry carried
#   PY=.venv/bin/python CARRY=/tmp/carry311 OUT=/tmp/gpu-out bash gpu/run.sh --sentences 128 ...   # CPU try-out
# Extra arguments go to `python -m mtl_tools.gpu device` (e.g. --skip-sweep, --instances 1,2,4,8).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CARRY=${CARRY:-$REPO/.carry}
OUT=${OUT:-/tmp/mtl-gpu-out}
WORK=${WORK:-/tmp/mtl-gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The checkout's packages as the editable install maps them (pyproject.toml); the GPU machine has no install.
export PYTHONPATH="$REPO/tools:$REPO/build:$REPO/server:$REPO/client:$REPO/model_repository/multitask/1${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "== $(date -u +%FT%TZ) $(uname -n) $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
  echo "== python: $("$PY" -c 'import sys, numpy, torch; print(sys.version.split()[0], "numpy", numpy.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())')"
  (cd "$REPO" && "$PY" -m mtl_tools.gpu device --carry "$CARRY" --work "$WORK" --out "$OUT" "$@")
  code=$?
  echo "== python -m mtl_tools.gpu device exited $code"
  # Nothing of ours may outlive the call: Triton and its stubs run in their own process groups.
  left=$(pgrep -f "$WORK/cache/tritonserver" || true)
  [ -n "$left" ] && echo "== leftover Triton processes: $left" && kill -9 $left 2>/dev/null
  exit $code
} 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
