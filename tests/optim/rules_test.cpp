// Each update rule against an fp64 reference of its definition (written independently here),
// over 5 steps with fp32 state on the host optimizer; AdamW also against torch.optim.AdamW's
// formulas (decay before the update, bias corrections applied to the moments) within bitsandbytes'
// 32-bit tolerance (atol 1e-6, rtol 1e-5).
#include <qmem/optim.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <random>
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
