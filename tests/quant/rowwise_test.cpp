// Row-wise int8 (LLM.int8 vector-wise) quantization (quant/rowwise.hpp): bitsandbytes' arithmetic
// (round half to even of x * (127 / rowmax); (q * rowmax) * (1/127)), zero rows, NaN/inf rows,
// error on N(0, 1) data, bad arguments.
#include <qmem/quant/rowwise.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "quant/quant_test_support.hpp"

namespace {
using namespace qmem;
using namespace qmem::quant;
using qmem::test::normal_floats;
} // namespace

TEST_CASE("rowwise: round_int8 rounds half to even and maps NaN to 0") {
  using qmem::quant::detail::round_int8;
  CHECK(round_int8(0.5f) == 0);
  CHECK(round_int8(1.5f) == 2);
  CHECK(round_int8(2.5f) == 2);
  CHECK(round_int8(-2.5f) == -2);
  CHECK(round_int8(-3.5f) == -4);
  CHECK(round_int8(126.5f) == 126);
  CHECK(round_int8(127.0f) == 127);
  CHECK(round_int8(127.4f) == 127);
  CHECK(round_int8(-127.0f) == -127);
  CHECK(round_int8(0.49999997f) == 0);
  CHECK(round_int8(std::numeric_limits<float>::quiet_NaN()) == 0);
  CHECK(round_int8(std::numeric_limits<float>::infinity()) == 127);
}

TEST_CASE("rowwise: codes, scales and values follow the definition") {
  std::size_t const rows = 37;
  std::size_t const cols = 301;
  auto x = normal_floats(rows * cols, 5);
  for (std::size_t c = 0; c < cols; ++c)
    x[3 * cols + c] = 0.0f; // a zero row
  x[5 * cols + 7] = 0.25f * 127.0f / 127.0f;
  std::vector<std::int8_t> q(rows * cols);
  std::vector<float> s(rows);
  quantize_rowwise(exec::host{}, view(std::as_const(x)), rows, cols, view(q), view(s));
  for (std::size_t r = 0; r < rows; ++r) {
    float m = 0.0f;
    for (std::size_t c = 0; c < cols; ++c)
      m = std::max(m, std::fabs(x[r * cols + c]));
    REQUIRE(s[r] == m);
    float const scale = 127.0f / m;
    for (std::size_t c = 0; c < cols; ++c) {
      float const v = x[r * cols + c] * scale;
      int const expect = std::isnan(v) ? 0 : static_cast<int>(std::nearbyint(v));
      REQUIRE(int(q[r * cols + c]) == expect);
    }
  }
  std::vector<float> y(rows * cols);
  dequantize_rowwise(exec::host{}, view(std::as_const(q)), view(std::as_const(s)), rows, cols,
                     view(y));
  double err = 0.0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    float const expect = (static_cast<float>(q[i]) * s[i / cols]) * 7.874015718698502e-3f;
    REQUIRE(std::bit_cast<std::uint32_t>(y[i]) == std::bit_cast<std::uint32_t>(expect));
    err += std::fabs(y[i] - x[i]);
  }
  MESSAGE("row-wise int8 mean |x - y| on N(0, 1), 301 columns: ",
          err / static_cast<double>(y.size()));
  CHECK(err / static_cast<double>(y.size()) < 0.01);
  for (std::size_t c = 0; c < cols; ++c) {
    CHECK(q[3 * cols + c] == 0);
    CHECK(y[3 * cols + c] == 0.0f);
  }
  // bf16 output: one rounding of the same float
  std::vector<bf16> yb(rows * cols);
  dequantize_rowwise(exec::host{}, view(std::as_const(q)), view(std::as_const(s)), rows, cols,
                     view(yb));
  for (std::size_t i = 0; i < y.size(); ++i)
    REQUIRE(yb[i] == bf16(y[i]));
}

TEST_CASE("rowwise: NaN and infinity poison their row only") {
  std::size_t const rows = 3;
  std::size_t const cols = 8;
  auto x = normal_floats(rows * cols, 9);
  x[2] = std::numeric_limits<float>::quiet_NaN();
  x[cols + 5] = std::numeric_limits<float>::infinity();
  std::vector<std::int8_t> q(rows * cols);
  std::vector<float> s(rows);
  quantize_rowwise(exec::host{}, view(std::as_const(x)), rows, cols, view(q), view(s));
  CHECK(std::isnan(s[0]));
  CHECK(std::isinf(s[1]));
  CHECK(std::isfinite(s[2]));
  std::vector<float> y(rows * cols);
  dequantize_rowwise(exec::host{}, view(std::as_const(q)), view(std::as_const(s)), rows, cols,
                     view(y));
  for (std::size_t c = 0; c < cols; ++c) {
    CHECK(q[c] == 0);
    CHECK(std::isnan(y[c]));
    CHECK(std::isnan(y[cols + c])); // 0 * inf
    CHECK(std::isfinite(y[2 * cols + c]));
  }
}

TEST_CASE("rowwise: bad arguments throw and write nothing") {
  std::vector<float> x(60, 1.0f);
  std::vector<std::int8_t> q(60, 42);
  std::vector<float> s(6, 7.0f);
  auto const xv = view(std::as_const(x));
  CHECK_THROWS_AS(quantize_rowwise(exec::host{}, xv, 6, 11, view(q), view(s)), qmem::bad_argument);
  CHECK_THROWS_AS(quantize_rowwise(exec::host{}, xv, 5, 12, view(q), view(s)), qmem::bad_argument);
  CHECK_THROWS_AS(quantize_rowwise(exec::host{}, xv, 6, 10, view(q).subview(0, 59), view(s)),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize_rowwise(exec::host{},
                                   tensor_view<float const>(x.data(), 60, memory_space::device), 6,
                                   10, view(q), view(s)),
                  qmem::bad_argument);
  std::vector<float> y(60, 3.0f);
  CHECK_THROWS_AS(dequantize_rowwise(exec::host{}, view(std::as_const(q)), view(std::as_const(s)),
                                     6, 10, view(y).subview(1, 59)),
                  qmem::bad_argument);
  // an output over an input: codes or row scales in x's bytes, y over the codes or the scales
  tensor_view<std::int8_t> q_in_x(reinterpret_cast<std::int8_t*>(x.data()) + 8, 60);
  CHECK_THROWS_AS(quantize_rowwise(exec::host{}, xv, 6, 10, q_in_x, view(s)), qmem::bad_argument);
  CHECK_THROWS_AS(quantize_rowwise(exec::host{}, xv, 6, 10, view(q), view(x).subview(50, 6)),
                  qmem::bad_argument);
  std::vector<float> qy(60, 3.0f);
  tensor_view<std::int8_t const> q_in_y(reinterpret_cast<std::int8_t const*>(qy.data()) + 4, 60);
  CHECK_THROWS_AS(dequantize_rowwise(exec::host{}, q_in_y, view(std::as_const(s)), 6, 10, view(qy)),
                  qmem::bad_argument);
  CHECK_THROWS_AS(dequantize_rowwise(exec::host{}, view(std::as_const(q)),
                                     view(std::as_const(qy)).subview(54, 6), 6, 10, view(qy)),
                  qmem::bad_argument);
  for (auto v : x)
    CHECK(v == 1.0f);
  for (auto v : qy)
    CHECK(v == 3.0f);
  for (auto v : q)
    CHECK(v == 42);
  for (auto v : s)
    CHECK(v == 7.0f);
  for (auto v : y)
    CHECK(v == 3.0f);
}
