#pragma once
//! \file
//! The multi-tensor CUDA optimizer step. Two owners, both built once and reused every step:
//!
//! - `step_controller`: the device-resident step state (step count, lr schedule, gradient scale,
//!   skip flag, norm) and the norm partials of every tensor group;
//! - `multi_tensor_step<Rule, Policy, P, G>`: one group of tensors sharing a rule, a state policy
//!   and element types: the device table of tensor entries, the per-tensor rules and scalars.
//!
//! A step is a few stream-ordered launches with no host synchronization:
//!
//!   1. per group, only when clipping or a skip-step/raise policy needs it: the gradients' sum of
//!      squares (finite elements, in double) and a non-finite count, in the fixed order of
//!      optim/detail/grad_norm.hpp (pieces of 2048 elements, `norm_partials` partials), so the
//!      result does not depend on the device and equals the host optimizer's;
//!   2. `resolve`, one block: folds every group's partials in that order, decides the skip
//!      (non-finite under skip_step/raise, a loss scaler's found-inf flag), the clip factor and the
//!      gradient scale, advances the step count and evaluates the lr schedule;
//!   3. per group: `prepare` (one block: each tensor's rule.prepare into device scalars), the
//!      per-tensor reductions when the group needs them (tensor_reduce.cuh: a reducing rule's
//!      first pass and finish, LAMB and LARS; max_unorm's update-norm pass), and the fused update
//!      (fused_step.cuh).
//!
//! The arithmetic is the host optimizer's (optim/optimizer.hpp) element for element, so the two
//! backends agree bit for bit. The sums follow one order on both: the global norm that of
//! optim/detail/grad_norm.hpp (the tensors with policy state form the group registered first,
//! those with fp32 state the second, as optimizer_step and device_optimizer register them), the
//! per-tensor reductions that of optim/detail/tensor_sum.hpp. Because lr, step and
//! every derived scalar live in device memory, a step can be captured in a CUDA graph once and
//! replayed.

#include <qmem/core/cuda/runtime.cuh>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/memory/resource.hpp>
#include <qmem/optim/cuda/fused_step.cuh>
#include <qmem/optim/cuda/state_format.hpp>
#include <qmem/optim/cuda/tensor_reduce.cuh>
#include <qmem/optim/detail/grad_norm.hpp>
#include <qmem/optim/detail/validate.hpp>
#include <qmem/optim/rule.hpp>
#include <qmem/optim/schedule.hpp>
#include <qmem/optim/state.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <utility>
#include <vector>

namespace qmem::optim::cuda {

//! Length of percentile clipping's history of global norms (bitsandbytes' and the host's).
inline constexpr int norm_history_size = 100;

//! The step state as it lives in device memory.
struct step_state {
  step_control control;
  lr_schedule schedule;
  //! percentile clipping: squared global norms of the applied steps, a ring indexed by
  //! (step - 1) % 100 (the host optimizer's norm_history)
  float norm_history[norm_history_size];
};

//! Partial sums per group in the norm pass: fixed (optim/detail/grad_norm.hpp), so that the
//! reduction order, and the norm's bits, are the same on every device, for every launch and on
//! the host.
inline constexpr unsigned norm_partials = optim::detail::norm_partials;

//! Options of the CUDA step (the host optimizer's optimizer_options that the device honours).
struct cuda_step_options {
  lr_schedule lr = lr_schedule::constant(1e-3f);
  nonfinite_policy nonfinite = nonfinite_policy::skip_step;
  float max_grad_norm = 0.0f; //!< global-norm clipping (torch's clip_grad_norm_); 0: off
  //! Update-norm clipping per tensor (optimizer_options::max_unorm); 0: off. Needs groups whose
  //! rule is an unorm_clipped<Rule> adaptor (optimizer_step and device_optimizer use one).
  float max_unorm = 0.0f;
  //! Percentile clipping (optimizer_options::percentile): the gradients are scaled down to the
  //! `percentile`-th percentile of the last 100 global norms. 100: off.
  int percentile = 100;
  float grad_unscale = 1.0f; //!< initial inverse loss scale (device-side, changeable)
  param_rounding rounding = param_rounding::nearest; //!< bf16 params without master weights
  std::uint64_t seed = 0;                            //!< stochastic rounding seed
  //! A loss scaler's device flag: nonzero skips the step without touching any state. May be null.
  std::uint32_t const* found_inf = nullptr;
  unsigned max_groups = 4; //!< tensor groups (rule/policy/type combinations) per controller
};

namespace detail {

//! Calls f(std::integral_constant<int, J>) for J = 0..N-1 on the host.
template <int N, class F>
void for_each_state_host(F&& f) {
  [&]<int... J>(std::integer_sequence<int, J...>) { (f(std::integral_constant<int, J>{}), ...); }
  (std::make_integer_sequence<int, N>{});
}

template <class T>
class device_array {
  memory::buffer<T> buf_;

public:
  device_array() = default;
  device_array(std::size_t n, memory::resource& r, memory::category cat)
      : buf_(n == 0 ? 1 : n, r, cat) {}
  T* data() noexcept { return buf_.data(); }
  T const* data() const noexcept { return buf_.data(); }
};

//! The global norm's pass over one group (optim/detail/grad_norm.hpp, steps 2 to 5): warp w of
//! the norm_partials x 256 grid sums pieces w, w + norm_slots, ... (lane l loads the runs of 16
//! bytes at (32 r + l) R of its piece, coalesced), each piece folded by the butterfly and added to
//! the warp's slot; thread 0 adds the 8 slots of its block into partial_sum[block]. partial_bad
//! counts the non-finite elements.
template <class G>
__global__ void __launch_bounds__(256)
    grad_sumsq_kernel(tensor_entry const* tensors, std::uint64_t const* first_piece,
                      std::uint32_t tensor_count, std::uint64_t piece_count, double* partial_sum,
                      std::uint32_t* partial_bad) {
  namespace od = optim::detail;
  constexpr int run = od::norm_run<G>;
  constexpr int rows = static_cast<int>(od::norm_piece) / (run * od::norm_lanes);
  static_assert(run * sizeof(G) == 16);
  unsigned const lane = threadIdx.x & 31u;
  unsigned const warp = threadIdx.x >> 5;
  std::uint32_t hint = 0;
  double slot = 0.0;
  std::uint32_t bad = 0;
  for (std::uint64_t q = std::uint64_t{blockIdx.x} * od::norm_block_warps + warp; q < piece_count;
       q += od::norm_slots) {
    hint = find_piece_owner(first_piece, tensor_count, q, hint);
    tensor_entry const* const entry = tensors + hint;
    std::uint64_t const size = entry->size;
    auto const* const grad = static_cast<G const*>(entry->grad);
    std::uint64_t const base = (q - first_piece[hint]) * od::norm_piece;
    bool const whole =
        base + od::norm_piece <= size && (reinterpret_cast<std::uintptr_t>(grad) & 15u) == 0;
    G g[rows][run];
    if (whole) { // every load first, then the arithmetic: 16 loads of 16 bytes in flight
      QMEM_UNROLL
      for (int r = 0; r < rows; ++r) {
        uint4 const v = __ldcs(reinterpret_cast<uint4 const*>(
            grad + base + (std::uint64_t{static_cast<unsigned>(r)} * 32 + lane) * run));
        std::memcpy(g[r], &v, 16);
      }
    } else {
      QMEM_UNROLL
      for (int r = 0; r < rows; ++r)
        QMEM_UNROLL
      for (int v = 0; v < run; ++v) {
        std::uint64_t const j =
            base + (std::uint64_t{static_cast<unsigned>(r)} * 32 + lane) * run + v;
        g[r][v] = j < size ? grad[j] : from_float<G>(0.0f);
      }
    }
    double acc = 0.0;
    QMEM_UNROLL
    for (int r = 0; r < rows; ++r)
      QMEM_UNROLL
    for (int v = 0; v < run; ++v)
      acc = acc + od::finite_square(to_float(g[r][v]), bad);
    QMEM_UNROLL
    for (int o = od::norm_lanes / 2; o > 0; o >>= 1)
      acc = acc + __shfl_xor_sync(0xffffffffu, acc, o);
    slot = slot + acc;
  }
  QMEM_UNROLL
  for (int o = 16; o > 0; o >>= 1)
    bad += __shfl_xor_sync(0xffffffffu, bad, o);
  __shared__ double warp_sum[od::norm_block_warps];
  __shared__ std::uint32_t warp_bad[od::norm_block_warps];
  if (lane == 0) {
    warp_sum[warp] = slot;
    warp_bad[warp] = bad;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    std::uint32_t total_bad = 0;
    for (unsigned w = 0; w < od::norm_block_warps; ++w) {
      total = total + warp_sum[w];
      total_bad += warp_bad[w];
    }
    partial_sum[blockIdx.x] = total;
    partial_bad[blockIdx.x] = total_bad;
  }
}

//! Folds the norm partials, decides skip, clip factors (global norm, percentile), step and lr.
//! (A template only so that the header can define it in every translation unit: a plain
//! __global__ function is not inline, and two test units including this header did not link.)
template <int = 0>
__global__ void __launch_bounds__(256)
    resolve_kernel(step_state* state, double const* partial_sum, std::uint32_t const* partial_bad,
                   unsigned partial_count, std::uint32_t const* found_inf,
                   nonfinite_policy nonfinite, int percentile) {
  static_assert(optim::detail::norm_fold_threads == 256, "grad_norm.hpp's step 6: 256 threads");
  pdl_allow_dependents(); // the prepare kernel may start; it waits for this one's writes
  __shared__ double sums[256];
  __shared__ std::uint32_t bads[256];
  __shared__ float history[norm_history_size];
  __shared__ float clip_value;
  __shared__ int seen;
  __shared__ int rank_wanted;
  double acc = 0.0;
  std::uint32_t bad = 0;
  for (unsigned i = threadIdx.x; i < partial_count; i += 256) {
    acc += partial_sum[i];
    bad |= partial_bad[i];
  }
  sums[threadIdx.x] = acc;
  bads[threadIdx.x] = bad;
  __syncthreads();
  for (unsigned half = 128; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      sums[threadIdx.x] += sums[threadIdx.x + half];
      bads[threadIdx.x] |= bads[threadIdx.x + half];
    }
    __syncthreads();
  }
  step_control& c = state->control;
  bool const norm_pass = partial_count > 0;
  bool const non_finite = norm_pass && bads[0] != 0 && nonfinite != nonfinite_policy::skip_element;
  bool const flagged = found_inf != nullptr && *found_inf != 0;
  bool const skip = non_finite || flagged; // the same value in every thread
  double n = 0.0;
  if (norm_pass && !flagged)
    n = ::sqrt(sums[0]) * static_cast<double>(c.inv_loss_scale);
  // percentile clipping (the host's order): record this step's squared norm, then take the
  // percentile-th smallest of the steps seen (a stable rank selection instead of a sort)
  bool const use_percentile = percentile < 100 && !skip;
  if (use_percentile) {
    if (threadIdx.x == 0) {
      std::int32_t const t = c.step + 1;
      state->norm_history[(t - 1) % norm_history_size] = static_cast<float>(n * n);
      seen = t < norm_history_size ? t : norm_history_size;
      clip_value = static_cast<float>(n * n); // replaced below (kept only if the norms are NaN)
      int const idx = percentile * seen / 100;
      rank_wanted = idx < seen - 1 ? idx : seen - 1;
    }
    __syncthreads();
    for (int i = static_cast<int>(threadIdx.x); i < norm_history_size; i += 256)
      history[i] = state->norm_history[i];
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < seen) {
      int const i = static_cast<int>(threadIdx.x);
      float const v = history[i];
      int rank = 0;
      for (int j = 0; j < seen; ++j)
        rank += (history[j] < v || (history[j] == v && j < i)) ? 1 : 0;
      if (rank == rank_wanted)
        clip_value = v;
    }
    __syncthreads();
  }
  if (threadIdx.x != 0)
    return;
  float grad_scale = c.inv_loss_scale;
  float norm = 0.0f;
  if (norm_pass && !flagged) {
    norm = static_cast<float>(n);
    if (c.max_grad_norm > 0.0f && n > c.max_grad_norm)
      grad_scale = static_cast<float>(grad_scale * (c.max_grad_norm / (n + 1e-6)));
  }
  c.grad_norm = norm;
  c.skip = skip ? 1u : 0u;
  if (skip) {
    ++c.skipped_steps;
    return;
  }
  if (use_percentile) {
    double const clip = ::sqrt(static_cast<double>(clip_value));
    if (n > clip && n > 0.0)
      grad_scale = static_cast<float>(grad_scale * (clip / n));
  }
  c.step += 1;
  c.lr = state->schedule(c.step);
  c.grad_scale = grad_scale;
}

template <update_rule Rule>
__global__ void __launch_bounds__(256)
    prepare_kernel(step_control const* control, tensor_entry const* tensors, Rule const* rules,
                   typename Rule::scalars* scalars, std::uint32_t tensor_count) {
  pdl_allow_dependents(); // the fused kernel may start; it waits for this one's writes
  pdl_wait();
  if (control->skip != 0)
    return;
  float const lr = control->lr;
  std::int32_t const step = control->step;
  float const grad_scale = control->grad_scale;
  for (std::uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < tensor_count;
       t += gridDim.x * blockDim.x)
    scalars[t] = rules[t].prepare(
        step_info{optim::detail::fmath::mul(lr, tensors[t].lr_scale), step, grad_scale});
}

} // namespace detail

//! The device-resident step state of an optimizer and the norm partials of its tensor groups.
//! Create one per optimizer; pass it to every multi_tensor_step group of that optimizer.
class step_controller {
  detail::device_array<step_state> state_;
  detail::device_array<double> partial_sum_;
  detail::device_array<std::uint32_t> partial_bad_;
  cuda_step_options options_;
  unsigned groups_ = 0;
  int device_ = 0;

public:
  //! Allocates the step state from `device` (a device or managed resource) and initializes it on
  //! e.stream (blocks until that upload is done, once). Preconditions: lr finite and >= 0, max_grad_norm >= 0,
  //! max_unorm >= 0, percentile in [1, 100], grad_unscale finite and >= 0, max_groups >= 1
  //! (bad_argument otherwise).
  step_controller(exec::cuda const& e, memory::resource& device, cuda_step_options options = {})
      : options_(options), device_(e.device) {
    QMEM_EXPECTS(device.space() != memory_space::host, "the resource hands out host memory; ",
                 "expected a device or managed memory resource");
    optim::detail::check_lr_schedule(options.lr);
    optim::detail::check_clipping(options.max_grad_norm, options.max_unorm, options.percentile);
    QMEM_EXPECTS(std::isfinite(options.grad_unscale) && options.grad_unscale >= 0.0f,
                 "grad_unscale is ", options.grad_unscale, "; expected a finite value >= 0");
    QMEM_EXPECTS(options.max_groups >= 1, "max_groups is 0; expected >= 1");
    cuda_detail::device_guard guard(device_);
    state_ = {1, device, memory::category::optimizer_state};
    partial_sum_ = {std::size_t{norm_partials} * options.max_groups, device,
                    memory::category::workspace};
    partial_bad_ = {std::size_t{norm_partials} * options.max_groups, device,
                    memory::category::workspace};
    step_state st{};
    st.control.lr = options.lr(1);
    st.control.inv_loss_scale = options.grad_unscale;
    st.control.max_grad_norm = options.max_grad_norm;
    st.schedule = options.lr;
    cuda_detail::check(
        cudaMemcpyAsync(state_.data(), &st, sizeof(st), cudaMemcpyHostToDevice, e.stream),
        "cudaMemcpyAsync(step state)");
    cuda_detail::check(cudaStreamSynchronize(e.stream), "cudaStreamSynchronize(step state)");
  }

  //! Reserves the norm partials of one more group; returns its slot.
  unsigned register_group() {
    QMEM_EXPECTS(groups_ < options_.max_groups, "this controller already has ", groups_,
                 " groups (max_groups); raise cuda_step_options::max_groups");
    return groups_++;
  }

  //! True when steps run the gradient-norm pass (clipping, percentile clipping, or skip_step/raise
  //! need it).
  [[nodiscard]] bool needs_norm() const noexcept {
    return options_.max_grad_norm > 0.0f || options_.percentile < 100 ||
           options_.nonfinite != nonfinite_policy::skip_element;
  }
  [[nodiscard]] double* partial_sum(unsigned slot) noexcept {
    return partial_sum_.data() + std::size_t{slot} * norm_partials;
  }
  [[nodiscard]] std::uint32_t* partial_bad(unsigned slot) noexcept {
    return partial_bad_.data() + std::size_t{slot} * norm_partials;
  }

  //! Enqueues the resolution of this step (after every group's accumulate_norm).
  void resolve(exec::cuda const& e) {
    cuda_detail::device_guard guard(device_);
    unsigned const partials = needs_norm() ? norm_partials * groups_ : 0u;
    detail::resolve_kernel<>
        <<<1, 256, 0, e.stream>>>(state_.data(), partial_sum_.data(), partial_bad_.data(), partials,
                                  options_.found_inf, options_.nonfinite, options_.percentile);
    cuda_detail::check_launch(e, "resolve_kernel");
  }

  //! Percentile clipping's history of squared global norms on the device
  //! (float[norm_history_size], a ring indexed by (step - 1) % norm_history_size).
  [[nodiscard]] float* norm_history() noexcept { return state_.data()->norm_history; }

  //! Sets the step count, the last lr and the norm history (resume; `history` empty: zeros),
  //! stream-ordered on e.stream, and waits for it. Preconditions: step >= 0, history empty or of
  //! norm_history_size values (bad_argument otherwise, nothing written).
  void restore_blocking(exec::cuda const& e, std::int32_t step, float lr,
                        std::span<float const> history) {
    QMEM_EXPECTS(step >= 0, "step is ", step, "; expected >= 0");
    QMEM_EXPECTS(history.empty() || history.size() == std::size_t{norm_history_size},
                 "history has ", history.size(), " values; expected 0 or ", norm_history_size);
    cuda_detail::device_guard guard(device_);
    step_state st{};
    cuda_detail::check(
        cudaMemcpyAsync(&st, state_.data(), sizeof(st), cudaMemcpyDeviceToHost, e.stream),
        "cudaMemcpyAsync(step state)");
    cuda_detail::check(cudaStreamSynchronize(e.stream), "cudaStreamSynchronize(step state)");
    st.control.step = step;
    st.control.lr = lr;
    for (int i = 0; i < norm_history_size; ++i)
      st.norm_history[i] = history.empty() ? 0.0f : history[static_cast<std::size_t>(i)];
    cuda_detail::check(
        cudaMemcpyAsync(state_.data(), &st, sizeof(st), cudaMemcpyHostToDevice, e.stream),
        "cudaMemcpyAsync(step state)");
    cuda_detail::check(cudaStreamSynchronize(e.stream), "cudaStreamSynchronize(step state)");
  }

  //! Copies the whole device step state (step count, lr, loss scale, max_grad_norm, skipped
  //! steps, norm history) of `other`, a controller on the same device, stream-ordered on
  //! e.stream (no wait).
  void copy_state_from(exec::cuda const& e, step_controller& other) {
    QMEM_EXPECTS(other.device_ == device_, "the other controller is on device ", other.device_,
                 "; this one on ", device_);
    cuda_detail::device_guard guard(device_);
    cuda_detail::check(cudaMemcpyAsync(state_.data(), other.state_.data(), sizeof(step_state),
                                       cudaMemcpyDeviceToDevice, e.stream),
                       "cudaMemcpyAsync(step state)");
  }

  //! Copies the norm history to the host (waits for e.stream).
  [[nodiscard]] std::vector<float> read_norm_history_blocking(exec::cuda const& e) {
    std::vector<float> h(norm_history_size);
    cuda_detail::device_guard guard(device_);
    cuda_detail::check(cudaMemcpyAsync(h.data(), norm_history(), h.size() * sizeof(float),
                                       cudaMemcpyDeviceToHost, e.stream),
                       "cudaMemcpyAsync(norm history)");
    cuda_detail::check(cudaStreamSynchronize(e.stream), "cudaStreamSynchronize(norm history)");
    return h;
  }

  //! The device control block. Between steps the caller may write `inv_loss_scale` and
  //! `max_grad_norm` there (cudaMemcpyAsync or a kernel); read `step`, `skip`, `grad_norm`.
  [[nodiscard]] step_control* control() noexcept { return &state_.data()->control; }
  //! The device-side lr schedule (evaluated by every step).
  [[nodiscard]] lr_schedule* schedule() noexcept { return &state_.data()->schedule; }
  [[nodiscard]] cuda_step_options const& options() const noexcept { return options_; }
  [[nodiscard]] int device() const noexcept { return device_; }

  //! Copies the control block to the host (waits for e.stream).
  [[nodiscard]] step_control read_control_blocking(exec::cuda const& e) {
    step_control c{};
    cuda_detail::device_guard guard(device_);
    cuda_detail::check(cudaMemcpyAsync(&c, control(), sizeof(c), cudaMemcpyDeviceToHost, e.stream),
                       "cudaMemcpyAsync(control)");
    cuda_detail::check(cudaStreamSynchronize(e.stream), "cudaStreamSynchronize(control)");
    return c;
  }

  //! Under nonfinite_policy::raise: waits for e.stream and throws qmem::error when the last step
  //! was skipped (nothing was written). Other policies: returns at once.
  void check_raise_blocking(exec::cuda const& e) {
    if (options_.nonfinite != nonfinite_policy::raise)
      return;
    step_control const c = read_control_blocking(e);
    if (c.skip != 0)
      detail_raise_nonfinite(c.step + 1);
  }

private:
  [[noreturn]] static void detail_raise_nonfinite(std::int32_t step) {
    qmem::detail::raise<error>("optimizer step ", step,
                               ": a gradient holds a non-finite value (nonfinite_policy::raise); "
                               "nothing was updated");
  }
};

//! One tensor of a group: its parameter, gradient, optional fp32 master weights and state
//! storage (device or managed memory), the rule with this tensor's hyper-parameters
//! (per-parameter overrides) and its lr scale.
template <update_rule Rule, float_element P, float_element G>
struct step_tensor {
  P* param = nullptr;
  G const* grad = nullptr;
  std::size_t size = 0;
  void* state[4] = {};     //!< state j: the format's element array or codes (F::bytes(size))
  float* absmax[4] = {};   //!< blockwise state j: float[F::scale_count(size)]
  float* master = nullptr; //!< fp32 master weights of a 16-bit parameter (nullptr for fp32 P)
  Rule rule{};
  float lr_scale = 1.0f;
};

//! The fused multi-tensor step of one rule, state policy and parameter/gradient type over a
//! fixed set of tensors. Owns the device tables (tensor entries, per-tensor rules and scalars)
//! allocated from `device`; the tensors' storage stays the caller's.
template <update_rule Rule, state_policy Policy, float_element P = float, float_element G = P>
requires(!std::same_as<P, double> && !std::same_as<G, double>) class multi_tensor_step {
public:
  using tensor = step_tensor<Rule, P, G>;
  using traits = kernel_traits<Rule, Policy>;
  static constexpr std::size_t block = traits::block;                 //!< elements per absmax
  static constexpr std::size_t task_elements = traits::task_elements; //!< elements per warp task
  //! Whether the group runs a reducing rule's first pass (LAMB, LARS) before its update.
  static constexpr bool reducing = reducing_rule<Rule>;
  //! Whether the group can clip its updates' norms (max_unorm): its rule is an unorm_clipped<R>.
  static constexpr bool unorm_capable = is_unorm_clipped_v<Rule>;

private:
  step_controller* controller_;
  std::vector<std::uint64_t> tensor_first_task_; // per caller tensor (empty ones included)
  std::vector<std::size_t> tensor_state_bytes_;  // per caller tensor: state + absmax bytes
  detail::device_array<tensor_entry> entries_;
  detail::device_array<std::uint64_t> norm_first_piece_; // [entries + 1]: the norm pass's pieces
  detail::device_array<std::uint64_t> first_tasks_;      // [entries]: their first tasks, densely
  detail::device_array<Rule> rules_;
  detail::device_array<typename Rule::scalars> scalars_;
  std::vector<tensor> tensors_;
  std::uint32_t entry_count_ = 0;
  std::uint64_t task_count_ = 0;
  std::uint64_t norm_piece_count_ = 0;
  unsigned slot_ = 0;
  int grid_ = 0;
  tensor_reduction<Rule, Policy, P, G> reduction_; // reducing rules and max_unorm only

public:
  //! Builds and uploads the tables of `tensors` (stream-ordered on e.stream, then waits once).
  //! Preconditions (bad_argument naming the tensor, nothing allocated): every tensor with
  //! size > 0 has non-null param and grad, and for each state a non-null state pointer (and an
  //! absmax pointer for blockwise formats); all of them memory of e.device, managed memory or
  //! pinned host memory (cuda_detail::check_reachable: not another device's, not pageable); no master weights when P is float (the fp32-parameter
  //! kernels have no master path); e.device is the controller's device; every tensor's
  //! lr_scale finite and >= 0 and its rule within its hyper-parameter ranges (the rule's validate(), when it
  //! has one: validated_rule), as the optimizers check them where a rule enters (a device step
  //! cannot throw, so an out-of-range rule would otherwise run, e.g. AdamW with beta2 > 1 letting
  //! v grow without bound).
  multi_tensor_step(exec::cuda const& e, std::span<tensor const> tensors, memory::resource& device,
                    step_controller& controller)
      : controller_(&controller), tensors_(tensors.begin(), tensors.end()) {
    QMEM_EXPECTS(e.device == controller.device(), "e.device is ", e.device,
                 "; the controller lives on device ", controller.device());
    {
      cuda_detail::device_guard guard(e.device);
      for (std::size_t i = 0; i < tensors.size(); ++i)
        check_resident_tensor(e, i, tensors[i]);
    }
    for (std::size_t i = 0; i < tensors.size(); ++i)
      check_rule_of(i, tensors[i]);
    QMEM_EXPECTS(controller.options().max_unorm == 0.0f || unorm_capable,
                 "the controller clips update norms (max_unorm ", controller.options().max_unorm,
                 "); expected a group whose rule is optim::cuda::unorm_clipped<Rule>");
    std::vector<tensor_entry> entries;
    std::vector<Rule> rules;
    std::uint64_t task = 0;
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      tensor const& t = tensors[i];
      tensor_first_task_.push_back(task);
      tensor_state_bytes_.push_back(0);
      if (t.size == 0)
        continue;
      QMEM_EXPECTS(t.param != nullptr && t.grad != nullptr, "tensor ", i, " (size ", t.size,
                   ") has a null param or grad pointer");
      QMEM_EXPECTS(detail::uses_master<P> || t.master == nullptr, "tensor ", i,
                   " has master weights but fp32 parameters; expected master == nullptr "
                   "(master weights belong to 16-bit parameters)");
      tensor_entry en{};
      en.param = t.param;
      en.grad = t.grad;
      en.master = t.master;
      en.lr_scale = t.lr_scale;
      en.size = t.size;
      constexpr int E = traits::per_lane;
      bool aligned = is_aligned(t.param, sizeof(P) * E) && is_aligned(t.grad, sizeof(G) * E) &&
                     is_aligned(t.master, sizeof(float) * E);
      std::size_t bytes = 0;
      detail::for_each_state_host<Rule::state_count>([&](auto J) {
        using F = typename traits::template format<J.value>;
        QMEM_EXPECTS(t.state[J.value] != nullptr, "tensor ", i, " state ", J.value, " is null");
        en.state[J.value] = t.state[J.value];
        bytes += F::bytes(t.size);
        if constexpr (F::blockwise) {
          QMEM_EXPECTS(t.absmax[J.value] != nullptr, "tensor ", i, " state ", J.value,
                       " has no absmax (blockwise states need one float per block)");
          en.absmax[J.value] = t.absmax[J.value];
          bytes += F::scale_count(t.size) * sizeof(float);
          aligned = aligned && is_aligned(t.state[J.value], E * F::bits / 8);
        } else {
          aligned = aligned && is_aligned(t.state[J.value], sizeof(typename F::element) * E);
        }
      });
      tensor_state_bytes_.back() = bytes;
      std::uint64_t const tasks = (t.size + task_elements - 1) / task_elements;
      en.first_task = task;
      en.end_task = task + tasks;
      en.vectorized = aligned ? 1u : 0u;
      task += tasks;
      entries.push_back(en);
      rules.push_back(t.rule);
    }
    tensor_first_task_.push_back(task);
    task_count_ = task;
    entry_count_ = static_cast<std::uint32_t>(entries.size());
    slot_ = controller.register_group();
    cuda_detail::device_guard guard(e.device);
    std::size_t const n = entries.size();
    std::vector<std::uint64_t> first_piece(n + 1, 0); // the global norm's pieces per entry
    for (std::size_t k = 0; k < n; ++k)
      first_piece[k + 1] = first_piece[k] + (entries[k].size + optim::detail::norm_piece - 1) /
                                                optim::detail::norm_piece;
    norm_piece_count_ = first_piece.back();
    entries_ = {n, device, memory::category::workspace};
    norm_first_piece_ = {n + 1, device, memory::category::workspace};
    first_tasks_ = {n, device, memory::category::workspace};
    rules_ = {n, device, memory::category::workspace};
    scalars_ = {n, device, memory::category::workspace};
    if (n > 0) {
      cuda_detail::check(cudaMemcpyAsync(entries_.data(), entries.data(), n * sizeof(tensor_entry),
                                         cudaMemcpyHostToDevice, e.stream),
                         "cudaMemcpyAsync(tensor entries)");
      cuda_detail::check(cudaMemcpyAsync(norm_first_piece_.data(), first_piece.data(),
                                         (n + 1) * sizeof(std::uint64_t), cudaMemcpyHostToDevice,
                                         e.stream),
                         "cudaMemcpyAsync(norm pieces)");
      std::vector<std::uint64_t> first_tasks(n);
      for (std::size_t k = 0; k < n; ++k)
        first_tasks[k] = entries[k].first_task;
      cuda_detail::check(cudaMemcpyAsync(first_tasks_.data(), first_tasks.data(),
                                         n * sizeof(std::uint64_t), cudaMemcpyHostToDevice,
                                         e.stream),
                         "cudaMemcpyAsync(first tasks)");
      cuda_detail::check(cudaMemcpyAsync(rules_.data(), rules.data(), n * sizeof(Rule),
                                         cudaMemcpyHostToDevice, e.stream),
                         "cudaMemcpyAsync(rules)");
      cuda_detail::check(cudaStreamSynchronize(e.stream), "cudaStreamSynchronize(upload)");
    }
    if (reducing || unorm_capable) {
      std::vector<std::uint64_t> sizes;
      for (auto const& en : entries)
        sizes.push_back(en.size);
      reduction_ =
          tensor_reduction<Rule, Policy, P, G>(e, std::span<std::uint64_t const>(sizes), device);
    }
    int per_sm = 0;
    cuda_detail::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                           &per_sm,
                           fused_step_kernel<Rule, Policy, P, G, nonfinite_policy::skip_element>,
                           fused_block_threads, 0),
                       "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    grid_ = std::max(1, per_sm) * cuda_detail::sm_count(e.device);
  }

  multi_tensor_step(multi_tensor_step const&) = delete;
  multi_tensor_step& operator=(multi_tensor_step const&) = delete;
  multi_tensor_step(multi_tensor_step&&) noexcept = default;
  multi_tensor_step& operator=(multi_tensor_step&&) noexcept = default;

  //! Enqueues this group's part of the gradient-norm pass (a no-op when the controller needs no
  //! norm): the sum of squares in optim/detail/grad_norm.hpp's order, which the host optimizer
  //! follows too. Reads every gradient once.
  void accumulate_norm(exec::cuda const& e) {
    if (!controller_->needs_norm())
      return;
    cuda_detail::device_guard guard(e.device);
    if (norm_piece_count_ == 0) {
      cuda_detail::check(cudaMemsetAsync(controller_->partial_sum(slot_), 0,
                                         norm_partials * sizeof(double), e.stream),
                         "cudaMemsetAsync(partial sums)");
      cuda_detail::check(cudaMemsetAsync(controller_->partial_bad(slot_), 0,
                                         norm_partials * sizeof(std::uint32_t), e.stream),
                         "cudaMemsetAsync(partial flags)");
      return;
    }
    detail::grad_sumsq_kernel<G><<<norm_partials, 256, 0, e.stream>>>(
        entries_.data(), norm_first_piece_.data(), entry_count_, norm_piece_count_,
        controller_->partial_sum(slot_), controller_->partial_bad(slot_));
    cuda_detail::check_launch(e, "grad_sumsq_kernel");
  }

  //! Enqueues the per-tensor scalars of this step (after the controller's resolve()): each
  //! tensor's rule.prepare, then the reducing rule's first pass and finish (LAMB, LARS), then
  //! max_unorm's update-norm pass when the controller clips update norms.
  void prepare(exec::cuda const& e) {
    if (entry_count_ == 0)
      return;
    cuda_detail::device_guard guard(e.device);
    unsigned const blocks = std::min<unsigned>((entry_count_ + 255) / 256, 64);
    cuda_detail::launch(e, step_pdl, detail::prepare_kernel<Rule>, dim3(blocks), dim3(256), 0,
                        "prepare_kernel", controller_->control(),
                        static_cast<tensor_entry const*>(entries_.data()),
                        static_cast<Rule const*>(rules_.data()), scalars_.data(), entry_count_);
    cuda_step_options const& o = controller_->options();
    bool const skip_bad = o.nonfinite == nonfinite_policy::skip_element;
    if constexpr (reducing)
      reduction_.template run<detail::rule_terms, detail::rule_finish>(
          e, entries_.data(), scalars_.data(), controller_->control(), skip_bad, o.max_unorm);
    if constexpr (unorm_capable)
      if (o.max_unorm > 0.0f)
        reduction_.template run<detail::update_norm_terms, detail::update_norm_finish>(
            e, entries_.data(), scalars_.data(), controller_->control(), skip_bad, o.max_unorm);
  }

  //! Enqueues the fused update of global tasks [task_begin, task_end) (after prepare()).
  void update(exec::cuda const& e, std::uint64_t task_begin, std::uint64_t task_end) {
    QMEM_EXPECTS(task_begin <= task_end && task_end <= task_count_, "task range [", task_begin,
                 ", ", task_end, ") is not within [0, ", task_count_, "]");
    if (task_begin == task_end)
      return;
    cuda_detail::device_guard guard(e.device);
    cuda_step_options const& o = controller_->options();
    fused_args<Rule, Policy> const args{entries_.data(),
                                        scalars_.data(),
                                        controller_->control(),
                                        task_begin,
                                        task_end,
                                        o.seed,
                                        entry_count_,
                                        o.rounding == param_rounding::stochastic ? 1u : 0u,
                                        traits::tables::make(),
                                        first_tasks_.data()};
    constexpr std::uint64_t block_warps = fused_block_threads / 32;
    std::uint64_t const blocks_needed = (task_end - task_begin + block_warps - 1) / block_warps;
    // QMEM_OPTIM_FUSED_FP32_ONE_PASS: a group with fp32 parameters, gradients and states stepped
    // by Adam or AdamW (AdamW 32-bit), of any number of tensors, launches a warp per task (one
    // pass) instead of the resident grid (grid stride)
    constexpr bool one_pass = detail::one_pass_kernel<Rule, Policy, P, G>;
    std::uint64_t const grid_limit =
        one_pass ? std::uint64_t{0x7fffffff} : static_cast<std::uint64_t>(grid_);
    int const grid = static_cast<int>(std::min<std::uint64_t>(blocks_needed, grid_limit));
    // skip_step and raise: resolve() already skipped a step with a non-finite gradient
    bool const skip_element = o.nonfinite == nonfinite_policy::skip_element;
    auto* kernel = skip_element
                       ? fused_step_kernel<Rule, Policy, P, G, nonfinite_policy::skip_element>
                       : fused_step_kernel<Rule, Policy, P, G, nonfinite_policy::skip_step>;
    // one pass over several tensors: the WarpLookup form (find_tensor_warp); one tensor keeps the
    // plain form, faster there (see QMEM_OPTIM_FUSED_FP32_ONE_PASS)
    if constexpr (one_pass)
      if (entry_count_ > 1)
        kernel = skip_element
                     ? fused_step_kernel<Rule, Policy, P, G, nonfinite_policy::skip_element, true>
                     : fused_step_kernel<Rule, Policy, P, G, nonfinite_policy::skip_step, true>;
    cuda_detail::launch(e, step_pdl, kernel, dim3(static_cast<unsigned>(grid)),
                        dim3(fused_block_threads), 0, "fused_step_kernel", args);
  }
  //! Enqueues the fused update of every tensor of the group.
  void update(exec::cuda const& e) { update(e, 0, task_count_); }

  //! A whole step of this group alone (norm, resolve, prepare, update). With several groups on
  //! one controller use cuda::step(e, controller, groups...) instead.
  void step(exec::cuda const& e) {
    accumulate_norm(e);
    controller_->resolve(e);
    prepare(e);
    update(e);
  }

  [[nodiscard]] std::uint64_t task_count() const noexcept { return task_count_; }
  //! The first global task of caller tensor `i` (i == tensor_count() gives task_count()).
  [[nodiscard]] std::uint64_t first_task(std::size_t i) const noexcept {
    return tensor_first_task_[i];
  }
  //! Bytes of state (codes or values, and absmax) of caller tensor `i`.
  [[nodiscard]] std::size_t state_bytes(std::size_t i) const noexcept {
    return tensor_state_bytes_[i];
  }
  [[nodiscard]] std::size_t tensor_count() const noexcept { return tensors_.size(); }
  [[nodiscard]] tensor const& tensor_at(std::size_t i) const noexcept { return tensors_[i]; }
  [[nodiscard]] step_controller& controller() noexcept { return *controller_; }

private:
  //! Tensor i's lr scale and rule (optim::detail::check_lr_scale, check_rule), the message naming
  //! the tensor. Throws bad_argument.
  static void check_rule_of(std::size_t i, tensor const& t) {
    try {
      optim::detail::check_lr_scale(t.lr_scale);
      optim::detail::check_rule(t.rule);
    } catch (bad_argument const& x) {
      qmem::detail::raise<bad_argument>("multi_tensor_step: tensor ", i, ": ", x.what());
    }
  }

  //! check_reachable (core/cuda/runtime.cuh) of tensor i's param, grad, master weights, states
  //! and absmax, the message naming the tensor (null pointers are left to the checks after it).
  //! Call under device_guard(e.device). Throws bad_argument.
  static void check_resident_tensor(exec::cuda const& e, std::size_t i, tensor const& t) {
    if (t.size == 0)
      return;
    auto const check = [&](void const* p, auto const&... what) {
      if (p != nullptr)
        cuda_detail::check_reachable(e.device, p, "multi_tensor_step",
                                     qmem::detail::message("tensor ", i, " ", what...));
    };
    check(t.param, "param");
    check(t.grad, "grad");
    check(t.master, "master");
    // a compile-time loop: a rule without state (state_count 0) compares no index with 0
    detail::for_each_state_host<Rule::state_count>([&](auto J) {
      check(t.state[J.value], "state ", J.value);
      check(t.absmax[J.value], "absmax ", J.value);
    });
  }

  static bool is_aligned(void const* p, std::size_t bytes) noexcept {
    std::size_t const a = bytes >= 16 ? 16 : bytes;
    return p == nullptr || a <= 1 || reinterpret_cast<std::uintptr_t>(p) % a == 0;
  }
};

//! One optimizer step over several groups sharing `controller`: every group's norm pass, one
//! resolve, then each group's prepare (with its reductions) and update. Stream-ordered, no host
//! synchronization.
template <class... Groups>
void step(exec::cuda const& e, step_controller& controller, Groups&... groups) {
  (groups.accumulate_norm(e), ...);
  controller.resolve(e);
  (groups.prepare(e), ...);
  (groups.update(e), ...);
}

} // namespace qmem::optim::cuda
