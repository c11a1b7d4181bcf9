#pragma once
//! \file
//! An optimizer over parameters and gradients in plain device memory (cudaMalloc, a device memory
//! resource, a framework's own CUDA tensors), with its state allocated on the device too: what a
//! CUDA training loop needs, with no host copy of anything between checkpoints.
//!
//!     memory::cuda_device_resource device(0, stream);
//!     optim::cuda::device_optimizer<optim::adamw, optim::int8_state, bf16> opt(
//!         exec::cuda{stream}, optim::adamw{.weight_decay = 0.01f}, options, device);
//!     opt.add_param(exec::cuda{stream}, tensor_view<bf16>(weights_ptr, n, memory_space::device));
//!     opt.bind(exec::cuda{stream}, grads);      // builds the device tables once
//!     for (...) opt.step(exec::cuda{stream});    // graph-capturable, no host synchronization
//!     opt.save(exec::cuda{stream}, "optim.safetensors");   // the host optimizer's file format
//!
//! The update is the host optimizer's (optim/optimizer.hpp) bit for bit, with every option:
//! per-parameter overrides, min_quantized_size, master weights, stochastic rounding, global-norm,
//! percentile and update-norm clipping, reducing rules (LAMB, LARS), the non-finite policies, the
//! lr schedule. State lives in the resource given at construction: device memory, or paged
//! memory (paged_state_resource, managed) when it may not fit. The step count, lr and norm history
//! live in device memory (step_controller).
//!
//! Save and resume go through the host: `save` copies the state into a host optimizer of the same
//! rule, policy and parameter sizes and writes its file (checkpoint.hpp, schema qmem.optim/1), so
//! a file written here loads into a host optimizer and the other way round; `load` validates the
//! whole file before it changes anything. `copy_state_to` / `copy_state_from` expose that copy.
//! Like checkpoint.hpp, this header needs nlohmann-json (`<nlohmann/json.hpp>`).

#include <qmem/core/cuda/runtime.cuh>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/memory/resource.hpp>
#include <qmem/optim/checkpoint.hpp>
#include <qmem/optim/cuda/detail/optimizer_groups.cuh>
#include <qmem/optim/cuda/multi_tensor.cuh>
#include <qmem/optim/cuda/tensor_reduce.cuh>
#include <qmem/optim/detail/validate.hpp>
#include <qmem/optim/optimizer.hpp>
#include <qmem/optim/rule.hpp>
#include <qmem/optim/schedule.hpp>
#include <qmem/optim/state.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <utility>
#include <vector>

namespace qmem::optim::cuda {

namespace detail {
//! out[i] = float(in[i]): fp32 master weights from 16-bit parameters (the host's to_float).
template <class P>
__global__ void __launch_bounds__(256) widen_kernel(P const* in, float* out, std::uint64_t n) {
  for (std::uint64_t i = std::uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n;
       i += std::uint64_t{gridDim.x} * blockDim.x)
    out[i] = to_float(in[i]);
}
} // namespace detail

//! The optimizer of rule `Rule`, state policy `Policy`, parameters of element type `Param` and
//! gradients of type `G`, with parameters, gradients and state in device memory. Not copyable;
//! movable.
template <update_rule Rule, state_policy Policy = int8_state, float_element Param = float,
          float_element G = Param>
requires(!std::same_as<Param, double> && !std::same_as<G, double>) class device_optimizer {
public:
  using rule_type = Rule;
  using policy_type = Policy;
  using param_type = Param;
  using grad_type = G;
  //! The host optimizer with the same state layout (save, load, inspection, conversion).
  using host_optimizer = optimizer<Rule, Policy, Param>;
  using param_options = typename host_optimizer::param_options;
  static constexpr int state_count = Rule::state_count;
  using groups_type = detail::optimizer_groups<Rule, Policy, Param, G>;
  //! The rule the device groups run (max_unorm's factor on the update).
  using device_rule = typename groups_type::device_rule;
  using quantized_group = typename groups_type::quantized_group;
  using plain_group = typename groups_type::plain_group;
  //! One parameter tensor and its device state: the host optimizer's layout, so that save, load
  //! and the state copies move buffers one to one.
  using param_state = typename host_optimizer::param_state;

private:
  Rule rule_;
  optimizer_options options_;
  memory::resource* state_resource_;
  memory::resource* workspace_;
  std::uint32_t const* found_inf_ = nullptr;
  std::vector<param_state> params_;
  std::vector<tensor_view<G const>> grads_;
  std::unique_ptr<step_controller> controller_;
  groups_type groups_;
  int device_ = 0;

  template <class P, int K>
  using format_of = typename P::template format<Rule::state_signs[static_cast<std::size_t>(K)]>;

  void build_groups(exec::cuda const& e) {
    // a fresh controller registers the two groups again; the device step state is carried over.
    // Steps in flight read the old tables: wait for them before anything is freed, and for the
    // copy before the old controller goes (the workspace may order its frees on another stream).
    cuda_detail::check(cudaStreamSynchronize(e.stream), "cudaStreamSynchronize(rebind)");
    groups_.reset();
    auto controller = std::make_unique<step_controller>(
        e, *workspace_, detail::step_options_of(options_, found_inf_));
    controller->copy_state_from(e, *controller_);
    cuda_detail::check(cudaStreamSynchronize(e.stream), "cudaStreamSynchronize(rebind)");
    controller_ = std::move(controller);
    groups_.build(e, std::span<param_state const>(params_),
                  std::span<tensor_view<G const> const>(grads_), *workspace_, *controller_);
  }

  //! A host optimizer with this one's rule, options and parameter sizes over host parameters
  //! `storage` (zeros; the parameters are not part of the optimizer state).
  host_optimizer make_host(std::vector<std::vector<Param>>& storage) const {
    host_optimizer h(rule_, options_);
    storage.clear();
    storage.reserve(params_.size());
    for (auto const& ps : params_) {
      storage.emplace_back(ps.param.size(), from_float<Param>(0.0f));
      param_options o;
      o.rule = ps.rule;
      o.lr_scale = ps.lr_scale;
      o.fp32_state = !ps.quantized;
      h.add_param(
          tensor_view<Param>(storage.back().data(), storage.back().size(), memory_space::host), o);
    }
    return h;
  }

  //! Bad_argument unless `h` has this optimizer's parameter count, sizes and state kinds.
  void check_same_layout(host_optimizer const& h) const {
    QMEM_EXPECTS(h.size() == params_.size(), "the host optimizer has ", h.size(),
                 " parameters; this one has ", params_.size());
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto const& a = params_[i];
      auto const& b = h.params()[i];
      QMEM_EXPECTS(a.param.size() == b.param.size() && a.quantized == b.quantized &&
                       a.master.size() == b.master.size(),
                   "parameter ", i, " has ", b.param.size(), " elements (",
                   b.quantized ? "quantized" : "fp32", " state) in the host optimizer; here ",
                   a.param.size(), " (", a.quantized ? "quantized" : "fp32", " state)");
    }
  }

  //! Copies every state buffer, absmax and master weight, the rule and the lr scale of each
  //! parameter between this optimizer and `host` (a host optimizer's param_states of the same
  //! layout): to the host for cudaMemcpyDeviceToHost, else from it. Waits for e.stream.
  void copy_buffers(exec::cuda const& e, std::span<param_state> host, cudaMemcpyKind kind) {
    bool const to_host = kind == cudaMemcpyDeviceToHost;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      param_state& dev = params_[i];
      param_state& hst = host[i];
      auto move = [&](auto& d, auto& h) {
        if (d.size_bytes() != 0)
          cuda_detail::check(
              cudaMemcpyAsync(to_host ? static_cast<void*>(h.data()) : d.data(),
                              to_host ? static_cast<void const*>(d.data()) : h.data(),
                              d.size_bytes(), kind, e.stream),
              "cudaMemcpyAsync(optimizer state)");
      };
      optim::detail::for_each_state<state_count>([&](auto K) {
        auto const k = static_cast<std::size_t>(K.value);
        move(dev.data[k], hst.data[k]);
        move(dev.scale[k], hst.scale[k]);
      });
      move(dev.master, hst.master);
      if (to_host) {
        hst.rule = dev.rule;
        hst.lr_scale = dev.lr_scale;
      } else {
        dev.rule = hst.rule;
        dev.lr_scale = hst.lr_scale;
      }
    }
    cuda_detail::check(cudaStreamSynchronize(e.stream), "cudaStreamSynchronize(state copy)");
  }

public:
  //! An optimizer with default hyper-parameters `rule` and `options` on device e.device: state
  //! from `state` (device or paged memory), the step tables and the step state from `workspace`
  //! (device memory). `found_inf`: a loss scaler's device flag (nonzero skips a step), or null.
  //! Preconditions (bad_argument): the options and the rule are valid for optim::optimizer (the
  //! rule's validate()); both resources hand out device-accessible memory.
  device_optimizer(exec::cuda const& e, Rule rule, optimizer_options options,
                   memory::resource& state, memory::resource& workspace,
                   std::uint32_t const* found_inf = nullptr)
      : rule_(rule), options_(options), state_resource_(&state), workspace_(&workspace),
        found_inf_(found_inf), device_(e.device) {
    optim::detail::check_optimizer_options<Param>(options);
    optim::detail::check_rule(rule);
    QMEM_EXPECTS(device_accessible(state.space()) && device_accessible(workspace.space()),
                 "the state resource hands out ", to_string(state.space()),
                 " memory and the workspace resource ", to_string(workspace.space()),
                 "; expected device, managed or pinned memory");
    controller_ = std::make_unique<step_controller>(e, workspace,
                                                    detail::step_options_of(options, found_inf));
  }
  //! The same with one resource for state and workspace.
  device_optimizer(exec::cuda const& e, Rule rule, optimizer_options options,
                   memory::resource& device, std::uint32_t const* found_inf = nullptr)
      : device_optimizer(e, rule, options, device, device, found_inf) {}

  device_optimizer(device_optimizer&&) noexcept = default;
  device_optimizer& operator=(device_optimizer&&) noexcept = default;

  //! Adds a parameter tensor in device-accessible memory and allocates its state, zeroed
  //! (stream-ordered on e.stream; master weights are widened from the parameter there). Returns
  //! its index, the position of its gradient in bind(). Call bind() again before the next step
  //! (adding a parameter to a bound optimizer waits for e.stream and unbinds it).
  //! Preconditions (bad_argument, nothing allocated): the view is non-null when non-empty, in
  //! memory of e.device, managed or pinned memory (cuda_detail::check_resident) and shares no memory with a parameter already added (as the host optimizer's
  //! add_param); lr_scale finite and >= 0; `o.rule`, when set, passes its validate(); e.device is this
  //! optimizer's device.
  std::size_t add_param(exec::cuda const& e, tensor_view<Param> param, param_options o = {}) {
    QMEM_EXPECTS(e.device == device_, "e.device is ", e.device, "; this optimizer is on device ",
                 device_);
    QMEM_EXPECTS(param.size() == 0 || param.data() != nullptr, "add_param: param of ", param.size(),
                 " elements has a null pointer");
    QMEM_EXPECTS(device_accessible(param.space()), "add_param: param is in ",
                 to_string(param.space()), " memory; expected device-accessible memory");
    host_optimizer::check_new_param(params_, param, o);
    cuda_detail::device_guard guard(device_);
    cuda_detail::check_resident(e, "add_param", {cuda_detail::arg("param", param)});
    param_state ps = host_optimizer::make_param_state(
        param, o, rule_, options_, *state_resource_, [&](void* p, std::size_t bytes) {
          cuda_detail::check(cudaMemsetAsync(p, 0, bytes, e.stream), "cudaMemsetAsync(state)");
        });
    if (!ps.master.empty()) {
      std::size_t const n = ps.master.size();
      unsigned const blocks = static_cast<unsigned>(std::min<std::size_t>((n + 255) / 256, 4096));
      detail::widen_kernel<Param><<<blocks, 256, 0, e.stream>>>(param.data(), ps.master.data(), n);
      cuda_detail::check_launch(e, "widen_kernel");
    }
    params_.push_back(std::move(ps));
    if (bound()) { // steps in flight read the tables: wait before they are freed
      cuda_detail::check(cudaStreamSynchronize(e.stream), "cudaStreamSynchronize(add_param)");
      groups_.reset();
    }
    return params_.size() - 1;
  }

  //! Binds one gradient per parameter (same order and sizes as add_param, device-accessible) and
  //! builds the device tables of the step (waits for e.stream once). Call it again when the
  //! gradient buffers move or parameters were added. Preconditions (bad_argument, the previous
  //! binding kept): one gradient per parameter of the same size; non-null; in memory of this
  //! optimizer's device, managed or pinned memory (cuda_detail::check_reachable).
  void bind(exec::cuda const& e, std::span<tensor_view<G const> const> grads) {
    QMEM_EXPECTS(e.device == device_, "e.device is ", e.device, "; this optimizer is on device ",
                 device_);
    QMEM_EXPECTS(grads.size() == params_.size(), "got ", grads.size(), " gradients for ",
                 params_.size(), " parameters");
    cuda_detail::device_guard guard(device_);
    for (std::size_t i = 0; i < grads.size(); ++i) {
      QMEM_EXPECTS(grads[i].size() == params_[i].param.size(), "gradient ", i, " has ",
                   grads[i].size(), " elements; its parameter has ", params_[i].param.size());
      QMEM_EXPECTS(grads[i].size() == 0 || grads[i].data() != nullptr, "gradient ", i,
                   " has a null pointer");
      QMEM_EXPECTS(device_accessible(grads[i].space()), "gradient ", i, " is in ",
                   to_string(grads[i].space()), " memory; expected device-accessible memory");
      if (!grads[i].empty())
        cuda_detail::check_reachable(device_, grads[i].data(), "bind",
                                     qmem::detail::message("gradient ", i));
    }
    grads_.assign(grads.begin(), grads.end());
    build_groups(e);
  }
  //! bind() over a vector of gradient views.
  void bind(exec::cuda const& e, std::vector<tensor_view<G const>> const& grads) {
    bind(e, std::span<tensor_view<G const> const>(grads));
  }

  //! Whether bind() has built the step for the current parameters.
  [[nodiscard]] bool bound() const noexcept { return groups_.built(); }

  //! Enqueues one step of every parameter on e.stream: no host synchronization, capturable in a
  //! CUDA graph. Precondition: bound() (bad_argument otherwise).
  void step(exec::cuda const& e) {
    QMEM_EXPECTS(bound(), "step: no gradients are bound to the current parameters; call bind()");
    groups_.step(e, *controller_);
  }

  //! Number of parameter tensors.
  [[nodiscard]] std::size_t size() const noexcept { return params_.size(); }
  //! The parameter tensors and their device state (read-only).
  [[nodiscard]] std::span<param_state const> params() const noexcept { return params_; }
  [[nodiscard]] Rule const& rule() const noexcept { return rule_; }
  [[nodiscard]] optimizer_options const& options() const noexcept { return options_; }
  //! The device step state (step count, lr, skip flag, norm; loss scale and max_grad_norm are
  //! writable there between steps).
  [[nodiscard]] step_controller& controller() noexcept { return *controller_; }
  //! Bytes of optimizer state on the device (codes, scales; not master weights).
  [[nodiscard]] std::size_t state_bytes() const noexcept {
    std::size_t b = sizeof(step_state);
    for (auto const& p : params_)
      optim::detail::for_each_state<state_count>([&](auto K) {
        auto const k = static_cast<std::size_t>(K.value);
        b += p.data[k].size_bytes() + p.scale[k].size_bytes();
      });
    return b;
  }
  //! Steps applied (waits for e.stream).
  [[nodiscard]] std::int32_t step_count_blocking(exec::cuda const& e) {
    return controller_->read_control_blocking(e).step;
  }

  //! Copies this optimizer's state (codes, absmax, fp32 values, master weights, per-parameter
  //! rules and lr scales, step count, lr, norm history) into `h`, a host optimizer with the same
  //! parameter count, sizes and state kinds (its parameters are not touched). Waits for e.stream.
  //! Precondition (bad_argument, nothing written): the same layout.
  void copy_state_to(exec::cuda const& e, host_optimizer& h) {
    check_same_layout(h);
    cuda_detail::device_guard guard(device_);
    step_control const c = controller_->read_control_blocking(e);
    std::vector<float> history;
    if (options_.percentile < 100 && c.step > 0)
      history = controller_->read_norm_history_blocking(e);
    copy_buffers(e, state_access<host_optimizer>::params(h), cudaMemcpyDeviceToHost);
    h.set_step(c.step, c.lr);
    state_access<host_optimizer>::history(h) = std::move(history);
  }

  //! Copies the state of `h` (a host optimizer with the same layout) into this optimizer: codes,
  //! absmax, values, master weights, rules, lr scales, step count, lr, norm history. Rebuilds the
  //! device tables when bound. Waits for e.stream. Precondition (bad_argument, nothing written):
  //! the same layout.
  void copy_state_from(exec::cuda const& e, host_optimizer const& h) {
    check_same_layout(h);
    cuda_detail::device_guard guard(device_);
    copy_buffers(e, state_access<host_optimizer>::params(const_cast<host_optimizer&>(h)),
                 cudaMemcpyHostToDevice);
    auto const& history = state_access<host_optimizer>::history(const_cast<host_optimizer&>(h));
    controller_->restore_blocking(e, h.step_count(), h.last_lr(), history);
    if (bound())
      build_groups(e); // the tables hold the rules and lr scales
  }

  //! Writes the state to `path` in the host optimizer's format (checkpoint.hpp), atomically,
  //! through host memory. Waits for e.stream. Throws io_error when the file cannot be written.
  void save(exec::cuda const& e, std::filesystem::path const& path) {
    std::vector<std::vector<Param>> storage;
    host_optimizer h = make_host(storage);
    copy_state_to(e, h);
    save_state(h, path);
  }

  //! Loads state written by save() or by a host optimizer's save_state with the same rule,
  //! policy and parameter sizes. Throws io_error / format_error (see load_state) with this
  //! optimizer unchanged; everything is validated before anything is copied. Waits for e.stream.
  void load(exec::cuda const& e, std::filesystem::path const& path) {
    std::vector<std::vector<Param>> storage;
    host_optimizer h = make_host(storage);
    load_state(h, path);
    copy_state_from(e, h);
  }
};

} // namespace qmem::optim::cuda
