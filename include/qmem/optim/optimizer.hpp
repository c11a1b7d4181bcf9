#pragma once
//! \file
//! The optimizer: binds an update rule, a state policy and any number of parameter tensors of
//! any sizes, and steps them on the host (threaded; the CUDA step lives in optim/cuda/).
//!
//!     qmem::optim::optimizer<qmem::optim::adamw, qmem::optim::int8_state> opt(
//!         qmem::optim::adamw{.weight_decay = 0.01f}, {.lr =
//!         qmem::optim::lr_schedule::constant(1e-3f)});
//!     opt.add_param(qmem::view(weights));             // state allocated here, zeroed
//!     opt.step(qmem::exec::host{}, {qmem::view(std::as_const(grads))});
//!
//! Per parameter: a copy of the rule with other hyper-parameters, an lr multiplier, and fp32
//! state whatever the policy (`param_options`). Tensors below `min_quantized_size` elements keep
//! fp32 state (bitsandbytes' min_8bit_size). The step count and the current lr live in a small
//! buffer from the optimizer's memory resource (device memory for a CUDA optimizer, so a step is
//! graph-capturable there).
//!
//! One step, in order: found_inf -> skip. One pass over all gradients: the global norm and
//! whether any element is non-finite (skipped when neither clipping nor a non-finite policy other
//! than skip_element needs it). Non-finite: raise (throws, nothing written), skip_step (returns
//! applied = false, nothing written, the step is not counted). The gradient scale = unscale x
//! global-norm clip x percentile clip. Then per tensor: the rule's reduction pass (LAMB, LARS),
//! the update-norm pass (max_unorm), and the update pass (rule.hpp describes it per block).

#include <qmem/core/config.hpp>
#include <qmem/core/detail/parallel.hpp>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/memory/resource.hpp>
#include <qmem/optim/detail/grad_norm.hpp>
#include <qmem/optim/detail/host_simd.hpp>
#include <qmem/optim/detail/tensor_sum.hpp>
#include <qmem/optim/detail/validate.hpp>
#include <qmem/optim/rule.hpp>
#include <qmem/optim/rules.hpp>
#include <qmem/optim/schedule.hpp>
#include <qmem/optim/state.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace qmem::optim {

//! Step count and learning rate of the last step, where the backend can read them (device memory
//! for a CUDA optimizer).
struct step_counter {
  std::int32_t step = 0;
  float lr = 0.0f;
};

namespace detail {

template <int N, class F>
constexpr void for_each_state(F&& f) {
  [&]<int... K>(std::integer_sequence<int, K...>) { (f(std::integral_constant<int, K>{}), ...); }
  (std::make_integer_sequence<int, N>{});
}

//! Least common multiple (std::lcm is not usable in constant expressions under nvcc's front end).
constexpr std::size_t lcm_of(std::size_t a, std::size_t b) noexcept {
  std::size_t x = a, y = b;
  while (y != 0) {
    std::size_t const t = x % y;
    x = y;
    y = t;
  }
  return a / x * b;
}

//! Prefetches the cache lines of [p, p + bytes) into the caches (a hint; nothing is read).
inline void prefetch_bytes(void const* p, std::size_t bytes) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  auto const* c = static_cast<char const*>(p);
  for (std::size_t o = 0; o < bytes; o += 64)
    __builtin_prefetch(c + o, 0, 3);
#else
  (void)p;
  (void)bytes;
#endif
}

//! The host's encoder for blockwise format F: the search table (quant/detail/search_table.hpp)
//! for the code types proven equal to it, otherwise `Code::encode`; and the code's values (every
//! code decoded), for the vector decode and the sign fix.
template <class F>
struct host_encoder {
  using code_type = typename F::code;
  quant::detail::search_table const* table = table_of();
  float const* values = values_of();
  //! The sign fix's test on codes: the codes whose values carry the sign bit are those below
  //! this; -1 when F has no sign fix. (A code table without that property gets no table.)
  int negative_below = negative_below_of();

  //! The entries of the block table (see block_table()), or nullptr where there is none.
  std::uint32_t const* block_entries = block_entries_of();
  //! The code's values as byte planes (8-bit codes: detail::decode8_vbmi).
  byte_planes const* planes = planes_of();
  //! The block table's steps as thresholds (4-bit codes: detail::block_codes4_search), or
  //! nullptr where they do not fit or the CPU cannot run that kernel.
  step_search4 const* steps4 = steps4_of();
  //! The entries of the block table with its buckets moved (8-bit codes:
  //! detail::block_codes8_recip), or nullptr where it cannot serve or the CPU cannot run that
  //! kernel.
  std::uint32_t const* recip8 = recip8_of();

  //! code_type::encode(xn), exactly.
  QMEM_INLINE std::uint8_t code(float xn) const noexcept {
    return table != nullptr ? table->encode(xn) : code_type::encode(xn, code_type::book);
  }
  static quant::detail::search_table const* table_of() {
    if constexpr (quant::detail::search_table_proven_v<code_type>) {
      auto const& t = quant::detail::search_table_of<code_type>();
      return t.exact() && negative_below_of() != -2 ? &t : nullptr;
    } else {
      return nullptr;
    }
  }
  //! The block table: the search table of the whole element encoder of F in a block whose
  //! absmax is positive and finite, xn -> F::fix_sign(code_type::encode(xn), xn), with which the
  //! SIMD kernels (optim/detail/host_simd.hpp, block_encode8 / block_encode16) need no NaN
  //! select and no sign fix. There xn = s / absmax has the sign bit of s, and xn > 0 unless s > 0
  //! underflows to +0, which gets the same fix when the code of +0 has a value without the sign
  //! bit (checked here). The kernels also need the first bucket of each sign to hold no step
  //! (checked). For a format without a sign fix this is the code's own search table. nullptr
  //! when a check fails or the code has no proven search table. Equal to the encoder for every
  //! non-NaN float (tests/optim/host_simd_test.cpp; all 2^32 with QMEM_EXHAUSTIVE=1).
  static quant::detail::search_table const* block_table() {
    if constexpr (quant::detail::search_table_proven_v<code_type>) {
      static quant::detail::search_table const* const t =
          []() -> quant::detail::search_table const* {
        if (table_of() == nullptr)
          return nullptr;
        quant::detail::search_table const* bt = table_of();
        if constexpr (F::sign_fix) {
          static quant::detail::search_table const fixed([](float xn) -> std::uint8_t {
            return F::fix_sign(code_type::encode(xn, code_type::book), xn);
          });
          bt = &fixed;
        }
        using quant::detail::search_table;
        std::uint8_t const zero_code = code_type::encode(0.0f, code_type::book);
        bool const ok = bt->exact() && (bt->entries()[0] >> 16) == 0xffffu &&
                        (bt->entries()[search_table::buckets] >> 16) == 0xffffu &&
                        !std::signbit(code_type::decode(zero_code, code_type::book));
        return ok ? bt : nullptr;
      }();
      return t;
    } else {
      return nullptr;
    }
  }
  static std::uint32_t const* block_entries_of() {
    auto const* t = block_table();
    return t != nullptr ? t->entries() : nullptr;
  }
  static int negative_below_of() {
    if constexpr (F::sign_fix) {
      static int const below = [] {
        float const* v = values_of();
        int k = 0;
        while (k < 256 && std::signbit(v[k]))
          ++k;
        for (int c = k; c < 256; ++c)
          if (std::signbit(v[c]))
            return -2; // not contiguous: no table, encode() through Code::encode
        return k;
      }();
      return below;
    } else {
      return -1;
    }
  }
  static step_search4 const* steps4_of() {
#if QMEM_OPTIM_HOST_SIMD
    if constexpr (code_type::bits == 4) {
      static step_search4 const* const p = []() -> step_search4 const* {
        if (block_entries_of() == nullptr || !host_step_search4())
          return nullptr;
        static step_search4 const s(block_entries_of());
        return s.usable() ? &s : nullptr;
      }();
      return p;
    }
#endif
    return nullptr;
  }
  //! The entries of recip_table8 built from the block table, where it is usable.
  static std::uint32_t const* recip8_of() {
#if QMEM_OPTIM_HOST_SIMD
    if constexpr (code_type::bits == 8) {
      static std::uint32_t const* const p = []() -> std::uint32_t const* {
        quant::detail::search_table const* bt = block_table();
        if (bt == nullptr || !host_step_search4())
          return nullptr;
        static recip_table8 const t(*bt);
        return t.usable() ? t.entries() : nullptr;
      }();
      return p;
    }
#endif
    return nullptr;
  }
  static byte_planes const* planes_of() {
    static byte_planes const p(values_of());
    return &p;
  }
  static float const* values_of() {
    static std::array<float, 256> const v = [] {
      std::array<float, 256> a{};
      for (unsigned c = 0; c < (1u << code_type::bits); ++c)
        a[c] = code_type::decode(static_cast<std::uint8_t>(c), code_type::book);
      return a;
    }();
    return v.data();
  }
};

template <class F>
struct host_encoder_of {
  struct none {};
  using type = none;
};
template <class F>
requires F::blockwise struct host_encoder_of<F> {
  using type = host_encoder<F>;
};

} // namespace detail
} // namespace qmem::optim

namespace qmem::quant::detail {
//! The 4-bit optimizer maps are served by the search table too (proven over every float by
//! tests/optim/host_simd_test.cpp with QMEM_EXHAUSTIVE=1).
template <auto const& Table>
inline constexpr bool search_table_proven_v<optim::nearest4_code<Table>> = true;
} // namespace qmem::quant::detail

namespace qmem::optim {

//! The optimizer for rule `Rule`, state policy `Policy` and parameters of element type `Param`
//! (float, bf16 or f16). Gradients may be float, bf16 or f16. Not copyable; movable.
template <update_rule Rule, state_policy Policy = int8_state, float_element Param = float>
requires(!std::same_as<Param, double>) class optimizer {
public:
  using rule_type = Rule;
  using policy_type = Policy;
  using param_type = Param;
  static constexpr int state_count = Rule::state_count;
  //! The format of state K under policy P.
  template <class P, int K>
  using format_of = typename P::template format<Rule::state_signs[static_cast<std::size_t>(K)]>;

  //! Per-parameter overrides.
  struct param_options {
    std::optional<Rule> rule; //!< other hyper-parameters for this tensor (betas, weight decay...)
    float lr_scale = 1.0f;    //!< this tensor's lr = schedule(t) * lr_scale
    bool fp32_state = false;  //!< keep fp32 state whatever the policy (e.g. embeddings)
  };

  //! One parameter tensor and its state. `data[k]` holds state k (fp32 values, or the format's
  //! codes), `scale[k]` its block absmax (blockwise formats).
  struct param_state {
    tensor_view<Param> param;
    Rule rule;
    float lr_scale = 1.0f;
    bool quantized = false; //!< true: the policy's formats; false: fp32
    std::array<memory::buffer<std::uint8_t>, static_cast<std::size_t>(state_count)> data;
    std::array<memory::buffer<float>, static_cast<std::size_t>(state_count)> scale;
    memory::buffer<float> master; //!< fp32 master weights (16-bit params with master_weights)
  };

private:
  Rule rule_;
  optimizer_options options_;
  memory::resource* resource_;
  std::vector<param_state> params_;
  memory::buffer<step_counter> counter_;
  std::vector<float> norm_history_; // percentile clipping: squared global norms, ring of 100

  template <class O>
  friend struct state_access;

  // `r`, when it hands out host-accessible memory (host code reads and writes the state)
  static memory::resource& checked_host_resource(memory::resource& r) {
    QMEM_EXPECTS(host_accessible(r.space()), "the resource hands out ", to_string(r.space()),
                 " memory; the host optimizer needs host-accessible memory (device state: "
                 "optim::cuda::device_optimizer)");
    return r;
  }
  // converted() sets the percentile history of an optimizer of another policy
  template <update_rule R, state_policy P, float_element Q>
  requires(!std::same_as<Q, double>) friend class optimizer;

public:
  //! An optimizer with default hyper-parameters `rule` and `options`; state is allocated from
  //! `r` (host-accessible memory). Throws bad_argument for a resource of device memory, an lr < 0 or not finite,
  //! a percentile outside [1, 100], negative clipping thresholds, stochastic rounding of f16
  //! parameters, or a rule whose validate() refuses its hyper-parameters (validated_rule).
  explicit optimizer(Rule rule = {}, optimizer_options options = {},
                     memory::resource& r = memory::default_host_resource())
      : rule_(rule), options_(options), resource_(&checked_host_resource(r)),
        counter_(1, r, memory::category::optimizer_state) {
    detail::check_optimizer_options<Param>(options);
    detail::check_rule(rule);
    counter_[0] = step_counter{};
  }

  optimizer(optimizer&&) noexcept = default;
  optimizer& operator=(optimizer&&) noexcept = default;

  //! Adds a parameter tensor (host-accessible, non-null when non-empty, sharing no memory with a
  //! parameter already added) and allocates its state, zeroed (bitsandbytes' initial codes and
  //! absmax). Returns its index, the position of its gradient in step(). Throws bad_argument for
  //! a bad or overlapping view, lr_scale < 0 or not finite, or an `o.rule` whose validate() refuses it.
  std::size_t add_param(tensor_view<Param> param, param_options o = {}) {
    check_view(param, "add_param", "param", true, false);
    check_new_param(params_, param, o);
    param_state ps = make_param_state(param, o, rule_, options_, *resource_,
                                      [](void* p, std::size_t bytes) { std::memset(p, 0, bytes); });
    for (std::size_t i = 0; i < ps.master.size(); ++i)
      ps.master[i] = to_float(param[i]);
    params_.push_back(std::move(ps));
    return params_.size() - 1;
  }

  //! The checks add_param runs on a new parameter here and in the CUDA optimizer
  //! (optim/cuda/device_optimizer.cuh), after each has checked the view and its memory space:
  //! o.lr_scale finite and >= 0, o.rule (if any) within its ranges, and no memory shared with a parameter
  //! already `added` (each element is updated once per step). Throws bad_argument.
  static void check_new_param(std::span<param_state const> added, tensor_view<Param> param,
                              param_options const& o) {
    detail::check_lr_scale(o.lr_scale);
    if (o.rule)
      detail::check_rule(*o.rule);
    for (std::size_t i = 0; i < added.size(); ++i)
      QMEM_EXPECTS(!qmem::detail::overlapping(param, added[i].param),
                   "add_param: param overlaps parameter ", i,
                   " (each element is updated once per step: add shared storage once)");
  }

  //! The state of a new parameter, as add_param sets it up here and the CUDA optimizer
  //! (optim/cuda/device_optimizer.cuh) on the device: the rule `o.rule` or `rule`, o's lr scale,
  //! the policy's formats unless `o.fp32_state` or the parameter has fewer than
  //! options.min_quantized_size elements (then fp32 state), one buffer of codes or values and
  //! one of block absmax per state, and fp32 master weights for 16-bit parameters when
  //! options.master_weights (not filled: the caller widens the parameters in its memory space).
  //! Every buffer comes from `r`; `zero(pointer, bytes)` clears each non-empty state and absmax
  //! buffer (bitsandbytes' initial codes and absmax). Preconditions: those of add_param, checked
  //! by the caller.
  template <class Zero>
  [[nodiscard]] static param_state
  make_param_state(tensor_view<Param> param, param_options const& o, Rule const& rule,
                   optimizer_options const& options, memory::resource& r, Zero&& zero) {
    param_state ps;
    ps.param = param;
    ps.rule = o.rule.value_or(rule);
    ps.lr_scale = o.lr_scale;
    ps.quantized = !o.fp32_state && param.size() >= options.min_quantized_size;
    std::size_t const n = param.size();
    auto alloc = [&]<class P>() {
      detail::for_each_state<state_count>([&](auto K) {
        using F = format_of<P, K.value>;
        auto& data = ps.data[static_cast<std::size_t>(K.value)];
        auto& scale = ps.scale[static_cast<std::size_t>(K.value)];
        data = memory::buffer<std::uint8_t>(F::bytes(n), r, memory::category::optimizer_state);
        scale = memory::buffer<float>(F::scale_count(n), r, memory::category::optimizer_state);
        if (data.size_bytes() != 0)
          zero(static_cast<void*>(data.data()), data.size_bytes());
        if (scale.size_bytes() != 0)
          zero(static_cast<void*>(scale.data()), scale.size_bytes());
      });
    };
    if (ps.quantized)
      alloc.template operator()<Policy>();
    else
      alloc.template operator()<fp32_state>();
    if (options.master_weights && !std::same_as<Param, float> && n != 0)
      ps.master = memory::buffer<float>(n, r, memory::category::weights);
    return ps;
  }

  //! Number of parameter tensors.
  [[nodiscard]] std::size_t size() const noexcept { return params_.size(); }
  //! The parameter tensors and their state (read-only).
  [[nodiscard]] std::span<param_state const> params() const noexcept { return params_; }
  //! Steps taken (skipped steps do not count).
  [[nodiscard]] std::int32_t step_count() const noexcept { return counter_[0].step; }
  //! The lr of the last step.
  [[nodiscard]] float last_lr() const noexcept { return counter_[0].lr; }
  [[nodiscard]] Rule const& rule() const noexcept { return rule_; }
  [[nodiscard]] optimizer_options const& options() const noexcept { return options_; }
  [[nodiscard]] memory::resource& resource() const noexcept { return *resource_; }
  //! Bytes of optimizer state (codes, scales, step counter; not master weights).
  [[nodiscard]] std::size_t state_bytes() const noexcept {
    std::size_t b = counter_.size_bytes();
    for (auto const& p : params_)
      for (int k = 0; k < state_count; ++k)
        b += p.data[static_cast<std::size_t>(k)].size_bytes() +
             p.scale[static_cast<std::size_t>(k)].size_bytes();
    return b;
  }

  //! State k of parameter i decoded to fp32 (for tests, inspection and conversion).
  [[nodiscard]] std::vector<float> state_values_of(std::size_t i, int k) const {
    QMEM_EXPECTS(i < params_.size(), "parameter index ", i, " is not below ", params_.size());
    QMEM_EXPECTS(k >= 0 && k < state_count, "state index ", k, " is outside [0, ", state_count,
                 ")");
    auto const& ps = params_[i];
    std::vector<float> out(ps.param.size());
    auto dec = [&]<class P>() {
      detail::for_each_state<state_count>([&](auto K) {
        if (K.value != k)
          return;
        using F = format_of<P, K.value>;
        auto const r = make_ref<F>(const_cast<param_state&>(ps), K.value);
        for (std::size_t j = 0; j < out.size(); ++j)
          out[j] = F::load(r, j);
      });
    };
    if (ps.quantized)
      dec.template operator()<Policy>();
    else
      dec.template operator()<fp32_state>();
    return out;
  }

  //! One optimizer step on the host. `grads[i]` is the gradient of parameter i (same size,
  //! host-accessible). Preconditions (bad_argument before anything is written): one gradient per
  //! parameter, sizes equal, views valid, step_count() below 2^31 - 1. With nonfinite_policy::raise, a non-finite gradient
  //! throws qmem::error before anything is written.
  //! Bytes moved per element (update pass): param read+write, grad read, each state read+write
  //! (plus a gradient read for the norm pass when clipping or a non-finite check is on).
  template <float_element G>
  requires(!std::same_as<G, double>) step_result
      step(exec::host const& e, std::span<tensor_view<G const> const> grads, step_options so = {}) {
    QMEM_EXPECTS(grads.size() == params_.size(), "got ", grads.size(), " gradients for ",
                 params_.size(), " parameters");
    for (std::size_t i = 0; i < grads.size(); ++i) {
      QMEM_EXPECTS(grads[i].size() == params_[i].param.size(), "gradient ", i, " has ",
                   grads[i].size(), " elements; its parameter has ", params_[i].param.size());
      check_view(grads[i], "step", "grad", true, false);
    }
    QMEM_EXPECTS(std::isfinite(so.grad_unscale) && so.grad_unscale >= 0.0f, "grad_unscale is ",
                 so.grad_unscale, "; expected a finite value >= 0");
    QMEM_EXPECTS(counter_[0].step < std::numeric_limits<std::int32_t>::max(), "the step count is ",
                 counter_[0].step, ", the largest an int32 holds; no further step can be counted");
    step_result res;
    if (so.found_inf)
      return res;
    float grad_scale = so.grad_unscale;
    bool const need_norm = options_.max_grad_norm > 0.0f || options_.percentile < 100 ||
                           options_.nonfinite != nonfinite_policy::skip_element;
    if (need_norm) {
      bool const with_norm = options_.max_grad_norm > 0.0f || options_.percentile < 100;
      auto const [sumsq, finite] = grad_norm_pass(e, grads, with_norm);
      if (!finite) {
        if (options_.nonfinite == nonfinite_policy::raise)
          qmem::detail::raise<error>("step: a gradient holds a non-finite value (nonfinite_policy::"
                                     "raise); nothing was updated");
        if (options_.nonfinite == nonfinite_policy::skip_step)
          return res;
      }
      double const norm = std::sqrt(sumsq) * static_cast<double>(so.grad_unscale);
      res.grad_norm = static_cast<float>(norm);
      if (options_.max_grad_norm > 0.0f && norm > options_.max_grad_norm)
        grad_scale = static_cast<float>(grad_scale * (options_.max_grad_norm / (norm + 1e-6)));
      if (options_.percentile < 100) {
        std::int32_t const t = counter_[0].step + 1;
        // a fresh run reads only the entries it wrote (the first min(t, 100)); past step 1 an
        // empty history means the earlier norms are unknown (set_step): +inf never sets the clip,
        // where zeros would make it 0 and scale the gradients to 0
        if (norm_history_.empty())
          norm_history_.assign(100, t == 1 ? 0.0f : std::numeric_limits<float>::infinity());
        norm_history_[static_cast<std::size_t>((t - 1) % 100)] = static_cast<float>(norm * norm);
        std::size_t const seen = static_cast<std::size_t>(std::min<std::int32_t>(t, 100));
        std::vector<float> sorted(norm_history_.begin(),
                                  norm_history_.begin() + static_cast<std::ptrdiff_t>(seen));
        if (seen == 100)
          sorted.assign(norm_history_.begin(), norm_history_.end());
        std::sort(sorted.begin(), sorted.end());
        std::size_t const idx =
            std::min(seen - 1, static_cast<std::size_t>(options_.percentile) * seen / 100);
        double const clip = std::sqrt(static_cast<double>(sorted[idx]));
        if (norm > clip && norm > 0.0)
          grad_scale = static_cast<float>(grad_scale * (clip / norm));
      }
    }
    res.grad_scale = grad_scale;
    std::int32_t const t = counter_[0].step + 1;
    float const lr = options_.lr(t);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto& ps = params_[i];
      step_info const si{lr * ps.lr_scale, t, grad_scale};
      if (ps.quantized)
        update_tensor<Policy>(e, ps, grads[i], si);
      else
        update_tensor<fp32_state>(e, ps, grads[i], si);
    }
    counter_[0] = step_counter{t, lr};
    res.applied = true;
    return res;
  }

  //! step() over a vector of gradient views.
  template <float_element G>
  requires(!std::same_as<G, double>) step_result
      step(exec::host const& e, std::vector<tensor_view<G const>> const& grads,
           step_options so = {}) {
    return step(e, std::span<tensor_view<G const> const>(grads), so);
  }

  //! step() over a braced list of gradient views: `opt.step(exec::host{}, {view(g0), view(g1)})`.
  template <float_element G>
  requires(!std::same_as<G, double>) step_result
      step(exec::host const& e, std::initializer_list<tensor_view<G const>> grads,
           step_options so = {}) {
    return step(e, std::span<tensor_view<G const> const>(grads.begin(), grads.size()), so);
  }

  //! An optimizer with state policy `To` holding this one's state re-encoded (for example fp32
  //! -> 8-bit): same parameters, rule, options, step count, percentile-clipping history and
  //! master weights. Explicit, never implicit. Tensors below min_quantized_size (or marked
  //! fp32_state) stay fp32.
  template <state_policy To>
  [[nodiscard]] optimizer<Rule, To, Param>
  converted(memory::resource& r = memory::default_host_resource()) const {
    optimizer<Rule, To, Param> out(rule_, options_, r);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto const& ps = params_[i];
      typename optimizer<Rule, To, Param>::param_options o;
      o.rule = ps.rule;
      o.lr_scale = ps.lr_scale;
      o.fp32_state = !ps.quantized;
      out.add_param(ps.param, o);
      std::vector<std::vector<float>> values;
      for (int k = 0; k < state_count; ++k)
        values.push_back(state_values_of(i, k));
      out.set_state_values(i, values);
      if (!ps.master.empty())
        std::copy_n(ps.master.data(), ps.master.size(), out.master_data(i));
    }
    out.set_step(step_count(), last_lr());
    out.norm_history_ = norm_history_; // percentile clipping continues from the same history
    return out;
  }

  //! Sets the states of parameter i from fp32 values (encoded with this optimizer's format:
  //! blockwise formats take each block's absmax). Precondition: state_count vectors of the
  //! parameter's size.
  void set_state_values(std::size_t i, std::vector<std::vector<float>> const& values) {
    QMEM_EXPECTS(i < params_.size(), "parameter index ", i, " is not below ", params_.size());
    QMEM_EXPECTS(values.size() == static_cast<std::size_t>(state_count), "got ", values.size(),
                 " states; the rule has ", state_count);
    for (auto const& v : values)
      QMEM_EXPECTS(v.size() == params_[i].param.size(), "a state has ", v.size(),
                   " values; the parameter has ", params_[i].param.size());
    auto& ps = params_[i];
    auto enc = [&]<class P>() {
      detail::for_each_state<state_count>([&](auto K) {
        using F = format_of<P, K.value>;
        auto const r = make_ref<F>(ps, K.value);
        auto const& v = values[static_cast<std::size_t>(K.value)];
        store_state<F>(r, v.data(), 0, v.size(), 0, K.value);
      });
    };
    if (ps.quantized)
      enc.template operator()<Policy>();
    else
      enc.template operator()<fp32_state>();
  }

  //! Sets the step count and the last lr (resume, conversion). The percentile-clipping history
  //! is kept; when it is empty at step > 0, the next step counts the earlier norms as unknown
  //! (+inf: no clip until measured norms reach the percentile's rank; docs/optim.md).
  void set_step(std::int32_t step, float lr) {
    QMEM_EXPECTS(step >= 0, "step is ", step, "; expected >= 0");
    counter_[0] = step_counter{step, lr};
  }

  //! The fp32 master weights of parameter i (nullptr when it has none). Precondition
  //! (bad_argument): i < size().
  [[nodiscard]] float* master_data(std::size_t i) {
    QMEM_EXPECTS(i < params_.size(), "parameter index ", i, " is not below ", params_.size());
    return params_[i].master.empty() ? nullptr : params_[i].master.data();
  }

private:
  template <class F>
  static typename F::ref make_ref(param_state& ps, int k) noexcept {
    auto const kk = static_cast<std::size_t>(k);
    if constexpr (F::blockwise)
      return {ps.data[kk].data(), ps.scale[kk].data()};
    else
      return {reinterpret_cast<typename F::element*>(ps.data[kk].data())};
  }

  //! The rule over elements [0, m) of a chunk, in registers; SkipBad keeps the old values of
  //! elements with a non-finite gradient, Scaled applies the max_unorm factor. Separate
  //! instantiations keep the loops free of branches (they vectorize). SkipBad updates every
  //! element and then restores the skipped ones from a copy (a select per element): written as
  //! one loop with the select inside, g++ 12 kept it scalar (2x slower for AdamW 8-bit).
  template <std::size_t Chunk, bool SkipBad, bool Scaled>
  QMEM_INLINE static void
  update_elements(std::size_t m, float* QMEM_RESTRICT p, float const* QMEM_RESTRICT g,
                  float (*QMEM_RESTRICT s)[Chunk], typename Rule::scalars const& k,
                  float update_scale) noexcept {
    constexpr int N = state_count;
    if constexpr (SkipBad) {
      std::int32_t exponents = 0; // a chunk without non-finite gradients needs no restore
      for (std::size_t i = 0; i < m; ++i) {
        auto const x = static_cast<std::int32_t>(qmem::detail::float_to_bits(g[i]) & 0x7f800000u);
        exponents = x > exponents ? x : exponents;
      }
      if (exponents != 0x7f800000) {
        update_elements<Chunk, false, Scaled>(m, p, g, s, k, update_scale);
        return;
      }
      float p0[Chunk];
      float s0[N > 0 ? N : 1][Chunk];
      std::copy_n(p, m, p0);
      for (int q = 0; q < N; ++q)
        std::copy_n(s[q], m, s0[q]);
      update_elements<Chunk, false, Scaled>(m, p, g, s, k, update_scale);
      for (std::size_t i = 0; i < m; ++i) {
        bool const ok = detail::fmath::is_finite(g[i]);
        p[i] = ok ? p[i] : p0[i];
        for (int q = 0; q < N; ++q)
          s[q][i] = ok ? s[q][i] : s0[q][i];
      }
    } else {
      for (std::size_t i = 0; i < m; ++i) {
        state_values<N> sv;
        for (int q = 0; q < N; ++q)
          sv[q] = s[q][i];
        float pi = p[i];
        Rule::update(pi, g[i], sv, k);
        if constexpr (Scaled)
          pi = detail::fmath::add(p[i],
                                  detail::fmath::mul(update_scale, detail::fmath::sub(pi, p[i])));
        p[i] = pi;
        for (int q = 0; q < N; ++q)
          s[q][i] = sv[q];
      }
    }
  }

  //! update_elements with its variant (skip_bad, update_scale) chosen at run time; inlined into
  //! each ISA's clone below.
  template <std::size_t Chunk>
  QMEM_INLINE static void update_variant(bool skip_bad, float update_scale, std::size_t m,
                                         float* QMEM_RESTRICT p, float const* QMEM_RESTRICT g,
                                         float (*QMEM_RESTRICT s)[Chunk],
                                         typename Rule::scalars const& k) noexcept {
    if (skip_bad)
      update_scale != 1.0f ? update_elements<Chunk, true, true>(m, p, g, s, k, update_scale)
                           : update_elements<Chunk, true, false>(m, p, g, s, k, 1.0f);
    else
      update_scale != 1.0f ? update_elements<Chunk, false, true>(m, p, g, s, k, update_scale)
                           : update_elements<Chunk, false, false>(m, p, g, s, k, 1.0f);
  }

  //! update_variant with the ISA chosen at run time: the same loop compiled for AVX2 (8 lanes)
  //! or AVX-512F (16 lanes), the same IEEE operations (no FMA).
  template <std::size_t Chunk>
  static void update_chunk(detail::host_isa isa, bool skip_bad, float update_scale, std::size_t m,
                           float* QMEM_RESTRICT p, float const* QMEM_RESTRICT g,
                           float (*QMEM_RESTRICT s)[Chunk],
                           typename Rule::scalars const& k) noexcept {
#if QMEM_OPTIM_HOST_SIMD
    if (isa == detail::host_isa::avx512) {
      update_chunk_avx512<Chunk>(skip_bad, update_scale, m, p, g, s, k);
      return;
    }
    if (isa >= detail::host_isa::avx2) {
      update_chunk_avx2<Chunk>(skip_bad, update_scale, m, p, g, s, k);
      return;
    }
#else
    (void)isa;
#endif
    update_variant<Chunk>(skip_bad, update_scale, m, p, g, s, k);
  }

#if QMEM_OPTIM_HOST_SIMD
  template <std::size_t Chunk>
  __attribute__((target("avx2"))) static void
  update_chunk_avx2(bool skip_bad, float update_scale, std::size_t m, float* QMEM_RESTRICT p,
                    float const* QMEM_RESTRICT g, float (*QMEM_RESTRICT s)[Chunk],
                    typename Rule::scalars const& k) noexcept {
    update_variant<Chunk>(skip_bad, update_scale, m, p, g, s, k);
  }
  // AVX-512F with 512-bit vectors preferred: with masks g++ vectorizes Lion's sign() selects,
  // which stay scalar on AVX2 (Lion 8-bit 7.0 -> 1.2 ns/param, thread CPU time, dev box).
  // fp-contract=off: under avx512f g++ 12 contracts a * b + c into FMAs (659 in a test binary),
  // which would change the bits. (clang contracts only within one source expression: the rules'
  // one-rounding fmath calls never form one.)
  template <std::size_t Chunk>
#if defined(__clang__)
  __attribute__((target("avx512f")))
#else
  __attribute__((target("avx512f,prefer-vector-width=512"), optimize("fp-contract=off")))
#endif
  static void
  update_chunk_avx512(bool skip_bad, float update_scale, std::size_t m, float* QMEM_RESTRICT p,
                      float const* QMEM_RESTRICT g, float (*QMEM_RESTRICT s)[Chunk],
                      typename Rule::scalars const& k) noexcept {
    update_variant<Chunk>(skip_bad, update_scale, m, p, g, s, k);
  }

  //! A block of 4-bit or 8-bit states waiting to be encoded (update_encode): per state its
  //! updated values, its encoder's tables (4-bit: the thresholds' source; 8-bit: the moved and
  //! the plain block table) and where its codes and absmax go.
  struct pending_block {
    float const* values[state_count > 0 ? state_count : 1];
    detail::step_search4 const* steps[state_count > 0 ? state_count : 1];
    std::uint32_t const* recip[state_count > 0 ? state_count : 1];
    std::uint32_t const* entries[state_count > 0 ? state_count : 1];
    std::uint8_t* codes[state_count > 0 ? state_count : 1];
    float* absmax[state_count > 0 ? state_count : 1];
  };

  //! update_encode's loop, one variant of the rule: per 64 elements the rule, then the codes of
  //! 64 values of each state of the block before. The rule's scalars come by value and the
  //! blocks' pointers as local arrays: read through references, g++ 12 reloaded and
  //! re-broadcast the scalars (AdamW: 9 loads and 9 broadcasts) and reloaded the pointers every
  //! 64 elements, the code stores possibly aliasing them.
  template <std::size_t Chunk, bool SkipBad, bool Scaled, class Block>
#if defined(__clang__)
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vbmi"), always_inline))
#else
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vbmi,prefer-vector-width=512"),
                 optimize("fp-contract=off"), always_inline))
#endif
  static inline void
  update_encode_loop(std::size_t bs, float* QMEM_RESTRICT p, float const* QMEM_RESTRICT g,
                     float* s0, typename Rule::scalars const k, float update_scale,
                     Block const (&blocks)[state_count > 0 ? state_count : 1],
                     float const* const (&values)[state_count > 0 ? state_count : 1],
                     std::uint8_t* const (&codes)[state_count > 0 ? state_count : 1]) noexcept {
    constexpr int Bits = std::same_as<Block, detail::search4_block> ? 4 : 8;
    for (std::size_t i = 0; i < bs; i += 64) {
      // the chunk's state rows from element i on (row q at s0 + q Chunk + i)
      update_elements<Chunk, SkipBad, Scaled>(
          64, p + i, g + i, reinterpret_cast<float(*)[Chunk]>(s0 + i), k, update_scale);
      for (int q = 0; q < state_count; ++q)
        blocks[q].codes64(values[q] + i, codes[q] + i * Bits / 8);
    }
  }

  //! The rule over the `bs` elements of one block (bs a multiple of 64), interleaved 64 elements
  //! at a time with the encoding of another block `w` of Bits-bit states (4-bit:
  //! block_codes4_search's operations; 8-bit: block_codes8_recip's). The rule's loop waits on
  //! the divider (a square root and a division per element) and the encoding, which divides
  //! nothing, on the permute port (4-bit) or the gathers' loads (8-bit), so the core runs them
  //! side by side when they come in small pieces; the same operations as update_chunk and
  //! store_state, in another order (they touch different elements): the same bits. Returns
  //! false, having written nothing, where a state of `w` has an absmax that is not positive and
  //! finite (block_table_applies) or, 8-bit, not in recip_applies' range. AVX-512 F, BW, DQ and
  //! VBMI.
  template <std::size_t Chunk, int Bits>
#if defined(__clang__)
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vbmi")))
#else
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vbmi,prefer-vector-width=512"),
                 optimize("fp-contract=off")))
#endif
  static bool
  update_encode(bool skip_bad, float update_scale, std::size_t bs, float* QMEM_RESTRICT p,
                float const* QMEM_RESTRICT g, float* s0, typename Rule::scalars const& k,
                pending_block const& w) noexcept {
    static_assert(Bits == 4 || Bits == 8);
    constexpr int N = state_count;
    float amax[N > 0 ? N : 1];
    for (int q = 0; q < N; ++q) {
      amax[q] = std::bit_cast<float>(detail::absmax_bits_512(w.values[q], bs));
      if (!detail::block_table_applies(amax[q]) || (Bits == 8 && !detail::recip_applies(amax[q])))
        return false;
    }
    using block = std::conditional_t<Bits == 4, detail::search4_block, detail::recip8_block>;
    block blocks[N > 0 ? N : 1];
    for (int q = 0; q < N; ++q) {
      *w.absmax[q] = amax[q];
      if constexpr (Bits == 4)
        blocks[q] = detail::search4_block(*w.steps[q], amax[q]);
      else
        blocks[q] = detail::recip8_block(w.recip[q], w.entries[q], amax[q]);
    }
    float const* values[N > 0 ? N : 1];
    std::uint8_t* codes[N > 0 ? N : 1];
    for (int q = 0; q < N; ++q) {
      values[q] = w.values[q];
      codes[q] = w.codes[q];
    }
    // the block's non-finite test once (SkipBad's per-64 test then only where one is there)
    bool bad = false;
    if (skip_bad) {
      std::int32_t exponents = 0;
      for (std::size_t i = 0; i < bs; ++i) {
        auto const x = static_cast<std::int32_t>(qmem::detail::float_to_bits(g[i]) & 0x7f800000u);
        exponents = x > exponents ? x : exponents;
      }
      bad = exponents == 0x7f800000;
    }
    if (bad)
      update_scale != 1.0f
          ? update_encode_loop<Chunk, true, true>(bs, p, g, s0, k, update_scale, blocks, values,
                                                  codes)
          : update_encode_loop<Chunk, true, false>(bs, p, g, s0, k, 1.0f, blocks, values, codes);
    else
      update_scale != 1.0f
          ? update_encode_loop<Chunk, false, true>(bs, p, g, s0, k, update_scale, blocks, values,
                                                   codes)
          : update_encode_loop<Chunk, false, false>(bs, p, g, s0, k, 1.0f, blocks, values, codes);
    return true;
  }
#endif

  //! One block of a chunk in the interleaved step (update_tensor; every state Bits-bit): the
  //! rule over elements [j, j + BS) of chunk b, and the encoding of the block before it (block
  //! j - BS of this chunk, or with `waiting` the previous chunk's last block, in `prev`),
  //! together by update_encode where every state's absmax lets its kernel encode it, else one
  //! after the other by update_chunk and store_state.
#if QMEM_OPTIM_HOST_SIMD
  template <class P, std::size_t Chunk, std::size_t BS, int Bits, class Refs, class Encoders>
  void update_block(std::size_t j, std::size_t b, float* p, float const* g, float (*s)[Chunk],
                    float (*prev)[Chunk], bool waiting, std::size_t waiting_first,
                    detail::host_isa isa, bool skip_bad, float update_scale,
                    typename Rule::scalars const& k, Refs const& refs, Encoders const& encoders,
                    std::int32_t step) const {
    bool const encode = j > 0 || waiting;
    float(*const src)[Chunk] = j > 0 ? s : prev;
    std::size_t const offset = j > 0 ? j - BS : Chunk - BS;
    std::size_t const first = j > 0 ? b + j - BS : waiting_first;
    if (encode) {
      pending_block w{};
      detail::for_each_state<state_count>([&](auto K) {
        auto const& r = std::get<K.value>(refs);
        auto const& enc = std::get<K.value>(encoders);
        w.values[K.value] = src[K.value] + offset;
        w.steps[K.value] = enc.steps4;
        w.recip[K.value] = enc.recip8;
        w.entries[K.value] = enc.block_entries;
        w.codes[K.value] = r.codes + first * Bits / 8;
        w.absmax[K.value] = r.absmax + first / BS;
      });
      if (update_encode<Chunk, Bits>(skip_bad, update_scale, BS, p + j, g + j, s[0] + j, k, w))
        return;
    }
    update_chunk<Chunk>(isa, skip_bad, update_scale, BS, p + j, g + j,
                        reinterpret_cast<float(*)[Chunk]>(s[0] + j), k);
    if (encode)
      detail::for_each_state<state_count>([&](auto K) {
        using F = format_of<P, K.value>;
        store_state<F>(std::get<K.value>(refs), src[K.value] + offset, first, BS, step, K.value,
                       std::get<K.value>(encoders), isa);
      });
  }
#endif

  //! Writes values v[0, count) of elements [first, first + count) of a state of format F
  //! (first and count block-aligned except at the tensor's end). Blockwise: absmax as the
  //! integer maximum of the magnitudes' bits (the same value as max |v|, vectorizes), the
  //! normalization as its own loop (vector divisions), then the table encoder; with `isa` AVX2 or
  //! AVX-512 (and a search table for the code) the block goes through the SIMD kernels
  //! (optim/detail/host_simd.hpp), the same operations 8 or 16 lanes at a time, the tail here.
  template <class F, class Enc = typename detail::host_encoder_of<F>::type>
  void store_state(typename F::ref r, float const* v, std::size_t first, std::size_t count,
                   std::int32_t t, int k, Enc const& enc = {},
                   detail::host_isa isa = detail::host_isa::portable) const {
    if constexpr (F::blockwise) {
      float xn[F::block_size];
      // codes packed by byte permutes (AVX-512 VBMI: store_block8_vbmi, store_block4_vbmi)
      [[maybe_unused]] bool const vbmi = isa == detail::host_isa::avx512 && detail::host_vbmi();
      for (std::size_t b = 0; b < count; b += F::block_size) {
        std::size_t const m = std::min<std::size_t>(F::block_size, count - b);
        float const* QMEM_RESTRICT vb = v + b;
        std::size_t done = 0; // elements [0, done) written by a SIMD kernel
        float amax = 0.0f;
#if QMEM_OPTIM_HOST_SIMD
        if (isa == detail::host_isa::avx512 && enc.table != nullptr) {
          if constexpr (F::bits == 8)
            amax = vbmi
                       ? detail::store_block8_vbmi(*enc.table, enc.block_entries, enc.recip8,
                                                   enc.negative_below, vb, m, r.codes + first + b,
                                                   done)
                       : detail::store_block8_512(*enc.table, enc.block_entries, enc.negative_below,
                                                  vb, m, r.codes + first + b, done);
          else
            amax = vbmi ? detail::store_block4_vbmi(*enc.table, enc.block_entries, enc.steps4, vb,
                                                    m, r.codes + (first + b) / 2, done)
                        : detail::store_block4_512(*enc.table, enc.block_entries, vb, m,
                                                   r.codes + (first + b) / 2, done);
        } else if (isa == detail::host_isa::avx2 && enc.table != nullptr) {
          if constexpr (F::bits == 8)
            amax = detail::store_block8(*enc.table, enc.block_entries, enc.negative_below, vb, m,
                                        r.codes + first + b, done);
          else
            amax = detail::store_block4(*enc.table, enc.block_entries, vb, m,
                                        r.codes + (first + b) / 2, done);
        } else
#else
        (void)isa;
#endif
        {
          std::int32_t mb = 0;
          for (std::size_t j = 0; j < m; ++j) {
            auto const a =
                static_cast<std::int32_t>(std::bit_cast<std::uint32_t>(vb[j]) & 0x7fffffffu);
            mb = a > mb ? a : mb;
          }
          amax = std::bit_cast<float>(static_cast<std::uint32_t>(mb));
        }
        r.absmax[(first + b) / F::block_size] = amax;
        if (amax > 0.0f)
          for (std::size_t j = done; j < m; ++j)
            xn[j] = vb[j] / amax; // F::normalize, as one vector loop
        else
          for (std::size_t j = done; j < m; ++j)
            xn[j] = 0.0f;
        auto code = [&](std::size_t j) { return F::fix_sign(enc.code(xn[j]), vb[j]); };
        if constexpr (F::bits == 8) {
          for (std::size_t j = done; j < m; ++j)
            r.codes[first + b + j] = code(j);
        } else {
          std::size_t j = done;
          for (; j + 1 < m; j += 2)
            F::store_code_pair(r, first + b + j, code(j), code(j + 1));
          if (j < m)
            F::store_code_pair(r, first + b + j, code(j), F::encode(0.0f, amax));
        }
      }
    } else {
      for (std::size_t j = 0; j < count; ++j)
        F::store(r, first + j, v[j],
                 detail::random_bits(options_.seed, detail::random_counter(t, k, first + j)));
    }
  }

  //! One read of every gradient: whether all elements are finite and, when `with_norm`, the sum
  //! of the squares of the finite ones, in the order of optim/detail/grad_norm.hpp (the CUDA
  //! step's too, so that both clip by the same factor): tensors with policy state form group 0,
  //! those with fp32 state group 1. Without the norm the finiteness test is an integer maximum of
  //! the exponent bits per 4096-element piece (vectorizable, independent of the thread count).
  template <float_element G>
  std::pair<double, bool> grad_norm_pass(exec::host const& e,
                                         std::span<tensor_view<G const> const> grads,
                                         bool with_norm) const {
    if (with_norm) {
      std::vector<std::uint8_t> group(params_.size());
      for (std::size_t i = 0; i < params_.size(); ++i)
        group[i] = params_[i].quantized ? 0 : 1;
      auto const s = detail::global_grad_sumsq(e, grads, std::span<std::uint8_t const>(group));
      return {s.sum, s.finite};
    }
    bool finite = true;
    constexpr std::size_t piece = 4096;
    for (auto const& g : grads) {
      std::size_t const pieces = (g.size() + piece - 1) / piece;
      std::vector<std::uint32_t> expmax(pieces, 0);
      qmem::detail::parallel_for(e, g.size(), piece, [&](std::size_t b, std::size_t end) {
        for (std::size_t c = b; c < end; c += piece) {
          std::size_t const ce = std::min(end, c + piece);
          std::int32_t mx = 0;
          for (std::size_t i = c; i < ce; ++i) {
            auto const ex = static_cast<std::int32_t>(std::bit_cast<std::uint32_t>(to_float(g[i])) &
                                                      0x7f800000u);
            mx = ex > mx ? ex : mx;
          }
          expmax[c / piece] = static_cast<std::uint32_t>(mx);
        }
      });
      for (std::size_t c = 0; c < pieces; ++c)
        finite = finite && expmax[c] != 0x7f800000u;
    }
    return {0.0, finite};
  }

  //! One tensor: reduction pass (reducing rules), update-norm pass (max_unorm), update pass.
  template <class P, float_element G>
  void update_tensor(exec::host const& e, param_state& ps, tensor_view<G const> grad,
                     step_info const& si) {
    using scalars = typename Rule::scalars;
    constexpr int N = state_count;
    constexpr std::size_t chunk = [] {
      std::size_t c = 256;
      detail::for_each_state<N>(
          [&](auto K) { c = detail::lcm_of(c, format_of<P, K.value>::block_size); });
      return c;
    }();
    std::size_t const n = ps.param.size();
    if (n == 0)
      return;
    scalars k = ps.rule.prepare(si);
    bool const skip_bad = options_.nonfinite == nonfinite_policy::skip_element;
    float* const master = ps.master.empty() ? nullptr : ps.master.data();
    auto refs = [&]<int... K>(std::integer_sequence<int, K...>) {
      return std::tuple<typename format_of<P, K>::ref...>{make_ref<format_of<P, K>>(ps, K)...};
    }
    (std::make_integer_sequence<int, N>{});
    auto encoders = [&]<int... K>(std::integer_sequence<int, K...>) {
      return std::tuple<typename detail::host_encoder_of<format_of<P, K>>::type...>{};
    }
    (std::make_integer_sequence<int, N>{});
    detail::host_isa const isa = detail::current_host_isa();
    [[maybe_unused]] bool const vbmi = detail::host_vbmi(); // decode by byte permutes

    // Loads elements [b, b + m) into fp32 registers (arrays of one chunk).
    auto load_params = [&](std::size_t b, std::size_t m, float* p) {
      if (master != nullptr)
        std::copy_n(master + b, m, p);
      else
        for (std::size_t i = 0; i < m; ++i)
          p[i] = to_float(ps.param[b + i]);
    };
    auto load_grads = [&](std::size_t b, std::size_t m, float* g) {
      for (std::size_t i = 0; i < m; ++i)
        g[i] = detail::fmath::mul(to_float(grad[b + i]), si.grad_scale);
    };
    auto load_states = [&](std::size_t b, std::size_t m, float(*s)[chunk]) {
      detail::for_each_state<N>([&](auto K) {
        using F = format_of<P, K.value>;
        auto const r = std::get<K.value>(refs);
        float* QMEM_RESTRICT out = s[K.value];
        bool done = false;
        if constexpr (F::blockwise) {
#if QMEM_OPTIM_HOST_SIMD
          if (isa != detail::host_isa::portable) {
            // per block: byte permutes (8-bit, AVX-512 VBMI), gathers (8-bit) or permutes (4-bit)
            // of the code values, times absmax
            float const* values = std::get<K.value>(encoders).values;
            bool const wide = isa == detail::host_isa::avx512;
            for (std::size_t j = 0; j < m; j += F::block_size) {
              float const a = r.absmax[(b + j) / F::block_size];
              std::size_t const e = std::min<std::size_t>(m, j + F::block_size);
              std::uint8_t const* c = F::bits == 8 ? r.codes + b + j : r.codes + (b + j) / 2;
              if constexpr (F::bits == 8) {
                if (vbmi)
                  detail::decode8_vbmi(*std::get<K.value>(encoders).planes, c, a, out + j, e - j);
                else
                  wide ? detail::decode8_512(values, c, a, out + j, e - j)
                       : detail::decode8(values, c, a, out + j, e - j);
              } else {
                if (vbmi)
                  detail::decode4_vbmi(values, c, a, out + j, e - j);
                else
                  wide ? detail::decode4_512(values, c, a, out + j, e - j)
                       : detail::decode4(values, c, a, out + j, e - j);
              }
            }
            done = true;
          }
#endif
          if constexpr (F::bits == 8) {
            // F::load with the block's scale hoisted: code value times absmax
            for (std::size_t j = 0; !done && j < m; j += F::block_size) {
              float const a = r.absmax[(b + j) / F::block_size];
              std::size_t const e = std::min<std::size_t>(m, j + F::block_size);
              std::uint8_t const* QMEM_RESTRICT c = r.codes + b;
              for (std::size_t i = j; i < e; ++i)
                out[i] = detail::fmath::mul(F::code::decode(c[i], F::code::book), a);
            }
            done = true;
          }
        }
        if (!done)
          for (std::size_t i = 0; i < m; ++i)
            out[i] = F::load(r, b + i);
      });
    };
    auto load = [&](std::size_t b, std::size_t m, float* p, float* g, float(*s)[chunk]) {
      load_params(b, m, p);
      load_grads(b, m, g);
      load_states(b, m, s);
    };

    // Per-tensor sums in the order of optim/detail/tensor_sum.hpp (pieces of 2048 elements, 32
    // lane sums each folded as a butterfly, pieces folded over 256 slots), which the CUDA step
    // computes too: the totals do not depend on the thread count or the backend.
    auto tensor_sums = [&](auto&& terms) {
      constexpr std::size_t piece = detail::lcm_of(detail::sum_piece, chunk);
      std::vector<detail::term_sums> part((n + piece - 1) / piece);
      qmem::detail::parallel_for(e, n, piece, [&](std::size_t b0, std::size_t e0) {
        float p[chunk], g[chunk], s[N > 0 ? N : 1][chunk];
        for (std::size_t b = b0; b < e0; b += piece) {
          detail::term_sums lane[detail::sum_lanes] = {};
          std::size_t const pe = std::min(e0, b + piece);
          for (std::size_t c = b; c < pe; c += chunk) {
            std::size_t const m = std::min(chunk, pe - c);
            load(c, m, p, g, s);
            for (std::size_t i = 0; i < m; ++i) {
              if (skip_bad && !detail::fmath::is_finite(g[i]))
                continue;
              state_values<N> sv;
              for (int q = 0; q < N; ++q)
                sv[q] = s[q][i];
              detail::add_terms(lane[detail::sum_lane_of(c - b + i)], terms(p[i], g[i], sv));
            }
          }
          part[b / piece] = detail::fold_lanes(lane);
        }
      });
      return detail::fold_pieces(part, part.size());
    };

    if constexpr (reducing_rule<Rule>) {
      k = Rule::finish(k, tensor_sums([&](float p, float g, state_values<N> sv) {
                         return Rule::reduce(p, g, sv, k);
                       }));
    }
    float update_scale = 1.0f;
    if (options_.max_unorm > 0.0f)
      update_scale = detail::unorm_scale(tensor_sums([&](float p, float g, state_values<N> sv) {
                                           return detail::unorm_terms<Rule>(p, g, sv, k);
                                         }),
                                         options_.max_unorm);

    bool const sr_param = std::same_as<Param, bf16> && master == nullptr &&
                          options_.rounding == param_rounding::stochastic;
    // Prefetching the chunk two ahead (parameters or master weights, gradients, stored states):
    // the hardware prefetchers alone left the AdamW 8-bit step waiting on memory: 2^22
    // parameters, one thread, 1.91-1.96 -> 1.50-1.57 ns/param (1.55-1.61 with one chunk of
    // look-ahead; dev box, 2026-11-29).
    constexpr std::size_t prefetch_ahead = 2 * chunk;
    // Every state 4-bit blockwise, or every state 8-bit blockwise, with one block size (AdamW,
    // Lion... with int4_state or int8_state): on a CPU that runs block_codes4_search (4-bit) or
    // block_codes8_recip (8-bit) each block's encoding is interleaved with the rule of the next
    // block (update_encode), the last block of a chunk waiting for the next chunk.
    constexpr auto interleave_format = [] {
      struct {
        std::size_t block = 0; // 0: not interleaved
        int bits = 0;
      } r;
      bool ok = N > 0;
      detail::for_each_state<N>([&](auto K) {
        using F = format_of<P, K.value>;
        if constexpr (F::blockwise) {
          ok = ok && (F::bits == 4 || F::bits == 8) && F::block_size % 64 == 0 &&
               (r.block == 0 || (r.block == F::block_size && r.bits == F::bits));
          r.block = F::block_size;
          r.bits = F::bits;
        } else {
          ok = false;
        }
      });
      if (!ok)
        r.block = 0;
      return r;
    }();
    constexpr std::size_t bs_i = interleave_format.block;
    [[maybe_unused]] constexpr int bits_i = interleave_format.bits;
    [[maybe_unused]] bool interleave = false;
#if QMEM_OPTIM_HOST_SIMD
    if constexpr (bs_i != 0) {
      interleave = vbmi;
      detail::for_each_state<N>([&](auto K) {
        auto const& enc = std::get<K.value>(encoders);
        interleave = interleave && (bits_i == 4 ? enc.steps4 != nullptr : enc.recip8 != nullptr);
      });
    }
#endif
    // The interleaved 4-bit step prefetches only its state codes: with the parameter and gradient
    // lines too it was slower on AMD EPYC (Zen 4), one thread, CPU time: 1.07-1.19 against
    // 0.96-0.97 ns/param at 2^22, 1.10-1.16 against 1.00-1.02 at 2^26 (2026-11-30 16:50 UTC, two
    // alternations of 3 repetitions; distances of 1 and 4 chunks and an L2 hint did not recover
    // it). The 8-bit step keeps them: without, 1.71-1.86 -> 1.85-1.87 at 2^22, 1.78-1.79 ->
    // 1.97-2.04 at 2^26. docs/benchmarks.md, "host8".
    [[maybe_unused]] bool const prefetch_streams = !(interleave && bits_i == 4);
    qmem::detail::parallel_for(
        e, n, chunk,
        [&](std::size_t b0, std::size_t e0) {
          float p_copy[chunk], g_copy[chunk], states[2][N > 0 ? N : 1][chunk];
          // interleave: the last block of the previous chunk, not yet encoded (in
          // states[buffer ^ 1])
          bool waiting = false;
          int buffer = 0;
          std::size_t waiting_first = 0; // its first element
          // encodes the waiting block (store_state)
          auto flush = [&] {
            if constexpr (bs_i != 0) {
              if (!waiting)
                return;
              detail::for_each_state<N>([&](auto K) {
                using F = format_of<P, K.value>;
                store_state<F>(std::get<K.value>(refs), states[buffer ^ 1][K.value] + chunk - bs_i,
                               waiting_first, bs_i, si.step, K.value, std::get<K.value>(encoders),
                               isa);
              });
              waiting = false;
            }
          };
          for (std::size_t b = b0; b < e0; b += chunk) {
            float(*s)[chunk] = states[buffer];
            std::size_t const m = std::min(chunk, e0 - b);
            // fp32 parameters are updated in place, fp32 gradients read in place when unscaled
            // (x * 1.0f is x): no copy through the chunk arrays
            float* p = p_copy;
            float const* g = g_copy;
            if constexpr (std::same_as<Param, float>)
              p = ps.param.data() + b; // no master weights for fp32 parameters
            else
              load_params(b, m, p_copy);
            if constexpr (std::same_as<G, float>)
              if (si.grad_scale == 1.0f)
                g = grad.data() + b;
            if (g == g_copy)
              load_grads(b, m, g_copy);
            if (b + prefetch_ahead < e0) {
              std::size_t const a = b + prefetch_ahead;
              std::size_t const ma = std::min(chunk, e0 - a);
              if (prefetch_streams) {
                if (master != nullptr)
                  detail::prefetch_bytes(master + a, ma * sizeof(float));
                else
                  detail::prefetch_bytes(ps.param.data() + a, ma * sizeof(Param));
                detail::prefetch_bytes(grad.data() + a, ma * sizeof(G));
              }
              detail::for_each_state<N>([&](auto K) {
                using F = format_of<P, K.value>;
                detail::prefetch_bytes(ps.data[K].data() + F::bytes(a), F::bytes(ma));
              });
            }
            load_states(b, m, s);
            bool interleaved = false;
#if QMEM_OPTIM_HOST_SIMD
            if constexpr (bs_i != 0) {
              if (interleave && m == chunk) {
                for (std::size_t j = 0; j < chunk; j += bs_i)
                  update_block<P, chunk, bs_i, bits_i>(j, b, p, g, s, states[buffer ^ 1], waiting,
                                                       waiting_first, isa, skip_bad, update_scale,
                                                       k, refs, encoders, si.step);
                waiting = true; // this chunk's last block
                waiting_first = b + chunk - bs_i;
                buffer ^= 1;
                interleaved = true;
              }
            }
#endif
            if (!interleaved) {
              flush();
              update_chunk<chunk>(isa, skip_bad, update_scale, m, p, g, s, k);
              detail::for_each_state<N>([&](auto K) {
                using F = format_of<P, K.value>;
                store_state<F>(std::get<K.value>(refs), s[K.value], b, m, si.step, K.value,
                               std::get<K.value>(encoders), isa);
              });
            }
            if (master != nullptr)
              std::copy_n(p, m, master + b);
            if constexpr (!std::same_as<Param, float>) {
              if (sr_param) {
                if constexpr (std::same_as<Param, bf16>)
                  for (std::size_t i = 0; i < m; ++i)
                    ps.param[b + i] = detail::bf16_stochastic(
                        p[i], detail::random_bits(options_.seed,
                                                  detail::random_counter(si.step, 15, b + i)));
              } else {
                for (std::size_t i = 0; i < m; ++i)
                  ps.param[b + i] = from_float<Param>(p[i]);
              }
            }
          }
          flush();
        },
        std::size_t{1} << 15);
  }
};

} // namespace qmem::optim
