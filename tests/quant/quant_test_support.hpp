#pragma once
// Support for the quant tests: the backends they run on, test data, and bitwise comparisons.
// In a CUDA build the GPU backend is included only when the CUDA kernels of the quant layer are
// present (quant/cuda/blockwise.cuh); otherwise a test case says so visibly.
#include <qmem/quant.hpp>

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "support/backend.hpp"

namespace qmem::test {

#if QMEM_HAS_CUDA() && QMEM_QUANT_HAS_CUDA_BLOCKWISE
using quant_backends = backends;
#else
using quant_backends = std::tuple<host_backend>;
#endif

//! n samples of N(0, 1) in float from a fixed seed (Box-Muller over mt19937, same on every
//! platform, unlike std::normal_distribution).
inline std::vector<float> normal_floats(std::size_t n, std::uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; i += 2) {
    double const u1 = (static_cast<double>(g()) + 1.0) / 4294967297.0;
    double const u2 = static_cast<double>(g()) / 4294967296.0;
    double const r = std::sqrt(-2.0 * std::log(u1));
    v[i] = static_cast<float>(r * std::cos(6.283185307179586 * u2));
    if (i + 1 < n)
      v[i + 1] = static_cast<float>(r * std::sin(6.283185307179586 * u2));
  }
  return v;
}

template <class T>
std::vector<T> convert(std::vector<float> const& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i)
    out[i] = from_float<T>(v[i]);
  return out;
}

//! Bitwise equality of two arrays of trivially copyable values (NaN == NaN with the same bits).
template <class T>
bool same_bits(std::vector<T> const& a, std::vector<T> const& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

} // namespace qmem::test

#if QMEM_HAS_CUDA() && !QMEM_QUANT_HAS_CUDA_BLOCKWISE
TEST_CASE("quant: CUDA kernels present") {
  MESSAGE("SKIPPED on cuda: quant/cuda/blockwise.cuh is not in this tree; the quant tests run on "
          "the host only");
}
#endif
