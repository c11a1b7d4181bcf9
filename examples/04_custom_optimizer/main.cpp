// A new optimizer in one small rule: Adan (adan.hpp, 50 lines) is an update_rule, so the same
// qmem::optim::optimizer runs it with fp32, bf16, 8-bit, 4-bit and FP8 state, with schedules,
// clipping and save/resume, on the host here and through the CUDA kernels in a .cu file. Nothing
// in qmem names Adan.
//
// The problem: an ill-conditioned quadratic, loss = 0.5 sum a_i (p_i - t_i)^2, from p = 0.
#include <qmem/optim.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "adan.hpp"

template <class Policy>
double minimize(char const* name) {
  std::size_t const n = 8192;
  std::vector<float> p(n, 0.0f), g(n), a(n), t(n);
  for (std::size_t i = 0; i < n; ++i) {
    a[i] = 0.1f + static_cast<float>(i % 97) / 10.0f;
    t[i] = std::sin(0.01f * static_cast<float>(i));
  }
  auto loss = [&] {
    double l = 0;
    for (std::size_t i = 0; i < n; ++i)
      l += 0.5 * a[i] * (p[i] - t[i]) * (p[i] - t[i]);
    return l;
  };
  double const l0 = loss();
  qmem::optim::optimizer<example::adan, Policy> opt(
      {}, {.lr = qmem::optim::lr_schedule::cosine(3e-2f, 10, 300, 1e-4f)});
  opt.add_param(qmem::view(p));
  for (int step = 0; step < 300; ++step) {
    for (std::size_t i = 0; i < n; ++i)
      g[i] = a[i] * (p[i] - t[i]);
    opt.step(qmem::exec::host{}, {qmem::view(std::as_const(g))});
  }
  std::printf("Adan, %-5s state: loss %.3g -> %.3g (%.4f bytes of state per parameter)\n", name, l0,
              loss(), static_cast<double>(opt.state_bytes()) / static_cast<double>(n));
  return loss() / l0;
}

int main() {
  double const worst = std::max(
      {minimize<qmem::optim::fp32_state>("fp32"), minimize<qmem::optim::bf16_state>("bf16"),
       minimize<qmem::optim::int8_state>("8-bit"), minimize<qmem::optim::int4_state>("4-bit"),
       minimize<qmem::optim::quantized_state<qmem::quant::fp8_e4m3>>("fp8")});
  return worst < 0.05 ? 0 : 1; // every policy cut the loss at least 20-fold
}
