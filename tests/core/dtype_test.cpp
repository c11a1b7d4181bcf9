// The runtime element-type tag: sizes, safetensors names (parsed back exactly), the C++ types that
// have a tag, and the float_element conversions.
#include <qmem/core.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <string_view>

static_assert(qmem::dtype_of_v<float> == qmem::dtype::f32);
static_assert(qmem::dtype_of_v<double> == qmem::dtype::f64);
static_assert(qmem::dtype_of_v<qmem::bf16> == qmem::dtype::bf16);
static_assert(qmem::dtype_of_v<qmem::f16 const> == qmem::dtype::f16);
static_assert(qmem::dtype_of_v<std::int8_t> == qmem::dtype::i8);
static_assert(qmem::dtype_of_v<std::int64_t> == qmem::dtype::i64);
static_assert(qmem::dtype_of_v<std::uint8_t> == qmem::dtype::u8);
static_assert(qmem::dtype_of_v<std::uint16_t> == qmem::dtype::u16);
static_assert(qmem::dtype_of_v<std::uint32_t> == qmem::dtype::u32);
static_assert(qmem::dtype_of_v<bool> == qmem::dtype::boolean);
static_assert(!qmem::has_dtype_v<long double>);
static_assert(!qmem::has_dtype_v<void*>);
static_assert(qmem::float_element<qmem::bf16> && qmem::float_element<float>);
static_assert(!qmem::float_element<int>);

TEST_CASE("dtype: every tag has a size and a name that parses back to it") {
  int count = 0;
  for (int i = 0; i <= static_cast<int>(qmem::dtype::boolean); ++i) {
    auto const t = static_cast<qmem::dtype>(i);
    std::string_view const name = qmem::dtype_name(t);
    CAPTURE(name);
    CHECK(name != "?");
    qmem::dtype parsed{};
    REQUIRE(qmem::parse_dtype(name, parsed));
    CHECK(parsed == t);
    CHECK(qmem::dtype_size(t) >= 1);
    ++count;
  }
  CHECK(count == 15);
  CHECK(qmem::dtype_size(qmem::dtype::f64) == 8);
  CHECK(qmem::dtype_size(qmem::dtype::f32) == 4);
  CHECK(qmem::dtype_size(qmem::dtype::bf16) == 2);
  CHECK(qmem::dtype_size(qmem::dtype::f8_e4m3) == 1);
  CHECK(qmem::dtype_size(qmem::dtype::u8) == 1);
  CHECK(qmem::dtype_name(qmem::dtype::bf16) == "BF16");
  CHECK(qmem::dtype_name(qmem::dtype::f8_e5m2) == "F8_E5M2");
}

TEST_CASE("dtype: unknown names are refused and leave the output alone") {
  qmem::dtype out = qmem::dtype::u16;
  CHECK_FALSE(qmem::parse_dtype("f32", out)); // names are case-sensitive, as in safetensors
  CHECK_FALSE(qmem::parse_dtype("", out));
  CHECK_FALSE(qmem::parse_dtype("F32 ", out));
  CHECK(out == qmem::dtype::u16);
  CHECK(qmem::is_floating(qmem::dtype::bf16));
  CHECK_FALSE(qmem::is_floating(qmem::dtype::f8_e4m3));
  CHECK_FALSE(qmem::is_floating(qmem::dtype::i32));
}

TEST_CASE("to_float / from_float: exact widening, one rounding when narrowing") {
  CHECK(qmem::to_float(qmem::bf16::from_bits(0x3f80)) == 1.0f);
  CHECK(qmem::to_float(qmem::f16::from_bits(0x3c00)) == 1.0f);
  CHECK(qmem::to_float(2.5) == 2.5f);
  CHECK(qmem::from_float<qmem::bf16>(1.0f).bits == 0x3f80);
  CHECK(qmem::from_float<qmem::f16>(-2.0f).bits == 0xc000);
  // 1 + 2^-8 is a tie between bf16 1.0 and 1.0078125: even mantissa (1.0) wins
  CHECK(qmem::from_float<qmem::bf16>(1.00390625f).bits == 0x3f80);
  CHECK(qmem::from_float<double>(0.1f) == static_cast<double>(0.1f));
}
