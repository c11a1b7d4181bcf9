#pragma once
//! \file
//! The checks of an optimizer's options, written once for every front end that takes them: the
//! host optimizer (optim/optimizer.hpp), the CUDA step controller (optim/cuda/multi_tensor.cuh)
//! and the device optimizer (optim/cuda/device_optimizer.cuh). A bad option is refused with the
//! same message whichever front end receives it, before anything is allocated.

#include <qmem/core/error.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/optim/schedule.hpp>

#include <concepts>
#include <limits>

namespace qmem::optim::detail {

//! Throws bad_argument unless the schedule's lr and min_lr are finite and >= 0 (a NaN is refused;
//! so is an infinity, which made every parameter inf at the first step, or NaN where the schedule
//! multiplies it by 0: a warmup's or a cosine's end) and its warmup and total step counts are >= 0
//! (a negative one was silently taken as 0).
inline void check_lr_schedule(lr_schedule const& lr) {
  QMEM_EXPECTS(lr.lr >= 0.0f && lr.min_lr >= 0.0f &&
                   lr.lr < std::numeric_limits<float>::infinity() &&
                   lr.min_lr < std::numeric_limits<float>::infinity(),
               "lr is ", lr.lr, " and min_lr ", lr.min_lr, "; expected finite values >= 0");
  QMEM_EXPECTS(lr.warmup >= 0 && lr.total >= 0, "the lr schedule's warmup is ", lr.warmup,
               " and total ", lr.total, "; expected >= 0");
}

//! Throws bad_argument unless the clipping thresholds are valid: max_grad_norm >= 0 and
//! max_unorm >= 0 (0 turns each off), percentile in [1, 100] (100 turns it off).
inline void check_clipping(float max_grad_norm, float max_unorm, int percentile) {
  QMEM_EXPECTS(max_grad_norm >= 0.0f && max_unorm >= 0.0f, "max_grad_norm is ", max_grad_norm,
               " and max_unorm ", max_unorm, "; expected >= 0 (0 turns them off)");
  QMEM_EXPECTS(percentile >= 1 && percentile <= 100, "percentile is ", percentile,
               "; expected 1..100 (100 turns percentile clipping off)");
}

//! Throws bad_argument unless `options` are valid for an optimizer of parameters of element type
//! `Param`: check_lr_schedule, check_clipping, and stochastic rounding of the parameters only
//! where they are not f16 (the rounding draws bf16's dropped bits).
template <float_element Param>
void check_optimizer_options(optimizer_options const& options) {
  check_lr_schedule(options.lr);
  check_clipping(options.max_grad_norm, options.max_unorm, options.percentile);
  constexpr bool can_round_stochastically = !std::same_as<Param, f16>;
  QMEM_EXPECTS(options.rounding == param_rounding::nearest || can_round_stochastically,
               "stochastic rounding of parameters needs bf16 parameters; these are f16");
}

//! Throws bad_argument unless a parameter's lr scale is finite and >= 0 (a NaN is refused, and
//! an infinity: it made the tensor's lr inf, or NaN at an lr of 0).
inline void check_lr_scale(float lr_scale) {
  QMEM_EXPECTS(lr_scale >= 0.0f && lr_scale < std::numeric_limits<float>::infinity(),
               "lr_scale is ", lr_scale, "; expected a finite value >= 0");
}

} // namespace qmem::optim::detail
