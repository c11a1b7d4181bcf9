// Host speed of quantize and dequantize for every format (issue 2, section 7): 2^24 elements,
// exec::host{} (all hardware threads). Each benchmark reports the bytes it moves (read + write:
// SetBytesProcessed, shown as bytes_per_second), and `copy_ratio`, its speed over the speed of a
// parallel memcpy moving the same number of bytes, timed right after each iteration in the same
// run (see run_against_copy).
//
//   quant_bench --benchmark_min_time=0.5
//
// Goals on the 2-core development box: dequantize >= 0.5 of the copy, NF4 quantize >= 0.3.
#include <qmem/core/detail/parallel.hpp>
#include <qmem/quant.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace qmem;
using namespace qmem::quant;

constexpr std::size_t n_elements = std::size_t{1} << 24;

std::vector<float> const& input_f32() {
  static std::vector<float> const v = [] {
    std::vector<float> x(n_elements);
    std::mt19937 g(1);
    std::normal_distribution<float> d;
    for (auto& e : x)
      e = d(g);
    return x;
  }();
  return v;
}

template <class T>
std::vector<T> const& input() {
  static std::vector<T> const v = [] {
    auto const& f = input_f32();
    std::vector<T> x(f.size());
    for (std::size_t i = 0; i < f.size(); ++i)
      x[i] = from_float<T>(f[i]);
    return x;
  }();
  return v;
}

// A parallel copy with the same thread split as the algorithms.
void parallel_copy(std::byte* dst, std::byte const* src, std::size_t bytes) {
  qmem::detail::parallel_for(exec::host{}, bytes, 4096, [&](std::size_t b, std::size_t e) {
    std::memcpy(dst + b, src + b, e - b);
  });
}

// Source and destination of the reference copies (the largest byte count any benchmark moves).
std::vector<std::byte>& copy_buffer(int which) {
  static std::vector<std::byte> buffers[2] = {std::vector<std::byte>(n_elements * 3, std::byte{1}),
                                              std::vector<std::byte>(n_elements * 3, std::byte{2})};
  return buffers[which];
}

// Runs `op` once per iteration and, right after it, a parallel copy that moves the same number of
// bytes (moved / 2 read + moved / 2 written), so both see the same machine load (the development
// box is shared). Reports the op's bytes (bytes_per_second), the copy's speed (copy_GBps) and
// copy_ratio = op speed / copy speed over the whole run. Manual time: the op's time only.
template <class Op>
void run_against_copy(benchmark::State& state, std::size_t moved, Op op) {
  using clock = std::chrono::steady_clock;
  double op_seconds = 0.0;
  double copy_seconds = 0.0;
  std::size_t const half = moved / 2;
  for (auto _ : state) {
    auto const t0 = clock::now();
    op();
    benchmark::ClobberMemory();
    auto const t1 = clock::now();
    parallel_copy(copy_buffer(1).data(), copy_buffer(0).data(), half);
    benchmark::ClobberMemory();
    auto const t2 = clock::now();
    double const s = std::chrono::duration<double>(t1 - t0).count();
    state.SetIterationTime(s);
    op_seconds += s;
    copy_seconds += std::chrono::duration<double>(t2 - t1).count();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * moved));
  state.counters["copy_GBps"] =
      static_cast<double>(state.iterations()) * static_cast<double>(2 * half) / copy_seconds / 1e9;
  state.counters["copy_ratio"] = copy_seconds / op_seconds;
}

// The copy alone, for the table (bytes moved = the argument; ratio 1 by definition, and the same
// counters as the others because the CSV reporter needs them in every row).
void bm_copy(benchmark::State& state) {
  std::size_t const moved = static_cast<std::size_t>(state.range(0));
  run_against_copy(state, moved,
                   [&] { parallel_copy(copy_buffer(1).data(), copy_buffer(0).data(), moved / 2); });
}

template <class C, class T, std::size_t Block>
void bm_quantize(benchmark::State& state) {
  auto const& x = input<T>();
  std::vector<std::uint8_t> codes(code_bytes<C>(n_elements));
  std::vector<float> absmax(block_count(n_elements, Block));
  run_against_copy(
      state, n_elements * sizeof(T) + codes.size() + absmax.size() * sizeof(float),
      [&] { quantize_blockwise<C>(exec::host{}, view(x), Block, view(codes), view(absmax)); });
}

template <class C, class T, std::size_t Block>
void bm_dequantize(benchmark::State& state) {
  auto const& x = input<T>();
  std::vector<std::uint8_t> codes(code_bytes<C>(n_elements));
  std::vector<float> absmax(block_count(n_elements, Block));
  quantize_blockwise<C>(exec::host{}, view(x), Block, view(codes), view(absmax));
  std::vector<T> y(n_elements);
  run_against_copy(state, n_elements * sizeof(T) + codes.size() + absmax.size() * sizeof(float),
                   [&] {
                     dequantize_blockwise<C>(exec::host{}, view(std::as_const(codes)),
                                             view(std::as_const(absmax)), Block, view(y));
                   });
}

// NF4 with double-quantized scales (QLoRA storage), through the owning tensor.
template <class T>
void bm_quantize_nf4_dq(benchmark::State& state) {
  auto const& x = input<T>();
  std::int64_t const shape[] = {static_cast<std::int64_t>(n_elements)};
  format_desc const d{code_id::nf4, 64, true, 256};
  run_against_copy(state, n_elements * sizeof(T) + d.size_bytes(n_elements), [&] {
    auto q = quantize(exec::host{}, view(x), shape, d);
    benchmark::DoNotOptimize(q.codes().data());
  });
}

template <class T>
void bm_dequantize_nf4_dq(benchmark::State& state) {
  auto const& x = input<T>();
  std::int64_t const shape[] = {static_cast<std::int64_t>(n_elements)};
  format_desc const d{code_id::nf4, 64, true, 256};
  auto const q = quantize(exec::host{}, view(x), shape, d);
  std::vector<T> y(n_elements);
  run_against_copy(state, n_elements * sizeof(T) + d.size_bytes(n_elements),
                   [&] { q.dequantize(exec::host{}, view(y)); });
}

// A row-wise int8 matrix of the benchmark's elements: rows of 4096, codes and row absmax.
struct rowwise_matrix {
  static constexpr std::size_t cols = 4096;
  static constexpr std::size_t rows = n_elements / cols;
  std::vector<std::int8_t> q = std::vector<std::int8_t>(n_elements);
  std::vector<float> absmax = std::vector<float>(rows);

  // Bytes a (de)quantization with T values moves.
  template <class T>
  static constexpr std::size_t moved() {
    return n_elements * sizeof(T) + n_elements + rows * sizeof(float);
  }
  template <class T>
  void quantize(std::vector<T> const& x) {
    quantize_rowwise(exec::host{}, view(x), rows, cols, view(q), view(absmax));
  }
};

template <class T>
void bm_quantize_rowwise(benchmark::State& state) {
  rowwise_matrix m;
  run_against_copy(state, m.moved<T>(), [&] { m.quantize(input<T>()); });
}

// T: the output type (the codes come from the same values in T).
template <class T>
void bm_dequantize_rowwise(benchmark::State& state) {
  rowwise_matrix m;
  m.quantize(input<T>());
  std::vector<T> y(n_elements);
  run_against_copy(state, m.moved<T>(), [&] {
    dequantize_rowwise(exec::host{}, view(std::as_const(m.q)), view(std::as_const(m.absmax)),
                       m.rows, m.cols, view(y));
  });
}

constexpr auto ms = benchmark::kMillisecond;

// copies of the byte counts the benchmarks below move (f32 and bf16 inputs, 8- and 4-bit codes)
BENCHMARK(bm_copy)
    ->Arg(n_elements * 5)
    ->Arg(n_elements * 3)
    ->Arg(n_elements * 9 / 2)
    ->Arg(n_elements * 5 / 2)
    ->Unit(ms)
    ->UseManualTime();

#define QMEM_QUANT_BENCH(C, T, BLOCK)                                                              \
  BENCHMARK(bm_quantize<C, T, BLOCK>)->Unit(ms)->UseManualTime();                                  \
  BENCHMARK(bm_dequantize<C, T, BLOCK>)->Unit(ms)->UseManualTime()

QMEM_QUANT_BENCH(nf4, bf16, 64);
QMEM_QUANT_BENCH(nf4, float, 64);
QMEM_QUANT_BENCH(fp4, bf16, 64);
QMEM_QUANT_BENCH(fp4, float, 64);
QMEM_QUANT_BENCH(dynamic_signed, float, 256);
QMEM_QUANT_BENCH(dynamic_signed, bf16, 4096);
QMEM_QUANT_BENCH(dynamic_unsigned, float, 256);
QMEM_QUANT_BENCH(linear_signed, float, 256);
QMEM_QUANT_BENCH(fp8_e4m3, bf16, 128);
QMEM_QUANT_BENCH(fp8_e5m2, float, 128);
BENCHMARK(bm_quantize_nf4_dq<bf16>)->Unit(ms)->UseManualTime();
BENCHMARK(bm_dequantize_nf4_dq<bf16>)->Unit(ms)->UseManualTime();
BENCHMARK(bm_quantize_rowwise<bf16>)->Unit(ms)->UseManualTime();
BENCHMARK(bm_dequantize_rowwise<bf16>)->Unit(ms)->UseManualTime();
// f16 outputs (the codes quantized from f16 values; the same bytes as bf16)
BENCHMARK(bm_dequantize<nf4, f16, 64>)->Unit(ms)->UseManualTime();
BENCHMARK(bm_dequantize<dynamic_signed, f16, 4096>)->Unit(ms)->UseManualTime();
BENCHMARK(bm_dequantize<fp8_e4m3, f16, 128>)->Unit(ms)->UseManualTime();
BENCHMARK(bm_dequantize_rowwise<f16>)->Unit(ms)->UseManualTime();

} // namespace

BENCHMARK_MAIN();
