#pragma once
//! \file
//! Device helpers shared by the CUDA matmul kernels (quant/cuda/matmul.cuh and
//! quant/cuda/detail/gemm_sm90.cuh): two floats rounded to a 16-bit activation type and packed;
//! the code tables copied into shared memory.

#include <qmem/core/config.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/quant/code_table.hpp>

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

//! Copies the 4-bit code values into `table` (16 floats) and, when Nested, the nested scales'
//! signed dynamic map into `dyn` (256 floats), both in shared memory; every thread of the block
//! calls it, and the caller synchronizes before reading them.
template <bool Nested>
__device__ QMEM_INLINE void load_tables(float* table, float* dyn, code_table<16> const& values,
                                        code_table<256> const& nested) {
  for (unsigned i = threadIdx.x; i < 16; i += blockDim.x)
    table[i] = values.value[i];
  if constexpr (Nested)
    for (unsigned i = threadIdx.x; i < 256; i += blockDim.x)
      dyn[i] = nested.value[i];
}

} // namespace qmem::quant::cuda_matmul
