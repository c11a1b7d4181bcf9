#!/usr/bin/env bash
# Bounded fuzz run of the safetensors/bnb reader: `tests/fuzz/run.sh [SECONDS]` (default 60).
# Builds tests/fuzz/safetensors_fuzz with clang (CXX, default clang++) in build/fuzz, then runs it for
# SECONDS on a copy of the seed corpus (tests/fuzz/corpus). Exits non-zero when the fuzzer finds a
# crash, a sanitizer report, a leak or a timeout; the reproducer is left in build/fuzz/artifacts.
set -euo pipefail
seconds="${1:-60}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${QMEM_FUZZ_BUILD_DIR:-$root/build/fuzz}"
cxx="${CXX:-clang++}"

cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$cxx" -DQMEM_BUILD_FUZZERS=ON -DQMEM_BUILD_TESTS=OFF \
  -DQMEM_BUILD_BENCHMARKS=OFF -DQMEM_BUILD_EXAMPLES=OFF -DQMEM_ENABLE_CUDA=OFF >/dev/null
cmake --build "$build" --target safetensors_fuzz -j2

work="$build/corpus"
mkdir -p "$work" "$build/artifacts"
cp -n "$root"/tests/fuzz/corpus/* "$work"/ 2>/dev/null || true
"$build/tests/fuzz/safetensors_fuzz" "$work" -max_total_time="$seconds" -max_len=65536 -timeout=10 \
  -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$build/artifacts/"
echo "fuzz: ${seconds}s without findings"
