#pragma once
//! \file
//! Element- and block-level pieces of blockwise quantization, QMEM_HOST_DEVICE and shared by the
//! host loops (quant/blockwise.hpp) and the CUDA kernels (quant/cuda/blockwise.cuh). Kernel files
//! include this header, never quant/blockwise.hpp, which includes them.
//!
//! The function every backend computes, per block of `block_size` elements (the last one partial):
//!   absmax = max |x|                     (NaN wins over everything, then inf: see block_absmax)
//!   inv    = 1.0f / absmax               (IEEE, fmath::rcp)
//!   code   = C::encode(x * inv)          (or encode_stochastic with uniform01(seed, index))
//!   y      = C::decode(code) * absmax    (then one rounding to the output type)
//! 4-bit codes are packed two per byte, the first element in the high nibble; an odd tail's low
//! nibble is C::zero_code.

#include <qmem/core/config.hpp>
#include <qmem/core/fmath.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/quant/codes.hpp>
#include <qmem/quant/stochastic.hpp>

#include <cstddef>
#include <cstdint>

namespace qmem::quant {

//! True when `b` is a block size the blockwise algorithms support for code type `C`: a power of
//! two in [64, 4096] for 8-bit codes, in [32, 4096] for 4-bit codes (bitsandbytes' ranges).
template <code_type C>
constexpr bool valid_block_size(std::size_t b) noexcept {
  std::size_t const lowest = C::bits == 4 ? 32 : 64;
  return b >= lowest && b <= 4096 && (b & (b - 1)) == 0;
}

//! Bytes of codes for `n` elements of code type `C`: n for 8-bit codes, ceil(n / 2) for 4-bit.
template <code_type C>
constexpr std::size_t code_bytes(std::size_t n) noexcept {
  return C::bits == 8 ? n : n / 2 + n % 2;
}

//! Number of blocks (absmax values) for `n` elements in blocks of `block_size`: ceil(n / block).
constexpr std::size_t block_count(std::size_t n, std::size_t block_size) noexcept {
  return n / block_size + (n % block_size != 0 ? 1 : 0);
}

namespace detail {

//! |x| as ordered bits: for non-negative floats the integer order of the bit patterns is the value
//! order, and every NaN pattern is above +inf's (0x7f800000).
QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint32_t abs_bits(float x) noexcept {
  return qmem::detail::float_to_bits(x) & 0x7fffffffu;
}

//! Block absmax as the integer maximum of abs_bits: branch-free (vectorizes), order-independent
//! (the same bits whatever the reduction tree), and NaN-propagating: a block with a NaN gets a NaN
//! absmax (the largest NaN pattern of the block, sign cleared), so the whole block dequantizes to
//! NaN; otherwise a block with an infinity gets +inf.
template <float_element T>
QMEM_HOST_DEVICE QMEM_INLINE std::uint32_t block_absmax_bits(T const* QMEM_RESTRICT x,
                                                             std::size_t n) noexcept {
  std::uint32_t m = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t const b = abs_bits(to_float(x[i]));
    m = b > m ? b : m;
  }
  return m;
}

//! Code of one element: x scaled by `inv` (= 1 / absmax), rounded as `r` says; `index` is the
//! element's position in the whole tensor (the stochastic generator's counter).
template <code_type C>
QMEM_HOST_DEVICE QMEM_INLINE std::uint8_t encode_element(float x, float inv,
                                                         decltype(C::book) const& book, rounding r,
                                                         std::uint64_t index) noexcept {
  float const xn = fmath::mul(x, inv);
  if (r.stochastic)
    return encode_stochastic<C>(xn, uniform01(r.seed, index), book);
  return C::encode(xn, book);
}

//! Value of one code in a block with scale `absmax`, in float (round to the output type after).
template <code_type C>
QMEM_HOST_DEVICE QMEM_INLINE float decode_element(std::uint8_t code, float absmax,
                                                  decltype(C::book) const& book) noexcept {
  return fmath::mul(C::decode(code, book), absmax);
}

//! A double-quantized scale: nested_table[q] * absmax2, then + offset, each rounded in float
//! (bitsandbytes' order).
QMEM_HOST_DEVICE QMEM_INLINE float nested_scale(std::uint8_t q, float absmax2, float offset,
                                                codebook<256> const& nested_book) noexcept {
  return fmath::add(fmath::mul(nested_book.value.value[q], absmax2), offset);
}

//! Packs two 4-bit codes: `first` in the high nibble.
QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint8_t pack_nibbles(std::uint8_t first,
                                                                 std::uint8_t second) noexcept {
  return static_cast<std::uint8_t>((first << 4) | (second & 0x0f));
}

//! The 4-bit code of element i of a packed array.
QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint8_t nibble(std::uint8_t const* codes,
                                                           std::size_t i) noexcept {
  std::uint8_t const b = codes[i >> 1];
  return static_cast<std::uint8_t>((i & 1) == 0 ? b >> 4 : b & 0x0f);
}

} // namespace detail
} // namespace qmem::quant
