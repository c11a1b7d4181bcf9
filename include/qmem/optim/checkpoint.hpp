#pragma once
//! \file
//! Save and resume optimizer state as a safetensors file with a versioned schema, written
//! atomically (a temporary file renamed into place).
//!
//! Schema `qmem.optim/1`. Metadata: `schema`, `state_count`, `formats` (the state formats of
//! the policy, e.g. `blockwise8/256/signfix/<table hash>|blockwise8/256/<hash>`), `params`,
//! `checksum` (FNV-1a 64 over every tensor's bytes in name order). Tensors:
//!   step I32[1], lr F32[1], norm_history F32[100] (percentile clipping, when used),
//!   param.{i}.state.{k}  F32 / BF16 / U8 (the stored values or codes, exactly as in memory),
//!   param.{i}.absmax.{k} F32 (blockwise formats), param.{i}.master F32 (master weights),
//!   param.{i}.rule U8 (the rule's hyper-parameters, its object bytes), param.{i}.lr_scale F32[1],
//!   param.{i}.quantized U8[1].
//! Loading checks everything first (schema, policy, parameter count and sizes, dtypes, the
//! checksum, the last lr and lr scales finite and >= 0, rules in their ranges, the percentile
//! history >= 0, block absmax values finite and >= 0, fp32 / bf16 state values finite and >= 0
//! in a non-negative state) and throws qmem::format_error naming the mismatch,
//! leaving the optimizer unchanged; only then does it copy. A file without a percentile history
//! loaded at step > 0 into an optimizer with percentile < 100 gets a history of +inf (unknown
//! norms, which never set the clip; docs/optim.md). 10 steps equal 5 steps + save + load into a fresh optimizer + 5 steps,
//! bit for bit (the step count and the stochastic-rounding counters are restored too).
//! The parameters themselves are not saved: they belong to the model's checkpoint.

#include <qmem/core/error.hpp>
#include <qmem/io/safetensors.hpp>
#include <qmem/optim/optimizer.hpp>

#include <bit>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace qmem::optim {

namespace detail {

inline std::uint64_t fnv1a(std::uint64_t h, std::span<std::byte const> bytes) noexcept {
  for (std::byte b : bytes) {
    h ^= static_cast<std::uint64_t>(b);
    h *= 0x100000001b3ull;
  }
  return h;
}

//! A stable description of a state format (what a file's states must have been written with).
template <class F>
std::string format_tag() {
  if constexpr (std::same_as<F, fp32_format>)
    return "fp32";
  else if constexpr (std::same_as<F, bf16_format>)
    return "bf16";
  else {
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (std::size_t c = 0; c < (std::size_t{1} << F::bits); ++c) {
      float const v = F::code::decode(static_cast<std::uint8_t>(c), F::code::book);
      h = fnv1a(h, std::as_bytes(std::span<float const>(&v, 1)));
    }
    return "blockwise" + std::to_string(F::bits) + "/" + std::to_string(F::block_size) +
           (F::sign_fix ? "/signfix/" : "/") + std::to_string(h);
  }
}

template <class Rule, class Policy>
std::string policy_tag() {
  std::string s;
  for_each_state<Rule::state_count>([&](auto K) {
    using F =
        typename Policy::template format<Rule::state_signs[static_cast<std::size_t>(K.value)]>;
    if (!s.empty())
      s += "|";
    s += format_tag<F>();
  });
  return s;
}

template <class F>
dtype storage_dtype() {
  if constexpr (std::same_as<F, fp32_format>)
    return dtype::f32;
  else if constexpr (std::same_as<F, bf16_format>)
    return dtype::bf16;
  else
    return dtype::u8;
}

} // namespace detail

//! Internals of an optimizer that save/load need (not for users).
template <class O>
struct state_access {
  static auto& params(O& o) { return o.params_; }
  static auto& counter(O& o) { return o.counter_; }
  static auto& history(O& o) { return o.norm_history_; }
};

//! Writes the state of `opt` to `path` atomically. Throws io_error on failure (the previous
//! file, if any, is then unchanged).
template <class Rule, class Policy, class Param>
void save_state(optimizer<Rule, Policy, Param> const& opt, std::filesystem::path const& path) {
  using O = optimizer<Rule, Policy, Param>;
  auto& o = const_cast<O&>(opt);
  auto const& params = state_access<O>::params(o);
  io::safetensors_writer w;
  std::map<std::string, std::span<std::byte const>> all; // for the checksum, in name order
  auto add = [&](std::string name, dtype t, std::size_t bytes, void const* data) {
    std::size_t const es = dtype_size(t);
    std::span<std::byte const> b(static_cast<std::byte const*>(data), bytes);
    w.add(name, t, {static_cast<std::int64_t>(bytes / es)}, b);
    all.emplace(std::move(name), b);
  };
  step_counter const c = state_access<O>::counter(o)[0];
  add("step", dtype::i32, 4, &c.step);
  add("lr", dtype::f32, 4, &c.lr);
  auto const& hist = state_access<O>::history(o);
  if (!hist.empty())
    add("norm_history", dtype::f32, hist.size() * 4, hist.data());
  std::vector<std::uint8_t> flags(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    auto const& ps = params[i];
    std::string const pre = "param." + std::to_string(i) + ".";
    auto per_state = [&]<class P>() {
      detail::for_each_state<Rule::state_count>([&](auto K) {
        using F = typename O::template format_of<P, K.value>;
        auto const k = static_cast<std::size_t>(K.value);
        add(pre + "state." + std::to_string(k), detail::storage_dtype<F>(), ps.data[k].size_bytes(),
            ps.data[k].data());
        if constexpr (F::blockwise)
          add(pre + "absmax." + std::to_string(k), dtype::f32, ps.scale[k].size_bytes(),
              ps.scale[k].data());
      });
    };
    if (ps.quantized)
      per_state.template operator()<Policy>();
    else
      per_state.template operator()<fp32_state>();
    if (!ps.master.empty())
      add(pre + "master", dtype::f32, ps.master.size_bytes(), ps.master.data());
    add(pre + "rule", dtype::u8, sizeof(Rule), &ps.rule);
    add(pre + "lr_scale", dtype::f32, 4, &ps.lr_scale);
    flags[i] = ps.quantized ? 1 : 0;
    add(pre + "quantized", dtype::u8, 1, &flags[i]);
  }
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (auto const& [name, bytes] : all) {
    h = detail::fnv1a(h, std::as_bytes(std::span<char const>(name.data(), name.size())));
    h = detail::fnv1a(h, bytes);
  }
  w.set_metadata("schema", "qmem.optim/1");
  w.set_metadata("state_count", std::to_string(Rule::state_count));
  w.set_metadata("formats", detail::policy_tag<Rule, Policy>());
  w.set_metadata("params", std::to_string(params.size()));
  w.set_metadata("checksum", std::to_string(h));
  w.save(path);
}

//! Loads state saved by save_state into `opt`, which must have the same policy and parameters
//! of the same sizes (added in the same order). Throws io_error when the file cannot be read,
//! format_error when it is not a qmem optimizer state file of schema 1, was written for another
//! policy or other parameters, or is corrupt (checksum), or holds a value the optimizer's own
//! entry points refuse (a rule out of its ranges, an lr scale < 0 or not finite), a last lr < 0
//! or not finite, a percentile history entry < 0 or NaN, a block absmax < 0 or not finite, or an
//! fp32 / bf16 state value that is not finite or, in a state the rule declares non_negative
//! (Adam's v), < 0 (what an overflowed state holds: it cannot be resumed); `opt` is then
//! unchanged. Master weights are taken as they are (parameters, which qmem does not check).
template <class Rule, class Policy, class Param>
void load_state(optimizer<Rule, Policy, Param>& opt, std::filesystem::path const& path) {
  using O = optimizer<Rule, Policy, Param>;
  io::safetensors_reader const r(path);
  auto fail = [&](auto const&... what) {
    qmem::detail::raise<format_error>("load_state: ", path.string(), ": ", what...);
  };
  auto const& meta = r.metadata();
  auto meta_of = [&](char const* key) -> std::string {
    auto const it = meta.find(key);
    return it == meta.end() ? std::string() : it->second;
  };
  if (meta_of("schema") != "qmem.optim/1")
    fail("schema is '", meta_of("schema"), "'; expected 'qmem.optim/1'");
  if (meta_of("formats") != detail::policy_tag<Rule, Policy>())
    fail("the state was saved with formats '", meta_of("formats"), "'; this optimizer uses '",
         detail::policy_tag<Rule, Policy>(), "' (convert explicitly with converted<Policy>())");
  auto& params = state_access<O>::params(opt);
  if (meta_of("params") != std::to_string(params.size()))
    fail("the file holds ", meta_of("params"), " parameters; this optimizer has ", params.size());
  // checksum over every tensor, in name order
  {
    std::map<std::string_view, std::span<std::byte const>> all;
    for (auto const& t : r.tensors())
      all.emplace(t.name, r.bytes(t));
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (auto const& [name, bytes] : all) {
      h = detail::fnv1a(h, std::as_bytes(std::span<char const>(name.data(), name.size())));
      h = detail::fnv1a(h, bytes);
    }
    if (meta_of("checksum") != std::to_string(h))
      fail("checksum mismatch: the file is corrupt");
  }
  auto expect = [&](std::string const& name, dtype t, std::size_t bytes) {
    auto const* e = r.find(name);
    if (e == nullptr)
      fail("tensor '", name, "' is missing");
    if (e->type != t || e->nbytes() != bytes)
      fail("tensor '", name, "' is ", dtype_name(e->type), " with ", e->nbytes(),
           " bytes; expected ", dtype_name(t), " with ", bytes);
    return r.bytes(*e);
  };
  // validate everything, collecting the copies to make
  struct copy {
    void* dst;
    std::span<std::byte const> src;
  };
  std::vector<copy> copies;
  step_counter c{};
  std::memcpy(&c.step, expect("step", dtype::i32, 4).data(), 4);
  std::memcpy(&c.lr, expect("lr", dtype::f32, 4).data(), 4);
  if (c.step < 0)
    fail("step is ", c.step);
  // what a schedule check_lr_schedule accepts evaluates to: finite and >= 0 (0 before the
  // first step). last_lr() reports it until the next step computes its own
  if (!(c.lr >= 0.0f && c.lr <= std::numeric_limits<float>::max()))
    fail("lr is ", c.lr, "; expected the last step's lr, finite and >= 0");
  auto& hist = state_access<O>::history(opt);
  std::vector<float> new_hist;
  if (r.contains("norm_history")) {
    auto const b = expect("norm_history", dtype::f32, 400);
    new_hist.resize(100);
    std::memcpy(new_hist.data(), b.data(), 400);
    // squared global norms of finite gradients: >= 0 (inf where the square overflowed); a NaN
    // made the percentile's sort meaningless (NaN is unordered) and a negative the clip NaN
    for (std::size_t j = 0; j < new_hist.size(); ++j)
      if (!(new_hist[j] >= 0.0f))
        fail("norm_history[", j, "] is ", new_hist[j], "; expected a squared norm >= 0");
  } else if (opt.options().percentile < 100 && c.step > 0) {
    // saved without percentile clipping (or by a tool that drops the history): the norms of the
    // steps before are unknown. Zeros would make the clip 0 and scale the next gradients to 0;
    // +inf never sets the clip, so clipping starts once measured norms reach the percentile's
    // rank in the window (as step() does after set_step)
    new_hist.assign(100, std::numeric_limits<float>::infinity());
  }
  std::vector<Rule> rules(params.size());
  std::vector<float> lr_scales(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    auto& ps = params[i];
    std::string const pre = "param." + std::to_string(i) + ".";
    auto const q = expect(pre + "quantized", dtype::u8, 1);
    if ((static_cast<std::uint8_t>(q[0]) != 0) != ps.quantized)
      fail("parameter ", i, " was saved with ", q[0] != std::byte{0} ? "quantized" : "fp32",
           " state; here it has ", ps.quantized ? "quantized" : "fp32",
           " state (a different size or min_quantized_size)");
    auto per_state = [&]<class P>() {
      detail::for_each_state<Rule::state_count>([&](auto K) {
        using F = typename O::template format_of<P, K.value>;
        auto const k = static_cast<std::size_t>(K.value);
        std::string const state_name = pre + "state." + std::to_string(k);
        auto const values = expect(state_name, detail::storage_dtype<F>(), ps.data[k].size_bytes());
        if constexpr (!F::blockwise) {
          // fp32 / bf16 values: finite, and >= 0 for a non_negative state (a second moment, a
          // sum of squares), as the absmax of a blockwise state below. NaN or inf is what a
          // state that overflowed holds (a square above FLT_MAX); a negative second moment
          // makes the next update NaN (sqrt)
          constexpr bool non_negative = Rule::state_signs[k] == state_sign::non_negative;
          constexpr std::size_t es = std::same_as<F, fp32_format> ? 4 : 2;
          for (std::size_t j = 0; j < values.size() / es; ++j) {
            float v = 0.0f;
            if constexpr (es == 4) {
              std::memcpy(&v, values.data() + j * 4, 4);
            } else {
              std::uint16_t h = 0;
              std::memcpy(&h, values.data() + j * 2, 2);
              v = qmem::detail::bf16_bits_to_float(h);
            }
            bool const finite = std::abs(v) <= std::numeric_limits<float>::max();
            if (!finite || (non_negative && v < 0.0f))
              fail("tensor '", state_name, "' element ", j, " is ", v, "; expected ",
                   non_negative ? "a finite value >= 0 (a non-negative state)" : "a finite value",
                   " (a state that overflowed cannot be resumed)");
          }
        }
        copies.push_back({ps.data[k].data(), values});
        if constexpr (F::blockwise) {
          std::string const name = pre + "absmax." + std::to_string(k);
          auto const b = expect(name, dtype::f32, ps.scale[k].size_bytes());
          // a block absmax is a maximum magnitude: finite and >= 0. NaN or inf is what a state
          // that overflowed holds (a square above FLT_MAX): its blocks decode to NaN and the next
          // step turns the parameters NaN; a negative one flips the block's signs
          for (std::size_t j = 0; j < ps.scale[k].size(); ++j) {
            float a = 0.0f;
            std::memcpy(&a, b.data() + j * 4, 4);
            if (!(a >= 0.0f && a <= std::numeric_limits<float>::max()))
              fail("tensor '", name, "' block ", j, " is ", a,
                   "; expected a block absmax, finite and >= 0 (a state that overflowed cannot be "
                   "resumed)");
          }
          copies.push_back({ps.scale[k].data(), b});
        }
      });
    };
    if (ps.quantized)
      per_state.template operator()<Policy>();
    else
      per_state.template operator()<fp32_state>();
    if (!ps.master.empty())
      copies.push_back(
          {ps.master.data(), expect(pre + "master", dtype::f32, ps.master.size_bytes())});
    else if (r.contains(pre + "master"))
      fail("parameter ", i, " has master weights in the file; this optimizer keeps none");
    std::memcpy(static_cast<void*>(&rules[i]), expect(pre + "rule", dtype::u8, sizeof(Rule)).data(),
                sizeof(Rule));
    try { // the ranges the constructor and add_param check (a rule's validate())
      detail::check_rule(rules[i]);
    } catch (bad_argument const& e) {
      fail("parameter ", i, "'s rule is out of range: ", e.what());
    }
    std::memcpy(&lr_scales[i], expect(pre + "lr_scale", dtype::f32, 4).data(), 4);
    try { // what add_param accepts
      detail::check_lr_scale(lr_scales[i]);
    } catch (bad_argument const& e) {
      fail("parameter ", i, " has a bad lr_scale: ", e.what());
    }
  }
  // nothing can fail from here on
  for (auto const& cp : copies)
    if (!cp.src.empty())
      std::memcpy(cp.dst, cp.src.data(), cp.src.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    params[i].rule = rules[i];
    params[i].lr_scale = lr_scales[i];
  }
  hist = std::move(new_hist);
  state_access<O>::counter(opt)[0] = c;
}

} // namespace qmem::optim
