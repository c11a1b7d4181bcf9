#!/usr/bin/env bash
# One GPU session on the lent machine (the `run` tool), from the repository root: builds the CUDA
# tests and benchmarks, measures the peers (bitsandbytes, torch) after the build, runs the
# CUDA tests, compute-sanitizer (memcheck, racecheck) on the quant/memory CUDA tests, the qmem GPU
# benchmarks, and writes the side-by-side report. Everything lands in $OUT (at most 8 files come
# back from there):
#   run.log            configure/build/test/sanitizer output
#   quant_bench.json   qmem quantization benchmarks (Google Benchmark JSON)
#   matmul_bench.json, optim_bench.json   the other layers' goal rows (step `others`)
#   host_optim_bench.json   the host optimizer rows (step `host`)
#   anchors.json       peer_bench.py (bitsandbytes and torch)
#   peer_gemv.json     peer_gemv_graph.py
#   report.md, gpu_quant_roofline.svg   gpu_report.py's table and chart
#
# Prepare on the development machine first: bench/gpu/gpu_prepare.sh (fills .peers/), then
#   run(command="OUT=$OUT bench/gpu/gpu_bench.sh tests,bench,others,peers,host", carry=[".peers"])
# Steps, comma-separated (TEST_UNITS_SKIP, below, leaves test units out):
#   all        tests,sanitize,bench,peers
#   tests      the CUDA test units (built with nvcc directly, in parallel) and their run
#   sanitize   compute-sanitizer memcheck and racecheck over the CUDA-specific test units, one
#              process per test case, in parallel (SANITIZER_FILES, SANITIZER_JOBS, SANITIZER_TIMEOUT)
#   bench      the quantization benchmark and the report (QUANT_FILTER)
#   others     the matmul and optimizer benchmarks' goal rows (MATMUL_FILTER, OPTIM_FILTER)
#   host       the host optimizer benchmark (bench/optim_bench.cpp) on the machine's own cores
#   peers      bitsandbytes and torch (anchors' scripts), after the build (PEERS_DURING_BUILD=1:
#              while it runs, as before 2026-11-30 quant6; saves ~1 min of device time but
#              inflates the peers' launch-bound rows)
#
# Nothing else may load the host CPU while a benchmark step runs: a loaded host moved qmem's
# host-inclusive timings by up to 10% (FP4 quantize 0.186-0.209 ms with the same SASS; 17:09 UTC
# 2026-11-30, with 8 nvcc jobs of the caller's beside the benchmarks) and bitsandbytes'
# launch-bound rows by 2-3x (14:05 UTC, the peers during the build). The CUDA benchmarks now time
# the GPU alone (bench/cuda/gpu_timer.cuh), but the peers' torch timings and the host benchmark
# still count the host. So the steps run in this order, one at a time: the build (test units and
# benchmarks, in parallel), then the peers, then the qmem GPU benchmarks, the host benchmark, the
# tests and the sanitizers (the last two load the host and the GPU, after every measurement).
# Before each measuring step quiet_host logs the runnable tasks and, when there are more than
# this script's own, the busiest processes ("HOST BUSY"): a caller must not start builds or other
# jobs beside this script while it measures.
# TEST_FAST=1 compiles the test units at nvcc's fast-compile level (-Ofc max), as CI does.
# One device command is limited to 600 s: on 2026-11-29 the build took 239 s (TEST_FAST=1) and
# tests,bench,others,peers,host 487 s in all, so `sanitize` goes in a second command, right after
# the first (the machine stays warm for 30 s), with REUSE_BUILD=1 and without carrying the build
# folder again, so that the first command's build-gpu/ is still there. On 2026-11-30 (sm_90a, the
# fused GEMM and more candidates) the build took 430 s, so `tests` belongs in that second command
# too. Such a second command found build-gpu/ but not the rest of an uncarried, ignored copy of the
# tree (tests/data was gone): set BUILD_DIR to a folder outside the tree in both commands and carry
# the tree each time, or point QMEM_GOLDEN_FILE at the checkout's tests/data.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$root/out}
mkdir -p "$OUT"
steps=${1:-all}
has() { [[ ($steps == all && $1 != others && $1 != host) || ,$steps, == *,$1,* ]]; }
log=$OUT/run.log
deps=$root/.peers/deps
# BUILD_DIR: where the binaries go (default build-gpu/ in the tree). A folder outside the tree,
# e.g. /tmp/qmem-gpu-build, survives a second command on the same warm machine even when that
# command carries the tree (and tests/data) again.
build=${BUILD_DIR:-$root/build-gpu}
export LD_LIBRARY_PATH=$deps/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
clocks=$build/clocks.csv
# each step's line also shows the GPU's state at that moment (SM and memory clock, temperature,
# power, the active clock-event reasons) from the sampler started below
say() {
  local gpu=; [[ -s $clocks ]] && gpu="  [gpu: $(tail -n 1 "$clocks")]"
  echo "== $(date -u +%H:%M:%S) $*$gpu" | tee -a "$log"
}

# Before a measuring step: the number of runnable tasks (procs_running, the mean of 5 samples
# 0.2 s apart, this script's sampler and the probe itself included) and, above 2, the busiest
# processes, in the log.
quiet_host() {
  local sum=0 i
  for i in 1 2 3 4 5; do
    sum=$((sum + $(awk '/^procs_running/ {print $2}' /proc/stat)))
    sleep 0.2
  done
  if ((sum > 10)); then
    say "HOST BUSY before $1: $((sum / 5)) runnable tasks on $(nproc) CPUs (load $(cut -d' ' -f1-3 /proc/loadavg))"
    ps -eo pcpu,pid,comm --sort=-pcpu | head -n 6 >>"$log"
  else
    echo "host quiet before $1 (runnable tasks: $sum in 5 samples; load $(cut -d' ' -f1-3 /proc/loadavg))" >>"$log"
  fi
}

say "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >>"$log" 2>&1
nvcc --version | tail -1 >>"$log"
grep -m1 'model name' /proc/cpuinfo >>"$log"; nproc >>"$log"
# The GPU's clocks, temperature, power and clock-event reasons every 0.5 s for the whole run, into
# build-gpu/clocks.csv: run-to-run differences of the compute-heavier rows (FP4 quantize 0.186 vs
# 0.208 ms with the same SASS, 2026-11-30) need to be told apart from clock or power throttling.
mkdir -p "$build"; rm -f "$clocks"
timeout 900 nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_event_reasons.active \
  --format=csv,noheader -lms 500 >"$clocks" 2>/dev/null &
sampler_pid=$!
# (stopped at the script's end; if a caller's `timeout` kills the script first, the sampler, which
# writes only to its file, ends by its own 900 s limit or by the caller: pkill -f clocks_event)
trap 'kill "$sampler_pid" 2>/dev/null' EXIT

peers_pid=
run_peers() {
  (cd "$OUT" && PYTHONPATH=$root/.peers PYTHONUNBUFFERED=1 OUT=$OUT \
     python3 "$root/bench/gpu/peers/peer_bench.py" >"$OUT/peers.log" 2>&1 &&
   PYTHONPATH=$root/.peers python3 "$root/bench/gpu/peers/peer_gemv_graph.py" >"$OUT/peer_gemv.json" 2>>"$OUT/peers.log")
}
if has peers && [[ -d $root/.peers/bitsandbytes && ${PEERS_DURING_BUILD:-0} == 1 ]]; then
  say "peers (background, GPU) while building (PEERS_DURING_BUILD=1: their launch-bound rows are inflated)"
  run_peers &
  peers_pid=$!
fi

# The build: nvcc directly, every unit at once (no CMake). A CMake build of all 45 CUDA test units
# did not fit in one 300 s device command (2026-11-29); the 18 units then compiled and the three
# benchmark programs, compiled in parallel on the machine's 16 cores, took 400 s (2026-11-29 19:47
# UTC; the peers ran meanwhile), bounded by the heaviest unit (tests/quant/matmul_test.cpp, since
# split in four; see below). Host half at -O1: device code is optimized by ptxas regardless, and
# it halves the build. The whole script (tests, sanitizers, quant + matmul + optimizer benchmarks,
# peers) ran in 555 s there.
# The test files with CUDA cases: the pattern of tests/CMakeLists.txt (QMEM_CUDA_TEST_PATTERN).
cuda_test_pattern='qmem::test::[a-z_]*backends|cuda_backend|gpu_present|exec::cuda|cuda_error|QMEM_HAS_CUDA|__CUDACC__'
mapfile -t gpu_test_units < <(cd "$root/tests" && grep -lE "$cuda_test_pattern" -- */*_test.cpp)
# TEST_UNITS_SKIP: an extended regex of units left out of the build (and so of tests and sanitize),
# e.g. 'matmul' for a run that changed no matmul code: the build is then ~90 s instead of ~310 s
if [[ -n ${TEST_UNITS_SKIP:-} ]]; then
  mapfile -t gpu_test_units < <(printf '%s\n' "${gpu_test_units[@]}" | grep -vE "$TEST_UNITS_SKIP")
fi
gpu_test_units=(main.cpp "${gpu_test_units[@]}")
# The H200 is sm_90; the sm_90a target (Hopper's wgmma and setmaxnreg, HOPPER.md) also compiles
# the fused large-batch GEMM candidate (quant/cuda/detail/gemm_sm90.cuh), whose test and bench
# rows skip under plain sm_90. Every other kernel is the same code under either target.
# GPU_ARCH=-arch=sm_90 builds what CI and a default user build compile.
read -ra arch <<<"${GPU_ARCH:--gencode=arch=compute_90a,code=sm_90a}"
nv=(nvcc -std=c++20 "${arch[@]}" -O3 -Xcompiler -O1 -DNDEBUG --extended-lambda -Werror=all-warnings
    -I"$root/include" -I"$deps/include")
tests=$build/qmem_tests_cuda
# The build was bound by one unit, tests/quant/matmul_test.cpp with every GEMV candidate: on
# 2026-11-30 (14:18 UTC, H200 machine, 16 cores) the other 15 test units compiled in parallel in
# 87 s, while the whole build took 430 s (11:09 UTC). nvcc's --split-compile (cicc and ptxas on
# several threads per unit) did not help: with --split-compile=0 on every test unit the build took
# 558 s (14:06 UTC; 20 units each spawning threads on 16 cores). NVCC_SPLIT=N turns it on again
# (0: one thread per CPU). So matmul_test.cpp was split into four units (tests/quant/matmul_test,
# matmul_gemv1_test, matmul_gemvm_test, matmul_gemm_test .cpp; helpers in matmul_test_support.hpp).
# Compiled one after another with these flags plus -Ofc max and the candidates on (2-core build
# box, 2026-11-30 14:23-14:44 UTC, NOT a quiet machine: another CI build ran alongside, load 6),
# user CPU seconds (wall): the old unit 540 (828); the new ones 79 (124), 93 (153), 56 (91),
# 27 (44): 255 in all, the largest 17% of the old unit (the one large module cost twice its parts;
# peak memory 7.9 GB against 2.2 GB for the largest new unit). On the H200 machine the whole test
# build at the default -O3 took 312 s (2026-11-30 16:01 UTC, 20 units at once on its 16 vCPUs;
# the 87 s above were with TEST_FAST=1). Each unit's time is now logged, slowest first: at -O3
# (17:10 UTC, 15 units without the matmul ones, 8 more units compiling beside them at nice 19)
# tests/quant/blockwise_test.cpp 226 s, optim/cuda_features_test.cpp 110, cuda_blockwise_test 93,
# golden/formats_test 91, optim/cuda_optim_test 84; TEST_FAST=1 is the quick way to a short build.
# So blockwise_test.cpp was split in two (2026-11-30): tests/quant/blockwise_test.cpp keeps the
# reference-agreement case (every code, block size and input type) and instantiates its check for
# nf4, fp4, user4 and the two FP8 codes; tests/quant/blockwise_edge_test.cpp has the error, all-zero,
# NaN/inf and bad-argument cases and instantiates the check for the 8-bit codes dynamic_signed,
# dynamic_unsigned, linear_signed and user8 (explicit instantiations of reference_check in
# quant/blockwise_test_support.hpp: a TEST_UNITS_SKIP that leaves out one of the two fails the
# link). Compiled with these flags on the 2-core build box (2026-11-30 17:29-17:58 UTC, NOT a
# quiet machine: load 8-10 from other builds, the three compiles overlapping, the old one at nice 19
# for 10 of its 28 minutes), user CPU seconds (wall, peak memory): the old unit 229 (1704, 1.46 GB);
# blockwise_test.cpp 121 (774, 0.94 GB), blockwise_edge_test.cpp 162 (963, 1.00 GB): 283 in all,
# the larger 71% of the old unit. The next GPU run's per-unit log says what the H200 build gains.
test_opt=()
[[ ${NVCC_SPLIT:-1} != 1 ]] && test_opt+=(--split-compile="$NVCC_SPLIT")
[[ ${TEST_FAST:-0} == 1 ]] && test_opt+=(-Ofc max)
# REUSE_BUILD=1: keep a test binary an earlier command built (the sanitize-only second command)
build_tests=false
if (has tests || has sanitize) && ! [[ ${REUSE_BUILD:-0} == 1 && -x $tests ]]; then
  build_tests=true
fi
if $build_tests || has bench || has others || has host; then
  say "build (nvcc, parallel)"
  mkdir -p "$build/obj"
  pids=()
  if $build_tests; then
    for unit in "${gpu_test_units[@]}"; do
      obj=$build/obj/$(tr / _ <<<"$unit").o
      (t0=$SECONDS
       "${nv[@]}" "${test_opt[@]}" -x cu -I"$root/tests" -DQMEM_TEST_DATA_DIR="\"$root/tests/data\"" \
         -c "$root/tests/$unit" -o "$obj" >"$obj.log" 2>&1 || say "COMPILE FAILED tests/$unit"
       echo "$((SECONDS - t0)) s wall: tests/$unit" >"$obj.time") &
      pids+=($!)
    done
  fi
  benches=()
  has bench && benches+=(quant)
  # OTHERS: which of the two (default both; `optim` alone skips the heaviest build, matmul_bench.cu)
  has others && benches+=(${OTHERS:-matmul optim})
  for b in "${benches[@]}"; do
    # PREBUILT_BENCHES=1: a benchmark binary already in the build folder (built elsewhere with the
    # same flags and carried) is used as it is, saving its build on the device
    [[ ${PREBUILT_BENCHES:-0} == 1 && -x $build/${b}_bench_cuda ]] && { say "prebuilt ${b}_bench_cuda"; continue; }
    ("${nv[@]}" "$root/bench/cuda/${b}_bench.cu" -L"$deps/lib/x86_64-linux-gnu" -lbenchmark \
       -lpthread -lcublas -lcublasLt -o "$build/${b}_bench_cuda" >"$build/$b.log" 2>&1 ||
       say "COMPILE FAILED bench/cuda/${b}_bench.cu") &
    pids+=($!)
  done
  if has host; then
    (g++ -std=c++20 -O3 -march=native -ffp-contract=off -fno-math-errno -DNDEBUG -I"$root/include" -I"$deps/include" \
       "$root/bench/optim_bench.cpp" -L"$deps/lib/x86_64-linux-gnu" -lbenchmark -lpthread \
       -o "$build/optim_bench_host" >"$build/host.log" 2>&1 || say "COMPILE FAILED bench/optim_bench.cpp") &
    pids+=($!)
  fi
  wait "${pids[@]}"
  cat "$build"/obj/*.log "$build"/*.log 2>/dev/null | grep -v '^$' | tail -n 60 >>"$log"
  # each test unit's compile time, slowest first (the build's critical path)
  $build_tests && cat "$build"/obj/*.time 2>/dev/null | sort -rn | head -n 8 >>"$log"
  if $build_tests; then
    nvcc "${arch[@]}" "$build"/obj/*.o -lcublas -lcublasLt -o "$tests" >>"$log" 2>&1 ||
      say "link of the CUDA tests FAILED"
  fi
  say "built"
fi

if [[ -n $peers_pid ]]; then
  say "waiting for the peers"
  wait "$peers_pid"
  tail -n 5 "$OUT/peers.log" >>"$log"; rm -f "$OUT/peers.log"
elif has peers && [[ -d $root/.peers/bitsandbytes ]]; then
  quiet_host peers
  say "peers (GPU, after the build)"
  run_peers
  tail -n 5 "$OUT/peers.log" >>"$log"; rm -f "$OUT/peers.log"
fi

# The benchmarks first, on a GPU that has only run the peers: in the integrated run of 2026-11-30
# 01:51 UTC, the quantize rows timed right after 74 s of CUDA tests were 3-8% slower (NF4 0.193,
# FP4 0.208, int8 0.366 ms) than in the fresh processes of the same day's earlier sessions (0.188,
# 0.190, 0.336), while the memory-bound dequantize rows were unchanged.
if has bench && [[ -x $build/quant_bench_cuda ]]; then
  quiet_host "the quant benchmark"
  say "quant benchmark"
  # the tuning variants (..._variant rows) are cuda-quant's to run: QUANT_FILTER=. runs them too
  "$build/quant_bench_cuda" --benchmark_min_time=0.1 --benchmark_filter="${QUANT_FILTER:--variant}" \
    --benchmark_out="$OUT/quant_bench.json" \
    --benchmark_out_format=json >>"$log" 2>&1 || say "quant benchmark FAILED"
fi
# The other layers' benchmarks: the goal rows only (the tuning variants are the layer owners' to
# run), Google Benchmark JSON each.
if has others; then
  if [[ -x $build/matmul_bench_cuda ]]; then
    quiet_host "the matmul benchmark"
    say "matmul benchmark"
    timeout 150 "$build/matmul_bench_cuda" --benchmark_min_time=0.05 \
      --benchmark_filter="${MATMUL_FILTER:-^copy|^gemv/|^cublas_gemv/|^gemm/}" \
      --benchmark_out="$OUT/matmul_bench.json" --benchmark_out_format=json >/dev/null 2>>"$log" ||
      say "matmul benchmark FAILED"
  fi
  if [[ -x $build/optim_bench_cuda ]]; then
    quiet_host "the optimizer benchmark"
    say "optimizer benchmark"
    timeout 150 "$build/optim_bench_cuda" --benchmark_filter="${OPTIM_FILTER:-.}" \
      --benchmark_out="$OUT/optim_bench.json" --benchmark_out_format=json >/dev/null 2>>"$log" ||
      say "optimizer benchmark FAILED"
  fi
fi
if has host && [[ -x $build/optim_bench_host ]]; then
  quiet_host "the host benchmark"
  say "host optimizer benchmark ($(nproc) threads)"
  timeout 150 "$build/optim_bench_host" --benchmark_filter="${HOST_FILTER:-adamw_(8|4)bit(/|_1thread)}" \
    --benchmark_out="$OUT/host_optim_bench.json" --benchmark_out_format=json >>"$log" 2>&1 ||
    say "host optimizer benchmark FAILED"
fi
if has tests && [[ -x $tests ]]; then
  say "CUDA tests"
  timeout "${TEST_TIMEOUT:-200}" "$tests" --no-intro --duration=true >"$OUT/tests.tmp" 2>&1; echo "exit $?" >>"$OUT/tests.tmp"
  # (doctest's summary lines start with "[doctest]": keep them)
  grep -v '^\[[0-9]\|^$' "$OUT/tests.tmp" | grep -iv 'duration\|^[0-9.]* s:' | tail -n 120 >>"$log"
  grep -E '^[0-9.]+ s: ' "$OUT/tests.tmp" | sort -rn | head -n 15 >>"$log"; rm -f "$OUT/tests.tmp"
fi
# The sanitizers on the CUDA-specific test units (quant, memory, optimizer, matmul), without the
# cases too slow under instrumentation (all 2^32 floats; a 2^32-element tensor), the paging test
# under real oversubscription (managed memory under the sanitizer is not that test) and the
# host-only instantiations: one process per test case and tool, SANITIZER_JOBS (default 16) at a
# time, each limited to SANITIZER_TIMEOUT seconds (default 240). One process over all of them
# never finished: racecheck alone spends 218 s in the streaming batch-1 case (then in
# matmul_test.cpp, now in matmul_gemv1_test.cpp; H200, 2026-11-29 22:44 UTC, 18 processes in
# parallel on the 16 cores). *matmul*_test* selects the four matmul test units.
if has sanitize && [[ -x $tests ]]; then
  filter=(--source-file="${SANITIZER_FILES:-*cuda_blockwise_test*,*cuda_resource_test*,*double_quant_test*,*cuda_rowwise*,*cuda_optim*,*matmul*_test*}"
          --test-case-exclude='*2^32*,*oversubscription*,*host_backend>')
  # doctest lists the names between two rules of '='; a comma in a filter separates filters, so
  # each comma of a name becomes '?' (any one character)
  mapfile -t cases < <("$tests" --no-intro --list-test-cases "${filter[@]}" | sed '1,2d; /^=====/,$d')
  san_dir=$build/sanitize; rm -rf "$san_dir"; mkdir -p "$san_dir"
  sanitize_one() { # tool index name
    local t0=$SECONDS rc api=()
    # a case that provokes failing API calls on purpose and checks them (a cooperative launch
    # refused as too large, the capture it invalidates) is run without the report of failed API
    # calls; memory errors and hazards are still reported (memcheck exit 7 on it, 2026-11-30)
    [[ $3 == *refused* ]] && api=(--report-api-errors no)
    timeout "${SANITIZER_TIMEOUT:-240}" compute-sanitizer --tool "$1" "${api[@]}" --error-exitcode 7 "$tests" --no-intro \
      --test-case="${3//,/?}" >"$san_dir/$1.$2.out" 2>&1
    rc=$?
    # a host-only case (its name says so, or it makes no CUDA call) ends before the sanitizer's
    # first instrumented call: exit 255, doctest passed, no summary line
    if [[ $rc == 255 ]] && grep -q 'test cases: *1 | *1 passed' "$san_dir/$1.$2.out" &&
      ! grep -q 'SUMMARY' "$san_dir/$1.$2.out"; then
      echo "$1 no GPU work (passed, not instrumented), $((SECONDS - t0)) s: $3" >"$san_dir/$1.$2.sum"
      return
    fi
    { echo "$1 exit $rc, $((SECONDS - t0)) s: $3"
      grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|test cases:|CRASHED' "$san_dir/$1.$2.out" | sed 's/^/    /'
      [[ $rc == 0 ]] || grep -E 'Invalid|Hazard|hazard|ERROR' "$san_dir/$1.$2.out" | grep -v SUMMARY | head -n 12 | sed 's/^/    /'
    } >"$san_dir/$1.$2.sum"
  }
  say "compute-sanitizer memcheck and racecheck: ${#cases[@]} test cases each"
  for tool in memcheck racecheck; do
    for i in "${!cases[@]}"; do
      while (( $(jobs -rp | wc -l) >= ${SANITIZER_JOBS:-16} )); do wait -n; done
      sanitize_one "$tool" "$i" "${cases[$i]}" &
    done
  done
  wait
  (( ${#cases[@]} )) || echo "no test case matched the sanitizer filters" >>"$log"
  (( ${#cases[@]} )) && for tool in memcheck racecheck; do
    sums=("$san_dir/$tool".*.sum)
    failed=$(grep -L -e "^$tool exit 0," -e "^$tool no GPU work" "${sums[@]}" | wc -l)
    host_only=$(grep -l "^$tool no GPU work" "${sums[@]}" | wc -l)
    echo "$tool: ${#sums[@]} test cases, $failed not clean (a non-zero exit: errors, hazards or the time limit), $host_only without GPU work" >>"$log"
    cat "${sums[@]}" >>"$log"
  done
fi

if has bench && [[ -f $OUT/quant_bench.json ]]; then
  say "report"
  python3 "$root/bench/gpu/gpu_report.py" --bench "$OUT/quant_bench.json" \
    --anchors "$OUT/anchors.json" --md "$OUT/report.md" --svg "$OUT/gpu_quant_roofline.svg" >>"$log" 2>&1
fi
say "done"
