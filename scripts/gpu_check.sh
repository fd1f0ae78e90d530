#!/usr/bin/env bash
# One call on a GPU machine: the whole test suite, the demo, a short benchmark.
# Full logs go to $OUT (or ./gpu_logs); a compact summary is printed last.
# Usage: scripts/gpu_check.sh [quick]   (quick: skip the benchmark sweep)
set -u
OUT=${OUT:-./gpu_logs}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ATTNMERGE_FUZZ_EXAMPLES=${ATTNMERGE_FUZZ_EXAMPLES:-1000}
unset TRITON_INTERPRET

summary=()
step() {  # step NAME LOGFILE CMD...: run, log, record pass/fail and wall time
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  "$@" >"$OUT/$log" 2>&1
  local rc=$?
  summary+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - t0)) "$log")")
  return $rc
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} >"$OUT/env.txt" 2>&1

step tests pytest.log python3 -m pytest -q -n 8 -p no:cacheprovider tests
step demo demo.log python3 -m attnmerge demo
if [ "${1:-}" != quick ]; then
  step bench bench.log python3 -m attnmerge.bench --dtypes bf16,fp32 --providers triton,unfused \
    --block-rows 4,8,16,32 --host-overhead --csv "$OUT/bench.csv"
fi

echo "=================== summary ==================="
cat "$OUT/env.txt"
tail -n 3 "$OUT/pytest.log"
grep -E "FAILED|ERROR" "$OUT/pytest.log" | head -20
tail -n 15 "$OUT/demo.log"
[ -f "$OUT/bench.log" ] && cat "$OUT/bench.log"
printf '%s\n' "${summary[@]}"
