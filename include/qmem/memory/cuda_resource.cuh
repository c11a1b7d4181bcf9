#pragma once
//! \file
//! Memory resources backed by the CUDA runtime, for CUDA translation units:
//!
//! - `cuda_device_resource`: device memory from a stream-ordered pool of its own
//!   (`cudaMemPoolCreate` + `cudaMallocFromPoolAsync`), with a release threshold so that freed
//!   memory stays in the pool across synchronizations instead of going back to the driver. Besides
//!   the `resource` interface (ordered on the resource's stream) it offers `allocate_async` /
//!   `deallocate_async` on any stream of its device; this is what qmem's kernels use for their
//!   workspaces.
//! - `cuda_pinned_resource`: page-locked host memory (`cudaHostAlloc`), host-accessible and mapped
//!   for the device; the staging memory of copies and offload.
//! - `cuda_managed_resource`: unified memory (`cudaMallocManaged`). It refuses to hand out more
//!   than the device has free unless oversubscription is asked for explicitly: an unplanned
//!   oversubscription thrashes or hangs the GPU.
//!
//! None of them synchronizes the device except where a comment says so (freeing pinned or managed
//! memory does: the CUDA runtime waits for outstanding work there).

#include <qmem/core/config.hpp>
#include <qmem/core/cuda/runtime.cuh>
#include <qmem/core/error.hpp>
#include <qmem/core/memory_space.hpp>
#include <qmem/memory/resource.hpp>

#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <type_traits>

namespace qmem::memory {

namespace cuda_resource_detail {
//! Alignment every CUDA allocation call guarantees (cudaMalloc, cudaMallocAsync, cudaHostAlloc,
//! cudaMallocManaged all return at least 256-byte aligned storage).
inline constexpr std::size_t runtime_alignment = 256;

//! Throws qmem::error when `what` returned `p` not aligned to `alignment`, after handing `p` back
//! with `release(p)` (noexcept): the allocation succeeded, so the caller that gets the exception
//! has no pointer to free and it would otherwise leak.
template <class Release>
requires std::is_nothrow_invocable_v<Release&, void*>
void check_alignment(void* p, std::size_t alignment, char const* what, Release release) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignment != 0) [[unlikely]] {
    release(p);
    qmem::detail::raise<qmem::error>(what, " returned storage not aligned to ", alignment,
                                     " bytes");
  }
}

inline void check_alignment_request(std::size_t alignment, char const* resource_name) {
  QMEM_EXPECTS(alignment <= runtime_alignment, resource_name, ": alignment ", alignment,
               " is above the ", runtime_alignment, " bytes the CUDA runtime guarantees");
}
} // namespace cuda_resource_detail

//! Device memory from a stream-ordered pool owned by this resource.
//! `allocate`/`deallocate` (the `resource` interface) are ordered on `stream()`; the `_async`
//! forms take the stream explicitly. Memory freed on one stream may be reused by a later
//! allocation on another only in stream order (the pool's default reuse rules).
class cuda_device_resource final : public resource {
public:
  //! Release threshold that keeps every freed byte cached in the pool (the usual choice for a
  //! training loop that allocates the same workspaces every step).
  static constexpr std::uint64_t keep_all = std::numeric_limits<std::uint64_t>::max();

private:
  cudaMemPool_t pool_ = nullptr;
  CUstream_st* stream_ = nullptr;
  int device_ = 0;

public:
  //! Creates a pool on `device` whose allocations are ordered on `stream` (nullptr: the legacy
  //! default stream) and which keeps up to `release_threshold` bytes of freed memory cached across
  //! synchronizations. Preconditions: `device` >= 0 (bad_argument otherwise) and a device of this
  //! machine (cuda_error from cudaMemPoolCreate otherwise).
  explicit cuda_device_resource(int device = 0, CUstream_st* stream = nullptr,
                                std::uint64_t release_threshold = keep_all)
      : stream_(stream), device_(device) {
    QMEM_EXPECTS(device >= 0, "device is ", device, "; expected a device ordinal >= 0");
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    qmem::cuda_detail::check(cudaMemPoolCreate(&pool_, &props), "cudaMemPoolCreate");
    auto threshold = release_threshold;
    cudaError_t const status =
        cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &threshold);
    if (status != cudaSuccess) {
      (void)cudaMemPoolDestroy(pool_);
      qmem::cuda_detail::check(status, "cudaMemPoolSetAttribute(ReleaseThreshold)");
    }
  }
  cuda_device_resource(cuda_device_resource const&) = delete;
  cuda_device_resource& operator=(cuda_device_resource const&) = delete;
  //! Destroys the pool; storage still allocated from it is released once freed (CUDA's rule).
  ~cuda_device_resource() override {
    if (pool_ != nullptr)
      (void)cudaMemPoolDestroy(pool_);
  }

  [[nodiscard]] memory_space space() const noexcept override { return memory_space::device; }
  [[nodiscard]] int device() const noexcept { return device_; }
  [[nodiscard]] CUstream_st* stream() const noexcept { return stream_; }
  //! Changes the stream that `allocate`/`deallocate` are ordered on.
  void set_stream(CUstream_st* stream) noexcept { stream_ = stream; }
  [[nodiscard]] cudaMemPool_t pool() const noexcept { return pool_; }

  //! `bytes` bytes of device memory, usable in stream order on `stream` (and by other streams
  //! after an event or synchronization). Alignment 256. Throws cuda_error when the pool cannot
  //! grow. Zero bytes gives a null pointer.
  [[nodiscard]] void* allocate_async(std::size_t bytes, CUstream_st* stream) {
    if (bytes == 0)
      return nullptr;
    void* p = nullptr;
    qmem::cuda_detail::check(cudaMallocFromPoolAsync(&p, bytes, pool_, stream),
                             "cudaMallocFromPoolAsync");
    cuda_resource_detail::check_alignment(p, cuda_resource_detail::runtime_alignment,
                                          "cudaMallocFromPoolAsync",
                                          [&](void* q) noexcept { deallocate_async(q, stream); });
    return p;
  }
  //! Returns `p` to the pool in stream order on `stream` (no synchronization).
  void deallocate_async(void* p, CUstream_st* stream) noexcept {
    if (p != nullptr)
      (void)cudaFreeAsync(p, stream);
  }
  //! Releases cached memory above `keep_bytes` back to the driver (cudaMemPoolTrimTo).
  void trim(std::size_t keep_bytes = 0) {
    qmem::cuda_detail::check(cudaMemPoolTrimTo(pool_, keep_bytes), "cudaMemPoolTrimTo");
  }
  //! Bytes the pool holds from the driver (cudaMemPoolAttrReservedMemCurrent).
  [[nodiscard]] std::uint64_t reserved_bytes() const {
    std::uint64_t v = 0;
    qmem::cuda_detail::check(cudaMemPoolGetAttribute(pool_, cudaMemPoolAttrReservedMemCurrent, &v),
                             "cudaMemPoolGetAttribute(ReservedMemCurrent)");
    return v;
  }
  //! Bytes currently allocated from the pool (cudaMemPoolAttrUsedMemCurrent).
  [[nodiscard]] std::uint64_t used_bytes() const {
    std::uint64_t v = 0;
    qmem::cuda_detail::check(cudaMemPoolGetAttribute(pool_, cudaMemPoolAttrUsedMemCurrent, &v),
                             "cudaMemPoolGetAttribute(UsedMemCurrent)");
    return v;
  }

private:
  void* do_allocate(std::size_t bytes, std::size_t alignment, category) override {
    cuda_resource_detail::check_alignment_request(alignment, "cuda_device_resource");
    return allocate_async(bytes, stream_);
  }
  void do_deallocate(void* p, std::size_t, std::size_t, category) noexcept override {
    deallocate_async(p, stream_);
  }
};

//! Page-locked host memory (cudaHostAlloc, portable to every device and mapped). Freeing it
//! (cudaFreeHost) waits for the device: keep such buffers for the life of a workload.
class cuda_pinned_resource final : public resource {
public:
  [[nodiscard]] memory_space space() const noexcept override { return memory_space::pinned; }

private:
  void* do_allocate(std::size_t bytes, std::size_t alignment, category) override {
    cuda_resource_detail::check_alignment_request(alignment, "cuda_pinned_resource");
    void* p = nullptr;
    qmem::cuda_detail::check(
        cudaHostAlloc(&p, bytes == 0 ? 1 : bytes, cudaHostAllocPortable | cudaHostAllocMapped),
        "cudaHostAlloc");
    cuda_resource_detail::check_alignment(p, alignment, "cudaHostAlloc",
                                          [](void* q) noexcept { (void)cudaFreeHost(q); });
    return p;
  }
  void do_deallocate(void* p, std::size_t, std::size_t, category) noexcept override {
    (void)cudaFreeHost(p);
  }
};

//! Unified memory (cudaMallocManaged, attached globally). By default an allocation that would
//! bring this resource's outstanding bytes above the device's free memory (cudaMemGetInfo at the
//! time of the call) throws qmem::cuda_error (cudaErrorMemoryAllocation) instead of silently
//! oversubscribing; pass `allow_oversubscription = true` to a deliberate, planned paging path.
//! Freeing managed memory (cudaFree) synchronizes the device.
class cuda_managed_resource final : public resource {
  int device_ = 0;
  bool allow_oversubscription_ = false;
  std::size_t outstanding_ = 0;
  mutable std::mutex mutex_;

public:
  //! Managed memory whose capacity is judged against `device`'s free memory.
  explicit cuda_managed_resource(int device = 0, bool allow_oversubscription = false)
      : device_(device), allow_oversubscription_(allow_oversubscription) {
    QMEM_EXPECTS(device >= 0, "device is ", device, "; expected a device ordinal >= 0");
  }
  [[nodiscard]] memory_space space() const noexcept override { return memory_space::managed; }
  [[nodiscard]] int device() const noexcept { return device_; }
  [[nodiscard]] bool allows_oversubscription() const noexcept { return allow_oversubscription_; }
  //! Bytes handed out and not yet returned.
  [[nodiscard]] std::size_t outstanding_bytes() const {
    std::lock_guard lock(mutex_);
    return outstanding_;
  }

private:
  void* do_allocate(std::size_t bytes, std::size_t alignment, category) override {
    cuda_resource_detail::check_alignment_request(alignment, "cuda_managed_resource");
    std::lock_guard lock(mutex_);
    if (!allow_oversubscription_) {
      qmem::cuda_detail::device_guard guard(device_);
      std::size_t free_bytes = 0;
      std::size_t total_bytes = 0;
      qmem::cuda_detail::check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
      if (bytes > free_bytes || outstanding_ > free_bytes - bytes)
        throw cuda_error(
            qmem::detail::message("cuda_managed_resource: ", bytes, " bytes requested with ",
                                  outstanding_, " outstanding, but device ", device_, " has ",
                                  free_bytes, " bytes free; oversubscription was not asked for"),
            static_cast<int>(cudaErrorMemoryAllocation));
    }
    void* p = nullptr;
    qmem::cuda_detail::check(cudaMallocManaged(&p, bytes == 0 ? 1 : bytes, cudaMemAttachGlobal),
                             "cudaMallocManaged");
    cuda_resource_detail::check_alignment(p, alignment, "cudaMallocManaged",
                                          [](void* q) noexcept { (void)cudaFree(q); });
    outstanding_ += bytes; // after the last throw: a refused allocation is not counted
    return p;
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t, category) noexcept override {
    (void)cudaFree(p);
    std::lock_guard lock(mutex_);
    outstanding_ -= bytes < outstanding_ ? bytes : outstanding_;
  }
};

//! The process-wide device pool of `device`, created on first use (thread-safe) and kept for the
//! life of the process; qmem's kernels draw their workspaces from it. Devices 0..63. The first use
//! may come inside a stream capture in global mode (a graph of a first quantization): the pool
//! is then created with this thread's capture mode relaxed (cudaMemPoolCreate is refused
//! otherwise: compute-sanitizer run of one test case per process, H200, 2026-11-30).
inline cuda_device_resource& default_device_resource(int device) {
  constexpr int max_devices = 64;
  QMEM_EXPECTS(device >= 0 && device < max_devices, "device is ", device, "; expected 0..",
               max_devices - 1);
  static std::array<std::once_flag, max_devices> once;
  static std::array<std::unique_ptr<cuda_device_resource>, max_devices> pools;
  std::call_once(once[static_cast<std::size_t>(device)], [device] {
    qmem::cuda_detail::relaxed_capture_scope const relaxed;
    pools[static_cast<std::size_t>(device)] = std::make_unique<cuda_device_resource>(device);
  });
  return *pools[static_cast<std::size_t>(device)];
}

//! A stream-ordered scratch allocation that returns itself to its pool when it goes out of scope
//! (ordered on the same stream: no synchronization). For kernels' temporary storage.
template <class T>
class device_workspace {
  cuda_device_resource* resource_ = nullptr;
  CUstream_st* stream_ = nullptr;
  T* data_ = nullptr;
  std::size_t size_ = 0;

public:
  //! `size` elements of T from `r`, ordered on `stream`. Throws bad_argument when size * sizeof(T)
  //! overflows (before allocating), cuda_error when the pool cannot grow.
  device_workspace(cuda_device_resource& r, std::size_t size, CUstream_st* stream)
      : resource_(&r), stream_(stream), size_(size) {
    QMEM_EXPECTS(size <= std::numeric_limits<std::size_t>::max() / sizeof(T), "size ", size,
                 " overflows the byte count");
    data_ = static_cast<T*>(r.allocate_async(size * sizeof(T), stream));
  }
  device_workspace(device_workspace const&) = delete;
  device_workspace& operator=(device_workspace const&) = delete;
  ~device_workspace() { resource_->deallocate_async(data_, stream_); }

  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
};

} // namespace qmem::memory
