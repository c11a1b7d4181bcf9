#pragma once
//! \file
//! Thrust vectors as tensor-like types (CUDA translation units): `thrust::device_vector<T, A>` is
//! a tensor in device memory, `thrust::host_vector<T, A>` one in host memory (pinned when its
//! allocator is thrust::universal_host_pinned_allocator); either with thrust::universal_allocator
//! (cudaMallocManaged) is in managed memory, which host and CUDA algorithms both accept, and so is
//! `thrust::universal_vector<T>` (a vector of its own type, thrust::detail::vector_base, with that
//! allocator; with universal_host_pinned_allocator it is pinned). qmem algorithms take them
//! directly:
//!
//!   thrust::device_vector<qmem::bf16> w(n);
//!   thrust::device_vector<std::uint8_t> codes(n / 2);
//!   qmem::quant::quantize_blockwise<qmem::quant::nf4>(qmem::exec::cuda{stream}, qmem::view(w), ...)
//!
//! The views do not own anything: keep the vector alive and unresized while a view of it is used
//! (a resize reallocates). Thrust's own operations on the vectors synchronize as Thrust documents.

#include <qmem/core/config.hpp>

#if !QMEM_HAS_CUDA()
#error "qmem/memory/cuda_thrust.cuh is for CUDA translation units (compile this file with nvcc)"
#endif

#include <qmem/core/memory_space.hpp>
#include <qmem/core/tensor.hpp>

#include <thrust/device_vector.h>
#include <thrust/host_vector.h>
#include <thrust/universal_allocator.h>
#include <thrust/universal_vector.h>

#include <cstddef>
#include <type_traits>

namespace qmem {
namespace detail {
template <class T, class Alloc>
inline constexpr bool is_thrust_pinned_allocator_v =
    std::is_same_v<Alloc, thrust::universal_host_pinned_allocator<T>>;
//! thrust::universal_allocator hands out managed memory (cudaMallocManaged).
template <class T, class Alloc>
inline constexpr bool is_thrust_managed_allocator_v =
    std::is_same_v<Alloc, thrust::universal_allocator<T>>;

//! The allocators of thrust::universal_vector: managed or pinned memory.
template <class T, class Alloc>
inline constexpr bool is_thrust_universal_allocator_v =
    is_thrust_managed_allocator_v<T, Alloc> || is_thrust_pinned_allocator_v<T, Alloc>;

//! The element type, data and size of a Thrust vector `V` of `T`; the tensor_traits below add
//! where it lives.
template <class V, class T>
struct thrust_vector_traits {
  using element_type = T;
  static T* data(V& v) noexcept { return thrust::raw_pointer_cast(v.data()); }
  static T const* data(V const& v) noexcept { return thrust::raw_pointer_cast(v.data()); }
  static std::size_t size(V const& v) noexcept { return v.size(); }
};
} // namespace detail

//! thrust::device_vector is tensor-like: device memory (managed with thrust::universal_allocator).
template <class T, class Alloc>
struct tensor_traits<thrust::device_vector<T, Alloc>>
    : detail::thrust_vector_traits<thrust::device_vector<T, Alloc>, T> {
  static memory_space space(thrust::device_vector<T, Alloc> const&) noexcept {
    return detail::is_thrust_managed_allocator_v<T, Alloc> ? memory_space::managed
                                                           : memory_space::device;
  }
};

//! thrust::host_vector is tensor-like: host memory (pinned with
//! thrust::universal_host_pinned_allocator, managed with thrust::universal_allocator).
template <class T, class Alloc>
struct tensor_traits<thrust::host_vector<T, Alloc>>
    : detail::thrust_vector_traits<thrust::host_vector<T, Alloc>, T> {
  static memory_space space(thrust::host_vector<T, Alloc> const&) noexcept {
    if constexpr (detail::is_thrust_pinned_allocator_v<T, Alloc>)
      return memory_space::pinned;
    else if constexpr (detail::is_thrust_managed_allocator_v<T, Alloc>)
      return memory_space::managed;
    else
      return memory_space::host;
  }
};

//! thrust::universal_vector (thrust::detail::vector_base, not a device_vector or host_vector) is
//! tensor-like with its two allocators: managed memory (thrust::universal_allocator, the default),
//! pinned memory (thrust::universal_host_pinned_allocator).
template <class T, class Alloc>
requires detail::is_thrust_universal_allocator_v<T, Alloc>
struct tensor_traits<thrust::universal_vector<T, Alloc>>
    : detail::thrust_vector_traits<thrust::universal_vector<T, Alloc>, T> {
  static memory_space space(thrust::universal_vector<T, Alloc> const&) noexcept {
    return detail::is_thrust_pinned_allocator_v<T, Alloc> ? memory_space::pinned
                                                          : memory_space::managed;
  }
};

} // namespace qmem
