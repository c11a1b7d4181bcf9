#pragma once
//! \file
//! CUDA runtime plumbing shared by every kernel file: error checking where calls are made, launch
//! checks, a guard that makes the execution object's device current for the duration of a call
//! (and restores the caller's), and the check that a call's memory lives where it launches. Only
//! for CUDA translation units.

#include <qmem/core/config.hpp>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/tensor.hpp>

#if !QMEM_HAS_CUDA()
#error "qmem/core/cuda/runtime.cuh is for CUDA translation units (compile this file with nvcc)"
#endif

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <initializer_list>
#include <source_location>
#include <string>
#include <string_view>

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

//! True when `p` is device memory the host cannot read (no host alias): the probe check_view
//! (core/tensor.hpp) runs on the host backend's arguments. An address CUDA does not know is not
//! device memory. The query runs in relaxed capture mode (see relaxed_capture_scope), so that a
//! capture of one of the thread's streams does not count it as an unsafe call.
inline bool is_device_only_memory(void const* p) noexcept {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  bool const relaxed = cudaThreadExchangeStreamCaptureMode(&mode) == cudaSuccess;
  cudaPointerAttributes a{};
  cudaError_t const status = cudaPointerGetAttributes(&a, p);
  if (relaxed)
    (void)cudaThreadExchangeStreamCaptureMode(&mode);
  if (status != cudaSuccess) {
    (void)cudaGetLastError(); // not sticky: clear it so that no later check reports it
    return false;
  }
  return a.type == cudaMemoryTypeDevice && a.hostPointer == nullptr;
}

//! Makes `device` current for this scope; restores the previous device on exit. Every qmem CUDA
//! call makes one, so its constructor also arms check_view's device-memory probe: from then on
//! the host backend refuses device memory (the runtime is initialized by then; on a thread whose
//! current device has no context yet, the probe's query may create one, as any runtime call
//! there would).
class device_guard {
  int previous_ = -1;

public:
  explicit device_guard(int device) {
    if (qmem::detail::device_memory_probe.load(std::memory_order_relaxed) == nullptr)
      qmem::detail::device_memory_probe.store(&is_device_only_memory, std::memory_order_release);
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

namespace residency_detail {

//! check_reachable without the capture-mode scope (the callers below hold one).
inline void check_reachable(int device, void const* p, char const* function,
                            std::string_view name) {
  cudaPointerAttributes a{};
  cudaError_t const status = cudaPointerGetAttributes(&a, p);
  if (status == cudaErrorInvalidValue) {
    (void)cudaGetLastError(); // not sticky: clear it so that no later check reports it
    qmem::detail::raise(function, ": ", name, " is at an address CUDA does not know; this call ",
                        "runs on device ", device, " (exec::cuda::device) and needs memory of ",
                        "that device, managed memory or pinned host memory");
  }
  check(status, "cudaPointerGetAttributes");
  switch (a.type) {
  case cudaMemoryTypeDevice:
    if (a.device == device)
      return;
    qmem::detail::raise(function, ": ", name, " is in the memory of device ", a.device,
                        "; this call runs on device ", device,
                        " (exec::cuda::device): expected memory of device ", device,
                        ", managed memory or pinned host memory");
  case cudaMemoryTypeManaged: return;
  case cudaMemoryTypeHost:
    if (a.devicePointer == p)
      return;
    qmem::detail::raise(function, ": ", name, " is registered host memory that device ", device,
                        " cannot reach at this address (not mapped); expected memory of device ",
                        device, ", managed memory or mapped pinned host memory");
  default:
    qmem::detail::raise(function, ": ", name, " is pageable host memory (CUDA knows no ",
                        "allocation at this address); this call runs on device ", device,
                        " (exec::cuda::device) and needs memory of that device, managed memory ",
                        "or pinned host memory");
  }
}

} // namespace residency_detail

//! Throws qmem::bad_argument "<function>: <name> ..." unless the kernels of `device` may read and
//! write the memory at `p` where it is: device memory of `device` itself, managed memory, or
//! pinned host memory mapped at the same address (cudaHostAlloc; cudaHostRegister under unified
//! addressing). Refused, with the place named: memory of another device (even with peer access:
//! a call launches on its tensors' device, issue 3 section 1), pageable host memory, an address
//! CUDA does not know. Call it with `device` current (device_guard): a pinned buffer's device
//! alias is looked up for the current device. Cost: one cudaPointerGetAttributes, a host-side
//! look-up in the driver's address map; nothing is enqueued, so a stream capture records nothing
//! of it and in a CUDA graph the check runs once, at capture. The query runs in a
//! relaxed_capture_scope, so that a capture of the caller's stream does not count it as an
//! unsafe call.
inline void check_reachable(int device, void const* p, char const* function,
                            std::string_view name) {
  relaxed_capture_scope relaxed;
  residency_detail::check_reachable(device, p, function, name);
}

//! One argument of check_resident: its name and first byte (null: nothing to check).
struct named_address {
  std::string_view name;
  void const* address = nullptr;
};

//! The argument `name` viewed by `v`; an empty view is not checked (no byte of it is touched).
template <class T>
named_address arg(std::string_view name, tensor_view<T> v) noexcept {
  return {name, v.empty() ? nullptr : static_cast<void const*>(v.data())};
}

//! check_reachable(e.device, ...) of each argument, in order: what every CUDA entry point calls on
//! its tensors, under its device_guard and before it allocates, writes or launches anything.
inline void check_resident(exec::cuda const& e, char const* function,
                           std::initializer_list<named_address> args) {
  relaxed_capture_scope relaxed;
  for (named_address const& a : args)
    if (a.address != nullptr)
      residency_detail::check_reachable(e.device, a.address, function, a.name);
}

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
