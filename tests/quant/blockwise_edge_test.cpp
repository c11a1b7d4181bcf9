// Blockwise quantize/dequantize (quant/blockwise.hpp) on every backend, for the common code types:
// the error on N(0, 1) data, all-zero blocks (bitsandbytes' arithmetic), NaN/inf inputs, and bad
// arguments (nothing written). Agreement with the scalar reference is tested in blockwise_test.cpp;
// this unit also instantiates that test's check for the 8-bit codes dynamic_signed,
// dynamic_unsigned, linear_signed and user8 (blockwise_test_support.hpp), to share its compile
// time between the two units.
#include <qmem/quant.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "quant/blockwise_test_support.hpp"

namespace {
using namespace qmem;
using namespace qmem::quant;
using namespace qmem::test::blockwise_support;
using qmem::test::convert;
using qmem::test::normal_floats;
} // namespace

// The reference check of the 8-bit codes, run by blockwise_test.cpp (blockwise_test_support.hpp).
namespace qmem::test::blockwise_support {
template struct reference_check<host_backend, dynamic_signed>;
template struct reference_check<host_backend, dynamic_unsigned>;
template struct reference_check<host_backend, linear_signed>;
template struct reference_check<host_backend, user8>;
#if QMEM_HAS_CUDA() && QMEM_QUANT_HAS_CUDA_BLOCKWISE
template struct reference_check<cuda_backend, dynamic_signed>;
template struct reference_check<cuda_backend, dynamic_unsigned>;
template struct reference_check<cuda_backend, linear_signed>;
template struct reference_check<cuda_backend, user8>;
#endif
} // namespace qmem::test::blockwise_support
TEST_CASE_TEMPLATE_DEFINE("blockwise: mean absolute error on N(0, 1) data", B, blockwise_error) {
  if (qmem::test::skip<B>())
    return;
  std::size_t const n = std::size_t{1} << 20;
  auto const x = normal_floats(n, 2024);
  auto const dx = B::upload(x);
  auto measure = [&]<class C>(std::type_identity<C>, std::size_t block) {
    auto const y = quantize_on<C, B>(dx, block).template dequantized<C>(n, block);
    double e = 0.0;
    for (std::size_t i = 0; i < n; ++i)
      e += std::fabs(static_cast<double>(x[i]) - y[i]);
    e /= static_cast<double>(n);
    std::printf("[qmem error %s] %s block %zu: mean |x - y| = %.5f\n", B::name,
                code_name<C>().c_str(), block, e);
    return e;
  };
  // the anchors (shared/anchors): NF4 ~0.073, FP4 ~0.097, int8 dynamic ~0.0085
  double const e_nf4 = measure(std::type_identity<nf4>{}, 64);
  CHECK(e_nf4 > 0.065);
  CHECK(e_nf4 < 0.080);
  double const e_fp4 = measure(std::type_identity<fp4>{}, 64);
  CHECK(e_fp4 > 0.088);
  CHECK(e_fp4 < 0.105);
  double const e_int8 = measure(std::type_identity<dynamic_signed>{}, 256);
  CHECK(e_int8 > 0.006);
  CHECK(e_int8 < 0.011);
  CHECK(measure(std::type_identity<fp8_e4m3>{}, 64) < 0.03);
  CHECK(measure(std::type_identity<fp8_e5m2>{}, 64) < 0.06);
  CHECK(measure(std::type_identity<linear_signed>{}, 64) < 0.01);
  CHECK(measure(std::type_identity<user4>{}, 64) < 0.12);
}
TEST_CASE_TEMPLATE_APPLY(blockwise_error, qmem::test::quant_backends);

TEST_CASE_TEMPLATE_DEFINE("blockwise: all-zero blocks follow bitsandbytes' arithmetic", B,
                          blockwise_zero) {
  if (qmem::test::skip<B>())
    return;
  // absmax 0: 1/0 = inf, 0 * inf = NaN, and NaN encodes as bnb's search/decision tree encodes it:
  // the lowest code for the dynamic map and NF4 (value -1), code 0 for FP4 (+0). Dequantized:
  // value * 0, a signed zero.
  std::vector<float> x(200, 0.0f);
  x[150] = 0.5f; // block 2 of 64 is not all zero
  auto check = [&]<class C>(std::type_identity<C>, std::uint8_t expected_code, bool negative_zero) {
    CAPTURE(code_name<C>());
    auto dx = B::upload(x);
    auto q = quantize_on<C, B>(dx, 64);
    auto const a = B::download(q.absmax.view());
    auto const c = B::download(q.codes.view());
    CHECK(a[0] == 0.0f);
    CHECK(a[2] == 0.5f);
    std::uint8_t const first = C::bits == 8 ? c[0] : static_cast<std::uint8_t>(c[0] >> 4);
    CHECK(int(first) == int(expected_code));
    auto const y = q.template dequantized<C>(x.size(), 64);
    CHECK(y[0] == 0.0f);
    CHECK(std::signbit(y[0]) == negative_zero);
    CHECK(y[150] == 0.5f);
    CHECK(y[149] == 0.0f);
  };
  check(std::type_identity<dynamic_signed>{}, 0, true);
  check(std::type_identity<nf4>{}, 0, true);
  check(std::type_identity<fp4>{}, 0, false);
  // FP8 is not a bnb format: its encode maps the NaN to code 0 (+0), so a block of zeros
  // dequantizes to zeros (not NaN: a NaN code times 0) and to the same codes on every backend.
  check(std::type_identity<fp8_e4m3>{}, 0, false);
  check(std::type_identity<fp8_e5m2>{}, 0, false);
}
TEST_CASE_TEMPLATE_APPLY(blockwise_zero, qmem::test::quant_backends);

TEST_CASE_TEMPLATE_DEFINE("blockwise: NaN and infinity make their block's absmax non-finite", B,
                          blockwise_nonfinite) {
  if (qmem::test::skip<B>())
    return;
  float const nan = std::numeric_limits<float>::quiet_NaN();
  float const inf = std::numeric_limits<float>::infinity();
  auto x = normal_floats(256, 7);
  x[10] = nan;  // block 0
  x[70] = -inf; // block 1
  auto check = [&]<class C>(std::type_identity<C>) {
    CAPTURE(code_name<C>());
    auto dx = B::upload(x);
    auto q = quantize_on<C, B>(dx, 64);
    auto const a = B::download(q.absmax.view());
    CHECK(std::isnan(a[0]));
    CHECK(!std::signbit(a[0]));
    CHECK(a[1] == inf);
    CHECK(std::isfinite(a[2]));
    auto const y = q.template dequantized<C>(x.size(), 64);
    for (std::size_t i = 0; i < 64; ++i)
      CHECK(std::isnan(y[i])); // NaN absmax: the whole block is NaN
    for (std::size_t i = 64; i < 128; ++i)
      CHECK(!std::isfinite(y[i])); // inf absmax: inf or NaN, never a silent finite value
    for (std::size_t i = 128; i < 256; ++i)
      CHECK(std::isfinite(y[i]));
    // bf16 output: one rounding of the same float values, NaN included
    auto const yb = q.template dequantized<C, bf16>(x.size(), 64);
    for (std::size_t i = 0; i < yb.size(); ++i)
      CHECK(yb[i] == bf16(y[i]));
  };
  check(std::type_identity<dynamic_signed>{});
  check(std::type_identity<nf4>{});
  check(std::type_identity<fp4>{});
  check(std::type_identity<fp8_e4m3>{});
}
TEST_CASE_TEMPLATE_APPLY(blockwise_nonfinite, qmem::test::quant_backends);

TEST_CASE_TEMPLATE_DEFINE("blockwise: bad arguments throw and write nothing", B, blockwise_bad) {
  if (qmem::test::skip<B>())
    return;
  std::vector<float> const x = normal_floats(1000, 3);
  auto dx = B::upload(x);
  tensor_view<float const> xv(dx.view());
  auto codes = B::template alloc<std::uint8_t>(1000);
  auto codes4 = B::template alloc<std::uint8_t>(500);
  auto absmax = B::template alloc<float>(16);
  auto y = B::template alloc<float>(1000);
  auto const poisoned_codes = B::download(codes.view());
  auto const poisoned_codes4 = B::download(codes4.view());
  auto const poisoned_absmax = B::download(absmax.view());
  auto const poisoned_y = B::download(y.view());
  auto untouched = [&] {
    CHECK(B::download(codes.view()) == poisoned_codes);
    CHECK(B::download(codes4.view()) == poisoned_codes4);
    CHECK(qmem::test::same_bits(B::download(absmax.view()), poisoned_absmax));
    CHECK(qmem::test::same_bits(B::download(y.view()), poisoned_y));
  };
  auto const e = B::exec();
  using C8 = dynamic_signed;
  // block sizes: not a power of two, too small for 8-bit (32 is 4-bit only), too large
  for (std::size_t bad_block :
       {std::size_t{0}, std::size_t{32}, std::size_t{100}, std::size_t{8192}})
    CHECK_THROWS_AS(quantize_blockwise<C8>(e, xv, bad_block, codes.view(), absmax.view()),
                    qmem::bad_argument);
  CHECK_THROWS_AS(quantize_blockwise<nf4>(e, xv, 16, codes4.view(), absmax.view()),
                  qmem::bad_argument);
  // sizes: codes, absmax
  CHECK_THROWS_AS(quantize_blockwise<C8>(e, xv, 64, codes4.view(), absmax.view()),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize_blockwise<nf4>(e, xv, 64, codes.view(), absmax.view()),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize_blockwise<C8>(e, xv, 128, codes.view(), absmax.view()),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize_blockwise<C8>(e, xv, 64, codes.view(), absmax.view().subview(0, 15)),
                  qmem::bad_argument);
  // null and misaligned pointers
  CHECK_THROWS_AS(quantize_blockwise<C8>(e, tensor_view<float const>(nullptr, 1000, xv.space()), 64,
                                         codes.view(), absmax.view()),
                  qmem::bad_argument);
  auto const av = absmax.view();
  tensor_view<float> misaligned(
      reinterpret_cast<float*>(reinterpret_cast<std::uintptr_t>(av.data()) + 1), 16, av.space());
  CHECK_THROWS_AS(quantize_blockwise<C8>(e, xv, 64, codes.view(), misaligned), qmem::bad_argument);
  // memory space the executor cannot reach
  memory_space const wrong =
      exec::is_host_v<decltype(e)> ? memory_space::device : memory_space::host;
  CHECK_THROWS_AS(quantize_blockwise<C8>(e, tensor_view<float const>(xv.data(), xv.size(), wrong),
                                         64, codes.view(), absmax.view()),
                  qmem::bad_argument);
  // dequantize: sizes, block
  tensor_view<std::uint8_t const> cv(codes.view());
  tensor_view<float const> acv(absmax.view());
  CHECK_THROWS_AS(dequantize_blockwise<C8>(e, cv, acv, 64, y.view().subview(0, 999)),
                  qmem::bad_argument);
  CHECK_THROWS_AS(dequantize_blockwise<C8>(e, cv, acv, 96, y.view()), qmem::bad_argument);
  CHECK_THROWS_AS(dequantize_blockwise<nf4>(e, cv, acv, 64, y.view()), qmem::bad_argument);
  CHECK_THROWS_AS(dequantize_blockwise<C8>(e, cv, acv.subview(1, 15), 64, y.view()),
                  qmem::bad_argument);
  CHECK_THROWS_AS(
      dequantize_blockwise<C8>(e, cv, acv, 64, tensor_view<float>(y.view().data(), 1000, wrong)),
      qmem::bad_argument);
  // overlapping views: codes or absmax in x's bytes, codes over absmax, y over codes or absmax
  auto* const xbytes = reinterpret_cast<std::uint8_t*>(dx.view().data());
  tensor_view<std::uint8_t> codes_in_x(xbytes + 4, 1000, xv.space());
  tensor_view<float> absmax_in_x(dx.view().data() + 900, 16, xv.space());
  CHECK_THROWS_AS(quantize_blockwise<C8>(e, xv, 64, codes_in_x, absmax.view()), qmem::bad_argument);
  CHECK_THROWS_AS(quantize_blockwise<C8>(e, xv, 64, codes.view(), absmax_in_x), qmem::bad_argument);
  tensor_view<std::uint8_t> codes_in_y(reinterpret_cast<std::uint8_t*>(y.view().data()), 1000,
                                       y.view().space());
  CHECK_THROWS_AS(quantize_blockwise<C8>(e, xv, 64, codes_in_y, y.view().subview(200, 16)),
                  qmem::bad_argument);
  CHECK_THROWS_AS(
      dequantize_blockwise<C8>(e, tensor_view<std::uint8_t const>(codes_in_x), acv, 64, dx.view()),
      qmem::bad_argument);
  CHECK_THROWS_AS(
      dequantize_blockwise<C8>(e, cv, tensor_view<float const>(absmax_in_x), 64, dx.view()),
      qmem::bad_argument);
  CHECK(qmem::test::same_bits(B::download(dx.view()), x));
  try {
    quantize_blockwise<C8>(e, xv, 100, codes.view(), absmax.view());
  } catch (qmem::bad_argument const& err) {
    std::string const msg = err.what();
    CHECK(msg.find("block_size") != std::string::npos);
    CHECK(msg.find("100") != std::string::npos);
  }
  untouched();
}
TEST_CASE_TEMPLATE_APPLY(blockwise_bad, qmem::test::quant_backends);
