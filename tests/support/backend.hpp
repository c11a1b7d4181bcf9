#pragma once
// Test backends: a test is written once against a backend type B and applied to
// qmem::test::backends, which holds host_backend in host builds and host_backend + cuda_backend
// in CUDA builds (the same test source compiled by nvcc). A backend provides:
//   B::name                      "host" / "cuda"
//   B::available()               false when the backend cannot run here (no GPU)
//   B::exec()                    the execution object to pass to algorithms
//   B::upload(std::vector<T>)    an owning array on the backend; .view() gives tensor_view<T>
//   B::template alloc<T>(n)      an owning uninitialized array (poisoned with 0xA5 bytes)
//   B::download(view)            copy back to a std::vector<T> (synchronizes)
//   B::sync()                    waits for the backend's work
// Use it as:
//   TEST_CASE_TEMPLATE_DEFINE("what is tested", B, some_id) {
//     if (qmem::test::skip<B>()) return;
//     ...
//   }
//   TEST_CASE_TEMPLATE_APPLY(some_id, qmem::test::backends);
#include <qmem/core.hpp>

#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#if QMEM_HAS_CUDA()
#include <qmem/core/cuda/runtime.cuh>
#endif

// 1 (the default): tests also run the kernel variants that are benchmarked but not dispatched (the
// matmul candidates); 0 where no GPU runs the tests (CI: tests/CMakeLists.txt's
// QMEM_TEST_CANDIDATE_KERNELS), since the benchmarks compile those variants already.
#ifndef QMEM_TEST_CANDIDATE_KERNELS
#define QMEM_TEST_CANDIDATE_KERNELS 1
#endif

namespace qmem::test {

template <class T>
class host_array {
  std::vector<T> data_;

public:
  host_array() = default;
  explicit host_array(std::vector<T> v) : data_(std::move(v)) {}
  tensor_view<T> view() noexcept { return {data_.data(), data_.size(), memory_space::host}; }
  tensor_view<T const> view() const noexcept {
    return {data_.data(), data_.size(), memory_space::host};
  }
  std::size_t size() const noexcept { return data_.size(); }
};

struct host_backend {
  static constexpr char const* name = "host";
  static bool available() noexcept { return true; }
  static exec::host exec() noexcept { return {}; }
  template <class T>
  static host_array<T> upload(std::vector<T> const& v) {
    return host_array<T>(v);
  }
  template <class T>
  static host_array<T> alloc(std::size_t n) {
    std::vector<T> v(n);
    if (n != 0)
      std::memset(static_cast<void*>(v.data()), 0xA5, n * sizeof(T));
    return host_array<T>(std::move(v));
  }
  template <class T>
  static std::vector<std::remove_const_t<T>> download(tensor_view<T> v) {
    return std::vector<std::remove_const_t<T>>(v.begin(), v.end());
  }
  static void sync() noexcept {}
};

#if QMEM_HAS_CUDA()
template <class T>
class device_array {
  T* data_ = nullptr;
  std::size_t size_ = 0;

public:
  device_array() = default;
  explicit device_array(std::size_t n) : size_(n) {
    cuda_detail::check(cudaMalloc(&data_, n == 0 ? 1 : n * sizeof(T)), "cudaMalloc");
    cuda_detail::check(cudaMemset(data_, 0xA5, n == 0 ? 1 : n * sizeof(T)), "cudaMemset");
    // cudaMemset of device memory may return before it is done, and it runs on the legacy
    // stream, which a test's non-blocking stream does not wait for
    cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
  device_array(device_array&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  device_array& operator=(device_array&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  ~device_array() {
    if (data_ != nullptr)
      (void)cudaFree(data_);
  }
  tensor_view<T> view() noexcept { return {data_, size_, memory_space::device}; }
  tensor_view<T const> view() const noexcept { return {data_, size_, memory_space::device}; }
  std::size_t size() const noexcept { return size_; }
};

struct cuda_backend {
  static constexpr char const* name = "cuda";
  static bool available() noexcept { return cuda_detail::device_available(); }
  static exec::cuda exec() noexcept { return {nullptr, 0}; }
  template <class T>
  static device_array<T> upload(std::vector<T> const& v) {
    device_array<T> d(v.size());
    if (!v.empty())
      cuda_detail::check(
          cudaMemcpy(d.view().data(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice),
          "cudaMemcpy H2D");
    // from pageable memory cudaMemcpy returns once the bytes are staged, not landed: a kernel on
    // a non-blocking stream could otherwise read the array before it arrives
    cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    return d;
  }
  template <class T>
  static device_array<T> alloc(std::size_t n) {
    return device_array<T>(n);
  }
  template <class T>
  static std::vector<std::remove_const_t<T>> download(tensor_view<T> v) {
    std::vector<std::remove_const_t<T>> out(v.size());
    cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    if (!out.empty())
      cuda_detail::check(
          cudaMemcpy(out.data(), v.data(), v.size() * sizeof(T), cudaMemcpyDeviceToHost),
          "cudaMemcpy D2H");
    return out;
  }
  static void sync() { cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }
};
using backends = std::tuple<host_backend, cuda_backend>;
#else
using backends = std::tuple<host_backend>;
#endif

//! True (and prints a visible line) when backend B cannot run here; the test then returns.
template <class B>
bool skip() {
  if (B::available())
    return false;
  std::printf("[qmem] SKIPPED on %s: no CUDA device on this machine\n", B::name);
  MESSAGE((std::string("skipped on ") + B::name + ": no CUDA device on this machine"));
  return true;
}

//! True when this is a CUDA build and a GPU is present (GPU-only tests check this).
inline bool gpu_present() {
#if QMEM_HAS_CUDA()
  return cuda_detail::device_available();
#else
  return false;
#endif
}

} // namespace qmem::test
