// Execution objects and the host parallel loop: which types are execution objects, how many
// threads `exec::host` asks for, and parallel_for's contract (every index exactly once, chunks
// aligned to the grain, small problems on the calling thread, worker exceptions rethrown on the
// caller after every worker joined), its pieces handed to whichever thread is free (a slow thread
// takes fewer), and its worker pool (growth, nested loops, loops from several threads, a forked
// child).
#include <qmem/core.hpp>
#include <qmem/core/detail/parallel.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <cstdio>
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

static_assert(qmem::exec::execution<qmem::exec::host>);
static_assert(qmem::exec::execution<qmem::exec::cuda>);
static_assert(qmem::exec::execution<qmem::exec::host const&>);
static_assert(qmem::exec::execution<qmem::exec::cuda&&>);
static_assert(!qmem::exec::execution<int>);
static_assert(!qmem::exec::execution<CUstream_st*>);
static_assert(qmem::exec::is_host_v<qmem::exec::host const&>);
static_assert(!qmem::exec::is_host_v<qmem::exec::cuda>);
static_assert(qmem::exec::is_cuda_v<qmem::exec::cuda&>);
static_assert(!qmem::exec::is_cuda_v<qmem::exec::host>);
// Both are cheap aggregates passed by value.
static_assert(std::is_trivially_copyable_v<qmem::exec::host>);
static_assert(std::is_trivially_copyable_v<qmem::exec::cuda>);

namespace {

struct chunk {
  std::size_t begin, end;
  std::thread::id thread;
};

// Runs parallel_for and records every chunk it was given.
std::vector<chunk> chunks_of(qmem::exec::host e, std::size_t n, std::size_t grain,
                             std::size_t min_items_per_thread) {
  std::mutex m;
  std::vector<chunk> out;
  qmem::detail::parallel_for(
      e, n, grain,
      [&](std::size_t b, std::size_t end) {
        std::lock_guard lock(m);
        out.push_back({b, end, std::this_thread::get_id()});
      },
      min_items_per_thread);
  return out;
}

} // namespace

TEST_CASE("exec objects: defaults and thread counts") {
  qmem::exec::cuda const c{};
  CHECK(c.stream == nullptr);
  CHECK(c.device == 0);
  CHECK_FALSE(c.sync_after_launch);
  CHECK(qmem::detail::thread_count(qmem::exec::host{3}) == 3);
  unsigned const hw = std::thread::hardware_concurrency();
  unsigned const usable = qmem::detail::usable_cpus();
  CHECK(qmem::detail::thread_count(qmem::exec::host{}) == usable);
  CHECK(usable >= 1);
  CHECK(usable <= (hw == 0 ? usable : hw));
#if defined(__linux__)
  cpu_set_t set; // the default is the affinity mask's size, as taskset or a cpuset sets it
  CPU_ZERO(&set);
  REQUIRE(::sched_getaffinity(0, sizeof set, &set) == 0);
  CHECK(usable == static_cast<unsigned>(CPU_COUNT(&set)));
#endif
}

TEST_CASE("parallel_for: every index exactly once, for many sizes, grains and thread counts") {
  for (unsigned threads : {1u, 2u, 3u, 8u})
    for (std::size_t n :
         {std::size_t{1}, std::size_t{7}, std::size_t{64}, std::size_t{1000}, std::size_t{4097}})
      for (std::size_t grain :
           {std::size_t{0}, std::size_t{1}, std::size_t{16}, std::size_t{5000}}) {
        CAPTURE(threads);
        CAPTURE(n);
        CAPTURE(grain);
        std::vector<std::atomic<int>> hits(n);
        qmem::detail::parallel_for(
            qmem::exec::host{threads}, n, grain,
            [&](std::size_t b, std::size_t e) {
              for (std::size_t i = b; i < e; ++i)
                hits[i].fetch_add(1, std::memory_order_relaxed);
            },
            1);
        std::size_t wrong = 0;
        for (auto& h : hits)
          wrong += h.load() != 1;
        REQUIRE(wrong == 0);
      }
}

TEST_CASE("parallel_for: pieces are grain multiples, disjoint and ordered, at most 16 per thread") {
  // 100 grains on 4 threads: 64 pieces wanted, so 2 grains (20 items) a piece: 50 pieces
  auto cs = chunks_of(qmem::exec::host{4}, 1000, 10, 1);
  REQUIRE(cs.size() == 50);
  std::sort(cs.begin(), cs.end(), [](chunk const& a, chunk const& b) { return a.begin < b.begin; });
  std::set<std::thread::id> ids;
  std::size_t expected_begin = 0;
  for (std::size_t i = 0; i < cs.size(); ++i) {
    CHECK(cs[i].begin == expected_begin);
    CHECK(cs[i].end - cs[i].begin == 20);
    expected_begin = cs[i].end;
    ids.insert(cs[i].thread);
  }
  CHECK(expected_begin == 1000);
  CHECK(ids.size() <= 4);
  // a last piece shorter than the others: 1005 items, 101 grains -> 51 pieces, the last of 5
  cs = chunks_of(qmem::exec::host{4}, 1005, 10, 1);
  std::sort(cs.begin(), cs.end(), [](chunk const& a, chunk const& b) { return a.begin < b.begin; });
  REQUIRE(cs.size() == 51);
  CHECK(cs.back().begin == 1000);
  CHECK(cs.back().end == 1005);
  // fewer grains than 16 per thread: one grain a piece
  cs = chunks_of(qmem::exec::host{4}, 100, 10, 1);
  CHECK(cs.size() == 10);
}

TEST_CASE("parallel_for: a thread that runs slower takes fewer pieces") {
  // 64 pieces of 50 items on 4 threads; the caller takes 2 ms per item, a worker 0.02 ms. With
  // one equal chunk per thread the caller would run 800 items (1.6 s); here the workers finish
  // the others while it runs its first piece (100 ms).
  std::mutex m;
  std::size_t on_caller = 0, total = 0;
  auto const caller = std::this_thread::get_id();
  qmem::detail::parallel_for(
      qmem::exec::host{4}, 3200, 10,
      [&](std::size_t b, std::size_t e) {
        bool const slow = std::this_thread::get_id() == caller;
        std::this_thread::sleep_for(std::chrono::microseconds((e - b) * (slow ? 2000 : 20)));
        std::lock_guard lock(m);
        on_caller += slow ? e - b : 0;
        total += e - b;
      },
      1);
  CHECK(total == 3200);
  CHECK(on_caller <= 200);
}

TEST_CASE("parallel_for: small problems run on the calling thread as one chunk") {
  // 1000 items with the default minimum of 65536 items per thread: one chunk, no thread started
  auto cs = chunks_of(qmem::exec::host{8}, 1000, 1, std::size_t{1} << 16);
  REQUIRE(cs.size() == 1);
  CHECK(cs[0].begin == 0);
  CHECK(cs[0].end == 1000);
  CHECK(cs[0].thread == std::this_thread::get_id());
  // never more threads than grains
  cs = chunks_of(qmem::exec::host{8}, 100, 50, 1);
  CHECK(cs.size() == 2);
  // n == 0: f is not called at all
  CHECK(chunks_of(qmem::exec::host{8}, 0, 1, 1).empty());
}

TEST_CASE("parallel_for: an exception in a piece reaches the caller after all pieces ran") {
  // 50 pieces of 20 items; two throw: the lowest one's exception is rethrown
  std::atomic<int> finished{0};
  auto body = [&](std::size_t b, std::size_t e) {
    if (b == 280 || b == 600)
      throw std::out_of_range("piece " + std::to_string(b) + ".." + std::to_string(e));
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    finished.fetch_add(1);
  };
  try {
    qmem::detail::parallel_for(qmem::exec::host{4}, 1000, 10, body, 1);
    FAIL("parallel_for did not rethrow");
  } catch (std::out_of_range const& e) {
    CHECK(std::string(e.what()) == "piece 280..300");
  }
  CHECK(finished.load() == 48); // every other piece completed: nothing is left running

  // on the calling thread (single chunk) the exception passes straight through
  CHECK_THROWS_AS(
      qmem::detail::parallel_for(qmem::exec::host{1}, 10, 1,
                                 [](std::size_t, std::size_t) { throw qmem::bad_argument("x"); }),
      qmem::bad_argument);
}

TEST_CASE("parallel_for: the pool grows to the threads asked for, and calls reuse it") {
  for (int call = 0; call < 50; ++call) {
    auto const again = chunks_of(qmem::exec::host{4}, 4000, 10, 1);
    std::size_t covered = 0;
    std::set<std::thread::id> threads;
    for (auto const& c : again) {
      covered += c.end - c.begin;
      threads.insert(c.thread);
    }
    CHECK(covered == 4000);
    CHECK(threads.size() <= 4);
  }
  // more threads than the pool had so far: it grows, and every index is still covered once
  std::mutex m;
  std::set<std::thread::id> threads;
  std::atomic<std::size_t> covered{0};
  qmem::detail::parallel_for(
      qmem::exec::host{12}, 12000, 10,
      [&](std::size_t b, std::size_t e) {
        std::this_thread::sleep_for(std::chrono::milliseconds(2)); // room for every thread
        covered.fetch_add(e - b);
        std::lock_guard lock(m);
        threads.insert(std::this_thread::get_id());
      },
      1);
  CHECK(covered.load() == 12000);
  CHECK(threads.size() > 1);
  CHECK(threads.size() <= 12);
}

TEST_CASE("parallel_for: a loop inside a loop's body, and loops from several threads at once") {
  // nested: the inner loops cannot have the pool (the outer one holds it) and start their own
  // threads; every inner index is seen exactly once per outer chunk
  std::atomic<std::size_t> inner{0};
  qmem::detail::parallel_for(
      qmem::exec::host{4}, 4, 1,
      [&](std::size_t b, std::size_t e) {
        for (std::size_t i = b; i < e; ++i)
          qmem::detail::parallel_for(
              qmem::exec::host{3}, 3000, 10,
              [&](std::size_t ib, std::size_t ie) { inner.fetch_add(ie - ib); }, 1);
      },
      1);
  CHECK(inner.load() == 4 * 3000);

  // four user threads, each running 200 loops: one holds the pool at a time, the others start
  // their own threads; every loop covers its range exactly once and none waits forever
  std::atomic<std::size_t> total{0};
  std::vector<std::thread> users;
  for (int u = 0; u < 4; ++u)
    users.emplace_back([&] {
      for (int k = 0; k < 200; ++k)
        qmem::detail::parallel_for(
            qmem::exec::host{3}, 999, 1,
            [&](std::size_t b, std::size_t e) { total.fetch_add(e - b); }, 1);
    });
  for (auto& u : users)
    u.join();
  CHECK(total.load() == std::size_t{4} * 200 * 999);
}

TEST_CASE("parallel_for: polling pool threads run every loop exactly once, whatever its threads") {
  // host_pool_spin_us > 0: workers that ran a loop poll for the next one and the caller polls for
  // the workers; back-to-back loops whose thread counts go up and down make workers sit loops out
  // and take part again, so a worker that read the wrong loop's thread count would run a piece
  // twice or never
  struct restore {
    unsigned spin = qmem::detail::host_pool_spin_us().load();
    ~restore() { qmem::detail::host_pool_spin_us().store(spin); }
  } const guard;
  CHECK(guard.spin == QMEM_HOST_SPIN_US); // the default, unless a test above changed it
  unsigned const counts[] = {8, 2, 8, 1, 5, 3, 8, 4};
  for (unsigned spin : {500u, 0u, 20u}) {
    qmem::detail::host_pool_spin_us().store(spin);
    std::size_t wrong = 0;
    for (int k = 0; k < 600; ++k) {
      std::size_t const n = 64 + static_cast<std::size_t>(k % 7);
      std::vector<std::atomic<int>> hits(n);
      qmem::detail::parallel_for(
          qmem::exec::host{counts[k % 8]}, n, 1,
          [&](std::size_t b, std::size_t e) {
            for (std::size_t i = b; i < e; ++i)
              hits[i].fetch_add(1, std::memory_order_relaxed);
          },
          1);
      for (auto& h : hits)
        wrong += h.load() != 1;
    }
    CAPTURE(spin);
    CHECK(wrong == 0);
  }
  // a loop from another thread while the pool is polling: it starts its own threads
  qmem::detail::host_pool_spin_us().store(500);
  std::atomic<std::size_t> total{0};
  std::thread other([&] {
    for (int k = 0; k < 100; ++k)
      qmem::detail::parallel_for(
          qmem::exec::host{3}, 999, 1,
          [&](std::size_t b, std::size_t e) { total.fetch_add(e - b); }, 1);
  });
  for (int k = 0; k < 100; ++k)
    qmem::detail::parallel_for(
        qmem::exec::host{4}, 999, 1, [&](std::size_t b, std::size_t e) { total.fetch_add(e - b); },
        1);
  other.join();
  CHECK(total.load() == std::size_t{200} * 999);
}

TEST_CASE("parallel_for: host_pieces_per_thread sets the number of pieces") {
  struct restore {
    std::size_t pieces = qmem::detail::host_pieces_per_thread().load();
    ~restore() { qmem::detail::host_pieces_per_thread().store(pieces); }
  } const guard;
  // 1000 grains of 1 on 4 threads: 4 * k pieces of 1000 / (4 * k) items (rounded up)
  for (std::size_t k : {1u, 4u, 16u, 64u}) {
    qmem::detail::host_pieces_per_thread().store(k);
    auto const cs = chunks_of(qmem::exec::host{4}, 1000, 1, 1);
    std::size_t const per = (1000 + 4 * k - 1) / (4 * k);
    CAPTURE(k);
    CHECK(cs.size() == (1000 + per - 1) / per);
  }
  qmem::detail::host_pieces_per_thread().store(0); // read as 1
  CHECK(chunks_of(qmem::exec::host{4}, 1000, 1, 1).size() == 4);
}

#if defined(__linux__)
TEST_CASE("parallel_for: a forked child, which has none of the pool's threads, still runs loops") {
  CHECK(chunks_of(qmem::exec::host{4}, 4000, 10, 1).size() > 1); // the pool exists here
  pid_t const child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) { // no doctest checks in the child: the exit status says it all
    std::atomic<std::size_t> sum{0};
    qmem::detail::parallel_for(
        qmem::exec::host{4}, 4000, 10, [&](std::size_t b, std::size_t e) { sum.fetch_add(e - b); },
        1);
    ::_exit(sum.load() == 4000 ? 0 : 1);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

// When the system refused a thread (address-space or thread limits), the loop threw
// std::system_error although the caller could run every piece, or, when some threads had started,
// let it unwind past joinable std::threads: std::terminate. Here a forked child (no pool: it
// starts its own threads) whose address space leaves room for about two thread stacks runs a
// loop of 8 threads.
TEST_CASE("parallel_for: a loop still runs when the system refuses some of its threads") {
  pid_t const child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) { // no doctest checks in the child: the exit status says it all
    long pages = 0;
    if (std::FILE* const f = std::fopen("/proc/self/statm", "r")) {
      if (std::fscanf(f, "%ld", &pages) != 1)
        pages = 0;
      std::fclose(f);
    }
    pthread_attr_t attr;
    std::size_t stack = 0;
    if (pages <= 0 || ::pthread_getattr_default_np(&attr) != 0 ||
        ::pthread_attr_getstacksize(&attr, &stack) != 0)
      ::_exit(2);
    ::pthread_attr_destroy(&attr);
    auto const used = static_cast<rlim_t>(pages) * static_cast<rlim_t>(::sysconf(_SC_PAGESIZE));
    rlim_t const room = used + 2 * stack + stack / 2; // two or three more threads, not seven
    rlimit const limit{room, room};
    if (::setrlimit(RLIMIT_AS, &limit) != 0)
      ::_exit(3);
    std::atomic<std::size_t> sum{0};
    try {
      qmem::detail::parallel_for(
          qmem::exec::host{8}, 8000, 10,
          [&](std::size_t b, std::size_t e) { sum.fetch_add(e - b); }, 1);
    } catch (...) {
      ::_exit(4);
    }
    ::_exit(sum.load() == 8000 ? 0 : 1);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status)); // not killed by std::terminate's SIGABRT
  CHECK(WEXITSTATUS(status) == 0);
}
#endif
