#!/usr/bin/env bash
# One GPU session on the lent machine (the `run` tool), from the repository root: builds the CUDA
# tests and benchmarks, measures the peers (bitsandbytes, torch) while the build runs, runs the
# CUDA tests, compute-sanitizer (memcheck, racecheck) on the quant/memory CUDA tests, the qmem GPU
# benchmarks, and writes the side-by-side report. Everything lands in $OUT (at most 8 files come
# back from there):
#   run.log            configure/build/test/sanitizer output
#   quant_bench.json   qmem quantization benchmarks (Google Benchmark JSON)
#   other_bench.txt    the other *_bench_cuda programs' console output (matmul, optim) if built
#   anchors.json       peer_bench.py (bitsandbytes and torch)
#   peer_gemv.json     peer_gemv_graph.py
#   report.md, gpu_quant_roofline.svg   gpu_report.py's table and chart
#
# Prepare on the development machine first: bench/gpu/gpu_prepare.sh (fills .peers/), then
#   run(command="OUT=$OUT bench/gpu/gpu_bench.sh all", carry=[".peers"])
# QMEM_PREBUILT=<dir>: use binaries built on the development machine instead of building here.
# Steps, comma-separated: all (default: tests,bench,peers) | tests | bench | peers | others (the
# other layers' *_bench_cuda programs, matmul and optim, 60 s each).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$root/out}
mkdir -p "$OUT"
steps=${1:-all}
has() { [[ ($steps == all && $1 != others) || ,$steps, == *,$1,* ]]; }
log=$OUT/run.log
deps=$root/.peers/deps
build=$root/build-gpu
export LD_LIBRARY_PATH=$deps/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }

say "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >>"$log" 2>&1
nvcc --version | tail -1 >>"$log"

peers_pid=
if has peers && [[ -d $root/.peers/bitsandbytes ]]; then
  say "peers (background, GPU) while building"
  (cd "$OUT" && PYTHONPATH=$root/.peers PYTHONUNBUFFERED=1 OUT=$OUT \
     python3 "$root/bench/gpu/peers/peer_bench.py" >"$OUT/peers.log" 2>&1 &&
   PYTHONPATH=$root/.peers python3 "$root/bench/gpu/peers/peer_gemv_graph.py" >"$OUT/peer_gemv.json" 2>>"$OUT/peers.log") &
  peers_pid=$!
fi

prebuilt=${QMEM_PREBUILT:-}
if [[ -n $prebuilt ]]; then
  # Binaries built on the development machine (nvcc, static CUDA runtime) and carried: no build
  # here, which saves device time. Expected: $prebuilt/qmem_quant_tests_cuda, quant_bench_cuda.
  say "using prebuilt binaries from $prebuilt"
  mkdir -p "$build/tests" "$build/bench"
  [[ -x $prebuilt/qmem_quant_tests_cuda ]] && ln -sf "$(cd "$prebuilt" && pwd)/qmem_quant_tests_cuda" "$build/tests/qmem_tests_cuda"
  [[ -x $prebuilt/quant_bench_cuda ]] && ln -sf "$(cd "$prebuilt" && pwd)/quant_bench_cuda" "$build/bench/quant_bench_cuda"
elif has tests || has bench || has others; then
  say "configure"
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$deps" \
    -DQMEM_BUILD_EXAMPLES=OFF -DCMAKE_CUDA_ARCHITECTURES=90 \
    "-DCMAKE_CUDA_FLAGS_RELEASE=-O1 -DNDEBUG" >>"$log" 2>&1 || say "configure FAILED"
  # -O1 is the host half of the CUDA units only (ptxas optimizes device code at -O3 regardless):
  # it halves the build, which is device time (2026-11-29: 140 s instead of about 300 s).
  targets=()
  has tests && targets+=(qmem_tests_cuda)
  has bench && targets+=(quant_bench_cuda)
  if has others; then
    for t in $(ninja -C "$build" -t targets all 2>/dev/null | grep -o '^[a-z0-9_]*_bench_cuda:' | tr -d :); do
      targets+=("$t")
    done
  fi
  say "build ${targets[*]}"
  # -j14: two cores stay free for the peer measurements running meanwhile
  cmake --build "$build" --target "${targets[@]}" -j14 -- -k 0 >"$OUT/build.tmp" 2>&1 || say "build had failures"
  grep -v '^\[' "$OUT/build.tmp" | tail -n 150 >>"$log"; rm -f "$OUT/build.tmp"
fi

if [[ -n $peers_pid ]]; then
  say "waiting for the peers"
  wait "$peers_pid"
  tail -n 5 "$OUT/peers.log" >>"$log"; rm -f "$OUT/peers.log"
fi

tests=$build/tests/qmem_tests_cuda
if has tests && [[ ! -x $tests ]]; then
  # The shared test target did not build (another layer's unfinished file, say): build the
  # quant and memory CUDA tests alone so that they still run.
  say "qmem_tests_cuda did not build; building the quant/memory CUDA tests alone"
  mkdir -p "$build/fallback"
  objs=()
  for src in tests/main.cpp tests/quant/blockwise_test.cpp tests/quant/double_quant_test.cpp \
             tests/quant/stochastic_test.cpp tests/quant/cuda_blockwise_test.cpp \
             tests/memory/cuda_resource_test.cpp; do
    [[ -f $root/$src ]] || continue
    obj=$build/fallback/$(echo "$src" | tr / _).o
    nvcc -std=c++20 -arch=sm_90 -O3 --extended-lambda -x cu -I"$root/include" -I"$root/tests" \
      -I"$deps/include" -DQMEM_TEST_DATA_DIR="\"$root/tests/data\"" -c "$root/$src" -o "$obj" \
      >>"$log" 2>&1 &
    objs+=("$obj")
  done
  wait
  nvcc -arch=sm_90 "${objs[@]}" -o "$build/fallback/qmem_quant_tests_cuda" >>"$log" 2>&1 &&
    tests=$build/fallback/qmem_quant_tests_cuda
fi
if has tests && [[ -x $tests ]]; then
  say "CUDA tests"
  "$tests" --no-intro --duration=true >"$OUT/tests.tmp" 2>&1; echo "exit $?" >>"$OUT/tests.tmp"
  grep -v '^\[\|^$' "$OUT/tests.tmp" | grep -iv 'duration\|^[0-9.]* s:' | tail -n 120 >>"$log"
  grep -E '^[0-9.]+ s: ' "$OUT/tests.tmp" | sort -rn | head -n 15 >>"$log"; rm -f "$OUT/tests.tmp"
  # The sanitizers on the CUDA-specific tests (quant, memory, optimizer, matmul), without the
  # cases too slow under instrumentation (all 2^32 floats; a 2^32-element tensor) and the paging
  # test under real oversubscription (managed memory under the sanitizer is not that test).
  filter=(--source-file="${SANITIZER_FILES:-*cuda_blockwise_test*,*cuda_resource_test*,*double_quant_test*,*cuda_rowwise*,*cuda_optim*,*matmul_test*}"
          --test-case-exclude='*2^32*,*oversubscription*')
  for tool in memcheck racecheck; do
    say "compute-sanitizer --tool $tool"
    timeout "${SANITIZER_TIMEOUT:-60}" compute-sanitizer --tool "$tool" --error-exitcode 7 "$tests" --no-intro "${filter[@]}" \
      >"$OUT/san.tmp" 2>&1; echo "exit $?" >>"$OUT/san.tmp"
    tail -n 25 "$OUT/san.tmp" >>"$log"; rm -f "$OUT/san.tmp"
  done
fi

if has bench; then
  if [[ ! -x $build/bench/quant_bench_cuda ]]; then
    say "quant_bench_cuda did not build with CMake; building it alone"
    mkdir -p "$build/bench"
    nvcc -std=c++20 -arch=sm_90 -O3 --extended-lambda -I"$root/include" -I"$deps/include" \
      "$root/bench/cuda/quant_bench.cu" -L"$deps/lib/x86_64-linux-gnu" -lbenchmark -lpthread \
      -o "$build/bench/quant_bench_cuda" >>"$log" 2>&1
  fi
  if [[ -x $build/bench/quant_bench_cuda ]]; then
    qb=$build/bench/quant_bench_cuda
    say "quant benchmark"
    "$qb" --benchmark_min_time=0.1 --benchmark_out="$OUT/quant_bench.json" \
      --benchmark_out_format=json >>"$log" 2>&1 || say "quant benchmark FAILED"
  fi
fi
if has others; then
  for b in "$build"/bench/*_bench_cuda; do
    [[ -x $b && $(basename "$b") != quant_bench_cuda ]] || continue
    say "$(basename "$b")"
    timeout 60 "$b" --benchmark_min_time=0.05 >>"$OUT/other_bench.txt" 2>&1 || say "$(basename "$b") FAILED"
  done
fi
if has bench && [[ -f $OUT/quant_bench.json ]]; then
  say "report"
  python3 "$root/bench/gpu/gpu_report.py" --bench "$OUT/quant_bench.json" \
    --anchors "$OUT/anchors.json" --md "$OUT/report.md" --svg "$OUT/gpu_quant_roofline.svg" >>"$log" 2>&1
fi
say "done"
