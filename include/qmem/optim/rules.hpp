#pragma once
//! \file
//! The update rules: SGD, Adam, AdamW, Lion, RMSprop, Adagrad, LAMB, LARS, AdEMAMix. Each is an
//! aggregate of hyper-parameters (trivially copyable, passed to kernels by value) with
//! `prepare(step_info) -> scalars` (once per tensor and step) and a static element update.
//!
//! Where bitsandbytes 0.50.2 has the optimizer, the arithmetic follows its CUDA kernels operation
//! for operation (csrc/kernels.cu, kOptimizer32bit*/kOptimizerStatic8bit*Blockwise) so that the
//! golden vectors match; where bitsandbytes has none (centered RMSprop, Nesterov, dampening, LAMB,
//! LARS, Adagrad's lr decay), it follows torch.optim's definition. Every float operation rounds
//! once (detail::fmath): the host and the GPU compute the same bits.

#include <qmem/core/config.hpp>
#include <qmem/core/error.hpp>
#include <qmem/optim/rule.hpp>

#include <array>
#include <cmath>
#include <cstdint>

namespace qmem::optim {

//! Adam (`Decoupled = false`: L2 weight decay added to the gradient, as torch.optim.Adam) and
//! AdamW (`Decoupled = true`: the parameter shrinks by lr * weight_decay after the update, in the
//! order bitsandbytes applies it; `decay_first` shrinks it before, as torch.optim.AdamW). States: m (first moment, any sign), v (second, non-negative).
//!   m = m b1 + (1 - b1) g;  v = v b2 + (1 - b2) (g g)
//!   p = p + step_size (m / (sqrt(v) + eps c2)),  c1 = 1 - b1^t,  c2 = sqrt(1 - b2^t),
//!   step_size = (-lr c2) / c1   [bitsandbytes' form of torch's m_hat / (sqrt(v_hat) + eps)]
template <bool Decoupled>
struct adam_rule {
  static constexpr int state_count = 2;
  static constexpr std::array<state_sign, 2> state_signs = {state_sign::any,
                                                            state_sign::non_negative};
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = Decoupled ? 1e-2f : 0.0f;
  bool decay_first = false; //!< decoupled decay before the update (torch) instead of after (bnb)

  //! Throws bad_argument unless 0 <= beta1, beta2 < 1, eps >= 0 and weight_decay >= 0 (the
  //! ranges of torch.optim.Adam/AdamW and bitsandbytes' Optimizer2State).
  void validate() const {
    char const* name = Decoupled ? "adamw" : "adam";
    detail::expect_beta(name, "beta1", beta1);
    detail::expect_beta(name, "beta2", beta2);
    detail::expect_non_negative(name, "eps", eps);
    detail::expect_non_negative(name, "weight_decay", weight_decay);
  }

  struct scalars {
    float beta1, one_minus_beta1, beta2, one_minus_beta2;
    float step_size;    //!< (-lr c2) / c1
    float eps_c2;       //!< eps c2
    float decay_before; //!< 1 - lr wd when decoupled and decay_first, else 1 (exact no-op)
    float decay_after;  //!< 1 - lr wd when decoupled and not decay_first, else 1
    float l2;           //!< wd when not decoupled
    bool has_l2;
  };

  //! Precondition (checked by the optimizer: validate()): 0 <= beta < 1, eps >= 0, step >= 1.
  QMEM_HOST_DEVICE scalars prepare(step_info const& si) const noexcept {
    using namespace detail::fmath;
    float const c1 = sub(1.0f, pow_step(beta1, si.step));
    float const c2 = sqrt(sub(1.0f, pow_step(beta2, si.step)));
    bool const decays = Decoupled && weight_decay > 0.0f;
    float const decay = sub(1.0f, mul(si.lr, weight_decay));
    return {beta1,
            sub(1.0f, beta1),
            beta2,
            sub(1.0f, beta2),
            div(mul(-si.lr, c2), c1),
            mul(eps, c2),
            decays && decay_first ? decay : 1.0f,
            decays && !decay_first ? decay : 1.0f,
            weight_decay,
            !Decoupled && weight_decay > 0.0f};
  }

  //! Branch-free (a multiplication by 1 is exact), so the host loop vectorizes.
  QMEM_HOST_DEVICE QMEM_INLINE static void update(float& p, float g, state_values<2>& s,
                                                  scalars const& k) noexcept {
    using namespace detail::fmath;
    g = k.has_l2 ? add(g, mul(p, k.l2)) : g; // L2 only when on: g + 0 would turn -0 into +0
    p = mul(p, k.decay_before);
    s[0] = add(mul(s[0], k.beta1), mul(k.one_minus_beta1, g));
    s[1] = add(mul(s[1], k.beta2), mul(k.one_minus_beta2, mul(g, g)));
    p = add(p, mul(k.step_size, div(s[0], add(sqrt(s[1]), k.eps_c2))));
    p = mul(p, k.decay_after);
  }
};
using adam = adam_rule<false>; //!< Adam with L2 weight decay (torch.optim.Adam)
using adamw = adam_rule<true>; //!< AdamW, decoupled weight decay (bitsandbytes' AdamW)

//! SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD). State: the
//! momentum buffer (any sign), set to the gradient on the first step.
//!   g = g + wd p;  buf = t == 1 ? g : buf momentum + (1 - dampening) g
//!   p = p - lr (nesterov ? g + momentum buf : buf)
struct sgd {
  static constexpr int state_count = 1;
  static constexpr std::array<state_sign, 1> state_signs = {state_sign::any};
  float momentum = 0.9f;
  float dampening = 0.0f;
  float weight_decay = 0.0f;
  bool nesterov = false;

  //! Throws bad_argument unless momentum >= 0, weight_decay >= 0, dampening is finite, and, with
  //! nesterov, momentum > 0 and dampening == 0 (torch.optim.SGD's checks; torch leaves dampening
  //! otherwise unchecked, qmem refuses only a non-finite one).
  void validate() const {
    detail::expect_non_negative("sgd", "momentum", momentum);
    detail::expect_non_negative("sgd", "weight_decay", weight_decay);
    QMEM_EXPECTS(std::isfinite(dampening), "sgd: dampening is ", dampening, "; expected finite");
    QMEM_EXPECTS(!nesterov || (momentum > 0.0f && dampening == 0.0f),
                 "sgd: nesterov with momentum ", momentum, " and dampening ", dampening,
                 "; expected momentum > 0 and dampening 0");
  }

  struct scalars {
    float lr, momentum, one_minus_dampening, weight_decay;
    bool first, nesterov;
  };
  QMEM_HOST_DEVICE scalars prepare(step_info const& si) const noexcept {
    return {si.lr,        momentum,     detail::fmath::sub(1.0f, dampening),
            weight_decay, si.step == 1, nesterov};
  }
  QMEM_HOST_DEVICE QMEM_INLINE static void update(float& p, float g, state_values<1>& s,
                                                  scalars const& k) noexcept {
    using namespace detail::fmath;
    if (k.weight_decay > 0.0f)
      g = add(g, mul(p, k.weight_decay));
    s[0] = k.first ? g : add(mul(s[0], k.momentum), mul(k.one_minus_dampening, g));
    float const d = k.nesterov ? add(g, mul(k.momentum, s[0])) : s[0];
    p = sub(p, mul(k.lr, d));
  }
};

//! Lion (Chen et al. 2023), decoupled weight decay applied first, as bitsandbytes does.
//! State: m (any sign).
//!   p = p (1 - lr wd);  p = p - lr sign(m b1 + (1 - b1) g);  m = m b2 + (1 - b2) g
struct lion {
  static constexpr int state_count = 1;
  static constexpr std::array<state_sign, 1> state_signs = {state_sign::any};
  float beta1 = 0.9f;
  float beta2 = 0.99f;
  float weight_decay = 0.0f;

  //! Throws bad_argument unless 0 <= beta1, beta2 < 1 and weight_decay >= 0 (bitsandbytes'
  //! Optimizer1State, which its Lion uses).
  void validate() const {
    detail::expect_beta("lion", "beta1", beta1);
    detail::expect_beta("lion", "beta2", beta2);
    detail::expect_non_negative("lion", "weight_decay", weight_decay);
  }

  struct scalars {
    float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay;
    bool has_decay;
  };
  QMEM_HOST_DEVICE scalars prepare(step_info const& si) const noexcept {
    using namespace detail::fmath;
    return {si.lr,
            beta1,
            sub(1.0f, beta1),
            beta2,
            sub(1.0f, beta2),
            sub(1.0f, mul(si.lr, weight_decay)),
            weight_decay > 0.0f};
  }
  QMEM_HOST_DEVICE QMEM_INLINE static void update(float& p, float g, state_values<1>& s,
                                                  scalars const& k) noexcept {
    using namespace detail::fmath;
    if (k.has_decay)
      p = mul(p, k.decay);
    float const u = mul(k.lr, sign(add(mul(s[0], k.beta1), mul(k.one_minus_beta1, g))));
    s[0] = add(mul(s[0], k.beta2), mul(k.one_minus_beta2, g));
    p = sub(p, u);
  }
};

//! RMSprop (torch.optim.RMSprop), optionally centered and with momentum; L2 weight decay.
//! States: v (non-negative); then the gradient average if Centered; then the momentum buffer if
//! Momentum.
//!   g = g + wd p;  v = v alpha + (1 - alpha) (g g);  avg = sqrt(v [- ga ga]) + eps
//!   Momentum: buf = buf momentum + g / avg; p = p - lr buf.  Otherwise p = p - lr (g / avg).
template <bool Centered = false, bool Momentum = false>
struct rmsprop_rule {
  static constexpr int state_count = 1 + (Centered ? 1 : 0) + (Momentum ? 1 : 0);
  static constexpr std::array<state_sign, state_count> state_signs = [] {
    std::array<state_sign, state_count> a{};
    a[0] = state_sign::non_negative;
    for (int i = 1; i < state_count; ++i)
      a[i] = state_sign::any;
    return a;
  }();
  float alpha = 0.99f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  float momentum = 0.0f; //!< used when Momentum

  //! Throws bad_argument unless 0 <= alpha <= 1 and eps, weight_decay, momentum >= 0
  //! (torch.optim.RMSprop's checks; torch also accepts alpha > 1, which makes v's coefficient
  //! 1 - alpha negative, so v, stored with an unsigned code, could turn negative: refused here.
  //! bitsandbytes refuses alpha 0 and 1, torch accepts both, and so does qmem).
  void validate() const {
    QMEM_EXPECTS(alpha >= 0.0f && alpha <= 1.0f, "rmsprop: alpha is ", alpha, "; expected [0, 1]");
    detail::expect_non_negative("rmsprop", "eps", eps);
    detail::expect_non_negative("rmsprop", "weight_decay", weight_decay);
    detail::expect_non_negative("rmsprop", "momentum", momentum);
  }

  struct scalars {
    float lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
  };
  QMEM_HOST_DEVICE scalars prepare(step_info const& si) const noexcept {
    return {si.lr, alpha, detail::fmath::sub(1.0f, alpha), eps, weight_decay, momentum};
  }
  QMEM_HOST_DEVICE QMEM_INLINE static void update(float& p, float g, state_values<state_count>& s,
                                                  scalars const& k) noexcept {
    using namespace detail::fmath;
    if (k.weight_decay > 0.0f)
      g = add(g, mul(p, k.weight_decay));
    s[0] = add(mul(s[0], k.alpha), mul(k.one_minus_alpha, mul(g, g)));
    float var = s[0];
    if constexpr (Centered) {
      s[1] = add(mul(s[1], k.alpha), mul(k.one_minus_alpha, g));
      var = sub(var, mul(s[1], s[1]));
    }
    float const avg = add(sqrt(var), k.eps);
    if constexpr (Momentum) {
      constexpr int b = Centered ? 2 : 1;
      s[b] = add(mul(s[b], k.momentum), div(g, avg));
      p = sub(p, mul(k.lr, s[b]));
    } else {
      p = sub(p, mul(k.lr, div(g, avg)));
    }
  }
};
using rmsprop = rmsprop_rule<false, false>;

//! Adagrad (torch.optim.Adagrad): state s (non-negative), lr decayed as lr / (1 + (t-1) decay).
//!   g = g + wd p;  s = s + g g;  p = p - clr (g / (sqrt(s) + eps))
struct adagrad {
  static constexpr int state_count = 1;
  static constexpr std::array<state_sign, 1> state_signs = {state_sign::non_negative};
  float eps = 1e-10f;
  float weight_decay = 0.0f;
  float lr_decay = 0.0f;

  //! Throws bad_argument unless eps, weight_decay and lr_decay are >= 0 (torch.optim.Adagrad).
  void validate() const {
    detail::expect_non_negative("adagrad", "eps", eps);
    detail::expect_non_negative("adagrad", "weight_decay", weight_decay);
    detail::expect_non_negative("adagrad", "lr_decay", lr_decay);
  }

  struct scalars {
    float clr, eps, weight_decay;
  };
  QMEM_HOST_DEVICE scalars prepare(step_info const& si) const noexcept {
    using namespace detail::fmath;
    return {div(si.lr, add(1.0f, mul(static_cast<float>(si.step - 1), lr_decay))), eps,
            weight_decay};
  }
  QMEM_HOST_DEVICE QMEM_INLINE static void update(float& p, float g, state_values<1>& s,
                                                  scalars const& k) noexcept {
    using namespace detail::fmath;
    if (k.weight_decay > 0.0f)
      g = add(g, mul(p, k.weight_decay));
    s[0] = add(s[0], mul(g, g));
    p = sub(p, mul(k.clr, div(g, add(sqrt(s[0]), k.eps))));
  }
};

//! LAMB (You et al. 2019): Adam moments with bias correction, the update
//! u = m_hat / (sqrt(v_hat) + eps) + wd p, scaled per tensor by the trust ratio
//! ||p|| / ||u|| (1 when either norm is 0).  p = p - lr trust u.
struct lamb {
  static constexpr int state_count = 2;
  static constexpr std::array<state_sign, 2> state_signs = {state_sign::any,
                                                            state_sign::non_negative};
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-6f;
  float weight_decay = 0.01f;

  //! Throws bad_argument unless 0 <= beta1, beta2 < 1, eps >= 0 and weight_decay >= 0
  //! (bitsandbytes' Optimizer2State, which its LAMB uses).
  void validate() const {
    detail::expect_beta("lamb", "beta1", beta1);
    detail::expect_beta("lamb", "beta2", beta2);
    detail::expect_non_negative("lamb", "eps", eps);
    detail::expect_non_negative("lamb", "weight_decay", weight_decay);
  }

  struct scalars {
    float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, c1, c2, eps, weight_decay;
    float trust; //!< set by finish()
  };
  QMEM_HOST_DEVICE scalars prepare(step_info const& si) const noexcept {
    using namespace detail::fmath;
    return {si.lr,
            beta1,
            sub(1.0f, beta1),
            beta2,
            sub(1.0f, beta2),
            sub(1.0f, pow_step(beta1, si.step)),
            sub(1.0f, pow_step(beta2, si.step)),
            eps,
            weight_decay,
            1.0f};
  }
  QMEM_HOST_DEVICE QMEM_INLINE static float direction(float p, float g, state_values<2>& s,
                                                      scalars const& k) noexcept {
    using namespace detail::fmath;
    s[0] = add(mul(s[0], k.beta1), mul(k.one_minus_beta1, g));
    s[1] = add(mul(s[1], k.beta2), mul(k.one_minus_beta2, mul(g, g)));
    float const mh = div(s[0], k.c1);
    float const vh = div(s[1], k.c2);
    return add(div(mh, add(sqrt(vh), k.eps)), mul(k.weight_decay, p));
  }
  QMEM_HOST_DEVICE QMEM_INLINE static norm_terms reduce(float p, float g, state_values<2> s,
                                                        scalars const& k) noexcept {
    float const u = direction(p, g, s, k);
    return {detail::fmath::mul(p, p), detail::fmath::mul(u, u)};
  }
  QMEM_HOST_DEVICE static scalars finish(scalars k, norm_terms t) noexcept {
    float const pn = detail::fmath::sqrt(t.a);
    float const un = detail::fmath::sqrt(t.b);
    k.trust = (pn > 0.0f && un > 0.0f) ? detail::fmath::div(pn, un) : 1.0f;
    return k;
  }
  QMEM_HOST_DEVICE QMEM_INLINE static void update(float& p, float g, state_values<2>& s,
                                                  scalars const& k) noexcept {
    using namespace detail::fmath;
    float const u = direction(p, g, s, k);
    p = sub(p, mul(mul(k.lr, k.trust), u));
  }
};

//! LARS (You et al. 2017) with momentum: local_lr = trust_coefficient ||p|| / (||g|| + wd ||p||)
//! (1 when a norm is 0); buf = buf momentum + lr local_lr (g + wd p); p = p - buf.
//! State: the momentum buffer (any sign).
struct lars {
  static constexpr int state_count = 1;
  static constexpr std::array<state_sign, 1> state_signs = {state_sign::any};
  float momentum = 0.9f;
  float weight_decay = 0.0f;
  float trust_coefficient = 0.001f;

  //! Throws bad_argument unless momentum >= 0, weight_decay >= 0 (torch.optim.SGD's ranges) and
  //! 0 < trust_coefficient < infinity (no reference checks it; 0 would freeze every tensor of
  //! non-zero norms while tensors of norm 0 still move with the plain lr).
  void validate() const {
    detail::expect_non_negative("lars", "momentum", momentum);
    detail::expect_non_negative("lars", "weight_decay", weight_decay);
    QMEM_EXPECTS(trust_coefficient > 0.0f && std::isfinite(trust_coefficient),
                 "lars: trust_coefficient is ", trust_coefficient, "; expected > 0 and finite");
  }

  struct scalars {
    float lr, momentum, weight_decay, trust_coefficient;
    float scaled_lr; //!< lr local_lr, set by finish()
  };
  QMEM_HOST_DEVICE scalars prepare(step_info const& si) const noexcept {
    return {si.lr, momentum, weight_decay, trust_coefficient, si.lr};
  }
  QMEM_HOST_DEVICE QMEM_INLINE static norm_terms reduce(float p, float g, state_values<1>,
                                                        scalars const&) noexcept {
    return {detail::fmath::mul(p, p), detail::fmath::mul(g, g)};
  }
  QMEM_HOST_DEVICE static scalars finish(scalars k, norm_terms t) noexcept {
    using namespace detail::fmath;
    float const pn = sqrt(t.a);
    float const gn = sqrt(t.b);
    float local = 1.0f;
    if (pn > 0.0f && gn > 0.0f)
      local = div(mul(k.trust_coefficient, pn), add(gn, mul(k.weight_decay, pn)));
    k.scaled_lr = mul(k.lr, local);
    return k;
  }
  QMEM_HOST_DEVICE QMEM_INLINE static void update(float& p, float g, state_values<1>& s,
                                                  scalars const& k) noexcept {
    using namespace detail::fmath;
    float const d = add(g, mul(k.weight_decay, p));
    s[0] = add(mul(s[0], k.momentum), mul(k.scaled_lr, d));
    p = sub(p, s[0]);
  }
};

//! AdEMAMix (Pagliardini et al. 2024), as bitsandbytes computes it. States: m1 (fast EMA, any
//! sign), nu (second moment, non-negative), m2 (slow EMA, any sign).
//!   m1 = m1 b1 + (1-b1) g;  m2 = m2 b3 + (1-b3) g;  nu = nu b2 + ((1-b2) g) g
//!   p = p - lr ((m1 / c1 + alpha m2) / (sqrt(nu) / c2 + eps));  p = p (1 - lr wd)
//! with c1 = 1 - b1^t, c2 = sqrt(1 - b2^t). Schedulers (0 = off): alpha_t = min(t alpha /
//! t_alpha, alpha); beta3_t = min(exp(ln b1 ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), b3).
struct ademamix {
  static constexpr int state_count = 3;
  static constexpr std::array<state_sign, 3> state_signs = {
      state_sign::any, state_sign::non_negative, state_sign::any};
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float beta3 = 0.9999f;
  float alpha = 5.0f;
  float eps = 1e-8f;
  float weight_decay = 1e-2f;
  std::int32_t t_alpha = 0;
  std::int32_t t_beta3 = 0;

  //! Throws bad_argument unless 0 <= beta1, beta2, beta3 < 1, eps >= 0, weight_decay >= 0
  //! (bitsandbytes' Optimizer2State checks every beta its AdEMAMix passes), 0 <= alpha < infinity
  //! and t_alpha, t_beta3 >= 0 (0: scheduler off; bitsandbytes' None).
  void validate() const {
    detail::expect_beta("ademamix", "beta1", beta1);
    detail::expect_beta("ademamix", "beta2", beta2);
    detail::expect_beta("ademamix", "beta3", beta3);
    QMEM_EXPECTS(alpha >= 0.0f && std::isfinite(alpha), "ademamix: alpha is ", alpha,
                 "; expected >= 0 and finite");
    detail::expect_non_negative("ademamix", "eps", eps);
    detail::expect_non_negative("ademamix", "weight_decay", weight_decay);
    QMEM_EXPECTS(t_alpha >= 0 && t_beta3 >= 0, "ademamix: t_alpha is ", t_alpha, " and t_beta3 ",
                 t_beta3, "; expected >= 0 (0: off)");
  }

  struct scalars {
    float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3, alpha;
    float c1, c2, eps, decay;
    bool has_decay;
  };
  QMEM_HOST_DEVICE scalars prepare(step_info const& si) const noexcept {
    using namespace detail::fmath;
    float a = alpha;
    if (t_alpha > 0) {
      double const at = static_cast<double>(si.step) * alpha / t_alpha;
      a = static_cast<float>(at < alpha ? at : static_cast<double>(alpha));
    }
    float b3 = beta3;
    if (t_beta3 > 0) {
      double const lb1 = ::log(static_cast<double>(beta1));
      double const lb3 = ::log(static_cast<double>(beta3));
      double const sc = static_cast<double>(si.step) / t_beta3;
      double const v = ::exp(lb1 * lb3 / ((1.0 - sc) * lb3 + sc * lb1));
      b3 = static_cast<float>(v < beta3 ? v : static_cast<double>(beta3));
    }
    return {si.lr,
            beta1,
            sub(1.0f, beta1),
            beta2,
            sub(1.0f, beta2),
            b3,
            sub(1.0f, b3),
            a,
            sub(1.0f, pow_step(beta1, si.step)),
            sqrt(sub(1.0f, pow_step(beta2, si.step))),
            eps,
            sub(1.0f, mul(si.lr, weight_decay)),
            weight_decay > 0.0f};
  }
  QMEM_HOST_DEVICE QMEM_INLINE static void update(float& p, float g, state_values<3>& s,
                                                  scalars const& k) noexcept {
    using namespace detail::fmath;
    s[0] = add(mul(s[0], k.beta1), mul(k.one_minus_beta1, g));
    s[2] = add(mul(s[2], k.beta3), mul(k.one_minus_beta3, g));
    s[1] = add(mul(s[1], k.beta2), mul(mul(k.one_minus_beta2, g), g));
    float const num = add(div(s[0], k.c1), mul(k.alpha, s[2]));
    float const den = add(div(sqrt(s[1]), k.c2), k.eps);
    p = sub(p, mul(k.lr, div(num, den)));
    if (k.has_decay)
      p = mul(p, k.decay);
  }
};

static_assert(update_rule<adamw> && update_rule<adam> && update_rule<sgd> && update_rule<lion> &&
              update_rule<rmsprop> && update_rule<rmsprop_rule<true, true>> &&
              update_rule<adagrad> && update_rule<lamb> && update_rule<lars> &&
              update_rule<ademamix>);
static_assert(validated_rule<adamw> && validated_rule<adam> && validated_rule<sgd> &&
              validated_rule<lion> && validated_rule<rmsprop> && validated_rule<adagrad> &&
              validated_rule<lamb> && validated_rule<lars> && validated_rule<ademamix>);
static_assert(reducing_rule<lamb> && reducing_rule<lars> && !reducing_rule<adamw>);

} // namespace qmem::optim
