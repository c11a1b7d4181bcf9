#pragma once
// Adan (Xie et al. 2022, "Adaptive Nesterov Momentum"), written against qmem's update_rule
// concept: nothing else is needed for it to run with every state policy (fp32, bf16, 8-bit,
// 4-bit, any code), on every backend, with clipping, schedules and save/resume.
#include <qmem/optim/rule.hpp>

#include <array>

namespace example {

using qmem::optim::state_sign;
namespace fm = qmem::optim::fmath; // one rounding per operation, host and GPU alike

struct adan {
  // states: m (EMA of g), v (EMA of g - g_prev), n (EMA of the squared Nesterov term), g_prev
  static constexpr int state_count = 4;
  static constexpr std::array<state_sign, 4> state_signs = {
      state_sign::any, state_sign::any, state_sign::non_negative, state_sign::any};
  float beta1 = 0.98f, beta2 = 0.92f, beta3 = 0.99f, eps = 1e-8f, weight_decay = 0.02f;

  struct scalars {
    float lr, b1, b2, b3, c1, c2, c3, eps, shrink;
    bool first;
  };
  QMEM_HOST_DEVICE scalars prepare(qmem::optim::step_info const& si) const noexcept {
    auto corr = [&](float b) { return fm::sub(1.0f, fm::pow_step(b, si.step)); };
    return {si.lr,       beta1,       beta2,
            beta3,       corr(beta1), corr(beta2),
            corr(beta3), eps,         fm::add(1.0f, fm::mul(si.lr, weight_decay)),
            si.step == 1};
  }
  QMEM_HOST_DEVICE static void update(float& p, float g, qmem::optim::state_values<4>& s,
                                      scalars const& k) noexcept {
    float const diff = k.first ? 0.0f : fm::sub(g, s[3]); // g_prev = g on the first step
    auto ema = [](float x, float b, float y) {
      return fm::add(fm::mul(b, x), fm::mul(fm::sub(1.0f, b), y));
    };
    float const nes = fm::add(g, fm::mul(k.b2, diff));
    s[0] = ema(s[0], k.b1, g);
    s[1] = ema(s[1], k.b2, diff);
    s[2] = ema(s[2], k.b3, fm::mul(nes, nes));
    s[3] = g;
    float const step = fm::div(k.lr, fm::add(fm::sqrt(fm::div(s[2], k.c3)), k.eps));
    float const dir = fm::add(fm::div(s[0], k.c1), fm::mul(k.b2, fm::div(s[1], k.c2)));
    p = fm::div(fm::sub(p, fm::mul(step, dir)), k.shrink);
  }
};
static_assert(qmem::optim::update_rule<adan>);

} // namespace example
