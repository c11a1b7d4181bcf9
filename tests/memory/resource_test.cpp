// Memory resources and buffer<T>: alignment and the alignment precondition of host_resource, a
// user resource seeing exactly the allocate/deallocate pairs buffer makes (sizes, alignment,
// category, moves), buffer's view and tensor-likeness, and the overflow check that allocates
// nothing.
#include <qmem/memory.hpp>

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// A user resource in pinned memory that forwards to the host resource and logs every call.
class logging_resource final : public qmem::memory::resource {
public:
  struct call {
    bool allocate;
    std::size_t bytes, alignment;
    qmem::memory::category cat;
    void* p;
  };
  std::vector<call> calls;
  std::size_t live = 0;

  [[nodiscard]] qmem::memory_space space() const noexcept override {
    return qmem::memory_space::pinned;
  }

private:
  void* do_allocate(std::size_t bytes, std::size_t alignment, qmem::memory::category c) override {
    void* p = qmem::memory::default_host_resource().allocate(bytes, alignment, c);
    calls.push_back({true, bytes, alignment, c, p});
    ++live;
    return p;
  }
  void do_deallocate(void* p, std::size_t bytes, std::size_t alignment,
                     qmem::memory::category c) noexcept override {
    calls.push_back({false, bytes, alignment, c, p});
    --live;
    qmem::memory::default_host_resource().deallocate(p, bytes, alignment, c);
  }
};

} // namespace

TEST_CASE("host_resource: aligned storage, zero bytes, null deallocate, bad alignment") {
  auto& r = qmem::memory::default_host_resource();
  CHECK(&r == &qmem::memory::default_host_resource()); // one per process
  CHECK(r.space() == qmem::memory_space::host);
  for (std::size_t alignment : {1u, 8u, 64u, 256u, 4096u}) {
    void* p = r.allocate(1000, alignment);
    REQUIRE(p != nullptr);
    CHECK(reinterpret_cast<std::uintptr_t>(p) % alignment == 0);
    static_cast<unsigned char*>(p)[999] = 1; // all 1000 bytes are usable
    r.deallocate(p, 1000, alignment);
  }
  void* z = r.allocate(0);
  CHECK(z != nullptr);
  r.deallocate(z, 0);
  r.deallocate(nullptr, 10); // no-op

  for (std::size_t bad : {0u, 3u, 48u}) {
    CAPTURE(bad);
    try {
      (void)r.allocate(16, bad);
      FAIL("no exception");
    } catch (qmem::bad_argument const& e) {
      CHECK(std::string(e.what()) ==
            "allocate: alignment " + std::to_string(bad) + " is not a power of two");
    }
  }
}

TEST_CASE("buffer: allocates once from its resource and gives back exactly that") {
  logging_resource r;
  {
    qmem::memory::buffer<float> b(100, r, qmem::memory::category::optimizer_state);
    CHECK(b.size() == 100);
    CHECK(b.size_bytes() == 400);
    CHECK_FALSE(b.empty());
    CHECK(b.space() == qmem::memory_space::pinned);
    CHECK(b.get_resource() == &r);
    CHECK(reinterpret_cast<std::uintptr_t>(b.data()) % 256 == 0);
    REQUIRE(r.calls.size() == 1);
    CHECK(r.calls[0].allocate);
    CHECK(r.calls[0].bytes == 400);
    CHECK(r.calls[0].alignment == 256);
    CHECK(r.calls[0].cat == qmem::memory::category::optimizer_state);
    CHECK(r.calls[0].p == b.data());
  }
  REQUIRE(r.calls.size() == 2);
  CHECK_FALSE(r.calls[1].allocate);
  CHECK(r.calls[1].p == r.calls[0].p);
  CHECK(r.calls[1].bytes == 400);
  CHECK(r.calls[1].alignment == 256);
  CHECK(r.calls[1].cat == qmem::memory::category::optimizer_state);
  CHECK(r.live == 0);
}

TEST_CASE("buffer: moves transfer ownership; assignment frees what was held") {
  logging_resource r;
  qmem::memory::buffer<std::uint8_t> a(64, r, qmem::memory::category::weights);
  auto* const pa = a.data();
  qmem::memory::buffer<std::uint8_t> b(std::move(a));
  CHECK(b.data() == pa);
  CHECK(b.size() == 64);
  CHECK(a.data() == nullptr); // NOLINT(bugprone-use-after-move): the moved-from state is specified
  CHECK(a.size() == 0);
  CHECK(a.empty());
  CHECK(r.live == 1);

  qmem::memory::buffer<std::uint8_t> c(32, r);
  c = std::move(b); // frees c's 32 bytes, takes b's 64
  CHECK(r.live == 1);
  CHECK(c.data() == pa);
  CHECK(c.size() == 64);
  REQUIRE(r.calls.size() == 3);
  CHECK_FALSE(r.calls[2].allocate);
  CHECK(r.calls[2].bytes == 32);

  c.reset();
  CHECK(c.empty());
  CHECK(r.live == 0);
  c.reset(); // twice is harmless
  CHECK(r.calls.size() == 4);
}

TEST_CASE("buffer: views, element access, tensor-likeness; default buffer is empty host") {
  qmem::memory::buffer<std::int32_t> b(10);
  for (std::size_t i = 0; i < b.size(); ++i)
    b[i] = static_cast<std::int32_t>(i * i);
  auto const v = b.view();
  static_assert(std::same_as<decltype(v), qmem::tensor_view<std::int32_t> const>);
  CHECK(v.data() == b.data());
  CHECK(v.size() == 10);
  CHECK(v[9] == 81);
  static_assert(
      std::same_as<decltype(std::as_const(b).view()), qmem::tensor_view<std::int32_t const>>);
  auto const g = qmem::view(b); // through tensor_traits<buffer<T>>
  CHECK(g.data() == b.data());
  CHECK(g.space() == qmem::memory_space::host);

  qmem::memory::buffer<float> empty;
  CHECK(empty.empty());
  CHECK(empty.data() == nullptr);
  CHECK(empty.get_resource() == nullptr);
  CHECK(empty.space() == qmem::memory_space::host);
}

TEST_CASE("buffer: a byte count that overflows is refused before allocating") {
  logging_resource r;
  auto const huge = static_cast<std::size_t>(-1) / sizeof(double) + 1;
  try {
    qmem::memory::buffer<double> b(huge, r);
    FAIL("no exception");
  } catch (qmem::bad_argument const& e) {
    CHECK(std::string(e.what()).find("overflows the byte count") != std::string::npos);
  }
  CHECK(r.calls.empty());
}

TEST_CASE("memory categories have names") {
  using qmem::memory::category;
  CHECK(std::string(qmem::memory::to_string(category::weights)) == "weights");
  CHECK(std::string(qmem::memory::to_string(category::optimizer_state)) == "optimizer state");
  CHECK(std::string(qmem::memory::to_string(category::quant_metadata)) == "quant metadata");
  CHECK(std::string(qmem::memory::to_string(category::other)) == "other");
}
