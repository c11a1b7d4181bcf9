#pragma once
//! \file
//! 16-bit floating-point storage types (bf16, f16) usable on the host and in CUDA kernels, and the
//! runtime element-type tag `dtype` used by files and type-erased tensors.
//!
//! `bf16` and `f16` are 2-byte trivially copyable types with the same object representation as
//! `__nv_bfloat16` and `__half`. Conversion from float rounds to nearest, ties to even, with
//! overflow to infinity and gradual underflow, exactly as `__float2bfloat16_rn`/`__float2half_rn`
//! and torch's `.bfloat16()`/`.half()`; it is written with integer operations only, so the same
//! function gives the same bits on the host, in a kernel, and under flush-to-zero. NaN inputs give a
//! quiet NaN as torch does: bf16 0x7FC0 whatever the input's sign, f16 0x7E00 with the input's
//! sign (CUDA's intrinsics give 0x7FFF: a different NaN payload, the same value class).

#include <qmem/core/config.hpp>
#include <qmem/core/error.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace qmem {
namespace detail {

QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint32_t float_to_bits(float f) noexcept {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return std::bit_cast<std::uint32_t>(f);
#endif
}

QMEM_HOST_DEVICE QMEM_INLINE constexpr float bits_to_float(std::uint32_t u) noexcept {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return std::bit_cast<float>(u);
#endif
}

//! float -> bf16 bits, round to nearest even; NaN -> 0x7FC0 (torch's canonical NaN).
QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint16_t float_to_bf16_bits(float f) noexcept {
  std::uint32_t const u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u)
    return 0x7fc0u;
  std::uint32_t const bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + bias) >> 16);
}

QMEM_HOST_DEVICE QMEM_INLINE constexpr float bf16_bits_to_float(std::uint16_t h) noexcept {
  return bits_to_float(static_cast<std::uint32_t>(h) << 16);
}

//! float -> IEEE binary16 bits, round to nearest even, overflow to inf, gradual underflow;
//! NaN -> 0x7E00 with the input's sign (torch's canonical NaN).
QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint16_t float_to_f16_bits(float f) noexcept {
  std::uint32_t u = float_to_bits(f);
  auto const sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u)
    return sign | 0x7e00u;
  if (u >= 0x477ff000u) // >= 65520: rounds to infinity (and inf itself)
    return sign | 0x7c00u;
  if (u >= 0x38800000u) { // normal in binary16: |x| >= 2^-14
    std::uint32_t const rounded = u + 0xfffu + ((u >> 13) & 1u);
    return sign | static_cast<std::uint16_t>((rounded - 0x38000000u) >> 13);
  }
  if (u <= 0x33000000u) // <= 2^-25: rounds to (signed) zero, the tie at 2^-25 to even
    return sign;
  // Subnormal: |x| / 2^-24 rounded to nearest even. |x| = m * 2^(e - 150), m in [2^23, 2^24).
  std::uint32_t const e = u >> 23;
  std::uint32_t const m = (u & 0x7fffffu) | 0x800000u;
  std::uint32_t const shift = 126u - e; // 14..24
  std::uint32_t r = m >> shift;
  std::uint32_t const rem = m & ((1u << shift) - 1u);
  std::uint32_t const half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u)))
    ++r;
  return sign | static_cast<std::uint16_t>(r);
}

QMEM_HOST_DEVICE QMEM_INLINE constexpr float f16_bits_to_float(std::uint16_t h) noexcept {
  std::uint32_t const sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t const exp = (h >> 10) & 0x1fu;
  std::uint32_t const man = h & 0x3ffu;
  if (exp == 0x1fu) // inf or NaN: keep the payload
    return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0)
    return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0)
    return bits_to_float(sign);
  // Subnormal: normalize. value = man * 2^-24.
  std::uint32_t m = man;
  std::uint32_t e = 113u;
  while ((m & 0x400u) == 0) { // at most 10 shifts
    m <<= 1;
    --e;
  }
  m &= 0x3ffu;
  return bits_to_float(sign | (e << 23) | (m << 13));
}

} // namespace detail

//! bfloat16 storage type: 1 sign, 8 exponent, 7 mantissa bits. Arithmetic happens in float.
struct bf16 {
  std::uint16_t bits;

  bf16() = default;
  QMEM_HOST_DEVICE constexpr explicit bf16(float f) noexcept
      : bits(detail::float_to_bf16_bits(f)) {}
  //! Wraps raw bits (no conversion).
  QMEM_HOST_DEVICE static constexpr bf16 from_bits(std::uint16_t b) noexcept {
    bf16 r{};
    r.bits = b;
    return r;
  }
  QMEM_HOST_DEVICE constexpr explicit operator float() const noexcept {
    return detail::bf16_bits_to_float(bits);
  }
  QMEM_HOST_DEVICE constexpr float to_float() const noexcept {
    return detail::bf16_bits_to_float(bits);
  }
  friend constexpr bool operator==(bf16, bf16) = default; //!< bitwise equality
};

//! IEEE binary16 storage type: 1 sign, 5 exponent, 10 mantissa bits.
struct f16 {
  std::uint16_t bits;

  f16() = default;
  QMEM_HOST_DEVICE constexpr explicit f16(float f) noexcept : bits(detail::float_to_f16_bits(f)) {}
  QMEM_HOST_DEVICE static constexpr f16 from_bits(std::uint16_t b) noexcept {
    f16 r{};
    r.bits = b;
    return r;
  }
  QMEM_HOST_DEVICE constexpr explicit operator float() const noexcept {
    return detail::f16_bits_to_float(bits);
  }
  QMEM_HOST_DEVICE constexpr float to_float() const noexcept {
    return detail::f16_bits_to_float(bits);
  }
  friend constexpr bool operator==(f16, f16) = default; //!< bitwise equality
};

static_assert(sizeof(bf16) == 2 && std::is_trivially_copyable_v<bf16>);
static_assert(sizeof(f16) == 2 && std::is_trivially_copyable_v<f16>);

//! The floating-point element types qmem reads and writes as tensors of values.
template <class T>
concept float_element = std::same_as<T, float> || std::same_as<T, bf16> || std::same_as<T, f16> ||
    std::same_as<T, double>;

//! Converts any float_element to float (exact).
template <float_element T>
QMEM_HOST_DEVICE QMEM_INLINE constexpr float to_float(T v) noexcept {
  if constexpr (std::same_as<T, float>)
    return v;
  else if constexpr (std::same_as<T, double>)
    return static_cast<float>(v);
  else
    return v.to_float();
}

//! Converts float to a float_element with one rounding (nearest even).
template <float_element T>
QMEM_HOST_DEVICE QMEM_INLINE constexpr T from_float(float v) noexcept {
  if constexpr (std::same_as<T, float>)
    return v;
  else if constexpr (std::same_as<T, double>)
    return static_cast<double>(v);
  else
    return T(v);
}

//! Runtime element-type tag, as stored in files (safetensors names) and type-erased tensors.
enum class dtype : std::uint8_t {
  f64,
  f32,
  f16,
  bf16,
  f8_e4m3,
  f8_e5m2,
  i64,
  i32,
  i16,
  i8,
  u64,
  u32,
  u16,
  u8,
  boolean
};

//! Bytes per element of `t`.
constexpr std::size_t dtype_size(dtype t) noexcept {
  switch (t) {
  case dtype::f64:
  case dtype::i64:
  case dtype::u64: return 8;
  case dtype::f32:
  case dtype::i32:
  case dtype::u32: return 4;
  case dtype::f16:
  case dtype::bf16:
  case dtype::i16:
  case dtype::u16: return 2;
  default: return 1;
  }
}

//! The safetensors spelling of `t` ("F32", "BF16", "U8", ...).
constexpr std::string_view dtype_name(dtype t) noexcept {
  switch (t) {
  case dtype::f64: return "F64";
  case dtype::f32: return "F32";
  case dtype::f16: return "F16";
  case dtype::bf16: return "BF16";
  case dtype::f8_e4m3: return "F8_E4M3";
  case dtype::f8_e5m2: return "F8_E5M2";
  case dtype::i64: return "I64";
  case dtype::i32: return "I32";
  case dtype::i16: return "I16";
  case dtype::i8: return "I8";
  case dtype::u64: return "U64";
  case dtype::u32: return "U32";
  case dtype::u16: return "U16";
  case dtype::u8: return "U8";
  case dtype::boolean: return "BOOL";
  }
  return "?";
}

//! Parses a safetensors dtype name; returns false for an unknown name.
constexpr bool parse_dtype(std::string_view name, dtype& out) noexcept {
  for (int i = 0; i <= static_cast<int>(dtype::boolean); ++i) {
    auto const t = static_cast<dtype>(i);
    if (dtype_name(t) == name) {
      out = t;
      return true;
    }
  }
  return false;
}

//! True for the floating-point dtypes qmem can quantize from / dequantize to.
constexpr bool is_floating(dtype t) noexcept {
  return t == dtype::f64 || t == dtype::f32 || t == dtype::f16 || t == dtype::bf16;
}

namespace detail {
template <class T>
constexpr int dtype_index() noexcept {
  using U = std::remove_cv_t<T>;
  if constexpr (std::same_as<U, double>)
    return static_cast<int>(dtype::f64);
  else if constexpr (std::same_as<U, float>)
    return static_cast<int>(dtype::f32);
  else if constexpr (std::same_as<U, f16>)
    return static_cast<int>(dtype::f16);
  else if constexpr (std::same_as<U, bf16>)
    return static_cast<int>(dtype::bf16);
  else if constexpr (std::same_as<U, bool>)
    return static_cast<int>(dtype::boolean);
  else if constexpr (std::is_integral_v<U> &&
                     (sizeof(U) == 1 || sizeof(U) == 2 || sizeof(U) == 4 || sizeof(U) == 8)) {
    constexpr int log2 = sizeof(U) == 1 ? 0 : sizeof(U) == 2 ? 1 : sizeof(U) == 4 ? 2 : 3;
    return std::is_signed_v<U> ? static_cast<int>(dtype::i8) - log2
                               : static_cast<int>(dtype::u8) - log2;
  } else
    return -1;
}
} // namespace detail

//! True when T has a dtype tag (the float types, fixed-width integers, bool).
template <class T>
inline constexpr bool has_dtype_v = detail::dtype_index<T>() >= 0;

//! The dtype tag of a C++ element type.
template <class T>
requires has_dtype_v<T>
inline constexpr dtype dtype_of_v = static_cast<dtype>(detail::dtype_index<T>());

} // namespace qmem
