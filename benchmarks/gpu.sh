#!/usr/bin/env bash
# One short GPU run (under 6 minutes on one H100): the CUDA/Triton tests, then the Pattention
# layer and training-step benchmarks on the GPU. Each stage has a time limit, writes its log and
# (benchmarks) its markdown report into the output directory; summary.md lists every stage with
# its status and duration. A failed or timed-out stage does not stop the later ones; the exit
# status is non-zero if any stage failed.
#
#   benchmarks/gpu.sh [OUT_DIR]            # OUT_DIR defaults to $OUT, then benchmarks/results/gpu
#   benchmarks/gpu.sh --smoke [OUT_DIR]    # every stage in seconds, tiny sizes, on any device
#
# Needs python (PYTHON, default python3) with a CUDA build of torch and triton; pytest is used
# when it imports, otherwise the CUDA checks run from tests/triton_checks.py. Installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
if [[ "${1:-}" == "--smoke" ]]; then
  smoke=1
  shift
fi
out="${1:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
summary="$out/summary.md"
failed=0

device=$("$py" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")') || {
  echo "benchmarks/gpu.sh: $py cannot import torch; set PYTHON to an interpreter that can" >&2
  exit 2
}
if [[ "$device" != cuda && "$smoke" == 0 ]]; then
  echo "benchmarks/gpu.sh: torch sees no CUDA device; run with --smoke to check the script on CPU" >&2
  exit 2
fi

{
  echo "# GPU run"
  echo
  echo "Command: \`benchmarks/gpu.sh$([[ $smoke == 1 ]] && echo ' --smoke') $out\` at $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  "$py" - <<'PY'
import torch
from tokenformer.pattention import triton_available
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
triton = "not installed"
if triton_available():
    import triton as t
    triton = t.__version__
print(f"- device: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton {triton}")
PY
  echo
  echo "| stage | status | seconds | output |"
  echo "| --- | --- | --- | --- |"
} > "$summary"

# stage NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log.
stage() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS status=0 result
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1 || status=$?
  case $status in
    0) result=ok ;;
    124 | 137) result="timed out after ${limit}s"; failed=1 ;;
    *) result="failed (exit $status)"; failed=1 ;;
  esac
  tail -n 4 "$out/$name.log"
  echo "| $name | $result | $((SECONDS - start)) | $name.log$([[ -f $out/$name.md ]] && echo ", $name.md") |" >> "$summary"
}

if [[ $smoke == 1 ]]; then
  scale=6  # CPU compilation is slow: the limits only guard against hangs here
  shapes=(256x32x64)
  compiled_shapes=(256x32x64)
  presets=(cpu-0.3M)
  compiled_preset=cpu-0.3M
  big=(--presets cpu-0.3M --batch 2 --seq 32 --repeats 2 --warmup 1 --peak-size 256)
  sizes=(--batch 2 --seq 32 --peak-size 256 --gen-tokens 4)
  repeats=(--repeats 2 --warmup 1)
else
  scale=1
  shapes=(4096x256x768 4096x512x2048 16384x1024x4096)
  compiled_shapes=(4096x512x2048)
  presets=(cpu-1M cpu-5M)
  compiled_preset=cpu-5M
  big=(--presets 150M --batch 8 --seq 1024 --repeats 10 --warmup 2 --peak-size 8192)
  sizes=(--peak-size 8192)
  repeats=(--repeats 30 --warmup 3)
fi

if "$py" -c 'import pytest' 2> /dev/null; then
  stage tests $((80 * scale)) "$py" -m pytest -q -rs -p no:cacheprovider \
    tests/test_triton_kernels.py tests/test_pattention.py tests/test_compile.py
else
  stage tests $((80 * scale)) "$py" tests/triton_checks.py "$device"
fi
stage pattention $((35 * scale)) "$py" benchmarks/pattention.py --device "$device" --shapes "${shapes[@]}" \
  "${repeats[@]}" --out "$out/pattention.md"
stage pattention-compiled $((55 * scale)) "$py" benchmarks/pattention.py --device "$device" \
  --shapes "${compiled_shapes[@]}" --dtypes bf16 --compile "${repeats[@]}" --out "$out/pattention-compiled.md"
# Eager training of both presets in fp32 and bf16 plus KV-cached generation ran past 45 s on an
# H200: generation (batch 1, a Python loop per token) gets fewer rounds and the stage more time.
stage train_step $((75 * scale)) "$py" benchmarks/train_step.py --device "$device" --presets "${presets[@]}" \
  "${sizes[@]}" "${repeats[@]}" --gen-repeats 3 --modes eager --out "$out/train_step.md"
stage train_step-compiled $((95 * scale)) "$py" benchmarks/train_step.py --device "$device" \
  --presets "$compiled_preset" "${sizes[@]}" "${repeats[@]}" --precisions bf16 --modes compiled --no-generation \
  --out "$out/train_step-compiled.md"
stage train_step-150M $((30 * scale)) "$py" benchmarks/train_step.py --device "$device" "${big[@]}" \
  --precisions bf16 --modes eager --no-generation --out "$out/train_step-150M.md"

echo
cat "$summary"
exit $failed
