#pragma once
//! \file
//! The I/O layer: safetensors read/write and bitsandbytes checkpoint interop.
//! Needs nlohmann-json 3 (Debian: nlohmann-json3-dev; CMake: nlohmann_json::nlohmann_json); the
//! other layers do not, and `qmem.hpp` includes this layer only when the header is available.

#include <qmem/core.hpp>
#include <qmem/io/bnb.hpp>
#include <qmem/io/bnb_int8.hpp>
#include <qmem/io/safetensors.hpp>
