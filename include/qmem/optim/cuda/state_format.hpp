#pragma once
//! \file
//! The device side of the optimizer state formats (optim/state.hpp): what the fused CUDA step
//! needs beyond the formats' own element functions.
//!
//! The formats' `load`/`encode`/`fix_sign` read `Code::book`, a static constexpr object that
//! device code cannot use (nvcc allows only scalar constexpr variables there). Each block of the
//! fused kernel therefore copies every code type's values, with its search table, into shared
//! memory (`codec`, from a device-memory image) and computes the same codes: decode
//! `mul(decode(code), absmax)`, encode `fix_sign(encode(F::normalize(s, absmax)), s)`. Faster
//! routes to the same codes, each proven equal to the code type's own encode for all 2^32 floats
//! (tests/optim/cuda_fused_codec_test.cpp): bitsandbytes' 8-bit maps search a packed bucket table
//! with one read (bucket_search.hpp), and so do the 4-bit nearest codes over their 15 thresholds
//! (found at compile time; a compare chain against immediates where a table does not pack); the
//! normalize multiplies by the block's reciprocal in double (exact for the codes,
//! see format_codec::reciprocal_normalize); the sign fix reads the sign from the code. In a block
//! whose absmax is finite and positive (nearly all), the 8-bit encode keys the packed search by
//! the sign of the state and caps negative states' codes, which IS the sign fix there, with no NaN
//! test and no fix (format_codec::encode_finite).

#include <qmem/core/config.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/optim/cuda/bucket_search.hpp>
#include <qmem/optim/rule.hpp>
#include <qmem/optim/state.hpp>
#include <qmem/quant/codes.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace qmem::optim::cuda {

namespace detail {

struct no_search {};

template <class Code>
inline constexpr bool is_nearest4_v = false;
template <auto const& Table>
inline constexpr bool is_nearest4_v<nearest4_code<Table>> = true;

//! A float's position on the number line as an unsigned integer (monotone; -0.0 just below +0.0).
constexpr std::uint32_t ordered_bits(float x) noexcept {
  std::uint32_t const u = std::bit_cast<std::uint32_t>(x);
  return (u >> 31) != 0 ? ~u : u | 0x80000000u;
}
constexpr float from_ordered_bits(std::uint32_t o) noexcept {
  return std::bit_cast<float>((o >> 31) != 0 ? o & 0x7fffffffu : ~o);
}

//! The 15 thresholds of a nearest4_code: thresholds[i - 1] is the smallest float whose code
//! rank (index in the sorted table) is >= i, found by bisection over the floats between the
//! neighbouring table values with the code's own (constexpr) search. The search is monotone (the
//! distances it compares are), so rank(x) = the number of thresholds <= x, NaN 0: proven for all
//! 2^32 floats by tests/optim/cuda_fused_codec_test.cpp.
template <class Code>
constexpr std::array<float, 15> nearest4_thresholds() noexcept {
  std::array<float, 15> t{};
  auto const& sorted = Code::book.sorted;
  for (std::size_t i = 1; i < 16; ++i) {
    std::uint32_t lo = ordered_bits(sorted[i - 1]); // rank i - 1 there
    std::uint32_t hi = ordered_bits(sorted[i]);     // rank i there
    while (hi - lo > 1) {
      std::uint32_t const mid = lo + (hi - lo) / 2;
      if (quant::detail::nearest_sorted<16>(from_ordered_bits(mid), sorted) >= i)
        hi = mid;
      else
        lo = mid;
    }
    t[i - 1] = from_ordered_bits(hi);
  }
  return t;
}

//! The bucket table of a nearest4_code's thresholds (its rank = the number of thresholds <= x).
template <class Code>
inline constexpr auto nearest4_bucket_table =
    cuda_search::make_bucket_table_of_thresholds(nearest4_thresholds<Code>().data(), 15);

//! Whether a nearest4_code's ranks are its codes (an ascending table: no code_of lookup).
template <class Code>
constexpr bool ranks_are_codes() noexcept {
  for (std::size_t i = 0; i < 16; ++i)
    if (Code::book.code_of[i] != i)
      return false;
  return true;
}

//! Threshold I of a nearest4_code as a scalar constant (device code may use scalar constexpr
//! variables only): the compare tree below reads them as immediates.
template <class Code, int I>
inline constexpr float nearest4_threshold_v = nearest4_thresholds<Code>()[I];

//! The number of codes whose value has its sign bit set when they are codes 0..n-1 (a table
//! ascending in its sign), else -1.
template <class Code>
constexpr int negative_code_prefix() noexcept {
  constexpr std::size_t n = std::size_t{1} << Code::bits;
  int count = 0;
  bool nonnegative_seen = false;
  for (std::size_t c = 0; c < n; ++c) {
    bool const negative = (std::bit_cast<std::uint32_t>(Code::book.value.value[c]) >> 31) != 0;
    if (negative && nonnegative_seen)
      return -1;
    if (negative)
      ++count;
    else
      nonnegative_seen = true;
  }
  return count;
}

//! Whether every value of a table is >= +0 (an unsigned map).
template <class Code>
constexpr bool all_nonnegative() noexcept {
  return negative_code_prefix<Code>() == 0;
}

} // namespace detail

//! How a codec encodes: bucket_table's two reads, packed_bucket_table's one read (bnb's 8-bit maps;
//! the 4-bit nearest codes over their thresholds), a compare chain against immediate thresholds
//! (4-bit nearest codes whose thresholds do not pack), or the code type's own search (any other).
//! The 4-bit codes moved from the compare chain (4 compares, 11 selects and the immediates'
//! moves: about 30 instructions per encode, ptxas sm_90) to the packed search (about 14): AdamW
//! 4-bit 161.5 -> 132.5 SASS instructions per element in the fused step's hot loop.
enum class encode_method : std::uint8_t { bucket, packed_bucket, compare_chain, code_search };

//! Decode and encode of one code type, in one trivially copyable object that each block copies
//! into shared memory: the code values and the search table of the encode method.
//! `NegativeCap` >= 0 (a packed 8-bit signed table only): the search gives negative floats at
//! most that code, the cap in the table's negative entries (format_codec::negative_cap).
template <class Code, int NegativeCap = -1>
struct codec {
  static constexpr std::size_t entries = std::size_t{1} << Code::bits;
  using code_type = Code;
  //! 7 mantissa bits per bucket: the fewest that keep one threshold per bucket for bnb's dynamic
  //! maps (6 fails make_bucket_table's check); 24 binades reach below their smallest threshold
  //! (2^-22.6). 24 KB per signed table, 12 KB per unsigned one.
  //! 4-bit codes sit in bits 28-31 of the search's result (the fused step packs them from there).
  using packed_table = cuda_search::packed_bucket_table<7, 24, detail::all_nonnegative<Code>(),
                                                        Code::bits == 4 ? 28 : 24>;
  static constexpr encode_method method = [] {
    if constexpr (quant::uses_bnb_search_v<Code>)
      return packed_table::packable(cuda_search::bucket_table_of<Code>)
                 ? encode_method::packed_bucket
                 : encode_method::bucket;
    else if constexpr (detail::is_nearest4_v<Code>)
      return !detail::ranks_are_codes<Code>() ? encode_method::code_search
             : packed_table::packable(detail::nearest4_bucket_table<Code>, 15)
                 ? encode_method::packed_bucket
                 : encode_method::compare_chain;
    else
      return encode_method::code_search;
  }();
  using search_type = std::conditional_t<
      method == encode_method::packed_bucket, packed_table,
      std::conditional_t<method == encode_method::bucket, cuda_search::bucket_table<>,
                         std::conditional_t<method == encode_method::code_search,
                                            quant::codebook<entries>, detail::no_search>>>;

  float value[entries]; //!< value[code]
  search_type search;

  //! The codec of `Code` (compile time).
  static constexpr codec make() noexcept {
    codec c{};
    for (std::size_t i = 0; i < entries; ++i)
      c.value[i] = Code::book.value.value[i];
    if constexpr (method == encode_method::packed_bucket && detail::is_nearest4_v<Code>)
      c.search = packed_table::make(detail::nearest4_bucket_table<Code>, 15);
    else if constexpr (method == encode_method::packed_bucket)
      c.search = packed_table::make(cuda_search::bucket_table_of<Code>);
    else if constexpr (method == encode_method::bucket)
      c.search = cuda_search::bucket_table_of<Code>;
    else if constexpr (method == encode_method::code_search)
      c.search = Code::book;
    if constexpr (NegativeCap >= 0) {
      static_assert(method == encode_method::packed_bucket && Code::bits == 8 &&
                        !detail::all_nonnegative<Code>() && NegativeCap < 256,
                    "codec: a negative cap needs a packed signed 8-bit table");
      // the negative keys (0 .. magnitudes - 1): a bucket whose code reaches the cap keeps it,
      // without a threshold (no carry); the others are below it whatever the carry
      constexpr auto cap = static_cast<std::uint32_t>(NegativeCap);
      for (std::uint32_t k = 0; k < packed_table::source::magnitudes; ++k)
        if ((c.search.entry[k] >> 24) >= cap)
          c.search.entry[k] = (cap << 24) + ((std::uint32_t{1} << 24) - packed_table::never);
    }
    return c;
  }
  QMEM_HOST_DEVICE QMEM_INLINE float decode(std::uint8_t c) const noexcept { return value[c]; }
  //! value[c] for the byte offset 4 c (the fused step extracts 4-bit codes already scaled by 4).
  QMEM_HOST_DEVICE QMEM_INLINE float decode_at(std::uint32_t offset) const noexcept {
    return *reinterpret_cast<float const*>(reinterpret_cast<unsigned char const*>(value) + offset);
  }
  //! The code of the normalized value `xn`: what Code::encode returns, bit for bit (with a
  //! NegativeCap, at most that code for negative xn).
  QMEM_HOST_DEVICE QMEM_INLINE std::uint8_t encode(float xn) const noexcept {
    if constexpr (method == encode_method::packed_bucket || method == encode_method::bucket) {
      return search.encode(xn);
    } else if constexpr (method == encode_method::compare_chain) {
      // rank = the number of thresholds <= xn (NaN: none): a branch-free binary search, each
      // level's threshold selected among immediates by the answers above it (4 compares and 11
      // selects; 15 compares and 15 adds for counting them all)
      using detail::nearest4_threshold_v;
      constexpr float t1 = nearest4_threshold_v<Code, 0>, t2 = nearest4_threshold_v<Code, 1>,
                      t3 = nearest4_threshold_v<Code, 2>, t4 = nearest4_threshold_v<Code, 3>,
                      t5 = nearest4_threshold_v<Code, 4>, t6 = nearest4_threshold_v<Code, 5>,
                      t7 = nearest4_threshold_v<Code, 6>, t8 = nearest4_threshold_v<Code, 7>,
                      t9 = nearest4_threshold_v<Code, 8>, t10 = nearest4_threshold_v<Code, 9>,
                      t11 = nearest4_threshold_v<Code, 10>, t12 = nearest4_threshold_v<Code, 11>,
                      t13 = nearest4_threshold_v<Code, 12>, t14 = nearest4_threshold_v<Code, 13>,
                      t15 = nearest4_threshold_v<Code, 14>;
      bool const b3 = xn >= t8;
      bool const b2 = xn >= (b3 ? t12 : t4);
      bool const b1 = xn >= (b3 ? (b2 ? t14 : t10) : (b2 ? t6 : t2));
      bool const b0 = xn >= (b3 ? (b2 ? (b1 ? t15 : t13) : (b1 ? t11 : t9))
                                : (b2 ? (b1 ? t7 : t5) : (b1 ? t3 : t1)));
      return static_cast<std::uint8_t>((b3 ? 8u : 0u) | (b2 ? 4u : 0u) | (b1 ? 2u : 0u) |
                                       (b0 ? 1u : 0u));
    } else {
      return Code::encode(xn, search);
    }
  }
};

//! The codec of a state format: a codec for blockwise formats, an empty placeholder otherwise.
template <class F, bool Blockwise = F::blockwise>
struct format_codec;
template <class F>
struct format_codec<F, false> {
  std::uint32_t unused;
  static constexpr format_codec make() noexcept { return {0}; }
};
template <class F>
struct format_codec<F, true> {
  using code = typename F::code;
  //! Codes 0..negative_codes-1 have negative values, the others not (-1: no such split).
  static constexpr int negative_codes = detail::negative_code_prefix<code>();
  //! The sign-fixed packed 8-bit route (finite_route with the sign fix): negative_codes - 1, the
  //! code the sign fix caps negative states at, kept in the search table itself, which then
  //! returns min(code, negative_codes - 1) for negative floats (ptxas sm_90: one LOP3 per encode
  //! fewer, the per-value cap and its mask). That is the sign fix there: bnb's search gives a
  //! negative float a code <= the first non-negative one, which the fix moves down by one, so
  //! encode's sign fix leaves the capped codes as they are. Else -1 (no cap).
  static constexpr int negative_cap = [] {
    if constexpr (codec<code>::method == encode_method::packed_bucket && F::sign_fix &&
                  quant::uses_bnb_search_v<code>) {
      if (negative_codes >= 1 &&
          quant::detail::bnb_search256(0.0f, code::book.value.value) >= negative_codes &&
          quant::detail::bnb_search256(-0.0f, code::book.value.value) <= negative_codes)
        return negative_codes - 1;
    }
    return -1;
  }();
  codec<code, negative_cap> c;
  static constexpr format_codec make() noexcept { return {codec<code, negative_cap>::make()}; }

  //! Whether the encode normalizes with the block's reciprocal in double precision instead of an
  //! fp32 division per element. Exact for these codecs: with y = RN64(1 / absmax), the product
  //! RN64(s * y) is within 2^-52 (relative) of s / absmax, while a quotient of two floats lies at
  //! least 2^-49 (relative) away from any midpoint between neighbouring floats of the normal
  //! range; so rounding the product to float gives RN32(s / absmax) whenever that is a normal
  //! float. Below 2^-126 the two may differ, but both keep the sign and stay below every threshold
  //! of these codecs (the packed search's tiny bucket holds none; the 4-bit thresholds are normal),
  //! so the CODE is the same. The GPU test compares the codes for all 2^32 states at several
  //! absmax. Why: div.rn.f32 is a reciprocal, four FMAs, a range check and a branch per element;
  //! the branches keep the compiler from interleaving a lane's elements.
  static constexpr bool reciprocal_normalize =
      codec<code>::method == encode_method::packed_bucket ||
      codec<code>::method == encode_method::compare_chain;

  //! What the encode needs of a block: its new absmax, with reciprocal_normalize 1 / absmax in
  //! double (encode, encode_finite), and, for encode_block_high, the fp32 reciprocal of
  //! block_reciprocal.
  struct block_scale {
    float absmax;
    double inverse;
    float reciprocal;
    float absmax_16th;    //!< absmax / 16 (linear16_route)
    float reciprocal_x16; //!< reciprocal * 16 (linear16_route)
  };
  //! The block_scale of a block whose new absmax is `absmax` (once per block): every field.
  QMEM_HOST_DEVICE QMEM_INLINE block_scale scale_of(float absmax) const noexcept {
    if constexpr (reciprocal_normalize)
      return {absmax, absmax > 0.0f ? 1.0 / static_cast<double>(absmax) : 0.0,
              block_reciprocal(absmax), absmax * 0.0625f, block_reciprocal(absmax) * 16.0f};
    else
      return {absmax, 0.0, 0.0f, 0.0f, 0.0f};
  }
  //! The block_scale that encode_block_high reads (absmax and reciprocal; inverse is 0), for a
  //! block where block_route(absmax) holds: no double division (ptxas sm_90: MUFU.RCP64H, five
  //! DFMA, a range test and a slow-path call per block and state -> one MUFU.RCP and two FFMA).
  QMEM_HOST_DEVICE QMEM_INLINE static block_scale block_route_scale(float absmax) noexcept {
    float const r = block_reciprocal(absmax);
    return {absmax, 0.0, r, absmax * 0.0625f, r * 16.0f};
  }

  //! The smallest and largest absmax of the blocks that encode by encode_block_high: there the
  //! fp32 quotient of block_quotient is exact for every state that a code depends on (below).
  static constexpr float block_route_min = 0x1p-72f;
  static constexpr float block_route_max = 0x1.fffffep125f;

  //! 1 / a refined once by Newton's step, the divisor half of the sequence ptxas emits for
  //! `div.rn.f32` when its range check passes (sm_90: MUFU.RCP and two FFMA); see block_quotient.
  //! On the host (where block_quotient divides) it is 1 / a.
  QMEM_HOST_DEVICE QMEM_INLINE static float block_reciprocal(float a) noexcept {
#if defined(__CUDA_ARCH__)
    float r;
    asm("{\n\t"
        ".reg .f32 r0, t, na;\n\t"
        "rcp.approx.ftz.f32 r0, %1;\n\t"
        "neg.f32 na, %1;\n\t"
        "fma.rn.f32 t, na, r0, 0f3F800000;\n\t"
        "fma.rn.f32 %0, r0, t, r0;\n\t"
        "}"
        : "=f"(r)
        : "f"(a));
    return r;
#else
    return 1.0f / a;
#endif
  }

  //! RN(n / b.absmax) for 0 <= n <= b.absmax (or NaN) in a block where block_route(b.absmax)
  //! holds, wherever the code depends on it: the numerator half of ptxas's `div.rn.f32` sequence
  //! with the block's reciprocal (q0 = n r, e = n - a q0 exactly by one FMA, q = q0 + r e: three
  //! FP32 instructions). Exact: for 2^-72 <= a < 2^126 the reciprocal and, for quotients >= 2^-25,
  //! q0 are normal floats and the residual e a multiple of 2^-149 (n >= 2^-97), so every step is
  //! the one of the sequence at operands scaled by powers of two into its proven range, where it
  //! rounds correctly (ptxas's own division; div_in_range's check in
  //! tests/optim/cuda_fused_codec_test.cpp); smaller quotients stay below 2^-24, under every
  //! threshold of these codecs, as the exact ones do. Proven equal to the code type's encode for
  //! all 2^32 states at block maxima across the range by that test. Why: the double route is two
  //! F2F conversions and a DMUL per value, which sm_90 issues at a quarter of the FP32 rate or
  //! less (16 conversions per clock and SM), beside the MUFUs of the update, and a double
  //! reciprocal per block; this is three full-rate FP32 instructions. Measured on an H200 at 2^28
  //! parameters, 2026-11-29 18:46 UTC, against the double route in the same session (with the
  //! fused step's bit-wise range test): AdamW 8-bit 1.234-1.244 -> 1.217-1.219 ms, with bf16
  //! params 1.173-1.183 -> 1.135-1.137, AdamW 4-bit 1.270-1.271 -> 1.219-1.221, Lion 8-bit
  //! unchanged (1.015-1.020). On the host: n / a.
  QMEM_HOST_DEVICE QMEM_INLINE static float block_quotient(float n, block_scale b) noexcept {
#if defined(__CUDA_ARCH__)
    return quotient_steps(n, b.absmax, b.reciprocal);
#else
    return n / b.absmax;
#endif
  }
  //! 16 block_quotient(n, b) where that is normal (its sequence at a / 16 and 16 r: every step
  //! scales by 16 exactly, the residual is the same), which is wherever linear16_route's code
  //! depends on it; on the host 16 (n / a).
  QMEM_HOST_DEVICE QMEM_INLINE static float block_quotient_x16(float n, block_scale b) noexcept {
#if defined(__CUDA_ARCH__)
    return quotient_steps(n, b.absmax_16th, b.reciprocal_x16);
#else
    return (n / b.absmax) * 16.0f;
#endif
  }
#if defined(__CUDA_ARCH__)
  //! The numerator half of ptxas's div.rn.f32 sequence (block_quotient): q0 = n r, e = n - a q0,
  //! q0 + r e.
  __device__ QMEM_INLINE static float quotient_steps(float n, float a, float r) noexcept {
    float q;
    asm("{\n\t"
        ".reg .f32 q0, e, na;\n\t"
        "neg.f32 na, %2;\n\t"
        "fma.rn.f32 q0, %1, %3, 0f00000000;\n\t"
        "fma.rn.f32 e, na, q0, %1;\n\t"
        "fma.rn.f32 %0, %3, e, q0;\n\t"
        "}"
        : "=f"(q)
        : "f"(n), "f"(a), "f"(r));
    return q;
  }
#endif
  //! F::normalize(s, absmax), bit for bit where the code depends on it (see reciprocal_normalize).
  QMEM_HOST_DEVICE QMEM_INLINE float normalize(float s, block_scale b) const noexcept {
    if constexpr (reciprocal_normalize)
      return b.absmax > 0.0f ? static_cast<float>(static_cast<double>(s) * b.inverse) : 0.0f;
    else
      return F::normalize(s, b.absmax);
  }

  //! Element-level encode of format F with this codec: F::encode(s, absmax), code for code. The
  //! sign fix reads the sign of the code's value from the code itself when the table is ordered by
  //! sign (bnb's signed map: codes 0..126 negative), not from the table. (An earlier fp32 version,
  //! multiplying by the block's reciprocal and dividing only within a margin of a threshold, was
  //! measured slower on an H200: 3.31 ms against 3.06 ms for AdamW 8-bit at 2^28, because its
  //! margin check took extra dependent shared-memory reads.)
  QMEM_HOST_DEVICE QMEM_INLINE std::uint8_t encode(float s, block_scale b) const noexcept {
    std::uint8_t code = c.encode(normalize(s, b));
    if constexpr (F::sign_fix) {
      bool code_negative = false;
      if constexpr (negative_codes >= 0)
        code_negative = code < negative_codes;
      else
        code_negative = (qmem::detail::float_to_bits(c.decode(code)) >> 31) != 0;
      bool const s_negative = (qmem::detail::float_to_bits(s) >> 31) != 0;
      if (code_negative != s_negative)
        code = static_cast<std::uint8_t>(s > 0.0f ? code + 1 : code - 1);
    }
    return code;
  }
  //! Whether encode_finite has its own route: the packed 8-bit search, either with the sign fix
  //! on a table ordered by sign whose +0 takes a non-negative code and whose -0 at most the first
  //! one (bnb's signed map: +0 and -0 both take code 127), or without it on a non-negative table.
  static constexpr bool finite_route = [] {
    if constexpr (codec<code>::method != encode_method::packed_bucket) {
      return false;
    } else if constexpr (F::sign_fix && !quant::uses_bnb_search_v<code>) {
      return false; // (no 4-bit policy fixes signs)
    } else {
      if constexpr (F::sign_fix)
        return negative_cap >= 0;
      else
        return detail::all_nonnegative<code>();
    }
  }();

  //! Whether the blocks whose new absmax is `absmax` may encode with encode_finite: always
  //! without the sign fix, else when 0 < absmax < inf (one test per block).
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr bool finite_block(float absmax) noexcept {
    if constexpr (finite_route && F::sign_fix)
      return absmax > 0.0f && absmax <= 3.40282347e38f;
    else
      return true;
  }

  //! encode(s, b) in a block where finite_block(b.absmax): the same code, shorter. With the sign
  //! fix: there 0 < absmax < inf, so s / absmax keeps the sign of s unless it is NaN (s NaN); the
  //! packed search keyed by the magnitude of xn and the sign of s, capped at the last negative
  //! code for negative s, returns the fixed code (for x >= +0 bnb's code is already >= the first
  //! non-negative code; for x <= -0 it is at most that code, which the fix moves down by one);
  //! a NaN magnitude reads the end entries: code 0 for negative s, 255 for positive s, as the fix
  //! turns bnb's code 0 of NaN. Without the sign fix (a non-negative table): max(xn, 0) gives
  //! negative xn and NaN the code of +0, which is theirs (code 0). Removes the NaN select, the
  //! sign fix's compares and selects and the absmax > 0 select (ptxas sm_90: about 33
  //! instructions per 8-bit encode -> 14). Proven equal to encode for all 2^32 states at
  //! several absmax by tests/optim/cuda_fused_codec_test.cpp.
  QMEM_HOST_DEVICE QMEM_INLINE std::uint8_t encode_finite(float s, block_scale b) const noexcept {
    if constexpr (finite_route)
      return static_cast<std::uint8_t>(encode_finite_high(s, b) >>
                                       codec<code>::packed_table::code_shift);
    else
      return encode(s, b);
  }

  //! Whether encode_block_high clamps the normalized value up to the packed table's floor with one
  //! fmaxf (a non-negative table without the sign fix whose floor takes the code of +0).
  static constexpr bool floor_route = [] {
    if constexpr (finite_route && !F::sign_fix) {
      constexpr auto t = codec<code>::make();
      return t.search.floor_takes_zero_code();
    } else {
      return false;
    }
  }();

  //! Whether encode_block_high has the route of a signed packed table without the sign fix (the
  //! 4-bit signed map): magnitude clamped up to the floor, sign mask from the state, NaN selected.
  static constexpr bool signed_floor_route = [] {
    if constexpr (codec<code>::method == encode_method::packed_bucket && !F::sign_fix &&
                  !detail::all_nonnegative<code>()) {
      constexpr auto t = codec<code>::make();
      return t.search.floor_takes_zero_code();
    } else {
      return false;
    }
  }();

  //! Whether the format's map is the linear one without zero, value[c] = (c + 1) / 16 exactly
  //! (the 4-bit recipe's second moment), nearest value with ties to the lower code: then the code
  //! of xn is clamp(ceil(16 xn - 1.5), 0, 15), which encode_block_high computes with one rounding
  //! upward (linear16_code) instead of the packed search.
  static constexpr bool linear16_route = [] {
    if constexpr (!detail::is_nearest4_v<code> || F::sign_fix) {
      return false;
    } else {
      for (std::size_t i = 0; i < 16; ++i)
        if (code::book.value.value[i] != static_cast<float>(i + 1) / 16.0f)
          return false;
      return detail::ranks_are_codes<code>();
    }
  }();

  //! Whether encode_block_high selects the code of a NaN state apart (signed_floor_route: a
  //! FSETP and a SEL per value), so that a caller that knows its states are not NaN may call
  //! encode_block_high<false> (the fused step, after the lane-wide AdamW update's range test).
  static constexpr bool nan_select = signed_floor_route && !linear16_route;

  //! Whether encode_block_high serves this format (in the blocks where block_route holds).
  static constexpr bool has_block_route = finite_route || signed_floor_route || linear16_route;

  //! The lowest bit of the code in encode_block_high's result (the code takes F::bits bits from
  //! there; the other bits are not specified): 24 for the 8-bit maps, 28 for the 4-bit packed
  //! search, 0 for linear16_route (the code is the low nibble of 2^23 + code's bits).
  static constexpr unsigned code_shift =
      linear16_route ? 0u : static_cast<unsigned>(codec<code>::packed_table::code_shift);
  //! The code in an encode_block_high result `w`.
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr std::uint8_t
  code_of_high(std::uint32_t w) noexcept {
    return static_cast<std::uint8_t>((w >> code_shift) & ((1u << F::bits) - 1u));
  }

  //! The bits of 2^23 + clamp(ceil(y - 1.5), 0, 15) for y = RN(16 s / absmax) (block_quotient_x16)
  //! of a block's state s: y clamped up to 1.5 by one fmaxf (NaN, negative states, zeros and
  //! y < 1.5 all take code 0, as the nearest search gives them), then y + (2^23 - 1.5) rounded
  //! upward: for y in [1.5, 16] the sum lies in [2^23, 2^23 + 14.5], where floats are the
  //! integers, so the rounding is the ceiling and the code is the low nibble (ptxas sm_90: FMNMX
  //! and FADD.RP after the quotient's three FFMA, in place of the packed search's key, table read,
  //! carry and extraction: about 7 instructions per value fewer). Ties: y - 1.5 an integer j means
  //! 16 xn = j + 1.5, the midpoint between values j + 1 and j + 2, which goes to the lower code j.
  QMEM_HOST_DEVICE QMEM_INLINE static std::uint32_t linear16_code(float y) noexcept {
    float const c = fmaxf(y, 1.5f);
#if defined(__CUDA_ARCH__)
    return __float_as_uint(__fadd_ru(c, 0x1.fffffap22f));
#else
    double const exact = static_cast<double>(c) + 0x1.fffffap22; // exact: both in [1.5, 2^23]
    float r = static_cast<float>(exact);
    if (static_cast<double>(r) < exact)
      r = std::nextafter(r, 0x1p30f);
    return std::bit_cast<std::uint32_t>(r);
#endif
  }

  //! Whether the blocks whose new absmax is `absmax` may encode with encode_block_high:
  //! block_route_min <= absmax <= block_route_max, where its fp32 quotient is exact (nearly every
  //! block; the others, zero blocks included, take encode with the double reciprocal). One test
  //! per block.
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr bool block_route(float absmax) noexcept {
    if constexpr (has_block_route)
      return absmax >= block_route_min && absmax <= block_route_max;
    else
      return false;
  }

  //! All ones for a state with the sign bit set (negative, -0, negative NaN), else zero.
  QMEM_HOST_DEVICE QMEM_INLINE static std::uint32_t sign_mask(float s) noexcept {
    return static_cast<std::uint32_t>(static_cast<std::int32_t>(qmem::detail::float_to_bits(s)) >>
                                      31);
  }
  //! encode(s, b)'s code in bits code_shift .. code_shift + F::bits - 1 of the result (code_of_high
  //! extracts it; the 8-bit maps: encode_finite_high(s, b)) for a state of the block whose absmax
  //! is b.absmax: preconditions
  //! block_route(b.absmax), b.reciprocal set (block_route_scale or scale_of), and |s| <= b.absmax
  //! or s is NaN, as for every state of a block (its absmax is the maximum of the magnitudes, NaN
  //! ignored). The quotient is block_quotient's (fp32). Then s / absmax <= 1, and without the sign
  //! fix max(xn, 2^-24) lies in [2^-24, 1] (NaN, negative xn, zeros and magnitudes below 2^-24
  //! all go to 2^-24, whose code is the code of +0, theirs): the packed search needs no clamp of
  //! its bucket key (ptxas sm_90: 3 instructions fewer per encode of v). Proven equal to encode
  //! for every such state at several absmax by tests/optim/cuda_fused_codec_test.cpp.
  //! `MayBeNaN` false: s is not NaN (precondition), which spares nan_select's select.
  template <bool MayBeNaN = true>
  QMEM_HOST_DEVICE QMEM_INLINE std::uint32_t encode_block_high(float s,
                                                               block_scale b) const noexcept {
    static_assert(has_block_route, "encode_block_high: no short route for this format");
    if constexpr (linear16_route) {
      return linear16_code(block_quotient_x16(s, b));
    } else if constexpr (floor_route) {
      using table = typename codec<code>::search_type;
      float const xn = block_quotient(s, b); // negative s (never a state here), NaN: see fmaxf
      float const x = fmaxf(xn, qmem::detail::bits_to_float(table::floor_bits));
      return c.search.code_high_bits_positive(qmem::detail::float_to_bits(x));
    } else if constexpr (signed_floor_route) {
      // |xn| = RN(|s| / absmax) <= 1 with the sign of s (0 < absmax < inf); magnitudes below
      // 2^-24, zeros and NaN go to 2^-24, whose code is that of a zero of the same sign; a NaN s
      // then takes code 0, as the code type's search gives NaN (ptxas sm_90: the normalize's
      // select of absmax > 0 and the key's two clamps go)
      using table = typename codec<code>::search_type;
      float const xa =
          fmaxf(block_quotient(fabsf(s), b), qmem::detail::bits_to_float(table::floor_bits));
      auto const mask = sign_mask(s);
      std::uint32_t const high =
          c.search.code_high_bits_signed(qmem::detail::float_to_bits(xa), mask);
      return MayBeNaN && s != s ? 0u : high;
    } else if constexpr (F::sign_fix) {
      // encode_finite_high's sign-fixed search on the fp32 quotient
      float const xa = block_quotient(fabsf(s), b);
      auto const mask = sign_mask(s);
      return c.search.code_high_bits(qmem::detail::float_to_bits(xa), mask); // capped: the fix
    } else {
      float const x = fmaxf(block_quotient(s, b), 0.0f);
      return c.search.code_high_bits(qmem::detail::float_to_bits(x) & 0x7fffffffu, 0u);
    }
  }

  //! encode_finite's code in bits 24-31 of the result (bits 0-23 are not specified; a 4-bit
  //! table's in bits 28-31), before the shift: the fused step gathers four codes into a word with
  //! three byte permutes (PRMT) instead of a shift, a mask and a merge per code. Precondition:
  //! finite_route.
  QMEM_HOST_DEVICE QMEM_INLINE std::uint32_t encode_finite_high(float s,
                                                                block_scale b) const noexcept {
    static_assert(finite_route, "encode_finite_high needs the packed 8-bit route");
    {
      if constexpr (F::sign_fix) {
        // |xn| = RN(|s| / absmax) (the sign comes from s; fabsf is an operand modifier)
        float const xa = static_cast<float>(static_cast<double>(fabsf(s)) * b.inverse);
        auto const mask = sign_mask(s);
        return c.search.code_high_bits(qmem::detail::float_to_bits(xa), mask); // capped: the fix
      } else {
        float const xn = static_cast<float>(static_cast<double>(s) * b.inverse);
        float const x = fmaxf(xn, 0.0f); // NaN and negative xn: +0 (either zero when xn = -0)
        return c.search.code_high_bits(qmem::detail::float_to_bits(x) & 0x7fffffffu, 0u);
      }
    }
  }

  //! encode(s, scale_of(absmax)).
  QMEM_HOST_DEVICE QMEM_INLINE std::uint8_t encode(float s, float absmax) const noexcept {
    return encode(s, scale_of(absmax));
  }
  //! Element-level decode of format F: table value times the block absmax.
  QMEM_HOST_DEVICE QMEM_INLINE float decode(std::uint8_t code, float absmax) const noexcept {
    return optim::detail::fmath::mul(c.decode(code), absmax);
  }
};

//! The fewest elements a lane of the fused kernel handles (a power of two >= 2): blocks smaller
//! than 32 x this are shared by fewer lanes, so the per-task work is spread over more elements.
//! Measured on an H200 at 2^28 parameters, 2026-11-29 15:38 UTC (docs/benchmarks.md): 8 against
//! 2 (4 per lane for blocks of 128) gave AdamW 4-bit 1.32 against 1.53 ms and Lion 4-bit 1.00
//! against 1.14 ms; the 8-bit and fp32 steps (8 per lane either way) within 1%. Overridable for
//! tuning runs.
#ifndef QMEM_OPTIM_FUSED_MIN_PER_LANE
#define QMEM_OPTIM_FUSED_MIN_PER_LANE 8
#endif
inline constexpr std::size_t fused_min_per_lane = QMEM_OPTIM_FUSED_MIN_PER_LANE;

//! What the kernels derive from a rule and a state policy: each state's format, the warp-task
//! size (the common block of the blockwise formats, 256 when there is none), and the codecs of
//! the two signs, copied into shared memory by each block.
template <update_rule Rule, state_policy Policy>
struct kernel_traits {
  static constexpr int state_count = Rule::state_count;
  template <int J>
  using format = typename Policy::template format<Rule::state_signs[static_cast<std::size_t>(J)]>;
  using signed_format = typename Policy::template format<state_sign::any>;
  using unsigned_format = typename Policy::template format<state_sign::non_negative>;

  //! Whether every state is fp32 (a rule without states counts as such).
  static constexpr bool fp32_states = [] {
    bool all = true;
    [&]<int... J>(std::integer_sequence<int, J...>) {
      ((all = all && std::is_same_v<format<J>, fp32_format>), ...);
    }
    (std::make_integer_sequence<int, state_count>{});
    return all;
  }();

  static constexpr std::size_t block = [] {
    std::size_t b = 0;
    bool same = true;
    [&]<int... J>(std::integer_sequence<int, J...>) {
      (
          [&] {
            if constexpr (format<J>::blockwise) {
              same = same && (b == 0 || b == format<J>::block_size);
              b = format<J>::block_size;
            }
          }(),
          ...);
    }
    (std::make_integer_sequence<int, state_count>{});
    return !same ? 0 : (b == 0 ? 256 : b);
  }();
  static_assert(block != 0, "the fused CUDA step needs every blockwise state of a rule to use the "
                            "same block size: choose a policy whose formats share one");
  static_assert(block == 16 || block == 32 || block == 64 || block == 128 || block == 256 ||
                    block == 512 || block == 1024,
                "the fused CUDA step gives each block a power-of-two group of lanes of a warp: "
                "the block size must be a power of two from 16 to 1024");
  //! Elements per lane: block/32, at least fused_min_per_lane (and at most half a block, at
  //! least 2, so that 4-bit codes fill whole bytes). For fp32 states (no block) 8: 16 or 32
  //! per lane (tasks of 512 or 1024 elements) were far slower on the AdamW 32-bit step, H200,
  //! 2^28 parameters, 2026-11-30 22:10 UTC, three interleaved rounds, ms, median: 8 per lane
  //! 1.8928, 16 (128 registers, 2 blocks per SM) 2.5364 (+34%), 32 (248 registers, 1 block)
  //! 3.6316 (+92%) (docs/benchmarks.md, "opt7"; not profiled: a lane's 16-byte loads then
  //! reach each 128-byte line's sectors over four or eight instructions instead of two).
  static constexpr int per_lane = static_cast<int>(
      block / 32 >= fused_min_per_lane ? block / 32
                                       : std::min<std::size_t>(fused_min_per_lane, block / 2));
  //! Lanes that share one absmax block (the block max is reduced over them).
  static constexpr int lanes_per_block = static_cast<int>(block) / per_lane;
  //! Elements per warp task.
  static constexpr std::size_t task_elements = std::size_t{32} * per_lane;

  //! Whether the signed and the non-negative states share one format (and so one codec).
  static constexpr bool one_codec = std::is_same_v<signed_format, unsigned_format>;

  //! The codecs of the signed and the non-negative states' formats (one when they share a
  //! format), as each block of the fused kernel holds them in shared memory. Too large for kernel
  //! parameters (the packed 8-bit search tables take 37 KB for AdamW), so fused_step.cuh keeps a
  //! compile-time image in device memory that each block copies, 16 bytes per thread and read.
  struct alignas(16) shared_tables {
    format_codec<signed_format> signed_codec;
    std::conditional_t<one_codec, format_codec<void, false>, format_codec<unsigned_format>>
        unsigned_codec;
    static constexpr shared_tables make() noexcept {
      shared_tables t{};
      t.signed_codec = format_codec<signed_format>::make();
      if constexpr (!one_codec)
        t.unsigned_codec = format_codec<unsigned_format>::make();
      return t;
    }
    //! The codec of the states of sign `Sign`.
    template <state_sign Sign>
    QMEM_HOST_DEVICE QMEM_INLINE auto const& codec_for() const noexcept {
      if constexpr (Sign == state_sign::any || one_codec)
        return signed_codec;
      else
        return unsigned_codec;
    }
  };
  static_assert(sizeof(shared_tables) <= 48 * 1024,
                "the fused kernel's tables must fit in 48 KB of static shared memory");

  //! What the fused kernel takes as a parameter besides the shared tables: nothing (a placeholder
  //! kept so that launches written when the tables travelled as a parameter still compile).
  struct tables {
    std::uint32_t unused;
    static constexpr tables make() noexcept { return {0}; }
  };
};

} // namespace qmem::optim::cuda
