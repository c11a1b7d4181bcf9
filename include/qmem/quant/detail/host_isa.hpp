#pragma once
//! \file
//! Run-time choice of the host instruction set for the quantization loops. On x86-64 with g++ or
//! clang, when the translation unit does not already target AVX2, the loops are also compiled for
//! AVX2 and, where it pays, AVX-512F (function attributes), and chosen when the CPU has them.
//! Defining QMEM_QUANT_HOST_AVX2 to 0 before including qmem turns both off (nvcc's host pass
//! always has them off).

#ifndef QMEM_QUANT_HOST_AVX2
#if !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) &&  \
    !defined(__AVX2__)
#define QMEM_QUANT_HOST_AVX2 1
#else
#define QMEM_QUANT_HOST_AVX2 0
#endif
#endif

namespace qmem::quant::detail {

#if QMEM_QUANT_HOST_AVX2
//! True when the CPU runs AVX2 (checked once).
inline bool host_has_avx2() noexcept {
  static bool const has = __builtin_cpu_supports("avx2");
  return has;
}

//! True when the CPU and the OS run AVX-512F (checked once; libgcc's test includes the OS's
//! saving of the 512-bit state). Loops with an AVX-512 clone take it over their AVX2 one.
inline bool host_has_avx512() noexcept {
  static bool const has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avx512f");
  return has;
}
#endif

} // namespace qmem::quant::detail
