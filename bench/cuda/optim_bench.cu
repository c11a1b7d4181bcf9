// GPU optimizer step benchmarks: the fused multi-tensor step of qmem::optim::cuda for every rule
// x state policy it runs, at 2^28 parameters (issue 4's workloads), beside a device-to-device copy
// measured in the same run (the roofline). Each iteration is one whole step (resolve, prepare,
// fused update; the norm pass only where a policy needs it), timed with CUDA events with all of
// the step's launches enqueued behind a blocking kernel, so that the host's time (the step's
// argument checks and launches, a descheduled thread) is not counted (gpu_timer.cuh); each
// iteration also times one step the former way (events around the call on an idle stream) in
// turn with it: counter host_incl_ms (median), kept for one release to compare with.
// Counters: bytes moved per step (what an ideal kernel reads and writes), GB/s and % of the
// same-run copy bandwidth; ms per step is the benchmark's manual time.
//
//   optim_bench_cuda --benchmark_counters_tabular=true
// QMEM_BENCH_PARAMS overrides the parameter count (default 2^28).
#include <qmem/memory/cuda_resource.cuh>
#include <qmem/optim/cuda/multi_tensor.cuh>
#include <qmem/optim/cuda/paged.cuh>
#include <qmem/optim/rules.hpp>
#include <qmem/optim/state.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "gpu_timer.cuh"

namespace {

using namespace qmem;
namespace oq = qmem::optim;
namespace ocu = qmem::optim::cuda;

std::size_t param_count() {
  if (char const* s = std::getenv("QMEM_BENCH_PARAMS"))
    return static_cast<std::size_t>(std::strtoull(s, nullptr, 10));
  return std::size_t{1} << 28;
}

void check(cudaError_t s, char const* what) { cuda_detail::check(s, what); }

//! Copy bandwidth (bytes read + written per second) of the last copy benchmark run.
double copy_bytes_per_second = 0.0;

template <class T>
__global__ void fill_kernel(T* p, std::size_t n, float scale, std::uint32_t seed) {
  for (std::size_t i = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 0x9e3779b9u ^ seed;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    float const u = static_cast<float>(h >> 8) * (1.0f / 16777216.0f) - 0.5f;
    p[i] = from_float<T>(scale * u);
  }
}

//! Times `step` with CUDA events (3 warm-up calls first), behind a blocking kernel
//! (gpu_timer::blocked_ms), and the former way (counter host_incl_ms), in turn.
template <class Step>
void time_steps(benchmark::State& state, cudaStream_t stream, Step&& step, double bytes) {
  for (int i = 0; i < 3; ++i)
    step();
  check(cudaStreamSynchronize(stream), "sync");
  qmem::bench::gpu_timer timer(stream);
  std::string error;
  auto const r = qmem::bench::time_row(state, timer, step, error);
  if (!r) {
    state.SkipWithError(error.c_str());
    return;
  }
  if (!r->gpu.empty()) {
    state.counters["median_ms"] = r->gpu[r->gpu.size() / 2];
    state.counters["host_incl_ms"] = r->host_incl[r->host_incl.size() / 2];
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  state.counters["bytes_per_step"] = bytes;
  state.counters["GBps"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
  if (copy_bytes_per_second > 0.0)
    state.counters["roofline_ms"] = bytes / copy_bytes_per_second * 1e3;
}

void bm_copy(benchmark::State& state) {
  std::size_t const n = std::size_t{1} << 30; // 4 GiB of floats each way
  float* a = nullptr;
  float* b = nullptr;
  check(cudaMalloc(&a, n * 4), "cudaMalloc");
  check(cudaMalloc(&b, n * 4), "cudaMalloc");
  check(cudaMemset(a, 0, n * 4), "cudaMemset");
  cudaStream_t stream = nullptr;
  check(cudaStreamCreate(&stream), "cudaStreamCreate");
  double const bytes = 2.0 * 4.0 * static_cast<double>(n);
  time_steps(
      state, stream,
      [&] {
        check(cudaMemcpyAsync(b, a, n * 4, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
      },
      bytes);
  // the rate Google Benchmark reports is bytes / mean manual time; keep it for the others
  state.counters["copy_GBps"] =
      benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
  check(cudaStreamDestroy(stream), "cudaStreamDestroy");
  check(cudaFree(a), "cudaFree");
  check(cudaFree(b), "cudaFree");
}

//! Measures the copy bandwidth once, before the optimizer benchmarks (median of 20 copies).
void measure_copy_once() {
  std::size_t const n = std::size_t{1} << 30;
  float* a = nullptr;
  float* b = nullptr;
  check(cudaMalloc(&a, n * 4), "cudaMalloc");
  check(cudaMalloc(&b, n * 4), "cudaMalloc");
  check(cudaMemset(a, 0, n * 4), "cudaMemset");
  qmem::bench::gpu_timer timer(nullptr);
  std::vector<float> t;
  for (int i = 0; i < 23; ++i) {
    float const ms = timer.blocked_ms(
        [&] { check(cudaMemcpyAsync(b, a, n * 4, cudaMemcpyDeviceToDevice), "copy"); });
    if (i >= 3)
      t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  copy_bytes_per_second = 2.0 * 4.0 * static_cast<double>(n) / (t[t.size() / 2] / 1e3);
  (void)cudaFree(a);
  (void)cudaFree(b);
}

//! The bytes an ideal step moves for one tensor of n elements.
template <class Rule, class Policy, class P, class G>
double ideal_bytes(std::size_t n, bool master) {
  using traits = ocu::kernel_traits<Rule, Policy>;
  double b = static_cast<double>(n) * (2.0 * sizeof(P) + sizeof(G) + (master ? 8.0 : 0.0));
  ocu::detail::for_each_state_host<Rule::state_count>([&](auto J) {
    using F = typename traits::template format<J.value>;
    b += 2.0 * static_cast<double>(F::bytes(n) + F::scale_count(n) * 4);
  });
  return b;
}

enum class placement { device, paged };

//! The sizes of `tensors` tensors holding `total` parameters in all: equal, or (`mixed`) a model's
//! mix, in turn a large matrix, a medium one, a small one and a norm-like vector of 1000 + 37 t
//! elements (none of them a multiple of a 256-element task but by chance).
std::vector<std::size_t> tensor_sizes(std::size_t total, int tensors, bool mixed) {
  auto const count = static_cast<std::size_t>(tensors);
  if (!mixed)
    return std::vector<std::size_t>(count, total / count);
  std::size_t const weights[] = {48, 12, 3};
  std::vector<std::size_t> sizes(count, 0);
  std::size_t vectors = 0;
  std::size_t weight_sum = 0;
  for (std::size_t t = 0; t < count; ++t) {
    if (t % 4 == 3) {
      sizes[t] = 1000 + 37 * t;
      vectors += sizes[t];
    } else {
      weight_sum += weights[t % 4];
    }
  }
  std::size_t const unit = (total - vectors) / weight_sum;
  std::size_t sum = vectors;
  for (std::size_t t = 0; t < count; ++t)
    if (t % 4 != 3) {
      sizes[t] = weights[t % 4] * unit - t % 7;
      sum += sizes[t];
    }
  sizes[0] += total - sum; // the parameters in all: `total`
  return sizes;
}

//! One benchmark: `tensors` tensors holding `param_count()` parameters in all, equal or of mixed
//! sizes (tensor_sizes).
template <class Rule, class Policy, class P, class G = P>
void bm_step(benchmark::State& state, Rule rule, int tensors, placement where,
             oq::nonfinite_policy nonfinite, bool master, bool mixed) {
  std::size_t const total = param_count();
  std::vector<std::size_t> const sizes = tensor_sizes(total, tensors, mixed);
  memory::cuda_device_resource dres(0);
  cudaStream_t stream = nullptr;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  exec::cuda const e{stream, 0};
  using group_t = ocu::multi_tensor_step<Rule, Policy, P, G>;
  using traits = typename group_t::traits;
  std::unique_ptr<ocu::paged_state_resource> paged;
  if (where == placement::paged)
    paged = std::make_unique<ocu::paged_state_resource>(0, std::size_t{1} << 40);
  std::vector<void*> owned;       // cudaMalloc'd
  std::vector<void*> paged_owned; // from the paged resource
  auto alloc = [&](std::size_t bytes, bool state_storage) -> void* {
    void* p = nullptr;
    if (state_storage && paged) {
      p = paged->allocate(bytes);
      paged_owned.push_back(p);
    } else {
      check(cudaMalloc(&p, bytes == 0 ? 1 : bytes), "cudaMalloc");
      owned.push_back(p);
    }
    check(cudaMemset(p, 0, bytes == 0 ? 1 : bytes), "cudaMemset");
    return p;
  };
  std::vector<typename group_t::tensor> ts;
  double bytes = 0.0;
  for (int t = 0; t < tensors; ++t) {
    std::size_t const n = sizes[static_cast<std::size_t>(t)];
    bytes += ideal_bytes<Rule, Policy, P, G>(n, master);
    typename group_t::tensor x;
    x.size = n;
    auto* p = static_cast<P*>(alloc(n * sizeof(P), false));
    auto* g = static_cast<G*>(alloc(n * sizeof(G), false));
    fill_kernel<<<1024, 256, 0, stream>>>(p, n, 0.1f, 1u + t);
    fill_kernel<<<1024, 256, 0, stream>>>(g, n, 1e-2f, 101u + t);
    x.param = p;
    x.grad = g;
    if (master) {
      x.master = static_cast<float*>(alloc(n * 4, false));
      fill_kernel<<<1024, 256, 0, stream>>>(x.master, n, 0.1f, 1u + t);
    }
    x.rule = rule;
    ocu::detail::for_each_state_host<Rule::state_count>([&](auto J) {
      using F = typename traits::template format<J.value>;
      x.state[J.value] = alloc(F::bytes(n), true);
      x.absmax[J.value] = static_cast<float*>(alloc(F::scale_count(n) * 4 + 4, true));
    });
    ts.push_back(x);
  }
  check(cudaStreamSynchronize(stream), "sync");
  ocu::cuda_step_options co;
  co.lr = oq::lr_schedule::constant(1e-4f);
  co.nonfinite = nonfinite;
  ocu::step_controller ctl(e, dres, co);
  group_t group(e, ts, dres, ctl);
  if (nonfinite != oq::nonfinite_policy::skip_element)
    bytes += static_cast<double>(total) * sizeof(G);
  if (paged) {
    ocu::pager<group_t> pg(group, *paged, std::size_t{100} << 30);
    time_steps(
        state, stream, [&] { pg.step(e); }, bytes);
    state.counters["unified"] = pg.unified() ? 1 : 0;
  } else {
    time_steps(
        state, stream, [&] { group.step(e); }, bytes);
  }
  state.counters["params"] = static_cast<double>(total);
  state.counters["tensors"] = tensors;
  check(cudaStreamSynchronize(stream), "sync");
  for (void* p : owned)
    (void)cudaFree(p);
  for (void* p : paged_owned)
    paged->deallocate(p, 0);
  (void)cudaStreamDestroy(stream);
}

template <class Rule, class Policy, class P, class G = P>
void add(std::string const& name, Rule rule, int tensors = 1, placement where = placement::device,
         oq::nonfinite_policy nonfinite = oq::nonfinite_policy::skip_element, bool master = false,
         bool mixed = false) {
  benchmark::RegisterBenchmark(name.c_str(),
                               [=](benchmark::State& s) {
                                 bm_step<Rule, Policy, P, G>(s, rule, tensors, where, nonfinite,
                                                             master, mixed);
                               })
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond)
      ->Iterations(30);
}

} // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (!cuda_detail::device_available()) {
    std::printf("optim_bench_cuda: no CUDA device on this machine; nothing measured\n");
    return 0;
  }
  measure_copy_once();
  std::printf("copy bandwidth (same run, D2D, read+write): %.0f GB/s\n",
              copy_bytes_per_second / 1e9);
  benchmark::RegisterBenchmark("copy_d2d_4GiB", bm_copy)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond)
      ->Iterations(20);
// QMEM_BENCH_FP32_ONLY: the copy and the AdamW 32-bit rows alone (a tuning build of the
// fp32-state kernel), with AdamW 8-bit as one tensor and as 64 (the kernels that share its code)
#ifdef QMEM_BENCH_FP32_ONLY
  add<oq::adamw, oq::fp32_state, float>("adamw/fp32/fp32_params", oq::adamw{});
  add<oq::adamw, oq::fp32_state, float>("adamw/fp32/fp32_params/paged_fits", oq::adamw{}, 1,
                                        placement::paged);
  add<oq::adamw, oq::fp32_state, float>("adamw/fp32/fp32_params/64_tensors", oq::adamw{}, 64);
  add<oq::adamw, oq::fp32_state, float>("adamw/fp32/fp32_params/4_tensors_mixed", oq::adamw{}, 4,
                                        placement::device, oq::nonfinite_policy::skip_element,
                                        false, true);
  add<oq::adamw, oq::fp32_state, float>("adamw/fp32/fp32_params/1024_tensors_mixed", oq::adamw{},
                                        1024, placement::device, oq::nonfinite_policy::skip_element,
                                        false, true);
  add<oq::adamw, oq::int8_state, float>("adamw/int8/fp32_params", oq::adamw{});
  add<oq::adamw, oq::int8_state, float>("adamw/int8/fp32_params/64_tensors", oq::adamw{}, 64);
#else
  // issue 4's goals
  add<oq::adamw, oq::int8_state, float>("adamw/int8/fp32_params", oq::adamw{});
  add<oq::adamw, oq::int8_state, bf16>("adamw/int8/bf16_params", oq::adamw{});
  add<oq::adamw, oq::fp32_state, float>("adamw/fp32/fp32_params", oq::adamw{});
  add<oq::lion, oq::int8_state, float>("lion/int8/fp32_params", oq::lion{});
  add<oq::adamw, oq::int4_state, float>("adamw/int4/fp32_params", oq::adamw{});
  add<oq::adamw, oq::int8_state, float>("adamw/int8/fp32_params/64_tensors", oq::adamw{}, 64);
  add<oq::adamw, oq::int8_state, float>("adamw/int8/fp32_params/paged_fits", oq::adamw{}, 1,
                                        placement::paged);
  add<oq::adamw, oq::fp32_state, float>("adamw/fp32/fp32_params/paged_fits", oq::adamw{}, 1,
                                        placement::paged);
  add<oq::adamw, oq::fp32_state, float>("adamw/fp32/fp32_params/64_tensors", oq::adamw{}, 64);
  add<oq::adamw, oq::fp32_state, float>("adamw/fp32/fp32_params/1024_tensors_mixed", oq::adamw{},
                                        1024, placement::device, oq::nonfinite_policy::skip_element,
                                        false, true);
  add<oq::adamw, oq::int8_state, float>("adamw/int8/fp32_params/skip_step_norm_pass", oq::adamw{},
                                        1, placement::device, oq::nonfinite_policy::skip_step);
// QMEM_BENCH_GOALS_ONLY: the goal rows alone (a tuning build: 2.5 instead of 7 minutes of nvcc)
#ifndef QMEM_BENCH_GOALS_ONLY
  // the other rule x policy combinations
  add<oq::adamw, oq::bf16_state, float>("adamw/bf16_sr/fp32_params", oq::adamw{});
  add<oq::adamw, oq::int8_state, bf16>("adamw/int8/bf16_params/fp32_master", oq::adamw{}, 1,
                                       placement::device, oq::nonfinite_policy::skip_element, true);
  add<oq::adamw, oq::quantized_state<quant::fp8_e4m3>, float>("adamw/fp8_e4m3/fp32_params",
                                                              oq::adamw{});
  add<oq::lion, oq::fp32_state, float>("lion/fp32/fp32_params", oq::lion{});
  add<oq::lion, oq::int4_state, float>("lion/int4/fp32_params", oq::lion{});
  add<oq::sgd, oq::int8_state, float>("sgd_momentum/int8/fp32_params", oq::sgd{});
  add<oq::sgd, oq::fp32_state, float>("sgd_momentum/fp32/fp32_params", oq::sgd{});
  add<oq::rmsprop, oq::int8_state, float>("rmsprop/int8/fp32_params", oq::rmsprop{});
  add<oq::adagrad, oq::int8_state, float>("adagrad/int8/fp32_params", oq::adagrad{});
  add<oq::adam, oq::int8_state, float>("adam_l2/int8/fp32_params", oq::adam{});
  // Reducing rules: the per-tensor reduction pass (tensor_reduce.cuh) reads params, grads and
  // states once more before the fused update; `bytes` counts the fused pass only, so their % of
  // the roofline shows what the second pass costs.
  add<oq::lamb, oq::int8_state, float>("lamb/int8/fp32_params", oq::lamb{});
  add<oq::lars, oq::int8_state, float>("lars/int8/fp32_params", oq::lars{});
  add<oq::ademamix, oq::int8_state, float>("ademamix/int8/fp32_params", oq::ademamix{});
#endif
#endif
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
