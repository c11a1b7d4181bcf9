#pragma once
//! \file
//! The one summation order of the global gradient norm (global-norm and percentile clipping),
//! shared by the host optimizer (optim/optimizer.hpp) and the CUDA step (the norm pass and
//! `resolve` of optim/cuda/multi_tensor.cuh), so that both compute the same double and therefore
//! the same clip factor, bit for bit. Floating-point addition is not associative: two backends
//! agree only when they add the same numbers in the same order. The order is a tree that the
//! GPU computes at memory speed and the host cheaply:
//!
//!   1. The tensors form two groups, in this order: those with the policy's state
//!      (param_state::quantized), then those with fp32 state; the CUDA front ends step exactly
//!      these two groups, registered in this order. Within a group, tensors in index order.
//!   2. Each tensor is cut into pieces of `norm_piece` (2048) elements; the pieces of a group are
//!      numbered q = 0, 1, ... across its tensors.
//!   3. Within a piece, elements go to 32 lanes in runs of R = 16 / sizeof(G) (one 16-byte load
//!      per lane on the GPU; 4 for fp32, 8 for bf16 and f16): offset j goes to lane (j / R) % 32.
//!      Each lane adds the squares of its elements, widened to double (a non-finite element adds
//!      0), in increasing j, from 0.0. The 32 lane sums fold as a butterfly (v[l] = v[l] +
//!      v[l + o] for o = 16, 8, 4, 2, 1: the warp's __shfl_xor fold).
//!   4. Piece q goes to slot q % `norm_slots` (8192; one per warp of the GPU pass), the slot
//!      adding its pieces in increasing q, from 0.0.
//!   5. Partial b of a group (b < `norm_partials`, 1024) is slot 8b + 0 + ... + slot 8b + 7, left
//!      to right, from 0.0 (one GPU block of 8 warps).
//!   6. The partials of group 0, then of group 1 (p[0] ... p[2047]) fold over 256 threads:
//!      thread t adds p[t], p[t + 256], ... from 0.0, then the 256 sums fold as a halving tree
//!      (s[i] = s[i] + s[i + h] for h = 128, 64, ..., 1). s[0] is the sum of squares.
//!
//! A group without tensors adds zeros, which leaves every sum unchanged: one group alone gives
//! the same value as that group beside an empty one. The squares are exact in double (24-bit
//! mantissas), so a fused multiply-add gives the same sums as a multiply and an add.

#include <qmem/core/config.hpp>
#include <qmem/core/detail/parallel.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/fmath.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace qmem::optim::detail {

inline constexpr std::size_t norm_piece = 2048; //!< elements per piece (one GPU warp's task)
inline constexpr int norm_lanes = 32;           //!< lane sums per piece
inline constexpr unsigned norm_partials = 1024; //!< partials per group (GPU blocks)
inline constexpr unsigned norm_block_warps = 8; //!< slots per partial (warps per GPU block)
inline constexpr unsigned norm_slots = norm_partials * norm_block_warps; //!< piece slots
inline constexpr unsigned norm_fold_threads = 256; //!< threads of the final fold
inline constexpr int norm_groups = 2;              //!< policy-state tensors, fp32-state tensors

//! Elements per lane run for gradients of type G (one 16-byte load).
template <class G>
inline constexpr int norm_run = static_cast<int>(16 / sizeof(G));
static_assert(norm_piece % (norm_lanes * 8) == 0);

//! The square of gradient element `x` in double, 0 when it is not finite; `bad` counts those.
QMEM_HOST_DEVICE QMEM_INLINE double finite_square(float x, std::uint32_t& bad) noexcept {
  bool const ok = qmem::fmath::is_finite(x);
  bad += ok ? 0u : 1u;
  double const d = ok ? static_cast<double>(x) : 0.0;
  return d * d;
}

//! The sum of squares of one piece, `count` <= norm_piece elements at `g` (step 3), on the host;
//! adds the number of non-finite elements to `bad`.
template <float_element G>
double piece_sumsq(G const* g, std::size_t count, std::uint32_t& bad) noexcept {
  constexpr std::size_t run = norm_run<G>;
  constexpr std::size_t row = run * norm_lanes;
  double lane[norm_lanes] = {};
  std::size_t r = 0;
  for (; r + row <= count; r += row) // whole rows: every lane takes its run
    for (int l = 0; l < norm_lanes; ++l)
      for (std::size_t v = 0; v < run; ++v)
        lane[l] = lane[l] + finite_square(to_float(g[r + l * run + v]), bad);
  for (std::size_t j = r; j < count; ++j) // the last, partial row
    lane[((j - r) / run) % norm_lanes] =
        lane[((j - r) / run) % norm_lanes] + finite_square(to_float(g[j]), bad);
  for (int o = norm_lanes / 2; o > 0; o >>= 1)
    for (int l = 0; l < o; ++l)
      lane[l] = lane[l] + lane[l + o];
  return lane[0];
}

//! Step 6 over the `norm_groups * norm_partials` partials of both groups (group 0 first).
inline double fold_norm_partials(std::span<double const> partials) noexcept {
  double s[norm_fold_threads];
  for (unsigned t = 0; t < norm_fold_threads; ++t) {
    double a = 0.0;
    for (std::size_t i = t; i < partials.size(); i += norm_fold_threads)
      a = a + partials[i];
    s[t] = a;
  }
  for (unsigned h = norm_fold_threads / 2; h > 0; h >>= 1)
    for (unsigned i = 0; i < h; ++i)
      s[i] = s[i] + s[i + h];
  return s[0];
}

//! The partials of both groups (steps 1 to 5; group 0's norm_partials values, then group 1's) of
//! the sum of squares of the finite elements of `grads`, with `group[i]` (0 or 1) the group of
//! gradient i, and whether every element is finite. Pieces are summed in parallel (e's threads);
//! the result does not depend on the thread count. Preconditions (internal, not checked): grads
//! and group have the same size; the views are host-accessible.
template <float_element G>
std::pair<std::vector<double>, bool> grad_norm_partials(exec::host const& e,
                                                        std::span<tensor_view<G const> const> grads,
                                                        std::span<std::uint8_t const> group) {
  std::vector<double> partials(std::size_t{norm_groups} * norm_partials, 0.0);
  bool finite = true;
  for (int gi = 0; gi < norm_groups; ++gi) {
    // the group's pieces, numbered across its tensors
    std::vector<std::size_t> member;
    std::vector<std::size_t> first; // the first piece of each member
    std::size_t pieces = 0;
    for (std::size_t i = 0; i < grads.size(); ++i)
      if (group[i] == static_cast<std::uint8_t>(gi)) {
        member.push_back(i);
        first.push_back(pieces);
        pieces += (grads[i].size() + norm_piece - 1) / norm_piece;
      }
    if (pieces == 0)
      continue;
    std::vector<double> piece(pieces);
    std::vector<std::uint32_t> bad(pieces);
    for (std::size_t m = 0; m < member.size(); ++m) {
      tensor_view<G const> const g = grads[member[m]];
      qmem::detail::parallel_for(e, g.size(), norm_piece, [&](std::size_t b, std::size_t end) {
        for (std::size_t c = b; c < end; c += norm_piece) {
          std::size_t const q = first[m] + c / norm_piece;
          std::uint32_t n = 0;
          piece[q] = piece_sumsq(g.data() + c, std::min(norm_piece, end - c), n);
          bad[q] = n;
        }
      });
    }
    std::vector<double> slot(norm_slots, 0.0);
    for (std::size_t q = 0; q < pieces; ++q) {
      slot[q % norm_slots] = slot[q % norm_slots] + piece[q];
      finite = finite && bad[q] == 0;
    }
    for (unsigned b = 0; b < norm_partials; ++b) {
      double p = 0.0;
      for (unsigned w = 0; w < norm_block_warps; ++w)
        p = p + slot[std::size_t{b} * norm_block_warps + w];
      partials[static_cast<std::size_t>(gi) * norm_partials + b] = p;
    }
  }
  return {std::move(partials), finite};
}

//! What the host's norm pass returns.
struct grad_sumsq {
  double sum = 0.0;   //!< the sum of squares of the finite elements, in the order above
  bool finite = true; //!< false when some element is NaN or infinite
};

//! The sum of squares of every finite element of `grads` in the order above (grad_norm_partials,
//! then fold_norm_partials), and whether every element is finite.
template <float_element G>
grad_sumsq global_grad_sumsq(exec::host const& e, std::span<tensor_view<G const> const> grads,
                             std::span<std::uint8_t const> group) {
  auto const [partials, finite] = grad_norm_partials(e, grads, group);
  return {fold_norm_partials(partials), finite};
}

} // namespace qmem::optim::detail
