#!/usr/bin/env bash
# Prepares, on the development machine, what a GPU run needs and the GPU machine cannot fetch
# (it has no network): bitsandbytes 0.50.2 (the peer, CUDA 13 library only) and the build
# dependencies of the tests and benchmarks (doctest, Google Benchmark, nlohmann-json) copied from
# this machine's Debian packages. Everything lands in the git-ignored folder .peers/, which the
# GPU run carries (`carry: [".peers"]`) and bench/gpu/gpu_bench.sh reads.
#
# Usage: bench/gpu/gpu_prepare.sh            (from anywhere; idempotent)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
peers=$root/.peers
mkdir -p "$peers"

# 1. bitsandbytes, as a wheel (only the CUDA 13 build of its library: the wheel holds 16 builds,
#    124 MB, over the 64 MiB a GPU run may carry).
if [[ ! -f $peers/bitsandbytes/libbitsandbytes_cuda130.so ]]; then
  wheel_dir=$(mktemp -d)
  python3 -m pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all: -d "$wheel_dir"
  unzip_dir=$(mktemp -d)
  (cd "$unzip_dir" && unzip -q "$wheel_dir"/bitsandbytes-0.50.2-*.whl)
  rm -rf "$peers/bitsandbytes"
  cp -r "$unzip_dir/bitsandbytes" "$peers/"
  find "$peers/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda130.so' \
    ! -name 'libbitsandbytes_cpu.so' -delete
  rm -rf "$wheel_dir" "$unzip_dir"
fi

# 2. Test and benchmark dependencies as a relocatable prefix (CMAKE_PREFIX_PATH=.peers/deps).
deps=$peers/deps
mkdir -p "$deps/include" "$deps/lib/cmake" "$deps/lib/x86_64-linux-gnu/cmake" "$deps/share/cmake"
cp -r /usr/include/doctest "$deps/include/"
cp -r /usr/lib/cmake/doctest "$deps/lib/cmake/"
cp -r /usr/include/benchmark "$deps/include/"
cp -r /usr/lib/x86_64-linux-gnu/cmake/benchmark "$deps/lib/x86_64-linux-gnu/cmake/"
cp -L /usr/lib/x86_64-linux-gnu/libbenchmark.so* /usr/lib/x86_64-linux-gnu/libbenchmark_main.a \
  "$deps/lib/x86_64-linux-gnu/"
cp -r /usr/include/nlohmann "$deps/include/"
cp -r /usr/share/cmake/nlohmann_json "$deps/share/cmake/"
# Debian's doctest targets file names /usr literally; make it relative to where it lies.
sed -i 's|^set(_IMPORT_PREFIX "/usr")|get_filename_component(_IMPORT_PREFIX "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)|' \
  "$deps/lib/cmake/doctest/doctestTargets.cmake"
du -sh "$peers"
