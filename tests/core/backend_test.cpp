// The test-backend harness itself: upload/download round-trip on every backend.
#include <numeric>

#include "support/backend.hpp"

TEST_CASE_TEMPLATE_DEFINE("backend upload/download round-trip", B, backend_roundtrip) {
  if (qmem::test::skip<B>())
    return;
  std::vector<float> v(1000);
  std::iota(v.begin(), v.end(), -3.5f);
  auto d = B::upload(v);
  CHECK(B::download(d.view()) == v);
  auto a = B::template alloc<int>(7);
  CHECK(a.view().size() == 7);
}
TEST_CASE_TEMPLATE_APPLY(backend_roundtrip, qmem::test::backends);
