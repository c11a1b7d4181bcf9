#pragma once
//! \file
//! The host's exact table encoder for codes whose encode is a step function of x with few steps:
//! bitsandbytes' 8-bit binary search (detail::bnb_search256) for quantize_blockwise and the 8-bit
//! optimizer states, and the 4-bit optimizer maps. One table load pair and one comparison per
//! value instead of a search of eight dependent loads and comparisons; the AVX2 step of the host
//! optimizer (optim/detail/host_avx2.hpp) runs the same look-up with gathers, 8 values at a time.
//!
//! The encoder's result is, for each sign, a monotone step function of |x| (for the searched maps,
//! one step per pair of neighbouring codes at their float midpoint, the tie going the way bnb's
//! search path takes it). The magnitude |x| is cut into buckets of 2^16 consecutive float bit
//! patterns (1/128 of a binade); every bucket holds at most one step for the maps served here
//! (their neighbouring values are further apart than a bucket is wide: the linear unsigned map's
//! 1/255 against 1/256 in [0.5, 1), the dynamic maps' 0.014 in [0.1, 1); the 4-bit maps' steps are
//! wider still). The constructor checks that no bucket holds two steps (`exact()`). Per bucket and
//! sign one 32-bit entry holds the code below the step, the code above it, and the low 16 bits of
//! the largest |x| that still maps below (its upper 16 bits are the bucket's key): one load per
//! value, one gather per 8 values. Buckets under 2^-40 and above 1.0078 are merged into the first
//! and last (the maps are constant there; the constructor checks that too).
//!
//! The table is built from the encoder itself, once per code type.
//! tests/quant/search_table_test.cpp compares it with the search (a strided sweep, every midpoint
//! and table value +-8 ulps, every bucket edge, +-0, +-inf and NaN); tests/optim/host_avx2_test.cpp
//! compares the table and its AVX2 form with `C::encode` for every code type served, over all 2^32
//! floats with QMEM_EXHAUSTIVE=1. This replaces the optimizer's former 64 K-entry cell table
//! (optim/detail/encode_lut.hpp): scalar it was faster (1.05 against 2.14 ns per value, dev box,
//! 2026-11-29), but with AVX2 gathers this layout encodes in 0.56 ns per value against 0.95 ns
//! (two independent gathers instead of three dependent ones), and the host step runs the AVX2
//! form wherever the CPU has it.

#include <qmem/core/numeric.hpp>
#include <qmem/quant/codes.hpp>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace qmem::quant::detail {

class search_table {
public:
  static constexpr int shift = 16;
  static constexpr std::uint32_t key_lo = 0x2b800000u >> shift; // 2^-40
  static constexpr std::uint32_t key_hi = 0x3f810000u >> shift; // 1.0078125: up to inf
  static constexpr std::size_t buckets = key_hi - key_lo + 1;

private:
  // index sign * buckets + bucket: code below the bucket's step | code above << 8 | the low 16
  // bits of the largest |x| that maps below << 16 (a bucket without a step: both codes equal)
  std::vector<std::uint32_t> entry_;
  std::uint32_t nan_code_ = 0;
  bool exact_ = true;

public:
  //! Builds the table for the ascending 256-entry `code` (what bnb_search256 searches).
  explicit search_table(float const* code)
      : search_table([code](float x) { return bnb_search256(x, code); }) {}

  //! Builds the table of `encode` (float -> code), which must be, for each sign, a monotone step
  //! function of |x| (`exact()` reports whether every bucket held at most one step).
  template <class Encode>
  requires std::is_invocable_r_v<std::uint8_t, Encode const&, float>
  explicit search_table(Encode const& encode) : entry_(2 * buckets) {
    nan_code_ = encode(qmem::detail::bits_to_float(0x7fc00000u));
    for (std::size_t s = 0; s < 2; ++s) {
      std::uint32_t const sign = s == 0 ? 0u : 0x80000000u;
      auto search = [&](std::uint32_t mag_bits) -> std::uint8_t {
        return encode(qmem::detail::bits_to_float(sign | mag_bits));
      };
      for (std::size_t k = 0; k < buckets; ++k) {
        std::uint32_t const key = key_lo + static_cast<std::uint32_t>(k);
        std::uint32_t const lo = k == 0 ? 0u : key << shift;
        std::uint32_t const hi = k == buckets - 1 ? 0x7f800000u : (key << shift) | 0xffffu;
        std::uint8_t const c_lo = search(lo);
        std::uint8_t const c_hi = search(hi);
        std::uint32_t const codes = c_lo | (static_cast<std::uint32_t>(c_hi) << 8);
        if (c_lo == c_hi) {
          entry_[s * buckets + k] = codes | 0xffff0000u; // either code: the same
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
        entry_[s * buckets + k] = codes | (a << 16);
        exact_ = exact_ && search(b) == c_hi;   // a second step inside the bucket otherwise
        exact_ = exact_ && (a >> shift) == key; // a step in a merged bucket otherwise
      }
    }
  }

  //! False when a bucket held more than one step (the table then must not be used).
  [[nodiscard]] bool exact() const noexcept { return exact_; }
  //! The table, for vector look-ups: with key = clamp(|x| bits >> shift, key_lo, key_hi), entry
  //! e = entries()[(sign bit) * buckets + key - key_lo]; x maps to e >> 8 & 255 when the bits of
  //! |x| exceed (key << shift | e >> 16), else to e & 255 (NaN: nan_code()).
  [[nodiscard]] std::uint32_t const* entries() const noexcept { return entry_.data(); }
  //! The code of NaN (any NaN: bnb's search compares false throughout).
  [[nodiscard]] std::uint32_t nan_code() const noexcept { return nan_code_; }

  //! The code the encoder returns (bnb_search256(x, code) for a searched map). Branch-free (one
  //! table load and selects), so the host loop vectorizes with gathers where the ISA has them.
  QMEM_INLINE std::uint8_t encode(float x) const noexcept {
    std::uint32_t const u = qmem::detail::float_to_bits(x);
    std::uint32_t const a = u & 0x7fffffffu;
    std::uint32_t key = a >> shift;
    key = key < key_lo ? key_lo : (key > key_hi ? key_hi : key);
    std::uint32_t const e = entry_.data()[(u >> 31) * buckets + (key - key_lo)];
    std::uint32_t const r = a > ((key << shift) | (e >> 16)) ? e >> 8 : e; // bits order = order
    return static_cast<std::uint8_t>(a > 0x7f800000u ? nan_code_ : r);
  }
};

using quant::uses_bnb_search_v; // codes.hpp

//! True for the code types whose table is proven equal to `C::encode` over every float (by
//! tests/optim/host_avx2_test.cpp with QMEM_EXHAUSTIVE=1): bitsandbytes' searched maps here, the
//! 4-bit optimizer maps where they are defined (optim/state.hpp). Only these use the table.
template <class C>
inline constexpr bool search_table_proven_v = uses_bnb_search_v<C>;

//! The search table of code type C, built from `C::encode` on first use (thread-safe).
template <class C>
search_table const& search_table_of() {
  static search_table const t([](float x) -> std::uint8_t { return C::encode(x, C::book); });
  return t;
}

} // namespace qmem::quant::detail
