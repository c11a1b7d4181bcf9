#pragma once
//! \file
//! The quantization layer: code tables, code types, formats, quantize/dequantize, the owning
//! quantized tensor.

#include <qmem/core.hpp>
#include <qmem/memory.hpp>
#include <qmem/quant/blockwise.hpp>
#include <qmem/quant/code_table.hpp>
#include <qmem/quant/codes.hpp>
#include <qmem/quant/double_quant.hpp>
#include <qmem/quant/format.hpp>
#include <qmem/quant/matmul.hpp>
#include <qmem/quant/quantized_tensor.hpp>
#include <qmem/quant/rowwise.hpp>
#include <qmem/quant/stochastic.hpp>
