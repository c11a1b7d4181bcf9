#pragma once
//! \file
//! Element-level LLM.int8 row-wise arithmetic (bitsandbytes' int8_vectorwise_quant/dequant),
//! shared by the host loops (quant/rowwise.hpp) and the CUDA kernels (quant/cuda/rowwise.cuh).

#include <qmem/core/config.hpp>
#include <qmem/core/fmath.hpp>

#include <cstdint>

namespace qmem::quant::detail {

//! 1/127 as bitsandbytes multiplies it (the float nearest to 7.874015718698502e-3).
inline constexpr float inv127 = 7.874015718698502e-3f;

//! round_half_even(v) as int8, NaN -> 0 (what the GPU's __float2int_rn gives), saturated to
//! [-127, 127] (reached only through rounding of |v| <= 127.5).
QMEM_HOST_DEVICE QMEM_INLINE std::int8_t round_int8(float v) noexcept {
#if defined(__CUDA_ARCH__)
  int r = v == v ? __float2int_rn(v) : 0;
#else
  // Adding and subtracting 1.5 * 2^23 rounds a float of magnitude < 2^22 to an integer, ties to
  // even (compilers do not re-associate it without -ffast-math); branch-free, so it vectorizes.
  float const c = 12582912.0f;
  float const clamped = v > 256.0f ? 256.0f : (v < -256.0f ? -256.0f : v);
  float const t = (clamped + c) - c;
  int r = static_cast<int>(v == v ? t : 0.0f);
#endif
  r = r > 127 ? 127 : (r < -127 ? -127 : r);
  return static_cast<std::int8_t>(r);
}

//! The code of one element of a row with scale 127 / absmax.
QMEM_HOST_DEVICE QMEM_INLINE std::int8_t rowwise_encode(float x, float scale) noexcept {
  return round_int8(fmath::mul(x, scale));
}

//! The value of one code of a row with absmax `absmax`: (q * absmax) * (1/127).
QMEM_HOST_DEVICE QMEM_INLINE float rowwise_decode(std::int8_t q, float absmax) noexcept {
  return fmath::mul(fmath::mul(static_cast<float>(q), absmax), inv127);
}

} // namespace qmem::quant::detail
