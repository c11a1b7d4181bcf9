// The optimizer: state policies (8-bit, 4-bit, bf16, FP8), state bytes per parameter through a
// memory resource, many tensors, size threshold and per-parameter overrides, non-finite
// policies, found-inf, clipping, schedules, 16-bit parameters, conversion, thread independence.
// The table encoder and the AVX2 step are tested in host_avx2_test.cpp.
#include <qmem/optim.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "optim_test_support.hpp"

namespace {

using namespace qmem;

// Counts the bytes live per category (what a tracking resource reports).
class counting_resource final : public memory::resource {
public:
  std::size_t live[memory::category_count] = {};
  [[nodiscard]] memory_space space() const noexcept override { return memory_space::host; }

private:
  void* do_allocate(std::size_t bytes, std::size_t alignment, memory::category c) override {
    live[static_cast<std::size_t>(c)] += bytes;
    return ::operator new (bytes == 0 ? 1 : bytes, std::align_val_t{alignment});
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment,
                     memory::category c) noexcept override {
    live[static_cast<std::size_t>(c)] -= bytes;
    ::operator delete (p, std::align_val_t{alignment});
  }
};

using test::randn;

template <class Opt>
void run_steps(Opt& opt, std::vector<std::vector<float>> const& grads, int steps,
               unsigned threads = 0) {
  for (int s = 0; s < steps; ++s) {
    std::vector<tensor_view<float const>> gs;
    for (auto const& g : grads)
      gs.push_back(view(g));
    REQUIRE(opt.step(exec::host{threads}, gs).applied);
  }
}

} // namespace

TEST_CASE_TEMPLATE("policies: quantized AdamW states follow the fp32 states", Policy,
                   optim::int8_state, optim::int4_state, optim::bf16_state,
                   optim::quantized_state<quant::fp8_e4m3>) {
  std::size_t const n = 20000;
  auto const p0 = randn(n, 1.0f, 1);
  std::vector<float> pa = p0, pb = p0;
  optim::optimizer<optim::adamw, optim::fp32_state> ref(
      {}, {.lr = optim::lr_schedule::constant(1e-3f)});
  optim::optimizer<optim::adamw, Policy> q({}, {.lr = optim::lr_schedule::constant(1e-3f)});
  ref.add_param(view(pa));
  q.add_param(view(pb));
  REQUIRE(q.params()[0].quantized);
  for (int s = 0; s < 10; ++s) {
    auto const g = randn(n, 0.1f, 100 + static_cast<unsigned>(s));
    std::vector<tensor_view<float const>> gs{view(g)};
    ref.step(exec::host{}, gs);
    q.step(exec::host{}, gs);
  }
  // the first moment: quantization error relative to its scale (4-bit: 16 levels)
  auto const m_ref = ref.state_values_of(0, 0);
  auto const m_q = q.state_values_of(0, 0);
  double err = 0.0, mag = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    err += std::fabs(m_ref[i] - m_q[i]);
    mag += std::fabs(m_ref[i]);
  }
  double const rel = err / mag;
  CAPTURE(rel);
  CHECK(rel < (std::is_same_v<Policy, optim::int4_state> ? 0.35 : 0.05)); // 4-bit: 16 levels
  double dp = 0.0;
  for (std::size_t i = 0; i < n; ++i)
    dp = std::max(dp, static_cast<double>(std::fabs(pa[i] - pb[i])));
  CHECK(dp < 10 * 1e-3); // params move by ~lr per step; the quantized run stays near
}

TEST_CASE("state bytes per parameter, measured through the memory resource") {
  std::size_t const n = std::size_t{1} << 20;
  std::vector<float> p(n, 0.5f);
  auto bytes_per_param = [&]<class Policy>() {
    counting_resource r;
    {
      optim::optimizer<optim::adamw, Policy> opt({}, {}, r);
      opt.add_param(view(p));
      double const b =
          static_cast<double>(r.live[static_cast<std::size_t>(memory::category::optimizer_state)]) /
          static_cast<double>(n);
      CHECK(opt.state_bytes() ==
            r.live[static_cast<std::size_t>(memory::category::optimizer_state)]);
      return b;
    }
  };
  double const b32 = bytes_per_param.template operator()<optim::fp32_state>();
  double const b8 = bytes_per_param.template operator()<optim::int8_state>();
  double const b4 = bytes_per_param.template operator()<optim::int4_state>();
  double const b16 = bytes_per_param.template operator()<optim::bf16_state>();
  MESSAGE("AdamW state bytes/param: fp32 " << b32 << ", bf16 " << b16 << ", 8-bit " << b8
                                           << ", 4-bit " << b4);
  CHECK(b32 == doctest::Approx(8.0).epsilon(1e-4));
  CHECK(b16 == doctest::Approx(4.0).epsilon(1e-4));
  CHECK(b8 == doctest::Approx(2.03125).epsilon(1e-4));
  CHECK(b4 == doctest::Approx(1.0625).epsilon(1e-4));
}

TEST_CASE("many tensors: threshold, per-parameter overrides, one step covers all") {
  std::vector<std::size_t> sizes = {1, 100, 4095, 4096, 5000, 70001};
  std::vector<std::vector<float>> ps, grads;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    ps.push_back(randn(sizes[i], 1.0f, 10 + static_cast<unsigned>(i)));
    grads.push_back(randn(sizes[i], 0.1f, 20 + static_cast<unsigned>(i)));
  }
  auto p_single = ps;
  optim::optimizer<optim::adamw, optim::int8_state> opt(
      {}, {.lr = optim::lr_schedule::constant(1e-2f)});
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    decltype(opt)::param_options o;
    if (i == 4)
      o.fp32_state = true; // e.g. an embedding kept 32-bit
    if (i == 5) {
      o.rule = optim::adamw{0.8f, 0.99f, 1e-8f, 0.0f};
      o.lr_scale = 0.5f;
    }
    opt.add_param(view(ps[i]), o);
  }
  CHECK(!opt.params()[0].quantized);
  CHECK(!opt.params()[2].quantized);
  CHECK(opt.params()[3].quantized);
  CHECK(!opt.params()[4].quantized);
  CHECK(opt.params()[5].quantized);
  run_steps(opt, grads, 3);
  // each tensor alone gives the same bits as the multi-tensor step
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    CAPTURE(i);
    optim::optimizer<optim::adamw, optim::int8_state> one(
        {}, {.lr = optim::lr_schedule::constant(1e-2f)});
    decltype(one)::param_options o;
    o.fp32_state = i == 4;
    if (i == 5) {
      o.rule = optim::adamw{0.8f, 0.99f, 1e-8f, 0.0f};
      o.lr_scale = 0.5f;
    }
    one.add_param(view(p_single[i]), o);
    run_steps(one, {grads[i]}, 3);
    CHECK(std::memcmp(p_single[i].data(), ps[i].data(), sizes[i] * 4) == 0);
  }
}

TEST_CASE("results do not depend on the number of threads") {
  std::size_t const n = 300000;
  auto const p0 = randn(n, 1.0f, 3);
  auto const g = randn(n, 0.1f, 4);
  std::vector<float> a = p0, b = p0;
  optim::optimizer<optim::lamb, optim::int8_state> oa, ob;
  oa.add_param(view(a));
  ob.add_param(view(b));
  run_steps(oa, {g}, 3, 1);
  run_steps(ob, {g}, 3, 2);
  CHECK(std::memcmp(a.data(), b.data(), n * 4) == 0);
  for (int k = 0; k < 2; ++k)
    CHECK(std::memcmp(oa.params()[0].data[static_cast<std::size_t>(k)].data(),
                      ob.params()[0].data[static_cast<std::size_t>(k)].data(), n) == 0);
}

TEST_CASE("non-finite gradients: skip step, skip element, raise; found_inf") {
  std::size_t const n = 5000;
  auto const p0 = randn(n, 1.0f, 5);
  auto g = randn(n, 0.1f, 6);
  auto const clean = g;
  g[1234] = std::numeric_limits<float>::quiet_NaN();
  g[77] = std::numeric_limits<float>::infinity();
  std::vector<tensor_view<float const>> gs{view(g)};

  SUBCASE("skip_step: nothing changes, the step is not counted") {
    std::vector<float> p = p0;
    optim::optimizer<optim::adamw, optim::int8_state> opt;
    opt.add_param(view(p));
    auto const codes_before = opt.state_values_of(0, 0);
    auto const r = opt.step(exec::host{}, gs);
    CHECK(!r.applied);
    CHECK(opt.step_count() == 0);
    CHECK(std::memcmp(p.data(), p0.data(), n * 4) == 0);
    CHECK(opt.state_values_of(0, 0) == codes_before);
  }
  SUBCASE("raise: throws before writing") {
    std::vector<float> p = p0;
    optim::optimizer<optim::adamw, optim::int8_state> opt(
        {}, {.nonfinite = optim::nonfinite_policy::raise});
    opt.add_param(view(p));
    CHECK_THROWS_AS(opt.step(exec::host{}, gs), qmem::error);
    CHECK(std::memcmp(p.data(), p0.data(), n * 4) == 0);
    CHECK(opt.step_count() == 0);
  }
  SUBCASE("skip_element: the bad elements keep param and state, the others update") {
    std::vector<float> p = p0, q = p0;
    optim::optimizer<optim::adamw, optim::fp32_state> opt(
        {}, {.nonfinite = optim::nonfinite_policy::skip_element});
    optim::optimizer<optim::adamw, optim::fp32_state> ref;
    opt.add_param(view(p));
    ref.add_param(view(q));
    CHECK(opt.step(exec::host{}, gs).applied);
    std::vector<tensor_view<float const>> cs{view(clean)};
    ref.step(exec::host{}, cs);
    CHECK(p[1234] == p0[1234]);
    CHECK(p[77] == p0[77]);
    CHECK(opt.state_values_of(0, 0)[1234] == 0.0f);
    CHECK(opt.state_values_of(0, 1)[77] == 0.0f);
    CHECK(p[0] == q[0]);
    CHECK(p[4999] == q[4999]);
  }
  SUBCASE("found_inf from a loss scaler skips without touching state") {
    std::vector<float> p = p0;
    optim::optimizer<optim::adamw, optim::int8_state> opt;
    opt.add_param(view(p));
    std::vector<tensor_view<float const>> cs{view(clean)};
    auto const r = opt.step(exec::host{}, cs, {.grad_unscale = 0.5f, .found_inf = true});
    CHECK(!r.applied);
    CHECK(std::memcmp(p.data(), p0.data(), n * 4) == 0);
    CHECK(opt.step_count() == 0);
  }
}

TEST_CASE("clipping: global norm, unscale, max_unorm, percentile") {
  std::size_t const n = 5000;
  auto const p0 = randn(n, 1.0f, 7);
  auto const g = randn(n, 1.0f, 8);
  double sq = 0;
  for (float x : g)
    sq += static_cast<double>(x) * x;
  double const norm = std::sqrt(sq);
  std::vector<tensor_view<float const>> gs{view(g)};
  SUBCASE("global grad-norm clipping equals a step on pre-scaled gradients") {
    std::vector<float> p = p0, q = p0;
    optim::optimizer<optim::sgd, optim::fp32_state> a(
        {}, {.lr = optim::lr_schedule::constant(0.1f), .max_grad_norm = 0.3f});
    optim::optimizer<optim::sgd, optim::fp32_state> b({},
                                                      {.lr = optim::lr_schedule::constant(0.1f)});
    a.add_param(view(p));
    b.add_param(view(q));
    auto const r = a.step(exec::host{}, gs);
    CHECK(r.grad_norm == doctest::Approx(norm).epsilon(1e-6));
    float const scale = static_cast<float>(0.3 / (norm + 1e-6));
    CHECK(r.grad_scale == doctest::Approx(scale).epsilon(1e-6));
    std::vector<float> gsc(n);
    for (std::size_t i = 0; i < n; ++i)
      gsc[i] = g[i] * r.grad_scale;
    std::vector<tensor_view<float const>> ss{view(gsc)};
    b.step(exec::host{}, ss);
    CHECK(std::memcmp(p.data(), q.data(), n * 4) == 0);
  }
  SUBCASE("unscale multiplies every gradient") {
    std::vector<float> p = p0, q = p0;
    optim::optimizer<optim::sgd, optim::fp32_state> a, b;
    a.add_param(view(p));
    b.add_param(view(q));
    std::vector<float> g4(n);
    for (std::size_t i = 0; i < n; ++i)
      g4[i] = g[i] * 4.0f;
    std::vector<tensor_view<float const>> s4{view(g4)};
    a.step(exec::host{}, s4, {.grad_unscale = 0.25f});
    b.step(exec::host{}, gs);
    CHECK(std::memcmp(p.data(), q.data(), n * 4) == 0);
  }
  SUBCASE("max_unorm bounds the update norm") {
    std::vector<float> p = p0;
    optim::optimizer<optim::sgd, optim::fp32_state> a(
        {}, {.lr = optim::lr_schedule::constant(1.0f), .max_unorm = 0.01f});
    a.add_param(view(p));
    a.step(exec::host{}, gs);
    double du = 0, pn = 0;
    for (std::size_t i = 0; i < n; ++i) {
      du += (static_cast<double>(p[i]) - p0[i]) * (static_cast<double>(p[i]) - p0[i]);
      pn += static_cast<double>(p0[i]) * p0[i];
    }
    CHECK(std::sqrt(du) == doctest::Approx(0.01 * std::sqrt(pn)).epsilon(1e-4));
  }
  SUBCASE("percentile clipping scales a spike down to the history's percentile") {
    std::vector<float> p = p0;
    optim::optimizer<optim::sgd, optim::fp32_state> a({}, {.percentile = 50});
    a.add_param(view(p));
    for (int s = 0; s < 5; ++s)
      CHECK(a.step(exec::host{}, gs).grad_scale == 1.0f);
    std::vector<float> big(n);
    for (std::size_t i = 0; i < n; ++i)
      big[i] = g[i] * 10.0f;
    std::vector<tensor_view<float const>> bs{view(big)};
    auto const r = a.step(exec::host{}, bs);
    CHECK(r.grad_scale == doctest::Approx(0.1).epsilon(1e-5));
  }
}

TEST_CASE("lr schedules") {
  auto const c = optim::lr_schedule::constant(0.1f);
  CHECK(c(1) == 0.1f);
  CHECK(c(1000) == 0.1f);
  auto const w = optim::lr_schedule::linear_warmup(1.0f, 10);
  CHECK(w(1) == doctest::Approx(0.1));
  CHECK(w(5) == doctest::Approx(0.5));
  CHECK(w(10) == 1.0f);
  CHECK(w(50) == 1.0f);
  auto const cs = optim::lr_schedule::cosine(1.0f, 10, 110, 0.1f);
  CHECK(cs(5) == doctest::Approx(0.5));
  CHECK(cs(10) == doctest::Approx(1.0));
  CHECK(cs(60) == doctest::Approx(0.55));
  CHECK(cs(110) == doctest::Approx(0.1));
  CHECK(cs(500) == doctest::Approx(0.1));
  // the edges the header states: total <= warmup (total 0 included) does not decay, warmup 0
  // starts at lr, and a step past total stays at min_lr
  auto const flat = optim::lr_schedule::cosine(1.0f, 10, 10, 0.1f);
  CHECK(flat(5) == doctest::Approx(0.5));
  CHECK(flat(10) == 1.0f);
  CHECK(flat(11) == 1.0f);
  CHECK(flat(1000) == 1.0f);
  CHECK(optim::lr_schedule::cosine(1.0f, 20, 5, 0.1f)(30) == 1.0f);
  CHECK(optim::lr_schedule::cosine(1.0f, 0, 0, 0.1f)(1) == 1.0f);
  CHECK(optim::lr_schedule::cosine(1.0f, 0, 0, 0.1f)(100) == 1.0f);
  CHECK(optim::lr_schedule::cosine(1.0f, 0, 100, 0.1f)(1) == doctest::Approx(1.0).epsilon(1e-3));
  CHECK(optim::lr_schedule::linear_warmup(1.0f, 0)(1) == 1.0f);
  CHECK(optim::lr_schedule::cosine(1.0f, 0, 100, 0.1f)(std::numeric_limits<std::int32_t>::max()) ==
        0.1f);
  // the optimizer uses the schedule's value of the step it takes
  std::vector<float> p(10, 1.0f), g(10, 1.0f);
  optim::optimizer<optim::sgd, optim::fp32_state> opt({0.0f}, {.lr = w});
  opt.add_param(view(p));
  std::vector<tensor_view<float const>> gs{view(g)};
  opt.step(exec::host{}, gs);
  CHECK(opt.last_lr() == w(1));
  CHECK(p[0] == 1.0f - w(1));
}

TEST_CASE("bf16 parameters: fp32 master weights, stochastic rounding") {
  std::size_t const n = 8192;
  auto const p0 = randn(n, 1.0f, 9);
  std::vector<bf16> pb(n);
  for (std::size_t i = 0; i < n; ++i)
    pb[i] = bf16(p0[i]);
  auto const g = randn(n, 0.1f, 10);
  std::vector<tensor_view<float const>> gs{view(g)};
  SUBCASE("master weights: the parameter is the rounding of an fp32 trajectory") {
    std::vector<float> pf(n);
    for (std::size_t i = 0; i < n; ++i)
      pf[i] = pb[i].to_float();
    optim::optimizer<optim::adamw, optim::int8_state, bf16> a({}, {.master_weights = true});
    optim::optimizer<optim::adamw, optim::int8_state> b;
    a.add_param(view(pb));
    b.add_param(view(pf));
    for (int s = 0; s < 5; ++s) {
      a.step(exec::host{}, gs);
      b.step(exec::host{}, gs);
    }
    for (std::size_t i = 0; i < n; ++i)
      REQUIRE(pb[i] == bf16(pf[i]));
  }
  SUBCASE("stochastic rounding moves bf16 params by sub-ulp updates on average") {
    // lr far below bf16's resolution at 1.0: nearest rounding never moves, SR does on average
    std::vector<bf16> ones(n, bf16(1.0f)), ones_sr(n, bf16(1.0f));
    std::vector<float> unit(n, 1.0f);
    std::vector<tensor_view<float const>> us{view(unit)};
    optim::optimizer<optim::sgd, optim::fp32_state, bf16> nearest(
        {0.0f}, {.lr = optim::lr_schedule::constant(1e-4f)});
    optim::optimizer<optim::sgd, optim::fp32_state, bf16> sr(
        {0.0f}, {.lr = optim::lr_schedule::constant(1e-4f),
                 .rounding = optim::param_rounding::stochastic,
                 .seed = 42});
    nearest.add_param(view(ones));
    sr.add_param(view(ones_sr));
    for (int s = 0; s < 20; ++s) {
      nearest.step(exec::host{}, us);
      sr.step(exec::host{}, us);
    }
    CHECK(ones[0] == bf16(1.0f));
    double mean = 0;
    for (auto v : ones_sr)
      mean += v.to_float();
    mean /= static_cast<double>(n);
    CHECK(mean == doctest::Approx(1.0 - 20 * 1e-4).epsilon(2e-4));
  }
  SUBCASE("stochastic rounding of f16 parameters is refused") {
    using opt_t = optim::optimizer<optim::sgd, optim::fp32_state, f16>;
    CHECK_THROWS_AS(opt_t({}, {.rounding = optim::param_rounding::stochastic}), qmem::bad_argument);
  }
}

TEST_CASE("explicit conversion of 32-bit state to 8-bit") {
  std::size_t const n = 10000;
  auto p = randn(n, 1.0f, 12);
  auto const g = randn(n, 0.1f, 13);
  optim::optimizer<optim::adamw, optim::fp32_state> f32;
  f32.add_param(view(p));
  run_steps(f32, {g}, 3);
  auto q8 = f32.converted<optim::int8_state>();
  CHECK(q8.step_count() == 3);
  CHECK(q8.params()[0].quantized);
  for (int k = 0; k < 2; ++k) {
    auto const a = f32.state_values_of(0, k);
    auto const b = q8.state_values_of(0, k);
    double amax = 0;
    for (float x : a)
      amax = std::max(amax, static_cast<double>(std::fabs(x)));
    for (std::size_t i = 0; i < n; ++i)
      REQUIRE(std::fabs(a[i] - b[i]) <= 0.02 * amax + 1e-12);
  }
  run_steps(q8, {g}, 1);
  CHECK(q8.step_count() == 4);
}

TEST_CASE("bad arguments are refused before anything is written") {
  std::vector<float> p(100, 1.0f), g(99, 1.0f);
  optim::optimizer<optim::adamw, optim::int8_state> opt;
  opt.add_param(view(p));
  std::vector<tensor_view<float const>> gs{view(g)};
  CHECK_THROWS_AS(opt.step(exec::host{}, gs), qmem::bad_argument);
  std::vector<tensor_view<float const>> none;
  CHECK_THROWS_AS(opt.step(exec::host{}, none), qmem::bad_argument);
  CHECK(opt.step_count() == 0);
  CHECK(p[0] == 1.0f);
  using opt_t = optim::optimizer<optim::adamw, optim::int8_state>;
  CHECK_THROWS_AS(opt_t({}, {.percentile = 0}), qmem::bad_argument);
  CHECK_THROWS_AS(opt_t({}, {.lr = optim::lr_schedule::constant(-1.0f)}), qmem::bad_argument);
  CHECK_THROWS_AS(opt.add_param(tensor_view<float>(nullptr, 10)), qmem::bad_argument);
  // A negative warmup or total was taken as 0 silently.
  CHECK_THROWS_AS(opt_t({}, {.lr = optim::lr_schedule::linear_warmup(1e-3f, -10)}),
                  qmem::bad_argument);
  CHECK_THROWS_AS(opt_t({}, {.lr = optim::lr_schedule::cosine(1e-3f, 0, -100)}),
                  qmem::bad_argument);
  CHECK_NOTHROW(opt_t({}, {.lr = optim::lr_schedule::cosine(1e-3f, 0, 0)}));
  // An infinite lr, min_lr or lr_scale was accepted (only < 0 and NaN were refused): the first
  // step made every parameter inf, or NaN where the lr is inf x 0 (a cosine's end, a warmup).
  float const inf = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(opt_t({}, {.lr = optim::lr_schedule::constant(inf)}), qmem::bad_argument);
  CHECK_THROWS_AS(opt_t({}, {.lr = optim::lr_schedule::cosine(inf, 0, 10)}), qmem::bad_argument);
  CHECK_THROWS_AS(opt_t({}, {.lr = optim::lr_schedule::cosine(1e-3f, 0, 10, inf)}),
                  qmem::bad_argument);
  std::vector<float> p2(100, 1.0f);
  opt_t::param_options infinite_scale;
  infinite_scale.lr_scale = inf;
  CHECK_THROWS_WITH_AS(opt.add_param(view(p2), infinite_scale), doctest::Contains("lr_scale"),
                       qmem::bad_argument);
  CHECK(opt.size() == 1);
  // master_data(i) read past the parameters for i >= size() (no bounds check).
  CHECK(opt.master_data(0) == nullptr); // fp32 parameters keep no master copy
  CHECK_THROWS_AS((void)opt.master_data(1), qmem::bad_argument);
}

// converted() copied the step count but not the percentile-clipping history, so the converted
// optimizer clipped against a history of zeros: after 5 steps with percentile 50, its 6th step
// scaled the gradient by 0 where the original scaled it by 1.
TEST_CASE("conversion keeps the percentile-clipping history") {
  std::size_t const n = 3000;
  auto const g = randn(n, 1.0f, 21);
  std::vector<tensor_view<float const>> gs{view(g)};
  auto p = randn(n, 1.0f, 22);
  optim::optimizer<optim::sgd, optim::fp32_state> a({}, {.percentile = 50});
  a.add_param(view(p));
  for (int s = 0; s < 5; ++s)
    REQUIRE(a.step(exec::host{}, gs).applied);
  auto b = a.converted<optim::fp32_state>();
  auto c = a.converted<optim::int8_state>();
  auto const ra = a.step(exec::host{}, gs);
  auto const rb = b.step(exec::host{}, gs);
  auto const rc = c.step(exec::host{}, gs);
  CHECK(ra.grad_scale == 1.0f);
  CHECK(rb.grad_scale == ra.grad_scale);
  CHECK(rc.grad_scale == ra.grad_scale);
}

// set_step(t) on an optimizer without a percentile history (a resume by hand) started the
// history as zeros: the next step's window held t zeros and one measured norm, so its clip was 0
// and the gradient was scaled by 0. The unknown norms now count as +inf: no clip until measured
// norms reach the percentile's rank, then clipping as usual.
TEST_CASE("percentile clipping after set_step starts from unknown norms, not zeros") {
  std::size_t const n = 3000;
  auto const g = randn(n, 1.0f, 23);
  std::vector<tensor_view<float const>> gs{view(g)};
  auto p = randn(n, 1.0f, 24);
  optim::optimizer<optim::sgd, optim::fp32_state> a({}, {.percentile = 50});
  a.add_param(view(p));
  a.set_step(10, 0.001f);
  CHECK(a.step(exec::host{}, gs).grad_scale == 1.0f);
  for (int s = 0; s < 99; ++s) // the window (100 steps) now holds measured norms only
    REQUIRE(a.step(exec::host{}, gs).grad_scale == 1.0f);
  std::vector<float> big(n);
  for (std::size_t i = 0; i < n; ++i)
    big[i] = g[i] * 10.0f;
  std::vector<tensor_view<float const>> bs{view(big)};
  CHECK(a.step(exec::host{}, bs).grad_scale == doctest::Approx(0.1).epsilon(1e-5));
}

// The step count is an int32: step() at count 2^31 - 1 computed count + 1, a signed overflow
// (undefined; in practice step -2^31, whose bias correction and schedule wrote NaN or garbage
// into the parameters). It now refuses before writing anything.
TEST_CASE("step refuses to count past 2^31 - 1 steps") {
  std::vector<float> p(100, 0.5f);
  std::vector<float> const g(100, 0.1f);
  optim::optimizer<optim::adamw, optim::fp32_state> opt;
  opt.add_param(view(p));
  opt.set_step(std::numeric_limits<std::int32_t>::max() - 1, 0.001f);
  REQUIRE(opt.step(exec::host{}, {view(g)}).applied);
  CHECK(opt.step_count() == std::numeric_limits<std::int32_t>::max());
  auto const p1 = p;
  CHECK_THROWS_AS(opt.step(exec::host{}, {view(g)}), qmem::bad_argument);
  CHECK(p == p1);
  CHECK(opt.step_count() == std::numeric_limits<std::int32_t>::max());
}

// The host optimizer's state is read and written by host code, but a resource handing out device
// memory was accepted: the constructor then wrote the step counter through a device pointer (a
// crash with a real cudaMalloc resource). It is now refused before anything is allocated.
TEST_CASE("the host optimizer refuses a resource of device memory") {
  class device_like final : public memory::resource { // host bytes that claim to be device memory
  public:
    std::size_t allocations = 0;
    [[nodiscard]] memory_space space() const noexcept override { return memory_space::device; }

  private:
    void* do_allocate(std::size_t bytes, std::size_t alignment, memory::category) override {
      ++allocations;
      return ::operator new (bytes == 0 ? 1 : bytes, std::align_val_t{alignment});
    }
    void do_deallocate(void* p, std::size_t, std::size_t alignment,
                       memory::category) noexcept override {
      ::operator delete (p, std::align_val_t{alignment});
    }
  };
  device_like r;
  using opt_t = optim::optimizer<optim::adamw, optim::int8_state>;
  CHECK_THROWS_AS(opt_t({}, {}, r), qmem::bad_argument);
  CHECK(r.allocations == 0);
  std::vector<float> p(100, 0.5f);
  opt_t host;
  host.add_param(view(p));
  CHECK_THROWS_AS((void)host.converted<optim::fp32_state>(r), qmem::bad_argument);
  CHECK(r.allocations == 0);
}

// add_param accepted the same tensor twice (tied weights added once per module, say): each step
// then updated those elements twice, with two independent states. torch's optimizers refuse a
// parameter that appears twice; add_param now refuses one that overlaps an added parameter.
TEST_CASE("add_param refuses a parameter that shares memory with one already added") {
  std::vector<float> p(200, 0.5f);
  optim::optimizer<optim::adamw, optim::fp32_state> opt;
  opt.add_param(view(p).subview(0, 100));
  CHECK_THROWS_AS(opt.add_param(view(p).subview(0, 100)), qmem::bad_argument);
  CHECK_THROWS_AS(opt.add_param(view(p).subview(99, 50)), qmem::bad_argument);
  CHECK(opt.size() == 1);
  CHECK(opt.add_param(view(p).subview(100, 100)) == 1); // adjacent, not overlapping
  CHECK(opt.add_param(view(p).subview(0, 0)) == 2);     // empty views share nothing
}
