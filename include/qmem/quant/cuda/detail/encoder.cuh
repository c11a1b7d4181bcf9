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
//! Protocol (used by the kernels in quant/cuda/blockwise.cuh): `params` is a kernel argument made
//! on the host by `host_params()`; `storage` is the kernel's shared memory, filled by `prepare`
//! (followed by a CTA barrier); `make` returns the per-thread functor `enc(xn) -> code`.

#include <qmem/core/config.hpp>

#if !QMEM_HAS_CUDA()
#error "qmem/quant/cuda/detail/encoder.cuh is for CUDA translation units (compile with nvcc)"
#endif

#include <qmem/quant/codes.hpp>
#include <qmem/quant/cuda/detail/bucket_search.hpp>

#include <cstdint>
#include <type_traits>

namespace qmem::quant::cuda_impl {

//! Generic encoder: C::encode over the shared-memory book.
template <class C>
struct device_encoder {
  using book_type = std::remove_cv_t<decltype(C::book)>;
  struct params {};
  struct storage {};
  struct functor {
    book_type const* book;
    __device__ QMEM_INLINE std::uint8_t operator()(float xn) const noexcept {
      return C::encode(xn, *book);
    }
  };
  static params host_params() noexcept { return {}; }
  __device__ static void prepare(storage&, params const&) noexcept {}
  __device__ static functor make(storage&, params const&, book_type const& shared_book) noexcept {
    return {&shared_book};
  }
};

//! Code types with a bucket table (the dynamic 8-bit maps, NF4, FP4): one shared-memory read.
template <class C>
  requires(!std::is_void_v<typename bucket_layout_of<C>::type>)
struct device_encoder<C> {
  using book_type = std::remove_cv_t<decltype(C::book)>;
  using layout = typename bucket_layout_of<C>::type;
  using params = bucket_table<layout>;
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
  static params const& host_params() { return bucket_table_of<C>(); }
  __device__ static void prepare(storage& s, params const& p) noexcept {
    for (int i = static_cast<int>(threadIdx.x); i < static_cast<int>(layout::entries);
         i += static_cast<int>(blockDim.x))
      s.entry[i] = p.entry[i];
  }
  __device__ static functor make(storage& s, params const& p, book_type const&) noexcept {
    return {s.entry, p.nan_code, p.negative_zero_code};
  }
};

} // namespace qmem::quant::cuda_impl
