#pragma once
//! \file
//! A host-side equivalent of bitsandbytes' 8-bit binary search (detail::bnb_search256) that needs
//! one table load and one comparison per value instead of eight dependent loads and comparisons.
//!
//! The search's result is a non-decreasing step function of x with one step per pair of
//! neighbouring codes (at their float midpoint, the tie going the way bnb's search path takes it).
//! The magnitude |x| is cut into buckets of 2^16 consecutive float bit patterns (1/128 of a binade);
//! every bucket holds at most one step for the 256-entry maps used here (their neighbouring values
//! are further apart than a bucket is wide: the linear unsigned map's 1/255 against 1/256 in
//! [0.5, 1), the dynamic maps' 0.014 in [0.1, 1)). Per bucket and sign the table stores the code
//! below the step, the code above it, and the largest |x| that still maps below. Buckets under
//! 2^-40 and above 1.0078 are merged into the first and last (the search is constant there).
//!
//! The table is built from the search itself, once per code table. tests/quant/search_table_test.cpp
//! proves the equality: every float of [-1.0001, 1.0001] with a stride, every midpoint and table
//! value +-8 ulps, every bucket edge, +-0, +-inf and NaN (and, with QMEM_EXHAUSTIVE=1, every float
//! of [-1.0001, 1.0001]).

#include <qmem/core/numeric.hpp>
#include <qmem/quant/codes.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qmem::quant::detail {

class search_table {
public:
  static constexpr int shift = 16;
  static constexpr std::uint32_t key_lo = 0x2b800000u >> shift; // 2^-40
  static constexpr std::uint32_t key_hi = 0x3f810000u >> shift; // 1.0078125: up to inf
  static constexpr std::size_t buckets = key_hi - key_lo + 1;

private:
  // index sign * buckets + bucket: the largest |x| that maps below the bucket's step, and the two
  // codes (below | above << 8) as 32-bit words, so that AVX2 can gather both per lane
  std::vector<float> limit_;
  std::vector<std::uint32_t> codes_;
  std::uint32_t nan_code_ = 0;

  static float magnitude(std::uint32_t bits) noexcept { return qmem::detail::bits_to_float(bits); }

public:
  //! Builds the table for the ascending 256-entry `code` (what bnb_search256 searches).
  explicit search_table(float const* code) : limit_(2 * buckets), codes_(2 * buckets) {
    nan_code_ = bnb_search256(qmem::detail::bits_to_float(0x7fc00000u), code);
    for (std::size_t s = 0; s < 2; ++s) {
      std::uint32_t const sign = s == 0 ? 0u : 0x80000000u;
      auto search = [&](std::uint32_t mag_bits) {
        return bnb_search256(qmem::detail::bits_to_float(sign | mag_bits), code);
      };
      for (std::size_t k = 0; k < buckets; ++k) {
        std::uint32_t const key = key_lo + static_cast<std::uint32_t>(k);
        std::uint32_t const lo = k == 0 ? 0u : key << shift;
        std::uint32_t const hi = k == buckets - 1 ? 0x7f800000u : (key << shift) | 0xffffu;
        std::uint8_t const c_lo = search(lo);
        std::uint8_t const c_hi = search(hi);
        codes_[s * buckets + k] = c_lo | (static_cast<std::uint32_t>(c_hi) << 8);
        if (c_lo == c_hi) {
          limit_[s * buckets + k] = magnitude(0x7f800000u); // |x| > inf never holds
          continue;
        }
        // the largest magnitude in [lo, hi) that still maps to c_lo
        std::uint32_t a = lo;
        std::uint32_t b = hi; // search(a) == c_lo, search(b) != c_lo
        while (b - a > 1) {
          std::uint32_t const m = a + (b - a) / 2;
          if (search(m) == c_lo)
            a = m;
          else
            b = m;
        }
        limit_[s * buckets + k] = magnitude(a);
      }
    }
  }

  //! The code bnb_search256(x, code) returns. Branch-free (two table loads and selects), so the
  //! host loop vectorizes with gathers where the ISA has them.
  QMEM_INLINE std::uint8_t encode(float x) const noexcept {
    std::uint32_t const u = qmem::detail::float_to_bits(x);
    std::uint32_t const a = u & 0x7fffffffu;
    std::uint32_t key = a >> shift;
    key = key < key_lo ? key_lo : (key > key_hi ? key_hi : key);
    std::size_t const i = (u >> 31) * buckets + (key - key_lo);
    std::uint32_t const c = codes_.data()[i];
    std::uint32_t const r = magnitude(a) > limit_.data()[i] ? c >> 8 : c;
    return static_cast<std::uint8_t>(a > 0x7f800000u ? nan_code_ : r);
  }
};

using quant::uses_bnb_search_v; // codes.hpp

//! The search table of code type C (built on first use, thread-safe).
template <class C>
search_table const& search_table_of() {
  static search_table const t(C::book.value.value);
  return t;
}

} // namespace qmem::quant::detail
