// Matmul with quantized weights, the batch-1 GEMV kernels launched directly (CUDA only): the
// streaming kernel on every plan and shape the bench compares (dispatched or candidate), its lean
// addressing, and the bulk-copy candidates (QMEM_TEST_CANDIDATE_KERNELS), each against the GEMV
// model of matmul_test_support.hpp. The dispatched path through matmul_4bit is tested in
// matmul_test.cpp.
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "quant/matmul_test_support.hpp"

#if QMEM_HAS_CUDA()
TEST_CASE("the streaming batch-1 GEMV kernel computes the GEMV function on every plan") {
  if (qmem::test::skip<qmem::test::cuda_backend>())
    return;
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
  // the shapes dispatched on blocks of 64 with plain scales: J >= 4 with block64 (rows of 8192
  // columns or more) and J >= 2 with block64 and spread scales (shorter rows), on long and short
  // rows, partial slices, several tiles, one row
  std::initializer_list<stream_plan_case> const block64_plans = {
      {70, 8192, 64, 0},   {45, 1408, 64, 0},  {45, 12800, 64, 0}, {33, 17408, 64, 0},
      {1501, 8192, 64, 1}, {300, 2048, 64, 7}, {64, 14336, 64, 3}, {1, 512, 64, 0}};
  stream_cases<cuda_matmul::gemv_batch1_stream_long_k>(block64_plans, false, rng);
  stream_cases<cuda_matmul::gemv_batch1_stream_b64>(block64_plans, false, rng);
  // nested scales on the block64 shapes (the scales spread over a row group's lanes): J = 2 and
  // 4, full and partial slices (a warp's blocks of a row in two absmax2 groups: 1408, 12800,
  // 11008 columns), several tiles, a ring longer than a warp's pairs, one pair, one row
  for (auto const& p : {stream_plan_case{70, 8192, 64, 0}, stream_plan_case{1501, 8192, 64, 1},
                        stream_plan_case{301, 2048, 64, 7}, stream_plan_case{64, 14336, 64, 3},
                        stream_plan_case{33, 4096, 64, 0}, stream_plan_case{2, 2048, 64, 0},
                        stream_plan_case{45, 1408, 64, 0}, stream_plan_case{45, 12800, 64, 0},
                        stream_plan_case{37, 11008, 64, 0}, stream_plan_case{1, 512, 64, 0}}) {
    stream_case<cuda_matmul::gemv_batch1_stream_b64>(p.n, p.k, p.block, true, p.sms, rng);
    stream_case<cuda_matmul::gemv_batch1_stream_long_k>(p.n, p.k, p.block, true, p.sms, rng);
  }
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
  // block64 at J >= 2 (54; blocks of 64, plain scales: it declines others)
  stream_cases<c[26]>(block64_plans, false, rng);
#endif
}

TEST_CASE("streaming batch-1 GEMV lean shapes on small plans (for the sanitizers)") {
  if (qmem::test::skip<qmem::test::cuda_backend>())
    return;
  // the dispatched shape (lean, J >= 2) and lean at J >= 4: a partial super-step, 2 row groups
  // of 7 multiprocessors' tiles with an odd row count (the clamped last row), one row
  std::mt19937 rng(41);
  constexpr auto const& c = cuda_matmul::gemv_batch1_stream_candidates;
  std::initializer_list<stream_plan_case> const plans = {
      {45, 1408, 64, 0}, {301, 2048, 64, 7}, {1, 512, 64, 0}};
  stream_cases<cuda_matmul::gemv_batch1_stream>(plans, false, rng);
  stream_cases<c[18]>(plans, false, rng);
  // block64 at J >= 2 and J >= 4 (gemv_batch1_stream_long_k, dispatched on long rows)
  stream_cases<c[26]>(plans, false, rng);
  stream_cases<cuda_matmul::gemv_batch1_stream_long_k>(plans, false, rng);
  // J >= 2 with plain scales spread over a row group's lanes (56, gemv_batch1_stream_b64)
  stream_cases<c[28]>(plans, false, rng);
  // nested scales on them (full slices, and 1408 columns: a partial super-step)
  for (auto const& p : {stream_plan_case{301, 2048, 64, 7}, stream_plan_case{2, 2048, 64, 0},
                        stream_plan_case{45, 1408, 64, 0}}) {
    stream_case<cuda_matmul::gemv_batch1_stream_b64>(p.n, p.k, p.block, true, p.sms, rng);
    stream_case<cuda_matmul::gemv_batch1_stream_long_k>(p.n, p.k, p.block, true, p.sms, rng);
  }
}

namespace {
//! Streaming shape S on one weight (plain or nested scales), planned for `sms` multiprocessors.
template <cuda_matmul::gemv1_stream_shape S>
bool launch_stream(bool nested, cuda_matmul::gemv_args<bf16> const& a, unsigned sms) {
  auto const& e = qmem::test::cuda_backend::exec();
  return nested ? cuda_matmul::launch_gemv1_stream<nf4, bf16, true, S>(e, a, sms)
                : cuda_matmul::launch_gemv1_stream<nf4, bf16, false, S>(e, a, sms);
}
} // namespace

TEST_CASE("streaming batch-1 GEMV: block64 addressing changes no bit") {
  if (qmem::test::skip<qmem::test::cuda_backend>())
    return;
  // one scale address per pair row instead of one per super-step: the same loads and fused
  // multiply-adds, so 54 gives the dispatched shape's (45) bits and the long-row shape
  // (gemv_batch1_stream_long_k, 55) those of lean J >= 4 (46), on full and partial slices, odd
  // row counts, J = 2 and 4, blocks looping over several tiles, a ring longer than a warp's
  // pairs, one row. Nested scales: spread over a row group's lanes with lean addresses, the same
  // function (the tests' nested block is 256, a power of two); other block sizes are declined
  using B = qmem::test::cuda_backend;
  constexpr auto const& c = cuda_matmul::gemv_batch1_stream_candidates;
  std::mt19937 rng(43);
  for (auto const& p : {stream_plan_case{70, 8192, 64, 0}, stream_plan_case{45, 1408, 64, 0},
                        stream_plan_case{45, 12800, 64, 0}, stream_plan_case{33, 17408, 256, 0},
                        stream_plan_case{1501, 8192, 64, 1}, stream_plan_case{301, 2048, 64, 7},
                        stream_plan_case{64, 14336, 64, 3}, stream_plan_case{1, 512, 64, 0}}) {
    for (bool const nested : {false, true}) {
      host_weight const hw = random_weight(p.n, p.k, p.block, nested, rng);
      backend_weight<B, nf4> bw(hw);
      auto bx = B::upload(random_matrix<bf16>(p.k, rng));
      auto y0 = B::template alloc<bf16>(p.n);
      auto y1 = B::template alloc<bf16>(p.n);
      auto const a0 = gemv_args_for(bw.view, bx.view().data(), y0.view().data(), 1u);
      auto const a1 = gemv_args_for(bw.view, bx.view().data(), y1.view().data(), 1u);
      auto same = [&](char const* what) {
        std::vector<bf16> const ref = B::download(y0.view());
        std::vector<bf16> const got = B::download(y1.view());
        std::size_t diff = 0;
        for (std::size_t i = 0; i < ref.size(); ++i)
          diff += ref[i].bits != got[i].bits ? 1 : 0;
        CHECK_MESSAGE(diff == 0, what, ": ", diff, " outputs differ, n=", p.n, " k=", p.k,
                      " block=", p.block, " sms=", p.sms, " nested=", nested);
      };
      bool const takes = p.block == 64;
      REQUIRE(launch_stream<c[17]>(nested, a0, p.sms));
      CHECK(launch_stream<c[26]>(nested, a1, p.sms) == takes);
      if (takes)
        same("block64 (54) against the dispatched shape (45)");
      REQUIRE(launch_stream<c[18]>(nested, a0, p.sms));
      CHECK(launch_stream<cuda_matmul::gemv_batch1_stream_long_k>(nested, a1, p.sms) == takes);
      if (takes)
        same("the long-row shape (55) against lean J >= 4 (46)");
      // plain scales spread over a row group's lanes too (56; nested ones always are)
      REQUIRE(launch_stream<c[17]>(nested, a0, p.sms));
      CHECK(launch_stream<c[28]>(nested, a1, p.sms) == takes);
      if (takes)
        same("block64 with spread scales (56) against the dispatched shape (45)");
    }
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
  if (qmem::test::skip<qmem::test::cuda_backend>())
    return;
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
  if (qmem::test::skip<qmem::test::cuda_backend>())
    return;
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
  auto const a = gemv_args_for(bw.view, bx.view().data(), by.view().data(), 1u);
  CHECK_FALSE(cuda_matmul::launch_gemv1_bulk<nf4, bf16, c[0]>(qmem::test::cuda_backend::exec(), a));
}
#endif
#endif
