#pragma once
//! \file
//! qmem: quantized storage, low-bit optimizers and memory planning for any C++ framework.
//! Including this header brings in every layer; each layer can also be included alone.

#include <qmem/core.hpp>
#include <qmem/memory.hpp>
#include <qmem/quant.hpp>
