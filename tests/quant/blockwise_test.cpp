// Blockwise quantize/dequantize (quant/blockwise.hpp) on every backend, for every code type:
// agreement with a plain scalar reference written from the definition, every block size, n = 1,
// n < block, odd n, all-zero blocks, NaN/inf inputs, the error on N(0, 1) data, and bad arguments
// (nothing written). The CUDA backend runs the same cases, so it is checked against the same
// reference bit for bit.
#include <qmem/quant.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "quant/quant_test_support.hpp"

namespace {

using namespace qmem;
using namespace qmem::quant;
using qmem::test::convert;
using qmem::test::normal_floats;

// A user table (16 values, not symmetric) and a 256-entry one: both become formats by declaring.
inline constexpr code_table<16> user4_values = {{-1.0f, -0.7f, -0.5f, -0.35f, -0.2f, -0.1f, -0.04f,
                                                 0.0f, 0.05f, 0.12f, 0.22f, 0.33f, 0.45f, 0.6f,
                                                 0.8f, 1.0f}};
constexpr code_table<256> make_user8() {
  code_table<256> t{};
  for (int i = 0; i < 256; ++i) // cubic spacing, dense near 0
    t.value[i] = static_cast<float>((i - 128) * (i - 128) * (i - 128)) / (128.0f * 128.0f * 128.0f);
  return t;
}
inline constexpr code_table<256> user8_values = make_user8();
using user4 = table_code<user4_values>;
using user8 = table_code<user8_values>;

template <class... Ts>
struct type_list {};
using all_codes = type_list<dynamic_signed, dynamic_unsigned, linear_signed, nf4, fp4, fp8_e4m3,
                            fp8_e5m2, user4, user8>;

template <class... Ts, class F>
void for_each_type(type_list<Ts...>, F&& f) {
  (f(std::type_identity<Ts>{}), ...);
}

template <class C>
std::string code_name() {
  if constexpr (std::is_same_v<C, user4>)
    return "user4";
  else if constexpr (std::is_same_v<C, user8>)
    return "user8";
  else
    return std::string(to_string(code_id_of_v<C>));
}

// ---- the reference: the definition, element by element ------------------------------------------

template <class C, class T>
void reference_quantize(std::vector<T> const& x, std::size_t block, rounding r,
                        std::vector<std::uint8_t>& codes, std::vector<float>& absmax) {
  std::size_t const n = x.size();
  codes.assign(code_bytes<C>(n), 0);
  absmax.assign(block_count(n, block), 0.0f);
  for (std::size_t b = 0; b < absmax.size(); ++b) {
    float m = 0.0f;
    bool nan = false;
    for (std::size_t i = b * block; i < n && i < (b + 1) * block; ++i) {
      float const a = std::fabs(to_float(x[i]));
      if (std::isnan(a))
        nan = true;
      else if (a > m)
        m = a;
    }
    absmax[b] = nan ? std::numeric_limits<float>::quiet_NaN() : m;
  }
  for (std::size_t i = 0; i < n; ++i) {
    float const xn = to_float(x[i]) * (1.0f / absmax[i / block]);
    std::uint8_t const c = r.stochastic ? encode_stochastic<C>(xn, uniform01(r.seed, i), C::book)
                                        : C::encode(xn, C::book);
    if constexpr (C::bits == 8)
      codes[i] = c;
    else if (i % 2 == 0)
      codes[i / 2] = static_cast<std::uint8_t>((c << 4) | C::zero_code);
    else
      codes[i / 2] = static_cast<std::uint8_t>((codes[i / 2] & 0xf0) | c);
  }
}

template <class C, class T>
std::vector<T> reference_dequantize(std::vector<std::uint8_t> const& codes,
                                    std::vector<float> const& absmax, std::size_t block,
                                    std::size_t n) {
  std::vector<T> y(n);
  for (std::size_t i = 0; i < n; ++i) {
    std::uint8_t const c = C::bits == 8 ? codes[i]
                                        : static_cast<std::uint8_t>(i % 2 == 0 ? codes[i / 2] >> 4
                                                                               : codes[i / 2] & 15);
    y[i] = from_float<T>(C::decode(c, C::book) * absmax[i / block]);
  }
  return y;
}

bool same_float(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) ||
         std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b);
}

template <class T>
bool same_value_bits(T a, T b) {
  if constexpr (std::is_same_v<T, float>)
    return same_float(a, b);
  else if constexpr (std::is_same_v<T, double>)
    return (std::isnan(a) && std::isnan(b)) ||
           std::bit_cast<std::uint64_t>(a) == std::bit_cast<std::uint64_t>(b);
  else
    return (std::isnan(a.to_float()) && std::isnan(b.to_float())) || a.bits == b.bits;
}

// Quantizes and dequantizes on backend B and compares with the reference.
template <class B, class C, class T>
void check_against_reference(std::vector<T> const& x, std::size_t block, rounding r,
                             std::string const& what) {
  CAPTURE(what);
  std::size_t const n = x.size();
  std::vector<std::uint8_t> rc;
  std::vector<float> ra;
  reference_quantize<C>(x, block, r, rc, ra);
  auto dx = B::upload(x);
  auto dc = B::template alloc<std::uint8_t>(code_bytes<C>(n));
  auto da = B::template alloc<float>(block_count(n, block));
  quantize_blockwise<C>(B::exec(), tensor_view<T const>(dx.view()), block, dc.view(), da.view(), r);
  auto const codes = B::download(dc.view());
  auto const absmax = B::download(da.view());
  REQUIRE(absmax.size() == ra.size());
  for (std::size_t b = 0; b < ra.size(); ++b)
    if (!same_float(absmax[b],
                    ra[b])) // one message argument: nvcc rejects doctest's comma form here
      FAIL(qmem::detail::message("absmax[", b, "] = ", absmax[b], ", expected ", ra[b]));
  REQUIRE(codes == rc);
  auto dy = B::template alloc<T>(n);
  dequantize_blockwise<C>(B::exec(), tensor_view<std::uint8_t const>(dc.view()),
                          tensor_view<float const>(da.view()), block, dy.view());
  auto const y = B::download(dy.view());
  auto const ry = reference_dequantize<C, T>(rc, ra, block, n);
  for (std::size_t i = 0; i < n; ++i)
    if (!same_value_bits(y[i], ry[i]))
      FAIL(qmem::detail::message("y[", i, "] differs from the reference"));
}

template <class C>
std::vector<float> input_for(std::size_t n, std::uint32_t seed) {
  auto v = normal_floats(n, seed);
  if constexpr (!C::is_signed)
    for (auto& e : v)
      e = std::fabs(e);
  for (std::size_t i = 0; i < n; i += 97) // outliers, as in bnb's golden data
    v[i] *= 8.0f;
  return v;
}

} // namespace

TEST_CASE_TEMPLATE_DEFINE("blockwise: every code, block size and size agrees with the reference", B,
                          blockwise_reference) {
  if (qmem::test::skip<B>())
    return;
  for_each_type(all_codes{}, [&]<class C>(std::type_identity<C>) {
    for (std::size_t block = 32; block <= 4096; block *= 2) {
      if (!valid_block_size<C>(block))
        continue;
      for (std::size_t n : {std::size_t{1}, std::size_t{2}, std::size_t{7}, block - 1, block,
                            block + 1, 3 * block + 5}) {
        auto const x = input_for<C>(n, static_cast<std::uint32_t>(n * 31 + block));
        std::string const what =
            code_name<C>() + " block " + std::to_string(block) + " n " + std::to_string(n);
        check_against_reference<B, C>(x, block, {}, what + " f32");
        if (block == 64 || block == 4096) {
          check_against_reference<B, C>(convert<bf16>(x), block, {}, what + " bf16");
          check_against_reference<B, C>(convert<f16>(x), block, {}, what + " f16");
          check_against_reference<B, C>(std::vector<double>(x.begin(), x.end()), block, {},
                                        what + " f64");
        }
      }
    }
  });
}
TEST_CASE_TEMPLATE_APPLY(blockwise_reference, qmem::test::quant_backends);

TEST_CASE_TEMPLATE_DEFINE("blockwise: mean absolute error on N(0, 1) data", B, blockwise_error) {
  if (qmem::test::skip<B>())
    return;
  std::size_t const n = std::size_t{1} << 20;
  auto const x = normal_floats(n, 2024);
  auto const dx = B::upload(x);
  auto measure = [&]<class C>(std::type_identity<C>, std::size_t block) {
    auto dc = B::template alloc<std::uint8_t>(code_bytes<C>(n));
    auto da = B::template alloc<float>(block_count(n, block));
    auto dy = B::template alloc<float>(n);
    quantize_blockwise<C>(B::exec(), tensor_view<float const>(dx.view()), block, dc.view(),
                          da.view());
    dequantize_blockwise<C>(B::exec(), tensor_view<std::uint8_t const>(dc.view()),
                            tensor_view<float const>(da.view()), block, dy.view());
    auto const y = B::download(dy.view());
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
    auto dc = B::template alloc<std::uint8_t>(code_bytes<C>(x.size()));
    auto da = B::template alloc<float>(4);
    quantize_blockwise<C>(B::exec(), tensor_view<float const>(dx.view()), 64, dc.view(), da.view());
    auto const a = B::download(da.view());
    auto const c = B::download(dc.view());
    CHECK(a[0] == 0.0f);
    CHECK(a[2] == 0.5f);
    std::uint8_t const first = C::bits == 8 ? c[0] : static_cast<std::uint8_t>(c[0] >> 4);
    CHECK(int(first) == int(expected_code));
    auto dy = B::template alloc<float>(x.size());
    dequantize_blockwise<C>(B::exec(), tensor_view<std::uint8_t const>(dc.view()),
                            tensor_view<float const>(da.view()), 64, dy.view());
    auto const y = B::download(dy.view());
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
    auto dc = B::template alloc<std::uint8_t>(code_bytes<C>(x.size()));
    auto da = B::template alloc<float>(4);
    quantize_blockwise<C>(B::exec(), tensor_view<float const>(dx.view()), 64, dc.view(), da.view());
    auto const a = B::download(da.view());
    CHECK(std::isnan(a[0]));
    CHECK(!std::signbit(a[0]));
    CHECK(a[1] == inf);
    CHECK(std::isfinite(a[2]));
    auto dy = B::template alloc<float>(x.size());
    dequantize_blockwise<C>(B::exec(), tensor_view<std::uint8_t const>(dc.view()),
                            tensor_view<float const>(da.view()), 64, dy.view());
    auto const y = B::download(dy.view());
    for (std::size_t i = 0; i < 64; ++i)
      CHECK(std::isnan(y[i])); // NaN absmax: the whole block is NaN
    for (std::size_t i = 64; i < 128; ++i)
      CHECK(!std::isfinite(y[i])); // inf absmax: inf or NaN, never a silent finite value
    for (std::size_t i = 128; i < 256; ++i)
      CHECK(std::isfinite(y[i]));
    // bf16 output: one rounding of the same float values, NaN included
    auto db = B::template alloc<bf16>(x.size());
    dequantize_blockwise<C>(B::exec(), tensor_view<std::uint8_t const>(dc.view()),
                            tensor_view<float const>(da.view()), 64, db.view());
    auto const yb = B::download(db.view());
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

TEST_CASE("blockwise: static block sizes and helpers") {
  static_assert(valid_block_size<nf4>(32) && valid_block_size<nf4>(4096));
  static_assert(!valid_block_size<dynamic_signed>(32) && valid_block_size<dynamic_signed>(64));
  static_assert(!valid_block_size<fp4>(48) && !valid_block_size<fp4>(8192));
  static_assert(code_bytes<nf4>(7) == 4 && code_bytes<dynamic_signed>(7) == 7);
  static_assert(block_count(1000, 64) == 16 && block_count(0, 64) == 0);
  // n = 0 is valid and writes nothing
  std::vector<float> none;
  std::vector<std::uint8_t> c;
  std::vector<float> a;
  CHECK_NOTHROW(
      quantize_blockwise<nf4>(exec::host{}, view(std::as_const(none)), 64, view(c), view(a)));
}
