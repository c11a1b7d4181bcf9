#pragma once
//! \file
//! Rounding policy of the quantizers: nearest code (bitsandbytes' rule, the default) or stochastic
//! rounding driven by a counter-based generator, so that the host and the GPU draw the same random
//! number for the same element and produce the same codes from the same seed.
//!
//! Stochastic rounding picks, for a normalized value xn between two neighbouring table values
//! lo <= xn < hi, the code of hi with probability (xn - lo) / (hi - lo) and the code of lo
//! otherwise: its expectation is xn, so it is unbiased inside the table's range. Values outside
//! the range go to the nearest end; NaN encodes as the code type's nearest rounding encodes it.

#include <qmem/core/config.hpp>
#include <qmem/core/fmath.hpp>
#include <qmem/quant/codes.hpp>

#include <cstddef>
#include <cstdint>

namespace qmem::quant {

//! How quantizers round: nearest (default) or stochastic with a seed. The random number of an
//! element is `uniform01(seed, i)` where i is the element's index in the whole tensor, so a result
//! does not depend on how the work is split over threads, blocks or devices.
struct rounding {
  bool stochastic = false; //!< false: nearest code as bitsandbytes rounds
  std::uint64_t seed = 0;  //!< seed of the counter-based generator (stochastic only)
};

namespace detail {

//! SplitMix64's finalizer: a bijective 64-bit mix with full avalanche.
QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint64_t mix64(std::uint64_t z) noexcept {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

} // namespace detail

//! A uniform number in [0, 1) for element `index` under `seed`: a pure function of its two
//! arguments (counter-based, like Philox), 24 random bits, identical on the host and the GPU.
QMEM_HOST_DEVICE QMEM_INLINE constexpr float uniform01(std::uint64_t seed,
                                                       std::uint64_t index) noexcept {
  // Two rounds: the seed is mixed first so that nearby seeds give unrelated streams.
  std::uint64_t const z =
      detail::mix64(detail::mix64(seed ^ 0x6a09e667f3bcc909ull) + index * 0x9e3779b97f4a7c15ull);
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

//! Stochastic rounding of a normalized value `xn` with the uniform number `u` in [0, 1) over the
//! table of code type `C`: with lo <= xn < hi the neighbouring table values, returns the code of hi
//! when u < (xn - lo) / (hi - lo), else the code of lo. Below the smallest value: the smallest;
//! at or above the largest finite value: that value. NaN: `C::encode` (nearest rounding's code).
template <code_type C>
QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint8_t
encode_stochastic(float xn, float u, decltype(C::book) const& book) noexcept {
  constexpr std::size_t n = std::size_t{1} << C::bits;
  if (!(xn == xn))
    return C::encode(xn, book);
  // first index whose value is not <= xn (NaN entries, sorted last, count as "above")
  std::size_t lo = 0;
  std::size_t len = n;
  while (len > 0) {
    std::size_t const half = len / 2;
    if (book.sorted[lo + half] <= xn) {
      lo += half + 1;
      len -= half + 1;
    } else {
      len = half;
    }
  }
  std::size_t const above = lo;
  if (above == 0)
    return book.code_of[0];
  float const low = book.sorted[above - 1];
  if (above == n || !(book.sorted[above] == book.sorted[above]))
    return book.code_of[above - 1];
  float const high = book.sorted[above];
  float const p = fmath::div(fmath::sub(xn, low), fmath::sub(high, low));
  return u < p ? book.code_of[above] : book.code_of[above - 1];
}

} // namespace qmem::quant
