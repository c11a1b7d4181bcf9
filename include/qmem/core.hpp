#pragma once
//! \file
//! The core layer: configuration, errors, numeric types, memory spaces, tensor concepts and views,
//! execution objects.

#include <qmem/core/config.hpp>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/fmath.hpp>
#include <qmem/core/memory_space.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
