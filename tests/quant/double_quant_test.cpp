// Double quantization of block scales (quant/double_quant.hpp): the fixed-order offset, nested
// codes and scales, dequantize_scales and the one-pass nested dequantization, on every backend;
// bad arguments write nothing. (bitsandbytes agreement: tests/golden/formats_test.cpp.)
#include <qmem/quant.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "quant/quant_test_support.hpp"

namespace {
using namespace qmem;
using namespace qmem::quant;
using qmem::test::normal_floats;
} // namespace

TEST_CASE("double quant: the offset is the fixed-order (256-ary tree, double) mean") {
  std::vector<float> a(70000);
  for (std::size_t i = 0; i < a.size(); ++i)
    a[i] = 0.5f + static_cast<float>(i % 1000) * 1e-3f;
  // the tree, spelled out: leaves in chunks of 256, then chunks of 256 sums, ...
  auto chunk_sums = [](auto const& v) {
    std::vector<double> sums;
    for (std::size_t c = 0; c < v.size(); c += 256) {
      double s = 0.0;
      for (std::size_t i = c; i < std::min(v.size(), c + 256); ++i)
        s += v[i];
      sums.push_back(s);
    }
    return sums;
  };
  std::vector<double> level = chunk_sums(a);
  while (level.size() > 1)
    level = chunk_sums(level);
  float const expected = static_cast<float>(level[0] / static_cast<double>(a.size()));
  CHECK(qmem::quant::detail::tree_mean(a.data(), a.size()) == expected);
  CHECK(qmem::quant::detail::tree_mean(a.data(), 0) == 0.0f);
  float const one = 3.25f;
  CHECK(qmem::quant::detail::tree_mean(&one, 1) == 3.25f);
}

TEST_CASE_TEMPLATE_DEFINE("double quant: scales round trip and one-pass dequantization", B,
                          double_quant_roundtrip) {
  if (qmem::test::skip<B>())
    return;
  for (std::size_t m :
       {std::size_t{1}, std::size_t{5}, std::size_t{256}, std::size_t{257}, std::size_t{4097}}) {
    for (std::size_t nb : {std::size_t{64}, std::size_t{256}}) {
      CAPTURE(m);
      CAPTURE(nb);
      std::vector<float> absmax(m);
      auto const r = normal_floats(m, static_cast<std::uint32_t>(m));
      for (std::size_t i = 0; i < m; ++i)
        absmax[i] = 1.0f + 0.3f * std::fabs(r[i]);
      auto da = B::upload(absmax);
      auto dq = B::template alloc<std::uint8_t>(m);
      auto d2 = B::template alloc<float>(block_count(m, nb));
      auto doff = B::template alloc<float>(1);
      quantize_scales(B::exec(), tensor_view<float const>(da.view()), nb, dq.view(), d2.view(),
                      doff.view());
      auto const q = B::download(dq.view());
      auto const a2 = B::download(d2.view());
      float const off = B::download(doff.view())[0];
      CHECK(off == qmem::quant::detail::tree_mean(absmax.data(), m));
      // reference: quantize_blockwise<dynamic_signed> of absmax - offset
      std::vector<float> centered(m);
      for (std::size_t i = 0; i < m; ++i)
        centered[i] = absmax[i] - off;
      std::vector<std::uint8_t> rq(m);
      std::vector<float> ra(block_count(m, nb));
      quantize_blockwise<dynamic_signed>(exec::host{}, view(std::as_const(centered)), nb, view(rq),
                                         view(ra));
      CHECK(q == rq);
      CHECK(qmem::test::same_bits(a2, ra));
      // read back
      auto ds = B::template alloc<float>(m);
      dequantize_scales(B::exec(), tensor_view<std::uint8_t const>(dq.view()),
                        tensor_view<float const>(d2.view()), tensor_view<float const>(doff.view()),
                        nb, ds.view());
      auto const back = B::download(ds.view());
      for (std::size_t i = 0; i < m; ++i) {
        float const expect = dynamic_signed::book.value.value[q[i]] * a2[i / nb] + off;
        REQUIRE(std::bit_cast<std::uint32_t>(back[i]) == std::bit_cast<std::uint32_t>(expect));
        CHECK(std::fabs(back[i] - absmax[i]) < 0.01f * absmax[i]);
      }
      // one-pass NF4 dequantization with these scales == two steps
      std::size_t const block = 64;
      std::size_t const n = m * block - 3; // last block partial, odd n
      auto const x = normal_floats(n, 11);
      std::vector<std::uint8_t> codes(code_bytes<nf4>(n));
      std::vector<float> plain(m);
      quantize_blockwise<nf4>(exec::host{}, view(std::as_const(x)), block, view(codes),
                              view(plain));
      auto dc = B::upload(codes);
      auto dy = B::template alloc<bf16>(n);
      dequantize_blockwise_nested<nf4>(B::exec(), tensor_view<std::uint8_t const>(dc.view()),
                                       tensor_view<std::uint8_t const>(dq.view()),
                                       tensor_view<float const>(d2.view()),
                                       tensor_view<float const>(doff.view()), block, nb, dy.view());
      std::vector<bf16> y2(n);
      dequantize_blockwise<nf4>(exec::host{}, view(std::as_const(codes)), view(std::as_const(back)),
                                block, view(y2));
      CHECK(qmem::test::same_bits(B::download(dy.view()), y2));
    }
  }
}
TEST_CASE_TEMPLATE_APPLY(double_quant_roundtrip, qmem::test::quant_backends);

TEST_CASE_TEMPLATE_DEFINE("double quant: bad arguments throw and write nothing", B,
                          double_quant_bad) {
  if (qmem::test::skip<B>())
    return;
  std::vector<float> absmax(300, 1.0f);
  auto da = B::upload(absmax);
  tensor_view<float const> av(da.view());
  auto dq = B::template alloc<std::uint8_t>(300);
  auto d2 = B::template alloc<float>(2);
  auto doff = B::template alloc<float>(2);
  auto const q0 = B::download(dq.view());
  auto const a0 = B::download(d2.view());
  auto const o0 = B::download(doff.view());
  auto const e = B::exec();
  CHECK_THROWS_AS(quantize_scales(e, av, 100, dq.view(), d2.view(), doff.view().subview(0, 1)),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize_scales(e, av, 32, dq.view(), d2.view(), doff.view().subview(0, 1)),
                  qmem::bad_argument);
  CHECK_THROWS_AS(
      quantize_scales(e, av, 256, dq.view().subview(0, 299), d2.view(), doff.view().subview(0, 1)),
      qmem::bad_argument);
  CHECK_THROWS_AS(
      quantize_scales(e, av, 256, dq.view(), d2.view().subview(0, 1), doff.view().subview(0, 1)),
      qmem::bad_argument);
  CHECK_THROWS_AS(quantize_scales(e, av, 256, dq.view(), d2.view(), doff.view()),
                  qmem::bad_argument); // offset must have 1 element
  auto dy = B::template alloc<float>(300 * 64);
  auto const y0 = B::download(dy.view());
  auto dc = B::template alloc<std::uint8_t>(300 * 32);
  CHECK_THROWS_AS(dequantize_blockwise_nested<nf4>(
                      e, tensor_view<std::uint8_t const>(dc.view()),
                      tensor_view<std::uint8_t const>(dq.view()),
                      tensor_view<float const>(d2.view()),
                      tensor_view<float const>(doff.view().subview(0, 1)), 64, 128, dy.view()),
                  qmem::bad_argument); // absmax2 has 2, nested block 128 needs 3
  CHECK_THROWS_AS(dequantize_blockwise_nested<nf4>(
                      e, tensor_view<std::uint8_t const>(dc.view()),
                      tensor_view<std::uint8_t const>(dq.view()),
                      tensor_view<float const>(d2.view()),
                      tensor_view<float const>(doff.view().subview(0, 1)), 128, 256, dy.view()),
                  qmem::bad_argument); // block 128 needs 150 scales
  // an output over an input: the offset or the codes in absmax, dequantized scales over absmax2
  // and the offset, y over the offset
  auto const ad = da.view();
  tensor_view<std::uint8_t> q_in_a(reinterpret_cast<std::uint8_t*>(ad.data()) + 100, 300,
                                   ad.space());
  CHECK_THROWS_AS(quantize_scales(e, av, 256, dq.view(), d2.view(), ad.subview(7, 1)),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize_scales(e, av, 256, q_in_a, d2.view(), doff.view().subview(0, 1)),
                  qmem::bad_argument);
  CHECK_THROWS_AS(dequantize_scales(e, tensor_view<std::uint8_t const>(dq.view()),
                                    tensor_view<float const>(ad.subview(0, 2)),
                                    tensor_view<float const>(ad.subview(2, 1)), 256, ad),
                  qmem::bad_argument);
  CHECK_THROWS_AS(dequantize_blockwise_nested<nf4>(
                      e, tensor_view<std::uint8_t const>(dc.view()),
                      tensor_view<std::uint8_t const>(dq.view()),
                      tensor_view<float const>(d2.view()),
                      tensor_view<float const>(dy.view().subview(5, 1)), 64, 256, dy.view()),
                  qmem::bad_argument);
  CHECK(qmem::test::same_bits(B::download(da.view()), absmax));
  CHECK(B::download(dq.view()) == q0);
  CHECK(qmem::test::same_bits(B::download(d2.view()), a0));
  CHECK(qmem::test::same_bits(B::download(doff.view()), o0));
  CHECK(qmem::test::same_bits(B::download(dy.view()), y0));
}
TEST_CASE_TEMPLATE_APPLY(double_quant_bad, qmem::test::quant_backends);

TEST_CASE_TEMPLATE_DEFINE("double quant: quantize_blockwise_nested equals quantize_blockwise "
                          "then quantize_scales",
                          B, double_quant_one_call) {
  if (qmem::test::skip<B>())
    return;
  // the reference: the two calls on the host; n whole and partial blocks, 4-bit and 8-bit codes
  auto check = [&]<class C, class T>(std::type_identity<C>, std::type_identity<T>, std::size_t n,
                                     std::size_t block, std::size_t nb) {
    CAPTURE(n);
    CAPTURE(block);
    CAPTURE(nb);
    std::vector<T> x(n);
    auto const r = normal_floats(n, static_cast<std::uint32_t>(n + block));
    for (std::size_t i = 0; i < n; ++i)
      x[i] = T(r[i] * static_cast<float>(1 + i / block % 5));
    std::size_t const m = block_count(n, block);
    std::vector<std::uint8_t> hc(code_bytes<C>(n));
    std::vector<float> ha(m);
    std::vector<std::uint8_t> hq(m);
    std::vector<float> h2(block_count(m, nb));
    std::vector<float> hoff(1);
    quantize_blockwise<C>(exec::host{}, view(std::as_const(x)), block, view(hc), view(ha));
    quantize_scales(exec::host{}, view(std::as_const(ha)), nb, view(hq), view(h2), view(hoff));
    auto dx = B::upload(x);
    auto dc = B::template alloc<std::uint8_t>(hc.size());
    auto da = B::template alloc<float>(m);
    auto dq = B::template alloc<std::uint8_t>(m);
    auto d2 = B::template alloc<float>(h2.size());
    auto doff = B::template alloc<float>(1);
    quantize_blockwise_nested<C>(B::exec(), tensor_view<T const>(dx.view()), block, dc.view(),
                                 da.view(), nb, dq.view(), d2.view(), doff.view());
    CHECK(B::download(dc.view()) == hc);
    CHECK(qmem::test::same_bits(B::download(da.view()), ha));
    CHECK(B::download(dq.view()) == hq);
    CHECK(qmem::test::same_bits(B::download(d2.view()), h2));
    CHECK(qmem::test::same_bits(B::download(doff.view()), hoff));
  };
  for (std::size_t n :
       {std::size_t{64}, std::size_t{64 * 300}, std::size_t{64 * 300 - 5}, std::size_t{64 * 70001}})
    check(std::type_identity<nf4>{}, std::type_identity<bf16>{}, n, 64, 256);
  check(std::type_identity<fp4>{}, std::type_identity<bf16>{}, 128 * 5000, 128, 64);
  check(std::type_identity<dynamic_signed>{}, std::type_identity<float>{}, 256 * 4097, 256, 256);
  check(std::type_identity<dynamic_signed>{}, std::type_identity<float>{}, 256 * 4097 + 9, 256,
        4096);
}
TEST_CASE_TEMPLATE_APPLY(double_quant_one_call, qmem::test::quant_backends);

TEST_CASE_TEMPLATE_DEFINE("double quant: quantize_blockwise_nested with bad arguments throws and "
                          "writes nothing",
                          B, double_quant_one_call_bad) {
  if (qmem::test::skip<B>())
    return;
  std::size_t const n = 64 * 300;
  auto dx = B::upload(normal_floats(n, 5));
  tensor_view<float const> xv(dx.view());
  auto dc = B::template alloc<std::uint8_t>(n / 2);
  auto da = B::template alloc<float>(300);
  auto dq = B::template alloc<std::uint8_t>(300);
  auto d2 = B::template alloc<float>(2);
  auto doff = B::template alloc<float>(2);
  auto const c0 = B::download(dc.view());
  auto const a0 = B::download(da.view());
  auto const q0 = B::download(dq.view());
  auto const s0 = B::download(d2.view());
  auto const o0 = B::download(doff.view());
  auto const e = B::exec();
  auto const off1 = doff.view().subview(0, 1);
  // block 48 (not a power of two), absmax of 299, nested block 32, absmax2 of 1, offset of 2
  CHECK_THROWS_AS(quantize_blockwise_nested<nf4>(e, xv, 48, dc.view(), da.view(), 256, dq.view(),
                                                 d2.view(), off1),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize_blockwise_nested<nf4>(e, xv, 64, dc.view(), da.view().subview(0, 299),
                                                 256, dq.view(), d2.view(), off1),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize_blockwise_nested<nf4>(e, xv, 64, dc.view(), da.view(), 32, dq.view(),
                                                 d2.view(), off1),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize_blockwise_nested<nf4>(e, xv, 64, dc.view(), da.view(), 256, dq.view(),
                                                 d2.view().subview(0, 1), off1),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize_blockwise_nested<nf4>(e, xv, 64, dc.view(), da.view(), 256, dq.view(),
                                                 d2.view(), doff.view()),
                  qmem::bad_argument);
  // outputs over each other or over x: the offset in absmax, qabsmax in the codes, absmax2 in x
  auto const cd = dc.view();
  tensor_view<std::uint8_t> q_in_c(cd.data() + 10, 300, cd.space());
  auto* const xd = const_cast<float*>(xv.data());
  tensor_view<float> a2_in_x(xd + 100, 2, cd.space());
  CHECK_THROWS_AS(quantize_blockwise_nested<nf4>(e, xv, 64, dc.view(), da.view(), 256, dq.view(),
                                                 d2.view(), da.view().subview(3, 1)),
                  qmem::bad_argument);
  CHECK_THROWS_AS(
      quantize_blockwise_nested<nf4>(e, xv, 64, dc.view(), da.view(), 256, q_in_c, d2.view(), off1),
      qmem::bad_argument);
  CHECK_THROWS_AS(quantize_blockwise_nested<nf4>(e, xv, 64, dc.view(), da.view(), 256, dq.view(),
                                                 a2_in_x, off1),
                  qmem::bad_argument);
  CHECK(B::download(dc.view()) == c0);
  CHECK(qmem::test::same_bits(B::download(da.view()), a0));
  CHECK(B::download(dq.view()) == q0);
  CHECK(qmem::test::same_bits(B::download(d2.view()), s0));
  CHECK(qmem::test::same_bits(B::download(doff.view()), o0));
}
TEST_CASE_TEMPLATE_APPLY(double_quant_one_call_bad, qmem::test::quant_backends);
