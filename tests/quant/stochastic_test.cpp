// Stochastic rounding (quant/stochastic.hpp): the generator is a pure function of (seed, index);
// the same seed gives the same codes on every backend and thread split; the rounding is unbiased
// (the mean of the dequantized values is the input) where nearest rounding is not.
#include <qmem/quant.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "quant/quant_test_support.hpp"

namespace {
using namespace qmem;
using namespace qmem::quant;
} // namespace

TEST_CASE("stochastic: uniform01 is reproducible, in [0, 1) and roughly uniform") {
  static_assert(uniform01(1, 2) == uniform01(1, 2));
  double sum = 0.0;
  int buckets[10] = {};
  std::size_t const n = 1 << 20;
  for (std::size_t i = 0; i < n; ++i) {
    float const u = uniform01(42, i);
    REQUIRE(u >= 0.0f);
    REQUIRE(u < 1.0f);
    sum += u;
    ++buckets[static_cast<int>(u * 10.0f)];
  }
  CHECK(std::fabs(sum / n - 0.5) < 0.002);
  for (int b : buckets)
    CHECK(std::abs(b - static_cast<int>(n / 10)) < 2000); // ~6 sigma
  CHECK(uniform01(42, 0) != uniform01(43, 0));
  CHECK(uniform01(42, 0) != uniform01(42, 1));
}

TEST_CASE("stochastic: encode_stochastic picks a neighbour with the right probability") {
  // NF4: 0.1 lies between 0.0795803 (code 8) and 0.1609302 (code 9)
  float const lo = nf4::decode(8, nf4::book);
  float const hi = nf4::decode(9, nf4::book);
  float const x = 0.1f;
  float const p = (x - lo) / (hi - lo);
  CHECK(encode_stochastic<nf4>(x, 0.0f, nf4::book) == 9);
  CHECK(encode_stochastic<nf4>(x, 0.999f, nf4::book) == 8);
  CHECK(encode_stochastic<nf4>(x, p * 0.99f, nf4::book) == 9);
  CHECK(encode_stochastic<nf4>(x, p * 1.01f, nf4::book) == 8);
  // exactly on a table value: that code always
  CHECK(encode_stochastic<nf4>(hi, 0.0f, nf4::book) == 9);
  CHECK(encode_stochastic<nf4>(hi, 0.9999f, nf4::book) == 9);
  // ends and NaN
  CHECK(encode_stochastic<nf4>(-1.5f, 0.5f, nf4::book) == 0);
  CHECK(encode_stochastic<nf4>(1.5f, 0.5f, nf4::book) == 15);
  CHECK(encode_stochastic<nf4>(NAN, 0.5f, nf4::book) == nf4::encode(NAN, nf4::book));
  // FP4 (codes not in value order) and FP8 (NaN entries in the table)
  float const f = 0.4f; // between 1/3 (code 4) and 1/2 (code 5)
  CHECK(encode_stochastic<fp4>(f, 0.0f, fp4::book) == 5);
  CHECK(encode_stochastic<fp4>(f, 0.999f, fp4::book) == 4);
  CHECK(encode_stochastic<fp8_e4m3>(1.0f, 0.5f, fp8_e4m3::book) ==
        fp8_e4m3::encode(1.0f, fp8_e4m3::book));
}

TEST_CASE_TEMPLATE_DEFINE("stochastic: same seed, same codes; unbiased mean", B,
                          stochastic_blockwise) {
  if (qmem::test::skip<B>())
    return;
  std::size_t const n = std::size_t{1} << 18;
  float const v = 0.3f; // between NF4 levels 0.2461 and 0.3379: nearest rounding is biased
  std::vector<float> x(n, v);
  for (std::size_t i = 0; i < n; i += 64)
    x[i] = 1.0f; // absmax 1 in every block: the other elements normalize to exactly 0.3f
  auto dx = B::upload(x);
  auto run = [&](rounding r) {
    auto dc = B::template alloc<std::uint8_t>(n / 2);
    auto da = B::template alloc<float>(n / 64);
    quantize_blockwise<nf4>(B::exec(), tensor_view<float const>(dx.view()), 64, dc.view(),
                            da.view(), r);
    auto dy = B::template alloc<float>(n);
    dequantize_blockwise<nf4>(B::exec(), tensor_view<std::uint8_t const>(dc.view()),
                              tensor_view<float const>(da.view()), 64, dy.view());
    return std::pair(B::download(dc.view()), B::download(dy.view()));
  };
  auto const [c1, y1] = run({true, 1234});
  auto const [c2, y2] = run({true, 1234});
  auto const [c3, y3] = run({true, 999});
  CHECK(c1 == c2);
  CHECK(c1 != c3);
  // the same codes as the host computes (on the host backend: with a different thread count)
  {
    std::vector<std::uint8_t> hc(n / 2);
    std::vector<float> ha(n / 64);
    quantize_blockwise<nf4>(exec::host{1}, view(std::as_const(x)), 64, view(hc), view(ha),
                            {true, 1234});
    CHECK(hc == c1);
  }
  auto mean_of_v = [&](std::vector<float> const& y) {
    double s = 0.0;
    std::size_t k = 0;
    for (std::size_t i = 0; i < n; ++i)
      if (i % 64 != 0) {
        s += y[i];
        ++k;
      }
    return s / static_cast<double>(k);
  };
  double const step = 0.33791524171829224 - 0.24611230194568634;
  double const sigma =
      step / 2.0 / std::sqrt(static_cast<double>(n)); // bound on the std of the mean
  double const m_sr = mean_of_v(y1);
  auto const [cn, yn] = run({});
  double const m_nearest = mean_of_v(yn);
  MESSAGE("mean of stochastic rounding ", m_sr, ", nearest ", m_nearest, ", exact ", v);
  CHECK(std::fabs(m_sr - v) < 6.0 * sigma);
  CHECK(std::fabs(m_nearest - v) > 0.03); // nearest: always 0.3379
}
TEST_CASE_TEMPLATE_APPLY(stochastic_blockwise, qmem::test::quant_backends);
