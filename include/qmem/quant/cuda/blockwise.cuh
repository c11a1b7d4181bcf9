#pragma once
//! \file
//! CUDA kernels of blockwise quantization: the `exec::cuda` branch of quant/blockwise.hpp and
//! quant/double_quant.hpp calls `qmem::quant::cuda_impl::<same name><C>(e, <same arguments>)`
//! after checking the preconditions, so the functions here do not check them again.
//!
//! They compute exactly the function spelled out in quant/detail/blockwise_ops.hpp, with the same
//! element code (C::encode / C::decode / encode_stochastic, the one-rounding float operations of
//! core/fmath.hpp), so the codes, scales and values are bit-identical to the host's.
//!
//! How the work is laid out (the fast path, for 16-byte aligned tensors):
//! - quantize, nearest rounding (quantize_whole): a *group* of G threads owns one whole
//!   quantization block; each thread loads 64 bytes of input with four 16-byte vector loads (the
//!   group's lanes on consecutive vectors), the group takes the maximum of the |x| bit patterns
//!   with warp shuffles (and shared memory across warps when G > 32), then each thread encodes
//!   its values: blocks with an absmax in [2^-126, 2^126) through normal_encoder (NF4 / FP4: an
//!   interval table, two instructions past the scaling; 8-bit maps: the bucket table without NaN
//!   and range tests), the others through C::encode, and stores one code word per vector. A
//!   partial last block goes to quantize_scalar. A grid sized to the SM count walks the blocks.
//! - quantize, stochastic rounding (quantize_aligned): the same layout with 32 bytes per thread,
//!   per-element bounds tests, every element through encode_stochastic.
//! - dequantize: a thread owns 16-byte output vectors (8 bf16 / 4 fp32 values, inside one block),
//!   consecutive threads consecutive vectors, two per thread and one loop step per thread (a
//!   grid of resident CTAs striding over the tensor held the write-heavy stream at 86% of the
//!   copy bandwidth); it reads the codes and the scale of each, decodes a 4-bit code with one warp
//!   shuffle (lane l holds the value of code l % 16: no shared memory, no CTA barrier) and an
//!   8-bit code with one load from a shared table of decoded values (copied from device memory),
//!   rounds bf16 / f16 outputs two at a time with the hardware conversion, and writes one 16-byte
//!   store.
//! - double quantization (quantize_scales): one cooperative kernel (offset_nested_quantize) loads
//!   the scales once, sums them (exact in any order, checked from their bit span; else the
//!   host's tree order), waits at a grid barrier and quantizes its registers with the mean (the
//!   8-bit bucket table arrives in shared memory by cp.async meanwhile); for more scales than one
//!   wave holds, or when the runtime refuses the cooperative launch as too large (a context with
//!   a share of the SMs), the offset's fixed-order mean in one kernel (offset_mean:
//!   exact warp sums where the order cannot matter, the host's order elsewhere), then the nested
//!   8-bit quantization (nested_quantize: one step per thread), launched as a programmatic
//!   dependent of it.
//! Unaligned views (subviews at odd offsets) take a scalar path that computes the same function.
//! Code books live in shared memory: kernel parameters sit in constant memory, which serializes
//! a warp's reads of different entries.
//!
//! Every function launches on `e.device` (device_guard) and `e.stream`, first refuses tensors that
//! do not live there (cuda_detail::check_resident: bad_argument, nothing written), checks each
//! launch, and never synchronizes (except with `e.sync_after_launch`, a debugging aid).

#include <qmem/core/config.hpp>

#if !QMEM_HAS_CUDA()
#error "qmem/quant/cuda/blockwise.cuh is for CUDA translation units (compile this file with nvcc)"
#endif

#include <qmem/core/cuda/runtime.cuh>
#include <qmem/core/exec.hpp>
#include <qmem/core/fmath.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/memory/cuda_resource.cuh>
#include <qmem/quant/codes.hpp>
#include <qmem/quant/cuda/detail/encoder.cuh>
#include <qmem/quant/detail/blockwise_ops.hpp>
#include <qmem/quant/stochastic.hpp>

#include <cuda_runtime.h>

#include <cooperative_groups.h>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <type_traits>

namespace qmem::quant::cuda_impl {
namespace kernels {

using std::size_t;
using std::uint32_t;
using std::uint8_t;

template <class C>
using book_t = std::remove_cv_t<decltype(C::book)>;

//! Children per node of the offset's summation tree; equals quant::offset_tree_arity
//! (double_quant.hpp, which includes this file after it: the CUDA tests check the two agree).
inline constexpr size_t offset_tree_arity_v = 256;

//! Threads of a CTA on the fast paths; 256 allows 8 resident CTAs (64 warps) per SM on sm_90
//! where registers permit (32 registers per thread; see quantize_min_ctas).
inline constexpr int cta_threads = 256;

//! Bytes of input one thread loads per quantization step: two 16-byte vector loads in flight per
//! thread, 64 KiB per SM at full occupancy, above the ~22 KiB Little's law asks for on an H200
//! (4.8 TB/s x ~600 ns / 132 SMs).
inline constexpr int quantize_bytes_per_thread = 32;

//! Elements of one 16-byte vector of T.
template <class T>
inline constexpr int vector_items = 16 / static_cast<int>(sizeof(T));

//! Elements per thread of the fast quantize kernel for input T: 32 bytes (two 16-byte loads),
//! and at least 8 so that a 4096-element block needs at most 512 threads.
template <class T>
inline constexpr int quantize_items = quantize_bytes_per_thread / static_cast<int>(sizeof(T)) > 8
                                          ? quantize_bytes_per_thread / static_cast<int>(sizeof(T))
                                          : 8;

//! Elements per thread of the fast quantize kernel for blocks of more than 32 * quantize_items<T>
//! elements: 64 bytes, so that blocks up to 1024 (fp32) / 2048 (bf16) elements still reduce
//! within one warp, without the two CTA barriers per step of wider groups (measured on the H200,
//! 2026-11-29, int8 from fp32 at 32 bytes per thread: block 256 at 62% of the copy bandwidth,
//! block 512 at 51%).
template <class T>
inline constexpr int quantize_items_wide = 2 * quantize_items<T>;

//! Largest CTA of the fast quantize kernel: one 4096-element block at 8 elements per thread.
inline constexpr int max_quantize_threads = 512;

//! Largest CTA a quantize_aligned<T, Items> launch uses: cta_threads at quantize_items<T> (groups
//! of at most a warp), max_quantize_threads at quantize_items_wide<T>.
template <class T, int Items>
inline constexpr int quantize_cta_limit =
    Items == quantize_items<T> ? cta_threads : max_quantize_threads;

//! Resident CTAs of quantize_cta_limit<T, Items> threads per SM that quantize_aligned's
//! __launch_bounds__ asks ptxas to fit in the register file (65536 registers per SM on sm_90).
//! ptxas 13.0 for sm_90 (-O3, 2026-11-29), nearest rounding, none with a stack frame or spills:
//! - bf16, quantize_items (NF4/FP4 blocks 16..512): 8 -> 32 registers, 64 warps per SM
//!   (48 registers without the bound; before the rounding mode became a template argument and
//!   the block offsets ints: 56-60 registers and an 8 byte stack frame, 4 CTAs);
//! - fp32, quantize_items (int8 blocks 8..256): 6 -> 39 registers, 48 warps (8 CTAs would spill
//!   8 bytes);
//! - fp32, quantize_items_wide (int8 blocks 512..4096, 256-thread CTAs up to 4096): 3 -> 40
//!   registers, 6 CTAs of 256 threads (was 63 registers, 4 CTAs);
//! - bf16, quantize_items_wide (4-bit blocks 1024..4096): 2 -> 61-64 registers (3 would spill;
//!   before: 64 registers and 40-44 bytes of spills).
//! Stochastic rounding (the generator, 48-64 registers) is not bounded: it is the rare path.
//! Measured (H200, 2^28 elements, 2026-11-29): 64 warps per SM took NF4 block 64 from 0.57 to
//! 0.46 ms and int8 block 256 from 0.59 to 0.57 ms, not the 0.30 / 0.45 ms predicted: the encode's
//! instruction count, not occupancy, set the pace. Since then nearest rounding goes through
//! quantize_whole (its own constants below) and this kernel serves stochastic rounding.
template <class T, int Items, bool Stochastic>
inline constexpr int quantize_min_ctas = Stochastic ? 1
                                                    : (Items == quantize_items<T>
                                                           ? (sizeof(T) == 2 ? 8 : 6)
                                                           : (sizeof(T) == 2 ? 2 : 3));

//! 16-byte output vectors one thread of the fast dequantize kernel handles per loop step, loaded
//! and decoded together for memory-level parallelism (consecutive lanes own consecutive vectors,
//! so every load and store instruction of a warp covers whole 32-byte sectors); the launch gives
//! each thread one step (a CTA per 1024 vectors). Measured on the H200 (2026-11-29 18:58 UTC,
//! NF4 -> bf16 block 64, 2^28 elements, same run, copy 4187 GB/s): a grid of resident CTAs
//! striding over the vectors (the kernel before) 0.194 ms; the same loop moving the same bytes
//! without decoding 0.192 with that grid and 0.175 with one step per thread (2 vectors; 4:
//! 0.178), while a write-only fill reaches 4508 GB/s and a read-only stream 4541: the resident
//! grid, not the H200, held the 1:4 stream at 86% of the copy. With decoding and one step per
//! thread, 4 vectors 0.180 ms and 2 vectors 0.190-0.194, when each CTA still computed its decode
//! table from the code book in the constant bank (serialized reads): since then the table is
//! copied from device memory after the step's loads are issued. Then (19:19 UTC, copy 4216 GB/s,
//! quant_bench's dequantize_variant rows): NF4 -> bf16 block 64 with 1 / 2 / 4 vectors 0.238 /
//! 0.185 / 0.179 ms, int8 -> fp32 block 256 0.400 / 0.334 / 0.339 (ncu, NF4: 173 us); 21:49 UTC
//! (medians, copy 4160 GB/s): NF4 1 / 2 / 4 / 8 vectors 0.237 / 0.187 / 0.182 / 0.187, int8
//! 0.405 / 0.339 / 0.345 / 0.350. So 4 for 4-bit codes, 2 for 8-bit codes (two sessions agree).
//! Since 4-bit codes are decoded by warp shuffles (no per-CTA table and barrier, see
//! dequantize_aligned), 2 for them too: 2026-11-30 16:25 UTC (copy 4180-4205 GB/s, medians of 3
//! processes), NF4 -> bf16 block 64 with 1 / 2 / 4 / 8 vectors 0.1896 / 0.1741 / 0.1775 /
//! 0.1805 ms, and in interleaved A/B rows 2 vectors 0.1738 / 0.1737 ms (NF4 / FP4) against 4
//! vectors 0.1780 / 0.1774.
template <class C>
inline constexpr int dequantize_vectors_per_step = 2;

//! Largest grid of the one-step dequantize launch (the kernel strides beyond it).
inline constexpr size_t max_grid = 0x7fffffff;

// ---- small device helpers ------------------------------------------------------------------

//! Copies a trivially copyable object (a code book) into shared memory, 4 bytes per thread step.
//! The caller synchronizes the CTA afterwards.
template <class Book>
__device__ QMEM_INLINE void copy_to_shared(Book& dst, Book const& src) {
  static_assert(sizeof(Book) % 4 == 0);
  auto* d = reinterpret_cast<uint32_t*>(&dst);
  auto const* s = reinterpret_cast<uint32_t const*>(&src);
  for (int i = static_cast<int>(threadIdx.x); i < static_cast<int>(sizeof(Book) / 4);
       i += static_cast<int>(blockDim.x))
    d[i] = s[i];
}

//! Loads one 16-byte vector of T (16-byte aligned global memory, streamed: read once).
template <class T>
__device__ QMEM_INLINE void load_vector(T (&v)[vector_items<T>], T const* p) {
  uint4 const raw = __ldcs(reinterpret_cast<uint4 const*>(p));
  __builtin_memcpy(&v[0], &raw, 16);
}

//! Stores one 16-byte vector of T (16-byte aligned global memory). Plain stores, not streaming
//! (st.global.cs): a dequantized tensor is usually read right after (by a GEMM), and evict-first
//! lines would lose the L2 hits of outputs that fit in L2 (the streaming stores gained 1.3% at
//! 2^28 elements in the harness of 2026-11-29).
template <class T>
__device__ QMEM_INLINE void store_vector(T* p, T const (&v)[vector_items<T>]) {
  uint4 raw;
  __builtin_memcpy(&raw, &v[0], 16);
  *reinterpret_cast<uint4*>(p) = raw;
}

//! Unsigned integer of `Bytes` bytes (1, 2, 4, 8, 16).
template <int Bytes>
struct word;
template <>
struct word<1> {
  using type = unsigned char;
};
template <>
struct word<2> {
  using type = unsigned short;
};
template <>
struct word<4> {
  using type = unsigned int;
};
template <>
struct word<8> {
  using type = uint2;
};
template <>
struct word<16> {
  using type = uint4;
};

//! Stores `Bytes` bytes with one instruction (`p` aligned to `Bytes`).
template <int Bytes>
__device__ QMEM_INLINE void store_bytes(uint8_t* p, uint8_t const (&b)[Bytes]) {
  typename word<Bytes>::type w;
  __builtin_memcpy(&w, b, Bytes);
  *reinterpret_cast<typename word<Bytes>::type*>(p) = w;
}

//! Loads `Bytes` bytes with one instruction (`p` aligned to `Bytes`, streamed).
template <int Bytes>
__device__ QMEM_INLINE void load_bytes(uint8_t (&b)[Bytes], uint8_t const* p) {
  auto const w = __ldcs(reinterpret_cast<typename word<Bytes>::type const*>(p));
  __builtin_memcpy(b, &w, Bytes);
}

//! Maximum over the `group` consecutive threads that share a quantization block (a power of two,
//! at most max_quantize_threads). Every thread of the CTA calls it: shuffles use the full mask,
//! and groups wider than a warp combine through shared memory between two CTA barriers (the
//! branch is uniform over the CTA).
__device__ QMEM_INLINE uint32_t group_max(uint32_t m, int group,
                                          uint32_t (&warp_max)[max_quantize_threads / 32]) {
  int const width = group < 32 ? group : 32;
  for (int offset = width / 2; offset > 0; offset /= 2) {
    uint32_t const other = __shfl_xor_sync(0xffffffffu, m, offset);
    m = other > m ? other : m;
  }
  if (group > 32) {
    int const warps_per_group = group / 32;
    int const warp = static_cast<int>(threadIdx.x) / 32;
    if (threadIdx.x % 32 == 0)
      warp_max[warp] = m;
    __syncthreads();
    int const first = warp / warps_per_group * warps_per_group;
    m = 0;
    for (int w = 0; w < warps_per_group; ++w)
      m = warp_max[first + w] > m ? warp_max[first + w] : m;
    __syncthreads(); // warp_max is reused by the next step
  }
  return m;
}

//! 1 / a, correctly rounded, for a float a in [2^-126, 2^126) (a block's absmax): the hardware
//! approximation and one Newton step, without the range tests and the slow-path call of
//! __frcp_rn (fmath::rcp), whose call made ptxas keep a stack frame and spill registers inside
//! quantize_whole's loop (ncu, H200, 2026-11-29: 537 K local-memory requests per NF4
//! quantization of 2^28 elements). Equal to fmath::rcp on every such float (the CUDA tests
//! check all of them).
__device__ QMEM_INLINE float rcp_normal(float a) noexcept {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  float const e = __fmaf_rn(-a, r, 1.0f);
  return __fmaf_rn(r, e, r);
}

// Programmatic dependent launch: the shared device half of core/cuda/runtime.cuh.
using cuda_detail::pdl_allow_dependents;
using cuda_detail::pdl_wait;

//! Identity on loaded values (plain quantization).
struct no_transform {
  __device__ QMEM_INLINE float operator()(float v) const noexcept { return v; }
};

template <class Transform>
struct transform_state;
template <>
struct transform_state<no_transform> {
  __device__ static no_transform load(no_transform t) noexcept { return t; }
};

//! The code of one normalized value: nearest (through the device encoder) or, when
//! `Stochastic`, stochastic rounding with the draw `uniform01(seed, index)`. The rounding mode is
//! a template argument so that the nearest-rounding kernels carry no generator code (registers).
template <class C, bool Stochastic, class Encoder>
__device__ QMEM_INLINE uint8_t encode_one(float x, float inv, Encoder const& enc,
                                          book_t<C> const& book, std::uint64_t seed, size_t index) {
  float const xn = fmath::mul(x, inv);
  if constexpr (Stochastic)
    return encode_stochastic<C>(xn, uniform01(seed, index), book);
  else
    return enc(xn);
}

//! What a fast quantize kernel for input T at Items elements per thread works on per thread:
//! `vectors` 16-byte vectors of `vec` elements, each giving `code_bytes_per_vector` code bytes.
template <class C, class T, int Items>
struct thread_layout {
  static constexpr int vec = vector_items<T>;
  static constexpr int vectors = Items / vec;
  static constexpr int code_bytes_per_vector = C::bits == 8 ? vec : vec / 2;
  static_assert(Items % vec == 0 && vec % 2 == 0);
};

//! Shared memory of the quantize kernels: the code book, the encoder's storage and the per-warp
//! maxima of group_max.
template <class C, class Encoder>
struct quantize_shared {
  book_t<C> book;
  alignas(16) typename Encoder::storage encoder;
  uint32_t warp_max[max_quantize_threads / 32];

  //! Fills the book and the encoder's storage with the CTA, then synchronizes it; returns the
  //! encoder's per-thread functor.
  __device__ QMEM_INLINE auto prepare(book_t<C> const& b,
                                      typename Encoder::params const& p) noexcept {
    copy_to_shared(book, b);
    Encoder::prepare(encoder, p);
    __syncthreads();
    return Encoder::make(encoder, p, book);
  }
};

// ---- quantize ------------------------------------------------------------------------------

//! Fast quantize kernel: aligned input and codes, a power-of-two block size of at least
//! Items (quantize_items<T> or quantize_items_wide<T>). A group of `group_size` =
//! block_size / Items consecutive threads owns one
//! block; the CTA has max(group_size, cta_threads) threads and works on blockDim.x / group_size
//! blocks per step. Thread `lane` of a group loads vectors j = 0, 1, ... at block offset
//! (j * group_size + lane) * vector_items: the group's lanes read consecutive 16-byte vectors, so
//! each load instruction covers whole 32-byte sectors (a thread-contiguous layout would request
//! every sector twice).
template <class C, class T, int Items, class Transform, bool Stochastic>
__global__ void __launch_bounds__(quantize_cta_limit<T, Items>,
                                  quantize_min_ctas<T, Items, Stochastic>)
    quantize_aligned(T const* QMEM_RESTRICT x, size_t n, int block_shift,
                     uint8_t* QMEM_RESTRICT codes, float* QMEM_RESTRICT absmax, size_t blocks,
                     std::uint64_t seed, book_t<C> book,
                     typename device_encoder<C>::params const enc_params, Transform transform) {
  constexpr int items = Items;
  using lay = thread_layout<C, T, Items>;
  constexpr int vec = lay::vec;
  constexpr int vectors = lay::vectors;
  constexpr int code_bytes_per_vector = lay::code_bytes_per_vector;
  int const group_size = (1 << block_shift) / items;
  int const blocks_per_cta = static_cast<int>(blockDim.x) / group_size;
  __shared__ quantize_shared<C, device_encoder<C>> sh;
  auto const enc = sh.prepare(book, enc_params);
  book_t<C> const& sbook = sh.book;
  auto& warp_max = sh.warp_max;
  auto const tf = transform_state<Transform>::load(transform);

  int const group = static_cast<int>(threadIdx.x) / group_size;
  int const lane = static_cast<int>(threadIdx.x) % group_size;
  int const block_len = 1 << block_shift;
  size_t const stride = static_cast<size_t>(gridDim.x) * static_cast<size_t>(blocks_per_cta);
  for (size_t first = static_cast<size_t>(blockIdx.x) * static_cast<size_t>(blocks_per_cta);
       first < blocks; first += stride) {
    size_t const blk = first + static_cast<size_t>(group);
    size_t const block_begin = blk << block_shift;
    // elements of this group's block inside [0, n): 0 for a group past the last block. Offsets
    // inside a block are ints (a block has at most 2^12 elements), which keeps the 64-bit address
    // arithmetic out of the inner loops (registers).
    int const count = blk >= blocks ? 0
                      : n - block_begin < static_cast<size_t>(block_len)
                          ? static_cast<int>(n - block_begin)
                          : block_len;
    T const* const xb = x + (blk < blocks ? block_begin : 0);
    // The raw input stays in registers as loaded (bf16: half the registers of floats) and is
    // widened again when encoded (one shift per element).
    T raw[vectors][vec];
    QMEM_UNROLL
    for (int j = 0; j < vectors; ++j) {
      int const off = (j * group_size + lane) * vec;
      if (off + vec <= count) {
        load_vector(raw[j], xb + off);
      } else {
        QMEM_UNROLL
        for (int k = 0; k < vec; ++k)
          raw[j][k] = off + k < count ? xb[off + k] : T{};
      }
    }
    uint32_t m = 0;
    if (count == block_len) {
      QMEM_UNROLL
      for (int j = 0; j < vectors; ++j) {
        QMEM_UNROLL
        for (int k = 0; k < vec; ++k) {
          uint32_t const b = quant::detail::abs_bits(tf(to_float(raw[j][k])));
          m = b > m ? b : m;
        }
      }
    } else { // the last, partial block (or none): elements past its end do not count
      QMEM_UNROLL
      for (int j = 0; j < vectors; ++j) {
        QMEM_UNROLL
        for (int k = 0; k < vec; ++k) {
          uint32_t const b = quant::detail::abs_bits(tf(to_float(raw[j][k])));
          m = (j * group_size + lane) * vec + k < count && b > m ? b : m;
        }
      }
    }
    m = group_max(m, group_size, warp_max);
    if (count == 0)
      continue;
    float const amax = qmem::detail::bits_to_float(m);
    if (lane == 0)
      absmax[blk] = amax;
    float const inv = fmath::rcp(amax);
    QMEM_UNROLL
    for (int j = 0; j < vectors; ++j) {
      int const off = (j * group_size + lane) * vec;
      if (off >= count)
        continue;
      size_t const begin = block_begin + static_cast<size_t>(off); // stochastic draws only
      uint8_t c[code_bytes_per_vector];
      if constexpr (C::bits == 8) {
        QMEM_UNROLL
        for (int k = 0; k < vec; ++k)
          c[k] = encode_one<C, Stochastic>(tf(to_float(raw[j][k])), inv, enc, sbook, seed,
                                           begin + static_cast<size_t>(k));
      } else {
        QMEM_UNROLL
        for (int k = 0; k < vec / 2; ++k) {
          uint8_t const hi = encode_one<C, Stochastic>(tf(to_float(raw[j][2 * k])), inv, enc, sbook,
                                                       seed, begin + 2 * k);
          uint8_t const lo = off + 2 * k + 1 < count
                                 ? encode_one<C, Stochastic>(tf(to_float(raw[j][2 * k + 1])), inv,
                                                             enc, sbook, seed, begin + 2 * k + 1)
                                 : static_cast<uint8_t>(C::zero_code);
          c[k] = quant::detail::pack_nibbles(hi, lo);
        }
      }
      uint8_t* const cp =
          codes + (C::bits == 8 ? block_begin : block_begin / 2) + (C::bits == 8 ? off : off / 2);
      if (off + vec <= count) {
        store_bytes<code_bytes_per_vector>(cp, c);
      } else {
        // unrolled with a predicate: an indexed loop would put c[] in local memory (stack)
        int const valid = C::bits == 8 ? count - off : (count - off + 1) / 2;
        QMEM_UNROLL
        for (int k = 0; k < code_bytes_per_vector; ++k)
          if (k < valid)
            cp[k] = c[k];
      }
    }
  }
}

//! Element k of a 16-byte vector of T held as raw words, as float (exact).
template <class T>
__device__ QMEM_INLINE float vector_element(uint4 const& v, int k) noexcept {
  uint32_t const word[4] = {v.x, v.y, v.z, v.w}; // k is a constant after unrolling
  if constexpr (std::is_same_v<T, float>) {
    return qmem::detail::bits_to_float(word[k]);
  } else if constexpr (std::is_same_v<T, bf16>) {
    return qmem::detail::bits_to_float(k % 2 == 0 ? word[k / 2] << 16 : word[k / 2] & 0xffff0000u);
  } else if constexpr (sizeof(T) == 2) {
    uint32_t const w = word[k / 2];
    return to_float(T::from_bits(static_cast<std::uint16_t>(k % 2 == 0 ? w & 0xffffu : w >> 16)));
  } else {
    static_assert(sizeof(T) == 8);
    T d;
    uint32_t const pair[2] = {word[2 * k], word[2 * k + 1]};
    __builtin_memcpy(&d, pair, sizeof d);
    return to_float(d);
  }
}

// fp32 absmax through max.NaN (QMEM_QUANT_F32_ABSMAX_FMNMX, removed 2026-11-30): a thread's
// absmax of 16 values 24 -> 18 instructions (ptxas 13.0, sm_90), but timed on the H200
// (2026-11-30 07:25 UTC, 3 fresh processes each, medians) with the int8 sign IMAD
// (detail/encoder.cuh): int8 quantize block 256 0.3362 -> 0.3457 ms (+2.8%; ncu 328.1 -> 339.4
// us): spills at quantize_whole's 40-register bound. The bit-pattern maximum below stays.

//! Maximum of the |transform(x)| bit patterns of a thread's loaded vectors. bf16 without a
//! transform: two 16-bit lanes per instruction on the raw words (the bf16 -> float widening is a
//! shift, so the order of the bf16 bit patterns is that of the floats', NaNs included).
template <class T, class Tf, int Vectors>
__device__ QMEM_INLINE uint32_t thread_abs_max(uint4 const (&raw)[Vectors], Tf const& tf) {
  if constexpr (std::is_same_v<T, bf16> && std::is_same_v<Tf, no_transform>) {
    // Without masking each word: as unsigned 16-bit lanes the raw maximum is the largest
    // negative magnitude with its sign bit when there is a negative value (else the largest
    // positive), and as signed lanes from 0 the largest positive (else 0); the larger of the
    // first without its sign bit and the second is the largest magnitude. 2 three-input
    // maxima per 2 words instead of 2 masks and 1 (SASS, ptxas 13.0 sm_90, 2026-11-30: NF4 /
    // FP4 quantize_whole's absmax of 32 bf16 values 24 -> 18 instructions).
    uint32_t acc_u = 0;
    uint32_t acc_s = 0;
    QMEM_UNROLL
    for (int j = 0; j < Vectors; ++j) {
      acc_u = __vmaxu2(acc_u, raw[j].x);
      acc_s = __vmaxs2(acc_s, raw[j].x);
      acc_u = __vmaxu2(acc_u, raw[j].y);
      acc_s = __vmaxs2(acc_s, raw[j].y);
      acc_u = __vmaxu2(acc_u, raw[j].z);
      acc_s = __vmaxs2(acc_s, raw[j].z);
      acc_u = __vmaxu2(acc_u, raw[j].w);
      acc_s = __vmaxs2(acc_s, raw[j].w);
    }
    uint32_t const acc = __vmaxu2(acc_u & 0x7fff7fffu, acc_s);
    uint32_t const hi = acc >> 16;
    uint32_t const lo = acc & 0xffffu;
    return (hi > lo ? hi : lo) << 16;
  } else {
    uint32_t m = 0;
    QMEM_UNROLL
    for (int j = 0; j < Vectors; ++j) {
      QMEM_UNROLL
      for (int k = 0; k < vector_items<T>; ++k) {
        uint32_t const b = quant::detail::abs_bits(tf(vector_element<T>(raw[j], k)));
        m = b > m ? b : m;
      }
    }
    return m;
  }
}

//! Four code bytes (the low byte of each argument) as one word, first in the lowest byte.
__device__ QMEM_INLINE uint32_t pack_bytes(uint32_t b0, uint32_t b1, uint32_t b2,
                                           uint32_t b3) noexcept {
  return __byte_perm(__byte_perm(b0, b1, 0x0040), __byte_perm(b2, b3, 0x0040), 0x5410);
}

//! Encodes one loaded vector with `enc` (whose results' low C::bits bits are the code) and
//! stores its codes (vector_items<T> bytes for 8-bit codes, half that for 4-bit) with one
//! instruction at `cp`.
template <class C, class T, class Tf, class Encoder>
__device__ QMEM_INLINE void encode_store_vector(uint8_t* cp, uint4 const& v, float inv,
                                                Tf const& tf, Encoder const& enc) {
  constexpr int vec = vector_items<T>;
  constexpr int bytes = C::bits == 8 ? vec : vec / 2;
  uint32_t b[bytes < 4 ? 4 : bytes] = {};
  QMEM_UNROLL
  for (int k = 0; k < bytes; ++k) {
    if constexpr (C::bits == 8) {
      b[k] = enc(fmath::mul(tf(vector_element<T>(v, k)), inv));
    } else {
      // the first element in the high nibble; the second's bits 4..7 are zero (codes < 16), so
      // the low byte is exact whatever lies above bit 7 in either result
      uint32_t const hi = enc(fmath::mul(tf(vector_element<T>(v, 2 * k)), inv));
      uint32_t const lo = enc(fmath::mul(tf(vector_element<T>(v, 2 * k + 1)), inv));
      b[k] = (hi << 4) + lo;
    }
  }
  if constexpr (bytes == 1) {
    *cp = static_cast<uint8_t>(b[0]);
  } else if constexpr (bytes == 2) {
    *reinterpret_cast<unsigned short*>(cp) =
        static_cast<unsigned short>(__byte_perm(b[0], b[1], 0x0040));
  } else if constexpr (bytes == 4) {
    *reinterpret_cast<uint32_t*>(cp) = pack_bytes(b[0], b[1], b[2], b[3]);
  } else if constexpr (bytes == 8) {
    *reinterpret_cast<uint2*>(cp) =
        make_uint2(pack_bytes(b[0], b[1], b[2], b[3]), pack_bytes(b[4], b[5], b[6], b[7]));
  } else {
    static_assert(bytes == 16);
    *reinterpret_cast<uint4*>(cp) =
        make_uint4(pack_bytes(b[0], b[1], b[2], b[3]), pack_bytes(b[4], b[5], b[6], b[7]),
                   pack_bytes(b[8], b[9], b[10], b[11]), pack_bytes(b[12], b[13], b[14], b[15]));
  }
}

//! The four code bytes of one loaded vector whose codes are 4 bytes (4-bit codes of 8 bf16 / f16
//! values, 8-bit codes of 4 floats), encoded with `enc`, as one word (first code byte lowest).
template <class C, class T, class Tf, class Encoder>
__device__ QMEM_INLINE uint32_t encode_vector_word(uint4 const& v, float inv, Tf const& tf,
                                                   Encoder const& enc) {
  constexpr int vec = vector_items<T>;
  static_assert((C::bits == 8 ? vec : vec / 2) == 4);
  uint32_t b[4];
  QMEM_UNROLL
  for (int k = 0; k < 4; ++k) {
    if constexpr (C::bits == 8) {
      b[k] = enc(fmath::mul(tf(vector_element<T>(v, k)), inv));
    } else {
      uint32_t const hi = enc(fmath::mul(tf(vector_element<T>(v, 2 * k)), inv));
      uint32_t const lo = enc(fmath::mul(tf(vector_element<T>(v, 2 * k + 1)), inv));
      b[k] = (hi << 4) + lo; // as in encode_store_vector: the low byte is exact
    }
  }
  return pack_bytes(b[0], b[1], b[2], b[3]);
}

//! Regroups the code words of the `group` (1, 2 or 4) lanes that share a block, word j of lane l
//! being the codes of the block's vector j * group + l, so that lane l holds the words of vectors
//! 4l .. 4l + 3 (16 contiguous code bytes: one store per lane, whole 32-byte sectors per group
//! of two or more lanes). Butterfly exchanges of two words with the lane `group / 2` and then
//! the lane 1 away (a 4 x 4 transpose for group 4). Every lane of the warp calls it (the group
//! size is uniform over the CTA).
__device__ QMEM_INLINE uint4 gather_block_words(uint32_t const (&w)[4], int group, int lane) {
  uint32_t a = w[0];
  uint32_t b = w[1];
  uint32_t c = w[2];
  uint32_t d = w[3];
  if (group == 4) { // lanes l < 2 trade their words 2, 3 for the words 0, 1 of lane l + 2
    bool const upper = (lane & 2) != 0;
    uint32_t const r0 = __shfl_xor_sync(0xffffffffu, upper ? a : c, 2);
    uint32_t const r1 = __shfl_xor_sync(0xffffffffu, upper ? b : d, 2);
    a = upper ? r0 : a;
    b = upper ? r1 : b;
    c = upper ? c : r0;
    d = upper ? d : r1;
  }
  if (group == 4 || group == 2) {
    bool const odd = (lane & 1) != 0;
    // group 4: the even lane sends its words 1, 3 and the odd lane its words 0, 2; group 2: the
    // even lane sends 2, 3 and the odd lane 0, 1
    uint32_t const s0 = odd ? a : (group == 4 ? b : c);
    uint32_t const s1 = odd ? (group == 4 ? c : b) : d;
    uint32_t const r0 = __shfl_xor_sync(0xffffffffu, s0, 1);
    uint32_t const r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
    if (group == 4)
      return odd ? make_uint4(r0, b, r1, d) : make_uint4(a, r0, c, r1);
    return odd ? make_uint4(r0, c, r1, d) : make_uint4(a, r0, b, r1);
  }
  return make_uint4(a, b, c, d);
}

//! quantize_whole's input loads (read once) take the read-only path, ld.global.nc (__ldg).
//! Measured on the H200 (2026-11-29 18:58 UTC, 2^28 elements, quantize_whole at the dispatched
//! grid, same run, copy 4187 GB/s): NF4 from bf16 block 64 ld.global.cs 0.2029 ms, ld.global.nc
//! 0.1866, L2 evict-first policy 0.1972, nc + L1::no_allocate + L2::256B prefetch 0.2209; int8
//! from fp32 block 256: 0.3698 / 0.3433 / 0.3652 / 0.3692. A plain 4:1 read:write stream: .cs
//! 0.1721 ms, .nc 0.1628; a read-only stream is 4541 GB/s with either (the evict-first loads cost
//! only when mixed with stores). nc + L1::no_allocate alone, interleaved A/B against nc
//! (2026-11-30 07:25 UTC, medians): NF4 block 64 0.2047 -> 0.2231 ms, FP4 0.1966 -> 0.2217, int8
//! block 256 0.3508 -> 0.3679. The other forms were removed 2026-11-30 (review).

//! Bytes of input one thread of quantize_whole loads per step, for blocks that one warp covers:
//! four 16-byte loads in flight (96 KiB per SM at 48 warps), twice quantize_aligned's, to halve
//! the per-block work (shuffles, reciprocal, absmax store) per element. Measured with this value
//! (H200, 2^28 elements, 2026-11-29): NF4 from bf16 0.230 ms at block 64, 0.191 ms at block 256;
//! int8 from fp32 0.405 ms at block 256. 32 bytes was not timed in this kernel (no GPU time left).
//! Staging the codes of groups of fewer than 8 lanes through shared memory, so that each thread
//! stores 16 contiguous bytes, was measured and dropped: NF4 block 64 0.230 -> 0.247 ms, int8
//! block 64 0.414 -> 0.434 ms (the small blocks' cost is not their 8-byte partial-sector stores).
inline constexpr int whole_bytes_per_thread = 64;

//! Elements per thread of quantize_whole: whole_bytes_per_thread (narrow: groups of at most a
//! warp) or twice that (wide: larger blocks, groups of up to max_quantize_threads / 2 threads).
template <class T>
inline constexpr int whole_items = whole_bytes_per_thread / static_cast<int>(sizeof(T));
template <class T>
inline constexpr int whole_items_wide = 2 * whole_items<T>;

//! Resident CTAs per SM asked of ptxas for quantize_whole (256-thread CTAs): narrow 6
//! (at most 40 registers), wide 4 (64 registers). ptxas 13.0 sm_90: the narrow NF4 kernel uses
//! 40 registers and a 24-byte frame (3 local loads per 32 elements in its loop). Measured on the
//! H200 (2026-11-29 16:10 UTC, NF4 from bf16, block 64, the kernel as it is now, grid of one
//! wave): 6 CTAs 0.2056 ms, 5 CTAs (48 registers) 0.2066, 8 CTAs (32) 0.2123, 4 CTAs 0.2191.
template <class T, int Items>
inline constexpr int whole_min_ctas = Items == whole_items<T> ? 6 : 4;

//! Resident CTAs per SM asked of ptxas for quantize_whole with a compile-time block size
//! (whole_fixed_shift): 5 (48 registers) for 4-bit codes from 2-byte inputs, else as the
//! runtime-size kernel. ptxas 13.0 sm_90a (2026-11-30): at 6 CTAs (40 registers) the FP4 / NF4
//! from bf16 block-64 kernel spilled one 8-byte pair inside the encode (STL.64 + LDL.64 per step
//! of 32 values, 388 instructions on a normal block's path); at 5 it has no stack frame and 382.
//! Timed on the H200 (2026-11-30 19:31 UTC, quant_bench's whole_ctas_ab, the two launched in
//! turn, medians of six processes, 3 with an idle host and 3 with 16 busy processes): NF4 block 64
//! 6 CTAs 0.1930-0.1992 ms, 5 CTAs 0.1841-0.1904 (-4.1 to -4.6% in each process); FP4
//! 0.1816-0.1917 -> 0.1730-0.1823 (-4.3 to -4.9%); one kernel twice in such a row (plain_ab)
//! reads -0.5%. The runtime-size kernel keeps 6: at 5 ptxas spills more there (21 local loads in
//! the code instead of 3) and NF4 / FP4 block 128 ran 5.5-5.7% slower (same rows). The
//! int8-from-fp32 block-256 kernel has no spills at 6; 8-bit codes from 2-byte inputs were not
//! timed at 5.
template <class C, class T, int Items>
inline constexpr int whole_fixed_min_ctas = C::bits == 4 && sizeof(T) == 2
                                                ? 5
                                                : whole_min_ctas<T, Items>;

//! Waves of resident CTAs in quantize_whole's grid (each CTA still walks several steps), by the
//! size of the encoder's shared table. Measured on the H200 (2026-11-29, 16:10 UTC, NF4 from
//! bf16, the kernel with 16 table copies and per-vector code stores, test harness): one wave
//! 0.220 ms at block 64 and 0.197 at block 256, four waves 0.217 and 0.190, one CTA per step (no
//! grid-stride) 0.231 and 0.192. The 8-bit maps (whose CTAs each copy a 22.5 KB table into
//! shared memory first) had one wave until measured (21:49 UTC, int8 from fp32 block 256,
//! quant_bench's whole_waves_variant, medians over the iterations of one row each): 1 / 2 / 4 / 8
//! waves 0.356 / 0.342 / 0.334 / 0.333 ms (NF4 block 64: 0.186 / 0.186 / 0.186 / 0.192; FP4:
//! 0.193 / 0.194 / 0.200 / 0.205, within the drift between rows), so every code takes 4.
template <class EncoderStorage>
inline constexpr int whole_waves = 4;

//! The block size (log2) for which quantize_whole is instantiated with a compile-time block size
//! (its FixedShift), by element type and items per thread, or 0 for none: 2-byte inputs in blocks
//! of 64 (the 4-bit formats' default block, bitsandbytes' too), floats in blocks of 256 (the int8
//! row of issue 3). One size per input type, so that each (code, input) pair adds one kernel;
//! every other size runs the runtime-size kernel, whose SASS is unchanged. The instructions of one
//! step of a thread on a normal block (SASS, ptxas 13.0, sm_90a, 2026-11-30, the hot path traced
//! through the branches): FP4 / NF4 from bf16, block 64 (32 values): 404 -> 387, local loads
//! 3 -> 1 (one 8-byte spill pair inside the encode, gone at 5 CTAs per SM since 2026-11-30 19:31
//! UTC: whole_fixed_min_ctas, 382 instructions); int8 from fp32, block 256 (16 values):
//! 330 -> 273, no spills either way. The group's shuffles (a loop over offsets), the regrouping
//! of the codes (branches on the group size) and the 64-bit block index arithmetic fold away.
//! Timed on the H200 (2026-11-30 17:25 UTC, 2^28 elements, main's kernel and this one in
//! alternating fresh processes, 3 rounds, ms): FP4 block 64 0.1907 / 0.1919 / 0.1919 ->
//! 0.1878 / 0.1884 / 0.1893 (-1.6%), NF4 0.1899 / 0.1910 / 0.1919 -> 0.1886 / 0.1870 / 0.1878
//! (-1.6%), int8 block 256 0.3367 / 0.3366 / 0.3375 -> 0.3361 / 0.3377 / 0.3363 (unchanged: 95%
//! of the copy, bandwidth-bound; kept for its 17% fewer instructions).
template <class T, int Items>
inline constexpr int whole_fixed_shift = Items != whole_items<T>
                                             ? 0
                                             : (sizeof(T) == 2 ? 6 : (sizeof(T) == 4 ? 8 : 0));
//! The most blocks of a quantize_whole launch with a compile-time block size (32-bit block
//! indices: blk + stride stays below 2^32).
inline constexpr size_t whole_fixed_max_blocks = size_t{1} << 31;

//! Quantize kernel of whole blocks, nearest rounding: aligned input and codes, a power-of-two
//! block size of at least Items, `blocks` blocks all full (the caller quantizes a partial last
//! block with quantize_scalar). The layout is quantize_aligned's (a group of block / Items
//! threads per block, the group's lanes on consecutive 16-byte vectors), without its per-element
//! bounds tests: a group's block is whole or absent. A block whose absmax is in [2^-126, 2^126)
//! (all but blocks of zeros, subnormals, values above 2^126, infinities or NaNs) is encoded by
//! normal_encoder<C> (no NaN or range tests per element); the others by C::encode.
//! `Prefetch`: the next step's vectors are loaded before this step is encoded (16 more registers
//! per thread; meant with MinCtas 3 or 4). A candidate, not dispatched and not yet timed in this
//! form: in the test harness of 2026-11-29 16:10 UTC a kernel with the fast path only (no
//! C::encode path, per-vector code stores) went from 0.220 to 0.205 ms at NF4 block 64 and from
//! 0.197 to 0.182 at block 256 with it; here ptxas 13.0 spills the prefetched vectors (3 CTAs: 80
//! registers, 104 bytes of spill stores; 4 CTAs: 64 registers, 64 bytes). quant_bench's
//! `nf4_quantize_whole_variant` times it against the dispatched kernel.
//! `FixedShift`: log2 of the block size when it is known at compile time (the caller then passes
//! the same value as `block_shift`), or 0 when it is not (any block size, read from `block_shift`).
//! With it the group's shuffles, the code regrouping and the block addressing fold to constants
//! (whole_fixed_shift).
template <class C, class T, int Items, class Transform, int MinCtas = whole_min_ctas<T, Items>,
          bool Prefetch = false, int FixedShift = 0>
__global__ void __launch_bounds__(cta_threads, MinCtas)
    quantize_whole(T const* QMEM_RESTRICT x, size_t blocks, int runtime_block_shift,
                   uint8_t* QMEM_RESTRICT codes, float* QMEM_RESTRICT absmax, book_t<C> book,
                   typename normal_encoder<C>::params const enc_params, Transform transform) {
  using lay = thread_layout<C, T, Items>;
  constexpr int vectors = lay::vectors;
  constexpr int code_bytes_per_vector = lay::code_bytes_per_vector;
  // four vectors of four code bytes per thread: small groups store through gather_block_words
  constexpr bool gathered = vectors == 4 && code_bytes_per_vector == 4;
  static_assert(FixedShift == 0 ||
                    ((1 << FixedShift) >= Items && (1 << FixedShift) / Items <= cta_threads),
                "a block holds at least Items, and a group fits in a CTA of cta_threads");
  int const block_shift = FixedShift != 0 ? FixedShift : runtime_block_shift;
  int const group_size = (1 << block_shift) / Items;
  // with a compile-time block size the caller launches cta_threads threads per CTA
  int const blocks_per_cta =
      (FixedShift != 0 ? cta_threads : static_cast<int>(blockDim.x)) / group_size;
  // a programmatic dependent launched after this kernel (double quantization's
  // offset_nested_quantize) may place its CTAs as SMs free up in this grid's last wave; it waits
  // (griddepcontrol.wait) for this grid to finish before it reads what this grid writes (H200,
  // 2026-11-30, NF4 quantize + scales, interleaved: the fused kernel dependent 0.2193 ms against
  // 0.2207 not dependent)
  pdl_allow_dependents();
  __shared__ quantize_shared<C, normal_encoder<C>> sh;
  auto const fast = sh.prepare(book, enc_params);
  auto& warp_max = sh.warp_max;
  book_t<C> const* const shared_book = &sh.book;
  auto const general = [shared_book](float xn) -> uint32_t { return C::encode(xn, *shared_book); };
  auto const tf = transform_state<Transform>::load(transform);

  int const group = static_cast<int>(threadIdx.x) / group_size;
  // This thread's lane in its group. With a compile-time block size it is computed again where
  // it is used (volatile: ptxas neither hoists nor merges the reads), instead of held through the
  // step in a register, which ptxas spilled at the 40-register bound (below).
  int const thread_lane = static_cast<int>(threadIdx.x) % group_size;
  auto const lane = [&]() -> int {
    if constexpr (FixedShift != 0) {
      uint32_t tid;
      asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
      return static_cast<int>(tid % static_cast<uint32_t>(group_size));
    } else {
      return thread_lane;
    }
  };
  // block indices in 32 bits with a compile-time block size (the caller guarantees
  // blocks <= whole_fixed_max_blocks, so that blk + stride cannot wrap)
  using index = std::conditional_t<FixedShift != 0, uint32_t, size_t>;
  index const stride = static_cast<index>(gridDim.x) * static_cast<index>(blocks_per_cta);
  index const first = static_cast<index>(blockIdx.x) * static_cast<index>(blocks_per_cta) +
                      static_cast<index>(group);
  auto load = [&](uint4(&v)[vectors], index b) {
    uint4 const* const xb =
        reinterpret_cast<uint4 const*>(x + (static_cast<size_t>(b) << block_shift)) + lane();
    QMEM_UNROLL
    for (int j = 0; j < vectors; ++j)
      v[j] = __ldg(xb + j * group_size);
  };
  [[maybe_unused]] uint4 next[Prefetch ? vectors : 1] = {};
  if constexpr (Prefetch)
    if (first < blocks)
      load(next, first);
  // With a compile-time block size the stride is read again at each step (a constant-bank read;
  // volatile, so that ptxas does not hoist it into a register): held in a register it was spilled
  // at the 40-register bound (ptxas 13.0 sm_90a, 2026-11-30: int8 from fp32 block 256, one local
  // load per step, none with this; FP4 from bf16 block 64, the same with the lane below: 3 -> 1).
  auto const next_stride = [&]() -> index {
    if constexpr (FixedShift != 0) {
      uint32_t ctas;
      asm volatile("mov.u32 %0, %%nctaid.x;" : "=r"(ctas));
      return ctas * static_cast<index>(blocks_per_cta);
    } else {
      return stride;
    }
  };
  for (index blk = first; blk - static_cast<index>(group) < blocks; blk += next_stride()) {
    bool const active = blk < blocks;
    size_t const begin = static_cast<size_t>(blk) << block_shift;
    uint4 raw[vectors] = {};
    if constexpr (Prefetch) {
      QMEM_UNROLL
      for (int j = 0; j < vectors; ++j)
        raw[j] = next[j];
      if (blk + stride < blocks)
        load(next, blk + stride);
    } else if (active) {
      load(raw, blk);
    }
    uint32_t const m = group_max(thread_abs_max<T>(raw, tf), group_size, warp_max);
    float const amax = qmem::detail::bits_to_float(m);
    // absmax in [2^-126, 2^126): 1 / absmax is then a normal float, so |xn| <= 1 + 2^-23 (the
    // domain normal_encoder is exact on; a subnormal reciprocal would be less precise)
    bool const normal = m - 0x00800000u < 0x7e000000u;
    if constexpr (gathered) {
      // groups of 1, 2 or 4 lanes: each lane stores 16 contiguous code bytes (the codes of 4
      // consecutive vectors) instead of 4 bytes per vector, which wrote a quarter or half of a
      // 32-byte sector per store and doubled the L2 store requests of NF4 blocks of 32 / 64.
      if (group_size <= 4) {
        uint32_t w[4] = {};
        if (active) {
          if (lane() == 0)
            absmax[blk] = amax;
          if (normal) {
            float const inv = rcp_normal(amax);
            QMEM_UNROLL
            for (int j = 0; j < 4; ++j)
              w[j] = encode_vector_word<C, T>(raw[j], inv, tf, fast);
          } else {
            float const inv = fmath::rcp(amax);
            QMEM_UNROLL
            for (int j = 0; j < 4; ++j)
              w[j] = encode_vector_word<C, T>(raw[j], inv, tf, general);
          }
        }
        uint4 const words = gather_block_words(w, group_size, lane());
        if (active)
          *reinterpret_cast<uint4*>(codes + (C::bits == 8 ? begin : begin / 2) + 16 * lane()) =
              words;
        continue;
      }
    }
    if (!active)
      continue;
    if (lane() == 0)
      absmax[blk] = amax;
    uint8_t* const cb = codes + (C::bits == 8 ? begin : begin / 2) + lane() * code_bytes_per_vector;
    if (normal) {
      float const inv = rcp_normal(amax);
      QMEM_UNROLL
      for (int j = 0; j < vectors; ++j)
        encode_store_vector<C, T>(cb + j * group_size * code_bytes_per_vector, raw[j], inv, tf,
                                  fast);
    } else {
      float const inv = fmath::rcp(amax);
      QMEM_UNROLL
      for (int j = 0; j < vectors; ++j)
        encode_store_vector<C, T>(cb + j * group_size * code_bytes_per_vector, raw[j], inv, tf,
                                  general);
    }
  }
}

//! Scalar quantize kernel: any alignment, any (even) block size. One warp per block; two passes
//! over the block (the second one reads it again, mostly from L1/L2).
template <class C, class T, class Transform, bool Stochastic>
__global__ void __launch_bounds__(cta_threads)
    quantize_scalar(T const* QMEM_RESTRICT x, size_t n, size_t block_size,
                    uint8_t* QMEM_RESTRICT codes, float* QMEM_RESTRICT absmax, size_t blocks,
                    std::uint64_t seed, book_t<C> book,
                    typename device_encoder<C>::params const enc_params, Transform transform) {
  __shared__ quantize_shared<C, device_encoder<C>> sh;
  auto const enc = sh.prepare(book, enc_params);
  book_t<C> const& sbook = sh.book;
  auto const tf = transform_state<Transform>::load(transform);

  int const lane = static_cast<int>(threadIdx.x) % 32;
  size_t const warps = static_cast<size_t>(gridDim.x) * (blockDim.x / 32);
  for (size_t blk = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; blk < blocks;
       blk += warps) {
    size_t const begin = blk * block_size;
    size_t const count = n - begin < block_size ? n - begin : block_size;
    uint32_t m = 0;
    for (size_t i = static_cast<size_t>(lane); i < count; i += 32) {
      uint32_t const b = quant::detail::abs_bits(tf(to_float(x[begin + i])));
      m = b > m ? b : m;
    }
    QMEM_UNROLL
    for (int offset = 16; offset > 0; offset /= 2) {
      uint32_t const other = __shfl_xor_sync(0xffffffffu, m, offset);
      m = other > m ? other : m;
    }
    float const amax = qmem::detail::bits_to_float(m);
    if (lane == 0)
      absmax[blk] = amax;
    float const inv = fmath::rcp(amax);
    if constexpr (C::bits == 8) {
      for (size_t i = static_cast<size_t>(lane); i < count; i += 32)
        codes[begin + i] =
            encode_one<C, Stochastic>(tf(to_float(x[begin + i])), inv, enc, sbook, seed, begin + i);
    } else {
      size_t const pairs = count / 2 + count % 2;
      for (size_t p = static_cast<size_t>(lane); p < pairs; p += 32) {
        size_t const i = begin + 2 * p;
        uint8_t const hi = encode_one<C, Stochastic>(tf(to_float(x[i])), inv, enc, sbook, seed, i);
        uint8_t const lo =
            2 * p + 1 < count
                ? encode_one<C, Stochastic>(tf(to_float(x[i + 1])), inv, enc, sbook, seed, i + 1)
                : static_cast<uint8_t>(C::zero_code);
        codes[begin / 2 + p] = quant::detail::pack_nibbles(hi, lo);
      }
    }
  }
}

// ---- dequantize ----------------------------------------------------------------------------

//! Scales stored as fp32 absmax.
struct plain_scales {
  float const* absmax;
  //! What a thread loads per block before the kernel's prologue (fetch) and the scale it makes
  //! of it after (finish); operator() does both.
  struct loaded {
    float const* absmax;
    using raw = float;
    __device__ QMEM_INLINE raw fetch(size_t blk) const noexcept { return absmax[blk]; }
    __device__ QMEM_INLINE float finish(raw r) const noexcept { return r; }
    __device__ QMEM_INLINE float operator()(size_t blk) const noexcept { return absmax[blk]; }
  };
};

//! Double-quantized scales: nested_table[qabsmax[b]] * absmax2[b >> nested_shift] + offset
//! (nested_block = 2^nested_shift: a shift, where the 64-bit division by a runtime nested_block
//! cost more than the rest of an NF4 dequantization's per-vector work: +35% at 2^28 elements on
//! the H200, 2026-11-29). `table` is dynamic_signed's decoded values in device memory
//! (nested_values), copied into shared memory by each CTA with one coalesced load per thread;
//! before, the table was a kernel argument whose copy read the constant bank at 256 different
//! addresses, serialized.
struct nested_scales {
  uint8_t const* qabsmax;
  float const* absmax2;
  float const* offset;
  int nested_shift;
  float const* table; //!< 256 floats in device memory
  struct raw {
    uint8_t code;
    float absmax2;
  };
  struct loaded {
    uint8_t const* qabsmax;
    float const* absmax2;
    float offset;
    int nested_shift;
    float const* table; // shared memory
    __device__ QMEM_INLINE raw fetch(size_t blk) const noexcept {
      return {qabsmax[blk], absmax2[blk >> nested_shift]};
    }
    __device__ QMEM_INLINE float finish(raw r) const noexcept {
      return fmath::add(fmath::mul(table[r.code], r.absmax2), offset);
    }
    __device__ QMEM_INLINE float operator()(size_t blk) const noexcept {
      return finish(fetch(blk));
    }
  };
};

template <class Scales>
struct scales_state;
template <>
struct scales_state<plain_scales> {
  struct storage {};
  static constexpr bool uses_shared = false; //!< whether prepare fills storage (a CTA barrier)
  __device__ static void prepare(plain_scales const&, storage&) noexcept {}
  //! The fetching half, usable before prepare (reads no shared memory).
  __device__ static plain_scales::loaded fetcher(plain_scales s) noexcept { return {s.absmax}; }
  __device__ static plain_scales::loaded load(plain_scales s, storage&) noexcept {
    return {s.absmax};
  }
};
template <>
struct scales_state<nested_scales> {
  struct storage {
    float table[256];
  };
  static constexpr bool uses_shared = true;
  __device__ static void prepare(nested_scales const& s, storage& st) noexcept {
    for (int i = static_cast<int>(threadIdx.x); i < 256; i += static_cast<int>(blockDim.x))
      st.table[i] = __ldg(s.table + i);
  }
  __device__ static nested_scales::loaded fetcher(nested_scales s) noexcept {
    return {s.qabsmax, s.absmax2, 0.0f, s.nested_shift, nullptr};
  }
  __device__ static nested_scales::loaded load(nested_scales s, storage& st) noexcept {
    return {s.qabsmax, s.absmax2, *s.offset, s.nested_shift, st.table};
  }
};

//! Decoded values of every code byte, in shared memory: for 8-bit codes value[c] =
//! C::decode(c); for 4-bit codes pair[b] = (C::decode(b >> 4), C::decode(b & 15)) (2 KiB either
//! way). The fast dequantize kernel copies the 8-bit table into shared memory; for 4-bit codes it
//! reads only the device copy's .y of entries 0..15 (decode(l)), one per lane (the pair layout is
//! what the kernel used before the shuffles; kept: the same upload serves both).
template <class C>
struct decode_table {
  using entry = std::conditional_t<C::bits == 8, float, float2>;
  entry v[256];
  //! Copies the table from device memory (decoded_values), one coalesced load per thread.
  __device__ void load(entry const* values) noexcept {
    for (int i = static_cast<int>(threadIdx.x); i < 256; i += static_cast<int>(blockDim.x))
      v[i] = __ldg(values + i);
  }
  //! The value of code `c` (a nibble for 4-bit codes).
  __device__ QMEM_INLINE float value(uint8_t c) const noexcept {
    if constexpr (C::bits == 8)
      return v[c];
    else
      return v[c].y;
  }
};

//! decode_table's contents, built once on the host with C::decode (the function the kernels
//! computed from the code book before; host and device decode alike), for device_table.
template <class C>
struct decoded_values {
  typename decode_table<C>::entry v[256];
};

template <class C>
decoded_values<C> const& host_decoded_values() {
  static decoded_values<C> const table = [] {
    decoded_values<C> t{};
    for (int i = 0; i < 256; ++i) {
      auto const c = static_cast<uint8_t>(i);
      if constexpr (C::bits == 8)
        t.v[i] = C::decode(c, C::book);
      else
        t.v[i] = float2{C::decode(static_cast<uint8_t>(c >> 4), C::book),
                        C::decode(static_cast<uint8_t>(c & 0x0f), C::book)};
    }
    return t;
  }();
  return table;
}

//! The decoded values of code type C in the device memory of `device` (uploaded once).
template <class C>
typename decode_table<C>::entry const* decoded_values_on(int device) {
  return device_table(host_decoded_values<C>(), device)->v;
}

//! dynamic_signed's values (the nested scales' code) in the device memory of `device`.
inline float const* nested_values(int device) { return decoded_values_on<dynamic_signed>(device); }

//! Two floats as the bf16 / f16 pair {lo, hi} (lo at the lower address) with one hardware
//! conversion (round to nearest even, subnormals kept: for finite values the same bits as
//! from_float<T>, which the caller uses for the rest).
template <class T>
__device__ QMEM_INLINE uint32_t pack_two(float lo, float hi) noexcept {
  uint32_t r;
  if constexpr (std::is_same_v<T, bf16>)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

//! Fast dequantize kernel: aligned codes and output, block size a power of two of at least
//! vector_items<T>. The work item is one 16-byte output vector (whose elements share a block);
//! consecutive threads own consecutive vectors, and each thread handles PerStep of them per loop
//! step (all loads first, then decode and store; the launch gives every thread one step). The
//! first step's codes and scales are loaded before anything else, so that their latency hides
//! the prologue's. Decoding:
//! - 8-bit codes: decode_table in shared memory, copied from device memory by every CTA, then a
//!   CTA barrier; one shared load per code.
//! - 4-bit codes: lane l of each warp holds the value of code l % 16 in a register (one 4-byte
//!   load from device memory) and an element's value is a shuffle from the lane its nibble names
//!   (shfl.idx takes its source lane modulo 32, lanes l and l + 16 agree: a shift per element and
//!   no mask): no shared memory and no CTA barrier. The shuffles need every lane of the warp, so
//!   the loop runs warp-uniform steps (lanes past the end decode zeros and store nothing).
//!   Measured on the H200 (2026-11-30 16:25 UTC, NF4 / FP4 -> bf16 block 64, 2^28 elements, A/B
//!   rows interleaved in one process, medians of 3 processes, copy 4180-4205 GB/s): the CTA's 2 KB
//!   pair table with 4 vectors per thread (the kernel before) 0.1790 / 0.1795 ms; the shuffle with
//!   2 vectors 0.1738 / 0.1737 (-2.9% / -3.2%), with 4 vectors 0.1780 / 0.1774; a 128-byte table
//!   per warp behind __syncwarp 0.1742 / 0.1739 (2 vectors) and 0.1774 / 0.1774 (4); the 2 KB
//!   table with 2 vectors 0.1846 / 0.1873. With double-quantized scales (the nested table still
//!   copied per CTA, then a barrier) the shuffle with 2 vectors 0.1730 / 0.1727 against 0.1796 /
//!   0.1804. The shuffle costs 8 SHFL + 7 SHF per 8-element vector against 4 LDS.64 + ~4 ALU for
//!   the pair table (ptxas 13.0, sm_90): the barrier and the 2 KB copy per CTA, not the
//!   instructions, were the cost.
//! bf16 / f16 outputs of a vector with a finite scale (every product then finite) are rounded two
//! at a time by the hardware conversion: about 3 instructions per 4-bit element instead of 11 with
//! the integer rounding of from_float (ptxas 13.0, sm_90, 2026-11-29).
template <class C, class T, class Scales, int PerStep = dequantize_vectors_per_step<C>>
__global__ void __launch_bounds__(cta_threads)
    dequantize_aligned(uint8_t const* QMEM_RESTRICT codes, Scales scales, size_t n, int block_shift,
                       T* QMEM_RESTRICT y,
                       typename decode_table<C>::entry const* QMEM_RESTRICT values) {
  constexpr int vec = vector_items<T>;
  constexpr int code_bytes_per_vector = C::bits == 8 ? vec : vec / 2;
  constexpr int per_step = PerStep;
  constexpr bool half_output = std::is_same_v<T, bf16> || std::is_same_v<T, f16>;
  constexpr bool by_shuffle = C::bits != 8;
  using raw_scale = decltype(scales_state<Scales>::fetcher(scales).fetch(0));
  struct no_table {};
  __shared__ std::conditional_t<by_shuffle, no_table, decode_table<C>> table;
  __shared__ typename scales_state<Scales>::storage scale_storage;

  size_t const whole = n / vec; // vectors entirely inside [0, n)
  size_t const threads = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t const tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int const lane = static_cast<int>(threadIdx.x) & 31;
  uint8_t c[per_step][code_bytes_per_vector];
  raw_scale r[per_step];
  auto load_step = [&](size_t base) {
    auto const fetch = scales_state<Scales>::fetcher(scales);
    QMEM_UNROLL
    for (int u = 0; u < per_step; ++u) {
      size_t const v = base + static_cast<size_t>(u) * threads;
      if (v < whole) {
        load_bytes<code_bytes_per_vector>(c[u], codes + v * code_bytes_per_vector);
        r[u] = fetch.fetch((v * vec) >> block_shift);
      } else if constexpr (by_shuffle) { // decoded (every lane shuffles), never stored
        QMEM_UNROLL
        for (int k = 0; k < code_bytes_per_vector; ++k)
          c[u][k] = 0;
        r[u] = raw_scale{};
      }
    }
  };
  load_step(tid);
  // 4-bit codes: the value of code lane % 16 (entry l < 16 of the pair table is {decode(0),
  // decode(l)})
  float mine = 0.0f;
  if constexpr (by_shuffle)
    mine = __ldg(&values[lane & 15].y);
  else
    table.load(values);
  if constexpr (!by_shuffle || scales_state<Scales>::uses_shared) {
    scales_state<Scales>::prepare(scales, scale_storage);
    __syncthreads();
  }
  auto const scale_of = scales_state<Scales>::load(scales, scale_storage);

  // the shuffles walk warp-uniform steps: warp_base is lane 0's vector
  size_t const lane_offset = by_shuffle ? static_cast<size_t>(lane) : 0;
  for (size_t warp_base = tid - lane_offset; warp_base < whole; warp_base += threads * per_step) {
    size_t const base = warp_base + lane_offset;
    if (base != tid)
      load_step(base);
    QMEM_UNROLL
    for (int u = 0; u < per_step; ++u) {
      size_t const v = base + static_cast<size_t>(u) * threads;
      if (by_shuffle || v < whole) {
        float const s = scale_of.finish(r[u]);
        float f[vec];
        if constexpr (by_shuffle) {
          static_assert(code_bytes_per_vector <= 4);
          uint32_t w = 0;
          __builtin_memcpy(&w, c[u], code_bytes_per_vector);
          // element 2k: the high nibble of byte k, element 2k + 1: its low nibble; the source
          // lane is the shifted word modulo 32 (bit 4 picks lane l + 16, the same value)
          auto nibble_value = [&](uint32_t x) {
            return __shfl_sync(0xffffffffu, mine, static_cast<int>(x));
          };
          QMEM_UNROLL
          for (int k = 0; k < code_bytes_per_vector; ++k) {
            f[2 * k] = fmath::mul(nibble_value(w >> (8 * k + 4)), s);
            f[2 * k + 1] = fmath::mul(nibble_value(w >> (8 * k)), s);
          }
          if (v >= whole)
            continue;
        } else {
          QMEM_UNROLL
          for (int k = 0; k < code_bytes_per_vector; ++k)
            f[k] = fmath::mul(table.v[c[u][k]], s);
        }
        if constexpr (half_output) {
          if ((qmem::detail::float_to_bits(s) & 0x7fffffffu) < 0x7f800000u) {
            uint4 const out = make_uint4(pack_two<T>(f[0], f[1]), pack_two<T>(f[2], f[3]),
                                         pack_two<T>(f[4], f[5]), pack_two<T>(f[6], f[7]));
            *reinterpret_cast<uint4*>(y + v * vec) = out;
            continue;
          }
        }
        T out[vec];
        QMEM_UNROLL
        for (int k = 0; k < vec; ++k)
          out[k] = from_float<T>(f[k]);
        store_vector(y + v * vec, out);
      }
    }
  }
  // the last partial vector
  if (tid == 0) {
    for (size_t i = whole * vec; i < n; ++i) {
      uint8_t const code = C::bits == 8 ? codes[i] : quant::detail::nibble(codes, i);
      float value;
      if constexpr (by_shuffle)
        value = __ldg(&values[code].y);
      else
        value = table.value(code);
      y[i] = from_float<T>(fmath::mul(value, scale_of(i >> block_shift)));
    }
  }
}

//! Scalar dequantize kernel: any alignment, any block size; one element per thread step.
template <class C, class T, class Scales>
__global__ void __launch_bounds__(cta_threads)
    dequantize_scalar(uint8_t const* QMEM_RESTRICT codes, Scales scales, size_t n,
                      size_t block_size, T* QMEM_RESTRICT y, book_t<C> book) {
  __shared__ book_t<C> sbook;
  __shared__ typename scales_state<Scales>::storage scale_storage;
  copy_to_shared(sbook, book);
  scales_state<Scales>::prepare(scales, scale_storage);
  __syncthreads();
  auto const scale_of = scales_state<Scales>::load(scales, scale_storage);
  size_t const stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    uint8_t const code = C::bits == 8 ? codes[i] : quant::detail::nibble(codes, i);
    y[i] = from_float<T>(quant::detail::decode_element<C>(code, scale_of(i / block_size), sbook));
  }
}

// ---- double quantization: the offset's fixed-order mean -------------------------------------

//! Children one thread of tree_level loads (all of its loads are issued before the first shared
//! store). The first version loaded one child per loop iteration: the level over 2^22 NF4 scales
//! waited on ~32 dependent memory latencies per thread, and the whole NF4 double-quantization pass
//! (tree + nested quantize) cost +37% of the NF4 quantize (H200, 2026-11-29, 0.232 -> 0.317 ms).
template <class In, int Nodes>
inline constexpr int
    tree_loads_per_thread = Nodes* static_cast<int>(offset_tree_arity_v) / cta_threads;

//! One level of the offset's summation tree: node c = left-to-right double sum of
//! in[256c .. 256c + 255]. The CTA (cta_threads threads) stages `Nodes` nodes' children in shared
//! memory with coalesced loads, all of a thread's loads in flight at once (rows padded by one
//! element against bank conflicts), then one thread per node sums its row in order. When a single
//! node remains it writes offset = float(sum / count).
template <class In, int Nodes>
__global__ void __launch_bounds__(cta_threads)
    tree_level(In const* QMEM_RESTRICT in, size_t len, double* QMEM_RESTRICT out,
               float* QMEM_RESTRICT offset, size_t count) {
  constexpr int arity = static_cast<int>(offset_tree_arity_v);
  constexpr int loads = tree_loads_per_thread<In, Nodes>;
  static_assert(loads * cta_threads == Nodes * arity);
  __shared__ In rows[Nodes][arity + 1];
  size_t const first = static_cast<size_t>(blockIdx.x) * Nodes;
  size_t const base = first * arity;
  In v[loads];
  QMEM_UNROLL
  for (int j = 0; j < loads; ++j) {
    size_t const k = base + static_cast<size_t>(j * cta_threads) + threadIdx.x;
    v[j] = k < len ? __ldcs(in + k) : In{};
  }
  QMEM_UNROLL
  for (int j = 0; j < loads; ++j) {
    int const i = j * cta_threads + static_cast<int>(threadIdx.x);
    rows[i / arity][i % arity] = v[j];
  }
  __syncthreads();
  if (threadIdx.x < static_cast<unsigned>(Nodes)) {
    size_t const node = first + threadIdx.x;
    size_t const node_begin = node * arity;
    if (node_begin < len) {
      size_t const end = len - node_begin < static_cast<size_t>(arity) ? len - node_begin
                                                                       : static_cast<size_t>(arity);
      // in order; the loads and conversions of 8 children are issued ahead of their adds (a
      // plain loop waited on a shared load per add: 5.3 us for a level of 64 nodes, ncu)
      double s = 0.0;
      int const count_here = static_cast<int>(end);
      constexpr int batch = 8;
      for (int i = 0; i < count_here; i += batch) {
        double c[batch];
        QMEM_UNROLL
        for (int k = 0; k < batch; ++k)
          c[k] = i + k < count_here ? static_cast<double>(rows[threadIdx.x][i + k]) : 0.0;
        QMEM_UNROLL
        for (int k = 0; k < batch; ++k)
          if (i + k < count_here)
            s = __dadd_rn(s, c[k]);
      }
      size_t const nodes = len / arity + (len % arity != 0 ? 1 : 0);
      if (nodes == 1)
        *offset = __double2float_rn(__ddiv_rn(s, static_cast<double>(count)));
      else
        out[node] = s;
    }
  }
}

// ---- the offset's mean in one kernel: exact warp sums, the upper levels in the last CTA ------

//! Bit positions (biased exponents) of a finite, nonzero, normal value: `top` of its leading bit,
//! `low` of its lowest set bit. Returns false for zeros (which any sum ignores exactly), and sets
//! `bad` for subnormals, infinities and NaNs (no exact-sum shortcut for those).
template <class In>
__device__ QMEM_INLINE bool bit_span(In v, int& top, int& low, bool& bad) noexcept {
  if constexpr (std::is_same_v<In, float>) {
    uint32_t const u = qmem::detail::float_to_bits(v) & 0x7fffffffu;
    int const e = static_cast<int>(u >> 23);
    bad |= u != 0 && (e == 0 || e == 255);
    top = e;
    low = e - 23 + __ffs(static_cast<int>((u & 0x007fffffu) | 0x00800000u)) - 1;
    return u != 0;
  } else {
    static_assert(std::is_same_v<In, double>);
    auto const u = static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7fffffffffffffffull;
    int const e = static_cast<int>(u >> 52);
    bad |= u != 0 && (e == 0 || e == 2047);
    top = e;
    low = e - 52 +
          __ffsll(static_cast<long long>((u & 0x000fffffffffffffull) | 0x0010000000000000ull)) - 1;
    return u != 0;
  }
}

//! The sum of a warp's values (`Per` per lane, at most 256 in all; absent ones passed as zeros)
//! when it is exact in double: every value finite and normal, and the span from the highest
//! leading bit to the lowest set bit at most 44 positions (then every partial sum of at most 256
//! of them is a multiple of the lowest bit's weight below 2^53 times it, so every order of
//! additions gives the same, exact, result: the host's left-to-right sum). Returns false (and
//! leaves `sum`) otherwise; the caller then sums in order. Every lane of the warp calls it.
template <class In, int Per>
__device__ QMEM_INLINE bool warp_exact_sum(In const (&v)[Per], double& sum) noexcept {
  static_assert(32 * Per <= static_cast<int>(offset_tree_arity_v));
  int top = 0;
  int low = 1 << 20;
  bool bad = false;
  double s = 0.0;
  QMEM_UNROLL
  for (int k = 0; k < Per; ++k) {
    int t = 0;
    int l = 0;
    if (bit_span(v[k], t, l, bad)) {
      top = t > top ? t : top;
      low = l < low ? l : low;
    }
    s += static_cast<double>(v[k]);
  }
  QMEM_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) { // shuffles: any sm (__reduce_*_sync is sm_80+)
    int const t = __shfl_xor_sync(0xffffffffu, top, offset);
    int const l = __shfl_xor_sync(0xffffffffu, low, offset);
    top = t > top ? t : top;
    low = l < low ? l : low;
  }
  // sums of floats stay far inside double's range; sums of doubles near its top take the slow path
  bool const exact = !__any_sync(0xffffffffu, bad) && top - low <= 44 &&
                     (std::is_same_v<In, float> || top <= 2046 - 9);
  if (!exact)
    return false;
  QMEM_UNROLL
  for (int offset = 16; offset > 0; offset /= 2)
    s += __shfl_xor_sync(0xffffffffu, s, offset);
  sum = s + 0.0; // an all-zero sum is +0.0, as the host's 0.0 + ... gives
  return true;
}

//! Left-to-right double sum of in[begin, end) (the slow path: values an exact warp sum cannot
//! take). Loads through L2 (`in` may have been written by other CTAs of this kernel).
template <class In>
__device__ QMEM_INLINE double ordered_sum(In const* in, size_t begin, size_t end) noexcept {
  double s = 0.0;
  constexpr int batch = 8;
  for (size_t i = begin; i < end; i += batch) {
    In c[batch];
    QMEM_UNROLL
    for (int k = 0; k < batch; ++k)
      c[k] = i + k < end ? __ldcg(in + i + k) : In{};
    QMEM_UNROLL
    for (int k = 0; k < batch; ++k)
      if (i + k < end)
        s = __dadd_rn(s, static_cast<double>(c[k]));
  }
  return s;
}

//! Nodes of the leaf level one warp of offset_mean sums (their loads all in flight at once).
inline constexpr int mean_nodes_per_warp = 4;

//! CTAs of offset_mean whose leaves make one node of the level above (256 leaves).
inline constexpr unsigned mean_ctas_per_upper =
    static_cast<unsigned>(offset_tree_arity_v) / (mean_nodes_per_warp * (cta_threads / 32));

//! Largest leaf count offset_mean takes: the CTA that finishes last sums the leaves into at most
//! 256 nodes and those into the root (m <= 2^24 scales: a tensor of 2^30 elements in blocks of 64);
//! more leaves go through tree_level.
inline constexpr size_t mean_max_leaves = offset_tree_arity_v * offset_tree_arity_v;

//! The host's sum of nodes[begin, end) (end - begin <= 256), in every lane of the calling warp.
__device__ QMEM_INLINE double node_sum(double const* nodes, size_t begin, size_t end) noexcept {
  constexpr int per = static_cast<int>(offset_tree_arity_v) / 32;
  int const lane = static_cast<int>(threadIdx.x) % 32;
  double c[per];
  QMEM_UNROLL
  for (int j = 0; j < per; ++j) {
    size_t const i = begin + static_cast<size_t>(32 * j + lane);
    c[j] = i < end ? __ldcg(nodes + i) : 0.0;
  }
  double s = 0.0;
  if (!warp_exact_sum(c, s) && lane == 0)
    s = ordered_sum(nodes, begin, end);
  return __shfl_sync(0xffffffffu, s, 0);
}

//! The offset's fixed-order mean in one launch (leaves <= mean_max_leaves): warp w of CTA b sums
//! the leaf nodes (256 consecutive absmax values each) mean_nodes_per_warp * (8b + w) ... + 3,
//! exactly with shuffles where warp_exact_sum allows, else in order by one lane, into `leaves`;
//! for each node of the level above, the CTA that finishes its group last sums it (one warp, the
//! same way), and the one that sums the last of those sums the root and writes
//! offset = float(root / count). `leaves` has room for both levels, `tickets` (the groups' and
//! the root's counters) is zero on entry. The host's tree (quant/double_quant.hpp detail::tree_mean), bit
//! for bit. Before (2026-11-29): one kernel per level, three launches for 2^22 scales (ncu, H200:
//! 9.0 + 5.3 + 3.0 us), each upper level one thread's 256 ordered additions per node. This kernel
//! (ncu, H200, 19:19 UTC, 2^22 scales): 14.9 us (the first version, one CTA summing all 64 upper
//! nodes: 21.8); it is latency-bound (0.78 waves of CTAs, 16 cycles per issued instruction, DRAM
//! 24%): each warp's four exact sums are chains of dependent shuffles and double additions.
template <int = 0>
__global__ void __launch_bounds__(cta_threads)
    offset_mean(float const* QMEM_RESTRICT in, size_t len, double* QMEM_RESTRICT leaves,
                unsigned* QMEM_RESTRICT tickets, float* QMEM_RESTRICT offset) {
  pdl_allow_dependents(); // the nested quantization's CTAs copy their table meanwhile
  constexpr int arity = static_cast<int>(offset_tree_arity_v);
  constexpr int per = arity / 32;
  constexpr int warps = cta_threads / 32;
  int const warp = static_cast<int>(threadIdx.x) / 32;
  int const lane = static_cast<int>(threadIdx.x) % 32;
  size_t const nodes = (len + arity - 1) / arity;
  size_t const first =
      (static_cast<size_t>(blockIdx.x) * warps + static_cast<size_t>(warp)) * mean_nodes_per_warp;
  // lane l holds elements 4l .. 4l + 3 and 128 + 4l .. 128 + 4l + 3 of each node (16-byte loads
  // when the node is whole and `in` 16-byte aligned)
  bool const vector_loads = reinterpret_cast<std::uintptr_t>(in) % 16 == 0;
  float v[mean_nodes_per_warp][per];
  QMEM_UNROLL
  for (int j = 0; j < mean_nodes_per_warp; ++j) {
    size_t const base = (first + static_cast<size_t>(j)) * arity;
    QMEM_UNROLL
    for (int h = 0; h < 2; ++h) {
      size_t const i = base + static_cast<size_t>(128 * h + 4 * lane);
      if (vector_loads && base + arity <= len) {
        float4 const q = __ldcs(reinterpret_cast<float4 const*>(in + i));
        v[j][4 * h] = q.x;
        v[j][4 * h + 1] = q.y;
        v[j][4 * h + 2] = q.z;
        v[j][4 * h + 3] = q.w;
      } else {
        QMEM_UNROLL
        for (int k = 0; k < 4; ++k)
          v[j][4 * h + k] = i + k < len ? in[i + k] : 0.0f;
      }
    }
  }
  QMEM_UNROLL
  for (int j = 0; j < mean_nodes_per_warp; ++j) {
    size_t const node = first + static_cast<size_t>(j);
    if (node >= nodes) // uniform over the warp
      break;
    double s = 0.0;
    if (!warp_exact_sum(v[j], s) && lane == 0)
      s = ordered_sum(in, node * arity, node * arity + arity < len ? node * arity + arity : len);
    if (lane == 0)
      leaves[node] = s;
  }
  // Level 1: upper node k sums the leaves of CTAs mean_ctas_per_upper * k ... + 7; the last of
  // them to finish (ticket k) sums it with one warp, and the last upper node to be summed (ticket
  // `uppers`) sums the root the same way.
  size_t const uppers = (nodes + arity - 1) / arity; // <= arity (mean_max_leaves)
  unsigned const k = blockIdx.x / mean_ctas_per_upper;
  unsigned const in_group = gridDim.x - k * mean_ctas_per_upper < mean_ctas_per_upper
                                ? gridDim.x - k * mean_ctas_per_upper
                                : mean_ctas_per_upper;
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0)
    last = atomicAdd(tickets + k, 1u) == in_group - 1;
  __syncthreads();
  if (!last || warp != 0)
    return;
  __threadfence();
  double* const upper = leaves + nodes;
  size_t const begin = static_cast<size_t>(k) * arity;
  size_t const end = begin + arity < nodes ? begin + arity : nodes;
  double s = node_sum(leaves, begin, end);
  if (uppers == 1) { // the host's tree ends here: offset = level 1's single node / count
    if (lane == 0)
      *offset = __double2float_rn(__ddiv_rn(s, static_cast<double>(len)));
    return;
  }
  bool root = false;
  if (lane == 0) {
    __stcg(upper + k, s);
    __threadfence();
    root = atomicAdd(tickets + uppers, 1u) == static_cast<unsigned>(uppers) - 1;
  }
  if (!__shfl_sync(0xffffffffu, root, 0))
    return;
  __threadfence();
  s = node_sum(upper, 0, uppers);
  if (lane == 0)
    *offset = __double2float_rn(__ddiv_rn(s, static_cast<double>(len)));
}

// ---- double quantization: the nested 8-bit quantization ------------------------------------

//! Scales one thread of nested_quantize quantizes per step: eight 16-byte loads in flight.
inline constexpr int nested_items = 32;

//! Resident CTAs per SM nested_quantize is built for (at most 64 registers, 4 x 22.5 KB of
//! bucket table): 4 x 132 CTAs of 256 threads x 32 scales cover the 2^22 scales of a
//! 2^28-element NF4 tensor in blocks of 64 in one wave on the H200, each thread one step.
inline constexpr int nested_min_ctas = 4;

//! 16-byte vectors of scales one thread of the nested quantization holds.
inline constexpr int nested_vectors = nested_items / 4;

//! Where one thread of a nested quantization step works: block `blk` of its group (2^shift
//! scales; `count` of them inside [0, m), 0 past the last block), its lane in the group of
//! `group_size` threads (lane l holds the block's 4-scale vectors l, l + group_size, ...).
struct nested_slot {
  size_t blk;
  int count;
  int lane;
  int group_size;
};

//! The slot of this thread in the step whose first block is `first` (the CTA's blocks are
//! first ... first + blockDim.x / group_size - 1).
__device__ QMEM_INLINE nested_slot nested_slot_of(size_t first, size_t m, int shift) noexcept {
  int const group_size = (1 << shift) / nested_items;
  size_t const blocks = (m + (size_t{1} << shift) - 1) >> shift;
  size_t const blk = first + static_cast<size_t>(static_cast<int>(threadIdx.x) / group_size);
  size_t const begin = blk << shift;
  // offsets inside a block are ints (at most 4096 scales), which keeps 64-bit arithmetic out of
  // the loops (registers)
  int const count = blk >= blocks                      ? 0
                    : m - begin < (size_t{1} << shift) ? static_cast<int>(m - begin)
                                                       : 1 << shift;
  return {blk, count, static_cast<int>(threadIdx.x) % group_size, group_size};
}

//! Loads the thread's scales of its block through L2 (they were written by an earlier kernel
//! this one may have overlapped), 0 past `count`. `vector_io`: absmax 16-byte aligned. `Full`:
//! the caller knows the block whole and vector_io true (no per-vector tests: fewer registers).
template <bool Full = false>
__device__ QMEM_INLINE void load_nested(float (&a)[nested_vectors][4],
                                        float const* QMEM_RESTRICT absmax, nested_slot const& s,
                                        int shift, bool vector_io) noexcept {
  float const* const src = absmax + (s.count > 0 ? s.blk << shift : 0);
  QMEM_UNROLL
  for (int j = 0; j < nested_vectors; ++j) {
    int const o = 4 * (j * s.group_size + s.lane);
    if (Full || (vector_io && o + 4 <= s.count)) {
      float4 const q = __ldcg(reinterpret_cast<float4 const*>(src + o));
      a[j][0] = q.x;
      a[j][1] = q.y;
      a[j][2] = q.z;
      a[j][3] = q.w;
    } else {
      QMEM_UNROLL
      for (int k = 0; k < 4; ++k)
        a[j][k] = o + k < s.count ? __ldcg(src + o + k) : 0.0f;
    }
  }
}

//! The end of a nested quantization step, shared by nested_quantize and offset_nested_quantize:
//! absmax2[s.blk] = max (the bits `mx` of the block's max |d|, from group_max; lane 0 stores it)
//! and the dynamic_signed codes of the thread's d / max into the block's qabsmax (0 < s.count).
//! `vector_io`, `Full` as for encode_nested.
template <bool Full = false>
__device__ QMEM_INLINE void
store_nested(float const (&d)[nested_vectors][4], uint32_t mx, nested_slot const& s, int shift,
             uint8_t* QMEM_RESTRICT qabsmax, float* QMEM_RESTRICT absmax2, bool vector_io,
             uint32_t const* table, typename device_encoder<dynamic_signed>::params const& p) {
  using layout = bucket_layout_of<dynamic_signed>::type;
  float const amax2 = qmem::detail::bits_to_float(mx);
  if (s.lane == 0)
    absmax2[s.blk] = amax2;
  uint8_t* const dst = qabsmax + (s.blk << shift);
  auto const encode_store = [&](float inv, auto const& enc) {
    QMEM_UNROLL
    for (int j = 0; j < nested_vectors; ++j) {
      int const o = 4 * (j * s.group_size + s.lane);
      uint32_t c[4];
      QMEM_UNROLL
      for (int k = 0; k < 4; ++k)
        c[k] = enc(fmath::mul(d[j][k], inv));
      if (Full || (vector_io && o + 4 <= s.count)) {
        *reinterpret_cast<uint32_t*>(dst + o) = pack_bytes(c[0], c[1], c[2], c[3]);
      } else {
        QMEM_UNROLL
        for (int k = 0; k < 4; ++k)
          if (o + k < s.count)
            dst[o + k] = static_cast<uint8_t>(c[k]);
      }
    }
  };
  // absmax2 in [2^-126, 2^126): the normal-domain lookup, as in quantize_whole
  if (mx - 0x00800000u < 0x7e000000u)
    encode_store(rcp_normal(amax2),
                 [&](float xn) -> uint32_t { return bucket_lookup_normal<layout>(xn, table); });
  else
    encode_store(fmath::rcp(amax2), [&](float xn) -> uint32_t {
      return bucket_lookup<layout>(xn, table, p.nan_code, p.negative_zero_code);
    });
}

//! The nested quantization of one thread's scales `a` (load_nested), in place: d = a - off (0
//! past the block's end: adds nothing to the maximum, encodes in range), the block's max |d|
//! (group_max, every thread of the CTA calls this), absmax2[blk] and the dynamic_signed codes of
//! d / max. `vector_io`: qabsmax 4-byte aligned (with absmax 16-byte aligned). `Full` as for
//! load_nested.
template <bool Full = false>
__device__ QMEM_INLINE void
encode_nested(float (&d)[nested_vectors][4], float off, nested_slot const& s, int shift,
              uint8_t* QMEM_RESTRICT qabsmax, float* QMEM_RESTRICT absmax2, bool vector_io,
              uint32_t const* table, typename device_encoder<dynamic_signed>::params const& p,
              uint32_t (&warp_max)[max_quantize_threads / 32]) {
  uint32_t mx = 0;
  QMEM_UNROLL
  for (int j = 0; j < nested_vectors; ++j) {
    int const o = 4 * (j * s.group_size + s.lane);
    QMEM_UNROLL
    for (int k = 0; k < 4; ++k) {
      d[j][k] = Full || o + k < s.count ? fmath::sub(d[j][k], off) : 0.0f;
      uint32_t const b = quant::detail::abs_bits(d[j][k]);
      mx = b > mx ? b : mx;
    }
  }
  mx = group_max(mx, s.group_size, warp_max);
  if (!Full && s.count == 0)
    return;
  store_nested<Full>(d, mx, s, shift, qabsmax, absmax2, vector_io, table, p);
}

//! The nested quantization of double quantization: qabsmax = dynamic_signed codes of
//! absmax[i] - offset in blocks of 2^nested_shift, absmax2 = each block's max |absmax - offset|
//! (quant/double_quant.hpp detail::quantize_scales_host, bit for bit). A group of
//! 2^nested_shift / nested_items threads owns a block (lane l of the group on the block's
//! 4-scale vectors l, l + group, ...). Launched as a programmatic dependent of the kernel that
//! computes the offset (offset_mean, or tree_level): the CTAs copy the bucket table while that
//! kernel finishes, then wait for it. `vector_io`: absmax 16-byte and qabsmax 4-byte aligned
//! (else every access is scalar); partial vectors and a partial last block are handled here.
//! quantize_scales takes it for more scales than offset_nested_quantize holds in one wave.
//! Before, this was quantize_whole with an offset-subtracting transform and a grid of 2 CTAs per
//! SM walking 4 steps each. Measured on the H200 (2026-11-29 21:49 UTC, the 2^22 scales of a
//! 2^28-element NF4 tensor, nested block 256): alone under ncu 14.3 us, as before (14.4; 16.8
//! cycles per issued instruction: latency-bound, one dependent chain per thread), but its whole
//! prologue now overlaps offset_mean: quantize_scales 0.036 -> 0.025 ms (scales_only_dq/64),
//! NF4 quantize + double quantization 0.228 -> 0.216 ms (base and new in one session).
template <int = 0>
__global__ void __launch_bounds__(cta_threads, nested_min_ctas)
    nested_quantize(float const* QMEM_RESTRICT absmax, size_t m, int nested_shift,
                    float const* QMEM_RESTRICT offset, uint8_t* QMEM_RESTRICT qabsmax,
                    float* QMEM_RESTRICT absmax2, bool vector_io,
                    typename device_encoder<dynamic_signed>::params const p) {
  using layout = bucket_layout_of<dynamic_signed>::type;
  constexpr int vectors = nested_items / 4;
  __shared__ uint32_t table[layout::entries];
  __shared__ uint32_t warp_max[max_quantize_threads / 32];
  copy_words_to_shared(table, p.entry, static_cast<int>(layout::entries));
  __syncthreads();
  pdl_wait(); // nothing above reads what an earlier kernel writes
  // through L2: the offset was written by the kernel this one overlapped (no stale L1 line)
  float const off = __ldcg(offset);
  int const group_size = (1 << nested_shift) / nested_items;
  int const blocks_per_cta = static_cast<int>(blockDim.x) / group_size;
  int const group = static_cast<int>(threadIdx.x) / group_size;
  int const lane = static_cast<int>(threadIdx.x) % group_size;
  size_t const blocks = (m + (size_t{1} << nested_shift) - 1) >> nested_shift;
  size_t const stride = static_cast<size_t>(gridDim.x) * static_cast<size_t>(blocks_per_cta);
  for (size_t first = static_cast<size_t>(blockIdx.x) * static_cast<size_t>(blocks_per_cta);
       first < blocks; first += stride) { // uniform over the CTA (group_max's barriers)
    size_t const blk = first + static_cast<size_t>(group);
    size_t const begin = blk << nested_shift;
    // scales of this group's block inside [0, m) (0 past the last block); offsets inside a block
    // are ints (at most 4096 scales), which keeps 64-bit arithmetic out of the loops (registers)
    int const count = blk >= blocks                             ? 0
                      : m - begin < (size_t{1} << nested_shift) ? static_cast<int>(m - begin)
                                                                : 1 << nested_shift;
    float const* const src = absmax + (blk < blocks ? begin : 0);
    float d[vectors][4]; // absmax - offset
    uint32_t mx = 0;
    QMEM_UNROLL
    for (int j = 0; j < vectors; ++j) {
      int const o = 4 * (j * group_size + lane);
      if (vector_io && o + 4 <= count) {
        float4 const q = __ldcg(reinterpret_cast<float4 const*>(src + o));
        d[j][0] = fmath::sub(q.x, off);
        d[j][1] = fmath::sub(q.y, off);
        d[j][2] = fmath::sub(q.z, off);
        d[j][3] = fmath::sub(q.w, off);
        QMEM_UNROLL
        for (int k = 0; k < 4; ++k) {
          uint32_t const b = quant::detail::abs_bits(d[j][k]);
          mx = b > mx ? b : mx;
        }
      } else {
        QMEM_UNROLL
        for (int k = 0; k < 4; ++k) {
          // scales past the end: 0 (they add nothing to the maximum and encode in range)
          d[j][k] = o + k < count ? fmath::sub(__ldcg(src + o + k), off) : 0.0f;
          uint32_t const b = quant::detail::abs_bits(d[j][k]);
          mx = b > mx ? b : mx;
        }
      }
    }
    mx = group_max(mx, group_size, warp_max);
    if (count == 0)
      continue;
    store_nested(d, mx, nested_slot{blk, count, lane, group_size}, nested_shift, qabsmax, absmax2,
                 vector_io, table, p);
  }
}

// ---- double quantization in one kernel: the offset's mean and the nested quantization ------

//! Scales one CTA of offset_nested_quantize holds (one step per thread, nested_items scales
//! each): 32 whole leaves of the offset's tree, and whole nested blocks (at most 4096 scales).
inline constexpr size_t fused_scales_per_cta = static_cast<size_t>(cta_threads) * nested_items;
static_assert(fused_scales_per_cta ==
              offset_tree_arity_v * static_cast<size_t>(mean_nodes_per_warp * (cta_threads / 32)));

//! A thread's bounds of the bit span of its scales while it loads them: over the nonzero terms,
//! the largest |x| bit pattern (`max_bits`), the smallest minus one (`min_bits_1`: a zero's
//! 0 - 1 wraps to the largest), and the OR of the mantissa fields (`mantissas`): three integer
//! operations per term instead of bit_span's eight (the bound is looser only where the terms'
//! lowest bits differ). span_of turns them into a span_sum's two fields.
struct span_bounds {
  uint32_t max_bits = 0u;
  uint32_t min_bits_1 = ~0u;
  uint32_t mantissas = 0u;
};

//! Adds one term to a span_bounds.
__device__ QMEM_INLINE void add_span(span_bounds& t, float v) noexcept {
  uint32_t const u = qmem::detail::float_to_bits(v) & 0x7fffffffu;
  t.max_bits = u > t.max_bits ? u : t.max_bits;
  t.min_bits_1 = u - 1u < t.min_bits_1 ? u - 1u : t.min_bits_1;
  t.mantissas |= u & 0x007fffffu;
}

//! `low` of a span_sum whose terms are all zero (above every real bound) and of one with a
//! subnormal term (below every real bound: never exact).
inline constexpr int span_low_none = 1 << 29;
inline constexpr int span_low_subnormal = -(1 << 29);

//! A partial sum of scales with what bounds the bit span of its terms: `top` the largest |x| bit
//! pattern (0: every term zero; >= 0x7f800000: an infinite or NaN term) and `low` a lower bound
//! of every nonzero term's lowest set bit, as a biased exponent (exponent field - 23 + trailing
//! zeros of the mantissa with its hidden bit; span_low_none / span_low_subnormal). Both combine
//! by max / min, so a CTA's record is 16 bytes (one vector load) and its reductions shuffle
//! three fields, not four.
struct span_sum {
  double sum;
  uint32_t top;
  int low;
};

//! The span_sum of terms with these bounds and sum. Every nonzero normal term u has its lowest
//! set bit at exponent(u) - 23 + ctz(mantissa(u) | 2^23) >= exponent(min) - 23 +
//! ctz(mantissas | 2^23), the bound stored in `low`.
__device__ QMEM_INLINE span_sum span_of(double sum, span_bounds const& b) noexcept {
  uint32_t const min_bits = b.min_bits_1 + 1u;
  int const low = b.max_bits == 0          ? span_low_none
                  : min_bits < 0x00800000u ? span_low_subnormal
                                           : static_cast<int>(min_bits >> 23) - 24 +
                                                 __ffs(static_cast<int>(b.mantissas | 0x00800000u));
  return {sum, b.max_bits, low};
}

//! True when every partial sum, in any order, of m terms with these bounds is exact in double
//! (no subnormal, infinite or NaN term; leading bit - lowest bit <= 52 - ceil(log2 m)): then
//! `sum` is the host's tree sum whatever order made it.
__device__ QMEM_INLINE bool exact_in_any_order(span_sum const& t, int log2_m) noexcept {
  if (t.top == 0)
    return true; // only zeros
  if (t.top >= 0x7f800000u)
    return false;
  return static_cast<int>(t.top >> 23) - t.low <= 52 - log2_m;
}

//! Combines two span_sums (the sums in any order: used only where the result is exact).
__device__ QMEM_INLINE span_sum combine(span_sum a, span_sum b) noexcept {
  return {a.sum + b.sum, a.top > b.top ? a.top : b.top, a.low < b.low ? a.low : b.low};
}

//! The CTA's combined span_sum, in every thread (two CTA barriers).
__device__ QMEM_INLINE span_sum cta_span_sum(span_sum v,
                                             span_sum (&partial)[cta_threads / 32]) noexcept {
  QMEM_UNROLL
  for (int offset = 16; offset > 0; offset /= 2)
    v = combine(v, {__shfl_xor_sync(0xffffffffu, v.sum, offset),
                    __shfl_xor_sync(0xffffffffu, v.top, offset),
                    __shfl_xor_sync(0xffffffffu, v.low, offset)});
  if (threadIdx.x % 32 == 0)
    partial[threadIdx.x / 32] = v;
  __syncthreads();
  v = partial[0];
  QMEM_UNROLL
  for (int w = 1; w < cta_threads / 32; ++w)
    v = combine(v, partial[w]);
  __syncthreads(); // partial is reused
  return v;
}

//! A CTA's record in offset_nested_quantize's workspace: its span_sum in 16 bytes.
__device__ QMEM_INLINE void store_record(double* ws, unsigned cta, span_sum const& t) noexcept {
  auto const bits = static_cast<unsigned long long>(__double_as_longlong(t.sum));
  __stcg(reinterpret_cast<uint4*>(ws) + cta,
         make_uint4(static_cast<uint32_t>(bits), static_cast<uint32_t>(bits >> 32), t.top,
                    static_cast<uint32_t>(t.low)));
}

//! The record store_record wrote (through L2: written by another CTA before a grid barrier).
__device__ QMEM_INLINE span_sum load_record(double const* ws, unsigned cta) noexcept {
  uint4 const r = __ldcg(reinterpret_cast<uint4 const*>(ws) + cta);
  return {__longlong_as_double(static_cast<long long>((static_cast<unsigned long long>(r.y) << 32) |
                                                      static_cast<unsigned long long>(r.x))),
          r.z, static_cast<int>(r.w)};
}

//! The host's sum of one leaf of the offset's tree (absmax[256 node, ...) inside [0, m)), in
//! every lane of the calling warp: with shuffles where warp_exact_sum allows, else in order by
//! lane 0 (the layout of offset_mean's leaves).
__device__ QMEM_INLINE double leaf_sum(float const* absmax, size_t m, size_t node) noexcept {
  constexpr int per = static_cast<int>(offset_tree_arity_v) / 32;
  int const lane = static_cast<int>(threadIdx.x) % 32;
  size_t const base = node * offset_tree_arity_v;
  float v[per];
  QMEM_UNROLL
  for (int h = 0; h < 2; ++h)
    QMEM_UNROLL
  for (int k = 0; k < 4; ++k) {
    size_t const i = base + static_cast<size_t>(128 * h + 4 * lane + k);
    v[4 * h + k] = i < m ? __ldcg(absmax + i) : 0.0f;
  }
  double s = 0.0;
  if (!warp_exact_sum(v, s) && lane == 0)
    s = ordered_sum(absmax, base, base + offset_tree_arity_v < m ? base + offset_tree_arity_v : m);
  return __shfl_sync(0xffffffffu, s, 0);
}

//! Double quantization of absmax[0, m) in one cooperative launch (all CTAs resident, one step per
//! thread: m <= gridDim.x * fused_scales_per_cta, see fused_capacity), the scales loaded once and
//! kept in registers across a grid barrier:
//! 1. each thread loads its nested_items scales (nested_slot: the CTA holds scales
//!    [fused_scales_per_cta * blockIdx.x, ...), 32 whole leaves) and sums them in double with
//!    the bounds of their bit span (span_sum); the CTA combines its threads' and stores one
//!    record in `ws`;
//! 2. grid barrier; every CTA combines all records. When no term is subnormal, infinite or NaN
//!    and top - low <= 52 - ceil(log2 m) (exact_in_any_order; top the highest leading bit, low
//!    a bound of the lowest set bit), every partial sum of any subset of the scales is an
//!    integer multiple of the lowest bit's weight below 2^53 times it: exact, whatever the order,
//!    so the total is the host's tree sum (quant/double_quant.hpp detail::tree_mean) bit for bit;
//!    otherwise (rare) the tree is summed level by level as offset_mean does (exact warp sums
//!    where warp_exact_sum allows, else in order), a grid barrier after each level;
//! 3. offset = float(total / m) (CTA 0 stores it), then the nested quantization of the registers
//!    (encode_nested) with the bucket table, whose copy into shared memory (cp.async) was started
//!    before step 1 and waited for after the grid barrier.
//! `ws`: 2 * gridDim.x + ceil(m / 256) + ceil(m / 65536) doubles. Launched as a programmatic
//! dependent of the blockwise quantization that writes absmax (its CTAs may start as that
//! kernel's last wave retires; the table copy does not read what it writes).
//! Replaces offset_mean + nested_quantize for up to fused_capacity scales. Measured on the H200
//! (2026-11-30, the 2^22 scales of a 2^28-element NF4 tensor, nested block 256): ncu 14.5 +
//! 14.2 us for the two kernels; this kernel 24.2 us in its first form (bit_span per term, `a`
//! live across the fallback branch, per-vector tests: 8.77 M issued instructions, 192 K local
//! spill requests), 19.8 us with span bounds per term, the fallback re-loading `a` and `Full`
//! CTAs without per-vector tests (6.39 M instructions, 49 K spill requests; stalls: long
//! scoreboard 7.6 of 23.5 cycles per issue, CTA barriers 3.8), 19.0 us now with 16-byte records
//! of three fields (6.19 M instructions, 21.8 cycles per issue, 57 K spill requests). Loading
//! the scales again after the barriers instead of keeping them in registers (2026-11-30 01:38
//! UTC): 32 K spill requests but 19.6 us, quantize_scales 0.0186 -> 0.0198 ms in one A/B row:
//! not taken. quantize_scales alone 0.0266 -> 0.0210 -> 0.0185 ms (with the stream's persistent
//! workspace); NF4 quantize + double quantization 0.216 -> 0.210 ms, FP4 0.216 -> 0.209.
//! The bucket table's copy by cp.async, started before step 1 and waited for after the grid
//! barrier, instead of a copy through registers and a CTA barrier before step 1 (H200,
//! 2026-11-30 03:59 UTC, same session; ncu: 18.9 -> 16.0 us, 6.19 M -> 5.00 M issued
//! instructions, 57 K -> 41 K spill requests; interleaved A/B with the persistent workspace on
//! both sides: quantize_scales 0.0183 -> 0.0171 ms, NF4 quantize + double quantization 0.2257 ->
//! 0.2235, FP4 0.2160 -> 0.2132). Where the 16 us go: a diagnostic copy that stops after step 2
//! took 10.9 us (2.65 M instructions): the encode is about 5 us, the rest the loads, the two CTA
//! reductions and the grid barrier. Tried and not taken: CTAs of 512 threads, 2 per SM (half the
//! records and barrier arrivals): 16.3 us, 86 K spill requests, A/B within noise (0.0171 /
//! 0.0170 ms).
template <int = 0>
__global__ void __launch_bounds__(cta_threads, nested_min_ctas)
    offset_nested_quantize(float const* QMEM_RESTRICT absmax, size_t m, int nested_shift,
                           double* QMEM_RESTRICT ws, float* QMEM_RESTRICT offset,
                           uint8_t* QMEM_RESTRICT qabsmax, float* QMEM_RESTRICT absmax2,
                           bool vector_io,
                           typename device_encoder<dynamic_signed>::params const p) {
  using layout = bucket_layout_of<dynamic_signed>::type;
  __shared__ alignas(16) uint32_t table[layout::entries];
  __shared__ uint32_t warp_max[max_quantize_threads / 32];
  __shared__ span_sum partial[cta_threads / 32];
  __shared__ float shared_offset;
  // the table is read only in step 3: its copy overlaps steps 1 and 2 (tuning note above)
  start_copy_to_shared(table, p.entry, static_cast<int>(layout::entries));
  pdl_wait(); // nothing above reads what an earlier kernel writes
  auto grid = cooperative_groups::this_grid();
  int const blocks_per_cta = static_cast<int>(blockDim.x) / ((1 << nested_shift) / nested_items);
  nested_slot const s = nested_slot_of(
      static_cast<size_t>(blockIdx.x) * static_cast<size_t>(blocks_per_cta), m, nested_shift);
  // a CTA whose scales all lie inside [0, m) (whole blocks: 8192 is a multiple of every nested
  // block) takes code without per-vector tests
  bool const full = vector_io && (static_cast<size_t>(blockIdx.x) + 1) * fused_scales_per_cta <= m;
  float a[nested_vectors][4];
  if (full)
    load_nested<true>(a, absmax, s, nested_shift, vector_io);
  else
    load_nested(a, absmax, s, nested_shift, vector_io);

  // 1. this thread's sum (four chains: any order is the exact one where it is used) and bounds
  span_sum t;
  {
    span_bounds b;
    double c[4] = {0.0, 0.0, 0.0, 0.0};
    QMEM_UNROLL
    for (int j = 0; j < nested_vectors; ++j)
      QMEM_UNROLL
    for (int k = 0; k < 4; ++k) {
      add_span(b, a[j][k]);
      c[k] += static_cast<double>(a[j][k]);
    }
    t = span_of((c[0] + c[1]) + (c[2] + c[3]), b);
  }
  t = cta_span_sum(t, partial);
  if (threadIdx.x == 0)
    store_record(ws, blockIdx.x, t);
  grid.sync();
  wait_copies_to_shared(); // cta_span_sum's barriers below publish every thread's copies

  // 2. every CTA combines every record (grid-uniform result)
  t = {0.0, 0u, span_low_none};
  for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x)
    t = combine(t, load_record(ws, b));
  t = cta_span_sum(t, partial);
  int const log2_m = m > 1 ? 64 - __clzll(static_cast<long long>(m - 1)) : 0; // ceil(log2 m)
  float off = 0.0f;
  if (exact_in_any_order(t, log2_m)) {
    off = __double2float_rn(__ddiv_rn(t.sum + 0.0, static_cast<double>(m)));
  } else {
    // the tree, level by level (uniform over the grid: every CTA took this branch)
    constexpr size_t arity = offset_tree_arity_v;
    int const warp = static_cast<int>(threadIdx.x) / 32;
    int const lane = static_cast<int>(threadIdx.x) % 32;
    double* const leaves = ws + 2 * static_cast<size_t>(gridDim.x);
    size_t const nodes = (m + arity - 1) / arity;
    size_t const uppers = (nodes + arity - 1) / arity;
    double* const upper = leaves + nodes;
    QMEM_UNROLL
    for (int j = 0; j < mean_nodes_per_warp; ++j) {
      size_t const node =
          (static_cast<size_t>(blockIdx.x) * (cta_threads / 32) + static_cast<size_t>(warp)) *
              mean_nodes_per_warp +
          static_cast<size_t>(j);
      if (node < nodes) {
        double const v = leaf_sum(absmax, m, node);
        if (lane == 0)
          __stcg(leaves + node, v);
      }
    }
    grid.sync();
    if (uppers > 1) {
      if (blockIdx.x < uppers && warp == 0) {
        size_t const begin = static_cast<size_t>(blockIdx.x) * arity;
        double const v = node_sum(leaves, begin, begin + arity < nodes ? begin + arity : nodes);
        if (lane == 0)
          __stcg(upper + blockIdx.x, v);
      }
      grid.sync();
    }
    if (warp == 0) {
      double const root = nodes == 1    ? __ldcg(leaves)
                          : uppers == 1 ? node_sum(leaves, 0, nodes)
                                        : node_sum(upper, 0, uppers);
      if (lane == 0)
        shared_offset = __double2float_rn(__ddiv_rn(root, static_cast<double>(m)));
    }
    __syncthreads();
    off = shared_offset;
    // the scales again (L2 hits): `a` is dead across this branch, which keeps the common path's
    // registers out of local memory (with `a` live here: 140 bytes of spill stores)
    if (full)
      load_nested<true>(a, absmax, s, nested_shift, vector_io);
    else
      load_nested(a, absmax, s, nested_shift, vector_io);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0)
    *offset = off;

  // 3. the nested quantization of the registers
  if (full)
    encode_nested<true>(a, off, s, nested_shift, qabsmax, absmax2, vector_io, table, p, warp_max);
  else
    encode_nested(a, off, s, nested_shift, qabsmax, absmax2, vector_io, table, p, warp_max);
}

//! Elementwise dequantization of double-quantized scales. (A template only so that the header
//! can define it in every translation unit: a plain __global__ function is not inline.)
template <int = 0>
__global__ void __launch_bounds__(cta_threads)
    dequantize_scales_kernel(nested_scales scales, size_t m, float* QMEM_RESTRICT absmax) {
  __shared__ scales_state<nested_scales>::storage st;
  scales_state<nested_scales>::prepare(scales, st);
  __syncthreads();
  auto const scale_of = scales_state<nested_scales>::load(scales, st);
  size_t const stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < m; i += stride)
    absmax[i] = scale_of(i);
}

// ---- launch helpers -----------------------------------------------------------------------

inline bool aligned16(void const* p) noexcept {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

//! Grid for a grid-stride kernel: enough CTAs to fill every SM `waves` times (`resident` per SM,
//! from the occupancy calculator), never more than there is work for. The occupancy calculator's
//! answer is cached per (kernel, CTA size, device): it is host work that every call would
//! otherwise repeat.
template <class Kernel>
unsigned grid_for(Kernel kernel, int threads, size_t work_items, int device, int waves = 1) {
  struct key {
    void const* kernel;
    int threads;
    int device;
    int resident;
  };
  constexpr int cache_size = 64;
  static key cache[cache_size] = {};
  static int cached = 0;
  static std::mutex mutex;
  auto const* const kp = reinterpret_cast<void const*>(kernel);
  int resident = 0;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (int i = 0; i < cached; ++i)
      if (cache[i].kernel == kp && cache[i].threads == threads && cache[i].device == device)
        resident = cache[i].resident;
  }
  if (resident == 0) {
    // the first query may come inside a global-mode capture
    qmem::cuda_detail::relaxed_capture_scope const relaxed;
    qmem::cuda_detail::check(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, threads, 0),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    if (resident < 1)
      resident = 1;
    std::lock_guard<std::mutex> lock(mutex);
    if (cached < cache_size)
      cache[cached++] = {kp, threads, device, resident};
  }
  size_t const full = static_cast<size_t>(qmem::cuda_detail::sm_count(device)) *
                      static_cast<size_t>(resident) * static_cast<size_t>(waves);
  size_t const g = work_items < full ? work_items : full;
  return static_cast<unsigned>(g == 0 ? 1 : g);
}

//! log2 of a power of two.
inline int log2_exact(size_t v) noexcept {
  int s = 0;
  while ((size_t{1} << s) < v)
    ++s;
  return s;
}

//! Quantizes with the fast kernel when the block size is a power of two of at least
//! quantize_items<T> (and at most quantize_items_wide<T> * max_quantize_threads) and the views are
//! 16-byte aligned, else with the scalar kernel. Blocks that one warp covers at quantize_items<T>
//! per thread use that; larger ones quantize_items_wide<T>.
template <class C, class T, class Transform>
void quantize_any(exec::cuda const& e, T const* x, size_t n, size_t block_size, uint8_t* codes,
                  float* absmax, rounding r, Transform tf) {
  size_t const blocks = n / block_size + (n % block_size != 0 ? 1 : 0);
  bool const pow2 = (block_size & (block_size - 1)) == 0;
  auto launch = [&]<int Items, bool Stochastic>(std::integral_constant<int, Items>,
                                                std::bool_constant<Stochastic>) {
    int const group = static_cast<int>(block_size / Items);
    int const threads = group > cta_threads ? group : cta_threads;
    size_t const per_step = static_cast<size_t>(threads / group);
    auto kernel = quantize_aligned<C, T, Items, Transform, Stochastic>;
    unsigned const grid = grid_for(kernel, threads, blocks / per_step + 1, e.device);
    kernel<<<grid, threads, 0, e.stream>>>(x, n, log2_exact(block_size), codes, absmax, blocks,
                                           r.seed, C::book,
                                           device_encoder<C>::host_params(e.device), tf);
    qmem::cuda_detail::check_launch(e, "qmem::quant quantize_aligned");
  };
  auto launch_scalar = [&]<bool Stochastic>(std::bool_constant<Stochastic>) {
    auto kernel = quantize_scalar<C, T, Transform, Stochastic>;
    unsigned const grid = grid_for(kernel, cta_threads, blocks / (cta_threads / 32) + 1, e.device);
    kernel<<<grid, cta_threads, 0, e.stream>>>(x, n, block_size, codes, absmax, blocks, r.seed,
                                               C::book, device_encoder<C>::host_params(e.device),
                                               tf);
    qmem::cuda_detail::check_launch(e, "qmem::quant quantize_scalar");
  };
  // Nearest rounding: whole blocks by quantize_whole, a partial last block by quantize_scalar.
  auto launch_whole = [&]<int Items>(std::integral_constant<int, Items>) {
    size_t const whole = n / block_size;
    if (whole != 0) {
      int const group = static_cast<int>(block_size / Items);
      int const threads = group > cta_threads ? group : cta_threads;
      size_t const per_step = static_cast<size_t>(threads / group);
      auto const go = [&]<int FixedShift>(std::integral_constant<int, FixedShift>) {
        constexpr int min_ctas =
            FixedShift != 0 ? whole_fixed_min_ctas<C, T, Items> : whole_min_ctas<T, Items>;
        auto kernel = quantize_whole<C, T, Items, Transform, min_ctas, false, FixedShift>;
        unsigned const grid = grid_for(kernel, threads, whole / per_step + 1, e.device,
                                       whole_waves<typename normal_encoder<C>::storage>);
        qmem::cuda_detail::launch(
            e, false, kernel, dim3(grid), dim3(static_cast<unsigned>(threads)), 0,
            "qmem::quant quantize_whole", x, whole, log2_exact(block_size), codes, absmax, C::book,
            normal_encoder<C>::host_params(e.device), tf);
      };
      constexpr int fixed = whole_fixed_shift<T, Items>;
      if (fixed != 0 && block_size == size_t{1} << fixed && whole <= whole_fixed_max_blocks)
        go(std::integral_constant<int, fixed>{});
      else
        go(std::integral_constant<int, 0>{});
    }
    if (whole != blocks) {
      size_t const begin = whole * block_size;
      quantize_scalar<C, T, Transform, false><<<1, 32, 0, e.stream>>>(
          x + begin, n - begin, block_size, codes + (C::bits == 8 ? begin : begin / 2),
          absmax + whole, 1, r.seed, C::book, device_encoder<C>::host_params(e.device), tf);
      qmem::cuda_detail::check_launch(e, "qmem::quant quantize_scalar");
    }
  };
  constexpr int whole_narrow = whole_items<T>;
  constexpr int whole_wide = whole_items_wide<T>;
  if (!r.stochastic && aligned16(x) && aligned16(codes) && pow2 &&
      block_size >= static_cast<size_t>(whole_narrow) &&
      block_size / whole_wide <= static_cast<size_t>(max_quantize_threads / 2)) {
    if (block_size <= static_cast<size_t>(32 * whole_narrow))
      launch_whole(std::integral_constant<int, whole_narrow>{});
    else
      launch_whole(std::integral_constant<int, whole_wide>{});
    return;
  }
  constexpr int narrow = quantize_items<T>;
  constexpr int wide = quantize_items_wide<T>;
  if (aligned16(x) && aligned16(codes) && pow2 && block_size >= static_cast<size_t>(narrow) &&
      block_size / wide <= static_cast<size_t>(max_quantize_threads)) {
    bool const narrow_items = block_size <= static_cast<size_t>(32 * narrow);
    if (narrow_items && r.stochastic)
      launch(std::integral_constant<int, narrow>{}, std::true_type{});
    else if (narrow_items)
      launch(std::integral_constant<int, narrow>{}, std::false_type{});
    else if (r.stochastic)
      launch(std::integral_constant<int, wide>{}, std::true_type{});
    else
      launch(std::integral_constant<int, wide>{}, std::false_type{});
    return;
  }
  if (r.stochastic)
    launch_scalar(std::true_type{});
  else
    launch_scalar(std::false_type{});
}

template <class C, class T, class Scales>
void dequantize_any(exec::cuda const& e, uint8_t const* codes, Scales scales, size_t n,
                    size_t block_size, T* y) {
  constexpr int vec = vector_items<T>;
  bool const pow2 = (block_size & (block_size - 1)) == 0;
  if (aligned16(codes) && aligned16(y) && pow2 && block_size % vec == 0) {
    auto kernel = dequantize_aligned<C, T, Scales>;
    // One loop step per thread (a CTA per cta_threads * dequantize_vectors_per_step<C> vectors):
    // see dequantize_vectors_per_step. The prologue it repeats per CTA, issued after the step's
    // own loads: one 4-byte load per thread for 4-bit codes (then the nested table and a barrier
    // only with double-quantized scales), the 1 KB table and a barrier for 8-bit codes.
    size_t const steps = n / vec / dequantize_vectors_per_step<C> + 1;
    size_t const ctas = steps / cta_threads + 1;
    auto const grid = static_cast<unsigned>(ctas < max_grid ? ctas : max_grid);
    kernel<<<grid, cta_threads, 0, e.stream>>>(codes, scales, n, log2_exact(block_size), y,
                                               decoded_values_on<C>(e.device));
    qmem::cuda_detail::check_launch(e, "qmem::quant dequantize_aligned");
    return;
  }
  auto kernel = dequantize_scalar<C, T, Scales>;
  unsigned const grid = grid_for(kernel, cta_threads, n / cta_threads + 1, e.device);
  kernel<<<grid, cta_threads, 0, e.stream>>>(codes, scales, n, block_size, y, C::book);
  qmem::cuda_detail::check_launch(e, "qmem::quant dequantize_scalar");
}

//! Enqueues the fixed-order mean of absmax[0, m) into *offset (m > 0).
inline void tree_mean(exec::cuda const& e, float const* absmax, size_t m, float* offset) {
  constexpr size_t arity = offset_tree_arity_v;
  // 32 rows of 257 floats (32.9 KB) or 16 rows of 257 doubles per CTA: under the 48 KB static
  // shared memory limit, enough for the 8 loading warps to saturate a CTA's share of bandwidth.
  constexpr int float_nodes = 32;
  constexpr int double_nodes = 16;
  size_t const level0 = m / arity + (m % arity != 0 ? 1 : 0);
  if (level0 > 1 && level0 <= mean_max_leaves) {
    // one launch (offset_mean): the leaves' sums and a ticket counter in a workspace
    constexpr size_t nodes_per_cta = static_cast<size_t>(mean_nodes_per_warp) * (cta_threads / 32);
    size_t const level1 = (level0 + arity - 1) / arity;
    memory::device_workspace<double> ws(memory::default_device_resource(e.device),
                                        level0 + level1 + (level1 + 2) / 2, e.stream);
    auto* const tickets = reinterpret_cast<unsigned*>(ws.data() + level0 + level1);
    qmem::cuda_detail::check(cudaMemsetAsync(tickets, 0, (level1 + 1) * sizeof(unsigned), e.stream),
                             "cudaMemsetAsync");
    auto const grid = static_cast<unsigned>((level0 + nodes_per_cta - 1) / nodes_per_cta);
    offset_mean<><<<grid, cta_threads, 0, e.stream>>>(absmax, m, ws.data(), tickets, offset);
    qmem::cuda_detail::check_launch(e, "qmem::quant offset_mean");
    return;
  }
  if (level0 == 1) {
    tree_level<float, float_nodes><<<1, cta_threads, 0, e.stream>>>(absmax, m, nullptr, offset, m);
    qmem::cuda_detail::check_launch(e, "qmem::quant tree_level");
    return;
  }
  // ping-pong storage for the levels above the leaves
  size_t const level1 = level0 / arity + (level0 % arity != 0 ? 1 : 0);
  memory::device_workspace<double> ws(memory::default_device_resource(e.device), level0 + level1,
                                      e.stream);
  double* cur = ws.data();
  double* next = ws.data() + level0;
  {
    unsigned const grid = static_cast<unsigned>((level0 + float_nodes - 1) / float_nodes);
    tree_level<float, float_nodes><<<grid, cta_threads, 0, e.stream>>>(absmax, m, cur, offset, m);
    qmem::cuda_detail::check_launch(e, "qmem::quant tree_level");
  }
  size_t len = level0;
  while (len > 1) {
    size_t const nodes = len / arity + (len % arity != 0 ? 1 : 0);
    unsigned const grid = static_cast<unsigned>((nodes + double_nodes - 1) / double_nodes);
    tree_level<double, double_nodes><<<grid, cta_threads, 0, e.stream>>>(cur, len, next, offset, m);
    qmem::cuda_detail::check_launch(e, "qmem::quant tree_level");
    len = nodes;
    double* const t = cur;
    cur = next;
    next = t;
  }
}

//! Enqueues nested_quantize of absmax[0, m) - *offset in blocks of `nested_block`, as a
//! programmatic dependent of the kernel before it on the stream (which computes *offset).
inline void launch_nested_quantize(exec::cuda const& e, float const* absmax, size_t m,
                                   size_t nested_block, float const* offset, uint8_t* qabsmax,
                                   float* absmax2) {
  auto kernel = nested_quantize<>;
  size_t const per_cta = static_cast<size_t>(cta_threads) / (nested_block / nested_items);
  size_t const blocks = (m + nested_block - 1) / nested_block;
  unsigned const grid = grid_for(kernel, cta_threads, (blocks + per_cta - 1) / per_cta, e.device);
  bool const vector_io = aligned16(absmax) && reinterpret_cast<std::uintptr_t>(qabsmax) % 4 == 0;
  qmem::cuda_detail::launch(e, true, kernel, dim3(grid), dim3(cta_threads), 0,
                            "qmem::quant nested_quantize", absmax, m, log2_exact(nested_block),
                            offset, qabsmax, absmax2, vector_io,
                            device_encoder<dynamic_signed>::host_params(e.device));
}

//! How quantize_scales computes the offset and the nested codes: `two_kernels` offset_mean (or
//! tree_level) then nested_quantize as its programmatic dependent; `fused` offset_nested_quantize
//! (one cooperative launch); `fused_dependent` the same as a programmatic dependent of the
//! kernel before it on the stream. quantize_scales takes fused_dependent when the scales fit
//! (fused_capacity), else two_kernels; the benchmark times each.
//! `fused_persistent` is fused_dependent with the stream's persistent workspace
//! (persistent_workspace) instead of one from the pool.
enum class scales_path { two_kernels, fused, fused_dependent, fused_persistent };

//! Scales offset_nested_quantize may take at most: its tree (the fallback) sums at most 256 upper
//! nodes in its root.
inline constexpr size_t fused_tree_limit = mean_max_leaves * offset_tree_arity_v;

//! Per-device state of fused_capacity (first 64 devices): what the device's attributes promise,
//! and the capacity quantize_scales uses now.
struct fused_capacity_state {
  static constexpr int devices = 64;
  size_t promised[devices] = {};
  size_t capacity[devices] = {};
  bool known[devices] = {};
  std::mutex mutex;
  static fused_capacity_state& instance() {
    static fused_capacity_state s;
    return s;
  }
  //! Fills `device`'s entry on first use and locks the state, for one read or write of the
  //! entry. Precondition (bad_argument, nothing read or written): 0 <= device < 64.
  static std::unique_lock<std::mutex> lock_entry(int device) {
    QMEM_EXPECTS(device >= 0 && device < devices, "device is ", device, "; expected 0..",
                 devices - 1);
    ensure(device);
    return std::unique_lock<std::mutex>(instance().mutex);
  }
  //! Fills device's entry on first use (caller holds no lock). Precondition: 0 <= device < 64.
  static void ensure(int device) {
    auto& st = instance();
    {
      std::lock_guard<std::mutex> lock(st.mutex);
      if (st.known[device])
        return;
    }
    int cooperative = 0;
    qmem::cuda_detail::check(
        cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device),
        "cudaDeviceGetAttribute(CooperativeLaunch)");
    size_t const resident =
        cooperative == 0
            ? 0
            : static_cast<size_t>(grid_for(offset_nested_quantize<>, cta_threads,
                                           ~size_t{0} / fused_scales_per_cta, device)) *
                  fused_scales_per_cta;
    size_t const promised = resident < fused_tree_limit ? resident : fused_tree_limit;
    std::lock_guard<std::mutex> lock(st.mutex);
    if (!st.known[device]) {
      st.promised[device] = promised;
      st.capacity[device] = promised;
      st.known[device] = true;
    }
  }
};

//! Scales offset_nested_quantize holds on `device` by the device's attributes: one step per
//! thread, every CTA resident (resident CTAs per SM x SMs x fused_scales_per_cta; 4 x 132 x 8192
//! = 4.3 M on the H200, the scales of a 2^28-element tensor in blocks of 64), at most
//! fused_tree_limit; 0 where the device has no cooperative launch. The persistent workspace is
//! sized for it. Cached per device. Precondition: 0 <= device < 64.
inline size_t device_fused_capacity(int device) {
  auto const lock = fused_capacity_state::lock_entry(device);
  return fused_capacity_state::instance().promised[device];
}

//! Scales quantize_scales gives offset_nested_quantize on `device` (more: the two-kernel path):
//! device_fused_capacity, lowered for the rest of the process when a cooperative launch is
//! refused as too large (lower_fused_capacity), or as set by set_fused_capacity. Precondition:
//! 0 <= device < 64.
inline size_t fused_capacity(int device) {
  auto const lock = fused_capacity_state::lock_entry(device);
  return fused_capacity_state::instance().capacity[device];
}

//! Sets fused_capacity(device) to `capacity` scales (at most fused_tree_limit; 0: quantize_scales
//! never takes the cooperative kernel on this device) for the rest of the process. For a process
//! that knows it runs on a share of the device (MPS with an active-thread limit, a green
//! context), and for tests: above device_fused_capacity the cooperative launch is refused and
//! quantize_scales falls back to the two kernels (and lowers the capacity again). Preconditions:
//! 0 <= device < 64; capacity <= fused_tree_limit.
inline void set_fused_capacity(int device, size_t capacity) {
  QMEM_EXPECTS(capacity <= fused_tree_limit, "capacity is ", capacity, "; expected at most ",
               fused_tree_limit);
  auto const lock = fused_capacity_state::lock_entry(device);
  fused_capacity_state::instance().capacity[device] = capacity;
}

//! After a cooperative launch of `refused_grid` (>= 1) CTAs was refused as too large on `device`:
//! fused_capacity drops below that grid (the context holds fewer CTAs than the SM count and the
//! occupancy promised, e.g. under MPS with an active-thread limit), so that later calls of that
//! size take the two-kernel path at once.
inline void lower_fused_capacity(int device, size_t refused_grid) {
  if (device < 0 || device >= fused_capacity_state::devices || refused_grid == 0)
    return;
  size_t const below = (refused_grid - 1) * fused_scales_per_cta;
  auto const lock = fused_capacity_state::lock_entry(device);
  size_t& capacity = fused_capacity_state::instance().capacity[device];
  capacity = below < capacity ? below : capacity;
}

//! Doubles of workspace offset_nested_quantize needs for m scales (see the kernel).
inline size_t fused_workspace_size(size_t m) noexcept {
  constexpr size_t arity = offset_tree_arity_v;
  size_t const grid = (m + fused_scales_per_cta - 1) / fused_scales_per_cta;
  size_t const nodes = (m + arity - 1) / arity;
  return 2 * grid + nodes + (nodes + arity - 1) / arity;
}

//! A workspace of fused_workspace_size(device_fused_capacity(e.device)) doubles kept for the life
//! of the process for e's (device, stream) (cudaStreamGetId: ids are never reused), so that
//! quantize_scales makes no pool allocation and free around offset_nested_quantize. Measured on
//! the H200 (2026-11-30 01:38 UTC, interleaved A/B, pool / persistent): quantize_scales of 2^22
//! scales 0.0197 / 0.0185 ms, NF4 quantize + double quantization 0.2118 / 0.2105, FP4 0.2132 /
//! 0.2134 (the programmatic overlap with the quantization stays within noise either way).
//! Kernels on one stream run in order, so one buffer per stream is never used by two launches at
//! once. nullptr (the caller takes the pool) while e.stream is capturing (a graph may be replayed
//! on any stream), when the stream has no id, or past 16 streams (at most 16 x 144 KB on the
//! H200, never freed). Thread-safe.
inline double* persistent_workspace(exec::cuda const& e) {
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  qmem::cuda_detail::check(cudaStreamIsCapturing(e.stream, &capturing), "cudaStreamIsCapturing");
  if (capturing != cudaStreamCaptureStatusNone)
    return nullptr;
  unsigned long long id = 0;
  if (cudaStreamGetId(e.stream, &id) != cudaSuccess) {
    (void)cudaGetLastError(); // not sticky: clear it so that no later check reports it
    return nullptr;
  }
  struct entry {
    int device;
    unsigned long long id;
    double* data;
  };
  constexpr int max_entries = 16;
  static entry entries[max_entries] = {};
  static int used = 0;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  for (int i = 0; i < used; ++i)
    if (entries[i].device == e.device && entries[i].id == id)
      return entries[i].data;
  if (used == max_entries)
    return nullptr;
  void* p = nullptr;
  // another thread may be capturing in global mode
  qmem::cuda_detail::relaxed_capture_scope const relaxed;
  qmem::cuda_detail::check(
      cudaMalloc(&p, fused_workspace_size(device_fused_capacity(e.device)) * sizeof(double)),
      "cudaMalloc(offset_nested_quantize workspace)");
  entries[used++] = {e.device, id, static_cast<double*>(p)};
  return static_cast<double*>(p);
}

//! Enqueues offset_nested_quantize of absmax[0, m) (0 < m <= fused_capacity(e.device)): one
//! cooperative launch, with `dependent` also a programmatic dependent of the kernel before it.
//! `workspace`: fused_workspace_size(m) doubles, or nullptr for a stream-ordered allocation from
//! the device's pool. Returns false, with nothing enqueued and no error left behind, when the
//! runtime refuses the grid as too large for one wave (cudaErrorCooperativeLaunchTooLarge: the
//! context holds fewer CTAs than fused_capacity computed, e.g. under MPS with an active-thread
//! limit); fused_capacity(e.device) is then lowered below that grid (lower_fused_capacity).
//! Inside a stream capture that refusal has invalidated the capture: throws cuda_error.
inline bool launch_offset_nested_quantize(exec::cuda const& e, float const* absmax, size_t m,
                                          size_t nested_block, float* offset, uint8_t* qabsmax,
                                          float* absmax2, bool dependent,
                                          double* workspace = nullptr) {
  auto kernel = offset_nested_quantize<>;
  size_t const grid = (m + fused_scales_per_cta - 1) / fused_scales_per_cta;
  std::optional<memory::device_workspace<double>> pooled;
  if (workspace == nullptr)
    workspace =
        pooled.emplace(memory::default_device_resource(e.device), fused_workspace_size(m), e.stream)
            .data();
  bool const vector_io = aligned16(absmax) && reinterpret_cast<std::uintptr_t>(qabsmax) % 4 == 0;
  auto const params = device_encoder<dynamic_signed>::host_params(e.device);
  int const shift = log2_exact(nested_block);
  double* const w = workspace;
  cudaLaunchAttribute attr[2] = {};
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(cta_threads);
  config.stream = e.stream;
  config.attrs = attr;
  config.numAttrs = dependent ? 2 : 1;
  cudaError_t const status = cudaLaunchKernelEx(&config, kernel, absmax, m, shift, w, offset,
                                                qabsmax, absmax2, vector_io, params);
  if (status == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError(); // not sticky: clear it so that no later check reports it
    lower_fused_capacity(e.device, grid);
    // inside a capture the refusal has invalidated the capture (H200, CUDA 13.0, 2026-11-30):
    // nothing can be enqueued in its place
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    qmem::cuda_detail::check(cudaStreamIsCapturing(e.stream, &capturing), "cudaStreamIsCapturing");
    if (capturing != cudaStreamCaptureStatusNone)
      throw cuda_error(qmem::detail::message(
                           "qmem::quant offset_nested_quantize: the cooperative launch of ", grid,
                           " CTAs was refused as too large inside a stream capture, which it "
                           "invalidated; fused_capacity is lowered to ",
                           fused_capacity(e.device), " scales: capture again"),
                       static_cast<int>(status));
    return false;
  }
  qmem::cuda_detail::check(status, "qmem::quant offset_nested_quantize");
  qmem::cuda_detail::check_launch(e, "qmem::quant offset_nested_quantize");
  return true;
}

//! quantize_scales (below) through `path` (fused paths for 0 < m <= fused_capacity; when the
//! runtime refuses the cooperative launch as too large, the two kernels instead).
inline void quantize_scales_by(exec::cuda const& e, float const* absmax, size_t m,
                               size_t nested_block, uint8_t* qabsmax, float* absmax2, float* offset,
                               scales_path path) {
  if (path != scales_path::two_kernels) {
    // the persistent workspace holds device_fused_capacity scales' records
    bool const persistent =
        path == scales_path::fused_persistent && m <= device_fused_capacity(e.device);
    if (launch_offset_nested_quantize(e, absmax, m, nested_block, offset, qabsmax, absmax2,
                                      path != scales_path::fused,
                                      persistent ? persistent_workspace(e) : nullptr))
      return;
  }
  tree_mean(e, absmax, m, offset);
  launch_nested_quantize(e, absmax, m, nested_block, offset, qabsmax, absmax2);
}

} // namespace kernels

//! GPU quantize_blockwise (see quant/blockwise.hpp; preconditions checked by the caller).
template <code_type C, float_element T>
void quantize_blockwise(exec::cuda const& e, tensor_view<T const> x, std::size_t block_size,
                        tensor_view<std::uint8_t> codes, tensor_view<float> absmax,
                        rounding r = {}) {
  if (x.empty())
    return;
  qmem::cuda_detail::device_guard guard(e.device);
  using qmem::cuda_detail::arg;
  qmem::cuda_detail::check_resident(e, "quantize_blockwise",
                                    {arg("x", x), arg("codes", codes), arg("absmax", absmax)});
  kernels::quantize_any<C>(e, x.data(), x.size(), block_size, codes.data(), absmax.data(), r,
                           kernels::no_transform{});
}

//! GPU dequantize_blockwise (see quant/blockwise.hpp).
template <code_type C, float_element T>
void dequantize_blockwise(exec::cuda const& e, tensor_view<std::uint8_t const> codes,
                          tensor_view<float const> absmax, std::size_t block_size,
                          tensor_view<T> y) {
  if (y.empty())
    return;
  qmem::cuda_detail::device_guard guard(e.device);
  using qmem::cuda_detail::arg;
  qmem::cuda_detail::check_resident(e, "dequantize_blockwise",
                                    {arg("codes", codes), arg("absmax", absmax), arg("y", y)});
  kernels::dequantize_any<C>(e, codes.data(), kernels::plain_scales{absmax.data()}, y.size(),
                             block_size, y.data());
}

//! GPU quantize_scales (see quant/double_quant.hpp): up to fused_capacity scales (4.3 M on the
//! H200) one cooperative kernel (offset_nested_quantize; where the runtime refuses its grid as
//! too large for the context, e.g. under MPS with an active-thread limit, the two kernels below,
//! and the capacity is lowered for later calls; inside a stream capture that refusal has
//! invalidated the capture, and this throws cuda_error saying so); more: the fixed-order mean
//! (offset_mean, or one tree_level kernel per level beyond 2^24 scales), then nested_quantize of
//! absmax - offset. Workspace from the device's default pool, stream-ordered, no host round trip.
//! The stream's persistent workspace (scales_path::fused_persistent) is not dispatched: its first
//! use on a stream is a cudaMalloc, which may synchronize the device, and it holds memory outside
//! the pool for the life of the process, for a gain within noise (H200, 2026-11-30 01:38 UTC,
//! interleaved A/B, pool / persistent: NF4 quantize + double quantization 0.2118 / 0.2105 ms, FP4
//! 0.2132 / 0.2134).
inline void quantize_scales(exec::cuda const& e, tensor_view<float const> absmax,
                            std::size_t nested_block, tensor_view<std::uint8_t> qabsmax,
                            tensor_view<float> absmax2, tensor_view<float> offset) {
  qmem::cuda_detail::device_guard guard(e.device);
  using qmem::cuda_detail::arg;
  qmem::cuda_detail::check_resident(e, "quantize_scales",
                                    {arg("absmax", absmax), arg("qabsmax", qabsmax),
                                     arg("absmax2", absmax2), arg("offset", offset)});
  if (absmax.empty()) {
    qmem::cuda_detail::check(cudaMemsetAsync(offset.data(), 0, sizeof(float), e.stream),
                             "cudaMemsetAsync");
    return;
  }
  bool const fits = absmax.size() <= kernels::fused_capacity(e.device);
  kernels::quantize_scales_by(
      e, absmax.data(), absmax.size(), nested_block, qabsmax.data(), absmax2.data(), offset.data(),
      fits ? kernels::scales_path::fused_dependent : kernels::scales_path::two_kernels);
}

//! GPU dequantize_scales (see quant/double_quant.hpp).
inline void dequantize_scales(exec::cuda const& e, tensor_view<std::uint8_t const> qabsmax,
                              tensor_view<float const> absmax2, tensor_view<float const> offset,
                              std::size_t nested_block, tensor_view<float> absmax) {
  if (absmax.empty())
    return;
  qmem::cuda_detail::device_guard guard(e.device);
  using qmem::cuda_detail::arg;
  qmem::cuda_detail::check_resident(e, "dequantize_scales",
                                    {arg("qabsmax", qabsmax), arg("absmax2", absmax2),
                                     arg("offset", offset), arg("absmax", absmax)});
  auto kernel = kernels::dequantize_scales_kernel<>;
  unsigned const grid = kernels::grid_for(kernel, kernels::cta_threads,
                                          absmax.size() / kernels::cta_threads + 1, e.device);
  kernel<<<grid, kernels::cta_threads, 0, e.stream>>>(
      kernels::nested_scales{qabsmax.data(), absmax2.data(), offset.data(),
                             kernels::log2_exact(nested_block), kernels::nested_values(e.device)},
      absmax.size(), absmax.data());
  qmem::cuda_detail::check_launch(e, "qmem::quant dequantize_scales");
}

//! GPU dequantize_blockwise_nested (see quant/double_quant.hpp): the scale of each block is
//! rebuilt from qabsmax/absmax2/offset inside the dequantize kernel (one pass over the codes).
template <code_type C, float_element T>
void dequantize_blockwise_nested(exec::cuda const& e, tensor_view<std::uint8_t const> codes,
                                 tensor_view<std::uint8_t const> qabsmax,
                                 tensor_view<float const> absmax2, tensor_view<float const> offset,
                                 std::size_t block_size, std::size_t nested_block,
                                 tensor_view<T> y) {
  if (y.empty())
    return;
  qmem::cuda_detail::device_guard guard(e.device);
  using qmem::cuda_detail::arg;
  qmem::cuda_detail::check_resident(e, "dequantize_blockwise_nested",
                                    {arg("codes", codes), arg("qabsmax", qabsmax),
                                     arg("absmax2", absmax2), arg("offset", offset), arg("y", y)});
  kernels::dequantize_any<C>(e, codes.data(),
                             kernels::nested_scales{qabsmax.data(), absmax2.data(), offset.data(),
                                                    kernels::log2_exact(nested_block),
                                                    kernels::nested_values(e.device)},
                             y.size(), block_size, y.data());
}

} // namespace qmem::quant::cuda_impl
