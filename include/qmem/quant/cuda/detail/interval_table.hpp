#pragma once
//! \file
//! A two-instruction form of the 4-bit encoders (NF4, FP4) for normalized values, used by the GPU
//! quantizers on blocks whose absmax is in [2^-126, 2^126) (then 1 / absmax is a normal float,
//! every xn = x * (1 / absmax) is finite and |xn| <= 1 + 2^-23).
//!
//! Why: `nf4::encode` compares xn with 15 thresholds (bitsandbytes' decision tree), and the
//! exponent-bucket table of detail/bucket_search.hpp needs a clamp, a sign split, a NaN test and
//! 16-bit field extraction: 15-20 instructions per element, which made the H200 NF4 quantizer
//! issue-bound (0.46 ms for 2^28 elements, 2026-11-29). Here a value's bucket is
//! k = round(xn * Scale) or floor(xn * Scale), computed
//! by one FFMA (rounding to nearest or down) with the constant 1.5 * 2^23 (whose low mantissa bits
//! then hold k), so the shared-memory address is one IMAD of the FFMA's bits. Every bucket is an
//! interval of floats holding at most one code transition (NF4's thresholds are >= 0.08 apart,
//! FP4's >= 0.083 apart, wider than a bucket at Scale 16), so the entry {T, below | above << 8}
//! gives the code exactly: `v > T ? above : below`, one FSETP and one predicated shift.
//!
//! The table is built on the host from the code type's own `encode` (transition by transition,
//! found by bisection over the ordered floats of each bucket), so it reproduces C::encode by
//! construction; the CUDA tests compare it with C::encode over every float of the domain.

#include <qmem/core/config.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/quant/codes.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <type_traits>

namespace qmem::quant::cuda_impl {

//! How an interval table finds a value's bucket k: `nearest`, k = round(v * Scale) (ties to
//! even): buckets centred on the multiples of 1 / Scale; `down`, k = floor(v * Scale): buckets
//! [k / Scale, (k + 1) / Scale), so that every negative value (-0.0 excepted: floor(-0.0) is 0)
//! lies in a bucket apart from +-0.0 and the positive values.
enum class interval_rounding { nearest, down };

//! Layout of an interval table: buckets k of xn in [-(1 + 2^-23), 1 + 2^-23] by `Rounding`.
//! (A sign-magnitude layout, |xn| in buckets rounded to nearest and the sign's code or'ed in, was
//! FP4's until 2026-11-30 and was removed with it: 64 more instructions per 32 values, see FP4's
//! layout below.)
template <int Scale, interval_rounding Rounding = interval_rounding::nearest>
struct interval_layout {
  static constexpr int scale = Scale;
  static constexpr interval_rounding rounding = Rounding;
  //! Most negative bucket: -(Scale + 1) leaves a margin past round(-(1 + 2^-23) * Scale) and is
  //! floor(-(1 + 2^-23) * Scale).
  static constexpr int first = -(Scale + 1);
  static constexpr int last = Scale + 1;
  static constexpr std::size_t entries = static_cast<std::size_t>(last - first + 1);
  //! 1.5 * 2^23: fma(v, Scale, magic) has the bits magic_bits + k for |v * Scale| < 2^22, k the
  //! FFMA's one rounding of v * Scale to an integer (to nearest even, or down).
  static constexpr float magic = 12582912.0f;
  static constexpr std::uint32_t magic_bits = 0x4b400000u;
  static_assert(Scale > 0 && Scale <= (1 << 20) && (Scale & (Scale - 1)) == 0,
                "interval_layout: Scale must be a power of two (v * Scale is then exact)");
};

//! One bucket: the codes below and above the transition (bits 0-7, 8-15) and the last value with
//! the code below (+inf when the bucket has one code).
struct interval_entry {
  float threshold;
  std::uint32_t codes;
};

//! The table: trivially copyable, passed to kernels by value (entries * 8 bytes).
template <class Layout>
struct interval_table {
  using layout = Layout;
  interval_entry entry[Layout::entries];
};

//! The bucket index of v in [0, entries): k - first, k = round(v * Scale) or floor(v * Scale).
template <class Layout>
QMEM_HOST_DEVICE QMEM_INLINE std::uint32_t interval_bucket(float v) noexcept {
  constexpr bool down = Layout::rounding == interval_rounding::down;
#if defined(__CUDA_ARCH__)
  float const y = down ? __fmaf_rd(v, static_cast<float>(Layout::scale), Layout::magic)
                       : __fmaf_rn(v, static_cast<float>(Layout::scale), Layout::magic);
#else
  // v * Scale is exact (Scale a power of two), and so is floor(v * Scale) + magic: the device's
  // fma rounded down, without changing the host's rounding mode
  float const y = down ? std::floor(v * static_cast<float>(Layout::scale)) + Layout::magic
                       : std::fma(v, static_cast<float>(Layout::scale), Layout::magic);
#endif
  return qmem::detail::float_to_bits(y) -
         (Layout::magic_bits + static_cast<std::uint32_t>(Layout::first));
}

//! The code of xn (finite, |xn| <= 1 + 2^-23) with `entry` (host or shared memory). The result's
//! low 4 bits are the code; bits 8 and up may hold the other code of the bucket (callers keep the
//! low bits: the packers below do).
template <class Layout>
QMEM_HOST_DEVICE QMEM_INLINE std::uint32_t interval_lookup(float xn,
                                                           interval_entry const* entry) noexcept {
  interval_entry const e = entry[interval_bucket<Layout>(xn)];
  std::uint32_t c = e.codes;
  if (xn > e.threshold)
    c >>= 8;
  return c;
}

// (Not `detail`: a cuda_impl::detail namespace would hide qmem::quant::detail from the kernels
// in cuda_impl, which name it unqualified.)
namespace ordered_floats {

//! Floats in value order as unsigned integers (-0.0 just before +0.0), and back.
constexpr std::uint32_t ordered(float f) noexcept {
  std::uint32_t const u = qmem::detail::float_to_bits(f);
  return (u & 0x80000000u) != 0 ? ~u : u | 0x80000000u;
}
constexpr float from_ordered(std::uint32_t o) noexcept {
  return qmem::detail::bits_to_float((o & 0x80000000u) != 0 ? o & 0x7fffffffu : ~o);
}

} // namespace ordered_floats

//! Builds the table of code type C over the fast-path domain; throws std::logic_error when a
//! bucket holds two transitions at its ends' resolution, when a threshold would be -0.0 (a float
//! comparison cannot separate it from +0.0).
template <class C, class Layout>
interval_table<Layout> build_interval_table() {
  auto code_at = [](float v) -> std::uint32_t { return C::encode(v, C::book); };
  constexpr float top = 1.0f + 0x1p-23f;
  std::uint32_t const lo_all = ordered_floats::ordered(-top);
  std::uint32_t const hi_all = ordered_floats::ordered(top);
  auto bucket_of = [](std::uint32_t o) {
    return static_cast<int>(interval_bucket<Layout>(ordered_floats::from_ordered(o))) +
           Layout::first;
  };
  interval_table<Layout> t{};
  for (int k = Layout::first; k <= Layout::last; ++k) {
    // [first, last]: the ordered floats of the domain whose bucket is k (bucket_of is monotone)
    std::uint32_t lo = lo_all;
    std::uint32_t hi = hi_all + 1;
    while (lo < hi) { // first o with bucket_of(o) >= k
      std::uint32_t const mid = lo + (hi - lo) / 2;
      if (bucket_of(mid) >= k)
        hi = mid;
      else
        lo = mid + 1;
    }
    std::uint32_t const first = lo;
    hi = hi_all + 1;
    while (lo < hi) { // first o with bucket_of(o) > k
      std::uint32_t const mid = lo + (hi - lo) / 2;
      if (bucket_of(mid) > k)
        hi = mid;
      else
        lo = mid + 1;
    }
    auto& e = t.entry[k - Layout::first];
    if (first >= lo) { // no float of the domain in this bucket
      e = {std::numeric_limits<float>::infinity(), 0u};
      continue;
    }
    std::uint32_t const last = lo - 1;
    std::uint32_t const below = code_at(ordered_floats::from_ordered(first));
    std::uint32_t const above = code_at(ordered_floats::from_ordered(last));
    if (below == above) {
      e = {std::numeric_limits<float>::infinity(), below | (below << 8)};
    } else {
      std::uint32_t a = first; // code below
      std::uint32_t b = last;  // code above
      while (b - a > 1) {
        std::uint32_t const mid = a + (b - a) / 2;
        if (code_at(ordered_floats::from_ordered(mid)) == below)
          a = mid;
        else
          b = mid;
      }
      if (code_at(ordered_floats::from_ordered(b)) != above)
        throw std::logic_error("interval_table: two transitions in one bucket");
      float const threshold = ordered_floats::from_ordered(a);
      if (qmem::detail::float_to_bits(threshold) == 0x80000000u)
        throw std::logic_error("interval_table: a transition at -0.0");
      e = {threshold, below | (above << 8)};
    }
  }
  return t;
}

//! Which code types get an interval table, and its layout (none: void).
template <class C>
struct interval_layout_of {
  using type = void;
};
//! NF4: signed buckets of 1/16 (thresholds >= 0.08 apart).
template <>
struct interval_layout_of<nf4> {
  using type = interval_layout<16>;
};
//! FP4: signed buckets [k / 16, (k + 1) / 16) (thresholds >= 0.083 apart). The code's sign rule
//! (bit 8 for every xn < 0, but not for -0.0) puts transitions at -2.6e-3, between the tiny
//! negatives and -0.0, and at 2.6e-3; rounding down separates them: [-1/16, 0) holds the first,
//! [+-0, 1/16) the last, and the middle one is the bucket edge itself. The lookup is then NF4's.
//! The layout before (2026-11-29), |xn| in buckets rounded to nearest with the sign bit or'ed in,
//! took two more instructions per element (FSETP, predicated LOP3); SASS (ptxas 13.0, sm_90,
//! 2026-11-30): quantize_whole's normal-block encode of 32 bf16 values 333 -> 269 instructions, as
//! NF4's. It was kept behind QMEM_QUANT_FP4_SIGNED_INTERVALS=0 until both were timed, then removed.
template <>
struct interval_layout_of<fp4> {
  using type = interval_layout<16, interval_rounding::down>;
};

//! The table of C, built once per process (thread-safe).
template <class C>
requires(!std::is_void_v<typename interval_layout_of<C>::type>)
    interval_table<typename interval_layout_of<C>::type>
const& interval_table_of() {
  static auto const table = build_interval_table<C, typename interval_layout_of<C>::type>();
  return table;
}

} // namespace qmem::quant::cuda_impl
