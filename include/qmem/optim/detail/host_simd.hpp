#pragma once
//! \file
//! SIMD kernels of the host optimizer step for blockwise-quantized states, for AVX2 and AVX-512F:
//! decode a block of codes (8-bit: byte permutes of the 256 values' byte planes with AVX-512
//! VBMI, else a gather from the 256-entry value table; 4-bit: permutes of the 16 scaled
//! values), and requantize a block of updated fp32 states (absmax as an integer
//! maximum, normalization by an IEEE division, one gather from a search table, byte and nibble
//! packing). A block with a positive finite absmax (almost every block) looks its codes up in the
//! format's block table, whose entries already hold bitsandbytes' sign fix (block_encode8,
//! block_encode16); other blocks take the code's search table with the NaN select and the sign fix
//! as masks (encode_lanes, encode_lanes16). Every operation is one the portable loop performs
//! (the same IEEE multiplication and division, table look-ups proven equal to `Code::encode` and
//! to the sign fix), so all paths give the same bits; tests/optim/host_simd_test.cpp checks that
//! for every rule and state format, each ISA against the portable loop.
//!
//! On x86-64 with g++ or clang (not in nvcc's host pass) these functions are compiled for their
//! ISA through function attributes and chosen at run time from what the CPU has
//! (`current_host_isa()`); defining QMEM_OPTIM_HOST_SIMD to 0 before including qmem removes them.
//! No FMA is enabled: a translation unit built with `-mfma` (or `-march=native`) should also pass
//! `-ffp-contract=off` to keep the host bit-identical to the GPU (core/fmath.hpp).

#include <qmem/core/config.hpp>
#include <qmem/optim/state.hpp>
#include <qmem/quant/detail/dynamic_arith.hpp>
#include <qmem/quant/detail/search_table.hpp>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#ifndef QMEM_OPTIM_HOST_SIMD
#if !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define QMEM_OPTIM_HOST_SIMD 1
#else
#define QMEM_OPTIM_HOST_SIMD 0
#endif
#endif

#if QMEM_OPTIM_HOST_SIMD
#include <immintrin.h>
#endif

namespace qmem::optim::detail {

//! The instruction sets of the host step, in order.
enum class host_isa : int { portable = 0, avx2 = 1, avx512 = 2 };

//! The highest ISA the host step may use (default: the best there is). Tests lower it to compare
//! each ISA's step with the portable one; nothing else should need to.
inline std::atomic<int>& host_isa_limit() noexcept {
  static std::atomic<int> limit{static_cast<int>(host_isa::avx512)};
  return limit;
}

//! The ISA the host step runs: the best the build and the CPU have, within host_isa_limit().
inline host_isa current_host_isa() noexcept {
#if QMEM_OPTIM_HOST_SIMD
  static int const cpu =
      __builtin_cpu_supports("avx512f")
          ? static_cast<int>(host_isa::avx512)
          : (__builtin_cpu_supports("avx2") ? static_cast<int>(host_isa::avx2) : 0);
  int const limit = host_isa_limit().load(std::memory_order_relaxed);
  return static_cast<host_isa>(cpu < limit ? cpu : limit);
#else
  return host_isa::portable;
#endif
}

//! Whether the AVX-512 step may decode 8-bit codes by byte permutes (decode8_vbmi) and pack
//! codes by byte permutes (store_block8_vbmi, store_block4_vbmi): the CPU has
//! AVX-512 VBMI and BW (Ice Lake and later, Zen 4) and the step runs AVX-512.
inline bool host_vbmi() noexcept {
#if QMEM_OPTIM_HOST_SIMD
  static bool const cpu =
      __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bw");
  return cpu && current_host_isa() == host_isa::avx512;
#else
  return false;
#endif
}

//! The 256 values of an 8-bit code as four byte planes (plane k holds byte k of each value's
//! bits, in code order), the tables of decode8_vbmi.
struct byte_planes {
  alignas(64) std::uint8_t plane[4][256];

  explicit byte_planes(float const* values) noexcept {
    for (int c = 0; c < 256; ++c) {
      std::uint32_t const u = std::bit_cast<std::uint32_t>(values[c]);
      for (int k = 0; k < 4; ++k)
        plane[k][c] = static_cast<std::uint8_t>(u >> (8 * k));
    }
  }
};

//! The 4-bit block encoder without a division (block_codes4_search): the steps of a 4-bit
//! format's block table (see block_encode16) as bounds on the unnormalized state, from which each
//! block computes its thresholds.
//!
//! The block table maps xn = RN(s / absmax) to a code by |xn| and the sign of s: per sign a step
//! function of |xn| whose step j leaves its lower code above T_j (the largest magnitude that
//! still maps below). RN is monotone, so RN(|s| / a) > T_j exactly when |s| / a > B_j, the
//! midpoint of T_j and the next float (|s| / a = B_j cannot happen: see below), i.e. when
//! |s| > a B_j (a > 0). a B_j is exact in double (24 + 25 significant bits) and never a float:
//! with a = m1 2^e, m1 odd, and B_j = m2 2^f, m2 = 2 M + 1 odd and above 2^24 (T_j normal: the
//! table's steps lie above 2^-40), m1 m2 is odd with at least 25 bits. So with Q_j the largest
//! float <= a B_j (the double product rounded down) the test is |s| > Q_j on float bits,
//! exactly, for every finite s with |s| <= a. Per block
//! that is two multiplications and conversions of 16 doubles instead of one IEEE division per
//! state. Both signs then form one ascending line of thresholds on s itself, compared as floats:
//! a positive step's Q_j (s > Q_j), a negative step's -next(Q_j) (s > -next(Q_j) exactly when
//! s >= -Q_j, i.e. |s| <= Q_j for negative s); the number of line thresholds below s gives the
//! code, which needs the codes of -0 and +0 (each sign's code at |xn| = 0) to be equal (both
//! maps: no step at zero). Per 16 states a binary search of four levels over the line's <= 15
//! thresholds, each level a 16-entry permute, a float comparison and a masked add, all in
//! registers: 12 instructions (the search per sign before, over magnitudes: 15). Built when both
//! signs together have at most 15 steps (the optimizer's 4-bit maps: signed dynamic 8 + 7,
//! linear without zero 15 + 0); `usable()` says whether it was.
struct step_search4 {
  //! B_j of compact slot j (the positive side's steps ascending, then the negative side's);
  //! the unused slots and slot 15 hold 1.0 (a B = a: no state is above it).
  alignas(64) double bound[16];
  //! Bit j: slot j is a negative side's step (its line threshold is -next(Q_j)).
  std::uint16_t negative_slots;
  //! Level l (step s = 8 >> l of the search): the slot of the line threshold the search compares
  //! at count c, L[c + s - 1], or slot 15 past the last (level 0, where every count is 0: L[7]
  //! in every lane, a broadcast). The line L: the negative side's steps by descending magnitude,
  //! then the positive side's ascending.
  alignas(64) std::int32_t level[4][16];
  //! The code of each count (the number of line thresholds below s).
  alignas(64) std::uint8_t code[64];

  //! From the entries of a block table (search_table::entries() of host_encoder::block_table).
  explicit step_search4(std::uint32_t const* entries) noexcept
      : bound{}, negative_slots{}, level{}, code{} {
    using quant::detail::search_table;
    std::uint32_t limit[2][16] = {};
    std::uint8_t codes[2][16] = {};
    int count[2] = {0, 0};
    for (int sign = 0; sign < 2; ++sign) {
      std::uint32_t const* e = entries + static_cast<std::size_t>(sign) * search_table::buckets;
      std::uint32_t current = e[0] & 0xffu;
      codes[sign][0] = static_cast<std::uint8_t>(current);
      for (std::size_t k = 0; k < search_table::buckets; ++k) {
        std::uint32_t const lo = e[k] & 0xffu;
        std::uint32_t const hi = (e[k] >> 8) & 0xffu;
        if (lo != current)
          return; // not a step function of |xn| as read here
        if (lo == hi)
          continue;
        if (count[sign] == 15)
          return;
        auto const key = static_cast<std::uint32_t>(search_table::key_lo + k);
        limit[sign][count[sign]] = (key << search_table::shift) | (e[k] >> 16);
        codes[sign][++count[sign]] = static_cast<std::uint8_t>(hi);
        current = hi;
      }
    }
    int const total = count[0] + count[1];
    if (total > 15 || codes[0][0] != codes[1][0])
      return;
    for (double& b : bound)
      b = 1.0;
    int const base[2] = {0, count[0]};
    for (int sign = 0; sign < 2; ++sign)
      for (int j = 0; j < count[sign]; ++j) {
        std::uint32_t const t = limit[sign][j];
        int const slot = base[sign] + j;
        // the midpoint of two neighbouring floats: exact in double
        bound[slot] = (static_cast<double>(std::bit_cast<float>(t)) +
                       static_cast<double>(std::bit_cast<float>(t + 1))) /
                      2.0;
        if (sign == 1)
          negative_slots = static_cast<std::uint16_t>(negative_slots | 1u << slot);
      }
    // line position i: negative steps by descending magnitude, then positive ones ascending
    auto slot_of = [&](int i) {
      if (i >= total)
        return 15;
      return i < count[1] ? base[1] + count[1] - 1 - i : i - count[1];
    };
    for (int l = 0; l < 4; ++l)
      for (int c = 0; c < 16; ++c)
        level[l][c] = slot_of((l == 0 ? 0 : c) + (8 >> l) - 1); // level 0: every lane at 0
    for (int c = 0; c < 16; ++c) {
      int const k =
          c <= count[1] ? count[1] - c : (c - count[1] < count[0] ? c - count[1] : count[0]);
      code[c] = codes[c <= count[1] ? 1 : 0][k];
    }
    usable_ = true;
  }
  //! Whether the format's steps fit (at most 15 over both signs) and form step functions.
  [[nodiscard]] bool usable() const noexcept { return usable_; }

private:
  bool usable_ = false;
};

#if QMEM_OPTIM_HOST_SIMD

// --- AVX2: 8 lanes ---

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
__attribute__((target("avx2"), always_inline)) inline __m256i
pack_bytes32(__m256i c0, __m256i c1, __m256i c2, __m256i c3) noexcept {
  // packus works within 128-bit halves: bytes come out in the order 0 4 1 5 2 6 3 7 (dwords)
  __m256i const p = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
  return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

//! 64 4-bit codes (two vectors of 32 code bytes) as 32 bytes, the first element of each pair in
//! the high nibble (blockwise_format::store_code_pair).
__attribute__((target("avx2"), always_inline)) inline __m256i pack_nibbles64(__m256i b0,
                                                                             __m256i b1) noexcept {
  __m256i const low = _mm256_set1_epi16(0x00ff);
  // 16-bit lane: first | second << 8  ->  first << 4 | second
  __m256i const n0 =
      _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b0, low), 4), _mm256_srli_epi16(b0, 8));
  __m256i const n1 =
      _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b1, low), 4), _mm256_srli_epi16(b1, 8));
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
      __m256 const x =
          _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
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
    std::int32_t const x =
        static_cast<std::int32_t>(std::bit_cast<std::uint32_t>(v[i]) & 0x7fffffffu);
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

//! The block table's entries addressed by key: entry sign * buckets + key - key_lo is at
//! keyed_entries(entries)[sign * buckets + key] (the subtraction folded into the base address
//! of the gathers; the result itself is never dereferenced outside the table).
inline std::uint32_t const* keyed_entries(std::uint32_t const* entries) noexcept {
  return std::bit_cast<std::uint32_t const*>(std::bit_cast<std::uintptr_t>(entries) -
                                             quant::detail::search_table::key_lo *
                                                 sizeof(*entries));
}

//! Whether a block with this absmax is encoded by its format's block table (block_encode8,
//! block_encode16): positive and finite (a block holding NaN or infinity, or only zeros, takes
//! the format's search table and the separate sign fix).
inline bool block_table_applies(float amax) noexcept {
  std::uint32_t const b = std::bit_cast<std::uint32_t>(amax);
  return b != 0 && b < 0x7f800000u;
}

//! The codes of the 8 states at v in a block whose absmax `a` is positive and finite, from the
//! entries of the format's block table (optim/optimizer.hpp, host_encoder::block_table: the
//! table of the whole element encoder, sign fix included, whose first bucket holds no step). In
//! such a block v / a is finite, |v / a| <= 1 and has the sign bit of v, so the look-up needs no
//! clamp at the top, no NaN select and no sign fix, and the step test compares the low 16 bits
//! only: (bits << 16) > entry, unsigned, exactly when they exceed the entry's limit (the entry's
//! low half, two codes, is below 2^16). About half the instructions of encode_lanes with the sign
//! fix (AdamW 8-bit step, AVX2, in L2: 1.95 -> 1.52 ns per parameter, dev box, 2026-11-29). One
//! code (0..255) per 32-bit lane.
__attribute__((target("avx2"), always_inline)) inline __m256i
block_encode8(std::uint32_t const* entries, float const* v, __m256 a) noexcept {
  using quant::detail::search_table;
  static_assert(search_table::shift == 16, "the step test compares the low 16 bits");
  __m256i const u = _mm256_castps_si256(_mm256_div_ps(_mm256_loadu_ps(v), a));
  __m256i key = _mm256_srli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), 16);
  key = _mm256_max_epi32(key, _mm256_set1_epi32(static_cast<int>(search_table::key_lo)));
  key = _mm256_add_epi32(
      key, _mm256_and_si256(_mm256_srai_epi32(u, 31),
                            _mm256_set1_epi32(static_cast<int>(search_table::buckets))));
  __m256i const e =
      _mm256_i32gather_epi32(reinterpret_cast<int const*>(keyed_entries(entries)), key, 4);
  __m256i const flip = _mm256_set1_epi32(static_cast<int>(0x80000000u)); // unsigned order
  __m256i const above = _mm256_cmpgt_epi32(_mm256_xor_si256(_mm256_slli_epi32(u, 16), flip),
                                           _mm256_xor_si256(e, flip));
  return _mm256_and_si256(_mm256_blendv_epi8(e, _mm256_srli_epi32(e, 8), above),
                          _mm256_set1_epi32(0xff));
}

//! Requantizes one block of m <= 4096 updated states v of an 8-bit blockwise format: returns the
//! block's absmax and writes codes[0, done), done = m rounded down to a multiple of 32 (the
//! caller encodes the rest). `negative_below` >= 0: with the sign fix (see sign_fix8).
//! `block_entries`: the entries of the format's block table (see block_encode8), or nullptr.
__attribute__((target("avx2"))) inline float
store_block8(quant::detail::search_table const& t, std::uint32_t const* block_entries,
             int negative_below, float const* QMEM_RESTRICT v, std::size_t m,
             std::uint8_t* QMEM_RESTRICT codes, std::size_t& done) noexcept {
  float const amax = std::bit_cast<float>(absmax_bits(v, m));
  bool const positive = amax > 0.0f;
  bool const by_block_table = block_entries != nullptr && block_table_applies(amax);
  __m256 const a = _mm256_set1_ps(amax);
  std::size_t i = 0;
  for (; i + 32 <= m; i += 32) {
    __m256i c[4];
    for (int q = 0; q < 4; ++q) {
      float const* x = v + i + 8 * static_cast<std::size_t>(q);
      c[q] = by_block_table ? block_encode8(block_entries, x, a)
                            : encode_lanes(t, negative_below, x, a, positive);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i),
                        pack_bytes32(c[0], c[1], c[2], c[3]));
  }
  done = i;
  return amax;
}

//! As store_block8 for a 4-bit format: codes of elements [0, done) packed two per byte into
//! codes[0, done / 2); `done` is a multiple of 64.
__attribute__((target("avx2"))) inline float
store_block4(quant::detail::search_table const& t, std::uint32_t const* block_entries,
             float const* QMEM_RESTRICT v, std::size_t m, std::uint8_t* QMEM_RESTRICT codes,
             std::size_t& done) noexcept {
  float const amax = std::bit_cast<float>(absmax_bits(v, m));
  bool const positive = amax > 0.0f;
  bool const by_block_table = block_entries != nullptr && block_table_applies(amax);
  __m256 const a = _mm256_set1_ps(amax);
  std::size_t i = 0;
  for (; i + 64 <= m; i += 64) {
    __m256i c[8];
    for (int q = 0; q < 8; ++q) {
      float const* x = v + i + 8 * static_cast<std::size_t>(q);
      c[q] =
          by_block_table ? block_encode8(block_entries, x, a) : encode_lanes(t, -1, x, a, positive);
    }
    __m256i const b0 = pack_bytes32(c[0], c[1], c[2], c[3]);
    __m256i const b1 = pack_bytes32(c[4], c[5], c[6], c[7]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i / 2), pack_nibbles64(b0, b1));
  }
  done = i;
  return amax;
}

// --- AVX-512F: 16 lanes (the same steps; masks instead of blends) ---

// g++ 12 reports the self-initialized `_mm512_undefined_*` of its own AVX-512 intrinsics as
// uninitialized once they are inlined (GCC bug 105593, fixed in 13): silenced for these kernels.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

//! encode() of the 16 floats of `x` by search table `t`, one code per 32-bit lane.
__attribute__((target("avx512f"), always_inline)) inline __m512i
table_encode16(quant::detail::search_table const& t, __m512 x) noexcept {
  using quant::detail::search_table;
  __m512i const u = _mm512_castps_si512(x);
  __m512i const a = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
  __m512i key = _mm512_srli_epi32(a, search_table::shift);
  key = _mm512_max_epi32(key, _mm512_set1_epi32(static_cast<int>(search_table::key_lo)));
  key = _mm512_min_epi32(key, _mm512_set1_epi32(static_cast<int>(search_table::key_hi)));
  __m512i index = _mm512_sub_epi32(key, _mm512_set1_epi32(static_cast<int>(search_table::key_lo)));
  __mmask16 const negative = _mm512_cmplt_epi32_mask(u, _mm512_setzero_si512());
  index = _mm512_mask_add_epi32(index, negative, index,
                                _mm512_set1_epi32(static_cast<int>(search_table::buckets)));
  __m512i const e = _mm512_i32gather_epi32(index, t.entries(), 4);
  __m512i const limit =
      _mm512_or_si512(_mm512_slli_epi32(key, search_table::shift), _mm512_srli_epi32(e, 16));
  __mmask16 const above = _mm512_cmpgt_epi32_mask(a, limit);
  __m512i c = _mm512_mask_srli_epi32(e, above, e, 8);
  c = _mm512_and_si512(c, _mm512_set1_epi32(0xff));
  __mmask16 const nan = _mm512_cmpgt_epi32_mask(a, _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_blend_epi32(nan, c, _mm512_set1_epi32(static_cast<int>(t.nan_code())));
}

//! sign_fix8 on 16 lanes.
__attribute__((target("avx512f"), always_inline)) inline __m512i
sign_fix16(__m512i c, __m512 s, int negative_below) noexcept {
  __mmask16 const code_negative = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(negative_below), c);
  __mmask16 const s_negative =
      _mm512_cmplt_epi32_mask(_mm512_castps_si512(s), _mm512_setzero_si512());
  __mmask16 const differ = static_cast<__mmask16>(code_negative ^ s_negative);
  __mmask16 const positive = _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_GT_OQ);
  __m512i const one = _mm512_set1_epi32(1);
  c = _mm512_mask_add_epi32(c, static_cast<__mmask16>(differ & positive), c, one);
  c = _mm512_mask_sub_epi32(c, static_cast<__mmask16>(differ & ~positive), c, one);
  return _mm512_and_si512(c, _mm512_set1_epi32(0xff));
}

//! decode8 with 16 lanes.
__attribute__((target("avx512f"))) inline void decode8_512(float const* values,
                                                           std::uint8_t const* QMEM_RESTRICT codes,
                                                           float absmax, float* QMEM_RESTRICT out,
                                                           std::size_t m) noexcept {
  __m512 const a = _mm512_set1_ps(absmax);
  std::size_t i = 0;
  for (; i + 16 <= m; i += 16) {
    __m512i const c =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<__m128i const*>(codes + i)));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_i32gather_ps(c, values, 4), a));
  }
  for (; i < m; ++i)
    out[i] = values[codes[i]] * absmax;
}

//! decode8_512 without gathers: each of the value's four bytes is looked up for 64 codes at once
//! by two 128-entry byte permutes (vpermi2b) and a select on the code's top bit, and the bytes
//! are interleaved into floats; the codes are permuted first so that the interleave (which works
//! within 128-bit lanes) writes the outputs in order. The same floats as decode8_512 (the value
//! times absmax, one IEEE multiplication). 0.155 -> 0.106 ns per value in L1/L2 (dev box,
//! 2026-11-29): the gathers' 16 loads per 16 values were the decode's bound.
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline void
decode8_vbmi(byte_planes const& planes, std::uint8_t const* QMEM_RESTRICT codes, float absmax,
             float* QMEM_RESTRICT out, std::size_t m) noexcept {
  // position 16 L + 4 q + t (L, q, t < 4) takes code 16 q + 4 L + t: output vector q, lane L
  alignas(64) static constexpr std::uint8_t order[64] = {
      0,  1,  2,  3,  16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4,  5,  6,  7,  20, 21,
      22, 23, 36, 37, 38, 39, 52, 53, 54, 55, 8,  9,  10, 11, 24, 25, 26, 27, 40, 41, 42, 43,
      56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  __m512i const perm = _mm512_load_si512(order);
  __m512i table[4][4];
  for (int k = 0; k < 4; ++k)
    for (int h = 0; h < 4; ++h)
      table[k][h] = _mm512_load_si512(planes.plane[k] + 64 * h);
  __m512 const a = _mm512_set1_ps(absmax);
  std::size_t i = 0;
  for (; i + 64 <= m; i += 64) {
    __m512i const c = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(codes + i));
    __mmask64 const high = _mm512_movepi8_mask(c); // codes 128..255
    __m512i b[4];
    for (int k = 0; k < 4; ++k)
      b[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(table[k][0], c, table[k][1]),
                                    _mm512_permutex2var_epi8(table[k][2], c, table[k][3]));
    __m512i const w01l = _mm512_unpacklo_epi8(b[0], b[1]);
    __m512i const w01h = _mm512_unpackhi_epi8(b[0], b[1]);
    __m512i const w23l = _mm512_unpacklo_epi8(b[2], b[3]);
    __m512i const w23h = _mm512_unpackhi_epi8(b[2], b[3]);
    __m512i const v[4] = {_mm512_unpacklo_epi16(w01l, w23l), _mm512_unpackhi_epi16(w01l, w23l),
                          _mm512_unpacklo_epi16(w01h, w23h), _mm512_unpackhi_epi16(w01h, w23h)};
    for (int q = 0; q < 4; ++q)
      _mm512_storeu_ps(out + i + 16 * static_cast<std::size_t>(q),
                       _mm512_mul_ps(_mm512_castsi512_ps(v[q]), a));
  }
  for (; i < m; ++i) {
    std::uint32_t u = 0;
    for (int k = 0; k < 4; ++k)
      u |= static_cast<std::uint32_t>(planes.plane[k][codes[i]]) << (8 * k);
    out[i] = std::bit_cast<float>(u) * absmax;
  }
}

//! decode4 with one 16-entry permute per 16 outputs.
__attribute__((target("avx512f"))) inline void decode4_512(float const* values,
                                                           std::uint8_t const* QMEM_RESTRICT codes,
                                                           float absmax, float* QMEM_RESTRICT out,
                                                           std::size_t m) noexcept {
  alignas(64) float scaled[16];
  for (int k = 0; k < 16; ++k)
    scaled[k] = values[k] * absmax;
  __m512 const table = _mm512_load_ps(scaled);
  __m512i const shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  __m512i const mask = _mm512_set1_epi32(15);
  std::size_t j = 0;
  for (; j + 16 <= m; j += 16) {
    __m128i const v = _mm_loadl_epi64(reinterpret_cast<__m128i const*>(codes + j / 2));
    __m512i const idx = _mm512_and_si512(
        _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(v, v)), shifts), mask);
    _mm512_storeu_ps(out + j, _mm512_permutexvar_ps(idx, table));
  }
  for (; j < m; ++j) {
    std::uint8_t const b = codes[j / 2];
    out[j] = scaled[(j % 2 == 0) ? (b >> 4) : (b & 0x0f)];
  }
}

//! The byte permutes of decode4_vbmi: group g (16 outputs) of a 64-output step puts code byte
//! 8 g + i / 2 into the low byte of 32-bit lane i.
inline constexpr auto nibble_spread = [] {
  struct {
    alignas(64) std::uint8_t index[4][64];
  } t{};
  for (int g = 0; g < 4; ++g)
    for (int j = 0; j < 64; ++j)
      t.index[g][j] = static_cast<std::uint8_t>(8 * g + j / 8);
  return t;
}();

//! decode4_512 with 64 outputs per step: the 32 code bytes loaded once, each group of 16 spread
//! into 32-bit lanes by one byte permute (vpermb), shifted (the high nibble of even elements to
//! the bottom) and looked up by one permute of the 16 scaled values, which reads only each
//! index's low 4 bits (so no mask). The same floats as decode4_512 (the scaled values are the
//! same products). Two permutes and a shift per 16 outputs instead of three permutes, a shift
//! and a mask: 2.22 -> 1.69 TSC cycles per 16 values in L1 (dev box, 2026-11-29). AVX-512 VBMI.
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline void
decode4_vbmi(float const* values, std::uint8_t const* QMEM_RESTRICT codes, float absmax,
             float* QMEM_RESTRICT out, std::size_t m) noexcept {
  __m512 const table = _mm512_mul_ps(_mm512_loadu_ps(values), _mm512_set1_ps(absmax));
  __m512i const shifts = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  __m512i spread[4];
  for (int g = 0; g < 4; ++g)
    spread[g] = _mm512_load_si512(nibble_spread.index[g]);
  std::size_t j = 0;
  for (; j + 64 <= m; j += 64) {
    __m512i const bytes =
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<__m256i const*>(codes + j / 2)));
    for (int g = 0; g < 4; ++g)
      _mm512_storeu_ps(
          out + j + 16 * static_cast<std::size_t>(g),
          _mm512_permutexvar_ps(
              _mm512_srlv_epi32(_mm512_permutexvar_epi8(spread[g], bytes), shifts), table));
  }
  if (j < m)
    decode4_512(values, codes + j / 2, absmax, out + j, m - j);
}

__attribute__((target("avx512f"))) inline std::uint32_t
absmax_bits_512(float const* QMEM_RESTRICT v, std::size_t m) noexcept {
  __m512i const mask = _mm512_set1_epi32(0x7fffffff);
  __m512i mx = _mm512_setzero_si512();
  std::size_t i = 0;
  for (; i + 16 <= m; i += 16)
    mx = _mm512_max_epi32(mx, _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(v + i)), mask));
  std::int32_t r = _mm512_reduce_max_epi32(mx);
  for (; i < m; ++i) {
    auto const x = static_cast<std::int32_t>(std::bit_cast<std::uint32_t>(v[i]) & 0x7fffffffu);
    r = x > r ? x : r;
  }
  return static_cast<std::uint32_t>(r);
}

__attribute__((target("avx512f"), always_inline)) inline __m512i
encode_lanes16(quant::detail::search_table const& t, int negative_below, float const* v, __m512 a,
               bool positive_absmax) noexcept {
  __m512 const s = _mm512_loadu_ps(v);
  __m512 const xn = positive_absmax ? _mm512_div_ps(s, a) : _mm512_setzero_ps();
  __m512i const c = table_encode16(t, xn);
  return negative_below >= 0 ? sign_fix16(c, s, negative_below) : c;
}

//! block_encode8 with 16 lanes: the codes of the 16 states at v in a block whose absmax `a` is
//! positive and finite, from the entries of the format's block table. store_block8_512's loop
//! is 20 instructions per 16 values with it, 41 with encode_lanes16 and the sign fix (objdump),
//! and was issue-bound on the two 512-bit ALU ports: 0.42 -> 0.30 ns per value for the signed
//! state in L2 (dev box, 2026-11-29; AdamW 8-bit step 1.55 -> 1.37 ns per parameter). The
//! code is in each lane's low byte; the upper bytes are not cleared (the callers' truncating
//! conversions and 64-bit shifts drop them).
__attribute__((target("avx512f"), always_inline)) inline __m512i
block_encode16(std::uint32_t const* entries, float const* v, __m512 a) noexcept {
  using quant::detail::search_table;
  static_assert(search_table::shift == 16, "the step test compares the low 16 bits");
  __m512i const u = _mm512_castps_si512(_mm512_div_ps(_mm512_loadu_ps(v), a));
  __m512i key = _mm512_srli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), 16);
  key = _mm512_max_epi32(key, _mm512_set1_epi32(static_cast<int>(search_table::key_lo)));
  __mmask16 const negative = _mm512_cmplt_epi32_mask(u, _mm512_setzero_si512());
  key = _mm512_mask_add_epi32(key, negative, key,
                              _mm512_set1_epi32(static_cast<int>(search_table::buckets)));
  __m512i const e = _mm512_i32gather_epi32(key, keyed_entries(entries), 4);
  __mmask16 const above = _mm512_cmpgt_epu32_mask(_mm512_slli_epi32(u, 16), e);
  return _mm512_mask_srli_epi32(e, above, e, 8);
}

//! store_block8 with 16 lanes; `done` is m rounded down to a multiple of 16. `block_entries`: the
//! entries of the format's block table (see block_encode16), or nullptr.
__attribute__((target("avx512f"))) inline float
store_block8_512(quant::detail::search_table const& t, std::uint32_t const* block_entries,
                 int negative_below, float const* QMEM_RESTRICT v, std::size_t m,
                 std::uint8_t* QMEM_RESTRICT codes, std::size_t& done) noexcept {
  float const amax = std::bit_cast<float>(absmax_bits_512(v, m));
  __m512 const a = _mm512_set1_ps(amax);
  std::size_t i = 0;
  if (block_entries != nullptr && block_table_applies(amax)) {
    for (; i + 16 <= m; i += 16)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i),
                       _mm512_cvtepi32_epi8(block_encode16(block_entries, v + i, a)));
  } else {
    bool const positive = amax > 0.0f;
    for (; i + 16 <= m; i += 16)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i),
                       _mm512_cvtepi32_epi8(encode_lanes16(t, negative_below, v + i, a, positive)));
  }
  done = i;
  return amax;
}

//! store_block4 with 16 lanes; `done` is m rounded down to a multiple of 16.
__attribute__((target("avx512f"))) inline float
store_block4_512(quant::detail::search_table const& t, std::uint32_t const* block_entries,
                 float const* QMEM_RESTRICT v, std::size_t m, std::uint8_t* QMEM_RESTRICT codes,
                 std::size_t& done) noexcept {
  float const amax = std::bit_cast<float>(absmax_bits_512(v, m));
  bool const positive = amax > 0.0f;
  bool const by_block_table = block_entries != nullptr && block_table_applies(amax);
  __m512 const a = _mm512_set1_ps(amax);
  std::size_t i = 0;
  for (; i + 16 <= m; i += 16) {
    // the codes' bytes above the lowest are dropped by the shifts and the truncation below
    __m512i const c = by_block_table ? block_encode16(block_entries, v + i, a)
                                     : encode_lanes16(t, -1, v + i, a, positive);
    // 64-bit lane: first | second << 32  ->  first << 4 | second in its low byte
    __m512i const pairs = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i / 2), _mm512_cvtepi64_epi8(pairs));
  }
  done = i;
  return amax;
}

//! The index of the byte permutes (vpermt2b) that gather the codes of two vectors of 16 codes,
//! one in the low byte of each 32-bit lane: element e < 32 of the pair is byte 4 e of the first
//! vector or byte 64 + 4 (e - 16) of the second. Byte j of the result takes element j mod 32
//! (8-bit codes), or (Nibbles, 4-bit codes) element 2 (j mod 16) + j / 32: the even elements in
//! bytes [0, 16), the odd ones in bytes [32, 48), each repeated 16 bytes higher.
template <bool Nibbles>
inline constexpr auto pair_permute = [] {
  struct {
    alignas(64) std::uint8_t index[64];
  } p{};
  for (int j = 0; j < 64; ++j) {
    int const e = Nibbles ? 2 * (j % 16) + j / 32 : j % 32;
    p.index[j] = static_cast<std::uint8_t>(e < 16 ? 4 * e : 64 + 4 * (e - 16));
  }
  return p;
}();

//! The codes of the states v[0, m) (m a multiple of 16) of a block whose absmax `amax` is
//! positive and finite (block_table_applies), by the format's block table (`block_entries`, see
//! block_encode16), into `codes`: Bits 8, one byte per code; Bits 4, two codes per byte (the
//! first in the high nibble). 64 values at a time, packed by two byte permutes (vpermt2b) and a
//! blend and stored at once: 3 instructions per 64 8-bit codes instead of 8 (four vpmovdb of two
//! micro-operations each), 6 per 64 4-bit codes instead of 20 (the even elements' codes in the
//! lower 32 bytes, the odd ones' in the upper, then a shift and an OR); then 16 at a time.
//! AVX-512 VBMI.
template <int Bits>
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline void
block_codes_vbmi(std::uint32_t const* block_entries, float const* QMEM_RESTRICT v, std::size_t m,
                 float amax, std::uint8_t* QMEM_RESTRICT codes) noexcept {
  static_assert(Bits == 8 || Bits == 4);
  __m512 const a = _mm512_set1_ps(amax);
  __m512i const index = _mm512_load_si512(pair_permute<Bits == 4>.index);
  std::size_t i = 0;
  for (; i + 64 <= m; i += 64) {
    __m512i c[4];
    for (int q = 0; q < 4; ++q)
      c[q] = block_encode16(block_entries, v + i + 16 * static_cast<std::size_t>(q), a);
    // 8-bit: codes 0..31 in the lower half, 32..63 in the upper; 4-bit: bytes [0, 16) even and
    // [32, 48) odd codes of elements 0..31, [16, 32) and [48, 64) those of elements 32..63
    __m512i const g = _mm512_mask_blend_epi64(Bits == 8 ? 0xf0 : 0xcc,
                                              _mm512_permutex2var_epi8(c[0], index, c[1]),
                                              _mm512_permutex2var_epi8(c[2], index, c[3]));
    if constexpr (Bits == 8)
      _mm512_storeu_si512(codes + i, g);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i / 2),
                          _mm256_or_si256(_mm512_castsi512_si256(_mm512_slli_epi16(g, 4)),
                                          _mm512_extracti64x4_epi64(g, 1)));
  }
  for (; i < m; i += 16) {
    __m512i const c = block_encode16(block_entries, v + i, a);
    if constexpr (Bits == 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(c));
    } else {
      // 64-bit lane: first | second << 32  ->  first << 4 | second in its low byte
      __m512i const pairs = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i / 2), _mm512_cvtepi64_epi8(pairs));
    }
  }
}

//! The codes of 64 values (one per 32-bit lane's low byte, four vectors) as 64 bytes in order
//! (block_codes_vbmi<8>'s packing). AVX-512 VBMI.
__attribute__((target("avx512f,avx512bw,avx512vbmi"), always_inline)) inline __m512i
pack_codes64(__m512i const (&c)[4]) noexcept {
  __m512i const index = _mm512_load_si512(pair_permute<false>.index);
  return _mm512_mask_blend_epi64(0xf0, _mm512_permutex2var_epi8(c[0], index, c[1]),
                                 _mm512_permutex2var_epi8(c[2], index, c[3]));
}

//! Whether the 8-bit reciprocal encoder (recip8_block) computes the codes of the dynamic maps by
//! arithmetic (quant/detail/dynamic_arith.hpp, arith_encode16) instead of the moved table's
//! gather (other 8-bit maps keep the gather). On: AdamW 8-bit step, one thread, CPU time, AMD
//! EPYC Zen 4 dev VM, 2026-11-30 17:44-17:48 UTC, medians of 5, alternating builds: 2^22
//! 1.712 / 1.736 -> 1.524 / 1.556 ns per parameter, 2^26 1.774 / 1.766 -> 1.598 / 1.578 (-10
//! to -11%): 26 vector instructions per 16 states cost less than one 16-lane gather (~5.3 ns
//! there). Same codes (tests/quant/dynamic_arith_test.cpp over every float).
inline constexpr bool use_arith8 = true;

//! Where the arithmetic encoder runs (use_arith8 on): -1 (default) on AMD CPUs only, 0 never, 1 on
//! every CPU with AVX-512 VBMI (tests force it to compare both encoders on any machine). On the
//! GPU machine's Intel Xeon the gather stays faster: AdamW 8-bit step, 2026-11-30 17:59-18:00
//! UTC, two alternating rounds, gather -> arithmetic: one thread (CPU time) 2^22 6.27 / 6.44 ->
//! 8.12 / 8.25 ms, 2^26 114 / 145 -> 133 / 155 ms; 16 threads 2^22 0.583 / 0.665 -> 0.730 / 0.770
//! ms, 2^26 10.5 / 10.8 -> 12.2 / 12.7 ms (+15 to +30%): its gathers are cheap and its permutes
//! share one port, while on Zen 4 one 16-lane gather costs ~5.3 ns whatever the mask.
inline std::atomic<int>& host_arith8_mode() noexcept {
  static std::atomic<int> mode{-1};
  return mode;
}

//! Whether this CPU's 8-bit step encodes the dynamic maps by arithmetic (host_arith8_mode).
inline bool host_arith8() noexcept {
#if QMEM_OPTIM_HOST_SIMD
  static bool const amd = __builtin_cpu_is("amd");
  int const mode = host_arith8_mode().load(std::memory_order_relaxed);
  return use_arith8 && (mode > 0 || (mode < 0 && amd));
#else
  return false;
#endif
}

//! The block table of the 8-bit state format F's element encoder, xn -> F::fix_sign(encode(xn), xn)
//! (host_encoder<F>::block_table() tabulates the same function, so the entries are equal).
template <class F>
quant::detail::search_table const& arith8_reference_table() {
  static quant::detail::search_table const t([](float x) -> std::uint8_t {
    using C = typename F::code;
    return F::fix_sign(C::encode(x, C::book), x);
  });
  return t;
}

//! The arithmetic encoder of format F, for inputs x' = s RN(1 / absmax) (near = 3: its code is
//! that of every float within 3 patterns, where xn = RN(s / absmax) lies; see recip_table8).
template <class F>
quant::detail::dynamic_arith8 const& arith8_of() {
  static quant::detail::dynamic_arith8 const a(
      [](float x) { return arith8_reference_table<F>().encode(x); }, F::code::is_signed,
      F::code::zero_code, 3);
  return a;
}

//! The two formats whose arithmetic encoder tests/quant/dynamic_arith_test.cpp proves over every
//! float (bitsandbytes' 8-bit states: the signed dynamic map with the sign fix, the unsigned one).
using arith8_signed_format = blockwise_format<quant::dynamic_signed, 256, true>;
using arith8_unsigned_format = blockwise_format<quant::dynamic_unsigned, 256>;

//! The proven arithmetic encoder whose element encoder has exactly this block table, or nullptr.
inline quant::detail::dynamic_arith8 const* arith8_for(quant::detail::search_table const& block) {
  using quant::detail::search_table;
  auto same = [&block](search_table const& t) {
    return t.exact() && block.exact() && t.nan_code() == block.nan_code() &&
           std::equal(t.entries(), t.entries() + 2 * search_table::buckets, block.entries());
  };
  if (same(arith8_reference_table<arith8_signed_format>()) &&
      arith8_of<arith8_signed_format>().usable())
    return &arith8_of<arith8_signed_format>();
  if (same(arith8_reference_table<arith8_unsigned_format>()) &&
      arith8_of<arith8_unsigned_format>().usable())
    return &arith8_of<arith8_unsigned_format>();
  return nullptr;
}

//! dynamic_arith8's tables and constants as recip_table8 appends them to its entries (32-bit
//! words): split, a, b, top (32 each), then eps, the zero code and the largest negative code.
struct arith8_words {
  static constexpr std::size_t split = 0, a = 32, b = 64, top = 96, eps = 128, zero = 129,
                               negmax = 130, present = 131, near = 132, count = 133;
};

//! The 8-bit block encoder without a division (block_codes8_recip): the block table looked up
//! by x' = RN(s RN(1 / absmax)) instead of xn = RN(s / absmax), with a check that sends the rare
//! state whose code could differ to the division.
//!
//! Why x' is within 3 float patterns of xn: with r = RN(1 / a) = (1 + d) / a, |d| <= 2^-24, the
//! product s r is s / a (1 + d), so between s / a and s r lies less than one ulp of either (two
//! of the binade below where they straddle a power of two); rounding both to nearest (monotone)
//! keeps RN(s r) and RN(s / a) within 3 patterns. (Where either is subnormal both are below
//! 2^-40, the table's first bucket, which holds no step.) So their codes differ only where a
//! step of the block table lies within 3 patterns of x'.
//!
//! The look-up keys x' + `offset` (bit patterns), in a table built from the block table with
//! its buckets moved by `offset` patterns: the dynamic maps' steps at short decimals (0.15625,
//! 0.4375...) fall exactly on bucket edges of the block table, where the step test could not
//! see them from the next bucket; moved by `offset` every step is at least 2 `margin` patterns
//! inside its bucket (checked when the table is built), so a step within 3 patterns of x' is in
//! x''s own bucket, whose entry holds it. A state whose x' is within `margin` patterns of its
//! bucket's step (or of a stepless bucket's top) is flagged, and its 64 values are encoded again
//! by the division (block_encode16): 0.9% of the groups of 64 in an AdamW 8-bit step on
//! Gaussian gradients (1.7% with a margin of 8).
//!
//! The entries are indexed by the upper 16 bits of x' + offset as they are, sign bit included
//! (negative x' at 0x8000 + key), every key from 0 (the first bucket's entry repeated below it)
//! to search_table::key_hi: no clamp and no sign select per state (4 of 14 vector instructions
//! per 16 states), for 196 KB per format of which the keys of |x'| in [2^-40, 1] are read
//! (40 KB, as the block table).
class recip_table8 {
public:
  //! The buckets' shift, in float patterns: the dynamic maps' steps then lie at least 655
  //! patterns from a bucket edge (0x8000: 51, 0x2000: 197, 0x1000: 77; no shift: 0).
  static constexpr std::uint32_t offset = 0x4000;
  //! Patterns around x' checked for a step: at least the 3 of the argument above (the test's
  //! sweep finds every differing code within 2: with a margin of 2 it still flags them all).
  static constexpr std::uint32_t margin = 4;
  //! Entries per sign (keys 0 .. key_hi), and where the negative keys start.
  static constexpr std::size_t keys = quant::detail::search_table::key_hi + 1;
  static constexpr std::size_t negative = 0x8000;
  //! Where the arithmetic encoder's words (arith8_words) follow the entries.
  static constexpr std::size_t arith_offset = negative + keys;

  //! From a block table (host_encoder::block_table): its encoder read at x - offset patterns,
  //! tabulated as a search table, checked, and spread over every key.
  explicit recip_table8(quant::detail::search_table const& block) {
    using quant::detail::search_table;
    search_table const moved([&block](float y) -> std::uint8_t {
      std::uint32_t const u = std::bit_cast<std::uint32_t>(y);
      std::uint32_t const mag = u & 0x7fffffffu;
      return block.encode(
          std::bit_cast<float>((u & 0x80000000u) | (mag >= offset ? mag - offset : 0u)));
    });
    std::uint32_t const* e = moved.entries();
    usable_ =
        moved.exact() && (e[0] >> 16) == 0xffffu && (e[search_table::buckets] >> 16) == 0xffffu;
    for (std::size_t k = 0; k < 2 * search_table::buckets; ++k) {
      std::uint32_t const limit = e[k] >> 16;
      bool const step = (e[k] & 0xffu) != ((e[k] >> 8) & 0xffu);
      usable_ = usable_ && !(step && (limit < 2 * margin || limit > 0xffffu - 2 * margin));
    }
    entry_.assign(negative + keys + arith8_words::count, 0u);
    for (std::size_t sign = 0; sign < 2; ++sign)
      for (std::size_t key = 0; key < keys; ++key)
        entry_[sign * negative + key] =
            e[sign * search_table::buckets +
              (key < search_table::key_lo ? 0 : key - search_table::key_lo)];
    if (quant::detail::dynamic_arith8 const* ar = arith8_for(block)) {
      std::uint32_t* w = entry_.data() + arith_offset;
      auto const& t = ar->table();
      for (std::size_t i = 0; i < 32; ++i) {
        w[arith8_words::split + i] = std::bit_cast<std::uint32_t>(t.split[i]);
        w[arith8_words::a + i] = std::bit_cast<std::uint32_t>(t.a[i]);
        w[arith8_words::b + i] = std::bit_cast<std::uint32_t>(t.b[i]);
        w[arith8_words::top + i] = std::bit_cast<std::uint32_t>(t.top[i]);
      }
      w[arith8_words::eps] = std::bit_cast<std::uint32_t>(ar->eps());
      w[arith8_words::zero] = static_cast<std::uint32_t>(ar->zero_code());
      w[arith8_words::negmax] =
          static_cast<std::uint32_t>(ar->is_signed() ? ar->zero_code() - 1 : 0);
      w[arith8_words::near] = ar->near();
      w[arith8_words::present] = 1;
      arith_ = true;
    }
  }
  //! Whether every check passed (otherwise the table must not be used).
  [[nodiscard]] bool usable() const noexcept { return usable_; }
  //! The entries: for x' + offset with bits u, entries()[u >> 16] (a search_table entry).
  [[nodiscard]] std::uint32_t const* entries() const noexcept { return entry_.data(); }
  //! Whether the words at entries() + arith_offset hold a proven arithmetic encoder (arith8_for).
  [[nodiscard]] bool arith() const noexcept { return arith_; }

private:
  std::vector<std::uint32_t> entry_;
  bool usable_ = false;
  bool arith_ = false;
};

//! Whether block_codes8_recip may encode a block with this absmax: normal and below 2^126 (then
//! 1 / absmax is a normal float, and RN(1 / absmax) is within half an ulp).
inline bool recip_applies(float amax) noexcept {
  std::uint32_t const b = std::bit_cast<std::uint32_t>(amax);
  return b >= 0x00800000u && b < 0x7e800000u;
}

//! The codes of the 16 states at v by the moved table (`entries`: recip_table8's) from
//! x' = s r; per lane, the distance to the step of x''s bucket (see recip_flagged) is folded into
//! `nearest` by an unsigned minimum (one instruction; a comparison per 16 states and an OR of
//! masks was two: AdamW 8-bit step in L2 2.60-2.83 -> 2.51-2.71 TSC cycles per parameter,
//! same-minute A/B at load 9). Each lane's low byte holds its code (the upper bytes are not
//! cleared).
__attribute__((target("avx512f"), always_inline)) inline __m512i
recip_encode16(std::uint32_t const* entries, float const* v, __m512 r, __m512i& nearest) noexcept {
  using quant::detail::search_table;
  static_assert(search_table::shift == 16, "the step test compares the low 16 bits");
  __m512i const u = _mm512_add_epi32(_mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(v), r)),
                                     _mm512_set1_epi32(static_cast<int>(recip_table8::offset)));
  __m512i const e = _mm512_i32gather_epi32(_mm512_srli_epi32(u, 16), entries, 4);
  __m512i const low = _mm512_slli_epi32(u, 16);
  // high half of low - e: (x' - limit) mod 2^16, minus a borrow of 1 from the codes; + margin + 1
  nearest = _mm512_min_epu32(
      nearest,
      _mm512_add_epi32(_mm512_sub_epi32(low, e),
                       _mm512_set1_epi32(static_cast<int>((recip_table8::margin + 1) << 16))));
  return _mm512_mask_srli_epi32(e, _mm512_cmpgt_epu32_mask(low, e), e, 8);
}

//! The lanes of `nearest` (recip_encode16's minimum, from all ones) whose state, or one of the
//! states folded into the lane, lies within recip_table8::margin patterns of its bucket's step:
//! (x' - limit) mod 2^16 in [-margin - 1 + borrow, margin + borrow].
__attribute__((target("avx512f"), always_inline)) inline __mmask16
recip_flagged(__m512i nearest) noexcept {
  return _mm512_cmplt_epu32_mask(
      nearest, _mm512_set1_epi32(static_cast<int>((2 * recip_table8::margin + 2) << 16)));
}

//! The 32-entry table at w + at (arith8_words), entry k & 31 per lane (one vpermt2ps).
__attribute__((target("avx512f"), always_inline)) inline __m512
arith8_lookup(std::uint32_t const* w, std::size_t at, __m512i k) noexcept {
  return _mm512_permutex2var_ps(_mm512_loadu_ps(reinterpret_cast<float const*>(w + at)), k,
                                _mm512_loadu_ps(reinterpret_cast<float const*>(w + at + 16)));
}

//! dynamic_arith8::encode of the 16 values x (16 x' = s RN(1 / absmax)) from its words `w`
//! (arith8_words), without a table gather: two-register permutes of the binade's split and of
//! its segment's affine, the affine, a truncation and the sign's clamps; 26 instructions. Per
//! lane, the distance of y to the nearest integer is folded into `nearest` by a minimum (zero
//! where |x'| is within `near` patterns of the split): a lane whose distance is below eps is
//! flagged (arith_flagged) and its 64 values are encoded by the division. The same codes and flags as the scalar form (tests/quant/dynamic_arith_test.cpp
//! compares them over every float). Each lane's low byte holds its code. AVX-512 F and DQ.
__attribute__((target("avx512f,avx512dq"), always_inline)) inline __m512i
arith_encode16(std::uint32_t const* w, __m512 x, __m512& nearest) noexcept {
  __m512 mag =
      _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff)));
  mag = _mm512_min_ps(_mm512_max_ps(mag, _mm512_set1_ps(quant::detail::dynamic_arith8::lowest)),
                      _mm512_set1_ps(1.0f));
  __m512i k = _mm512_srli_epi32(_mm512_castps_si512(mag), 23); // permutes read bits 0..4
  __m512 const split = arith8_lookup(w, arith8_words::split, k);
  __mmask16 const up = _mm512_cmp_ps_mask(mag, split, _CMP_GT_OQ);
  // a lane within `near` patterns of the (exact) split is flagged: its xn may lie across it
  __m512i const near = _mm512_set1_epi32(static_cast<int>(w[arith8_words::near]));
  __mmask16 const at_split = _mm512_cmple_epu32_mask(
      _mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(mag), _mm512_castps_si512(split)),
                       near),
      _mm512_add_epi32(near, near));
  k = _mm512_mask_add_epi32(k, up, k, _mm512_set1_epi32(1));
  __m512 y = _mm512_mul_ps(mag, arith8_lookup(w, arith8_words::a, k));
  __asm__("" : "+v"(y)); // no contraction into an FMA (the scalar form rounds twice)
  y = _mm512_add_ps(y, arith8_lookup(w, arith8_words::b, k));
  y = _mm512_min_ps(y, arith8_lookup(w, arith8_words::top, k));
  __m512 const d =
      _mm512_sub_ps(y, _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  nearest = _mm512_maskz_min_ps(static_cast<__mmask16>(~at_split), nearest, _mm512_abs_ps(d));
  __m512i const m = _mm512_cvttps_epi32(y);
  __mmask16 const negative = _mm512_movepi32_mask(_mm512_castps_si512(x));
  __m512i const zero = _mm512_set1_epi32(static_cast<int>(w[arith8_words::zero]));
  __m512i c = _mm512_add_epi32(zero, _mm512_mask_sub_epi32(m, negative, _mm512_setzero_si512(), m));
  c = _mm512_max_epi32(c, _mm512_setzero_si512());
  return _mm512_mask_min_epi32(c, negative, c,
                               _mm512_set1_epi32(static_cast<int>(w[arith8_words::negmax])));
}

//! The lanes of `nearest` (arith_encode16's minimum, from +inf) closer than eps to an integer.
__attribute__((target("avx512f"), always_inline)) inline __mmask16
arith_flagged(std::uint32_t const* w, __m512 nearest) noexcept {
  return _mm512_cmp_ps_mask(nearest, _mm512_set1_ps(std::bit_cast<float>(w[arith8_words::eps])),
                            _CMP_LT_OQ);
}

//! One block's set-up for block_codes8_recip, in registers, to encode it 64 values at a time
//! (the interleaved 8-bit step: update_encode).
struct recip8_block {
  std::uint32_t const* recip_entries;
  std::uint32_t const* block_entries;
  //! The arithmetic encoder's words (host_arith8() and recip_table8::arith()), or nullptr.
  std::uint32_t const* arith;
  __m512 a; //!< absmax
  __m512 r; //!< RN(1 / absmax)

  recip8_block() = default; //!< uninitialized (assign a constructed one before use)

  //! `amax` must satisfy block_table_applies and recip_applies.
  __attribute__((target("avx512f"), always_inline))
  recip8_block(std::uint32_t const* recip, std::uint32_t const* block, float amax) noexcept
      : recip_entries(recip), block_entries(block),
        arith(host_arith8() && recip[recip_table8::arith_offset + arith8_words::present] != 0
                  ? recip + recip_table8::arith_offset
                  : nullptr),
        a(_mm512_set1_ps(amax)), r(_mm512_set1_ps(1.0f / amax)) {}

  //! The codes of the 64 states at v into out[0, 64). AVX-512 VBMI and DQ.
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vbmi"), always_inline)) void
  codes64(float const* v, std::uint8_t* out) const noexcept {
    __m512i c[4];
    bool flagged = false;
    if (use_arith8 && arith != nullptr) {
      __m512 nearest = _mm512_set1_ps(std::numeric_limits<float>::infinity());
      for (int q = 0; q < 4; ++q)
        c[q] = arith_encode16(arith, _mm512_mul_ps(_mm512_loadu_ps(v + 16 * q), r), nearest);
      flagged = arith_flagged(arith, nearest) != 0;
    } else {
      __m512i nearest = _mm512_set1_epi32(-1);
      for (int q = 0; q < 4; ++q)
        c[q] = recip_encode16(recip_entries, v + 16 * q, r, nearest);
      flagged = recip_flagged(nearest) != 0;
    }
    if (flagged) [[unlikely]]
      for (int q = 0; q < 4; ++q)
        c[q] = block_encode16(block_entries, v + 16 * q, a);
    _mm512_storeu_si512(out, pack_codes64(c));
  }
};

//! block_codes_vbmi<8> without the division: the codes of the states v[0, m) (m a multiple of
//! 16) of a block whose absmax satisfies recip_applies, by recip_encode16 with the moved table
//! `recip_entries` (see recip_table8); every 64 (or 16) values holding a flagged state are
//! encoded again by block_encode16 with the block table `block_entries`. The same codes as
//! block_codes_vbmi<8>. AVX-512 VBMI and DQ.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vbmi"))) inline void
block_codes8_recip(std::uint32_t const* recip_entries, std::uint32_t const* block_entries,
                   float const* QMEM_RESTRICT v, std::size_t m, float amax,
                   std::uint8_t* QMEM_RESTRICT codes) noexcept {
  recip8_block const blk(recip_entries, block_entries, amax);
  std::size_t i = 0;
  for (; i + 64 <= m; i += 64)
    blk.codes64(v + i, codes + i);
  for (; i < m; i += 16) {
    __m512i c;
    bool flagged = false;
    if (use_arith8 && blk.arith != nullptr) {
      __m512 nearest = _mm512_set1_ps(std::numeric_limits<float>::infinity());
      c = arith_encode16(blk.arith, _mm512_mul_ps(_mm512_loadu_ps(v + i), blk.r), nearest);
      flagged = arith_flagged(blk.arith, nearest) != 0;
    } else {
      __m512i nearest = _mm512_set1_epi32(-1);
      c = recip_encode16(recip_entries, v + i, blk.r, nearest);
      flagged = recip_flagged(nearest) != 0;
    }
    if (flagged) [[unlikely]]
      c = block_encode16(block_entries, v + i, blk.a);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(c));
  }
}

//! Whether the CPU has what block_codes4_search needs: AVX-512 F, BW, DQ and VBMI (the ISA
//! limit aside: the kernel runs only inside store_block4_vbmi, which the step calls only when
//! host_vbmi()).
inline bool host_step_search4() noexcept {
  static bool const cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vbmi");
  return cpu;
}

//! Per 32-bit lane, the number of the block's line thresholds below x for the 16 states at x
//! (block_codes4_search): t[l] holds, at each count, the threshold that level l of the binary
//! search compares (step 8 >> l; t[0] the same in every lane). Per 16 states 12 instructions, 7
//! of them permutes or comparisons.
__attribute__((target("avx512f"), always_inline)) inline __m512i
step_count16(__m512 const (&t)[4], float const* x) noexcept {
  __m512 const s = _mm512_loadu_ps(x);
  __m512i c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(s, t[0], _CMP_GT_OQ), _mm512_set1_epi32(8));
  for (int l = 1; l < 4; ++l)
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(c, t[l]), _CMP_GT_OQ),
                              c, _mm512_set1_epi32(8 >> l));
  return c;
}

//! One block's thresholds for block_codes4_search, in registers: Q_j of every step from the
//! block's absmax, on the line (see step_search4) and arranged per level of the search (see
//! step_count16), and the code of each count. AVX-512 DQ.
struct search4_block {
  __m512 t[4];
  __m512i code;

  search4_block() = default; //!< uninitialized (assign a constructed one before use)

  __attribute__((target("avx512f,avx512dq"), always_inline))
  search4_block(step_search4 const& steps, float amax) noexcept {
    // Q (float bits, compact slots): the largest float <= a B, from the exact double product
    __m512d const a = _mm512_set1_pd(static_cast<double>(amax));
    __m512d const p0 = _mm512_mul_pd(a, _mm512_load_pd(steps.bound));
    __m512d const p1 = _mm512_mul_pd(a, _mm512_load_pd(steps.bound + 8));
    __m256 const q0 = _mm512_cvt_roundpd_ps(p0, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m256 const q1 = _mm512_cvt_roundpd_ps(p1, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512i q = _mm512_castps_si512(_mm512_insertf32x8(_mm512_castps256_ps512(q0), q1, 1));
    // a negative step's line threshold: -next(Q), the next float's bits with the sign bit
    q = _mm512_mask_or_epi32(q, steps.negative_slots, _mm512_add_epi32(q, _mm512_set1_epi32(1)),
                             _mm512_set1_epi32(static_cast<int>(0x80000000u)));
    for (int l = 0; l < 4; ++l)
      t[l] = _mm512_castsi512_ps(_mm512_permutexvar_epi32(_mm512_load_si512(steps.level[l]), q));
    code = _mm512_load_si512(steps.code);
  }

  //! The codes of the 64 states at v, two per byte (the first in the high nibble), into out[0,
  //! 32): the counts packed by two byte permutes and a blend (as block_codes_vbmi<4>), turned
  //! into codes by one byte permute. AVX-512 VBMI.
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vbmi"), always_inline)) void
  codes64(float const* v, std::uint8_t* out) const noexcept {
    __m512i const index = _mm512_load_si512(pair_permute<true>.index);
    __m512i c[4];
    for (int r = 0; r < 4; ++r)
      c[r] = step_count16(t, v + 16 * r);
    __m512i const g = _mm512_permutexvar_epi8(
        _mm512_mask_blend_epi64(0xcc, _mm512_permutex2var_epi8(c[0], index, c[1]),
                                _mm512_permutex2var_epi8(c[2], index, c[3])),
        code);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm256_or_si256(_mm512_castsi512_si256(_mm512_slli_epi16(g, 4)),
                                        _mm512_extracti64x4_epi64(g, 1)));
  }
};

//! The 4-bit codes of the states v[0, m) (m a multiple of 16) of a block whose absmax `amax` is
//! positive and finite, by the thresholds of `steps` (see step_search4): the block table's codes
//! without a division and without a gather. Packed as block_codes_vbmi<4> packs them (two byte
//! permutes and a blend per 64 values), the counts turned into codes by one byte permute.
//! AVX-512 VBMI and DQ.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vbmi"))) inline void
block_codes4_search(step_search4 const& steps, float const* QMEM_RESTRICT v, std::size_t m,
                    float amax, std::uint8_t* QMEM_RESTRICT codes) noexcept {
  search4_block const blk(steps, amax);
  std::size_t i = 0;
  for (; i + 64 <= m; i += 64)
    blk.codes64(v + i, codes + i / 2);
  for (; i < m; i += 16) {
    // every byte through the code table; the truncations below keep each lane's lowest byte
    __m512i const c = _mm512_permutexvar_epi8(step_count16(blk.t, v + i), blk.code);
    // 64-bit lane: first | second << 32  ->  first << 4 | second in its low byte
    __m512i const pairs = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i / 2), _mm512_cvtepi64_epi8(pairs));
  }
}

//! store_block8_512 with block_codes_vbmi<8> where the block table applies, or with
//! block_codes8_recip where `recip_entries` (recip_table_of's moved table) is not nullptr (then
//! host_step_search4()) and the absmax lets it (recip_applies). AVX-512 VBMI.
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline float
store_block8_vbmi(quant::detail::search_table const& t, std::uint32_t const* block_entries,
                  std::uint32_t const* recip_entries, int negative_below,
                  float const* QMEM_RESTRICT v, std::size_t m, std::uint8_t* QMEM_RESTRICT codes,
                  std::size_t& done) noexcept {
  float const amax = std::bit_cast<float>(absmax_bits_512(v, m));
  if (block_entries == nullptr || !block_table_applies(amax))
    return store_block8_512(t, block_entries, negative_below, v, m, codes, done);
  done = m / 16 * 16;
  if (recip_entries != nullptr && recip_applies(amax))
    block_codes8_recip(recip_entries, block_entries, v, done, amax, codes);
  else
    block_codes_vbmi<8>(block_entries, v, done, amax, codes);
  return amax;
}

//! store_block4_512 with block_codes_vbmi<4> where the block table applies, or with
//! block_codes4_search where `steps` is not nullptr (then usable, and host_step_search4()).
//! AVX-512 VBMI.
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline float
store_block4_vbmi(quant::detail::search_table const& t, std::uint32_t const* block_entries,
                  step_search4 const* steps, float const* QMEM_RESTRICT v, std::size_t m,
                  std::uint8_t* QMEM_RESTRICT codes, std::size_t& done) noexcept {
  float const amax = std::bit_cast<float>(absmax_bits_512(v, m));
  if (block_entries == nullptr || !block_table_applies(amax))
    return store_block4_512(t, block_entries, v, m, codes, done);
  done = m / 16 * 16;
  if (steps != nullptr)
    block_codes4_search(*steps, v, done, amax, codes);
  else
    block_codes_vbmi<4>(block_entries, v, done, amax, codes);
  return amax;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif // QMEM_OPTIM_HOST_SIMD

} // namespace qmem::optim::detail
