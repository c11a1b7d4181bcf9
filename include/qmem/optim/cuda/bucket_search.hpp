#pragma once
//! \file
//! A constant-time replacement for bitsandbytes' 8-bit binary search (`bnb_search256`), proven to
//! return the same code for every float.
//!
//! Why: the fused optimizer kernels requantize two states per element. bnb's search is eight
//! dependent table reads per value; from shared memory, with 32 lanes reading scattered entries,
//! that alone costs more than the memory traffic of the whole 8-bit step on an H200. This search
//! is one byte read from a small table, one threshold read and one comparison.
//!
//! How: bnb's search returns the nearest code, and at an exact midpoint between two codes the side
//! its search path happened to land on. So the code of x is the number of thresholds T[c] (the
//! smallest float that maps to c + 1 or above, c = 0..254) with x >= T[c]. The thresholds are
//! found once, at compile time, by running bnb_search256 itself on each midpoint. A monotone key
//! of the float's bits (sign, exponent, the top `mantissa_bits` of the mantissa) splits the line
//! into buckets holding at most one threshold each (checked at compile time: the build fails if
//! the chosen resolution is too coarse for a table); `base[key]` counts the thresholds in lower
//! buckets, and one comparison with T[base[key]] settles the bucket's own.
//!
//! Proof of equality: at compile time for both neighbours of every threshold, and on the GPU over
//! all 2^32 bit patterns (tests/optim/cuda_optim_test.cpp; packed_bucket_table, the one-read form
//! the fused step uses: tests/optim/cuda_fused_codec_test.cpp).

#include <qmem/core/config.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/quant/codes.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>

namespace qmem::optim::cuda_search {

//! The search tables of one 256-entry code table. `MantissaBits` mantissa bits per bucket, values
//! with |x| < 2^-`TinyExponent` share one bucket per sign. Trivially copyable (about 7 KB with the
//! defaults): kernels copy it into shared memory.
template <int MantissaBits = 7, int TinyExponent = 24>
struct bucket_table {
  static constexpr int mantissa_bits = MantissaBits;
  static constexpr int tiny_exponent = TinyExponent;
  //! Magnitude buckets per sign: one tiny bucket, TinyExponent binades, one for |x| >= 1.
  static constexpr std::uint32_t magnitudes = (std::uint32_t{TinyExponent} << MantissaBits) + 2u;
  static constexpr std::uint32_t keys = 2u * magnitudes;

  float threshold[256];    //!< x >= threshold[c] <=> code(x) > c; threshold[255] is NaN
  std::uint8_t base[keys]; //!< number of thresholds in buckets below this key

  //! The bucket of `x` (not NaN): monotone non-decreasing in x; -0.0 and +0.0 are neighbours.
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr std::uint32_t key(float x) noexcept {
    return key_of_bits(qmem::detail::float_to_bits(x));
  }
  //! key() of the float whose bits are `u`.
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr std::uint32_t
  key_of_bits(std::uint32_t u) noexcept {
    std::uint32_t const q = (u & 0x7fffffffu) >> (23 - MantissaBits);
    constexpr std::uint32_t lo = std::uint32_t{127 - TinyExponent} << MantissaBits;
    constexpr std::uint32_t hi = std::uint32_t{127} << MantissaBits;
    std::uint32_t const mag = q < lo ? 0u : (q >= hi ? magnitudes - 1u : q - lo + 1u);
    return (u >> 31) != 0 ? magnitudes - 1u - mag : magnitudes + mag;
  }

  //! The code bnb_search256 returns for `x` over the table this was built from.
  QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint8_t encode(float x) const noexcept {
    if (x != x) // NaN: bnb's search compares false all the way down to code 0
      return 0;
    std::uint32_t const b = base[key(x)];
    return static_cast<std::uint8_t>(b + (x >= threshold[b] ? 1u : 0u));
  }
};

namespace detail {

constexpr float next_up(float x) noexcept {
  auto u = std::bit_cast<std::uint32_t>(x);
  if ((u & 0x7fffffffu) == 0)
    return std::bit_cast<float>(0x00000001u);
  return std::bit_cast<float>((u >> 31) != 0 ? u - 1 : u + 1);
}
constexpr float next_down(float x) noexcept {
  auto u = std::bit_cast<std::uint32_t>(x);
  if ((u & 0x7fffffffu) == 0)
    return std::bit_cast<float>(0x80000001u);
  return std::bit_cast<float>((u >> 31) != 0 ? u + 1 : u - 1);
}

//! Throwing in a constant expression makes the build fail with this function in the message.
inline void bucket_table_resolution_too_coarse_or_table_not_sorted() {}

} // namespace detail

//! Builds the search tables of the code whose value at x is the number of `count` (< 256)
//! ascending thresholds <= x (NaN: 0). Evaluated at compile time; thresholds two-to-a-bucket or
//! out of order stop the build.
template <int MantissaBits = 7, int TinyExponent = 24>
constexpr bucket_table<MantissaBits, TinyExponent>
make_bucket_table_of_thresholds(float const* thresholds, int count) {
  using table = bucket_table<MantissaBits, TinyExponent>;
  table t{};
  for (int c = 0; c < 256; ++c) // the NaN thresholds compare false: never a code above count
    t.threshold[c] = c < count ? thresholds[c] : std::bit_cast<float>(0x7fc00000u);
  std::uint32_t previous_key = 0;
  for (int c = 0; c < count; ++c) {
    std::uint32_t const k = table::key_of_bits(std::bit_cast<std::uint32_t>(t.threshold[c]));
    if (c > 0 && (k <= previous_key || !(t.threshold[c - 1] < t.threshold[c])))
      detail::bucket_table_resolution_too_coarse_or_table_not_sorted(); // two in one bucket
    previous_key = k;
  }
  int c = 0;
  for (std::uint32_t k = 0; k < table::keys; ++k) {
    while (c < count && table::key_of_bits(std::bit_cast<std::uint32_t>(t.threshold[c])) < k)
      ++c;
    t.base[k] = static_cast<std::uint8_t>(c);
  }
  return t;
}

//! Builds the search tables of `code` (256 ascending values, as the 8-bit maps): its 255
//! thresholds are found by running bnb_search256 on each midpoint. Evaluated at compile time; a
//! table whose thresholds two-to-a-bucket, or whose search is not monotone, stops the build.
template <int MantissaBits = 7, int TinyExponent = 24>
constexpr bucket_table<MantissaBits, TinyExponent> make_bucket_table(float const* code) {
  float thresholds[255] = {};
  for (int c = 0; c < 255; ++c) {
    float const mid = (code[c] + code[c + 1]) * 0.5f;
    std::uint8_t const at_mid = quant::detail::bnb_search256(mid, code);
    float const th = at_mid == c + 1 ? mid : detail::next_up(mid);
    // the threshold is exact: the float below maps to c, the threshold itself to c + 1
    if (quant::detail::bnb_search256(th, code) != c + 1 ||
        quant::detail::bnb_search256(detail::next_down(th), code) != c)
      detail::bucket_table_resolution_too_coarse_or_table_not_sorted();
    thresholds[c] = th;
  }
  return make_bucket_table_of_thresholds<MantissaBits, TinyExponent>(thresholds, 255);
}

//! The table for a bnb-searched 8-bit code type (dynamic or linear map).
template <class Code>
inline constexpr auto bucket_table_of = make_bucket_table(Code::book.value.value);

//! bucket_table's search in ONE table read: `entry[key]` holds the bucket's base code in bits
//! CodeShift-31 plus 2^CodeShift - (the low (23 - MantissaBits) bits of the bucket's own
//! threshold), or plus 2^CodeShift - `never` when the bucket holds none. Inside a regular bucket
//! every float shares the sign, the exponent and the top mantissa bits with its threshold, so
//! `x >= threshold` is a compare of the low bits (reflected for negative floats), and adding x's
//! low bits to the entry carries into the code bits exactly when x reaches the threshold: the code
//! is (entry + low) >> CodeShift. 4 bytes per key (about 24 KB; 12 KB with `PositiveOnly`).
//! CodeShift is 24 for 8-bit codes and 28 for 4-bit ones (the fused step packs a 4-bit code from
//! the top nibble with one funnel shift).
//!
//! Why: the fused optimizer step encodes two states per element; bucket_table needs two dependent
//! shared-memory reads (base, then threshold), each a ~3.5-way bank conflict on near-random codes.
//! One read halves the conflicts and the latency of the encode; the carry replaces a mask, a
//! compare, a shift and a select (ptxas sm_90: 5 instructions per encode -> 1).
//!
//! Valid for a table when every threshold lies in a regular bucket (not the tiny |x| <
//! 2^-TinyExponent nor the |x| >= 1 bucket) and, with `PositiveOnly`, every threshold is positive
//! (negative inputs then all take code 0 and share one entry): `packable` checks both at compile
//! time. bnb's dynamic maps qualify; the signed linear map does not (a threshold at -2^-29) and
//! keeps bucket_table.
//!
//! With `PositiveOnly`, each positive bucket's entry also has the bucket's high bits (the bits of
//! its floats above the low bits, the same for all of them) subtracted, so that the code is
//! (entry + a) >> CodeShift for a float's bits `a`, without masking its low bits (ptxas sm_90: one
//! LOP3 per encode fewer in the fused step's v encode). The general search then clamps `a` to
//! [2^-TinyExponent, 1] (NaN to 1) and sends negative floats to 2^-TinyExponent, whose code is
//! the code of +0 (make checks it), rather than clamping the bucket.
template <int MantissaBits = 7, int TinyExponent = 24, bool PositiveOnly = false,
          int CodeShift = 24>
struct packed_bucket_table {
  using source = bucket_table<MantissaBits, TinyExponent>;
  //! The lowest bit of the code in code_high_bits' result.
  static constexpr int code_shift = CodeShift;
  static_assert(CodeShift == 24 || CodeShift == 28, "8-bit codes at bit 24, 4-bit codes at bit 28");
  static constexpr std::uint32_t low_mask = (std::uint32_t{1} << (23 - MantissaBits)) - 1u;
  //! The limit of a bucket without a threshold: above every low-bits value.
  static constexpr std::uint32_t never = low_mask + 1u;
  static_assert(never < (std::uint32_t{1} << 24), "the low bits must add below the code bits");
  //! Keys below this one are not stored (PositiveOnly: every negative float uses this key's entry).
  static constexpr std::uint32_t first_key = PositiveOnly ? source::magnitudes - 1u : 0u;
  static constexpr std::uint32_t entries = source::keys - first_key;

  std::uint32_t entry[entries];

  //! The low bits of float bits `u`, reflected for negative floats so that, inside one bucket,
  //! a larger value has larger low bits.
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr std::uint32_t
  low_of_bits(std::uint32_t u) noexcept {
    return (u ^ static_cast<std::uint32_t>(static_cast<std::int32_t>(u) >> 31)) & low_mask;
  }

  //! The entry of key `k` of the bucket table `t` of `count` thresholds.
  static constexpr std::uint32_t make_entry(source const& t, std::uint32_t k, int count) noexcept {
    std::uint32_t const b = t.base[k];
    std::uint32_t limit = never;
    if (static_cast<int>(b) < count) {
      std::uint32_t const tb = std::bit_cast<std::uint32_t>(t.threshold[b]);
      if (source::key_of_bits(tb) == k)
        limit = low_of_bits(tb);
    }
    std::uint32_t high = 0; // PositiveOnly: the bucket's high bits, for a positive regular bucket
    if (PositiveOnly && k > source::magnitudes)
      high = (k - source::magnitudes - 1u + (std::uint32_t{127 - TinyExponent} << MantissaBits))
             << (23 - MantissaBits);
    return (b << CodeShift) + ((std::uint32_t{1} << CodeShift) - limit) - high; // limit 0: b + 1
  }

  //! The bits of 1.0f, the smallest magnitude of the top bucket (PositiveOnly's clamp).
  static constexpr std::uint32_t one_bits = 0x3f800000u;

  //! The entry index of a float of sign `negative_mask` (0: positive, ~0: negative) whose
  //! magnitude has the bits `a` (a non-negative float or any NaN): source::key_of_bits minus
  //! first_key. The magnitude bucket is clamped with integer min/max (a NaN, sign bit or not, to
  //! the top bucket) and mirrored for negative floats with an xor (key = magnitudes + (mag ^ mask)).
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr std::uint32_t
  index_of(std::uint32_t a, std::uint32_t negative_mask) noexcept {
    constexpr int lo = (127 - TinyExponent) << MantissaBits;
    constexpr int top = static_cast<int>(source::magnitudes) - 1;
    int mag = static_cast<int>(a >> (23 - MantissaBits)) - lo + 1;
    mag = mag < 0 ? 0 : mag;
    mag = mag > top ? top : mag;
    if constexpr (PositiveOnly) // every negative float reads entry 0 (key first_key)
      return (static_cast<std::uint32_t>(mag) | negative_mask) + 1u;
    else
      return source::magnitudes + (static_cast<std::uint32_t>(mag) ^ negative_mask);
  }

  //! The code of a float of sign `negative_mask` (0 or ~0) whose magnitude has the bits `a` (see
  //! index_of), in bits CodeShift-31 (the bits below are not zero): one table read. A NaN
  //! magnitude reads the entry of the largest magnitudes (code 255 positive, 0 negative).
  QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint32_t
  code_high_bits(std::uint32_t a, std::uint32_t negative_mask) const noexcept {
    if constexpr (PositiveOnly) {
      constexpr std::uint32_t floor = std::uint32_t{127 - TinyExponent} << 23; // floor_bits
      std::uint32_t c = a < floor ? floor : a;
      c = c > one_bits ? one_bits : c;
      c = negative_mask != 0 ? floor : c;
      return entry[(c >> (23 - MantissaBits)) + 2u -
                   (std::uint32_t{127 - TinyExponent} << MantissaBits)] +
             c;
    } else {
      return entry[index_of(a, negative_mask)] + ((a ^ negative_mask) & low_mask);
    }
  }

  //! The bits of 2^-TinyExponent, the smallest magnitude of the regular buckets.
  static constexpr std::uint32_t floor_bits = std::uint32_t{127 - TinyExponent} << 23;

  //! code_high_bits(a, 0) without the clamps, for the bits `a` of a float in [2^-TinyExponent, 1]
  //! (precondition): the entry index is the bucket key plus a constant. Callers clamp up to
  //! 2^-TinyExponent with one fmaxf where that float takes the code of +0 (floor_takes_zero_code),
  //! which also sends NaN, negative floats and -0 there (ptxas sm_90: a max and a shift-add
  //! instead of a mask, a shift-add and two integer clamps).
  QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint32_t
  code_high_bits_positive(std::uint32_t a) const noexcept {
    static_assert(PositiveOnly, "a signed table: code_high_bits_signed");
    constexpr std::uint32_t offset = 2u - (std::uint32_t{127 - TinyExponent} << MantissaBits);
    return entry[(a >> (23 - MantissaBits)) + offset] + a; // the entry holds -(high bits)
  }

  //! code_high_bits(a, negative_mask) without the clamps, for the bits `a` of a magnitude in
  //! [2^-TinyExponent, 1] (precondition) and a sign mask of 0 or ~0 (a signed table).
  QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint32_t
  code_high_bits_signed(std::uint32_t a, std::uint32_t negative_mask) const noexcept {
    static_assert(!PositiveOnly, "a table of non-negative floats: code_high_bits_positive");
    constexpr std::uint32_t offset = 1u - (std::uint32_t{127 - TinyExponent} << MantissaBits);
    return entry[source::magnitudes + (((a >> (23 - MantissaBits)) + offset) ^ negative_mask)] +
           ((a ^ negative_mask) & low_mask);
  }

  //! Whether +-2^-TinyExponent have the codes of +-0 in this table (no threshold at them; for a
  //! table of non-negative floats, the positive side only).
  constexpr bool floor_takes_zero_code() const noexcept {
    bool const positive =
        (code_high_bits(floor_bits, 0u) >> CodeShift) == (code_high_bits(0u, 0u) >> CodeShift);
    bool const negative = PositiveOnly || (code_high_bits(floor_bits, ~0u) >> CodeShift) ==
                                              (code_high_bits(0u, ~0u) >> CodeShift);
    return positive && negative;
  }

  //! Whether the packed search of `t` (of `count` thresholds) equals its search for every float
  //! (see the struct comment).
  static constexpr bool packable(source const& t, int count = 255) noexcept {
    if (count >= (1 << (32 - CodeShift))) // a carry out of the code bits
      return false;
    for (int c = 0; c < count; ++c) {
      std::uint32_t const tb = std::bit_cast<std::uint32_t>(t.threshold[c]);
      std::uint32_t const k = source::key_of_bits(tb);
      bool const regular = k != 0 && k != source::magnitudes - 1u && k != source::magnitudes &&
                           k != source::keys - 1u;
      if (!regular || (PositiveOnly && (tb >> 31) != 0))
        return false;
    }
    return true;
  }

  //! The packed form of `t` (of `count` thresholds). Precondition: packable(t, count).
  static constexpr packed_bucket_table make(source const& t, int count = 255) noexcept {
    if constexpr (PositiveOnly) { // the general search sends the tiny bucket to 2^-TinyExponent
      auto code_of = [&t](std::uint32_t u) { // t.encode, on the bits (constexpr on the device)
        std::uint32_t const b = t.base[source::key_of_bits(u)];
        return b + (std::bit_cast<float>(u) >= t.threshold[b] ? 1u : 0u);
      };
      if (code_of(floor_bits) != code_of(0u))
        detail::bucket_table_resolution_too_coarse_or_table_not_sorted();
    }
    packed_bucket_table p{};
    for (std::uint32_t k = first_key; k < source::keys; ++k)
      p.entry[k - first_key] = make_entry(t, k, count);
    return p;
  }

  //! The code bnb_search256 returns for `x` (the number of thresholds <= x): one table read.
  QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint8_t encode(float x) const noexcept {
    std::uint32_t const u = qmem::detail::float_to_bits(x);
    auto const negative_mask = static_cast<std::uint32_t>(static_cast<std::int32_t>(u) >> 31);
    std::uint32_t const code = code_high_bits(u & 0x7fffffffu, negative_mask) >> CodeShift;
    return x != x ? std::uint8_t{0} : static_cast<std::uint8_t>(code); // NaN: code 0, as bnb
  }
};

} // namespace qmem::optim::cuda_search
