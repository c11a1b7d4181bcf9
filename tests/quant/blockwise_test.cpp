// Blockwise quantize/dequantize (quant/blockwise.hpp) on every backend: agreement with a plain
// scalar reference written from the definition for every code type, every block size, n = 1,
// n < block, odd n and the four input types (the CUDA backend is checked against the same reference
// bit for bit), and the compile-time block-size helpers. The error on N(0, 1) data, all-zero
// blocks, NaN/inf inputs and bad arguments are in blockwise_edge_test.cpp; the reference and the
// check are in blockwise_test_support.hpp. The check of the 8-bit codes is instantiated in
// blockwise_edge_test.cpp (the split halves this unit's compile time: gpu_bench.sh).
#include <qmem/quant.hpp>

#include <doctest/doctest.h>

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
