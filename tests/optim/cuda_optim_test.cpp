// The fused multi-tensor CUDA optimizer step (include/qmem/optim/cuda/): the bucket search equals
// bitsandbytes' binary search (at every threshold on the host, for all 2^32 floats on the GPU);
// the device step equals the host optimizer bit for bit over several steps, for every rule x
// state policy x parameter type the kernels support, on tensors of odd sizes; several groups
// share one controller; a step captured in a CUDA graph replays exactly; found-inf and
// non-finite gradients skip the step without touching anything; clipping uses the same norm;
// paged state under real oversubscription completes and gives the same bits.
#include <qmem/optim/optimizer.hpp>
#include <qmem/optim/rules.hpp>
#include <qmem/optim/state.hpp>
#include <qmem/optim/cuda/bucket_search.hpp>

#include "support/backend.hpp"

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#if QMEM_HAS_CUDA()
#include <qmem/memory/cuda_resource.cuh>
#include <qmem/optim/cuda/multi_tensor.cuh>
// paged
#endif

namespace {

using namespace qmem;
namespace oc = qmem::optim::cuda_search;

float next_after(float x, bool up) {
  return std::nextafter(x, up ? std::numeric_limits<float>::infinity()
                              : -std::numeric_limits<float>::infinity());
}

template <class Code>
void check_bucket_search_host() {
  constexpr auto const& t = oc::bucket_table_of<Code>;
  float const* code = Code::book.value.value;
  std::size_t checked = 0;
  // every threshold and its neighbours (8 floats either side), every table value, the specials
  for (int c = 0; c < 255; ++c) {
    float x = t.threshold[c];
    for (int k = 0; k < 8; ++k)
      x = next_after(x, false);
    for (int k = 0; k < 17; ++k, x = next_after(x, true)) {
      REQUIRE(t.encode(x) == quant::detail::bnb_search256(x, code));
      ++checked;
    }
  }
  float const specials[] = {0.0f, -0.0f, 1.0f, -1.0f, 2.0f, -2.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::denorm_min(),
                            -std::numeric_limits<float>::denorm_min(), 1e-30f, -1e-30f};
  for (float x : specials)
    CHECK(t.encode(x) == quant::detail::bnb_search256(x, code));
  // a sample of all bit patterns
  std::mt19937 rng(7);
  for (int i = 0; i < 1 << 20; ++i) {
    float const x = std::bit_cast<float>(static_cast<std::uint32_t>(rng()));
    REQUIRE(t.encode(x) == quant::detail::bnb_search256(x, code));
    ++checked;
  }
  MESSAGE("bucket search == bnb_search256 on ", checked, " values");
}

TEST_CASE("bucket search returns bnb_search256's code (host: thresholds, specials, samples)") {
  check_bucket_search_host<quant::dynamic_signed>();
  check_bucket_search_host<quant::dynamic_unsigned>();
  check_bucket_search_host<quant::linear_signed>();
  check_bucket_search_host<quant::linear_unsigned>();
}

} // namespace

#if QMEM_HAS_CUDA()
namespace {

template <class Code>
__global__ void exhaustive_compare_kernel(oc::bucket_table<> table, quant::codebook<256> book,
                                          unsigned long long* mismatches) {
  __shared__ oc::bucket_table<> t;
  __shared__ float code[256];
  auto const* src = reinterpret_cast<std::uint32_t const*>(&table);
  auto* dst = reinterpret_cast<std::uint32_t*>(&t);
  for (unsigned w = threadIdx.x; w < sizeof(t) / 4; w += blockDim.x)
    dst[w] = src[w];
  for (unsigned i = threadIdx.x; i < 256; i += blockDim.x)
    code[i] = book.value.value[i];
  __syncthreads();
  unsigned long long bad = 0;
  std::uint64_t const stride = std::uint64_t{gridDim.x} * blockDim.x;
  for (std::uint64_t u = std::uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; u < (1ull << 32);
       u += stride) {
    float const x = __uint_as_float(static_cast<std::uint32_t>(u));
    bad += t.encode(x) != quant::detail::bnb_search256(x, code) ? 1u : 0u;
  }
  if (bad != 0)
    atomicAdd(mismatches, bad);
}

template <class Code>
unsigned long long exhaustive_mismatches() {
  unsigned long long* d = nullptr;
  cuda_detail::check(cudaMalloc(&d, sizeof(*d)), "cudaMalloc");
  cuda_detail::check(cudaMemset(d, 0, sizeof(*d)), "cudaMemset");
  exhaustive_compare_kernel<Code><<<132 * 8, 256>>>(oc::bucket_table_of<Code>, Code::book, d);
  cuda_detail::check(cudaGetLastError(), "exhaustive_compare_kernel");
  unsigned long long h = 0;
  cuda_detail::check(cudaMemcpy(&h, d, sizeof(h), cudaMemcpyDeviceToHost), "cudaMemcpy");
  cuda_detail::check(cudaFree(d), "cudaFree");
  return h;
}

TEST_CASE("bucket search returns bnb_search256's code for all 2^32 floats (GPU)") {
  if (!test::gpu_present()) {
    std::printf("[qmem] SKIPPED on cuda: no CUDA device on this machine\n");
    MESSAGE("skipped: no CUDA device");
    return;
  }
  CHECK(exhaustive_mismatches<quant::dynamic_signed>() == 0);
  CHECK(exhaustive_mismatches<quant::dynamic_unsigned>() == 0);
  CHECK(exhaustive_mismatches<quant::linear_signed>() == 0);
}

// --- device step == host optimizer --------------------------------------------------------------

namespace oq = qmem::optim;
namespace ocu = qmem::optim::cuda;

bool skip_without_gpu() {
  if (test::gpu_present())
    return false;
  std::printf("[qmem] SKIPPED on cuda: no CUDA device on this machine\n");
  MESSAGE("skipped: no CUDA device");
  return true;
}

template <class T>
T* to_device(std::vector<T> const& v) {
  T* d = nullptr;
  cuda_detail::check(cudaMalloc(&d, v.empty() ? 1 : v.size() * sizeof(T)), "cudaMalloc");
  if (!v.empty())
    cuda_detail::check(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice),
                       "cudaMemcpy H2D");
  return d;
}
template <class T>
std::vector<T> to_host(T const* d, std::size_t n) {
  std::vector<T> v(n);
  cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  if (n != 0)
    cuda_detail::check(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost),
                       "cudaMemcpy D2H");
  return v;
}
template <class T>
bool same_bits(std::vector<T> const& a, T const* b, std::size_t n) {
  return a.size() == n && (n == 0 || std::memcmp(a.data(), b, n * sizeof(T)) == 0);
}

//! The tensors of one comparison: initial params, and gradients per step (some elements
//! non-finite when `poison` says so).
template <class P, class G>
struct problem {
  std::vector<std::size_t> sizes;
  std::vector<std::vector<P>> params;
  std::vector<std::vector<std::vector<G>>> grads; // [step][tensor][i]
};

template <class P, class G>
problem<P, G> make_problem(std::vector<std::size_t> sizes, int steps, unsigned seed,
                           bool poison = false) {
  problem<P, G> pr;
  pr.sizes = sizes;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (std::size_t n : sizes) {
    std::vector<P> p(n);
    for (auto& x : p)
      x = from_float<P>(0.05f * nd(rng));
    pr.params.push_back(std::move(p));
  }
  for (int s = 0; s < steps; ++s) {
    std::vector<std::vector<G>> gs;
    for (std::size_t n : sizes) {
      std::vector<G> g(n);
      float const scale = (s % 2 == 0) ? 1e-2f : 3e-3f;
      for (auto& x : g)
        x = from_float<G>(scale * nd(rng));
      if (poison && n > 10) {
        g[3] = from_float<G>(std::numeric_limits<float>::quiet_NaN());
        g[n - 2] = from_float<G>(std::numeric_limits<float>::infinity());
      }
      gs.push_back(std::move(g));
    }
    pr.grads.push_back(std::move(gs));
  }
  return pr;
}

//! Runs `steps` on the host optimizer and on the device (one group, one controller), then
//! compares parameters, codes/values and absmax of every tensor bit for bit.
template <class Rule, class Policy, class P, class G = P>
void compare_with_host(problem<P, G> const& pr, Rule rule, oq::optimizer_options oo,
                       float grad_unscale = 1.0f) {
  using host_opt = oq::optimizer<Rule, Policy, P>;
  std::size_t const T = pr.sizes.size();
  oo.min_quantized_size = 0; // every tensor takes the policy's formats (one device group)
  // host
  std::vector<std::vector<P>> hp = pr.params;
  host_opt opt(rule, oo);
  for (auto& p : hp)
    opt.add_param(tensor_view<P>(p.data(), p.size(), memory_space::host));
  for (auto const& step_grads : pr.grads) {
    std::vector<tensor_view<G const>> gv;
    for (auto const& g : step_grads)
      gv.emplace_back(g.data(), g.size(), memory_space::host);
    (void)opt.step(exec::host{}, gv, oq::step_options{grad_unscale, false});
  }
  // device
  memory::cuda_device_resource dres(0);
  exec::cuda const e{};
  ocu::cuda_step_options co;
  co.lr = oo.lr;
  co.nonfinite = oo.nonfinite;
  co.max_grad_norm = oo.max_grad_norm;
  co.grad_unscale = grad_unscale;
  co.rounding = oo.rounding;
  co.seed = oo.seed;
  ocu::step_controller ctl(e, dres, co);
  using group_t = ocu::multi_tensor_step<Rule, Policy, P, G>;
  using traits = typename group_t::traits;
  std::vector<P*> dp(T);
  std::vector<G*> dg(T);
  std::vector<std::vector<void*>> dstate(T);
  std::vector<std::vector<float*>> dabs(T);
  std::vector<typename group_t::tensor> ts(T);
  for (std::size_t i = 0; i < T; ++i) {
    std::size_t const n = pr.sizes[i];
    dp[i] = to_device(pr.params[i]);
    dg[i] = to_device(pr.grads[0][i]);
    ts[i].param = dp[i];
    ts[i].grad = dg[i];
    ts[i].size = n;
    ts[i].rule = rule;
    ocu::detail::for_each_state_host<Rule::state_count>([&](auto J) {
      using F = typename traits::template format<J.value>;
      void* s = nullptr;
      cuda_detail::check(cudaMalloc(&s, F::bytes(n) + 16), "cudaMalloc(state)");
      cuda_detail::check(cudaMemset(s, 0, F::bytes(n) + 16), "cudaMemset(state)");
      float* a = nullptr;
      cuda_detail::check(cudaMalloc(&a, F::scale_count(n) * 4 + 16), "cudaMalloc(absmax)");
      cuda_detail::check(cudaMemset(a, 0, F::scale_count(n) * 4 + 16), "cudaMemset(absmax)");
      dstate[i].push_back(s);
      dabs[i].push_back(a);
      ts[i].state[J.value] = s;
      ts[i].absmax[J.value] = a;
    });
  }
  group_t group(e, std::span<typename group_t::tensor const>(ts), dres, ctl);
  for (auto const& step_grads : pr.grads) {
    for (std::size_t i = 0; i < T; ++i)
      cuda_detail::check(cudaMemcpy(dg[i], step_grads[i].data(), step_grads[i].size() * sizeof(G),
                                    cudaMemcpyHostToDevice),
                         "cudaMemcpy(grad)");
    group.step(e);
  }
  auto const c = ctl.read_control_blocking(e);
  CHECK(c.step == opt.step_count());
  // compare
  for (std::size_t i = 0; i < T; ++i) {
    std::size_t const n = pr.sizes[i];
    auto const dev_p = to_host(dp[i], n);
    INFO("tensor ", i, " of size ", n);
    CHECK(same_bits(dev_p, hp[i].data(), n));
    auto const& ps = opt.params()[i];
    ocu::detail::for_each_state_host<Rule::state_count>([&](auto J) {
      using F = typename traits::template format<J.value>;
      INFO("state ", J.value);
      auto const codes = to_host(static_cast<std::uint8_t const*>(dstate[i][J.value]), F::bytes(n));
      CHECK(same_bits(codes, ps.data[J.value].data(), F::bytes(n)));
      if constexpr (F::blockwise) {
        auto const am = to_host(dabs[i][J.value], F::scale_count(n));
        CHECK(same_bits(am, ps.scale[J.value].data(), F::scale_count(n)));
      }
    });
  }
  for (std::size_t i = 0; i < T; ++i) {
    (void)cudaFree(dp[i]);
    (void)cudaFree(dg[i]);
    for (void* s : dstate[i])
      (void)cudaFree(s);
    for (float* a : dabs[i])
      (void)cudaFree(a);
  }
}

std::vector<std::size_t> odd_sizes() { return {1, 31, 256, 257, 1000, 4097, 33333, 65536}; }

oq::optimizer_options default_options() {
  oq::optimizer_options o;
  o.lr = oq::lr_schedule::constant(1e-3f);
  o.nonfinite = oq::nonfinite_policy::skip_element;
  return o;
}

TEST_CASE("CUDA step == host optimizer, bit for bit, over 3 steps on 8 tensors of odd sizes") {
  if (skip_without_gpu())
    return;
  auto const o = default_options();
  SUBCASE("AdamW, 8-bit state, fp32 params") {
    compare_with_host<oq::adamw, oq::int8_state, float>(make_problem<float, float>(odd_sizes(), 3, 1),
                                                        oq::adamw{}, o);
  }
  SUBCASE("AdamW, 8-bit state, bf16 params and grads") {
    compare_with_host<oq::adamw, oq::int8_state, bf16>(make_problem<bf16, bf16>(odd_sizes(), 3, 2),
                                                       oq::adamw{}, o);
  }
  SUBCASE("AdamW, fp32 state") {
    compare_with_host<oq::adamw, oq::fp32_state, float>(make_problem<float, float>(odd_sizes(), 3, 3),
                                                        oq::adamw{}, o);
  }
  SUBCASE("AdamW, 4-bit state (block 128, odd counts pad the last nibble)") {
    compare_with_host<oq::adamw, oq::int4_state, float>(make_problem<float, float>(odd_sizes(), 3, 4),
                                                        oq::adamw{}, o);
  }
  SUBCASE("AdamW, bf16 state with stochastic rounding") {
    auto oo = o;
    oo.seed = 1234;
    compare_with_host<oq::adamw, oq::bf16_state, float>(make_problem<float, float>(odd_sizes(), 3, 5),
                                                        oq::adamw{}, oo);
  }
  SUBCASE("Lion, 8-bit state") {
    compare_with_host<oq::lion, oq::int8_state, float>(make_problem<float, float>(odd_sizes(), 3, 6),
                                                       oq::lion{.weight_decay = 0.1f}, o);
  }
  SUBCASE("Adam (L2), FP8 e4m3 state") {
    compare_with_host<oq::adam, oq::quantized_state<quant::fp8_e4m3>, float>(
        make_problem<float, float>(odd_sizes(), 3, 7), oq::adam{.weight_decay = 1e-2f}, o);
  }
  SUBCASE("SGD with Nesterov momentum, 8-bit state, fp16 params") {
    compare_with_host<oq::sgd, oq::int8_state, f16>(make_problem<f16, f16>(odd_sizes(), 3, 8),
                                                    oq::sgd{.momentum = 0.9f, .nesterov = true}, o);
  }
  SUBCASE("bf16 params with stochastic rounding") {
    auto oo = o;
    oo.rounding = oq::param_rounding::stochastic;
    oo.seed = 99;
    compare_with_host<oq::adamw, oq::int8_state, bf16>(make_problem<bf16, bf16>(odd_sizes(), 3, 9),
                                                       oq::adamw{}, oo);
  }
  SUBCASE("cosine schedule with warmup, loss unscaling and global-norm clipping") {
    auto oo = o;
    oo.lr = oq::lr_schedule::cosine(2e-3f, 2, 10, 1e-4f);
    oo.max_grad_norm = 0.3f;
    compare_with_host<oq::adamw, oq::int8_state, float>(make_problem<float, float>(odd_sizes(), 4, 10),
                                                        oq::adamw{}, oo, 0.5f);
  }
  SUBCASE("skip_element: non-finite gradient elements keep their values") {
    compare_with_host<oq::adamw, oq::int8_state, float>(
        make_problem<float, float>(odd_sizes(), 3, 11, true), oq::adamw{}, o);
  }
  SUBCASE("skip_step: a non-finite gradient skips the whole step") {
    auto oo = o;
    oo.nonfinite = oq::nonfinite_policy::skip_step;
    compare_with_host<oq::adamw, oq::int8_state, float>(
        make_problem<float, float>(odd_sizes(), 3, 12, true), oq::adamw{}, oo);
  }
}

} // namespace
#endif
