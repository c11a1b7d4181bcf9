// bitsandbytes checkpoint interop: the two transformers bnb-4bit checkpoints (NF4 and FP4, double
// quantized) dequantize bit-exactly to bnb's own output, read-then-write reproduces the files byte
// for byte, codes stored in other dtypes (FSDP quant_storage) read the same, and quantize_bnb
// writes the keys, dtypes, shapes and quant-state JSON transformers writes.
#include <qmem/io.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "io_test_support.hpp"

using namespace qmem::test::io_names;

namespace {

// Writes every tensor of `r` except those of `weights`, plus `weights`, to `path`; `raw`: their
// tensors as they are, without add_to's checks (to make the broken files the reader must refuse).
void rewrite(safetensors_reader const& r, std::vector<qmem::io::bnb_weight> const& weights,
             fs::path const& path, bool raw = false) {
  qmem::io::safetensors_writer w;
  for (auto const& [k, v] : r.metadata())
    w.set_metadata(k, v);
  for (auto const& e : r.tensors()) {
    bool owned = false;
    for (auto const& bw : weights)
      owned = owned || e.name == bw.name || qmem::io::is_bnb_aux_key(e.name, bw.name);
    if (!owned)
      w.add(e.name, e.type, e.shape, r.bytes(e));
  }
  for (auto const& bw : weights) {
    if (!raw)
      bw.add_to(w);
    else
      for (auto const& [spec, bytes] : bw.tensors())
        w.add(spec.name, spec.type, spec.shape, bytes);
  }
  w.save(path);
}

} // namespace

TEST_CASE("bnb: python float repr as json.dumps writes it") {
  using qmem::io::python_float_repr;
  CHECK(python_float_repr(0.05185295641422272) == "0.05185295641422272");
  CHECK(python_float_repr(static_cast<double>(0.05185295641422272f)) == "0.05185295641422272");
  CHECK(python_float_repr(1.0) == "1.0");
  CHECK(python_float_repr(0.0) == "0.0");
  CHECK(python_float_repr(-0.0) == "-0.0");
  CHECK(python_float_repr(123.5) == "123.5");
  CHECK(python_float_repr(0.0001) == "0.0001");
  CHECK(python_float_repr(1e-05) == "1e-05");
  CHECK(python_float_repr(1.5e-07) == "1.5e-07");
  CHECK(python_float_repr(-2.5e-10) == "-2.5e-10");
  CHECK(python_float_repr(1e15) == "1000000000000000.0");
  CHECK(python_float_repr(1e16) == "1e+16");
  CHECK(python_float_repr(1.25e100) == "1.25e+100");
}

TEST_CASE("bnb: tiny Llama checkpoints dequantize bit-exactly and rewrite byte for byte") {
  for (auto const* dir : {"tiny_llama_nf4_dq", "tiny_llama_fp4_dq"}) {
    CAPTURE(dir);
    auto const model_path = data_dir() / dir / "model.safetensors";
    safetensors_reader model(model_path);
    safetensors_reader ref(data_dir() / dir / "reference_dequantized.safetensors");
    auto const names = qmem::io::bnb_weight_names(model);
    REQUIRE(names.size() == 14); // 7 linear layers x 2 decoder layers

    std::vector<qmem::io::bnb_weight> weights;
    for (auto const& name : names) {
      CAPTURE(name);
      auto w = qmem::io::read_bnb_weight(model, name);
      CHECK(w.format() == (std::string(dir).find("nf4") != std::string::npos ? bnb_format::nf4
                                                                             : bnb_format::fp4));
      CHECK(w.state.nested);
      CHECK(w.state.blocksize == 64);
      CHECK(w.state.type == dtype::bf16);
      // the quant state re-serializes to the stored bytes (Python json.dumps + float repr)
      CHECK(w.state.to_json() == w.state_json);
      auto const& re = ref.at(name);
      CHECK(re.shape == w.state.shape);
      auto const expected = ref.read<qmem::bf16>(name);
      auto const got = w.dequantize<qmem::bf16>();
      REQUIRE(got.size() == expected.size());
      std::size_t mismatches = 0;
      for (std::size_t i = 0; i < got.size(); ++i)
        mismatches += got[i].bits != expected[i].bits ? 1 : 0;
      CHECK(mismatches == 0);
      // f32 output rounds to the same bf16 values
      auto const f = w.dequantize<float>();
      CHECK(qmem::bf16(f[123]).bits == expected[123].bits);
      CHECK(w.bits_per_parameter() ==
            doctest::Approx(4.0 + 8.0 / 64 + 32.0 / (64 * 256)).epsilon(0.01));
      weights.push_back(std::move(w));
    }

    scratch_dir tmp;
    rewrite(model, weights, tmp.path / "out.safetensors");
    CHECK(slurp(tmp.path / "out.safetensors") == slurp(model_path));
  }
}

TEST_CASE("bnb: codes stored in BF16/F16/F32 (quant_storage) read like U8") {
  safetensors_reader model(data_dir() / "tiny_llama_nf4_dq" / "model.safetensors");
  std::string const name = "model.layers.1.self_attn.q_proj.weight";
  auto const base = qmem::io::read_bnb_weight(model, name);
  auto const expected = base.dequantize<qmem::bf16>();
  for (dtype storage : {dtype::bf16, dtype::f16, dtype::f32}) {
    CAPTURE(qmem::dtype_name(storage));
    auto w = base;
    auto const item = static_cast<std::int64_t>(qmem::dtype_size(storage));
    // bnb's shape for other storage: ((n + 1) // (2 * itemsize), 1)
    auto const n = static_cast<std::int64_t>(w.numel());
    auto const rows = (n + 1) / (2 * item);
    w.codes.type = storage;
    w.codes.shape = {rows, 1};
    w.codes.bytes.resize(static_cast<std::size_t>(rows * item));
    scratch_dir tmp;
    rewrite(model, {w}, tmp.path / "s.safetensors");
    safetensors_reader r(tmp.path / "s.safetensors");
    CHECK(r.at(name).type == storage);
    auto const back = qmem::io::read_bnb_weight(r, name);
    CHECK(back.codes.type == storage);
    auto const got = back.dequantize<qmem::bf16>();
    CHECK(got == expected);
    // and it writes back as stored
    scratch_dir tmp2;
    rewrite(r, {back}, tmp2.path / "t.safetensors");
    CHECK(slurp(tmp2.path / "t.safetensors") == slurp(tmp.path / "s.safetensors"));
  }
}

TEST_CASE("bnb: quantize_bnb writes what transformers writes") {
  for (auto const* dir : {"tiny_llama_nf4_dq", "tiny_llama_fp4_dq"}) {
    CAPTURE(dir);
    safetensors_reader model(data_dir() / dir / "model.safetensors");
    safetensors_reader ref(data_dir() / dir / "reference_dequantized.safetensors");
    std::string const name = "model.layers.0.mlp.down_proj.weight";
    auto const stored = qmem::io::read_bnb_weight(model, name);
    auto const x = ref.read<qmem::bf16>(name);
    auto const w =
        qmem::io::quantize_bnb(qmem::exec::host{}, name, stored.format(),
                               qmem::view(std::as_const(x)), stored.state.shape, 64, true);
    auto const a = stored.tensors(), b = w.tensors();
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      CAPTURE(a[i].first.name);
      CHECK(a[i].first.name == b[i].first.name);
      CHECK(a[i].first.type == b[i].first.type);
      CHECK(a[i].first.shape == b[i].first.shape);
    }
    // constant tables are bnb's bytes
    CHECK(w.quant_map.bytes == stored.quant_map.bytes);
    CHECK(w.nested_quant_map->bytes == stored.nested_quant_map->bytes);
    // the JSON is the same up to the offset's digits
    auto const cut = [](std::string const& s) { return s.substr(0, s.find("\"nested_offset\"")); };
    CHECK(cut(w.state_json) == cut(stored.state_json));
    CHECK(w.state.nested_offset == doctest::Approx(stored.state.nested_offset).epsilon(0.02));
    // re-quantizing bnb's own output is close to bnb's output
    auto const y = w.dequantize<float>();
    double err = 0, norm = 0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      double const d = y[i] - x[i].to_float();
      err += d * d;
      norm += static_cast<double>(x[i].to_float()) * x[i].to_float();
    }
    CHECK(std::sqrt(err / norm) < 0.02);
  }
}

TEST_CASE("bnb: int8 layout round trip, non-nested and nested") {
  std::vector<float> x(1000);
  for (std::size_t i = 0; i < x.size(); ++i)
    x[i] = std::sin(0.37f * static_cast<float>(i)) * (1.0f + static_cast<float>(i % 7));
  for (bool nested : {false, true}) {
    auto const w = qmem::io::quantize_bnb(qmem::exec::host{}, "w", bnb_format::int8,
                                          qmem::view(std::as_const(x)), {10, 100}, 64, nested);
    CHECK(w.codes.shape == std::vector<std::int64_t>{10, 100});
    CHECK(w.state_json.starts_with("{\"quant_type\": \"int8\", \"blocksize\": 64, \"dtype\": "
                                   "\"float32\", \"shape\": [10, 100]"));
    scratch_dir tmp;
    qmem::io::safetensors_writer out;
    w.add_to(out);
    out.save(tmp.path / "i.safetensors");
    safetensors_reader r(tmp.path / "i.safetensors");
    CHECK(r.contains("w.quant_state.qmem__int8"));
    CHECK(qmem::io::bnb_weight_names(r) == std::vector<std::string>{"w"});
    auto const back = qmem::io::read_bnb_weight(r, "w");
    auto const y = back.dequantize<float>();
    CHECK(y == w.dequantize<float>());
    for (std::size_t i = 0; i < x.size(); ++i)
      CHECK(std::fabs(y[i] - x[i]) <= 0.02f * 8.0f);
  }
}

TEST_CASE("bnb: broken checkpoints are rejected") {
  safetensors_reader model(data_dir() / "tiny_llama_fp4_dq" / "model.safetensors");
  std::string const name = "model.layers.0.self_attn.k_proj.weight";
  auto const good = qmem::io::read_bnb_weight(model, name);
  CHECK_THROWS_AS((void)qmem::io::read_bnb_weight(model, "model.norm.weight"), qmem::bad_argument);

  auto expect_rejected = [&](qmem::io::bnb_weight const& w, char const* why) {
    CAPTURE(why);
    scratch_dir tmp;
    rewrite(model, {w}, tmp.path / "b.safetensors", true);
    safetensors_reader r(tmp.path / "b.safetensors");
    CHECK_THROWS_WITH_AS((void)qmem::io::read_bnb_weight(r, name), doctest::Contains(why),
                         qmem::format_error);
    // the same checks refuse to write it (the reader's format_error is the writer's bad_argument)
    safetensors_writer out;
    CHECK_THROWS_WITH_AS(w.add_to(out), doctest::Contains(why), qmem::bad_argument);
    CHECK(out.size() == 0);
  };
  {
    auto w = good;
    w.absmax.bytes.resize(w.absmax.bytes.size() - 1);
    w.absmax.shape[0] -= 1;
    expect_rejected(w, "absmax");
  }
  {
    auto w = good;
    w.codes.bytes.resize(10);
    w.codes.shape = {10, 1};
    expect_rejected(w, "codes tensor has 10 bytes");
  }
  {
    auto w = good;
    auto q = w.quant_map.as<float>(16);
    q[3] = 0.9f;
    std::memcpy(w.quant_map.bytes.data(), q.data(), 64);
    expect_rejected(w, "quant_map");
  }
  for (auto const* json : {"{not json", "[1]", "{\"quant_type\": \"fp4\"}",
                           "{\"quant_type\": \"fp4\", \"blocksize\": 48, \"dtype\": \"bfloat16\", "
                           "\"shape\": [256, 256]}",
                           "{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"int8\", "
                           "\"shape\": [256, 256]}",
                           "{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", "
                           "\"shape\": [256, -256]}",
                           "{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", "
                           "\"shape\": [256, 256], \"nested_blocksize\": 256}"}) {
    auto w = good;
    w.state_json = json;
    expect_rejected(w, "quant_state");
  }
  // a finite nested_offset beyond float32's range: converting it to float is undefined behaviour
  // (the reader took it, as inf on x86); bnb writes a float32's repr
  for (auto const* offset : {"1e300", "-3.4028236e38"}) {
    CAPTURE(offset);
    auto w = good;
    auto const at = w.state_json.find("\"nested_offset\": ");
    REQUIRE(at != std::string::npos);
    w.state_json = w.state_json.substr(0, at) + "\"nested_offset\": " + offset + "}";
    expect_rejected(w, "outside float32's range");
  }
}

TEST_CASE("bnb: weights convert to and from qmem quantized tensors") {
  safetensors_reader model(data_dir() / "tiny_llama_nf4_dq" / "model.safetensors");
  safetensors_reader ref(data_dir() / "tiny_llama_nf4_dq" / "reference_dequantized.safetensors");
  for (auto const& name : qmem::io::bnb_weight_names(model)) {
    CAPTURE(name);
    auto const w = qmem::io::read_bnb_weight(model, name);
    auto const q = w.to_quantized();
    CHECK(q.format().code == qmem::quant::code_id::nf4);
    CHECK(q.format().nested);
    CHECK(q.original_dtype() == dtype::bf16);
    std::vector<qmem::bf16> y(q.numel());
    q.dequantize(qmem::exec::host{}, qmem::view(y));
    CHECK(y == ref.read<qmem::bf16>(name));
    auto const back = qmem::io::bnb_weight::from_quantized(name, q);
    CHECK(back.state_json == w.state_json);
    auto const a = back.tensors(), b = w.tensors();
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      CHECK(a[i].first.name == b[i].first.name);
      CHECK(a[i].first.shape == b[i].first.shape);
      CHECK(std::equal(a[i].second.begin(), a[i].second.end(), b[i].second.begin(),
                       b[i].second.end()));
    }
  }
  // a format bitsandbytes has no checkpoint layout for
  std::vector<float> x(256, 0.5f);
  std::vector<std::int64_t> const shape{256};
  auto const q = qmem::quant::quantize(qmem::exec::host{}, qmem::view(std::as_const(x)), shape,
                                       {qmem::quant::code_id::fp8_e4m3, 64, false, 256});
  CHECK_THROWS_AS((void)qmem::io::bnb_weight::from_quantized("w", q), qmem::bad_argument);
}

TEST_CASE(
    "bnb: a NaN in a double-quantized weight round-trips through the JSON as Python writes it") {
  std::vector<float> x(512, 0.25f);
  x[3] = std::numeric_limits<float>::quiet_NaN();
  auto const w = qmem::io::quantize_bnb(qmem::exec::host{}, "w", bnb_format::nf4,
                                        qmem::view(std::as_const(x)), {512}, 64, true);
  CHECK(std::isnan(w.state.nested_offset));
  CHECK(w.state_json.ends_with("\"nested_offset\": NaN}")); // json.dumps(float('nan'))
  scratch_dir tmp;
  qmem::io::safetensors_writer out;
  w.add_to(out);
  out.save(tmp.path / "nan.safetensors");
  safetensors_reader r(tmp.path / "nan.safetensors");
  auto const back = qmem::io::read_bnb_weight(r, "w");
  CHECK(std::isnan(back.state.nested_offset));
  CHECK(back.state.to_json() == w.state_json);
  auto const y = back.dequantize<float>();
  CHECK(std::isnan(y[3])); // NaN stays visible (see quant/blockwise.hpp on non-finite input)
}

// quantize_bnb multiplied the shape unchecked: 2^32 x 2^32 wrapped to 0 elements, "matched" an
// empty x and wrote a quant state that read_bnb_weight rejects. It now refuses every shape the
// reader refuses (a dimension or element count above 2^48), as does from_quantized.
TEST_CASE("bnb: quantize_bnb and from_quantized refuse shapes the reader would reject") {
  std::vector<float> const none;
  auto const big = std::int64_t{1} << 32;
  CHECK_THROWS_AS((void)qmem::io::quantize_bnb(qmem::exec::host{}, "w", bnb_format::nf4,
                                               qmem::view(none), {big, big}, 64, false),
                  qmem::bad_argument);
  auto const huge = (std::int64_t{1} << 48) + 1;
  CHECK_THROWS_AS((void)qmem::io::quantize_bnb(qmem::exec::host{}, "w", bnb_format::fp4,
                                               qmem::view(none), {0, huge}, 64, false),
                  qmem::bad_argument);
  // the largest dimension the reader takes is accepted and reads back
  auto const w = qmem::io::quantize_bnb(qmem::exec::host{}, "w", bnb_format::nf4, qmem::view(none),
                                        {0, std::int64_t{1} << 48}, 64, true);
  scratch_dir tmp;
  qmem::io::safetensors_writer out;
  w.add_to(out);
  out.save(tmp.path / "empty.safetensors");
  safetensors_reader r(tmp.path / "empty.safetensors");
  CHECK(qmem::io::read_bnb_weight(r, "w").state.shape == w.state.shape);

  std::vector<std::int64_t> const shape{0, huge};
  auto const q = qmem::quant::quantize(qmem::exec::host{}, qmem::view(none), shape,
                                       {qmem::quant::code_id::nf4, 64, false, 256});
  CHECK_THROWS_AS((void)qmem::io::bnb_weight::from_quantized("w", q), qmem::bad_argument);
}

// A default-constructed quantized_tensor has shape [] (a scalar's, one element) but holds no
// element and no bytes: from_quantized made a weight whose quant state says 1 element over empty
// codes and scales, so dequantizing it read past the (empty) buffers, and the file it wrote did
// not load.
TEST_CASE("bnb: from_quantized refuses a tensor that holds fewer elements than its shape") {
  qmem::quant::quantized_tensor const none;
  CHECK_THROWS_AS((void)qmem::io::bnb_weight::from_quantized("w", none), qmem::bad_argument);
  // a real scalar is fine and round-trips
  std::vector<float> const one{0.75f};
  auto const q =
      qmem::quant::quantize(qmem::exec::host{}, qmem::view(one), std::span<std::int64_t const>{},
                            {qmem::quant::code_id::nf4, 64, false, 256});
  auto const w = qmem::io::bnb_weight::from_quantized("w", q);
  CHECK(w.numel() == 1);
  CHECK(w.dequantize<float>() == std::vector<float>{0.75f});
}

namespace {

// A bnb weight "w" of 300 elements sin(i), NF4 in blocks of 64, nested scales when `nested`.
qmem::io::bnb_weight sine_weight(bool nested) {
  std::vector<float> x(300);
  for (std::size_t i = 0; i < x.size(); ++i)
    x[i] = std::sin(static_cast<float>(i));
  return qmem::io::quantize_bnb(qmem::exec::host{}, "w", bnb_format::nf4,
                                qmem::view(std::as_const(x)), {300}, 64, nested);
}

} // namespace

// bnb_weight is an aggregate with public members: a weight assembled or edited by hand can say
// more elements than its tensors hold. dequantize and to_quantized copied and read by the state's
// sizes regardless (past the end of codes, absmax or nested scales; through a null pointer for a
// default-constructed weight, whose state says one element). Now bad_argument, nothing written.
TEST_CASE("bnb: a weight whose tensors hold less than its state says is refused") {
  auto const good = sine_weight(true);
  auto refused = [](qmem::io::bnb_weight const& w, char const* why) {
    CAPTURE(why);
    std::vector<float> out(w.numel(), 7.0f);
    CHECK_THROWS_WITH_AS(w.dequantize(qmem::exec::host{}, qmem::view(out)), doctest::Contains(why),
                         qmem::bad_argument);
    CHECK(out == std::vector<float>(w.numel(), 7.0f));
    CHECK_THROWS_WITH_AS((void)w.to_quantized(), doctest::Contains(why), qmem::bad_argument);
  };
  CHECK_NOTHROW(good.check_stored("test"));
  auto w = good;
  w.codes.bytes.resize(149); // 300 elements need 150
  refused(w, "codes hold 149 bytes");
  w = good;
  w.absmax.bytes.resize(4); // 5 blocks
  refused(w, "absmax holds 4 bytes");
  w = good;
  w.nested_absmax.reset();
  refused(w, "nested_absmax holds 0 bytes");
  w = good;
  w.state.shape = {600}; // the state says twice what the tensors hold
  refused(w, "codes hold 150 bytes");
  w = good;
  w.state.blocksize = 0;
  refused(w, "blocksize 0");
  refused(qmem::io::bnb_weight{}, "codes hold 0 bytes"); // shape []: one element
}

// tensors() and stored_bytes() took nested_quant_map's presence from nested_absmax's and
// dereferenced it regardless (an empty optional: undefined behaviour, a destroyed vector's bytes).
TEST_CASE("bnb: a weight without nested_quant_map lists and counts the tensors it has") {
  auto const good = sine_weight(true);
  auto w = good;
  w.nested_quant_map.reset();
  CHECK(w.tensors().size() == good.tensors().size() - 1);
  CHECK(w.stored_bytes() == good.stored_bytes() - 256 * 4);
  std::vector<float> y(300);
  w.dequantize(qmem::exec::host{}, qmem::view(y)); // dequantizing uses qmem's table
  CHECK(y == good.dequantize<float>());
}

namespace {

// True when two weights hold the same name, state, JSON bytes and stored tensors.
bool identical(qmem::io::bnb_weight const& a, qmem::io::bnb_weight const& b) {
  auto const ta = a.tensors(), tb = b.tensors();
  if (a.name != b.name || a.state_json != b.state_json || a.state.to_json() != b.state.to_json() ||
      ta.size() != tb.size())
    return false;
  for (std::size_t i = 0; i < ta.size(); ++i)
    if (ta[i].first.name != tb[i].first.name || ta[i].first.type != tb[i].first.type ||
        ta[i].first.shape != tb[i].first.shape || !std::ranges::equal(ta[i].second, tb[i].second))
      return false;
  return true;
}

// `w` written alone by add_to, saved and read back.
qmem::io::bnb_weight written_and_read(qmem::io::bnb_weight const& w, fs::path const& path) {
  safetensors_writer out;
  w.add_to(out);
  out.save(path);
  safetensors_reader r(path);
  return qmem::io::read_bnb_weight(r, w.name);
}

} // namespace

// Every weight the reader accepts (both transformers checkpoints, and quantize_bnb's and
// from_quantized's output in every format, nested or not, with codes in each quant_storage dtype)
// passes add_to's checks and reads back identical.
TEST_CASE("bnb: every weight the reader accepts is written by add_to and read back identical") {
  scratch_dir tmp;
  std::size_t count = 0;
  for (auto const* dir : {"tiny_llama_nf4_dq", "tiny_llama_fp4_dq"}) {
    safetensors_reader model(data_dir() / dir / "model.safetensors");
    for (auto const& name : qmem::io::bnb_weight_names(model)) {
      CAPTURE(name);
      auto const w = qmem::io::read_bnb_weight(model, name);
      CHECK_NOTHROW(w.check_readable("test"));
      CHECK(identical(written_and_read(w, tmp.path / "one.safetensors"), w));
      // codes stored in a wider dtype (quant_storage): read as-is, written as-is
      for (auto t : {dtype::bf16, dtype::f32}) {
        auto v = w;
        v.codes.type = t;
        v.codes.shape = {static_cast<std::int64_t>(v.codes.bytes.size() / qmem::dtype_size(t)), 1};
        v.codes.bytes.resize(static_cast<std::size_t>(v.codes.shape[0]) * qmem::dtype_size(t));
        if (v.codes.bytes.size() < (w.numel() + 1) / 2)
          continue; // the padding would not hold every code
        CHECK(identical(written_and_read(v, tmp.path / "wide.safetensors"), v));
      }
      ++count;
    }
  }
  CHECK(count == 28);
  std::vector<float> x(1000);
  for (std::size_t i = 0; i < x.size(); ++i)
    x[i] = std::sin(0.37f * static_cast<float>(i));
  for (auto f : {bnb_format::nf4, bnb_format::fp4, bnb_format::int8})
    for (bool nested : {false, true})
      for (std::vector<std::int64_t> shape :
           {std::vector<std::int64_t>{1000}, std::vector<std::int64_t>{10, 100},
            std::vector<std::int64_t>{0, 7}}) {
        std::string const format(qmem::io::to_string(f));
        CAPTURE(format);
        CAPTURE(nested);
        auto const n = static_cast<std::size_t>(shape[0] * (shape.size() > 1 ? shape[1] : 1));
        auto const w =
            qmem::io::quantize_bnb(qmem::exec::host{}, "layer.weight", f,
                                   qmem::view(std::as_const(x).data(), n), shape, 64, nested);
        CHECK(identical(written_and_read(w, tmp.path / "q.safetensors"), w));
        auto const q = qmem::io::bnb_weight::from_quantized("layer.weight", w.to_quantized());
        CHECK(identical(written_and_read(q, tmp.path / "q2.safetensors"), q));
      }
}

// add_to wrote a weight's tensors as they were: a weight assembled or edited by hand gave a file
// read_bnb_weight refused (an absmax one element long, a wrong table, nested tensors on a plain
// state) or read as another weight (a state_json that disagrees with state). And a failure part
// way (a bad third tensor, a key already in the writer) left the first tensors added. Now every
// check runs first: bad_argument naming the weight and the reason, the writer unchanged.
TEST_CASE("bnb: add_to refuses a weight the reader would refuse or read differently") {
  auto const good = sine_weight(true);
  auto const plain = sine_weight(false);
  scratch_dir tmp;
  std::vector<float> const other(4, 1.0f);
  auto refused = [&](qmem::io::bnb_weight const& w, char const* why) {
    CAPTURE(why);
    safetensors_writer out;
    out.add<float>("other", {4}, other);
    CHECK_THROWS_WITH_AS(w.add_to(out), doctest::Contains(why), qmem::bad_argument);
    CHECK_THROWS_WITH_AS(w.add_to(out), doctest::Contains("bnb weight 'w'"), qmem::bad_argument);
    CHECK(out.size() == 1); // nothing added
    CHECK(!out.contains("w"));
    good.add_to(out); // still usable
    CHECK(out.size() == 1 + good.tensors().size());
  };
  CHECK_NOTHROW(good.check_readable("test"));
  auto w = good;
  w.absmax.bytes.push_back(std::byte{0}); // dequantize's at-least check passes
  w.absmax.shape = {6};
  CHECK_NOTHROW(w.check_stored("test"));
  refused(w, "absmax is U8 with 6 elements; expected U8 with 5");
  w = good;
  w.absmax.shape = {5, 1}; // the reader counts elements, not dimensions: accepted as stored
  CHECK(identical(written_and_read(w, tmp.path / "rank2.safetensors"), w));
  w = good;
  w.absmax.bytes.pop_back(); // the bytes no longer match the shape
  refused(w, "tensor 'w.absmax' has 4 bytes; its shape and dtype U8 need 5");
  w = good;
  w.quant_map = qmem::io::detail::stored_table(bnb_format::fp4);
  refused(w, "quant_map is not bitsandbytes' nf4 table");
  w = good;
  w.nested_quant_map.reset();
  refused(w, "the tensor 'w.nested_quant_map' is missing");
  w = plain;
  w.nested_absmax = good.nested_absmax;
  refused(w, "has nested tensors but its quant_state has no nested fields");
  w = good;
  w.state.shape = {20, 15}; // same numel: the file would read as [300]
  refused(w, "state_json is");
  w = good;
  w.state.format = bnb_format::fp4; // key quant_state.bitsandbytes__fp4, JSON says nf4
  refused(w, "does not match the key");
  w = good;
  w.state_json = "{}";
  refused(w, "bad bitsandbytes quant_state");
  w = good;
  w.name = "other"; // every key new but "other", which the writer holds
  {
    safetensors_writer out;
    out.add<float>("other", {4}, other);
    CHECK_THROWS_WITH_AS(w.add_to(out), doctest::Contains("'other' was already added"),
                         qmem::bad_argument);
    CHECK(out.size() == 1);
  }
  // a short codes tensor: the reader refuses it, so does add_to (and dequantize, as before)
  w = good;
  w.codes.bytes.resize(149);
  w.codes.shape = {149, 1};
  refused(w, "the codes tensor has 149 bytes; 300 elements need 150");
}
