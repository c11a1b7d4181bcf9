// safetensors reader and writer: the tiny bnb checkpoints read and rewrite byte for byte, the
// writers lay files out like the reference implementation and replace them atomically, and every
// kind of malformed or hostile header is rejected with format_error.
#include <qmem/io.hpp>

#include <doctest/doctest.h>

#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <sys/resource.h>
#include <vector>

#include "io_test_support.hpp"

using namespace qmem::test::io_names;

namespace {

// A file image: 8-byte length, the header as given, `data` bytes of zeros.
std::vector<std::byte> image(std::string const& header, std::size_t data = 0) {
  std::vector<std::byte> out(8 + header.size() + data);
  std::uint64_t const n = header.size();
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}

void check_rejected(std::string const& header, std::size_t data, std::string const& why) {
  CAPTURE(header);
  CAPTURE(why);
  auto const img = image(header, data);
  CHECK_THROWS_AS((void)safetensors_reader::parse(img), qmem::format_error);
  try {
    (void)safetensors_reader::parse(img);
  } catch (qmem::format_error const& e) {
    CHECK(std::string(e.what()).find(why) != std::string::npos);
  }
}

} // namespace

TEST_CASE("safetensors: reads the tiny bnb checkpoint") {
  safetensors_reader r(data_dir() / "tiny_llama_nf4_dq" / "model.safetensors");
  REQUIRE(r.tensors().size() > 10);
  CHECK(r.metadata().at("format") == "pt");
  std::uint64_t pos = 0;
  for (auto const& e : r.tensors()) { // ordered by offset and tiling the data section
    CHECK(e.begin == pos);
    CHECK(e.end - e.begin == e.nbytes());
    CHECK(r.find(e.name) == &e);
    pos = e.end;
  }
  CHECK(pos == r.data_size());

  auto const& w = r.at("model.layers.0.mlp.down_proj.weight");
  CHECK(w.type == dtype::u8);
  CHECK(w.shape == std::vector<std::int64_t>{88064, 1});
  CHECK(w.numel() == 88064);
  auto const qs =
      r.read<std::uint8_t>("model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4");
  std::string const json(qs.begin(), qs.end());
  CHECK(json.starts_with("{\"quant_type\": \"nf4\", \"blocksize\": 64"));

  auto const norm = r.read<qmem::bf16>("model.layers.0.input_layernorm.weight");
  CHECK(norm.size() == 256);
  std::vector<qmem::bf16> into(256);
  r.read_into("model.layers.0.input_layernorm.weight", qmem::view(into));
  CHECK(into == norm);

  // dropping a tensor's pages keeps its contents readable (re-read from the file)
  r.release(r.at("model.layers.0.input_layernorm.weight"));
  CHECK(r.read<qmem::bf16>("model.layers.0.input_layernorm.weight") == norm);
  for (auto const& e : r.tensors())
    r.release(e);
  CHECK(r.read<std::uint8_t>("model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4") ==
        qs);

  CHECK(r.find("nope") == nullptr);
  CHECK_THROWS_WITH_AS((void)r.at("nope"), doctest::Contains("'nope'"), qmem::bad_argument);
  CHECK_THROWS_AS((void)r.read<float>("model.layers.0.input_layernorm.weight"), qmem::bad_argument);
  std::vector<qmem::bf16> small(255);
  CHECK_THROWS_AS(r.read_into("model.layers.0.input_layernorm.weight", qmem::view(small)),
                  qmem::bad_argument);
}

TEST_CASE("safetensors: rewriting a reference file reproduces it byte for byte") {
  for (auto const* name :
       {"tiny_llama_nf4_dq/model.safetensors",
        "tiny_llama_fp4_dq/reference_dequantized.safetensors", "bnb_golden_dev.safetensors"}) {
    CAPTURE(name);
    auto const src = data_dir() / name;
    safetensors_reader r(src);
    scratch_dir dir;

    // whole-file writer, added in an arbitrary order, laid out in the reference order
    qmem::io::safetensors_writer w;
    for (auto const& [k, v] : r.metadata())
      w.set_metadata(k, v);
    for (auto i = r.tensors().size(); i-- > 0;) {
      auto const& e = r.tensors()[i];
      w.add(e.name, e.type, e.shape, r.bytes(e));
    }
    w.save(dir.path / "a.safetensors");
    // the reference orders metadata keys by hash; with one key (or none) the bytes are fixed
    if (r.metadata().size() <= 1)
      CHECK(qmem::test::slurp_bytes(dir.path / "a.safetensors") == qmem::test::slurp_bytes(src));
    safetensors_reader back(dir.path / "a.safetensors");
    REQUIRE(back.tensors().size() == r.tensors().size());
    for (auto const& e : r.tensors()) {
      auto const& b = back.at(e.name);
      CHECK(b.type == e.type);
      CHECK(b.shape == e.shape);
      auto const x = r.bytes(e), y = back.bytes(b);
      CHECK(std::equal(x.begin(), x.end(), y.begin(), y.end()));
    }
    CHECK(back.metadata() == r.metadata());

    // streaming writer in the file's own order, in chunks of 1000 bytes
    std::vector<qmem::io::tensor_spec> specs;
    for (auto const& e : r.tensors())
      specs.push_back({e.name, e.type, e.shape});
    {
      qmem::io::safetensors_stream_writer s(dir.path / "b.safetensors", specs, r.metadata());
      for (auto const& e : r.tensors())
        for (auto bytes = r.bytes(e); !bytes.empty();) {
          auto const n = std::min<std::size_t>(bytes.size(), 1000);
          s.write(bytes.first(n));
          bytes = bytes.subspan(n);
        }
      CHECK(s.remaining() == 0);
      CHECK(s.current() == specs.size());
      s.commit();
    }
    safetensors_reader b(dir.path / "b.safetensors");
    CHECK(b.header_size() == r.header_size());
    auto const fb = qmem::test::slurp_bytes(dir.path / "b.safetensors");
    auto const fs_ = qmem::test::slurp_bytes(src);
    // same data section byte for byte
    CHECK(std::equal(fb.end() - static_cast<std::ptrdiff_t>(b.data_size()), fb.end(),
                     fs_.end() - static_cast<std::ptrdiff_t>(r.data_size()), fs_.end()));
    CHECK(dir.entries() == 2); // no temporary files left behind
  }
}

TEST_CASE("safetensors: typed round trip, empty tensors, scalars") {
  scratch_dir dir;
  std::vector<float> const a{1.f, -2.f, 3.5f, 0.f, 1e-30f, -0.f};
  std::vector<std::int64_t> const s{42};
  qmem::io::safetensors_writer w;
  w.add<float>("a", {2, 3}, a);
  w.add<std::int64_t>("scalar", {}, s);
  w.add<std::uint8_t>("empty", {0, 7}, std::span<std::uint8_t const>{});
  w.set_metadata("note", "quote \" backslash \\ newline \n unicode \xc3\xa9");
  w.save(dir.path / "t.safetensors", qmem::io::safetensors_writer::order::as_added);

  safetensors_reader r(dir.path / "t.safetensors");
  CHECK(r.header_size() % 8 == 0);
  CHECK(r.read<float>("a") == a);
  CHECK(r.at("a").shape == std::vector<std::int64_t>{2, 3});
  CHECK(r.read<std::int64_t>("scalar") == s);
  CHECK(r.at("scalar").shape.empty());
  CHECK(r.read<std::uint8_t>("empty").empty());
  CHECK(r.metadata().at("note") == "quote \" backslash \\ newline \n unicode \xc3\xa9");
  CHECK(r.tensors()[0].name == "a"); // as_added order
}

TEST_CASE("safetensors: writer preconditions; nothing appears on failure") {
  scratch_dir dir;
  std::vector<float> const v(4, 1.f);
  qmem::io::safetensors_writer w;
  w.add<float>("x", {4}, v);
  CHECK_THROWS_AS(w.add<float>("x", {4}, v), qmem::bad_argument);      // duplicate
  CHECK_THROWS_AS(w.add<float>("y", {5}, v), qmem::bad_argument);      // size mismatch
  CHECK_THROWS_AS(w.add<float>("z", {-1, -4}, v), qmem::bad_argument); // negative
  CHECK_THROWS_AS(w.add<float>("", {4}, v), qmem::bad_argument);       // empty name
  CHECK_THROWS_AS(w.add<float>("__metadata__", {4}, v), qmem::bad_argument);
  CHECK(w.size() == 1);

  // an invalid UTF-8 name fails before any file exists
  qmem::io::safetensors_writer bad;
  bad.add<float>("\xff\xfe", {4}, v);
  CHECK_THROWS_AS(bad.save(dir.path / "bad.safetensors"), qmem::bad_argument);
  CHECK(dir.entries() == 0);

  // the stream writer: order, sizes, overrun, incomplete commit
  std::vector<qmem::io::tensor_spec> specs{{"p", dtype::f32, {4}}, {"q", dtype::f32, {2}}};
  auto const target = dir.path / "s.safetensors";
  { std::ofstream(target) << "previous contents"; }
  {
    qmem::io::safetensors_stream_writer s(target, specs);
    CHECK_THROWS_AS(s.write<float>("q", std::span(v).first(2)), qmem::bad_argument); // not next
    CHECK_THROWS_AS(s.write<float>("p", std::span(v).first(3)), qmem::bad_argument); // size
    CHECK_THROWS_AS(s.write<float>("r", std::span(v)), qmem::bad_argument);          // unknown
    s.write<float>("p", v);
    CHECK(s.current() == 1);
    std::vector<std::byte> too_much(9);
    CHECK_THROWS_AS(s.write(too_much), qmem::bad_argument);
    CHECK_THROWS_AS(s.commit(), qmem::bad_argument); // 8 bytes missing; the file is discarded
  }
  CHECK(dir.entries() == 1);
  std::ifstream in(target);
  std::string old;
  std::getline(in, old);
  CHECK(old == "previous contents"); // the old file was not touched
  {
    qmem::io::safetensors_stream_writer s(target, specs);
    s.write<float>("p", v);
    // destroyed before commit: the target keeps its contents, the temporary goes away
  }
  {
    // a tensor written again once every tensor is written: the message named "the next" tensor
    // as entries_[current()], one past the end of the declared tensors (read out of bounds)
    qmem::io::safetensors_stream_writer s(target, specs);
    s.write<float>("p", v);
    s.write<float>("q", std::span(v).first(2));
    CHECK_THROWS_WITH_AS(s.write<float>("p", v),
                         doctest::Contains("written already; every declared tensor is written"),
                         qmem::bad_argument);
  }
  CHECK(dir.entries() == 1);
  CHECK_THROWS_AS(qmem::io::safetensors_stream_writer(dir.path / "no" / "dir.safetensors", specs),
                  qmem::io_error);
}

// A write that fails part way (a full disk, a file size limit) leaves part of its bytes in the
// temporary file. The stream writer kept counting from before them, so a caller that retried the
// write and committed renamed a corrupt file over the target. Now the writer discards the file on
// the failure: later writes and the commit throw, and the target keeps its contents.
TEST_CASE("safetensors: a failed write discards the stream writer's file") {
  scratch_dir dir;
  auto const target = dir.path / "t.safetensors";
  { std::ofstream(target) << "previous contents"; }
  std::vector<std::byte> const data(4000, std::byte{1});
  std::vector<qmem::io::tensor_spec> const specs{{"p", dtype::u8, {4000}}};
  qmem::io::safetensors_stream_writer s(target, specs);
  // the process's file size limit makes ::write stop at 1000 bytes, then fail with EFBIG
  ::rlimit old_limit{};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
  REQUIRE((old_limit.rlim_max == RLIM_INFINITY || old_limit.rlim_max > 1000));
  auto const old_handler = std::signal(SIGXFSZ, SIG_IGN);
  ::rlimit small = old_limit;
  small.rlim_cur = 1000;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
  bool failed = false;
  try {
    s.write(data);
  } catch (qmem::io_error const&) {
    failed = true;
  }
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &old_limit) == 0);
  std::signal(SIGXFSZ, old_handler);
  REQUIRE(failed);
  CHECK_THROWS_AS(s.write(data), qmem::bad_argument);
  CHECK_THROWS_AS(s.commit(), qmem::bad_argument);
  CHECK(qmem::test::slurp(target) == "previous contents");
  CHECK(dir.entries() == 1); // no temporary left behind
}

TEST_CASE("safetensors: I/O errors") {
  CHECK_THROWS_AS(safetensors_reader("/nonexistent/file.safetensors"), qmem::io_error);
  CHECK_THROWS_AS(safetensors_reader(fs::temp_directory_path()), qmem::io_error);
}

TEST_CASE("safetensors: hostile headers are rejected with format_error") {
  std::string const ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  REQUIRE_NOTHROW((void)safetensors_reader::parse(image(ok, 8)));

  {
    std::vector<std::byte> tiny(7);
    CHECK_THROWS_AS((void)safetensors_reader::parse(tiny), qmem::format_error);
    auto big = image(ok, 8);
    std::uint64_t const huge = ~0ull;
    std::memcpy(big.data(), &huge, 8);
    CHECK_THROWS_AS((void)safetensors_reader::parse(big), qmem::format_error);
  }
  check_rejected(ok, 9, "data section is 9 bytes"); // trailing bytes
  check_rejected(ok, 7, "past the data section");   // truncated data
  check_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", 8, "does not parse");
  check_rejected(R"([1,2])", 0, "start with '{'");
  // The reference implementation requires '{' as the header's first byte (InvalidHeaderStart):
  // whitespace before it was accepted here. Trailing spaces are the writers' padding: accepted.
  check_rejected(" " + ok, 8, "start with '{'");
  check_rejected("\n" + ok, 8, "start with '{'");
  check_rejected("", 0, "start with '{'");
  CHECK_NOTHROW((void)safetensors_reader::parse(image(ok + "   ", 8)));
  CHECK_NOTHROW((void)safetensors_reader::parse(image(ok + "\n\t ", 8)));
  check_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                 R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                 8, "appears twice");
  check_rejected(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8,
                 "appears twice");
  check_rejected(R"({"a":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})", 8, "dtype");
  check_rejected(R"({"a":{"dtype":3,"shape":[2],"data_offsets":[0,8]}})", 8, "dtype");
  check_rejected(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, "non-negative");
  check_rejected(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8, "non-negative");
  check_rejected(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8, "not an array");
  check_rejected(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8,
                 "overflows");
  check_rejected(R"({"a":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]}})", 8,
                 "2^63");
  check_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8, "begin after end");
  check_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,9]}})", 8, "past the data");
  check_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 8, "needs 8");
  check_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8, "two non-negative");
  check_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,-8]}})", 8,
                 "two non-negative");
  check_rejected(R"({"a":{"dtype":"F32","shape":[2]}})", 8, "lacks");
  check_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8,
                 "unknown field");
  check_rejected(R"({"a":[1]})", 8, "not an object");
  check_rejected(R"({"":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8, "empty name");
  check_rejected(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8, "gap");
  check_rejected(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                 R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                 8, "overlaps");
  check_rejected(R"({"__metadata__":{"k":1}})", 0, "not a string");
  check_rejected(R"({"__metadata__":[]})", 0, "not an object");
  check_rejected(R"({"a":{"dtype":"F32","shape":[[[[[1]]]]],"data_offsets":[0,8]}})", 8, "nesting");
  check_rejected("{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}", 0,
                 "nesting");
  check_rejected("{\"\xff\":1}", 0, "does not parse"); // invalid UTF-8
}

TEST_CASE("safetensors: the header limit is the reference implementation's 100,000,000 bytes") {
  // MAX_HEADER_SIZE in safetensors' tensor.rs is 100_000_000 (decimal); qmem allowed 100 MiB, so
  // it read files of 100,000,001 to 104,857,600 header bytes that the reference refuses, and its
  // writers wrote them.
  auto header_of = [](std::size_t bytes) { return "{}" + std::string(bytes - 2, ' '); };
  CHECK_NOTHROW((void)safetensors_reader::parse(image(header_of(100'000'000))));
  auto const over = image(header_of(100'000'008));
  CHECK_THROWS_WITH_AS((void)safetensors_reader::parse(over),
                       doctest::Contains("above the 100000000-byte limit"), qmem::format_error);

  // the writers refuse to write such a header (here through 100 MB of metadata), before any file
  scratch_dir dir;
  qmem::io::safetensors_writer w;
  std::vector<float> const v(2, 1.f);
  w.add<float>("x", {2}, v);
  w.set_metadata("big", std::string(100'000'000, 'a'));
  CHECK_THROWS_WITH_AS(w.save(dir.path / "big.safetensors"),
                       doctest::Contains("readers refuse more than 100000000"), qmem::bad_argument);
  CHECK(dir.entries() == 0);
}

TEST_CASE("safetensors: every truncation and many corruptions of a real file are rejected") {
  auto const file = qmem::test::slurp_bytes(data_dir() / "tiny_llama_fp4_dq" / "model.safetensors");
  safetensors_reader const whole = safetensors_reader::parse(file);
  auto const header_end = 8 + whole.header_size();
  // every cut inside the header, and a sample of cuts in the data section
  for (std::size_t cut = 0; cut < file.size(); cut += cut < header_end + 64 ? 1 : 4099) {
    CAPTURE(cut);
    CHECK_THROWS_AS((void)safetensors_reader::parse(std::span(file).first(cut)),
                    qmem::format_error);
  }
  // flipping a byte of the header either still parses (inside a string or a digit that keeps the
  // layout valid) or is rejected: never a crash or another exception type
  auto copy = file;
  std::size_t rejected = 0;
  for (std::size_t i = 8; i < header_end; i += 7) {
    auto const saved = copy[i];
    copy[i] = std::byte{static_cast<unsigned char>(std::to_integer<unsigned>(saved) ^ 0x5a)};
    try {
      (void)safetensors_reader::parse(copy);
    } catch (qmem::format_error const&) {
      ++rejected;
    }
    copy[i] = saved;
  }
  CHECK(rejected > 0);
}

// read_into<bool> copied the stored bytes into bool objects as they were: a byte other than 0 or
// 1 made a bool whose every read is undefined behaviour. Now format_error, nothing written.
TEST_CASE("safetensors: read_into<bool> refuses bytes other than 0 and 1") {
  qmem::io::safetensors_writer w;
  std::vector<std::byte> const good{std::byte{0}, std::byte{1}, std::byte{1}, std::byte{0}};
  std::vector<std::byte> const bad{std::byte{0}, std::byte{1}, std::byte{2}, std::byte{0}};
  w.add("good", dtype::boolean, {4}, good);
  w.add("bad", dtype::boolean, {2, 2}, bad);
  scratch_dir dir;
  w.save(dir.path / "b.safetensors");
  safetensors_reader r(dir.path / "b.safetensors");
  bool out[4] = {true, true, false, true};
  r.read_into("good", qmem::view(out, 4));
  CHECK(!out[0]);
  CHECK(out[1]);
  CHECK(out[2]);
  CHECK(!out[3]);
  bool kept[4] = {true, false, true, false};
  CHECK_THROWS_WITH_AS(r.read_into("bad", qmem::view(kept, 4)),
                       doctest::Contains("'bad' holds the byte 2 at element 2; expected 0 or 1"),
                       qmem::format_error);
  CHECK(kept[0]);
  CHECK(!kept[1]);
  CHECK(kept[2]);
  CHECK(!kept[3]);
}

// add_all adds every tensor or none (add_to of the quantized weights relies on it).
TEST_CASE("safetensors: add_all adds every tensor or none") {
  std::vector<float> const v(4, 1.f);
  auto const b = std::as_bytes(std::span(v));
  using item = std::pair<qmem::io::tensor_spec, std::span<std::byte const>>;
  qmem::io::safetensors_writer w;
  w.add("x", dtype::f32, {4}, b);
  std::vector<item> t{{{"a", dtype::f32, {4}}, b}, {{"b", dtype::f32, {2, 2}}, b}};
  auto refused = [&](std::vector<item> const& bad, char const* why) {
    CAPTURE(why);
    CHECK_THROWS_WITH_AS(w.add_all(bad), doctest::Contains(why), qmem::bad_argument);
    CHECK(w.size() == 1);
    CHECK(!w.contains("a"));
  };
  auto u = t;
  u.push_back({{"x", dtype::f32, {4}}, b});
  refused(u, "'x' was already added");
  u = t;
  u.push_back({{"a", dtype::f32, {4}}, b});
  refused(u, "'a' appears twice");
  u = t;
  u[1].first.shape = {3};
  refused(u, "tensor 'b' has 16 bytes; its shape and dtype F32 need 12");
  u = t;
  u[1].first.name = "__metadata__";
  refused(u, "reserved or empty");
  u = t;
  u[1].first.shape = {-1, -4};
  refused(u, "negative or overflowing");
  w.add_all(t);
  CHECK(w.size() == 3);
  CHECK(w.contains("a"));
  CHECK(w.contains("b"));
}

// Many tensors: the writer's name index (add and contains stay O(log n)) agrees with the items
// through adds, refused adds and a refused add_all, and the file lists every name once.
TEST_CASE("safetensors: the writer's name index over thousands of tensors") {
  std::vector<float> const v(1, 2.f);
  auto const b = std::as_bytes(std::span(v));
  using item = std::pair<qmem::io::tensor_spec, std::span<std::byte const>>;
  constexpr int n = 4000;
  qmem::io::safetensors_writer w;
  for (int i = 0; i < n; ++i)
    w.add("layer." + std::to_string(i) + ".weight", dtype::f32, {1}, b);
  CHECK(w.size() == n);
  CHECK(w.contains("layer.0.weight"));
  CHECK(w.contains("layer.3999.weight"));
  CHECK(!w.contains("layer.4000.weight"));
  CHECK_THROWS_WITH_AS(w.add("layer.1234.weight", dtype::f32, {1}, b),
                       doctest::Contains("'layer.1234.weight' was already added"),
                       qmem::bad_argument);
  std::vector<item> more;
  for (int i = 0; i < n; ++i)
    more.push_back({{"layer." + std::to_string(i) + ".bias", dtype::f32, {1}}, b});
  more.push_back({{"layer.17.bias", dtype::f32, {1}}, b});
  CHECK_THROWS_WITH_AS(w.add_all(more), doctest::Contains("'layer.17.bias' appears twice"),
                       qmem::bad_argument);
  CHECK(w.size() == n);
  CHECK(!w.contains("layer.0.bias"));
  more.pop_back();
  w.add_all(more);
  CHECK(w.size() == 2 * n);
  CHECK(w.contains("layer.17.bias"));
  auto const path = std::filesystem::temp_directory_path() / "qmem_many_names.safetensors";
  w.save(path);
  {
    safetensors_reader const r(path);
    CHECK(r.tensors().size() == 2 * n);
  }
  std::filesystem::remove(path);
}
