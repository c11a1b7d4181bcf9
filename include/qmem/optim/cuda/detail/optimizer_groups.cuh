#pragma once
//! \file
//! What the two CUDA optimizer front ends share: optimizer_step (optim/cuda/optimizer_step.cuh,
//! an optim::optimizer's own managed state) and device_optimizer (optim/cuda/device_optimizer.cuh,
//! state in device memory). Both keep one param_state per tensor in the host optimizer's layout
//! and step them as two groups on one step_controller: the tensors with the policy's state and
//! the tensors kept in fp32 (below min_quantized_size, or fp32_state), so that the global norm and
//! the skip decision span both.

#include <qmem/core/exec.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/memory/resource.hpp>
#include <qmem/optim/cuda/multi_tensor.cuh>
#include <qmem/optim/cuda/tensor_reduce.cuh>
#include <qmem/optim/rule.hpp>
#include <qmem/optim/schedule.hpp>
#include <qmem/optim/state.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace qmem::optim::cuda::detail {

//! The CUDA step options that carry an optimizer's `options` (lr schedule, non-finite policy,
//! clipping, rounding, seed) for its two groups, with a loss scaler's device flag `found_inf`
//! (or null).
inline cuda_step_options step_options_of(optimizer_options const& options,
                                         std::uint32_t const* found_inf) noexcept {
  cuda_step_options c;
  c.lr = options.lr;
  c.nonfinite = options.nonfinite;
  c.max_grad_norm = options.max_grad_norm;
  c.max_unorm = options.max_unorm;
  c.percentile = options.percentile;
  c.rounding = options.rounding;
  c.seed = options.seed;
  c.found_inf = found_inf;
  c.max_groups = 2;
  return c;
}

//! The table of `Group` (quantized_group when `quantized`, else plain_group): one entry per
//! parameter of `params` whose `quantized` flag equals `quantized`, with the gradient of the same
//! index in `grads` (same count and sizes: the caller has checked). `ParamState` has the host
//! optimizer's param_state layout (param, rule, lr_scale, quantized, data, scale, master). The
//! entries point at the states' storage, which the device step writes: the front ends own that
//! storage and lend it to their groups while they live.
template <class Group, class ParamState, float_element G>
std::vector<typename Group::tensor> group_tensors(std::span<ParamState const> params,
                                                  std::span<tensor_view<G const> const> grads,
                                                  bool quantized) {
  using tensor = typename Group::tensor;
  constexpr int state_count = decltype(tensor::rule)::state_count;
  std::vector<tensor> out;
  for (std::size_t i = 0; i < params.size(); ++i) {
    ParamState const& ps = params[i];
    if (ps.quantized != quantized)
      continue;
    tensor t;
    t.param = ps.param.data();
    t.grad = grads[i].data();
    t.size = ps.param.size();
    t.rule = decltype(tensor::rule){ps.rule};
    t.lr_scale = ps.lr_scale;
    t.master = ps.master.empty() ? nullptr : const_cast<float*>(ps.master.data());
    for_each_state_host<state_count>([&](auto K) {
      t.state[K.value] = const_cast<std::uint8_t*>(ps.data[K.value].data());
      t.absmax[K.value] = const_cast<float*>(ps.scale[K.value].data());
    });
    out.push_back(t);
  }
  return out;
}

//! The two tensor groups of an optimizer of rule `Rule`, state policy `Policy`, parameters
//! `Param` and gradients `G` on one step_controller: the tensors with the policy's state and the
//! tensors with fp32 state, each group's rule carrying max_unorm's factor. Empty until build().
template <update_rule Rule, state_policy Policy, float_element Param, float_element G>
class optimizer_groups {
public:
  using device_rule = unorm_clipped<Rule>;
  using quantized_group = multi_tensor_step<device_rule, Policy, Param, G>;
  using plain_group = multi_tensor_step<device_rule, fp32_state, Param, G>;

private:
  std::unique_ptr<quantized_group> quantized_;
  std::unique_ptr<plain_group> plain_;

public:
  //! Builds both groups' device tables from `params` and one gradient per parameter (see
  //! group_tensors) on `controller`, a fresh one with no group yet (waits for e.stream). Tables
  //! from an earlier build must have been released (reset()) before that controller was made.
  template <class ParamState>
  void build(exec::cuda const& e, std::span<ParamState const> params,
             std::span<tensor_view<G const> const> grads, memory::resource& device,
             step_controller& controller) {
    auto const q = group_tensors<quantized_group>(params, grads, true);
    auto const f = group_tensors<plain_group>(params, grads, false);
    quantized_ = std::make_unique<quantized_group>(e, std::span(q), device, controller);
    plain_ = std::make_unique<plain_group>(e, std::span(f), device, controller);
  }
  //! Frees the device tables (steps that read them must have finished).
  void reset() noexcept {
    quantized_.reset();
    plain_.reset();
  }
  //! Whether build() made the tables.
  [[nodiscard]] bool built() const noexcept { return quantized_ != nullptr; }
  //! Enqueues one step of both groups on e.stream (cuda::step; no host synchronization).
  //! Precondition: built().
  void step(exec::cuda const& e, step_controller& controller) {
    cuda::step(e, controller, *quantized_, *plain_);
  }
};

} // namespace qmem::optim::cuda::detail
