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
//! on the host by `host_params()`; `storage` is the kernel's shared memory, filled by `prepare`
//! (followed by a CTA barrier); `make` returns the per-thread functor `enc(xn) -> code`.

#include <qmem/core/config.hpp>

#if !QMEM_HAS_CUDA()
#error "qmem/quant/cuda/detail/encoder.cuh is for CUDA translation units (compile with nvcc)"
#endif

#include <qmem/quant/codes.hpp>
#include <qmem/quant/cuda/detail/bucket_search.hpp>
#include <qmem/quant/cuda/detail/interval_table.hpp>

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

//! Encoder for blocks with an absmax in [2^-126, 2^126): C::encode over the shared-memory book for code
//! types with no table (the result is the clean code).
template <class C>
struct normal_encoder {
  using book_type = std::remove_cv_t<decltype(C::book)>;
  struct params {};
  struct storage {};
  struct functor {
    book_type const* book;
    __device__ QMEM_INLINE std::uint32_t operator()(float xn) const noexcept {
      return C::encode(xn, *book);
    }
  };
  static params host_params() noexcept { return {}; }
  __device__ static void prepare(storage&, params const&) noexcept {}
  __device__ static functor make(storage&, params const&, book_type const& shared_book) noexcept {
    return {&shared_book};
  }
};

//! NF4, FP4: the interval table in shared memory (280 bytes for either).
template <class C>
  requires(!std::is_void_v<typename interval_layout_of<C>::type>)
struct normal_encoder<C> {
  using book_type = std::remove_cv_t<decltype(C::book)>;
  using layout = typename interval_layout_of<C>::type;
  //! The table, and the bias of its addresses (-8 * (magic_bits + first)): a kernel argument
  //! rather than a constant, so that ptxas keeps the table's shared address plus the bias in one
  //! register and an element's address is one LEA (with the bias a constant it splits it into an
  //! extra add per element).
  struct params {
    interval_table<layout> table;
    std::uint32_t bias;
  };
  struct storage {
    interval_entry entry[layout::entries];
  };
  //! interval_lookup with the entry's shared-memory address as one IMAD of the FFMA's bits:
  //! `base` is the table's shared address less 8 * (magic_bits + first), in wrapping 32-bit
  //! arithmetic.
  struct functor {
    std::uint32_t base;
    __device__ QMEM_INLINE std::uint32_t operator()(float xn) const noexcept {
      float const v = layout::magnitude ? fabsf(xn) : xn;
      float const y = __fmaf_rn(v, static_cast<float>(layout::scale), layout::magic);
      std::uint32_t const addr = __float_as_uint(y) * 8u + base;
      float threshold;
      std::uint32_t c;
      asm("ld.shared.v2.b32 {%0, %1}, [%2];" : "=f"(threshold), "=r"(c) : "r"(addr));
      if (v > threshold)
        c >>= 8;
      if constexpr (layout::magnitude)
        if (xn < 0.0f)
          c |= layout::sign_code;
      return c;
    }
  };
  static params host_params() {
    return {interval_table_of<C>(),
            0u - 8u * (layout::magic_bits + static_cast<std::uint32_t>(layout::first))};
  }
  __device__ static void prepare(storage& s, params const& p) noexcept {
    for (int i = static_cast<int>(threadIdx.x); i < static_cast<int>(layout::entries);
         i += static_cast<int>(blockDim.x))
      s.entry[i] = p.table.entry[i];
  }
  __device__ static functor make(storage& s, params const& p, book_type const&) noexcept {
    return {static_cast<std::uint32_t>(__cvta_generic_to_shared(s.entry)) + p.bias};
  }
};

//! The dynamic 8-bit maps: the bucket table in shared memory, looked up without the NaN test and
//! the upper clamp (bucket_lookup_normal).
template <class C>
  requires(std::is_void_v<typename interval_layout_of<C>::type> &&
           !std::is_void_v<typename bucket_layout_of<C>::type>)
struct normal_encoder<C> {
  using book_type = std::remove_cv_t<decltype(C::book)>;
  using layout = typename bucket_layout_of<C>::type;
  //! The table, and the bias of its addresses (-4 * (lowest >> 16)), a kernel argument for the
  //! reason given for NF4 / FP4 above.
  struct params {
    bucket_table<layout> table;
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
  static params host_params() {
    return {bucket_table_of<C>(), 0u - 4u * (layout::lowest >> layout::low_bits)};
  }
  __device__ static void prepare(storage& s, params const& p) noexcept {
    for (int i = static_cast<int>(threadIdx.x); i < static_cast<int>(layout::entries);
         i += static_cast<int>(blockDim.x))
      s.entry[i] = p.table.entry[i];
  }
  __device__ static functor make(storage& s, params const& p, book_type const&) noexcept {
    return {static_cast<std::uint32_t>(__cvta_generic_to_shared(s.entry)) + p.bias};
  }
};

} // namespace qmem::quant::cuda_impl
