#pragma once
//! \file
//! A one-lookup form of a code type's nearest-rounding `encode`, for the GPU quantizers.
//!
//! Why: bitsandbytes' 8-bit search (`bnb_search256`, codes.hpp) reads the code table 8 times per
//! element, and on the GPU those reads hit random shared-memory banks; NF4/FP4 compare against
//! 15 / 7 thresholds (~30 instructions per element, more than the memory time allows at 2^28
//! elements on an H200). But each of these encoders is a step function of x whose steps are
//! intervals: measured over every float (an exhaustive scan of all 2^32 bit patterns,
//! 2026-11-29), the dynamic maps' code is monotone in x with unit steps (255 transitions), and
//! NaN gives one fixed code. Such a function can be tabulated exactly:
//!
//! - |x| is cut into buckets by its exponent and its top 7 mantissa bits, over the binades
//!   [2^min_exponent, 1); magnitudes outside are clamped into the end buckets (the code must be
//!   constant there: checked when the table is built);
//! - each bucket holds at most one transition (checked when the table is built): a 32-bit entry
//!   with the low 16 mantissa bits of the last magnitude before it (bits 16..31, 0xffff when
//!   there is none), the code above it (bits 8..15) and the code below it (bits 0..7): in this
//!   order one byte permute puts the magnitude's low bits above the codes, and one unsigned
//!   comparison with the entry decides (bucket_lookup_normal);
//! - one more bucket per sign covers [1, 1 + 2^-7): xn = x * (1 / absmax) can round to 1 + 2^-23,
//!   so the fast lookup of blocks with an absmax in [2^-126, 2^126) needs no upper clamp;
//! - one half of the table is for x >= 0, one for x < 0; NaN gets `nan_code`; where -0.0 encodes
//!   unlike the tiny negatives (FP4: its sign rule tests x < 0), the layout says so and -0.0 gets
//!   `negative_zero_code`.
//!
//! The table is built on the host from the code type's own `encode` (it reproduces it by
//! construction, transition by transition). The CUDA tests compare the lookup with C::encode over
//! all 2^32 floats on the GPU.

#include <qmem/core/config.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/quant/codes.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

namespace qmem::quant::cuda_impl {

//! Layout of a bucket table: binades [2^MinExponent, 1), 128 buckets per binade (7 mantissa
//! bits, so that the 16 low bits of a threshold fit an entry), one half per sign;
//! `NegativeZero`: -0.0 has a code of its own.
template <int MinExponent, bool NegativeZero = false>
struct bucket_layout {
  static constexpr int min_exponent = MinExponent;
  static constexpr bool negative_zero = NegativeZero;
  static constexpr int low_bits = 16;
  static constexpr std::uint32_t low_mask = 0xffffu;
  static constexpr std::uint32_t lowest = static_cast<std::uint32_t>(127 + MinExponent) << 23;
  static constexpr std::uint32_t highest = (127u << 23) - 1u; // the float below 1.0
  //! Buckets per sign: 128 per binade, plus the one of [1, 1 + 2^-7).
  static constexpr std::size_t per_sign = (static_cast<std::size_t>(-MinExponent) << 7) + 1;
  //! 2^MinExponent: magnitudes below encode like it (checked when the table is built).
  static constexpr float lowest_value = [] {
    float v = 1.0f;
    for (int i = 0; i < -MinExponent; ++i)
      v *= 0.5f;
    return v;
  }();
  static constexpr std::size_t entries = 2 * per_sign;
  static_assert(MinExponent < 0 && MinExponent > -126);
};

//! The table: trivially copyable, passed to kernels by value (entries * 4 bytes, within the
//! 32 KiB kernel-parameter limit of CUDA 12.1+ on sm_70 and newer).
template <class Layout>
struct bucket_table {
  using layout = Layout;
  std::uint32_t entry[Layout::entries];
  std::uint8_t nan_code;
  std::uint8_t negative_zero_code;
};

//! The code of x from a table (host or device; `entry` may point to shared memory).
template <class Layout>
QMEM_HOST_DEVICE QMEM_INLINE std::uint8_t
bucket_lookup(float x, std::uint32_t const* entry, std::uint8_t nan_code,
              std::uint8_t negative_zero_code = 0) noexcept {
  std::uint32_t const u = qmem::detail::float_to_bits(x);
  std::uint32_t const mag = u & 0x7fffffffu;
  std::uint32_t m = mag < Layout::lowest ? Layout::lowest : mag;
  m = m > Layout::highest ? Layout::highest : m;
  std::uint32_t const idx = ((m - Layout::lowest) >> Layout::low_bits) +
                            (u >> 31) * static_cast<std::uint32_t>(Layout::per_sign);
  std::uint32_t const e = entry[idx];
  std::uint32_t code = (m & Layout::low_mask) > (e >> 16) ? (e >> 8) & 0xffu : e & 0xffu;
  if constexpr (Layout::negative_zero)
    code = u == 0x80000000u ? negative_zero_code : code;
  return mag > 0x7f800000u ? nan_code : static_cast<std::uint8_t>(code);
}

//! The code of xn when xn is finite and |xn| <= 1 + 2^-23 (blocks with an absmax in
//! [2^-126, 2^126), whose reciprocal is a normal float),
//! for layouts without a -0.0 code of their own: no NaN test, no upper clamp. The result's low 8
//! bits are the code; bits 8 and up may hold other bits of the entry (callers keep the low byte).
//! About 10 instructions: FMNMX (|xn| clamped below), two shifts and an IMAD for the index, the
//! load, a byte permute (the magnitude's low 16 bits above the entry's codes, so that one
//! unsigned comparison with the entry compares the magnitude with the threshold), ISETP and a
//! predicated shift.
template <class Layout>
QMEM_HOST_DEVICE QMEM_INLINE std::uint32_t
bucket_lookup_normal(float xn, std::uint32_t const* entry) noexcept {
  static_assert(!Layout::negative_zero, "bucket_lookup_normal: -0.0 needs bucket_lookup");
  std::uint32_t const u = qmem::detail::float_to_bits(xn);
#if defined(__CUDA_ARCH__)
  float const a = fmaxf(fabsf(xn), Layout::lowest_value);
#else
  float const a = std::fmax(std::fabs(xn), Layout::lowest_value);
#endif
  std::uint32_t const m = qmem::detail::float_to_bits(a);
  std::uint32_t const idx = ((m - Layout::lowest) >> Layout::low_bits) +
                            (u >> 31) * static_cast<std::uint32_t>(Layout::per_sign);
  std::uint32_t const e = entry[idx];
#if defined(__CUDA_ARCH__)
  std::uint32_t const key = __byte_perm(e, m, 0x5410);
#else
  std::uint32_t const key = (m << 16) | (e & 0xffffu);
#endif
  std::uint32_t code = e;
  if (key > e)
    code >>= 8;
  return code;
}

//! Builds the table of code type C; throws std::logic_error when the layout cannot represent
//! C::encode exactly (two transitions in a bucket, a transition outside the binades, NaNs that
//! encode differently).
template <class C, class Layout>
bucket_table<Layout> build_bucket_table() {
  auto code_at = [](std::uint32_t bits) -> std::uint32_t {
    return C::encode(qmem::detail::bits_to_float(bits), C::book);
  };
  bucket_table<Layout> t{};
  t.nan_code = static_cast<std::uint8_t>(code_at(0x7fc00000u));
  if (code_at(0xffc00000u) != t.nan_code || code_at(0x7f800001u) != t.nan_code)
    throw std::logic_error("bucket_search: NaNs encode differently");
  t.negative_zero_code = static_cast<std::uint8_t>(code_at(0x80000000u));
  if (!Layout::negative_zero && t.negative_zero_code != code_at(0x80000001u))
    throw std::logic_error("bucket_search: -0.0 encodes unlike the tiny negatives");
  for (std::uint32_t sign = 0; sign < 2; ++sign) {
    std::uint32_t const s = sign << 31;
    if (code_at(s | 1u) != code_at(s | Layout::lowest) || code_at(0u) != code_at(1u) ||
        code_at(s | Layout::highest) != code_at(s | 0x7f800000u))
      throw std::logic_error("bucket_search: a transition lies outside the table's binades");
    for (std::size_t b = 0; b < Layout::per_sign; ++b) {
      std::uint32_t const first =
          Layout::lowest + (static_cast<std::uint32_t>(b) << Layout::low_bits);
      std::uint32_t const last = first + Layout::low_mask;
      std::uint32_t const below = code_at(s | first);
      std::uint32_t const above = code_at(s | last);
      std::uint32_t threshold = Layout::low_mask; // no transition
      if (above != below) {
        // the last magnitude with the code `below`, in [first, last)
        std::uint32_t lo = first;
        std::uint32_t hi = last;
        while (hi - lo > 1) {
          std::uint32_t const mid = lo + (hi - lo) / 2;
          if (code_at(s | mid) == below)
            lo = mid;
          else
            hi = mid;
        }
        if (code_at(s | hi) != above)
          throw std::logic_error("bucket_search: two transitions in one bucket");
        threshold = lo & Layout::low_mask;
      }
      t.entry[sign * Layout::per_sign + b] = (threshold << 16) | (above << 8) | below;
    }
  }
  return t;
}

//! Which code types get a bucket table, and its layout (none: void). The lowest binade holds the
//! smallest transition magnitude: dynamic signed 2.75e-7, unsigned 1.63e-7, NF4 0.0398, FP4
//! 0.0026 (measured); 7 mantissa bits keep one transition per bucket in the densest binade
//! [0.5, 1), where the unsigned map's codes are 0.007 apart.
template <class C>
struct bucket_layout_of {
  using type = void;
};
template <>
struct bucket_layout_of<dynamic_signed> {
  using type = bucket_layout<-22>;
};
template <>
struct bucket_layout_of<dynamic_unsigned> {
  using type = bucket_layout<-23>;
};
template <>
struct bucket_layout_of<nf4> {
  using type = bucket_layout<-5>;
};
template <>
struct bucket_layout_of<fp4> {
  using type = bucket_layout<-9, true>;
};

//! The table of C, built once per process (thread-safe).
template <class C>
requires(!std::is_void_v<typename bucket_layout_of<C>::type>)
    bucket_table<typename bucket_layout_of<C>::type>
const& bucket_table_of() {
  static auto const table = build_bucket_table<C, typename bucket_layout_of<C>::type>();
  return table;
}

} // namespace qmem::quant::cuda_impl
