#!/usr/bin/env bash
# GPU checks in one call: the test suite, compute-sanitizer, the demo, a short benchmark.
# Full logs go to $OUT (or ./gpu_logs); a compact summary is printed last.
#
#   scripts/gpu_check.sh          everything (tests, sanitizer, demo, bench)
#   scripts/gpu_check.sh tests    the test suite only (fuzz: ATTNMERGE_FUZZ_EXAMPLES, 200)
#   scripts/gpu_check.sh rest     sanitizer, demo, bench (no test suite)
#
# Each part fits a 10-minute call on an H100/H200; run "tests" and "rest" as two calls
# when both are needed.
set -u
OUT=${OUT:-./gpu_logs}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ATTNMERGE_FUZZ_EXAMPLES=${ATTNMERGE_FUZZ_EXAMPLES:-200}
export ATTNMERGE_CACHE_DIR=${ATTNMERGE_CACHE_DIR:-/tmp/attnmerge-cache}
unset TRITON_INTERPRET
mode=${1:-all}

summary=()
step() {  # step NAME LOGFILE CMD...: run, log, record exit code and wall time
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  "$@" >"$OUT/$log" 2>&1
  local rc=$?
  summary+=("$(printf '%-12s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - t0)) "$log")")
  return $rc
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  python3 -m attnmerge info
} >"$OUT/env.txt" 2>&1

if [ "$mode" = all ] || [ "$mode" = tests ]; then
  step tests pytest.log python3 -m pytest -q -n 8 -p no:cacheprovider tests
fi
if [ "$mode" = all ] || [ "$mode" = rest ]; then
  for tool in memcheck racecheck initcheck; do
    step "$tool" "sanitize_$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 9 python3 scripts/sanitize_cases.py
  done
  step demo demo.log python3 -m attnmerge demo
  step bench bench.log python3 -m attnmerge bench --dtypes bf16,fp32 \
    --shapes 1x128,64x128,256x128,1024x128,4096x128,4096x8 --providers cuda,triton,unfused \
    --host-overhead --no-progress --csv "$OUT/bench.csv" --plot "$OUT/bench.png"
fi

echo "=================== summary ==================="
head -n 2 "$OUT/env.txt"
if [ -f "$OUT/pytest.log" ]; then
  grep -E "FAILED|ERROR" "$OUT/pytest.log" | head -20
  tail -n 1 "$OUT/pytest.log"
fi
for tool in memcheck racecheck initcheck; do
  [ -f "$OUT/sanitize_$tool.log" ] && grep -E "ERROR SUMMARY|MISMATCH|all ok" "$OUT/sanitize_$tool.log" | tail -n 2
done
[ -f "$OUT/demo.log" ] && tail -n 12 "$OUT/demo.log"
[ -f "$OUT/bench.log" ] && cat "$OUT/bench.log"
printf '%s\n' "${summary[@]}"
