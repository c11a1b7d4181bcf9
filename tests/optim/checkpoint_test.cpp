// Save and resume: 10 steps == 5 steps + save + load into a fresh optimizer + 5 steps, bit for
// bit (8-bit, 4-bit, bf16 with stochastic rounding, fp32; bf16 params with master weights;
// percentile history); a file of another policy, another parameter set, or a corrupted file gives
// a clear error and leaves the optimizer unchanged.
#include <qmem/optim.hpp>

#include <doctest/doctest.h>

#include <concepts>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <span>
#include <string>
#include <unistd.h>
#include <vector>

namespace {

using namespace qmem;

std::filesystem::path temp_file(std::string const& name) {
  return std::filesystem::temp_directory_path() /
         ("qmem_optim_" + name + "_" + std::to_string(::getpid()) + ".safetensors");
}

// A copy of `path` with one tensor's bytes replaced and the checksum recomputed, as a file
// written by a buggy or hostile tool would carry: only load_state's own checks can refuse it.
std::filesystem::path resigned_copy(std::filesystem::path const& path, std::string const& tensor,
                                    std::span<std::byte const> value) {
  auto const edited = temp_file("edited");
  io::safetensors_reader const r(path);
  std::map<std::string, std::vector<std::byte>> bytes; // name order, as the checksum
  for (auto const& t : r.tensors()) {
    auto const b = r.bytes(t);
    bytes[t.name].assign(b.begin(), b.end());
  }
  REQUIRE(bytes.at(tensor).size() == value.size());
  bytes[tensor].assign(value.begin(), value.end());
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (auto const& [name, b] : bytes) {
    h = optim::detail::fnv1a(h, std::as_bytes(std::span<char const>(name.data(), name.size())));
    h = optim::detail::fnv1a(h, b);
  }
  io::safetensors_writer w;
  for (auto const& [k, v] : r.metadata())
    w.set_metadata(k, v);
  w.set_metadata("checksum", std::to_string(h));
  for (auto const& t : r.tensors())
    w.add(t.name, t.type, t.shape, bytes[t.name]);
  w.save(edited);
  return edited;
}

std::vector<std::vector<float>> gradients(std::vector<std::size_t> const& sizes, int step) {
  std::vector<std::vector<float>> gs;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    std::mt19937 rng(static_cast<unsigned>(1000 * step + i));
    std::normal_distribution<float> d(0.0f, 0.1f);
    std::vector<float> g(sizes[i]);
    for (auto& x : g)
      x = d(rng);
    gs.push_back(std::move(g));
  }
  return gs;
}

template <class Opt>
void steps(Opt& opt, std::vector<std::size_t> const& sizes, int from, int to) {
  for (int s = from; s < to; ++s) {
    auto const gs = gradients(sizes, s);
    std::vector<tensor_view<float const>> v;
    for (auto const& g : gs)
      v.push_back(view(g));
    opt.step(exec::host{}, v);
  }
}

template <class Param>
std::vector<Param> initial(std::size_t n) {
  std::vector<Param> p(n);
  for (std::size_t i = 0; i < n; ++i)
    p[i] = Param(std::sin(static_cast<float>(i) * 0.37f));
  return p;
}

template <class Policy, class Param>
void check_resume(optim::optimizer_options o) {
  std::vector<std::size_t> const sizes = {5000, 70000, 100};
  auto const path = temp_file("resume");
  // reference: 10 steps straight
  std::vector<std::vector<Param>> a, b;
  for (auto n : sizes) {
    a.push_back(initial<Param>(n));
    b.push_back(initial<Param>(n));
  }
  optim::optimizer<optim::adamw, Policy, Param> ref({}, o);
  for (auto& p : a)
    ref.add_param(view(p));
  steps(ref, sizes, 0, 10);
  // 5 steps, save, fresh optimizer, load, 5 steps
  {
    optim::optimizer<optim::adamw, Policy, Param> first({}, o);
    for (auto& p : b)
      first.add_param(view(p));
    steps(first, sizes, 0, 5);
    optim::save_state(first, path);
  }
  optim::optimizer<optim::adamw, Policy, Param> second({}, o);
  for (auto& p : b)
    second.add_param(view(p));
  optim::load_state(second, path);
  CHECK(second.step_count() == 5);
  steps(second, sizes, 5, 10);
  for (std::size_t i = 0; i < sizes.size(); ++i)
    CHECK(std::memcmp(a[i].data(), b[i].data(), sizes[i] * sizeof(Param)) == 0);
  for (std::size_t i = 0; i < sizes.size(); ++i)
    for (int k = 0; k < 2; ++k)
      CHECK(ref.state_values_of(i, k) == second.state_values_of(i, k));
  std::filesystem::remove(path);
}

} // namespace

TEST_CASE_TEMPLATE("resume: 10 steps == 5 + save + load + 5, bit for bit", Policy,
                   optim::int8_state, optim::int4_state, optim::bf16_state, optim::fp32_state) {
  check_resume<Policy, float>({.lr = optim::lr_schedule::cosine(1e-2f, 3, 10)});
  check_resume<Policy, bf16>({.percentile = 90, .master_weights = true});
  check_resume<Policy, bf16>({.rounding = optim::param_rounding::stochastic, .seed = 7});
}

TEST_CASE("load errors: wrong policy, wrong parameters, corrupt file; optimizer unchanged") {
  auto const path = temp_file("errors");
  std::vector<float> p(10000, 0.5f);
  std::vector<float> g(10000, 0.1f);
  std::vector<tensor_view<float const>> gs{view(g)};
  optim::optimizer<optim::adamw, optim::int8_state> saved;
  saved.add_param(view(p));
  saved.step(exec::host{}, gs);
  optim::save_state(saved, path);

  optim::optimizer<optim::adamw, optim::int8_state> target;
  std::vector<float> q(10000, 0.5f);
  target.add_param(view(q));
  target.step(exec::host{}, gs);
  target.step(exec::host{}, gs);
  auto const before = target.state_values_of(0, 0);

  SUBCASE("another policy") {
    optim::optimizer<optim::adamw, optim::int4_state> four;
    four.add_param(view(q));
    CHECK_THROWS_WITH_AS(optim::load_state(four, path), doctest::Contains("formats"),
                         qmem::format_error);
    CHECK(four.step_count() == 0);
  }
  SUBCASE("other parameters") {
    optim::optimizer<optim::adamw, optim::int8_state> two;
    std::vector<float> r(10000, 0.5f), s(5000, 0.5f);
    two.add_param(view(r));
    two.add_param(view(s));
    CHECK_THROWS_AS(optim::load_state(two, path), qmem::format_error);
    std::vector<float> big(20000, 0.5f);
    optim::optimizer<optim::adamw, optim::int8_state> other;
    other.add_param(view(big));
    CHECK_THROWS_AS(optim::load_state(other, path), qmem::format_error);
    CHECK(other.step_count() == 0);
  }
  SUBCASE("a flipped byte in the data section: checksum") {
    {
      std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
      f.seekg(-100, std::ios::end);
      char c = 0;
      f.read(&c, 1);
      c = static_cast<char>(c ^ 0x5a);
      f.seekp(-100, std::ios::end);
      f.write(&c, 1);
    }
    CHECK_THROWS_WITH_AS(optim::load_state(target, path), doctest::Contains("checksum"),
                         qmem::format_error);
    CHECK(target.step_count() == 2);
    CHECK(target.state_values_of(0, 0) == before);
  }
  // resigned copies of `path`: only load_state's own checks can refuse them
  auto edited_copy = [&](std::string const& tensor, std::span<std::byte const> value) {
    return resigned_copy(path, tensor, value);
  };
  // load_state took a parameter's lr_scale from the file unchecked (add_param refuses < 0): a
  // file with a valid checksum and lr_scale -1 made the next step ascend the gradient.
  SUBCASE("a negative lr_scale with a valid checksum") {
    float const negative = -1.0f;
    auto const edited = edited_copy("param.0.lr_scale", std::as_bytes(std::span(&negative, 1)));
    CHECK_THROWS_WITH_AS(optim::load_state(target, edited), doctest::Contains("lr_scale"),
                         qmem::format_error);
    CHECK(target.step_count() == 2);
    CHECK(target.state_values_of(0, 0) == before);
    CHECK(target.params()[0].lr_scale == 1.0f);
    std::filesystem::remove(edited);
  }
  // ... nor an infinite one (add_param now refuses it too): the tensor's lr became inf.
  SUBCASE("an infinite lr_scale with a valid checksum") {
    float const inf = std::numeric_limits<float>::infinity();
    auto const edited = edited_copy("param.0.lr_scale", std::as_bytes(std::span(&inf, 1)));
    CHECK_THROWS_WITH_AS(optim::load_state(target, edited), doctest::Contains("lr_scale"),
                         qmem::format_error);
    CHECK(target.step_count() == 2);
    CHECK(target.params()[0].lr_scale == 1.0f);
    std::filesystem::remove(edited);
  }
  // ... and each parameter's rule the same way (the constructor and add_param check a rule's
  // ranges): beta2 1.5 made v grow without bound.
  SUBCASE("a rule out of its ranges with a valid checksum") {
    optim::adamw bad{};
    bad.beta2 = 1.5f;
    auto const edited = edited_copy("param.0.rule", std::as_bytes(std::span(&bad, 1)));
    CHECK_THROWS_WITH_AS(optim::load_state(target, edited), doctest::Contains("beta2"),
                         qmem::format_error);
    CHECK(target.step_count() == 2);
    CHECK(target.state_values_of(0, 0) == before);
    CHECK(target.params()[0].rule.beta2 == optim::adamw{}.beta2);
    std::filesystem::remove(edited);
  }
  SUBCASE("a truncated file") {
    std::filesystem::resize_file(path, std::filesystem::file_size(path) / 2);
    CHECK_THROWS_AS(optim::load_state(target, path), qmem::io_error);
    CHECK(target.step_count() == 2);
    CHECK(target.state_values_of(0, 0) == before);
  }
  SUBCASE("a missing file") {
    CHECK_THROWS_AS(optim::load_state(target, temp_file("missing")), qmem::io_error);
  }
  std::filesystem::remove(path);
}

// load_state took the percentile-clipping history from the file unchecked: a resigned file with
// a NaN entry passed, and the next steps sorted an unordered history (NaN compares false both
// ways) to pick their clip; a negative entry made the clip sqrt(< 0) = NaN.
TEST_CASE("load_state refuses a percentile history entry that is NaN or < 0") {
  auto const path = temp_file("history");
  std::vector<float> p(5000, 0.5f), g(5000, 0.1f);
  std::vector<tensor_view<float const>> gs{view(g)};
  optim::optimizer<optim::adamw, optim::int8_state> saved({}, {.percentile = 50});
  saved.add_param(view(p));
  saved.step(exec::host{}, gs);
  saved.step(exec::host{}, gs);
  optim::save_state(saved, path);
  std::vector<float> q(5000, 0.5f);
  optim::optimizer<optim::adamw, optim::int8_state> target({}, {.percentile = 50});
  target.add_param(view(q));
  target.step(exec::host{}, gs);
  auto const before = target.state_values_of(0, 0);
  io::safetensors_reader const r(path);
  auto const b = r.bytes(*r.find("norm_history"));
  std::vector<float> history(100);
  std::memcpy(history.data(), b.data(), 400);
  REQUIRE(history[0] > 0.0f);
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), -1.0f}) {
    CAPTURE(bad);
    auto edited = history;
    edited[1] = bad;
    auto const file = resigned_copy(path, "norm_history", std::as_bytes(std::span(edited)));
    CHECK_THROWS_WITH_AS(optim::load_state(target, file), doctest::Contains("norm_history[1]"),
                         qmem::format_error);
    CHECK(target.step_count() == 1);
    CHECK(target.state_values_of(0, 0) == before);
    std::filesystem::remove(file);
  }
  // an overflowed square (inf) is a value step() itself stores: accepted
  auto edited = history;
  edited[1] = std::numeric_limits<float>::infinity();
  auto const file = resigned_copy(path, "norm_history", std::as_bytes(std::span(edited)));
  CHECK_NOTHROW(optim::load_state(target, file));
  CHECK(target.step_count() == 2);
  std::filesystem::remove(file);
  std::filesystem::remove(path);
}

// load_state copied each blockwise state's absmax from the file unchecked (beyond the checksum):
// a resigned file with a NaN, infinite or negative absmax loaded, and the next step decoded the
// block to NaN or flipped signs. A block absmax must be finite and >= 0; the optimizer is left
// unchanged.
TEST_CASE("load_state refuses a block absmax that is NaN, infinite or < 0") {
  auto const path = temp_file("absmax");
  std::vector<float> p(5000, 0.5f), g(5000, 0.1f);
  std::vector<tensor_view<float const>> gs{view(g)};
  optim::optimizer<optim::adamw, optim::int8_state> saved;
  saved.add_param(view(p));
  saved.step(exec::host{}, gs);
  optim::save_state(saved, path);
  std::vector<float> q(5000, 0.5f);
  optim::optimizer<optim::adamw, optim::int8_state> target;
  target.add_param(view(q));
  target.step(exec::host{}, gs);
  target.step(exec::host{}, gs);
  auto const before0 = target.state_values_of(0, 0);
  auto const before1 = target.state_values_of(0, 1);
  io::safetensors_reader const r(path);
  auto const b = r.bytes(*r.find("param.0.absmax.1"));
  std::vector<float> absmax(b.size() / 4);
  REQUIRE(absmax.size() > 2);
  std::memcpy(absmax.data(), b.data(), b.size());
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), -1.0f}) {
    CAPTURE(bad);
    auto edited = absmax;
    edited[2] = bad;
    auto const file = resigned_copy(path, "param.0.absmax.1", std::as_bytes(std::span(edited)));
    CHECK_THROWS_WITH_AS(optim::load_state(target, file),
                         doctest::Contains("'param.0.absmax.1' block 2"), qmem::format_error);
    CHECK(target.step_count() == 2);
    CHECK(target.state_values_of(0, 0) == before0);
    CHECK(target.state_values_of(0, 1) == before1);
    std::filesystem::remove(file);
  }
  // the largest finite absmax and 0 (a block of zeros) are values step() writes: accepted
  auto edited = absmax;
  edited[1] = std::numeric_limits<float>::max();
  edited[2] = 0.0f;
  auto const file = resigned_copy(path, "param.0.absmax.1", std::as_bytes(std::span(edited)));
  CHECK_NOTHROW(optim::load_state(target, file));
  CHECK(target.step_count() == 1);
  std::filesystem::remove(file);
  std::filesystem::remove(path);
}

// load_state copied fp32 and bf16 state values from the file unchecked (beyond the checksum): a
// resigned file with a NaN or infinite moment, or a negative second moment, loaded (the step
// count went 2 -> 1 and the states were overwritten), and the next step's update was NaN. As a
// blockwise absmax, a value must be finite, and >= 0 in a non-negative state (Adam's v); the
// optimizer is left unchanged.
TEST_CASE_TEMPLATE("load_state refuses an fp32 or bf16 state value that is NaN, infinite or a "
                   "negative second moment",
                   Policy, optim::fp32_state, optim::bf16_state) {
  using F = typename Policy::template format<optim::state_sign::any>;
  constexpr bool is_bf16 = std::same_as<F, optim::bf16_format>;
  auto const path = temp_file("values");
  // 5000 elements: at least min_quantized_size, so that a bf16_state policy stores bf16
  std::vector<float> p(5000, 0.5f), g(5000, 0.1f);
  std::vector<tensor_view<float const>> gs{view(g)};
  optim::optimizer<optim::adamw, Policy> saved;
  saved.add_param(view(p));
  saved.step(exec::host{}, gs);
  optim::save_state(saved, path);
  std::vector<float> q(5000, 0.5f);
  optim::optimizer<optim::adamw, Policy> target;
  target.add_param(view(q));
  target.step(exec::host{}, gs);
  target.step(exec::host{}, gs);
  auto const before0 = target.state_values_of(0, 0);
  auto const before1 = target.state_values_of(0, 1);
  io::safetensors_reader const r(path);
  // `value` as the state's storage (bf16: the float's upper half; every value here is exact)
  auto stored = [&](std::string const& name, std::size_t j, float value) {
    auto const b = r.bytes(*r.find(name));
    std::vector<std::byte> bytes(b.begin(), b.end());
    std::uint32_t u = 0;
    std::memcpy(&u, &value, 4);
    if constexpr (is_bf16) {
      auto const h = static_cast<std::uint16_t>(u >> 16);
      std::memcpy(bytes.data() + j * 2, &h, 2);
    } else {
      std::memcpy(bytes.data() + j * 4, &u, 4);
    }
    return bytes;
  };
  struct bad_case {
    char const* tensor;
    float value;
  };
  float const nan = std::numeric_limits<float>::quiet_NaN();
  float const inf = std::numeric_limits<float>::infinity();
  for (bad_case const c : {bad_case{"param.0.state.0", nan}, bad_case{"param.0.state.0", -inf},
                           bad_case{"param.0.state.1", nan}, bad_case{"param.0.state.1", inf},
                           bad_case{"param.0.state.1", -1.0f}}) {
    std::string const tensor = c.tensor;
    float const value = c.value;
    CAPTURE(tensor);
    CAPTURE(value);
    auto const file = resigned_copy(path, tensor, stored(tensor, 7, value));
    std::string const want = "'" + tensor + "' element 7";
    CHECK_THROWS_WITH_AS(optim::load_state(target, file), doctest::Contains(want.c_str()),
                         qmem::format_error);
    CHECK(target.step_count() == 2);
    CHECK(target.state_values_of(0, 0) == before0);
    CHECK(target.state_values_of(0, 1) == before1);
    std::filesystem::remove(file);
  }
  // a negative first moment (a signed state) and the largest finite values are what step()
  // writes: accepted
  auto const file = resigned_copy(path, "param.0.state.0", stored("param.0.state.0", 7, -1.0f));
  CHECK_NOTHROW(optim::load_state(target, file));
  CHECK(target.step_count() == 1);
  CHECK(target.state_values_of(0, 0)[7] == -1.0f);
  std::filesystem::remove(file);
  float const largest = is_bf16 ? 0x1.fep127f : std::numeric_limits<float>::max();
  auto const big = resigned_copy(path, "param.0.state.1", stored("param.0.state.1", 7, largest));
  CHECK_NOTHROW(optim::load_state(target, big));
  CHECK(target.state_values_of(0, 1)[7] == largest);
  std::filesystem::remove(big);
  std::filesystem::remove(path);
}

// load_state copied the last step's lr from the file unchecked: a NaN, infinite or negative lr
// loaded and last_lr() reported it (and device_optimizer::load copied it to the device). It must
// be what a valid schedule gives, finite and >= 0.
TEST_CASE("load_state refuses a last lr that is NaN, infinite or < 0") {
  auto const path = temp_file("lr");
  std::vector<float> p(300, 0.5f), g(300, 0.1f);
  std::vector<tensor_view<float const>> gs{view(g)};
  optim::optimizer<optim::adamw, optim::fp32_state> saved(
      {}, {.lr = optim::lr_schedule::constant(0.25f)});
  saved.add_param(view(p));
  saved.step(exec::host{}, gs);
  optim::save_state(saved, path);
  std::vector<float> q(300, 0.5f);
  optim::optimizer<optim::adamw, optim::fp32_state> target;
  target.add_param(view(q));
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(), -0.25f}) {
    CAPTURE(bad);
    auto const file = resigned_copy(path, "lr", std::as_bytes(std::span(&bad, 1)));
    CHECK_THROWS_WITH_AS(optim::load_state(target, file), doctest::Contains("lr is"),
                         qmem::format_error);
    CHECK(target.step_count() == 0);
    CHECK(target.last_lr() == 0.0f);
    std::filesystem::remove(file);
  }
  CHECK_NOTHROW(optim::load_state(target, path));
  CHECK(target.last_lr() == 0.25f);
  std::filesystem::remove(path);
}

// A state saved without a percentile history (by an optimizer without percentile clipping) and
// loaded into one that clips at percentile 50 at step 3 started the history as zeros: the next
// step's window held 3 zeros and one measured norm, its clip was 0, and the gradient was scaled by
// 0. The unknown norms now load as +inf (they never set the clip), and that history saves and
// loads again.
TEST_CASE("a state saved without a percentile history resumes percentile clipping safely") {
  auto const path = temp_file("no_history");
  auto const again = temp_file("no_history_again");
  std::vector<float> p(5000, 0.5f), g(5000, 0.1f);
  std::vector<tensor_view<float const>> gs{view(g)};
  optim::optimizer<optim::adamw, optim::int8_state> saved;
  saved.add_param(view(p));
  for (int s = 0; s < 3; ++s)
    saved.step(exec::host{}, gs);
  optim::save_state(saved, path);
  REQUIRE(!io::safetensors_reader(path).contains("norm_history"));

  std::vector<float> q(5000, 0.5f);
  optim::optimizer<optim::adamw, optim::int8_state> clipped({}, {.percentile = 50});
  clipped.add_param(view(q));
  optim::load_state(clipped, path);
  CHECK(clipped.step(exec::host{}, gs).grad_scale == 1.0f);
  optim::save_state(clipped, again);
  optim::optimizer<optim::adamw, optim::int8_state> resumed({}, {.percentile = 50});
  std::vector<float> u(5000, 0.5f);
  resumed.add_param(view(u));
  optim::load_state(resumed, again);
  CHECK(resumed.step_count() == 4);
  CHECK(resumed.step(exec::host{}, gs).grad_scale == 1.0f);

  // a state at step 0 has no history to miss: loaded as a fresh start
  optim::optimizer<optim::adamw, optim::int8_state> fresh_saved;
  std::vector<float> v(5000, 0.5f), w(5000, 0.5f);
  fresh_saved.add_param(view(v));
  optim::save_state(fresh_saved, path);
  optim::optimizer<optim::adamw, optim::int8_state> fresh({}, {.percentile = 50});
  fresh.add_param(view(w));
  optim::load_state(fresh, path);
  CHECK(fresh.step(exec::host{}, gs).grad_scale == 1.0f);
  std::filesystem::remove(path);
  std::filesystem::remove(again);
}
