// The optimizer features of the CUDA step beyond the element update: reducing rules (LAMB, LARS:
// per-tensor first pass), update-norm clipping (max_unorm), percentile clipping, their graph
// capture, and device_optimizer (parameters, gradients and state in plain device memory) with its
// save/load round trip. Every GPU case compares with the host optimizer bit for bit. The host
// cases check the summation order that makes this possible (optim/detail/tensor_sum.hpp).
#include <qmem/optim/checkpoint.hpp>
#include <qmem/optim/detail/grad_norm.hpp>
#include <qmem/optim/detail/tensor_sum.hpp>
#include <qmem/optim/optimizer.hpp>
#include <qmem/optim/rules.hpp>
#include <qmem/optim/state.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "cuda_test_support.hpp"
#include "support/backend.hpp"

#if QMEM_HAS_CUDA()
#include <qmem/memory/cuda_resource.cuh>
#include <qmem/optim/cuda/detail/optimizer_groups.cuh>
#include <qmem/optim/cuda/device_optimizer.cuh>
#include <qmem/optim/cuda/multi_tensor.cuh>
#include <qmem/optim/cuda/optimizer_step.cuh>
#endif

namespace {

using namespace qmem;
namespace oq = qmem::optim;

using test::make_problem;
using test::problem;

//! Runs the host optimizer over a problem with `threads` threads; returns the parameters.
template <class Rule, class Policy, class P>
std::vector<std::vector<P>> host_run(problem<P, P> const& pr, Rule rule, oq::optimizer_options oo,
                                     unsigned threads) {
  test::host_reference<Rule, Policy, P> host(pr.params, rule, oo);
  host.run(pr, {}, exec::host{threads});
  return host.params;
}

TEST_CASE("per-tensor sums: the fixed tree order of tensor_sum.hpp") {
  // fold_lanes is the warp butterfly: lane l adds lane l ^ o for o = 16 .. 1
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> ud(-1.0, 1.0);
  oq::detail::term_sums lanes[32];
  double butterfly[32];
  for (int l = 0; l < 32; ++l) {
    lanes[l] = {ud(rng) * std::ldexp(1.0, l % 7 * 9), ud(rng)};
    butterfly[l] = lanes[l].a;
  }
  for (int o = 16; o > 0; o >>= 1) {
    double next[32];
    for (int l = 0; l < 32; ++l)
      next[l] = butterfly[l] + butterfly[l ^ o];
    std::memcpy(butterfly, next, sizeof(next));
  }
  oq::detail::term_sums const folded = oq::detail::fold_lanes(lanes);
  for (int l = 0; l < 32; ++l)
    CHECK(std::memcmp(&butterfly[l], &folded.a, sizeof(double)) == 0);
  // fold_pieces: slots q % 256 in increasing q, then the halving tree
  std::vector<oq::detail::term_sums> pieces(1000);
  for (auto& p : pieces)
    p = {ud(rng) * 1e3, ud(rng) * 1e-3};
  double slot[256] = {};
  for (std::size_t q = 0; q < pieces.size(); ++q)
    slot[q % 256] += pieces[q].a;
  for (int h = 128; h > 0; h >>= 1)
    for (int i = 0; i < h; ++i)
      slot[i] += slot[i + h];
  oq::norm_terms const t = oq::detail::fold_pieces(pieces, pieces.size());
  CHECK(t.a == static_cast<float>(slot[0]));
  CHECK(oq::detail::sum_lane_of(0) == 0);
  CHECK(oq::detail::sum_lane_of(7) == 7);
  CHECK(oq::detail::sum_lane_of(31) == 31);
  CHECK(oq::detail::sum_lane_of(32) == 0);
  CHECK(oq::detail::sum_lane_of(2047) == 31);
}

//! A reducing rule that exposes the per-tensor totals: its terms are (g, p) (signed, of varied
//! magnitudes: the summation order shows in the result) and its update writes the total of the
//! terms `Which` selects into every parameter.
template <int Which>
struct probe_sum {
  static constexpr int state_count = 0;
  static constexpr std::array<oq::state_sign, 0> state_signs = {};
  struct scalars {
    float a, b;
  };
  QMEM_HOST_DEVICE scalars prepare(oq::step_info const&) const noexcept { return {0.0f, 0.0f}; }
  QMEM_HOST_DEVICE static oq::norm_terms reduce(float p, float g, oq::state_values<0>,
                                                scalars const&) noexcept {
    return {g, p};
  }
  QMEM_HOST_DEVICE static scalars finish(scalars, oq::norm_terms t) noexcept { return {t.a, t.b}; }
  QMEM_HOST_DEVICE static void update(float& p, float, oq::state_values<0>&,
                                      scalars const& k) noexcept {
    p = Which == 0 ? k.a : k.b;
  }
};
static_assert(oq::reducing_rule<probe_sum<0>>);

//! Values whose float sum depends on the summation order: over 60 binades, each value of the
//! first half cancelled by its negation in the second (shuffled), so the total is made of the
//! double rounding errors (checked: for n = 100000 a sequential sum, sums of 256-element chunks
//! and the documented tree give three different floats).
std::vector<float> order_sensitive(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  std::uniform_int_distribution<int> ex(-30, 30);
  std::vector<float> v(n);
  std::size_t const half = n / 2;
  for (std::size_t i = 0; i < n - half; ++i)
    v[i] = std::ldexp(ud(rng), ex(rng));
  for (std::size_t i = 0; i < half; ++i)
    v[n - half + i] = -v[i];
  std::shuffle(v.begin(), v.end(), rng);
  return v;
}

//! The documented order (tensor_sum.hpp), written out independently of the optimizer.
float reference_total(std::vector<float> const& t, std::vector<bool> const& skip) {
  std::size_t const pieces = (t.size() + 2047) / 2048;
  double slot[256] = {};
  for (std::size_t q = 0; q < pieces; ++q) {
    double lane[32] = {};
    for (std::size_t j = q * 2048; j < std::min(t.size(), (q + 1) * 2048); ++j)
      if (!skip[j])
        lane[j % 32] += static_cast<double>(t[j]);
    for (int o = 16; o > 0; o >>= 1)
      for (int l = 0; l < o; ++l)
        lane[l] += lane[l + o];
    slot[q % 256] += lane[0];
  }
  for (int h = 128; h > 0; h >>= 1)
    for (int i = 0; i < h; ++i)
      slot[i] += slot[i + h];
  return static_cast<float>(slot[0]);
}

TEST_CASE("host per-tensor sums follow the documented order exactly (a probe rule)") {
  for (std::size_t n :
       {std::size_t{1}, std::size_t{2049}, std::size_t{100000}, std::size_t{600001}}) {
    INFO("n = ", n);
    auto p = order_sensitive(n, 5);
    auto g = order_sensitive(n, 6);
    if (n > 10) { // skip_element: a NaN adds nothing (its partner is zeroed: the rest cancels)
      float const old = g[7];
      g[7] = std::numeric_limits<float>::quiet_NaN();
      auto const partner = std::find(g.begin(), g.end(), -old);
      if (partner != g.end())
        *partner = 0.0f;
    }
    std::vector<bool> skip(n, false);
    for (std::size_t i = 0; i < n; ++i)
      skip[i] = !std::isfinite(g[i]);
    oq::optimizer_options o;
    o.nonfinite = oq::nonfinite_policy::skip_element;
    auto p0 = p;
    oq::optimizer<probe_sum<0>, oq::fp32_state, float> a(probe_sum<0>{}, o);
    a.add_param(tensor_view<float>(p0.data(), n, memory_space::host));
    (void)a.step(exec::host{2}, {tensor_view<float const>(g.data(), n, memory_space::host)});
    float const want_a = reference_total(g, skip);
    CHECK(std::memcmp(&p0[0], &want_a, 4) == 0);
    auto p1 = p;
    oq::optimizer<probe_sum<1>, oq::fp32_state, float> b(probe_sum<1>{}, o);
    b.add_param(tensor_view<float>(p1.data(), n, memory_space::host));
    (void)b.step(exec::host{3}, {tensor_view<float const>(g.data(), n, memory_space::host)});
    float const want_b = reference_total(p, skip);
    CHECK(std::memcmp(&p1[n - 1], &want_b, 4) == 0);
    if (n == 100000) { // the data can tell orders apart: a sequential sum gives another float
      double sequential = 0.0;
      for (std::size_t i = 0; i < n; ++i)
        sequential += skip[i] ? 0.0 : static_cast<double>(g[i]);
      CHECK(static_cast<float>(sequential) != want_a);
    }
  }
}

TEST_CASE("host LAMB, LARS and max_unorm do not depend on the thread count") {
  auto const pr = make_problem<float, float>({5000, 300001, 4097}, 3, 11);
  oq::optimizer_options oo;
  oo.min_quantized_size = 0;
  oo.max_unorm = 0.01f;
  auto const a1 = host_run<oq::lamb, oq::int8_state>(pr, oq::lamb{}, oo, 1);
  auto const a2 = host_run<oq::lamb, oq::int8_state>(pr, oq::lamb{}, oo, 2);
  auto const a3 = host_run<oq::lamb, oq::int8_state>(pr, oq::lamb{}, oo, 3);
  CHECK(a1 == a2);
  CHECK(a1 == a3);
  oq::optimizer_options lo;
  auto const b1 = host_run<oq::lars, oq::fp32_state>(pr, oq::lars{}, lo, 1);
  auto const b2 = host_run<oq::lars, oq::fp32_state>(pr, oq::lars{}, lo, 3);
  CHECK(b1 == b2);
  CHECK(a1 != pr.params);
  CHECK(b1 != pr.params);
}

//! Gradients whose sum of squares depends on the summation order: magnitudes over 40 binades
//! (squares over 80), so that every partial sum drops different low bits.
template <class G>
std::vector<G> wide_range(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  std::uniform_int_distribution<int> ex(-20, 20);
  std::vector<G> v(n);
  for (auto& x : v)
    x = from_float<G>(std::ldexp(ud(rng), ex(rng)));
  return v;
}

//! The global norm's sum of squares in the documented order (optim/detail/grad_norm.hpp),
//! written out independently of the library.
template <class G>
double reference_norm_sumsq(std::vector<std::vector<G>> const& grads,
                            std::vector<std::uint8_t> const& group) {
  std::size_t const run = 16 / sizeof(G);
  std::vector<double> partial(2048, 0.0);
  for (int gi = 0; gi < 2; ++gi) {
    std::vector<double> slot(8192, 0.0);
    std::size_t q = 0;
    for (std::size_t i = 0; i < grads.size(); ++i) {
      if (group[i] != gi)
        continue;
      for (std::size_t p = 0; p < grads[i].size(); p += 2048, ++q) {
        double lane[32] = {};
        for (std::size_t j = 0; j < std::min<std::size_t>(2048, grads[i].size() - p); ++j) {
          float const x = to_float(grads[i][p + j]);
          double const d = std::isfinite(x) ? static_cast<double>(x) : 0.0;
          lane[(j / run) % 32] += d * d;
        }
        for (int o = 16; o > 0; o >>= 1)
          for (int l = 0; l < o; ++l)
            lane[l] += lane[l + o];
        slot[q % 8192] += lane[0];
      }
    }
    for (std::size_t b = 0; b < 1024; ++b) {
      double s = 0.0;
      for (std::size_t w = 0; w < 8; ++w)
        s += slot[b * 8 + w];
      partial[static_cast<std::size_t>(gi) * 1024 + b] = s;
    }
  }
  double t[256];
  for (std::size_t k = 0; k < 256; ++k) {
    t[k] = 0.0;
    for (std::size_t i = k; i < partial.size(); i += 256)
      t[k] += partial[i];
  }
  for (std::size_t h = 128; h > 0; h >>= 1)
    for (std::size_t k = 0; k < h; ++k)
      t[k] += t[k + h];
  return t[0];
}

template <class G>
void check_global_norm_order(std::vector<std::size_t> const& sizes,
                             std::vector<std::uint8_t> const& group) {
  std::vector<std::vector<G>> grads;
  for (std::size_t i = 0; i < sizes.size(); ++i)
    grads.push_back(wide_range<G>(sizes[i], 70 + static_cast<unsigned>(i)));
  grads[0][1] = from_float<G>(std::numeric_limits<float>::quiet_NaN()); // adds nothing
  auto const views = test::host_views(grads);
  double const want = reference_norm_sumsq(grads, group);
  for (unsigned threads : {1u, 3u}) {
    auto const got = oq::detail::global_grad_sumsq(exec::host{threads},
                                                   std::span<tensor_view<G const> const>(views),
                                                   std::span<std::uint8_t const>(group));
    CHECK(std::memcmp(&got.sum, &want, sizeof(double)) == 0);
    CHECK(!got.finite);
  }
  double sequential = 0.0; // the data tells orders apart
  for (auto const& g : grads)
    for (auto const& x : g)
      sequential +=
          std::isfinite(to_float(x)) ? static_cast<double>(to_float(x)) * to_float(x) : 0.0;
  CHECK(sequential != want);
}

TEST_CASE("host global norm follows the documented order exactly (grad_norm.hpp)") {
  SUBCASE("fp32, both groups, more pieces than slots (17 M elements)") {
    check_global_norm_order<float>({5, std::size_t{2048} * 8192 + 3001, 130, 4097, 0, 77777},
                                   {1, 0, 0, 1, 0, 0});
  }
  SUBCASE("bf16 (runs of 8), one group") {
    check_global_norm_order<bf16>({3, 100000, 2047, 2049}, {0, 0, 0, 0});
  }
  SUBCASE("the optimizer's clipping uses that sum: tensors with policy state first") {
    std::vector<std::size_t> const sizes = {3000, 70000, 5000, 100}; // 4096 threshold
    problem<float, float> pr;
    pr.sizes = sizes;
    std::vector<std::vector<float>> grads;
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      pr.params.push_back(wide_range<float>(sizes[i], 80 + static_cast<unsigned>(i)));
      grads.push_back(wide_range<float>(sizes[i], 90 + static_cast<unsigned>(i)));
    }
    oq::optimizer_options o = test::comparison_options();
    o.max_grad_norm = 1e-3f;
    test::host_reference<oq::adamw, oq::int8_state, float> host(pr.params, oq::adamw{}, o);
    float const unscale = 0.5f;
    auto const r = host.step(grads, {unscale, false});
    double const sumsq = reference_norm_sumsq(grads, {1, 0, 0, 1});
    CHECK(r.grad_norm == static_cast<float>(std::sqrt(sumsq) * static_cast<double>(unscale)));
    double const norm = std::sqrt(sumsq) * static_cast<double>(unscale);
    CHECK(r.grad_scale ==
          static_cast<float>(unscale * (static_cast<double>(o.max_grad_norm) / (norm + 1e-6))));
  }
}

} // namespace

#if QMEM_HAS_CUDA()
namespace {

namespace ocu = qmem::optim::cuda;

using test::device_tensors;
using test::device_vector;
using test::skip_without_gpu;

//! Checks the parameters of `d` against `expected`, bit for bit.
template <class P, class G>
void check_params(device_tensors<P, G> const& d, std::vector<std::vector<P>> const& expected) {
  for (std::size_t i = 0; i < d.p.size(); ++i) {
    INFO("parameter ", i, " of size ", d.p[i]->n);
    CHECK(test::same_bits(d.p[i]->download(), expected[i].data(), expected[i].size()));
  }
}

//! `steps` of the host optimizer and of a device_optimizer over cudaMalloc'd tensors; parameters
//! and every state byte compared bit for bit (the device state read through copy_state_to).
template <class Rule, class Policy, class P>
void compare_device_optimizer(problem<P, P> const& pr, Rule rule, oq::optimizer_options oo,
                              bool capture = false) {
  using host_opt = test::host_reference<Rule, Policy, P>;
  host_opt host(pr.params, rule, oo);
  host.run(pr);
  // device
  cudaStream_t stream = nullptr;
  cuda_detail::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  {
    exec::cuda const e{stream, 0};
    memory::cuda_device_resource dres(0, stream);
    device_tensors<P, P> d(pr);
    ocu::device_optimizer<Rule, Policy, P> dev(e, rule, oo, dres);
    for (auto const& x : d.p)
      dev.add_param(e, tensor_view<P>(x->ptr, x->n, memory_space::device));
    dev.bind(e, d.grad_views());
    cudaGraphExec_t graph_exec = nullptr;
    cudaGraph_t graph = nullptr;
    if (capture) {
      cuda_detail::check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal),
                         "cudaStreamBeginCapture");
      dev.step(e);
      cuda_detail::check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
      cuda_detail::check(cudaGraphInstantiate(&graph_exec, graph, 0), "cudaGraphInstantiate");
    }
    for (auto const& step_grads : pr.grads) {
      cuda_detail::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      d.set_grads(step_grads); // synchronous copies, after the previous step finished
      if (capture)
        cuda_detail::check(cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch");
      else
        dev.step(e);
    }
    cuda_detail::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    CHECK(dev.step_count_blocking(e) == host.opt.step_count());
    check_params(d, host.params);
    host_opt mirror(pr.params, rule, oo);
    dev.copy_state_to(e, mirror.opt);
    test::check_same_state(mirror.opt, host.opt);
    if (oo.percentile < 100) {
      using access = oq::state_access<typename host_opt::optimizer_type>;
      CHECK(access::history(mirror.opt) == access::history(host.opt));
    }
    if (capture) {
      (void)cudaGraphExecDestroy(graph_exec);
      (void)cudaGraphDestroy(graph);
    }
  }
  (void)cudaStreamDestroy(stream);
}

std::vector<std::size_t> odd_sizes() { return {1, 31, 256, 257, 1000, 2049, 4097, 33333, 65536}; }

oq::optimizer_options options(float lr = 1e-3f) { return test::comparison_options(lr); }

TEST_CASE("CUDA LAMB and LARS == host optimizer, bit for bit (8-bit and fp32 states)") {
  if (skip_without_gpu())
    return;
  auto const pr = make_problem<float, float>(odd_sizes(), 3, 101);
  SUBCASE("LAMB, 8-bit state (and fp32 below 4096 elements)") {
    compare_device_optimizer<oq::lamb, oq::int8_state>(pr, oq::lamb{}, options());
  }
  SUBCASE("LAMB, fp32 state") {
    compare_device_optimizer<oq::lamb, oq::fp32_state>(pr, oq::lamb{}, options());
  }
  SUBCASE("LAMB, 4-bit state (blocks of 128), other weight decay") {
    oq::optimizer_options o = options();
    o.min_quantized_size = 0;
    compare_device_optimizer<oq::lamb, oq::int4_state>(pr, oq::lamb{.weight_decay = 0.1f}, o);
  }
  SUBCASE("LARS, 8-bit state") {
    compare_device_optimizer<oq::lars, oq::int8_state>(
        pr, oq::lars{.weight_decay = 1e-4f, .trust_coefficient = 0.02f}, options(0.1f));
  }
  SUBCASE("LARS, fp32 state") {
    compare_device_optimizer<oq::lars, oq::fp32_state>(pr, oq::lars{}, options(0.1f));
  }
  SUBCASE("LAMB, bf16 params with fp32 master weights and a cosine schedule") {
    auto const pb = make_problem<bf16, bf16>(odd_sizes(), 3, 102);
    oq::optimizer_options o = options();
    o.master_weights = true;
    o.lr = oq::lr_schedule::cosine(1e-3f, 1, 10, 1e-5f);
    compare_device_optimizer<oq::lamb, oq::int8_state>(pb, oq::lamb{}, o);
  }
  SUBCASE("a probe rule whose update writes the raw per-tensor totals") {
    problem<float, float> probe;
    probe.sizes = {1, 2049, 100000, 600001};
    std::vector<std::vector<float>> step_grads;
    for (std::size_t i = 0; i < probe.sizes.size(); ++i) {
      probe.params.push_back(order_sensitive(probe.sizes[i], 20 + static_cast<unsigned>(i)));
      step_grads.push_back(order_sensitive(probe.sizes[i], 30 + static_cast<unsigned>(i)));
    }
    probe.grads.push_back(step_grads);
    compare_device_optimizer<probe_sum<0>, oq::int8_state>(probe, probe_sum<0>{}, options());
    compare_device_optimizer<probe_sum<1>, oq::fp32_state>(probe, probe_sum<1>{}, options());
  }
  SUBCASE("LAMB over more than 256 pieces (the slot fold) with skip_element") {
    auto const big = make_problem<float, float>({600001, 3000}, 2, 103, true);
    compare_device_optimizer<oq::lamb, oq::int8_state>(big, oq::lamb{}, options());
  }
}

TEST_CASE("CUDA max_unorm and percentile clipping == host optimizer, bit for bit") {
  if (skip_without_gpu())
    return;
  auto const pr = make_problem<float, float>(odd_sizes(), 5, 111);
  SUBCASE("max_unorm, AdamW 8-bit") {
    oq::optimizer_options o = options();
    o.max_unorm = 0.01f; // Adam's first steps change p by ~lr: ||dp|| / ||p|| ~ 0.02 here
    compare_device_optimizer<oq::adamw, oq::int8_state>(pr, oq::adamw{}, o);
  }
  SUBCASE("max_unorm with LAMB, fp32 state") {
    oq::optimizer_options o = options(1e-2f);
    o.max_unorm = 0.005f;
    compare_device_optimizer<oq::lamb, oq::fp32_state>(pr, oq::lamb{}, o);
  }
  SUBCASE("percentile clipping, AdamW 8-bit, skip_step") {
    oq::optimizer_options o = options();
    o.percentile = 10; // the smallest norm seen: steps with larger norms are scaled down
    o.nonfinite = oq::nonfinite_policy::skip_step;
    compare_device_optimizer<oq::adamw, oq::int8_state>(pr, oq::adamw{}, o);
  }
  SUBCASE("percentile, global-norm and update-norm clipping together, Lion 8-bit") {
    oq::optimizer_options o = options(1e-4f);
    o.percentile = 50;
    o.max_grad_norm = 0.5f;
    o.max_unorm = 0.001f;
    compare_device_optimizer<oq::lion, oq::int8_state>(pr, oq::lion{}, o);
  }
  SUBCASE("percentile history past 100 steps wraps as on the host") {
    auto const many = make_problem<float, float>({300, 5000}, 103, 112);
    oq::optimizer_options o = options();
    o.percentile = 30;
    compare_device_optimizer<oq::adamw, oq::fp32_state>(many, oq::adamw{}, o);
  }
}

TEST_CASE("a LAMB step with max_unorm and percentile clipping captured in a CUDA graph == host") {
  if (skip_without_gpu())
    return;
  auto const pr = make_problem<float, float>(odd_sizes(), 4, 121);
  oq::optimizer_options o = options();
  o.max_unorm = 0.01f;
  o.percentile = 50;
  o.lr = oq::lr_schedule::linear_warmup(1e-3f, 3);
  compare_device_optimizer<oq::lamb, oq::int8_state>(pr, oq::lamb{}, o, true);
}

TEST_CASE("multi_tensor_step runs LAMB's reduction itself (no adaptor, one group)") {
  if (skip_without_gpu())
    return;
  auto const pr = make_problem<float, float>(odd_sizes(), 3, 131);
  oq::optimizer_options oo = options();
  oo.min_quantized_size = 0;
  test::host_reference<oq::lamb, oq::int8_state, float> host(pr.params, oq::lamb{}, oo);
  memory::cuda_device_resource dres(0);
  exec::cuda const e{};
  // the device optimizer's state buffers serve as plain group storage here
  ocu::device_optimizer<oq::lamb, oq::int8_state, float> storage(e, oq::lamb{}, oo, dres);
  device_tensors<float, float> d(pr);
  for (auto const& v : d.param_views())
    storage.add_param(e, v);
  ocu::cuda_step_options co;
  co.lr = oo.lr;
  co.nonfinite = oo.nonfinite;
  ocu::step_controller ctl(e, dres, co);
  using group_t = ocu::multi_tensor_step<oq::lamb, oq::int8_state, float, float>;
  static_assert(group_t::reducing && !group_t::unorm_capable);
  auto const grads = d.grad_views();
  auto const ts = ocu::detail::group_tensors<group_t>(storage.params(), std::span(grads), true);
  REQUIRE(ts.size() == pr.sizes.size());
  group_t group(e, std::span(ts), dres, ctl);
  for (auto const& step_grads : pr.grads) {
    (void)host.step(step_grads);
    d.set_grads(step_grads);
    group.step(e);
  }
  check_params(d, host.params);
  // a controller that clips update norms refuses a group without the adaptor
  ocu::cuda_step_options cu = co;
  cu.max_unorm = 0.1f;
  ocu::step_controller clipping(e, dres, cu);
  CHECK_THROWS_AS(group_t(e, std::span(ts), dres, clipping), qmem::bad_argument);
}

TEST_CASE("device_optimizer over cudaMalloc'd params: 10 steps == 5 + save + load + 5 steps") {
  if (skip_without_gpu())
    return;
  using P = bf16;
  using R = oq::adamw;
  using Pol = oq::int8_state;
  auto const pr = make_problem<P, P>(odd_sizes(), 10, 141);
  oq::optimizer_options o = options();
  o.master_weights = true;
  o.percentile = 50;
  o.max_grad_norm = 1.0f;
  o.lr = oq::lr_schedule::cosine(1e-3f, 2, 10, 1e-5f);
  auto const dir = std::filesystem::temp_directory_path();
  auto const path = dir / ("qmem_device_optimizer_" + std::to_string(::getpid()) + ".safetensors");
  memory::cuda_device_resource dres(0);
  exec::cuda const e{};
  auto run = [&](ocu::device_optimizer<R, Pol, P>& opt, device_tensors<P, P>& d, int from, int to) {
    for (int s = from; s < to; ++s) {
      cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
      d.set_grads(pr.grads[static_cast<std::size_t>(s)]);
      opt.step(e);
    }
    cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  };
  // per-parameter overrides: another lr scale, fp32 state for a tensor above the threshold
  auto overrides = [](std::size_t i, auto& po) {
    if (i == 2)
      po.lr_scale = 0.5f;
    if (i == 8)
      po.fp32_state = true;
  };
  auto make = [&](device_tensors<P, P>& d) {
    ocu::device_optimizer<R, Pol, P> opt(e, R{.weight_decay = 0.01f}, o, dres);
    auto const params = d.param_views();
    for (std::size_t i = 0; i < params.size(); ++i) {
      typename ocu::device_optimizer<R, Pol, P>::param_options po;
      overrides(i, po);
      opt.add_param(e, params[i], po);
    }
    opt.bind(e, d.grad_views());
    return opt;
  };
  // a host optimizer of the same layout (its parameters are not part of the state)
  using host_opt = test::host_reference<R, Pol, P>;
  auto host_of = [&] {
    return std::make_unique<host_opt>(pr.params, R{.weight_decay = 0.01f}, o, overrides);
  };
  // straight through
  device_tensors<P, P> da(pr);
  auto a = make(da);
  run(a, da, 0, 10);
  // 5 steps, save, a fresh optimizer (and fresh state) over the same parameters, load, 5 steps
  device_tensors<P, P> db(pr);
  {
    auto b = make(db);
    run(b, db, 0, 5);
    b.save(e, path);
  }
  auto c = make(db);
  CHECK(c.step_count_blocking(e) == 0);
  c.load(e, path);
  CHECK(c.step_count_blocking(e) == 5);
  run(c, db, 5, 10);
  CHECK(c.step_count_blocking(e) == 10);
  std::vector<std::vector<P>> straight;
  for (auto const& x : da.p)
    straight.push_back(x->download());
  check_params(db, straight);
  using access = oq::state_access<typename host_opt::optimizer_type>;
  auto const ha = host_of();
  auto const hc = host_of();
  a.copy_state_to(e, ha->opt);
  c.copy_state_to(e, hc->opt);
  test::check_same_state(ha->opt, hc->opt);
  CHECK(access::history(ha->opt) == access::history(hc->opt));
  // the file is the host optimizer's format: a host optimizer loads it
  auto const hl = host_of();
  oq::load_state(hl->opt, path);
  CHECK(hl->opt.step_count() == 5);
  // a corrupt file: format_error, the optimizer unchanged
  {
    std::FILE* f = std::fopen(path.string().c_str(), "r+b");
    REQUIRE(f != nullptr);
    std::fseek(f, -3, SEEK_END);
    int const byte = std::fgetc(f);
    REQUIRE(byte != EOF);
    std::fseek(f, -3, SEEK_END);
    std::fputc(byte ^ 0xff, f); // a changed byte of the last tensor's data
    std::fclose(f);
  }
  CHECK_THROWS_AS(c.load(e, path), qmem::format_error);
  CHECK(c.step_count_blocking(e) == 10);
  auto const hc2 = host_of();
  c.copy_state_to(e, hc2->opt);
  test::check_same_state(hc->opt, hc2->opt);
  std::filesystem::remove(path);
  // preconditions
  ocu::device_optimizer<R, Pol, P> empty(e, R{}, o, dres);
  std::vector<P> host_param(10);
  CHECK_THROWS_AS(
      empty.add_param(e, tensor_view<P>(host_param.data(), host_param.size(), memory_space::host)),
      qmem::bad_argument);
  CHECK_THROWS_AS(empty.step(e), qmem::bad_argument);
  CHECK(empty.size() == 0);
}

TEST_CASE("device_optimizer: the documented usage (docs/optim.md)") {
  if (skip_without_gpu())
    return;
  std::size_t const n = 10000;
  auto const pr = make_problem<bf16, bf16>({n}, 3, 161);
  device_vector<bf16> weights(pr.params[0]);
  device_vector<bf16> grads(pr.grads[0][0]);
  bf16* w = weights.ptr;
  bf16 const* g = grads.ptr;
  auto const path = std::filesystem::temp_directory_path() /
                    ("qmem_usage_" + std::to_string(::getpid()) + ".safetensors");
  cudaStream_t stream = nullptr;
  cuda_detail::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  {
    // -- usage --
    qmem::memory::cuda_device_resource device(0, stream);
    qmem::exec::cuda const gpu{stream, 0};
    qmem::optim::cuda::device_optimizer<qmem::optim::lamb, qmem::optim::int8_state, qmem::bf16> opt(
        gpu, qmem::optim::lamb{.weight_decay = 0.01f},
        {.lr = qmem::optim::lr_schedule::cosine(1e-3f, 10, 1000),
         .max_unorm = 1.0f,
         .master_weights = true},
        device);
    opt.add_param(gpu, qmem::tensor_view<qmem::bf16>(w, n, qmem::memory_space::device));
    opt.bind(gpu, {qmem::tensor_view<qmem::bf16 const>(g, n, qmem::memory_space::device)});
    for (int s = 0; s < 3; ++s)
      opt.step(gpu);     // no host synchronization: capturable in a CUDA graph
    opt.save(gpu, path); // the host optimizer's file format, written through host memory
    // -- end usage --
    CHECK(opt.step_count_blocking(gpu) == 3);
    CHECK(weights.download() != pr.params[0]);
    // the same storage again, or a part of it, would be updated twice per step: refused
    CHECK_THROWS_AS(
        opt.add_param(gpu, qmem::tensor_view<qmem::bf16>(w + 100, 10, qmem::memory_space::device)),
        qmem::bad_argument);
    CHECK(opt.size() == 1);
    qmem::optim::cuda::device_optimizer<qmem::optim::lamb, qmem::optim::int8_state, qmem::bf16>
        again(gpu, qmem::optim::lamb{.weight_decay = 0.01f},
              {.lr = qmem::optim::lr_schedule::cosine(1e-3f, 10, 1000),
               .max_unorm = 1.0f,
               .master_weights = true},
              device);
    again.add_param(gpu, qmem::tensor_view<qmem::bf16>(w, n, qmem::memory_space::device));
    again.load(gpu, path);
    CHECK(again.step_count_blocking(gpu) == 3);
    std::filesystem::remove(path);
  }
  (void)cudaStreamDestroy(stream);
}

TEST_CASE("optimizer_step: managed LAMB, max_unorm and percentile == host, resumable") {
  if (skip_without_gpu())
    return;
  using P = float;
  auto const pr = make_problem<P, P>(odd_sizes(), 4, 151);
  oq::optimizer_options oo = options();
  oo.max_unorm = 0.01f;
  oo.percentile = 50;
  test::host_reference<oq::lamb, oq::int8_state, P> host(pr.params, oq::lamb{}, oo);
  memory::cuda_managed_resource managed(0);
  memory::cuda_device_resource dres(0);
  oq::optimizer<oq::lamb, oq::int8_state, P> gpu_opt(oq::lamb{}, oo, managed);
  test::managed_tensors<P> m(pr, gpu_opt, managed);
  exec::cuda const e{};
  auto both_step = [&](ocu::optimizer_step<decltype(gpu_opt)>& gpu, std::size_t s) {
    (void)host.step(pr.grads[s]);
    m.set_grads(pr.grads[s]);
    gpu.step(e);
  };
  {
    ocu::optimizer_step<decltype(gpu_opt)> gpu(e, gpu_opt, m.grads, dres);
    for (std::size_t s = 0; s < 2; ++s)
      both_step(gpu, s);
    gpu.store_step_blocking(e); // the optimizer's host view: step 2 and the norm history
  }
  CHECK(gpu_opt.step_count() == 2);
  ocu::optimizer_step<decltype(gpu_opt)> resumed(e, gpu_opt, m.grads, dres); // from step 2
  for (std::size_t s = 2; s < 4; ++s)
    both_step(resumed, s);
  resumed.store_step_blocking(e);
  CHECK(gpu_opt.step_count() == host.opt.step_count());
  using access = oq::state_access<decltype(gpu_opt)>;
  CHECK(access::history(gpu_opt) == access::history(host.opt));
  m.check_params(host.params);
  test::check_same_state(gpu_opt, host.opt);
}

} // namespace
#endif
