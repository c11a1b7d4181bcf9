#pragma once
// What the host optimizer tests share.
#include <cstddef>
#include <random>
#include <vector>

namespace qmem::test {

//! n normally distributed floats with standard deviation `scale`, reproducible from `seed`.
inline std::vector<float> randn(std::size_t n, float scale, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v)
    x = d(rng);
  return v;
}

} // namespace qmem::test
