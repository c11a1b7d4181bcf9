#pragma once
//! \file
//! Per-tensor reductions of the CUDA step: the first pass of a reducing rule (LAMB and LARS trust
//! ratios: `Rule::reduce` summed per tensor, then `Rule::finish` into the tensor's scalars) and
//! max_unorm's update-norm pass (the norm of each tensor's update against its parameter norm,
//! folded into a factor on the update). Both run between the prepare kernel and the fused update
//! (multi_tensor.cuh) over every tensor of a group in two launches, with no host synchronization:
//!
//!   1. `tensor_terms_kernel`: one warp per piece of 2048 elements, across all tensors; lane l
//!      loads elements l, l + 32, ... of the piece, coalesced (parameter or master weight,
//!      gradient times the step's gradient scale, each state decoded exactly as the host does,
//!      `F::load`), sums the terms in double and the warp folds its 32 lane sums; one partial per
//!      piece;
//!   2. `tensor_finish_kernel`: one block per tensor folds its pieces' partials over 256 slots
//!      and applies the rule's `finish` (or max_unorm's factor) to the tensor's device scalars.
//!
//! The summation order is optim/detail/tensor_sum.hpp's, which the host optimizer uses too: the
//! sums, the scalars and therefore every updated bit equal the host's.
//!
//! max_unorm scales each tensor's parameter change, not its states. The fused update applies it
//! through the rule adaptor `unorm_clipped<Rule>`, whose scalars carry the factor; a group whose
//! rule is such an adaptor runs the update-norm pass when the controller's max_unorm is > 0.

#include <qmem/core/cuda/runtime.cuh>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/fmath.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/memory/resource.hpp>
#include <qmem/optim/cuda/fused_step.cuh>
#include <qmem/optim/cuda/state_format.hpp>
#include <qmem/optim/detail/tensor_sum.hpp>
#include <qmem/optim/rule.hpp>
#include <qmem/optim/state.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

namespace qmem::optim::cuda {

//! The rule `Rule` whose parameter change is scaled by a per-tensor factor (max_unorm): `update`
//! is Rule's, then p = p0 + update_scale (p - p0) when update_scale != 1, as the host optimizer
//! does it (optimizer.hpp). The factor lives in the scalars (1 after prepare; the update-norm
//! pass sets it). Reducing when Rule is.
template <update_rule Rule>
struct unorm_clipped {
  static constexpr int state_count = Rule::state_count;
  static constexpr std::array<state_sign, static_cast<std::size_t>(Rule::state_count)> state_signs =
      Rule::state_signs;
  using inner_rule = Rule;

  Rule rule{}; //!< the wrapped rule with its hyper-parameters

  //! The wrapped rule's scalars and the factor on the parameter change.
  struct scalars {
    typename Rule::scalars inner;
    float update_scale;
  };

  QMEM_HOST_DEVICE scalars prepare(step_info const& si) const noexcept {
    return {rule.prepare(si), 1.0f};
  }
  //! The wrapped rule's range check (validated_rule), when it has one: the adaptor adds no
  //! hyper-parameter of its own. Host only.
  void validate() const requires validated_rule<Rule> { rule.validate(); }
  QMEM_HOST_DEVICE QMEM_INLINE static void update(float& p, float g, state_values<state_count>& s,
                                                  scalars const& k) noexcept {
    float const p0 = p;
    Rule::update(p, g, s, k.inner);
    if (k.update_scale != 1.0f)
      p = fmath::add(p0, fmath::mul(k.update_scale, fmath::sub(p, p0)));
  }
  QMEM_HOST_DEVICE QMEM_INLINE static norm_terms
  reduce(float p, float g, state_values<state_count> s,
         scalars const& k) noexcept requires reducing_rule<Rule> {
    return Rule::reduce(p, g, s, k.inner);
  }
  QMEM_HOST_DEVICE static scalars finish(scalars k,
                                         norm_terms t) noexcept requires reducing_rule<Rule> {
    return {Rule::finish(k.inner, t), k.update_scale};
  }
};

//! Whether `R` is an unorm_clipped adaptor (its group can run max_unorm).
template <class R>
inline constexpr bool is_unorm_clipped_v = false;
template <class R>
inline constexpr bool is_unorm_clipped_v<unorm_clipped<R>> = true;

namespace detail {

//! The codebook a blockwise format decodes with (device copy of F::code::book); nothing for
//! unblocked formats.
template <class F, bool Blockwise = F::blockwise>
struct decode_book {
  std::uint32_t unused;
  static constexpr decode_book make() noexcept { return {0}; }
};
template <class F>
struct decode_book<F, true> {
  typename F::book_type book;
  static constexpr decode_book make() noexcept { return {F::code::book}; }
};

//! The codebooks of a rule's states under a policy (signed and non-negative formats), copied
//! into shared memory by each block of the terms kernel.
template <update_rule Rule, state_policy Policy>
struct decode_books {
  using traits = kernel_traits<Rule, Policy>;
  decode_book<typename traits::signed_format> any;
  decode_book<typename traits::unsigned_format> non_negative;
  static constexpr decode_books make() noexcept {
    return {decode_book<typename traits::signed_format>::make(),
            decode_book<typename traits::unsigned_format>::make()};
  }
};

//! A reducing rule's terms of one element.
struct rule_terms {
  template <class Rule>
  QMEM_HOST_DEVICE QMEM_INLINE static norm_terms apply(float p, float g,
                                                       state_values<Rule::state_count> s,
                                                       typename Rule::scalars const& k) noexcept {
    return Rule::reduce(p, g, s, k);
  }
};
//! max_unorm's terms of one element (the update with the factor still 1).
struct update_norm_terms {
  template <class Rule>
  QMEM_HOST_DEVICE QMEM_INLINE static norm_terms apply(float p, float g,
                                                       state_values<Rule::state_count> s,
                                                       typename Rule::scalars const& k) noexcept {
    return optim::detail::unorm_terms<Rule>(p, g, s, k);
  }
};
//! A reducing rule's finish.
struct rule_finish {
  template <class Rule>
  QMEM_HOST_DEVICE QMEM_INLINE static typename Rule::scalars apply(typename Rule::scalars k,
                                                                   norm_terms t, float) noexcept {
    return Rule::finish(k, t);
  }
};
//! max_unorm's factor.
struct update_norm_finish {
  template <class Rule>
  QMEM_HOST_DEVICE QMEM_INLINE static typename Rule::scalars
  apply(typename Rule::scalars k, norm_terms t, float max_unorm) noexcept {
    k.update_scale = optim::detail::unorm_scale(t, max_unorm);
    return k;
  }
};

//! Calls f(std::integral_constant<int, J>) for J = 0..N-1 (compile-time state index).
template <int N, class F>
QMEM_HOST_DEVICE QMEM_INLINE void each_state(F&& f) {
  [&]<int... J>(std::integer_sequence<int, J...>) { (f(std::integral_constant<int, J>{}), ...); }
  (std::make_integer_sequence<int, N>{});
}

//! Whether state J of Rule may be negative, as a constant usable in device code.
template <class Rule, int J>
inline constexpr bool state_is_signed_v =
    Rule::state_signs[static_cast<std::size_t>(J)] == state_sign::any;

//! The tensor that owns global piece `piece`: the hint when it still does, else a binary search
//! over the first pieces (first_piece has tensor_count + 1 entries, ascending).
__device__ QMEM_INLINE std::uint32_t find_piece_owner(std::uint64_t const* first_piece,
                                                      std::uint32_t n, std::uint64_t piece,
                                                      std::uint32_t hint) {
  if (piece >= first_piece[hint] && piece < first_piece[hint + 1])
    return hint;
  std::uint32_t lo = 0;
  std::uint32_t hi = n;
  while (hi - lo > 1) {
    std::uint32_t const mid = (lo + hi) / 2;
    if (first_piece[mid] <= piece)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

//! What one launch of the terms kernel reads.
template <update_rule Rule, state_policy Policy>
struct terms_args {
  tensor_entry const* tensors;           //!< [tensor_count]
  std::uint64_t const* first_piece;      //!< [tensor_count + 1]
  typename Rule::scalars const* scalars; //!< [tensor_count]
  step_control const* control;           //!< grad scale, skip
  optim::detail::term_sums* partial;     //!< [piece_count]: written
  std::uint64_t piece_count;
  std::uint32_t tensor_count;
  std::uint32_t skip_bad; //!< nonzero: a non-finite gradient's element adds nothing
  decode_books<Rule, Policy> books;
};

//! Terms pass: one warp per piece of optim::detail::sum_piece elements (the order of
//! optim/detail/tensor_sum.hpp), one partial per piece.
template <update_rule Rule, state_policy Policy, class P, class G, class Terms>
__global__ void __launch_bounds__(256)
    tensor_terms_kernel(__grid_constant__ terms_args<Rule, Policy> const args) {
  using books_t = decode_books<Rule, Policy>;
  using traits = kernel_traits<Rule, Policy>;
  constexpr int S = Rule::state_count;
  static_assert(sizeof(books_t) % 4 == 0 && std::is_trivially_copyable_v<books_t>);
  __shared__ std::uint32_t book_words[sizeof(books_t) / 4];
  {
    auto const* src = reinterpret_cast<std::uint32_t const*>(&args.books);
    for (unsigned w = threadIdx.x; w < sizeof(books_t) / 4; w += blockDim.x)
      book_words[w] = src[w];
  }
  __syncthreads();
  auto const& books = *reinterpret_cast<books_t const*>(book_words);
  if (args.control->skip != 0)
    return;
  float const grad_scale = args.control->grad_scale;
  unsigned const lane = threadIdx.x & 31u;
  std::uint64_t const warps = (static_cast<std::uint64_t>(gridDim.x) * blockDim.x) >> 5;
  std::uint64_t const warp =
      (static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  std::uint32_t hint = 0;
  for (std::uint64_t piece = warp; piece < args.piece_count; piece += warps) {
    hint = find_piece_owner(args.first_piece, args.tensor_count, piece, hint);
    tensor_entry const* const entry = args.tensors + hint;
    typename Rule::scalars const k = args.scalars[hint];
    std::uint64_t const size = entry->size;
    auto const* const param = static_cast<P const*>(entry->param);
    auto const* const grad = static_cast<G const*>(entry->grad);
    float const* const master = entry->master;
    std::uint64_t const base = (piece - args.first_piece[hint]) * optim::detail::sum_piece;
    optim::detail::term_sums acc{};
    // lane l owns elements l, l + 32, l + 64, ... of the piece: every load of the warp reads
    // 32 consecutive elements
    constexpr std::uint64_t piece_elements = optim::detail::sum_piece;
    std::uint64_t const end = size < base + piece_elements ? size : base + piece_elements;
    for (std::uint64_t j = base + lane; j < end; j += optim::detail::sum_lanes) {
      float const p = master != nullptr ? master[j] : to_float(param[j]);
      float const g = fmath::mul(to_float(grad[j]), grad_scale);
      if (args.skip_bad != 0 && !fmath::is_finite(g))
        continue;
      state_values<S> sv;
      each_state<S>([&](auto J) {
        using F = typename traits::template format<J.value>;
        if constexpr (F::blockwise) {
          typename F::ref const ref{static_cast<std::uint8_t*>(entry->state[J.value]),
                                    entry->absmax[J.value]};
          if constexpr (state_is_signed_v<Rule, J.value>)
            sv[J.value] = F::load(ref, j, books.any.book);
          else
            sv[J.value] = F::load(ref, j, books.non_negative.book);
        } else {
          typename F::ref const ref{static_cast<typename F::element*>(entry->state[J.value])};
          sv[J.value] = F::load(ref, j);
        }
      });
      optim::detail::add_terms(acc, Terms::template apply<Rule>(p, g, sv, k));
    }
    // the butterfly of optim::detail::fold_lanes
    QMEM_UNROLL
    for (int o = optim::detail::sum_lanes / 2; o > 0; o >>= 1) {
      acc.a = acc.a + __shfl_xor_sync(0xffffffffu, acc.a, o);
      acc.b = acc.b + __shfl_xor_sync(0xffffffffu, acc.b, o);
    }
    if (lane == 0)
      args.partial[piece] = acc;
  }
}

//! Finish pass: one block of optim::detail::sum_slots threads per tensor folds its pieces'
//! partials (optim::detail::fold_pieces' order) and applies `Finish` to the tensor's scalars.
template <update_rule Rule, class Finish>
__global__ void __launch_bounds__(optim::detail::sum_slots)
    tensor_finish_kernel(std::uint64_t const* first_piece, std::uint32_t tensor_count,
                         optim::detail::term_sums const* partial, typename Rule::scalars* scalars,
                         step_control const* control, float max_unorm) {
  constexpr int slots = optim::detail::sum_slots;
  __shared__ double sum_a[slots];
  __shared__ double sum_b[slots];
  if (control->skip != 0)
    return;
  unsigned const tid = threadIdx.x;
  for (std::uint32_t t = blockIdx.x; t < tensor_count; t += gridDim.x) {
    std::uint64_t const first = first_piece[t];
    std::uint64_t const count = first_piece[t + 1] - first;
    double a = 0.0;
    double b = 0.0;
    for (std::uint64_t q = tid; q < count; q += slots) {
      a = a + partial[first + q].a;
      b = b + partial[first + q].b;
    }
    sum_a[tid] = a;
    sum_b[tid] = b;
    __syncthreads();
    for (unsigned h = slots / 2; h > 0; h >>= 1) {
      if (tid < h) {
        sum_a[tid] = sum_a[tid] + sum_a[tid + h];
        sum_b[tid] = sum_b[tid] + sum_b[tid + h];
      }
      __syncthreads();
    }
    if (tid == 0)
      scalars[t] = Finish::template apply<Rule>(
          scalars[t], norm_terms{static_cast<float>(sum_a[0]), static_cast<float>(sum_b[0])},
          max_unorm);
    __syncthreads(); // sum_a/sum_b are reused by the next tensor
  }
}

} // namespace detail

//! The per-tensor reduction passes of one tensor group (multi_tensor_step): owns the piece table
//! and the per-piece partials (device memory), built once for a fixed set of tensors.
template <update_rule Rule, state_policy Policy, float_element P, float_element G>
class tensor_reduction {
  memory::buffer<std::uint64_t> first_piece_;
  memory::buffer<optim::detail::term_sums> partial_;
  std::uint64_t piece_count_ = 0;
  std::uint32_t tensor_count_ = 0;
  int terms_grid_ = 1;
  int finish_grid_ = 1;

public:
  tensor_reduction() = default;

  //! The piece table of `sizes` (the group's table entries in order, every size > 0), uploaded
  //! on e.stream from `device` (waits for the upload once).
  tensor_reduction(exec::cuda const& e, std::span<std::uint64_t const> sizes,
                   memory::resource& device)
      : tensor_count_(static_cast<std::uint32_t>(sizes.size())) {
    std::vector<std::uint64_t> first(sizes.size() + 1, 0);
    constexpr std::size_t piece = optim::detail::sum_piece;
    for (std::size_t t = 0; t < sizes.size(); ++t)
      first[t + 1] = first[t] + (sizes[t] + piece - 1) / piece;
    piece_count_ = first.back();
    cuda_detail::device_guard guard(e.device);
    first_piece_ = memory::buffer<std::uint64_t>(first.size(), device, memory::category::workspace);
    partial_ = memory::buffer<optim::detail::term_sums>(piece_count_ == 0 ? 1 : piece_count_,
                                                        device, memory::category::workspace);
    cuda_detail::check(cudaMemcpyAsync(first_piece_.data(), first.data(),
                                       first.size() * sizeof(std::uint64_t), cudaMemcpyHostToDevice,
                                       e.stream),
                       "cudaMemcpyAsync(piece table)");
    cuda_detail::check(cudaStreamSynchronize(e.stream), "cudaStreamSynchronize(piece table)");
    int per_sm = 0;
    auto const kernel = &detail::tensor_terms_kernel<Rule, Policy, P, G, detail::update_norm_terms>;
    cuda_detail::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 256, 0),
                       "cudaOccupancyMaxActiveBlocksPerMultiprocessor(terms)");
    std::uint64_t const blocks_needed = (piece_count_ + 7) / 8;
    terms_grid_ = static_cast<int>(
        std::clamp<std::uint64_t>(blocks_needed, 1,
                                  static_cast<std::uint64_t>(std::max(1, per_sm)) *
                                      static_cast<std::uint64_t>(cuda_detail::sm_count(e.device))));
    finish_grid_ = static_cast<int>(std::clamp<std::uint32_t>(tensor_count_, 1, 65535));
  }

  //! Enqueues one reduction (`Terms` summed per tensor, then `Finish` applied to each tensor's
  //! scalars) on e.stream. `tensors` and `scalars` are the group's device tables.
  template <class Terms, class Finish>
  void run(exec::cuda const& e, tensor_entry const* tensors, typename Rule::scalars* scalars,
           step_control const* control, bool skip_bad, float max_unorm) {
    if (tensor_count_ == 0)
      return;
    cuda_detail::device_guard guard(e.device);
    detail::terms_args<Rule, Policy> const args{
        tensors,       first_piece_.data(), scalars,
        control,       partial_.data(),     piece_count_,
        tensor_count_, skip_bad ? 1u : 0u,  detail::decode_books<Rule, Policy>::make()};
    detail::tensor_terms_kernel<Rule, Policy, P, G, Terms><<<terms_grid_, 256, 0, e.stream>>>(args);
    cuda_detail::check_launch(e, "tensor_terms_kernel");
    detail::tensor_finish_kernel<Rule, Finish>
        <<<finish_grid_, optim::detail::sum_slots, 0, e.stream>>>(
            first_piece_.data(), tensor_count_, partial_.data(), scalars, control, max_unorm);
    cuda_detail::check_launch(e, "tensor_finish_kernel");
  }

  //! Device bytes of the partials and the piece table.
  [[nodiscard]] std::size_t workspace_bytes() const noexcept {
    return partial_.size_bytes() + first_piece_.size_bytes();
  }
};

} // namespace qmem::optim::cuda
