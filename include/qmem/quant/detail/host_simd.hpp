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
#undef QMEM_QUANT_NO_CONTRACT

} // namespace qmem::quant::detail

#endif // QMEM_QUANT_HOST_AVX2
