#pragma once
//! \file
//! Code tables: the values a 4- or 8-bit code stands for, before scaling by the block absmax.
//! Every table here is computed at compile time.
//!
//! The dynamic map follows bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7,
//! total_bits=8)` in float32 arithmetic: for decade i in 0..6, `linspace(0.1, 1, k + 1)` (k = 2^i
//! signed, 2^(i+1) unsigned), the midpoints of neighbours, scaled by 10^(i-6); then 0 and 1,
//! sorted. torch's CPU linspace evaluates `start + step * idx` (and `end - step * (steps - 1 -
//! idx)` for the upper half) as a fused multiply-add; reproducing that fusion is what makes all
//! 256 entries equal to bitsandbytes' table bit for bit (without it, 42 signed and 31 unsigned
//! entries differ in the last bit).

#include <qmem/core/config.hpp>
#include <qmem/core/numeric.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>

namespace qmem::quant {

//! The value of each code (index = code), N = 16 or 256. An aggregate, trivially copyable, passed
//! to kernels by value.
template <std::size_t N>
struct code_table {
  static constexpr std::size_t size = N;
  float value[N];

  QMEM_HOST_DEVICE constexpr float operator[](std::size_t code) const noexcept {
    return value[code];
  }
  friend constexpr bool operator==(code_table const&, code_table const&) = default;
};

namespace detail {

//! Next float after `x` toward +inf (up) or -inf; constexpr (x finite).
constexpr float next_float(float x, bool up) noexcept {
  auto u = std::bit_cast<std::uint32_t>(x);
  if ((u & 0x7fffffffu) == 0)
    return up ? std::bit_cast<float>(0x00000001u) : std::bit_cast<float>(0x80000001u);
  bool const neg = (u >> 31) != 0;
  u = (up != neg) ? u + 1 : u - 1;
  return std::bit_cast<float>(u);
}

//! a * b + c with one rounding, as a hardware fused multiply-add, usable in constant expressions.
//! The product of two floats is exact in double; the double sum is corrected for the one case where
//! rounding double -> float would round twice (the double lands exactly between two floats while
//! the exact sum does not).
constexpr float fma_float(float a, float b, float c) noexcept {
  double const p = static_cast<double>(a) * static_cast<double>(b);
  double const s = p + static_cast<double>(c);
  double const bv = s - p;
  double const err = (p - (s - bv)) + (static_cast<double>(c) - bv);
  float const r = static_cast<float>(s);
  if (err == 0.0 || static_cast<double>(r) == s)
    return r;
  float const other = next_float(r, static_cast<double>(r) < s);
  double const mid = (static_cast<double>(r) + static_cast<double>(other)) / 2.0;
  if (mid != s)
    return r; // not a tie: the double rounding did not change the answer
  bool const exact_above = err > 0.0;
  float const hi = r > other ? r : other;
  float const lo = r > other ? other : r;
  return exact_above ? hi : lo;
}

//! torch.linspace(start, end, steps) in float32 on the CPU, as described above.
template <std::size_t Steps>
constexpr std::array<float, Steps> linspace(float start, float end) noexcept {
  std::array<float, Steps> out{};
  float const step = (end - start) / static_cast<float>(Steps - 1);
  std::size_t const halfway = Steps / 2;
  for (std::size_t i = 0; i < Steps; ++i)
    out[i] = i < halfway ? fma_float(step, static_cast<float>(i), start)
                         : fma_float(-step, static_cast<float>(Steps - 1 - i), end);
  return out;
}

template <std::size_t K>
constexpr void append_decade(std::array<float, 256>& data, std::size_t& n, float scale,
                             bool is_signed) noexcept {
  auto const b = linspace<K + 1>(0.1f, 1.0f);
  for (std::size_t j = 0; j < K; ++j) {
    float const mean = (b[j] + b[j + 1]) / 2.0f;
    float const v = scale * mean;
    data[n++] = v;
    if (is_signed)
      data[n++] = -v;
  }
}

} // namespace detail

//! bitsandbytes' 8-bit dynamic (tree) map, signed ([-1, 1]) or unsigned ([0, 1]), sorted.
constexpr code_table<256> make_dynamic_map(bool is_signed) noexcept {
  std::array<float, 256> data{};
  std::size_t n = 0;
  // 10^(i-6) as float, as torch multiplies a float32 tensor by a Python scalar.
  constexpr float decade[7] = {1e-6f, 1e-5f, 1e-4f, 1e-3f, 1e-2f, 1e-1f, 1.0f};
  if (is_signed) {
    detail::append_decade<1>(data, n, decade[0], true);
    detail::append_decade<2>(data, n, decade[1], true);
    detail::append_decade<4>(data, n, decade[2], true);
    detail::append_decade<8>(data, n, decade[3], true);
    detail::append_decade<16>(data, n, decade[4], true);
    detail::append_decade<32>(data, n, decade[5], true);
    detail::append_decade<64>(data, n, decade[6], true);
  } else {
    detail::append_decade<2>(data, n, decade[0], false);
    detail::append_decade<4>(data, n, decade[1], false);
    detail::append_decade<8>(data, n, decade[2], false);
    detail::append_decade<16>(data, n, decade[3], false);
    detail::append_decade<32>(data, n, decade[4], false);
    detail::append_decade<64>(data, n, decade[5], false);
    detail::append_decade<128>(data, n, decade[6], false);
  }
  data[n++] = 0.0f;
  data[n++] = 1.0f;
  std::sort(data.begin(), data.end());
  code_table<256> t{};
  for (std::size_t i = 0; i < 256; ++i)
    t.value[i] = data[i];
  return t;
}

//! bitsandbytes' `create_linear_map(signed, total_bits=8, add_zero=True)`: 255 evenly spaced
//! values over [-1, 1] with an extra 0 in the middle (signed), or 256 over [0, 1] (unsigned).
constexpr code_table<256> make_linear_map(bool is_signed) noexcept {
  code_table<256> t{};
  if (is_signed) {
    auto const v = detail::linspace<255>(-1.0f, 1.0f);
    for (std::size_t i = 0; i < 127; ++i)
      t.value[i] = v[i];
    t.value[127] = 0.0f;
    for (std::size_t i = 127; i < 255; ++i)
      t.value[i + 1] = v[i];
  } else {
    auto const v = detail::linspace<256>(0.0f, 1.0f);
    for (std::size_t i = 0; i < 256; ++i)
      t.value[i] = v[i];
  }
  return t;
}

//! NF4 (QLoRA's normal-float 4-bit), index = code; the float32 values bitsandbytes stores.
inline constexpr code_table<16> nf4_table = {
    {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
     -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
     0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
     0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f}};

//! bitsandbytes' FP4 as its kernel decodes it: bit 3 is the sign, bits 0-2 index the magnitude.
//! Code 8 is -0.0 (magnitude 0 times sign -1); bitsandbytes' stored `quant_map` holds +0.0 there.
inline constexpr code_table<16> fp4_table = {
    {0.0f, 0.005208333333f, 0.6666666667f, 1.0f, 0.3333333333f, 0.5f, 0.1666666667f, 0.25f, -0.0f,
     -0.005208333333f, -0.6666666667f, -1.0f, -0.3333333333f, -0.5f, -0.1666666667f, -0.25f}};

//! FP4 as bitsandbytes stores it in checkpoints (`quant_map`): +0.0 at code 8.
inline constexpr code_table<16> fp4_stored_table = {
    {0.0f, 0.005208333333f, 0.6666666667f, 1.0f, 0.3333333333f, 0.5f, 0.1666666667f, 0.25f, 0.0f,
     -0.005208333333f, -0.6666666667f, -1.0f, -0.3333333333f, -0.5f, -0.1666666667f, -0.25f}};

} // namespace qmem::quant
