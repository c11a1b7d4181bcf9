#pragma once
//! \file
//! The one summation order of per-tensor reductions (a reducing rule's terms, LAMB and LARS; the
//! update and parameter norms of max_unorm), shared by the host optimizer (optim/optimizer.hpp)
//! and the CUDA step (optim/cuda/tensor_reduce.cuh), so that both give the same bits.
//!
//! Floating-point addition is not associative: two backends agree bit for bit only when they add
//! the same numbers in the same order. A sequential sum cannot run fast on a GPU, so the order is
//! a tree that a warp and a host loop both compute cheaply. Every term is widened to double.
//!
//!   1. a tensor is cut into pieces of `sum_piece` (2048) elements, one warp's work on the GPU;
//!   2. within a piece, element j belongs to lane `j % 32` of 32 (on the GPU a warp's loads of
//!      32 consecutive elements are coalesced); each lane adds its terms in increasing j, from
//!      0.0 (an element skipped by the non-finite policy adds nothing);
//!   3. the 32 lane sums fold as a butterfly (`__shfl_xor` over offsets 16, 8, 4, 2, 1:
//!      v[l] = v[l] + v[l ^ o]; IEEE addition is commutative, so every lane ends with the value
//!      that `fold_lanes` computes);
//!   4. the pieces of a tensor go to 256 slots, piece q to slot q % 256, added in increasing q
//!      from 0.0; the slots fold as a tree (s[i] = s[i] + s[i + h] for h = 128, 64, ..., 1);
//!   5. the double total is rounded once to float and handed to the rule (`norm_terms`).
//!
//! The order does not depend on the thread count or the device.

#include <qmem/core/config.hpp>
#include <qmem/core/fmath.hpp>
#include <qmem/optim/rule.hpp>

#include <cstddef>

namespace qmem::optim::detail {

inline constexpr std::size_t sum_piece = 2048; //!< elements per piece (one GPU warp)
inline constexpr int sum_lanes = 32;           //!< lane sums per piece
inline constexpr int sum_slots = 256;          //!< slots of the per-tensor fold
static_assert(sum_piece % sum_lanes == 0);

//! The lane of offset `j` within its piece.
QMEM_HOST_DEVICE QMEM_INLINE constexpr int sum_lane_of(std::size_t j) noexcept {
  return static_cast<int>(j % sum_lanes);
}

//! The two running sums of a reduction (the totals of norm_terms::a and ::b).
struct term_sums {
  double a = 0.0;
  double b = 0.0;
};

//! Adds the terms of one element (widened to double) to `s`.
QMEM_HOST_DEVICE QMEM_INLINE constexpr void add_terms(term_sums& s, norm_terms t) noexcept {
  s.a = s.a + static_cast<double>(t.a);
  s.b = s.b + static_cast<double>(t.b);
}

//! Folds the 32 lane sums of a piece in the warp butterfly's order (step 3); overwrites `v`.
QMEM_HOST_DEVICE QMEM_INLINE constexpr term_sums fold_lanes(term_sums (&v)[sum_lanes]) noexcept {
  for (int o = sum_lanes / 2; o > 0; o >>= 1)
    for (int l = 0; l < o; ++l) {
      v[l].a = v[l].a + v[l + o].a;
      v[l].b = v[l].b + v[l + o].b;
    }
  return v[0];
}

//! The float totals of a tensor from its piece sums (steps 4 and 5), on the host.
template <class PieceSums>
norm_terms fold_pieces(PieceSums const& pieces, std::size_t count) {
  term_sums slot[sum_slots] = {};
  for (std::size_t q = 0; q < count; ++q) {
    term_sums const& x = pieces[q];
    slot[q % sum_slots].a = slot[q % sum_slots].a + x.a;
    slot[q % sum_slots].b = slot[q % sum_slots].b + x.b;
  }
  for (int h = sum_slots / 2; h > 0; h >>= 1)
    for (int i = 0; i < h; ++i) {
      slot[i].a = slot[i].a + slot[i + h].a;
      slot[i].b = slot[i].b + slot[i + h].b;
    }
  return {static_cast<float>(slot[0].a), static_cast<float>(slot[0].b)};
}

//! max_unorm's terms of one element: (the squared change of p that `Rule::update` makes, in
//! double, rounded to float; p * p). `s` is a copy: the states are not kept.
template <update_rule Rule>
QMEM_HOST_DEVICE QMEM_INLINE norm_terms unorm_terms(float p, float g,
                                                    state_values<Rule::state_count> s,
                                                    typename Rule::scalars const& k) noexcept {
  float q = p;
  Rule::update(q, g, s, k);
#if defined(__CUDA_ARCH__)
  double const d = __dsub_rn(static_cast<double>(q), static_cast<double>(p));
  double const d2 = __dmul_rn(d, d);
#else
  double const d = static_cast<double>(q) - static_cast<double>(p);
  double const d2 = d * d;
#endif
  return {static_cast<float>(d2), qmem::fmath::mul(p, p)};
}

//! max_unorm's factor on a tensor's update from its totals t = (||delta p||^2, ||p||^2): the
//! update is scaled by max_unorm ||p|| / ||delta p|| when ||delta p|| exceeds max_unorm ||p||
//! (bitsandbytes' max_unorm), else 1. Evaluated in double.
QMEM_HOST_DEVICE QMEM_INLINE float unorm_scale(norm_terms t, float max_unorm) noexcept {
#if defined(__CUDA_ARCH__)
  double const unorm = __dsqrt_rn(static_cast<double>(t.a));
  double const limit =
      __dmul_rn(static_cast<double>(max_unorm), __dsqrt_rn(static_cast<double>(t.b)));
  return unorm > limit ? static_cast<float>(__ddiv_rn(limit, unorm)) : 1.0f;
#else
  double const unorm = __builtin_sqrt(static_cast<double>(t.a));
  double const limit = static_cast<double>(max_unorm) * __builtin_sqrt(static_cast<double>(t.b));
  return unorm > limit ? static_cast<float>(limit / unorm) : 1.0f;
#endif
}

} // namespace qmem::optim::detail
