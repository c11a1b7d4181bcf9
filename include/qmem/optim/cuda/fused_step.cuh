#pragma once
//! \file
//! The fused multi-tensor optimizer kernels: one launch updates any number of tensors of any sizes.
//!
//! Work is cut into warp tasks of 32 x per_lane elements (kernel_traits: 256, 8 per lane, for
//! fp32, 8-bit and the 4-bit recipe's blocks of 128): a warp owns whole absmax blocks, each lane
//! per_lane consecutive elements. A task loads its parameters, gradients, state codes and old
//! absmax with 16-byte streaming loads, decodes the states (code values in shared memory),
//! applies the rule's element update in fp32 registers (the host optimizer's arithmetic,
//! optim/optimizer.hpp), writes the parameters, takes the block max of each new state (one
//! redux.sync when the block spans the warp, shuffles otherwise; no shared memory, no
//! __syncthreads), requantizes (state_format.hpp: the block's reciprocal in double, one
//! shared-memory read per 8-bit or 4-bit code, codes gathered by byte permutes) and writes back:
//! one pass over memory. A task wholly inside its tensor (all but at most one
//! per tensor) runs without bounds checks or scalar fallbacks; in the quantized steps a warp
//! loads its next such task into registers before computing the current one (fused_pipeline;
//! tensors of up to 2^32 elements, indexed with 32 bits: fused_index32_max_size).
//! AdamW's element update runs lane-wide (lane_update): the moments, one range test, then the
//! square roots and divisions by the IEEE functions' own fast sequences. Tasks are
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
#include <qmem/optim/rules.hpp>
#include <qmem/optim/schedule.hpp>
#include <qmem/optim/state.hpp>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace qmem::optim::cuda {

//! One tensor of a multi-tensor step as the kernels see it (trivially copyable, in device memory).
struct tensor_entry {
  void* param = nullptr;      //!< P[size]
  void const* grad = nullptr; //!< G[size]
  void* state[4] = {};        //!< per state: float[size] or codes
  float* absmax[4] = {};      //!< per blockwise state: float[ceil(size / block)]
  float* master = nullptr;    //!< fp32 master weights (16-bit params) or nullptr
  float lr_scale = 1.0f;      //!< this tensor's lr = schedule lr * lr_scale
  std::uint32_t pad0 = 0;
  std::uint64_t size = 0;       //!< elements (never 0 in a table)
  std::uint64_t first_task = 0; //!< global index of this tensor's first warp task
  std::uint64_t end_task = 0;   //!< one past its last
  std::uint32_t vectorized = 0; //!< every pointer is aligned for the vector path
  std::uint32_t pad = 0;
};

//! The device-resident scalars of a step (device memory). The resolve kernel (multi_tensor.cuh)
//! writes lr (from the schedule), step, grad_scale, skip and grad_norm before the update reads
//! them; the caller may write inv_loss_scale and max_grad_norm between steps.
struct step_control {
  float lr = 1e-3f;            //!< learning rate of this step (the schedule's value)
  std::int32_t step = 0;       //!< steps taken; a skipped step does not count
  float grad_scale = 1.0f;     //!< factor applied to every gradient in this step (unscale x clip)
  std::uint32_t skip = 0;      //!< nonzero: this step is skipped (non-finite gradient, found inf)
  float grad_norm = 0.0f;      //!< global L2 norm of the unscaled gradients (when computed)
  float inv_loss_scale = 1.0f; //!< gradients carry a loss scale: multiply by this (1: none)
  float max_grad_norm = 0.0f;  //!< clip the global norm to this (<= 0: no clipping)
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
//! (each byte is read once per step: evict-first). Rejected: the 16-byte loads with the
//! `L2::256B` prefetch-size hint (`ld.global.cs.L2::256B`, every fused kernel), H200, 2^28
//! parameters, 2026-11-30 16:31 UTC, three runs each, interleaved, ms, without / with: AdamW
//! 4-bit 0.997-1.008 / 1.036-1.048, 8-bit 1.118-1.125 / 1.155-1.169, Lion 8-bit 0.944-0.950 /
//! 0.984-1.001, 32-bit 1.894-1.899 / 1.917-1.941 (docs/benchmarks.md, "optim5").
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
//! Stores N trivially copyable T like load_stream loads them, streaming (`st.global.cs`). The
//! default write-back policy instead (`__stwb`, the same SASS but the stores' cache operator) was
//! slower on the fp32-state steps and within 1% elsewhere: H200, 2^28 parameters, 2026-11-30
//! 16:31 UTC, three runs each, interleaved, ms, .cs / write-back: AdamW 32-bit 1.894-1.899 /
//! 1.945-1.947, paged 1.886-1.896 / 1.932-1.942, AdamW 4-bit 0.997-1.008 / 0.994-0.998, 64 tensors
//! 1.140-1.152 / 1.132-1.138, 8-bit 1.118-1.125 / 1.118-1.121, Lion 8-bit 0.944-0.950 /
//! 0.948-0.952 (docs/benchmarks.md, "optim5").
//! Also slower on AdamW 32-bit: its loads as `ld.global.L1::no_allocate` (gradients
//! `ld.global.nc.L1::no_allocate`) instead of `.cs`, H200, 2^28 parameters, 2026-11-30 22:10 UTC,
//! three interleaved rounds, ms, median, .cs / no_allocate: 1.8928 / 1.9223 (+1.6%), paged
//! 1.8765 / 1.8964, 64 tensors 1.9037 / 1.9120 (docs/benchmarks.md, "opt7").
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

} // namespace detail

//! The 4-bit decode by table address, the finite-gradient test by max.NaN, code offsets by
//! division and the linear16 codes packed by shift-adds (fused_task) were the tuning option
//! QMEM_OPTIM_FUSED_4BIT_V2 (off) until 2026-11-30: 4% fewer instructions per element that did not
//! show alone (lead, H200, 04:24 UTC: AdamW 4-bit 1.074-1.077 off / 1.078-1.082 on). Together with
//! the 32-bit indices (fused_index32_max_size) and the code lines in the L2 prefetch
//! (prefetch_full_task) they did: H200, 2^28 parameters, 2026-11-30 10:27 UTC, three runs each,
//! interleaved, ms, before / after: AdamW 4-bit 1.085-1.087 / 1.056-1.062, 8-bit 1.146-1.152 /
//! 1.147-1.153, bf16 params 1.176-1.182 / 1.081-1.088, Lion 8-bit 0.958-0.962 / 0.947-0.951, 64
//! tensors 1.154-1.160 / 1.138-1.142 (docs/benchmarks.md, "optim4"). ptxas sm_90, the AdamW 4-bit
//! pipelined loop: ncu 158.6 M -> 144.1 M warp instructions at 2^26 without the prefetch of codes
//! (149.8 M with it).

namespace detail {

//! The max over each group of `Lanes` consecutive lanes (a power of two up to 32). Precondition:
//! no lane holds a NaN or -0 (block maxima of magnitudes), so that fmaxf (one FMNMX) is the
//! compare-and-select it replaces, bit for bit.
//! A whole warp (Lanes == 32) takes one `redux.sync.max.u32` over the bits: for floats >= +0 that
//! are not NaN the unsigned order of the bits is the order of the values, so the integer maximum
//! is fmaxf's, bit for bit (ptxas sm_90: 1 REDUX instead of 5 SHFL + 5 FMNMX per state and task).
//! Half warps (Lanes == 16, the 4-bit blocks of 128) keep the shuffles. Rejected: each half's
//! maximum by one redux.sync over the warp in which the other half's lanes give +0 (2 REDUX and
//! 3 selects instead of 4 SHFL + 4 FMNMX in a chain; ncu had put 13% of the AdamW 4-bit kernel's
//! stall samples on that chain), H200, 2^28 parameters, 2026-11-30 19:30 UTC, three interleaved
//! rounds, ms, median (min-max), without / with: AdamW 4-bit 0.9941 (0.9922-1.0044) / 1.0005
//! (0.9962-1.0011) (docs/benchmarks.md, "2026-11-30, opt6").
template <int Lanes>
__device__ QMEM_INLINE float warp_max(float m) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr bool redux = Lanes == 32;
#else
  constexpr bool redux = false;
#endif
  if constexpr (redux) {
    return __uint_as_float(__reduce_max_sync(0xffffffffu, __float_as_uint(m)));
  } else {
    QMEM_UNROLL
    for (int o = Lanes / 2; o > 0; o >>= 1)
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    return m;
  }
}

#if defined(__CUDA_ARCH__)
//! The float at shared address `address + Offset` (ld.shared with an immediate offset).
template <std::uint32_t Offset>
__device__ QMEM_INLINE float load_shared_f32(std::uint32_t address) {
  float r;
  asm volatile("ld.shared.f32 %0, [%1+%2];" : "=f"(r) : "r"(address), "n"(Offset));
  return r;
}
#endif

//! bf16(v): qmem::detail::float_to_bf16_bits (nearest even, NaN -> 0x7FC0), the same integer
//! arithmetic with the NaN case selected instead of returned early, so that it compiles to a
//! select rather than a branch per element.
__device__ QMEM_INLINE bf16 bf16_nearest(float v) {
  std::uint32_t const u = __float_as_uint(v);
  std::uint32_t const rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bf16::from_bits(
      static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded));
}

//! The bf16 bits of two floats rounded to nearest even, `hi` in bits 16-31 and `lo` in bits 0-15:
//! one `cvt.rn.bf16x2.f32`. The hardware rounding equals float_to_bf16_bits for every float but
//! NaN (the hardware writes 0x7FFF, qmem 0x7FC0: callers select NaN away first), checked for all
//! 2^32 floats by tests/optim/cuda_fused_codec_test.cpp.
__device__ QMEM_INLINE std::uint32_t bf16x2_nearest(float hi, float lo) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  std::uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return (std::uint32_t{bf16_nearest(hi).bits} << 16) | bf16_nearest(lo).bits;
#endif
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

//! The table entry that owns global task `task`, found by the 32 lanes of a warp together (every
//! lane passes the same `task`; all lanes get the answer): `first` holds the entries' first tasks,
//! ascending, first[0] <= task. Each round the lanes compare 64 evenly spaced entries of the range
//! still open (two per lane) and keep the stretch that the count of those at or below `task`
//! points to: one round for up to 64 entries, two up to 4096. With 64 entries or fewer a round
//! reads 512 contiguous bytes (four cache lines, hits in L1 after the first warps of an SM). A
//! group of one entry loads nothing. Replaces find_tensor's binary search (a chain of up to
//! log2(n) dependent loads of 128-byte entries) where a warp looks up one task.
__device__ QMEM_INLINE std::uint32_t find_tensor_warp(std::uint64_t const* first, std::uint32_t n,
                                                      std::uint64_t task, unsigned lane) {
  std::uint32_t lo = 0;
  std::uint32_t span = n; // the owner lies in [lo, lo + span)
  while (span > 1) {
    std::uint32_t const stride = (span + 63) / 64;
    std::uint32_t const a = 2 * lane * stride; // offsets of this lane's two entries in the range
    std::uint32_t const b = a + stride;
    bool const in_a = a < span && first[lo + a] <= task;
    bool const in_b = b < span && first[lo + b] <= task;
    // the entries at or below `task` are a prefix of the 64 offsets (ascending first tasks); the
    // first is always among them (first[lo] <= task)
    auto const below = static_cast<std::uint32_t>(__popc(__ballot_sync(0xffffffffu, in_a)) +
                                                  __popc(__ballot_sync(0xffffffffu, in_b)));
    lo += (below - 1) * stride;
    std::uint32_t const left = span - (below - 1) * stride;
    span = left < stride ? left : stride;
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
  std::uint64_t seed; //!< stochastic rounding (bf16 states and parameters)
  std::uint32_t tensor_count;
  std::uint32_t param_stochastic; //!< bf16 params without master: stochastic rounding
  //! A placeholder: the codec tables reach the kernel through device memory (shared_tables_image).
  typename kernel_traits<Rule, Policy>::tables tables;
  //! [tensor_count] the entries' first tasks, densely (detail::find_tensor_warp; read by the
  //! WarpLookup form of the fused kernel alone)
  std::uint64_t const* first_tasks;
};

namespace detail {

//! The sign of state J of Rule as a constant usable in device code.
template <class Rule, int J>
inline constexpr state_sign state_sign_v = Rule::state_signs[static_cast<std::size_t>(J)];

//! Calls f(std::integral_constant<int, J>) for J = 0..N-1 (compile-time state index).
template <int N, class F>
__device__ QMEM_INLINE void for_states(F&& f) {
  [&]<int... J>(std::integer_sequence<int, J...>) { (f(std::integral_constant<int, J>{}), ...); }
  (std::make_integer_sequence<int, N>{});
}

//! sqrt.rn.f32(x) for x in [2^-100, 2^100] (precondition): the sequence ptxas emits for
//! `__fsqrt_rn` on that range (sm_90: MUFU.RSQ, two FMUL.FTZ, two FFMA), without the range test,
//! the branch to the general path and its convergence barrier, which the caller replaces by one
//! test per lane. Equal to __fsqrt_rn for every float of the range (all of them are checked by
//! tests/optim/cuda_fused_codec_test.cpp).
__device__ QMEM_INLINE float sqrt_in_range(float x) {
  float r;
  asm("{\n\t"
      ".reg .f32 y, h, e, q;\n\t"
      "rsqrt.approx.ftz.f32 q, %1;\n\t"
      "mul.rn.ftz.f32 y, %1, q;\n\t"
      "mul.rn.ftz.f32 h, q, 0f3F000000;\n\t"
      "neg.f32 q, y;\n\t"
      "fma.rn.f32 e, q, y, %1;\n\t"
      "fma.rn.f32 %0, e, h, y;\n\t"
      "}"
      : "=f"(r)
      : "f"(x));
  return r;
}

//! div.rn.f32(n, d) for 2^-60 <= |n| <= 2^60 and 2^-51 <= d <= 2^61 (precondition): the sequence
//! ptxas emits for `__fdiv_rn` when its range check (FCHK) passes (sm_90: MUFU.RCP, five FFMA),
//! without the check and the branch. In that range every intermediate is a normal float (the
//! reciprocal, the quotient in [2^-121, 2^111], its residual above 2^-84), so the sequence's
//! result scales exactly with the operands' exponents and equals the correctly rounded quotient
//! as it does for operands in [1, 2) (checked against __fdiv_rn over every divisor mantissa and
//! random operands by tests/optim/cuda_fused_codec_test.cpp).
__device__ QMEM_INLINE float div_in_range(float n, float d) {
  float r;
  asm("{\n\t"
      ".reg .f32 r0, r1, t, q0, e, nd;\n\t"
      "rcp.approx.ftz.f32 r0, %2;\n\t"
      "neg.f32 nd, %2;\n\t"
      "fma.rn.f32 t, nd, r0, 0f3F800000;\n\t"
      "fma.rn.f32 r1, r0, t, r0;\n\t"
      "fma.rn.f32 q0, %1, r1, 0f00000000;\n\t"
      "fma.rn.f32 e, nd, q0, %1;\n\t"
      "fma.rn.f32 %0, r1, e, q0;\n\t"
      "}"
      : "=f"(r)
      : "f"(n), "f"(d));
  return r;
}

//! A whole lane's element updates of a rule in one go, for the common case, where that is
//! cheaper than E calls of Rule::update: `run` returns false, having written nothing, when the
//! case does not apply (the caller then runs Rule::update per element). The generic rule has none.
template <class Rule>
struct lane_update {
  static constexpr bool available = false;
};

//! Adam and AdamW without L2 decay and without decoupled decay before the update (AdamW's
//! default, bitsandbytes' order), every gradient finite and every element valid: adam_rule::update
//! (rules.hpp) operation for operation, in two passes over the lane's elements: the moments, then
//! the parameters. The moments' pass also tests that each v lies in [2^-100, 2^100] and each |m|
//! in [2^-60, 2^60] (and, once, eps c2 in [0, 2^60]); then the square root and the division take
//! sqrt_in_range / div_in_range (the denominator sqrt(v) + eps c2 lies in [2^-50, 2^61]), else
//! the IEEE functions with their own branches. Dropped, being exact identities here: the select of
//! the L2 term (has_l2 false) and the multiplication by decay_before = 1 (p * 1 is p, and for a
//! NaN p the add after it writes the same canonical NaN). Why: a branch per square root and per
//! division, each with a convergence barrier, and the range checks cost ptxas sm_90 about
//! 9 instructions per element more than these tests, and the L2 select and decay 4 more.
template <bool Decoupled>
struct lane_update<adam_rule<Decoupled>> {
  static constexpr bool available = true;
  using scalars = typename adam_rule<Decoupled>::scalars;

  //! Whether the lane-wide update applies to these scalars.
  __device__ QMEM_INLINE static bool applies(scalars const& k) {
    return !k.has_l2 && k.decay_before == 1.0f;
  }

  //! The new moments of the lane's elements, in place, and whether every element lies in the
  //! fast sequences' range. The ranges are tested on the bits with unsigned minima and maxima,
  //! which ptxas sm_90 folds into 3-input VIMNMX3 (four FSETP per element before; the pipelined
  //! AdamW 8-bit loop: 0.5 instructions per element fewer): for v >= +0 the bits' order is the
  //! values', and a NaN, an infinity or a negative v (only -0 or NaN can be) has bits above
  //! 2^100's; |m| as its bits shifted left by one likewise, so a non-finite m or v fails.
  template <int E>
  __device__ QMEM_INLINE static bool moments(float const (&g)[E], float (&m)[E], float (&v)[E],
                                             scalars const& k) {
    using namespace qmem::fmath;
    std::uint32_t v_lo = ~0u, v_hi = 0u, m_lo = ~0u, m_hi = 0u;
    QMEM_UNROLL
    for (int i = 0; i < E; ++i) {
      m[i] = add(mul(m[i], k.beta1), mul(k.one_minus_beta1, g[i]));
      v[i] = add(mul(v[i], k.beta2), mul(k.one_minus_beta2, mul(g[i], g[i])));
      std::uint32_t const vb = __float_as_uint(v[i]);
      std::uint32_t const mb = __float_as_uint(m[i]) << 1;
      v_lo = min(v_lo, vb);
      v_hi = max(v_hi, vb);
      m_lo = min(m_lo, mb);
      m_hi = max(m_hi, mb);
    }
    // combined with `&`, not `&&`: no branch per test (a NaN eps fails both of its tests)
    return (k.eps_c2 >= 0.0f) & (k.eps_c2 <= 0x1p60f) & (v_lo >= 0x0d800000u) &
           (v_hi <= 0x71800000u) & (m_lo >= (0x21800000u << 1)) & (m_hi <= (0x5d800000u << 1));
  }
  // the bits of 2^-100, 2^100, 2^-60 and 2^60
  static_assert(0x0d800000u == std::bit_cast<std::uint32_t>(0x1p-100f) &&
                0x71800000u == std::bit_cast<std::uint32_t>(0x1p100f) &&
                0x21800000u == std::bit_cast<std::uint32_t>(0x1p-60f) &&
                0x5d800000u == std::bit_cast<std::uint32_t>(0x1p60f));

  //! The parameters from in-range moments (sqrt_in_range, div_in_range).
  template <int E>
  __device__ QMEM_INLINE static void fast_params(float (&p)[E], float const (&m)[E],
                                                 float const (&v)[E], scalars const& k) {
    using namespace qmem::fmath;
    QMEM_UNROLL
    for (int i = 0; i < E; ++i)
      p[i] =
          mul(add(p[i], mul(k.step_size, div_in_range(m[i], add(sqrt_in_range(v[i]), k.eps_c2)))),
              k.decay_after);
  }

  //! Every gradient finite (precondition): the update, fast where in range, else IEEE.
  //! `states_finite` is set when the new moments are in range (so finite, no NaN).
  template <int E>
  __device__ QMEM_INLINE static bool run(float (&p)[E], float const (&g)[E], float (&s)[2][E],
                                         scalars const& k, bool& states_finite) {
    using namespace qmem::fmath;
    if (!applies(k))
      return false;
    float(&m)[E] = s[0];
    float(&v)[E] = s[1];
    states_finite = moments(g, m, v, k);
    if (states_finite) {
      fast_params(p, m, v, k);
    } else {
      QMEM_UNROLL
      for (int i = 0; i < E; ++i)
        p[i] =
            mul(add(p[i], mul(k.step_size, div(m[i], add(sqrt(v[i]), k.eps_c2)))), k.decay_after);
    }
    return true;
  }
};

//! Lion with a non-NaN lr, every gradient finite and every element valid: lion::update
//! (rules.hpp) operation for operation, where lr sign(x) takes its three possible values from
//! three products computed once per lane: mul(lr, 1) for x > 0, mul(lr, 0) for x = 0 or NaN
//! (sign gives 0), and for x < 0 mul(lr, -1), which for a non-NaN lr is mul(lr, 1) with the
//! sign bit flipped. So u is mul(lr, 1) with x's sign bit (one LOP3), or mul(lr, 0) where x is
//! 0 or NaN (an ordered compare and a select): ptxas sm_90 otherwise compares twice, selects an
//! integer, converts it to float and multiplies (pipelined loop: 47.6 -> 45.0 instructions per
//! element). H200, 2^28 parameters, 2026-11-29 19:13 UTC, with uses_master below: Lion 8-bit
//! 1.014-1.015 -> 1.005-1.011 ms in the same session.
template <>
struct lane_update<lion> {
  static constexpr bool available = true;
  //! (`states_finite` is left as it is: not known here.)
  template <int E>
  __device__ QMEM_INLINE static bool run(float (&p)[E], float const (&g)[E], float (&s)[1][E],
                                         lion::scalars const& k, bool& /*states_finite*/) {
    using namespace qmem::fmath;
    if (k.lr != k.lr)
      return false;
    std::uint32_t const lr_bits = __float_as_uint(mul(k.lr, 1.0f));
    float const zero_step = mul(k.lr, 0.0f);
    if (k.has_decay) {
      QMEM_UNROLL
      for (int i = 0; i < E; ++i)
        p[i] = mul(p[i], k.decay);
    }
    QMEM_UNROLL
    for (int i = 0; i < E; ++i) {
      float const x = add(mul(s[0][i], k.beta1), mul(k.one_minus_beta1, g[i]));
      float const signed_lr = __uint_as_float(lr_bits ^ (__float_as_uint(x) & 0x80000000u));
      float const u = (x < 0.0f || x > 0.0f) ? signed_lr : zero_step;
      s[0][i] = add(mul(s[0][i], k.beta2), mul(k.one_minus_beta2, g[i]));
      p[i] = sub(p[i], u);
    }
    return true;
  }
};

//! Whether tensors of parameter type P may carry fp32 master weights: 16-bit parameters only
//! (multi_tensor_step rejects master weights of fp32 parameters), so the fp32-parameter kernels
//! compile the master weights' pointer selects and stores out (ptxas sm_90, pipelined loops:
//! AdamW 8-bit 79.8 -> 77.7 instructions per element, Lion 49.6 -> 47.6, AdamW 4-bit 86.1 ->
//! 83.9; H200 19:13 UTC, same session: AdamW 8-bit 1.219-1.220 -> 1.216-1.217 ms, 4-bit
//! 1.214-1.216 -> 1.204-1.210).
template <class P>
inline constexpr bool uses_master = !std::same_as<P, float>;

//! The absmax block of lane `lane`'s first element `first` of task `task`: first / block. When a
//! block is a whole task (8-bit blocks of 256), that is `task` (ptxas sm_90 otherwise shifts and
//! masks the 64-bit element index: the pipelined AdamW 8-bit loop 75.6 -> 74.8 instructions per
//! element, Lion 44.4 -> 44.0; for blocks of 128 task x 2 + lane / 16 was 0.3 more than first /
//! 128, so they keep the division).
//! `Index`: std::uint64_t, or std::uint32_t in the pipelined loop (fused_index32_max_size).
template <update_rule Rule, state_policy Policy, class Index>
__device__ QMEM_INLINE Index lane_block(Index task, Index first) {
  using traits = kernel_traits<Rule, Policy>;
  if constexpr (traits::task_elements == traits::block)
    return task;
  else
    return first / traits::block;
}

//! The byte offset of element `first`'s code in a blockwise state of format F: first / (8 / bits)
//! where bits divides 8 (ptxas sm_90: first x bits / 8 of a 64-bit index cost two masks per
//! stream and task for the product's wrap-around; with a 32-bit index (fused_index32_max_size)
//! the product would wrap), else first x bits / 8 in 64 bits.
template <class F, class Index>
__device__ QMEM_INLINE auto code_offset(Index first) {
  if constexpr (8 % F::bits == 0)
    return static_cast<Index>(first / (8 / F::bits));
  else
    return std::uint64_t{first} * F::bits / 8;
}

//! The raw bytes one lane loads for a full task (parameters or master weights, gradients, each
//! state's codes or elements and old absmax), held in registers so that the next task's loads can
//! be in flight while the current task computes (fused_step_kernel, fused_pipeline).
template <update_rule Rule, state_policy Policy, class P, class G>
struct full_task_data {
  static constexpr int E = kernel_traits<Rule, Policy>::per_lane;
  static constexpr int S = Rule::state_count > 0 ? Rule::state_count : 1;
  float p[E];
  P p_raw[E];
  G g_raw[E];
  alignas(16) std::uint8_t state[S][E * 4];
  float absmax[S];
};

//! Loads full task `task` of `entry` into `d` (streaming 16-byte loads, as fused_task does).
template <update_rule Rule, state_policy Policy, class P, class G, class Index>
__device__ QMEM_INLINE void load_full_task(tensor_entry const* entry, Index task, unsigned lane,
                                           full_task_data<Rule, Policy, P, G>& d) {
  using traits = kernel_traits<Rule, Policy>;
  constexpr int E = traits::per_lane;
  Index const first = task * Index{traits::task_elements} + Index{lane} * E;
  Index const block = detail::lane_block<Rule, Policy>(task, first);
  auto const* const param = static_cast<P const*>(entry->param);
  float const* const master = uses_master<P> ? entry->master : nullptr;
  if constexpr (std::same_as<P, float>) {
    load_stream(master != nullptr ? master + first : param + first, d.p);
  } else {
    if (master == nullptr)
      load_stream(param + first, d.p_raw);
    else
      load_stream(master + first, d.p);
  }
  load_stream(static_cast<G const*>(entry->grad) + first, d.g_raw);
  for_states<Rule::state_count>([&](auto J) {
    using F = typename traits::template format<J.value>;
    if constexpr (F::blockwise) {
      constexpr int code_bytes = E * F::bits / 8;
      d.absmax[J.value] = entry->absmax[J.value][block];
      std::uint8_t bytes[code_bytes];
      load_stream(static_cast<std::uint8_t const*>(entry->state[J.value]) + code_offset<F>(first),
                  bytes);
      std::memcpy(d.state[J.value], bytes, code_bytes);
    } else {
      using T = typename F::element;
      T raw[E];
      load_stream(static_cast<T const*>(entry->state[J.value]) + first, raw);
      std::memcpy(d.state[J.value], raw, sizeof(raw));
    }
  });
}

//! Whether prefetch_full_task asks for a task's absmax lines and takes one bulk prefetch per
//! parameter and gradient array instead of one prefetch per lane and array: with fp32 parameters.
//! H200, 2^28 parameters, one process per run, runs interleaved, ms. 2026-11-30 13:22 UTC, three
//! runs each, before (HEAD) / absmax lines / absmax lines and bulk: AdamW 4-bit 1.064-1.071 /
//! 1.018-1.023 / 1.004-1.007, 8-bit 1.140-1.146 / 1.125-1.131 / 1.113-1.124, Lion 8-bit
//! 0.945-0.955 / 0.939-0.948 / 0.938-0.943, Lion 4-bit 0.902-0.908 / 0.884-0.893 / 0.885-0.891,
//! 64 tensors 1.140-1.152 / 1.141-1.153 / 1.137-1.147; but AdamW 8-bit with bf16 parameters
//! 1.076-1.113 / 1.129-1.149 / 1.147-1.171, so 16-bit parameters keep the per-lane prefetch
//! without the absmax lines. 13:33 UTC, five runs each, before / this: AdamW 4-bit 1.062-1.073 /
//! 1.001-1.011, 8-bit 1.149-1.156 / 1.115-1.129, Lion 8-bit 0.947-0.958 / 0.940-0.951, Lion 4-bit
//! 0.906-0.912 / 0.886-0.894, 64 tensors 1.142-1.151 / 1.139-1.151, bf16 params 1.122-1.147 /
//! 1.090-1.177. Rejected (same sessions): the code and absmax lines one task further ahead than
//! the parameter lines (4-bit 1.012-1.020 with per-lane, 1.019-1.029 with bulk prefetches, 8-bit
//! 1.124-1.129, 1.129-1.139; bf16 params 1.168-1.286) or two (4-bit 1.019-1.024), every line one
//! task further ahead (4-bit 1.023-1.035 per lane, 1.024-1.034 bulk). See docs/benchmarks.md,
//! "2026-11-30, optim4: absmax lines".
template <class P>
inline constexpr bool prefetch_bulk_and_absmax = std::same_as<P, float>;

//! Asks L2 for the lines of full task `task` (the task after the one load_full_task has in
//! flight), so that its loads find them there (QMEM_OPTIM_FUSED_PREFETCH_L2), with
//! `prefetch.global.L2::evict_last` (without `evict_last` the parameter and gradient lines were
//! 2.5-3.5% slower on every row): the parameter and gradient lines (prefetch_bulk_and_absmax: one
//! cp.async.bulk.prefetch.L2 of each array's 16-byte aligned bytes of the task, from lanes 0 and
//! 1, with an evict_last policy; else each lane its own sector), each blockwise state's code lines
//! (one 128-byte line per lane, in the first lanes, offsets in 32 bits) and, with
//! prefetch_bulk_and_absmax, each blockwise state's absmax line (one lane per state after those).
//! A prefetch is a hint: it writes nothing, and the task lies inside the tensor. (16-bit
//! parameters with fp32 master weights load the master array, which this does not prefetch.)
//! The code lines: alone (64-bit indices) within the runs' spread (H200, 2026-11-30 03:53 UTC,
//! without / with, ms: AdamW 4-bit 1.076-1.082 / 1.069-1.074, 8-bit 1.143-1.150 / 1.154-1.157,
//! Lion 0.960-0.965 / 0.956-0.961); with the 32-bit indices faster on every row but AdamW 8-bit
//! (equal): 10:27 UTC, without / with, ms: AdamW 4-bit 1.083-1.087 / 1.066-1.067, bf16 params
//! 1.196-1.197 / 1.094-1.096, Lion 8-bit 0.962-0.966 / 0.947-0.950, 64 tensors 1.149-1.152 /
//! 1.141-1.146, 8-bit 1.147-1.148 / 1.146-1.157. Rejected: the gradient lines (only read) put
//! back to the normal eviction priority once load_full_task has loaded them
//! (`applypriority.global.L2::evict_normal`, one line per 4 lanes), H200, 2^28 parameters,
//! 2026-11-30 16:31 UTC, three runs each, interleaved, ms, without / with: AdamW 4-bit
//! 0.997-1.008 / 1.041-1.046, 8-bit 1.118-1.125 / 1.168-1.174, Lion 8-bit 0.944-0.950 /
//! 0.990-0.996, 64 tensors 1.140-1.152 / 1.155-1.164 (docs/benchmarks.md, "optim5").
//! This function costs about 59 warp instructions per warp and task (ncu, AdamW 4-bit at
//! 2^26: 7.4 of 76.6 instructions per element, 12% of the stall samples), most of them the bulk
//! prefetch: ptxas cannot prove its addresses warp-uniform and loops over the two lanes' values
//! (R2UR, UBLKPF, BRA.U.ANY). Cheaper forms were slower all the same (H200, 2^28 parameters,
//! 2026-11-30 19:30 UTC, three interleaved rounds, ms, median, this / candidate): one predicated
//! `prefetch.global.L2` per lane and task, each lane one 128-byte line of the task's streams at
//! base + task x stride fixed per tensor (about 5 instructions per task; the 8-bit kernels' stack
//! frames grow by 16 bytes, with reloads in the loop): AdamW 4-bit 0.9941 / 1.0131 (+1.9%), 8-bit
//! 1.1178 / 1.1319, bf16 params 1.0760 / 1.1192, 64 tensors 1.1391 / 1.1536, Lion 8-bit 0.9423 /
//! 0.9456; the same bulk prefetches from uniform registers (addresses made uniform by redux.sync,
//! no loop; the codes' and absmax lines by one predicated prefetch per lane; more spills in the
//! AdamW kernels, reloads in the loop): 4-bit 1.0179 (+2.4%), 8-bit 1.1461, bf16 params 1.1741,
//! 64 tensors 1.1635, Lion 0.9390 (docs/benchmarks.md, "2026-11-30, opt6").
template <update_rule Rule, state_policy Policy, class P, class G, class Index>
__device__ QMEM_INLINE void prefetch_full_task(tensor_entry const* entry, Index task,
                                               unsigned lane) {
  using traits = kernel_traits<Rule, Policy>;
  Index const task_first = task * Index{traits::task_elements};
  // (cp.async.bulk needs sm_90 and 16-byte aligned ranges: the vector path's alignment check,
  // multi_tensor_step, gives 16 bytes when a lane's parameters and gradients span 16 or more)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  constexpr bool bulk = false;
#else
  constexpr bool bulk = prefetch_bulk_and_absmax<P> && traits::per_lane * sizeof(P) >= 16 &&
                        traits::per_lane * sizeof(G) >= 16;
#endif
  if constexpr (bulk) {
    if (lane < 2) {
      std::uint64_t policy;
      asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
      void const* const at =
          lane == 0 ? static_cast<void const*>(static_cast<P const*>(entry->param) + task_first)
                    : static_cast<void const*>(static_cast<G const*>(entry->grad) + task_first);
      unsigned const bytes =
          lane == 0 ? traits::task_elements * sizeof(P) : traits::task_elements * sizeof(G);
      asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(at),
                   "r"(bytes), "l"(policy)
                   : "memory");
    }
  } else {
    Index const first = task_first + Index{lane} * Index{traits::per_lane};
    asm volatile(
        "prefetch.global.L2::evict_last [%0];" ::"l"(static_cast<P const*>(entry->param) + first));
    asm volatile(
        "prefetch.global.L2::evict_last [%0];" ::"l"(static_cast<G const*>(entry->grad) + first));
  }
  int base = 0; // the first lane of the next state's lines
  for_states<Rule::state_count>([&](auto J) {
    using F = typename traits::template format<J.value>;
    if constexpr (F::blockwise) {
      constexpr int lines = static_cast<int>((traits::task_elements * F::bits / 8 + 127) / 128);
      auto const at = static_cast<int>(lane) - base;
      if (at >= 0 && at < lines)
        asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(
            static_cast<std::uint8_t const*>(entry->state[J.value]) +
            (code_offset<F>(task_first) + static_cast<unsigned>(at) * 128u)));
      base += lines;
    }
  });
  if constexpr (prefetch_bulk_and_absmax<P>) {
    // the task's absmax values of each blockwise state (at most 64 bytes, aligned to their
    // size: one line)
    for_states<Rule::state_count>([&](auto J) {
      using F = typename traits::template format<J.value>;
      if constexpr (F::blockwise) {
        if (static_cast<int>(lane) == base)
          asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(
              entry->absmax[J.value] + lane_block<Rule, Policy>(task, task_first)));
        ++base;
      }
    });
  }
}

// Programmatic dependent launch (step_pdl): the shared device half of core/cuda/runtime.cuh.
using cuda_detail::pdl_allow_dependents;
using cuda_detail::pdl_wait;

//! One warp task: kernel_traits::per_lane elements per lane, everything in registers. The
//! arithmetic is the host backend's (optimizer.hpp), element for element. `Full`: the caller has
//! checked that the whole task lies inside the tensor and that its pointers are aligned for the
//! vector path, so the element bounds checks and the scalar path compile away.
template <update_rule Rule, state_policy Policy, class P, class G, nonfinite_policy NonFinite,
          bool Full, bool Preloaded = false, class Index = std::uint64_t>
__device__ QMEM_INLINE void
fused_task(tensor_entry const* entry, Index task, typename Rule::scalars const& k, float grad_scale,
           std::int32_t step, std::uint64_t seed, bool param_sr,
           typename kernel_traits<Rule, Policy>::shared_tables const& tables, unsigned lane,
           full_task_data<Rule, Policy, P, G> const* pre = nullptr) {
  static_assert(Full || !Preloaded, "only full tasks are preloaded");
  using traits = kernel_traits<Rule, Policy>;
  constexpr int E = traits::per_lane;
  constexpr int S = Rule::state_count;
  std::uint64_t const size = entry->size;
  static_assert(sizeof(Index) == 8 || (Full && Preloaded), "a 32-bit index: full tasks only");
  Index const first = task * Index{traits::task_elements} + Index{lane} * E;
  Index const block = lane_block<Rule, Policy>(task, first); // this lane's absmax block
  bool const vector_path = Full || (entry->vectorized != 0 && first + E <= size);
  auto* const param = static_cast<P*>(entry->param);
  auto const* const grad = static_cast<G const*>(entry->grad);
  float* const master = uses_master<P> ? entry->master : nullptr;

  float p[E];
  float g[E];
  bool valid[E];
  {
    P p_raw[E]{}; // value-initialized: an array left undefined on one path became a loop-carried
    G g_raw[E]{}; // value that ptxas spilled (8 local stores per task-lane, AdamW 8-bit)
    if constexpr (Preloaded) {
      std::memcpy(p, pre->p, sizeof(p));
      std::memcpy(p_raw, pre->p_raw, sizeof(p_raw));
      std::memcpy(g_raw, pre->g_raw, sizeof(g_raw));
      QMEM_UNROLL
      for (int i = 0; i < E; ++i)
        valid[i] = true;
    } else if (vector_path) {
      if constexpr (std::same_as<P, float>) {
        // fp32 parameters: one load from whichever array holds them (both hold the same values
        // when there are master weights), not two predicated loads merged by 8 selects
        load_stream(master != nullptr ? master + first : param + first, p);
      } else {
        if (master == nullptr)
          load_stream(param + first, p_raw);
        if (master != nullptr)
          load_stream(master + first, p);
      }
      load_stream(grad + first, g_raw);
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
      if constexpr (std::same_as<P, float>) {
        if (!vector_path && master == nullptr)
          p[i] = p_raw[i];
      } else if (master == nullptr) {
        p[i] = to_float(p_raw[i]);
      }
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
      float old_absmax = 0.0f;
      std::uint8_t bytes[code_bytes];
      [[maybe_unused]] auto const* const codes =
          static_cast<std::uint8_t const*>(state) + code_offset<F>(first);
      if constexpr (Preloaded) {
        old_absmax = pre->absmax[J.value];
        std::memcpy(bytes, pre->state[J.value], code_bytes);
      } else if (vector_path) {
        old_absmax = entry->absmax[J.value][block];
        load_stream(codes, bytes);
      } else if constexpr (!Full) {
        old_absmax = first < size ? entry->absmax[J.value][block] : 0.0f;
        std::uint64_t const code_count = F::bits == 8 ? size : (size + 1) / 2;
        QMEM_UNROLL
        for (int b = 0; b < code_bytes; ++b)
          bytes[b] = first * F::bits / 8 + b < code_count ? codes[b] : std::uint8_t{0};
      }
      if constexpr (F::bits == 4 && code_bytes % 4 == 0) {
        // the table offsets (4 x code) of a word's 8 codes in two words, one byte each (a shift
        // and a mask per word), then one byte extract per code (ptxas sm_90: a shift and a mask
        // per code before)
        std::uint32_t words[code_bytes / 4];
        std::memcpy(words, bytes, sizeof(words));
#if defined(__CUDA_ARCH__)
        // the byte permute that extracts 4 x code also takes bytes 1-3
        // of the tables' shared address (aligned to 256 bytes: byte 0 is zero), so its result is
        // the code's address less the value array's offset, which the load takes as immediate
        // (value_at: the offset of fc's value array in the tables, the codec codec_for picks)
        using tables_t = typename traits::shared_tables;
        using fc_t = std::remove_cvref_t<decltype(fc)>;
        constexpr bool signed_side =
            state_sign_v<Rule, J.value> == state_sign::any || traits::one_codec;
        constexpr std::uint32_t value_at = static_cast<std::uint32_t>(
            (signed_side ? offsetof(tables_t, signed_codec) : offsetof(tables_t, unsigned_codec)) +
            offsetof(fc_t, c) + offsetof(decltype(fc_t{}.c), value));
        [[maybe_unused]] std::uint32_t const table_base =
            static_cast<std::uint32_t>(__cvta_generic_to_shared(&tables));
#endif
        QMEM_UNROLL
        for (int w = 0; w < code_bytes / 4; ++w) {
          std::uint32_t const high = (words[w] >> 2) & 0x3c3c3c3cu; // first code of each byte
          std::uint32_t const low = (words[w] << 2) & 0x3c3c3c3cu;
          QMEM_UNROLL
          for (int b = 0; b < 4; ++b) {
#if defined(__CUDA_ARCH__)
            auto const select = static_cast<unsigned>(0x7650 + b); // byte b, then base's 1-3
            s[J.value][8 * w + 2 * b] = optim::detail::fmath::mul(
                load_shared_f32<value_at>(__byte_perm(high, table_base, select)), old_absmax);
            s[J.value][8 * w + 2 * b + 1] = optim::detail::fmath::mul(
                load_shared_f32<value_at>(__byte_perm(low, table_base, select)), old_absmax);
#else // (the host pass parses this; no host code calls it)
            auto const select = static_cast<unsigned>(0x4440 + b); // byte b, zeros above
            s[J.value][8 * w + 2 * b] = optim::detail::fmath::mul(
                fc.c.decode_at(__byte_perm(high, 0u, select)), old_absmax);
            s[J.value][8 * w + 2 * b + 1] =
                optim::detail::fmath::mul(fc.c.decode_at(__byte_perm(low, 0u, select)), old_absmax);
#endif
          }
        }
      } else {
        QMEM_UNROLL
        for (int i = 0; i < E; ++i) {
          std::uint8_t c = 0;
          if constexpr (F::bits == 8)
            c = bytes[i];
          else
            c = static_cast<std::uint8_t>(i % 2 == 0 ? bytes[i / 2] >> 4 : bytes[i / 2] & 0xf);
          s[J.value][i] = fc.decode(c, old_absmax);
        }
      }
    } else {
      using T = typename F::element;
      T raw[E];
      [[maybe_unused]] T const* const st = static_cast<T const*>(state);
      if constexpr (Preloaded) {
        std::memcpy(raw, pre->state[J.value], sizeof(raw));
      } else if (vector_path) {
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
  auto update_all = [&](auto check) {
    QMEM_UNROLL
    for (int i = 0; i < E; ++i) {
      state_values<S> sv;
      QMEM_UNROLL
      for (int j = 0; j < S; ++j)
        sv[j] = s[j][i];
      float pi = p[i];
      Rule::update(pi, g[i], sv, k);
      bool keep = valid[i];
      if constexpr (decltype(check)::value)
        keep = keep && optim::detail::fmath::is_finite(g[i]);
      if (keep) {
        p[i] = pi;
        QMEM_UNROLL
        for (int j = 0; j < S; ++j)
          s[j][i] = sv[j];
      }
    }
  };
  // every gradient of the lane finite: one test per lane, not a test and a select per element
  // and value
  bool lane_finite = true;
  if constexpr (NonFinite == nonfinite_policy::skip_element) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // the largest magnitude with NaN propagated (max.NaN), which is below +inf exactly when every
    // gradient is finite: one FMNMX per element (the magnitude is an operand modifier) instead of
    // a LOP3 and an integer max of the exponent fields
    float top = fabsf(g[0]);
    QMEM_UNROLL
    for (int i = 1; i < E; ++i)
      asm("max.NaN.f32 %0, %0, %1;" : "+f"(top) : "f"(fabsf(g[i])));
    lane_finite = top < __int_as_float(0x7f800000);
#else
    {
      std::uint32_t exponents = 0;
      QMEM_UNROLL
      for (int i = 0; i < E; ++i)
        exponents = max(exponents, qmem::detail::float_to_bits(g[i]) & 0x7f800000u);
      lane_finite = exponents != 0x7f800000u;
    }
#endif
  }
  bool updated = false;
  bool states_finite = false; // every new state known to be finite (not NaN)
  if constexpr (lane_update<Rule>::available && Full)
    if (lane_finite)
      updated = lane_update<Rule>::run(p, g, s, k, states_finite);
  if (!updated) {
    if (lane_finite)
      update_all(std::false_type{});
    else
      update_all(std::true_type{});
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
      // two elements per cvt.rn.bf16x2.f32 when the lane holds no NaN (one FSETP per element
      // decides), else the integer rounding that selects NaN's 0x7FC0
      static_assert(E % 2 == 0);
      bool any_nan = false;
      QMEM_UNROLL
      for (int i = 0; i < E; ++i)
        any_nan = any_nan || p[i] != p[i];
      std::uint32_t words[E / 2];
      if (!any_nan) {
        QMEM_UNROLL
        for (int w = 0; w < E / 2; ++w)
          words[w] = bf16x2_nearest(p[2 * w + 1], p[2 * w]);
      } else {
        QMEM_UNROLL
        for (int w = 0; w < E / 2; ++w)
          words[w] =
              (std::uint32_t{bf16_nearest(p[2 * w + 1]).bits} << 16) | bf16_nearest(p[2 * w]).bits;
      }
      static_assert(sizeof(words) == sizeof(out));
      std::memcpy(out, words, sizeof(out));
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
      using codec_t = std::remove_cvref_t<decltype(fc)>;
      // the block max of the magnitudes, NaN ignored: fmaxf returns the non-NaN operand, and
      // equals `a > local ? a : local` otherwise (both >= +0): one FMNMX per element, not two
      float local = 0.0f;
      QMEM_UNROLL
      for (int i = 0; i < E; ++i)
        local = valid[i] ? fmaxf(local, fabsf(s[J.value][i])) : local;
      float const absmax = warp_max<traits::lanes_per_block>(local);
      if (lane % traits::lanes_per_block == 0 && (Full || first < size))
        entry->absmax[J.value][block] = absmax;
      std::uint8_t bytes[code_bytes];
      if constexpr (codec_t::has_block_route && (F::bits == 8 || F::bits == 4) &&
                    (code_bytes % 4 == 0 || code_bytes == 2)) {
        // 8-bit codes in bits 24-31 of encode_block_high, each output byte in one register,
        // gathered by byte permutes: 3 per 4 bytes (was a shift, a mask and a merge per code).
        // 4-bit codes at bit 28 (packed search) or bit 0 (linear16_route): 8 codes into a word
        // by one funnel shift each, in the order that leaves the first code of each byte in its
        // high nibble, as the host packs (ptxas sm_90: was two shifts and a LOP3 per two codes
        // and 3 PRMT per word)
        constexpr unsigned shift = codec_t::code_shift;
        std::uint32_t high[E];
        auto gather = [&](auto&& high_of) {
          QMEM_UNROLL
          for (int i = 0; i < E; ++i)
            high[i] = high_of(valid[i] ? s[J.value][i] : 0.0f);
        };
        // the block's scale is computed in the branch that reads it (the double reciprocal of
        // scale_of, with its slow-path call, only where the fp32 route does not apply)
        if (codec_t::block_route(absmax)) { // uniform over the block's lanes; the others rarely
          auto const scale = codec_t::block_route_scale(absmax);
          // a lane whose states the lane-wide update left in its fast range holds no NaN: its
          // encode skips NaN's select (codec_t::nan_select; ptxas sm_90, AdamW 4-bit: a FSETP
          // and a SEL per element of m fewer)
          if (codec_t::nan_select && states_finite)
            gather([&](float v) { return fc.template encode_block_high<false>(v, scale); });
          else
            gather([&](float v) { return fc.encode_block_high(v, scale); });
        } else {
          auto const scale = fc.scale_of(absmax);
          gather([&](float v) { return std::uint32_t{fc.encode(v, scale)} << shift; });
        }
        if constexpr (F::bits == 4 && code_bytes % 4 == 0) {
          static_assert(shift == 28 || shift == 0);
          std::uint32_t words[code_bytes / 4];
          QMEM_UNROLL
          for (int w = 0; w < code_bytes / 4; ++w) {
            if constexpr (codec_t::linear16_route) {
              // high[i] is 0x4B000000 + code (linear16_code), so
              // (high[2b] << 4) + high[2b + 1] holds byte b in its low byte and zeros in bytes 1-2;
              // two such sums merge by one more shift-add, and the two halves by one byte permute
              // (ptxas sm_90: 4 LEA + 2 LEA + 1 PRMT per word instead of 8 funnel shifts)
              std::uint32_t pair[4];
              QMEM_UNROLL
              for (int b = 0; b < 4; ++b)
                pair[b] = (high[8 * w + 2 * b] << 4) + high[8 * w + 2 * b + 1];
              words[w] = __byte_perm(pair[0] + (pair[1] << 8), pair[2] + (pair[3] << 8), 0x5410u);
              continue;
            }
            std::uint32_t acc = 0;
            // codes 6 7 4 5 2 3 0 1 (top nibble first in) or 1 0 3 2 5 4 7 6 (bottom nibble
            // first in): byte b of the word is (code 2b << 4) | code 2b + 1
            QMEM_UNROLL
            for (int k = 0; k < 8; ++k) {
              int const pair = shift == 28 ? 3 - k / 2 : k / 2;
              int const i = 8 * w + 2 * pair + (shift == 28 ? k % 2 : 1 - k % 2);
              acc =
                  shift == 28 ? __funnelshift_l(high[i], acc, 4) : __funnelshift_r(acc, high[i], 4);
            }
            words[w] = acc;
          }
          std::memcpy(bytes, words, sizeof(bytes));
        } else {
          constexpr unsigned pos = F::bits == 8 ? 3u : 0u;
          constexpr unsigned pair = pos | ((pos + 4u) << 4);
          std::uint32_t src[code_bytes];
          QMEM_UNROLL
          for (int b = 0; b < code_bytes; ++b) {
            if constexpr (F::bits == 8)
              src[b] = high[b];
            else // the first code in the high nibble, as the host packs
              src[b] = (std::uint32_t{codec_t::code_of_high(high[2 * b])} << 4) |
                       codec_t::code_of_high(high[2 * b + 1]);
          }
          if constexpr (code_bytes == 2) {
            auto const half = static_cast<std::uint16_t>(__byte_perm(src[0], src[1], pair));
            std::memcpy(bytes, &half, 2);
          } else {
            std::uint32_t words[code_bytes / 4];
            QMEM_UNROLL
            for (int w = 0; w < code_bytes / 4; ++w)
              words[w] = __byte_perm(__byte_perm(src[4 * w], src[4 * w + 1], pair),
                                     __byte_perm(src[4 * w + 2], src[4 * w + 3], pair), 0x5410u);
            std::memcpy(bytes, words, sizeof(bytes));
          }
        }
      } else {
        std::uint8_t code[E];
        auto const scale = fc.scale_of(absmax);
        if (fc.finite_block(absmax)) { // uniform over the block's lanes; the others rarely taken
          QMEM_UNROLL
          for (int i = 0; i < E; ++i) // a 4-bit pad nibble is the code of 0, as the host writes it
            code[i] = fc.encode_finite(valid[i] ? s[J.value][i] : 0.0f, scale);
        } else {
          QMEM_UNROLL
          for (int i = 0; i < E; ++i)
            code[i] = fc.encode(valid[i] ? s[J.value][i] : 0.0f, scale);
        }
        QMEM_UNROLL
        for (int b = 0; b < code_bytes; ++b) {
          if constexpr (F::bits == 8)
            bytes[b] = code[b];
          else
            bytes[b] = static_cast<std::uint8_t>((code[2 * b] << 4) | (code[2 * b + 1] & 0xf));
        }
      }
      auto* const codes = static_cast<std::uint8_t*>(state) + code_offset<F>(first);
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
              s[J.value][i], optim::detail::random_bits(
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

//! Whether multi_tensor_step launches its prepare and fused kernels as programmatic dependents
//! of the kernel before them (cudaLaunchAttributeProgrammaticStreamSerialization): 1. Each one's
//! launch, and the fused kernel's block start and table copy, overlap the kernel before it
//! (resolve_kernel and prepare_kernel let their dependents start at once; each dependent waits,
//! pdl_wait, before it reads anything another kernel writes). Measured on an H200, 2026-11-30
//! 13:46 UTC, three runs each, interleaved, off / on: a whole step of Lion 8-bit at 65536
//! parameters 21.3-24.7 us (median 22.3) / 18.3-22.0 (19.9), the step's fixed cost; at 2^28
//! parameters within the runs' spread (ms: AdamW 4-bit 0.997-1.002 / 0.995-1.005, 8-bit
//! 1.115-1.122 / 1.116-1.121, 32-bit 1.886-1.910 / 1.887-1.911, Lion 8-bit 0.938-0.946 /
//! 0.941-0.949, 64 tensors 1.134-1.146 / 1.134-1.144; docs/benchmarks.md, "2026-11-30, optim4:
//! programmatic dependent launch"). Overridable for tuning runs.
#ifndef QMEM_OPTIM_STEP_PDL
#define QMEM_OPTIM_STEP_PDL 1
#endif
inline constexpr bool step_pdl = QMEM_OPTIM_STEP_PDL != 0;

//! Threads per block of the fused kernel: 8 warps, 8 tasks in flight per block.
inline constexpr int fused_block_threads = 256;

//! Minimum resident blocks per SM asked of the register allocator (__launch_bounds__) for the
//! kernels that do not pipeline their loads (fp32 and bf16 states; the pipelined ones take
//! QMEM_OPTIM_FUSED_MIN_BLOCKS_PIPELINED): 2 (see below; it was 3, 80 registers). Measured on an
//! H200 at 2^28 parameters, 2026-11-29 (afternoon run of docs/benchmarks.md, a variant of the
//! kernel of then): 2 / 3 / 4 blocks gave AdamW 8-bit 2.17 / 1.93 / 2.03 ms, Lion 8-bit 1.19 /
//! 1.18 / 1.14, AdamW 4-bit 2.27 / 2.26 / 2.20, AdamW 32-bit 1.94 / 1.99 / 2.29 (4 blocks spill
//! the fp32 path); 3 was best or within 3% everywhere. Since the quantized kernels pipeline their
//! loads (their own bound below), this bound serves the fp32 and bf16 states only: 2 blocks (no
//! spills; 3 spilled 40 bytes per thread in the 32-bit AdamW) gave AdamW 32-bit 1.89 ms against
//! 1.98 with 3, paged 1.89 against 1.97 (lead's integrated H200 run, 2026-11-29 16:49 UTC, same
//! build otherwise). Also slower: 20 warps per SM in blocks of 128 threads, 5 per SM (the AdamW
//! 32-bit kernel fits 96 registers without spills: 94 / 91 used), H200, 2^28 parameters,
//! 2026-11-30 16:31 UTC, three runs each, interleaved, ms, 256 x 2 / 128 x 5: AdamW 32-bit
//! 1.894-1.899 / 1.908-1.916, paged 1.886-1.896 / 1.913-1.920; 24 warps (128 x 6, 80 registers)
//! spill 28-40 bytes. Overridable for tuning runs.
#ifndef QMEM_OPTIM_FUSED_MIN_BLOCKS
#define QMEM_OPTIM_FUSED_MIN_BLOCKS 2
#endif
inline constexpr int fused_min_blocks = QMEM_OPTIM_FUSED_MIN_BLOCKS;

//! The same bound for the kernels whose states are not all fp32 (bf16 states with stochastic
//! rounding): 3. With 2, AdamW with bf16 states ran 1.61 ms against 1.46 with 3 (lead's
//! integrated H200 runs, 2026-11-29 16:49 and 17:05 UTC).
inline constexpr int fused_min_blocks_16bit_states = 3;

//! The compile-time image of the fused kernel's shared-memory tables, in device memory: each
//! block copies it (16 bytes per thread and read, from L2 after the first block).
template <update_rule Rule, state_policy Policy>
__device__ typename kernel_traits<Rule, Policy>::shared_tables const
    shared_tables_image = kernel_traits<Rule, Policy>::shared_tables::make();

//! Whether each warp loads its next full task into registers before computing the current one
//! (1) or loads each task when it starts it (0); see fused_step_kernel. The quantized steps wait
//! on their loads (ncu, AdamW 8-bit at 2^26, 3 blocks: 10.4 cycles between a warp's issues, 5.4
//! of them on the loads' scoreboard, DRAM 68% busy; pipelined, 2 blocks: 6.8 and 2.7, 72%).
//! Measured on an H200 at 2^28 parameters, 2026-11-29 16:05 UTC, same run (ms, pipelined /
//! not): AdamW 8-bit 1.25 / 1.33, with bf16 params 1.17 / 1.17, AdamW 4-bit 1.28 / 1.32, Lion
//! 8-bit 1.03 / 1.02, AdamW 8-bit as 64 tensors 1.30 / 1.39. Not kept, same run: asking L2 for
//! the next task's lines instead (1.34 / 1.17 / 1.31 / 1.01; AdamW 32-bit 2.03 against 1.98) and
//! the loads' L2::256B prefetch hint on top of the pipeline (1.25 / 1.22 / 1.27 / 1.03).
//! Overridable for tuning runs.
#ifndef QMEM_OPTIM_FUSED_PIPELINE
#define QMEM_OPTIM_FUSED_PIPELINE 1
#endif
inline constexpr bool fused_pipeline = QMEM_OPTIM_FUSED_PIPELINE != 0;

//! Whether the pipelined loop also asks L2 for the lines of the task after the one whose loads are
//! in flight (prefetch_full_task; the measurements below are of its first form, the parameter and
//! gradient lines alone, two prefetches per lane and task): 1.
//! A third task in registers spills the two-state kernels; this keeps a third task's largest
//! streams on their way without registers. ncu (H200, 2^26, AdamW 8-bit): L2 hit rate 39 -> 48%,
//! long-scoreboard stall 3.3 -> 2.3 of 7.0 -> 6.6 cycles between a warp's issues, for 3.6% more
//! instructions (ptxas sm_90: the AdamW 8-bit kernel spills 20 bytes, one reload per task-lane in
//! the loop). H200, 2^28 parameters, 2026-11-29 22:09 UTC, same session, three runs each, 0 / 1
//! (ms): AdamW 8-bit 1.175-1.181 -> 1.149-1.153, AdamW 4-bit 1.133-1.142 -> 1.070-1.079, Lion
//! 8-bit 1.000-1.005 -> 0.959-0.963, Lion 4-bit 0.981-0.987 -> 0.920-0.934, SGD momentum 8-bit
//! 0.993-0.997 -> 0.952-0.966, paged 8-bit 1.174-1.181 -> 1.150-1.154; bf16 parameters and 64
//! tensors of 4 Mi unchanged (1.102-1.108 / 1.100-1.121, 1.195-1.197 / 1.201-1.205). Overridable
//! for tuning runs.
#ifndef QMEM_OPTIM_FUSED_PREFETCH_L2
#define QMEM_OPTIM_FUSED_PREFETCH_L2 1
#endif

//! Minimum resident blocks per SM of the kernels that pipeline their loads (fused_pipeline):
//! two tasks' raw bytes in registers need up to 128 registers (ptxas sm_90: AdamW 8-bit 128,
//! 4-bit 127, Lion 8-bit 109, no spills; at 80 registers, 3 blocks, they spilled 50-600 bytes
//! per thread). 16 warps per SM, each with two tasks' loads in flight.
#ifndef QMEM_OPTIM_FUSED_MIN_BLOCKS_PIPELINED
#define QMEM_OPTIM_FUSED_MIN_BLOCKS_PIPELINED 2
#endif

//! Tasks a warp holds in registers at once in the pipelined kernels with one state (Lion, SGD
//! momentum, RMSprop, Adagrad): the current one and QMEM_OPTIM_FUSED_PIPELINE_DEPTH_ONE_STATE - 1
//! whose loads are in flight: 3. A task's data is 18 registers per lane, so the third buffer
//! fits the 128-register bound without spills (ptxas sm_90: Lion 8-bit 110 -> 128 registers).
//! H200, 2^28 parameters, 2026-11-29 19:30 UTC, same session, depth 2 / 3 (two runs each, ms):
//! Lion 8-bit 1.006-1.007 / 1.003, Lion 4-bit 1.003 / 0.994-0.997, SGD momentum 8-bit
//! 1.009-1.010 / 1.001-1.002; ncu (Lion 8-bit, 2^26): 250.0 -> 245.1 us, but the long-scoreboard
//! stall only 7.2 -> 6.9 of 10.0 -> 9.8 cycles per issue: what the warps wait on is mostly not
//! the pipelined data (see docs/benchmarks.md, GPU optimizers, round 5).
#ifndef QMEM_OPTIM_FUSED_PIPELINE_DEPTH_ONE_STATE
#define QMEM_OPTIM_FUSED_PIPELINE_DEPTH_ONE_STATE 3
#endif
//! The same for the pipelined kernels with two states (AdamW): 2. With 3 they spill (ptxas sm_90:
//! AdamW 4-bit 24 bytes, bf16 params 136) and ran slower in the same session: AdamW 8-bit 1.218-
//! 1.221 -> 1.333 ms, 4-bit 1.221-1.222 -> 1.289, 64 tensors 1.270-1.273 -> 1.430. Still so for
//! the 4-bit kernel alone (ptxas sm_90, nvcc 13.0, 2026-11-30: 88 / 112 bytes of spills in the
//! skip_step / skip_element kernels at depth 3; not timed).
#ifndef QMEM_OPTIM_FUSED_PIPELINE_DEPTH_TWO_STATE
#define QMEM_OPTIM_FUSED_PIPELINE_DEPTH_TWO_STATE 2
#endif

//! Tasks per warp and tensor of a launch (on average) below which each warp takes one contiguous
//! range of tasks instead of every (warps)-th task: 64. A warp's pipeline restarts at each tensor
//! it enters (its first task's loads are waited for without overlap), and with the grid stride
//! every warp enters every tensor. H200, 2^28 parameters, three runs each (ms). 2026-11-30 03:33
//! UTC, grid-stride / always contiguous: AdamW 8-bit as 64 tensors of 4 Mi (8 tasks per warp and
//! tensor) 1.201-1.204 / 1.152-1.156, but one tensor 1.146-1.151 / 1.154-1.158, Lion 8-bit
//! 0.957-0.960 / 0.967-0.973, AdamW 4-bit 1.073-1.083 / 1.085-1.090, AdamW 32-bit 1.897-1.900 /
//! 1.907-1.921; so a launch with many tasks per warp and tensor keeps the grid stride (one tensor
//! of 2^28: 496). 03:53 UTC, HEAD / this rule: 64 tensors 1.197-1.208 / 1.154-1.158, one tensor
//! 1.152-1.163 / 1.143-1.150, 4-bit 1.073-1.083 / 1.076-1.082, Lion 0.958-0.968 / 0.960-0.965.
//! 0: always grid-stride. Overridable for tuning runs.
#ifndef QMEM_OPTIM_FUSED_CONTIGUOUS_BELOW
#define QMEM_OPTIM_FUSED_CONTIGUOUS_BELOW 64
#endif
inline constexpr unsigned fused_contiguous_below = QMEM_OPTIM_FUSED_CONTIGUOUS_BELOW;

//! Whether the pipelined two-state fused kernels with fp32 parameters (AdamW-like rules with
//! blockwise states) copy each tensor's table entry into registers once per tensor (1) instead of
//! reading its pointers from global memory in every task (0), as they must when the entry stays
//! in memory (the task's stores could alias it). ncu (H200, 2026-11-29 19:30 UTC) showed the
//! pipelined kernels waiting mostly on the long scoreboard (AdamW 8-bit 3.6 of 6.9 cycles between
//! a warp's issues), each task's loads and stores first waiting for their addresses (LDG.E.64
//! from the entry, a dependent round trip; L1 hit rate 51%). With the copy (ptxas sm_90):
//! LDG.E.64 per kernel 57 -> 12, registers unchanged (128), no spills. Timed on the H200
//! (2026-11-29 19:47 UTC, 2^28 params, interleaved, 0 / 1): AdamW 8-bit 1.214-1.221 ->
//! 1.184-1.185 ms, 4-bit 1.214-1.220 -> 1.157-1.158, 64 tensors 1.245-1.257 -> 1.205-1.206, paged
//! 1.213-1.223 -> 1.185-1.186; the one-state rules (three tasks in registers) were slower with it
//! (Lion 8-bit 1.000 -> 1.014-1.015, SGD 8-bit 1.000 -> 1.012-1.014, Lion 4-bit 0.987-0.994 ->
//! 1.002-1.003), so they keep reading the entry; the bf16-parameter kernel spilled 128 bytes.
//! So do the fp32-state kernels: with the copy (ptxas sm_90a: 94 -> 102 registers, LDG.E.64 in
//! the kernel 59 -> 16) AdamW 32-bit was slower, H200, 2^28 parameters, 2026-11-30 22:10 UTC,
//! three interleaved rounds, ms, median, without / with: 1.8928 / 1.9152 (+1.2%), paged 1.8765 /
//! 1.9006, 64 tensors 1.9037 / 1.9168 (docs/benchmarks.md, "opt7").
#ifndef QMEM_OPTIM_FUSED_ENTRY_IN_REGISTERS
#define QMEM_OPTIM_FUSED_ENTRY_IN_REGISTERS 1
#endif
inline constexpr bool fused_entry_in_registers = QMEM_OPTIM_FUSED_ENTRY_IN_REGISTERS != 0;

//! Whether multi_tensor_step launches the fused kernel of a group with fp32 parameters, gradients
//! and states, stepped by Adam or AdamW (AdamW 32-bit), with one warp per task (one pass: as many
//! blocks as the tasks need, each warp one task) instead of the resident grid that strides over the
//! tasks: 1. A group of one tensor runs the plain kernel so, a group of several the kernel's
//! WarpLookup form (each warp finds its tensor with find_tensor_warp).
//! opt7, H200, 2^28 parameters, 2026-11-30 22:10 UTC, the plain kernel, ms, median, grid stride /
//! one pass: AdamW 32-bit 1.8928 / 1.7993 (-4.9%; three interleaved rounds, one process each:
//! 1.8920-1.8940 / 1.7967-1.8013, 97.7% of the same process's copy); paged 1.8765 / 1.8361, but 64
//! tensors of 4 Mi 1.9037 / 2.0057 (+5.4%: each warp ran find_tensor's binary searches, a chain of
//! dependent loads, for its single task).
//! opt8, H200, 2026-11-30 23:24 UTC, three rounds of one process per build, order rotated, ms,
//! median of the rounds' means, HEAD (plain kernel; one pass for one tensor only) / WarpLookup form
//! one pass for every group: one tensor 1.7889 / 1.8137 (+1.4%, 3 of 3 rounds), paged 1.8215 /
//! 1.8463, 64 tensors of 4 Mi 1.9042 / 1.8312 (-3.8%), 4 tensors of mixed sizes 1.9350 / 1.8177
//! (-6.1%), 1024 of mixed sizes (256 of them 1000-38851 elements) 1.9495 / 1.8611 (-4.5%); copy
//! 2.009.
//! Hence the split: one tensor the plain kernel (1.789), several the WarpLookup form (64 tensors
//! 1.831, +2.4% over one tensor). Not profiled why the WarpLookup form is slower on one tensor (it
//! does no search there); ptxas sm_90a gives it 76 registers against the plain kernel's 94, so 3
//! resident blocks per SM instead of 2, and 20 warps per SM instead of 16 made this step 0.8%
//! slower before (docs/benchmarks.md, "optim5"). The other rules with fp32 states (Lion, SGD, LAMB,
//! ...) keep the grid stride: not timed. Overridable for tuning runs (0: always the resident grid).
#ifndef QMEM_OPTIM_FUSED_FP32_ONE_PASS
#define QMEM_OPTIM_FUSED_FP32_ONE_PASS 1
#endif

namespace detail {
//! Whether groups of Rule x Policy x P x G launch one pass (QMEM_OPTIM_FUSED_FP32_ONE_PASS): fp32
//! parameters, gradients and states, Adam or AdamW. A group of several tensors then runs the
//! kernel's WarpLookup form (fused_step_kernel), a group of one tensor the plain form.
template <update_rule Rule, state_policy Policy, class P, class G>
consteval bool one_pass_kernel_of() {
  bool const enabled = QMEM_OPTIM_FUSED_FP32_ONE_PASS != 0;
  bool const fp32_states = kernel_traits<Rule, Policy>::fp32_states;
  bool const fp32_params_grads = std::same_as<P, float> && std::same_as<G, float>;
  bool const adam_family = std::same_as<Rule, adamw> || std::same_as<Rule, adam>;
  return enabled && fp32_states && fp32_params_grads && adam_family;
}
template <update_rule Rule, state_policy Policy, class P, class G>
inline constexpr bool one_pass_kernel = one_pass_kernel_of<Rule, Policy, P, G>();
} // namespace detail

//! The largest tensor (elements) that the pipelined loop runs: 2^32. The loop indexes elements,
//! codes and absmax blocks with 32-bit tensor-relative indices (every element index t x 256 +
//! 8 lane of such a tensor fits), so that an address is one IMAD.WIDE.U32 from the tensor's 64-bit
//! base pointer instead of 64-bit shifts, masks and carries per stream and task (ptxas sm_90,
//! nvcc 13.0, 2026-11-30: the AdamW 4-bit loop 66 SASS instructions shorter per two tasks, the
//! 8-bit one 25, Lion 4-bit 108 per three; see docs/benchmarks.md, "optim4"). A larger tensor's
//! full tasks run one at a time (the loop after it, 64-bit indices, no pipelining): a loop with
//! either index type in one kernel spilled 136-176 bytes (AdamW 4-bit). Overridable for tests
//! (0: no tensor takes the pipelined loop).
//! Counting the loop's tasks in 32 bits from the tensor's first as well (not the global 64-bit
//! task numbers) spilled 72-88 bytes in the AdamW kernels (ptxas sm_90, nvcc 13.0, 2026-11-30):
//! not timed.
#ifndef QMEM_OPTIM_FUSED_INDEX32_MAX_SIZE
#define QMEM_OPTIM_FUSED_INDEX32_MAX_SIZE 0x100000000ull
#endif
inline constexpr std::uint64_t fused_index32_max_size = QMEM_OPTIM_FUSED_INDEX32_MAX_SIZE;

namespace detail {
//! Whether the fused kernel of Rule x Policy pipelines its loads: with fused_pipeline, when every
//! state is blockwise (the quantized steps, bound by latency; the fp32-state steps stream at 90%
//! of a copy and would spill their 32 extra registers). Nor do the fp32-state steps gain from
//! asking L2 for a later task's arrays: one cp.async.bulk.prefetch.L2 (evict_last) per array from
//! lanes 0-3, one / two of the warp's tasks ahead, ms (H200, 2026-11-30 13:46 UTC, three runs
//! each, without / one / two): AdamW 32-bit 1.887-1.911 / 1.911-1.936 / 2.045-2.065, paged
//! 1.891-1.896 / 1.915-1.924 / 2.056-2.060, Lion 32-bit 1.352-1.357 / 1.380-1.401 /
//! 1.505-1.519: removed. Pipelined like the quantized steps (the next task in registers), the
//! AdamW 32-bit kernel spills 592-720 bytes at 128 registers (ptxas sm_90, nvcc 13.0,
//! 2026-11-30, with or without the entry copy): not timed.
template <update_rule Rule, state_policy Policy>
inline constexpr bool pipelined = [] {
  bool all = true;
  [&]<int... J>(std::integer_sequence<int, J...>) {
    ((all = all && kernel_traits<Rule, Policy>::template format<J>::blockwise), ...);
  }
  (std::make_integer_sequence<int, Rule::state_count>{});
  return fused_pipeline && all;
}();

//! Tasks in registers per warp in the pipelined loop of Rule x Policy (2: the current and the
//! next; more for the one-state rules, see QMEM_OPTIM_FUSED_PIPELINE_DEPTH_ONE_STATE).
template <update_rule Rule, state_policy Policy>
inline constexpr int pipeline_depth =
    Rule::state_count == 1 ? QMEM_OPTIM_FUSED_PIPELINE_DEPTH_ONE_STATE
                           : QMEM_OPTIM_FUSED_PIPELINE_DEPTH_TWO_STATE;
static_assert(QMEM_OPTIM_FUSED_PIPELINE_DEPTH_ONE_STATE >= 2 &&
              QMEM_OPTIM_FUSED_PIPELINE_DEPTH_TWO_STATE >= 2);

} // namespace detail

namespace detail {

//! The register bound of a kernel that does not pipeline: fused_min_blocks when every state is
//! fp32, fused_min_blocks_16bit_states otherwise.
template <update_rule Rule, state_policy Policy>
inline constexpr int unpipelined_min_blocks = [] {
  bool all_fp32 = true;
  [&]<int... J>(std::integer_sequence<int, J...>) {
    ((all_fp32 =
          all_fp32 &&
          std::is_same_v<typename kernel_traits<Rule, Policy>::template format<J>, fp32_format>),
     ...);
  }
  (std::make_integer_sequence<int, Rule::state_count>{});
  return all_fp32 ? fused_min_blocks : fused_min_blocks_16bit_states;
}();
} // namespace detail

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

//! The fused kernel: warp tasks [task_begin, task_end) across all tensors, grid-stride or in one
//! contiguous range per warp (fused_contiguous_below); with WarpLookup (one-pass kernels of groups
//! of several tensors, see detail::one_pass_kernel), task task_begin + warp and every
//! (warps)-th after it, each task's tensor found by find_tensor_warp.
template <update_rule Rule, state_policy Policy, class P, class G, nonfinite_policy NonFinite,
          bool WarpLookup = false>
__global__ void __launch_bounds__(fused_block_threads,
                                  detail::pipelined<Rule, Policy>
                                      ? QMEM_OPTIM_FUSED_MIN_BLOCKS_PIPELINED
                                      : detail::unpipelined_min_blocks<Rule, Policy>)
    fused_step_kernel(__grid_constant__ fused_args<Rule, Policy> const args) {
  using traits = kernel_traits<Rule, Policy>;
  using tables_t = typename traits::shared_tables;
  static_assert(sizeof(tables_t) % 16 == 0 && std::is_trivially_copyable_v<tables_t>);
  // (aligned to 256 bytes: the 4-bit decode puts 4 x code in the low byte of the tables' address)
  __shared__ alignas(256) uint4 table_words[sizeof(tables_t) / 16];
  {
    auto const* src = reinterpret_cast<uint4 const*>(&shared_tables_image<Rule, Policy>);
    for (unsigned w = threadIdx.x; w < sizeof(tables_t) / 16; w += blockDim.x)
      table_words[w] = src[w];
  }
  __syncthreads();
  auto const& tables = *reinterpret_cast<tables_t const*>(table_words);
  // launched as a programmatic dependent (step_pdl): the table copy above reads only the constant
  // image; the control block, the scalars and the tensors are read after the previous kernel ends
  detail::pdl_wait();
  if (args.control->skip != 0)
    return;
  float const grad_scale = args.control->grad_scale;
  std::int32_t const step = args.control->step;
  unsigned const lane = threadIdx.x & 31u;
  std::uint64_t const warp_count = (static_cast<std::uint64_t>(gridDim.x) * blockDim.x) >> 5;
  std::uint64_t const warp =
      (static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if constexpr (WarpLookup) {
    // one task per warp with the one-pass grid: its tensor found by the whole warp at once
    for (std::uint64_t task = args.task_begin + warp; task < args.task_end; task += warp_count) {
      std::uint32_t const owner =
          detail::find_tensor_warp(args.first_tasks, args.tensor_count, task, lane);
      typename Rule::scalars const k = args.scalars[owner];
      tensor_entry const* const entry = args.tensors + owner;
      std::uint64_t const local = task - entry->first_task;
      if (entry->vectorized != 0 && local < entry->size / traits::task_elements)
        detail::fused_task<Rule, Policy, P, G, NonFinite, true>(
            entry, local, k, grad_scale, step, args.seed, args.param_stochastic != 0, tables, lane);
      else
        partial_task<Rule, Policy, P, G, NonFinite>(entry, local, k, grad_scale, step, args.seed,
                                                    args.param_stochastic != 0, tables, lane);
    }
    return;
  }
  // which tasks this warp takes (warp-uniform): every warp_count-th from its own (grid stride), or,
  // when the launch's tensors give a warp few tasks each (fused_contiguous_below), one contiguous
  // range, so that the pipeline restarts at the warp's few tensor boundaries only
  std::uint32_t owner = detail::find_tensor(args.tensors, args.tensor_count, args.task_begin, 0);
  std::uint64_t const launch_tasks = args.task_end - args.task_begin;
  std::uint64_t const launch_tensors =
      detail::find_tensor(args.tensors, args.tensor_count, args.task_end - 1, owner) - owner + 1;
  bool const contiguous =
      launch_tasks < launch_tensors * warp_count * std::uint64_t{fused_contiguous_below};
  std::uint64_t const per_warp = (launch_tasks + warp_count - 1) / warp_count;
  std::uint64_t const warps = contiguous ? 1 : warp_count; // the stride between a warp's tasks
  std::uint64_t const range_begin = args.task_begin + (contiguous ? warp * per_warp : warp);
  std::uint64_t const range_end =
      contiguous && range_begin + per_warp < args.task_end ? range_begin + per_warp : args.task_end;
  // outer loop: one trip per tensor this warp meets (its scalars and bounds read once); inner
  // loop: the warp's tasks of that tensor. (One loop with the tensor lookup and a conditional
  // reload of the scalars per task cost 12 instructions per task-lane more, ptxas sm_90, and
  // kept the lookup's state in local memory.)
  for (std::uint64_t task = range_begin; task < range_end;) {
    owner = detail::find_tensor(args.tensors, args.tensor_count, task, owner);
    typename Rule::scalars const k = args.scalars[owner];
    // QMEM_OPTIM_FUSED_ENTRY_IN_REGISTERS: the tensor's pointers copied once per tensor, not
    // reloaded from global memory per task (the stores between could alias them)
    // (fp32 parameters and two-state pipelined kernels only: see fused_entry_in_registers)
    constexpr bool copy_entry = fused_entry_in_registers && std::same_as<P, float> &&
                                detail::pipelined<Rule, Policy> && Rule::state_count >= 2;
    [[maybe_unused]] tensor_entry entry_copy;
    if constexpr (copy_entry)
      entry_copy = args.tensors[owner];
    tensor_entry const* const entry = copy_entry ? &entry_copy : args.tensors + owner;
    std::uint64_t const first_task = entry->first_task;
    std::uint64_t const stop = entry->end_task < range_end ? entry->end_task : range_end;
    // the tasks wholly inside the tensor, when its pointers allow the vector path
    std::uint64_t const full_end =
        first_task + (entry->vectorized != 0 ? entry->size / traits::task_elements : 0);
    if constexpr (detail::pipelined<Rule, Policy>) {
      // the next depth - 1 full tasks' loads are issued before the current one computes
      std::uint64_t const full_stop = full_end < stop ? full_end : stop;
      constexpr int depth = detail::pipeline_depth<Rule, Policy>;
      // with 32-bit tensor-relative indices (fused_index32_max_size: the casts below are exact,
      // each taken of a task below full_stop); a larger tensor takes the loop after this one
      if (task < full_stop && entry->size <= fused_index32_max_size) {
        // buffers used in turn (a ring unrolled over its positions): copying the loaded task
        // into the current one cost 32 register moves per task-lane (ptxas sm_90, AdamW 8-bit)
        using Index = std::uint32_t;
        detail::full_task_data<Rule, Policy, P, G> buffer[depth];
        QMEM_UNROLL
        for (int d = 0; d + 1 < depth; ++d)
          if (task + d * warps < full_stop)
            detail::load_full_task(entry, static_cast<Index>(task + d * warps - first_task), lane,
                                   buffer[d]);
        auto run = [&](auto const& cur, auto& ahead) {
          std::uint64_t const ahead_task = task + (depth - 1) * warps;
          if (ahead_task < full_stop)
            detail::load_full_task(entry, static_cast<Index>(ahead_task - first_task), lane, ahead);
          if constexpr (QMEM_OPTIM_FUSED_PREFETCH_L2 != 0) {
            std::uint64_t const far_task = ahead_task + warps;
            if (far_task < full_stop)
              detail::prefetch_full_task<Rule, Policy, P, G>(
                  entry, static_cast<Index>(far_task - first_task), lane);
          }
          detail::fused_task<Rule, Policy, P, G, NonFinite, true, true>(
              entry, static_cast<Index>(task - first_task), k, grad_scale, step, args.seed,
              args.param_stochastic != 0, tables, lane, &cur);
          task += warps;
          return task < full_stop;
        };
        auto ring = [&]<int... D>(std::integer_sequence<int, D...>) {
          return (run(buffer[D], buffer[(D + depth - 1) % depth]) && ...);
        };
        while (ring(std::make_integer_sequence<int, depth>{})) {
        }
      }
    }
    for (; task < stop; task += warps) {
      if (task < full_end)
        detail::fused_task<Rule, Policy, P, G, NonFinite, true>(
            entry, task - first_task, k, grad_scale, step, args.seed, args.param_stochastic != 0,
            tables, lane);
      else
        partial_task<Rule, Policy, P, G, NonFinite>(entry, task - first_task, k, grad_scale, step,
                                                    args.seed, args.param_stochastic != 0, tables,
                                                    lane);
    }
  }
}

} // namespace qmem::optim::cuda
