#pragma once
//! \file
//! qmem: quantized storage, low-bit optimizers and memory planning for any C++ framework.
//! Including this header brings in every layer; each layer can also be included alone.

#include <qmem/core.hpp>
#include <qmem/memory.hpp>
#include <qmem/quant.hpp>
// The I/O layer needs nlohmann-json; it is included here only where that header is available
// (include <qmem/io.hpp> directly to require it).
#if defined(__has_include) && __has_include(<nlohmann/json.hpp>)
#include <qmem/io.hpp>
#endif
#include <qmem/optim.hpp>
