#pragma once
//! \file
//! Device-side encoders: how a kernel turns a normalized value into a code. Each one computes
//! exactly `C::encode(xn, C::book)` (tests compare them over all 2^32 floats on the GPU), faster:
//!
//! - the dynamic 8-bit maps, NF4 and FP4 look the code up in a bucket table
//!   (detail/bucket_search.hpp) held in shared memory: one read and ~12 integer instructions per
//!   element, instead of the binary search's eight reads or 15 threshold comparisons;
//! - every other code type calls C::encode on a shared-memory copy of its book.
//!
//! `normal_encoder<C>` is the form for blocks whose absmax is in [2^-126, 2^126) (every
//! xn = x * (1 / absmax) then finite, |xn| <= 1 + 2^-23): NF4 and FP4 through an interval table
//! (detail/interval_table.hpp: FFMA, IMAD, one 8-byte shared load, FSETP, a predicated shift),
//! the dynamic maps through the bucket table without the NaN test and the upper clamp. Its functor
//! returns the code in the low bits (4 or 8) of a 32-bit value whose higher bits are not cleared:
//! the kernels pack the low bits only.
//!
//! Protocol (used by the kernels in quant/cuda/blockwise.cuh): `params` is a kernel argument made
//! on the host by `host_params(device)` (for the 8-bit maps: a pointer to the table in
//! device memory, see device_table); `storage` is the kernel's shared memory, filled by `prepare`
//! (followed by a CTA barrier); `make` returns the per-thread functor `enc(xn) -> code`.

#include <qmem/core/config.hpp>

#if !QMEM_HAS_CUDA()
#error "qmem/quant/cuda/detail/encoder.cuh is for CUDA translation units (compile with nvcc)"
#endif

#include <qmem/core/cuda/runtime.cuh>
#include <qmem/memory/cuda_resource.cuh>
#include <qmem/quant/codes.hpp>
#include <qmem/quant/cuda/detail/bucket_search.hpp>
#include <qmem/quant/cuda/detail/interval_table.hpp>

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <type_traits>

namespace qmem::quant::cuda_impl {

//! A copy of `host` (a table built once per process, in static storage) in the device memory of
//! `device` (the current device), made on the first call for that device and kept for the life of
//! the process. Thread-safe; devices 0..63.
//!
//! The one-time upload enqueues nothing on the caller's streams and may run while one of them is
//! being captured into a CUDA graph: it uses a stream of its own, with this thread's capture mode
//! switched to relaxed for its duration, and waits for that stream only (once per device and
//! table; no device-wide synchronization).
//!
//! Why: the 8-bit maps' bucket table is 22.5 KB. Passed as a kernel argument it lives in the
//! constant bank, where the threads' copies of different entries into shared memory serialize:
//! the nested 8-bit quantization of 2^22 NF4 scales ran 62 us instead of 16 (ncu, H200,
//! 2026-11-29), most of the double-quantization overhead.
template <class T>
T const* device_table(T const& host, int device) {
  constexpr int max_devices = 64;
  QMEM_EXPECTS(device >= 0 && device < max_devices, "device is ", device, "; expected 0..",
               max_devices - 1);
  static std::mutex mutex;
  static std::array<T*, max_devices> tables{};
  std::lock_guard<std::mutex> lock(mutex);
  T*& table = tables[static_cast<std::size_t>(device)];
  if (table != nullptr)
    return table;
  qmem::cuda_detail::relaxed_capture_scope const relaxed; // until the end of the upload
  struct own_stream {
    cudaStream_t stream = nullptr;
    own_stream() {
      qmem::cuda_detail::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                               "cudaStreamCreateWithFlags");
    }
    own_stream(own_stream const&) = delete;
    own_stream& operator=(own_stream const&) = delete;
    ~own_stream() { (void)cudaStreamDestroy(stream); }
  } const upload;
  void* p = memory::default_device_resource(device).allocate_async(sizeof(T), upload.stream);
  qmem::cuda_detail::check(
      cudaMemcpyAsync(p, &host, sizeof(T), cudaMemcpyHostToDevice, upload.stream),
      "cudaMemcpyAsync");
  qmem::cuda_detail::check(cudaStreamSynchronize(upload.stream), "cudaStreamSynchronize");
  table = static_cast<T*>(p);
  return table;
}

//! Copies `count` 32-bit words from global memory (read-only for the kernel's lifetime) into
//! shared memory with the whole CTA, eight independent loads in flight per thread (a loop of one
//! load and one store per iteration would wait on a memory latency per word). The caller
//! synchronizes the CTA afterwards.
__device__ QMEM_INLINE void copy_words_to_shared(std::uint32_t* dst, std::uint32_t const* src,
                                                 int count) {
  constexpr int batch = 8;
  int const step = static_cast<int>(blockDim.x);
  for (int first = static_cast<int>(threadIdx.x); first < count; first += batch * step) {
    std::uint32_t w[batch];
    QMEM_UNROLL
    for (int k = 0; k < batch; ++k)
      w[k] = first + k * step < count ? __ldg(src + first + k * step) : 0u;
    QMEM_UNROLL
    for (int k = 0; k < batch; ++k)
      if (first + k * step < count)
        dst[first + k * step] = w[k];
  }
}

//! Starts copying `count` 32-bit words from global memory (read-only for the kernel's lifetime)
//! into shared memory with the whole CTA, without registers or waits: 16-byte cp.async copies
//! (L2 only), then 4-byte ones for the tail. `src` and `dst` 16-byte aligned. The copies land
//! after this thread's wait_copies_to_shared; the CTA then needs a barrier before any thread reads
//! `dst`. Kernels whose first phase does not read the table (offset_nested_quantize) issue this
//! first and wait just before the lookups, so the copy overlaps that phase instead of preceding
//! it.
__device__ QMEM_INLINE void start_copy_to_shared(std::uint32_t* dst, std::uint32_t const* src,
                                                 int count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  auto const to = static_cast<std::uint32_t>(__cvta_generic_to_shared(dst));
  int const chunks = count / 4;
  for (int i = static_cast<int>(threadIdx.x); i < chunks; i += static_cast<int>(blockDim.x))
    asm volatile(
        "cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(to + 16u * static_cast<std::uint32_t>(i)),
        "l"(src + 4 * i)
        : "memory");
  for (int i = 4 * chunks + static_cast<int>(threadIdx.x); i < count;
       i += static_cast<int>(blockDim.x))
    asm volatile(
        "cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(to + 4u * static_cast<std::uint32_t>(i)),
        "l"(src + i)
        : "memory");
  asm volatile("cp.async.commit_group;" ::: "memory");
#else
  copy_words_to_shared(dst, src, count);
#endif
}

//! Waits until this thread's start_copy_to_shared copies have landed (the CTA barrier that makes
//! every thread's copies visible is the caller's).
__device__ QMEM_INLINE void wait_copies_to_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

//! C::encode over the shared-memory book: the form of every encoder for code types without a
//! table (the result is the clean code).
template <class C>
struct book_encoder {
  using book_type = std::remove_cv_t<decltype(C::book)>;
  struct params {};
  struct storage {};
  struct functor {
    book_type const* book;
    __device__ QMEM_INLINE std::uint8_t operator()(float xn) const noexcept {
      return C::encode(xn, *book);
    }
  };
  static params host_params(int) noexcept { return {}; }
  __device__ static void prepare(storage&, params const&) noexcept {}
  __device__ static functor make(storage&, params const&, book_type const& shared_book) noexcept {
    return {&shared_book};
  }
};

//! Generic encoder: C::encode over the shared-memory book.
template <class C>
struct device_encoder : book_encoder<C> {};

//! Code types with a bucket table (the dynamic 8-bit maps, NF4, FP4): one shared-memory read. The
//! table is copied into shared memory from its device-resident copy (device_table).
template <class C>
requires(!std::is_void_v<typename bucket_layout_of<C>::type>) struct device_encoder<C> {
  using book_type = std::remove_cv_t<decltype(C::book)>;
  using layout = typename bucket_layout_of<C>::type;
  struct params {
    std::uint32_t const* entry; //!< the table in device memory
    std::uint8_t nan_code;
    std::uint8_t negative_zero_code;
  };
  struct storage {
    std::uint32_t entry[layout::entries];
  };
  struct functor {
    std::uint32_t const* entry;
    std::uint8_t nan_code;
    std::uint8_t negative_zero_code;
    __device__ QMEM_INLINE std::uint8_t operator()(float xn) const noexcept {
      return bucket_lookup<layout>(xn, entry, nan_code, negative_zero_code);
    }
  };
  static params host_params(int device) {
    auto const& t = bucket_table_of<C>();
    return {device_table(t, device)->entry, t.nan_code, t.negative_zero_code};
  }
  __device__ static void prepare(storage& s, params const& p) noexcept {
    copy_words_to_shared(s.entry, p.entry, static_cast<int>(layout::entries));
  }
  __device__ static functor make(storage& s, params const& p, book_type const&) noexcept {
    return {s.entry, p.nan_code, p.negative_zero_code};
  }
};

//! Encoder for blocks with an absmax in [2^-126, 2^126): C::encode over the shared-memory book
//! for code types with no table.
template <class C>
struct normal_encoder : book_encoder<C> {};

//! Copies of the interval table in shared memory, entry k of copy r at k * interval_replicas + r;
//! lane l reads copy l % interval_replicas, so the 16 lanes of each phase of a warp's 8-byte
//! shared load never share a bank, whatever buckets their values fall in. With one copy, NF4
//! quantization from bf16 (block 64) was bound by the L1/shared-memory pipe: ncu on the H200
//! (2026-11-29) 97% L1/TEX throughput, 58% of stall cycles waiting on shared loads, 0.230 ms.
inline constexpr std::uint32_t interval_replicas = 16;

//! NF4, FP4: the interval table in shared memory (35 entries, interval_replicas copies: 4.4 KB).
template <class C>
requires(!std::is_void_v<typename interval_layout_of<C>::type>) struct normal_encoder<C> {
  using book_type = std::remove_cv_t<decltype(C::book)>;
  using layout = typename interval_layout_of<C>::type;
  static constexpr std::uint32_t replicas = interval_replicas;
  //! The table, and the bias of its addresses (-8 * replicas * (magic_bits + first)): a kernel
  //! argument rather than a constant, so that ptxas keeps the table's shared address plus the bias
  //! in one register and an element's address is one IMAD (with the bias a constant it splits it
  //! into an extra add per element).
  struct params {
    interval_table<layout> table;
    std::uint32_t bias;
  };
  //! 8-byte aligned: each lookup is one 8-byte shared load.
  struct alignas(8) storage {
    interval_entry entry[layout::entries * replicas];
  };
  //! interval_lookup with the entry's shared-memory address as one IMAD of the FFMA's bits:
  //! `base` is the address of this lane's copy of the table less
  //! 8 * replicas * (magic_bits + first), in wrapping 32-bit arithmetic.
  struct functor {
    std::uint32_t base;
    __device__ QMEM_INLINE std::uint32_t operator()(float xn) const noexcept {
      float const y = layout::rounding == interval_rounding::down
                          ? __fmaf_rd(xn, static_cast<float>(layout::scale), layout::magic)
                          : __fmaf_rn(xn, static_cast<float>(layout::scale), layout::magic);
      std::uint32_t const addr = __float_as_uint(y) * (8u * replicas) + base;
      float threshold;
      std::uint32_t c;
      asm("ld.shared.v2.b32 {%0, %1}, [%2];" : "=f"(threshold), "=r"(c) : "r"(addr));
      if (xn > threshold)
        c >>= 8;
      return c;
    }
  };
  static params host_params(int) {
    return {interval_table_of<C>(),
            0u - 8u * replicas * (layout::magic_bits + static_cast<std::uint32_t>(layout::first))};
  }
  __device__ static void prepare(storage& s, params const& p) noexcept {
    for (int i = static_cast<int>(threadIdx.x); i < static_cast<int>(layout::entries * replicas);
         i += static_cast<int>(blockDim.x))
      s.entry[i] = p.table.entry[static_cast<std::uint32_t>(i) / replicas];
  }
  __device__ static functor make(storage& s, params const& p, book_type const&) noexcept {
    return {static_cast<std::uint32_t>(__cvta_generic_to_shared(s.entry)) +
            threadIdx.x % replicas * 8u + p.bias};
  }
};

// The sign's half of the table is added as (u >> 31) * 4 * per_sign (SHF, LOP3 for the sign and
// offset, SHF, LOP3 for the index, one IADD3). An IMAD of the sign mask onto the base and a byte
// permute for the index (QMEM_QUANT_BUCKET_SIGN_IMAD, removed 2026-11-30) took the normal-block
// encode and stores of a thread's 16 values from 196 to 181 SASS instructions (ptxas 13.0,
// sm_90) but was slower on the H200 through spills at quantize_whole's register bound (figures
// in quant/cuda/blockwise.cuh, thread_abs_max).

//! The dynamic 8-bit maps: the bucket table in shared memory (copied from its device-resident
//! copy, device_table), looked up without the NaN test and the upper clamp (bucket_lookup_normal).
template <class C>
requires(std::is_void_v<typename interval_layout_of<C>::type> &&
         !std::is_void_v<typename bucket_layout_of<C>::type>) struct normal_encoder<C> {
  using book_type = std::remove_cv_t<decltype(C::book)>;
  using layout = typename bucket_layout_of<C>::type;
  //! The table in device memory, and the bias of its shared addresses (-4 * (lowest >> 16)), a
  //! kernel argument for the reason given for NF4 / FP4 above.
  struct params {
    std::uint32_t const* entry;
    std::uint32_t bias;
  };
  struct storage {
    std::uint32_t entry[layout::entries];
  };
  //! bucket_lookup_normal with 32-bit shared-memory addresses: `base` is the table's shared
  //! address less 4 * (lowest >> 16), in wrapping 32-bit arithmetic.
  struct functor {
    std::uint32_t base;
    __device__ QMEM_INLINE std::uint32_t operator()(float xn) const noexcept {
      std::uint32_t const u = __float_as_uint(xn);
      std::uint32_t const m = __float_as_uint(fmaxf(fabsf(xn), layout::lowest_value));
      std::uint32_t const addr = (m >> layout::low_bits) * 4u + base +
                                 (u >> 31) * static_cast<std::uint32_t>(4 * layout::per_sign);
      std::uint32_t e;
      asm("ld.shared.b32 %0, [%1];" : "=r"(e) : "r"(addr));
      std::uint32_t code = e;
      if (__byte_perm(e, m, 0x5410) > e)
        code >>= 8;
      return code;
    }
  };
  static params host_params(int device) {
    return {device_table(bucket_table_of<C>(), device)->entry,
            0u - 4u * (layout::lowest >> layout::low_bits)};
  }
  __device__ static void prepare(storage& s, params const& p) noexcept {
    copy_words_to_shared(s.entry, p.entry, static_cast<int>(layout::entries));
  }
  __device__ static functor make(storage& s, params const& p, book_type const&) noexcept {
    return {static_cast<std::uint32_t>(__cvta_generic_to_shared(s.entry)) + p.bias};
  }
};

} // namespace qmem::quant::cuda_impl
