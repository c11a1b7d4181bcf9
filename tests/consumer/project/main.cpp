// A user program: includes all of qmem and uses the core and memory layers through the public
// headers only. Prints "qmem consumer: ok" when every check holds, else names the failed check
// and exits with 1.
#include <qmem/qmem.hpp>

#include <array>
#include <cstdio>
#include <numeric>
#include <vector>

namespace {
int failures = 0;
void expect(bool ok, char const* what) {
  if (!ok) {
    std::printf("qmem consumer: FAILED: %s\n", what);
    ++failures;
  }
}
} // namespace

int main() {
  std::vector<float> values(1000);
  std::iota(values.begin(), values.end(), -500.0f);
  static_assert(qmem::tensor_like<std::vector<float>>);
  auto const v = qmem::view(values);
  expect(v.size() == 1000 && v.data() == values.data(), "view of a std::vector");
  expect(v.subview(10, 5)[0] == -490.0f, "subview");

  qmem::memory::buffer<qmem::bf16> b(values.size());
  for (std::size_t i = 0; i < values.size(); ++i)
    b[i] = qmem::bf16(values[i]);
  expect(static_cast<float>(b[100]) == -400.0f, "bf16 keeps -400 exactly");
  expect(static_cast<float>(b[7]) == -492.0f, "bf16 rounds the tie -493 to even (-492)");
  expect(qmem::f16(65520.0f).bits == 0x7c00, "f16 overflow rounds to infinity");

  bool threw = false;
  try {
    (void)v.subview(999, 2);
  } catch (qmem::bad_argument const&) {
    threw = true;
  }
  expect(threw, "out-of-range subview throws qmem::bad_argument");

  if (failures != 0)
    return 1;
  std::printf("qmem consumer: ok (qmem %d.%d.%d)\n", QMEM_VERSION_MAJOR, QMEM_VERSION_MINOR,
              QMEM_VERSION_PATCH);
  return 0;
}
