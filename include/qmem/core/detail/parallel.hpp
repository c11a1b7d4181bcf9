#pragma once
//! \file
//! Host parallel loop: splits [0, n) into contiguous chunks over the process's worker threads.

#include <qmem/core/exec.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace qmem::detail {

//! CPUs this process may run on, read once: on Linux the affinity mask it started with (a
//! container's cpuset, `taskset`), which std::thread::hardware_concurrency ignores (a process
//! limited to 2 of 16 CPUs would start 16 threads); elsewhere, or when the mask cannot be read,
//! hardware_concurrency (at least 1).
inline unsigned usable_cpus() noexcept {
  static unsigned const cpus = [] {
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (::sched_getaffinity(0, sizeof set, &set) == 0) {
      int const n = CPU_COUNT(&set);
      if (n > 0)
        return static_cast<unsigned>(n);
    }
#endif
    unsigned const hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1u : hw;
  }();
  return cpus;
}

//! Number of threads `e` asks for (0 means one per CPU this process may run on: usable_cpus).
inline unsigned thread_count(exec::host const& e) noexcept {
  return e.threads != 0 ? e.threads : usable_cpus();
}

#ifndef QMEM_HOST_SPIN_US
//! Default of host_pool_spin_us(): how long, in microseconds, a host pool thread polls before it
//! sleeps (0: it sleeps at once). Measured 2026-11-30 19:11-19:13 UTC on the GPU machine's 16-vCPU
//! Xeon (docs/benchmarks.md, "host9"): an empty loop of 16 threads, back to back, took a median
//! 33 us sleeping at once (a wake-up crosses the hypervisor there) and 4.2-5.0 us polling for 20,
//! 50 or 200 us alike; in the AdamW benchmark (2^22 parameters, 16 threads, two rounds) the
//! threaded copy took 0.286 / 0.288 ms without polling, 0.261 / 0.272 with 50 us, 0.259 / 0.273
//! with 200 us, the 8-bit step 0.708 / 0.699, 0.702 / 0.732 and 0.693 / 0.715 ms (4-bit 0.531 /
//! 0.562, 0.508 / 0.614 with one thread preempted, 0.505 / 0.504): 50 and 200 equal within the
//! runs' spread. The cost: a polling thread holds a CPU that other programs may want; on the
//! 2-vCPU development VM with 7-8 runnable threads of other programs an empty 2-thread loop took
//! 47-49 us without polling, 67-84 us with 20, 136-157 with 50 and 119-452 with 200. 50 us: as
//! fast as 200 on the Xeon, with a third of its worst case on a crowded machine.
#define QMEM_HOST_SPIN_US 50
#endif

//! How long, in microseconds, a host pool thread polls before it sleeps: a worker waiting for the
//! next loop, and the caller waiting for the workers to finish the current one. A loop that starts
//! within that time costs no system call and no wake-up of a sleeping CPU. 0 sleeps at once, as
//! a condition variable alone does. QMEM_HOST_SPIN_US unless changed here; the next wait reads it.
inline std::atomic<unsigned>& host_pool_spin_us() noexcept {
  static std::atomic<unsigned> us{QMEM_HOST_SPIN_US};
  return us;
}

//! One pause of a polling loop: tells the core (and a hyper-thread sibling) that this thread waits.
inline void spin_pause() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#else
  std::this_thread::yield();
#endif
}

//! Polls `ready()` for up to host_pool_spin_us() microseconds; whether it became true.
template <class Ready>
bool spin_until(Ready&& ready) noexcept {
  unsigned const us = host_pool_spin_us().load(std::memory_order_relaxed);
  if (us == 0)
    return ready();
  auto const until = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  for (;;) {
    for (int i = 0; i < 32; ++i) { // the clock read costs about as much as 32 polls
      if (ready())
        return true;
      spin_pause();
    }
    if (std::chrono::steady_clock::now() >= until)
      return ready();
  }
}

//! The worker threads host loops run on, started on first use and kept for the life of the
//! process, so that a loop costs a wake-up instead of starting and joining its threads. Measured
//! 2026-11-30: on the GPU machine's 16-core Xeon, a threaded copy of 33.7 MB took 0.68-0.73 ms
//! with threads started per call and 0.40-0.44 ms on the pool, and the 8-bit AdamW step of 2^22
//! parameters 1.13-1.25 ms -> 0.77-0.98 ms (4-bit 0.97-1.08 -> 0.65-0.75), 16 threads, three
//! interleaved runs each; on the 2-core development VM, 200 loops of 15 threads took 620-890 us
//! each with threads started per call and 115-170 us on the pool.
//! A waiting thread first polls for host_pool_spin_us() microseconds, then sleeps on a condition
//! variable: a worker that ran the last loop waits so for the next one (the job word below), the
//! caller for the last worker. Only when the loop had no more threads than the process has CPUs
//! (usable_cpus): threads polling on a CPU that others wait for delay them (on the 2-vCPU
//! development VM, an empty loop of 8 or 16 threads took 0.2-3.3 ms polling, 26-46 us without);
//! workers that sat a loop out sleep at once.
//! One loop at a time uses the pool. A loop started while another one holds it (from another
//! thread, or nested inside a loop's body) and a loop in a child process after fork() are told
//! no by try_run and start their own threads, as every loop did before.
//! The pool is never destroyed: its threads wait on a condition variable at exit, and a loop
//! run from a static destructor still finds it.
class host_pool {
public:
  //! The process's pool.
  static host_pool& instance() {
    static host_pool* const pool = new host_pool();
    return *pool;
  }

  //! Runs body(t) for t in [0, m): t = 0 on the calling thread, the others on the pool's
  //! workers, and returns once every call returned; m is `threads`, or fewer when the system
  //! refused to start more workers (m >= 1: the caller always runs). False (nothing run) when the
  //! pool is busy or this is a forked child. `body` must not throw. Precondition: threads >= 1.
  template <class Body>
  bool try_run(std::size_t threads, Body& body) {
    if (in_job_ || !owner_process())
      return false;
    bool expected = false;
    if (!busy_.compare_exchange_strong(expected, true, std::memory_order_acquire))
      return false;
    try {
      grow(std::min(threads, max_threads) - 1);
    } catch (...) { // a thread could not be started (thread or address-space limits)
    }
    threads = std::min(threads, workers_ + 1); // run on the workers that exist
    // No worker reads job_ or job_body_ now: the previous loop's workers all counted down.
    job_ = [](void* b, std::size_t t) { (*static_cast<Body*>(b))(t); };
    job_body_ = &body;
    remaining_.store(threads - 1, std::memory_order_relaxed);
    {
      // under the mutex: a worker going to sleep checks the word under it, so none misses it
      std::lock_guard<std::mutex> lock(mutex_);
      job_word_.store((job_word_.load(std::memory_order_relaxed) & ~thread_mask) + generation_one +
                          threads,
                      std::memory_order_release);
    }
    wake_.notify_all(); // no system call when no worker sleeps
    in_job_ = true;
    body(std::size_t{0});
    in_job_ = false;
    auto const finished = [&] { return remaining_.load(std::memory_order_acquire) == 0; };
    if (!(threads <= usable_cpus() && spin_until(finished))) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, finished);
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }

private:
  host_pool() = default;

  // The job word: the loop's generation above, its thread count in the low 16 bits, so that a
  // worker reads both at once (a worker that sits a loop out must not read the next loop's count).
  static constexpr std::uint64_t generation_one = std::uint64_t{1} << 16;
  static constexpr std::uint64_t thread_mask = generation_one - 1;
  static constexpr std::size_t max_threads = thread_mask; // threads beyond it are not started

  bool owner_process() const noexcept {
#if defined(__unix__) || defined(__APPLE__)
    return ::getpid() == pid_;
#else
    return true;
#endif
  }

  // Starts workers until `count` exist (only the caller holding busy_ starts them).
  void grow(std::size_t count) {
    while (workers_ < count) {
      std::uint64_t const seen = job_word_.load(std::memory_order_relaxed);
      std::thread(&host_pool::work, this, workers_ + 1, seen).detach();
      ++workers_;
    }
  }

  void work(std::size_t index, std::uint64_t seen) {
    in_job_ = true; // a loop inside a job's body starts its own threads
    auto const changed = [&] { return job_word_.load(std::memory_order_acquire) != seen; };
    bool poll = false; // whether this worker ran the last loop, which had a CPU per thread
    for (;;) {
      if (!(poll && spin_until(changed))) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, changed);
      }
      seen = job_word_.load(std::memory_order_acquire);
      std::size_t const threads = seen & thread_mask;
      poll = index < threads && threads <= usable_cpus();
      if (index >= threads)
        continue; // not in this loop
      job_(job_body_, index);
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        // the last one: the caller may sleep (it checks remaining_ under the mutex)
        { std::lock_guard<std::mutex> lock(mutex_); }
        done_.notify_one();
      }
    }
  }

  static inline thread_local bool in_job_ = false;
  std::atomic<bool> busy_{false};
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  void (*job_)(void*, std::size_t) = nullptr;
  void* job_body_ = nullptr;
  std::atomic<std::uint64_t> job_word_{0};
  std::atomic<std::size_t> remaining_{0};
  std::size_t workers_ = 0;
#if defined(__unix__) || defined(__APPLE__)
  pid_t const pid_ = ::getpid();
#endif
};

#ifndef QMEM_HOST_PIECES_PER_THREAD
//! Pieces per thread of a host loop (parallel_for), handed out in order to whichever thread is
//! free. Measured 2026-11-30 on the GPU machine's 16-vCPU Xeon (a KVM guest; docs/benchmarks.md
//! "Host optimizers", round 7): with all 16 vCPUs busy, 2 to 6 of them ran 512-bit FMA and
//! division loops at 0.41-0.50 of the others' rate (pairs sharing a physical core on the host),
//! while dependent-chain loops ran at the same rate on all 16, so one equal chunk per thread
//! waited for the slowest. AdamW at 2^22 parameters, 16 threads, two interleaved runs: 8-bit
//! 0.751 / 0.802 ms with one chunk per thread, 0.645 / 0.829 with 8 pieces, 0.570 / 0.662 with 16;
//! 4-bit 0.634 / 0.813, 0.478 / 0.632, 0.468 / 0.485.
#define QMEM_HOST_PIECES_PER_THREAD 16
#endif

//! Pieces per thread of the next host loops: QMEM_HOST_PIECES_PER_THREAD unless changed here (at
//! least 1; benchmarks compare values in one program).
inline std::atomic<std::size_t>& host_pieces_per_thread() noexcept {
  static_assert(QMEM_HOST_PIECES_PER_THREAD >= 1, "QMEM_HOST_PIECES_PER_THREAD must be at least 1");
  static std::atomic<std::size_t> pieces{QMEM_HOST_PIECES_PER_THREAD};
  return pieces;
}

//! Calls `f(begin, end)` on disjoint pieces covering [0, n), each piece a multiple of `grain`
//! items except the last, piece i being [i * per, min(n, (i + 1) * per)) with at most
//! host_pieces_per_thread() pieces per thread. The threads (the caller and the pool's workers)
//! take the pieces in ascending order as they become free, so a thread that runs slower (a CPU
//! shared with other work) takes fewer; which thread runs a piece is not fixed, so `f` must write
//! only results indexed by position (every caller in qmem does). Runs on the calling thread as one
//! piece [0, n) when one thread suffices. An exception from a piece is rethrown on the calling
//! thread after every piece ended (that of the lowest piece when several threw). When the system
//! refuses to start some of the threads (thread or address-space limits), the threads that did
//! start, at least the caller, take every piece.
//! `min_items_per_thread` keeps tiny problems single-threaded.
template <class F>
void parallel_for(exec::host const& e, std::size_t n, std::size_t grain, F&& f,
                  std::size_t min_items_per_thread = std::size_t{1} << 16) {
  if (n == 0)
    return;
  grain = std::max<std::size_t>(grain, 1);
  std::size_t const grains = (n + grain - 1) / grain;
  std::size_t threads = std::min<std::size_t>(thread_count(e), grains);
  threads = std::min<std::size_t>(threads, std::max<std::size_t>(1, n / min_items_per_thread));
  if (threads <= 1) {
    f(std::size_t{0}, n);
    return;
  }
  std::size_t const pieces_per_thread =
      std::max<std::size_t>(1, host_pieces_per_thread().load(std::memory_order_relaxed));
  std::size_t const wanted = std::min(grains, threads * pieces_per_thread);
  std::size_t const per = (grains + wanted - 1) / wanted * grain;
  std::size_t const pieces = (n + per - 1) / per;
  threads = std::min(threads, pieces);
  std::vector<std::exception_ptr> errors(pieces);
  std::atomic<std::size_t> next{0};
  auto run = [&](std::size_t) noexcept {
    for (;;) {
      std::size_t const i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= pieces)
        return;
      std::size_t const b = i * per;
      try {
        f(b, std::min(n, b + per));
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  };
  if (!host_pool::instance().try_run(threads, run)) {
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    try {
      for (std::size_t t = 1; t < threads; ++t)
        pool.emplace_back(run, t);
    } catch (...) { // refused by the system: the threads started take every piece
    }
    run(0);
    for (auto& th : pool)
      th.join();
  }
  for (auto& err : errors)
    if (err)
      std::rethrow_exception(err);
}

} // namespace qmem::detail
