#pragma once
//! \file
//! Run-time choice of the host instruction set for the quantization loops. On x86-64 with g++ or
//! clang the loops are also compiled for AVX2 and, where it pays, AVX-512F (function attributes),
//! and chosen when the CPU has them. This holds in translation units built for AVX2 or newer too
//! (`-march=native`): the hand-written look-ups and searches are faster than what the compiler
//! makes of the portable loops (2026-11-29: the portable loops of a `-march=native` build took the
//! place of the SIMD ones before). Defining QMEM_QUANT_HOST_AVX2 to 0 before including qmem turns
//! both off (nvcc's host pass always has them off).

#ifndef QMEM_QUANT_HOST_AVX2
#if !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
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

//! True when the CPU runs AVX-512F with the BW, VL, DQ, BF16 and VBMI extensions (Sapphire Rapids
//! and later, Zen 4; checked once): byte permutes, byte masks, `vfpclassps` and
//! `vcvtne2ps2bf16`. The 16-bit outputs of the 8-bit and row-wise loops take this path.
inline bool host_has_avx512_bf16() noexcept {
  static bool const has =
      host_has_avx512() && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi");
  return has;
}
#endif

} // namespace qmem::quant::detail
