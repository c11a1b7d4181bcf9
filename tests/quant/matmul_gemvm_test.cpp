// Matmul with quantized weights, the small-batch GEMV kernels launched directly (CUDA only): the
// streaming small-batch kernel on every plan, its lean steps and full-round candidates, and the
// GEMV block shapes the bench compares (QMEM_TEST_CANDIDATE_KERNELS), each against the GEMV model
// of matmul_test_support.hpp. The dispatched path through matmul_4bit is tested in
// matmul_test.cpp.
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "quant/matmul_test_support.hpp"

#if QMEM_HAS_CUDA()
namespace {
//! The streaming small-batch kernel with shape S at batch m on one weight, planned for `sms`
//! multiprocessors (0: the device's; fewer make blocks walk several rounds), against the GEMV
//! model.
template <cuda_matmul::gemvm_stream_shape S>
void small_batch_case(std::size_t m, std::size_t n, std::size_t k, std::size_t block, bool nested,
                      unsigned sms, std::mt19937& rng) {
  // block64 shapes take plain scales in blocks of 64 only (the decline is tested below)
  if (S.block64 && (nested || block != 64))
    return;
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
  if (qmem::test::skip<qmem::test::cuda_backend>())
    return;
  std::mt19937 rng(29);
#if QMEM_TEST_CANDIDATE_KERNELS
  constexpr auto count = std::size(cuda_matmul::gemv_batch16_stream_candidates);
  all_small_batch_cases(rng, std::make_index_sequence<count>{});
#else
  // the seven shapes launch_gemv dispatches (gemv_batch16_stream, _two_steps, _long, _long_b64,
  // _unpaired, _short, _two_steps_b64)
  small_batch_cases<cuda_matmul::gemv_batch16_stream>(rng);
  small_batch_cases<cuda_matmul::gemv_batch16_stream_two_steps>(rng);
  small_batch_cases<cuda_matmul::gemv_batch16_stream_long>(rng);
  small_batch_cases<cuda_matmul::gemv_batch16_stream_long_b64>(rng);
  small_batch_cases<cuda_matmul::gemv_batch16_stream_unpaired>(rng);
  small_batch_cases<cuda_matmul::gemv_batch16_stream_short>(rng);
  small_batch_cases<cuda_matmul::gemv_batch16_stream_two_steps_b64>(rng);
#endif
}

#if QMEM_TEST_CANDIDATE_KERNELS
TEST_CASE("small-batch GEMV lean steps on small plans (for the sanitizers)") {
  if (qmem::test::skip<qmem::test::cuda_backend>())
    return;
  std::mt19937 rng(37);
  constexpr auto const& c = cuda_matmul::gemv_batch16_stream_candidates;
  // candidate 15: 5 tiles in one block with a row tile past n (a full round, then one tile), 9
  // tiles (3 steps per chunk), blocks of 128, 2 blocks of 7 tiles, and nested scales (the former
  // addresses and waits)
  small_batch_case<c[15]>(16, 70, 1024, 64, false, 1, rng);
  small_batch_case<c[15]>(12, 140, 1024, 128, false, 1, rng);
  small_batch_case<c[15]>(16, 200, 512, 64, false, 2, rng);
  small_batch_case<c[15]>(9, 70, 1024, 64, true, 1, rng);
  // candidate 16 (15 with block64 scales: one 8-byte load of a row's two chunk scales per step,
  // no shuffle): the same plain-scale plans, and 3 chunk pairs (3 warps of one step each) over 3
  // tiles, the last with rows past n
  small_batch_case<c[16]>(16, 70, 1024, 64, false, 1, rng);
  small_batch_case<c[16]>(12, 140, 1024, 64, false, 1, rng);
  small_batch_case<c[16]>(16, 200, 512, 64, false, 2, rng);
  small_batch_case<c[16]>(9, 45, 384, 64, false, 1, rng);
  // candidate 17 (14, two steps with activation slots, with lean steps and block64 scales;
  // gemv_batch16_stream_two_steps_b64): the same plain-scale plans
  small_batch_case<c[17]>(16, 70, 1024, 64, false, 1, rng);
  small_batch_case<c[17]>(12, 140, 1024, 64, false, 1, rng);
  small_batch_case<c[17]>(16, 200, 512, 64, false, 2, rng);
  small_batch_case<c[17]>(9, 45, 384, 64, false, 1, rng);
}

TEST_CASE("small-batch GEMV block64 scales decline what they cannot read") {
  if (qmem::test::skip<qmem::test::cuda_backend>())
    return;
  using B = qmem::test::cuda_backend;
  constexpr auto const& c = cuda_matmul::gemv_batch16_stream_candidates;
  std::mt19937 rng(41);
  // blocks of 128, nested scales (both launch with candidate 15), scales 4 bytes off 8-byte
  // alignment: candidates 16 and 17 launch nothing
  for (auto const& [block, nested] :
       {std::pair{std::size_t{128}, false}, std::pair{std::size_t{64}, true}}) {
    host_weight const hw = random_weight(70, 1024, block, nested, rng);
    backend_weight<B, nf4> bw(hw);
    auto bx = B::upload(random_matrix<bf16>(16 * 1024, rng));
    auto by = B::template alloc<bf16>(16 * 70);
    auto const a = gemv_args_for(bw.view, bx.view().data(), by.view().data(), 16u);
    if (nested) {
      CHECK(cuda_matmul::launch_gemvm_stream<nf4, bf16, true, c[15]>(B::exec(), a, 1));
      CHECK_FALSE(cuda_matmul::launch_gemvm_stream<nf4, bf16, true, c[16]>(B::exec(), a, 1));
      CHECK_FALSE(cuda_matmul::launch_gemvm_stream<nf4, bf16, true, c[17]>(B::exec(), a, 1));
    } else {
      CHECK(cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[15]>(B::exec(), a, 1));
      CHECK_FALSE(cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[16]>(B::exec(), a, 1));
      CHECK_FALSE(cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[17]>(B::exec(), a, 1));
    }
  }
  {
    host_weight const hw = random_weight(70, 1024, 64, false, rng);
    backend_weight<B, nf4> bw(hw);
    auto bx = B::upload(random_matrix<bf16>(16 * 1024, rng));
    auto by = B::template alloc<bf16>(16 * 70);
    auto a = gemv_args_for(bw.view, bx.view().data(), by.view().data(), 16u);
    CHECK(cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[16]>(B::exec(), a, 1));
    CHECK(cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[17]>(B::exec(), a, 1));
    a.scales.absmax += 1;
    CHECK_FALSE(cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[16]>(B::exec(), a, 1));
    CHECK_FALSE(cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[17]>(B::exec(), a, 1));
  }
}

TEST_CASE("small-batch GEMV candidates (full rounds, sums in shared memory): small plans, and the "
          "round-based kernel's bits") {
  if (qmem::test::skip<qmem::test::cuda_backend>())
    return;
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
    auto const a = gemv_args_for(bw.view, bx.view().data(), by.view().data(), 8u);
    CHECK_FALSE(cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[12]>(
        qmem::test::cuda_backend::exec(), a, 1));
  }
  // the same fused multiply-adds in the same order as the round-based shape with the same warps
  // and tiles per step (c[8]): equal bits for full rounds without the per-tile test (c[9]) and
  // the x-once shapes (c[10] to c[15]), at batches 16, 9 and 12, over 1, 3 and 7 rounds; blocks
  // of 7, 5, 8, 9, 15 and 14 tiles (2, 2, 2, 3, 4 and 4 steps of R = 4 tiles per chunk; 14 as
  // 28672 x 8192 on 132 SMs, with 2 and 3 chunk pairs per warp)
  using B = qmem::test::cuda_backend;
  auto const& e = B::exec();
  for (auto const& [m, n, k, sms] :
       {std::tuple{16u, 300u, 2048u, 3u}, std::tuple{9u, 70u, 4096u, 1u},
        std::tuple{16u, 450u, 1024u, 4u}, std::tuple{16u, 560u, 2048u, 4u},
        std::tuple{12u, 900u, 1024u, 4u}, std::tuple{16u, 448u, 2048u, 2u},
        std::tuple{16u, 445u, 3072u, 2u}}) {
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
    auto y8 = B::template alloc<bf16>(std::size_t{m} * n);
    auto args = [&](bf16* y) { return gemv_args_for(bw.view, bx.view().data(), y, m); };
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
    REQUIRE(
        cuda_matmul::launch_gemvm_stream<nf4, bf16, false, c[16]>(e, args(y8.view().data()), sms));
    std::vector<bf16> const ref = B::download(y0.view());
    int variant = 9;
    for (auto const* y : {&y1, &y2, &y3, &y4, &y5, &y6, &y7, &y8}) {
      std::vector<bf16> const got = B::download(y->view());
      bool same = true;
      for (std::size_t i = 0; i < ref.size(); ++i)
        same = same && ref[i].bits == got[i].bits;
      CHECK_MESSAGE(same, "candidate ", variant++, " m=", m, " n=", n, " k=", k, " sms=", sms);
    }
    // block64 scales (16) change no bit: against 15 directly
    std::vector<bf16> const b15 = B::download(y7.view());
    std::vector<bf16> const b16 = B::download(y8.view());
    std::size_t differ = 0;
    for (std::size_t i = 0; i < b15.size(); ++i)
      differ += b15[i].bits != b16[i].bits ? 1u : 0u;
    CHECK_MESSAGE(differ == 0, "candidate 16: ", differ, " outputs differ from candidate 15, m=", m,
                  " n=", n, " k=", k, " sms=", sms);
  }
}

// The dispatched shapes among these run in mm_forward through matmul_4bit.
TEST_CASE("GEMV kernel block shapes the bench compares all compute the same function") {
  if (qmem::test::skip<qmem::test::cuda_backend>())
    return;
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
#endif
