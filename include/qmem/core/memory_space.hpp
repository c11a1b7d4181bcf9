#pragma once
//! \file
//! Where a tensor's bytes live, and who may touch them.

#include <qmem/core/config.hpp>

#include <cstdint>
#include <string_view>

namespace qmem {

//! The memory space of a buffer. Algorithms check that the execution object can reach it:
//! `exec::host` needs host-accessible memory, `exec::cuda` device-accessible memory.
enum class memory_space : std::uint8_t {
  host,    //!< pageable host memory (new, malloc, std::vector)
  pinned,  //!< page-locked host memory (cudaHostAlloc): host-accessible, and mapped for the device
  device,  //!< device memory (cudaMalloc, cudaMallocAsync): device only
  managed, //!< unified memory (cudaMallocManaged): both, migrated on demand
};

//! True when host code may dereference memory of this space.
constexpr bool host_accessible(memory_space s) noexcept { return s != memory_space::device; }

//! True when device code may dereference memory of this space. Pinned host memory counts as
//! device-accessible (mapped, over the interconnect; slow for bulk work).
constexpr bool device_accessible(memory_space s) noexcept { return s != memory_space::host; }

constexpr std::string_view to_string(memory_space s) noexcept {
  switch (s) {
  case memory_space::host: return "host";
  case memory_space::pinned: return "pinned";
  case memory_space::device: return "device";
  case memory_space::managed: return "managed";
  }
  return "?";
}

} // namespace qmem
