#!/usr/bin/env bash
# GPU checks in one call: tests, fuzz, compute-sanitizer, demo, benchmarks.
# Full logs go to $OUT (or ./gpu_logs); a compact summary is printed last.
#
#   scripts/gpu_check.sh [STEP[:SECONDS] ...]
#
# Steps (default: tests sanitize demo bench):
#   tests        the whole test suite except the fuzz (pytest -n 8; tests/test_large.py after it, alone)
#   cuda-tests   only the tests that involve the cuda backend or device (faster)
#   prebuild     compile every CUDA kernel instance the fuzz can ask for (all partial dtype
#                pairs, the fuzz's head sizes) in parallel, so the fuzz only loads them
#   fuzz         the fuzz, every GPU (backend, device); ATTNMERGE_FUZZ_EXAMPLES cases each
#                (tests/test_fuzz.py; tests/test_fuzz_formats.py, dynamic FP8: half as many)
#   fuzz-cuda    the fuzz of the cuda backend only
#   fuzz-triton  the fuzz of the triton backend only
#   sanitize     compute-sanitizer memcheck, racecheck, initcheck on scripts/sanitize_cases.py
#   demo         attnmerge demo
#   bench        the benchmark grid (benchmarks/grid.py) over vLLM's grid: cuda, triton,
#                unfused, the stream, stream-cuda and read yardsticks, vLLM's own kernels
#                where `vllm` imports (vLLM itself, or the stand-in built from .peers/vllm:
#                see below); CSV and PNG
#   bench-lse    attnmerge bench in bf16 and fp32 with the output LSE written (cuda, triton,
#                vLLM's CUDA kernel where it imports), CSV
#   bench-nofp8  bf16 and fp32 into their own dtype, T in 1..4096 x H in 128/32/8 (cuda,
#                triton, stream-cuda, vLLM's CUDA kernel), CSV
#   bench-kway   K-way merges (benchmarks/kway.py): K in 2..32 x T in 1..4096 x H in 128/32/8,
#                bf16 into bf16 and FP8, fixed and variable K; cuda, triton, cuda on
#                FlashInfer's layout, chained two-way merges, unfused, copy, and FlashInfer's
#                merge kernels (+ FP8 quantisation) built with nvcc where .peers/flashinfer/include
#                exists (benchmarks/peers/fetch_flashinfer.py; carry .peers); kway.csv and
#                its summary (2160 cases, estimated at 5 minutes on an H100; the CSV is
#                rewritten at each tenth of the cases, so a time limit keeps most of them)
#   bench-formats  the dynamic FP8 output formats fused into the merge (benchmarks/formats.py):
#                per-token-group (row-major, TMA-aligned, UE8M0 and packed UE8M0 scales) and
#                per-token FP8, cuda and triton, against the cuda merge + a separate Triton
#                quantiser and against the static FP8 store; H in 128..16 x T in 1..8192 x
#                K = 2, 4, 8; formats.csv and its summary (about 4 minutes on an H100; the CSV
#                is rewritten at each tenth of the cases)
#   bench-cp     the context-parallel combine (benchmarks/cp_combine.py): cp_combine against
#                vLLM's all-gather + rescale + reduce-scatter pattern (+ a separate FP8
#                quantiser) over NCCL on W = 2 and 4 GPUs (those of them visible; 1 on one
#                GPU), T in 1..4096 x H in 128/32, bf16 and FP8 out: CUDA-graph and eager
#                times, errors against float64; cp.csv and its summary
#   profile      Nsight Compute on the CUDA and Triton kernels and vLLM's
#                (benchmarks/profile_cases.py: T = 1 and 4096, H = 128, bf16 -> FP8: static,
#                and attnmerge's per-token and per-token-group of 128)
#   launch-floor host time of one kernel launch from C, no Python (benchmarks/launch_floor.cu),
#                the host time per eager call of each backend and vLLM's op (attnmerge bench
#                --eager, eager.csv), and a few shapes with the eager launcher off
#   compare-outputs  every output bit against a base revision ($BASE_REV, default c9a2f13) on
#                the fixed corpus of benchmarks/compare (torch, triton, cuda; $COMPARE_CASES)
#   compare-speed    device time per shape of vLLM's grid against $BASE_REV (cuda, triton),
#                FP8 out; compare-speed-lse the same with the output LSE
#   vllm-tests   vLLM's own test of merge_attn_states (tests/kernels/attention/
#                test_merge_attn_states.py from .peers/vllm), attnmerge's cuda and then triton
#                backend as the kernel under test, vLLM's Triton kernel the reference
#                (benchmarks/peers/run_vllm_tests.py, -n 4: on 8 workers its largest cases
#                exhaust an 80 GB card); a summary line per backend
# vLLM's kernels without vLLM: where .peers/vllm was carried (benchmarks/peers/fetch_vllm.py
# exports vLLM's merge from its sdist), the steps that use vLLM (bench*, profile) run with
# the stand-in vllm package of benchmarks/peers/vllm.py first on PYTHONPATH: vLLM's
# dispatcher and Triton kernel, its CUDA op built with nvcc on first use (vllm_build.log).
# The test suite never sees it (its test of a real vLLM deployment would take it for one).
# A step given as STEP:SECONDS is stopped after that many seconds (exit code 124). One
# step takes a few minutes at most: on an H100 "tests" takes about 7 (a 330 s limit
# stopped it at three quarters), the other steps one to four.
set -u
OUT=${OUT:-./gpu_logs}
mkdir -p "$OUT"
export OUT
# src for attnmerge, the root for `python3 -m benchmarks.*`
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ATTNMERGE_FUZZ_EXAMPLES=${ATTNMERGE_FUZZ_EXAMPLES:-200}
export ATTNMERGE_CACHE_DIR=${ATTNMERGE_CACHE_DIR:-/tmp/attnmerge-cache}
# each fuzz shard records its passed cases here (counted even if a time limit hits); kept
# out of $OUT, which brings back only a few files, and summed into $OUT/fuzz_progress.txt
export ATTNMERGE_FUZZ_PROGRESS_DIR="${TMPDIR:-/tmp}/attnmerge_fuzz_progress"
rm -rf "$ATTNMERGE_FUZZ_PROGRESS_DIR"
unset TRITON_INTERPRET
[ $# -gt 0 ] || set -- tests sanitize demo bench
# Every pytest worker is a process with its own CUDA context, and contexts take turns on
# the GPU, so a test that synchronises often waits for the other workers. The suite runs
# on 8 workers. The fuzz builds and checks its cases on the CPU and meets the GPU twice
# per batch of 25 (tests/test_fuzz.py), so it runs on FUZZ_WORKERS (12) workers of one
# CPU thread each; Triton compiles of its many specialisations are spread over them too.
PYTEST=(python3 -m pytest -n 8 -p no:cacheprovider)
FUZZ=(env OMP_NUM_THREADS=1 python3 -m pytest -n "${FUZZ_WORKERS:-12}" -p no:cacheprovider -v)

summary=()
step() {  # step NAME LIMIT LOGFILE CMD...: run (under a time limit), log, record rc and time
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS rc
  if [ -n "$limit" ]; then
    timeout "$limit" "$@" >"$OUT/$log" 2>&1
  else
    "$@" >"$OUT/$log" 2>&1
  fi
  rc=$?
  summary+=("$(printf '%-12s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - t0)) "$log")")
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  python3 -m attnmerge info
} >"$OUT/env.txt" 2>&1

for arg in "$@"; do  # check every step name before running any
  case ${arg%%:*} in
    tests | cuda-tests | prebuild | fuzz | fuzz-cuda | fuzz-triton | sanitize | demo | bench) ;;
    bench-lse | bench-nofp8 | bench-kway | bench-formats | bench-cp | profile | launch-floor) ;;
    compare-outputs | compare-speed | compare-speed-lse | vllm-tests) ;;
    *) echo "unknown step: ${arg%%:*}" >&2; exit 2 ;;
  esac
done

# vLLM's own kernels as baselines, where vLLM imports, else where .peers/vllm was carried:
# the stand-in (built only for the steps that use it, which WITH_VLLM prefixes)
HAS_VLLM=(python3 -c "import vllm.v1.attention.ops.merge_attn_states")
WITH_VLLM=(env)
standin=""
case " ${*%%:*} " in *" bench "* | *" bench-lse "* | *" bench-nofp8 "* | *" profile "* | \
  *" launch-floor "*)
  if ! "${HAS_VLLM[@]}" 2>/dev/null && [ -d .peers/vllm ] &&
    standin=$(python3 -m benchmarks.peers.vllm --print-path 2>"$OUT/vllm_build.log"); then
    WITH_VLLM=(env "PYTHONPATH=$standin:$PYTHONPATH")
  fi ;;
esac
VLLM=""
"${WITH_VLLM[@]}" "${HAS_VLLM[@]}" 2>/dev/null && VLLM=",vllm,vllm-triton"
echo "vllm providers: ${VLLM:-none}${standin:+ (stand-in $standin)}" >>"$OUT/env.txt"

for arg in "$@"; do
  name=${arg%%:*}
  limit=""
  [ "$name" != "$arg" ] && limit=${arg#*:}
  case $name in
    # -v: a line per test as it ends, so a time limit still leaves the failures' names
    # tests/test_large.py then runs alone: its cases allocate up to 17 GB each, which the
    # memory the other workers' caching allocators hold could deny them
    tests)
      step tests "$limit" pytest.log "${PYTEST[@]}" -v -k "not fuzz" --durations=15 \
        --ignore tests/test_large.py tests
      step tests-large "$limit" pytest_large.log python3 -m pytest -p no:cacheprovider -v \
        tests/test_large.py ;;
    cuda-tests)
      step cuda-tests "$limit" pytest_cuda.log "${PYTEST[@]}" -v -k "cuda and not fuzz" tests ;;
    prebuild)
      sizes=$(cd tests && python3 -c 'import test_fuzz; print(",".join(map(str, test_fuzz.HEAD_SIZES)))')
      step prebuild "$limit" prebuild.log python3 -m attnmerge build --mixed-dtypes \
        --head-sizes "$sizes" ;;
    fuzz) step fuzz "$limit" fuzz.log "${FUZZ[@]}" tests/test_fuzz.py tests/test_fuzz_formats.py ;;
    fuzz-cuda)
      step fuzz-cuda "$limit" fuzz_cuda.log "${FUZZ[@]}" -k "cuda-cuda" tests/test_fuzz.py \
        tests/test_fuzz_formats.py ;;
    fuzz-triton)
      step fuzz-triton "$limit" fuzz_triton.log "${FUZZ[@]}" -k "triton-cuda" tests/test_fuzz.py \
        tests/test_fuzz_formats.py ;;
    sanitize)
      for tool in memcheck racecheck initcheck; do
        step "$tool" "$limit" "sanitize_$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
          compute-sanitizer --tool "$tool" --error-exitcode 9 python3 scripts/sanitize_cases.py
      done ;;
    demo) step demo "$limit" demo.log python3 -m attnmerge demo ;;
    bench)
      step bench "$limit" bench.log "${WITH_VLLM[@]}" python3 -m benchmarks.grid --rep-ms 25 \
        --providers "cuda,triton,unfused,stream,stream-cuda,read$VLLM" \
        --csv "$OUT/bench.csv" --plot "$OUT/bench.png" ;;
    bench-lse)
      step bench-lse "$limit" bench_lse.log "${WITH_VLLM[@]}" python3 -m attnmerge bench \
        --rep-ms 25 --dtypes bf16,fp32 --output-lse on --providers "cuda,triton${VLLM:+,vllm}" \
        --csv "$OUT/bench-lse.csv" ;;
    bench-nofp8)
      step bench-nofp8 "$limit" bench_nofp8.log "${WITH_VLLM[@]}" python3 -m benchmarks.grid \
        --rep-ms 25 --fp8 off --dtypes bf16,fp32 --tokens 1,64,256,1024,4096 --heads 128,32,8 \
        --providers "cuda,triton,stream-cuda${VLLM:+,vllm}" --csv "$OUT/bench-nofp8.csv" ;;
    bench-kway)  # FlashInfer's kernels where its headers were carried
      peers=""
      [ -d .peers/flashinfer/include ] && peers=",flashinfer,flashinfer+quant"
      step bench-kway "$limit" bench_kway.log python3 -m benchmarks.kway --rep-ms 2 \
        --providers "cuda$peers,cuda-tkhd,triton,chained,unfused,copy" --csv "$OUT/kway.csv" ;;
    bench-formats)
      step bench-formats "$limit" bench_formats.log python3 -m benchmarks.formats \
        --csv "$OUT/formats.csv" ;;
    bench-cp)  # one rank per GPU: W = 2 and 4 where that many are visible, else 1
      gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null)
      worlds=""
      for w in 2 4; do [ "${gpus:-0}" -ge "$w" ] && worlds="${worlds:+$worlds,}$w"; done
      step bench-cp "$limit" bench_cp.log python3 -m benchmarks.cp_combine --device cuda \
        --worlds "${worlds:-1}" --out "$OUT/cp.csv" ;;
    profile)
      step profile "$limit" profile.log "${WITH_VLLM[@]}" ncu --profile-from-start off \
        --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats python3 -m benchmarks.profile_cases \
        --formats static,token,group ;;
    launch-floor)
      step launch-floor "$limit" launch_floor.log "${WITH_VLLM[@]}" bash -c 'nvcc -O2 \
        -o /tmp/launch_floor benchmarks/launch_floor.cu && /tmp/launch_floor &&
        python3 -m attnmerge bench --eager --csv "$OUT/eager.csv" &&
        ATTNMERGE_EAGER_LAUNCHER=0 python3 -m attnmerge bench --eager --tokens 1,256 \
          --heads 128,8 --csv "$OUT/eager-python-launch.csv"' ;;
    compare-outputs)
      step compare-outputs "$limit" compare_outputs.log python3 benchmarks/compare/compare_outputs.py \
        --base-rev "${BASE_REV:-c9a2f13}" --cases "${COMPARE_CASES:-2000}" ;;
    compare-speed)
      step compare-speed "$limit" compare_speed.log python3 benchmarks/compare/compare_speed.py \
        --base-rev "${BASE_REV:-c9a2f13}" --csv "$OUT/compare_speed.csv" ;;
    compare-speed-lse)
      step compare-speed-lse "$limit" compare_speed_lse.log \
        python3 benchmarks/compare/compare_speed.py --base-rev "${BASE_REV:-c9a2f13}" \
        --output-lse --csv "$OUT/compare_speed_lse.csv" ;;
    vllm-tests)  # builds vLLM's op and the stand-in itself (cached)
      step vllm-tests "$limit" vllm_tests.log python3 -m benchmarks.peers.run_vllm_tests -n 4 -q ;;
  esac
done

echo "=================== summary ==================="
head -n 2 "$OUT/env.txt"
for log in pytest.log pytest_large.log pytest_cuda.log fuzz.log fuzz_cuda.log fuzz_triton.log; do
  [ -f "$OUT/$log" ] || continue
  echo "--- $log"
  grep -E "FAILED|ERROR" "$OUT/$log" | head -20
  case $log in fuzz*) grep -cE "PASSED" "$OUT/$log" | sed 's/^/shards passed so far: /' ;; esac
  tail -n 1 "$OUT/$log"
done
if [ -d "$ATTNMERGE_FUZZ_PROGRESS_DIR" ]; then
  for pair in cuda-cuda triton-cuda torch-cuda formats-cuda-cuda formats-triton-cuda; do
    files=("$ATTNMERGE_FUZZ_PROGRESS_DIR/$pair"-*.txt)
    [ -e "${files[0]}" ] || continue
    echo "fuzz $pair: $(cat "${files[@]}" | awk '{s += $1; if ($2 > t) t = $2} END {print s " cases passed, longest shard " t " s"}')" \
      "(${#files[@]} shards)" | tee -a "$OUT/fuzz_progress.txt"
  done
fi
for tool in memcheck racecheck initcheck; do
  [ -f "$OUT/sanitize_$tool.log" ] && grep -E "ERROR SUMMARY|RACECHECK SUMMARY|MISMATCH|all ok" "$OUT/sanitize_$tool.log" | tail -n 2
done
[ -f "$OUT/demo.log" ] && tail -n 12 "$OUT/demo.log"
if [ -f "$OUT/vllm_tests.log" ]; then
  echo "--- vllm_tests.log"
  grep -E "^(FAILED|ERROR)" "$OUT/vllm_tests.log" | head -10
  grep -E "^vllm-tests " "$OUT/vllm_tests.log"
fi
for log in compare_outputs.log compare_speed.log compare_speed_lse.log; do
  [ -f "$OUT/$log" ] && echo "--- $log" && tail -n 8 "$OUT/$log"
done
[ -f "$OUT/launch_floor.log" ] && grep -E "^launch floor" "$OUT/launch_floor.log"
# the performance targets, from a whole-grid bench with vLLM's kernels
for csv in bench.csv bench-lse.csv bench-nofp8.csv; do
  [ -f "$OUT/$csv" ] && [ -n "$VLLM" ] && python3 -m benchmarks.targets "$OUT/$csv"
done
[ -f "$OUT/kway.csv" ] && python3 -m benchmarks.kway_summary "$OUT/kway.csv"
[ -f "$OUT/cp.csv" ] && python3 -m benchmarks.cp_combine --summary "$OUT/cp.csv"
[ -f "$OUT/launch_floor.log" ] && sed -n '/^host time per eager call/,$p' "$OUT/launch_floor.log"
[ -f "$OUT/profile.log" ] && grep -E "^profiled:|merge_two|Duration|DRAM Throughput|Achieved Occupancy|Registers Per Thread" "$OUT/profile.log" | head -80
printf '%s\n' "${summary[@]}"
