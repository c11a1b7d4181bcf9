// Each update rule against an fp64 reference of its definition (written independently here),
// over 5 steps with fp32 state on the host optimizer; AdamW also against torch.optim.AdamW's
// formulas (decay before the update, bias corrections applied to the moments) within bitsandbytes'
// 32-bit tolerance (atol 1e-6, rtol 1e-5).
#include <qmem/optim.hpp>

#include <doctest/doctest.h>

#include <array>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace qmem;

struct problem {
  std::vector<float> p0;
  std::vector<std::vector<float>> grads;
};

problem make_problem(std::size_t n, int steps, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  problem pr;
  pr.p0.resize(n);
  for (auto& x : pr.p0)
    x = d(rng);
  for (int s = 0; s < steps; ++s) {
    std::vector<float> g(n);
    for (auto& x : g)
      x = 0.1f * d(rng);
    pr.grads.push_back(std::move(g));
  }
  return pr;
}

// fp64 state of one element and its reference update.
using ref_update = std::function<void(int t, double& p, double g, std::vector<double>& s)>;

// Runs rule R with fp32 state for the problem's steps and compares params and states with the
// fp64 reference; tolerance atol + rtol |ref|. A reducing rule gets `tensor_ref` instead.
template <optim::update_rule R>
void check_rule(R rule, float lr, ref_update ref, double atol, double rtol, int nstates,
                std::size_t n = 3000) {
  auto const pr = make_problem(n, 5, 7);
  std::vector<float> p = pr.p0;
  optim::optimizer<R, optim::fp32_state> opt(rule, {.lr = optim::lr_schedule::constant(lr)});
  opt.add_param(view(p));
  std::vector<double> rp(pr.p0.begin(), pr.p0.end());
  std::vector<std::vector<double>> rs(n,
                                      std::vector<double>(static_cast<std::size_t>(nstates), 0.0));
  for (int t = 1; t <= 5; ++t) {
    auto const& g = pr.grads[static_cast<std::size_t>(t - 1)];
    std::vector<tensor_view<float const>> gs{view(g)};
    REQUIRE(opt.step(exec::host{}, gs).applied);
    for (std::size_t i = 0; i < n; ++i)
      ref(t, rp[i], g[i], rs[i]);
  }
  std::size_t bad = 0;
  double worst = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    double const d = std::fabs(p[i] - rp[i]);
    worst = std::max(worst, d / (atol + rtol * std::fabs(rp[i])));
    bad += d > atol + rtol * std::fabs(rp[i]);
  }
  for (int k = 0; k < nstates; ++k) {
    auto const s = opt.state_values_of(0, k);
    for (std::size_t i = 0; i < n; ++i) {
      double const r = rs[i][static_cast<std::size_t>(k)];
      bad += std::fabs(s[i] - r) > atol + rtol * std::fabs(r);
    }
  }
  CAPTURE(worst);
  CHECK(bad == 0);
}

} // namespace

TEST_CASE("rules: AdamW and Adam against fp64 definitions") {
  float const lr = 1e-2f;
  optim::adamw aw{0.9f, 0.995f, 1e-8f, 0.01f};
  check_rule(
      aw, lr,
      [&](int t, double& p, double g, std::vector<double>& s) {
        double const b1 = aw.beta1, b2 = aw.beta2;
        s[0] = b1 * s[0] + (1 - b1) * g;
        s[1] = b2 * s[1] + (1 - b2) * g * g;
        double const c1 = 1 - std::pow(b1, t), c2 = std::sqrt(1 - std::pow(b2, t));
        p = p - lr * (s[0] / c1) / (std::sqrt(s[1]) / c2 + static_cast<double>(aw.eps));
        p = p * (1 - static_cast<double>(lr) * aw.weight_decay); // bitsandbytes' order
      },
      1e-6, 1e-5, 2);
  SUBCASE("torch.optim.AdamW's formulas, bitsandbytes' 32-bit tolerance") {
    optim::adamw torch_order = aw;
    torch_order.decay_first = true;
    check_rule(
        torch_order, lr,
        [&](int t, double& p, double g, std::vector<double>& s) {
          double const b1 = aw.beta1, b2 = aw.beta2;
          p = p * (1 - static_cast<double>(lr) * aw.weight_decay); // torch decays first
          s[0] = b1 * s[0] + (1 - b1) * g;
          s[1] = b2 * s[1] + (1 - b2) * g * g;
          double const bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
          double const denom = std::sqrt(s[1]) / std::sqrt(bc2) + aw.eps;
          p = p - (lr / bc1) * s[0] / denom;
        },
        1e-6, 1e-5, 2);
  }
  optim::adam a{0.9f, 0.999f, 1e-8f, 0.05f};
  check_rule(
      a, lr,
      [&](int t, double& p, double g, std::vector<double>& s) {
        g = g + static_cast<double>(a.weight_decay) * p; // L2
        s[0] = 0.9 * s[0] + 0.1 * g;
        s[1] = static_cast<double>(a.beta2) * s[1] + (1 - static_cast<double>(a.beta2)) * g * g;
        double const c1 = 1 - std::pow(0.9f, t),
                     c2 = std::sqrt(1 - std::pow(static_cast<double>(a.beta2), t));
        p = p - lr * (s[0] / c1) / (std::sqrt(s[1]) / c2 + 1e-8);
      },
      1e-6, 1e-5, 2);
}

TEST_CASE("rules: SGD (momentum, dampening, Nesterov, L2)") {
  for (bool nesterov : {false, true}) {
    CAPTURE(nesterov);
    optim::sgd r{0.9f, nesterov ? 0.0f : 0.1f, 0.01f, nesterov};
    float const lr = 0.05f;
    check_rule(
        r, lr,
        [&](int t, double& p, double g, std::vector<double>& s) {
          double const m = r.momentum;
          g = g + static_cast<double>(r.weight_decay) * p;
          s[0] = t == 1 ? g : m * s[0] + (1 - static_cast<double>(r.dampening)) * g;
          p = p - lr * (nesterov ? g + m * s[0] : s[0]);
        },
        1e-6, 1e-5, 1);
  }
}

TEST_CASE("rules: Lion") {
  optim::lion r{0.9f, 0.99f, 0.1f};
  float const lr = 1e-3f;
  check_rule(
      r, lr,
      [&](int, double& p, double g, std::vector<double>& s) {
        p = p * (1 - static_cast<double>(lr) * r.weight_decay);
        double const c =
            static_cast<double>(r.beta1) * s[0] + (1 - static_cast<double>(r.beta1)) * g;
        p = p - lr * (c > 0 ? 1.0 : (c < 0 ? -1.0 : 0.0));
        s[0] = static_cast<double>(r.beta2) * s[0] + (1 - static_cast<double>(r.beta2)) * g;
      },
      1e-6, 1e-5, 1);
}

TEST_CASE("rules: RMSprop (plain, centered, momentum)") {
  float const lr = 1e-3f;
  auto ref = [&](bool centered, bool momentum, double alpha, double eps, double wd, double mom) {
    return [=](int, double& p, double g, std::vector<double>& s) {
      g = g + wd * p;
      s[0] = alpha * s[0] + (1 - alpha) * g * g;
      double var = s[0];
      if (centered) {
        s[1] = alpha * s[1] + (1 - alpha) * g;
        var -= s[1] * s[1];
      }
      double const avg = std::sqrt(var) + eps;
      if (momentum) {
        std::size_t const b = centered ? 2 : 1;
        s[b] = mom * s[b] + g / avg;
        p -= lr * s[b];
      } else {
        p -= lr * g / avg;
      }
    };
  };
  check_rule(optim::rmsprop{0.99f, 1e-8f, 0.0f}, lr, ref(false, false, 0.99f, 1e-8f, 0, 0), 1e-6,
             1e-5, 1);
  // centered: sqrt(v - ga^2) cancels (variance of a near-constant gradient), so the fp32
  // rounding of v is amplified: a looser relative bound
  check_rule(optim::rmsprop_rule<true, true>{0.9f, 1e-6f, 0.01f, 0.5f}, lr,
             ref(true, true, 0.9f, 1e-6f, 0.01f, 0.5f), 1e-5, 1e-4, 3);
}

TEST_CASE("rules: Adagrad with lr decay") {
  optim::adagrad r{1e-10f, 0.01f, 0.1f};
  float const lr = 0.1f;
  check_rule(
      r, lr,
      [&](int t, double& p, double g, std::vector<double>& s) {
        double const clr = lr / (1 + (t - 1) * static_cast<double>(r.lr_decay));
        g = g + static_cast<double>(r.weight_decay) * p;
        s[0] += g * g;
        p -= clr * g / (std::sqrt(s[0]) + static_cast<double>(r.eps));
      },
      1e-6, 1e-5, 1);
}

TEST_CASE("rules: AdEMAMix with both schedulers") {
  optim::ademamix r;
  r.t_alpha = 4;
  r.t_beta3 = 4;
  float const lr = 1e-3f;
  check_rule(
      r, lr,
      [&](int t, double& p, double g, std::vector<double>& s) {
        double const b1 = r.beta1, b2 = r.beta2, b3f = r.beta3;
        double const alpha =
            std::min(t * static_cast<double>(r.alpha) / r.t_alpha, static_cast<double>(r.alpha));
        double const sc = static_cast<double>(t) / r.t_beta3;
        double const b3 = std::min(
            std::exp(std::log(b1) * std::log(b3f) / ((1 - sc) * std::log(b3f) + sc * std::log(b1))),
            b3f);
        s[0] = b1 * s[0] + (1 - b1) * g;
        s[2] = b3 * s[2] + (1 - b3) * g;
        s[1] = b2 * s[1] + (1 - b2) * g * g;
        double const c1 = 1 - std::pow(b1, t), c2 = std::sqrt(1 - std::pow(b2, t));
        p -= lr * (s[0] / c1 + alpha * s[2]) / (std::sqrt(s[1]) / c2 + static_cast<double>(r.eps));
        p *= 1 - static_cast<double>(lr) * r.weight_decay;
      },
      1e-6, 1e-5, 3);
}

// Reducing rules: the reference computes the tensor norms itself, so it runs tensor-wide.
TEST_CASE("rules: LAMB and LARS trust ratios against fp64 tensor-wide references") {
  std::size_t const n = 3000;
  auto const pr = make_problem(n, 5, 11);
  SUBCASE("LAMB") {
    optim::lamb r{0.9f, 0.999f, 1e-6f, 0.01f};
    float const lr = 1e-2f;
    std::vector<float> p = pr.p0;
    optim::optimizer<optim::lamb, optim::fp32_state> opt(r,
                                                         {.lr = optim::lr_schedule::constant(lr)});
    opt.add_param(view(p));
    std::vector<double> rp(pr.p0.begin(), pr.p0.end()), m(n, 0.0), v(n, 0.0), u(n);
    for (int t = 1; t <= 5; ++t) {
      auto const& g = pr.grads[static_cast<std::size_t>(t - 1)];
      std::vector<tensor_view<float const>> gs{view(g)};
      opt.step(exec::host{}, gs);
      double const c1 = 1 - std::pow(0.9f, t), c2 = 1 - std::pow(0.999f, t);
      double pn = 0, un = 0;
      for (std::size_t i = 0; i < n; ++i) {
        m[i] = 0.9f * m[i] + (1 - 0.9f) * g[i];
        v[i] = 0.999f * v[i] + (1 - 0.999f) * static_cast<double>(g[i]) * g[i];
        u[i] = (m[i] / c1) / (std::sqrt(v[i] / c2) + 1e-6f) + 0.01f * rp[i];
        pn += rp[i] * rp[i];
        un += u[i] * u[i];
      }
      double const trust = std::sqrt(pn) / std::sqrt(un);
      for (std::size_t i = 0; i < n; ++i)
        rp[i] -= lr * trust * u[i];
    }
    std::size_t bad = 0;
    for (std::size_t i = 0; i < n; ++i)
      bad += std::fabs(p[i] - rp[i]) > 1e-6 + 1e-5 * std::fabs(rp[i]);
    CHECK(bad == 0);
  }
  SUBCASE("LARS") {
    optim::lars r{0.9f, 1e-4f, 0.001f};
    float const lr = 0.1f;
    std::vector<float> p = pr.p0;
    optim::optimizer<optim::lars, optim::fp32_state> opt(r,
                                                         {.lr = optim::lr_schedule::constant(lr)});
    opt.add_param(view(p));
    std::vector<double> rp(pr.p0.begin(), pr.p0.end()), buf(n, 0.0);
    for (int t = 1; t <= 5; ++t) {
      auto const& g = pr.grads[static_cast<std::size_t>(t - 1)];
      std::vector<tensor_view<float const>> gs{view(g)};
      opt.step(exec::host{}, gs);
      double pn = 0, gn = 0;
      for (std::size_t i = 0; i < n; ++i) {
        pn += rp[i] * rp[i];
        gn += static_cast<double>(g[i]) * g[i];
      }
      pn = std::sqrt(pn);
      gn = std::sqrt(gn);
      double const local = 0.001f * pn / (gn + 1e-4f * pn);
      for (std::size_t i = 0; i < n; ++i) {
        buf[i] = 0.9f * buf[i] + lr * local * (g[i] + 1e-4f * rp[i]);
        rp[i] -= buf[i];
      }
    }
    std::size_t bad = 0;
    for (std::size_t i = 0; i < n; ++i)
      bad += std::fabs(p[i] - rp[i]) > 1e-6 + 1e-5 * std::fabs(rp[i]);
    CHECK(bad == 0);
  }
}

namespace {

// Whether the host optimizer refuses `r`, as its default rule (constructor) and as a
// per-parameter override (add_param), and, when it does, that nothing was added and the message
// names `field`.
template <class R>
bool refused(R const& r, char const* field) {
  bool ctor = false;
  try {
    optim::optimizer<R, optim::fp32_state> opt(r);
  } catch (qmem::bad_argument const& e) {
    ctor = std::string(e.what()).find(field) != std::string::npos;
  }
  optim::optimizer<R, optim::fp32_state> opt;
  std::vector<float> p(8, 1.0f);
  bool add = false;
  try {
    opt.add_param(tensor_view<float>(p.data(), p.size()), {.rule = r});
  } catch (qmem::bad_argument const& e) {
    add = std::string(e.what()).find(field) != std::string::npos && opt.size() == 0;
  }
  CHECK(ctor == add);
  return ctor && add;
}

template <class R>
bool accepted(R const& r) {
  try {
    optim::optimizer<R, optim::fp32_state> opt(r);
    std::vector<float> p(8, 1.0f);
    opt.add_param(tensor_view<float>(p.data(), p.size()), {.rule = r});
    return true;
  } catch (qmem::bad_argument const&) {
    return false;
  }
}

constexpr float nan_f = std::numeric_limits<float>::quiet_NaN();

// A user rule with its own check: the optimizer calls it.
struct checked_rule {
  static constexpr int state_count = 1;
  static constexpr std::array<optim::state_sign, 1> state_signs = {optim::state_sign::any};
  float scale = 1.0f;
  struct scalars {
    float lr;
  };
  void validate() const {
    QMEM_EXPECTS(scale > 0.0f, "checked_rule: scale is ", scale, "; expected > 0");
  }
  QMEM_HOST_DEVICE scalars prepare(optim::step_info const& si) const noexcept { return {si.lr}; }
  QMEM_HOST_DEVICE static void update(float& p, float g, optim::state_values<1>&,
                                      scalars const& k) noexcept {
    p -= k.lr * g;
  }
};
static_assert(optim::validated_rule<checked_rule> && optim::validated_rule<optim::adamw>);

} // namespace

// Ranges of torch.optim (adamw.py, sgd.py, rmsprop.py, adagrad.py) and bitsandbytes 0.50.2
// (optim/optimizer.py, Optimizer1State/Optimizer2State: every beta in [0, 1), lr, eps and weight
// decay >= 0): the values they refuse are refused, the edges they accept are accepted.
TEST_CASE("rules: hyper-parameters outside their ranges are refused where a rule enters") {
  // Adam, AdamW: 0 <= beta < 1, eps >= 0, weight_decay >= 0.
  CHECK(refused(optim::adamw{.beta1 = 1.0f}, "beta1"));
  CHECK(refused(optim::adamw{.beta1 = -0.1f}, "beta1"));
  CHECK(refused(optim::adamw{.beta2 = 1.0f}, "beta2"));
  CHECK(refused(optim::adam{.beta2 = nan_f}, "beta2"));
  CHECK(refused(optim::adamw{.eps = -1e-8f}, "eps"));
  CHECK(refused(optim::adam{.weight_decay = -0.01f}, "weight_decay"));
  CHECK(accepted(optim::adamw{.beta1 = 0.0f, .beta2 = 0.0f, .eps = 0.0f, .weight_decay = 0.0f}));
  CHECK(accepted(optim::adamw{.beta1 = 0.99999f, .beta2 = 0.99999f}));
  // SGD: momentum >= 0, weight_decay >= 0, Nesterov needs momentum > 0 and dampening 0.
  CHECK(refused(optim::sgd{.momentum = -0.5f}, "momentum"));
  CHECK(refused(optim::sgd{.weight_decay = -1.0f}, "weight_decay"));
  CHECK(refused(optim::sgd{.momentum = 0.0f, .nesterov = true}, "nesterov"));
  CHECK(refused(optim::sgd{.dampening = 0.1f, .nesterov = true}, "nesterov"));
  CHECK(refused(optim::sgd{.dampening = nan_f}, "dampening"));
  CHECK(accepted(optim::sgd{.momentum = 0.0f, .dampening = 0.5f}));
  CHECK(accepted(optim::sgd{.momentum = 0.9f, .nesterov = true}));
  // Lion: both betas in [0, 1).
  CHECK(refused(optim::lion{.beta1 = 1.5f}, "beta1"));
  CHECK(refused(optim::lion{.beta2 = 1.0f}, "beta2"));
  CHECK(refused(optim::lion{.weight_decay = -0.1f}, "weight_decay"));
  CHECK(accepted(optim::lion{.beta1 = 0.0f, .beta2 = 0.0f}));
  // RMSprop: alpha in [0, 1], eps, weight_decay, momentum >= 0.
  CHECK(refused(optim::rmsprop{.alpha = -0.1f}, "alpha"));
  CHECK(refused(optim::rmsprop{.alpha = 1.5f}, "alpha"));
  CHECK(refused(optim::rmsprop{.eps = -1.0f}, "eps"));
  CHECK(refused(optim::rmsprop_rule<true, true>{.momentum = -0.9f}, "momentum"));
  CHECK(accepted(optim::rmsprop_rule<true, true>{.alpha = 0.0f, .eps = 0.0f}));
  CHECK(accepted(optim::rmsprop{.alpha = 1.0f}));
  // Adagrad: eps, weight_decay, lr_decay >= 0.
  CHECK(refused(optim::adagrad{.eps = -1e-10f}, "eps"));
  CHECK(refused(optim::adagrad{.weight_decay = -1.0f}, "weight_decay"));
  CHECK(refused(optim::adagrad{.lr_decay = -0.5f}, "lr_decay"));
  CHECK(accepted(optim::adagrad{.eps = 0.0f, .lr_decay = 0.0f}));
  // LAMB: as Adam.
  CHECK(refused(optim::lamb{.beta1 = 1.0f}, "beta1"));
  CHECK(refused(optim::lamb{.eps = nan_f}, "eps"));
  CHECK(refused(optim::lamb{.weight_decay = -0.01f}, "weight_decay"));
  // LARS: momentum >= 0, weight_decay >= 0, trust_coefficient > 0 and finite.
  CHECK(refused(optim::lars{.momentum = -0.9f}, "momentum"));
  CHECK(refused(optim::lars{.trust_coefficient = 0.0f}, "trust_coefficient"));
  CHECK(refused(optim::lars{.trust_coefficient = std::numeric_limits<float>::infinity()},
                "trust_coefficient"));
  CHECK(accepted(optim::lars{.momentum = 0.0f, .weight_decay = 0.0f}));
  // AdEMAMix: three betas in [0, 1), alpha >= 0 and finite, t_alpha, t_beta3 >= 0 (0: off).
  CHECK(refused(optim::ademamix{.beta3 = 1.0f}, "beta3"));
  CHECK(refused(optim::ademamix{.beta1 = -0.1f}, "beta1"));
  CHECK(refused(optim::ademamix{.alpha = -1.0f}, "alpha"));
  CHECK(refused(optim::ademamix{.eps = -1.0f}, "eps"));
  CHECK(refused(optim::ademamix{.t_alpha = -1}, "t_alpha"));
  CHECK(refused(optim::ademamix{.t_beta3 = -5}, "t_beta3"));
  CHECK(accepted(optim::ademamix{.alpha = 0.0f, .t_alpha = 100, .t_beta3 = 100}));
  // The message names the rule, the field, the value and the range.
  try {
    optim::optimizer<optim::adamw, optim::fp32_state> opt(optim::adamw{.beta2 = 1.5f});
    FAIL("adamw{.beta2 = 1.5} was accepted");
  } catch (qmem::bad_argument const& e) {
    std::string const what = e.what();
    CHECK(what.find("adamw") != std::string::npos);
    CHECK(what.find("beta2 is 1.5") != std::string::npos);
    CHECK(what.find("[0, 1)") != std::string::npos);
  }
  // A user rule's validate() runs too.
  CHECK(refused(checked_rule{.scale = 0.0f}, "scale"));
  CHECK(accepted(checked_rule{.scale = 2.0f}));
}
