#pragma once
//! \file
//! The fused CUDA step for a qmem::optim::optimizer (optim/optimizer.hpp) whose state, parameters
//! and gradients the GPU can reach: the optimizer's own state buffers, rules, lr scales and
//! master weights are stepped in place by the multi-tensor kernels, so the optimizer object keeps
//! doing what it does on the host (state_values_of, conversion, save and resume).
//!
//!     memory::cuda_managed_resource managed(0);            // host- and device-accessible state
//!     optim::optimizer<optim::adamw, optim::int8_state> opt({}, options, managed);
//!     opt.add_param(view_of_managed_params);
//!     optim::cuda::optimizer_step<decltype(opt)> gpu(exec::cuda{stream}, opt, grads, device);
//!     gpu.step(exec::cuda{stream});                         // graph-capturable, no host sync
//!
//! Tensors with policy state and tensors kept in fp32 (below min_quantized_size, or fp32_state)
//! form two groups on one step_controller, so the global norm and the skip decision span both.
//! Every option of the host step runs on the device with the host's bits: reducing rules (LAMB,
//! LARS: per-tensor first pass, tensor_reduce.cuh), max_unorm (each group's rule wrapped in
//! unorm_clipped), percentile clipping (the history lives in the controller), global-norm
//! clipping, the non-finite policies. The step count, the lr and the norm history start from the
//! optimizer's and then live in the controller (device memory); `store_step_blocking` copies them
//! back into the optimizer (before save_state, for example).
//!
//! For parameters in plain device memory (a framework's own CUDA tensors), use device_optimizer
//! (device_optimizer.cuh), which allocates its state on the device.

#include <qmem/core/cuda/runtime.cuh>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/memory/resource.hpp>
#include <qmem/optim/cuda/detail/optimizer_groups.cuh>
#include <qmem/optim/cuda/multi_tensor.cuh>
#include <qmem/optim/cuda/tensor_reduce.cuh>
#include <qmem/optim/optimizer.hpp>

// The percentile history is private to the optimizer; checkpoint.hpp's state_access reaches it.
// That header needs nlohmann-json (safetensors): without it, the history is not carried between
// the optimizer and the device (the step count and lr still are), as save_state is not there.
#if defined(__has_include) && __has_include(<nlohmann/json.hpp>)
#include <qmem/optim/checkpoint.hpp>
#define QMEM_OPTIM_CUDA_STEP_HISTORY 1
#else
#define QMEM_OPTIM_CUDA_STEP_HISTORY 0
#endif

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace qmem::optim::cuda {

//! The fused CUDA step of optimizer `Optimizer` (an optim::optimizer<Rule, Policy, Param>) with
//! gradients of element type `G`. Not copyable; movable.
template <class Optimizer, float_element G = typename Optimizer::param_type>
class optimizer_step {
public:
  using rule_type = typename Optimizer::rule_type;
  using policy_type = typename Optimizer::policy_type;
  using param_type = typename Optimizer::param_type;
  using groups_type = detail::optimizer_groups<rule_type, policy_type, param_type, G>;
  //! The rule the groups run: the optimizer's, with max_unorm's factor on its update.
  using device_rule = typename groups_type::device_rule;
  using quantized_group = typename groups_type::quantized_group;
  using plain_group = typename groups_type::plain_group;

private:
  std::unique_ptr<step_controller> controller_;
  groups_type groups_;
  Optimizer* opt_ = nullptr;

public:
  //! Binds `opt` and one gradient per parameter (same order and sizes as add_param) for steps on
  //! e.device; the device tables come from `device`. Preconditions (bad_argument, nothing
  //! allocated): the optimizer's state resource, its parameters and the gradients are
  //! device-accessible (managed or pinned memory; device memory for the gradients too).
  //! `found_inf`: a loss scaler's device flag, or null. The step count, lr and norm history start
  //! from the optimizer's (waits for e.stream once). The parameters, gradients and state must stay
  //! where they are while this object lives.
  optimizer_step(exec::cuda const& e, Optimizer& opt, std::span<tensor_view<G const> const> grads,
                 memory::resource& device, std::uint32_t const* found_inf = nullptr)
      : opt_(&opt) {
    QMEM_EXPECTS(grads.size() == opt.size(), "got ", grads.size(), " gradients for ", opt.size(),
                 " parameters");
    QMEM_EXPECTS(device_accessible(opt.resource().space()), "the optimizer's state is in ",
                 to_string(opt.resource().space()),
                 " memory; expected device-accessible (managed or pinned) memory");
    for (std::size_t i = 0; i < grads.size(); ++i) {
      auto const& p = opt.params()[i].param;
      QMEM_EXPECTS(grads[i].size() == p.size(), "gradient ", i, " has ", grads[i].size(),
                   " elements; its parameter has ", p.size());
      QMEM_EXPECTS(device_accessible(p.space()) && device_accessible(grads[i].space()),
                   "parameter ", i, " (", to_string(p.space()), ") or its gradient (",
                   to_string(grads[i].space()), ") is not device-accessible");
    }
    controller_ = std::make_unique<step_controller>(
        e, device, detail::step_options_of(opt.options(), found_inf));
    if (opt.step_count() > 0) { // a resumed optimizer: continue its step count and history
      std::span<float const> history;
#if QMEM_OPTIM_CUDA_STEP_HISTORY
      history = state_access<Optimizer>::history(opt);
#endif
      controller_->restore_blocking(e, opt.step_count(), opt.last_lr(), history);
    }
    groups_.build(e, opt.params(), grads, device, *controller_);
  }

  //! Enqueues one step of every parameter on e.stream (no host synchronization).
  void step(exec::cuda const& e) { groups_.step(e, *controller_); }

  //! Copies the device's step count, last lr and (percentile clipping, where checkpoint.hpp is
  //! available) norm history into the optimizer, so that its host-side view (step_count(),
  //! save_state) is current. Waits for e.stream. The states, parameters and master weights are
  //! the optimizer's own already.
  void store_step_blocking(exec::cuda const& e) {
    step_control const c = controller_->read_control_blocking(e);
    opt_->set_step(c.step, c.lr);
#if QMEM_OPTIM_CUDA_STEP_HISTORY
    std::vector<float> h;
    if (opt_->options().percentile < 100 && c.step > 0)
      h = controller_->read_norm_history_blocking(e);
    state_access<Optimizer>::history(*opt_) = std::move(h);
#endif
  }

  [[nodiscard]] step_controller& controller() noexcept { return *controller_; }
};

} // namespace qmem::optim::cuda
