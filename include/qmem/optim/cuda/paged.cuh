#pragma once
//! \file
//! Paged optimizer state on the GPU: state storage in unified memory, moved by explicit
//! prefetches ahead of use and evictions behind it, so that a state larger than the device memory
//! left to it is a planned path, not a thrash.
//!
//! - `paged_state_resource` hands out the state storage. Where the device has concurrent managed
//!   access (`cudaDevAttrConcurrentManagedAccess`) it is unified memory (cudaMallocManaged).
//!   Elsewhere it falls back cleanly: device memory while a byte budget lasts, then page-locked
//!   mapped host memory that the kernels read over the interconnect (slow, but it never faults).
//! - `pager<Group>` runs a group's step. When the group's state fits in the budget it prefetches
//!   it once and then steps exactly like the unpaged group (one launch). When it does not, the
//!   update runs in windows of consecutive tasks whose state fits a third of the budget: on a side
//!   stream, window w+1 is prefetched while window w updates, and window w is evicted to the host
//!   once its update is done (events order the two streams). Counters report the bytes asked to
//!   migrate each way.
//!
//! A paged step is not graph-capturable when it pages (prefetches are host-enqueued per window);
//! the resident case is, after its first step.

#include <qmem/core/cuda/runtime.cuh>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/memory/resource.hpp>
#include <qmem/optim/cuda/multi_tensor.cuh>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace qmem::optim::cuda {

//! What a device offers for paging.
struct paging_support {
  bool managed_memory = false;            //!< cudaMallocManaged works
  bool concurrent_managed_access = false; //!< prefetch/advise and GPU page faults work
};

//! Queries `device` (cudaDeviceGetAttribute).
inline paging_support query_paging_support(int device) {
  int managed = 0;
  int concurrent = 0;
  cuda_detail::check(cudaDeviceGetAttribute(&managed, cudaDevAttrManagedMemory, device),
                     "cudaDeviceGetAttribute(ManagedMemory)");
  cuda_detail::check(
      cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, device),
      "cudaDeviceGetAttribute(ConcurrentManagedAccess)");
  return {managed != 0, managed != 0 && concurrent != 0};
}

//! Storage for paged optimizer state (see the file comment). Thread-safe.
class paged_state_resource final : public memory::resource {
  enum class kind : std::uint8_t { managed, device, pinned };
  int device_ = 0;
  bool unified_ = false;
  std::size_t device_budget_ = 0;
  std::size_t device_bytes_ = 0;
  std::size_t managed_bytes_ = 0;
  std::size_t pinned_bytes_ = 0;
  std::unordered_map<void*, std::pair<kind, std::size_t>> live_;
  mutable std::mutex mutex_;

public:
  //! State storage for `device`. `device_budget` is the device memory the fallback may use before
  //! it turns to pinned host memory (unused in unified mode). `force_fallback` takes the fallback
  //! even where unified memory would work (tests, or where migration is slow).
  explicit paged_state_resource(int device, std::size_t device_budget, bool force_fallback = false)
      : device_(device), device_budget_(device_budget) {
    QMEM_EXPECTS(device >= 0, "device is ", device, "; expected a device ordinal >= 0");
    unified_ = !force_fallback && query_paging_support(device).concurrent_managed_access;
  }
  paged_state_resource(paged_state_resource const&) = delete;
  paged_state_resource& operator=(paged_state_resource const&) = delete;
  ~paged_state_resource() override = default;

  //! True when the storage is unified memory (prefetch and eviction apply).
  [[nodiscard]] bool unified() const noexcept { return unified_; }
  [[nodiscard]] int device() const noexcept { return device_; }
  //! Bytes handed out, by kind.
  [[nodiscard]] std::size_t managed_bytes() const {
    std::lock_guard lock(mutex_);
    return managed_bytes_;
  }
  [[nodiscard]] std::size_t fallback_device_bytes() const {
    std::lock_guard lock(mutex_);
    return device_bytes_;
  }
  [[nodiscard]] std::size_t fallback_pinned_bytes() const {
    std::lock_guard lock(mutex_);
    return pinned_bytes_;
  }
  //! Managed when unified; otherwise device (the kernels' view: device-accessible storage).
  [[nodiscard]] memory_space space() const noexcept override {
    return unified_ ? memory_space::managed : memory_space::device;
  }

private:
  void* do_allocate(std::size_t bytes, std::size_t alignment, memory::category) override {
    QMEM_EXPECTS(alignment <= 256, "alignment ", alignment, " is above the 256 bytes CUDA ",
                 "allocations guarantee");
    std::size_t const n = bytes == 0 ? 1 : bytes;
    std::lock_guard lock(mutex_);
    cuda_detail::device_guard guard(device_);
    void* p = nullptr;
    kind k = kind::managed;
    if (unified_) {
      cuda_detail::check(cudaMallocManaged(&p, n, cudaMemAttachGlobal), "cudaMallocManaged");
    } else if (device_bytes_ + n <= device_budget_) {
      cuda_detail::check(cudaMalloc(&p, n), "cudaMalloc(paged state fallback)");
      k = kind::device;
    } else {
      cuda_detail::check(cudaHostAlloc(&p, n, cudaHostAllocPortable | cudaHostAllocMapped),
                         "cudaHostAlloc(paged state fallback)");
      k = kind::pinned;
    }
    // until the allocation is recorded, a throw (the advice refused, the map out of memory)
    // frees it: the caller never sees the pointer
    try {
      if (k == kind::managed) {
        cudaMemLocation const loc{cudaMemLocationTypeDevice, device_};
        // the device reads pages wherever they are rather than faulting them in one by one
        cuda_detail::check(cudaMemAdvise(p, n, cudaMemAdviseSetAccessedBy, loc),
                           "cudaMemAdvise(AccessedBy)");
      }
      live_.emplace(p, std::pair{k, n});
    } catch (...) {
      release(p, k);
      throw;
    }
    bytes_of(k) += n;
    return p;
  }
  void do_deallocate(void* p, std::size_t, std::size_t, memory::category) noexcept override {
    std::lock_guard lock(mutex_);
    auto const it = live_.find(p);
    if (it == live_.end())
      return;
    auto const [k, n] = it->second;
    live_.erase(it);
    release(p, k);
    bytes_of(k) -= n;
  }
  static void release(void* p, kind k) noexcept {
    if (k == kind::pinned)
      (void)cudaFreeHost(p);
    else
      (void)cudaFree(p);
  }
  std::size_t& bytes_of(kind k) noexcept {
    return k == kind::managed ? managed_bytes_ : k == kind::device ? device_bytes_ : pinned_bytes_;
  }
};

//! Bytes a pager asked to migrate.
struct paging_counters {
  std::uint64_t prefetched_bytes = 0; //!< host -> device
  std::uint64_t evicted_bytes = 0;    //!< device -> host
  std::uint64_t prefetch_calls = 0;
  std::uint64_t windows = 0; //!< update windows launched
};

//! Runs the steps of a multi_tensor_step group whose state lives in paged_state_resource storage
//! (see the file comment). Not copyable.
template <class Group>
class pager {
  struct range {
    void const* ptr;
    std::size_t bytes;
  };
  struct window {
    std::uint64_t task_begin = 0;
    std::uint64_t task_end = 0;
    std::size_t bytes = 0;
    std::vector<range> ranges;
  };
  Group* group_;
  int device_ = 0;
  bool unified_ = false;
  bool oversubscribed_ = false;
  bool resident_ = false;
  std::size_t budget_ = 0;
  std::size_t total_bytes_ = 0;
  std::vector<window> windows_;
  cudaStream_t side_ = nullptr;
  std::vector<cudaEvent_t> ready_;
  std::vector<cudaEvent_t> done_;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t side_done_ = nullptr;
  paging_counters counters_;

public:
  //! A pager for `group`, whose states were allocated from `storage`; `device_budget` is the
  //! device memory the states may occupy at once (the rest stays on the host). Precondition: a
  //! third of the budget holds the state of one task of every tensor (bad_argument otherwise).
  pager(Group& group, paged_state_resource const& storage, std::size_t device_budget)
      : group_(&group), device_(storage.device()), unified_(storage.unified()),
        budget_(device_budget) {
    using traits = typename Group::traits;
    constexpr std::size_t B = Group::task_elements;
    // the state bytes of one task of each tensor, and the ranges of a task range
    auto ranges_of = [&](std::size_t i, std::uint64_t t0, std::uint64_t t1, window& w) {
      auto const& t = group.tensor_at(i);
      std::uint64_t const first = group.first_task(i);
      std::uint64_t const e0 = (t0 - first) * B;
      std::uint64_t const e1 = std::min<std::uint64_t>((t1 - first) * B, t.size);
      detail::for_each_state_host<traits::state_count>([&](auto J) {
        using F = typename traits::template format<J.value>;
        auto const* base = static_cast<std::uint8_t const*>(t.state[J.value]);
        std::size_t const b0 = F::bytes(e0);
        std::size_t const b1 = F::bytes(e1);
        w.ranges.push_back({base + b0, b1 - b0});
        w.bytes += b1 - b0;
        if constexpr (F::blockwise) {
          std::size_t const a0 = F::scale_count(e0);
          std::size_t const a1 = F::scale_count(e1);
          w.ranges.push_back({t.absmax[J.value] + a0, (a1 - a0) * sizeof(float)});
          w.bytes += (a1 - a0) * sizeof(float);
        }
      });
    };
    for (std::size_t i = 0; i < group.tensor_count(); ++i)
      total_bytes_ += group.state_bytes(i);
    oversubscribed_ = total_bytes_ > budget_;
    std::size_t const window_bytes = oversubscribed_ ? budget_ / 3 : total_bytes_;
    // cut windows at task granularity
    window cur;
    for (std::size_t i = 0; i < group.tensor_count(); ++i) {
      std::uint64_t const t_begin = group.first_task(i);
      std::uint64_t const t_end = group.first_task(i + 1);
      if (t_begin == t_end)
        continue;
      std::uint64_t const tasks = t_end - t_begin;
      std::size_t const per_task = (group.state_bytes(i) + tasks - 1) / tasks;
      QMEM_EXPECTS(per_task <= window_bytes, "device_budget ", device_budget, " leaves windows of ",
                   window_bytes, " bytes; tensor ", i, " needs ", per_task, " bytes per task of ",
                   B, " elements");
      std::uint64_t t = t_begin;
      while (t < t_end) {
        std::size_t const room = window_bytes - cur.bytes;
        std::uint64_t take = std::min<std::uint64_t>(t_end - t, room / per_task);
        if (take == 0) {
          windows_.push_back(std::move(cur));
          cur = window{};
          continue;
        }
        if (cur.ranges.empty())
          cur.task_begin = t;
        window part;
        ranges_of(i, t, t + take, part);
        cur.bytes += part.bytes;
        cur.ranges.insert(cur.ranges.end(), part.ranges.begin(), part.ranges.end());
        t += take;
        cur.task_end = t;
      }
    }
    if (!cur.ranges.empty())
      windows_.push_back(std::move(cur));
    cuda_detail::device_guard guard(device_);
    cuda_detail::check(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking),
                       "cudaStreamCreateWithFlags");
    auto make_event = [] {
      cudaEvent_t ev = nullptr;
      cuda_detail::check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming),
                         "cudaEventCreateWithFlags");
      return ev;
    };
    start_ = make_event();
    side_done_ = make_event();
    for (std::size_t w = 0; w < windows_.size(); ++w) {
      ready_.push_back(make_event());
      done_.push_back(make_event());
    }
  }
  pager(pager const&) = delete;
  pager& operator=(pager const&) = delete;
  ~pager() {
    for (auto ev : ready_)
      (void)cudaEventDestroy(ev);
    for (auto ev : done_)
      (void)cudaEventDestroy(ev);
    if (start_ != nullptr)
      (void)cudaEventDestroy(start_);
    if (side_done_ != nullptr)
      (void)cudaEventDestroy(side_done_);
    if (side_ != nullptr)
      (void)cudaStreamDestroy(side_);
  }

  //! One optimizer step of the group (norm, resolve, prepare, then the paged update).
  void step(exec::cuda const& e) {
    group_->accumulate_norm(e);
    group_->controller().resolve(e);
    group_->prepare(e);
    update(e);
  }

  //! The update of every window with prefetch ahead and eviction behind (after prepare()).
  void update(exec::cuda const& e) {
    cuda_detail::device_guard guard(device_);
    if (!unified_) { // fallback storage: nothing migrates
      group_->update(e);
      counters_.windows += 1;
      return;
    }
    if (!oversubscribed_) {
      if (!resident_) {
        for (auto const& w : windows_)
          prefetch(w, e.stream, true);
        resident_ = true;
      }
      group_->update(e);
      counters_.windows += 1;
      return;
    }
    cuda_detail::check(cudaEventRecord(start_, e.stream), "cudaEventRecord");
    cuda_detail::check(cudaStreamWaitEvent(side_, start_, 0), "cudaStreamWaitEvent");
    prefetch(windows_[0], side_, true);
    cuda_detail::check(cudaEventRecord(ready_[0], side_), "cudaEventRecord");
    for (std::size_t w = 0; w < windows_.size(); ++w) {
      cuda_detail::check(cudaStreamWaitEvent(e.stream, ready_[w], 0), "cudaStreamWaitEvent");
      group_->update(e, windows_[w].task_begin, windows_[w].task_end);
      counters_.windows += 1;
      cuda_detail::check(cudaEventRecord(done_[w], e.stream), "cudaEventRecord");
      if (w + 1 < windows_.size()) { // overlaps the update of window w
        prefetch(windows_[w + 1], side_, true);
        cuda_detail::check(cudaEventRecord(ready_[w + 1], side_), "cudaEventRecord");
      }
      cuda_detail::check(cudaStreamWaitEvent(side_, done_[w], 0), "cudaStreamWaitEvent");
      prefetch(windows_[w], side_, false); // evict behind
    }
    cuda_detail::check(cudaEventRecord(side_done_, side_), "cudaEventRecord");
    cuda_detail::check(cudaStreamWaitEvent(e.stream, side_done_, 0), "cudaStreamWaitEvent");
  }

  [[nodiscard]] paging_counters const& counters() const noexcept { return counters_; }
  [[nodiscard]] bool unified() const noexcept { return unified_; }
  [[nodiscard]] bool oversubscribed() const noexcept { return oversubscribed_; }
  [[nodiscard]] std::size_t window_count() const noexcept { return windows_.size(); }
  [[nodiscard]] std::size_t state_bytes() const noexcept { return total_bytes_; }

private:
  void prefetch(window const& w, cudaStream_t stream, bool to_device) {
    cudaMemLocation const loc = to_device ? cudaMemLocation{cudaMemLocationTypeDevice, device_}
                                          : cudaMemLocation{cudaMemLocationTypeHost, 0};
    for (auto const& r : w.ranges) {
      if (r.bytes == 0)
        continue;
      cuda_detail::check(cudaMemPrefetchAsync(r.ptr, r.bytes, loc, 0, stream),
                         to_device ? "cudaMemPrefetchAsync(to device)"
                                   : "cudaMemPrefetchAsync(to host)");
      counters_.prefetch_calls += 1;
      (to_device ? counters_.prefetched_bytes : counters_.evicted_bytes) += r.bytes;
    }
  }
};

} // namespace qmem::optim::cuda
