// Host optimizer step vs a memory copy of the same traffic, measured in the same run.
//
// Each iteration times one optimizer step and, right after it, a threaded memcpy that moves the
// same number of bytes through memory (a copy of B bytes reads B and writes B, so it copies
// (read + written) / 2 bytes of the step's traffic). Alternating the two in one loop keeps the
// ratio meaningful on a loaded machine. Counters: bytes moved per parameter, the step's and the
// copy's GB/s, and pct_of_copy = copy time / step time * 100 (the goal for 8-bit AdamW: >= 60).
//
// Traffic per parameter (fp32 params and grads): read p, g and the state, write p and the state;
// the state of 8-bit AdamW is 2 + 8/256 bytes, 4-bit 1 + 8/128, fp32 8, bf16 4. With the default
// non-finite policy (skip_step) the gradients are read once more first ("checked" variants).
//
// The "_1thread_cpu" variants time one thread's CPU time (CLOCK_THREAD_CPUTIME_ID) for a step on
// one thread and for a one-thread memcpy of the same traffic: on the shared development machine
// the wall-clock ratio above moves with the other processes' load (a loaded memory system slows
// the copy more than the step), the CPU-time ratio much less. pct_of_copy is copy / step there too.
// QMEM_BENCH_ISA=0|1|2 caps the step's instruction set (portable, AVX2, AVX-512).
// Row argument: log2 of the parameter count. /22 (67 MB of 8-bit traffic) stays in the GPU
// machine's 300 MiB L3, so its copy is an L3 copy; /26 (1.07 GB) is DRAM-resident, the regime of
// an offloaded optimizer (docs/benchmarks.md, "Host optimizers", round 7). QMEM_BENCH_MIN_TIME
// sets each row's minimum time in seconds (default 1).
#include <qmem/optim.hpp>

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <random>
#include <vector>

namespace {

using namespace qmem;

// Rows take log2 of the parameter count as their argument: 22 (2^22 parameters, 67 MB of 8-bit
// AdamW traffic, which the GPU machine's 300 MiB L3 holds: the goal rows until round 7) and 26
// (2^26, 1.07 GB: DRAM-resident, what an offloaded optimizer of a real model sees).
std::size_t params_of(benchmark::State const& st) { return std::size_t{1} << st.range(0); }

// The state's bytes per parameter, computed once per policy and size: Google Benchmark calls a
// row's function several times (growing iteration counts), and at 2^26 parameters building this
// and the start values below took seconds per call.
template <class Rule, class Policy>
double state_bytes_per_param(std::size_t n_params) {
  static std::map<std::size_t, double> known;
  if (auto const it = known.find(n_params); it != known.end())
    return it->second;
  std::vector<float> p(n_params, 0.0f);
  optim::optimizer<Rule, Policy> opt;
  opt.add_param(view(p));
  return known[n_params] = static_cast<double>(opt.state_bytes()) / static_cast<double>(n_params);
}

// Parameters ~ N(0, 1) and gradients ~ N(0, 0.01^2) from one seeded generator, made once per size
// (every row starts from the same values, as when each made its own).
struct start_set {
  std::vector<float> p, g;
};
start_set const& start_values(std::size_t n_params) {
  static std::map<std::size_t, start_set> made;
  auto [it, fresh] = made.try_emplace(n_params);
  if (fresh) {
    std::mt19937 rng(1);
    std::normal_distribution<float> d(0.0f, 1.0f);
    it->second.p.resize(n_params);
    it->second.g.resize(n_params);
    for (auto& x : it->second.p)
      x = d(rng);
    for (auto& x : it->second.g)
      x = 0.01f * d(rng);
  }
  return it->second;
}

void threaded_copy(exec::host const& e, std::byte* dst, std::byte const* src, std::size_t n) {
  qmem::detail::parallel_for(e, n, std::size_t{1} << 16, [&](std::size_t b, std::size_t end) {
    std::memcpy(dst + b, src + b, end - b);
  });
}

// The host step's path on this CPU, for reading a run from another machine: 0 portable, 1 AVX2,
// 2 AVX-512F, 3 AVX-512 with VBMI and DQ (the 8- and 4-bit encodes without a division, each
// block's encode interleaved with the next block's rule).
double simd_path() {
  int const isa = static_cast<int>(optim::detail::current_host_isa());
#if QMEM_OPTIM_HOST_SIMD
  if (isa == 2 && optim::detail::host_vbmi() && optim::detail::host_step_search4())
    return 3.0;
#endif
  return static_cast<double>(isa);
}

template <class Rule, class Policy>
void bm_step(benchmark::State& st, optim::nonfinite_policy nf) {
  std::size_t const n_params = params_of(st);
  auto const& start = start_values(n_params);
  std::vector<float> p = start.p;
  std::vector<float> const& g = start.g;
  optim::optimizer<Rule, Policy> opt(Rule{},
                                     {.lr = optim::lr_schedule::constant(1e-4f), .nonfinite = nf});
  opt.add_param(view(p));
  std::vector<tensor_view<float const>> gs{view(std::as_const(g))};
  exec::host const e{};
  double const s = state_bytes_per_param<Rule, Policy>(n_params);
  double const read = 8.0 + s + (nf == optim::nonfinite_policy::skip_element ? 0.0 : 4.0);
  double const written = 4.0 + s;
  auto const copy_bytes = static_cast<std::size_t>((read + written) / 2.0 * n_params);
  std::vector<std::byte> src(copy_bytes, std::byte{1}), dst(copy_bytes, std::byte{0});
  opt.step(e, gs); // warm up: state pages, encoder tables
  threaded_copy(e, dst.data(), src.data(), copy_bytes);
  double step_s = 0.0, copy_s = 0.0;
  for (auto _ : st) {
    auto const t0 = std::chrono::steady_clock::now();
    opt.step(e, gs);
    auto const t1 = std::chrono::steady_clock::now();
    threaded_copy(e, dst.data(), src.data(), copy_bytes);
    auto const t2 = std::chrono::steady_clock::now();
    double const a = std::chrono::duration<double>(t1 - t0).count();
    step_s += a;
    copy_s += std::chrono::duration<double>(t2 - t1).count();
    st.SetIterationTime(a);
    benchmark::DoNotOptimize(p.data());
    benchmark::DoNotOptimize(dst.data());
  }
  double const bytes = (read + written) * n_params;
  st.SetBytesProcessed(static_cast<std::int64_t>(bytes * static_cast<double>(st.iterations())));
  st.counters["bytes_per_param"] = read + written;
  st.counters["step_GBps"] = bytes * static_cast<double>(st.iterations()) / step_s / 1e9;
  st.counters["copy_GBps"] =
      2.0 * static_cast<double>(copy_bytes) * static_cast<double>(st.iterations()) / copy_s / 1e9;
  st.counters["pct_of_copy"] = 100.0 * copy_s / step_s;
  st.counters["simd_path"] = simd_path();
}

// QMEM_BENCH_ISA=0|1|2 caps the host step's ISA (portable, AVX2, AVX-512) for comparisons;
// QMEM_BENCH_SPIN_US sets how long the pool's threads poll before they sleep
// (detail::host_pool_spin_us), QMEM_BENCH_PIECES the pieces per thread of a host loop.
[[maybe_unused]] bool const isa_capped = [] {
  if (char const* v = std::getenv("QMEM_BENCH_ISA"))
    optim::detail::host_isa_limit().store(std::atoi(v));
  if (char const* v = std::getenv("QMEM_BENCH_SPIN_US"))
    qmem::detail::host_pool_spin_us().store(static_cast<unsigned>(std::atoi(v)));
  if (char const* v = std::getenv("QMEM_BENCH_PIECES"))
    qmem::detail::host_pieces_per_thread().store(static_cast<std::size_t>(std::atoi(v)));
  return true;
}();

double thread_seconds() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// One thread, CPU time: the step and a memcpy of the same traffic, alternating.
template <class Rule, class Policy>
void bm_step_cpu(benchmark::State& st) {
  std::size_t const n_params = params_of(st);
  auto const& start = start_values(n_params);
  std::vector<float> p = start.p;
  std::vector<float> const& g = start.g;
  optim::optimizer<Rule, Policy> opt(Rule{}, {.lr = optim::lr_schedule::constant(1e-4f),
                                              .nonfinite = optim::nonfinite_policy::skip_element});
  opt.add_param(view(p));
  std::vector<tensor_view<float const>> gs{view(std::as_const(g))};
  exec::host const e{1};
  double const s = state_bytes_per_param<Rule, Policy>(n_params);
  double const moved = (8.0 + s) + (4.0 + s);
  auto const copy_bytes = static_cast<std::size_t>(moved / 2.0 * n_params);
  std::vector<std::byte> src(copy_bytes, std::byte{1}), dst(copy_bytes, std::byte{0});
  opt.step(e, gs);
  std::memcpy(dst.data(), src.data(), copy_bytes);
  double step_s = 0.0, copy_s = 0.0;
  for (auto _ : st) {
    double const t0 = thread_seconds();
    opt.step(e, gs);
    double const t1 = thread_seconds();
    std::memcpy(dst.data(), src.data(), copy_bytes);
    double const t2 = thread_seconds();
    step_s += t1 - t0;
    copy_s += t2 - t1;
    st.SetIterationTime(t1 - t0);
    benchmark::DoNotOptimize(p.data());
    benchmark::DoNotOptimize(dst.data());
  }
  double const iters = static_cast<double>(st.iterations());
  st.counters["ns_per_param"] = step_s / iters / static_cast<double>(n_params) * 1e9;
  st.counters["copy_ns_per_param"] = copy_s / iters / static_cast<double>(n_params) * 1e9;
  st.counters["pct_of_copy"] = 100.0 * copy_s / step_s;
}

void adamw_8bit(benchmark::State& st) {
  bm_step<optim::adamw, optim::int8_state>(st, optim::nonfinite_policy::skip_element);
}
void adamw_8bit_checked(benchmark::State& st) {
  bm_step<optim::adamw, optim::int8_state>(st, optim::nonfinite_policy::skip_step);
}
void adamw_4bit(benchmark::State& st) {
  bm_step<optim::adamw, optim::int4_state>(st, optim::nonfinite_policy::skip_element);
}
void adamw_32bit(benchmark::State& st) {
  bm_step<optim::adamw, optim::fp32_state>(st, optim::nonfinite_policy::skip_element);
}
void adamw_bf16(benchmark::State& st) {
  bm_step<optim::adamw, optim::bf16_state>(st, optim::nonfinite_policy::skip_element);
}
void lion_8bit(benchmark::State& st) {
  bm_step<optim::lion, optim::int8_state>(st, optim::nonfinite_policy::skip_element);
}

} // namespace

// Every row: the step's time as reported above, in ms, at least QMEM_BENCH_MIN_TIME seconds of
// iterations (default 1), 2^22 parameters.
static void timed_rows(benchmark::internal::Benchmark* b) {
  char const* v = std::getenv("QMEM_BENCH_MIN_TIME");
  double const min_time = v != nullptr && std::atof(v) > 0.0 ? std::atof(v) : 1.0;
  b->Arg(22)->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(min_time);
}
// The goal rows get a DRAM-sized row too (2^26 parameters).
static void goal_rows(benchmark::internal::Benchmark* b) {
  timed_rows(b);
  b->Arg(26);
}

BENCHMARK(adamw_8bit)->Apply(goal_rows);
BENCHMARK(adamw_8bit_checked)->Apply(timed_rows);
BENCHMARK(adamw_4bit)->Apply(goal_rows);
BENCHMARK(adamw_32bit)->Apply(timed_rows);
BENCHMARK(adamw_bf16)->Apply(timed_rows);
BENCHMARK(lion_8bit)->Apply(timed_rows);

BENCHMARK(bm_step_cpu<optim::adamw, optim::int8_state>)
    ->Name("adamw_8bit_1thread_cpu")
    ->Apply(goal_rows);
BENCHMARK(bm_step_cpu<optim::adamw, optim::int4_state>)
    ->Name("adamw_4bit_1thread_cpu")
    ->Apply(goal_rows);
BENCHMARK(bm_step_cpu<optim::adamw, optim::fp32_state>)
    ->Name("adamw_32bit_1thread_cpu")
    ->Apply(timed_rows);
BENCHMARK(bm_step_cpu<optim::lion, optim::int8_state>)
    ->Name("lion_8bit_1thread_cpu")
    ->Apply(timed_rows);

BENCHMARK_MAIN();
