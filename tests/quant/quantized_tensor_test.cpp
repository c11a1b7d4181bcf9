// The owning quantized tensor (quant/quantized_tensor.hpp): quantize/dequantize through the
// runtime descriptor for every code, nested or not, custom tables, exact byte sizes and bits per
// parameter, the trivially copyable ref, bad arguments.
#include <qmem/quant.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <span>
#include <utility>
#include <vector>

#include "quant/quant_test_support.hpp"

namespace {
using namespace qmem;
using namespace qmem::quant;
using qmem::test::normal_floats;
} // namespace

// Host buffers (the default resource); the GPU path of the same algorithms is covered by the
// blockwise and double-quant tests on the CUDA backend.
TEST_CASE("quantized_tensor: quantize and dequantize every code, nested or not") {
  using B = qmem::test::host_backend;
  std::int64_t const shape[] = {33, 65};
  std::size_t const n = 33 * 65; // odd
  auto const x = normal_floats(n, 77);
  auto dx = B::upload(x);
  memory::resource& r = memory::default_host_resource();
  for (int id = 0; id < code_id_count; ++id) {
    auto const code = static_cast<code_id>(id);
    if (is_custom(code))
      continue;
    for (bool nested : {false, true}) {
      format_desc const d{code, 128, nested, 256};
      CAPTURE(to_string(code));
      CAPTURE(nested);
      auto const q = quantize(B::exec(), tensor_view<float const>(dx.view()), shape, d, r);
      CHECK(q.numel() == n);
      CHECK(q.format() == d);
      CHECK(q.original_dtype() == dtype::f32);
      CHECK(q.shape().size() == 2);
      CHECK(q.size_bytes() == d.size_bytes(n));
      CHECK(q.bits_per_parameter() ==
            doctest::Approx(8.0 * static_cast<double>(d.size_bytes(n)) / n));
      // same result as the blockwise functions
      std::vector<float> y(n);
      q.dequantize(B::exec(), view(y));
      std::vector<float> expect(n);
      visit_code(code, [&]<class C>(std::type_identity<C>) {
        std::vector<std::uint8_t> c(code_bytes<C>(n));
        std::vector<float> a(block_count(n, 128));
        quantize_blockwise<C>(exec::host{}, view(std::as_const(x)), 128, view(c), view(a));
        CHECK(std::vector<std::uint8_t>(q.codes().begin(), q.codes().end()) == c);
        if (nested) {
          std::vector<std::uint8_t> qa(a.size());
          std::vector<float> a2(block_count(a.size(), 256));
          std::vector<float> off(1);
          quantize_scales(exec::host{}, view(std::as_const(a)), 256, view(qa), view(a2), view(off));
          dequantize_blockwise_nested<C>(exec::host{}, view(std::as_const(c)),
                                         view(std::as_const(qa)), view(std::as_const(a2)),
                                         view(std::as_const(off)), 128, 256, view(expect));
        } else {
          dequantize_blockwise<C>(exec::host{}, view(std::as_const(c)), view(std::as_const(a)), 128,
                                  view(expect));
        }
      });
      CHECK(qmem::test::same_bits(y, expect));
      quantized_tensor_ref const ref = q.ref();
      CHECK(ref.numel == n);
      CHECK(ref.rank == 2);
      CHECK(ref.shape[1] == 65);
      CHECK(ref.codes.data() == q.codes().data());
      CHECK(ref.absmax.size() == (nested ? 0u : block_count(n, 128)));
      CHECK(ref.qabsmax.size() == (nested ? block_count(n, 128) : 0u));
    }
  }
}

TEST_CASE("quantized_tensor: NF4 with double quantization at block 64 is 4.127 bits") {
  std::size_t const n = std::size_t{1} << 22;
  std::vector<bf16> x(n, bf16(0.5f));
  std::int64_t const shape[] = {2048, 2048};
  auto const q = quantize(exec::host{}, view(std::as_const(x)), shape,
                          format_desc{code_id::nf4, 64, true, 256});
  // codes n/2, qabsmax n/64, absmax2 4 * n/16384, offset 4
  CHECK(q.size_bytes() == n / 2 + n / 64 + 4 * (n / 16384) + 4);
  CHECK(q.bits_per_parameter() == doctest::Approx(4.127).epsilon(0.0002));
  CHECK(q.original_dtype() == dtype::bf16);
  std::vector<bf16> y(n);
  q.dequantize(exec::host{}, view(y));
  CHECK(y[12345] == bf16(0.5f));
}

TEST_CASE("quantized_tensor: custom run-time tables") {
  std::vector<float> table(16);
  for (int i = 0; i < 16; ++i)
    table[i] = static_cast<float>(i - 8) / 8.0f; // -1 .. 0.875, contains 0
  auto const x = normal_floats(1001, 5);
  std::int64_t const shape[] = {1001};
  auto const q = quantize(exec::host{}, view(std::as_const(x)), shape,
                          format_desc{code_id::custom4, 64, true, 256},
                          memory::default_host_resource(), {}, table);
  CHECK(q.size_bytes() == format_desc{code_id::custom4, 64, true, 256}.size_bytes(1001) + 64);
  std::vector<float> y(1001);
  q.dequantize(exec::host{}, view(y));
  // every value is a table value times its block's scale, and the nearest one
  std::vector<float> scales(q.qabsmax().size());
  dequantize_scales(exec::host{}, q.qabsmax(), q.absmax2(), q.offset(), 256, view(scales));
  double err = 0;
  for (std::size_t i = 0; i < x.size(); ++i)
    err += std::fabs(x[i] - y[i]);
  CHECK(err / 1001.0 < 0.15);
  // the same table declared at compile time gives the same codes
  static constexpr code_table<16> t16 = [] {
    code_table<16> t{};
    for (int i = 0; i < 16; ++i)
      t.value[i] = static_cast<float>(i - 8) / 8.0f;
    return t;
  }();
  std::vector<std::uint8_t> c(501);
  std::vector<float> a(16);
  quantize_blockwise<table_code<t16>>(exec::host{}, view(std::as_const(x)), 64, view(c), view(a));
  CHECK(std::vector<std::uint8_t>(q.codes().begin(), q.codes().end()) == c);
  // a moved-from tensor is an empty one: the defaulted moves kept its numel (1001) with no
  // codes and no table, and its dequantize read the empty table and codes
  auto source = quantize(exec::host{}, view(std::as_const(x)), shape,
                         format_desc{code_id::custom4, 64, false, 256},
                         memory::default_host_resource(), {}, table);
  quantized_tensor taken = std::move(source);
  REQUIRE(source.numel() == 0);
  CHECK(source.shape().empty());
  CHECK(source.table().empty());
  CHECK(source.size_bytes() == 0);
  CHECK(source.format() == format_desc{});
  std::vector<float> z(1001, 2.0f);
  CHECK_THROWS_AS(source.dequantize(exec::host{}, view(z)), qmem::bad_argument);
  CHECK(z == std::vector<float>(1001, 2.0f));
  quantized_tensor assigned;
  assigned = std::move(taken);
  REQUIRE(taken.numel() == 0);
  CHECK(taken.table().empty());
  CHECK(assigned.numel() == 1001);
  CHECK(assigned.table().size() == 16);
  assigned.dequantize(exec::host{}, view(z));
  // bad tables
  std::vector<float> no_zero(16, 0.5f);
  CHECK_THROWS_AS(quantize(exec::host{}, view(std::as_const(x)), shape,
                           format_desc{code_id::custom4, 64, false, 256},
                           memory::default_host_resource(), {}, no_zero),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize(exec::host{}, view(std::as_const(x)), shape,
                           format_desc{code_id::custom8, 64, false, 256},
                           memory::default_host_resource(), {}, table),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize(exec::host{}, view(std::as_const(x)), shape,
                           format_desc{code_id::nf4, 64, false, 256},
                           memory::default_host_resource(), {}, table),
                  qmem::bad_argument);
}

TEST_CASE("quantized_tensor: bad arguments") {
  auto const x = normal_floats(100, 1);
  std::int64_t const wrong[] = {3, 33};
  std::int64_t const negative[] = {-100};
  std::int64_t const ok[] = {10, 10};
  CHECK_THROWS_AS(quantize(exec::host{}, view(std::as_const(x)), wrong, format_desc{}),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize(exec::host{}, view(std::as_const(x)), negative, format_desc{}),
                  qmem::bad_argument);
  CHECK_THROWS_AS(quantize(exec::host{}, view(std::as_const(x)), ok,
                           format_desc{code_id::dynamic_signed, 32, false, 256}),
                  qmem::bad_argument);
  auto const q = quantize(exec::host{}, view(std::as_const(x)), ok, format_desc{});
  std::vector<float> y(99, 1.0f);
  CHECK_THROWS_AS(q.dequantize(exec::host{}, view(y)), qmem::bad_argument);
  for (float v : y)
    CHECK(v == 1.0f);
  CHECK_THROWS_AS(quantized_tensor(format_desc{}, dtype::u8, ok), qmem::bad_argument);
  quantized_tensor moved = quantize(exec::host{}, view(std::as_const(x)), ok, format_desc{});
  quantized_tensor other = std::move(moved);
  CHECK(other.numel() == 100);
}

// A shape whose element count does not fit 64 bits wrapped to a small count (2^32 x 2^32 -> 0),
// so an empty x "matched" it and the tensor recorded a shape of 2^64 elements holding none.
TEST_CASE("quantized_tensor: a shape whose element count overflows 64 bits is rejected") {
  std::vector<float> const none;
  std::int64_t const wraps[] = {std::int64_t{1} << 32, std::int64_t{1} << 32};
  std::int64_t const wraps3[] = {3, std::int64_t{1} << 40, std::int64_t{1} << 40};
  CHECK_THROWS_AS(quantize(exec::host{}, view(none), wraps, format_desc{}), qmem::bad_argument);
  CHECK_THROWS_AS(quantized_tensor(format_desc{}, dtype::f32, wraps), qmem::bad_argument);
  CHECK_THROWS_AS(quantized_tensor(format_desc{}, dtype::f32, wraps3), qmem::bad_argument);
  // a zero extent anywhere makes an empty tensor, not an overflow
  std::int64_t const empty_first[] = {0, std::int64_t{1} << 40, std::int64_t{1} << 40};
  std::int64_t const empty_last[] = {std::int64_t{1} << 40, std::int64_t{1} << 40, 0};
  for (auto const shape :
       {std::span<std::int64_t const>(empty_first), std::span<std::int64_t const>(empty_last)}) {
    auto const q = quantize(exec::host{}, view(none), shape, format_desc{});
    CHECK(q.numel() == 0);
    CHECK(q.shape().size() == 3);
  }
}
