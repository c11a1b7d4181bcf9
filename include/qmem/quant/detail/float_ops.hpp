#pragma once
//! \file
//! Float operations with one IEEE rounding each (round to nearest even). On the device the `_rn`
//! intrinsics keep nvcc from fusing a multiply and an add into an FMA and keep `--use_fast_math`
//! from replacing a division or reciprocal by an approximation. On the host they are the plain
//! operators: g++ and clang fuse only when FMA instructions are enabled (`-mfma`, `-march=...`)
//! and contraction is allowed; qmem's own targets enable neither. A user building with both
//! should add `-ffp-contract=off` to keep host results bit-identical to the GPU's.
//! Host and GPU quantizers produce the same bits because both evaluate exactly these operations.

#include <qmem/core/config.hpp>

namespace qmem::quant::detail {

QMEM_HOST_DEVICE QMEM_INLINE constexpr float mul_rn(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

QMEM_HOST_DEVICE QMEM_INLINE constexpr float add_rn(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

QMEM_HOST_DEVICE QMEM_INLINE constexpr float sub_rn(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

QMEM_HOST_DEVICE QMEM_INLINE constexpr float div_rn(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

//! 1 / a, correctly rounded (bitsandbytes' GPU build uses an approximate reciprocal here: see
//! DESIGN.md section 3 for the one-step differences that causes at exact ties).
QMEM_HOST_DEVICE QMEM_INLINE constexpr float rcp_rn(float a) noexcept {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(a);
#else
  return 1.0f / a;
#endif
}

} // namespace qmem::quant::detail
