// bitsandbytes LLM.int8 checkpoints (io/bnb_int8.hpp): a small file laid out exactly as
// bitsandbytes 0.50.2 / transformers save a Linear8bitLt layer is found, validated and dequantized
// to values worked out by hand; quantize_int8 gives the codes and scales bnb's arithmetic gives
// (float16 cast first, round half to even); writing reproduces the bytes; malformed files are
// rejected with format_error.
//
// The layout was checked against bitsandbytes 95f9af3 (0.50.2.dev0): bitsandbytes/nn/modules.py
// Linear8bitLt._save_to_state_dict (lines 1095-1117: `prefix + "SCB"` from weight.SCB and
// `prefix + "weight_format"` = torch.tensor(0, dtype=torch.uint8)), maybe_rearrange_weight
// (lines 812-830: weight_format optional, default "row", ints mapped through
// bitsandbytes/utils.py:200 {"row": 0, "col32": 1, "col_turing": 2, "col_ampere": 3}, anything
// but row rejected), Int8Params._quantize (lines 737-746: `.to(torch.float16)` then
// int8_vectorwise_quant, weight.data = CB (int8 [out, in]), SCB float32 [out]);
// bitsandbytes/_ops.py:118-121 (dequant: A * stats * 7.874015718698502e-3);
// bitsandbytes/backends/default/ops.py:163-167 (row_stats = max |A| per row as float,
// round(A * (127 / row_stats)) to int8); transformers quantizers/quantizer_bnb_8bit.py
// (check_quantized_param: weight dtype int8 and an `SCB` key beside it; create_quantized_param:
// `weight_format` consumed when present).
#include <qmem/io.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "io_test_support.hpp"

using namespace qmem::test::io_names;

namespace {

template <class T>
std::span<std::byte const> bytes_of(std::vector<T> const& v) {
  return std::as_bytes(std::span(v));
}

// One Linear8bitLt layer (out_features 3, in_features 4, with bias) and a layer norm, as bnb's
// state dict holds them: codes and SCB chosen so that every value is exact in float.
struct tiny_layer {
  std::vector<std::int8_t> q = {127,  -64, 0,  1,   //
                                -127, 127, 32, -32, //
                                0,    0,   0,  0};
  std::vector<float> scb = {2.0f, 0.5f, 0.0f};
  std::vector<std::uint8_t> format = {0};
  std::vector<f16> bias = {f16(0.5f), f16(-1.0f), f16(2.0f)};
  std::vector<f16> norm = {f16(1.0f), f16(1.0f), f16(1.0f), f16(1.0f)};

  // Writes the layer; `with_format` false: a file from bitsandbytes < 0.43.1 (no weight_format).
  void save(std::filesystem::path const& path, bool with_format = true) const {
    safetensors_writer w;
    w.set_metadata("format", "pt");
    w.add("model.layers.0.mlp.down_proj.weight", dtype::i8, {3, 4}, bytes_of(q));
    w.add("model.layers.0.mlp.down_proj.SCB", dtype::f32, {3}, bytes_of(scb));
    if (with_format)
      w.add("model.layers.0.mlp.down_proj.weight_format", dtype::u8, {}, bytes_of(format));
    w.add("model.layers.0.mlp.down_proj.bias", dtype::f16, {3}, bytes_of(bias));
    w.add("model.norm.weight", dtype::f16, {4}, bytes_of(norm));
    w.save(path);
  }
};

constexpr char const* weight_key = "model.layers.0.mlp.down_proj.weight";

// (q * scb) * (1/127 as float), each product rounded to float, then to T.
template <class T>
T expected_value(std::int8_t q, float scb) {
  float const inv127 = 7.874015718698502e-3f;
  return qmem::from_float<T>((static_cast<float>(q) * scb) * inv127);
}

} // namespace

TEST_CASE("bnb int8: keys derive from the weight's module prefix") {
  using qmem::io::int8_format_key;
  using qmem::io::int8_prefix;
  using qmem::io::int8_scb_key;
  CHECK(int8_scb_key("model.layers.3.self_attn.q_proj.weight") ==
        "model.layers.3.self_attn.q_proj.SCB");
  CHECK(int8_format_key("model.layers.3.self_attn.q_proj.weight") ==
        "model.layers.3.self_attn.q_proj.weight_format");
  CHECK(int8_scb_key("weight") == "SCB");
  CHECK(!int8_prefix("model.norm.bias"));
  CHECK(!int8_prefix("model.myweight")); // "weight" must be the whole last component
  CHECK_THROWS_AS((void)int8_scb_key("model.norm.bias"), qmem::bad_argument);
}

TEST_CASE("bnb int8: a file in bitsandbytes' layout is found, read and dequantized") {
  tiny_layer const layer;
  for (bool with_format : {true, false}) {
    CAPTURE(with_format);
    scratch_dir tmp;
    auto const path = tmp.path / "model.safetensors";
    layer.save(path, with_format);
    safetensors_reader r(path);
    CHECK(qmem::io::int8_weight_names(r) == std::vector<std::string>{weight_key});
    CHECK(qmem::io::bnb_weight_names(r).empty());
    CHECK(qmem::io::is_int8_aux_key("model.layers.0.mlp.down_proj.SCB", weight_key));
    CHECK(qmem::io::is_int8_aux_key("model.layers.0.mlp.down_proj.weight_format", weight_key));
    CHECK(!qmem::io::is_int8_aux_key("model.layers.0.mlp.down_proj.bias", weight_key));

    auto const w = qmem::io::read_int8_weight(r, weight_key);
    CHECK(w.rows() == 3);
    CHECK(w.cols() == 4);
    CHECK(w.weight_format.has_value() == with_format);
    CHECK(w.bits_per_parameter() == doctest::Approx(8.0 + 32.0 / 4));

    // by hand: row 0 scale 2/127, row 1 0.5/127, row 2 (SCB 0) all zero
    auto const y = w.dequantize<float>();
    CHECK(y[0] == 2.0f);
    CHECK(y[1] == expected_value<float>(-64, 2.0f));
    CHECK(y[1] == doctest::Approx(-128.0 / 127.0));
    CHECK(y[5] == 0.5f);
    CHECK(y[4] == -0.5f);
    for (std::size_t i = 8; i < 12; ++i)
      CHECK(y[i] == 0.0f);
    for (std::size_t i = 0; i < 12; ++i) {
      CAPTURE(i);
      CHECK(y[i] == expected_value<float>(layer.q[i], layer.scb[i / 4]));
      CHECK(w.dequantize<bf16>()[i] == expected_value<bf16>(layer.q[i], layer.scb[i / 4]));
      CHECK(w.dequantize<f16>()[i] == expected_value<f16>(layer.q[i], layer.scb[i / 4]));
    }

    // written back: the same bytes (the writer sorts keys as safetensors does)
    safetensors_writer out;
    out.set_metadata("format", "pt");
    w.add_to(out);
    for (auto const& e : r.tensors())
      if (e.name != weight_key && !qmem::io::is_int8_aux_key(e.name, weight_key))
        out.add(e.name, e.type, e.shape, r.bytes(e));
    out.save(tmp.path / "again.safetensors");
    CHECK(slurp(tmp.path / "again.safetensors") == slurp(path));
  }
}

// int8_weight is an aggregate with public members: rows() and cols() indexed the codes' shape
// unchecked (a default-constructed weight has none), and dequantize read rows * cols codes and
// rows scales whatever the tensors held. Now 0 for a shape that is not [rows, cols], and
// bad_argument before anything is written when the tensors are short.
TEST_CASE("bnb int8: a weight whose tensors hold less than its shape says is refused") {
  qmem::io::int8_weight const none;
  CHECK(none.rows() == 0);
  CHECK(none.cols() == 0);
  CHECK(none.dequantize<float>().empty());
  std::vector<float> const x(12, 0.5f);
  auto const good = qmem::io::quantize_int8(qmem::exec::host{}, weight_key, qmem::view(x),
                                            std::vector<std::int64_t>{3, 4});
  std::vector<float> out(12, 7.0f);
  auto w = good;
  w.codes.bytes.resize(11);
  CHECK_THROWS_WITH_AS(w.dequantize(qmem::exec::host{}, qmem::view(out)),
                       doctest::Contains("codes hold 11 bytes"), qmem::bad_argument);
  w = good;
  w.scb.bytes.resize(8); // 3 rows need 12 bytes
  CHECK_THROWS_AS(w.dequantize(qmem::exec::host{}, qmem::view(out)), qmem::bad_argument);
  CHECK(out == std::vector<float>(12, 7.0f));
  good.dequantize(qmem::exec::host{}, qmem::view(out));
  CHECK(out == good.dequantize<float>());
  CHECK(out[0] == doctest::Approx(0.5f));
}

TEST_CASE("bnb int8: quantize_int8 computes bitsandbytes' codes and scales") {
  // row 0: absmax 1 -> q = round_half_even(x * 127): -0.5 * 127 = -63.5 -> -64 (even),
  // 0.25 * 127 = 31.75 -> 32; row 1: 1.0002 is not a float16: cast first it is 1.0 (SCB 1.0,
  // not 1.0002), and 1.0002 * 127 -> 127; row 2: all zero (SCB 0, codes 0); row 3: a NaN makes
  // the row's SCB NaN and its codes 0 (qmem's documented choice, quant/rowwise.hpp)
  float const nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> const x = {1.0f,    -0.5f, 0.25f, 0.0f,   //
                                1.0002f, 0.5f,  -1.0f, 0.125f, //
                                0.0f,    0.0f,  0.0f,  0.0f,   //
                                nan,     1.0f,  2.0f,  3.0f};
  auto const w = qmem::io::quantize_int8(qmem::exec::host{}, weight_key, qmem::view(x),
                                         std::vector<std::int64_t>{4, 4});
  auto const q = w.codes.as<std::int8_t>(16);
  auto const scb = w.scb.as<float>(4);
  CHECK(w.codes.type == dtype::i8);
  CHECK(w.codes.shape == std::vector<std::int64_t>{4, 4});
  CHECK(w.scb.type == dtype::f32);
  CHECK(w.scb.shape == std::vector<std::int64_t>{4});
  REQUIRE(w.weight_format.has_value());
  CHECK(w.weight_format->type == dtype::u8);
  CHECK(w.weight_format->shape.empty());
  CHECK(w.weight_format->bytes == std::vector<std::byte>{std::byte{0}});
  CHECK(std::vector<std::int8_t>(q.begin(), q.begin() + 8) ==
        std::vector<std::int8_t>{127, -64, 32, 0, 127, 64, -127, 16});
  CHECK(scb[0] == 1.0f);
  CHECK(scb[1] == 1.0f);
  CHECK(scb[2] == 0.0f);
  CHECK(std::isnan(scb[3]));
  for (std::size_t i = 8; i < 16; ++i)
    CHECK(q[i] == 0);

  // bf16 and f16 inputs of these values (1.0002 becomes 1.0 in both) give the same tensors
  std::vector<bf16> xb;
  std::vector<f16> xh;
  for (float v : x) {
    xb.push_back(bf16(v));
    xh.push_back(f16(v));
  }
  auto const wb =
      qmem::io::quantize_int8(qmem::exec::host{}, weight_key, qmem::view(std::as_const(xb)),
                              std::vector<std::int64_t>{4, 4});
  auto const wh =
      qmem::io::quantize_int8(qmem::exec::host{}, weight_key, qmem::view(std::as_const(xh)),
                              std::vector<std::int64_t>{4, 4});
  CHECK(wb.codes.bytes == w.codes.bytes);
  CHECK(wh.codes.bytes == w.codes.bytes);
  CHECK(wb.scb.bytes == w.scb.bytes);
  CHECK(wh.scb.bytes == w.scb.bytes);

  // the keys bitsandbytes' state dict uses
  std::vector<std::string> keys;
  for (auto const& [spec, bytes] : w.tensors())
    keys.push_back(spec.name);
  CHECK(keys == std::vector<std::string>{weight_key, "model.layers.0.mlp.down_proj.SCB",
                                         "model.layers.0.mlp.down_proj.weight_format"});

  CHECK_THROWS_AS((void)qmem::io::quantize_int8(qmem::exec::host{}, "model.norm.bias",
                                                qmem::view(x), std::vector<std::int64_t>{4, 4}),
                  qmem::bad_argument);
  CHECK_THROWS_AS((void)qmem::io::quantize_int8(qmem::exec::host{}, weight_key, qmem::view(x),
                                                std::vector<std::int64_t>{16}),
                  qmem::bad_argument);
  CHECK_THROWS_AS((void)qmem::io::quantize_int8(qmem::exec::host{}, weight_key, qmem::view(x),
                                                std::vector<std::int64_t>{4, 5}),
                  qmem::bad_argument);
  // x is read on the host: it must be host memory and non-null. quantize_int8 read it (the
  // float16 cast) before quantize_rowwise checked anything, and that only checked its own copy:
  // a device view was read through on the host, a null one crashed.
  qmem::tensor_view<float const> const on_device(x.data(), x.size(), qmem::memory_space::device);
  CHECK_THROWS_WITH_AS((void)qmem::io::quantize_int8(qmem::exec::host{}, weight_key, on_device,
                                                     std::vector<std::int64_t>{4, 4}),
                       doctest::Contains("host-accessible"), qmem::bad_argument);
  qmem::tensor_view<float const> const null_x(nullptr, x.size());
  CHECK_THROWS_WITH_AS((void)qmem::io::quantize_int8(qmem::exec::host{}, weight_key, null_x,
                                                     std::vector<std::int64_t>{4, 4}),
                       doctest::Contains("null"), qmem::bad_argument);
}

TEST_CASE("bnb int8: float64 weights are cast to float16 with one rounding") {
  using qmem::io::detail::f64_to_f16;
  // 1 + 2^-11 + 2^-40: above the float16 midpoint 1 + 2^-11, so it rounds up to 1 + 2^-10; a
  // cast through float (1 + 2^-11 exactly, a tie) would round to 1.0
  double const d = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  CHECK(f64_to_f16(d).to_float() == 1.0f + std::ldexp(1.0f, -10));
  CHECK(f64_to_f16(-d).to_float() == -(1.0f + std::ldexp(1.0f, -10)));
  CHECK(f16(static_cast<float>(d)).to_float() == 1.0f);
  double const below = 1.0 + std::ldexp(1.0, -11) - std::ldexp(1.0, -40);
  CHECK(f64_to_f16(below).to_float() == 1.0f);
  CHECK(f64_to_f16(1.0 + std::ldexp(1.0, -11)).to_float() == 1.0f); // an exact tie: to even
  CHECK(f64_to_f16(0.1).bits == f16(0.1f).bits);
  CHECK(f64_to_f16(1e300).bits == 0x7c00); // overflow: inf
  CHECK(f64_to_f16(-1e-300).bits == 0x8000);
  CHECK(std::isnan(f64_to_f16(std::numeric_limits<double>::quiet_NaN()).to_float()));
  // through quantize_int8: the row's SCB is the float16 value of its absmax
  std::vector<double> const x = {d, 0.0};
  auto const w = qmem::io::quantize_int8(qmem::exec::host{}, weight_key, qmem::view(x),
                                         std::vector<std::int64_t>{1, 2});
  CHECK(w.scb.as<float>(1)[0] == 1.0f + std::ldexp(1.0f, -10));
}

TEST_CASE("bnb int8: malformed files are rejected with a reason") {
  tiny_layer const layer;
  scratch_dir tmp;
  auto check_rejected = [&](auto&& write, char const* says) {
    CAPTURE(says);
    auto const path = tmp.path / "bad.safetensors";
    safetensors_writer w;
    write(w);
    w.save(path);
    safetensors_reader r(path);
    try {
      (void)qmem::io::read_int8_weight(r, weight_key);
      FAIL("not rejected");
    } catch (qmem::format_error const& e) {
      CHECK(std::string(e.what()).find(says) != std::string::npos);
    }
  };
  auto const w_key = std::string(weight_key);
  auto const scb_key = std::string("model.layers.0.mlp.down_proj.SCB");
  auto const fmt_key = std::string("model.layers.0.mlp.down_proj.weight_format");
  std::vector<std::uint8_t> const col_turing = {2}, unknown = {7};
  std::vector<float> const scb4(4, 1.0f);
  std::vector<std::uint8_t> const codes_u8(12, 0);
  check_rejected(
      [&](safetensors_writer& w) {
        w.add(w_key, dtype::i8, {3, 4}, bytes_of(layer.q));
        w.add(scb_key, dtype::f32, {3}, bytes_of(layer.scb));
        w.add(fmt_key, dtype::u8, {}, bytes_of(col_turing));
      },
      "col_turing");
  check_rejected(
      [&](safetensors_writer& w) {
        w.add(w_key, dtype::i8, {3, 4}, bytes_of(layer.q));
        w.add(scb_key, dtype::f32, {3}, bytes_of(layer.scb));
        w.add(fmt_key, dtype::u8, {}, bytes_of(unknown));
      },
      "weight_format is 7");
  check_rejected(
      [&](safetensors_writer& w) {
        w.add(w_key, dtype::i8, {3, 4}, bytes_of(layer.q));
        w.add(scb_key, dtype::f32, {4}, bytes_of(scb4));
      },
      "expected F32 [3]");
  check_rejected(
      [&](safetensors_writer& w) {
        w.add(w_key, dtype::i8, {3, 4}, bytes_of(layer.q));
        w.add(scb_key, dtype::f16, {3}, bytes_of(layer.bias));
      },
      "SCB is F16");
  check_rejected(
      [&](safetensors_writer& w) {
        w.add(w_key, dtype::u8, {3, 4}, bytes_of(codes_u8));
        w.add(scb_key, dtype::f32, {3}, bytes_of(layer.scb));
      },
      "expected I8");
  check_rejected(
      [&](safetensors_writer& w) {
        w.add(w_key, dtype::i8, {12}, bytes_of(layer.q));
        w.add(scb_key, dtype::f32, {3}, bytes_of(layer.scb));
      },
      "of rank 1");
  check_rejected(
      [&](safetensors_writer& w) {
        w.add(w_key, dtype::i8, {3, 4}, bytes_of(layer.q));
        w.add(scb_key, dtype::f32, {3}, bytes_of(layer.scb));
        w.add(fmt_key, dtype::u8, {2}, bytes_of(std::vector<std::uint8_t>{0, 0}));
      },
      "one U8 value");
  // no SCB: not an int8 weight at all
  {
    auto const path = tmp.path / "plain.safetensors";
    safetensors_writer w;
    w.add(w_key, dtype::i8, {3, 4}, bytes_of(layer.q));
    w.save(path);
    safetensors_reader r(path);
    CHECK(qmem::io::int8_weight_names(r).empty());
    CHECK_THROWS_AS((void)qmem::io::read_int8_weight(r, weight_key), qmem::bad_argument);
  }
}

namespace {

bool identical(qmem::io::int8_weight const& a, qmem::io::int8_weight const& b) {
  auto const ta = a.tensors(), tb = b.tensors();
  if (a.name != b.name || ta.size() != tb.size())
    return false;
  for (std::size_t i = 0; i < ta.size(); ++i)
    if (ta[i].first.name != tb[i].first.name || ta[i].first.type != tb[i].first.type ||
        ta[i].first.shape != tb[i].first.shape || !std::ranges::equal(ta[i].second, tb[i].second))
      return false;
  return true;
}

} // namespace

// Every int8 weight the reader accepts (bitsandbytes' layout with and without weight_format, an
// empty layer, and quantize_int8's output) is written by add_to and read back identical.
TEST_CASE("bnb int8: every weight the reader accepts is written by add_to and read back "
          "identical") {
  scratch_dir tmp;
  std::vector<qmem::io::int8_weight> weights;
  tiny_layer const layer;
  for (bool with_format : {true, false}) {
    layer.save(tmp.path / "layer.safetensors", with_format);
    safetensors_reader r(tmp.path / "layer.safetensors");
    weights.push_back(qmem::io::read_int8_weight(r, weight_key));
  }
  std::vector<float> x(35);
  for (std::size_t i = 0; i < x.size(); ++i)
    x[i] = std::sin(static_cast<float>(i));
  weights.push_back(qmem::io::quantize_int8(
      qmem::exec::host{}, "weight", qmem::view(std::as_const(x)), std::vector<std::int64_t>{5, 7}));
  weights.push_back(qmem::io::quantize_int8(qmem::exec::host{}, "a.b.weight",
                                            qmem::view(std::as_const(x).data(), 0),
                                            std::vector<std::int64_t>{0, 7}));
  auto scalar_format = weights.front();
  scalar_format.weight_format->shape = {1}; // one element of any rank: the reader accepts it
  weights.push_back(scalar_format);
  for (auto const& w : weights) {
    CAPTURE(w.name);
    CHECK_NOTHROW(w.check_readable("test"));
    safetensors_writer out;
    w.add_to(out);
    out.save(tmp.path / "again.safetensors");
    safetensors_reader r(tmp.path / "again.safetensors");
    CHECK(identical(qmem::io::read_int8_weight(r, w.name), w));
  }
}

// add_to wrote the tensors as they were: a weight assembled or edited by hand gave a file
// read_int8_weight refuses (SCB of another length or dtype, a weight_format of 1 or of two
// bytes, U8 codes), and a failure part way left tensors added. Now bad_argument naming the weight
// and the reason, before anything is added.
TEST_CASE("bnb int8: add_to refuses a weight the reader would refuse") {
  std::vector<float> const x(12, 0.5f);
  auto const good = qmem::io::quantize_int8(qmem::exec::host{}, weight_key, qmem::view(x),
                                            std::vector<std::int64_t>{3, 4});
  std::vector<float> const other(4, 1.0f);
  auto refused = [&](qmem::io::int8_weight const& w, char const* why) {
    CAPTURE(why);
    safetensors_writer out;
    out.add<float>("other", {4}, other);
    CHECK_THROWS_WITH_AS(w.add_to(out), doctest::Contains(why), qmem::bad_argument);
    CHECK_THROWS_WITH_AS(w.add_to(out), doctest::Contains("int8 weight '"), qmem::bad_argument);
    CHECK(out.size() == 1);
    good.add_to(out);
    CHECK(out.size() == 4);
  };
  CHECK_NOTHROW(good.check_readable("test"));
  auto w = good;
  w.scb.shape = {4};
  w.scb.bytes.resize(16);
  refused(w, "expected F32 [3]");
  w = good;
  w.scb.type = dtype::i32;
  refused(w, "SCB is I32");
  w = good;
  w.weight_format->bytes[0] = std::byte{1};
  refused(w, "weight_format is 1 (col32)");
  w = good;
  w.weight_format = qmem::io::stored_tensor{dtype::u8, {2}, {std::byte{0}, std::byte{0}}};
  refused(w, "expected one U8 value");
  w = good;
  w.codes.type = dtype::u8;
  refused(w, "expected I8 [rows, cols]");
  w = good;
  w.codes.shape = {12};
  refused(w, "of rank 1");
  w = good;
  w.weight_format->bytes.clear(); // bytes that do not match the shape: the last tensor written
  refused(w, "weight_format' has 0 bytes");
  w = good;
  w.name = "model.layers.0.mlp.down_proj.w";
  refused(w, "does not end in '.weight'");
}
