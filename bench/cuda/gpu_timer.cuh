#pragma once
//! \file
//! GPU time of stream-ordered work, without the host's time: the timer the CUDA benchmarks share.
//!
//! The plain pattern (record a start event, call the host API, record a stop event) counts as GPU
//! time whatever the host spends between the start event and the enqueue of the first kernel:
//! argument checks, occupancy queries, the launch itself, and any time the thread is
//! descheduled: on the H200 machine 1.5-6 us per quantize call and 7-24 us per optimizer step
//! (1-2% of those rows), varying from process to process. gpu_timer::blocked_ms does what
//! NVIDIA's nvbench does with its blocking kernel: a one-thread kernel that spins until the host
//! releases it is enqueued first, then the start event, the work and the stop event, and only then
//! is the kernel released. The start event is processed when the whole timed sequence already
//! waits in the stream, so the events bracket the GPU's work alone.
//!
//! Limits (stated where they matter):
//! - The timed function must not wait for the stream (cudaStreamSynchronize, cudaFree, a
//!   blocking copy, a read of a result): the stream does not move until the host releases it, so
//!   the wait would last until the blocking kernel's timeout (hold_timeout_ns), after which the
//!   kernel exits and the measurement is refused (timer_timeout).
//! - A held stream accepts a bounded number of launches (the driver's launch queue) before the
//!   launching call blocks until the queue drains, which on a held stream is the timeout again.
//!   Measured by quant_bench's `timer_launch_queue` (H200, CUDA 13.0, driver 580.159.04,
//!   2026-11-30 19:31 UTC): 256 and 512 empty kernels enqueued behind the blocking kernel in
//!   1.1 and 2.3 ms; 1024 or more blocked the host until the 200 ms timeout. So keep a timed
//!   step below 512 launches; a benchmark step of a few launches, or one graph launch, is far
//!   below it.
//! - What it removes and what it does not: with it the medians of the memory-bound rows agree to
//!   0.1-0.3% across six processes, three of them with 16 busy processes on the 16 host CPUs
//!   (0.8-1.2% with the former timing). The FP4 quantize row still moved 6.9% between those
//!   processes, with the GPU at its power cap: that swing is the GPU's, not the host's
//!   (docs/benchmarks.md, "2026-11-30, quant6").
//! - One timer per stream and thread at a time: the release flag belongs to one timed sequence.
#include <qmem/core/cuda/runtime.cuh>
#include <qmem/core/error.hpp>

#include <cuda/atomic>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace qmem::bench {

//! How long the blocking kernel holds a stream before it gives up (GPU wall clock,
//! %globaltimer): far above any enqueue of a benchmark step (a few to a few hundred
//! microseconds, even on a loaded host), short enough that a timed function that synchronizes
//! costs one visible 0.2 s stall instead of a hang.
inline constexpr std::uint64_t hold_timeout_ns = 200'000'000;

//! Thrown by gpu_timer::blocked_ms when the blocking kernel timed out: the measurement is invalid.
class timer_timeout : public qmem::error {
public:
  using qmem::error::error;
};

namespace detail {

__device__ inline std::uint64_t global_ns() {
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

//! Spins until flags[0] (host memory, written by the host) is non-zero, or for timeout_ns; on a
//! timeout sets flags[1]. One thread. (Kernels here are templates so that the header can define
//! them in every translation unit: a plain __global__ function is not inline.)
template <int = 0>
__global__ void hold_stream(int* flags, std::uint64_t timeout_ns) {
  cuda::atomic_ref<int, cuda::thread_scope_system> release(flags[0]);
  std::uint64_t const t0 = global_ns();
  while (release.load(cuda::memory_order_relaxed) == 0) {
    if (global_ns() - t0 > timeout_ns) {
      cuda::atomic_ref<int, cuda::thread_scope_system>(flags[1]).store(1,
                                                                       cuda::memory_order_relaxed);
      return;
    }
    __nanosleep(500); // a poll is a PCIe read of host memory anyway (~1 us)
  }
}

} // namespace detail

//! Times stream-ordered work on one stream with CUDA events; see the file comment.
class gpu_timer {
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
  int* flags_ = nullptr;        // pinned, mapped host memory: [0] release, [1] timed out
  int* device_flags_ = nullptr; // the same memory as the device addresses it

  void set_flag(int i, int v) {
    std::atomic_ref<int>(flags_[i]).store(v, std::memory_order_seq_cst);
  }

  float elapsed_ms() {
    cuda_detail::check(cudaEventSynchronize(stop_), "cudaEventSynchronize");
    float ms = 0.0f;
    cuda_detail::check(cudaEventElapsedTime(&ms, start_, stop_), "cudaEventElapsedTime");
    return ms;
  }

public:
  //! A timer for `stream` (the legacy default stream when null): two events and 8 bytes of
  //! pinned host memory. Throws qmem::cuda_error when they cannot be made.
  explicit gpu_timer(cudaStream_t stream = nullptr) : stream_(stream) {
    cuda_detail::check(cudaEventCreate(&start_), "cudaEventCreate");
    cuda_detail::check(cudaEventCreate(&stop_), "cudaEventCreate");
    void* p = nullptr;
    cuda_detail::check(cudaHostAlloc(&p, 2 * sizeof(int), cudaHostAllocMapped), "cudaHostAlloc");
    flags_ = static_cast<int*>(p);
    void* d = nullptr;
    cuda_detail::check(cudaHostGetDevicePointer(&d, p, 0), "cudaHostGetDevicePointer");
    device_flags_ = static_cast<int*>(d);
    flags_[0] = 0;
    flags_[1] = 0;
  }
  ~gpu_timer() {
    (void)cudaEventDestroy(start_);
    (void)cudaEventDestroy(stop_);
    (void)cudaFreeHost(flags_);
  }
  gpu_timer(gpu_timer const&) = delete;
  gpu_timer& operator=(gpu_timer const&) = delete;

  //! GPU time in ms of the work `f()` enqueues on the timer's stream, the host's time excluded
  //! (the work is enqueued behind a blocking kernel, released after the stop event is enqueued).
  //! Preconditions: `f` enqueues its work on the timer's stream (or the legacy default stream's
  //! implicit order covers it) without waiting for the stream, and fewer launches than the
  //! launch queue holds. Throws timer_timeout (the measurement is invalid) when the blocking
  //! kernel timed out, which is what a violated precondition leads to; rethrows what `f` throws,
  //! after releasing the stream.
  template <class F>
  float blocked_ms(F&& f) {
    set_flag(0, 0);
    set_flag(1, 0);
    detail::hold_stream<><<<1, 1, 0, stream_>>>(device_flags_, hold_timeout_ns);
    cuda_detail::check(cudaGetLastError(), "qmem::bench::detail::hold_stream");
    auto const t0 = std::chrono::steady_clock::now();
    try {
      cuda_detail::check(cudaEventRecord(start_, stream_), "cudaEventRecord");
      std::forward<F>(f)();
      cuda_detail::check(cudaEventRecord(stop_, stream_), "cudaEventRecord");
    } catch (...) {
      set_flag(0, 1);
      (void)cudaStreamSynchronize(stream_);
      throw;
    }
    auto const enqueue = std::chrono::steady_clock::now() - t0;
    set_flag(0, 1);
    float const ms = elapsed_ms();
    if (std::atomic_ref<int>(flags_[1]).load() != 0)
      throw timer_timeout(qmem::detail::message(
          "qmem::bench::gpu_timer::blocked_ms: the blocking kernel timed out after ",
          hold_timeout_ns / 1'000'000, " ms before the host released it (the host spent ",
          std::chrono::duration<double, std::milli>(enqueue).count(),
          " ms enqueuing the timed work): the timed function waits for the stream (a "
          "synchronization, cudaFree, a blocking copy) or enqueued more launches than the launch "
          "queue holds; expected stream-ordered work that does not wait. This measurement is "
          "invalid."));
    return ms;
  }

  //! The former timing, kept as a counter (host_incl_ms) for one release to compare with:
  //! events around `f()` on an idle stream, so the host's time from the start event to the
  //! enqueue of the work counts as GPU time.
  template <class F>
  float host_inclusive_ms(F&& f) {
    cuda_detail::check(cudaEventRecord(start_, stream_), "cudaEventRecord");
    std::forward<F>(f)();
    cuda_detail::check(cudaEventRecord(stop_, stream_), "cudaEventRecord");
    return elapsed_ms();
  }

  //! Host milliseconds to enqueue `n` empty kernels behind the blocking kernel, and whether the
  //! blocking kernel timed out meanwhile (the enqueue then blocked on a full launch queue).
  std::pair<double, bool> probe_launch_queue(int n);
};

namespace detail {
template <int = 0>
__global__ void empty_kernel() {}
} // namespace detail

inline std::pair<double, bool> gpu_timer::probe_launch_queue(int n) {
  set_flag(0, 0);
  set_flag(1, 0);
  detail::hold_stream<><<<1, 1, 0, stream_>>>(device_flags_, hold_timeout_ns);
  cuda_detail::check(cudaGetLastError(), "qmem::bench::detail::hold_stream");
  auto const t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i)
    detail::empty_kernel<><<<1, 1, 0, stream_>>>();
  double const ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  set_flag(0, 1);
  cuda_detail::check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  cuda_detail::check(cudaGetLastError(), "qmem::bench::detail::empty_kernel");
  return {ms, std::atomic_ref<int>(flags_[1]).load() != 0};
}

//! The samples of one benchmark row, each sorted ascending: the GPU-only times (blocked_ms) and
//! the host-inclusive times of the same work (host_inclusive_ms), in milliseconds.
struct row_samples {
  std::vector<float> gpu;
  std::vector<float> host_incl;
};

//! Runs a Google Benchmark row's loop (`state` is a benchmark::State; any type with its range-for
//! and SetIterationTime) over `f`: each iteration times `f` once GPU-only, which is the
//! iteration's time, and once host-inclusive, in alternating order so that neither always runs
//! first. Returns the sorted samples, or nothing when the blocking kernel timed out (`f` waited on
//! the stream): the caller skips the row with that message (`error`).
template <class State, class F>
std::optional<row_samples> time_row(State& state, gpu_timer& timer, F&& f, std::string& error) {
  row_samples r;
  try {
    for (auto _ : state) {
      bool const incl_first = r.gpu.size() % 2 == 1;
      if (incl_first)
        r.host_incl.push_back(timer.host_inclusive_ms(f));
      float const ms = timer.blocked_ms(f);
      if (!incl_first)
        r.host_incl.push_back(timer.host_inclusive_ms(f));
      r.gpu.push_back(ms);
      state.SetIterationTime(static_cast<double>(ms) * 1e-3);
    }
  } catch (timer_timeout const& e) {
    error = e.what();
    return std::nullopt;
  }
  std::sort(r.gpu.begin(), r.gpu.end());
  std::sort(r.host_incl.begin(), r.host_incl.end());
  return r;
}

} // namespace qmem::bench
