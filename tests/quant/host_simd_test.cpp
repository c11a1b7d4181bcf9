// The AVX2 / AVX-512 host loops (quant/detail/host_simd.hpp) against the portable element code:
// bf16 widening over every bf16 pattern, f32 -> bf16 narrowing over every upper half with the
// rounding-critical lower halves plus a strided sweep of all 2^32 floats (NaN, inf, subnormals
// included), and every vectorized quantize/dequantize loop against the portable loop of
// quant/blockwise.hpp and quant/rowwise.hpp, bit for bit, on full, partial and odd blocks with
// NaN, inf and all-zero blocks. Cases for an instruction set the CPU lacks say so and skip.
#include <qmem/quant.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "quant/quant_test_support.hpp"

#if QMEM_QUANT_HOST_AVX2

namespace {

using namespace qmem;
using namespace qmem::quant;
using qmem::test::same_bits;
namespace qd = qmem::quant::detail;

bool have_avx2() {
  if (!qd::host_has_avx2())
    MESSAGE("SKIPPED: this CPU has no AVX2");
  return qd::host_has_avx2();
}

bool have_avx512() {
  if (!qd::host_has_avx512())
    MESSAGE("SKIPPED: this CPU has no AVX-512F");
  return qd::host_has_avx512();
}

//! The floats of the narrowing sweep: every upper half with the lower halves where rounding
//! changes (0, 1, just below / at / above the halfway point, all ones), then every 251st pattern.
std::vector<float> sweep_floats() {
  std::vector<float> v;
  std::uint32_t const lows[] = {0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff, 0x4000, 0xc000};
  for (std::uint32_t hi = 0; hi < 0x10000; ++hi)
    for (std::uint32_t lo : lows)
      v.push_back(std::bit_cast<float>(hi << 16 | lo));
  for (std::uint64_t u = 0; u < (std::uint64_t{1} << 32); u += 251)
    v.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(u)));
  return v;
}

std::vector<bf16> every_bf16() {
  std::vector<bf16> v(0x10000);
  for (std::uint32_t i = 0; i < 0x10000; ++i)
    v[i] = bf16::from_bits(static_cast<std::uint16_t>(i));
  return v;
}

std::vector<float> scalar_widen(std::vector<bf16> const& x) {
  std::vector<float> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i)
    y[i] = to_float(x[i]);
  return y;
}

//! Data with every special case in some block: N(0, 1) values, an all-zero block, a NaN, an
//! infinity, subnormals, values that normalize to exact thresholds' neighbours.
std::vector<float> test_values(std::size_t n, std::size_t block) {
  auto v = qmem::test::normal_floats(n, 7);
  for (std::size_t i = 0; i < block && i < n; ++i)
    v[i] = 0.0f; // block 0 all zero
  if (n > 2 * block) {
    v[block + 3] = std::numeric_limits<float>::quiet_NaN();    // block 1: NaN absmax
    v[2 * block + 1] = std::numeric_limits<float>::infinity(); // block 2: inf absmax
  }
  if (n > 3 * block + 2) {
    v[3 * block] = 1e-42f; // subnormals in block 3
    v[3 * block + 1] = -3e-40f;
  }
  return v;
}

//! Bitwise equality, except that two NaN floats are equal whatever their sign: the sign of a NaN
//! product is not fixed in C++ (g++ folds table[k] * absmax with table[k] == -1 into -absmax,
//! which flips a NaN's sign bit; a multiply keeps it). bf16/f16 NaN are canonical and compared
//! bitwise.
template <class T>
bool same_values(std::vector<T> const& a, std::vector<T> const& b) {
  if constexpr (std::is_same_v<T, float>) {
    if (a.size() != b.size())
      return false;
    for (std::size_t i = 0; i < a.size(); ++i)
      if (std::bit_cast<std::uint32_t>(a[i]) != std::bit_cast<std::uint32_t>(b[i]) &&
          !(a[i] != a[i] && b[i] != b[i]))
        return false;
    return true;
  } else {
    return same_bits(a, b);
  }
}

//! Runs the portable loop (the same qd::*_body functions the dispatch falls back to).
template <class C, class T>
void portable_quantize(std::vector<T> const& x, std::size_t block, std::vector<std::uint8_t>& codes,
                       std::vector<float>& absmax) {
  qd::quantize_blocks_body<C, false>(C::book, x.data(), x.size(), block, codes.data(),
                                     absmax.data(), rounding{}, 0, absmax.size());
}

template <class C, class T>
void portable_dequantize(std::vector<std::uint8_t> const& codes, std::vector<float> const& absmax,
                         std::size_t block, std::vector<T>& y) {
  qd::dequantize_blocks_body<C>(C::book, codes.data(), absmax.data(), y.size(), block, y.data(), 0,
                                absmax.size());
}

template <class C, class T>
void check_blockwise_data(std::vector<T> const& x, std::size_t block) {
  std::size_t const n = x.size();
  std::size_t const blocks = block_count(n, block);
  std::vector<std::uint8_t> codes(code_bytes<C>(n)), ref_codes(code_bytes<C>(n));
  std::vector<float> absmax(blocks), ref_absmax(blocks);
  quantize_blockwise<C>(exec::host{}, view(x), block, view(codes), view(absmax));
  portable_quantize<C>(x, block, ref_codes, ref_absmax);
  CHECK(same_bits(absmax, ref_absmax));
  CHECK(same_bits(codes, ref_codes));
  std::vector<T> y(n), ref_y(n);
  dequantize_blockwise<C>(exec::host{}, view(std::as_const(codes)), view(std::as_const(absmax)),
                          block, view(y));
  portable_dequantize<C>(codes, absmax, block, ref_y);
  CHECK(same_values(y, ref_y));
}

template <class C, class T>
void check_blockwise(std::size_t n, std::size_t block) {
  CAPTURE(n);
  CAPTURE(block);
  check_blockwise_data<C>(qmem::test::convert<T>(test_values(n, block)), block);
}

//! check_blockwise on given values, from float and from bf16.
template <class C>
void check_blockwise_values(std::vector<float> const& x, std::size_t block) {
  check_blockwise_data<C>(x, block);
  check_blockwise_data<C>(qmem::test::convert<bf16>(x), block);
}

template <class C>
void check_code_type(std::size_t block) {
  for (std::size_t n : {block * 9, block * 9 - 1, block * 4 + 17, block / 2 + 1, std::size_t{1}}) {
    check_blockwise<C, float>(n, block);
    check_blockwise<C, bf16>(n, block);
    check_blockwise<C, f16>(n, block);
  }
}

} // namespace

TEST_CASE("host_simd: bf16 widening equals the scalar conversion for every bf16") {
  auto const x = every_bf16();
  auto const ref = scalar_widen(x);
  if (have_avx2()) {
    std::vector<float> y(x.size());
    qd::widen_bf16_avx2(x.data(), x.size(), y.data());
    CHECK(same_bits(y, ref));
  }
  if (have_avx512()) {
    std::vector<float> y(x.size());
    qd::widen_bf16_avx512(x.data(), x.size(), y.data());
    CHECK(same_bits(y, ref));
  }
}

TEST_CASE("host_simd: f32 -> bf16 narrowing equals float_to_bf16_bits over a dense sweep") {
  auto const x = sweep_floats();
  auto const ref = qmem::test::convert<bf16>(x);
  // the sweep reaches NaN, infinities and subnormals of both signs, and every NaN narrows to 0x7fc0
  CHECK(ref[0x7fc1 * 8].bits == 0x7fc0);
  CHECK(ref[0xffc1 * 8].bits == 0x7fc0);
  CHECK(ref[0x7f80 * 8].bits == 0x7f80);
  if (have_avx2()) {
    std::vector<bf16> y(x.size());
    qd::narrow_bf16_avx2(x.data(), x.size(), y.data());
    CHECK(same_bits(y, ref));
  }
  if (have_avx512()) {
    std::vector<bf16> y(x.size());
    qd::narrow_bf16_avx512(x.data(), x.size(), y.data());
    CHECK(same_bits(y, ref));
  }
}

TEST_CASE("host_simd: f32 -> f16 narrowing equals float_to_f16_bits over a dense sweep") {
  if (!have_avx512())
    return;
  auto const x = sweep_floats();
  auto const ref = qmem::test::convert<f16>(x);
  CHECK(ref[0x7fc1 * 8].bits == 0x7e00); // NaN
  CHECK(ref[0xffc1 * 8].bits == 0xfe00);
  CHECK(ref[0x477f * 8 + 6].bits == 0x7bfa); // 0x477f4000 = 65344: finite
  CHECK(ref[0x477f * 8 + 5].bits == 0x7c00); // 0x477fffff: past 65520, rounds to inf
  std::vector<f16> y(x.size());
  qd::narrow_f16_avx512(x.data(), x.size(), y.data());
  CHECK(same_bits(y, ref));
}

bool have_avx512_bf16() {
  if (!qd::host_has_avx512_bf16())
    MESSAGE("SKIPPED: this CPU has no AVX-512 BW/VL/DQ/BF16/VBMI");
  return qd::host_has_avx512_bf16();
}

TEST_CASE("host_simd: hardware bf16 / f16 narrowing (checked) equals the integer rounding") {
  if (!have_avx512_bf16())
    return;
  // the sweep holds NaN of every sign and many payloads, subnormals, infinities and ties
  auto const x = sweep_floats();
  std::vector<bf16> yb(x.size());
  qd::narrow_avx512bf16(x.data(), x.size(), yb.data());
  CHECK(same_bits(yb, qmem::test::convert<bf16>(x)));
  std::vector<f16> yh(x.size());
  qd::narrow_avx512bf16(x.data(), x.size(), yh.data());
  CHECK(same_bits(yh, qmem::test::convert<f16>(x)));
}

//! The 8-bit loops to 16-bit outputs (byte-permute tables, mirrored tables, gathers; hardware
//! rounding checked and unchecked) against the portable loop: every code in every block (a NaN
//! code, an infinity code, -0), every block size, partial last blocks of every length mod 64, and
//! absmax values on both sides of the unchecked range [2^-100, FLT_MAX] (subnormal products,
//! overflowing products, 0, inf, NaN, negative).
template <class C, class T>
void check_8bit_to_16bit(std::size_t block) {
  CAPTURE(block);
  float const absmaxes[] = {1.0f,
                            0.75f,
                            3.0f,
                            0x1p-100f,
                            std::nextafter(0x1p-100f, 0.0f),
                            1e-35f,
                            3e-39f,
                            1e-44f,
                            0.0f,
                            0x1.fffffep127f,
                            1e36f,
                            std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            -2.0f,
                            -0.0f};
  std::size_t const blocks = std::size(absmaxes) + 3;
  for (std::size_t tail : {std::size_t{0}, std::size_t{1}, std::size_t{31}, std::size_t{33},
                           std::size_t{63}, block - 1}) {
    if (tail >= block)
      continue;
    CAPTURE(tail);
    std::size_t const n = blocks * block - (tail == 0 ? 0 : block - tail);
    std::vector<std::uint8_t> codes(n);
    for (std::size_t i = 0; i < n; ++i)
      codes[i] = static_cast<std::uint8_t>((i * 167 + (i / block) * 61) & 0xff);
    // e4m3's NaN codes, -0 and e5m2's infinities in every block
    std::uint8_t const specials[] = {0x7f, 0xff, 0x80, 0x7c, 0xfc};
    for (std::size_t b = 0; b < blocks; ++b)
      for (std::size_t k = 0; k < std::size(specials) && b * block + k < n; ++k)
        codes[b * block + k] = specials[k];
    std::vector<float> absmax(blocks);
    for (std::size_t b = 0; b < blocks; ++b)
      absmax[b] = b < std::size(absmaxes) ? absmaxes[b] : 0.5f + static_cast<float>(b);
    std::vector<T> y(n), ref(n);
    dequantize_blockwise<C>(exec::host{}, view(std::as_const(codes)), view(std::as_const(absmax)),
                            block, view(y));
    portable_dequantize<C>(codes, absmax, block, ref);
    // Equal bits, or NaN on both sides: a NaN code times a NaN absmax gives one of the two NaNs,
    // which one depends on the operand order the compiler picked (x86 returns the first operand's
    // payload and sign; g++ -O1 -fsanitize=address commutes the portable loop's product), so a
    // NaN's sign and payload are not part of the contract.
    auto const same = [](T a, T b) {
      return a.bits == b.bits ||
             (std::isnan(static_cast<float>(a)) && std::isnan(static_cast<float>(b)));
    };
    std::size_t i = 0;
    while (i < n && same(y[i], ref[i]))
      ++i;
    if (i < n) // the first difference
      MESSAGE("element ", i, " code ", int{codes[i]}, " absmax ", absmax[i / block], ": ",
              y[i].bits, " != ", ref[i].bits);
    CHECK(i == n);
  }
}

template <class C>
void check_8bit_code_to_16bit() {
  for (std::size_t block : {64, 128, 256, 512, 1024, 2048, 4096}) {
    check_8bit_to_16bit<C, bf16>(block);
    check_8bit_to_16bit<C, f16>(block);
  }
}

TEST_CASE("host_simd: 8-bit dequantize to bf16 / f16 equals the portable loop") {
  if (!have_avx512_bf16())
    return;
  SUBCASE("dynamic_signed") { check_8bit_code_to_16bit<dynamic_signed>(); }
  SUBCASE("dynamic_unsigned") { check_8bit_code_to_16bit<dynamic_unsigned>(); }
  SUBCASE("linear_signed") { check_8bit_code_to_16bit<linear_signed>(); }
  SUBCASE("fp8_e4m3") { check_8bit_code_to_16bit<fp8_e4m3>(); }
  SUBCASE("fp8_e5m2") { check_8bit_code_to_16bit<fp8_e5m2>(); }
}

TEST_CASE("host_simd: blockwise loops equal the portable loops") {
  if (!have_avx2())
    return;
  SUBCASE("nf4") {
    for (std::size_t block : {32, 64, 256, 4096})
      check_code_type<nf4>(block);
  }
  SUBCASE("fp4") { check_code_type<fp4>(64); }
  SUBCASE("8-bit") {
    check_code_type<dynamic_signed>(256);
    check_code_type<dynamic_unsigned>(64);
    check_code_type<linear_signed>(4096);
    check_code_type<fp8_e4m3>(128);
    check_code_type<fp8_e5m2>(128);
  }
}

TEST_CASE("host_simd: NF4 quantization hits every threshold exactly as nf4::encode") {
  if (!have_avx512())
    return;
  // absmax 1 (the first element), then each threshold, its float neighbours and -0.0, NaN in a
  // block of its own: the binary search must agree with the 15 comparisons everywhere
  std::vector<float> x = {1.0f};
  for (float t : qd::nf4_thresholds) {
    auto const b = std::bit_cast<std::uint32_t>(t);
    x.insert(x.end(), {t, std::bit_cast<float>(b + 1), std::bit_cast<float>(b - 1)});
  }
  x.push_back(-0.0f);
  x.resize(64, 0.5f);
  x.push_back(std::numeric_limits<float>::quiet_NaN());
  x.resize(128, -0.25f);
  std::vector<std::uint8_t> codes(64), ref_codes(64);
  std::vector<float> absmax(2), ref_absmax(2);
  quantize_blockwise<nf4>(exec::host{}, view(std::as_const(x)), 64, view(codes), view(absmax));
  portable_quantize<nf4>(x, 64, ref_codes, ref_absmax);
  CHECK(same_bits(codes, ref_codes));
  CHECK(same_bits(absmax, ref_absmax));
  CHECK(absmax[0] == 1.0f);
  CHECK(absmax[1] != absmax[1]);
}

TEST_CASE("host_simd: the NF4 bucket encoder equals nf4::encode on [-17/16, 17/16]") {
  if (!have_avx512_bf16())
    return;
  // every float of both signs below 17/16 with QMEM_EXHAUSTIVE=1 (2.1e9 values); otherwise
  // every 7th, plus +-64 ulps around every threshold and every bucket edge k/16
  bool const exhaustive = std::getenv("QMEM_EXHAUSTIVE") != nullptr;
  std::uint32_t const top = 0x3f880000u; // 17/16
  std::vector<float> xs;
  auto around = [&](float v) {
    auto const b = std::bit_cast<std::uint32_t>(v);
    for (std::uint32_t d = 0; d <= 64; ++d)
      for (std::uint32_t u : {b + d, b - d})
        if ((u & 0x7fffffffu) < top)
          xs.push_back(std::bit_cast<float>(u));
  };
  for (float t : qd::nf4_thresholds)
    around(t);
  for (int k = -17; k <= 17; ++k)
    around(static_cast<float>(k) / 16.0f);
  std::uint32_t const stride = exhaustive ? 1 : 7;
  std::size_t mismatches = 0;
  alignas(64) float batch[16];
  std::uint8_t codes[16];
  std::size_t filled = 0;
  auto flush = [&] {
    qd::nf4_encode16_bucket_avx512(batch, codes);
    for (std::size_t j = 0; j < filled; ++j)
      if (codes[j] != nf4::encode(batch[j], nf4::book) && mismatches++ < 8)
        MESSAGE("xn ", batch[j], " (", std::bit_cast<std::uint32_t>(batch[j]), "): ", int{codes[j]},
                " != ", int{nf4::encode(batch[j], nf4::book)});
    filled = 0;
  };
  auto push = [&](float v) {
    batch[filled++] = v;
    if (filled == 16)
      flush();
  };
  for (float v : xs)
    push(v);
  for (std::uint32_t u = 0; u < top; u += stride) {
    push(std::bit_cast<float>(u));
    push(std::bit_cast<float>(u | 0x80000000u));
  }
  if (filled != 0) {
    std::fill(batch + filled, batch + 16, 0.0f);
    flush();
  }
  CHECK(mismatches == 0);
}

TEST_CASE("host_simd: NF4 quantization in groups of 16 blocks equals the portable loop") {
  if (!have_avx512_bf16())
    return;
  // 40 blocks (two groups and a rest): special blocks inside the groups take the fallback; the
  // absmax extremes around the bucket encoder's range (16 / absmax finite) and values whose
  // normalized x * (1 / absmax) is subnormal
  for (std::size_t block : {32, 64, 128, 256, 1024}) {
    CAPTURE(block);
    std::size_t const n = 40 * block - 5;
    auto x = qmem::test::normal_floats(n, 11);
    auto fill = [&](std::size_t b, float v) { x[b * block + 3] = v; };
    for (std::size_t i = 0; i < block; ++i)
      x[2 * block + i] = 0.0f;                         // block 2: all zero
    fill(5, std::numeric_limits<float>::quiet_NaN());  // NaN absmax
    fill(17, -std::numeric_limits<float>::infinity()); // inf absmax
    for (std::size_t i = 0; i < block; ++i) {
      x[7 * block + i] *= 1e-38f;                       // absmax near 4e-38: 16 / absmax = inf
      x[8 * block + i] *= 1e-37f;                       // 16 / absmax finite
      x[9 * block + i] = i % 2 == 0 ? 3e-45f : -1e-44f; // subnormal absmax
      x[20 * block + i] *= 1e-30f;                      // x * inv subnormal below
    }
    fill(20, 3e38f);
    fill(21, 1.0f);
    x[21 * block + 4] = -1.0f; // exactly +-absmax
    check_blockwise_values<nf4>(x, block);
  }
}

template <class C>
void check_searched_sweep() {
  // one block of every 97th float pattern of both signs up to 1.125 (past the table's top bucket
  // at 1.0078) plus 1.0, a multiple of 16 values and then a scalar tail; the absmax is that of
  // the sweep; then the same block with an infinity (absmax inf) and with a NaN (absmax NaN)
  std::vector<float> x = {1.0f};
  for (std::uint32_t u = 0; u < 0x3f900000u; u += 97)
    x.insert(x.end(), {std::bit_cast<float>(u), std::bit_cast<float>(u | 0x80000000u)});
  x.resize(x.size() + 16 - x.size() % 16, 0.5f);
  x.insert(x.end(), {0.25f, -0.75f, 1e-30f});
  auto const& t = qd::search_table_of<C>();
  auto run = [&](std::vector<float> const& v) {
    std::vector<std::uint8_t> codes(v.size()), ref(v.size());
    float const amax = qd::quantize_block_searched_avx512(t, v.data(), v.size(), codes.data());
    for (std::size_t i = 0; i < v.size(); ++i)
      ref[i] = t.encode(fmath::mul(v[i], fmath::rcp(amax)));
    CHECK(same_bits(codes, ref));
    return amax;
  };
  CHECK(run(x) == std::bit_cast<float>((0x3f900000u - 1) / 97 * 97)); // the largest swept value
  auto y = x;
  y[5] = -std::numeric_limits<float>::infinity();
  CHECK(std::isinf(run(y)));
  y[7] = std::numeric_limits<float>::quiet_NaN();
  CHECK(std::isnan(run(y)));
}

TEST_CASE("host_simd: 8-bit searched-map quantization equals search_table::encode") {
  if (!have_avx512())
    return;
  check_searched_sweep<dynamic_signed>();
  check_searched_sweep<dynamic_unsigned>();
  check_searched_sweep<linear_signed>();
}

template <class T>
void check_rowwise_quantize() {
  // rows: N(0, 1); a NaN; all zero; absmax subnormal (127 / absmax = inf); an infinity; absmax
  // 127 with halves (x * 1 = k + 0.5: ties to even), with 16 + 13 columns for the scalar tail
  std::size_t const rows = 6, cols = 4096 + 13;
  auto x = qmem::test::normal_floats(rows * cols, 5);
  x[cols + 9] = std::numeric_limits<float>::quiet_NaN();
  for (std::size_t c = 0; c < cols; ++c) {
    x[2 * cols + c] = 0.0f;
    x[3 * cols + c] = c % 3 == 0 ? 1e-39f : -2e-45f * static_cast<float>(c % 5);
    x[5 * cols + c] = static_cast<float>(static_cast<int>(c % 254) - 127) + 0.5f;
  }
  x[4 * cols + cols - 2] = -std::numeric_limits<float>::infinity();
  x[5 * cols + 1] = 127.0f;
  auto const xt = qmem::test::convert<T>(x);
  std::vector<std::int8_t> q(rows * cols), ref_q(rows * cols);
  std::vector<float> s(rows), ref_s(rows);
  quantize_rowwise(exec::host{}, view(std::as_const(xt)), rows, cols, view(q), view(s));
  for (std::size_t r = 0; r < rows; ++r) {
    ref_s[r] = qmem::detail::bits_to_float(qd::block_absmax_bits(xt.data() + r * cols, cols));
    float const scale = fmath::div(127.0f, ref_s[r]);
    for (std::size_t c = 0; c < cols; ++c)
      ref_q[r * cols + c] = qd::rowwise_encode(to_float(xt[r * cols + c]), scale);
  }
  CHECK(same_bits(s, ref_s));
  CHECK(same_bits(q, ref_q));
  CHECK(q[5 * cols + 127] == 0); // 0.5 -> 0
  CHECK(q[5 * cols + 128] == 2); // 1.5 -> 2
  CHECK(q[5 * cols + 130] == 4); // 3.5 -> 4
  CHECK(q[3 * cols] == 127);     // 1e-39 * inf
}

TEST_CASE("host_simd: row-wise int8 quantization equals rowwise_encode") {
  check_rowwise_quantize<float>();
  check_rowwise_quantize<bf16>();
}

TEST_CASE("host_simd: row-wise int8 dequantization equals rowwise_decode") {
  std::size_t const rows = 5, cols = 4096 + 13;
  auto x = qmem::test::normal_floats(rows * cols, 3);
  x[cols + 7] = std::numeric_limits<float>::quiet_NaN(); // row 1: NaN absmax
  for (std::size_t c = 0; c < cols; ++c)
    x[2 * cols + c] = 0.0f; // row 2: all zero
  std::vector<std::int8_t> q(rows * cols);
  std::vector<float> s(rows);
  quantize_rowwise(exec::host{}, view(std::as_const(x)), rows, cols, view(q), view(s));
  std::vector<float> yf(rows * cols);
  std::vector<bf16> yb(rows * cols);
  std::vector<f16> yh(rows * cols);
  dequantize_rowwise(exec::host{}, view(std::as_const(q)), view(std::as_const(s)), rows, cols,
                     view(yh));
  dequantize_rowwise(exec::host{}, view(std::as_const(q)), view(std::as_const(s)), rows, cols,
                     view(yf));
  dequantize_rowwise(exec::host{}, view(std::as_const(q)), view(std::as_const(s)), rows, cols,
                     view(yb));
  std::vector<float> ref_f(rows * cols);
  std::vector<bf16> ref_b(rows * cols);
  std::vector<f16> ref_h(rows * cols);
  for (std::size_t i = 0; i < rows * cols; ++i) {
    ref_f[i] = qd::rowwise_decode(q[i], s[i / cols]);
    ref_b[i] = bf16(ref_f[i]);
    ref_h[i] = f16(ref_f[i]);
  }
  CHECK(same_bits(yh, ref_h));
  CHECK(same_values(yf, ref_f));
  CHECK(same_bits(yb, ref_b));
}

#else

TEST_CASE("host_simd: AVX2/AVX-512 loops") {
  MESSAGE("SKIPPED: QMEM_QUANT_HOST_AVX2 is 0 in this build (not x86-64 g++/clang, nvcc's host "
          "pass, or the build already targets AVX2): only the portable loops exist");
}

#endif
