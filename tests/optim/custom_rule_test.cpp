// The user-written rule of examples/04_custom_optimizer (Adan): against an fp64 reference of its
// definition with fp32 state, run with every state policy (each must keep descending), and saved
// and resumed with its four states (the example's claim: nothing in qmem names Adan).
#include <qmem/optim.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include "../../examples/04_custom_optimizer/adan.hpp"

namespace {

using namespace qmem;

std::vector<float> grad_of(std::vector<float> const& p, int step) {
  std::vector<float> g(p.size());
  for (std::size_t i = 0; i < p.size(); ++i)
    g[i] = (p[i] - std::cos(0.1f * static_cast<float>(i))) *
           (1.0f + 0.1f * static_cast<float>(step % 3));
  return g;
}

template <class Policy>
double descend(int steps) {
  std::vector<float> p(6000, 0.0f);
  optim::optimizer<example::adan, Policy> opt({}, {.lr = optim::lr_schedule::constant(1e-2f)});
  opt.add_param(view(p));
  auto loss = [&] {
    double l = 0;
    for (std::size_t i = 0; i < p.size(); ++i)
      l += std::pow(p[i] - std::cos(0.1f * static_cast<float>(i)), 2);
    return l;
  };
  double const l0 = loss();
  for (int t = 0; t < steps; ++t) {
    auto const g = grad_of(p, t);
    opt.step(exec::host{}, {view(g)});
  }
  return loss() / l0;
}

} // namespace

TEST_CASE("custom rule (Adan from the example) against its fp64 definition") {
  example::adan r;
  float const lr = 1e-2f;
  std::vector<float> p(3000, 0.0f);
  std::vector<double> rp(p.size(), 0.0), m(p.size(), 0.0), v(p.size(), 0.0), nn(p.size(), 0.0),
      gp(p.size(), 0.0);
  optim::optimizer<example::adan, optim::fp32_state> opt(r,
                                                         {.lr = optim::lr_schedule::constant(lr)});
  opt.add_param(view(p));
  for (int t = 1; t <= 5; ++t) {
    auto const g = grad_of(p, t);
    opt.step(exec::host{}, {view(g)});
    double const b1 = r.beta1, b2 = r.beta2, b3 = r.beta3;
    for (std::size_t i = 0; i < p.size(); ++i) {
      double const gi = (rp[i] - std::cos(0.1f * static_cast<float>(i))) *
                        (1.0f + 0.1f * static_cast<float>(t % 3));
      double const diff = t == 1 ? 0.0 : gi - gp[i];
      m[i] = b1 * m[i] + (1 - b1) * gi;
      v[i] = b2 * v[i] + (1 - b2) * diff;
      nn[i] = b3 * nn[i] + (1 - b3) * (gi + b2 * diff) * (gi + b2 * diff);
      gp[i] = gi;
      double const eta = lr / (std::sqrt(nn[i] / (1 - std::pow(b3, t))) + r.eps);
      double const dir = m[i] / (1 - std::pow(b1, t)) + b2 * v[i] / (1 - std::pow(b2, t));
      rp[i] = (rp[i] - eta * dir) / (1 + static_cast<double>(lr) * r.weight_decay);
    }
  }
  std::size_t bad = 0;
  for (std::size_t i = 0; i < p.size(); ++i)
    bad += std::fabs(p[i] - rp[i]) > 1e-5 + 1e-4 * std::fabs(rp[i]);
  CHECK(bad == 0);
}

TEST_CASE("custom rule (Adan) runs with every state policy") {
  CHECK(descend<optim::fp32_state>(100) < 0.05);
  CHECK(descend<optim::bf16_state>(100) < 0.05);
  CHECK(descend<optim::int8_state>(100) < 0.05);
  CHECK(descend<optim::int4_state>(100) < 0.2);
  CHECK(descend<optim::quantized_state<quant::fp8_e4m3>>(100) < 0.1);
}

TEST_CASE("custom rule (Adan): 6 steps == 3 + save + load + 3, bit for bit, 8-bit state") {
  auto const path = std::filesystem::temp_directory_path() /
                    ("qmem_adan_" + std::to_string(::getpid()) + ".safetensors");
  using opt_t = optim::optimizer<example::adan, optim::int8_state>;
  optim::optimizer_options const o{.lr = optim::lr_schedule::cosine(1e-2f, 2, 6), .percentile = 50};
  std::vector<float> a(6000, 0.0f), b(6000, 0.0f);
  opt_t straight({}, o);
  straight.add_param(view(a));
  for (int t = 0; t < 6; ++t) {
    auto const g = grad_of(a, t);
    straight.step(exec::host{}, {view(g)});
  }
  {
    opt_t first({}, o);
    first.add_param(view(b));
    for (int t = 0; t < 3; ++t) {
      auto const g = grad_of(b, t);
      first.step(exec::host{}, {view(g)});
    }
    optim::save_state(first, path);
  }
  opt_t second({}, o);
  second.add_param(view(b));
  optim::load_state(second, path);
  for (int t = 3; t < 6; ++t) {
    auto const g = grad_of(b, t);
    second.step(exec::host{}, {view(g)});
  }
  CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  for (int k = 0; k < 4; ++k)
    CHECK(straight.state_values_of(0, k) == second.state_values_of(0, k));
  std::filesystem::remove(path);
}
