#pragma once
//! \file
//! The update-rule contract: an optimizer is an element-wise functor over (param, grad, states)
//! plus the scalars of one step, and optionally a per-tensor reduction (LAMB and LARS trust
//! ratios). Everything a kernel calls is QMEM_HOST_DEVICE, so the host loop and the CUDA kernels
//! run the same arithmetic.
//!
//! How a backend drives a rule `R` with a state policy for one tensor and one step
//! (the host backend in optimizer.hpp, the CUDA kernels in optim/cuda/ do exactly this):
//!
//!     step_info si{lr, step, grad_scale};            // lr and step may be read from device memory
//!     R::scalars k = rule.prepare(si);                // once per tensor and step (bias corrections)
//!     if constexpr (reducing_rule<R>)                 // optional first pass over the tensor:
//!       k = R::finish(k, sum over i of R::reduce(p[i], g[i] * si.grad_scale, s(i), k));
//!     for each block of the state format (256 elements for 8-bit, 128 for 4-bit):
//!       for each element i of the block:
//!         s = decode the element's states (code * old block absmax, or the fp32/bf16 value)
//!         if g[i] is finite:  R::update(p[i], g[i] * si.grad_scale, s, k)   // fp32 registers
//!         else: the non-finite policy (skip the element: p and s unchanged; the others stop
//!               before any write)
//!       new absmax of each state = max |s| over the block (the UPDATED fp32 states)
//!       encode every s with the new absmax (state.hpp), write codes, absmax, and p
//!
//! The parameter update uses the fp32 updated states, before requantization, as bitsandbytes'
//! kOptimizer8bitBlockwise does. Host and device compute every float operation with one IEEE
//! rounding each, in the order written in the rule (no fused multiply-add: qmem::fmath, core/fmath.hpp).

#include <qmem/core/config.hpp>
#include <qmem/core/error.hpp>
#include <qmem/core/fmath.hpp>
#include <qmem/core/numeric.hpp>

#include <array>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace qmem::optim {

//! Whether a state can be negative. Quantized policies store `any` states with a signed code
//! (bitsandbytes: the signed dynamic map) and `non_negative` states with an unsigned one.
enum class state_sign : std::uint8_t { any, non_negative };

//! The per-element optimizer states of a rule, in fp32 registers while an element is updated.
template <int N>
struct state_values {
  static constexpr int size = N;
  float v[N > 0 ? N : 1];
  QMEM_HOST_DEVICE constexpr float& operator[](int i) noexcept { return v[i]; }
  QMEM_HOST_DEVICE constexpr float operator[](int i) const noexcept { return v[i]; }
};

//! What every rule receives once per step: the learning rate of this step (after the schedule)
//! and the 1-based step count of this tensor. `grad_scale` multiplies every gradient before the
//! update (loss unscaling, global-norm clipping); the driver applies it, rules see scaled grads.
struct step_info {
  float lr = 1e-3f;
  std::int32_t step = 1;
  float grad_scale = 1.0f;
};

//! Sums of per-element terms a reducing rule needs over a whole tensor (e.g. |p|^2 and |u|^2).
//! The host backend sums in double over fixed chunks; finish() receives the totals.
struct norm_terms {
  float a = 0.0f;
  float b = 0.0f;
};

//! An update rule `R`:
// (laid out by hand: clang-format 14 breaks the requirement lines and their comments apart)
// clang-format off
template <class R>
concept update_rule =
    std::is_trivially_copyable_v<R> &&                                   // passed to kernels by value
    std::is_trivially_copyable_v<typename R::scalars> &&                 // per-step scalars, by value
    requires(R const& r, step_info const& si, float& p, float g,
             state_values<R::state_count>& s, typename R::scalars const& k) {
      requires R::state_count >= 0 && R::state_count <= 4;               // states per element
      { R::state_signs } -> std::convertible_to<std::array<state_sign, R::state_count>>; // signs
      { r.prepare(si) } -> std::same_as<typename R::scalars>;            // once per tensor and step
      { R::update(p, g, s, k) } -> std::same_as<void>;                   // one element, in place
    };
// clang-format on

//! A rule that needs per-tensor sums (trust ratios) before its update: `reduce` gives the terms of
//! one element (computed from the old states, which it must not keep), `finish` folds the totals
//! into the scalars that `update` then uses.
template <class R>
concept reducing_rule = update_rule<R> && requires(float p, float g, state_values<R::state_count> s,
                                                   typename R::scalars const& k, norm_terms t) {
  { R::reduce(p, g, s, k) } -> std::same_as<norm_terms>;
  { R::finish(k, t) } -> std::same_as<typename R::scalars>;
};

//! A rule that checks its own hyper-parameters: `r.validate()` throws qmem::bad_argument naming
//! the rule, the field, the value and the expected range. Optional: the optimizers call it where
//! a rule instance enters them (constructor, per-parameter override in add_param); a rule
//! without it is taken as is. Host-only (validate() is never called from a kernel).
template <class R>
concept validated_rule = requires(R const& r) {
  r.validate();
};

namespace detail {
//! The one check every optimizer front end runs on a rule instance it receives (host optimizer,
//! device optimizer): r.validate() when `R` has one (validated_rule), else nothing.
template <class R>
void check_rule(R const& r) {
  if constexpr (validated_rule<R>)
    r.validate();
}

//! Throws bad_argument unless 0 <= v < 1 (an exponential-average coefficient; NaN refused).
inline void expect_beta(char const* rule, char const* field, float v) {
  QMEM_EXPECTS(v >= 0.0f && v < 1.0f, rule, ": ", field, " is ", v, "; expected [0, 1)");
}
//! Throws bad_argument unless v >= 0 (NaN refused).
inline void expect_non_negative(char const* rule, char const* field, float v) {
  QMEM_EXPECTS(v >= 0.0f, rule, ": ", field, " is ", v, "; expected >= 0");
}
} // namespace detail

namespace detail {
//! The one-rounding float operations shared with the quantizers (core/fmath.hpp).
namespace fmath = qmem::fmath;
} // namespace detail

//! The float operations of the built-in rules, for user rules: each rounds once, on the host and
//! on the GPU alike (mul, add, sub, div, sqrt, sign, is_finite, pow_step).
namespace fmath = detail::fmath;

} // namespace qmem::optim
