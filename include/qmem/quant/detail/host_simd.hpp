#pragma once
//! \file
//! AVX2 pieces of the host quantization loops (x86-64, g++/clang; compiled when
//! QMEM_QUANT_HOST_AVX2 is 1 and chosen at run time by host_has_avx2(), see host_isa.hpp).
//!
//! Every function here computes exactly what the portable element code computes, bit for bit:
//!   - bf16 widening is the 16-bit shift of core/numeric.hpp (exact);
//!   - f32 -> bf16 narrowing is core/numeric.hpp's integer round-to-nearest-even
//!     ((u + 0x7fff + ((u >> 16) & 1)) >> 16, every NaN -> 0x7fc0), done on 8 lanes;
//!   - products are single IEEE multiplies (_mm256_mul_ps rounds like the scalar `a * b`; nothing
//!     is contracted into an FMA);
//!   - table look-ups (permutes, byte shuffles, gathers) move bits without changing them.
//! tests/quant/host_simd_test.cpp checks the narrowing and widening over every bf16 pattern and a
//! dense sweep of floats, and each loop against its portable counterpart.

#include <qmem/quant/detail/host_isa.hpp>

#if QMEM_QUANT_HOST_AVX2

#include <qmem/core/config.hpp>
#include <qmem/core/fmath.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/quant/codes.hpp>
#include <qmem/quant/detail/blockwise_ops.hpp>
#include <qmem/quant/detail/rowwise_ops.hpp>
#include <qmem/quant/detail/search_table.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <type_traits>

namespace qmem::quant::detail {

// g++ contracts a * b + c into an FMA wherever the target has FMA (avx512f implies it) unless
// told not to; the SIMD loops must give the scalar loops' (and the GPU's) bits, so every function
// here is compiled with contraction off. clang contracts only within one source expression, which
// the fmath operations never form, and does not know the `optimize` attribute.
#if defined(__GNUC__) && !defined(__clang__)
#define QMEM_QUANT_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define QMEM_QUANT_NO_CONTRACT
#endif
#define QMEM_QUANT_AVX2_FN __attribute__((target("avx2"))) QMEM_QUANT_NO_CONTRACT inline

//! 8 bf16 (the low 16 bits of each 32-bit lane, upper bits zero) from 8 floats, rounded to
//! nearest even, NaN -> 0x7fc0: float_to_bf16_bits on every lane.
QMEM_QUANT_AVX2_FN __m256i bf16_round_avx2(__m256 f) noexcept {
  __m256i const u = _mm256_castps_si256(f);
  __m256i const one = _mm256_set1_epi32(1);
  __m256i const lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
  __m256i const bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb);
  __m256i const rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  // |u| > inf's pattern is a NaN; both sides are below 2^31, so the signed compare is exact
  __m256i const mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  __m256i const nan = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
}

//! 16 bf16 in element order from two vectors of 8 rounded lanes (bf16_round_avx2's output).
QMEM_QUANT_AVX2_FN __m256i pack_u16_avx2(__m256i a, __m256i b) noexcept {
  // packus works per 128-bit lane (a0-3 b0-3 a4-7 b4-7); the qword permute restores the order
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
}

//! 8 floats from 8 bf16 (exact: the bits shifted into the upper half).
QMEM_QUANT_AVX2_FN __m256 bf16_widen_avx2(__m128i h) noexcept {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

//! y[i] = bf16(x[i]) for i < n (float_to_bf16_bits on every element).
QMEM_QUANT_AVX2_FN void narrow_bf16_avx2(float const* x, std::size_t n, bf16* y) noexcept {
  std::size_t i = 0;
  std::size_t const vec_end = n - n % 16; // whole vectors (a form g++ can bound)
  for (; i < vec_end; i += 16) {
    __m256i const a = bf16_round_avx2(_mm256_loadu_ps(x + i));
    __m256i const b = bf16_round_avx2(_mm256_loadu_ps(x + i + 8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), pack_u16_avx2(a, b));
  }
  for (; i < n; ++i)
    y[i] = bf16(x[i]);
}

//! y[i] = float(x[i]) for i < n (exact).
QMEM_QUANT_AVX2_FN void widen_bf16_avx2(bf16 const* x, std::size_t n, float* y) noexcept {
  std::size_t i = 0;
  std::size_t const vec_end = n - n % 8; // whole vectors (a form g++ can bound)
  for (; i < vec_end; i += 8)
    _mm256_storeu_ps(y + i,
                     bf16_widen_avx2(_mm_loadu_si128(reinterpret_cast<__m128i const*>(x + i))));
  for (; i < n; ++i)
    y[i] = x[i].to_float();
}

//! The widening half of blockwise quantization from bf16: xs[i] = float(x[i]) for i < count, and
//! the block's absmax bits (the integer maximum of |x| as bits, NaN above inf: block_absmax_bits).
QMEM_QUANT_AVX2_FN std::uint32_t load_block_bf16_avx2(bf16 const* x, std::size_t count,
                                                      float* xs) noexcept {
  __m256i const abs_mask = _mm256_set1_epi32(0x7fffffff);
  __m256i m = _mm256_setzero_si256();
  std::size_t i = 0;
  std::size_t const vec_end = count - count % 8; // whole vectors (a form g++ can bound)
  for (; i < vec_end; i += 8) {
    __m256 const f = bf16_widen_avx2(_mm_loadu_si128(reinterpret_cast<__m128i const*>(x + i)));
    _mm256_storeu_ps(xs + i, f);
    // the bits are below 2^31, so the signed maximum orders them as unsigned
    m = _mm256_max_epi32(m, _mm256_and_si256(_mm256_castps_si256(f), abs_mask));
  }
  alignas(32) std::uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), m);
  std::uint32_t r = 0;
  for (std::uint32_t const l : lanes)
    r = l > r ? l : r;
  for (; i < count; ++i) {
    float const f = x[i].to_float();
    xs[i] = f;
    std::uint32_t const b = qmem::detail::float_to_bits(f) & 0x7fffffffu;
    r = b > r ? b : r;
  }
  return r;
}

//! 16-bit outputs of a 4-bit block: y[2i], y[2i+1] = table[codes[i] >> 4], table[codes[i] & 15]
//! for i < bytes, `table` holding the 16 output bit patterns (bf16 or f16). Byte shuffles look up
//! the low and high bytes of the outputs (64 outputs per 32 code bytes); the tail is scalar.
QMEM_QUANT_AVX2_FN void lookup_nibbles_u16_avx2(std::uint16_t const* table,
                                                std::uint8_t const* codes, std::size_t bytes,
                                                std::uint16_t* y) noexcept {
  // the 16 low bytes and the 16 high bytes of the table, each in both 128-bit lanes
  __m256i const t = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(table));
  __m256i const split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2,
                                         4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  // lane 0: lo(t0-7) hi(t0-7), lane 1: lo(t8-15) hi(t8-15) -> qwords lo0-7 lo8-15 hi0-7 hi8-15
  __m256i const halves = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(t, split), 0xd8);
  __m256i const t_lo = _mm256_permute2x128_si256(halves, halves, 0x00);
  __m256i const t_hi = _mm256_permute2x128_si256(halves, halves, 0x11);
  __m256i const low4 = _mm256_set1_epi8(0x0f);
  std::size_t i = 0;
  std::size_t const vec_end = bytes - bytes % 32; // whole vectors (a form g++ can bound)
  for (; i < vec_end; i += 32) {
    __m256i const v = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(codes + i));
    __m256i const first = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4); // even elements
    __m256i const second = _mm256_and_si256(v, low4);                      // odd elements
    // per lane, in element order: lane 0 of idx0 holds elements 0-15, lane 1 elements 32-47;
    // idx1: 16-31 and 48-63
    __m256i const idx[2] = {_mm256_unpacklo_epi8(first, second),
                            _mm256_unpackhi_epi8(first, second)};
    __m256i w[4];
    for (int k = 0; k < 2; ++k) {
      __m256i const lo = _mm256_shuffle_epi8(t_lo, idx[k]);
      __m256i const hi = _mm256_shuffle_epi8(t_hi, idx[k]);
      w[2 * k] = _mm256_unpacklo_epi8(lo, hi);     // elements 16k + 0-7 | 32 + 16k + 0-7
      w[2 * k + 1] = _mm256_unpackhi_epi8(lo, hi); // elements 16k + 8-15 | 32 + 16k + 8-15
    }
    auto* out = reinterpret_cast<__m256i*>(y + 2 * i);
    _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(w[0], w[1], 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(w[2], w[3], 0x20));
    _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(w[0], w[1], 0x31));
    _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(w[2], w[3], 0x31));
  }
  for (; i < bytes; ++i) {
    y[2 * i] = table[codes[i] >> 4];
    y[2 * i + 1] = table[codes[i] & 0x0f];
  }
}

//! The 16 bf16 outputs of a 4-bit block: bf16(values[k] * absmax) for k < 16 (decode_element,
//! then one rounding), as bit patterns.
QMEM_QUANT_AVX2_FN void scale_table_bf16_avx2(float const* values, float absmax,
                                              std::uint16_t* out) noexcept {
  __m256 const a = _mm256_set1_ps(absmax);
  __m256i const lo = bf16_round_avx2(_mm256_mul_ps(_mm256_loadu_ps(values), a));
  __m256i const hi = bf16_round_avx2(_mm256_mul_ps(_mm256_loadu_ps(values + 8), a));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), pack_u16_avx2(lo, hi));
}

//! 8-bit codes of one block: y[i] = T(table[codes[i]] * absmax) for i < count (decode_element,
//! then one rounding to T), T = float or bf16. `table` holds the 256 decoded code values; the
//! look-ups are gathers from it (1 KiB, in L1).
template <class T>
QMEM_QUANT_AVX2_FN void lookup_bytes_avx2(float const* table, float absmax,
                                          std::uint8_t const* codes, std::size_t count,
                                          T* y) noexcept {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16>);
  __m256 const a = _mm256_set1_ps(absmax);
  std::size_t i = 0;
  std::size_t const vec_end = count - count % 16; // whole vectors (a form g++ can bound)
  for (; i < vec_end; i += 16) {
    __m128i const c = _mm_loadu_si128(reinterpret_cast<__m128i const*>(codes + i));
    __m256 const v0 = _mm256_mul_ps(_mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(c), 4), a);
    __m256 const v1 =
        _mm256_mul_ps(_mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)), 4), a);
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(y + i, v0);
      _mm256_storeu_ps(y + i + 8, v1);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i),
                          pack_u16_avx2(bf16_round_avx2(v0), bf16_round_avx2(v1)));
    }
  }
  for (; i < count; ++i)
    y[i] = from_float<T>(fmath::mul(table[codes[i]], absmax));
}

//! One row of row-wise int8 dequantization: y[c] = T((q[c] * absmax) * (1/127)) for c < cols
//! (rowwise_decode, then one rounding to T), T = float or bf16.
template <class T>
QMEM_QUANT_AVX2_FN void dequantize_row_avx2(std::int8_t const* q, float absmax, std::size_t cols,
                                            T* y) noexcept {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16>);
  __m256 const a = _mm256_set1_ps(absmax);
  __m256 const s = _mm256_set1_ps(inv127); // rowwise_ops.hpp's constant
  std::size_t c = 0;
  std::size_t const vec_end = cols - cols % 16; // whole vectors (a form g++ can bound)
  for (; c < vec_end; c += 16) {
    __m128i const v = _mm_loadu_si128(reinterpret_cast<__m128i const*>(q + c));
    __m256 const f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    __m256 const f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
    __m256 const y0 = _mm256_mul_ps(_mm256_mul_ps(f0, a), s);
    __m256 const y1 = _mm256_mul_ps(_mm256_mul_ps(f1, a), s);
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(y + c, y0);
      _mm256_storeu_ps(y + c + 8, y1);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + c),
                          pack_u16_avx2(bf16_round_avx2(y0), bf16_round_avx2(y1)));
    }
  }
  for (; c < cols; ++c)
    y[c] = from_float<T>(rowwise_decode(q[c], absmax));
}

#undef QMEM_QUANT_AVX2_FN

// --- AVX-512F (16 lanes; chosen over AVX2 when host_has_avx512()) --------------------------------

#define QMEM_QUANT_AVX512_FN __attribute__((target("avx2,avx512f"))) QMEM_QUANT_NO_CONTRACT inline

// g++ 12's unmasked AVX-512 intrinsics start from _mm512_undefined_*(), which -Wmaybe-uninitialized
// reports once inlined (GCC bug 105593, fixed in 13); the zero-masking forms with every lane
// selected compute the same and start from zero.
inline constexpr __mmask16 all16 = 0xffff;
inline constexpr __mmask8 all8 = 0xff;

//! bf16 of 16 floats (float_to_bf16_bits on every lane), narrowed to 16-bit lanes.
QMEM_QUANT_AVX512_FN __m256i bf16_round_avx512(__m512 f) noexcept {
  __m512i const u = _mm512_castps_si512(f);
  __m512i const lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(all16, u, 16), _mm512_set1_epi32(1));
  __m512i const bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb);
  __m512i rounded = _mm512_maskz_srli_epi32(all16, _mm512_add_epi32(u, bias), 16);
  __mmask16 const nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_maskz_cvtepi32_epi16(all16, rounded); // the values fit: a plain truncation
}

//! float16 of 16 floats (float_to_f16_bits on every lane: nearest even, overflow to inf, gradual
//! underflow, NaN -> sign | 0x7e00), narrowed to 16-bit lanes; integer operations only, so the
//! same bits whatever MXCSR's flush-to-zero and denormals-are-zero bits say.
QMEM_QUANT_AVX512_FN __m256i f16_round_avx512(__m512 f) noexcept {
  __m512i const u = _mm512_castps_si512(f);
  __m512i const sign =
      _mm512_and_si512(_mm512_maskz_srli_epi32(all16, u, 16), _mm512_set1_epi32(0x8000));
  __m512i const a = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
  // normal float16: (a + 0xfff + lsb - (112 << 23)) >> 13
  __m512i const lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(all16, a, 13), _mm512_set1_epi32(1));
  __m512i normal = _mm512_add_epi32(_mm512_add_epi32(a, _mm512_set1_epi32(0xfff)), lsb);
  normal =
      _mm512_maskz_srli_epi32(all16, _mm512_sub_epi32(normal, _mm512_set1_epi32(0x38000000)), 13);
  // subnormal float16: the 24-bit significand shifted right by 126 - exponent (14..24), nearest
  // even (only lanes with a in (0x33000000, 0x38800000) use this; others' shifts are clamped)
  __m512i const e = _mm512_maskz_srli_epi32(all16, a, 23);
  __m512i const m = _mm512_or_si512(_mm512_and_si512(a, _mm512_set1_epi32(0x7fffff)),
                                    _mm512_set1_epi32(0x800000));
  __m512i shift = _mm512_sub_epi32(_mm512_set1_epi32(126), e);
  shift = _mm512_maskz_min_epi32(all16, _mm512_maskz_max_epi32(all16, shift, _mm512_set1_epi32(14)),
                                 _mm512_set1_epi32(24));
  __m512i const r = _mm512_maskz_srlv_epi32(all16, m, shift);
  __m512i const one = _mm512_set1_epi32(1);
  __m512i const rem =
      _mm512_and_si512(m, _mm512_sub_epi32(_mm512_maskz_sllv_epi32(all16, one, shift), one));
  __m512i const half = _mm512_maskz_sllv_epi32(all16, one, _mm512_sub_epi32(shift, one));
  __mmask16 const up = _mm512_cmpgt_epi32_mask(rem, half) |
                       (_mm512_cmpeq_epi32_mask(rem, half) & _mm512_test_epi32_mask(r, one));
  __m512i const sub = _mm512_mask_add_epi32(r, up, r, one);
  // pick per lane, in the scalar code's order of tests
  __m512i v =
      _mm512_mask_mov_epi32(normal, _mm512_cmplt_epi32_mask(a, _mm512_set1_epi32(0x38800000)), sub);
  v = _mm512_mask_mov_epi32(v, _mm512_cmple_epi32_mask(a, _mm512_set1_epi32(0x33000000)),
                            _mm512_setzero_si512());
  v = _mm512_mask_mov_epi32(v, _mm512_cmpge_epi32_mask(a, _mm512_set1_epi32(0x477ff000)),
                            _mm512_set1_epi32(0x7c00));
  v = _mm512_mask_mov_epi32(v, _mm512_cmpgt_epi32_mask(a, _mm512_set1_epi32(0x7f800000)),
                            _mm512_set1_epi32(0x7e00));
  return _mm512_maskz_cvtepi32_epi16(all16, _mm512_or_si512(v, sign));
}

//! y[i] = f16(x[i]) for i < n (float_to_f16_bits on every element).
QMEM_QUANT_AVX512_FN void narrow_f16_avx512(float const* x, std::size_t n, f16* y) noexcept {
  std::size_t i = 0;
  std::size_t const vec_end = n - n % 16;
  for (; i < vec_end; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i),
                        f16_round_avx512(_mm512_loadu_ps(x + i)));
  for (; i < n; ++i)
    y[i] = f16(x[i]);
}

//! 16 floats from 16 bf16 (exact).
QMEM_QUANT_AVX512_FN __m512 bf16_widen_avx512(__m256i h) noexcept {
  return _mm512_castsi512_ps(
      _mm512_maskz_slli_epi32(all16, _mm512_maskz_cvtepu16_epi32(all16, h), 16));
}

//! y[i] = bf16(x[i]) for i < n (float_to_bf16_bits on every element).
QMEM_QUANT_AVX512_FN void narrow_bf16_avx512(float const* x, std::size_t n, bf16* y) noexcept {
  std::size_t i = 0;
  std::size_t const vec_end = n - n % 16; // whole vectors (a form g++ can bound)
  for (; i < vec_end; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i),
                        bf16_round_avx512(_mm512_loadu_ps(x + i)));
  for (; i < n; ++i)
    y[i] = bf16(x[i]);
}

//! y[i] = float(x[i]) for i < n (exact).
QMEM_QUANT_AVX512_FN void widen_bf16_avx512(bf16 const* x, std::size_t n, float* y) noexcept {
  std::size_t i = 0;
  std::size_t const vec_end = n - n % 16; // whole vectors (a form g++ can bound)
  for (; i < vec_end; i += 16)
    _mm512_storeu_ps(
        y + i, bf16_widen_avx512(_mm256_loadu_si256(reinterpret_cast<__m256i const*>(x + i))));
  for (; i < n; ++i)
    y[i] = x[i].to_float();
}

//! lookup_bytes_avx2 on 16 lanes.
template <class T>
QMEM_QUANT_AVX512_FN void lookup_bytes_avx512(float const* table, float absmax,
                                              std::uint8_t const* codes, std::size_t count,
                                              T* y) noexcept {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>);
  __m512 const a = _mm512_set1_ps(absmax);
  std::size_t i = 0;
  std::size_t const vec_end = count - count % 16; // whole vectors (a form g++ can bound)
  for (; i < vec_end; i += 16) {
    __m512i const idx = _mm512_maskz_cvtepu8_epi32(
        all16, _mm_loadu_si128(reinterpret_cast<__m128i const*>(codes + i)));
    __m512 const v =
        _mm512_mul_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), all16, idx, table, 4), a);
    if constexpr (std::is_same_v<T, float>)
      _mm512_storeu_ps(y + i, v);
    else if constexpr (std::is_same_v<T, bf16>)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), bf16_round_avx512(v));
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), f16_round_avx512(v));
  }
  for (; i < count; ++i)
    y[i] = from_float<T>(fmath::mul(table[codes[i]], absmax));
}

//! dequantize_row_avx2 on 16 lanes.
template <class T>
QMEM_QUANT_AVX512_FN void dequantize_row_avx512(std::int8_t const* q, float absmax,
                                                std::size_t cols, T* y) noexcept {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>);
  __m512 const a = _mm512_set1_ps(absmax);
  __m512 const s = _mm512_set1_ps(inv127);
  std::size_t c = 0;
  std::size_t const vec_end = cols - cols % 16; // whole vectors (a form g++ can bound)
  for (; c < vec_end; c += 16) {
    __m512 const f = _mm512_maskz_cvtepi32_ps(
        all16, _mm512_maskz_cvtepi8_epi32(
                   all16, _mm_loadu_si128(reinterpret_cast<__m128i const*>(q + c))));
    __m512 const v = _mm512_mul_ps(_mm512_mul_ps(f, a), s);
    if constexpr (std::is_same_v<T, float>)
      _mm512_storeu_ps(y + c, v);
    else if constexpr (std::is_same_v<T, bf16>)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + c), bf16_round_avx512(v));
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + c), f16_round_avx512(v));
  }
  for (; c < cols; ++c)
    y[c] = from_float<T>(rowwise_decode(q[c], absmax));
}

//! NF4's 15 decision thresholds, ascending: nf4::encode(x) counts those below x. A copy of the
//! constants in nf4::encode (which keeps them local so that CUDA kernels can use them); the
//! static_assert below proves the two equal, bit for bit, from nf4::encode itself.
inline constexpr float nf4_thresholds[15] = {
    -0.8480964004993439f,  -0.6106329262256622f,  -0.4599952697753906f,   -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f,   0.2035212516784668f,   0.2920137718319893f,    0.3893125355243683f,
    0.5016634166240692f,   0.6427869200706482f,   0.8614784181118011f};

//! True when nf4_thresholds[i] is exactly where nf4::encode steps from code i to code i + 1:
//! encode(t) == i and encode(the next float above t) == i + 1, for every i.
constexpr bool nf4_thresholds_match() noexcept {
  for (unsigned i = 0; i < 15; ++i) {
    float const t = nf4_thresholds[i];
    std::uint32_t const b = std::bit_cast<std::uint32_t>(t);
    float const above = std::bit_cast<float>(t < 0.0f ? b - 1 : b + 1);
    if (nf4::encode(t, nf4::book) != i || nf4::encode(above, nf4::book) != i + 1)
      return false;
  }
  return true;
}
static_assert(nf4_thresholds_match(), "nf4_thresholds differ from nf4::encode's thresholds");

//! The binary search's lookup tables: step s (8, 4, 2, 1) compares with t[idx + s - 1]; idx is
//! 0 at step 8, so that step compares with t[7] everywhere, the others look up a table shifted by
//! s - 1 (entries past t[14] are never read: idx + s - 1 <= 14). Built once at compile time: built
//! per block, they cost 48 scalar stores per 64 elements (NF4 quantize from bf16 0.27 -> see
//! docs/benchmarks.md, 2-core development box, 2026-11-29).
struct nf4_shifted_table {
  alignas(64) float v[3][16];
};
inline constexpr nf4_shifted_table nf4_shifted_thresholds = [] {
  nf4_shifted_table t{};
  for (unsigned s = 0; s < 3; ++s) {
    unsigned const off = (4u >> s) - 1;
    for (unsigned j = 0; j < 16; ++j)
      t.v[s][j] = j + off < 15 ? nf4_thresholds[j + off] : 0.0f;
  }
  return t;
}();

//! 16 floats from x[0, 16) (bf16 widened exactly).
QMEM_QUANT_AVX512_FN __m512 load16_avx512(float const* x) noexcept { return _mm512_loadu_ps(x); }
QMEM_QUANT_AVX512_FN __m512 load16_avx512(bf16 const* x) noexcept {
  return bf16_widen_avx512(_mm256_loadu_si256(reinterpret_cast<__m256i const*>(x)));
}

//! max |x[i]| over x[0, count) as block_absmax_bits computes it (integer maximum of the bit
//! patterns with the sign cleared: NaN wins, then inf), on 16 lanes. T = float or bf16.
template <class T>
QMEM_QUANT_AVX512_FN float absmax_avx512(T const* x, std::size_t count) noexcept {
  std::size_t const full = count & ~std::size_t{15};
  __m512i m = _mm512_setzero_si512();
  __m512i const abs_mask = _mm512_set1_epi32(0x7fffffff);
  for (std::size_t i = 0; i < full; i += 16)
    m = _mm512_maskz_max_epi32(
        all16, m, _mm512_and_si512(_mm512_castps_si512(load16_avx512(x + i)), abs_mask));
  alignas(64) std::uint32_t lanes[16];
  _mm512_store_si512(lanes, m);
  std::uint32_t amax_bits = 0;
  for (std::uint32_t const l : lanes)
    amax_bits = l > amax_bits ? l : amax_bits;
  for (std::size_t i = full; i < count; ++i) {
    std::uint32_t const b = abs_bits(to_float(x[i]));
    amax_bits = b > amax_bits ? b : amax_bits;
  }
  float const amax = qmem::detail::bits_to_float(amax_bits);
  return amax;
}

//! NF4 codes of one block without stochastic rounding, on 16 lanes: absmax (block_absmax_bits),
//! then per element nf4::encode(x * (1 / absmax)) as a 4-step binary search over the thresholds
//! (x > t compared exactly as rank_above compares, NaN never above), packed two per byte. Writes
//! code_bytes(count) bytes to `codes` (an odd tail's low nibble is nf4::zero_code) and returns
//! the absmax. T = float or bf16.
template <class T>
QMEM_QUANT_AVX512_FN float quantize_block_nf4_avx512(T const* x, std::size_t count,
                                                     std::uint8_t* codes) noexcept {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16>);
  std::size_t const full = count & ~std::size_t{15};
  float const amax = absmax_avx512(x, count);
  float const inv = fmath::rcp(amax);
  __m512 const t8 = _mm512_set1_ps(nf4_thresholds[7]);
  __m512 const t4 = _mm512_load_ps(nf4_shifted_thresholds.v[0]),
               t2 = _mm512_load_ps(nf4_shifted_thresholds.v[1]),
               t1 = _mm512_load_ps(nf4_shifted_thresholds.v[2]);
  __m512 const vinv = _mm512_set1_ps(inv);
  for (std::size_t i = 0; i < full; i += 16) {
    __m512 const xn = _mm512_mul_ps(load16_avx512(x + i), vinv);
    __m512i idx = _mm512_mask_mov_epi32(
        _mm512_setzero_si512(), _mm512_cmp_ps_mask(xn, t8, _CMP_GT_OQ), _mm512_set1_epi32(8));
    idx = _mm512_mask_add_epi32(
        idx, _mm512_cmp_ps_mask(xn, _mm512_maskz_permutexvar_ps(all16, idx, t4), _CMP_GT_OQ), idx,
        _mm512_set1_epi32(4));
    idx = _mm512_mask_add_epi32(
        idx, _mm512_cmp_ps_mask(xn, _mm512_maskz_permutexvar_ps(all16, idx, t2), _CMP_GT_OQ), idx,
        _mm512_set1_epi32(2));
    idx = _mm512_mask_add_epi32(
        idx, _mm512_cmp_ps_mask(xn, _mm512_maskz_permutexvar_ps(all16, idx, t1), _CMP_GT_OQ), idx,
        _mm512_set1_epi32(1));
    // per 64-bit lane: element 2k in the low dword, 2k + 1 in the high one -> (e0 << 4) | e1
    __m512i const pairs = _mm512_or_si512(_mm512_maskz_slli_epi64(all8, idx, 4),
                                          _mm512_maskz_srli_epi64(all8, idx, 32));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i / 2),
                     _mm512_maskz_cvtepi64_epi8(all8, pairs));
  }
  for (std::size_t i = full; i < count; i += 2) {
    std::uint8_t const first = nf4::encode(fmath::mul(to_float(x[i]), inv), nf4::book);
    std::uint8_t const second = i + 1 < count
                                    ? nf4::encode(fmath::mul(to_float(x[i + 1]), inv), nf4::book)
                                    : nf4::zero_code;
    codes[i / 2] = pack_nibbles(first, second);
  }
  return amax;
}

//! One row of row-wise int8 quantization on 16 lanes: the row's absmax (block_absmax_bits), then
//! q[c] = rowwise_encode(x[c], 127 / absmax): x * scale clamped to [-256, 256], rounded to
//! nearest even, NaN -> 0, saturated to [-127, 127] (round_int8). Returns the absmax.
//! T = float or bf16.
template <class T>
QMEM_QUANT_AVX512_FN float quantize_row_avx512(T const* x, std::size_t cols,
                                               std::int8_t* q) noexcept {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16>);
  std::size_t const full = cols & ~std::size_t{15};
  float const amax = absmax_avx512(x, cols);
  float const scale = fmath::div(127.0f, amax);
  __m512 const s = _mm512_set1_ps(scale);
  __m512 const lo = _mm512_set1_ps(-256.0f), hi = _mm512_set1_ps(256.0f);
  __m512i const qlo = _mm512_set1_epi32(-127), qhi = _mm512_set1_epi32(127);
  for (std::size_t c = 0; c < full; c += 16) {
    __m512 const v = _mm512_mul_ps(load16_avx512(x + c), s);
    __mmask16 const number = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
    // min/max return their second operand for a NaN: the NaN lanes are zeroed below anyway
    __m512 const clamped = _mm512_maskz_max_ps(all16, _mm512_maskz_min_ps(all16, v, hi), lo);
    __m512i r = _mm512_maskz_cvt_roundps_epi32(all16, clamped,
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_maskz_max_epi32(number, _mm512_maskz_min_epi32(all16, r, qhi), qlo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c), _mm512_maskz_cvtepi32_epi8(all16, r));
  }
  for (std::size_t c = full; c < cols; ++c)
    q[c] = rowwise_encode(to_float(x[c]), scale);
  return amax;
}

//! 8-bit codes of one block through a search_table (bitsandbytes' searched maps), without
//! stochastic rounding, on 16 lanes: absmax (block_absmax_bits), then per element
//! t.encode(x * (1 / absmax)) with the table's documented vector look-up (one gather per 16
//! values). Writes `count` codes and returns the absmax. T = float or bf16.
template <class T>
QMEM_QUANT_AVX512_FN float quantize_block_searched_avx512(search_table const& t, T const* x,
                                                          std::size_t count,
                                                          std::uint8_t* codes) noexcept {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16>);
  std::size_t const full = count & ~std::size_t{15};
  float const amax = absmax_avx512(x, count);
  float const inv = fmath::rcp(amax);
  __m512 const vinv = _mm512_set1_ps(inv);
  __m512i const abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i const key_lo = _mm512_set1_epi32(static_cast<int>(search_table::key_lo));
  __m512i const key_hi = _mm512_set1_epi32(static_cast<int>(search_table::key_hi));
  __m512i const buckets = _mm512_set1_epi32(static_cast<int>(search_table::buckets));
  __m512i const inf_bits = _mm512_set1_epi32(0x7f800000);
  __m512i const nan_code = _mm512_set1_epi32(static_cast<int>(t.nan_code()));
  __m512i const byte = _mm512_set1_epi32(0xff);
  auto const* entries = reinterpret_cast<int const*>(t.entries());
  for (std::size_t i = 0; i < full; i += 16) {
    __m512i const u = _mm512_castps_si512(_mm512_mul_ps(load16_avx512(x + i), vinv));
    __m512i const a = _mm512_and_si512(u, abs_mask);
    __m512i key = _mm512_maskz_srli_epi32(all16, a, search_table::shift);
    key = _mm512_maskz_min_epu32(all16, _mm512_maskz_max_epu32(all16, key, key_lo), key_hi);
    // index: sign * buckets + key - key_lo
    __m512i const sign = _mm512_maskz_srli_epi32(all16, u, 31);
    __m512i const idx = _mm512_add_epi32(_mm512_maskz_mullo_epi32(all16, sign, buckets),
                                         _mm512_sub_epi32(key, key_lo));
    __m512i const e = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), all16, idx, entries, 4);
    __m512i const limit = _mm512_or_si512(_mm512_maskz_slli_epi32(all16, key, search_table::shift),
                                          _mm512_maskz_srli_epi32(all16, e, 16));
    // every operand is below 2^31: the signed compares order them as the scalar code does
    __m512i r = _mm512_mask_mov_epi32(e, _mm512_cmpgt_epi32_mask(a, limit),
                                      _mm512_maskz_srli_epi32(all16, e, 8));
    r = _mm512_mask_mov_epi32(r, _mm512_cmpgt_epi32_mask(a, inf_bits), nan_code);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i),
                     _mm512_maskz_cvtepi32_epi8(all16, _mm512_and_si512(r, byte)));
  }
  for (std::size_t i = full; i < count; ++i)
    codes[i] = t.encode(fmath::mul(to_float(x[i]), inv));
  return amax;
}

#undef QMEM_QUANT_AVX512_FN

// --- AVX-512 with BW, VL, DQ and BF16 (chosen when host_has_avx512_bf16()) -----------------------
// The 16-bit outputs of the 8-bit and row-wise loops: the hardware conversions (`vcvtne2ps2bf16`,
// `vcvtps2ph`) where their result is core/numeric.hpp's, and 8-bit look-ups through 16-bit
// permutes (`vpermt2w`: 64 words from two registers).

#define QMEM_QUANT_AVX512BF16_FN                                                                   \
  __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))                    \
  QMEM_QUANT_NO_CONTRACT inline
#define QMEM_QUANT_AVX512VBMI_FN                                                                   \
  __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi")))         \
  QMEM_QUANT_NO_CONTRACT inline

inline constexpr __mmask32 all32 = 0xffffffffu;
inline constexpr __mmask64 all64 = ~__mmask64{0};

//! The 512 bits lo (low half), hi (high half).
QMEM_QUANT_AVX512BF16_FN __m512i join256_avx512(__m256i lo, __m256i hi) noexcept {
  return _mm512_maskz_inserti64x4(
      all8, _mm512_maskz_inserti64x4(all8, _mm512_setzero_si512(), lo, 0), hi, 1);
}

//! How the hardware narrowing may be trusted (see round32_avx512).
enum class hw_round : bool {
  checked,  //!< any input: lanes the hardware gets wrong are detected and redone
  unchecked //!< the caller guarantees no subnormal input and NaN only as +-0x7fc00000 (bf16: +)
};

//! 32 bf16 in element order, lo giving elements 0-15 and hi 16-31: float_to_bf16_bits on every
//! lane. `vcvtne2ps2bf16` rounds to nearest even exactly as the integer form does, except that it
//! reads subnormal inputs as zero and keeps a NaN's sign and payload (0x7fc00000 -> 0x7fc0, the
//! integer form's NaN). Checked: a vector with a NaN has those lanes set to 0x7fc0, one with a
//! subnormal takes bf16_round_avx512 (`vfpclassps` finds both), so the bits never depend on MXCSR.
//! A normal float never rounds to a subnormal bf16 (bf16 has float's exponent range).
template <hw_round R>
QMEM_QUANT_AVX512BF16_FN __m512i bf16_round32_avx512(__m512 lo, __m512 hi) noexcept {
  __m512i const r = (__m512i)_mm512_cvtne2ps_pbh(hi, lo); // a vector cast: the same 64 bytes
  if constexpr (R == hw_round::checked) {
    constexpr int nan = 0x01 | 0x80, subnormal = 0x20;
    if ((_mm512_fpclass_ps_mask(lo, nan | subnormal) |
         _mm512_fpclass_ps_mask(hi, nan | subnormal)) != 0) [[unlikely]] {
      if ((_mm512_fpclass_ps_mask(lo, subnormal) | _mm512_fpclass_ps_mask(hi, subnormal)) != 0)
        return join256_avx512(bf16_round_avx512(lo), bf16_round_avx512(hi));
      __mmask32 const nan_lanes =
          _mm512_kunpackw(_mm512_fpclass_ps_mask(hi, nan), _mm512_fpclass_ps_mask(lo, nan));
      return _mm512_mask_mov_epi16(r, nan_lanes, _mm512_set1_epi16(0x7fc0));
    }
  }
  return r;
}

//! 16 f16 (float_to_f16_bits on every lane). `vcvtps2ph` with round-to-nearest-even gives the
//! integer form's bits for every float but a NaN whose payload is not 0x400000 (it keeps the
//! payload's top bits; the integer form gives sign | 0x7e00). Checked: NaN lanes are set to
//! sign | 0x7e00. Subnormal floats become +-0 either way (they are below half of f16's smallest
//! subnormal), so MXCSR's denormals-are-zero does not change the result.
template <hw_round R>
QMEM_QUANT_AVX512BF16_FN __m256i f16_round16_avx512(__m512 f) noexcept {
  __m256i const r = _mm512_maskz_cvtps_ph(all16, f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if constexpr (R == hw_round::checked) {
    __mmask16 const nan = _mm512_fpclass_ps_mask(f, 0x01 | 0x80);
    if (nan != 0) [[unlikely]]
      return _mm256_mask_mov_epi16(
          r, nan,
          _mm256_or_si256(_mm256_and_si256(r, _mm256_set1_epi16(static_cast<short>(0x8000))),
                          _mm256_set1_epi16(0x7e00)));
  }
  return r;
}

//! v * a as the element code's product. Both NaN (a NaN code in a block with a NaN absmax): the
//! f16 output keeps v's sign, as the scalar `values[c] * absmax` does on x86 (the first operand's
//! NaN); vmulps's choice depends on which operand the compiler puts first, so f16 with checked
//! rounding sets it.
template <class T, hw_round R>
QMEM_QUANT_AVX512BF16_FN __m512 scale16_avx512(__m512 v, __m512 a) noexcept {
  __m512 const p = _mm512_mul_ps(v, a);
  if constexpr (std::is_same_v<T, f16> && R == hw_round::checked)
    return _mm512_mask_mov_ps(p, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
  else
    return p;
}

//! 32 outputs of type T (bf16 or f16) in element order from two vectors of 16 floats.
template <class T, hw_round R = hw_round::checked>
QMEM_QUANT_AVX512BF16_FN __m512i round32_avx512(__m512 lo, __m512 hi) noexcept {
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, f16>);
  if constexpr (std::is_same_v<T, bf16>)
    return bf16_round32_avx512<R>(lo, hi);
  else
    return join256_avx512(f16_round16_avx512<R>(lo), f16_round16_avx512<R>(hi));
}

//! y[i] = T(x[i]) for i < n, T = bf16 or f16 (float_to_bf16_bits / float_to_f16_bits).
template <class T>
QMEM_QUANT_AVX512BF16_FN void narrow_avx512bf16(float const* x, std::size_t n, T* y) noexcept {
  std::size_t i = 0;
  std::size_t const vec_end = n - n % 32; // whole vectors (a form g++ can bound)
  for (; i < vec_end; i += 32)
    _mm512_storeu_si512(y + i,
                        round32_avx512<T>(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i + 16)));
  for (; i < n; ++i)
    y[i] = from_float<T>(x[i]);
}

//! 256 16-bit entries as two byte tables (low bytes, high bytes) of four registers each, looked
//! up by byte codes 64 at a time (lookup64_u16). `vpermt2b` (AVX512-VBMI) indexes 128 bytes of two
//! registers in one instruction; the 16-bit permute `vpermt2w` takes several (dev box, one
//! thread, 2^16 codes in L2: 0.095 ns per 8-bit code to bf16 with word permutes, see
//! docs/benchmarks.md for the byte form).
struct byte_table_u16 {
  __m512i lo[4]; //!< low bytes of entries [64k, 64k + 64) in lo[k]
  __m512i hi[4]; //!< high bytes
};

//! Splits 64 16-bit entries (32 in a, 32 in b) into their low and high bytes.
QMEM_QUANT_AVX512VBMI_FN void split_bytes(__m512i a, __m512i b, __m512i& lo, __m512i& hi) noexcept {
  __m512i const even = _mm512_set_epi8(
      126, 124, 122, 120, 118, 116, 114, 112, 110, 108, 106, 104, 102, 100, 98, 96, 94, 92, 90, 88,
      86, 84, 82, 80, 78, 76, 74, 72, 70, 68, 66, 64, 62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42,
      40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  lo = _mm512_maskz_permutex2var_epi8(all64, a, even, b);
  hi = _mm512_maskz_permutex2var_epi8(all64, a, _mm512_add_epi8(even, _mm512_set1_epi8(1)), b);
}

//! 64 entries of `t` from 64 codes, as two vectors of 32 16-bit entries in element order (first:
//! codes 0-31). The codes are first permuted so that the byte interleave (`vpunpck*bw`, which
//! works per 128-bit lane) comes out in element order.
template <bool Mirrored = false>
QMEM_QUANT_AVX512VBMI_FN void lookup64_u16(byte_table_u16 const& t, __m512i c, __m512i& first,
                                           __m512i& second) noexcept {
  // lane L (16 bytes): codes 8L .. 8L + 7, then 32 + 8L .. 32 + 8L + 7
  __m512i const order = _mm512_set_epi8(
      63, 62, 61, 60, 59, 58, 57, 56, 31, 30, 29, 28, 27, 26, 25, 24, 55, 54, 53, 52, 51, 50, 49,
      48, 23, 22, 21, 20, 19, 18, 17, 16, 47, 46, 45, 44, 43, 42, 41, 40, 15, 14, 13, 12, 11, 10, 9,
      8, 39, 38, 37, 36, 35, 34, 33, 32, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512i const p = _mm512_maskz_permutexvar_epi8(all64, order, c);
  __mmask64 const upper = _mm512_movepi8_mask(p); // bit 7: entries 128-255
  // mirrored: the upper half's low bytes are the lower half's
  __m512i const lo =
      Mirrored ? _mm512_maskz_permutex2var_epi8(all64, t.lo[0], p, t.lo[1])
               : _mm512_mask_blend_epi8(upper,
                                        _mm512_maskz_permutex2var_epi8(all64, t.lo[0], p, t.lo[1]),
                                        _mm512_maskz_permutex2var_epi8(all64, t.lo[2], p, t.lo[3]));
  __m512i const hi =
      _mm512_mask_blend_epi8(upper, _mm512_maskz_permutex2var_epi8(all64, t.hi[0], p, t.hi[1]),
                             _mm512_maskz_permutex2var_epi8(all64, t.hi[2], p, t.hi[3]));
  first = _mm512_unpacklo_epi8(lo, hi);
  second = _mm512_unpackhi_epi8(lo, hi);
}

//! y[i] = t[codes[i]] for i < count (lookup64_u16), the tail with masked loads and stores.
template <bool Mirrored, class T>
QMEM_QUANT_AVX512VBMI_FN void lookup_bytes_u16(byte_table_u16 const& t, std::uint8_t const* codes,
                                               std::size_t count, T* y) noexcept {
  std::size_t i = 0;
  std::size_t const vec_end = count - count % 64; // whole vectors (a form g++ can bound)
  for (; i < vec_end; i += 64) {
    __m512i first, second;
    lookup64_u16<Mirrored>(t, _mm512_loadu_si512(codes + i), first, second);
    _mm512_storeu_si512(y + i, first);
    _mm512_storeu_si512(y + i + 32, second);
  }
  if (i < count) {
    std::size_t const rest = count - i;
    __mmask64 const m = (__mmask64{1} << rest) - 1; // rest < 64
    __m512i first, second;
    lookup64_u16<Mirrored>(t, _mm512_maskz_loadu_epi8(m, codes + i), first, second);
    _mm512_mask_storeu_epi16(y + i, static_cast<__mmask32>(m), first);
    if (rest > 32)
      _mm512_mask_storeu_epi16(y + i + 32, static_cast<__mmask32>(m >> 32), second);
  }
}

//! How the 256 outputs of a block relate (byte_table_shape): `mirrored` when
//! values[c + 128] == -values[c] for c < 128 (fp8: a sign bit), so that the upper 128 outputs are
//! the lower ones with the sign flipped (IEEE products and round-to-nearest-even are symmetric),
//! except NaN outputs of bf16 (always 0x7fc0): `flip[k]` has bit j set when entry 64k + j is not
//! NaN.
struct byte_table_shape {
  bool mirrored = false;
  __mmask64 flip[2] = {0, 0};
};

//! 8-bit codes of one block to T = bf16 or f16: y[i] = T(values[codes[i]] * absmax) for
//! i < count (decode_element, then one rounding), through the block's 256 outputs (256 products
//! and roundings; 128 when `shape.mirrored`, for unchecked rounding only) looked up 64 per step;
//! the tail with masked loads and stores. For all but the smallest blocks.
template <class T, hw_round R>
QMEM_QUANT_AVX512VBMI_FN void
lookup_bytes_table_avx512(float const* values, float absmax, std::uint8_t const* codes,
                          std::size_t count, T* y, byte_table_shape const& shape) noexcept {
  __m512 const a = _mm512_set1_ps(absmax);
  byte_table_u16 t;
  bool const mirrored = R == hw_round::unchecked && shape.mirrored;
  for (int k = 0; k < (mirrored ? 2 : 4); ++k) {
    float const* v = values + 64 * k;
    __m512i const w0 = round32_avx512<T, R>(scale16_avx512<T, R>(_mm512_loadu_ps(v), a),
                                            scale16_avx512<T, R>(_mm512_loadu_ps(v + 16), a));
    __m512i const w1 = round32_avx512<T, R>(scale16_avx512<T, R>(_mm512_loadu_ps(v + 32), a),
                                            scale16_avx512<T, R>(_mm512_loadu_ps(v + 48), a));
    split_bytes(w0, w1, t.lo[k], t.hi[k]);
  }
  if (mirrored) {
    __m512i const sign = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int k = 0; k < 2; ++k) {
      t.lo[k + 2] = t.lo[k];
      t.hi[k + 2] = _mm512_mask_blend_epi8(shape.flip[k], t.hi[k], _mm512_xor_si512(t.hi[k], sign));
    }
  }
  if (mirrored)
    lookup_bytes_u16<true>(t, codes, count, y);
  else
    lookup_bytes_u16<false>(t, codes, count, y);
}

//! NF4's encoder as a 32-bucket look-up, on s = 16 xn: bucket k = floor(s) (an integer in
//! [-17, 16]; its low 5 bits index 32 entries) covers xn in [k/16, (k+1)/16), narrower than the
//! closest two thresholds (0.085 apart), so it holds at most one: one compare of s with 16 times
//! that threshold (+inf where there is none) in place of the 4-step search. The lane's
//! k ^ (s > threshold ? 32 : 0) then indexes, by its low 6 bits, a 64-byte table of codes
//! (`code[i | f << 5]`, f = the compare xor k < 0, since bit 5 of a k in [-17, 16] is its sign),
//! looked up 32 lanes at a time by one byte permute after packing. The two values that wrap,
//! s >= 16 (onto bucket 16, [-1, -15/16)) and s < -16 (onto 15, [15/16, 1)), reachable only
//! within an ulp of xn = +-1, land in the unused halves of those buckets' entries: 15 and 0.
//! Valid for finite |s| < 17; nf4_buckets_match() checks the table at every bucket edge, and
//! tests/quant/host_simd_test.cpp checks the vector encoder against nf4::encode over the floats
//! of [-17/16, 17/16] (every one with QMEM_EXHAUSTIVE=1).
struct nf4_bucket_table {
  alignas(64) float threshold[32]; //!< 16 times the bucket's threshold, +inf where it has none
  alignas(64) std::uint8_t code[64];
};

//! The float just below f (toward -inf).
constexpr float float_below(float f) noexcept {
  std::uint32_t const b = std::bit_cast<std::uint32_t>(f);
  return f > 0.0f ? std::bit_cast<float>(b - 1)
                  : (f == 0.0f ? std::bit_cast<float>(0x80000001u) : std::bit_cast<float>(b + 1));
}

//! The codes of bucket i (k = i or i - 32): at xn = k/16 and just below (k+1)/16.
constexpr std::uint8_t nf4_bucket_code(int i, bool top) noexcept {
  int const k = i < 16 ? i : i - 32;
  float const lo = static_cast<float>(k) / 16.0f;
  return nf4::encode(top ? float_below(static_cast<float>(k + 1) / 16.0f) : lo, nf4::book);
}

inline constexpr nf4_bucket_table nf4_buckets = [] {
  nf4_bucket_table t{};
  for (int i = 0; i < 32; ++i) {
    int const neg = i < 16 ? 0 : 1;
    std::uint8_t const below = nf4_bucket_code(i, false);
    std::uint8_t const above = nf4_bucket_code(i, true);
    // one step: encode counts the thresholds below xn
    t.threshold[i] =
        below != above ? 16.0f * nf4_thresholds[below] : std::numeric_limits<float>::infinity();
    t.code[i | neg << 5] = below;  // s <= threshold
    t.code[i | !neg << 5] = above; // s > threshold (unused without a threshold: below)
  }
  t.code[15 | 1 << 5] = 0;  // s < -16: floor -17 wraps onto bucket 15
  t.code[16 | 0 << 5] = 15; // s >= 16: floor 16 wraps onto bucket 16
  return t;
}();

//! True when every bucket of nf4_buckets holds at most one step of nf4::encode, at its threshold,
//! and buckets 15 and 16 (which take the wrapping values) none.
constexpr bool nf4_buckets_match() noexcept {
  for (int i = 0; i < 32; ++i) {
    int const k = i < 16 ? i : i - 32;
    std::uint8_t const below = nf4_bucket_code(i, false);
    std::uint8_t const above = nf4_bucket_code(i, true);
    float const t = nf4_buckets.threshold[i] / 16.0f;
    if (above > below + 1 || ((i == 15 || i == 16) && above != below))
      return false;
    if (below != above &&
        !(static_cast<float>(k) / 16.0f <= t && t < static_cast<float>(k + 1) / 16.0f &&
          nf4::encode(t, nf4::book) == below &&
          nf4::encode(std::bit_cast<float>(std::bit_cast<std::uint32_t>(t) + (t < 0.0f ? -1 : 1)),
                      nf4::book) == above))
      return false;
  }
  return true;
}
static_assert(nf4_buckets_match(), "an NF4 bucket holds two thresholds or a wrong step");

//! The bucket thresholds in registers.
struct nf4_bucket_regs {
  __m512 t_lo, t_hi;
  __m512i code;
};

QMEM_QUANT_AVX512VBMI_FN nf4_bucket_regs load_nf4_buckets() noexcept {
  return {_mm512_load_ps(nf4_buckets.threshold), _mm512_load_ps(nf4_buckets.threshold + 16),
          _mm512_load_si512(nf4_buckets.code)};
}

//! The code-table index of 16 lanes of s (finite, |s| < 17) in the low 6 bits of each 32-bit lane
//! (see nf4_bucket_table); look it up with nf4_codes_of.
QMEM_QUANT_AVX512VBMI_FN __m512i nf4_index16_avx512(__m512 s, nf4_bucket_regs const& b) noexcept {
  __m512i const k =
      _mm512_maskz_cvt_roundps_epi32(all16, s, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 const t = _mm512_maskz_permutex2var_ps(all16, b.t_lo, k, b.t_hi);
  return _mm512_mask_xor_epi32(k, _mm512_cmp_ps_mask(s, t, _CMP_GT_OQ), k, _mm512_set1_epi32(32));
}

//! The codes of 64 indices (bytes; bits 6-7 ignored).
QMEM_QUANT_AVX512VBMI_FN __m512i nf4_codes_of(__m512i index, nf4_bucket_regs const& b) noexcept {
  return _mm512_maskz_permutexvar_epi8(all64, index, b.code);
}

//! nf4::encode(xn[j]) for j < 16 through the buckets (s = 16 xn, exact), for finite |xn| < 17/16.
QMEM_QUANT_AVX512VBMI_FN void nf4_encode16_bucket_avx512(float const* xn,
                                                         std::uint8_t* codes) noexcept {
  nf4_bucket_regs const b = load_nf4_buckets();
  __m512i const index =
      nf4_index16_avx512(_mm512_mul_ps(_mm512_loadu_ps(xn), _mm512_set1_ps(16.0f)), b);
  // the 16 index bytes (in each 128-bit lane), looked up as the block loop does
  __m512i const bytes =
      _mm512_maskz_broadcast_i32x4(all16, _mm512_maskz_cvtepi32_epi8(all16, index));
  _mm512_mask_storeu_epi8(codes, 0xffff, nf4_codes_of(bytes, b));
}

//! max |x[i]| over x[0, count) as block_absmax_bits computes it, T = float or bf16, as a vector of
//! 16 partial maxima (bf16: as 16-bit integers, 32 per step, the bf16 bits in each lane); masked
//! loads for the tail.
template <class T>
QMEM_QUANT_AVX512VBMI_FN __m512i absmax_lanes_avx512bw(T const* x, std::size_t count) noexcept {
  constexpr std::size_t step = 64 / sizeof(T);
  __m512i m = _mm512_setzero_si512();
  std::size_t i = 0;
  if constexpr (std::is_same_v<T, bf16>) {
    __m512i const abs_mask = _mm512_set1_epi16(0x7fff);
    for (; i + step <= count; i += step)
      m = _mm512_maskz_max_epu16(all32, m, _mm512_and_si512(_mm512_loadu_si512(x + i), abs_mask));
    if (i < count)
      m = _mm512_maskz_max_epu16(
          all32, m,
          _mm512_and_si512(_mm512_maskz_loadu_epi16((__mmask32{1} << (count - i)) - 1, x + i),
                           abs_mask));
    return _mm512_maskz_max_epu32(all16, _mm512_and_si512(m, _mm512_set1_epi32(0xffff)),
                                  _mm512_maskz_srli_epi32(all16, m, 16));
  } else {
    __m512i const abs_mask = _mm512_set1_epi32(0x7fffffff);
    for (; i + step <= count; i += step)
      m = _mm512_maskz_max_epu32(all16, m, _mm512_and_si512(_mm512_loadu_si512(x + i), abs_mask));
    if (i < count)
      m = _mm512_maskz_max_epu32(
          all16, m,
          _mm512_and_si512(
              _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << (count - i)) - 1), x + i),
              abs_mask));
    return m;
  }
}

//! The absmax bits from absmax_lanes_avx512bw's lanes.
template <class T>
QMEM_QUANT_AVX512VBMI_FN std::uint32_t absmax_bits_of(__m512i lanes) noexcept {
  // swap halves, quarters, pairs and neighbours: every lane ends with the maximum
  __m512i m =
      _mm512_maskz_max_epu32(all16, lanes, _mm512_maskz_shuffle_i32x4(all16, lanes, lanes, 0x4e));
  m = _mm512_maskz_max_epu32(all16, m, _mm512_maskz_shuffle_i32x4(all16, m, m, 0xb1));
  m = _mm512_maskz_max_epu32(all16, m, _mm512_maskz_shuffle_epi32(all16, m, _MM_PERM_BADC));
  m = _mm512_maskz_max_epu32(all16, m, _mm512_maskz_shuffle_epi32(all16, m, _MM_PERM_CDAB));
  auto const r = static_cast<std::uint32_t>(_mm512_cvtsi512_si32(m));
  return std::is_same_v<T, bf16> ? r << 16 : r;
}

//! `vshufps` on 32-bit integers: per 128-bit lane, two lanes of a then two of b.
template <int Imm>
QMEM_QUANT_AVX512VBMI_FN __m512i shuffle_epi32_pairs(__m512i a, __m512i b) noexcept {
  return _mm512_castps_si512(
      _mm512_maskz_shuffle_ps(all16, _mm512_castsi512_ps(a), _mm512_castsi512_ps(b), Imm));
}

//! The 16 maxima of 16 vectors of lanes (m[j]: block j), in block order: a tree of 128-bit and
//! 32-bit shuffles, halving the lanes of each block per level (46 instructions for 16 blocks).
QMEM_QUANT_AVX512VBMI_FN __m512i reduce16_max_epu32(__m512i const* m) noexcept {
  __m512i r[8], q[4], p[2];
  for (int j = 0; j < 8; ++j) // block 2j in lanes 0-7, 2j + 1 in 8-15
    r[j] = _mm512_maskz_max_epu32(all16,
                                  _mm512_maskz_shuffle_i32x4(all16, m[2 * j], m[2 * j + 1], 0x44),
                                  _mm512_maskz_shuffle_i32x4(all16, m[2 * j], m[2 * j + 1], 0xee));
  for (int j = 0; j < 4; ++j) // block 4j + L in 128-bit lane L
    q[j] = _mm512_maskz_max_epu32(all16,
                                  _mm512_maskz_shuffle_i32x4(all16, r[2 * j], r[2 * j + 1], 0x88),
                                  _mm512_maskz_shuffle_i32x4(all16, r[2 * j], r[2 * j + 1], 0xdd));
  for (int j = 0; j < 2; ++j) // lane L: blocks 8j + L and 8j + 4 + L, two lanes each
    p[j] = _mm512_maskz_max_epu32(all16, shuffle_epi32_pairs<0x88>(q[2 * j], q[2 * j + 1]),
                                  shuffle_epi32_pairs<0xdd>(q[2 * j], q[2 * j + 1]));
  // 32-bit lane 4L + j: block L + 4j
  __m512i const f = _mm512_maskz_max_epu32(all16, shuffle_epi32_pairs<0x88>(p[0], p[1]),
                                           shuffle_epi32_pairs<0xdd>(p[0], p[1]));
  return _mm512_maskz_permutexvar_epi32(
      all16, _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), f);
}

//! 32 values as two vectors of floats, the lanes outside `m` zero: bf16 widened by interleaving
//! with zero words (lanes: elements {0-3, 8-11, 16-19, 24-27}, then {4-7, 12-15, ...}), float in
//! element order.
QMEM_QUANT_AVX512VBMI_FN void nf4_load32(bf16 const* x, __mmask32 m, __m512& lo,
                                         __m512& hi) noexcept {
  __m512i const v = _mm512_maskz_loadu_epi16(m, x);
  lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), v));
  hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), v));
}
QMEM_QUANT_AVX512VBMI_FN void nf4_load32(float const* x, __mmask32 m, __m512& lo,
                                         __m512& hi) noexcept {
  lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), x);
  hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m >> 16), x + 16);
}

//! The 16 code bytes of 32 values (nf4_load32's lanes; `gather` puts their index bytes in
//! element order) scaled by vinv = 16 / absmax, in the low 16 bytes.
QMEM_QUANT_AVX512VBMI_FN __m512i nf4_pack32(__m512 lo, __m512 hi, __m512 vinv, __m512i gather,
                                            nf4_bucket_regs const& b) noexcept {
  __m512i const pair_weights = _mm512_set1_epi16(0x0110); // bytes 16, 1
  __m512i const low_bytes =
      _mm512_set_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 30, 28, 26,
                      24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  __m512i const i0 = nf4_index16_avx512(_mm512_mul_ps(lo, vinv), b);
  __m512i const i1 = nf4_index16_avx512(_mm512_mul_ps(hi, vinv), b);
  __m512i const c = nf4_codes_of(_mm512_maskz_permutex2var_epi8(all64, i0, gather, i1), b);
  return _mm512_maskz_permutexvar_epi8(all64, low_bytes, _mm512_maddubs_epi16(c, pair_weights));
}

//! NF4 codes of one block through nf4_buckets, given s-scale inv16 = 16 * (1 / absmax) (finite,
//! with a finite absmax): per element the code of s = x * inv16 (which is 16 * (x * (1 / absmax))
//! exactly unless x * (1 / absmax) is subnormal, where both give the code of 0). 32 values per
//! step: bf16 widened by interleaving with zero words, float in two loads; the 32 indices
//! gathered in element order by one byte permute, looked up, and paired into nibbles by
//! `vpmaddubsw` (16 * first + second) and a byte permute. The tail is loaded masked (zeros
//! encode as nf4::zero_code, the odd tail's pad) and stored masked. Writes code_bytes(count).
template <class T>
QMEM_QUANT_AVX512VBMI_FN void encode_block_nf4_bucket_avx512(T const* x, std::size_t count,
                                                             float inv16, std::uint8_t* codes,
                                                             nf4_bucket_regs const& b) noexcept {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16>);
  __m512 const vinv = _mm512_set1_ps(inv16);
  // output byte e <- the index byte of element e: bf16 lanes come as elements
  // {0-3, 8-11, 16-19, 24-27} (first register) and {4-7, 12-15, ...} (second), float lanes in order
  alignas(64) static constexpr std::uint8_t gather_index[2][64] = {
      {0,  4,  8,  12, 64, 68,  72,  76,  16, 20, 24, 28, 80,  84,  88,  92,
       32, 36, 40, 44, 96, 100, 104, 108, 48, 52, 56, 60, 112, 116, 120, 124},
      {0,  4,  8,  12, 16, 20, 24, 28, 32, 36,  40,  44,  48,  52,  56,  60,
       64, 68, 72, 76, 80, 84, 88, 92, 96, 100, 104, 108, 112, 116, 120, 124}};
  __m512i const gather = _mm512_load_si512(gather_index[std::is_same_v<T, bf16> ? 0 : 1]);
  std::size_t i = 0;
  std::size_t const vec_end = count - count % 32; // whole vectors (a form g++ can bound)
  for (; i < vec_end; i += 32) {
    __m512 lo, hi;
    nf4_load32(x + i, all32, lo, hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i / 2),
                     _mm512_maskz_extracti32x4_epi32(0xf, nf4_pack32(lo, hi, vinv, gather, b), 0));
  }
  if (i < count) {
    std::size_t const rest = count - i;
    __m512 lo, hi;
    nf4_load32(x + i, static_cast<__mmask32>((std::uint64_t{1} << rest) - 1), lo, hi);
    _mm512_mask_storeu_epi8(codes + i / 2, (__mmask64{1} << (rest / 2 + rest % 2)) - 1,
                            nf4_pack32(lo, hi, vinv, gather, b));
  }
}

//! True when the bucket encoder applies to a block with this absmax (finite, and 16 / absmax
//! finite); the other blocks (NaN, infinite, zero or tiny absmax) take quantize_block_nf4_avx512.
inline bool nf4_bucket_applies(float amax, float inv16) noexcept {
  return abs_bits(amax) < 0x7f800000u && abs_bits(inv16) < 0x7f800000u;
}

//! NF4 codes of one block without stochastic rounding: absmax (block_absmax_bits), then
//! encode_block_nf4_bucket_avx512 (or quantize_block_nf4_avx512 when it does not apply). Writes
//! code_bytes(count) bytes and returns the absmax. T = float or bf16.
template <class T>
QMEM_QUANT_AVX512VBMI_FN float quantize_block_nf4_bucket_avx512(T const* x, std::size_t count,
                                                                std::uint8_t* codes) noexcept {
  float const amax =
      qmem::detail::bits_to_float(absmax_bits_of<T>(absmax_lanes_avx512bw(x, count)));
  float const inv16 = fmath::mul(fmath::rcp(amax), 16.0f);
  if (!nf4_bucket_applies(amax, inv16)) [[unlikely]]
    return quantize_block_nf4_avx512(x, count, codes);
  encode_block_nf4_bucket_avx512(x, count, inv16, codes, load_nf4_buckets());
  return amax;
}

//! 4-bit codes of one block to T = bf16 or f16: y[i] = T(values[code_i] * absmax) for i < count
//! (decode_element, then one rounding; `values`: the 16 decoded values), codes packed two per
//! byte, the first element in the high nibble. The block's 16 outputs (16 products, rounded
//! checked) split into a low-byte and a high-byte table, each repeated four times so that a byte
//! permute (`vpermb`, which reads an index's low 6 bits) looks them up by the low 4 bits alone.
//! Per 32 code bytes: one byte permute puts each code byte where its two elements go (in the
//! order that makes the byte interleave `vpunpck*bw`, which works per 128-bit lane, come out in
//! element order), a shift and a bit select keep the high nibble in even and the low nibble in
//! odd elements, two look-ups and two interleaves give 64 outputs. The tail is loaded and stored
//! masked.
template <class T>
QMEM_QUANT_AVX512VBMI_FN void lookup_nibbles_u16_avx512(float const* values, float absmax,
                                                        std::uint8_t const* codes,
                                                        std::size_t count, T* y) noexcept {
  __m512i const out16 = round32_avx512<T>(
      _mm512_mul_ps(_mm512_loadu_ps(values), _mm512_set1_ps(absmax)), _mm512_setzero_ps());
  __m512i const even =
      _mm512_set_epi8(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0, 30, 28, 26, 24, 22,
                      20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12,
                      10, 8, 6, 4, 2, 0, 30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  __m512i const t_lo = _mm512_maskz_permutexvar_epi8(all64, even, out16);
  __m512i const t_hi =
      _mm512_maskz_permutexvar_epi8(all64, _mm512_add_epi8(even, _mm512_set1_epi8(1)), out16);
  // byte j of 128-bit lane L: element 8L + j (j < 8), 32 + 8L + j - 8 (j >= 8); its code byte
  __m512i const spread = _mm512_set_epi8(31, 31, 30, 30, 29, 29, 28, 28, 15, 15, 14, 14, 13, 13, 12,
                                         12, 27, 27, 26, 26, 25, 25, 24, 24, 11, 11, 10, 10, 9, 9,
                                         8, 8, 23, 23, 22, 22, 21, 21, 20, 20, 7, 7, 6, 6, 5, 5, 4,
                                         4, 19, 19, 18, 18, 17, 17, 16, 16, 3, 3, 2, 2, 1, 1, 0, 0);
  __m512i const high_nibble = _mm512_set1_epi16(0x00ff); // even bytes: even elements
  std::size_t i = 0;                                     // elements
  std::size_t const vec_end = count - count % 64;        // whole vectors (a form g++ can bound)
  for (; i < count; i += 64) {
    bool const whole = i < vec_end;
    std::size_t const rest = count - i;
    __mmask64 const load_mask =
        whole ? __mmask64{0xffffffffu} : (__mmask64{1} << (rest / 2 + rest % 2)) - 1;
    __m512i const d = _mm512_maskz_permutexvar_epi8(
        all64, spread, _mm512_maskz_loadu_epi8(load_mask, codes + i / 2));
    // even bytes: d >> 4 (bits 4-7 from the next byte: ignored by the repeated tables)
    __m512i const idx = _mm512_ternarylogic_epi32(_mm512_maskz_srli_epi16(all32, d, 4), d,
                                                  high_nibble, 0xe4); // c ? a : b
    __m512i const lo = _mm512_maskz_permutexvar_epi8(all64, idx, t_lo);
    __m512i const hi = _mm512_maskz_permutexvar_epi8(all64, idx, t_hi);
    __m512i const first = _mm512_unpacklo_epi8(lo, hi);
    __m512i const second = _mm512_unpackhi_epi8(lo, hi);
    if (whole) [[likely]] {
      _mm512_storeu_si512(y + i, first);
      _mm512_storeu_si512(y + i + 32, second);
    } else {
      __mmask64 const m = (__mmask64{1} << rest) - 1; // rest < 64
      _mm512_mask_storeu_epi16(y + i, static_cast<__mmask32>(m), first);
      if (rest > 32)
        _mm512_mask_storeu_epi16(y + i + 32, static_cast<__mmask32>(m >> 32), second);
    }
  }
}

//! 4-bit codes of one block to float: y[i] = values[code_i] * absmax for i < count
//! (decode_element), codes packed two per byte, the first element in the high nibble. The block's
//! 16 outputs in one register; per 16 elements a byte permute puts each element's code byte into
//! its 32-bit lane, a variable shift brings even elements' high nibble down, and `vpermps` (which
//! reads an index's low 4 bits) looks the outputs up; 64 per step from 32 code bytes, the tail
//! loaded and stored masked.
QMEM_QUANT_AVX512VBMI_FN void lookup_nibbles_f32_avx512(float const* values, float absmax,
                                                        std::uint8_t const* codes,
                                                        std::size_t count, float* y) noexcept {
  __m512 const out16 = _mm512_mul_ps(_mm512_loadu_ps(values), _mm512_set1_ps(absmax));
  // lane e of group g: the code byte of element 16g + e, (16g + e) / 2, in every byte
  __m512i const spread0 =
      _mm512_set_epi8(7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6, 5, 5, 5, 5, 5, 5, 5, 5, 4, 4,
                      4, 4, 4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1,
                      1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512i const eight = _mm512_set1_epi8(8);
  __m512i const shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  for (std::size_t i = 0; i < count; i += 64) {
    std::size_t const rest = count - i;
    bool const whole = rest >= 64;
    __mmask64 const load_mask =
        whole ? __mmask64{0xffffffffu} : (__mmask64{1} << (rest / 2 + rest % 2)) - 1;
    __m512i const c = _mm512_maskz_loadu_epi8(load_mask, codes + i / 2);
    __m512i spread = spread0;
    for (std::size_t g = 0; g < 4; ++g) {
      __m512i const idx =
          _mm512_maskz_srlv_epi32(all16, _mm512_maskz_permutexvar_epi8(all64, spread, c), shifts);
      __m512 const v = _mm512_maskz_permutexvar_ps(all16, idx, out16);
      if (whole) [[likely]] {
        _mm512_storeu_ps(y + i + 16 * g, v);
      } else if (rest > 16 * g) {
        std::size_t const left = rest - 16 * g;
        _mm512_mask_storeu_ps(y + i + 16 * g,
                              left >= 16 ? all16 : static_cast<__mmask16>((1u << left) - 1), v);
      }
      spread = _mm512_add_epi8(spread, eight);
    }
  }
}

//! values[c[j]] * a for the 16 codes of c (scale16_avx512).
template <class T, hw_round R>
QMEM_QUANT_AVX512BF16_FN __m512 gather_scale16(float const* values, __m128i c, __m512 a) noexcept {
  __m512i const idx = _mm512_maskz_cvtepu8_epi32(all16, c);
  return scale16_avx512<T, R>(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), all16, idx, values, 4),
                              a);
}

//! The same outputs for any code type through gathers of the decoded values, products and
//! roundings per element. For small blocks.
template <class T, hw_round R>
QMEM_QUANT_AVX512BF16_FN void lookup_bytes_gather_avx512(float const* values, float absmax,
                                                         std::uint8_t const* codes,
                                                         std::size_t count, T* y) noexcept {
  __m512 const a = _mm512_set1_ps(absmax);
  std::size_t i = 0;
  std::size_t const vec_end = count - count % 32; // whole vectors (a form g++ can bound)
  for (; i < vec_end; i += 32) {
    __m256i const c = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(codes + i));
    _mm512_storeu_si512(
        y + i,
        round32_avx512<T, R>(gather_scale16<T, R>(values, _mm256_castsi256_si128(c), a),
                             gather_scale16<T, R>(values, _mm256_extracti128_si256(c, 1), a)));
  }
  for (; i < count; ++i)
    y[i] = from_float<T>(fmath::mul(values[codes[i]], absmax));
}

//! rowwise_decode of 16 int8 codes with row absmax a: (q * a) * (1/127).
QMEM_QUANT_AVX512BF16_FN __m512 rowwise_decode16(__m128i v, __m512 a) noexcept {
  __m512 const f = _mm512_maskz_cvtepi32_ps(all16, _mm512_maskz_cvtepi8_epi32(all16, v));
  return _mm512_mul_ps(_mm512_mul_ps(f, a), _mm512_set1_ps(inv127));
}

//! One row of row-wise int8 dequantization to T = bf16 or f16 (dequantize_row_avx512 with the
//! hardware narrowing, 32 per step).
template <class T>
QMEM_QUANT_AVX512BF16_FN void dequantize_row_u16_avx512(std::int8_t const* q, float absmax,
                                                        std::size_t cols, T* y) noexcept {
  __m512 const a = _mm512_set1_ps(absmax);
  std::size_t c = 0;
  std::size_t const vec_end = cols - cols % 32; // whole vectors (a form g++ can bound)
  for (; c < vec_end; c += 32) {
    __m256i const v = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(q + c));
    _mm512_storeu_si512(y + c,
                        round32_avx512<T>(rowwise_decode16(_mm256_castsi256_si128(v), a),
                                          rowwise_decode16(_mm256_extracti128_si256(v, 1), a)));
  }
  for (; c < cols; ++c)
    y[c] = from_float<T>(rowwise_decode(q[c], absmax));
}

#undef QMEM_QUANT_AVX512BF16_FN
#undef QMEM_QUANT_AVX512VBMI_FN
#undef QMEM_QUANT_NO_CONTRACT

} // namespace qmem::quant::detail

#endif // QMEM_QUANT_HOST_AVX2
