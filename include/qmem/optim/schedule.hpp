#pragma once
//! \file
//! Learning-rate schedules as values (QMEM_HOST_DEVICE, so a CUDA step can evaluate them from a
//! step count that lives in device memory) and the step options of the optimizer: gradient
//! clipping and the non-finite policy.

#include <qmem/core/config.hpp>
#include <qmem/core/error.hpp>

#include <cmath>
#include <cstdint>

namespace qmem::optim {

//! A learning-rate schedule: lr(t) for the 1-based step t.
//! - constant:      lr
//! - linear_warmup: lr * t / warmup for t < warmup, then lr
//! - cosine:        linear warmup, then min_lr + (lr - min_lr) (1 + cos(pi p)) / 2 with
//!                  p = (t - warmup) / (total - warmup) clamped to [0, 1]: min_lr from step
//!                  `total` on. With total <= warmup (total 0 included) there is nothing to
//!                  decay over: lr after the warmup, as linear_warmup.
//! Warmup 0 (or 1) has no warmup: lr from step 1.
struct lr_schedule {
  enum class shape : std::uint8_t { constant, linear_warmup, cosine };
  shape kind = shape::constant;
  float lr = 1e-3f;
  std::int32_t warmup = 0;
  std::int32_t total = 0;
  float min_lr = 0.0f;

  //! Constant learning rate. Precondition: lr finite and >= 0 (checked by the optimizer).
  static constexpr lr_schedule constant(float lr) noexcept {
    return {shape::constant, lr, 0, 0, 0};
  }
  //! Linear warmup over `warmup` steps, then constant. Preconditions (checked by the
  //! optimizer): lr finite and >= 0, warmup >= 0.
  static constexpr lr_schedule linear_warmup(float lr, std::int32_t warmup) noexcept {
    return {shape::linear_warmup, lr, warmup, 0, 0};
  }
  //! Linear warmup, then cosine decay to `min_lr` at step `total`. Preconditions (checked by
  //! the optimizer): lr, min_lr finite and >= 0; warmup, total >= 0.
  static constexpr lr_schedule cosine(float lr, std::int32_t warmup, std::int32_t total,
                                      float min_lr = 0.0f) noexcept {
    return {shape::cosine, lr, warmup, total, min_lr};
  }

  //! lr at step t (t >= 1), computed in double and rounded once.
  QMEM_HOST_DEVICE float operator()(std::int32_t t) const noexcept {
    if (kind == shape::constant)
      return lr;
    if (warmup > 0 && t < warmup)
      return static_cast<float>(static_cast<double>(lr) * t / warmup);
    if (kind == shape::linear_warmup || total <= warmup)
      return lr;
    double p = static_cast<double>(t - warmup) / static_cast<double>(total - warmup);
    p = p < 0.0 ? 0.0 : (p > 1.0 ? 1.0 : p);
    double const c = 0.5 * (1.0 + ::cos(3.14159265358979323846 * p));
    return static_cast<float>(min_lr + (static_cast<double>(lr) - min_lr) * c);
  }
};

//! What a step does with a non-finite (NaN or infinite) gradient element. bitsandbytes zeroes
//! the element's state silently; qmem never does.
enum class nonfinite_policy : std::uint8_t {
  skip_step,    //!< leave every parameter and state untouched, do not count the step
  skip_element, //!< update the other elements; that element's parameter and state keep their
                //!< values (a blockwise state re-encodes it with its block's new absmax)
  raise         //!< throw qmem::error before writing anything
};

//! How 16-bit parameters without fp32 master weights are rounded after the update.
enum class param_rounding : std::uint8_t { nearest, stochastic };

//! Global options of an optimizer.
struct optimizer_options {
  lr_schedule lr = lr_schedule::constant(1e-3f);
  //! Tensors with fewer elements keep fp32 state whatever the policy (bitsandbytes: 4096).
  std::size_t min_quantized_size = 4096;
  //! Global gradient-norm clipping (torch's clip_grad_norm_): scale = max / (norm + 1e-6) when
  //! the norm of all gradients exceeds `max_grad_norm`. 0: off.
  float max_grad_norm = 0.0f;
  //! Update-norm clipping per tensor (bitsandbytes' max_unorm): when ||delta p|| > max_unorm
  //! ||p||, the update is scaled to that norm. 0: off. Costs one extra pass.
  float max_unorm = 0.0f;
  //! Percentile clipping (bitsandbytes): gradients are scaled down to the `percentile`-th
  //! percentile of the last 100 global gradient norms (of the steps seen so far). 100: off.
  int percentile = 100;
  nonfinite_policy nonfinite = nonfinite_policy::skip_step;
  //! Keep an fp32 master copy of 16-bit parameters (the update runs on it; the parameter gets
  //! its rounding).
  bool master_weights = false;
  //! Rounding of 16-bit parameters without master weights.
  param_rounding rounding = param_rounding::nearest;
  //! Seed of the counter-based generator for stochastic rounding (bf16 states and parameters).
  std::uint64_t seed = 0;
};

//! What the caller tells one step: the loss scaler's inverse scale (gradients are multiplied
//! by it) and its found-inf flag (the step is then skipped without touching any state).
struct step_options {
  float grad_unscale = 1.0f;
  bool found_inf = false;
};

//! What a step did.
struct step_result {
  bool applied = false;    //!< false: skipped (found_inf, or non-finite gradients with skip_step)
  float grad_norm = 0.0f;  //!< global norm of the unscaled gradients (when computed, else 0)
  float grad_scale = 1.0f; //!< factor the gradients were multiplied with (unscale x clipping)
};

} // namespace qmem::optim
