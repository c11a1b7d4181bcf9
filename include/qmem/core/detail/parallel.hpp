#pragma once
//! \file
//! Host parallel loop: splits [0, n) into contiguous chunks over worker threads.

#include <qmem/core/exec.hpp>

#include <algorithm>
#include <cstddef>
#include <exception>
#include <thread>
#include <vector>

namespace qmem::detail {

//! Number of threads `e` asks for (0 means one per hardware thread).
inline unsigned thread_count(exec::host const& e) noexcept {
  if (e.threads != 0)
    return e.threads;
  unsigned const hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1u : hw;
}

//! Calls `f(begin, end)` on disjoint chunks covering [0, n), each chunk a multiple of `grain`
//! items except the last. Runs on the calling thread when one chunk suffices. Exceptions from a
//! worker are rethrown on the calling thread after all workers joined.
//! `min_items_per_thread` keeps tiny problems single-threaded (thread start costs ~20 us).
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
  std::size_t const per = (grains + threads - 1) / threads * grain;
  std::vector<std::exception_ptr> errors(threads);
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  auto run = [&](std::size_t t) {
    std::size_t const b = t * per;
    std::size_t const end = std::min(n, b + per);
    if (b >= end)
      return;
    try {
      f(b, end);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  for (std::size_t t = 1; t < threads; ++t)
    pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool)
    th.join();
  for (auto& err : errors)
    if (err)
      std::rethrow_exception(err);
}

} // namespace qmem::detail
