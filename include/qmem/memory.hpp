#pragma once
//! \file
//! The memory layer: memory resources and owning buffers (tracking, paging, offload and the
//! estimator join this layer as they land).

#include <qmem/core.hpp>
#include <qmem/memory/resource.hpp>

// CUDA translation units also get the CUDA memory resources (device pool, pinned, managed);
// the Thrust adapters are opt-in (<qmem/memory/cuda_thrust.cuh>): Thrust's headers are heavy.
#if QMEM_HAS_CUDA()
#include <qmem/memory/cuda_resource.cuh>
#endif
