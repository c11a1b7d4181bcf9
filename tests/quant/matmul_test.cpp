// Matmul with quantized weights, the dispatched paths: the host reference against hand-computed
// values, every backend against the host reference through matmul_4bit and
// matmul_4bit_grad_input (both the GEMV-style and the large-batch paths, on odd shapes), and the
// preconditions (overflowing shapes, bad arguments that write nothing). The GEMV candidate
// kernels are tested in matmul_gemv1_test.cpp and matmul_gemvm_test.cpp, the large-batch GEMM
// variants and the int8 products in matmul_gemm_test.cpp; the tolerances are derived in
// matmul_test_support.hpp.
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "quant/matmul_test_support.hpp"

namespace {

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

TEST_CASE_TEMPLATE_DEFINE("quantized matmuls refuse an output that overlaps an input, on every "
                          "backend, and write nothing",
                          B, mm_alias) {
  if (qmem::test::skip<B>())
    return;
  std::mt19937 rng(6);
  host_weight const hw = random_weight(8, 64, 64, false, rng);
  backend_weight<B, nf4> bw(hw);
  std::vector<bf16> const hx = random_matrix<bf16>(2 * 64, rng);
  auto bx = B::upload(hx);
  auto ws = workspace_for<B>(matmul_4bit_grad_input_workspace_bytes<bf16>(2, bw.view));
  // y inside x: the GPU kernels would read what they write (the host would not, but both refuse)
  tensor_view<bf16> const y_in_x = bx.view().subview(64, 2 * 8);
  CHECK_THROWS_AS(matmul_4bit<bf16>(B::exec(), bx.view(), 2, bw.view, y_in_x, ws.view()),
                  qmem::bad_argument);
  // grad_x inside grad_y (grad_y: 2 x 8, grad_x: 2 x 64)
  auto bg = B::upload(random_matrix<bf16>(2 * 64, rng));
  tensor_view<bf16 const> const gy_in_gx = bg.view().subview(32, 2 * 8);
  CHECK_THROWS_AS(
      matmul_4bit_grad_input<bf16>(B::exec(), gy_in_gx, 2, bw.view, bg.view(), ws.view()),
      qmem::bad_argument);
  CHECK(B::download(bx.view()) == hx);
  // int8: out over row_scale; linear_int8: out inside x
  auto ba = B::upload(std::vector<std::int8_t>(2 * 64, 1));
  auto bb = B::upload(std::vector<std::int8_t>(8 * 64, 1));
  std::vector<float> const scales(24, 1.0f);
  auto bs = B::upload(scales);
  tensor_view<float const> const row_scale = bs.view().subview(0, 2);
  tensor_view<float const> const col_scale = bs.view().subview(16, 8);
  tensor_view<float> const out_over_rows = bs.view().subview(0, 16);
  auto ws8 = workspace_for<B>(linear_int8_workspace_bytes(2, 8, 64));
  CHECK_THROWS_AS(matmul_int8(B::exec(), ba.view(), row_scale, bb.view(), col_scale, 2, 8, 64,
                              out_over_rows, ws8.view()),
                  qmem::bad_argument);
  CHECK(B::download(bs.view()) == scales);
  tensor_view<bf16> const out_in_x = bx.view().subview(0, 2 * 8);
  CHECK_THROWS_AS(linear_int8<bf16>(B::exec(), bx.view(), bb.view(), col_scale, 2, 8, 64, 6.0f,
                                    out_in_x, ws8.view()),
                  qmem::bad_argument);
  CHECK(B::download(bx.view()) == hx);
  if constexpr (!std::is_same_v<B, qmem::test::host_backend>) {
    // the GPU's workspace over the output
    auto ws_big = workspace_for<B>(matmul_int8_workspace_bytes(2, 8) + 256);
    tensor_view<float> const out_in_ws = ws_big.view().subview(0, 64).template reinterpret<float>();
    CHECK_THROWS_AS(matmul_int8(B::exec(), ba.view(), row_scale, bb.view(), col_scale, 2, 8, 64,
                                out_in_ws, ws_big.view()),
                    qmem::bad_argument);
  }
}
TEST_CASE_TEMPLATE_APPLY(mm_alias, qmem::test::backends);

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
