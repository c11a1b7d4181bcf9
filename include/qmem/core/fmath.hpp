#pragma once
//! \file
//! Float operations with one IEEE rounding each (round to nearest even), the same on the host and
//! on the GPU. On the device the `_rn` intrinsics keep nvcc from contracting a multiply and an add
//! into an FMA and keep `--use_fast_math` from replacing a division, reciprocal or square root by
//! an approximation. On the host they are the plain operators: g++ and clang contract only when FMA
//! instructions are enabled (`-mfma`, `-march=...`) and contraction is allowed; qmem's own targets
//! enable neither. A user building with both should add `-ffp-contract=off` to keep host results
//! bit-identical to the GPU's. Every element-level function of qmem that must agree between the
//! backends (quantizers, optimizer rules) is written with these.

#include <qmem/core/config.hpp>
#include <qmem/core/numeric.hpp>

#include <cmath>
#include <cstdint>

namespace qmem::fmath {

QMEM_HOST_DEVICE QMEM_INLINE constexpr float mul(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

QMEM_HOST_DEVICE QMEM_INLINE constexpr float add(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

QMEM_HOST_DEVICE QMEM_INLINE constexpr float sub(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

QMEM_HOST_DEVICE QMEM_INLINE constexpr float div(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

//! 1 / a, correctly rounded (bitsandbytes' GPU build uses an approximate reciprocal here: see
//! docs/quant.md for the one-step differences that causes at exact ties).
QMEM_HOST_DEVICE QMEM_INLINE constexpr float rcp(float a) noexcept {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(a);
#else
  return 1.0f / a;
#endif
}

QMEM_HOST_DEVICE QMEM_INLINE float sqrt(float a) noexcept {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

//! sign(x) in {-1, 0, +1}; NaN gives 0.
QMEM_HOST_DEVICE QMEM_INLINE constexpr float sign(float x) noexcept {
  return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
}

//! False for infinities and NaN (a bit test: unaffected by -ffinite-math-only).
QMEM_HOST_DEVICE QMEM_INLINE constexpr bool is_finite(float x) noexcept {
  return (qmem::detail::float_to_bits(x) & 0x7f800000u) != 0x7f800000u;
}

//! base^step rounded once to float, from a double evaluation (what a correctly rounded powf
//! gives for these arguments; bitsandbytes computes `powf(beta, step)` in float).
QMEM_HOST_DEVICE QMEM_INLINE float pow_step(float base, std::int32_t step) noexcept {
  return static_cast<float>(::pow(static_cast<double>(base), static_cast<double>(step)));
}

} // namespace qmem::fmath
