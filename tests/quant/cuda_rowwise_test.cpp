// Row-wise int8 (LLM.int8) on every backend equals the host definition bit for bit: codes, row
// absmax and dequantized values, for odd shapes, a zero row and rows poisoned by NaN / inf.
#include <qmem/quant.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "support/backend.hpp"

namespace {

template <class T>
std::vector<T> row_data(std::size_t rows, std::size_t cols, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<T> x(rows * cols);
  for (auto& v : x)
    v = qmem::from_float<T>(nd(gen));
  if (rows > 2) {
    for (std::size_t c = 0; c < cols; ++c)
      x[1 * cols + c] = qmem::from_float<T>(0.0f); // a zero row
    x[2 * cols + cols / 2] = qmem::from_float<T>(std::numeric_limits<float>::quiet_NaN());
  }
  if (rows > 3)
    x[3 * cols] = qmem::from_float<T>(std::numeric_limits<float>::infinity());
  return x;
}

bool same_bits(float a, float b) {
  return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b) ||
         (std::isnan(a) && std::isnan(b)); // x86 and NVIDIA default NaNs differ in sign/payload
}

} // namespace

TEST_CASE_TEMPLATE_DEFINE("rowwise int8: every backend equals the host bit for bit", B,
                          rowwise_backends) {
  if (qmem::test::skip<B>())
    return;
  using namespace qmem;
  using T = bf16;
  for (auto [rows, cols] :
       {std::pair<std::size_t, std::size_t>{1, 1}, {5, 7}, {37, 301}, {4, 4096}, {300, 1000}}) {
    CAPTURE(rows);
    CAPTURE(cols);
    auto const x = row_data<T>(rows, cols, static_cast<unsigned>(rows * 31 + cols));
    std::vector<std::int8_t> hq(rows * cols);
    std::vector<float> hs(rows);
    quant::quantize_rowwise(exec::host{}, view(std::as_const(x)), rows, cols, view(hq), view(hs));
    std::vector<float> hy(rows * cols);
    quant::dequantize_rowwise(exec::host{}, view(std::as_const(hq)), view(std::as_const(hs)), rows,
                              cols, view(hy));

    auto dx = B::upload(x);
    auto dq = B::template alloc<std::int8_t>(rows * cols);
    auto ds = B::template alloc<float>(rows);
    quant::quantize_rowwise(B::exec(), tensor_view<T const>(dx.view()), rows, cols, dq.view(),
                            ds.view());
    auto dy = B::template alloc<float>(rows * cols);
    quant::dequantize_rowwise(B::exec(), tensor_view<std::int8_t const>(dq.view()),
                              tensor_view<float const>(ds.view()), rows, cols, dy.view());
    CHECK(B::download(dq.view()) == hq);
    auto const s = B::download(ds.view());
    auto const y = B::download(dy.view());
    std::size_t bad_s = 0, bad_y = 0;
    for (std::size_t r = 0; r < rows; ++r)
      bad_s += same_bits(s[r], hs[r]) ? 0 : 1;
    for (std::size_t i = 0; i < y.size(); ++i)
      bad_y += same_bits(y[i], hy[i]) ? 0 : 1;
    CHECK(bad_s == 0);
    CHECK(bad_y == 0);
  }
}
TEST_CASE_TEMPLATE_APPLY(rowwise_backends, qmem::test::backends);
