// The fused multi-tensor CUDA optimizer step (include/qmem/optim/cuda/): the bucket search equals
// bitsandbytes' binary search (at every threshold on the host, for all 2^32 floats on the GPU);
// the device step equals the host optimizer bit for bit over several steps, for every rule x
// state policy x parameter type the kernels support, on tensors of odd sizes; several groups
// share one controller; a step captured in a CUDA graph replays exactly; found-inf and
// non-finite gradients skip the step without touching anything; clipping uses the same norm;
// paged state under real oversubscription completes and gives the same bits.
#include <qmem/optim/cuda/bucket_search.hpp>
#include <qmem/optim/cuda/state_format.hpp>
#include <qmem/optim/optimizer.hpp>
#include <qmem/optim/rules.hpp>
#include <qmem/optim/state.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <vector>

#include "cuda_test_support.hpp"
#include "support/backend.hpp"

#if QMEM_HAS_CUDA()
#include <qmem/memory/cuda_resource.cuh>
#include <qmem/optim/cuda/detail/optimizer_groups.cuh>
#include <qmem/optim/cuda/multi_tensor.cuh>
#include <qmem/optim/cuda/optimizer_step.cuh>
#include <qmem/optim/cuda/paged.cuh>
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
  float const specials[] = {0.0f,
                            -0.0f,
                            1.0f,
                            -1.0f,
                            2.0f,
                            -2.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::denorm_min(),
                            -std::numeric_limits<float>::denorm_min(),
                            1e-30f,
                            -1e-30f};
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

using test::make_problem;
using test::problem;
using test::same_bits;
using test::skip_without_gpu;
using test::to_device;
using test::to_host;

//! A group's device storage: params, grads and zeroed states (as the host optimizer starts).
template <class Rule, class Policy, class P, class G>
struct device_problem {
  using group_t = ocu::multi_tensor_step<Rule, Policy, P, G>;
  using traits = typename group_t::traits;
  using rule = Rule; // an alias: nvcc warns (#177-D) of a static member unused by one instantiation
  std::vector<std::size_t> sizes;
  std::vector<P*> p;
  std::vector<G*> g;
  std::vector<std::vector<std::uint8_t*>> state;
  std::vector<std::vector<float*>> absmax;
  std::vector<typename group_t::tensor> tensors;
  memory::resource* storage = nullptr; // null: cudaMalloc

  device_problem(problem<P, G> const& pr, Rule rule, memory::resource* r = nullptr)
      : sizes(pr.sizes), storage(r) {
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      std::size_t const n = sizes[i];
      p.push_back(to_device(pr.params[i]));
      g.push_back(to_device(pr.grads[0][i]));
      typename group_t::tensor t;
      t.param = p.back();
      t.grad = g.back();
      t.size = n;
      t.rule = rule;
      state.emplace_back();
      absmax.emplace_back();
      ocu::detail::for_each_state_host<Rule::state_count>([&](auto J) {
        using F = typename traits::template format<J.value>;
        auto* s = static_cast<std::uint8_t*>(alloc(F::bytes(n) + 16));
        auto* a = static_cast<float*>(alloc(F::scale_count(n) * 4 + 16));
        cuda_detail::check(cudaMemset(s, 0, F::bytes(n) + 16), "cudaMemset(state)");
        cuda_detail::check(cudaMemset(a, 0, F::scale_count(n) * 4 + 16), "cudaMemset(absmax)");
        state.back().push_back(s);
        absmax.back().push_back(a);
        t.state[J.value] = s;
        t.absmax[J.value] = a;
      });
      tensors.push_back(t);
    }
  }
  device_problem(device_problem const&) = delete;
  ~device_problem() {
    (void)cudaDeviceSynchronize();
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      (void)cudaFree(p[i]);
      (void)cudaFree(g[i]);
      for (std::size_t j = 0; j < state[i].size(); ++j) {
        free_bytes(state[i][j]);
        free_bytes(absmax[i][j]);
      }
    }
  }
  void* alloc(std::size_t bytes) {
    if (storage != nullptr)
      return storage->allocate(bytes);
    void* d = nullptr;
    cuda_detail::check(cudaMalloc(&d, bytes), "cudaMalloc");
    return d;
  }
  void free_bytes(void* d) {
    if (storage != nullptr)
      storage->deallocate(d, 0); // the paged resource looks sizes up itself
    else
      (void)cudaFree(d);
  }
  void set_grads(std::vector<std::vector<G>> const& gs, cudaStream_t stream = nullptr) {
    for (std::size_t i = 0; i < sizes.size(); ++i)
      cuda_detail::check(cudaMemcpyAsync(g[i], gs[i].data(), gs[i].size() * sizeof(G),
                                         cudaMemcpyHostToDevice, stream),
                         "cudaMemcpyAsync(grad)");
  }
  std::span<typename group_t::tensor const> span() const { return tensors; }
  //! Every byte of params, states and absmax, in order.
  std::vector<std::uint8_t> snapshot() const {
    std::vector<std::uint8_t> out;
    auto append = [&](void const* d, std::size_t bytes) {
      auto const h = to_host(static_cast<std::uint8_t const*>(d), bytes);
      out.insert(out.end(), h.begin(), h.end());
    };
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      std::size_t const n = sizes[i];
      append(p[i], n * sizeof(P));
      ocu::detail::for_each_state_host<Rule::state_count>([&](auto J) {
        using F = typename traits::template format<J.value>;
        append(state[i][J.value], F::bytes(n));
        append(absmax[i][J.value], F::scale_count(n) * 4);
      });
    }
    return out;
  }
};

//! Checks tensor k of `dev` against tensor index[k] of the host reference `ref`: parameters,
//! codes or values, and absmax, bit for bit.
template <class Device, class Reference>
void check_same_as_host(Device const& dev, Reference const& ref,
                        std::vector<std::size_t> const& index) {
  using traits = typename Device::traits;
  for (std::size_t k = 0; k < index.size(); ++k) {
    std::size_t const i = index[k];
    std::size_t const n = dev.sizes[k];
    INFO("tensor ", i, " of size ", n);
    CHECK(same_bits(to_host(dev.p[k], n), ref.params[i].data(), n));
    auto const& ps = ref.opt.params()[i];
    ocu::detail::for_each_state_host<Device::rule::state_count>([&](auto J) {
      using F = typename traits::template format<J.value>;
      INFO("state ", J.value);
      CHECK(same_bits(to_host(dev.state[k][J.value], F::bytes(n)), ps.data[J.value].data(),
                      F::bytes(n)));
      if constexpr (F::blockwise)
        CHECK(same_bits(to_host(dev.absmax[k][J.value], F::scale_count(n)),
                        ps.scale[J.value].data(), F::scale_count(n)));
    });
  }
}

//! Every index of a problem of `count` tensors.
std::vector<std::size_t> all_of(std::size_t count) {
  std::vector<std::size_t> v(count);
  for (std::size_t i = 0; i < count; ++i)
    v[i] = i;
  return v;
}

//! Runs `steps` on the host optimizer and on the device (one group, one controller), then
//! compares parameters, codes/values and absmax of every tensor bit for bit. With `cuts` (global
//! task numbers, ascending, within the group's tasks), each step's update is enqueued as the
//! ranges [0, cuts[0]), [cuts[0], cuts[1]), ..., [cuts.back(), task_count) (a pager's launches).
template <class Rule, class Policy, class P, class G = P>
void compare_with_host(problem<P, G> const& pr, Rule rule, oq::optimizer_options oo,
                       float grad_unscale = 1.0f, std::vector<std::uint64_t> const& cuts = {}) {
  oo.min_quantized_size = 0; // every tensor takes the policy's formats (one device group)
  test::host_reference<Rule, Policy, P> host(pr.params, rule, oo);
  host.run(pr, oq::step_options{grad_unscale, false});
  memory::cuda_device_resource dres(0);
  exec::cuda const e{};
  ocu::cuda_step_options co = ocu::detail::step_options_of(oo, nullptr);
  co.grad_unscale = grad_unscale;
  ocu::step_controller ctl(e, dres, co);
  device_problem<Rule, Policy, P, G> d(pr, rule);
  using group_t = typename device_problem<Rule, Policy, P, G>::group_t;
  if constexpr (std::same_as<P, float>) {
    // master weights belong to 16-bit parameters: the fp32-parameter kernels have no master path
    std::vector<typename group_t::tensor> with_master(d.span().begin(), d.span().end());
    with_master.back().master = d.p.back();
    CHECK_THROWS_AS(group_t(e, std::span<typename group_t::tensor const>(with_master), dres, ctl),
                    qmem::bad_argument);
  }
  group_t group(e, d.span(), dres, ctl);
  for (auto const& step_grads : pr.grads) {
    d.set_grads(step_grads);
    if (cuts.empty()) {
      group.step(e);
      continue;
    }
    group.accumulate_norm(e);
    ctl.resolve(e);
    group.prepare(e);
    std::uint64_t begin = 0;
    for (std::uint64_t const cut : cuts) {
      group.update(e, begin, cut);
      begin = cut;
    }
    group.update(e, begin, group.task_count());
  }
  CHECK(ctl.read_control_blocking(e).step == host.opt.step_count());
  check_same_as_host(d, host, all_of(pr.sizes.size()));
}

std::vector<std::size_t> odd_sizes() { return {1, 31, 256, 257, 1000, 4097, 33333, 65536}; }

TEST_CASE("CUDA step == host optimizer, bit for bit, over 3 steps on 8 tensors of odd sizes") {
  if (skip_without_gpu())
    return;
  auto const o = test::comparison_options();
  SUBCASE("AdamW, 8-bit state, fp32 params") {
    compare_with_host<oq::adamw, oq::int8_state, float>(
        make_problem<float, float>(odd_sizes(), 3, 1), oq::adamw{}, o);
  }
  SUBCASE("AdamW, 8-bit state, bf16 params and grads") {
    compare_with_host<oq::adamw, oq::int8_state, bf16>(make_problem<bf16, bf16>(odd_sizes(), 3, 2),
                                                       oq::adamw{}, o);
  }
  SUBCASE("AdamW, fp32 state") {
    compare_with_host<oq::adamw, oq::fp32_state, float>(
        make_problem<float, float>(odd_sizes(), 3, 3), oq::adamw{}, o);
  }
  SUBCASE("AdamW, 4-bit state (block 128, odd counts pad the last nibble)") {
    compare_with_host<oq::adamw, oq::int4_state, float>(
        make_problem<float, float>(odd_sizes(), 3, 4), oq::adamw{}, o);
  }
  SUBCASE("AdamW, bf16 state with stochastic rounding") {
    auto oo = o;
    oo.seed = 1234;
    compare_with_host<oq::adamw, oq::bf16_state, float>(
        make_problem<float, float>(odd_sizes(), 3, 5), oq::adamw{}, oo);
  }
  SUBCASE("Lion, 8-bit state") {
    compare_with_host<oq::lion, oq::int8_state, float>(
        make_problem<float, float>(odd_sizes(), 3, 6), oq::lion{.weight_decay = 0.1f}, o);
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
    compare_with_host<oq::adamw, oq::int8_state, float>(
        make_problem<float, float>(odd_sizes(), 4, 10), oq::adamw{}, oo, 0.5f);
  }
  SUBCASE("skip_element: non-finite gradient elements keep their values") {
    compare_with_host<oq::adamw, oq::int8_state, float>(
        make_problem<float, float>(odd_sizes(), 3, 11, true), oq::adamw{}, o);
  }
  SUBCASE("skip_step with finite gradients: the skip_step kernel's update, AdamW 4-bit") {
    auto oo = o;
    oo.nonfinite = oq::nonfinite_policy::skip_step;
    compare_with_host<oq::adamw, oq::int4_state, float>(
        make_problem<float, float>(odd_sizes(), 3, 13), oq::adamw{}, oo);
  }
  SUBCASE("skip_step: a non-finite gradient skips the whole step") {
    auto oo = o;
    oo.nonfinite = oq::nonfinite_policy::skip_step;
    compare_with_host<oq::adamw, oq::int8_state, float>(
        make_problem<float, float>(odd_sizes(), 3, 12, true), oq::adamw{}, oo);
  }
}

TEST_CASE("CUDA step == host optimizer: AdamW 32-bit, a group of one tensor (a warp per task)") {
  // groups of one tensor with fp32 states launch one warp per task instead of the resident grid
  // (QMEM_OPTIM_FUSED_FP32_ONE_PASS): a last block with idle warps, a tail task
  if (skip_without_gpu())
    return;
  auto const o = test::comparison_options();
  SUBCASE("one partial task") {
    compare_with_host<oq::adamw, oq::fp32_state, float>(make_problem<float, float>({31}, 3, 21),
                                                        oq::adamw{}, o);
  }
  SUBCASE("1172 tasks, non-finite gradients skipped per element") {
    compare_with_host<oq::adamw, oq::fp32_state, float>(
        make_problem<float, float>({300001}, 3, 22, true), oq::adamw{}, o);
  }
  SUBCASE("skip_step with finite gradients") {
    auto oo = o;
    oo.nonfinite = oq::nonfinite_policy::skip_step;
    compare_with_host<oq::adamw, oq::fp32_state, float>(make_problem<float, float>({300001}, 3, 23),
                                                        oq::adamw{}, oo);
  }
}

//! `count` tensor sizes that cycle through tiny tensors, tails of a 256-element task, exact tasks
//! and tensors of many tasks (one of 300001 elements, 1172 tasks, every 32nd).
std::vector<std::size_t> mixed_sizes(std::size_t count) {
  std::size_t const cycle[] = {1, 256, 257, 31, 512, 4097, 3, 1000, 33333, 255, 768, 7};
  std::vector<std::size_t> v;
  for (std::size_t i = 0; i < count; ++i)
    v.push_back(i % 32 == 5 ? 300001 : cycle[i % std::size(cycle)]);
  return v;
}

TEST_CASE("CUDA step == host optimizer: AdamW 32-bit, many tensors of mixed sizes in one pass") {
  // every fp32 Adam/AdamW group launches a warp per task (QMEM_OPTIM_FUSED_FP32_ONE_PASS), each
  // warp finding its tensor with find_tensor_warp: one round up to 64 tensors, two up to 4096,
  // three beyond
  if (skip_without_gpu())
    return;
  auto const o = test::comparison_options();
  SUBCASE("70 tensors (two search rounds), non-finite gradients skipped per element") {
    compare_with_host<oq::adamw, oq::fp32_state, float>(
        make_problem<float, float>(mixed_sizes(70), 3, 31, true), oq::adamw{}, o);
  }
  SUBCASE("Adam (L2), 64 tensors (one round), skip_step with finite gradients") {
    auto oo = o;
    oo.nonfinite = oq::nonfinite_policy::skip_step;
    compare_with_host<oq::adam, oq::fp32_state, float>(
        make_problem<float, float>(mixed_sizes(64), 3, 32), oq::adam{.weight_decay = 1e-2f}, oo);
  }
  SUBCASE("40 tensors updated in five task ranges that cut through tensors") {
    // tasks of tensors 0-8: [0, 1), [1, 2), [2, 4), [4, 5), [5, 7), [7, 1179) (300001 elements),
    // [1179, 1180), [1180, 1184), [1184, 1315)
    compare_with_host<oq::adamw, oq::fp32_state, float>(
        make_problem<float, float>(mixed_sizes(40), 2, 33), oq::adamw{}, o, 1.0f,
        {1, 3, 700, 1185});
  }
  SUBCASE("4500 tensors of 1 to 4097 elements (three search rounds)") {
    std::vector<std::size_t> sizes = mixed_sizes(4500);
    for (auto& n : sizes)
      n = n > 4097 ? 4097 : n;
    compare_with_host<oq::adamw, oq::fp32_state, float>(make_problem<float, float>(sizes, 2, 34),
                                                        oq::adamw{}, o);
  }
}

TEST_CASE("multi_tensor_step refuses a tensor's rule out of its ranges or a negative lr scale") {
  if (skip_without_gpu())
    return;
  // the low-level entry point checks what the optimizers check where a rule enters them (a device
  // step cannot throw): without the check, AdamW with beta2 1.5 ran, v growing without bound
  using P = float;
  auto const pr = make_problem<P, P>({300, 4097}, 1, 71);
  memory::cuda_device_resource dres(0);
  exec::cuda const e{};
  ocu::step_controller ctl(e, dres, ocu::cuda_step_options{});
  device_problem<oq::adamw, oq::int4_state, P, P> d(pr, oq::adamw{});
  using group_t = device_problem<oq::adamw, oq::int4_state, P, P>::group_t;
  auto refused = [&](auto edit, char const* field) {
    std::vector<group_t::tensor> ts(d.span().begin(), d.span().end());
    edit(ts[1]);
    INFO(field);
    CHECK_THROWS_WITH_AS(group_t(e, std::span<group_t::tensor const>(ts), dres, ctl),
                         doctest::Contains("tensor 1"), qmem::bad_argument);
    CHECK_THROWS_WITH_AS(group_t(e, std::span<group_t::tensor const>(ts), dres, ctl),
                         doctest::Contains(field), qmem::bad_argument);
  };
  refused([](auto& t) { t.rule.beta2 = 1.5f; }, "beta2");
  refused([](auto& t) { t.rule.beta1 = std::numeric_limits<float>::quiet_NaN(); }, "beta1");
  refused([](auto& t) { t.rule.eps = -1e-8f; }, "eps");
  refused([](auto& t) { t.rule.weight_decay = -0.01f; }, "weight_decay");
  refused([](auto& t) { t.lr_scale = -1.0f; }, "lr_scale");
  refused([](auto& t) { t.lr_scale = std::numeric_limits<float>::quiet_NaN(); }, "lr_scale");
  // the max_unorm adaptor checks the rule it wraps
  using clipped = ocu::unorm_clipped<oq::adamw>;
  static_assert(oq::validated_rule<clipped>);
  using clipped_group = ocu::multi_tensor_step<clipped, oq::int4_state, P>;
  clipped_group::tensor wrapped{};
  wrapped.param = d.p[0];
  wrapped.grad = d.g[0];
  wrapped.size = d.sizes[0];
  wrapped.state[0] = d.state[0][0];
  wrapped.state[1] = d.state[0][1];
  wrapped.absmax[0] = d.absmax[0][0];
  wrapped.absmax[1] = d.absmax[0][1];
  wrapped.rule.rule.beta2 = 1.0f; // [0, 1): 1 is out
  CHECK_THROWS_WITH_AS(clipped_group(e, std::span(&wrapped, 1), dres, ctl),
                       doctest::Contains("beta2"), qmem::bad_argument);
  // the edges the optimizers accept are accepted, and the group still steps
  std::vector<group_t::tensor> edges(d.span().begin(), d.span().end());
  edges[0].rule.beta1 = 0.0f;
  edges[0].lr_scale = 0.0f;
  edges[1].rule.eps = 0.0f;
  group_t group(e, std::span<group_t::tensor const>(edges), dres, ctl);
  group.step(e);
  CHECK(ctl.read_control_blocking(e).step == 1);
}

TEST_CASE("two groups on one controller (8-bit and, below 4096 elements, fp32) == host optimizer") {
  if (skip_without_gpu())
    return;
  using P = float;
  auto const pr = make_problem<P, P>(odd_sizes(), 3, 21);
  oq::optimizer_options oo = test::comparison_options();
  oo.max_grad_norm = 0.05f; // the global norm spans both groups
  // host, with bitsandbytes' default threshold
  test::host_reference<oq::adamw, oq::int8_state, P> host(pr.params, oq::adamw{}, oo);
  // device: split the tensors the same way
  problem<P, P> big, small;
  std::vector<std::size_t> big_index, small_index;
  for (std::size_t i = 0; i < pr.sizes.size(); ++i) {
    bool const q = pr.sizes[i] >= oo.min_quantized_size;
    auto& dst = q ? big : small;
    (q ? big_index : small_index).push_back(i);
    dst.sizes.push_back(pr.sizes[i]);
    dst.params.push_back(pr.params[i]);
  }
  for (auto const& gs : pr.grads) {
    big.grads.emplace_back();
    small.grads.emplace_back();
    for (std::size_t i = 0; i < gs.size(); ++i)
      (pr.sizes[i] >= oo.min_quantized_size ? big : small).grads.back().push_back(gs[i]);
  }
  memory::cuda_device_resource dres(0);
  exec::cuda const e{};
  ocu::step_controller ctl(e, dres, ocu::detail::step_options_of(oo, nullptr));
  device_problem<oq::adamw, oq::int8_state, P, P> dq(big, oq::adamw{});
  device_problem<oq::adamw, oq::fp32_state, P, P> df(small, oq::adamw{});
  ocu::multi_tensor_step<oq::adamw, oq::int8_state, P, P> gq(e, dq.span(), dres, ctl);
  ocu::multi_tensor_step<oq::adamw, oq::fp32_state, P, P> gf(e, df.span(), dres, ctl);
  float host_norm = 0.0f;
  for (std::size_t s = 0; s < pr.grads.size(); ++s) {
    host_norm = host.step(pr.grads[s]).grad_norm;
    dq.set_grads(big.grads[s]);
    df.set_grads(small.grads[s]);
    ocu::step(e, ctl, gq, gf);
  }
  auto const c = ctl.read_control_blocking(e);
  CHECK(c.step == 3);
  CHECK(c.grad_norm == host_norm); // one summation order on both (optim/detail/grad_norm.hpp)
  check_same_as_host(dq, host, big_index);
  check_same_as_host(df, host, small_index);
}

//! The norm pass of two groups (tensors with group[i] == 0 registered first) against the host's
//! grad_norm_partials: every partial bit for bit, then the resolved norm.
template <class G>
void check_norm_partials(std::vector<std::size_t> const& sizes,
                         std::vector<std::uint8_t> const& group, unsigned seed) {
  auto const pr = make_problem<G, G>(sizes, 1, seed, true);
  problem<G, G> part[2];
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    auto& dst = part[group[i]];
    dst.sizes.push_back(sizes[i]);
    dst.params.push_back(pr.params[i]);
    if (dst.grads.empty())
      dst.grads.emplace_back();
    dst.grads[0].push_back(pr.grads[0][i]);
  }
  for (auto& p : part)
    if (p.grads.empty())
      p.grads.emplace_back();
  memory::cuda_device_resource dres(0);
  exec::cuda const e{};
  ocu::cuda_step_options co;
  co.max_grad_norm = 1.0f;
  co.nonfinite = oq::nonfinite_policy::skip_element;
  ocu::step_controller ctl(e, dres, co);
  using group_t = ocu::multi_tensor_step<oq::adamw, oq::fp32_state, G, G>;
  device_problem<oq::adamw, oq::fp32_state, G, G> d0(part[0], oq::adamw{});
  device_problem<oq::adamw, oq::fp32_state, G, G> d1(part[1], oq::adamw{});
  group_t g0(e, d0.span(), dres, ctl);
  group_t g1(e, d1.span(), dres, ctl);
  g0.accumulate_norm(e);
  g1.accumulate_norm(e);
  std::vector<double> dev = to_host(ctl.partial_sum(0), ocu::norm_partials);
  auto const second = to_host(ctl.partial_sum(1), ocu::norm_partials);
  dev.insert(dev.end(), second.begin(), second.end());
  auto const views = test::host_views(pr.grads[0]);
  auto const [host, finite] =
      oq::detail::grad_norm_partials(exec::host{}, std::span<tensor_view<G const> const>(views),
                                     std::span<std::uint8_t const>(group));
  CHECK(!finite);
  REQUIRE(host.size() == dev.size());
  std::size_t differing = 0;
  for (std::size_t i = 0; i < host.size(); ++i)
    differing += std::memcmp(&host[i], &dev[i], sizeof(double)) != 0 ? 1 : 0;
  CHECK(differing == 0);
  ctl.resolve(e);
  double const sumsq = oq::detail::fold_norm_partials(host);
  CHECK(ctl.read_control_blocking(e).grad_norm == static_cast<float>(std::sqrt(sumsq)));
}

TEST_CASE("the global norm pass == the host's partials bit for bit (grad_norm.hpp's order)") {
  if (skip_without_gpu())
    return;
  SUBCASE("fp32, two groups, more pieces than the 8192 slots") {
    check_norm_partials<float>({std::size_t{2048} * 8192 + 3001, 5, 130, 77777, 4097},
                               {0, 1, 0, 0, 1}, 71);
  }
  SUBCASE("bf16 (runs of 8 per lane), an empty second group") {
    check_norm_partials<bf16>({100000, 3, 2049}, {0, 0, 0}, 72);
  }
}

TEST_CASE("a step captured in a CUDA graph replays exactly (lr, step and scalars on the device)") {
  if (skip_without_gpu())
    return;
  using P = float;
  auto const pr = make_problem<P, P>(odd_sizes(), 3, 31);
  memory::cuda_device_resource dres(0);
  cudaStream_t stream = nullptr;
  cuda_detail::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  exec::cuda const e{stream, 0};
  ocu::cuda_step_options co;
  co.lr = oq::lr_schedule::linear_warmup(1e-3f, 3);
  co.max_grad_norm = 1.0f;
  ocu::step_controller ctl_a(e, dres, co), ctl_b(e, dres, co);
  device_problem<oq::adamw, oq::int8_state, P, P> da(pr, oq::adamw{}), db(pr, oq::adamw{});
  ocu::multi_tensor_step<oq::adamw, oq::int8_state, P, P> ga(e, da.span(), dres, ctl_a);
  ocu::multi_tensor_step<oq::adamw, oq::int8_state, P, P> gb(e, db.span(), dres, ctl_b);
  cudaGraph_t graph = nullptr;
  cuda_detail::check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal),
                     "cudaStreamBeginCapture");
  ga.step(e);
  cuda_detail::check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
  cudaGraphExec_t exec_graph = nullptr;
  cuda_detail::check(cudaGraphInstantiate(&exec_graph, graph, 0), "cudaGraphInstantiate");
  for (std::size_t s = 0; s < pr.grads.size(); ++s) {
    da.set_grads(pr.grads[s], stream);
    db.set_grads(pr.grads[s], stream);
    cuda_detail::check(cudaGraphLaunch(exec_graph, stream), "cudaGraphLaunch");
    gb.step(e);
  }
  cuda_detail::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  CHECK(ctl_a.read_control_blocking(e).step == 3);
  CHECK(ctl_a.read_control_blocking(e).lr == ctl_b.read_control_blocking(e).lr);
  CHECK(da.snapshot() == db.snapshot());
  (void)cudaGraphExecDestroy(exec_graph);
  (void)cudaGraphDestroy(graph);
  (void)cudaStreamDestroy(stream);
}

TEST_CASE("found-inf and non-finite gradients skip the step without touching anything") {
  if (skip_without_gpu())
    return;
  using P = float;
  auto const pr = make_problem<P, P>(odd_sizes(), 2, 41);
  auto const bad = make_problem<P, P>(odd_sizes(), 1, 42, true);
  memory::cuda_device_resource dres(0);
  exec::cuda const e{};
  std::uint32_t* flag = nullptr;
  cuda_detail::check(cudaMalloc(&flag, 4), "cudaMalloc");
  cuda_detail::check(cudaMemset(flag, 0, 4), "cudaMemset");
  for (auto policy : {oq::nonfinite_policy::skip_step, oq::nonfinite_policy::raise}) {
    ocu::cuda_step_options co;
    co.nonfinite = policy;
    co.found_inf = flag;
    ocu::step_controller ctl(e, dres, co);
    device_problem<oq::adamw, oq::int8_state, P, P> d(pr, oq::adamw{});
    ocu::multi_tensor_step<oq::adamw, oq::int8_state, P, P> g(e, d.span(), dres, ctl);
    g.step(e); // one real step so that states and absmax are not all zero
    ctl.check_raise_blocking(e);
    auto const before = d.snapshot();
    // 1. the loss scaler's flag
    cuda_detail::check(cudaMemset(flag, 0xff, 4), "cudaMemset");
    d.set_grads(pr.grads[1]);
    g.step(e);
    auto c = ctl.read_control_blocking(e);
    CHECK(c.skip == 1);
    CHECK(c.step == 1);
    CHECK(c.skipped_steps == 1);
    CHECK(d.snapshot() == before);
    cuda_detail::check(cudaMemset(flag, 0, 4), "cudaMemset");
    // 2. a NaN and an inf in the gradients
    d.set_grads(bad.grads[0]);
    g.step(e);
    if (policy == oq::nonfinite_policy::raise)
      CHECK_THROWS_AS(ctl.check_raise_blocking(e), qmem::error);
    c = ctl.read_control_blocking(e);
    CHECK(c.skip == 1);
    CHECK(c.step == 1);
    CHECK(c.skipped_steps == 2);
    CHECK(d.snapshot() == before);
    // 3. finite gradients again: the step applies
    d.set_grads(pr.grads[1]);
    g.step(e);
    c = ctl.read_control_blocking(e);
    CHECK(c.skip == 0);
    CHECK(c.step == 2);
    CHECK(d.snapshot() != before);
  }
  (void)cudaFree(flag);
}

TEST_CASE("paged state: resident and fallback storage give the unpaged bits") {
  if (skip_without_gpu())
    return;
  using P = float;
  auto const pr = make_problem<P, P>(odd_sizes(), 3, 51);
  memory::cuda_device_resource dres(0);
  exec::cuda const e{};
  auto run = [&](memory::resource* storage, std::size_t budget, bool fallback) {
    ocu::step_controller ctl(e, dres, {});
    device_problem<oq::adamw, oq::int8_state, P, P> d(pr, oq::adamw{}, storage);
    ocu::multi_tensor_step<oq::adamw, oq::int8_state, P, P> g(e, d.span(), dres, ctl);
    if (storage == nullptr) {
      for (auto const& gs : pr.grads) {
        d.set_grads(gs);
        g.step(e);
      }
      return d.snapshot();
    }
    auto& ps = static_cast<ocu::paged_state_resource&>(*storage);
    ocu::pager<decltype(g)> pg(g, ps, budget);
    for (auto const& gs : pr.grads) {
      d.set_grads(gs);
      pg.step(e);
    }
    INFO("unified ", pg.unified(), ", oversubscribed ", pg.oversubscribed(), ", windows ",
         pg.window_count());
    if (pg.unified() && pg.oversubscribed()) {
      CHECK(pg.counters().evicted_bytes > 0);
      CHECK(pg.counters().prefetched_bytes >= pg.state_bytes());
    }
    CHECK(pg.unified() == (!fallback && ocu::query_paging_support(0).concurrent_managed_access));
    return d.snapshot();
  };
  auto const reference = run(nullptr, 0, false);
  ocu::paged_state_resource unified(0, std::size_t{1} << 30);
  CHECK(run(&unified, std::size_t{1} << 30, false) == reference); // fits: prefetched once
  ocu::paged_state_resource windows(0, std::size_t{1} << 30);
  CHECK(run(&windows, 64 * 1024, false) == reference); // small budget: many windows
  ocu::paged_state_resource fallback(0, 40000, true);  // part device, part pinned host
  CHECK(run(&fallback, 64 * 1024, true) == reference);
  CHECK(fallback.fallback_pinned_bytes() == 0); // all returned
}

TEST_CASE("paged state under real oversubscription completes with the unpaged bits") {
  if (skip_without_gpu())
    return;
  // 2^27 parameters, bf16 params and grads (512 MiB), fp32 AdamW state (1 GiB). The unpaged
  // reference runs first; then a cudaMalloc holds all but ~768 MiB of the device, so the state
  // cannot be resident (budget 384 MiB) and must page through windows.
  using P = bf16;
  std::size_t const n = std::size_t{1} << 27;
  problem<P, P> pr;
  pr.sizes = {n / 2, n / 4, n / 4};
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (std::size_t m : pr.sizes) {
    std::vector<P> p(m);
    for (auto& x : p)
      x = P(0.02f * nd(rng));
    pr.params.push_back(std::move(p));
  }
  for (int s = 0; s < 2; ++s) {
    pr.grads.emplace_back();
    for (std::size_t m : pr.sizes) {
      std::vector<P> g(m);
      for (auto& x : g)
        x = P(1e-3f * nd(rng));
      pr.grads.back().push_back(std::move(g));
    }
  }
  memory::cuda_device_resource dres(0);
  exec::cuda const e{};
  std::vector<std::uint8_t> reference;
  {
    ocu::step_controller ctl(e, dres, {});
    device_problem<oq::adamw, oq::fp32_state, P, P> d(pr, oq::adamw{});
    ocu::multi_tensor_step<oq::adamw, oq::fp32_state, P, P> g(e, d.span(), dres, ctl);
    for (auto const& gs : pr.grads) {
      d.set_grads(gs);
      g.step(e);
    }
    reference = d.snapshot();
  }
  std::size_t const budget = std::size_t{384} << 20;
  ocu::paged_state_resource storage(0, budget);
  ocu::step_controller ctl(e, dres, {});
  device_problem<oq::adamw, oq::fp32_state, P, P> d(pr, oq::adamw{}, &storage);
  ocu::multi_tensor_step<oq::adamw, oq::fp32_state, P, P> g(e, d.span(), dres, ctl);
  dres.trim(0);
  std::size_t free_bytes = 0, total_bytes = 0;
  cuda_detail::check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  std::size_t const leave = std::size_t{768} << 20;
  void* hog = nullptr;
  if (free_bytes > leave)
    cuda_detail::check(cudaMalloc(&hog, free_bytes - leave), "cudaMalloc(hog)");
  cuda_detail::check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  std::size_t const state = std::size_t{8} * n;
  MESSAGE("paged state ", state >> 20, " MiB with ", free_bytes >> 20, " MiB free on the device (",
          storage.unified() ? "unified memory" : "fallback storage", ")");
  CHECK(state > free_bytes);
  {
    ocu::pager<decltype(g)> pg(g, storage, budget);
    CHECK(pg.oversubscribed());
    for (auto const& gs : pr.grads) {
      d.set_grads(gs);
      pg.step(e);
    }
    cuda_detail::check(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize");
    MESSAGE("windows ", pg.window_count(), ", prefetched ", pg.counters().prefetched_bytes >> 20,
            " MiB, evicted ", pg.counters().evicted_bytes >> 20, " MiB");
    if (pg.unified())
      CHECK(pg.counters().evicted_bytes > 0);
  }
  if (hog != nullptr)
    (void)cudaFree(hog);
  CHECK(d.snapshot() == reference);
}

TEST_CASE(
    "optimizer_step: an optimizer's own (managed) state stepped on the GPU == its host step") {
  if (skip_without_gpu())
    return;
  using P = float;
  auto const pr = make_problem<P, P>(odd_sizes(), 3, 61);
  oq::optimizer_options oo = test::comparison_options();
  oo.max_grad_norm = 0.05f; // clipping over both groups (8-bit, and fp32 below 4096 elements)
  test::host_reference<oq::adamw, oq::int8_state, P> host(pr.params, oq::adamw{}, oo);
  memory::cuda_managed_resource managed(0);
  memory::cuda_device_resource dres(0);
  oq::optimizer<oq::adamw, oq::int8_state, P> gpu_opt(oq::adamw{}, oo, managed);
  test::managed_tensors<P> m(pr, gpu_opt, managed);
  exec::cuda const e{};
  ocu::optimizer_step<decltype(gpu_opt)> gpu(e, gpu_opt, m.grads, dres);
  for (auto const& step_grads : pr.grads) {
    (void)host.step(step_grads);
    m.set_grads(step_grads);
    gpu.step(e);
  }
  CHECK(gpu.controller().read_control_blocking(e).step == host.opt.step_count());
  m.check_params(host.params);
  gpu.store_step_blocking(e); // the step count and lr, for the comparison of the whole state
  test::check_same_state(gpu_opt, host.opt);
  // state the GPU cannot reach (host memory) is refused before anything is allocated
  oq::optimizer<oq::adamw, oq::int8_state, P> refused(oq::adamw{}, oo);
  CHECK_THROWS_AS(ocu::optimizer_step<decltype(refused)>(e, refused, {}, dres), qmem::bad_argument);
}

} // namespace
#endif
