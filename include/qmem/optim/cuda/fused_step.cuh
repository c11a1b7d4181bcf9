#pragma once
//! \file
//! The fused multi-tensor optimizer kernels: one launch updates any number of tensors of any sizes.
//!
//! Work is cut into warp tasks of 32 x per_lane elements (kernel_traits: 256 for fp32 and 8-bit
//! states, 128 for the 4-bit recipe's blocks of 128): a warp owns whole absmax blocks, each lane
//! per_lane consecutive elements. A task loads its parameters, gradients, state codes and old
//! absmax with 16-byte streaming loads, decodes the states (code values in shared memory),
//! applies the rule's element update in fp32 registers (the host optimizer's arithmetic,
//! optim/optimizer.hpp), writes the parameters, takes the block max of each new state with warp
//! shuffles (no shared memory, no __syncthreads), requantizes (state_format.hpp: the block's
//! reciprocal in double, one shared-memory read per 8-bit or 4-bit code)
//! and writes back: one pass over memory. A task wholly inside its tensor (all but at most one
//! per tensor) runs without bounds checks or scalar fallbacks. Tasks are
//! numbered across all tensors; the device table of tensor entries (built once, multi_tensor.cuh)
//! maps a task to its tensor by a cached hint plus binary search, so 64 tensors cost what one
//! tensor costs. Step, gradient scale and skip flag are read from device memory (step_control),
//! so a step contains no host synchronization and can be captured in a CUDA graph.
//!
//! Bytes moved per element and step: params read + written, gradient read, each state read +
//! written (4 bytes fp32, 2 bf16, 1 byte 8-bit, 0.5 byte 4-bit), 8 bytes per block and blockwise
//! state, and fp32 master weights read + written when present.

#include <qmem/core/cuda/runtime.cuh>
#include <qmem/core/numeric.hpp>
#include <qmem/optim/cuda/state_format.hpp>
#include <qmem/optim/rule.hpp>
#include <qmem/optim/schedule.hpp>
#include <qmem/optim/state.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace qmem::optim::cuda {

//! One tensor of a multi-tensor step as the kernels see it (trivially copyable, in device memory).
struct tensor_entry {
  void* param = nullptr;       //!< P[size]
  void const* grad = nullptr;  //!< G[size]
  void* state[4] = {};         //!< per state: float[size] or codes
  float* absmax[4] = {};       //!< per blockwise state: float[ceil(size / block)]
  float* master = nullptr;     //!< fp32 master weights (16-bit params) or nullptr
  float lr_scale = 1.0f;       //!< this tensor's lr = schedule lr * lr_scale
  std::uint32_t pad0 = 0;
  std::uint64_t size = 0;      //!< elements (never 0 in a table)
  std::uint64_t first_task = 0; //!< global index of this tensor's first warp task
  std::uint64_t end_task = 0;   //!< one past its last
  std::uint32_t vectorized = 0; //!< every pointer is aligned for the vector path
  std::uint32_t pad = 0;
};

//! The device-resident scalars of a step (device memory). The resolve kernel (multi_tensor.cuh)
//! writes lr (from the schedule), step, grad_scale, skip and grad_norm before the update reads
//! them; the caller may write inv_loss_scale and max_grad_norm between steps.
struct step_control {
  float lr = 1e-3f;             //!< learning rate of this step (the schedule's value)
  std::int32_t step = 0;        //!< steps taken; a skipped step does not count
  float grad_scale = 1.0f;      //!< factor applied to every gradient in this step (unscale x clip)
  std::uint32_t skip = 0;       //!< nonzero: this step is skipped (non-finite gradient, found inf)
  float grad_norm = 0.0f;       //!< global L2 norm of the unscaled gradients (when computed)
  float inv_loss_scale = 1.0f;  //!< gradients carry a loss scale: multiply by this (1: none)
  float max_grad_norm = 0.0f;   //!< clip the global norm to this (<= 0: no clipping)
  std::uint32_t skipped_steps = 0; //!< steps skipped so far
};

//! The scalars the element code needs, besides the rule's own: read once per task.
namespace detail {

template <int Bytes>
struct raw_vector;
template <>
struct raw_vector<16> {
  using type = uint4;
};
template <>
struct raw_vector<8> {
  using type = uint2;
};
template <>
struct raw_vector<4> {
  using type = unsigned int;
};
template <>
struct raw_vector<2> {
  using type = unsigned short;
};
template <>
struct raw_vector<1> {
  using type = unsigned char;
};

//! Loads N trivially copyable T from a pointer aligned to min(16, N * sizeof(T)) bytes, streaming
//! (each byte is read once per step: evict-first).
template <class T, int N>
__device__ QMEM_INLINE void load_stream(void const* ptr, T (&out)[N]) {
  constexpr int bytes = N * static_cast<int>(sizeof(T));
  constexpr int chunk = bytes >= 16 ? 16 : bytes;
  using V = typename raw_vector<chunk>::type;
  V v[bytes / chunk];
  QMEM_UNROLL
  for (int k = 0; k < bytes / chunk; ++k)
    v[k] = __ldcs(static_cast<V const*>(ptr) + k);
  std::memcpy(out, v, bytes);
}
template <class T, int N>
__device__ QMEM_INLINE void store_stream(void* ptr, T const (&in)[N]) {
  constexpr int bytes = N * static_cast<int>(sizeof(T));
  constexpr int chunk = bytes >= 16 ? 16 : bytes;
  using V = typename raw_vector<chunk>::type;
  V v[bytes / chunk];
  std::memcpy(v, in, bytes);
  QMEM_UNROLL
  for (int k = 0; k < bytes / chunk; ++k)
    __stcs(static_cast<V*>(ptr) + k, v[k]);
}

//! The max over each group of `Lanes` consecutive lanes (a power of two up to 32). Precondition:
//! no lane holds a NaN or -0 (block maxima of magnitudes), so that fmaxf (one FMNMX) is the
//! compare-and-select it replaces, bit for bit.
template <int Lanes>
__device__ QMEM_INLINE float warp_max(float m) {
  QMEM_UNROLL
  for (int o = Lanes / 2; o > 0; o >>= 1)
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  return m;
}

//! bf16(v): qmem::detail::float_to_bf16_bits (nearest even, NaN -> 0x7FC0), the same integer
//! arithmetic with the NaN case selected instead of returned early, so that it compiles to a
//! select rather than a branch per element.
__device__ QMEM_INLINE bf16 bf16_nearest(float v) {
  std::uint32_t const u = __float_as_uint(v);
  std::uint32_t const rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bf16::from_bits(static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u
                                                                                     : rounded));
}

//! The tensor that owns global task `task`: the hint when it still does, else a binary search
//! over the entries' first tasks (warp-uniform; the table is small and stays in L1/L2).
__device__ QMEM_INLINE std::uint32_t find_tensor(tensor_entry const* t, std::uint32_t n,
                                                 std::uint64_t task, std::uint32_t hint) {
  if (task >= t[hint].first_task && task < t[hint].end_task)
    return hint;
  std::uint32_t lo = 0;
  std::uint32_t hi = n;
  while (hi - lo > 1) {
    std::uint32_t const mid = (lo + hi) / 2;
    if (t[mid].first_task <= task)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

} // namespace detail


//! Everything one launch of the fused kernel reads (passed by value as a __grid_constant__).
template <update_rule Rule, state_policy Policy>
struct fused_args {
  tensor_entry const* tensors;           //!< [tensor_count]
  typename Rule::scalars const* scalars; //!< [tensor_count], written by the prepare kernel
  step_control const* control;           //!< step, grad scale, skip
  std::uint64_t task_begin;              //!< this launch covers tasks [task_begin, task_end)
  std::uint64_t task_end;
  std::uint64_t seed;                    //!< stochastic rounding (bf16 states and parameters)
  std::uint32_t tensor_count;
  std::uint32_t param_stochastic;        //!< bf16 params without master: stochastic rounding
  //! A placeholder: the codec tables reach the kernel through device memory (shared_tables_image).
  typename kernel_traits<Rule, Policy>::tables tables;
};

namespace detail {

//! The sign of state J of Rule as a constant usable in device code.
template <class Rule, int J>
inline constexpr state_sign state_sign_v = Rule::state_signs[static_cast<std::size_t>(J)];

//! Calls f(std::integral_constant<int, J>) for J = 0..N-1 (compile-time state index).
template <int N, class F>
__device__ QMEM_INLINE void for_states(F&& f) {
  [&]<int... J>(std::integer_sequence<int, J...>) {
    (f(std::integral_constant<int, J>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

//! One warp task: kernel_traits::per_lane elements per lane, everything in registers. The
//! arithmetic is the host backend's (optimizer.hpp), element for element. `Full`: the caller has
//! checked that the whole task lies inside the tensor and that its pointers are aligned for the
//! vector path, so the element bounds checks and the scalar path compile away.
template <update_rule Rule, state_policy Policy, class P, class G, nonfinite_policy NonFinite,
          bool Full>
__device__ QMEM_INLINE void
fused_task(tensor_entry const* entry, std::uint64_t task, typename Rule::scalars const& k,
           float grad_scale, std::int32_t step, std::uint64_t seed, bool param_sr,
           typename kernel_traits<Rule, Policy>::shared_tables const& tables, unsigned lane) {
  using traits = kernel_traits<Rule, Policy>;
  constexpr int E = traits::per_lane;
  constexpr int S = Rule::state_count;
  constexpr std::uint64_t B = traits::block;
  std::uint64_t const size = entry->size;
  std::uint64_t const first = task * traits::task_elements + std::uint64_t{lane} * E;
  std::uint64_t const block = first / B; // this lane's absmax block
  bool const vector_path = Full || (entry->vectorized != 0 && first + E <= size);
  auto* const param = static_cast<P*>(entry->param);
  auto const* const grad = static_cast<G const*>(entry->grad);
  float* const master = entry->master;

  float p[E];
  float g[E];
  bool valid[E];
  {
    P p_raw[E];
    G g_raw[E];
    if (vector_path) {
      if (master == nullptr)
        load_stream(param + first, p_raw);
      load_stream(grad + first, g_raw);
      if (master != nullptr)
        load_stream(master + first, p);
      QMEM_UNROLL
      for (int i = 0; i < E; ++i)
        valid[i] = true;
    } else if constexpr (!Full) {
      QMEM_UNROLL
      for (int i = 0; i < E; ++i) {
        valid[i] = first + i < size;
        p_raw[i] = valid[i] && master == nullptr ? param[first + i] : from_float<P>(0.0f);
        g_raw[i] = valid[i] ? grad[first + i] : from_float<G>(0.0f);
        if (master != nullptr)
          p[i] = valid[i] ? master[first + i] : 0.0f;
      }
    }
    QMEM_UNROLL
    for (int i = 0; i < E; ++i) {
      if (master == nullptr)
        p[i] = to_float(p_raw[i]);
      g[i] = optim::detail::fmath::mul(to_float(g_raw[i]), grad_scale);
    }
  }

  // decode the states
  float s[S > 0 ? S : 1][E];
  for_states<S>([&](auto J) {
    using F = typename traits::template format<J.value>;
    void* const state = entry->state[J.value];
    if constexpr (F::blockwise) {
      constexpr int code_bytes = E * F::bits / 8;
      auto const& fc = tables.template codec_for<state_sign_v<Rule, J.value>>();
      float const old_absmax = Full || first < size ? entry->absmax[J.value][block] : 0.0f;
      std::uint8_t bytes[code_bytes];
      auto const* const codes = static_cast<std::uint8_t const*>(state) + first * F::bits / 8;
      if (vector_path) {
        load_stream(codes, bytes);
      } else if constexpr (!Full) {
        std::uint64_t const code_count = F::bits == 8 ? size : (size + 1) / 2;
        QMEM_UNROLL
        for (int b = 0; b < code_bytes; ++b)
          bytes[b] = first * F::bits / 8 + b < code_count ? codes[b] : std::uint8_t{0};
      }
      QMEM_UNROLL
      for (int i = 0; i < E; ++i) {
        std::uint8_t c = 0;
        if constexpr (F::bits == 8)
          c = bytes[i];
        else
          c = static_cast<std::uint8_t>(i % 2 == 0 ? bytes[i / 2] >> 4 : bytes[i / 2] & 0xf);
        s[J.value][i] = fc.decode(c, old_absmax);
      }
    } else {
      using T = typename F::element;
      T raw[E];
      T const* const st = static_cast<T const*>(state);
      if (vector_path) {
        load_stream(st + first, raw);
      } else if constexpr (!Full) {
        QMEM_UNROLL
        for (int i = 0; i < E; ++i)
          raw[i] = valid[i] ? st[first + i] : from_float<T>(0.0f);
      }
      QMEM_UNROLL
      for (int i = 0; i < E; ++i)
        s[J.value][i] = to_float(raw[i]);
    }
  });

  // update (the host's order: update a copy, keep it unless the element is skipped)
  QMEM_UNROLL
  for (int i = 0; i < E; ++i) {
    state_values<S> sv;
    QMEM_UNROLL
    for (int j = 0; j < S; ++j)
      sv[j] = s[j][i];
    float pi = p[i];
    Rule::update(pi, g[i], sv, k);
    bool keep = valid[i];
    if constexpr (NonFinite == nonfinite_policy::skip_element)
      keep = keep && optim::detail::fmath::is_finite(g[i]);
    if (keep) {
      p[i] = pi;
      QMEM_UNROLL
      for (int j = 0; j < S; ++j)
        s[j][i] = sv[j];
    }
  }

  // write the parameters (and master weights) first: their registers are free for the encode
  P out[E];
  if constexpr (std::same_as<P, bf16>) {
    // the rounding mode is chosen once per task, not per element, and the nearest-even rounding
    // is branch-free (ptxas sm_90 branched per element for each: AdamW 8-bit bf16 params
    // 121.0 -> 115.5 SASS instructions per element in the hot loop)
    if (param_sr) {
      QMEM_UNROLL
      for (int i = 0; i < E; ++i)
        out[i] = optim::detail::bf16_stochastic(
            p[i],
            optim::detail::random_bits(seed, optim::detail::random_counter(step, 15, first + i)));
    } else {
      QMEM_UNROLL
      for (int i = 0; i < E; ++i)
        out[i] = bf16_nearest(p[i]);
    }
  } else {
    QMEM_UNROLL
    for (int i = 0; i < E; ++i)
      out[i] = from_float<P>(p[i]);
  }
  if (vector_path) {
    store_stream(param + first, out);
    if (master != nullptr)
      store_stream(master + first, p);
  } else if constexpr (!Full) {
    QMEM_UNROLL
    for (int i = 0; i < E; ++i)
      if (valid[i]) {
        param[first + i] = out[i];
        if (master != nullptr)
          master[first + i] = p[i];
      }
  }

  // requantize and write the states
  for_states<S>([&](auto J) {
    using F = typename traits::template format<J.value>;
    void* const state = entry->state[J.value];
    if constexpr (F::blockwise) {
      constexpr int code_bytes = E * F::bits / 8;
      auto const& fc = tables.template codec_for<state_sign_v<Rule, J.value>>();
      // the block max of the magnitudes, NaN ignored: fmaxf returns the non-NaN operand, and
      // equals `a > local ? a : local` otherwise (both >= +0): one FMNMX per element, not two
      float local = 0.0f;
      QMEM_UNROLL
      for (int i = 0; i < E; ++i)
        local = valid[i] ? fmaxf(local, fabsf(s[J.value][i])) : local;
      float const absmax = warp_max<traits::lanes_per_block>(local);
      if (lane % traits::lanes_per_block == 0 && (Full || first < size))
        entry->absmax[J.value][block] = absmax;
      auto const scale = fc.scale_of(absmax);
      std::uint8_t code[E];
      if (fc.finite_block(absmax)) { // uniform over the block's lanes; the others rarely taken
        QMEM_UNROLL
        for (int i = 0; i < E; ++i) // a 4-bit pad nibble is the code of 0, as the host writes it
          code[i] = fc.encode_finite(valid[i] ? s[J.value][i] : 0.0f, scale);
      } else {
        QMEM_UNROLL
        for (int i = 0; i < E; ++i)
          code[i] = fc.encode(valid[i] ? s[J.value][i] : 0.0f, scale);
      }
      std::uint8_t bytes[code_bytes];
      QMEM_UNROLL
      for (int b = 0; b < code_bytes; ++b) {
        if constexpr (F::bits == 8)
          bytes[b] = code[b];
        else
          bytes[b] = static_cast<std::uint8_t>((code[2 * b] << 4) | (code[2 * b + 1] & 0xf));
      }
      auto* const codes = static_cast<std::uint8_t*>(state) + first * F::bits / 8;
      if (vector_path) {
        store_stream(codes, bytes);
      } else if constexpr (!Full) {
        std::uint64_t const code_count = F::bits == 8 ? size : (size + 1) / 2;
        QMEM_UNROLL
        for (int b = 0; b < code_bytes; ++b)
          if (first * F::bits / 8 + b < code_count)
            codes[b] = bytes[b];
      }
    } else {
      using T = typename F::element;
      T raw[E];
      QMEM_UNROLL
      for (int i = 0; i < E; ++i) {
        if constexpr (std::same_as<T, float>)
          raw[i] = s[J.value][i];
        else
          raw[i] = optim::detail::bf16_stochastic(
              s[J.value][i],
              optim::detail::random_bits(
                  seed, optim::detail::random_counter(step, J.value, first + i)));
      }
      T* const st = static_cast<T*>(state);
      if (vector_path) {
        store_stream(st + first, raw);
      } else if constexpr (!Full) {
        QMEM_UNROLL
        for (int i = 0; i < E; ++i)
          if (valid[i])
            st[first + i] = raw[i];
      }
    }
  });
}

} // namespace detail

//! Threads per block of the fused kernel: 8 warps, 8 tasks in flight per block.
inline constexpr int fused_block_threads = 256;

//! Minimum resident blocks per SM asked of the register allocator (__launch_bounds__): 3 (80
//! registers, 24 warps per SM). Measured on an H200 at 2^28 parameters, 2026-11-29 (run 2 of
//! docs/benchmarks.md, a variant of the committed kernel): 2 / 3 / 4 blocks gave AdamW 8-bit
//! 2.17 / 1.93 / 2.03 ms, Lion 8-bit 1.19 / 1.18 / 1.14, AdamW 4-bit 2.27 / 2.26 / 2.20, AdamW
//! 32-bit 1.94 / 1.99 / 2.29 (4 blocks spill the fp32 path); 3 is best or within 3% everywhere.
//! (Asking L2 for the next task's bytes before computing the current one was slower in the same
//! run: AdamW 8-bit 1.84 against 1.77 ms.) Overridable for tuning runs.
#ifndef QMEM_OPTIM_FUSED_MIN_BLOCKS
#define QMEM_OPTIM_FUSED_MIN_BLOCKS 3
#endif
inline constexpr int fused_min_blocks = QMEM_OPTIM_FUSED_MIN_BLOCKS;

//! The compile-time image of the fused kernel's shared-memory tables, in device memory: each
//! block copies it (16 bytes per thread and read, from L2 after the first block).
template <update_rule Rule, state_policy Policy>
__device__ typename kernel_traits<Rule, Policy>::shared_tables const shared_tables_image =
    kernel_traits<Rule, Policy>::shared_tables::make();

//! A task that may end inside the tensor or whose pointers are not vector-aligned (at most one
//! per tensor and launch). Inlined: out of line (__noinline__) the call forced the loop's live
//! registers around it to the stack (ptxas sm_90, AdamW 8-bit: 172 bytes of spills against 36).
template <update_rule Rule, state_policy Policy, class P, class G, nonfinite_policy NonFinite>
__device__ QMEM_INLINE void
partial_task(tensor_entry const* entry, std::uint64_t task, typename Rule::scalars const& k,
             float grad_scale, std::int32_t step, std::uint64_t seed, bool param_sr,
             typename kernel_traits<Rule, Policy>::shared_tables const& tables, unsigned lane) {
  detail::fused_task<Rule, Policy, P, G, NonFinite, false>(entry, task, k, grad_scale, step, seed,
                                                           param_sr, tables, lane);
}

//! The fused kernel: grid-stride over warp tasks [task_begin, task_end) across all tensors.
template <update_rule Rule, state_policy Policy, class P, class G, nonfinite_policy NonFinite>
__global__ void __launch_bounds__(fused_block_threads, fused_min_blocks)
    fused_step_kernel(__grid_constant__ fused_args<Rule, Policy> const args) {
  using traits = kernel_traits<Rule, Policy>;
  using tables_t = typename traits::shared_tables;
  static_assert(sizeof(tables_t) % 16 == 0 && std::is_trivially_copyable_v<tables_t>);
  __shared__ uint4 table_words[sizeof(tables_t) / 16];
  {
    auto const* src = reinterpret_cast<uint4 const*>(&shared_tables_image<Rule, Policy>);
    for (unsigned w = threadIdx.x; w < sizeof(tables_t) / 16; w += blockDim.x)
      table_words[w] = src[w];
  }
  __syncthreads();
  auto const& tables = *reinterpret_cast<tables_t const*>(table_words);
  if (args.control->skip != 0)
    return;
  float const grad_scale = args.control->grad_scale;
  std::int32_t const step = args.control->step;
  unsigned const lane = threadIdx.x & 31u;
  std::uint64_t const warps = (static_cast<std::uint64_t>(gridDim.x) * blockDim.x) >> 5;
  std::uint32_t hint = 0;
  std::uint32_t loaded = ~std::uint32_t{0}; // the tensor whose scalars k holds (none yet)
  typename Rule::scalars k{};
  std::uint64_t const warp =
      (static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  for (std::uint64_t task = args.task_begin + warp; task < args.task_end; task += warps) {
    std::uint32_t const owner = detail::find_tensor(args.tensors, args.tensor_count, task, hint);
    if (owner != loaded) { // the scalars are read once per tensor, not once per task
      k = args.scalars[owner];
      loaded = owner;
    }
    hint = owner;
    tensor_entry const* const entry = args.tensors + hint;
    std::uint64_t const local = task - entry->first_task;
    bool const full =
        entry->vectorized != 0 && (local + 1) * traits::task_elements <= entry->size;
    if (full)
      detail::fused_task<Rule, Policy, P, G, NonFinite, true>(entry, local, k, grad_scale, step,
                                                              args.seed,
                                                              args.param_stochastic != 0, tables,
                                                              lane);
    else
      partial_task<Rule, Policy, P, G, NonFinite>(entry, local, k, grad_scale, step, args.seed,
                                                  args.param_stochastic != 0, tables, lane);
  }
}

} // namespace qmem::optim::cuda
