// Matmul with quantized weights on the GPU, against cuBLAS bf16 and a device-to-device copy
// measured in the same run.
//
// - gemv/*: NF4 weights, bf16 activations, batch 1 and 16, the five shapes of
//   shared/anchors/README.md, timed as the anchors' peer_gemv_graph.py times bitsandbytes: 200
//   calls captured in one CUDA graph, time per call. Bytes moved = codes + scales + x + y; GB/s and
//   % of the same-run copy bandwidth (bytes read + written) are reported.
// - cublas_gemv/*: cuBLASLt bf16 on the same shapes, the same way (it reads 4x the weight bytes).
// - gemm/*: batch 4096, dequantize + cuBLASLt against cuBLASLt bf16 on the same shape.
// - gemv_variant/n/k/m/v: each GEMV block shape alone (v 13-18: the batch-1 candidates of
//   cuda_matmul::gemv_batch1_candidates, to compare with v 9, gemv1_4bit_kernel's {8, 1, 4}; v 19
//   to 30: the streaming kernel's cuda_matmul::gemv_batch1_stream_candidates; 31 to 39, at
//   batches 4 and 16: the small-batch streaming kernel's gemv_batch16_stream_candidates; 40 and
//   up: the later batch-1 streaming candidates; 45 is the dispatched shape since 2026-11-30).
// - gemv_variant_dq/n/k/1/v: batch-1 streaming shapes 19, 28, 40 and up with nested scales.
// - gemv_batch16/n/k/m/v: the small-batch streaming kernel with each shape of
//   cuda_matmul::gemv_batch16_stream_candidates (v 0-8 are gemv_variant 31-39);
//   gemv_batch16_dq the shapes that take nested scales, with them.
// - gemv_batch16_ab/n/k/16/v/round: batch 16, on 14336 x 4096 gemv_batch16_stream_two_steps (v 14)
//   and 14 with lean steps and block64 scales (v 17: gemv_batch16_stream_two_steps_b64), on 8192 x
//   8192 the pair shape (v 8), gemv_batch16_stream_long_b64 (v 16) and 17, in turn, the order
//   rotated each round, three rounds, each shape's weight kept for the whole process (one
//   allocation for all rows).
// - gemv_bulk/n/k/v: the bulk-copy batch-1 kernel (gemv1_bulk_kernel) with each shape of
//   cuda_matmul::gemv_batch1_bulk_candidates, plain scales.
// - gemv_floor/threads/smem_kib/pdl/table: a call's fixed cost (a kernel that streams nothing).
// - gemv_ab/n/k/v/buffer/round: batch-1 streaming variant v (as gemv_variant) on one of three
//   weights per shape that live for the whole process, in alternating rounds: a kernel's
//   difference against the weight's placement and the time in the process. gemv_ab_dq: the
//   same with nested scales (variants of gemv_variant_dq).
// - read_floor/n/k/pdl: a kernel that only reads the bytes of an n x k weight (codes and fp32
//   scales), the same graph timing: the read roofline of a batch-1 call.
// - pattern_floor/n/k/pairs: the batch-1 streaming kernel's loads at J = 2 (its order, its
//   addresses) with nothing computed, `pairs` row pairs in flight per warp: what the access
//   pattern and the bytes in flight allow.
// - gemm_overlap/n/k/m/chunks: batch 4096 with the dequantization overlapped in row chunks.
// - gemm_l2/n/k/m/mib: batch 4096 in row chunks dequantized into one reused L2-sized buffer.
// - gemm_fused/n/k/m/nested: batch 4096 through the fused sm_90a GEMM (dequantization in the
//   main loop), against cuBLAS bf16 and the dispatched path; gemm_fused_variant/v/n/k/m its
//   variants (sm90::launch: 3-6 and 10 products, 1, 2 and 7 time-placing: no decode, no MMAs).
// - grad_input/*, int8/*: the QLoRA backward pass and the LLM.int8 layer.
#include <qmem/quant/cuda/matmul.cuh>
#include <qmem/quant/matmul.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "gpu_timer.cuh"

namespace {

using namespace qmem;
using namespace qmem::quant;

void check(cudaError_t s, char const* what) { cuda_detail::check(s, what); }

//! Deterministic pseudo-random bytes (a 32-bit mix of the index), filled on the device.
__global__ void fill_bytes(std::uint8_t* p, std::size_t n, std::uint32_t seed) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 0x9E3779B1u ^ seed;
    h ^= h >> 15;
    h *= 0x85EBCA77u;
    h ^= h >> 13;
    p[i] = static_cast<std::uint8_t>(h >> 7);
  }
}

//! Values in [lo, hi) from the same mix.
template <class T>
__global__ void fill_values(T* p, std::size_t n, float lo, float hi, std::uint32_t seed) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 0x9E3779B1u ^ seed;
    h ^= h >> 15;
    h *= 0x85EBCA77u;
    h ^= h >> 13;
    float const u = static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
    p[i] = from_float<T>(lo + (hi - lo) * u);
  }
}

//! x[r, c] = 8 for every 128th column c and every 64th row r (and row 0).
__global__ void plant_outliers(bf16* x, std::size_t m, std::size_t k) {
  for (std::size_t c = (blockIdx.x * std::size_t{blockDim.x} + threadIdx.x) * 128; c < k;
       c += std::size_t{gridDim.x} * blockDim.x * 128)
    for (std::size_t r = 0; r < m; r += 64)
      x[r * k + c] = bf16(8.0f);
}

template <class T>
struct device_buffer {
  T* p = nullptr;
  std::size_t n = 0;
  explicit device_buffer(std::size_t count) : n(count) {
    check(cudaMalloc(&p, std::max<std::size_t>(count, 1) * sizeof(T)), "cudaMalloc");
  }
  ~device_buffer() { (void)cudaFree(p); }
  device_buffer(device_buffer const&) = delete;
  device_buffer& operator=(device_buffer const&) = delete;
  tensor_view<T> view() const { return {p, n, memory_space::device}; }
};

//! Median of `reps` timings of `body`, in seconds: CUDA events around it with its launches enqueued
//! behind a blocking kernel, so that the host's time is not counted (gpu_timer.cuh);
//! `host_inclusive`: the former timing, events around the call on an idle stream (kept for one
//! release as versus_cublas's *_host_incl_ms counters).
template <class F>
double time_median(cudaStream_t s, int reps, F&& body, bool host_inclusive = false) {
  qmem::bench::gpu_timer timer(s);
  std::vector<float> ms;
  for (int r = 0; r < reps; ++r)
    ms.push_back(host_inclusive ? timer.host_inclusive_ms(body) : timer.blocked_ms(body));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2] * 1e-3;
}

//! Device-to-device copy bandwidth (bytes read + written per second), measured once per run on
//! 2 GiB; the roofline every result here is compared with.
double copy_bandwidth() {
  static double bw = [] {
    std::size_t const bytes = std::size_t{1} << 30;
    device_buffer<std::uint8_t> src(bytes), dst(bytes);
    cudaStream_t s;
    check(cudaStreamCreate(&s), "cudaStreamCreate");
    double const t = time_median(s, 15, [&] {
      check(cudaMemcpyAsync(dst.p, src.p, bytes, cudaMemcpyDeviceToDevice, s), "cudaMemcpyAsync");
    });
    (void)cudaStreamDestroy(s);
    return 2.0 * static_cast<double>(bytes) / t;
  }();
  return bw;
}

void report(benchmark::State& state, double seconds_per_call, double bytes) {
  state.counters["us"] = seconds_per_call * 1e6;
  state.counters["GB/s"] = bytes / seconds_per_call * 1e-9;
  state.counters["pct_copy"] = 100.0 * bytes / seconds_per_call / copy_bandwidth();
  state.counters["copy_GB/s"] = copy_bandwidth() * 1e-9;
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
}

//! A 4-bit NF4 weight with random codes and scales on the device.
struct nf4_weight {
  std::size_t n, k, block;
  bool nested;
  device_buffer<std::uint8_t> codes;
  device_buffer<float> absmax;
  device_buffer<std::uint8_t> qabsmax;
  device_buffer<float> absmax2;
  nf4_weight(std::size_t rows, std::size_t cols, std::size_t blk, bool nest)
      : n(rows), k(cols), block(blk), nested(nest), codes(rows * cols / 2),
        absmax(nest ? 0 : rows * cols / blk), qabsmax(nest ? rows * cols / blk : 0),
        absmax2(nest ? (rows * cols / blk + 255) / 256 : 0) {
    fill_bytes<<<1024, 256>>>(codes.p, codes.n, 17u);
    if (nested) {
      fill_bytes<<<1024, 256>>>(qabsmax.p, qabsmax.n, 23u);
      fill_values<float><<<64, 256>>>(absmax2.p, absmax2.n, 0.01f, 0.02f, 29u);
    } else {
      fill_values<float><<<1024, 256>>>(absmax.p, absmax.n, 0.01f, 0.05f, 31u);
    }
    check(cudaGetLastError(), "fill");
  }
  weight_4bit_view<nf4> view() const {
    weight_4bit_view<nf4> v;
    v.codes = tensor_view<std::uint8_t const>(codes.view());
    v.rows = n;
    v.cols = k;
    v.block_size = block;
    if (nested) {
      v.scales.qabsmax = tensor_view<std::uint8_t const>(qabsmax.view());
      v.scales.absmax2 = tensor_view<float const>(absmax2.view());
      v.scales.offset = 0.03f;
    } else {
      v.scales.absmax = tensor_view<float const>(absmax.view());
    }
    return v;
  }
  double bytes() const {
    double const e = static_cast<double>(n) * static_cast<double>(k);
    double const blocks = e / static_cast<double>(block);
    return e / 2 + (nested ? blocks + blocks / 256 * 4 : blocks * 4);
  }
};

//! Time per call of `call`, captured `calls` times into one CUDA graph (as the anchors do).
template <class F>
double graph_time_per_call(cudaStream_t s, int calls, F&& call) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  call(); // first use outside the capture (one-time set-up such as kernel attributes)
  check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  check(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  try {
    for (int i = 0; i < calls; ++i)
      call();
  } catch (...) {
    // end the capture (invalidated or not) so that the thread's next allocations work
    cudaGraph_t partial = nullptr;
    (void)cudaStreamEndCapture(s, &partial);
    if (partial != nullptr)
      (void)cudaGraphDestroy(partial);
    (void)cudaGetLastError();
    throw;
  }
  check(cudaStreamEndCapture(s, &graph), "cudaStreamEndCapture");
  check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  for (int i = 0; i < 3; ++i)
    check(cudaGraphLaunch(exec, s), "cudaGraphLaunch"); // warm-up
  double const t = time_median(s, 20, [&] { check(cudaGraphLaunch(exec, s), "cudaGraphLaunch"); });
  (void)cudaGraphExecDestroy(exec);
  (void)cudaGraphDestroy(graph);
  return t / calls;
}

//! A stream of one benchmark's own, destroyed with it.
struct bench_stream {
  cudaStream_t s{};
  bench_stream() { check(cudaStreamCreate(&s), "cudaStreamCreate"); }
  ~bench_stream() { (void)cudaStreamDestroy(s); }
  bench_stream(bench_stream const&) = delete;
  bench_stream& operator=(bench_stream const&) = delete;
};

//! Each iteration times `call` as 200 calls in one CUDA graph; returns the last time per call.
template <class F>
double graph_loop(benchmark::State& state, cudaStream_t s, F&& call) {
  double t = 0;
  for (auto _ : state) {
    t = graph_time_per_call(s, 200, call);
    state.SetIterationTime(t * 200);
  }
  return t;
}

//! graph_loop for a kernel that may not run here (a shape its launcher declines, a launch
//! attribute the capture refuses): the error marks this benchmark skipped with its message and
//! the result is empty; the other benchmarks still run.
template <class F>
std::optional<double> graph_loop_or_skip(benchmark::State& state, cudaStream_t s, F&& call) {
  try {
    return graph_loop(state, s, call);
  } catch (std::exception const& error) {
    state.SkipWithError(error.what());
    return std::nullopt;
  }
}

//! After one untimed call, each iteration times `call` as the median of 10; returns the last.
template <class F>
double median_loop(benchmark::State& state, cudaStream_t s, F&& call) {
  call();
  double t = 0;
  for (auto _ : state) {
    t = time_median(s, 10, call);
    state.SetIterationTime(t);
  }
  return t;
}

//! qmem against cuBLASLt bf16 on the same shape: 3 warm-ups of each, then per iteration the
//! median of 10 of each (qmem's is the iteration time); the counters qmem_ms, cublas_bf16_ms and
//! ratio. Returns qmem's time.
template <class Q, class C>
double versus_cublas(benchmark::State& state, cudaStream_t s, Q&& qmem_call, C&& cublas_call) {
  for (int i = 0; i < 3; ++i) {
    qmem_call();
    cublas_call();
  }
  double tq = 0, tc = 0, tq_incl = 0, tc_incl = 0;
  for (auto _ : state) {
    tq = time_median(s, 10, qmem_call);
    tc = time_median(s, 10, cublas_call);
    tq_incl = time_median(s, 10, qmem_call, true);
    tc_incl = time_median(s, 10, cublas_call, true);
    state.SetIterationTime(tq);
  }
  state.counters["qmem_ms"] = tq * 1e3;
  state.counters["cublas_bf16_ms"] = tc * 1e3;
  state.counters["qmem_host_incl_ms"] = tq_incl * 1e3;
  state.counters["cublas_host_incl_ms"] = tc_incl * 1e3;
  state.counters["ratio"] = tq / tc;
  return tq;
}

// Args: n, k, m, nested
void gemv(benchmark::State& state) {
  auto const n = static_cast<std::size_t>(state.range(0));
  auto const k = static_cast<std::size_t>(state.range(1));
  auto const m = static_cast<std::size_t>(state.range(2));
  bool const nested = state.range(3) != 0;
  nf4_weight w(n, k, 64, nested);
  device_buffer<bf16> x(m * k), y(m * n);
  fill_values<bf16><<<256, 256>>>(x.p, x.n, -1.0f, 1.0f, 3u);
  bench_stream const stream;
  cudaStream_t const s = stream.s;
  exec::cuda const e{s, 0};
  auto const wv = w.view();
  double const t = graph_loop(
      state, s, [&] { matmul_4bit<bf16>(e, tensor_view<bf16 const>(x.view()), m, wv, y.view()); });
  report(state, t, w.bytes() + 2.0 * static_cast<double>(m * k + m * n));
}

// The GEMV kernels' block shapes: {warps, unroll, tiles} (batch 1 to 16), then the batch-1
// kernel's {warps, unroll, pairs} (variants 8 and up, batch 1 only).
constexpr cuda_matmul::gemv_shape variants[] = {{8, 4, 1},       {8, 2, 1},      {8, 2, 2},
                                                {8, 4, 2, true}, {16, 2, 1},     {8, 4, 1, true},
                                                {8, 4, 2},       {8, 2, 2, true}};
// Variants 13-18: cuda_matmul::gemv_batch1_candidates (pipelined loads, direct table addresses,
// more warps per SM), to be compared with variant 9 (the dispatched {8, 1, 4}).
constexpr cuda_matmul::gemv1_shape variants1[] = {{8, 2, 2},
                                                  {8, 1, 4},
                                                  {8, 4, 1},
                                                  {16, 2, 2},
                                                  {8, 1, 2},
                                                  cuda_matmul::gemv_batch1_candidates[0],
                                                  cuda_matmul::gemv_batch1_candidates[1],
                                                  cuda_matmul::gemv_batch1_candidates[2],
                                                  cuda_matmul::gemv_batch1_candidates[3],
                                                  cuda_matmul::gemv_batch1_candidates[4],
                                                  cuda_matmul::gemv_batch1_candidates[5]};
// Variants 19 and up: the streaming batch-1 kernel's shapes (cuda_matmul::
// gemv_batch1_stream_candidates; the dispatched ones are cuda_matmul::gemv_batch1_stream and
// gemv_batch1_stream_nested, whose comments name their variant numbers), to compare with 9 and
// 13-18.
constexpr auto const& variants_stream = cuda_matmul::gemv_batch1_stream_candidates;
constexpr int stream_first = 8 + static_cast<int>(std::size(variants1));
// (the first 12 of them, variants 19-30; the later ones come after the small-batch shapes, so
// that the variant numbers in docs/benchmarks.md keep their meaning)
constexpr int stream_early = 12;
// Then the streaming small-batch kernel's shapes (cuda_matmul::gemv_batch16_stream_candidates,
// batches 2-16; the dispatched ones are cuda_matmul::gemv_batch16_stream and its siblings, whose
// comments name their candidate indices), to compare with 3 ({8, 4, 2, contiguous}, the
// gemv_4bit_kernel shape dispatched before it at batches 9-16).
constexpr auto const& variants_m = cuda_matmul::gemv_batch16_stream_candidates;
constexpr int stream_m_first = stream_first + stream_early;
// Then the batch-1 streaming shapes from the 13th on (variants 40 and up: matmul round 5). Only
// the first 9 small-batch shapes have variant numbers (31-39); gemv_batch16 times every one by its
// index in gemv_batch16_stream_candidates.
constexpr int stream_m_count = 9;
constexpr int stream_late_first = stream_m_first + stream_m_count;
constexpr int variant_count =
    stream_late_first + static_cast<int>(std::size(variants_stream)) - stream_early;

//! The batch-1 streaming shape of variant v (stream_first <= v < stream_m_first or
//! stream_late_first <= v < variant_count).
constexpr int stream_index(int v) {
  return v < stream_m_first ? v - stream_first : stream_early + v - stream_late_first;
}
constexpr bool is_stream_variant(int v) {
  return (v >= stream_first && v < stream_m_first) || v >= stream_late_first;
}
//! The batch-1 streaming shapes gemv_variant_dq times with nested scales: 19 ({16, 8}), 28
//! ({16, 4, pdl}, dispatched with them: cuda_matmul::gemv_batch1_stream_nested) and the round-5
//! ones (40 and up).
constexpr bool is_dq_variant(int v) {
  return v == stream_first || v == stream_first + 9 || v >= stream_late_first;
}

template <int V, bool Nested = false>
void launch_variant(exec::cuda const& e, cuda_matmul::gemv_args<bf16> const& a) {
  if constexpr (Nested) {
    // nested scales: the batch-1 streaming shapes only
    if constexpr (is_dq_variant(V)) {
      if (!cuda_matmul::launch_gemv1_stream<nf4, bf16, true, variants_stream[stream_index(V)]>(e,
                                                                                               a))
        throw qmem::bad_argument("gemv_variant_dq: the streaming kernel does not take this shape");
    } else {
      throw qmem::bad_argument("gemv_variant_dq: not a variant it times");
    }
  } else if constexpr (V < 8)
    cuda_matmul::launch_gemv_fast<nf4, bf16, false, variants[V]>(e, a);
  else if constexpr (V < stream_first)
    cuda_matmul::launch_gemv1_fast<nf4, bf16, false, variants1[V - 8]>(e, a);
  else if constexpr (is_stream_variant(V)) {
    if (!cuda_matmul::launch_gemv1_stream<nf4, bf16, false, variants_stream[stream_index(V)]>(e, a))
      throw qmem::bad_argument("gemv_variant: the streaming kernel does not take this shape");
  } else if (!cuda_matmul::launch_gemvm_stream<nf4, bf16, false, variants_m[V - stream_m_first]>(
                 e, a)) {
    throw qmem::bad_argument("gemv_variant: the small-batch kernel does not take this shape");
  }
}

//! launch_variant<V> for the run-time variant v (0 .. variant_count - 1).
template <bool Nested, int... V>
void launch_variant_at(int v, exec::cuda const& e, cuda_matmul::gemv_args<bf16> const& a,
                       std::integer_sequence<int, V...>) {
  ((v == V ? launch_variant<V, Nested>(e, a) : void()), ...);
}

// The set-up of the kernel-alone rows (gemv_bulk, gemv_batch16, gemv_variant): an NF4 weight of
// n x k (block 64, plain or nested scales), m rows of activations in [-1, 1], the output, the
// row's own stream and the kernels' argument block.
struct gemv_problem {
  std::size_t n, k, m;
  nf4_weight w;
  device_buffer<bf16> x, y;
  bench_stream stream;
  exec::cuda e;
  cuda_matmul::gemv_args<bf16> args;

  gemv_problem(std::size_t rows, std::size_t cols, std::size_t batch, bool nested)
      : n(rows), k(cols), m(batch), w(n, k, 64, nested), x(m * k),
        y(m * n), e{stream.s, 0}, args{x.p,
                                       w.codes.p,
                                       cuda_matmul::make_scale_args(w.view().scales),
                                       y.p,
                                       static_cast<unsigned>(m),
                                       n,
                                       k,
                                       6} {
    fill_values<bf16><<<256, 256>>>(x.p, x.n, -1.0f, 1.0f, 3u);
  }
  //! Bytes a call moves: the weight (codes and scales), x read and y written.
  double bytes() const { return w.bytes() + 2.0 * static_cast<double>(m * k + m * n); }
};

// Args: n, k, candidate index. The bulk-copy batch-1 kernel alone (plain scales), with each shape
// of cuda_matmul::gemv_batch1_bulk_candidates.
void gemv_bulk(benchmark::State& state) {
  int const v = static_cast<int>(state.range(2));
  gemv_problem const pr(static_cast<std::size_t>(state.range(0)),
                        static_cast<std::size_t>(state.range(1)), 1, false);
  auto const& e = pr.e;
  auto const& a = pr.args;
  constexpr auto const& shapes = cuda_matmul::gemv_batch1_bulk_candidates;
  auto call = [&] {
    bool launched = false;
    [&]<std::size_t... V>(std::index_sequence<V...>) {
      ((static_cast<std::size_t>(v) == V
            ? void(launched = cuda_matmul::launch_gemv1_bulk<nf4, bf16, shapes[V]>(e, a))
            : void()),
       ...);
    }
    (std::make_index_sequence<std::size(shapes)>{});
    if (!launched)
      throw qmem::bad_argument("gemv_bulk: the bulk-copy kernel does not take this shape");
  };
  auto const timed = graph_loop_or_skip(state, pr.stream.s, call);
  if (!timed)
    return;
  double const t = *timed;
  auto const& sh = shapes[v];
  state.counters["warps"] = sh.warps;
  state.counters["stage_kib"] = sh.stage_kib;
  state.counters["ring_kib"] = sh.ring_kib;
  state.counters["evict_first"] = sh.evict_first;
  report(state, t, pr.bytes());
}

// Args: n, k, m, candidate index. The streaming small-batch kernel alone (plain scales) with
// each shape of cuda_matmul::gemv_batch16_stream_candidates.
//! The weights gemv_ab and gemv_batch16_ab time: one problem per (n, k, batch, buffer), made on
//! first use and kept until the process ends, so that every row of one buffer reads the same
//! allocation.
gemv_problem const& kept_problem(std::size_t n, std::size_t k, std::int64_t buffer,
                                 std::size_t m = 1, bool nested = false) {
  static std::map<std::tuple<std::size_t, std::size_t, std::size_t, std::int64_t, bool>,
                  std::unique_ptr<gemv_problem>>
      kept;
  auto& p = kept[{n, k, m, buffer, nested}];
  if (!p)
    p = std::make_unique<gemv_problem>(n, k, m, nested);
  return *p;
}

// Kept: the weight is kept_problem's (buffer 0), one allocation for every row of the process;
// Nested: double-quantized scales
template <bool Kept, bool Nested = false>
void gemv_batch16(benchmark::State& state) {
  auto const m = static_cast<std::size_t>(state.range(2));
  int const v = static_cast<int>(state.range(3));
  std::optional<gemv_problem> own;
  if constexpr (!Kept)
    own.emplace(static_cast<std::size_t>(state.range(0)), static_cast<std::size_t>(state.range(1)),
                m, Nested);
  gemv_problem const& pr =
      Kept ? kept_problem(static_cast<std::size_t>(state.range(0)),
                          static_cast<std::size_t>(state.range(1)), 0, m, Nested)
           : *own;
  auto const& e = pr.e;
  auto const& a = pr.args;
  constexpr auto const& shapes = cuda_matmul::gemv_batch16_stream_candidates;
  auto call = [&] {
    bool launched = false;
    [&]<std::size_t... V>(std::index_sequence<V...>) {
      ((static_cast<std::size_t>(v) == V
            ? void(launched = cuda_matmul::launch_gemvm_stream<nf4, bf16, Nested, shapes[V]>(e, a))
            : void()),
       ...);
    }
    (std::make_index_sequence<std::size(shapes)>{});
    if (!launched)
      throw qmem::bad_argument("gemv_batch16: the small-batch kernel does not take this shape");
  };
  auto const timed = graph_loop_or_skip(state, pr.stream.s, call);
  if (!timed)
    return;
  auto const& sh = shapes[v];
  state.counters["warps"] = m <= 8 ? sh.warps : sh.warps16;
  state.counters["tiles"] = m <= 8 ? sh.tiles : sh.tiles16;
  state.counters["x_once"] = sh.x_once;
  report(state, *timed, pr.bytes());
}

// Args: n, k, m, variant index. The fast GEMV kernel alone, plain scales (Nested: double-quantized
// ones, batch-1 streaming shapes only), with each block shape.
template <bool Nested = false>
void gemv_variant(benchmark::State& state) {
  auto const m = static_cast<std::size_t>(state.range(2));
  int const v = static_cast<int>(state.range(3));
  gemv_problem const pr(static_cast<std::size_t>(state.range(0)),
                        static_cast<std::size_t>(state.range(1)), m, Nested);
  auto const& e = pr.e;
  auto const& a = pr.args;
  auto call = [&] {
    launch_variant_at<Nested>(v, e, a, std::make_integer_sequence<int, variant_count>{});
  };
  auto const timed = graph_loop_or_skip(state, pr.stream.s, call);
  if (!timed)
    return;
  double const t = *timed;
  if (v < 8) {
    state.counters["warps"] = variants[v].warps;
    state.counters["unroll"] = variants[v].unroll;
    state.counters["tiles"] = variants[v].tiles;
  } else if (v < stream_first) {
    auto const& s1 = variants1[v - 8];
    state.counters["warps"] = s1.warps;
    state.counters["unroll"] = s1.unroll;
    state.counters["tiles"] = s1.pairs;
    state.counters["pipelined"] = s1.pipelined;
    state.counters["direct_lut"] = s1.direct_lut;
    state.counters["blocks_per_sm"] = cuda_matmul::gemv1_min_blocks(s1);
  } else if (!is_stream_variant(v)) {
    auto const& st = variants_m[v - stream_m_first];
    state.counters["warps"] = m <= 8 ? st.warps : st.warps16;
    state.counters["tiles"] = m <= 8 ? st.tiles : st.tiles16;
    state.counters["stream"] = 1;
  } else {
    auto const& st = variants_stream[stream_index(v)];
    state.counters["warps"] = st.warps;
    state.counters["depth"] = st.depth;
    state.counters["stream"] = 1;
    state.counters["async"] = st.async;
    state.counters["grouped"] = st.grouped;
    state.counters["pdl"] = st.pdl;
  }
  report(state, t, pr.bytes());
}

// Args: n, k, variant (a batch-1 streaming variant of gemv_variant; Nested: of gemv_variant_dq),
// buffer, round.
template <bool Nested = false>
void gemv_ab(benchmark::State& state) {
  auto const& pr =
      kept_problem(static_cast<std::size_t>(state.range(0)),
                   static_cast<std::size_t>(state.range(1)), state.range(3), 1, Nested);
  int const v = static_cast<int>(state.range(2));
  if (Nested ? !is_dq_variant(v) : !is_stream_variant(v)) {
    state.SkipWithError("gemv_ab: not a batch-1 streaming variant");
    return;
  }
  auto call = [&] {
    launch_variant_at<Nested>(v, pr.e, pr.args, std::make_integer_sequence<int, variant_count>{});
  };
  auto const timed = graph_loop_or_skip(state, pr.stream.s, call);
  if (timed)
    report(state, *timed, pr.bytes());
}

//! Reads n16 16-byte words at p (4 independent loads in flight per thread, not kept in L1) and
//! stores nothing unless their XOR is a value random data never gives: only the reads cost.
__global__ void read_kernel(uint4 const* p, std::size_t n16, std::uint32_t* out, int pdl) {
  if (pdl != 0) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
  }
  std::size_t const stride = std::size_t{gridDim.x} * blockDim.x;
  std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x;
  std::uint32_t acc = 0;
  auto ld = [&](std::size_t at) {
    uint2 lo, hi;
    cuda_matmul::ldg_once(lo, p + at);
    cuda_matmul::ldg_once(hi, reinterpret_cast<uint2 const*>(p + at) + 1);
    return lo.x ^ lo.y ^ hi.x ^ hi.y;
  };
  for (; i + 3 * stride < n16; i += 4 * stride) {
    std::uint32_t const a = ld(i), b = ld(i + stride), c = ld(i + 2 * stride),
                        d = ld(i + 3 * stride);
    acc ^= a ^ b ^ c ^ d;
  }
  for (; i < n16; i += stride)
    acc ^= ld(i);
  if (acc == 0x9E3779B1u)
    out[0] = acc;
}

// Args: n, k, pdl. read_kernel over the bytes of an n x k NF4 weight with fp32 block-64 scales
// (n k / 2 + n k / 16), 8 blocks of 256 threads per SM, 200 calls in one graph as gemv.
void read_floor(benchmark::State& state) {
  auto const n = static_cast<std::size_t>(state.range(0));
  auto const k = static_cast<std::size_t>(state.range(1));
  int const pdl = static_cast<int>(state.range(2));
  std::size_t const bytes = n * k / 2 + n * k / 16;
  device_buffer<uint4> src((bytes + 15) / 16);
  device_buffer<std::uint32_t> out(1);
  fill_bytes<<<1024, 256>>>(reinterpret_cast<std::uint8_t*>(src.p), src.n * 16, 5u);
  check(cudaGetLastError(), "fill");
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "cudaDeviceGetAttribute");
  bench_stream const stream;
  exec::cuda const e{stream.s, 0};
  double const t = graph_loop(state, stream.s, [&] {
    cuda_detail::launch(e, pdl != 0, &read_kernel, dim3(8u * static_cast<unsigned>(sms)), dim3(256),
                        0, "read_kernel", static_cast<uint4 const*>(src.p), src.n, out.p, pdl);
  });
  report(state, t, static_cast<double>(bytes));
}

//! The loads of gemv1_stream_kernel at J = 2 on an n x k weight (k a multiple of 1024, plain
//! block-64 scales), nothing computed: one block of 16 warps per SM owning `tile_pairs` row pairs,
//! warp (c, rg) of C = k / 1024 column groups and G = 16 / C row groups reading, for every G-th
//! pair from rg on, both rows' codes in its 1024 columns (4 x 8 bytes per lane) and their scales
//! (4 per lane); P pairs are issued, then XOR-ed (P pairs in flight per warp, then none).
template <int P>
__global__ void __launch_bounds__(512, 1)
    pattern_kernel(std::uint8_t const* codes, float const* scales, unsigned n, unsigned k,
                   unsigned tile_pairs, std::uint32_t* out) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  unsigned const warp = threadIdx.x >> 5;
  unsigned const lane = threadIdx.x & 31u;
  unsigned const C = k / 1024;
  unsigned const G = (blockDim.x >> 5) / C;
  unsigned const c = warp % C;
  unsigned const rg = warp / C;
  unsigned const pairs = (n + 1) / 2;
  unsigned const p0 = blockIdx.x * tile_pairs;
  unsigned const tp = p0 < pairs ? min(tile_pairs, pairs - p0) : 0u;
  unsigned const count = rg < G && rg < tp ? (tp - rg + G - 1) / G : 0u;
  std::uint8_t const* const cb = codes + c * 512u + 32u * (lane >> 2) + 8u * (lane & 3u);
  float const* const sb = scales + c * 16u + (lane >> 2);
  std::uint32_t acc = 0;
  for (unsigned i = 0; i < count; i += P) {
    uint2 q[P][2][2];
    float sc[P][2][2];
    QMEM_UNROLL
    for (int p = 0; p < P; ++p) {
      unsigned const pi = min(i + static_cast<unsigned>(p), count - 1);
      unsigned const row0 = 2 * (p0 + rg + G * pi);
      QMEM_UNROLL
      for (int h = 0; h < 2; ++h) {
        std::size_t const row = min(row0 + static_cast<unsigned>(h), n - 1);
        QMEM_UNROLL
        for (int j = 0; j < 2; ++j) {
          cuda_matmul::ldg_once(q[p][h][j], cb + row * (k / 2) + 256 * j);
          cuda_matmul::ldg(sc[p][h][j], sb + row * (k / 64) + 8 * j);
        }
      }
    }
    QMEM_UNROLL
    for (int p = 0; p < P; ++p)
      QMEM_UNROLL
    for (int h = 0; h < 2; ++h)
      QMEM_UNROLL
    for (int j = 0; j < 2; ++j)
      acc ^= q[p][h][j].x ^ q[p][h][j].y ^ __float_as_uint(sc[p][h][j]);
  }
  if (acc == 0x9E3779B1u)
    out[0] = acc;
}

// Args: n, k, P (1, 2, 4 or 8). pattern_kernel<P> on an NF4 weight with plain scales, launched
// with programmatic dependent launch, one block per SM (as the dispatched kernel), the same
// graph timing as gemv.
void pattern_floor(benchmark::State& state) {
  auto const n = static_cast<std::size_t>(state.range(0));
  auto const k = static_cast<std::size_t>(state.range(1));
  auto const pp = state.range(2);
  nf4_weight const w(n, k, 64, false);
  device_buffer<std::uint32_t> out(1);
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "cudaDeviceGetAttribute");
  auto const pairs = static_cast<unsigned>((n + 1) / 2);
  unsigned const tile = (pairs + static_cast<unsigned>(sms) - 1) / static_cast<unsigned>(sms);
  unsigned const grid = (pairs + tile - 1) / tile;
  auto const kernel = pp == 8   ? &pattern_kernel<8>
                      : pp == 4 ? &pattern_kernel<4>
                      : pp == 2 ? &pattern_kernel<2>
                                : &pattern_kernel<1>;
  bench_stream const stream;
  exec::cuda const e{stream.s, 0};
  double const t = graph_loop(state, stream.s, [&] {
    cuda_detail::launch(e, true, kernel, dim3(grid), dim3(512), 0, "pattern_kernel",
                        static_cast<std::uint8_t const*>(w.codes.p),
                        static_cast<float const*>(w.absmax.p), static_cast<unsigned>(n),
                        static_cast<unsigned>(k), tile, out.p);
  });
  report(state, t, w.bytes());
}

//! The fixed part of a streaming GEMV call: one block per SM that (with `Table`) fills a 64 KiB
//! shared table, (with pdl) lets the next kernel launch and waits for the previous one, then
//! loads one word per thread and stores one per block. No weight is read.
//! Table 1: one 4-byte store per word of 64 KiB; 2: the GEMV kernels' own table build
//! (cuda_matmul::fill_gemv_tables, NF4 in bf16).
template <int Table>
__global__ void floor_kernel(std::uint32_t const* x, std::uint32_t* y, int pdl,
                             code_table<16> values, code_table<256> nested) {
  extern __shared__ std::uint32_t floor_smem[];
  if (pdl != 0)
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  if constexpr (Table == 1) {
    for (unsigned i = threadIdx.x; i < 16384u; i += blockDim.x)
      floor_smem[i] = i * 0x9E3779B1u;
    __syncthreads();
  } else if constexpr (Table == 2) {
    cuda_matmul::fill_gemv_tables<bf16, false>(floor_smem, nullptr, values, nested);
  }
  if (pdl != 0)
    asm volatile("griddepcontrol.wait;" ::: "memory");
  std::uint32_t acc = x[blockIdx.x * blockDim.x + threadIdx.x];
  if constexpr (Table != 0)
    acc += floor_smem[(acc & 511u) * 32u + (threadIdx.x & 31u)];
  acc = __reduce_add_sync(0xFFFFFFFFu, acc);
  if (threadIdx.x == 0)
    y[blockIdx.x] = acc;
}

// Args: threads, dynamic shared KiB, pdl, table (0: none, 1 or 2: floor_kernel's Table).
// floor_kernel with one block per SM, the same graph timing as gemv: what a call costs before it
// streams any weight.
void gemv_floor(benchmark::State& state) {
  auto const threads = static_cast<unsigned>(state.range(0));
  auto const smem = static_cast<unsigned>(state.range(1)) * 1024u;
  int const pdl = static_cast<int>(state.range(2));
  auto const table = state.range(3);
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "cudaDeviceGetAttribute");
  device_buffer<std::uint32_t> x(std::size_t{threads} * static_cast<unsigned>(sms)),
      y(static_cast<unsigned>(sms));
  check(cudaMemset(x.p, 0, x.n * 4), "cudaMemset");
  auto const kernel = table == 2   ? &floor_kernel<2>
                      : table == 1 ? &floor_kernel<1>
                                   : &floor_kernel<0>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(cuda_matmul::gemv1_stream_smem_limit)),
        "cudaFuncSetAttribute");
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             static_cast<int>(cudaSharedmemCarveoutMaxShared)),
        "cudaFuncSetAttribute");
  bench_stream const stream;
  exec::cuda const e{stream.s, 0};
  double const t = graph_loop(state, stream.s, [&] {
    cuda_detail::launch(e, pdl != 0, kernel, dim3(static_cast<unsigned>(sms)), dim3(threads), smem,
                        "floor_kernel", x.p, y.p, pdl, cuda_matmul::values_of<nf4>(),
                        cuda_matmul::nested_values());
  });
  state.counters["us"] = t * 1e6;
}

// Args: n, k, m. cuBLASLt bf16 x bf16 -> bf16, fp32 accumulation, the same graph timing.
void cublas_gemv(benchmark::State& state) {
  auto const n = static_cast<std::size_t>(state.range(0));
  auto const k = static_cast<std::size_t>(state.range(1));
  auto const m = static_cast<std::size_t>(state.range(2));
  device_buffer<bf16> w(n * k), x(m * k), y(m * n);
  device_buffer<std::byte> ws(cublaslt_workspace_bytes);
  fill_values<bf16><<<1024, 256>>>(w.p, w.n, -0.05f, 0.05f, 5u);
  fill_values<bf16><<<256, 256>>>(x.p, x.n, -1.0f, 1.0f, 3u);
  bench_stream const stream;
  cudaStream_t const s = stream.s;
  exec::cuda const e{s, 0};
  auto call = [&] {
    cuda_matmul::lt_matmul_or_throw(e, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, CUDA_R_16BF, w.p, x.p,
                                    CUDA_R_16BF, y.p, ws.p, ws.n);
  };
  double const t = graph_loop(state, s, call);
  report(state, t, 2.0 * static_cast<double>(n * k + m * k + m * n));
}

// The large-batch rows' set-up (state.range 0-2: n, k, m): the NF4 weight (block 64), its
// activations x and output y, a bf16 weight of the same shape for cuBLASLt, a workspace (cuBLASLt's
// bytes, or matmul_4bit's when `for_matmul_4bit`), a stream, and the cuBLASLt bf16 call each row
// times qmem against.
struct gemm_problem {
  std::size_t n, k, m;
  nf4_weight w;
  device_buffer<bf16> x, y, wb;
  device_buffer<std::byte> ws;
  bench_stream stream;
  exec::cuda e;

  gemm_problem(benchmark::State const& state, bool nested, bool for_matmul_4bit = false)
      : n(static_cast<std::size_t>(state.range(0))), k(static_cast<std::size_t>(state.range(1))),
        m(static_cast<std::size_t>(state.range(2))), w(n, k, 64, nested), x(m * k), y(m * n),
        wb(n * k),
        ws(std::max(cublaslt_workspace_bytes,
                    for_matmul_4bit ? matmul_4bit_workspace_bytes<bf16>(m, w.view()) : 0)),
        e{stream.s, 0} {
    fill_values<bf16><<<256, 256>>>(x.p, x.n, -1.0f, 1.0f, 3u);
    fill_values<bf16><<<1024, 256>>>(wb.p, wb.n, -0.05f, 0.05f, 5u);
  }
  void cublas() const {
    cuda_matmul::lt_matmul_or_throw(e, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, CUDA_R_16BF, wb.p, x.p,
                                    CUDA_R_16BF, y.p, ws.p, cublaslt_workspace_bytes);
  }
  //! The dequantize + cuBLASLt path in `chunks` row chunks (1: what matmul_4bit runs), the weight
  //! dequantized into `wd` (n * k elements).
  void dequantize_gemm(bf16* wd, unsigned chunks) const {
    cuda_matmul::dequantize_gemm<bf16>(e, x.p, m, w.view(), y.p, wd, ws.p, cublaslt_workspace_bytes,
                                       chunks);
  }
  double tflops(double seconds) const {
    return 2.0 * static_cast<double>(m * n * k) / seconds * 1e-12;
  }
};

// Args: n, k, m. Large batch: qmem (dequantize + cuBLASLt) and cuBLASLt bf16 in the same run.
void gemm(benchmark::State& state) {
  gemm_problem pr(state, false, true);
  auto const wv = pr.w.view();
  auto qmem_call = [&] {
    matmul_4bit<bf16>(pr.e, tensor_view<bf16 const>(pr.x.view()), pr.m, wv, pr.y.view(),
                      pr.ws.view());
  };
  double const tq = versus_cublas(state, pr.stream.s, qmem_call, [&] { pr.cublas(); });
  state.counters["TFLOP/s"] = pr.tflops(tq);
}

// Args: n, k, m, chunks. The m > 16 forward with its dequantization split into row chunks that
// overlap the previous chunk's GEMM (cuda_matmul::dequantize_gemm; chunks 1 = the path
// matmul_4bit runs with gemm_overlap_chunks = 1), against cuBLASLt bf16 in the same run.
void gemm_overlap(benchmark::State& state) {
  gemm_problem pr(state, false);
  auto const chunks = static_cast<unsigned>(state.range(3));
  device_buffer<bf16> wd(pr.n * pr.k);
  (void)versus_cublas(
      state, pr.stream.s, [&] { pr.dequantize_gemm(wd.p, chunks); }, [&] { pr.cublas(); });
}

// Args: n, k, m, chunk MiB. The m > 16 forward in row chunks dequantized into one reused buffer
// of at most `chunk MiB` (cuda_matmul::dequantize_gemm_l2: the chunk stays in L2 between its
// dequantization and its GEMM), against the one-shot path (dequantize_gemm, 1 chunk) and cuBLASLt
// bf16 in the same run: counters ratio (chunked / cuBLAS), oneshot_ratio, chunks, l2_MiB.
void gemm_l2(benchmark::State& state) {
  gemm_problem pr(state, false);
  auto const mib = static_cast<std::size_t>(state.range(3));
  auto const wv = pr.w.view();
  std::size_t const rows =
      cuda_matmul::l2_chunk_rows(pr.n, pr.k, wv.block_size, 0, mib << 20, sizeof(bf16));
  device_buffer<bf16> wd(pr.n * pr.k), chunk(rows * pr.k);
  auto chunked = [&] {
    cuda_matmul::dequantize_gemm_l2<bf16>(pr.e, pr.x.p, pr.m, wv, pr.y.p, chunk.p, rows, pr.ws.p,
                                          cublaslt_workspace_bytes);
  };
  auto oneshot = [&] { pr.dequantize_gemm(wd.p, 1); };
  cudaStream_t const s = pr.stream.s;
  (void)versus_cublas(state, s, chunked, [&] { pr.cublas(); });
  oneshot();
  double const to = time_median(s, 10, oneshot); // after versus_cublas's warm-up calls
  int l2 = 0;
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0), "cudaDeviceGetAttribute");
  state.counters["oneshot_ratio"] = to * 1e3 / state.counters["cublas_bf16_ms"];
  state.counters["oneshot_ms"] = to * 1e3;
  state.counters["chunks"] = static_cast<double>((pr.n + rows - 1) / rows);
  state.counters["chunk_MiB"] = static_cast<double>(rows * pr.k * sizeof(bf16)) / (1 << 20);
  state.counters["l2_MiB"] = l2 / 1048576.0;
}

// Args: n, k, m, nested. The fused sm_90a GEMM (cuda_matmul::fused_gemm in its default variant,
// cuda_matmul::gemm_sm90_variant: the weight dequantized in the main loop, detail/gemm_sm90.cuh)
// against cuBLASLt bf16 in the same run, with the dispatched dequantize + cuBLASLt path timed
// alongside (oneshot_ratio). Skipped with a message when the binary has no sm_90a code or the
// device is not compute capability 9.0.
void gemm_fused(benchmark::State& state) {
  gemm_problem pr(state, state.range(3) != 0);
  auto const wv = pr.w.view();
  device_buffer<bf16> wd(pr.n * pr.k);
  auto fused = [&] { return cuda_matmul::fused_gemm<bf16>(pr.e, pr.x.p, pr.m, wv, pr.y.p); };
  if (!fused()) {
    state.SkipWithError("the fused sm_90a GEMM does not run here (build or device)");
    return;
  }
  auto oneshot = [&] { pr.dequantize_gemm(wd.p, 1); };
  cudaStream_t const s = pr.stream.s;
  double const tq = versus_cublas(
      state, s, [&] { (void)fused(); }, [&] { pr.cublas(); });
  oneshot();
  double const to = time_median(s, 10, oneshot);
  state.counters["oneshot_ratio"] = to * 1e3 / state.counters["cublas_bf16_ms"];
  state.counters["TFLOP/s"] = pr.tflops(tq);
}

// Args: n, k, m. The fused sm_90a GEMM's variants (sm90::gemm_4bit_kernel: 1 without the code
// loads and the decode, 2 without the MMAs, both to place the time; 3 the weight decoded into
// wgmma's register A operand; sm90::gemm_4bit_staged_kernel, register A with the codes and
// scales staged in shared memory by the producer warpgroup, persistent: 10 with the TMA-store
// epilogue, 7 with the plain one and without the decode, to place the time), plain scales,
// against cuBLASLt bf16 in the same run. Variants 3 and 10 also count the outputs that differ
// from variant 0's bits (`differ`: same products in the same wgmma order, so 0 is expected; the
// tests check each against the host reference).
template <int Variant>
void gemm_fused_variant(benchmark::State& state) {
  gemm_problem pr(state, false);
  auto const wv = pr.w.view();
  std::size_t const m = pr.m, n = pr.n;
  cudaStream_t const s = pr.stream.s;
  auto fused = [&] {
    return cuda_matmul::fused_gemm<bf16, nf4, Variant>(pr.e, pr.x.p, m, wv, pr.y.p);
  };
  if (!fused()) {
    state.SkipWithError("the fused sm_90a GEMM does not run here (build or device)");
    return;
  }
  if constexpr (Variant == 3 || Variant == 10) {
    device_buffer<bf16> y0(m * n);
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    (void)cuda_matmul::fused_gemm<bf16, nf4, 0>(pr.e, pr.x.p, m, wv, y0.p);
    std::vector<std::uint16_t> a(m * n), b(m * n);
    check(cudaMemcpyAsync(a.data(), pr.y.p, m * n * 2, cudaMemcpyDeviceToHost, s),
          "cudaMemcpyAsync");
    check(cudaMemcpyAsync(b.data(), y0.p, m * n * 2, cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync");
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    std::size_t differ = 0;
    for (std::size_t i = 0; i < a.size(); ++i)
      differ += a[i] != b[i] ? 1 : 0;
    state.counters["differ"] = static_cast<double>(differ);
  }
  double const tq = versus_cublas(
      state, s, [&] { (void)fused(); }, [&] { pr.cublas(); });
  state.counters["TFLOP/s"] = pr.tflops(tq);
}

// Args: n, k, m. QLoRA backward: grad_x = grad_y * dequant(w).
void grad_input(benchmark::State& state) {
  auto const n = static_cast<std::size_t>(state.range(0));
  auto const k = static_cast<std::size_t>(state.range(1));
  auto const m = static_cast<std::size_t>(state.range(2));
  nf4_weight w(n, k, 64, false);
  device_buffer<bf16> gy(m * n), gx(m * k);
  fill_values<bf16><<<256, 256>>>(gy.p, gy.n, -1.0f, 1.0f, 3u);
  auto const wv = w.view();
  device_buffer<std::byte> ws(matmul_4bit_grad_input_workspace_bytes<bf16>(m, wv));
  bench_stream const stream;
  cudaStream_t const s = stream.s;
  exec::cuda const e{s, 0};
  auto call = [&] {
    matmul_4bit_grad_input<bf16>(e, tensor_view<bf16 const>(gy.view()), m, wv, gx.view(),
                                 ws.view());
  };
  double const t = median_loop(state, s, call);
  report(state, t, w.bytes() + 2.0 * static_cast<double>(m * k + m * n));
}

// Args: n, k, m, path (0: the GEMV-style kernel over row slices, 1: dequantize + cuBLASLt). Both
// grad-input paths at the same batch, to choose grad_input_gemv_max_rows.
void grad_path(benchmark::State& state) {
  auto const n = static_cast<std::size_t>(state.range(0));
  auto const k = static_cast<std::size_t>(state.range(1));
  auto const m = static_cast<std::size_t>(state.range(2));
  bool const dequant = state.range(3) != 0;
  nf4_weight w(n, k, 64, false);
  device_buffer<bf16> gy(m * n), gx(m * k);
  fill_values<bf16><<<256, 256>>>(gy.p, gy.n, -1.0f, 1.0f, 3u);
  auto const wv = w.view();
  std::size_t const slices = quant::detail::mm::grad_input_slices(n, k);
  device_buffer<std::byte> ws(dequant ? quant::detail::mm::align256(n * k * 2) +
                                            cublaslt_workspace_bytes
                                      : slices * m * k * 4);
  bench_stream const stream;
  cudaStream_t const s = stream.s;
  exec::cuda const e{s, 0};
  auto call = [&] {
    if (dequant) {
      auto* wd = reinterpret_cast<bf16*>(ws.p);
      cuda_matmul::dequantize_into(e, wv, wd);
      std::size_t const off = quant::detail::mm::align256(n * k * 2);
      cuda_matmul::lt_matmul_or_throw(e, CUBLAS_OP_N, CUBLAS_OP_N, k, m, n, CUDA_R_16BF, wd, gy.p,
                                      CUDA_R_16BF, gx.p, ws.p + off, cublaslt_workspace_bytes);
    } else {
      cuda_matmul::grad_args<bf16> a{gy.p,
                                     w.codes.p,
                                     cuda_matmul::make_scale_args(wv.scales),
                                     reinterpret_cast<float*>(ws.p),
                                     static_cast<unsigned>(m),
                                     n,
                                     k,
                                     (n + slices - 1) / slices,
                                     6};
      cuda_matmul::launch_grad<nf4, bf16, false>(e, a, slices, gx.p);
    }
  };
  double const t = median_loop(state, s, call);
  state.counters["us"] = t * 1e6;
  state.counters["dequant_cublas"] = dequant ? 1 : 0;
}

// Args: n, k, m, threshold x 10. LLM.int8 linear layer, bf16 in and out.
void int8_linear(benchmark::State& state) {
  auto const n = static_cast<std::size_t>(state.range(0));
  auto const k = static_cast<std::size_t>(state.range(1));
  auto const m = static_cast<std::size_t>(state.range(2));
  float const threshold = static_cast<float>(state.range(3)) / 10.0f;
  device_buffer<bf16> x(m * k), y(m * n);
  device_buffer<std::uint8_t> b(n * k);
  device_buffer<float> cs(n);
  fill_values<bf16><<<1024, 256>>>(x.p, x.n, -1.0f, 1.0f, 3u);
  plant_outliers<<<64, 256>>>(x.p, m, k); // 1 column in 128 above the threshold (LLM.int8-like)
  fill_bytes<<<1024, 256>>>(b.p, b.n, 41u);
  fill_values<float><<<64, 256>>>(cs.p, cs.n, 0.01f, 0.1f, 43u);
  device_buffer<std::byte> ws(linear_int8_workspace_bytes(m, n, k));
  bench_stream const stream;
  cudaStream_t const s = stream.s;
  exec::cuda const e{s, 0};
  tensor_view<std::int8_t const> const bv(reinterpret_cast<std::int8_t const*>(b.p), b.n,
                                          memory_space::device);
  auto call = [&] {
    linear_int8<bf16>(e, tensor_view<bf16 const>(x.view()), bv, tensor_view<float const>(cs.view()),
                      m, n, k, threshold, y.view(), ws.view());
  };
  double const t = median_loop(state, s, call);
  state.counters["ms"] = t * 1e3;
  state.counters["TOP/s"] = 2.0 * static_cast<double>(m * n * k) / t * 1e-12;
}

void copy(benchmark::State& state) {
  for (auto _ : state)
    state.SetIterationTime(1.0);
  state.counters["copy_GB/s"] = copy_bandwidth() * 1e-9;
}

// The anchors' five shapes (out x in).
constexpr std::int64_t shapes[5][2] = {
    {4096, 4096}, {14336, 4096}, {4096, 14336}, {8192, 8192}, {28672, 8192}};

void gemv_args(benchmark::internal::Benchmark* b) {
  for (auto const& s : shapes)
    for (std::int64_t m : {1, 2, 4, 8, 16})
      for (std::int64_t nested : {0, 1})
        if (m != 2 || nested == 0)
          b->Args({s[0], s[1], m, nested});
}
void variant_args(benchmark::internal::Benchmark* b) {
  for (auto const& s : shapes) {
    for (std::int64_t v = 0; v < stream_m_first; ++v)
      b->Args({s[0], s[1], 1, v});
    for (std::int64_t v = stream_late_first; v < variant_count; ++v)
      b->Args({s[0], s[1], 1, v});
    for (std::int64_t v : {2, 3, 6, 7})
      b->Args({s[0], s[1], 16, v});
    for (std::int64_t m : {4, 16})
      for (std::int64_t v = stream_m_first; v < stream_late_first; ++v)
        b->Args({s[0], s[1], m, v});
  }
}
void variant_dq_args(benchmark::internal::Benchmark* b) {
  for (auto const& s : shapes)
    for (std::int64_t v = stream_first; v < variant_count; ++v)
      if (is_dq_variant(static_cast<int>(v)))
        b->Args({s[0], s[1], 1, v});
}
void bulk_args(benchmark::internal::Benchmark* b) {
  for (auto const& s : shapes)
    for (std::int64_t v = 0; v < std::ssize(cuda_matmul::gemv_batch1_bulk_candidates); ++v)
      b->Args({s[0], s[1], v});
}
void batch16_args(benchmark::internal::Benchmark* b) {
  for (auto const& s : shapes)
    for (std::int64_t m : {4, 16})
      for (std::int64_t v = 0; v < std::ssize(cuda_matmul::gemv_batch16_stream_candidates); ++v)
        b->Args({s[0], s[1], m, v});
}
// gemv_batch16_ab: see the list at the top; the order rotated each round (the first row timed on a
// fresh kept weight runs slow: gemv16 round). Gemv18 timed 15 and 16 on 8192 x 8192 and 28672 x
// 8192 here, and 16 with unpredicated full-step loads (then v 17, since removed); gemv round 3
// 12, 14 and 15, gemv16 15 and its folded tails (then numbered 16, since removed), also on
// 14336 x 4096.
// gemv_batch16_dq: nested scales at batches 4 and 16 on the shapes that take them: the unpaired
// ones (5: {16, 2} gs, 6: dispatched with nested scales), the pair shape (8) and the steps-outer
// ones (11, 12, 14, 15: lean ignored with nested scales).
void batch16_dq_args(benchmark::internal::Benchmark* b) {
  for (auto const& s : shapes)
    for (std::int64_t m : {4, 16})
      for (std::int64_t v : {5, 6, 8, 11, 12, 14, 15})
        if (m == 16 || v < 11)
          b->Args({s[0], s[1], m, v});
}
void batch16_ab_args(benchmark::internal::Benchmark* b) {
  struct row {
    std::int64_t n, k;
    std::vector<std::int64_t> variants;
  };
  std::vector<row> const rows = {{14336, 4096, {14, 17}}, {8192, 8192, {8, 16, 17}}};
  for (std::int64_t round = 0; round < 3; ++round)
    for (auto const& r : rows) {
      auto const count = static_cast<std::int64_t>(r.variants.size());
      for (std::int64_t i = 0; i < count; ++i)
        b->Args({r.n, r.k, 16, r.variants[static_cast<std::size_t>((i + round) % count)], round});
    }
}
// gemv_ab: the former dispatched shape (45), 45 with block64 (54), lean J >= 4 with block64
// (55) and 54 with spread scales (56) on the five shapes, in three rounds, the order of the
// variants rotated by one each round (the first row timed on a fresh kept weight runs slow:
// gemv16 round). gemv17's first run timed the block-level L2 prefetch (51-53) here; gemv round
// 2 the former candidates 48-50, since removed (the placement and slope rows of that round are
// in docs/benchmarks.md); the third session of 2026-12-01 also 57 (55 with spread scales).
void ab_args(benchmark::internal::Benchmark* b) {
  constexpr std::int64_t ab_variants[] = {45, 54, 55, 56};
  constexpr auto count = static_cast<std::int64_t>(std::size(ab_variants));
  for (std::int64_t round = 0; round < 3; ++round)
    for (auto const& s : shapes)
      for (std::int64_t i = 0; i < count; ++i)
        b->Args({s[0], s[1], ab_variants[(i + round) % count], 0, round});
}
// gemv_ab_dq: nested scales, the shape dispatched with them before (28), lean J >= 2 (45: the
// former addresses with nested scales), block64 at J >= 2 (54: the scales spread over a row
// group's lanes) and J >= 4 (55), rotated the same way, on the anchors' shapes and two whose
// rows end in a partial super-step (Llama-2-7B's and -13B's down projections).
void ab_dq_args(benchmark::internal::Benchmark* b) {
  constexpr std::int64_t ab_variants[] = {28, 45, 54, 55};
  constexpr auto count = static_cast<std::int64_t>(std::size(ab_variants));
  std::vector<std::array<std::int64_t, 2>> rows;
  for (auto const& s : shapes)
    rows.push_back({s[0], s[1]});
  rows.push_back({4096, 11008});
  rows.push_back({5120, 13824});
  for (std::int64_t round = 0; round < 3; ++round)
    for (auto const& s : rows)
      for (std::int64_t i = 0; i < count; ++i)
        b->Args({s[0], s[1], ab_variants[(i + round) % count], 0, round});
}
void read_args(benchmark::internal::Benchmark* b) {
  for (auto const& s : shapes)
    for (std::int64_t pdl : {0, 1})
      b->Args({s[0], s[1], pdl});
  for (std::int64_t n : {14336, 43008})
    b->Args({n, 8192, 1});
}
void cublas_args(benchmark::internal::Benchmark* b) {
  for (auto const& s : shapes)
    for (std::int64_t m : {1, 16})
      b->Args({s[0], s[1], m});
}

} // namespace

//! Manual (CUDA event) timing, `I` iterations, results in microseconds or milliseconds (`Ms`).
template <int I, bool Ms = false>
void timed(benchmark::internal::Benchmark* b) {
  b->UseManualTime()->Iterations(I)->Unit(Ms ? benchmark::kMillisecond : benchmark::kMicrosecond);
}

BENCHMARK(copy)->Apply(timed<1>);
BENCHMARK(gemv)->Apply(gemv_args)->Apply(timed<3>);
BENCHMARK(gemv_variant<false>)->Name("gemv_variant")->Apply(variant_args)->Apply(timed<2>);
BENCHMARK(gemv_variant<true>)->Name("gemv_variant_dq")->Apply(variant_dq_args)->Apply(timed<2>);
BENCHMARK(gemv_bulk)->Apply(bulk_args)->Apply(timed<2>);
BENCHMARK(gemv_batch16<false>)->Name("gemv_batch16")->Apply(batch16_args)->Apply(timed<2>);
BENCHMARK(gemv_batch16<false, true>)
    ->Name("gemv_batch16_dq")
    ->Apply(batch16_dq_args)
    ->Apply(timed<2>);
BENCHMARK(gemv_batch16<true>)->Name("gemv_batch16_ab")->Apply(batch16_ab_args)->Apply(timed<2>);
BENCHMARK(gemv_ab<false>)->Name("gemv_ab")->Apply(ab_args)->Apply(timed<2>);
BENCHMARK(gemv_ab<true>)->Name("gemv_ab_dq")->Apply(ab_dq_args)->Apply(timed<2>);
BENCHMARK(read_floor)->Apply(read_args)->Apply(timed<2>);
BENCHMARK(pattern_floor)
    ->ArgsProduct({{28672}, {8192}, {1, 2, 4, 8}})
    ->ArgsProduct({{4096}, {14336}, {2, 8}})
    ->ArgsProduct({{8192}, {8192}, {2, 8}})
    ->Apply(timed<2>);
BENCHMARK(gemv_floor)
    ->Args({512, 0, 0, 0})
    ->Args({512, 0, 1, 0})
    ->Args({512, 127, 0, 1})
    ->Args({512, 127, 1, 0})
    ->Args({512, 127, 1, 1})
    ->Args({512, 127, 1, 2})
    ->Args({512, 127, 0, 2})
    ->Args({256, 110, 1, 0})
    ->Args({256, 110, 1, 1})
    ->Apply(timed<2>);
BENCHMARK(cublas_gemv)->Apply(cublas_args)->Apply(timed<3>);
BENCHMARK(gemm)
    ->Args({4096, 4096, 4096})
    ->Args({14336, 4096, 4096})
    ->Args({8192, 8192, 4096})
    ->Apply(timed<2, true>);
BENCHMARK(gemm_overlap)
    ->ArgsProduct({{4096}, {4096}, {4096}, {1, 2, 4, 8}})
    ->ArgsProduct({{14336}, {4096}, {4096}, {1, 2, 4, 8}})
    ->ArgsProduct({{8192}, {8192}, {4096}, {1, 2, 4, 8}})
    ->Apply(timed<2, true>);
BENCHMARK(gemm_l2)
    ->ArgsProduct({{4096}, {4096}, {4096}, {4, 8, 12, 16, 24}})
    ->ArgsProduct({{14336}, {4096}, {4096}, {4, 8, 12, 16, 24, 32}})
    ->ArgsProduct({{8192}, {8192}, {4096}, {4, 8, 12, 16, 24, 32}})
    ->Apply(timed<2, true>);
BENCHMARK(gemm_fused)
    ->Args({4096, 4096, 4096, 0})
    ->Args({14336, 4096, 4096, 0})
    ->Args({8192, 8192, 4096, 0})
    ->Args({8192, 8192, 4096, 1})
    ->Apply(timed<2, true>);
BENCHMARK(gemm_fused_variant<1>)
    ->Name("gemm_fused_variant/1")
    ->Args({8192, 8192, 4096})
    ->Apply(timed<2, true>);
BENCHMARK(gemm_fused_variant<2>)
    ->Name("gemm_fused_variant/2")
    ->Args({8192, 8192, 4096})
    ->Apply(timed<2, true>);
BENCHMARK(gemm_fused_variant<3>)
    ->Name("gemm_fused_variant/3")
    ->Args({4096, 4096, 4096})
    ->Args({14336, 4096, 4096})
    ->Args({8192, 8192, 4096})
    ->Apply(timed<2, true>);
BENCHMARK(gemm_fused_variant<7>)
    ->Name("gemm_fused_variant/7")
    ->Args({4096, 4096, 4096})
    ->Args({14336, 4096, 4096})
    ->Args({8192, 8192, 4096})
    ->Apply(timed<2, true>);
BENCHMARK(gemm_fused_variant<10>)
    ->Name("gemm_fused_variant/10")
    ->Args({4096, 4096, 4096})
    ->Args({14336, 4096, 4096})
    ->Args({8192, 8192, 4096})
    ->Apply(timed<2, true>);
BENCHMARK(grad_input)->ArgsProduct({{8192}, {8192}, {1, 2, 16, 4096}})->Apply(timed<2>);
BENCHMARK(grad_path)->ArgsProduct({{8192}, {8192}, {2, 4, 8, 16}, {0, 1}})->Apply(timed<1>);
BENCHMARK(int8_linear)
    ->Args({8192, 8192, 4096, 0})
    ->Args({8192, 8192, 4096, 60})
    ->Args({8192, 8192, 16, 60})
    ->Apply(timed<2>);

BENCHMARK_MAIN();
