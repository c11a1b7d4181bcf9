// The tensor-like contract and tensor_view: which types are tensor-like (contiguous ranges, views,
// buffers, a user type through tensor_traits), what element type and constness a view gets, and
// the checks of subview, reinterpret and check_view (bad input throws qmem::bad_argument with a
// message naming the value; nothing is produced).
#include <qmem/core.hpp>
#include <qmem/memory.hpp>

#include <doctest/doctest.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace user {

// A framework's own tensor: not a range, carries its device flag. Made tensor-like below.
struct gpu_tensor {
  float* ptr = nullptr;
  std::size_t count = 0;
  bool on_device = true;
};

} // namespace user

template <>
struct qmem::tensor_traits<user::gpu_tensor> {
  using element_type = float;
  static float* data(user::gpu_tensor const& t) noexcept { return t.ptr; }
  static std::size_t size(user::gpu_tensor const& t) noexcept { return t.count; }
  static qmem::memory_space space(user::gpu_tensor const& t) noexcept {
    return t.on_device ? qmem::memory_space::device : qmem::memory_space::host;
  }
};

namespace {

// Returns the message of the qmem::bad_argument `f` throws ("" if it throws nothing).
template <class F>
std::string bad_argument_message(F&& f) {
  try {
    f();
  } catch (qmem::bad_argument const& e) {
    return e.what();
  }
  return "";
}

bool contains(std::string const& s, std::string const& part) {
  return s.find(part) != std::string::npos;
}

} // namespace

// --- which types are tensor-like --------------------------------------------------------------
static_assert(qmem::tensor_like<std::vector<float>>);
static_assert(qmem::tensor_like<std::vector<float> const>);
static_assert(qmem::tensor_like<std::array<int, 4>>);
static_assert(qmem::tensor_like<std::span<float>>);
static_assert(qmem::tensor_like<std::span<float const, 8>>);
static_assert(qmem::tensor_like<qmem::tensor_view<qmem::bf16>>);
static_assert(qmem::tensor_like<qmem::memory::buffer<std::uint8_t>>);
static_assert(qmem::tensor_like<user::gpu_tensor>);
static_assert(!qmem::tensor_like<int>);
static_assert(!qmem::tensor_like<float*>);
static_assert(!qmem::tensor_like<std::list<float>>);     // not contiguous
static_assert(!qmem::tensor_like<std::map<int, float>>); // not contiguous

// --- element types keep constness -------------------------------------------------------------
static_assert(std::same_as<qmem::tensor_element_t<std::vector<float>>, float>);
static_assert(std::same_as<qmem::tensor_element_t<std::vector<float> const>, float const>);
static_assert(std::same_as<qmem::tensor_element_t<std::vector<float> const&>, float const>);
static_assert(std::same_as<qmem::tensor_element_t<std::span<float const>>, float const>);
static_assert(std::same_as<qmem::tensor_element_t<std::array<qmem::f16, 2>>, qmem::f16>);
static_assert(std::same_as<qmem::tensor_element_t<user::gpu_tensor>, float>);

// --- view constness: mutable -> const converts, const -> mutable does not ---------------------
static_assert(std::is_convertible_v<qmem::tensor_view<float>, qmem::tensor_view<float const>>);
static_assert(!std::is_convertible_v<qmem::tensor_view<float const>, qmem::tensor_view<float>>);
static_assert(!std::is_convertible_v<qmem::tensor_view<float>, qmem::tensor_view<double const>>);
static_assert(std::is_trivially_copyable_v<qmem::tensor_view<float const>>);

// reinterpret may add const, never drop it
template <class V, class U>
concept can_reinterpret = requires(V v) {
  v.template reinterpret<U>();
};
static_assert(can_reinterpret<qmem::tensor_view<float>, std::uint8_t>);
static_assert(can_reinterpret<qmem::tensor_view<float>, std::uint8_t const>);
static_assert(can_reinterpret<qmem::tensor_view<float const>, std::uint8_t const>);
static_assert(!can_reinterpret<qmem::tensor_view<float const>, std::uint8_t>);

TEST_CASE("view: std::vector, std::array, std::span, pointer + size") {
  std::vector<float> v(10);
  std::iota(v.begin(), v.end(), 0.0f);
  auto const vv = qmem::view(v);
  static_assert(std::same_as<decltype(vv), qmem::tensor_view<float> const>);
  CHECK(vv.data() == v.data());
  CHECK(vv.size() == 10);
  CHECK(vv.size_bytes() == 40);
  CHECK(vv.space() == qmem::memory_space::host);
  vv[3] = 42.0f; // a view of a mutable range writes through
  CHECK(v[3] == 42.0f);

  std::vector<float> const& cv = v;
  auto const cview = qmem::view(cv);
  static_assert(std::same_as<decltype(cview), qmem::tensor_view<float const> const>);
  CHECK(cview.data() == v.data());

  std::array<std::int16_t, 5> a{1, 2, 3, 4, 5};
  auto const av = qmem::view(a);
  CHECK(av.size() == 5);
  CHECK(av[4] == 5);

  std::span<float const> s(v.data() + 2, 4);
  auto const sv = qmem::view(s);
  static_assert(std::same_as<decltype(sv), qmem::tensor_view<float const> const>);
  CHECK(sv.data() == v.data() + 2);
  CHECK(sv.size() == 4);

  auto const pv = qmem::view(v.data(), 7, qmem::memory_space::pinned);
  CHECK(pv.size() == 7);
  CHECK(pv.space() == qmem::memory_space::pinned);

  std::vector<double> empty;
  CHECK(qmem::view(empty).empty());
}

TEST_CASE("view: a user type made tensor-like by specializing tensor_traits") {
  float storage[6] = {};
  user::gpu_tensor t{storage, 6, true};
  auto const v = qmem::view(t);
  CHECK(v.data() == storage);
  CHECK(v.size() == 6);
  CHECK(v.space() == qmem::memory_space::device);
  t.on_device = false;
  CHECK(qmem::view(t).space() == qmem::memory_space::host);
}

TEST_CASE("tensor_view: iteration, subview, const conversion") {
  std::vector<int> v(8);
  std::iota(v.begin(), v.end(), 10);
  qmem::tensor_view<int> const view = qmem::view(v);
  int sum = 0;
  for (int x : view)
    sum += x;
  CHECK(sum == 10 + 11 + 12 + 13 + 14 + 15 + 16 + 17);

  auto const sub = view.subview(2, 3);
  CHECK(sub.data() == v.data() + 2);
  CHECK(sub.size() == 3);
  CHECK(sub[0] == 12);
  CHECK(view.subview(8, 0).empty()); // the empty range at the end is valid
  CHECK(view.subview(0, 8).size() == 8);

  qmem::tensor_view<int const> const c = view;
  CHECK(c.data() == view.data());
  CHECK(c.size() == view.size());
  CHECK(c.space() == view.space());
}

TEST_CASE("tensor_view::subview rejects ranges outside the view") {
  std::vector<float> v(10);
  auto const view = qmem::view(v);
  auto msg = bad_argument_message([&] { (void)view.subview(8, 3); });
  CHECK(contains(msg, "subview"));
  CHECK(contains(msg, "[8, 11)"));
  CHECK(contains(msg, "outside a view of 10 elements"));
  CHECK(contains(bad_argument_message([&] { (void)view.subview(11, 0); }), "[11, 11)"));
  // offset + count would wrap around: still rejected
  CHECK_THROWS_AS((void)view.subview(5, static_cast<std::size_t>(-1)), qmem::bad_argument);
  CHECK_THROWS_AS((void)view.subview(static_cast<std::size_t>(-1), 2), qmem::bad_argument);
}

TEST_CASE("tensor_view::reinterpret: byte size and alignment are checked") {
  alignas(16) std::uint8_t bytes[32] = {};
  qmem::tensor_view<std::uint8_t> const b(bytes, 32);

  auto const f = b.reinterpret<float>();
  CHECK(f.size() == 8);
  CHECK(static_cast<void*>(f.data()) == static_cast<void*>(bytes));
  auto const back = f.reinterpret<std::uint8_t const>();
  CHECK(back.size() == 32);

  auto msg = bad_argument_message([&] { (void)b.subview(0, 6).reinterpret<float>(); });
  CHECK(contains(msg, "6 bytes is not a whole number of 4-byte elements"));
  msg = bad_argument_message([&] { (void)b.subview(1, 8).reinterpret<float>(); });
  CHECK(contains(msg, "not aligned to 4 bytes"));
  // the memory space travels with the view
  qmem::tensor_view<std::uint8_t> const d(bytes, 32, qmem::memory_space::managed);
  CHECK(d.reinterpret<std::uint32_t>().space() == qmem::memory_space::managed);
}

TEST_CASE("check_view: null, misaligned and unreachable memory are named in the message") {
  std::vector<float> v(4);
  auto ok = qmem::view(v);
  CHECK_NOTHROW(qmem::check_view(ok, "f", "input", true, false));
  CHECK_NOTHROW(qmem::check_view(qmem::tensor_view<float>(nullptr, 0), "f", "input", true, false));

  auto msg = bad_argument_message([] {
    qmem::check_view(qmem::tensor_view<float>(nullptr, 3), "quantize", "input", true, false);
  });
  CHECK(contains(msg, "quantize: input is a null pointer with 3 elements"));

  alignas(8) std::uint8_t raw[16] = {};
  auto* misaligned = reinterpret_cast<float*>(raw + 2);
  msg = bad_argument_message([&] {
    qmem::check_view(qmem::tensor_view<float>(misaligned, 2), "g", "absmax", true, false);
  });
  CHECK(contains(msg, "g: absmax is not aligned to 4 bytes"));

  msg = bad_argument_message([&] {
    qmem::check_view(qmem::view(v.data(), 4, qmem::memory_space::device), "h", "out", true, false);
  });
  CHECK(contains(msg, "h: out is in device memory"));
  CHECK(contains(msg, "needs host-accessible memory"));

  msg = bad_argument_message([&] {
    qmem::check_view(qmem::view(v.data(), 4, qmem::memory_space::host), "k", "codes", false, true);
  });
  CHECK(contains(msg, "k: codes is in host memory"));
  CHECK(contains(msg, "needs device-accessible memory"));
  CHECK_NOTHROW(
      qmem::check_view(qmem::view(v.data(), 4, qmem::memory_space::managed), "k", "c", true, true));
}

TEST_CASE("disjointness checks over lists of views: the first overlapping pair is named") {
  std::vector<std::byte> buf(64);
  auto const all = qmem::view(buf);
  auto const a = all.subview(0, 16);                               // bytes [0, 16)
  auto const b = all.subview(16, 16).reinterpret<float>();         // bytes [16, 32)
  auto const c = all.subview(32, 32).reinterpret<std::uint32_t>(); // bytes [32, 64)
  auto const ab = all.subview(15, 2);                              // one byte of a, one of b
  auto const empty = qmem::tensor_view<float>(nullptr, 0);
  using qmem::detail::check_disjoint_from;
  using qmem::detail::check_pairwise_disjoint;

  CHECK_NOTHROW(check_pairwise_disjoint("f", {{a, "a"}, {b, "b"}, {c, "c"}, {empty, "e"}}));
  CHECK_NOTHROW(check_pairwise_disjoint("f", {}));
  // an empty view at an address inside another overlaps nothing
  CHECK_NOTHROW(check_pairwise_disjoint("f", {{a, "a"}, {all.subview(4, 0), "e"}}));
  // the last pair of the list, the only one that overlaps
  auto const in_b = all.subview(20, 4); // bytes [20, 24), inside b only
  auto msg = bad_argument_message([&] {
    check_pairwise_disjoint("quantize", {{a, "a"}, {c, "c"}, {b, "b"}, {in_b, "in_b"}});
  });
  CHECK(contains(msg, "quantize: b and in_b overlap; expected separate memory"));
  // the first of several overlapping pairs, in list order
  msg = bad_argument_message([&] {
    check_pairwise_disjoint("g", {{ab, "ab"}, {a, "a"}, {b, "b"}});
  });
  CHECK(contains(msg, "g: ab and a overlap"));
  // adjacent views share no byte
  CHECK(!qmem::detail::named_range(a, "a").overlaps(qmem::detail::named_range(b, "b")));
  CHECK(qmem::detail::named_range(all, "all").overlaps(qmem::detail::named_range(c, "c")));

  // one view against others that may overlap each other
  CHECK_NOTHROW(check_disjoint_from("h", {c, "out"}, {{a, "a"}, {ab, "ab"}, {b, "b"}}));
  msg = bad_argument_message([&] {
    check_disjoint_from("h", {ab, "out"}, {{c, "c"}, {b, "b"}, {a, "a"}});
  });
  CHECK(contains(msg, "h: out and b overlap"));
}

TEST_CASE("memory spaces: who may touch them, and their names") {
  using qmem::memory_space;
  CHECK(qmem::host_accessible(memory_space::host));
  CHECK(qmem::host_accessible(memory_space::pinned));
  CHECK(qmem::host_accessible(memory_space::managed));
  CHECK_FALSE(qmem::host_accessible(memory_space::device));
  CHECK_FALSE(qmem::device_accessible(memory_space::host));
  CHECK(qmem::device_accessible(memory_space::pinned));
  CHECK(qmem::device_accessible(memory_space::device));
  CHECK(qmem::device_accessible(memory_space::managed));
  CHECK(qmem::to_string(memory_space::host) == "host");
  CHECK(qmem::to_string(memory_space::pinned) == "pinned");
  CHECK(qmem::to_string(memory_space::device) == "device");
  CHECK(qmem::to_string(memory_space::managed) == "managed");
}
