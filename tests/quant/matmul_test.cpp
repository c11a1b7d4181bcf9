// Matmul with quantized weights: the host reference against hand-computed values, every backend
// against the host reference (4-bit forward and grad-input, both the GEMV-style and the
// large-batch paths), int8 products bit for bit, and the preconditions.
//
// Tolerances of a 4-bit product (docs/matmul.md derives them). The host reference dequantizes
// (w = round_T(code * scale)), sums the exact products in double and rounds once to T.
// - Paths with the same weights (host, CUDA m > 16: dequantize + cuBLASLt; CUDA grad-input): they
//   sum the same exact products in fp32 in another order, on tensor cores that may truncate:
//   |got - ref| <= 2^(1-p) |ref| (two roundings to T of nearby sums, p = 8 for bf16, 11 for f16)
//   + 2 k 2^-24 S, S = sum |x_i w_i|.
// - The CUDA GEMV path (m <= 16) computes sum_b scale_b * sum_{i in b} round_T(v_i) x_i in fp32:
//   checked tightly against that function evaluated in double (the "model"):
//   |got - model| <= 2^(1-p) |model| + 4 (k + 64) 2^-24 S', S' = sum |x_i scale_b round_T(v_i)|;
//   and against the reference with the bound the documentation states: the model's weight
//   scale * round_T(v) and the reference's round_T(v * scale) are both within 2^-p relative of
//   v * scale, which adds 2^(1-p) / (1 - 2^-p) S.
// A misplaced code, scale or row changes a result by about |y|, far above the tight bounds.
#include <qmem/quant/matmul.hpp>
#if QMEM_HAS_CUDA()
#include <qmem/quant/cuda/matmul.cuh>
#endif

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "support/backend.hpp"

namespace {

using namespace qmem;
using namespace qmem::quant;

//! A random 4-bit weight with its scales, owned on the host.
struct host_weight {
  std::size_t rows = 0, cols = 0, block = 64;
  bool nested = false;
  std::vector<std::uint8_t> codes, qabsmax;
  std::vector<float> absmax, absmax2;
  float offset = 0.0f;
};

host_weight random_weight(std::size_t rows, std::size_t cols, std::size_t block, bool nested,
                          std::mt19937& rng) {
  host_weight w;
  w.rows = rows;
  w.cols = cols;
  w.block = block;
  w.nested = nested;
  std::size_t const n = rows * cols;
  std::size_t const blocks = (n + block - 1) / block;
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.25f, 2.0f);
  w.codes.resize((n + 1) / 2);
  for (auto& c : w.codes)
    c = static_cast<std::uint8_t>(byte(rng));
  if (nested) {
    w.qabsmax.resize(blocks);
    for (auto& q : w.qabsmax)
      q = static_cast<std::uint8_t>(byte(rng));
    w.absmax2.resize((blocks + 255) / 256);
    for (auto& a : w.absmax2)
      a = scale(rng);
    w.offset = 0.75f;
  } else {
    w.absmax.resize(blocks);
    for (auto& a : w.absmax)
      a = scale(rng);
  }
  return w;
}

template <class T>
std::vector<T> random_matrix(std::size_t count, std::mt19937& rng) {
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<T> v(count);
  for (auto& x : v)
    x = from_float<T>(d(rng));
  return v;
}

//! The host weight uploaded to backend B (arrays kept alive alongside the view).
template <class B, class Code>
struct backend_weight {
  decltype(B::upload(std::vector<std::uint8_t>{})) codes, qabsmax;
  decltype(B::upload(std::vector<float>{})) absmax, absmax2;
  weight_4bit_view<Code> view;

  explicit backend_weight(host_weight const& h)
      : codes(B::upload(h.codes)), qabsmax(B::upload(h.qabsmax)), absmax(B::upload(h.absmax)),
        absmax2(B::upload(h.absmax2)) {
    view.codes = codes.view();
    view.rows = h.rows;
    view.cols = h.cols;
    view.block_size = h.block;
    if (h.nested) {
      view.scales.qabsmax = qabsmax.view();
      view.scales.absmax2 = absmax2.view();
      view.scales.offset = h.offset;
    } else {
      view.scales.absmax = absmax.view();
    }
  }
};

template <class Code>
weight_4bit_view<Code> host_view(host_weight const& h) {
  weight_4bit_view<Code> v;
  v.codes = {h.codes.data(), h.codes.size()};
  v.rows = h.rows;
  v.cols = h.cols;
  v.block_size = h.block;
  if (h.nested) {
    v.scales.qabsmax = {h.qabsmax.data(), h.qabsmax.size()};
    v.scales.absmax2 = {h.absmax2.data(), h.absmax2.size()};
    v.scales.offset = h.offset;
  } else {
    v.scales.absmax = {h.absmax.data(), h.absmax.size()};
  }
  return v;
}

template <class T>
constexpr int precision_bits = std::is_same_v<T, bf16> ? 8 : 11;

//! Checks got against ref with the tolerance derived above; `terms[i]` is sum |x w| of output i
//! and `depth` the summation length.
//! `sum_coef` multiplies 2^-24 S (2 k for a plain fp32 sum), `weight_coef` multiplies S for the
//! weights' own difference (0 when both sides use the same weights).
template <class T>
void expect_close(std::vector<T> const& got, std::vector<T> const& ref,
                  std::vector<double> const& terms, double sum_coef, double weight_coef,
                  std::string const& what) {
  REQUIRE(got.size() == ref.size());
  std::size_t bad = 0;
  double worst = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    double const r = to_float(ref[i]);
    double const g = to_float(got[i]);
    double const tol = std::ldexp(std::fabs(r), 1 - precision_bits<T>) +
                       sum_coef * std::ldexp(terms[i], -24) + weight_coef * terms[i];
    double const err = std::fabs(g - r);
    worst = std::max(worst, tol > 0 ? err / tol : err);
    if (!(err <= tol)) {
      if (bad < 5)
        MESSAGE(what << ": element " << i << " is " << g << ", reference " << r << ", tolerance "
                     << tol);
      ++bad;
    }
  }
  INFO(what << ": worst error / tolerance = " << worst);
  CHECK(bad == 0);
}

//! 2 k: the fp32 summation term of paths that use the reference's weights.
constexpr double plain_sum(std::size_t k) { return 2.0 * static_cast<double>(k); }
//! 4 (k + 64): the GEMV path's fp32 summation term (docs/matmul.md).
constexpr double gemv_sum(std::size_t k) { return 4.0 * static_cast<double>(k + 64); }
//! 2^(1-p) / (1 - 2^-p): the GEMV path's weight difference against the reference.
template <class T>
double gemv_weight_coef() {
  double const u = std::ldexp(1.0, -precision_bits<T>);
  return 2.0 * u / (1.0 - u);
}

//! The GEMV path's function evaluated in double, rounded once to T, and its sums of |terms|:
//! y[i, j] = sum_l x[i, l] * scale(j * k + l) * round_T(value(code(j * k + l))).
template <class T, class Code>
void gemv_model(host_weight const& hw, std::vector<T> const& x, std::size_t m,
                std::vector<T>& model, std::vector<double>& terms) {
  auto const v = host_view<Code>(hw);
  std::size_t const n = hw.rows, k = hw.cols;
  std::vector<double> w(n * k);
  for (std::size_t i = 0; i < n * k; ++i)
    w[i] = static_cast<double>(qmem::quant::detail::mm::host_scale(v, i / hw.block)) *
           static_cast<double>(qmem::quant::detail::mm::table_value<T>(
               Code::decode(qmem::quant::detail::nibble(hw.codes.data(), i), Code::book)));
  model.assign(m * n, T{});
  terms.assign(m * n, 0.0);
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (std::size_t l = 0; l < k; ++l) {
        double const t = static_cast<double>(to_float(x[i * k + l])) * w[j * k + l];
        acc += t;
        terms[i * n + j] += std::fabs(t);
      }
      model[i * n + j] = from_float<T>(static_cast<float>(acc));
    }
}

template <class B>
auto workspace_for(std::size_t bytes) {
  if constexpr (std::is_same_v<B, qmem::test::host_backend>)
    return B::template alloc<std::byte>(0);
  else
    return B::template alloc<std::byte>(bytes);
}

//! Per output, the sum of |a * w| over the dot product with the reference's weights w (the
//! tolerances' S): the forward's out[i, j] over l of a[i, l] w[j, l] (a = x, m x k), or
//! grad_input's out[i, l] over j of a[i, j] w[j, l] (a = grad_y, m x n).
template <class T, class Code>
std::vector<double> abs_terms(host_weight const& hw, std::vector<T> const& a, std::size_t m,
                              bool grad) {
  std::size_t const n = hw.rows, k = hw.cols;
  std::vector<float> const wd = qmem::quant::detail::mm::host_dequantized<T>(host_view<Code>(hw));
  std::vector<double> terms(m * (grad ? k : n), 0.0);
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j)
      for (std::size_t l = 0; l < k; ++l) {
        T const ai = grad ? a[i * n + j] : a[i * k + l];
        terms[grad ? i * k + l : i * n + j] +=
            std::fabs(static_cast<double>(to_float(ai)) * wd[j * k + l]);
      }
  return terms;
}

//! "<backend> <what> m=.. n=.. k=.. block=.. plain|nested", naming a checked case.
inline std::string case_name(char const* backend, char const* what, std::size_t m, std::size_t n,
                             std::size_t k, std::size_t block, bool nested) {
  return std::string(backend) + " " + what + " m=" + std::to_string(m) + " n=" + std::to_string(n) +
         " k=" + std::to_string(k) + " block=" + std::to_string(block) +
         (nested ? " nested" : " plain");
}

template <class B, class T, class Code>
void check_forward(std::size_t m, std::size_t n, std::size_t k, std::size_t block, bool nested,
                   std::mt19937& rng) {
  host_weight const hw = random_weight(n, k, block, nested, rng);
  std::vector<T> const x = random_matrix<T>(m * k, rng);
  std::vector<T> ref(m * n);
  matmul_4bit<T>(exec::host{}, {x.data(), x.size()}, m, host_view<Code>(hw),
                 tensor_view<T>{ref.data(), ref.size()});
  std::vector<double> const terms = abs_terms<T, Code>(hw, x, m, false);

  backend_weight<B, Code> bw(hw);
  auto bx = B::upload(x);
  auto by = B::template alloc<T>(m * n);
  auto ws = workspace_for<B>(matmul_4bit_workspace_bytes<T>(m, bw.view));
  if (m <= gemv_max_rows)
    matmul_4bit<T>(B::exec(), bx.view(), m, bw.view, by.view()); // no workspace needed
  else
    matmul_4bit<T>(B::exec(), bx.view(), m, bw.view, by.view(), ws.view());
  std::vector<T> const got = B::download(by.view());
  std::string const what = case_name(B::name, "forward", m, n, k, block, nested);
  if (std::string(B::name) != "host" && m <= gemv_max_rows) {
    // the GEMV path: tightly against its own function, and within the documented bound of the
    // reference
    std::vector<T> model;
    std::vector<double> mterms;
    gemv_model<T, Code>(hw, x, m, model, mterms);
    expect_close(got, model, mterms, gemv_sum(k), 0.0, what + " (against the GEMV model)");
    expect_close(got, ref, terms, gemv_sum(k), gemv_weight_coef<T>(), what);
  } else {
    expect_close(got, ref, terms, plain_sum(k), 0.0, what);
  }
}

template <class B, class T, class Code>
void check_grad_input(std::size_t m, std::size_t n, std::size_t k, std::size_t block, bool nested,
                      std::mt19937& rng) {
  host_weight const hw = random_weight(n, k, block, nested, rng);
  std::vector<T> const gy = random_matrix<T>(m * n, rng);
  std::vector<T> ref(m * k);
  matmul_4bit_grad_input<T>(exec::host{}, {gy.data(), gy.size()}, m, host_view<Code>(hw),
                            tensor_view<T>{ref.data(), ref.size()});
  std::vector<double> const terms = abs_terms<T, Code>(hw, gy, m, true);

  backend_weight<B, Code> bw(hw);
  auto bg = B::upload(gy);
  auto bx = B::template alloc<T>(m * k);
  auto ws = workspace_for<B>(matmul_4bit_grad_input_workspace_bytes<T>(m, bw.view));
  matmul_4bit_grad_input<T>(B::exec(), bg.view(), m, bw.view, bx.view(), ws.view());
  std::vector<T> const got = B::download(bx.view());
  expect_close(got, ref, terms, plain_sum(n), 0.0,
               case_name(B::name, "grad_input", m, n, k, block, nested));
}

struct shape {
  std::size_t m, n, k, block;
};

// Odd shapes: k not a multiple of the block (96, 160 with 64; 2080 with 4096), n not a multiple of
// the 16-row tile, k not a multiple of 32 (77, 100: the generic kernel), m across 1..16 and
// beyond 16 (the dequantize + cuBLASLt path), a weight smaller than one block.
// The fast GEMV kernel takes k % 64 == 0 and k % block == 0 (with blocks of 32, 64 and >= 128
// compiled separately): {3, 64, 256, 64}, {16, 33, 512, 64}, {2, 300, 384, 128}, {4, 45, 1408, 32},
// {11, 70, 4096, 4096}, {1, 130, 1024, 256}; the others take the generic kernel.
constexpr shape shapes[] = {
    {1, 37, 96, 64},    {3, 64, 256, 64},     {8, 50, 160, 32},    {9, 24, 100, 256},
    {16, 33, 512, 64},  {5, 20, 77, 64},      {1, 1, 1, 32},       {12, 17, 2080, 4096},
    {2, 300, 384, 128}, {17, 40, 128, 64},    {40, 70, 192, 128},  {33, 19, 64, 32},
    {4, 45, 1408, 32},  {11, 70, 4096, 4096}, {1, 130, 1024, 256}, {7, 16, 64, 128},
};

} // namespace

TEST_CASE("host matmul_4bit reference: hand-computed values") {
  // w = [[code 15, code 0], [code 7, code 8]] in NF4 with absmax 2: values [[2, -2], [0, 0.159...]]
  std::vector<std::uint8_t> const codes = {0xF0, 0x78};
  std::vector<float> const absmax = {2.0f};
  weight_4bit_view<nf4> w;
  w.codes = {codes.data(), codes.size()};
  w.scales.absmax = {absmax.data(), 1};
  w.rows = 2;
  w.cols = 2;
  w.block_size = 64;
  std::vector<bf16> const x = {bf16(1.0f), bf16(0.5f)};
  std::vector<bf16> y(2, bf16(123.0f));
  matmul_4bit<bf16>(exec::host{}, {x.data(), 2}, 1, w, tensor_view<bf16>{y.data(), 2});
  CHECK(to_float(y[0]) == 1.0f);                               // 1 * 2 + 0.5 * -2
  float const w11 = to_float(bf16(nf4_table.value[8] * 2.0f)); // 0.159 rounded to bf16
  CHECK(to_float(y[1]) == to_float(bf16(0.5f * w11)));
  // grad_x = grad_y * w: [1, 1] * w = [2 + 0, -2 + w11]
  std::vector<bf16> const gy = {bf16(1.0f), bf16(1.0f)};
  std::vector<bf16> gx(2);
  matmul_4bit_grad_input<bf16>(exec::host{}, {gy.data(), 2}, 1, w, tensor_view<bf16>{gx.data(), 2});
  CHECK(to_float(gx[0]) == 2.0f);
  CHECK(to_float(gx[1]) == to_float(bf16(-2.0f + w11)));
  // double-quantized scale: dynamic_signed[255] = 1, so scale = 1 * 1.5 + 0.5 = 2: same values
  std::vector<std::uint8_t> const q = {255};
  std::vector<float> const a2 = {1.5f};
  weight_4bit_view<nf4> wn = w;
  wn.scales = {};
  wn.scales.qabsmax = {q.data(), 1};
  wn.scales.absmax2 = {a2.data(), 1};
  wn.scales.offset = 0.5f;
  std::vector<bf16> yn(2);
  matmul_4bit<bf16>(exec::host{}, {x.data(), 2}, 1, wn, tensor_view<bf16>{yn.data(), 2});
  CHECK(yn == y);
}

// Element counts that wrap around a size_t: a 2^32 x 2^32 weight has rows * cols = 0 (mod
// 2^64), so empty codes, scales, x and y of m = 2^32 rows passed every size check and the host
// loops read the empty views; a nested_block_size near SIZE_MAX made the absmax2 count
// (blocks + nested - 1) / nested wrap to 0, so an empty absmax2 passed and was read (old code:
// the REQUIREs below failed, and the calls after them would have crashed). Each is now refused.
TEST_CASE("matmul shapes whose element counts overflow a size_t are refused") {
  constexpr char const* fn = "test";
  SUBCASE("a weight of 2^32 x 2^32 elements") {
    constexpr std::size_t big = std::size_t{1} << 32;
    weight_4bit_view<nf4> w; // no codes, no scales
    w.rows = big;
    w.cols = big;
    REQUIRE_THROWS_WITH_AS(quant::detail::mm::check_weight(w, fn, true, false),
                           doctest::Contains("does not fit a size_t"), qmem::bad_argument);
    CHECK_THROWS_AS(
        matmul_4bit<bf16>(exec::host{}, tensor_view<bf16 const>{}, big, w, tensor_view<bf16>{}),
        qmem::bad_argument);
    CHECK_THROWS_AS(matmul_4bit_grad_input<bf16>(exec::host{}, tensor_view<bf16 const>{}, big, w,
                                                 tensor_view<bf16>{}),
                    qmem::bad_argument);
  }
  SUBCASE("a nested_block_size near SIZE_MAX") {
    std::vector<std::uint8_t> const codes(64), qabsmax(4, 255);
    weight_4bit_view<nf4> nested;
    nested.rows = 2;
    nested.cols = 64;
    nested.block_size = 32;
    nested.codes = {codes.data(), codes.size()};
    nested.scales.qabsmax = {qabsmax.data(), qabsmax.size()};
    nested.scales.nested_block_size = std::numeric_limits<std::size_t>::max();
    REQUIRE_THROWS_WITH_AS(quant::detail::mm::check_weight(nested, fn, true, false),
                           doctest::Contains("absmax2 holds 0 scales; expected 1"),
                           qmem::bad_argument);
    std::vector<bf16> const x(64, bf16(1.0f));
    std::vector<bf16> y(2);
    CHECK_THROWS_AS(matmul_4bit<bf16>(exec::host{}, {x.data(), x.size()}, 1, nested,
                                      tensor_view<bf16>{y.data(), y.size()}),
                    qmem::bad_argument);
  }
  SUBCASE("linear_int8 with x and out of [2^62, 4] (0 elements, wrapped)") {
    // (opaque to the compiler: a constant m lets g++ -O3 prove the refused call's loops
    // overflow, -Waggressive-loop-optimizations)
    std::size_t volatile shift = 62;
    std::size_t const rows = std::size_t{1} << shift;
    REQUIRE_THROWS_WITH_AS(
        quant::detail::mm::check_matrix(tensor_view<bf16 const>{}, rows, 4, fn, "x", true, false),
        doctest::Contains("does not fit a size_t"), qmem::bad_argument);
    std::vector<std::int8_t> const b(16, 1);
    std::vector<float> const col_scale(4, 1.0f);
    CHECK_THROWS_AS(linear_int8<bf16>(exec::host{}, tensor_view<bf16 const>{}, {b.data(), b.size()},
                                      {col_scale.data(), col_scale.size()}, rows, 4, 4, 6.0f,
                                      tensor_view<bf16>{}),
                    qmem::bad_argument);
  }
}

// The host's int8_quantize converted a NaN product to int, which is undefined (x86-64: INT_MIN,
// clamped to -127), where the GPU's cvt.rni.s32.f32 gives 0: a NaN activation outside the
// outlier columns (the row's fmax absmax skips it) added -127 * b to the host's dot product and
// nothing to the GPU's (old code: out 0 instead of 1, and int8_quantize(NaN) -127).
TEST_CASE("linear_int8 on the host quantizes a NaN activation to 0, as the GPU does") {
  float const nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<bf16> const x = {bf16(nan), bf16(1.0f)};
  std::vector<std::int8_t> const b = {1, 1};
  std::vector<float> const col_scale = {127.0f}; // the weight row is [1, 1]
  std::vector<bf16> out(1);
  linear_int8<bf16>(exec::host{}, {x.data(), x.size()}, {b.data(), b.size()},
                    {col_scale.data(), col_scale.size()}, 1, 1, 2, 0.0f,
                    tensor_view<bf16>{out.data(), out.size()});
  CHECK(to_float(out[0]) == 1.0f); // 0 * 1 + 1 * 1
  std::vector<float> const products = {nan, -nan, 126.6f, -127.4f};
  std::vector<int> codes;
  for (float v : products)
    codes.push_back(quant::detail::mm::int8_quantize(v, 1.0f));
  CHECK(codes == std::vector<int>{0, 0, 127, -127});
}

TEST_CASE_TEMPLATE_DEFINE("matmul_4bit forward matches the host reference", B, mm_forward) {
  if (qmem::test::skip<B>())
    return;
  std::mt19937 rng(1234);
  for (shape const& s : shapes)
    for (bool const nested : {false, true}) {
      check_forward<B, bf16, nf4>(s.m, s.n, s.k, s.block, nested, rng);
      check_forward<B, f16, fp4>(s.m, s.n, s.k, s.block, nested, rng);
    }
  check_forward<B, bf16, fp4>(4, 48, 1024, 64, false, rng);
  check_forward<B, f16, nf4>(13, 48, 1024, 64, true, rng);
}
TEST_CASE_TEMPLATE_APPLY(mm_forward, qmem::test::backends);

#if QMEM_HAS_CUDA()
namespace {
template <cuda_matmul::gemv_shape Shape, bool Nested>
int launch_shape(cuda_matmul::gemv_args<bf16> const& a) {
  cuda_matmul::launch_gemv_fast<nf4, bf16, Nested, Shape>(qmem::test::cuda_backend::exec(), a);
  return Shape.tiles;
}
template <cuda_matmul::gemv1_shape Shape, bool Nested>
int launch_shape(cuda_matmul::gemv_args<bf16> const& a) {
  cuda_matmul::launch_gemv1_fast<nf4, bf16, Nested, Shape>(qmem::test::cuda_backend::exec(), a);
  return Shape.pairs;
}

//! One fast GEMV kernel on a random m x n x k weight against the GEMV model: `launch(a)` launches
//! it with the arguments a and returns its label for the message.
template <class Launch>
void kernel_case(std::size_t m, std::size_t n, std::size_t k, std::size_t block, bool nested,
                 std::mt19937& rng, Launch&& launch) {
  using B = qmem::test::cuda_backend;
  host_weight const hw = random_weight(n, k, block, nested, rng);
  std::vector<bf16> const x = random_matrix<bf16>(m * k, rng);
  std::vector<bf16> model;
  std::vector<double> terms;
  gemv_model<bf16, nf4>(hw, x, m, model, terms);
  backend_weight<B, nf4> bw(hw);
  auto bx = B::upload(x);
  auto by = B::template alloc<bf16>(m * n);
  REQUIRE(cuda_matmul::gemv_fast_path(k, block, bw.view.codes.data(), bx.view().data()));
  cuda_matmul::gemv_args<bf16> const a{bx.view().data(),
                                       bw.view.codes.data(),
                                       cuda_matmul::make_scale_args(bw.view.scales),
                                       by.view().data(),
                                       static_cast<unsigned>(m),
                                       n,
                                       k,
                                       qmem::quant::detail::mm::log2_exact(block)};
  std::string const label = launch(a);
  expect_close(B::download(by.view()), model, terms, gemv_sum(k), 0.0,
               label + " " + case_name("cuda", "GEMV", m, n, k, block, nested));
}

template <auto Shape>
void variant_case(std::size_t m, std::size_t n, std::size_t k, std::size_t block, bool nested,
                  std::mt19937& rng) {
  constexpr bool batch1 =
      std::is_same_v<std::remove_cv_t<decltype(Shape)>, cuda_matmul::gemv1_shape>;
  REQUIRE((!batch1 || m == 1));
  kernel_case(m, n, k, block, nested, rng, [&](cuda_matmul::gemv_args<bf16> const& a) {
    int const third = nested ? launch_shape<Shape, true>(a) : launch_shape<Shape, false>(a);
    return std::string(batch1 ? "batch-1 " : "") + "variant " + std::to_string(Shape.warps) + "/" +
           std::to_string(Shape.unroll) + "/" + std::to_string(third);
  });
}

//! The streaming batch-1 kernel with shape S on one weight, planned for `sms` multiprocessors (0:
//! the device's; fewer make blocks loop over several tiles), against the GEMV model.
template <cuda_matmul::gemv1_stream_shape S>
void stream_case(std::size_t n, std::size_t k, std::size_t block, bool nested, unsigned sms,
                 std::mt19937& rng) {
  kernel_case(1, n, k, block, nested, rng, [&](cuda_matmul::gemv_args<bf16> const& a) {
    auto const& e = qmem::test::cuda_backend::exec();
    bool const launched = nested ? cuda_matmul::launch_gemv1_stream<nf4, bf16, true, S>(e, a, sms)
                                 : cuda_matmul::launch_gemv1_stream<nf4, bf16, false, S>(e, a, sms);
    REQUIRE(launched);
    return "streaming batch-1 " + std::to_string(S.warps) + "/" + std::to_string(S.depth) +
           (S.async ? " async" : "") + " sms=" + std::to_string(sms);
  });
}
} // namespace

namespace {
//! A weight for the streaming kernel and the multiprocessors its plan is made for.
struct stream_plan_case {
  std::size_t n, k, block;
  unsigned sms;
};

//! Shape S on each of `plans`, with plain scales and, when `nested_too`, nested ones; `Nested`
//! (the other shape for nested scales) defaults to S.
template <cuda_matmul::gemv1_stream_shape S, cuda_matmul::gemv1_stream_shape Nested = S>
void stream_cases(std::initializer_list<stream_plan_case> plans, bool nested_too,
                  std::mt19937& rng) {
  for (auto const& p : plans) {
    stream_case<S>(p.n, p.k, p.block, false, p.sms, rng);
    if (nested_too)
      stream_case<Nested>(p.n, p.k, p.block, true, p.sms, rng);
  }
}
} // namespace

TEST_CASE("the streaming batch-1 GEMV kernel computes the GEMV function on every plan") {
  if (!qmem::test::gpu_present()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return;
  }
  std::mt19937 rng(23);
  // the shapes matmul_4bit dispatches, on plans of every kind:
  // - J = 1: 1408 columns = 2.75 super-steps (a partial one, 3 column groups, 5 row groups), 4096
  //   (8 groups, 2 row groups), 8192 (16 groups), odd row counts (a clamped last pair);
  // - J = 2 (12800 columns: 25 super-steps, 13 groups, the last one half empty) and J = 4 (17408:
  //   34 super-steps, 9 groups);
  // - blocks of 128, 256 and 4096 (one scale for several chunks);
  // - planned for 1 and 2 multiprocessors: partial sums that fit before the table at no J, so
  //   J = 4 and blocks looping over 2 and 3 tiles; planned for 7: a ring longer than a warp's
  //   pairs
  stream_cases<cuda_matmul::gemv_batch1_stream, cuda_matmul::gemv_batch1_stream_nested>(
      {{45, 1408, 64, 0},
       {33, 4096, 64, 0},
       {70, 8192, 64, 0},
       {1, 512, 64, 0},
       {45, 12800, 64, 0},
       {33, 17408, 64, 0},
       {45, 1536, 128, 0},
       {37, 12800, 256, 0},
       {45, 4096, 4096, 0},
       {601, 8192, 64, 1},
       {1501, 8192, 64, 1},
       {1601, 8192, 64, 2},
       {300, 2048, 64, 7}},
      true, rng);
#if QMEM_TEST_CANDIDATE_KERNELS
  // the other shapes the bench compares; the async rings (plain scales only) and the two-group
  // rings on J = 1, 2, 4, partial super-steps and groups, several tiles, rings longer than a
  // warp's pairs
  constexpr auto const& c = cuda_matmul::gemv_batch1_stream_candidates;
  stream_cases<c[0]>({{70, 8192, 64, 0}, {45, 12800, 64, 0}}, true, rng);
  stream_cases<c[1]>({{70, 8192, 64, 0}, {45, 12800, 64, 0}}, true, rng);
  stream_cases<c[2]>({{70, 8192, 64, 0}, {45, 1408, 64, 0}}, true, rng);
  stream_cases<c[3]>({{70, 8192, 64, 0}, {45, 14336, 64, 0}}, true, rng);
  stream_cases<c[4]>({{45, 1408, 64, 0},
                      {70, 8192, 64, 0},
                      {45, 12800, 64, 0},
                      {33, 17408, 256, 0},
                      {1001, 8192, 64, 1},
                      {300, 2048, 64, 7},
                      {45, 4096, 4096, 0}},
                     false, rng);
  stream_cases<c[5]>({{70, 8192, 64, 0}, {1801, 4096, 128, 1}}, false, rng);
  stream_cases<c[6]>({{70, 8192, 64, 0}, {45, 14336, 64, 0}, {300, 2048, 64, 7}}, false, rng);
  stream_cases<c[7]>({{70, 8192, 64, 0},
                      {45, 1408, 64, 0},
                      {45, 12800, 64, 0},
                      {33, 17408, 256, 0},
                      {1501, 8192, 64, 1},
                      {300, 2048, 64, 7}},
                     true, rng);
  stream_cases<c[8]>({{70, 8192, 64, 0}, {1601, 8192, 64, 2}, {45, 4096, 4096, 0}}, true, rng);
  // programmatic dependent launch (outside a graph: the wait returns at once)
  stream_cases<c[9]>({{70, 8192, 64, 0}, {45, 12800, 64, 0}, {1501, 8192, 64, 1}}, true, rng);
  // ... and with the weight's first lines asked of L2 before the wait (32 KiB: less than a tile
  // on 1501 rows planned for 1 multiprocessor; 128 KiB: more than the 70-row weight)
  stream_cases<c[10]>({{70, 8192, 64, 0}, {45, 12800, 64, 0}, {1501, 8192, 64, 1}}, true, rng);
  stream_cases<c[11]>({{70, 8192, 64, 0}, {1501, 8192, 64, 1}, {300, 2048, 64, 7}}, true, rng);
  // two-group rings and the 8-pair ring with programmatic dependent launch
  stream_cases<c[12]>({{70, 8192, 64, 0}, {45, 12800, 64, 0}, {1501, 8192, 64, 1}}, true, rng);
  stream_cases<c[13]>({{70, 8192, 64, 0}, {45, 1408, 64, 0}, {300, 2048, 64, 7}}, true, rng);
  // the dispatched two-group ring with code loads that skip L1 (full and partial slices)
  stream_cases<c[14]>({{70, 8192, 64, 0}, {45, 12800, 64, 0}, {1501, 8192, 64, 1}}, true, rng);
  // lean addressing (nested scales take the former addresses), and at least two super-steps per
  // warp: J = 2 where 1 would do, partial slices, odd rows, several tiles, a ring longer than a
  // warp's pairs
  std::initializer_list<stream_plan_case> const lean_plans = {
      {70, 8192, 64, 0},   {45, 1408, 64, 0},  {45, 12800, 64, 0},  {33, 17408, 256, 0},
      {1501, 8192, 64, 1}, {300, 2048, 64, 7}, {45, 4096, 4096, 0}, {1, 512, 64, 0}};
  stream_cases<c[15]>(lean_plans, true, rng);
  stream_cases<c[16]>(lean_plans, true, rng);
  stream_cases<c[17]>(lean_plans, true, rng);
  // lean, J >= 4; lean, J >= 2 with a ring of 3 pairs per group
  stream_cases<c[18]>(lean_plans, true, rng);
  stream_cases<c[19]>(lean_plans, true, rng);
#endif
}

TEST_CASE("streaming batch-1 GEMV lean shapes on small plans (for the sanitizers)") {
  if (!qmem::test::gpu_present()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return;
  }
  // the dispatched shape (lean, J >= 2) and lean at J >= 4: a partial super-step, 2 row groups
  // of 7 multiprocessors' tiles with an odd row count (the clamped last row), one row
  std::mt19937 rng(41);
  constexpr auto const& c = cuda_matmul::gemv_batch1_stream_candidates;
  std::initializer_list<stream_plan_case> const plans = {
      {45, 1408, 64, 0}, {301, 2048, 64, 7}, {1, 512, 64, 0}};
  stream_cases<cuda_matmul::gemv_batch1_stream>(plans, false, rng);
  stream_cases<c[18]>(plans, false, rng);
}

TEST_CASE("streaming batch-1 GEMV: lean addressing gives the same bits") {
  if (!qmem::test::gpu_present()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return;
  }
  // the same loads and fused multiply-adds in the same order, only the addresses computed
  // otherwise: each lean shape against its former-address twin (the dispatched shape, and the same
  // at J >= 2), bit for bit, on full and partial slices, odd row counts (the clamped last row),
  // J = 1, 2 and 4, blocks looping over several tiles; and the ring's depth (c[19], 3 pairs per
  // group, against c[16]'s 2) changes no bit either
  using B = qmem::test::cuda_backend;
  auto const& e = B::exec();
  constexpr auto const& c = cuda_matmul::gemv_batch1_stream_candidates;
  std::mt19937 rng(37);
  for (auto const& p : {stream_plan_case{70, 8192, 64, 0}, stream_plan_case{45, 1408, 64, 0},
                        stream_plan_case{45, 12800, 64, 0}, stream_plan_case{33, 17408, 256, 0},
                        stream_plan_case{1501, 8192, 64, 1}, stream_plan_case{301, 2048, 64, 7},
                        stream_plan_case{1, 512, 64, 0}}) {
    host_weight const hw = random_weight(p.n, p.k, p.block, false, rng);
    backend_weight<B, nf4> bw(hw);
    auto bx = B::upload(random_matrix<bf16>(p.k, rng));
    auto y0 = B::template alloc<bf16>(p.n);
    auto y1 = B::template alloc<bf16>(p.n);
    auto args = [&](bf16* y) {
      return cuda_matmul::gemv_args<bf16>{bx.view().data(),
                                          bw.view.codes.data(),
                                          cuda_matmul::make_scale_args(bw.view.scales),
                                          y,
                                          1u,
                                          p.n,
                                          p.k,
                                          qmem::quant::detail::mm::log2_exact(p.block)};
    };
    auto same = [&](char const* what) {
      std::vector<bf16> const ref = B::download(y0.view());
      std::vector<bf16> const got = B::download(y1.view());
      std::size_t diff = 0;
      for (std::size_t i = 0; i < ref.size(); ++i)
        diff += ref[i].bits != got[i].bits ? 1 : 0;
      CHECK_MESSAGE(diff == 0, what, ": ", diff, " outputs differ, n=", p.n, " k=", p.k,
                    " block=", p.block, " sms=", p.sms);
    };
    REQUIRE(cuda_matmul::launch_gemv1_stream<nf4, bf16, false, c[12]>(e, args(y0.view().data()),
                                                                      p.sms));
    REQUIRE(cuda_matmul::launch_gemv1_stream<nf4, bf16, false, c[15]>(e, args(y1.view().data()),
                                                                      p.sms));
    same("lean against the former dispatched shape");
    REQUIRE(cuda_matmul::launch_gemv1_stream<nf4, bf16, false, c[16]>(e, args(y0.view().data()),
                                                                      p.sms));
    REQUIRE(cuda_matmul::launch_gemv1_stream<nf4, bf16, false, c[17]>(e, args(y1.view().data()),
                                                                      p.sms));
    same("lean against former addresses, J >= 2");
    REQUIRE(cuda_matmul::launch_gemv1_stream<nf4, bf16, false, c[19]>(e, args(y1.view().data()),
                                                                      p.sms));
    same("lean with a deeper ring against former addresses, J >= 2");
  }
}

#if QMEM_TEST_CANDIDATE_KERNELS
namespace {
//! The bulk-copy batch-1 kernel with shape S on each of `plans` (plain scales), against the GEMV
//! model; every plan must suit it.
template <cuda_matmul::gemv1_bulk_shape S>
void bulk_cases(std::initializer_list<stream_plan_case> plans, std::mt19937& rng) {
  for (auto const& p : plans)
    kernel_case(1, p.n, p.k, p.block, false, rng, [&](cuda_matmul::gemv_args<bf16> const& a) {
      bool const launched =
          cuda_matmul::launch_gemv1_bulk<nf4, bf16, S>(qmem::test::cuda_backend::exec(), a, p.sms);
      REQUIRE(launched);
      return "bulk batch-1 " + std::to_string(S.warps) + "/" + std::to_string(S.stage_kib) + "/" +
             std::to_string(S.ring_kib) + (S.evict_first ? " evict-first" : "") +
             " sms=" + std::to_string(p.sms);
    });
}
} // namespace

TEST_CASE("the bulk-copy batch-1 GEMV kernel on small plans (for the sanitizers)") {
  if (!qmem::test::gpu_present()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return;
  }
  std::mt19937 rng(31);
  constexpr auto const& c = cuda_matmul::gemv_batch1_bulk_candidates;
  // 3 column groups and 5 row groups; one row; blocks of 128; 19 tiles on 7 planned
  // multiprocessors; 17 tiles in one block with 16 consumer warps
  std::initializer_list<stream_plan_case> const plans = {{45, 1536, 64, 0},
                                                         {1, 512, 64, 0},
                                                         {45, 2048, 128, 0},
                                                         {300, 2048, 64, 7},
                                                         {65, 4096, 64, 1}};
  bulk_cases<c[0]>(plans, rng);
  bulk_cases<c[2]>(plans, rng);
  bulk_cases<c[4]>(plans, rng);
}

TEST_CASE("the bulk-copy batch-1 GEMV kernel computes the GEMV function on every plan") {
  if (!qmem::test::gpu_present()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return;
  }
  std::mt19937 rng(29);
  constexpr auto const& c = cuda_matmul::gemv_batch1_bulk_candidates;
  // J = 1 (1536 columns: 3 column groups, 5 row groups, stages of several row groups; 4096; 8192),
  // J = 2 (12800: a half-empty last group; blocks of 256 on 13312) and J = 4 (17408), one row,
  // odd row counts (a last pair of one row), blocks of 128 and 4096, and plans for 1, 2 and 7
  // multiprocessors: blocks walking many tiles, the ring wrapping round many times
  std::initializer_list<stream_plan_case> const plans = {
      {45, 1536, 64, 0},    {33, 4096, 64, 0},   {70, 8192, 64, 0},   {1, 512, 64, 0},
      {45, 12800, 64, 0},   {37, 13312, 256, 0}, {33, 17408, 64, 0},  {45, 2048, 128, 0},
      {45, 16384, 4096, 0}, {601, 8192, 64, 1},  {1501, 8192, 64, 1}, {1601, 8192, 64, 2},
      {300, 2048, 64, 7}};
  bulk_cases<c[0]>(plans, rng);
  bulk_cases<c[2]>(plans, rng);
  bulk_cases<c[4]>(plans, rng);
  bulk_cases<c[1]>({{70, 8192, 64, 0}, {1501, 8192, 64, 1}, {300, 2048, 64, 7}}, rng);
  bulk_cases<c[3]>({{70, 8192, 64, 0}, {33, 17408, 64, 0}, {1501, 8192, 64, 1}}, rng);
  bulk_cases<c[5]>({{70, 8192, 64, 0}, {45, 12800, 64, 0}, {1601, 8192, 64, 2}}, rng);
  bulk_cases<c[6]>({{70, 8192, 64, 0}, {45, 1536, 64, 0}, {1501, 8192, 64, 1}}, rng);
  // J = 4 and J = 2 at least: J = 4 on 1536 columns (one column group, 16 row groups), 8192 (a
  // full slice) and 16384 with blocks of 4096 (full); J = 2 on 4096 and 8192
  bulk_cases<c[7]>({{45, 1536, 64, 0},
                    {70, 8192, 64, 0},
                    {45, 16384, 4096, 0},
                    {1501, 8192, 64, 1},
                    {300, 2048, 64, 7}},
                   rng);
  bulk_cases<c[8]>({{33, 4096, 64, 0}, {70, 8192, 64, 0}, {1601, 8192, 64, 2}}, rng);
  // a row's block count that is not a multiple of 4 (1408 / 64 = 22): declined, nothing launched
  std::mt19937 wrng(3);
  host_weight const hw = random_weight(45, 1408, 64, false, wrng);
  backend_weight<qmem::test::cuda_backend, nf4> bw(hw);
  auto bx = qmem::test::cuda_backend::upload(random_matrix<bf16>(1408, wrng));
  auto by = qmem::test::cuda_backend::template alloc<bf16>(45);
  cuda_matmul::gemv_args<bf16> const a{bx.view().data(),
                                       bw.view.codes.data(),
                                       cuda_matmul::make_scale_args(bw.view.scales),
                                       by.view().data(),
                                       1u,
                                       45,
                                       1408,
                                       6};
  CHECK_FALSE(cuda_matmul::launch_gemv1_bulk<nf4, bf16, c[0]>(qmem::test::cuda_backend::exec(), a));
}
#endif

namespace {
//! The streaming small-batch kernel with shape S at batch m on one weight, planned for `sms`
//! multiprocessors (0: the device's; fewer make blocks walk several rounds), against the GEMV
//! model.
template <cuda_matmul::gemvm_stream_shape S>
void small_batch_case(std::size_t m, std::size_t n, std::size_t k, std::size_t block, bool nested,
                      unsigned sms, std::mt19937& rng) {
  kernel_case(m, n, k, block, nested, rng, [&](cuda_matmul::gemv_args<bf16> const& a) {
    auto const& e = qmem::test::cuda_backend::exec();
    bool const launched = nested ? cuda_matmul::launch_gemvm_stream<nf4, bf16, true, S>(e, a, sms)
                                 : cuda_matmul::launch_gemvm_stream<nf4, bf16, false, S>(e, a, sms);
    REQUIRE(launched);
    return "streaming small-batch " + std::to_string(S.warps) + "/" + std::to_string(S.tiles) +
           "/" + std::to_string(S.warps16) + "/" + std::to_string(S.tiles16) +
           " sms=" + std::to_string(sms);
  });
}

//! Every plan kind of the streaming small-batch kernel for shape S, at batches 2 (and 5, 8: one
//! 8-row half) and 9 (and 16: two halves); nested scales on some. x_once shapes take batches of
//! 9-16 only.
template <cuda_matmul::gemvm_stream_shape S>
void small_batch_cases(std::mt19937& rng) {
  for (std::size_t const m :
       {std::size_t{2}, std::size_t{5}, std::size_t{8}, std::size_t{9}, std::size_t{16}}) {
    if (S.x_once && m <= 8)
      continue;
    // 22 chunks over 16 warps (1 or 2 each), 3 tiles (the last partial), one tile per block
    small_batch_case<S>(m, 45, 1408, 64, m == 5, 0, rng);
    // 5 tiles in one block: rounds of R tiles, the last partial and a row tile past n
    small_batch_case<S>(m, 70, 4096, 64, m == 9, 1, rng);
    // 19 tiles over 3 planned multiprocessors (7 per block), blocks of 128
    small_batch_case<S>(m, 300, 2048, 128, m == 16, 3, rng);
    // 8 chunks: fewer warps than the shape's
    small_batch_case<S>(m, 33, 512, 64, m == 2, 0, rng);
    // blocks of 4096 (one scale for 64 chunks), 3 tiles in 2 blocks
    small_batch_case<S>(m, 37, 8192, 4096, m == 8, 2, rng);
  }
}

template <std::size_t... I>
void all_small_batch_cases(std::mt19937& rng, std::index_sequence<I...>) {
  (small_batch_cases<cuda_matmul::gemv_batch16_stream_candidates[I]>(rng), ...);
}
} // namespace

TEST_CASE("the streaming small-batch GEMV kernel computes the GEMV function on every plan") {
  if (!qmem::test::gpu_present()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return;
  }
  std::mt19937 rng(29);
#if QMEM_TEST_CANDIDATE_KERNELS
  constexpr auto count = std::size(cuda_matmul::gemv_batch16_stream_candidates);
  all_small_batch_cases(rng, std::make_index_sequence<count>{});
#else
  // the five shapes launch_gemv dispatches (gemv_batch16_stream, _two_steps, _long, _unpaired,
  // _short)
  small_batch_cases<cuda_matmul::gemv_batch16_stream>(rng);
  small_batch_cases<cuda_matmul::gemv_batch16_stream_two_steps>(rng);
  small_batch_cases<cuda_matmul::gemv_batch16_stream_long>(rng);
  small_batch_cases<cuda_matmul::gemv_batch16_stream_unpaired>(rng);
  small_batch_cases<cuda_matmul::gemv_batch16_stream_short>(rng);
#endif
}

#if QMEM_TEST_CANDIDATE_KERNELS
TEST_CASE("small-batch GEMV lean steps on small plans (for the sanitizers)") {
  if (!qmem::test::gpu_present()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return;
  }
  std::mt19937 rng(37);
  constexpr auto const& c = cuda_matmul::gemv_batch16_stream_candidates;
  // candidate 15: 5 tiles in one block with a row tile past n (a full round, then one tile), 9
  // tiles (3 steps per chunk), blocks of 128, 2 blocks of 7 tiles, and nested scales (the former
  // addresses and waits)
  small_batch_case<c[15]>(16, 70, 1024, 64, false, 1, rng);
  small_batch_case<c[15]>(12, 140, 1024, 128, false, 1, rng);
  small_batch_case<c[15]>(16, 200, 512, 64, false, 2, rng);
  small_batch_case<c[15]>(9, 70, 1024, 64, true, 1, rng);
}

TEST_CASE("small-batch GEMV candidates (full rounds, sums in shared memory): small plans, and the "
          "round-based kernel's bits") {
  if (!qmem::test::gpu_present()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return;
  }
  std::mt19937 rng(31);
  constexpr auto const& c = cuda_matmul::gemv_batch16_stream_candidates;
  // small plans for the sanitizers: 5 tiles in one block (a step walks tiles 0-3, then 4), at
  // batches 16 and 9 (nested), 7 tiles in each of 2 blocks at batch 12, one tile per block; full
  // rounds without the per-tile test on 5 tiles
  small_batch_case<c[10]>(16, 70, 1024, 64, false, 1, rng);
  small_batch_case<c[11]>(9, 70, 1024, 64, true, 1, rng);
  small_batch_case<c[9]>(16, 70, 1024, 64, false, 1, rng);
  small_batch_case<c[12]>(12, 200, 512, 64, false, 2, rng);
  // activation slots of their own (c[13]; c[14] without full rounds, nested): 5 tiles in one
  // block (2 steps per chunk), 9 tiles in one block (3 steps per chunk: the code slot at a
  // chunk's first step alternates), one tile
  small_batch_case<c[13]>(16, 70, 1024, 64, false, 1, rng);
  small_batch_case<c[13]>(9, 140, 1024, 64, false, 1, rng);
  small_batch_case<c[13]>(16, 33, 512, 64, false, 0, rng);
  small_batch_case<c[14]>(9, 140, 1024, 64, true, 1, rng);
  small_batch_case<c[10]>(16, 33, 512, 128, false, 0, rng);
  // x-once shapes decline batches of 8 and fewer (nothing launched)
  {
    std::mt19937 wrng(5);
    host_weight const hw = random_weight(70, 1024, 64, false, wrng);
    backend_weight<qmem::test::cuda_backend, nf4> bw(hw);
    auto bx = qmem::test::cuda_backend::upload(random_matrix<bf16>(8 * 1024, wrng));
    auto by = qmem::test::cuda_backend::template alloc<bf16>(8 * 70);
    cuda_matmul::gemv_args<bf16> const a{bx.view().data(),
                                         bw.view.codes.data(),
                                         cuda_matmul::make_scale_args(bw.view.scales),
                                         by.view().data(),
                                         8u,
                                         70,
                                         1024,
                                         6};
    CHECK_FALSE(cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[12]>(
        qmem::test::cuda_backend::exec(), a, 1));
  }
  // the same fused multiply-adds in the same order as the round-based shape with the same warps
  // and tiles per step (c[8]): equal bits for full rounds without the per-tile test (c[9]) and
  // the x-once shapes (c[10] to c[15]), at batches 16, 9 and 12, over 1, 3 and 7 rounds; blocks
  // of 7, 5, 8, 9 and 15 tiles (2, 2, 2, 3 and 4 steps of R = 4 tiles per chunk)
  using B = qmem::test::cuda_backend;
  auto const& e = B::exec();
  for (auto const& [m, n, k, sms] :
       {std::tuple{16u, 300u, 2048u, 3u}, std::tuple{9u, 70u, 4096u, 1u},
        std::tuple{16u, 450u, 1024u, 4u}, std::tuple{16u, 560u, 2048u, 4u},
        std::tuple{12u, 900u, 1024u, 4u}}) {
    host_weight const hw = random_weight(n, k, 64, false, rng);
    backend_weight<B, nf4> bw(hw);
    auto bx = B::upload(random_matrix<bf16>(std::size_t{m} * k, rng));
    auto y0 = B::template alloc<bf16>(std::size_t{m} * n);
    auto y1 = B::template alloc<bf16>(std::size_t{m} * n);
    auto y2 = B::template alloc<bf16>(std::size_t{m} * n);
    auto y3 = B::template alloc<bf16>(std::size_t{m} * n);
    auto y4 = B::template alloc<bf16>(std::size_t{m} * n);
    auto y5 = B::template alloc<bf16>(std::size_t{m} * n);
    auto y6 = B::template alloc<bf16>(std::size_t{m} * n);
    auto y7 = B::template alloc<bf16>(std::size_t{m} * n);
    auto args = [&](bf16* y) {
      return cuda_matmul::gemv_args<bf16>{bx.view().data(),
                                          bw.view.codes.data(),
                                          cuda_matmul::make_scale_args(bw.view.scales),
                                          y,
                                          m,
                                          n,
                                          k,
                                          6};
    };
    REQUIRE(
        cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[8]>(e, args(y0.view().data()), sms));
    REQUIRE(
        cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[9]>(e, args(y1.view().data()), sms));
    REQUIRE(
        cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[10]>(e, args(y2.view().data()), sms));
    REQUIRE(
        cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[11]>(e, args(y3.view().data()), sms));
    REQUIRE(
        cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[12]>(e, args(y4.view().data()), sms));
    REQUIRE(
        cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[13]>(e, args(y5.view().data()), sms));
    REQUIRE(
        cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[14]>(e, args(y6.view().data()), sms));
    REQUIRE(
        cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[15]>(e, args(y7.view().data()), sms));
    std::vector<bf16> const ref = B::download(y0.view());
    int variant = 9;
    for (auto const* y : {&y1, &y2, &y3, &y4, &y5, &y6, &y7}) {
      std::vector<bf16> const got = B::download(y->view());
      bool same = true;
      for (std::size_t i = 0; i < ref.size(); ++i)
        same = same && ref[i].bits == got[i].bits;
      CHECK_MESSAGE(same, "candidate ", variant++, " m=", m, " n=", n, " k=", k, " sms=", sms);
    }
  }
}

// The dispatched shapes among these run in mm_forward through matmul_4bit.
TEST_CASE("GEMV kernel block shapes the bench compares all compute the same function") {
  if (!qmem::test::gpu_present()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return;
  }
  using cuda_matmul::gemv_shape;
  std::mt19937 rng(11);
  for (std::size_t const m : {std::size_t{1}, std::size_t{5}, std::size_t{16}})
    for (bool const nested : {false, true}) {
      // steps of 64 columns: 1408 = 22 steps (tails of every unroll), 4096 = 64
      variant_case<gemv_shape{8, 4, 1}>(m, 45, 1408, 64, nested, rng);
      variant_case<gemv_shape{8, 2, 1}>(m, 45, 1408, 64, nested, rng);
      variant_case<gemv_shape{8, 2, 2}>(m, 70, 1408, 64, nested, rng);
      variant_case<gemv_shape{4, 4, 1}>(m, 33, 4096, 64, nested, rng);
      variant_case<gemv_shape{16, 2, 1}>(m, 33, 4096, 64, nested, rng);
      variant_case<gemv_shape{8, 8, 1}>(m, 33, 4096, 64, nested, rng);
      variant_case<gemv_shape{8, 4, 2}>(m, 70, 1408, 64, nested, rng);
      variant_case<gemv_shape{8, 4, 1}>(m, 40, 1408, 32, nested, rng);
      variant_case<gemv_shape{8, 4, 1}>(m, 40, 4096, 256, nested, rng);
      // consecutive steps with 16-byte scale loads (plain scales, k % 256 == 0; else the
      // interleaved kernel): 4096 and 1536 columns, and 1408 (not a multiple of 256)
      variant_case<gemv_shape{8, 4, 2, true}>(m, 45, 4096, 64, nested, rng);
      variant_case<gemv_shape{8, 4, 1, true}>(m, 33, 1536, 64, nested, rng);
      variant_case<gemv_shape{8, 2, 2, true}>(m, 70, 1408, 64, nested, rng);
    }
  // the batch-1 kernel: 1408 columns = 2.75 super-steps of 512 (a partial one), 45 and 33 rows
  // (partial row tiles), blocks 64 and larger
  using cuda_matmul::gemv1_shape;
  for (bool const nested : {false, true}) {
    variant_case<gemv1_shape{8, 2, 2}>(1, 45, 1408, 64, nested, rng);
    variant_case<gemv1_shape{8, 1, 4}>(1, 33, 4096, 64, nested, rng);
    variant_case<gemv1_shape{8, 4, 1}>(1, 45, 8192, 64, nested, rng);
    variant_case<gemv1_shape{16, 2, 2}>(1, 33, 4096, 64, nested, rng);
    variant_case<gemv1_shape{8, 1, 2}>(1, 70, 1408, 64, nested, rng);
    variant_case<gemv1_shape{8, 2, 2}>(1, 45, 1536, 128, nested, rng);
    variant_case<gemv1_shape{8, 2, 2}>(1, 45, 4096, 4096, nested, rng);
  }
  // the candidates (pipelined, direct table addresses, more warps per SM): partial super-steps and
  // row tiles, groups in both pipeline registers and the loop's exits after either, block 128
  constexpr auto const& c = cuda_matmul::gemv_batch1_candidates;
  for (bool const nested : {false, true}) {
    variant_case<c[0]>(1, 45, 1408, 64, nested, rng);
    variant_case<c[0]>(1, 33, 8192, 64, nested, rng);
    variant_case<c[1]>(1, 45, 1408, 64, nested, rng);
    variant_case<c[1]>(1, 70, 12288, 64, nested, rng);
    variant_case<c[2]>(1, 45, 1536, 128, nested, rng);
    variant_case<c[2]>(1, 33, 8192 + 512, 64, nested, rng);
    variant_case<c[3]>(1, 45, 1408, 64, nested, rng);
    variant_case<c[3]>(1, 70, 8192, 64, nested, rng);
    variant_case<c[3]>(1, 33, 12288 + 512, 256, nested, rng);
    variant_case<c[4]>(1, 45, 4096 + 1024, 64, nested, rng);
    variant_case<c[4]>(1, 33, 8192, 64, nested, rng);
    variant_case<c[5]>(1, 70, 1408, 64, nested, rng);
    variant_case<c[5]>(1, 45, 16384, 64, nested, rng);
  }
}
#endif

namespace {
// A code type of this test alone: every kernel templated on it is instantiated here only, so its
// first use (and the shared-memory attribute set then) happens inside the capture below.
inline constexpr code_table<16> capture_probe_values = {
    {-1.0f, -0.8125f, -0.625f, -0.5f, -0.375f, -0.25f, -0.125f, 0.0f, 0.0625f, 0.1875f, 0.3125f,
     0.4375f, 0.5625f, 0.6875f, 0.84375f, 1.0f}};
using capture_probe = table_code<capture_probe_values>;
} // namespace

TEST_CASE("matmul_4bit's first call may be inside a CUDA graph capture (global mode)") {
  if (!qmem::test::gpu_present()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return;
  }
  using B = qmem::test::cuda_backend;
  std::mt19937 rng(77);
  std::size_t const n = 70, k = 1536;
  host_weight const hw = random_weight(n, k, 64, false, rng);
  backend_weight<B, capture_probe> bw(hw);
  cudaStream_t s = nullptr;
  cuda_detail::check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  exec::cuda const e{s, 0};
  // m = 1: the batch-1 kernel; 4 and 12: the small- and large-batch kernels (each needs the
  // shared-memory attribute on its first launch)
  for (std::size_t const m : {std::size_t{1}, std::size_t{4}, std::size_t{12}}) {
    CAPTURE(m);
    std::vector<bf16> const x = random_matrix<bf16>(m * k, rng);
    std::vector<bf16> model;
    std::vector<double> terms;
    gemv_model<bf16, capture_probe>(hw, x, m, model, terms);
    auto bx = B::upload(x);
    auto captured = B::template alloc<bf16>(m * n);
    auto direct = B::template alloc<bf16>(m * n);
    REQUIRE(cuda_matmul::gemv_fast_path(k, 64, bw.view.codes.data(), bx.view().data()));

    cudaGraph_t graph = nullptr;
    cuda_detail::check(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal),
                       "cudaStreamBeginCapture");
    bool threw = false;
    try {
      matmul_4bit<bf16>(e, bx.view(), m, bw.view, captured.view());
    } catch (std::exception const& ex) {
      threw = true;
      MESSAGE("matmul_4bit inside the capture threw: " << ex.what());
    }
    cudaError_t const ended = cudaStreamEndCapture(s, &graph);
    CHECK_FALSE(threw);
    REQUIRE(ended == cudaSuccess);
    cudaGraphExec_t exec = nullptr;
    REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
    REQUIRE(cudaGraphLaunch(exec, s) == cudaSuccess);
    REQUIRE(cudaStreamSynchronize(s) == cudaSuccess);
    (void)cudaGraphExecDestroy(exec);
    (void)cudaGraphDestroy(graph);

    matmul_4bit<bf16>(e, bx.view(), m, bw.view, direct.view()); // the same call, not captured
    cuda_detail::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    std::vector<bf16> const got = B::download(captured.view());
    expect_close(got, model, terms, gemv_sum(k), 0.0, "captured first call m=" + std::to_string(m));
    std::vector<bf16> const again = B::download(direct.view());
    bool same = true;
    for (std::size_t i = 0; i < got.size(); ++i)
      same = same && got[i].bits == again[i].bits;
    CHECK(same);
  }
  (void)cudaStreamDestroy(s);
}

namespace {
//! The m > 16 forward with its dequantization in `chunks` row chunks overlapping the GEMMs
//! (cuda_matmul::dequantize_gemm), captured in a graph (global mode) or called directly, against
//! the host reference.
//! With l2_bytes > 0: the L2-resident chunked forward instead (cuda_matmul::dequantize_gemm_l2,
//! chunks of l2_chunk_rows(..., l2_bytes) rows in one reused buffer; `chunks` is then unused).
template <class T>
void check_overlap(std::size_t m, std::size_t n, std::size_t k, std::size_t block, bool nested,
                   unsigned chunks, bool captured, std::mt19937& rng, std::size_t l2_bytes = 0) {
  using B = qmem::test::cuda_backend;
  host_weight const hw = random_weight(n, k, block, nested, rng);
  std::vector<T> const x = random_matrix<T>(m * k, rng);
  std::vector<T> ref(m * n);
  matmul_4bit<T>(exec::host{}, {x.data(), x.size()}, m, host_view<nf4>(hw),
                 tensor_view<T>{ref.data(), ref.size()});
  std::vector<float> const wd = qmem::quant::detail::mm::host_dequantized<T>(host_view<nf4>(hw));
  std::vector<double> terms(m * n, 0.0);
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j)
      for (std::size_t l = 0; l < k; ++l)
        terms[i * n + j] += std::fabs(static_cast<double>(to_float(x[i * k + l])) * wd[j * k + l]);
  backend_weight<B, nf4> bw(hw);
  auto bx = B::upload(x);
  auto by = B::template alloc<T>(m * n);
  auto bwd = B::template alloc<T>(n * k);
  auto lws = B::template alloc<std::byte>(cublaslt_workspace_bytes);
  cudaStream_t s = nullptr;
  cuda_detail::check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  exec::cuda const e{s, 0};
  std::size_t const l2_rows =
      cuda_matmul::l2_chunk_rows(n, k, block, nested ? 256 : 0, l2_bytes, sizeof(T));
  auto chunk = B::template alloc<T>(l2_rows * k);
  auto call = [&] {
    if (l2_bytes > 0)
      cuda_matmul::dequantize_gemm_l2<T>(e, bx.view().data(), m, bw.view, by.view().data(),
                                         chunk.view().data(), l2_rows, lws.view().data(),
                                         lws.view().size());
    else
      cuda_matmul::dequantize_gemm<T>(e, bx.view().data(), m, bw.view, by.view().data(),
                                      bwd.view().data(), lws.view().data(), lws.view().size(),
                                      chunks);
  };
  if (captured) {
    cudaGraph_t graph = nullptr;
    cuda_detail::check(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal),
                       "cudaStreamBeginCapture");
    bool threw = false;
    try {
      call();
    } catch (std::exception const& ex) {
      threw = true;
      MESSAGE("dequantize_gemm inside the capture threw: " << ex.what());
    }
    cudaError_t const ended = cudaStreamEndCapture(s, &graph);
    CHECK_FALSE(threw);
    REQUIRE(ended == cudaSuccess);
    cudaGraphExec_t exec = nullptr;
    REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
    REQUIRE(cudaGraphLaunch(exec, s) == cudaSuccess);
    (void)cudaStreamSynchronize(s);
    (void)cudaGraphExecDestroy(exec);
    (void)cudaGraphDestroy(graph);
  } else {
    call();
  }
  cuda_detail::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  (void)cudaStreamDestroy(s);
  expect_close(B::download(by.view()), ref, terms, plain_sum(k), 0.0,
               (l2_bytes > 0 ? std::string("L2 chunks of rows=") + std::to_string(l2_rows)
                             : std::string("overlapped forward chunks=") + std::to_string(chunks)) +
                   " m=" + std::to_string(m) + " n=" + std::to_string(n) +
                   " k=" + std::to_string(k) + " block=" + std::to_string(block) +
                   (nested ? " nested" : " plain") + (captured ? " captured" : ""));
}
} // namespace

TEST_CASE("the m > 16 forward with dequantization overlapped in row chunks") {
  if (!qmem::test::gpu_present()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return;
  }
  std::mt19937 rng(99);
  // captured first: the side stream and events are created inside the capture
  check_overlap<bf16>(40, 70, 192, 64, false, 3, true, rng);
  check_overlap<bf16>(40, 70, 192, 64, false, 3, false, rng);
  check_overlap<f16>(33, 70, 4096, 64, true, 3, false, rng);  // nested: chunks of 4-row multiples
  check_overlap<bf16>(24, 45, 100, 32, false, 4, false, rng); // 8-row quantum, partial last
  check_overlap<bf16>(20, 300, 384, 128, true, 8, true, rng); // 256-row quantum: 256 + 44
  check_overlap<bf16>(17, 64, 256, 64, false, 1, false, rng);
}

TEST_CASE("the m > 16 forward in L2-resident row chunks (one reused buffer)") {
  if (!qmem::test::gpu_present()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return;
  }
  std::mt19937 rng(98);
  // chunk rows from the byte budget: 70 x 192 bf16 with 12 KiB -> 32 rows (quanta of 8) -> 3
  // chunks evened out to 24 + 24 + 22 rows; a budget below one quantum still takes one quantum; a
  // budget above the weight is the one-shot product; nested (256-block groups) and f16; captured
  CHECK(cuda_matmul::l2_chunk_rows(70, 192, 64, 0, 12288, 2) == 24);
  CHECK(cuda_matmul::l2_chunk_rows(70, 192, 64, 0, 1, 2) == 8);
  CHECK(cuda_matmul::l2_chunk_rows(70, 192, 64, 0, 1 << 20, 2) == 70);
  check_overlap<bf16>(40, 70, 192, 64, false, 0, false, rng, 12288);
  check_overlap<bf16>(40, 70, 192, 64, false, 0, true, rng, 12288);
  check_overlap<bf16>(24, 45, 100, 32, false, 0, false, rng, 1);
  check_overlap<f16>(33, 70, 4096, 64, true, 0, false, rng, 64 << 10);
  check_overlap<bf16>(20, 300, 384, 128, true, 0, false, rng, 64 << 10);
  check_overlap<bf16>(17, 64, 256, 64, false, 0, false, rng, 1 << 20);
}
#endif

#if QMEM_HAS_CUDA()
namespace {
//! The fused sm_90a GEMM (cuda_matmul::fused_gemm) on one shape against the host reference with
//! bound 1 (the same weights as dequantize + cuBLASLt, summed in fp32 in another order). Returns
//! whether the kernel ran (false: not runnable on this build or device, or the shape outside
//! sm90::fits; y then must be untouched).
template <class T, class Code, int Variant = 0>
bool check_fused(std::size_t m, std::size_t n, std::size_t k, std::size_t block, bool nested,
                 std::mt19937& rng) {
  using B = qmem::test::cuda_backend;
  host_weight const hw = random_weight(n, k, block, nested, rng);
  std::vector<T> const x = random_matrix<T>(m * k, rng);
  std::vector<T> ref(m * n);
  matmul_4bit<T>(exec::host{}, {x.data(), x.size()}, m, host_view<Code>(hw),
                 tensor_view<T>{ref.data(), ref.size()});
  std::vector<double> const terms = abs_terms<T, Code>(hw, x, m, false);
  backend_weight<B, Code> bw(hw);
  auto bx = B::upload(x);
  std::vector<T> const sentinel(m * n, from_float<T>(12345.0f));
  auto by = B::upload(sentinel);
  cudaStream_t s = nullptr;
  cuda_detail::check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  exec::cuda const e{s, 0};
  bool const ran =
      cuda_matmul::fused_gemm<T, Code, Variant>(e, bx.view().data(), m, bw.view, by.view().data());
  cuda_detail::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  (void)cudaStreamDestroy(s);
  std::vector<T> const got = B::download(by.view());
  std::string const what =
      case_name("cuda", Variant == 3 ? "fused sm_90a forward (register A)" : "fused sm_90a forward",
                m, n, k, block, nested);
  if (ran)
    expect_close(got, ref, terms, plain_sum(k), 0.0, what);
  else
    CHECK_MESSAGE(got == sentinel, what);
  return ran;
}
} // namespace

TEST_CASE("the fused sm_90a GEMM (dequantization in the main loop) against the host reference") {
  if (!qmem::test::gpu_present()) {
    MESSAGE("skipped: no CUDA device on this machine");
    return;
  }
  std::mt19937 rng(77);
  // odd shapes: n not a multiple of the 128-row tile, m not a multiple of the 256-token tile (and
  // m below one tile), k not a multiple of the 64-column step (96, 160, 2080); blocks of 32 to
  // 4096 (rows that start inside a block: 2080 with 4096); 64 steps (the 4-stage ring wraps 16
  // times); NF4 and FP4, bf16 and f16, plain and nested scales
  if (!check_fused<bf16, nf4>(300, 200, 96, 64, false, rng)) {
    MESSAGE("skipped: the fused sm_90a GEMM does not run here (not built with "
            "-gencode=arch=compute_90a,code=sm_90a, or not a compute capability 9.0 device)");
    return;
  }
  CHECK(check_fused<f16, fp4>(40, 70, 4096, 4096, true, rng));
  CHECK(check_fused<f16, nf4>(513, 128, 160, 32, true, rng));
  CHECK(check_fused<bf16, fp4>(17, 300, 384, 128, false, rng));
  CHECK(check_fused<bf16, nf4>(260, 136, 2080, 4096, true, rng));
  CHECK(check_fused<bf16, nf4>(520, 136, 1024, 64, false, rng));
  CHECK(check_fused<f16, fp4>(256, 256, 512, 256, false, rng));
  // outside sm90::fits (k % 32 != 0): nothing launched, y untouched
  CHECK_FALSE(check_fused<bf16, nf4>(40, 70, 100, 64, false, rng));
  // the register-A variant (weight decoded into wgmma's A registers) on the same odd shapes
  CHECK(check_fused<bf16, nf4, 3>(300, 200, 96, 64, false, rng));
  CHECK(check_fused<f16, fp4, 3>(40, 70, 4096, 4096, true, rng));
  CHECK(check_fused<f16, nf4, 3>(513, 128, 160, 32, true, rng));
  CHECK(check_fused<bf16, fp4, 3>(17, 300, 384, 128, false, rng));
  CHECK(check_fused<bf16, nf4, 3>(260, 136, 2080, 4096, true, rng));
  CHECK(check_fused<bf16, nf4, 3>(520, 136, 1024, 64, false, rng));
}
#endif

TEST_CASE_TEMPLATE_DEFINE("matmul_4bit_grad_input matches the host reference", B, mm_grad) {
  if (qmem::test::skip<B>())
    return;
  std::mt19937 rng(99);
  for (shape const& s : shapes)
    for (bool const nested : {false, true}) {
      check_grad_input<B, bf16, nf4>(s.m, s.n, s.k, s.block, nested, rng);
      check_grad_input<B, f16, fp4>(s.m, s.n, s.k, s.block, nested, rng);
    }
}
TEST_CASE_TEMPLATE_APPLY(mm_grad, qmem::test::backends);

TEST_CASE_TEMPLATE_DEFINE("matmul_int8 and linear_int8 equal the host bit for bit", B, mm_int8) {
  if (qmem::test::skip<B>())
    return;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> code(-127, 127);
  std::uniform_real_distribution<float> sc(0.1f, 3.0f);
  struct dims {
    std::size_t m, n, k;
  };
  // outlier columns (every 5th): 2, 14, 27 and 205 (gathered into dense blocks on the GPU), 308
  // (more than linear_int8_dense_outliers: read in place); 70 x 100 outputs span several tiles
  for (dims const d : {dims{1, 5, 8}, dims{7, 33, 64}, dims{40, 24, 132}, dims{3, 16, 1024},
                       dims{4, 20, 1536}, dims{70, 100, 256}}) {
    CAPTURE(d.m);
    CAPTURE(d.n);
    CAPTURE(d.k);
    std::vector<std::int8_t> a(d.m * d.k), b(d.n * d.k);
    for (auto& v : a)
      v = static_cast<std::int8_t>(code(rng));
    for (auto& v : b)
      v = static_cast<std::int8_t>(code(rng));
    std::vector<float> rs(d.m), cs(d.n);
    for (auto& v : rs)
      v = sc(rng);
    for (auto& v : cs)
      v = sc(rng);
    // the int32 sum is exact: check one element independently of the epilogue helper
    std::vector<float> ref(d.m * d.n);
    matmul_int8(exec::host{}, {a.data(), a.size()}, {rs.data(), rs.size()}, {b.data(), b.size()},
                {cs.data(), cs.size()}, d.m, d.n, d.k, tensor_view<float>{ref.data(), ref.size()});
    {
      std::int64_t acc = 0;
      for (std::size_t l = 0; l < d.k; ++l)
        acc += std::int64_t{a[l]} * std::int64_t{b[l]};
      double const expect = static_cast<double>(acc) * rs[0] * cs[0] / (127.0 * 127.0);
      CHECK(std::fabs(ref[0] - expect) <= 1e-6 * std::fabs(expect) + 1e-30);
    }
    auto ba = B::upload(a);
    auto bb = B::upload(b);
    auto brs = B::upload(rs);
    auto bcs = B::upload(cs);
    auto bo = B::template alloc<float>(d.m * d.n);
    auto ws = workspace_for<B>(matmul_int8_workspace_bytes(d.m, d.n));
    matmul_int8(B::exec(), ba.view(), brs.view(), bb.view(), bcs.view(), d.m, d.n, d.k, bo.view(),
                ws.view());
    CHECK(B::download(bo.view()) == ref);

    // LLM.int8 linear: activations with a few outlier columns (|x| > 6)
    std::vector<bf16> x = random_matrix<bf16>(d.m * d.k, rng);
    for (std::size_t l = 0; l < d.k; l += 5)
      x[(l % d.m) * d.k + l] = bf16(l % 2 == 0 ? 9.5f : -7.25f);
    for (float const threshold : {6.0f, 0.0f}) {
      CAPTURE(threshold);
      std::vector<bf16> yref(d.m * d.n);
      linear_int8<bf16>(exec::host{}, {x.data(), x.size()}, {b.data(), b.size()},
                        {cs.data(), cs.size()}, d.m, d.n, d.k, threshold,
                        tensor_view<bf16>{yref.data(), yref.size()});
      auto bxv = B::upload(x);
      auto by = B::template alloc<bf16>(d.m * d.n);
      auto ws2 = workspace_for<B>(linear_int8_workspace_bytes(d.m, d.n, d.k));
      linear_int8<bf16>(B::exec(), bxv.view(), bb.view(), bcs.view(), d.m, d.n, d.k, threshold,
                        by.view(), ws2.view());
      CHECK(B::download(by.view()) == yref);
      // and the layer approximates x * W^T (W = b * cs / 127) to int8 accuracy
      double worst = 0.0;
      for (std::size_t i = 0; i < d.m; ++i)
        for (std::size_t j = 0; j < d.n; ++j) {
          double exact = 0.0, mag = 0.0;
          for (std::size_t l = 0; l < d.k; ++l) {
            double const t =
                static_cast<double>(to_float(x[i * d.k + l])) * b[j * d.k + l] * cs[j] / 127.0;
            exact += t;
            mag += std::fabs(t);
          }
          worst = std::max(worst, std::fabs(to_float(yref[i * d.n + j]) - exact) / (mag + 1e-30));
        }
      // threshold 6 keeps the outliers exact: int8 rounding of |x| <= 1 (1/254 relative) remains;
      // without it the 9.5 outliers stretch the row scale and the error grows
      if (threshold > 0.0f)
        CHECK(worst < 0.02);
    }
  }
}
TEST_CASE_TEMPLATE_APPLY(mm_int8, qmem::test::backends);

TEST_CASE_TEMPLATE_DEFINE("quantized matmuls reject bad arguments and write nothing", B, mm_bad) {
  if (qmem::test::skip<B>())
    return;
  std::mt19937 rng(5);
  host_weight const hw = random_weight(8, 64, 64, false, rng);
  backend_weight<B, nf4> bw(hw);
  auto bx = B::upload(random_matrix<bf16>(2 * 64, rng));
  std::vector<bf16> const sentinel(2 * 8, bf16(42.0f));
  auto by = B::upload(sentinel);
  auto ws = workspace_for<B>(0);
  // wrong y size
  auto by_small = B::upload(std::vector<bf16>(15, bf16(42.0f)));
  CHECK_THROWS_AS(matmul_4bit<bf16>(B::exec(), bx.view(), 2, bw.view, by_small.view(), ws.view()),
                  qmem::bad_argument);
  // m that does not match x
  CHECK_THROWS_AS(matmul_4bit<bf16>(B::exec(), bx.view(), 3, bw.view, by.view(), ws.view()),
                  qmem::bad_argument);
  // bad block size
  auto w_bad = bw.view;
  w_bad.block_size = 48;
  CHECK_THROWS_AS(matmul_4bit<bf16>(B::exec(), bx.view(), 2, w_bad, by.view(), ws.view()),
                  qmem::bad_argument);
  // too few scales
  auto w_short = bw.view;
  w_short.scales.absmax = w_short.scales.absmax.subview(0, 7);
  CHECK_THROWS_AS(matmul_4bit<bf16>(B::exec(), bx.view(), 2, w_short, by.view(), ws.view()),
                  qmem::bad_argument);
  // host memory handed to the GPU (or device memory to the host)
  if constexpr (!std::is_same_v<B, qmem::test::host_backend>) {
    std::vector<bf16> hx(2 * 64);
    CHECK_THROWS_AS(
        matmul_4bit<bf16>(B::exec(), {hx.data(), hx.size()}, 2, bw.view, by.view(), ws.view()),
        qmem::bad_argument);
    // a large batch without the workspace it needs
    auto bx40 = B::upload(random_matrix<bf16>(40 * 64, rng));
    auto by40 = B::template alloc<bf16>(40 * 8);
    CHECK_THROWS_AS(matmul_4bit<bf16>(B::exec(), bx40.view(), 40, bw.view, by40.view(), ws.view()),
                    qmem::bad_argument);
  }
  CHECK(B::download(by.view()) == sentinel);
  // int8: k not a multiple of 4 on the GPU; mismatched scales everywhere
  std::vector<float> const rs(2, 1.0f), cs(8, 1.0f);
  auto ba = B::upload(std::vector<std::int8_t>(2 * 64, 1));
  auto bb = B::upload(std::vector<std::int8_t>(8 * 64, 1));
  auto brs = B::upload(rs);
  auto bcs_short = B::upload(std::vector<float>(7, 1.0f));
  auto bo = B::upload(std::vector<float>(16, 42.0f));
  auto ws8 = workspace_for<B>(matmul_int8_workspace_bytes(2, 8));
  CHECK_THROWS_AS(matmul_int8(B::exec(), ba.view(), brs.view(), bb.view(), bcs_short.view(), 2, 8,
                              64, bo.view(), ws8.view()),
                  qmem::bad_argument);
  CHECK(B::download(bo.view()) == std::vector<float>(16, 42.0f));
}
TEST_CASE_TEMPLATE_APPLY(mm_bad, qmem::test::backends);

#if QMEM_HAS_CUDA()
TEST_CASE("cuda matmul: a nested block size above 2^32 - 1 is a power of two or refused (host)") {
  // the kernels divide by a 32-bit nested block size (or shift by a power of two's log2): a larger
  // divisor used to be truncated, which put every block in a wrong absmax2 group
  block_scales s;
  s.nested_block_size = (std::size_t{1} << 32) + 256;
  CHECK_THROWS_AS(cuda_matmul::make_scale_args(s), qmem::bad_argument);
  s.nested_block_size = std::size_t{1} << 40;
  CHECK(cuda_matmul::make_scale_args(s).nested_shift == 40);
  s.nested_block_size = 384;
  auto const a = cuda_matmul::make_scale_args(s);
  CHECK(a.nested_shift == -1);
  CHECK(a.nested_block == 384u);
}
#endif
