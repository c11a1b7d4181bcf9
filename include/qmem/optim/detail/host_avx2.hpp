#pragma once
//! \file
//! AVX2 kernels of the host optimizer step for blockwise-quantized states: decode a block of codes
//! (8-bit: a gather from the 256-entry value table; 4-bit: two 8-lane permutes), and requantize a
//! block of updated fp32 states (absmax as an integer maximum, normalization by an IEEE division,
//! the search table's look-up with two gathers, bitsandbytes' sign fix, byte and nibble packing).
//! Every operation is the one the portable loop performs (the same IEEE multiplication and
//! division, table look-ups proven equal to `Code::encode`), so both paths give the same bits;
//! tests/optim/host_avx2_test.cpp checks that for every rule and state format.
//!
//! On x86-64 with g++ or clang (not in nvcc's host pass) these functions are compiled for AVX2
//! through a function attribute and chosen at run time when the CPU has AVX2 (`use_avx2()`);
//! defining QMEM_OPTIM_HOST_AVX2 to 0 before including qmem removes them. AVX2 without FMA: a
//! translation unit built with `-mfma` should also pass `-ffp-contract=off` (core/fmath.hpp).

#include <qmem/core/config.hpp>
#include <qmem/quant/detail/search_table.hpp>

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>

#ifndef QMEM_OPTIM_HOST_AVX2
#if !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define QMEM_OPTIM_HOST_AVX2 1
#else
#define QMEM_OPTIM_HOST_AVX2 0
#endif
#endif

#if QMEM_OPTIM_HOST_AVX2
#include <immintrin.h>
#endif

namespace qmem::optim::detail {

//! Whether the host step may use its AVX2 kernels (default true). Tests turn it off to compare
//! the AVX2 step with the portable one; nothing else should need to.
inline std::atomic<bool>& host_avx2_allowed() noexcept {
  static std::atomic<bool> allowed{true};
  return allowed;
}

//! True when the host step runs its AVX2 kernels: compiled in, allowed, and the CPU has AVX2.
inline bool use_avx2() noexcept {
#if QMEM_OPTIM_HOST_AVX2
#if defined(__AVX2__)
  bool const cpu = true;
#else
  static bool const cpu = __builtin_cpu_supports("avx2");
#endif
  return cpu && host_avx2_allowed().load(std::memory_order_relaxed);
#else
  return false;
#endif
}

#if QMEM_OPTIM_HOST_AVX2

//! encode() of the 8 floats of `x` by search table `t` (quant/detail/search_table.hpp), in the low
//! byte of each 32-bit lane (the upper bytes are zero).
__attribute__((target("avx2"), always_inline)) inline __m256i
table_encode8(quant::detail::search_table const& t, __m256 x) noexcept {
  using quant::detail::search_table;
  __m256i const u = _mm256_castps_si256(x);
  __m256i const a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  __m256i key = _mm256_srli_epi32(a, search_table::shift);
  key = _mm256_max_epi32(key, _mm256_set1_epi32(static_cast<int>(search_table::key_lo)));
  key = _mm256_min_epi32(key, _mm256_set1_epi32(static_cast<int>(search_table::key_hi)));
  // negative x: the second half of the table
  __m256i const index = _mm256_add_epi32(
      _mm256_sub_epi32(key, _mm256_set1_epi32(static_cast<int>(search_table::key_lo))),
      _mm256_and_si256(_mm256_srai_epi32(u, 31),
                       _mm256_set1_epi32(static_cast<int>(search_table::buckets))));
  __m256i const e = _mm256_i32gather_epi32(reinterpret_cast<int const*>(t.entries()), index, 4);
  __m256i const limit =
      _mm256_or_si256(_mm256_slli_epi32(key, search_table::shift), _mm256_srli_epi32(e, 16));
  __m256i const above = _mm256_cmpgt_epi32(a, limit); // magnitude bits: integer order = order
  __m256i c = _mm256_blendv_epi8(e, _mm256_srli_epi32(e, 8), above);
  c = _mm256_and_si256(c, _mm256_set1_epi32(0xff));
  __m256i const nan = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(c, _mm256_set1_epi32(static_cast<int>(t.nan_code())), nan);
}

//! Bitsandbytes' sign fix on 8 lanes (blockwise_format::fix_sign): a code whose value's sign bit
//! differs from the state's moves one step toward the state's sign (modulo 256, as the scalar
//! uint8 arithmetic). The codes whose values carry the sign bit are exactly those below
//! `negative_below` (host_encoder checks that of the table; the signed dynamic map: 127).
__attribute__((target("avx2"), always_inline)) inline __m256i
sign_fix8(__m256i c, __m256 s, int negative_below) noexcept {
  __m256i const code_negative = _mm256_cmpgt_epi32(_mm256_set1_epi32(negative_below), c);
  __m256i const differ =
      _mm256_xor_si256(code_negative, _mm256_srai_epi32(_mm256_castps_si256(s), 31));
  __m256 const positive = _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_GT_OQ);
  __m256i const step = _mm256_blendv_epi8(_mm256_set1_epi32(-1), _mm256_set1_epi32(1),
                                          _mm256_castps_si256(positive));
  c = _mm256_add_epi32(c, _mm256_and_si256(step, differ));
  return _mm256_and_si256(c, _mm256_set1_epi32(0xff));
}

//! 32 codes (the low bytes of 4 x 8 lanes, each 0..255) as 32 bytes in order.
__attribute__((target("avx2"), always_inline)) inline __m256i pack_bytes32(__m256i c0, __m256i c1,
                                                                            __m256i c2,
                                                                            __m256i c3) noexcept {
  // packus works within 128-bit halves: bytes come out in the order 0 4 1 5 2 6 3 7 (dwords)
  __m256i const p =
      _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
  return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

//! 64 4-bit codes (two vectors of 32 code bytes) as 32 bytes, the first element of each pair in
//! the high nibble (blockwise_format::store_code_pair).
__attribute__((target("avx2"), always_inline)) inline __m256i pack_nibbles64(__m256i b0,
                                                                              __m256i b1) noexcept {
  __m256i const low = _mm256_set1_epi16(0x00ff);
  // 16-bit lane: first | second << 8  ->  first << 4 | second
  __m256i const n0 = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b0, low), 4),
                                     _mm256_srli_epi16(b0, 8));
  __m256i const n1 = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b1, low), 4),
                                     _mm256_srli_epi16(b1, 8));
  return _mm256_permute4x64_epi64(_mm256_packus_epi16(n0, n1), 0xd8);
}

//! out[i] = values[codes[i]] * absmax for i < m (8-bit codes).
__attribute__((target("avx2"))) inline void decode8(float const* values,
                                                    std::uint8_t const* QMEM_RESTRICT codes,
                                                    float absmax, float* QMEM_RESTRICT out,
                                                    std::size_t m) noexcept {
  __m256 const a = _mm256_set1_ps(absmax);
  std::size_t i = 0;
  for (; i + 8 <= m; i += 8) {
    __m256i const c =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<__m128i const*>(codes + i)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_i32gather_ps(values, c, 4), a));
  }
  for (; i < m; ++i)
    out[i] = values[codes[i]] * absmax;
}

//! out[j] = values[nibble j] * absmax for j < m, the nibbles packed two per byte from `codes`
//! (first element in the high nibble; m even, or the last byte's low nibble unused).
__attribute__((target("avx2"))) inline void decode4(float const* values,
                                                    std::uint8_t const* QMEM_RESTRICT codes,
                                                    float absmax, float* QMEM_RESTRICT out,
                                                    std::size_t m) noexcept {
  alignas(32) float scaled[16]; // the same products as one multiplication per element
  for (int k = 0; k < 16; ++k)
    scaled[k] = values[k] * absmax;
  __m256 const lo = _mm256_load_ps(scaled);
  __m256 const hi = _mm256_load_ps(scaled + 8);
  __m256i const shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  __m256i const mask = _mm256_set1_epi32(15);
  __m256i const seven = _mm256_set1_epi32(7);
  std::size_t j = 0;
  for (; j + 16 <= m; j += 16) {
    __m128i const v = _mm_loadl_epi64(reinterpret_cast<__m128i const*>(codes + j / 2));
    __m128i const twice = _mm_unpacklo_epi8(v, v); // b0 b0 b1 b1 ... b7 b7
    for (int half = 0; half < 2; ++half) {
      __m128i const pairs = half == 0 ? twice : _mm_srli_si128(twice, 8);
      __m256i const idx =
          _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(pairs), shifts), mask);
      __m256 const x = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx),
                                        _mm256_permutevar8x32_ps(hi, idx),
                                        _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven)));
      _mm256_storeu_ps(out + j + 8 * static_cast<std::size_t>(half), x);
    }
  }
  for (; j < m; ++j) {
    std::uint8_t const b = codes[j / 2];
    out[j] = scaled[(j % 2 == 0) ? (b >> 4) : (b & 0x0f)];
  }
}

//! The integer maximum of the magnitude bits of v[0, m): the bits of max |v| (NaN patterns above
//! every number), as the portable loop computes it.
__attribute__((target("avx2"))) inline std::uint32_t absmax_bits(float const* QMEM_RESTRICT v,
                                                                 std::size_t m) noexcept {
  __m256i const mask = _mm256_set1_epi32(0x7fffffff);
  __m256i mx = _mm256_setzero_si256();
  std::size_t i = 0;
  for (; i + 8 <= m; i += 8)
    mx = _mm256_max_epi32(mx, _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(v + i)), mask));
  alignas(32) std::int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), mx);
  std::int32_t r = 0;
  for (std::int32_t x : lanes)
    r = x > r ? x : r;
  for (; i < m; ++i) {
    std::int32_t const x = static_cast<std::int32_t>(std::bit_cast<std::uint32_t>(v[i]) & 0x7fffffffu);
    r = x > r ? x : r;
  }
  return static_cast<std::uint32_t>(r);
}

//! The codes of the 8 states at v normalized by the block's absmax `a` (v / absmax, or 0 when
//! absmax is not > 0: blockwise_format::normalize), with the sign fix when `sign_fix`, one per
//! 32-bit lane.
__attribute__((target("avx2"), always_inline)) inline __m256i
encode_lanes(quant::detail::search_table const& t, int negative_below, float const* v, __m256 a,
             bool positive_absmax) noexcept {
  __m256 const s = _mm256_loadu_ps(v);
  __m256 const xn = positive_absmax ? _mm256_div_ps(s, a) : _mm256_setzero_ps();
  __m256i const c = table_encode8(t, xn);
  return negative_below >= 0 ? sign_fix8(c, s, negative_below) : c;
}

//! Requantizes one block of m <= 4096 updated states v of an 8-bit blockwise format: returns the
//! block's absmax and writes codes[0, done), done = m rounded down to a multiple of 32 (the
//! caller encodes the rest). `negative_below` >= 0: with the sign fix (see sign_fix8).
__attribute__((target("avx2"))) inline float
store_block8(quant::detail::search_table const& t, int negative_below,
             float const* QMEM_RESTRICT v, std::size_t m, std::uint8_t* QMEM_RESTRICT codes,
             std::size_t& done) noexcept {
  float const amax = std::bit_cast<float>(absmax_bits(v, m));
  bool const positive = amax > 0.0f;
  __m256 const a = _mm256_set1_ps(amax);
  std::size_t i = 0;
  for (; i + 32 <= m; i += 32) {
    __m256i const c0 = encode_lanes(t, negative_below, v + i, a, positive);
    __m256i const c1 = encode_lanes(t, negative_below, v + i + 8, a, positive);
    __m256i const c2 = encode_lanes(t, negative_below, v + i + 16, a, positive);
    __m256i const c3 = encode_lanes(t, negative_below, v + i + 24, a, positive);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i), pack_bytes32(c0, c1, c2, c3));
  }
  done = i;
  return amax;
}

//! As store_block8 for a 4-bit format: codes of elements [0, done) packed two per byte into
//! codes[0, done / 2); `done` is a multiple of 64.
__attribute__((target("avx2"))) inline float
store_block4(quant::detail::search_table const& t, float const* QMEM_RESTRICT v, std::size_t m,
             std::uint8_t* QMEM_RESTRICT codes, std::size_t& done) noexcept {
  float const amax = std::bit_cast<float>(absmax_bits(v, m));
  bool const positive = amax > 0.0f;
  __m256 const a = _mm256_set1_ps(amax);
  std::size_t i = 0;
  for (; i + 64 <= m; i += 64) {
    __m256i c[8];
    for (int q = 0; q < 8; ++q)
      c[q] = encode_lanes(t, -1, v + i + 8 * static_cast<std::size_t>(q), a, positive);
    __m256i const b0 = pack_bytes32(c[0], c[1], c[2], c[3]);
    __m256i const b1 = pack_bytes32(c[4], c[5], c[6], c[7]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i / 2), pack_nibbles64(b0, b1));
  }
  done = i;
  return amax;
}

#endif // QMEM_OPTIM_HOST_AVX2

} // namespace qmem::optim::detail
