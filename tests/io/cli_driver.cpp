// The `qmem` command-line tool, driven as a user runs it (the binary built from examples/qmem_cli): inspect,
// dequantize to bnb's own reference output bit for bit, quantize to transformers' layout, round
// trips, sharded checkpoints in and out, and one-line errors with a non-zero exit status.
// Built into qmem_cli_tests by examples/qmem_cli/CMakeLists.txt (not globbed into qmem_tests).
#include <qmem/io.hpp>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <span>
#include <string>
#include <sys/wait.h>
#include <vector>

#include "io_test_support.hpp"

using namespace qmem::test::io_names;

namespace {

struct result {
  int rc = -1;
  std::string out, err;
};

std::string quote(std::string const& s) {
  std::string q = "'";
  for (char c : s)
    q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// Runs the qmem binary with `args`; stdout and stderr captured separately.
result qmem_run(std::vector<std::string> const& args) {
  scratch_dir tmp;
  std::string cmd = quote(QMEM_CLI_PATH);
  for (auto const& a : args) {
    cmd += ' ';
    cmd += quote(a);
  }
  cmd += " >";
  cmd += quote((tmp.path / "out").string());
  cmd += " 2>";
  cmd += quote((tmp.path / "err").string());
  cmd += " </dev/null";
  int const status = std::system(cmd.c_str());
  result r;
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(tmp.path / "out");
  r.err = slurp(tmp.path / "err");
  return r;
}

std::size_t lines(std::string const& s) {
  return static_cast<std::size_t>(std::count(s.begin(), s.end(), '\n'));
}

// Every bnb weight of the reference dequantizes (in `file`) to bnb's bf16 output bit for bit.
void check_matches_reference(safetensors_reader const& out, char const* dir) {
  safetensors_reader ref(data_dir() / dir / "reference_dequantized.safetensors");
  std::size_t checked = 0;
  for (auto const& e : ref.tensors()) {
    if (e.type != dtype::bf16)
      continue; // input_ids, logits
    CAPTURE(e.name);
    auto const& o = out.at(e.name);
    CHECK(o.shape == e.shape);
    CHECK(out.read<qmem::bf16>(e.name) == ref.read<qmem::bf16>(e.name));
    ++checked;
  }
  CHECK(checked == 14);
}

// Splits `src` into two shards plus an index in `dir`; returns the index path.
fs::path make_sharded(fs::path const& src, fs::path const& dir) {
  safetensors_reader r(src);
  qmem::io::safetensors_writer a, b;
  nlohmann::json index;
  std::uint64_t total = 0;
  for (auto const& e : r.tensors()) {
    bool const first = e.name.find("layers.1.") == std::string::npos;
    (first ? a : b).add(e.name, e.type, e.shape, r.bytes(e));
    index["weight_map"][e.name] =
        first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
    total += e.nbytes();
  }
  a.set_metadata("format", "pt");
  b.set_metadata("format", "pt");
  a.save(dir / "model-00001-of-00002.safetensors");
  b.save(dir / "model-00002-of-00002.safetensors");
  index["metadata"]["total_size"] = total;
  std::ofstream(dir / "model.safetensors.index.json") << index.dump(2);
  return dir / "model.safetensors.index.json";
}

// The index at `path` is consistent with its shards: every tensor mapped to the shard holding it,
// every shard tensor mapped, total_size the sum of the shards' tensor bytes.
void check_index(fs::path const& path) {
  auto const j = nlohmann::json::parse(slurp(path));
  std::set<std::string> files;
  for (auto const& [k, v] : j["weight_map"].items())
    files.insert(v.get<std::string>());
  std::uint64_t total = 0;
  std::size_t count = 0;
  for (auto const& f : files) {
    safetensors_reader r(path.parent_path() / f);
    for (auto const& e : r.tensors()) {
      CHECK(j["weight_map"][e.name] == f);
      total += e.nbytes();
      ++count;
    }
  }
  CHECK(count == j["weight_map"].size());
  CHECK(j["metadata"]["total_size"].get<std::uint64_t>() == total);
}

} // namespace

TEST_CASE("cli: inspect lists formats, block sizes, bytes and bits per parameter") {
  auto const r =
      qmem_run({"inspect", (data_dir() / "tiny_llama_nf4_dq" / "model.safetensors").string()});
  CHECK(r.rc == 0);
  CHECK(r.err.empty());
  CHECK(r.out.find("21 tensors (14 quantized)") != std::string::npos);
  CHECK(r.out.find("model.layers.0.mlp.down_proj.weight") != std::string::npos);
  CHECK(r.out.find("[256, 688]") != std::string::npos);
  CHECK(r.out.find("nf4") != std::string::npos);
  CHECK(r.out.find("4.127") != std::string::npos);
  CHECK(r.out.find("absmax") == std::string::npos); // auxiliary tensors fold into their weight
  CHECK(r.out.find("total: 21 tensors, 1975552 parameters, 1816760 bytes") != std::string::npos);
}

TEST_CASE("cli: dequantize reproduces bitsandbytes' dequantized weights bit for bit") {
  for (auto const* dir : {"tiny_llama_nf4_dq", "tiny_llama_fp4_dq"}) {
    CAPTURE(dir);
    scratch_dir tmp;
    auto const in = data_dir() / dir / "model.safetensors";
    auto const out = tmp.path / "deq.safetensors";
    auto const r = qmem_run({"dequantize", in.string(), out.string()});
    REQUIRE(r.rc == 0);
    CHECK(r.err.empty()); // no progress line when stderr is not a terminal
    safetensors_reader o(out);
    check_matches_reference(o, dir);
    CHECK(o.tensors().size() == 21);
    safetensors_reader i(in);
    auto const x = i.bytes(i.at("model.norm.weight")), y = o.bytes(o.at("model.norm.weight"));
    CHECK(std::equal(x.begin(), x.end(), y.begin(), y.end())); // copied unchanged
    CHECK(o.metadata() == i.metadata());

    auto const f = tmp.path / "deq32.safetensors";
    REQUIRE(qmem_run({"dequantize", "--dtype", "f32", in.string(), f.string()}).rc == 0);
    safetensors_reader o32(f);
    auto const& w = o32.at("model.layers.1.mlp.up_proj.weight");
    CHECK(w.type == dtype::f32);
    auto const v = o32.read<float>(w.name);
    auto const ref = o.read<qmem::bf16>(w.name);
    for (std::size_t k = 0; k < v.size(); k += 97)
      CHECK(qmem::bf16(v[k]).bits == ref[k].bits);
  }
}

TEST_CASE("cli: quantize writes transformers' layout; quantize then dequantize round-trips") {
  scratch_dir tmp;
  auto const model = data_dir() / "tiny_llama_nf4_dq" / "model.safetensors";
  auto const deq = tmp.path / "deq.safetensors";
  REQUIRE(qmem_run({"dequantize", model.string(), deq.string()}).rc == 0);

  for (auto const* fmt : {"nf4", "fp4"}) {
    for (bool nested : {false, true}) {
      CAPTURE(fmt);
      CAPTURE(nested);
      auto const q = tmp.path / (std::string(fmt) + (nested ? "_dq" : "") + ".safetensors");
      std::vector<std::string> args{"quantize", "--format", fmt};
      if (nested)
        args.push_back("--double-quant");
      args.push_back(deq.string());
      args.push_back(q.string());
      auto const r = qmem_run(args);
      REQUIRE(r.rc == 0);
      safetensors_reader qr(q);
      auto const weights = qmem::io::bnb_weight_names(qr);
      CHECK(weights.size() == 14);
      for (auto const& name : weights) {
        auto const w = qmem::io::read_bnb_weight(qr, name);
        CHECK(w.state.nested == nested);
        CHECK(w.state.blocksize == 64u);
      }
      if (std::string(fmt) == "nf4" && nested) {
        // the same keys, dtypes and shapes as transformers' file, in the same order
        safetensors_reader ref(model);
        REQUIRE(qr.tensors().size() == ref.tensors().size());
        for (std::size_t k = 0; k < qr.tensors().size(); ++k) {
          auto const& a = qr.tensors()[k];
          auto const& b = ref.tensors()[k];
          CHECK(a.name == b.name);
          CHECK(a.type == b.type);
          if (a.name.find("quant_state") == std::string::npos)
            CHECK(a.shape == b.shape); // the JSON's length depends on the offset's digits
        }
      }
      auto const back = tmp.path / "back.safetensors";
      REQUIRE(qmem_run({"dequantize", q.string(), back.string()}).rc == 0);
      safetensors_reader br(back), dr(deq);
      CHECK(br.tensors().size() == dr.tensors().size());
      for (auto const& e : dr.tensors()) {
        auto const& b = br.at(e.name);
        CHECK(b.type == e.type);
        CHECK(b.shape == e.shape);
        auto const x = dr.read<qmem::bf16>(e.name), y = br.read<qmem::bf16>(e.name);
        double err = 0, norm = 0;
        for (std::size_t k = 0; k < x.size(); ++k) {
          double const d = static_cast<double>(y[k].to_float()) - x[k].to_float();
          err += d * d;
          norm += static_cast<double>(x[k].to_float()) * x[k].to_float();
        }
        CHECK(std::sqrt(err / (norm + 1e-30)) < 0.12);
      }
    }
  }

  // --only selects by regular expression (any rank); --block sets the block size
  auto const only = tmp.path / "only.safetensors";
  REQUIRE(qmem_run({"quantize", "--format=fp4", "--block=128", "--only", "norm|q_proj",
                    deq.string(), only.string()})
              .rc == 0);
  safetensors_reader o(only);
  auto const names = qmem::io::bnb_weight_names(o);
  std::set<std::string> const got(names.begin(), names.end());
  CHECK(got == std::set<std::string>{"model.layers.0.input_layernorm.weight",
                                     "model.layers.0.post_attention_layernorm.weight",
                                     "model.layers.1.input_layernorm.weight",
                                     "model.layers.1.post_attention_layernorm.weight",
                                     "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
                                     "model.layers.1.self_attn.q_proj.weight"});
  CHECK(qmem::io::read_bnb_weight(o, "model.norm.weight").state.blocksize == 128);
  CHECK(o.at("model.layers.0.mlp.up_proj.weight").type == dtype::bf16);

  // quantizing an already-quantized checkpoint copies its bnb weights unchanged
  auto const again = tmp.path / "again.safetensors";
  REQUIRE(
      qmem_run({"quantize", "--format", "nf4", "--double-quant", model.string(), again.string()})
          .rc == 0);
  CHECK(slurp(again) == slurp(model));
}

TEST_CASE("cli: sharded checkpoints in and out") {
  scratch_dir in_dir, out_dir, back_dir;
  auto const index =
      make_sharded(data_dir() / "tiny_llama_fp4_dq" / "model.safetensors", in_dir.path);
  auto const r = qmem_run({"inspect", index.string()});
  CHECK(r.rc == 0);
  CHECK(r.out.find("2 shards, 21 tensors (14 quantized)") != std::string::npos);

  auto const deq = out_dir.path / "model.safetensors.index.json";
  REQUIRE(qmem_run({"dequantize", index.string(), deq.string()}).rc == 0);
  CHECK(fs::exists(out_dir.path / "model-00001-of-00002.safetensors"));
  CHECK(fs::exists(out_dir.path / "model-00002-of-00002.safetensors"));
  check_index(deq);
  for (auto const* shard :
       {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}) {
    safetensors_reader s(out_dir.path / shard);
    safetensors_reader ref(data_dir() / "tiny_llama_fp4_dq" / "reference_dequantized.safetensors");
    for (auto const& e : s.tensors())
      if (ref.contains(e.name))
        CHECK(s.read<qmem::bf16>(e.name) == ref.read<qmem::bf16>(e.name));
  }

  auto const q = back_dir.path / "model.safetensors.index.json";
  REQUIRE(
      qmem_run({"quantize", "--format", "nf4", "--double-quant", deq.string(), q.string()}).rc ==
      0);
  check_index(q);
  auto const j = nlohmann::json::parse(slurp(q));
  CHECK(j["weight_map"]["model.layers.1.mlp.up_proj.weight.absmax"] ==
        "model-00002-of-00002.safetensors");
  CHECK(j["weight_map"]["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"] ==
        "model-00001-of-00002.safetensors");
  auto const i2 = qmem_run({"inspect", q.string()});
  CHECK(i2.out.find("2 shards, 21 tensors (14 quantized)") != std::string::npos);

  // A run that fails in the second shard commits no shard, so an earlier output in OUT's
  // directory stays whole. Old code renamed each shard into place as it was written: the first
  // shard of the failed run replaced the earlier output's, beside its old second shard and index.
  {
    scratch_dir again_dir;
    auto const prior = again_dir.path / "model.safetensors.index.json";
    REQUIRE(qmem_run({"quantize", "--format", "nf4", deq.string(), prior.string()}).rc == 0);
    auto const first = again_dir.path / "model-00001-of-00002.safetensors";
    auto const before = slurp(first);
    // only the second shard has a tensor this selects, and LLM.int8 cannot store it (1-D)
    auto const failed = qmem_run({"quantize", "--format", "int8", "--only", "layers\\.1\\..*norm",
                                  index.string(), prior.string()});
    CHECK(failed.rc == 2);
    CHECK(failed.err.find("narrow --only") != std::string::npos);
    CHECK(slurp(first) == before);
    CHECK(std::distance(fs::directory_iterator(again_dir.path), {}) == 3); // no temporary left
    check_index(prior);
  }

  // sharded in, single file out (and the reverse) is a usage error; so is writing over the input
  auto const bad =
      qmem_run({"dequantize", index.string(), (out_dir.path / "x.safetensors").string()});
  CHECK(bad.rc == 2);
  CHECK(lines(bad.err) == 1);
  auto const over =
      qmem_run({"dequantize", index.string(), (in_dir.path / "o.safetensors.index.json").string()});
  CHECK(over.rc == 2);
  // an index that maps a tensor to the wrong shard
  auto text = slurp(index);
  auto const pos = text.find("model-00002-of-00002");
  text.replace(pos, 20, "model-00001-of-00002");
  std::ofstream(in_dir.path / "broken.safetensors.index.json") << text;
  auto const broken =
      qmem_run({"inspect", (in_dir.path / "broken.safetensors.index.json").string()});
  CHECK(broken.rc == 1);
  CHECK(lines(broken.err) == 1);
}

TEST_CASE("cli: a tensor name in two shards, or mapped twice by the index, is refused") {
  scratch_dir in_dir;
  auto const index =
      make_sharded(data_dir() / "tiny_llama_fp4_dq" / "model.safetensors", in_dir.path);
  std::string const first = "model-00001-of-00002.safetensors";
  std::string const second = "model-00002-of-00002.safetensors";
  std::string const name = "model.layers.1.mlp.down_proj.weight"; // in the second shard
  auto const text = slurp(index);
  REQUIRE(text.find("\"" + name + "\": \"" + second + "\"") != std::string::npos);

  // the index maps the name twice (JSON parsers keep the last: the CLI took the second shard's)
  auto twice = text;
  auto const at = twice.find("\"weight_map\": {") + std::string("\"weight_map\": {").size();
  twice.insert(at, "\n    \"" + name + "\": \"" + first + "\",");
  std::ofstream(in_dir.path / "twice.safetensors.index.json") << twice;
  auto const r1 = qmem_run({"inspect", (in_dir.path / "twice.safetensors.index.json").string()});
  CHECK(r1.rc == 1);
  CHECK(lines(r1.err) == 1);
  CHECK(r1.err.find("'" + name + "'") != std::string::npos);
  CHECK(r1.err.find(first) != std::string::npos);
  CHECK(r1.err.find(second) != std::string::npos);

  // two shards hold the name (a third shard with a copy of it, mapped once, to the third)
  {
    safetensors_reader r(in_dir.path / second);
    qmem::io::safetensors_writer w;
    auto const& e = r.at(name);
    w.add(name, e.type, e.shape, r.bytes(e));
    w.save(in_dir.path / "extra.safetensors");
  }
  auto both = text;
  both.replace(both.find("\"" + name + "\": \"" + second + "\""), name.size() + second.size() + 6,
               "\"" + name + "\": \"extra.safetensors\"");
  std::ofstream(in_dir.path / "both.safetensors.index.json") << both;
  auto const r2 = qmem_run({"inspect", (in_dir.path / "both.safetensors.index.json").string()});
  CHECK(r2.rc == 1);
  CHECK(lines(r2.err) == 1);
  CHECK(r2.err.find("'" + name + "'") != std::string::npos);
  CHECK(r2.err.find("extra.safetensors") != std::string::npos);
  CHECK(r2.err.find(second) != std::string::npos);

  // any other repeated key of the index is refused too
  auto meta = text;
  meta.insert(meta.find("\"metadata\": {") + std::string("\"metadata\": {").size(),
              "\"total_size\": 1, ");
  std::ofstream(in_dir.path / "meta.safetensors.index.json") << meta;
  auto const r3 = qmem_run({"inspect", (in_dir.path / "meta.safetensors.index.json").string()});
  CHECK(r3.rc == 1);
  CHECK(r3.err.find("'total_size' appears twice") != std::string::npos);
}

TEST_CASE("cli: --format int8 writes bitsandbytes' LLM.int8 tensors that inspect and dequantize "
          "read") {
  scratch_dir tmp;
  auto const model = data_dir() / "tiny_llama_nf4_dq" / "model.safetensors";
  auto const deq = tmp.path / "deq.safetensors";
  REQUIRE(qmem_run({"dequantize", model.string(), deq.string()}).rc == 0);
  auto const q8 = tmp.path / "q8.safetensors";
  REQUIRE(qmem_run({"quantize", "--format", "int8", deq.string(), q8.string()}).rc == 0);

  safetensors_reader dr(deq), qr(q8);
  CHECK(qmem::io::bnb_weight_names(qr).empty()); // no quant_state tensors
  auto const weights = qmem::io::int8_weight_names(qr);
  CHECK(weights.size() == 14);
  for (auto const& name : weights) {
    CAPTURE(name);
    // Linear8bitLt's state dict: P.weight I8 [out, in], P.SCB F32 [out], P.weight_format U8 []
    // = 0; the same codes and scales as the library's quantize_int8 of the input
    auto const prefix = name.substr(0, name.size() - 6);
    auto const& we = qr.at(name);
    auto const& in = dr.at(name);
    CHECK(we.type == dtype::i8);
    CHECK(we.shape == in.shape);
    CHECK(qr.at(prefix + "SCB").type == dtype::f32);
    CHECK(qr.at(prefix + "SCB").shape == std::vector<std::int64_t>{in.shape[0]});
    auto const& fe = qr.at(prefix + "weight_format");
    CHECK(fe.type == dtype::u8);
    CHECK(fe.shape.empty());
    CHECK(qr.read<std::uint8_t>(fe.name) == std::vector<std::uint8_t>{0});
    auto const x = dr.read<qmem::bf16>(name);
    auto const lib = qmem::io::quantize_int8(qmem::exec::host{}, name, qmem::view(x), in.shape);
    CHECK(lib.codes.bytes == qmem::io::stored_tensor::from(qr, we).bytes);
    CHECK(lib.scb.bytes == qmem::io::stored_tensor::from(qr, qr.at(prefix + "SCB")).bytes);
  }
  // everything else is copied: norms, embeddings, lm_head
  CHECK(qr.at("model.norm.weight").type == dtype::bf16);
  CHECK(qr.read<qmem::bf16>("model.norm.weight") == dr.read<qmem::bf16>("model.norm.weight"));

  auto const ins = qmem_run({"inspect", q8.string()});
  CHECK(ins.rc == 0);
  CHECK(ins.out.find("(14 quantized)") != std::string::npos);
  auto const line_at = ins.out.find("model.layers.0.self_attn.q_proj.weight");
  REQUIRE(line_at != std::string::npos);
  auto const line = ins.out.substr(line_at, ins.out.find('\n', line_at) - line_at);
  CHECK(line.find(" I8 ") != std::string::npos);
  CHECK(line.find(" int8 ") != std::string::npos);
  CHECK(line.find(" row ") != std::string::npos);

  // dequantize: F16 by default (what bitsandbytes quantized from), --dtype otherwise; the values
  // are the library's, and close to the input
  for (char const* type : {"", "bf16"}) {
    CAPTURE(type);
    auto const back = tmp.path / "back.safetensors";
    std::vector<std::string> args{"dequantize"};
    if (*type != 0)
      args.insert(args.end(), {"--dtype", type});
    args.insert(args.end(), {q8.string(), back.string()});
    REQUIRE(qmem_run(args).rc == 0);
    safetensors_reader br(back);
    CHECK(br.tensors().size() == dr.tensors().size());
    for (auto const& name : weights) {
      CAPTURE(name);
      auto const w = qmem::io::read_int8_weight(qr, name);
      auto const x = dr.read<qmem::bf16>(name);
      double err = 0, norm = 0;
      if (*type == 0) {
        CHECK(br.at(name).type == dtype::f16);
        auto const y = br.read<qmem::f16>(name);
        CHECK(y == w.dequantize<qmem::f16>());
        for (std::size_t k = 0; k < x.size(); ++k) {
          double const d = static_cast<double>(y[k].to_float()) - x[k].to_float();
          err += d * d;
          norm += static_cast<double>(x[k].to_float()) * x[k].to_float();
        }
        CHECK(std::sqrt(err / (norm + 1e-30)) < 0.02);
      } else {
        CHECK(br.at(name).type == dtype::bf16);
        CHECK(br.read<qmem::bf16>(name) == w.dequantize<qmem::bf16>());
      }
    }
  }

  // a file from bitsandbytes < 0.43.1 (no weight_format) reads the same
  auto const old = tmp.path / "old.safetensors";
  {
    qmem::io::safetensors_writer w;
    for (auto const& [k, v] : qr.metadata())
      w.set_metadata(k, v);
    for (auto const& e : qr.tensors())
      if (!e.name.ends_with(".weight_format"))
        w.add(e.name, e.type, e.shape, qr.bytes(e));
    w.save(old);
  }
  auto const b1 = tmp.path / "b1.safetensors", b2 = tmp.path / "b2.safetensors";
  REQUIRE(qmem_run({"dequantize", q8.string(), b1.string()}).rc == 0);
  REQUIRE(qmem_run({"dequantize", old.string(), b2.string()}).rc == 0);
  CHECK(slurp(b1) == slurp(b2));

  // quantizing an int8 checkpoint again leaves its int8 weights as they are
  auto const again = tmp.path / "again.safetensors";
  REQUIRE(qmem_run({"quantize", "--format", "nf4", q8.string(), again.string()}).rc == 0);
  CHECK(slurp(again) == slurp(q8));

  // a weight_format other than row-major is refused, naming the layout
  auto const tiled = tmp.path / "tiled.safetensors";
  {
    qmem::io::safetensors_writer w;
    std::vector<std::uint8_t> const col32 = {1};
    for (auto const& e : qr.tensors())
      if (e.name == "model.layers.0.mlp.up_proj.weight_format")
        w.add(e.name, e.type, e.shape, std::as_bytes(std::span(col32)));
      else
        w.add(e.name, e.type, e.shape, qr.bytes(e));
    w.save(tiled);
  }
  auto const out = tmp.path / "o.safetensors";
  auto const res = qmem_run({"dequantize", tiled.string(), out.string()});
  CHECK(res.rc == 1);
  CHECK(res.err.find("col32") != std::string::npos);
  CHECK(!fs::exists(out));
}

TEST_CASE("cli: bad arguments and corrupt files give one line and a non-zero exit") {
  scratch_dir tmp;
  auto const model = (data_dir() / "tiny_llama_nf4_dq" / "model.safetensors").string();
  auto const out = (tmp.path / "o.safetensors").string();
  struct bad_case {
    std::vector<std::string> args;
    int rc;
    char const* says;
  };
  std::vector<bad_case> const cases{
      {{}, 2, "no command"},
      {{"frobnicate"}, 2, "unknown command"},
      {{"inspect"}, 2, "one FILE"},
      {{"quantize", model, out}, 2, "--format"},
      {{"quantize", "--format", "nf3", model, out}, 2, "nf3"},
      {{"quantize", "--format", "nf4", "--block", "48", model, out}, 2, "48"},
      {{"quantize", "--format", "int8", "--block", "256", model, out}, 2, "--block does not apply"},
      {{"quantize", "--format", "int8", "--double-quant", model, out}, 2, "does not apply"},
      {{"quantize", "--format", "int8", "--only", "norm", model, out}, 2, "narrow --only"},
      {{"quantize", "--format", "nf4", "--block", "x", model, out}, 2, "positive integer"},
      {{"quantize", "--format", "nf4", "--only", "(", model, out}, 2, "regular expression"},
      {{"quantize", "--format", "nf4", model}, 2, "IN and OUT"},
      {{"quantize", "--format", "nf4", "--bogus", model, out}, 2, "--bogus"},
      {{"quantize", "--format"}, 2, "needs a value"},
      {{"dequantize", "--dtype", "f8", model, out}, 2, "f8"},
      {{"dequantize", model, model}, 2, "same file"},
      {{"inspect", "/nonexistent.safetensors"}, 1, "cannot open"},
      {{"dequantize", "/nonexistent.safetensors", out}, 1, "cannot open"},
  };
  for (auto const& c : cases) {
    std::string joined;
    for (auto const& a : c.args)
      joined += a + " ";
    CAPTURE(joined);
    auto const r = qmem_run(c.args);
    CHECK(r.rc == c.rc);
    CHECK(lines(r.err) == 1);
    CHECK(r.err.starts_with("qmem: error: "));
    CHECK(r.err.find(c.says) != std::string::npos);
    CHECK(r.out.empty());
    CHECK(!fs::exists(out));
  }
  CHECK(qmem_run({"--help"}).rc == 0);
  auto const version = qmem_run({"--version"});
  CHECK(version.rc == 0);
  CHECK(version.out == "qmem " + std::to_string(QMEM_VERSION_MAJOR) + "." +
                           std::to_string(QMEM_VERSION_MINOR) + "." +
                           std::to_string(QMEM_VERSION_PATCH) + "\n");

  // a truncated file and a file with a corrupted header
  auto const bytes = slurp(model);
  std::ofstream(tmp.path / "cut.safetensors", std::ios::binary)
      << bytes.substr(0, bytes.size() / 2);
  auto corrupt = bytes;
  corrupt[20] = '#';
  std::ofstream(tmp.path / "bad.safetensors", std::ios::binary) << corrupt;
  for (auto const* name : {"cut.safetensors", "bad.safetensors"}) {
    CAPTURE(name);
    auto const f = (tmp.path / name).string();
    for (auto const& args : std::vector<std::vector<std::string>>{
             {"inspect", f}, {"dequantize", f, out}, {"quantize", "--format", "nf4", f, out}}) {
      auto const r = qmem_run(args);
      CHECK(r.rc == 1);
      CHECK(lines(r.err) == 1);
      CHECK(r.err.find("not a valid safetensors file") != std::string::npos);
      CHECK(!fs::exists(out));
    }
  }
  // a valid file whose bnb weight is broken: nothing is written
  {
    safetensors_reader r(model);
    qmem::io::safetensors_writer w;
    for (auto const& e : r.tensors())
      if (e.name != "model.layers.0.mlp.up_proj.weight.nested_absmax")
        w.add(e.name, e.type, e.shape, r.bytes(e));
    w.save(tmp.path / "missing.safetensors");
    auto const res = qmem_run({"dequantize", (tmp.path / "missing.safetensors").string(), out});
    CHECK(res.rc == 1);
    CHECK(res.err.find("nested_absmax") != std::string::npos);
    CHECK(!fs::exists(out));
    CHECK(std::distance(fs::directory_iterator(tmp.path), {}) == 3); // no temporary left
  }
}
