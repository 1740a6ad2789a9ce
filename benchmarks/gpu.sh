#!/usr/bin/env bash
# One GPU run (about 8 minutes on one H200): the Triton kernels against the formula, the
# Pattention layer against the two-matmul floor (fp32 and bf16, three shapes), a bf16 training
# step at 150M and at 450M against the parameter-matched Transformer (eager and compiled block by
# block: tokens/s, MFU and peak memory of both; TokenFormer with the Triton kernels and with the
# torch operator), and KV-cached decoding tokens/s of both. Each stage has a time limit and writes
# its log and markdown report into the output directory; summary.md lists every stage with its
# status and duration. A failed or timed-out stage does not stop the later ones; the exit status
# is non-zero if any stage failed.
#
#   benchmarks/gpu.sh [OUT_DIR]            # OUT_DIR defaults to $OUT, then benchmarks/results/gpu
#   benchmarks/gpu.sh --smoke [OUT_DIR]    # (or SMOKE=1) the same stages and code paths on the CPU
#                                          # at tiny sizes, Triton through its interpreter: ~2 minutes
#
# Needs python (PYTHON, default python3) with torch (a CUDA build for the real run) and triton.
# Installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=${SMOKE:-0}
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
if [[ "$smoke" == 1 ]]; then
  device=cpu
  # The Triton kernels run on the CPU through Triton's interpreter (read when triton is imported).
  export TRITON_INTERPRET=1
elif [[ "$device" != cuda ]]; then
  echo "benchmarks/gpu.sh: torch sees no CUDA device; run with --smoke to check the script on the CPU" >&2
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
  # CPU compilation is slow and the interpreter slower: the limits only guard against hangs.
  limits=(60 60 90 90)
  shapes=(96x32x64)
  layer=(--repeats 1 --warmup 1 --threads 1)
  small=cpu-0.3M  # stands in for both presets
  # The whole-model stages run the real run's arms on the CPU ("auto" and "fused": the torch
  # operator eager, the plain formula compiled); the kernels and layer stages run Triton's.
  # Compiling with aot_eager traces as inductor does (the operator's fake and autograd
  # registrations included) without generating code.
  train=(--impls auto fused --compiled-impls auto --compile-backend aot_eager --threads 1 --batch 2 --seq 16
    --repeats 1 --warmup 1 --peak-size 256 --gen-prompt 4 --gen-tokens 2 --gen-repeats 1)
else
  limits=(90 120 120 150)
  shapes=(4096x256x768 4096x512x2048 16384x1024x4096)
  layer=(--repeats 20 --warmup 3)
  small=
  # On CUDA "auto" is the Triton operator, "fused" the same operator with torch ops inside (eager
  # only: each compiled arm costs a compilation).
  train=(--impls auto fused --compiled-impls auto --batch 8 --seq 1024 --repeats 10 --warmup 2 --peak-size 8192
    --gen-repeats 3)
fi

stage kernels "${limits[0]}" "$py" tests/triton_checks.py "$device"
stage pattention "${limits[1]}" "$py" benchmarks/pattention.py --device "$device" --shapes "${shapes[@]}" \
  "${layer[@]}" --out "$out/pattention.md"
for preset in 150M 450M; do
  limit=${limits[2]}
  [[ $preset == 450M ]] && limit=${limits[3]}
  stage "train_step-$preset" "$limit" "$py" benchmarks/train_step.py --device "$device" --presets "${small:-$preset}" \
    --precisions bf16 --modes eager compiled-blocks "${train[@]}" --out "$out/train_step-$preset.md"
done

echo
cat "$summary"
exit $failed
