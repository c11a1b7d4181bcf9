#pragma once
// Support shared by the CUDA optimizer tests (cuda_optim_test, cuda_features_test), which compare
// every device step with the host optimizer bit for bit: the problems (initial parameters and
// per-step gradients), the host optimizer run that serves as the reference, byte-for-byte state
// checks and, in CUDA builds, the device and managed storage of the compared tensors.
#include <qmem/optim/optimizer.hpp>
#include <qmem/optim/state.hpp>

#include <doctest/doctest.h>

#include <cstddef>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "support/backend.hpp"

#if QMEM_HAS_CUDA()
#include <qmem/core/cuda/runtime.cuh>
#include <qmem/memory/resource.hpp>
#endif

namespace qmem::test {

//! Initial parameters and per-step gradients of several tensors (normal values, seeded).
template <class P, class G>
struct problem {
  std::vector<std::size_t> sizes;
  std::vector<std::vector<P>> params;
  std::vector<std::vector<std::vector<G>>> grads; // [step][tensor][i]
};

//! A problem over tensors of `sizes`: parameters 0.05 N(0, 1); gradients of step s scaled by
//! 1e-2, 3e-3, 6e-3 in turn (different global norms per step); with `poison`, each tensor of more
//! than 10 elements gets a NaN at 3 and an inf at n - 2 in every step.
template <class P, class G>
problem<P, G> make_problem(std::vector<std::size_t> const& sizes, int steps, unsigned seed,
                           bool poison = false) {
  problem<P, G> pr;
  pr.sizes = sizes;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (std::size_t n : sizes) {
    std::vector<P> p(n);
    for (auto& x : p)
      x = from_float<P>(0.05f * nd(rng));
    pr.params.push_back(std::move(p));
  }
  float const scales[] = {1e-2f, 3e-3f, 6e-3f};
  for (int s = 0; s < steps; ++s) {
    std::vector<std::vector<G>> gs;
    for (std::size_t n : sizes) {
      std::vector<G> g(n);
      for (auto& x : g)
        x = from_float<G>(scales[s % 3] * nd(rng));
      if (poison && n > 10) {
        g[3] = from_float<G>(std::numeric_limits<float>::quiet_NaN());
        g[n - 2] = from_float<G>(std::numeric_limits<float>::infinity());
      }
      gs.push_back(std::move(g));
    }
    pr.grads.push_back(std::move(gs));
  }
  return pr;
}

//! Host views of one step's gradients.
template <class G>
std::vector<tensor_view<G const>> host_views(std::vector<std::vector<G>> const& grads) {
  std::vector<tensor_view<G const>> v;
  for (auto const& g : grads)
    v.emplace_back(g.data(), g.size(), memory_space::host);
  return v;
}

//! The options of most comparisons: a constant lr and skip_element (no norm pass needed).
inline optim::optimizer_options comparison_options(float lr = 1e-3f) {
  optim::optimizer_options o;
  o.lr = optim::lr_schedule::constant(lr);
  o.nonfinite = optim::nonfinite_policy::skip_element;
  return o;
}

//! No per-parameter overrides.
struct no_overrides {
  template <class Options>
  void operator()(std::size_t, Options&) const noexcept {}
};

//! A host optimizer over its own copies of `initial` parameters: the reference of the GPU cases,
//! or a host optimizer of a device optimizer's layout (copy_state_to, load). `overrides(i, o)`
//! sets parameter i's param_options. Not movable (the optimizer views `params`).
template <class Rule, class Policy, class P>
struct host_reference {
  using optimizer_type = optim::optimizer<Rule, Policy, P>;
  std::vector<std::vector<P>> params;
  optimizer_type opt;

  template <class Overrides = no_overrides>
  host_reference(std::vector<std::vector<P>> const& initial, Rule rule,
                 optim::optimizer_options const& options, Overrides overrides = {})
      : params(initial), opt(rule, options) {
    for (std::size_t i = 0; i < params.size(); ++i) {
      typename optimizer_type::param_options o;
      overrides(i, o);
      opt.add_param(tensor_view<P>(params[i].data(), params[i].size(), memory_space::host), o);
    }
  }
  host_reference(host_reference const&) = delete;
  host_reference& operator=(host_reference const&) = delete;

  //! One step with `grads` (one vector per parameter).
  template <class G>
  optim::step_result step(std::vector<std::vector<G>> const& grads, optim::step_options so = {},
                          exec::host e = {}) {
    return opt.step(e, host_views(grads), so);
  }
  //! Every step of `pr`.
  template <class G>
  void run(problem<P, G> const& pr, optim::step_options so = {}, exec::host e = {}) {
    for (auto const& g : pr.grads)
      (void)step(g, so, e);
  }
};

//! Every state byte (codes or values, absmax, master weights), the step count and the lr of two
//! host optimizers of the same layout are equal.
template <class O>
void check_same_state(O const& a, O const& b) {
  REQUIRE(a.size() == b.size());
  CHECK(a.step_count() == b.step_count());
  CHECK(a.last_lr() == b.last_lr());
  for (std::size_t i = 0; i < a.size(); ++i) {
    auto const& x = a.params()[i];
    auto const& y = b.params()[i];
    INFO("tensor ", i, " of size ", x.param.size());
    for (std::size_t k = 0; k < x.data.size(); ++k) {
      INFO("state ", k);
      REQUIRE(x.data[k].size() == y.data[k].size());
      CHECK(std::memcmp(x.data[k].data(), y.data[k].data(), x.data[k].size_bytes()) == 0);
      REQUIRE(x.scale[k].size() == y.scale[k].size());
      CHECK(std::memcmp(x.scale[k].data(), y.scale[k].data(), x.scale[k].size_bytes()) == 0);
    }
    REQUIRE(x.master.size() == y.master.size());
    CHECK(std::memcmp(x.master.data(), y.master.data(), x.master.size_bytes()) == 0);
  }
}

#if QMEM_HAS_CUDA()

//! True (with a visible SKIPPED line) when there is no GPU: the GPU case returns.
inline bool skip_without_gpu() { return skip<cuda_backend>(); }

//! A cudaMalloc'd copy of `v` (at least one byte); the caller frees it.
template <class T>
T* to_device(std::vector<T> const& v) {
  T* d = nullptr;
  cuda_detail::check(cudaMalloc(&d, v.empty() ? 1 : v.size() * sizeof(T)), "cudaMalloc");
  if (!v.empty())
    cuda_detail::check(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice),
                       "cudaMemcpy H2D");
  return d;
}

//! `n` values at device pointer `d`, after all device work.
template <class T>
std::vector<T> to_host(T const* d, std::size_t n) {
  std::vector<T> v(n);
  cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  if (n != 0)
    cuda_detail::check(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost),
                       "cudaMemcpy D2H");
  return v;
}

//! Whether `a` holds exactly the `n` values at host pointer `b`, bit for bit.
template <class T>
bool same_bits(std::vector<T> const& a, T const* b, std::size_t n) {
  return a.size() == n && (n == 0 || std::memcmp(a.data(), b, n * sizeof(T)) == 0);
}

//! A plain cudaMalloc'd array (no qmem resource involved), freed on destruction.
template <class T>
struct device_vector {
  T* ptr = nullptr;
  std::size_t n = 0;
  explicit device_vector(std::vector<T> const& v) : ptr(to_device(v)), n(v.size()) {
    cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
  device_vector(device_vector const&) = delete;
  device_vector& operator=(device_vector const&) = delete;
  ~device_vector() { (void)cudaFree(ptr); }
  void upload(std::vector<T> const& v) {
    REQUIRE(v.size() == n);
    if (n != 0)
      cuda_detail::check(cudaMemcpy(ptr, v.data(), n * sizeof(T), cudaMemcpyHostToDevice),
                         "cudaMemcpy H2D");
    // a pageable upload may still be in flight when cudaMemcpy returns: the steps run on other
    // (non-blocking) streams, so wait for it
    cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
  std::vector<T> download() const { return to_host(ptr, n); }
};

//! The device side of a problem: parameters and gradients in cudaMalloc'd memory.
template <class P, class G>
struct device_tensors {
  std::vector<std::unique_ptr<device_vector<P>>> p;
  std::vector<std::unique_ptr<device_vector<G>>> g;
  explicit device_tensors(problem<P, G> const& pr) {
    for (std::size_t i = 0; i < pr.sizes.size(); ++i) {
      p.push_back(std::make_unique<device_vector<P>>(pr.params[i]));
      g.push_back(std::make_unique<device_vector<G>>(pr.grads[0][i]));
    }
  }
  std::vector<tensor_view<P>> param_views() const {
    std::vector<tensor_view<P>> v;
    for (auto const& x : p)
      v.emplace_back(x->ptr, x->n, memory_space::device);
    return v;
  }
  std::vector<tensor_view<G const>> grad_views() const {
    std::vector<tensor_view<G const>> v;
    for (auto const& x : g)
      v.emplace_back(x->ptr, x->n, memory_space::device);
    return v;
  }
  void set_grads(std::vector<std::vector<G>> const& gs) {
    for (std::size_t i = 0; i < gs.size(); ++i)
      g[i]->upload(gs[i]);
  }
};

//! A problem's parameters and gradients in managed memory from `managed`, the parameters added to
//! `opt` (an optimizer whose state is managed too): what optim::cuda::optimizer_step steps.
template <class P, class G = P>
struct managed_tensors {
  std::vector<memory::buffer<P>> p;
  std::vector<memory::buffer<G>> g;
  std::vector<tensor_view<G const>> grads; //!< views of `g`, for optimizer_step

  template <class Optimizer>
  managed_tensors(problem<P, G> const& pr, Optimizer& opt, memory::resource& managed) {
    for (std::size_t i = 0; i < pr.sizes.size(); ++i) {
      std::size_t const n = pr.sizes[i];
      p.emplace_back(n, managed, memory::category::weights);
      g.emplace_back(n, managed, memory::category::gradients);
      std::copy(pr.params[i].begin(), pr.params[i].end(), p.back().data());
      opt.add_param(tensor_view<P>(p.back().data(), n, memory_space::managed));
      grads.emplace_back(g.back().data(), n, memory_space::managed);
    }
  }
  //! Writes one step's gradients (waits for the device first: a step may still read them).
  void set_grads(std::vector<std::vector<G>> const& gs) {
    cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    for (std::size_t i = 0; i < gs.size(); ++i)
      std::copy(gs[i].begin(), gs[i].end(), g[i].data());
  }
  //! Checks every parameter against `expected`, bit for bit (after all device work).
  void check_params(std::vector<std::vector<P>> const& expected) const {
    cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    for (std::size_t i = 0; i < p.size(); ++i) {
      INFO("tensor ", i, " of size ", p[i].size());
      CHECK(same_bits(expected[i], p[i].data(), p[i].size()));
    }
  }
};

#endif // QMEM_HAS_CUDA()

} // namespace qmem::test
