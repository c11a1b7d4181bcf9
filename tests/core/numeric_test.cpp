// bf16/f16 conversions: every 16-bit pattern round-trips, and float -> 16-bit conversion agrees
// with CUDA's own host implementation (cuda_bf16.h / cuda_fp16.h, when the toolkit is present)
// on edge values and a dense sweep of float bit patterns.
#include <qmem/core.hpp>

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__has_include) && __has_include(<cuda_bf16.h>) && __has_include(<cuda_fp16.h>)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define QMEM_TEST_HAVE_CUDA_TYPES 1
#else
#define QMEM_TEST_HAVE_CUDA_TYPES 0
#endif

namespace {

bool is_nan16_bf(std::uint16_t b) { return (b & 0x7fffu) > 0x7f80u; }
bool is_nan16_h(std::uint16_t b) { return (b & 0x7fffu) > 0x7c00u; }

// Round to nearest even, by the definition: pick the nearer of the two neighbours in double.
std::uint16_t reference_bf16(float f) {
  if (std::isnan(f))
    return 0x7fc0;
  std::uint32_t const u = std::bit_cast<std::uint32_t>(f);
  std::uint32_t const lo = u & 0xffff0000u;
  std::uint32_t const hi = lo + 0x10000u;
  double const x = f;
  double const dlo = std::bit_cast<float>(lo);
  // hi may be the bit pattern of inf (exact rounding to inf is what RNE does on overflow)
  double const dhi = (hi & 0x7fffffffu) >= 0x7f800000u
                         ? std::copysign(std::ldexp(1.0, 128), x)
                         : static_cast<double>(std::bit_cast<float>(hi));
  double const elo = std::fabs(x - dlo), ehi = std::fabs(dhi - x);
  std::uint32_t pick = elo < ehi ? lo : ehi < elo ? hi : (((lo >> 16) & 1u) ? hi : lo);
  return static_cast<std::uint16_t>(pick >> 16);
}

} // namespace

TEST_CASE("bf16: every pattern round-trips through float") {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    auto const h = qmem::bf16::from_bits(static_cast<std::uint16_t>(b));
    float const f = h.to_float();
    if (is_nan16_bf(static_cast<std::uint16_t>(b))) {
      CHECK(std::isnan(f));
      continue;
    }
    REQUIRE(qmem::bf16(f).bits == b);
  }
}

TEST_CASE("f16: every pattern round-trips through float") {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    auto const h = qmem::f16::from_bits(static_cast<std::uint16_t>(b));
    float const f = h.to_float();
    if (is_nan16_h(static_cast<std::uint16_t>(b))) {
      CHECK(std::isnan(f));
      CHECK(is_nan16_h(qmem::f16(f).bits));
      continue;
    }
    REQUIRE(qmem::f16(f).bits == b);
    // the value itself: sign * 2^(e-15) * (1 + m/1024), or subnormal m * 2^-24
    int const e = (b >> 10) & 0x1f, m = b & 0x3ff;
    double const mag = e == 0    ? std::ldexp(m, -24)
                       : e == 31 ? std::numeric_limits<double>::infinity()
                                 : std::ldexp(1.0 + m / 1024.0, e - 15);
    REQUIRE(static_cast<double>(f) == ((b & 0x8000u) ? -mag : mag));
  }
}

TEST_CASE("bf16: float conversion rounds to nearest even (dense sweep and edges)") {
  float const edges[] = {0.0f,
                         -0.0f,
                         1.0f,
                         -1.0f,
                         std::numeric_limits<float>::infinity(),
                         -std::numeric_limits<float>::infinity(),
                         std::numeric_limits<float>::max(),
                         std::numeric_limits<float>::lowest(),
                         std::numeric_limits<float>::min(),
                         std::numeric_limits<float>::denorm_min(),
                         std::bit_cast<float>(0x3f808000u),
                         std::bit_cast<float>(0x3f818000u),
                         std::bit_cast<float>(0x7f7f8000u),
                         std::bit_cast<float>(0x7f7f7fffu)};
  for (float f : edges)
    CHECK(qmem::bf16(f).bits == reference_bf16(f));
  CHECK(qmem::bf16(std::numeric_limits<float>::quiet_NaN()).bits == 0x7fc0);
  for (std::uint64_t u = 0; u < (1ull << 32); u += 4099) { // ~1M patterns, all exponents
    float const f = std::bit_cast<float>(static_cast<std::uint32_t>(u));
    REQUIRE(qmem::bf16(f).bits == reference_bf16(f));
  }
}

TEST_CASE("f16: float conversion matches the exact rounding of the value") {
  // reference: among all finite f16 values pick the nearest, ties to even mantissa
  auto reference = [](float f) -> std::uint16_t {
    if (std::isnan(f))
      return static_cast<std::uint16_t>((std::signbit(f) ? 0x8000u : 0u) | 0x7e00u);
    double const x = std::fabs(static_cast<double>(f));
    std::uint16_t const sign = std::signbit(f) ? 0x8000 : 0;
    if (x >= 65520.0)
      return sign | 0x7c00;
    // spacing: subnormal 2^-24; normal 2^(e-10)
    int e = x < std::ldexp(1.0, -14) ? -14 : static_cast<int>(std::floor(std::log2(x)));
    if (x >= std::ldexp(1.0, e + 1))
      ++e;
    double const ulp = std::ldexp(1.0, e - 10);
    double const q = x / ulp;
    double r = std::floor(q);
    double const frac = q - r;
    if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0.0))
      r += 1.0;
    double const v = r * ulp;
    // encode v
    for (std::uint32_t b = 0; b < 0x7c01; ++b)
      if (static_cast<double>(qmem::f16::from_bits(static_cast<std::uint16_t>(b)).to_float()) == v)
        return static_cast<std::uint16_t>(sign | b);
    return 0xffff;
  };
  float const edges[] = {0.0f,           -0.0f,          65504.0f,       65519.99f,
                         65520.0f,       -65520.0f,      6.1035156e-05f, 5.9604645e-08f,
                         2.9802322e-08f, 2.9802326e-08f, 1.0009765625f,  1.00048828125f,
                         1.00146484375f};
  for (float f : edges)
    CHECK(qmem::f16(f).bits == reference(f));
  // a sweep across the whole f16 range (reference is slow: sample)
  for (std::uint32_t u = 0x33000000u; u < 0x47800000u; u += 0x1234567u / 64) {
    float const f = std::bit_cast<float>(u);
    REQUIRE(qmem::f16(f).bits == reference(f));
    REQUIRE(qmem::f16(-f).bits == reference(-f));
  }
}

#if QMEM_TEST_HAVE_CUDA_TYPES && !defined(__CUDACC__)
TEST_CASE("bf16/f16 agree with CUDA's __float2bfloat16_rn / __float2half_rn (host versions)") {
  for (std::uint64_t u = 0; u < (1ull << 32); u += 65537) {
    float const f = std::bit_cast<float>(static_cast<std::uint32_t>(u));
    __nv_bfloat16 const b = __float2bfloat16_rn(f);
    __half const h = __float2half_rn(f);
    std::uint16_t bb, hb;
    std::memcpy(&bb, &b, 2);
    std::memcpy(&hb, &h, 2);
    if (std::isnan(f)) {
      CHECK(is_nan16_bf(qmem::bf16(f).bits));
      CHECK(is_nan16_h(qmem::f16(f).bits));
      continue;
    }
    REQUIRE(qmem::bf16(f).bits == bb);
    REQUIRE(qmem::f16(f).bits == hb);
  }
}
#endif
