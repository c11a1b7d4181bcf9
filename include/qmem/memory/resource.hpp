#pragma once
//! \file
//! Memory resources: every allocation qmem makes goes through one, so that a framework can inject
//! its own allocator and a tracking resource (a wrapper of another resource; qmem has no tracking
//! header yet) sees every byte. A resource knows the memory space of what it hands out. `buffer<T>` is the owning, move-only array the library's
//! owners (quantized tensors, optimizer state) hold.

#include <qmem/core/error.hpp>
#include <qmem/core/memory_space.hpp>
#include <qmem/core/tensor.hpp>

#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>
#include <utility>

namespace qmem::memory {

//! What an allocation is for, as memory summaries group it.
enum class category : std::uint8_t {
  weights,
  gradients,
  optimizer_state,
  activations,
  quant_metadata,
  workspace,
  other
};
inline constexpr std::size_t category_count = 7;

constexpr char const* to_string(category c) noexcept {
  constexpr char const* names[category_count] = {"weights",     "gradients",      "optimizer state",
                                                 "activations", "quant metadata", "workspace",
                                                 "other"};
  return names[static_cast<std::size_t>(c)];
}

//! A polymorphic memory resource. `allocate` returns storage of at least `bytes` bytes aligned to
//! `alignment` or throws: qmem::bad_argument when `alignment` is not a power of two (or is above
//! what the resource can honour: 256 bytes for the CUDA resources), std::bad_alloc or
//! qmem::cuda_error when the memory is not there. `deallocate` takes back exactly what `allocate`
//! returned, with the same size and alignment (null: nothing to do).
class resource {
public:
  virtual ~resource() = default;
  [[nodiscard]] void* allocate(std::size_t bytes, std::size_t alignment = 256,
                               category cat = category::other) {
    QMEM_EXPECTS(alignment != 0 && (alignment & (alignment - 1)) == 0, "alignment ", alignment,
                 " is not a power of two");
    return do_allocate(bytes, alignment, cat);
  }
  void deallocate(void* p, std::size_t bytes, std::size_t alignment = 256,
                  category cat = category::other) noexcept {
    if (p != nullptr)
      do_deallocate(p, bytes, alignment, cat);
  }
  //! The memory space of the storage this resource hands out.
  [[nodiscard]] virtual memory_space space() const noexcept = 0;

private:
  virtual void* do_allocate(std::size_t bytes, std::size_t alignment, category cat) = 0;
  virtual void do_deallocate(void* p, std::size_t bytes, std::size_t alignment,
                             category cat) noexcept = 0;
};

//! Pageable host memory from aligned operator new.
class host_resource final : public resource {
public:
  [[nodiscard]] memory_space space() const noexcept override { return memory_space::host; }

private:
  void* do_allocate(std::size_t bytes, std::size_t alignment, category) override {
    return ::operator new (bytes == 0 ? 1 : bytes, std::align_val_t{alignment});
  }
  void do_deallocate(void* p, std::size_t, std::size_t alignment, category) noexcept override {
    ::operator delete (p, std::align_val_t{alignment});
  }
};

//! The process-wide host resource used when none is given.
inline resource& default_host_resource() noexcept {
  static host_resource r;
  return r;
}

//! An owning array of `size` trivially copyable elements from a resource (move-only). Elements
//! are not initialized. Aligned to 256 bytes, so that vector loads on any backend are legal.
template <class T>
requires std::is_trivially_copyable_v<T>
class buffer {
public:
  static constexpr std::size_t alignment = alignof(T) > 256 ? alignof(T) : 256;

private:
  resource* resource_ = nullptr;
  T* data_ = nullptr;
  std::size_t size_ = 0;
  category category_ = category::other;

public:
  buffer() = default;
  //! Allocates `size` elements from `r` (default: host). Throws bad_argument, before allocating,
  //! when size * sizeof(T) overflows; what `r.allocate` throws otherwise.
  explicit buffer(std::size_t size, resource& r = default_host_resource(),
                  category cat = category::other)
      : resource_(&r), size_(size), category_(cat) {
    QMEM_EXPECTS(size <= static_cast<std::size_t>(-1) / sizeof(T), "size ", size,
                 " overflows the byte count");
    data_ = static_cast<T*>(r.allocate(size * sizeof(T), alignment, cat));
  }
  buffer(buffer&& o) noexcept
      : resource_(std::exchange(o.resource_, nullptr)), data_(std::exchange(o.data_, nullptr)),
        size_(std::exchange(o.size_, 0)), category_(o.category_) {}
  buffer& operator=(buffer&& o) noexcept {
    if (this != &o) {
      reset();
      resource_ = std::exchange(o.resource_, nullptr);
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      category_ = o.category_;
    }
    return *this;
  }
  buffer(buffer const&) = delete;
  buffer& operator=(buffer const&) = delete;
  ~buffer() { reset(); }

  void reset() noexcept {
    if (resource_ != nullptr)
      resource_->deallocate(data_, size_ * sizeof(T), alignment, category_);
    data_ = nullptr;
    size_ = 0;
  }

  [[nodiscard]] T* data() noexcept { return data_; }
  [[nodiscard]] T const* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t size_bytes() const noexcept { return size_ * sizeof(T); }
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
  [[nodiscard]] memory_space space() const noexcept {
    return resource_ != nullptr ? resource_->space() : memory_space::host;
  }
  [[nodiscard]] resource* get_resource() const noexcept { return resource_; }
  [[nodiscard]] tensor_view<T> view() noexcept { return {data_, size_, space()}; }
  [[nodiscard]] tensor_view<T const> view() const noexcept { return {data_, size_, space()}; }
  //! Element access for host-accessible buffers (unchecked, like operator[] of std::vector).
  T& operator[](std::size_t i) noexcept { return data_[i]; }
  T const& operator[](std::size_t i) const noexcept { return data_[i]; }
};

} // namespace qmem::memory

namespace qmem {
//! buffer is tensor-like.
template <class T>
struct tensor_traits<memory::buffer<T>> {
  using element_type = T;
  static T* data(memory::buffer<T>& b) noexcept { return b.data(); }
  static T const* data(memory::buffer<T> const& b) noexcept { return b.data(); }
  static std::size_t size(memory::buffer<T> const& b) noexcept { return b.size(); }
  static memory_space space(memory::buffer<T> const& b) noexcept { return b.space(); }
};
} // namespace qmem
