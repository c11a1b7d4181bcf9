#pragma once
//! \file
//! The optimizer layer: update rules as element-wise functors, state policies (fp32, bf16,
//! 8-bit and 4-bit blockwise, any quantization format), and the optimizer binding rule x state x
//! parameters with the host backend, clipping, schedules and save/resume.

#include <qmem/core.hpp>
#include <qmem/memory.hpp>
#include <qmem/optim/optimizer.hpp>
#include <qmem/optim/rule.hpp>
#include <qmem/optim/rules.hpp>
#include <qmem/optim/schedule.hpp>
#include <qmem/optim/state.hpp>
#include <qmem/quant.hpp>

// Save/resume needs qmem/io (nlohmann-json); included here only where that header is available
// (include <qmem/optim/checkpoint.hpp> directly to require it).
#if defined(__has_include) && __has_include(<nlohmann/json.hpp>)
#include <qmem/optim/checkpoint.hpp>
#endif
