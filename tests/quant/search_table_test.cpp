// The host's table-driven 8-bit search (quant/detail/search_table.hpp) returns exactly what
// bitsandbytes' binary search returns, for every map that uses it: a strided sweep over every float
// in [-1.0001, 1.0001], every midpoint and table value +-8 ulps, every bucket edge +-2 ulps, signed
// zeros, infinities and NaN. QMEM_EXHAUSTIVE=1 sweeps every float of the range (minutes).
#include <qmem/quant/detail/search_table.hpp>

#include <doctest/doctest.h>

#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>

namespace {

using namespace qmem::quant;

template <class C>
void check_map(char const* name) {
  CAPTURE(name);
  float const* code = C::book.value.value;
  auto const& table = detail::search_table_of<C>();
  std::size_t checked = 0;
  std::size_t bad = 0;
  auto check = [&](float x) {
    ++checked;
    if (table.encode(x) != detail::bnb_search256(x, code) && bad++ < 10)
      FAIL_CHECK(name, ": x = ", x, " (bits ", std::bit_cast<std::uint32_t>(x), "): table ",
                 int(table.encode(x)), ", search ", int(detail::bnb_search256(x, code)));
  };
  auto around = [&](float v, int ulps) {
    auto const u = std::bit_cast<std::uint32_t>(v);
    for (int d = -ulps; d <= ulps; ++d)
      check(std::bit_cast<float>(static_cast<std::uint32_t>(static_cast<std::int64_t>(u) + d)));
  };
  // every float of [0, 1.0001] and [-1.0001, -0] with a stride (or all of them)
  bool const exhaustive = std::getenv("QMEM_EXHAUSTIVE") != nullptr;
  std::uint32_t const stride = exhaustive ? 1 : 61;
  std::uint32_t const top = std::bit_cast<std::uint32_t>(1.0001f);
  for (std::uint32_t u = 0; u <= top; u += stride) {
    check(std::bit_cast<float>(u));
    check(std::bit_cast<float>(u | 0x80000000u));
  }
  for (int i = 0; i < 256; ++i) {
    around(code[i], 8);
    if (i < 255)
      around((code[i] + code[i + 1]) * 0.5f, 8);
  }
  for (std::uint32_t k = detail::search_table::key_lo; k <= detail::search_table::key_hi; ++k) {
    around(std::bit_cast<float>(k << detail::search_table::shift), 2);
    around(-std::bit_cast<float>(k << detail::search_table::shift), 2);
  }
  float const inf = std::numeric_limits<float>::infinity();
  for (float x : {0.0f, -0.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(),
                  -std::numeric_limits<float>::quiet_NaN(), 2.0f, -2.0f, 1e30f, -1e30f,
                  std::numeric_limits<float>::denorm_min()})
    check(x);
  CHECK(bad == 0);
  std::printf("[qmem search table] %s: %zu values checked%s, %zu differ\n", name, checked,
              exhaustive ? " (exhaustive)" : "", bad);
}

} // namespace

TEST_CASE("search table: equal to bitsandbytes' binary search") {
  check_map<dynamic_signed>("dynamic_signed");
  check_map<dynamic_unsigned>("dynamic_unsigned");
  check_map<linear_signed>("linear_signed");
  check_map<linear_unsigned>("linear_unsigned");
}
