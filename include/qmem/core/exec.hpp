#pragma once
//! \file
//! Execution objects: the first argument of every public algorithm says where it runs.
//! `exec::host{}` runs on the calling thread plus worker threads; `exec::cuda{stream, device}`
//! enqueues on a CUDA stream of a given device, never the "current" device or the default stream
//! unless the caller passes them. The per-call algorithms (quantization, matmuls, an optimizer's
//! step) never wait for the device; set-up calls that copy host-side data to or from it (a CUDA
//! optimizer's construction, add_param, state copies) may wait for the stream, and say so.
//! The CUDA object is declared here (no CUDA headers needed) so host code can carry it; the
//! kernels that accept it exist only in CUDA translation units.

#include <qmem/core/config.hpp>
#include <qmem/core/error.hpp>
#include <qmem/core/memory_space.hpp>

#include <concepts>
#include <cstddef>
#include <type_traits>

// The CUDA runtime's stream handle type is `CUstream_st*`; declaring the struct lets host-only
// translation units hold streams without including CUDA headers.
struct CUstream_st;

namespace qmem::exec {

//! Run on the host. `threads` is the number of threads to use, 0 meaning one per CPU the process
//! may run on (its affinity mask on Linux); small problems run on the calling thread alone
//! whatever this says.
struct host {
  unsigned threads = 0;
};

//! Run on a CUDA device, stream-ordered on `stream` (nullptr: the legacy default stream of
//! `device`). `device` is the ordinal the stream belongs to; kernels launch there.
//! `sync_after_launch` synchronizes the stream after every launch and checks for errors, to
//! localize a fault (a debugging aid: off by default). Not for a stream being captured into a
//! graph: CUDA refuses the synchronization there (cudaErrorStreamCaptureUnsupported, thrown as a
//! cuda_error naming the kernel) and the capture is invalidated.
struct cuda {
  CUstream_st* stream = nullptr;
  int device = 0;
  bool sync_after_launch = false;
};

//! An execution object qmem algorithms accept.
template <class E>
concept execution =
    std::same_as<std::remove_cvref_t<E>, host> || std::same_as<std::remove_cvref_t<E>, cuda>;

template <class E>
inline constexpr bool is_host_v = std::same_as<std::remove_cvref_t<E>, host>;
template <class E>
inline constexpr bool is_cuda_v = std::same_as<std::remove_cvref_t<E>, cuda>;

} // namespace qmem::exec
