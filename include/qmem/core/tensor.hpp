#pragma once
//! \file
//! The tensor-like contract: how qmem reads the element type, size, data pointer and memory space
//! of a user's tensor type, and the non-owning `tensor_view` every algorithm works on.
//!
//! A type is tensor-like when `qmem::tensor_traits<T>` tells those four things. The primary
//! template covers every contiguous sized range (std::vector, std::array, std::span, ...) as host
//! memory; a framework specializes `tensor_traits` for its own tensor type (see
//! examples/02_custom_tensor).

#include <qmem/core/config.hpp>
#include <qmem/core/error.hpp>
#include <qmem/core/memory_space.hpp>

#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <memory>
#include <ranges>
#include <span>
#include <type_traits>

namespace qmem {

//! Customization point: specialize for a tensor type to make it tensor-like. A specialization
//! provides `element_type`, and static functions `data(t)` (pointer to the first element),
//! `size(t)` (number of elements) and `space(t)` (its memory_space).
//! The primary template covers contiguous sized ranges, which live in host memory.
template <class T>
struct tensor_traits {};

template <class T>
requires std::ranges::contiguous_range<T> && std::ranges::sized_range<T>
struct tensor_traits<T> {
  using element_type = std::remove_reference_t<std::ranges::range_reference_t<T>>;
  template <class U>
  requires std::same_as<std::remove_const_t<U>, T>
  static constexpr auto data(U& t) noexcept {
    return std::ranges::data(t); // a pointer to const for a const range
  }
  static constexpr std::size_t size(T const& t) noexcept {
    return static_cast<std::size_t>(std::ranges::size(t));
  }
  static constexpr memory_space space(T const&) noexcept { return memory_space::host; }
};

namespace detail {
template <class T>
using traits_of = tensor_traits<std::remove_cvref_t<T>>;
} // namespace detail

//! A contiguous tensor whose element type, size, data and memory space qmem can read.
template <class T>
concept tensor_like = requires(T& t) {
  typename detail::traits_of<T>::element_type;                           // element type
  { detail::traits_of<T>::data(t) } -> std::convertible_to<void const*>; // first element
  { detail::traits_of<T>::size(t) } -> std::convertible_to<std::size_t>; // element count
  { detail::traits_of<T>::space(t) } -> std::same_as<memory_space>;      // where it lives
};

//! The element type of a tensor-like type (const when `T` is const or a const view).
template <tensor_like T>
using tensor_element_t = std::remove_reference_t<decltype(*detail::traits_of<T>::data(
    std::declval<std::remove_reference_t<T>&>()))>;

//! A non-owning, trivially copyable view of `size` contiguous elements of type `T` in a memory
//! space. Views are what algorithms and kernels take; pass them by value.
template <class T>
class tensor_view {
public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;

private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
  memory_space space_ = memory_space::host;

public:
  constexpr tensor_view() = default;
  //! Views `size` elements at `data` in `space`. Precondition: `data` points to `size` elements
  //! (or size is 0). Not checked: a raw pointer carries no extent.
  QMEM_HOST_DEVICE constexpr tensor_view(T* data, std::size_t size,
                                         memory_space space = memory_space::host) noexcept
      : data_(data), size_(size), space_(space) {}

  //! A view of const elements from a view of mutable ones.
  template <class U>
  requires(std::is_const_v<T>&& std::same_as<std::remove_const_t<T>, U>) QMEM_HOST_DEVICE
      constexpr tensor_view(tensor_view<U> other) noexcept
      : data_(other.data()), size_(other.size()), space_(other.space()) {}

  QMEM_HOST_DEVICE constexpr T* data() const noexcept { return data_; }
  QMEM_HOST_DEVICE constexpr std::size_t size() const noexcept { return size_; }
  QMEM_HOST_DEVICE constexpr std::size_t size_bytes() const noexcept { return size_ * sizeof(T); }
  QMEM_HOST_DEVICE constexpr bool empty() const noexcept { return size_ == 0; }
  QMEM_HOST_DEVICE constexpr memory_space space() const noexcept { return space_; }
  QMEM_HOST_DEVICE constexpr T& operator[](std::size_t i) const noexcept { return data_[i]; }
  QMEM_HOST_DEVICE constexpr T* begin() const noexcept { return data_; }
  QMEM_HOST_DEVICE constexpr T* end() const noexcept { return data_ + size_; }

  //! Elements [offset, offset + count). Throws bad_argument when the range is outside the view.
  tensor_view subview(std::size_t offset, std::size_t count) const {
    QMEM_EXPECTS(offset <= size_ && count <= size_ - offset, "range [", offset, ", ",
                 offset + count, ") is outside a view of ", size_, " elements");
    return {data_ + offset, count, space_};
  }

  //! The same bytes seen as another trivially copyable element type. Throws bad_argument when
  //! the byte size or the alignment does not fit `U`.
  template <class U>
  requires std::is_trivially_copyable_v<std::remove_cv_t<U>> &&
      (std::is_const_v<U> || !std::is_const_v<T>)tensor_view<U> reinterpret() const {
    QMEM_EXPECTS(size_bytes() % sizeof(U) == 0, "a view of ", size_bytes(),
                 " bytes is not a whole number of ", sizeof(U), "-byte elements");
    QMEM_EXPECTS(reinterpret_cast<std::uintptr_t>(data_) % alignof(U) == 0,
                 "data is not aligned to ", alignof(U), " bytes");
    return {reinterpret_cast<U*>(data_), size_bytes() / sizeof(U), space_};
  }
};

static_assert(std::is_trivially_copyable_v<tensor_view<float>>);

//! tensor_view is itself tensor-like.
template <class T>
struct tensor_traits<tensor_view<T>> {
  using element_type = T;
  static constexpr T* data(tensor_view<T> const& v) noexcept { return v.data(); }
  static constexpr T* data(tensor_view<T>& v) noexcept { return v.data(); }
  static constexpr std::size_t size(tensor_view<T> const& v) noexcept { return v.size(); }
  static constexpr memory_space space(tensor_view<T> const& v) noexcept { return v.space(); }
};

//! The view of any tensor-like object (keeps its constness).
template <tensor_like T>
constexpr auto view(T&& t) noexcept {
  using E = tensor_element_t<T>;
  auto& ref = t;
  return tensor_view<E>(detail::traits_of<T>::data(ref), detail::traits_of<T>::size(ref),
                        detail::traits_of<T>::space(ref));
}

//! A view of `size` elements at `data` in `space` (pointer + size adapter).
template <class T>
constexpr tensor_view<T> view(T* data, std::size_t size,
                              memory_space space = memory_space::host) noexcept {
  return {data, size, space};
}

namespace detail {

//! True when the address is memory only a GPU can read (device memory, no host alias). Null until
//! a qmem CUDA call runs in this process: qmem/core/cuda/runtime.cuh's device_guard then stores
//! its probe here (cudaPointerGetAttributes), so that check_view refuses device memory a view
//! presents to the host backend. A process without qmem CUDA calls pays one atomic load; device
//! memory it allocated by other means reaches the host backend unchecked.
using device_memory_probe_fn = bool (*)(void const*) noexcept;
inline std::atomic<device_memory_probe_fn> device_memory_probe{nullptr};

} // namespace detail

//! Checks the preconditions every algorithm shares for one argument: non-null data when non-empty,
//! alignment of the element type, and a memory space the execution object can reach. With
//! `need_host`, once a qmem CUDA call has run in this process (detail::device_memory_probe), also
//! that the bytes are not device memory, whatever the view's memory space says. The memory of a
//! device-side call is checked where it launches (cuda_detail::check_resident, runtime.cuh): that
//! needs the execution object's device.
template <class T>
void check_view(tensor_view<T> v, char const* function, char const* name, bool need_host,
                bool need_device) {
  if (v.size() != 0 && v.data() == nullptr)
    detail::raise(function, ": ", name, " is a null pointer with ", v.size(), " elements");
  if (reinterpret_cast<std::uintptr_t>(v.data()) % alignof(std::remove_cv_t<T>) != 0)
    detail::raise(function, ": ", name, " is not aligned to ", alignof(std::remove_cv_t<T>),
                  " bytes");
  if (need_host && !host_accessible(v.space()))
    detail::raise(function, ": ", name, " is in ", to_string(v.space()),
                  " memory; this call runs on the host and needs host-accessible memory");
  if (need_host && !v.empty())
    if (auto const probe = detail::device_memory_probe.load(std::memory_order_acquire);
        probe != nullptr && probe(v.data()))
      detail::raise(function, ": ", name, " is device memory (CUDA says so; its view says ",
                    to_string(v.space()),
                    "); this call runs on the host and needs host-accessible memory");
  if (need_device && !device_accessible(v.space()))
    detail::raise(function, ": ", name, " is in ", to_string(v.space()),
                  " memory; this call runs on the GPU and needs device-accessible memory");
}

namespace detail {

//! A view's bytes under a name, for the aliasing checks below (any element type; an empty view
//! overlaps nothing). Addresses are compared whatever the memory spaces: under unified addressing
//! a device pointer never equals a host one.
struct named_range {
  std::uintptr_t begin = 0;
  std::size_t bytes = 0;
  char const* name = "";

  template <class T>
  named_range(tensor_view<T> v, char const* n) noexcept
      : begin(reinterpret_cast<std::uintptr_t>(v.data())), bytes(v.empty() ? 0 : v.size_bytes()),
        name(n) {}

  [[nodiscard]] bool overlaps(named_range const& o) const noexcept {
    return bytes != 0 && o.bytes != 0 && begin < o.begin + o.bytes && o.begin < begin + bytes;
  }
};

//! True when views `a` and `b` share a byte (empty views share none).
template <class T, class U>
bool overlapping(tensor_view<T> a, tensor_view<U> b) noexcept {
  return named_range(a, "").overlaps(named_range(b, ""));
}

//! Throws bad_argument (naming `function`, `v` and the first of `others` it overlaps) when `v`
//! (an output or a workspace) shares a byte with one of `others`; `others` may overlap each other
//! (inputs read together).
inline void check_disjoint_from(char const* function, named_range v,
                                std::initializer_list<named_range> others) {
  for (named_range const& o : others)
    if (v.overlaps(o))
      raise(function, ": ", v.name, " and ", o.name, " overlap; expected separate memory");
}

//! Throws bad_argument (naming `function` and both arguments) when views `a` and `b` overlap.
template <class T, class U>
void check_disjoint(tensor_view<T> a, tensor_view<U> b, char const* function, char const* name_a,
                    char const* name_b) {
  check_disjoint_from(function, {a, name_a}, {{b, name_b}});
}

//! Throws bad_argument (naming `function` and the first overlapping pair in list order) when two
//! of `views` share a byte: for a call whose views are all written, or read while others are.
inline void check_pairwise_disjoint(char const* function,
                                    std::initializer_list<named_range> views) {
  for (auto a = views.begin(); a != views.end(); ++a)
    for (auto b = a + 1; b != views.end(); ++b)
      if (a->overlaps(*b))
        raise(function, ": ", a->name, " and ", b->name, " overlap; expected separate memory");
}

} // namespace detail

} // namespace qmem
