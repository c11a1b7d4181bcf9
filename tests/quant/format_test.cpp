// Formats as types and the runtime descriptor (quant/format.hpp): concept, static checks, exact
// sizes and bits per parameter, descriptor validation and the code visitor.
#include <qmem/quant/format.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <type_traits>

namespace {
using namespace qmem;
using namespace qmem::quant;
} // namespace

TEST_CASE("format: blockwise types, concept and exact sizes") {
  static_assert(quant_format<nf4_qlora>);
  static_assert(quant_format<blockwise<dynamic_signed, 256>>);
  static_assert(quant_format<blockwise<fp8_e4m3, 128, double_quant<256>>>);
  static_assert(!quant_format<int>);
  // NF4 + double quant at block 64: 4 + 8/64 + 32/(64*256) = 4.127 bits (+ the 4-byte offset)
  constexpr std::size_t n = std::size_t{64} * 256 * 1024;
  constexpr double bits = nf4_qlora::bits_per_parameter(n);
  CHECK(bits == doctest::Approx(4.0 + 0.125 + 32.0 / (64 * 256)).epsilon(1e-6));
  CHECK(std::lround(bits * 1000.0) == 4127);
  static_assert(nf4_qlora::size_bytes(1000) == 500 + 16 + 4 * 1 + 4);
  static_assert(blockwise<nf4, 64>::size_bytes(1001) == 501 + 4 * 16);
  static_assert(int8_dynamic::size_bytes(4097) == 4097 + 4 * 2);
  static_assert(blockwise<dynamic_signed, 256>::bits_per_parameter(256) == 8.125);
}

TEST_CASE("format: runtime descriptor, validation and visitor") {
  constexpr format_desc d = describe<nf4_qlora>();
  static_assert(d.code == code_id::nf4 && d.block_size == 64 && d.nested && d.nested_block == 256);
  static_assert(d.size_bytes(1000) == nf4_qlora::size_bytes(1000));
  CHECK_NOTHROW(validate(d));
  CHECK_THROWS_AS(validate(format_desc{code_id::dynamic_signed, 32, false, 256}),
                  qmem::bad_argument);
  CHECK_THROWS_AS(validate(format_desc{code_id::nf4, 48, false, 256}), qmem::bad_argument);
  CHECK_THROWS_AS(validate(format_desc{code_id::nf4, 64, true, 100}), qmem::bad_argument);
  CHECK_THROWS_AS(validate(format_desc{static_cast<code_id>(77), 64, false, 256}),
                  qmem::bad_argument);
  CHECK_NOTHROW(validate(format_desc{code_id::nf4, 64, false, 100})); // nested block unused
  for (int i = 0; i < code_id_count; ++i) {
    auto const id = static_cast<code_id>(i);
    code_id back{};
    CHECK(parse_code_id(to_string(id), back));
    CHECK(back == id);
    if (is_custom(id)) {
      CHECK_THROWS_AS(visit_code(id, [](auto) { return 0; }), qmem::bad_argument);
      continue;
    }
    int const bits = visit_code(id, []<class C>(std::type_identity<C>) { return C::bits; });
    CHECK(bits == code_bits(id));
    CHECK(visit_code(id, []<class C>(std::type_identity<C>) { return code_id_of_v<C>; }) == id);
  }
  code_id c{};
  CHECK(parse_code_id("int8", c));
  CHECK(c == code_id::dynamic_signed);
  CHECK(!parse_code_id("int3", c));
}
