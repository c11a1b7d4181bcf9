#pragma once
//! \file
//! Device helper shared by the CUDA matmul kernels (quant/cuda/matmul.cuh and
//! quant/cuda/detail/gemm_sm90.cuh): two floats rounded to a 16-bit activation type and packed.

#include <qmem/core/config.hpp>
#include <qmem/core/numeric.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <concepts>
#include <cstdint>
#include <cstring>

namespace qmem::quant::cuda_matmul {

//! Two floats rounded to T (bf16 or f16, nearest even) and packed, the first in the low half: one
//! paired conversion instruction.
template <class T>
__device__ QMEM_INLINE std::uint32_t pack2(float lo, float hi) {
  std::uint32_t u;
  if constexpr (std::same_as<T, bf16>) {
    __nv_bfloat162 const v = __floats2bfloat162_rn(lo, hi);
    std::memcpy(&u, &v, 4);
  } else {
    __half2 const v = __floats2half2_rn(lo, hi);
    std::memcpy(&u, &v, 4);
  }
  return u;
}

} // namespace qmem::quant::cuda_matmul
