// GPU blockwise quantization at 2^28 elements (the size of the peers' figures in
// shared/anchors/README.md): NF4 and FP4 from/to bf16 at every block size, int8 dynamic from/to
// fp32 at every block size, and the double-quantized variants.
//
// Each case is timed with CUDA events around the one call (manual time), enqueued behind a
// blocking kernel so that the host's time (argument checks, the launch, a descheduled thread) is
// not counted (gpu_timer.cuh), and reports the bytes an ideal kernel must move (input read + codes
// + fp32 scales written, or the reverse), GB/s, and "pct_copy": the percentage of a
// device-to-device copy's bandwidth measured in the same run (the "copy_d2d" row, bytes read +
// written), which is the roofline. The single-call rows also time each call the former way
// (events around the call on an idle stream, the host's time included) in the same iterations,
// alternating with the blocked timing: counters host_incl_ms and host_incl_min_ms, kept for one
// release to compare with.
//
//   quant_bench_cuda --benchmark_min_time=0.05 --benchmark_out=quant.json --benchmark_out_format=json
#include <qmem/core/cuda/runtime.cuh>
#include <qmem/quant.hpp>
#include <qmem/quant/cuda/blockwise.cuh>
#include <qmem/quant/double_quant.hpp>

#include <benchmark/benchmark.h>
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "gpu_timer.cuh"

namespace {

using namespace qmem;
using namespace qmem::quant;

constexpr std::size_t elements = std::size_t{1} << 28;
constexpr std::size_t nested_block = 256; // bitsandbytes' nested block for 4-bit formats

void check(cudaError_t s, char const* what) { cuda_detail::check(s, what); }

// Device buffers shared by every case (allocated once: 2^28 elements need ~3 GB in all).
struct buffers {
  float* x32 = nullptr;
  bf16* x16 = nullptr;
  float* y32 = nullptr;
  bf16* y16 = nullptr;
  std::uint8_t* codes = nullptr;
  float* absmax = nullptr;
  std::uint8_t* qabsmax = nullptr;
  float* absmax2 = nullptr;
  float* offset = nullptr;
  qmem::bench::gpu_timer* timer = nullptr; // on the legacy default stream, which every case uses
  double copy_bytes_per_s = 0.0;
};
buffers* g = nullptr;

__global__ void fill_normalish(float* x32, bf16* x16, std::size_t n) {
  std::size_t const stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    // sum of four uniforms: a bell-shaped value with outliers in every block of 64
    std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u;
    float s = 0.0f;
    for (int k = 0; k < 4; ++k) {
      h ^= h >> 13;
      h *= 0x5bd1e995u;
      h ^= h >> 15;
      s += static_cast<float>(h & 0xffffff) * (1.0f / 16777216.0f) - 0.5f;
    }
    x32[i] = s * 1.7f;
    x16[i] = bf16(s * 1.7f);
  }
}

void setup() {
  g = new buffers;
  check(cudaMalloc(&g->x32, elements * sizeof(float)), "cudaMalloc");
  check(cudaMalloc(&g->x16, elements * sizeof(bf16)), "cudaMalloc");
  check(cudaMalloc(&g->y32, elements * sizeof(float)), "cudaMalloc");
  check(cudaMalloc(&g->y16, elements * sizeof(bf16)), "cudaMalloc");
  check(cudaMalloc(&g->codes, elements), "cudaMalloc");
  check(cudaMalloc(&g->absmax, elements / 32 * sizeof(float)), "cudaMalloc");
  check(cudaMalloc(&g->qabsmax, elements / 32), "cudaMalloc");
  check(cudaMalloc(&g->absmax2, elements / 32 / 64 * sizeof(float) + 256), "cudaMalloc");
  check(cudaMalloc(&g->offset, sizeof(float)), "cudaMalloc");
  g->timer = new qmem::bench::gpu_timer(nullptr);
  fill_normalish<<<132 * 8, 256>>>(g->x32, g->x16, elements);
  check(cudaGetLastError(), "fill_normalish");
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

//! GPU time of the work `f` enqueues, the host's time excluded (gpu_timer::blocked_ms).
template <class F>
float time_ms(F&& f) {
  return g->timer->blocked_ms(f);
}

// The roofline: a 1 GiB device-to-device copy, median of 21 after 3 warm-ups.
double measure_copy() {
  std::size_t const bytes = elements * sizeof(float);
  auto copy = [&] {
    check(cudaMemcpyAsync(g->y32, g->x32, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpyAsync");
  };
  for (int i = 0; i < 3; ++i)
    copy();
  std::vector<float> t;
  for (int i = 0; i < 21; ++i)
    t.push_back(time_ms(copy));
  std::sort(t.begin(), t.end());
  return 2.0 * static_cast<double>(bytes) / (t[t.size() / 2] * 1e-3);
}

// Runs `f` once per iteration under CUDA events and reports bytes, GB/s and % of the copy (from
// the mean, Google Benchmark's time), and the minimum and median of the iterations' times
// (min_ms, median_ms): the statistics to compare between runs, since a slow iteration (a clock
// change, another process) moves the mean by up to 10% (the same kernel in two rows of one
// session, H200, 2026-11-29 19:19 UTC: 0.191 and 0.211 ms).
// Each iteration also times `f` once more the former way (host_inclusive_ms), before or after the
// blocked call in turn: counters host_incl_ms (median) and host_incl_min_ms.
template <class F>
void run(benchmark::State& state, double bytes, F&& f) {
  for (int i = 0; i < 3; ++i) // warm-up: first launch, pool growth, table uploads, clocks
    f();
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  std::string error;
  auto const r = qmem::bench::time_row(state, *g->timer, f, error);
  if (!r) {
    state.SkipWithError(error.c_str());
    return;
  }
  if (!r->gpu.empty()) {
    state.counters["min_ms"] = r->gpu.front();
    state.counters["median_ms"] = r->gpu[r->gpu.size() / 2];
    state.counters["host_incl_min_ms"] = r->host_incl.front();
    state.counters["host_incl_ms"] = r->host_incl[r->host_incl.size() / 2];
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
  state.counters["GBps"] =
      benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["pct_copy"] = benchmark::Counter(100.0 * bytes / g->copy_bytes_per_s,
                                                  benchmark::Counter::kIsIterationInvariantRate);
  state.counters["roofline_ms"] = 1e3 * bytes / g->copy_bytes_per_s;
}

exec::cuda const e{};

void copy_d2d(benchmark::State& state) {
  std::size_t const bytes = elements * sizeof(float);
  run(state, 2.0 * static_cast<double>(bytes), [&] {
    check(cudaMemcpyAsync(g->y32, g->x32, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpyAsync");
  });
}

template <class C, class T>
double format_bytes(std::size_t block) {
  return static_cast<double>(elements * sizeof(T) + code_bytes<C>(elements) +
                             block_count(elements, block) * sizeof(float));
}

template <class T>
T* input() {
  if constexpr (std::is_same_v<T, float>)
    return g->x32;
  else
    return g->x16;
}
template <class T>
T* output() {
  if constexpr (std::is_same_v<T, float>)
    return g->y32;
  else
    return g->y16;
}

template <class C, class T>
void quantize(benchmark::State& state) {
  auto const block = static_cast<std::size_t>(state.range(0));
  tensor_view<T const> x(input<T>(), elements, memory_space::device);
  tensor_view<std::uint8_t> codes(g->codes, code_bytes<C>(elements), memory_space::device);
  tensor_view<float> absmax(g->absmax, block_count(elements, block), memory_space::device);
  run(state, format_bytes<C, T>(block), [&] { quantize_blockwise<C>(e, x, block, codes, absmax); });
}

template <class C, class T>
void dequantize(benchmark::State& state) {
  auto const block = static_cast<std::size_t>(state.range(0));
  tensor_view<std::uint8_t const> codes(g->codes, code_bytes<C>(elements), memory_space::device);
  tensor_view<float const> absmax(g->absmax, block_count(elements, block), memory_space::device);
  tensor_view<T> y(output<T>(), elements, memory_space::device);
  // codes and scales of real data first
  quantize_blockwise<C>(
      e, tensor_view<T const>(input<T>(), elements, memory_space::device), block,
      tensor_view<std::uint8_t>(g->codes, code_bytes<C>(elements), memory_space::device),
      tensor_view<float>(g->absmax, block_count(elements, block), memory_space::device));
  run(state, format_bytes<C, T>(block),
      [&] { dequantize_blockwise<C>(e, codes, absmax, block, y); });
}

// Quantize with double-quantized scales: the blockwise pass, then quantize_scales (mean tree +
// nested quantization). Bytes: those of the plain format (what the peers count).
template <class C, class T>
void quantize_nested(benchmark::State& state) {
  auto const block = static_cast<std::size_t>(state.range(0));
  std::size_t const m = block_count(elements, block);
  tensor_view<T const> x(input<T>(), elements, memory_space::device);
  tensor_view<std::uint8_t> codes(g->codes, code_bytes<C>(elements), memory_space::device);
  tensor_view<float> absmax(g->absmax, m, memory_space::device);
  tensor_view<std::uint8_t> qabsmax(g->qabsmax, m, memory_space::device);
  tensor_view<float> absmax2(g->absmax2, block_count(m, nested_block), memory_space::device);
  tensor_view<float> offset(g->offset, 1, memory_space::device);
  run(state, format_bytes<C, T>(block), [&] {
    quantize_blockwise<C>(e, x, block, codes, absmax);
    quantize_scales(e, tensor_view<float const>(absmax), nested_block, qabsmax, absmax2, offset);
  });
}

// quantize_scales alone (the mean tree and the nested 8-bit quantization) on the scales of a
// 2^28-element tensor in blocks of state.range(0): the part of quantize_nested that double
// quantization adds. Bytes: the scales read twice, the nested codes written.
void scales_only(benchmark::State& state) {
  auto const block = static_cast<std::size_t>(state.range(0));
  std::size_t const m = block_count(elements, block);
  tensor_view<float> absmax(g->absmax, m, memory_space::device);
  tensor_view<std::uint8_t> qabsmax(g->qabsmax, m, memory_space::device);
  tensor_view<float> absmax2(g->absmax2, block_count(m, nested_block), memory_space::device);
  tensor_view<float> offset(g->offset, 1, memory_space::device);
  quantize_blockwise<nf4>(
      e, tensor_view<bf16 const>(g->x16, elements, memory_space::device), block,
      tensor_view<std::uint8_t>(g->codes, code_bytes<nf4>(elements), memory_space::device), absmax);
  run(state, static_cast<double>(m) * 9.0, [&] {
    quantize_scales(e, tensor_view<float const>(absmax), nested_block, qabsmax, absmax2, offset);
  });
}

template <class C, class T>
void dequantize_nested(benchmark::State& state) {
  auto const block = static_cast<std::size_t>(state.range(0));
  std::size_t const m = block_count(elements, block);
  tensor_view<std::uint8_t> codes(g->codes, code_bytes<C>(elements), memory_space::device);
  tensor_view<float> absmax(g->absmax, m, memory_space::device);
  tensor_view<std::uint8_t> qabsmax(g->qabsmax, m, memory_space::device);
  tensor_view<float> absmax2(g->absmax2, block_count(m, nested_block), memory_space::device);
  tensor_view<float> offset(g->offset, 1, memory_space::device);
  quantize_blockwise<C>(e, tensor_view<T const>(input<T>(), elements, memory_space::device), block,
                        codes, absmax);
  quantize_scales(e, tensor_view<float const>(absmax), nested_block, qabsmax, absmax2, offset);
  tensor_view<T> y(output<T>(), elements, memory_space::device);
  run(state, format_bytes<C, T>(block), [&] {
    dequantize_blockwise_nested<C>(e, tensor_view<std::uint8_t const>(codes),
                                   tensor_view<std::uint8_t const>(qabsmax),
                                   tensor_view<float const>(absmax2),
                                   tensor_view<float const>(offset), block, nested_block, y);
  });
}

// NF4 from bf16 through quantize_whole launched directly (narrow groups: blocks 32..1024):
// variant 0 is the kernel quantize_blockwise dispatches (6 CTAs per SM, 4 waves), variants 1 and 2
// the register-prefetch candidate with 3 / 4 CTAs per SM (same grid rule). Same bytes as
// nf4_quantize_bf16. state.range(0): block size, range(1): variant.
template <int MinCtas, bool Prefetch>
void launch_nf4_whole(std::size_t block) {
  namespace k = qmem::quant::cuda_impl::kernels;
  constexpr int items = k::whole_items<bf16>;
  auto kernel = k::quantize_whole<nf4, bf16, items, k::no_transform, MinCtas, Prefetch>;
  std::size_t const blocks = elements / block;
  int const group = static_cast<int>(block) / items;
  std::size_t const per_step = static_cast<std::size_t>(k::cta_threads / group);
  unsigned const grid = k::grid_for(kernel, k::cta_threads, blocks / per_step + 1, 0,
                                    k::whole_waves<cuda_impl::normal_encoder<nf4>::storage>);
  auto const params = cuda_impl::normal_encoder<nf4>::host_params(0);
  kernel<<<grid, k::cta_threads>>>(g->x16, blocks, k::log2_exact(block), g->codes, g->absmax,
                                   nf4::book, params, k::no_transform{});
  check(cudaGetLastError(), "quantize_whole");
}

void nf4_whole_variant(benchmark::State& state) {
  auto const block = static_cast<std::size_t>(state.range(0));
  auto const variant = state.range(1);
  run(state, format_bytes<nf4, bf16>(block), [&] {
    if (variant == 1)
      launch_nf4_whole<3, true>(block);
    else if (variant == 2)
      launch_nf4_whole<4, true>(block);
    else
      launch_nf4_whole<cuda_impl::kernels::whole_min_ctas<bf16, 32>, false>(block);
  });
}

// dequantize_aligned launched directly with PerStep vectors per thread and one step per thread
// (the dispatched launch uses dequantize_vectors_per_step): NF4 -> bf16 block 64 and int8 -> fp32
// block 256, same bytes as nf4_dequantize_bf16 / int8_dequantize_f32. state.range(0): PerStep.
// (The 4-bit decoding candidates of 2026-11-30 16:25 UTC, a dequantize4_ab row interleaving them,
// are recorded in docs/benchmarks.md, "2026-11-30, deq".)
template <class C, class T, int PerStep>
void launch_dequantize(std::size_t block) {
  namespace k = qmem::quant::cuda_impl::kernels;
  auto kernel = k::dequantize_aligned<C, T, k::plain_scales, PerStep>;
  std::size_t const vectors = elements / k::vector_items<T>;
  auto const grid = static_cast<unsigned>(vectors / PerStep / k::cta_threads + 1);
  kernel<<<grid, k::cta_threads>>>(g->codes, k::plain_scales{g->absmax}, elements,
                                   k::log2_exact(block), output<T>(), k::decoded_values_on<C>(0));
  check(cudaGetLastError(), "dequantize_aligned");
}

template <class C, class T>
void dequantize_variant(benchmark::State& state) {
  std::size_t const block = C::bits == 8 ? 256 : 64;
  quantize_blockwise<C>(
      e, tensor_view<T const>(input<T>(), elements, memory_space::device), block,
      tensor_view<std::uint8_t>(g->codes, code_bytes<C>(elements), memory_space::device),
      tensor_view<float>(g->absmax, block_count(elements, block), memory_space::device));
  auto const per_step = state.range(0);
  run(state, format_bytes<C, T>(block), [&] {
    if (per_step == 1)
      launch_dequantize<C, T, 1>(block);
    else if (per_step == 2)
      launch_dequantize<C, T, 2>(block);
    else if (per_step == 8)
      launch_dequantize<C, T, 8>(block);
    else
      launch_dequantize<C, T, 4>(block);
  });
}

// quantize_whole as quantize_blockwise dispatches it (narrow groups), launched with `waves`
// waves of resident CTAs instead of whole_waves, for whole_waves_ab.
template <class C, class T>
void launch_whole_waves(std::size_t block, int waves) {
  namespace k = qmem::quant::cuda_impl::kernels;
  constexpr int items = k::whole_items<T>;
  auto kernel = k::quantize_whole<C, T, items, k::no_transform>;
  std::size_t const blocks = elements / block;
  int const group = static_cast<int>(block) / items;
  std::size_t const per_step = static_cast<std::size_t>(k::cta_threads / group);
  unsigned const grid = k::grid_for(kernel, k::cta_threads, blocks / per_step + 1, 0, waves);
  auto const params = cuda_impl::normal_encoder<C>::host_params(0);
  kernel<<<grid, k::cta_threads>>>(input<T>(), blocks, k::log2_exact(block), g->codes, g->absmax,
                                   C::book, params, k::no_transform{});
  check(cudaGetLastError(), "quantize_whole");
}

// Interleaved A/B of two launches of the same work: each iteration times A then B (the reported
// time is their sum); counters A_/B_median_ms and A_/B_min_ms. Rows of one benchmark run drift
// by a few percent over a process's life (clocks, L2 state: the same kernel 0.192 and 0.200 ms
// in two rows, 21:49 UTC), so variants are compared within one row.
template <class A, class B>
void run_ab(benchmark::State& state, A&& a, B&& b) {
  for (int i = 0; i < 3; ++i) {
    a();
    b();
  }
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  std::vector<float> ta;
  std::vector<float> tb;
  try {
    for (auto _ : state) {
      ta.push_back(time_ms(a));
      tb.push_back(time_ms(b));
      state.SetIterationTime((ta.back() + tb.back()) * 1e-3);
    }
  } catch (qmem::bench::timer_timeout const& e) {
    state.SkipWithError(e.what());
    return;
  }
  std::sort(ta.begin(), ta.end());
  std::sort(tb.begin(), tb.end());
  if (!ta.empty()) {
    state.counters["A_min_ms"] = ta.front();
    state.counters["A_median_ms"] = ta[ta.size() / 2];
    state.counters["B_min_ms"] = tb.front();
    state.counters["B_median_ms"] = tb[tb.size() / 2];
  }
}

// quantize_whole A/B at two grid sizes: state.range(0) 0 = NF4 from bf16 block 64, 1 = FP4 from
// bf16 block 64, 2 = int8 (dynamic_signed) from fp32 block 256; waves A = range(1), B = range(2).
void whole_waves_ab(benchmark::State& state) {
  auto const code = state.range(0);
  std::size_t const block = code == 2 ? 256 : 64;
  auto launch = [&](int waves) {
    if (code == 0)
      launch_whole_waves<nf4, bf16>(block, waves);
    else if (code == 1)
      launch_whole_waves<fp4, bf16>(block, waves);
    else
      launch_whole_waves<dynamic_signed, float>(block, waves);
  };
  run_ab(
      state, [&] { launch(static_cast<int>(state.range(1))); },
      [&] { launch(static_cast<int>(state.range(2))); });
}

// quantize_whole for a 4-bit code from bf16 as quantize_blockwise dispatches it (narrow groups;
// the compile-time block size at block 64, the runtime one otherwise), with MinCtas resident CTAs
// asked of ptxas (6: 40 registers, where ptxas spills; 5: 48). Dispatched since 2026-11-30 19:31
// UTC: 5 at block 64 (whole_fixed_min_ctas, 4-5% faster there), 6 otherwise (5 was 6% slower).
template <class C, int MinCtas>
void launch_whole_ctas(std::size_t block) {
  namespace k = qmem::quant::cuda_impl::kernels;
  constexpr int items = k::whole_items<bf16>;
  std::size_t const blocks = elements / block;
  std::size_t const per_step = static_cast<std::size_t>(k::cta_threads / (block / items));
  auto const params = cuda_impl::normal_encoder<C>::host_params(0);
  auto go = [&](auto kernel, int shift) {
    unsigned const grid =
        k::grid_for(kernel, k::cta_threads, blocks / per_step + 1, 0,
                    k::whole_waves<typename cuda_impl::normal_encoder<C>::storage>);
    kernel<<<grid, k::cta_threads>>>(g->x16, blocks, shift, g->codes, g->absmax, C::book, params,
                                     k::no_transform{});
  };
  if (block == 64)
    go(k::quantize_whole<C, bf16, items, k::no_transform, MinCtas, false, 6>, 6);
  else
    go(k::quantize_whole<C, bf16, items, k::no_transform, MinCtas, false, 0>, k::log2_exact(block));
  check(cudaGetLastError(), "quantize_whole");
}

// whole_ctas_ab/code/block/A/B: the kernel above with A then B resident CTAs asked, interleaved
// (code 0 NF4, 1 FP4, from bf16; MinCtas 5 or 6).
void whole_ctas_ab(benchmark::State& state) {
  auto const code = state.range(0);
  auto const block = static_cast<std::size_t>(state.range(1));
  auto launch = [&](long ctas) {
    if (code == 0)
      ctas == 5 ? launch_whole_ctas<nf4, 5>(block) : launch_whole_ctas<nf4, 6>(block);
    else
      ctas == 5 ? launch_whole_ctas<fp4, 5>(block) : launch_whole_ctas<fp4, 6>(block);
  };
  run_ab(
      state, [&] { launch(state.range(2)); }, [&] { launch(state.range(3)); });
}

// the dispatched quantize against itself (the noise floor of an A/B row): range(0) 0 NF4, 1 FP4
// from bf16 block 64
void plain_ab(benchmark::State& state) {
  auto const code = state.range(0);
  auto call = [code] {
    if (code == 0)
      quantize_blockwise<nf4>(
          e, tensor_view<bf16 const>(g->x16, elements, memory_space::device), 64,
          tensor_view<std::uint8_t>(g->codes, elements / 2, memory_space::device),
          tensor_view<float>(g->absmax, elements / 64, memory_space::device));
    else
      quantize_blockwise<fp4>(
          e, tensor_view<bf16 const>(g->x16, elements, memory_space::device), 64,
          tensor_view<std::uint8_t>(g->codes, elements / 2, memory_space::device),
          tensor_view<float>(g->absmax, elements / 64, memory_space::device));
  };
  run_ab(state, call, call);
}

// Double quantization's ways (kernels::scales_path: 0 two_kernels = offset_mean +
// nested_quantize, 1 fused = offset_nested_quantize, 2 fused_dependent = the same as a
// programmatic dependent (the dispatched path), 3 fused_persistent = that with the stream's
// persistent workspace instead of a pool allocation), interleaved A/B. dq_path_ab: the blockwise
// quantization then the scales, range(0) 0 = NF4 from bf16 block 64, 1 = FP4 from bf16 block 64,
// 2 = int8 from fp32 block 256; paths A = range(1), B = range(2); path -1: the quantization alone
// (its row against a path is the double quantization's overhead, both halves timed interleaved
// in one process).
// scales_path_ab: the scales of NF4 block 64 alone.
void quantize_scales_path(std::size_t m, int path) {
  cuda_impl::kernels::quantize_scales_by(e, g->absmax, m, nested_block, g->qabsmax, g->absmax2,
                                         g->offset,
                                         static_cast<cuda_impl::kernels::scales_path>(path));
}

void dq_path_ab(benchmark::State& state) {
  auto const code = state.range(0);
  std::size_t const block = code == 2 ? 256 : 64;
  std::size_t const m = elements / block;
  auto call = [&](int path) {
    if (code == 0)
      quantize_blockwise<nf4>(
          e, tensor_view<bf16 const>(g->x16, elements, memory_space::device), block,
          tensor_view<std::uint8_t>(g->codes, elements / 2, memory_space::device),
          tensor_view<float>(g->absmax, m, memory_space::device));
    else if (code == 1)
      quantize_blockwise<fp4>(
          e, tensor_view<bf16 const>(g->x16, elements, memory_space::device), block,
          tensor_view<std::uint8_t>(g->codes, elements / 2, memory_space::device),
          tensor_view<float>(g->absmax, m, memory_space::device));
    else
      quantize_blockwise<dynamic_signed>(
          e, tensor_view<float const>(g->x32, elements, memory_space::device), block,
          tensor_view<std::uint8_t>(g->codes, elements, memory_space::device),
          tensor_view<float>(g->absmax, m, memory_space::device));
    if (path >= 0)
      quantize_scales_path(m, path);
  };
  run_ab(
      state, [&] { call(static_cast<int>(state.range(1))); },
      [&] { call(static_cast<int>(state.range(2))); });
}

void scales_path_ab(benchmark::State& state) {
  std::size_t const m = elements / 64;
  quantize_blockwise<nf4>(e, tensor_view<bf16 const>(g->x16, elements, memory_space::device), 64,
                          tensor_view<std::uint8_t>(g->codes, elements / 2, memory_space::device),
                          tensor_view<float>(g->absmax, m, memory_space::device));
  run_ab(
      state, [&] { quantize_scales_path(m, static_cast<int>(state.range(0))); },
      [&] { quantize_scales_path(m, static_cast<int>(state.range(1))); });
}

// The launch queue of a held stream (gpu_timer.cuh's limit): the host's time to enqueue
// state.range(0) empty kernels behind the blocking kernel (counter enqueue_ms) and whether the
// blocking kernel timed out meanwhile (timed_out 1: the launches filled the queue, and the host
// waited for the 0.2 s timeout).
void timer_launch_queue(benchmark::State& state) {
  int const n = static_cast<int>(state.range(0));
  g->timer->probe_launch_queue(n); // first launches of the kernels, outside the row
  for (auto _ : state) {
    auto const [ms, timed_out] = g->timer->probe_launch_queue(n);
    state.SetIterationTime(ms * 1e-3);
    state.counters["enqueue_ms"] = ms;
    state.counters["timed_out"] = timed_out ? 1 : 0;
  }
}

// The host's cost of a call, not the GPU's: the residency check every CUDA entry point makes on
// its tensors (cuda_detail::check_resident, core/cuda/runtime.cuh: one cudaPointerGetAttributes
// per tensor inside a relaxed capture scope), for 1 and 3 tensors, and a whole small call
// (dequantize 4096 NF4 elements: argument checks, residency check, launch) enqueued back to back,
// the stream drained every 64 calls outside the timed part. CPU time per call, host wall clock.
void host_check_resident(benchmark::State& state) {
  int const n = static_cast<int>(state.range(0));
  void const* const a = g->codes;
  void const* const b = g->absmax;
  void const* const c = g->y16;
  for (auto _ : state) {
    if (n == 1)
      cuda_detail::check_resident(e, "bench", {{"x", a}});
    else
      cuda_detail::check_resident(e, "bench", {{"x", a}, {"y", b}, {"z", c}});
  }
}

// The parts of that check, to choose its implementation: the runtime's query alone
// (cudaPointerGetAttributes), the driver's (cuPointerGetAttributes of the memory type, device
// ordinal and managed flag, through cudaGetDriverEntryPointByVersion: no link to libcuda), and the
// pair of cudaThreadExchangeStreamCaptureMode calls of relaxed_capture_scope.
void host_pointer_query(benchmark::State& state) {
  int const which = static_cast<int>(state.range(0));
  void const* const p = g->codes;
  using query_fn = CUresult (*)(unsigned, CUpointer_attribute*, void**, CUdeviceptr);
  static query_fn const driver_query = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuPointerGetAttributes", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<query_fn>(fn);
  }();
  if (which == 1 && driver_query == nullptr) {
    state.SkipWithError("cuPointerGetAttributes not found through the runtime");
    return;
  }
  for (auto _ : state) {
    if (which == 0) {
      cudaPointerAttributes a{};
      check(cudaPointerGetAttributes(&a, p), "cudaPointerGetAttributes");
      benchmark::DoNotOptimize(a);
    } else if (which == 1) {
      unsigned type = 0;
      int ordinal = -1;
      unsigned managed = 0;
      CUpointer_attribute attributes[] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                                          CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                          CU_POINTER_ATTRIBUTE_IS_MANAGED};
      void* data[] = {&type, &ordinal, &managed};
      if (driver_query(3, attributes, data, reinterpret_cast<CUdeviceptr>(p)) != CUDA_SUCCESS)
        state.SkipWithError("cuPointerGetAttributes failed");
      benchmark::DoNotOptimize(type);
      benchmark::DoNotOptimize(ordinal);
    } else {
      cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
      check(cudaThreadExchangeStreamCaptureMode(&mode), "cudaThreadExchangeStreamCaptureMode");
      check(cudaThreadExchangeStreamCaptureMode(&mode), "cudaThreadExchangeStreamCaptureMode");
    }
  }
}

void host_small_dequantize(benchmark::State& state) {
  std::size_t const n = 4096, block = 64;
  tensor_view<std::uint8_t const> codes(g->codes, code_bytes<nf4>(n), memory_space::device);
  tensor_view<float const> absmax(g->absmax, block_count(n, block), memory_space::device);
  tensor_view<bf16> y(g->y16, n, memory_space::device);
  dequantize_blockwise<nf4>(e, codes, absmax, block, y);
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  std::int64_t i = 0;
  for (auto _ : state) {
    dequantize_blockwise<nf4>(e, codes, absmax, block, y);
    if (++i % 64 == 0) {
      state.PauseTiming();
      check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
      state.ResumeTiming();
    }
  }
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

// Every block size but `skip` (the goal's block, registered on its own before).
void four_bit_blocks(benchmark::internal::Benchmark* b, int skip = 0) {
  for (int block = 32; block <= 4096; block *= 2)
    if (block != skip)
      b->Arg(block);
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}
void eight_bit_blocks(benchmark::internal::Benchmark* b, int skip = 0) {
  for (int block = 64; block <= 4096; block *= 2)
    if (block != skip)
      b->Arg(block);
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}
void one_block(benchmark::internal::Benchmark* b, int block) {
  b->Arg(block)->UseManualTime()->Unit(benchmark::kMillisecond);
}

} // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (!cuda_detail::device_available()) {
    std::printf("[qmem] SKIPPED: no CUDA device on this machine\n");
    return 0;
  }
  setup();
  g->copy_bytes_per_s = measure_copy();
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  benchmark::AddCustomContext("device", prop.name);
  benchmark::AddCustomContext("copy_GBps", std::to_string(g->copy_bytes_per_s / 1e9));
  benchmark::AddCustomContext("elements", std::to_string(elements));

  benchmark::RegisterBenchmark("host_cost/check_resident", host_check_resident)
      ->Arg(1)
      ->Arg(3)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("host_cost/pointer_query", host_pointer_query)
      ->Arg(0)
      ->Arg(1)
      ->Arg(2)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("host_cost/dequantize_nf4_4096", host_small_dequantize)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("copy_d2d", copy_d2d)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  // Each quantization with double quantization right after the same quantization alone at the
  // goal's block size: rows late in a process run up to 8% slower than early ones (round 5 of
  // benchmarks.md's "GPU quantization"), so the separate rows' overhead is read from adjacent
  // rows (it was read from rows 30 to 45 rows apart: NF4 +11.4% there against +8.0% interleaved,
  // lead's run of 2026-11-30 04:29 UTC). The interleaved dq_path_ab rows remain the figure to
  // quote.
  one_block(benchmark::RegisterBenchmark("nf4_quantize_bf16", quantize<nf4, bf16>), 64);
  one_block(benchmark::RegisterBenchmark("nf4_quantize_bf16_dq", quantize_nested<nf4, bf16>), 64);
  four_bit_blocks(benchmark::RegisterBenchmark("nf4_quantize_bf16", quantize<nf4, bf16>), 64);
  four_bit_blocks(benchmark::RegisterBenchmark("nf4_dequantize_bf16", dequantize<nf4, bf16>));
  one_block(benchmark::RegisterBenchmark("fp4_quantize_bf16", quantize<fp4, bf16>), 64);
  one_block(benchmark::RegisterBenchmark("fp4_quantize_bf16_dq", quantize_nested<fp4, bf16>), 64);
  four_bit_blocks(benchmark::RegisterBenchmark("fp4_quantize_bf16", quantize<fp4, bf16>), 64);
  four_bit_blocks(benchmark::RegisterBenchmark("fp4_dequantize_bf16", dequantize<fp4, bf16>));
  one_block(benchmark::RegisterBenchmark("int8_quantize_f32", quantize<dynamic_signed, float>),
            256);
  one_block(
      benchmark::RegisterBenchmark("int8_quantize_f32_dq", quantize_nested<dynamic_signed, float>),
      256);
  eight_bit_blocks(
      benchmark::RegisterBenchmark("int8_quantize_f32", quantize<dynamic_signed, float>), 256);
  eight_bit_blocks(
      benchmark::RegisterBenchmark("int8_dequantize_f32", dequantize<dynamic_signed, float>));
  {
    auto* b = benchmark::RegisterBenchmark("dq_path_ab", dq_path_ab);
    for (int code : {0, 1, 2})
      b->Args({code, -1, 2})->Args({code, 0, 2})->Args({code, 2, 3});
    b->UseManualTime()->Unit(benchmark::kMillisecond);
  }
  benchmark::RegisterBenchmark("scales_path_ab", scales_path_ab)
      ->Args({0, 2})
      ->Args({2, 3})
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  {
    auto* b = benchmark::RegisterBenchmark("nf4_quantize_whole_variant", nf4_whole_variant);
    for (int block : {64, 256})
      for (int variant : {0, 1, 2})
        b->Args({block, variant});
    b->UseManualTime()->Unit(benchmark::kMillisecond);
  }
  for (auto* b :
       {benchmark::RegisterBenchmark("nf4_dequantize_variant", dequantize_variant<nf4, bf16>),
        benchmark::RegisterBenchmark("int8_dequantize_variant",
                                     dequantize_variant<dynamic_signed, float>)})
    b->Arg(1)->Arg(2)->Arg(4)->Arg(8)->UseManualTime()->Unit(benchmark::kMillisecond);
  {
    auto* b = benchmark::RegisterBenchmark("whole_waves_ab", whole_waves_ab);
    b->Args({0, 2, 4})->Args({1, 1, 4})->Args({1, 2, 4})->Args({2, 1, 4});
    b->UseManualTime()->Unit(benchmark::kMillisecond);
  }
  {
    auto* b = benchmark::RegisterBenchmark("whole_ctas_ab", whole_ctas_ab);
    for (int code : {0, 1})
      for (int block : {64, 128})
        b->Args({code, block, 6, 5});
    b->UseManualTime()->Unit(benchmark::kMillisecond);
  }
  benchmark::RegisterBenchmark("plain_ab", plain_ab)
      ->Arg(0)
      ->Arg(1)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  one_block(benchmark::RegisterBenchmark("scales_only_dq", scales_only), 64);
  one_block(benchmark::RegisterBenchmark("scales_only_dq", scales_only), 256);
  one_block(benchmark::RegisterBenchmark("nf4_dequantize_bf16_dq", dequantize_nested<nf4, bf16>),
            64);
  one_block(benchmark::RegisterBenchmark("fp4_dequantize_bf16_dq", dequantize_nested<fp4, bf16>),
            64);
  one_block(benchmark::RegisterBenchmark("int8_dequantize_f32_dq",
                                         dequantize_nested<dynamic_signed, float>),
            256);
  {
    auto* b = benchmark::RegisterBenchmark("timer_launch_queue", timer_launch_queue);
    for (int n : {256, 512, 1024, 2048, 4096, 8192})
      b->Arg(n);
    b->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
