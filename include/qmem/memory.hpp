#pragma once
//! \file
//! The memory layer: memory resources and owning buffers (tracking, paging, offload and the
//! estimator join this layer as they land).

#include <qmem/core.hpp>
#include <qmem/memory/resource.hpp>
