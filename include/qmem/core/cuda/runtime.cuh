#pragma once
//! \file
//! CUDA runtime plumbing shared by every kernel file: error checking where calls are made, launch
//! checks, and a guard that makes the execution object's device current for the duration of a
//! call (and restores the caller's). Only for CUDA translation units.

#include <qmem/core/config.hpp>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>

#if !QMEM_HAS_CUDA()
#error "qmem/core/cuda/runtime.cuh is for CUDA translation units (compile this file with nvcc)"
#endif

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <source_location>
#include <string>

namespace qmem::cuda_detail {

//! Throws qmem::cuda_error naming the call and the CUDA error when `status` is not cudaSuccess.
inline void check(cudaError_t status, char const* what,
                  std::source_location where = std::source_location::current()) {
  if (status != cudaSuccess) [[unlikely]] {
    (void)cudaGetLastError(); // clear a sticky-free error so later calls are not poisoned
    throw cuda_error(detail::message(what, " failed: ", cudaGetErrorName(status), " (",
                                     cudaGetErrorString(status), ") at ", where.file_name(), ":",
                                     where.line()),
                     static_cast<int>(status));
  }
}

//! Checks the launch that just happened on `e`'s stream; with `e.sync_after_launch` also waits
//! for it and checks its execution (localizes faults while debugging).
inline void check_launch(exec::cuda const& e, char const* kernel,
                         std::source_location where = std::source_location::current()) {
  check(cudaGetLastError(), kernel, where);
  if (e.sync_after_launch)
    check(cudaStreamSynchronize(e.stream), kernel, where);
}

//! Programmatic dependent launch, device side (sm_90; no-ops elsewhere and in a kernel launched
//! without the attribute, see `launch`): `pdl_allow_dependents` lets the stream's next kernel,
//! when launched as a programmatic dependent, start its blocks now (its prologue overlaps this
//! kernel's tail); `pdl_wait` blocks until the stream's previous kernel has finished and its
//! writes are visible. A dependent reads nothing an earlier kernel may write before its pdl_wait.
__device__ QMEM_INLINE void pdl_allow_dependents() noexcept {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ QMEM_INLINE void pdl_wait() noexcept {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

//! Launches `kernel` on `e`'s stream and checks the launch (check_launch). With `dependent`, as a
//! programmatic dependent launch: the kernel may start while the stream's previous kernel is still
//! running, so it must call pdl_wait() before reading that kernel's results.
template <class... Params, class... Args>
void launch(exec::cuda const& e, bool dependent, void (*kernel)(Params...), dim3 grid, dim3 block,
            std::size_t smem, char const* name, Args const&... args) {
  if (dependent) {
    cudaLaunchAttribute attr[1] = {};
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = e.stream;
    config.attrs = attr;
    config.numAttrs = 1;
    check(cudaLaunchKernelEx(&config, kernel, args...), name);
  } else {
    kernel<<<grid, block, smem, e.stream>>>(args...);
  }
  check_launch(e, name);
}

//! Makes `device` current for this scope; restores the previous device on exit.
class device_guard {
  int previous_ = -1;

public:
  explicit device_guard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device)
      check(cudaSetDevice(device), "cudaSetDevice");
  }
  device_guard(device_guard const&) = delete;
  device_guard& operator=(device_guard const&) = delete;
  ~device_guard() {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_ && previous_ >= 0)
      (void)cudaSetDevice(previous_);
  }
};

//! While alive, this thread may make the one-time set-up calls of a first use (a memory pool,
//! an allocation, kernel attributes, occupancy and device queries, handle creation, an upload on
//! a stream of its own) even while one of the caller's streams is being captured: it switches the
//! thread's capture mode to relaxed and restores the previous mode on exit, on every path. In
//! global or thread-local mode such "potentially unsafe" calls are refused during a capture and
//! invalidate it; none of them enqueues work on the captured stream, so the graph is the same.
//! Outside a capture the switch changes nothing.
class relaxed_capture_scope {
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;

public:
  relaxed_capture_scope() {
    check(cudaThreadExchangeStreamCaptureMode(&mode_), "cudaThreadExchangeStreamCaptureMode");
  }
  relaxed_capture_scope(relaxed_capture_scope const&) = delete;
  relaxed_capture_scope& operator=(relaxed_capture_scope const&) = delete;
  ~relaxed_capture_scope() { (void)cudaThreadExchangeStreamCaptureMode(&mode_); }
};

//! Number of multiprocessors of `device` (cached per device, first 64 devices). Safe to call from
//! several threads at once: the cache entries are atomics (two first callers may both ask the
//! driver; they store the same value).
inline int sm_count(int device) {
  static std::atomic<int> cache[64] = {};
  bool const cached = device >= 0 && device < 64;
  if (cached) {
    if (int const n = cache[device].load(std::memory_order_relaxed); n != 0)
      return n;
  }
  int n = 0;
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute(MultiProcessorCount)");
  if (cached)
    cache[device].store(n, std::memory_order_relaxed);
  return n;
}

//! True when at least one CUDA device is usable (tests skip GPU cases otherwise).
inline bool device_available() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}

} // namespace qmem::cuda_detail
