// Configuration macros: the CUDA detection agrees with the compiler, the annotations expand so
// that element-level code is usable on the host (and in constant expressions), and a macro defined
// before the first include overrides qmem's default (here QMEM_DEBUG, which turns QMEM_ASSERT on).
#define QMEM_DEBUG 1
#include <qmem/core.hpp>

#include <doctest/doctest.h>

#include <string>

#if defined(__CUDACC__)
static_assert(QMEM_HAS_CUDA() == 1, "a CUDA compiler must enable the CUDA backend");
static_assert(QMEM_HAS_CUDA_RUNTIME() == 1);
#else
static_assert(QMEM_HAS_CUDA() == 0, "a host compiler must not see the CUDA backend");
#endif
static_assert(QMEM_VERSION_MAJOR == 0 && QMEM_VERSION_MINOR == 1);

namespace {

// Element-level code as the library writes it: usable on the host, in kernels and at compile time.
QMEM_HOST_DEVICE QMEM_INLINE constexpr int sum_of_squares(int n) noexcept {
  int s = 0;
  QMEM_UNROLL
  for (int i = 1; i <= n; ++i)
    s += i * i;
  return s;
}
static_assert(sum_of_squares(4) == 30);

int checked_half(int x) {
  QMEM_ASSERT(x % 2 == 0);
  return x / 2;
}

} // namespace

TEST_CASE("QMEM_DEBUG defined before the include turns QMEM_ASSERT on") {
  CHECK(QMEM_DEBUG == 1);
  CHECK(checked_half(8) == 4);
  try {
    (void)checked_half(7);
    FAIL("QMEM_ASSERT did not fire");
  } catch (qmem::error const& e) {
    std::string const what = e.what();
    CHECK(what.find("config_test.cpp") != std::string::npos);
    CHECK(what.find("internal check failed: x % 2 == 0") != std::string::npos);
  }
}

TEST_CASE("element-level annotations compile to ordinary host functions here") {
  int const n = 10;
  CHECK(sum_of_squares(n) == 385);
}
