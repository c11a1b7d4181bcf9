// qmem: inspect, quantize and dequantize safetensors checkpoints (single files or sharded
// `*.safetensors.index.json` checkpoints) in bitsandbytes' layout.
//
//   qmem inspect FILE
//   qmem quantize --format nf4|fp4|int8 [--block N] [--double-quant] [--only REGEX] IN OUT
//   qmem dequantize [--dtype bf16|f16|f32] IN OUT
//
// Files are read through memory mappings and written a tensor at a time (streaming writer), so a
// checkpoint larger than RAM converts with about one tensor in memory. On any error the tool
// prints one line `qmem: error: <reason>` and exits non-zero (2 for usage errors); outputs are
// written atomically (a sharded run commits its shards together once all are written), so a
// failed run leaves no partial file behind. See docs/cli.md.

#include <qmem/io.hpp>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <string_view>
#include <unistd.h>
#include <variant>
#include <vector>

#include "checkpoint.hpp"

namespace qmem::cli {
namespace {

constexpr char const* usage_text =
    "usage:\n"
    "  qmem inspect FILE\n"
    "  qmem quantize --format nf4|fp4|int8 [--block N] [--double-quant] [--only REGEX] IN OUT\n"
    "  qmem dequantize [--dtype bf16|f16|f32] IN OUT\n"
    "FILE, IN and OUT are .safetensors files or sharded checkpoints (*.safetensors.index.json).\n"
    "quantize: nf4/fp4 write the tensors transformers saves for bitsandbytes 4-bit weights; int8\n"
    "  writes bitsandbytes' LLM.int8 tensors (Linear8bitLt / load_in_8bit: P.weight I8, P.SCB,\n"
    "  P.weight_format; docs/io.md). --block (nf4/fp4 only): 64 by default; --double-quant:\n"
    "  nf4/fp4 only. Without --only, 2-D floating tensors named *.weight are quantized except\n"
    "  embeddings and lm_head (as transformers does); --only REGEX selects floating tensors whose\n"
    "  name matches instead (int8: each must be 2-D and named *.weight). Other tensors are copied\n"
    "  unchanged.\n"
    "dequantize: every bitsandbytes/qmem quantized weight back to floats (the weight's original\n"
    "  dtype, f16 for int8 weights, unless --dtype says otherwise); other tensors are copied\n"
    "  unchanged.\n";

//! A command-line mistake: exit status 2.
struct usage_error : error {
  using error::error;
};

//! The progress line on a terminal: tensors, bytes, rate. Silent when stderr is not a terminal.
class progress {
  bool on_;
  std::string what_;
  std::size_t tensors_ = 0;
  std::uint64_t bytes_total_ = 0, bytes_ = 0;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();

public:
  progress(std::string what, std::uint64_t bytes)
      : on_(::isatty(2) != 0), what_(std::move(what)), bytes_total_(bytes) {}
  void step(std::uint64_t bytes) {
    ++tensors_;
    bytes_ += bytes;
    if (!on_)
      return;
    double const s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    std::fprintf(stderr, "\r%s: %zu tensors written, %.1f/%.1f MB read, %.1f MB/s   ",
                 what_.c_str(), tensors_, static_cast<double>(bytes_) / 1e6,
                 static_cast<double>(bytes_total_) / 1e6,
                 s > 0 ? static_cast<double>(bytes_) / 1e6 / s : 0.0);
    std::fflush(stderr);
  }
  void done() {
    if (on_)
      std::fprintf(stderr, "\n");
  }
};

std::string shape_string(std::span<std::int64_t const> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

//! Calls f(T{}) with the C++ type of a floating dtype.
template <class F>
decltype(auto) with_float_type(dtype t, F&& f) {
  switch (t) {
  case dtype::f32: return f(float{});
  case dtype::f16: return f(f16{});
  case dtype::bf16: return f(bf16{});
  case dtype::f64: return f(double{});
  default: qmem::detail::raise("not a floating dtype: ", dtype_name(t));
  }
}

//! The quantized weights of a shard (bnb 4-bit and qmem's blockwise int8 with a quant state;
//! bnb LLM.int8 with an SCB) and the keys their auxiliary tensors use.
struct bnb_keys {
  std::set<std::string, std::less<>> weights;            // quant-state weights
  std::set<std::string, std::less<>> int8_weights;       // LLM.int8 weights
  std::map<std::string, std::string, std::less<>> owner; // aux key -> weight

  explicit bnb_keys(io::safetensors_reader const& r) {
    for (auto& w : io::bnb_weight_names(r))
      weights.insert(w);
    for (auto& w : io::int8_weight_names(r))
      if (!weights.contains(w))
        int8_weights.insert(w);
    for (auto const& e : r.tensors()) {
      for (auto const& w : weights)
        if (io::is_bnb_aux_key(e.name, w))
          owner.emplace(e.name, w);
      for (auto const& w : int8_weights)
        if (io::is_int8_aux_key(e.name, w))
          owner.emplace(e.name, w);
    }
  }
  [[nodiscard]] bool is_aux(std::string_view key) const { return owner.contains(key); }
  [[nodiscard]] bool is_weight(std::string_view key) const { return weights.contains(key); }
  [[nodiscard]] bool is_int8(std::string_view key) const { return int8_weights.contains(key); }
};

//! One quantized weight the quantize command writes: bnb 4-bit or LLM.int8.
struct quantized_weight {
  std::variant<io::bnb_weight, io::int8_weight> w;

  [[nodiscard]] std::string const& name() const {
    return std::visit([](auto const& x) -> std::string const& { return x.name; }, w);
  }
  [[nodiscard]] std::vector<std::pair<io::tensor_spec, std::span<std::byte const>>>
  tensors() const {
    return std::visit([](auto const& x) { return x.tensors(); }, w);
  }
  [[nodiscard]] std::size_t stored_bytes() const {
    return std::visit([](auto const& x) { return x.stored_bytes(); }, w);
  }
  //! Bytes of the codes (the tensor named name()).
  [[nodiscard]] std::size_t code_bytes() const {
    return std::visit([](auto const& x) { return x.codes.bytes.size(); }, w);
  }
  //! Throws bad_argument unless the weight is what the readers accept (qmem's own quantization
  //! always is: a library defect, never a user's, would trip this before a file is written).
  void check_readable() const {
    std::visit([](auto const& x) { x.check_readable("qmem quantize"); }, w);
  }
  //! Frees the codes (kept: the small tensors).
  void drop_codes() {
    std::visit([](auto& x) { std::vector<std::byte>().swap(x.codes.bytes); }, w);
  }
};

// --- inspect --------------------------------------------------------------------------------

int inspect(std::vector<std::string> const& args) {
  if (args.size() != 1)
    throw usage_error("inspect takes one FILE; got " + std::to_string(args.size()) + " arguments");
  auto const ck = checkpoint::open(args[0]);
  struct row {
    std::string name, type, shape, format = "-", block = "-", nested = "-";
    std::uint64_t bytes = 0, numel = 0;
    double bits = 0;
  };
  std::vector<row> rows;
  std::uint64_t total_bytes = 0, total_numel = 0;
  std::size_t quantized = 0;
  for (auto const& sh : ck.shards) {
    auto const& r = sh.reader;
    bnb_keys const keys(r);
    for (auto const& e : r.tensors()) {
      total_bytes += e.nbytes();
      if (keys.is_aux(e.name))
        continue;
      row x;
      x.name = e.name;
      if (keys.is_int8(e.name)) {
        auto const w = io::read_int8_weight(r, e.name);
        r.release(e);
        x.type = std::string(dtype_name(e.type));
        x.shape = shape_string(w.shape());
        x.format = "int8";
        x.block = "row";
        x.nested = "no";
        x.bytes = w.stored_bytes();
        x.numel = w.numel();
        x.bits = w.bits_per_parameter();
        ++quantized;
      } else if (keys.is_weight(e.name)) {
        auto const w = io::read_bnb_weight(r, e.name);
        r.release(e); // validated; its pages are not needed again
        x.type = std::string(dtype_name(w.state.type));
        x.shape = shape_string(w.state.shape);
        x.format = std::string(io::to_string(w.format()));
        x.block = std::to_string(w.state.blocksize);
        x.nested = w.state.nested ? "yes" : "no";
        x.bytes = w.stored_bytes();
        x.numel = w.numel();
        x.bits = w.bits_per_parameter();
        ++quantized;
      } else {
        x.type = std::string(dtype_name(e.type));
        x.shape = shape_string(e.shape);
        x.bytes = e.nbytes();
        x.numel = e.numel();
        x.bits = 8.0 * static_cast<double>(dtype_size(e.type));
      }
      total_numel += x.numel;
      rows.push_back(std::move(x));
    }
  }
  std::size_t w_name = 4, w_shape = 5;
  for (auto const& x : rows) {
    w_name = std::max(w_name, x.name.size());
    w_shape = std::max(w_shape, x.shape.size());
  }
  std::printf("%s: %zu shard%s, %zu tensors (%zu quantized)\n", args[0].c_str(), ck.shards.size(),
              ck.shards.size() == 1 ? "" : "s", rows.size(), quantized);
  std::printf("%-*s  %-7s  %-*s  %-6s  %5s  %-6s  %12s  %10s\n", static_cast<int>(w_name), "name",
              "dtype", static_cast<int>(w_shape), "shape", "format", "block", "nested", "bytes",
              "bits/param");
  for (auto const& x : rows)
    std::printf("%-*s  %-7s  %-*s  %-6s  %5s  %-6s  %12llu  %10.3f\n", static_cast<int>(w_name),
                x.name.c_str(), x.type.c_str(), static_cast<int>(w_shape), x.shape.c_str(),
                x.format.c_str(), x.block.c_str(), x.nested.c_str(),
                static_cast<unsigned long long>(x.bytes), x.bits);
  std::printf(
      "total: %zu tensors, %llu parameters, %llu bytes, %.3f bits/param\n", rows.size(),
      static_cast<unsigned long long>(total_numel), static_cast<unsigned long long>(total_bytes),
      total_numel ? 8.0 * static_cast<double>(total_bytes) / static_cast<double>(total_numel)
                  : 0.0);
  return 0;
}

// --- conversions ------------------------------------------------------------------------------

//! One output tensor and where it comes from.
struct output_item {
  io::tensor_spec spec;
  io::tensor_entry const* source = nullptr; // the input tensor (copied, or the weight converted)
  bool converted = false;                   // false: copy source's bytes
};

//! Reads a floating input tensor as T values: a view of the mapping when aligned, else a copy.
template <class T>
tensor_view<T const> values_of(io::safetensors_reader const& r, io::tensor_entry const& e,
                               std::vector<T>& storage) {
  auto const b = r.bytes(e);
  if (reinterpret_cast<std::uintptr_t>(b.data()) % alignof(T) == 0)
    return {reinterpret_cast<T const*>(b.data()), e.numel()};
  storage.resize(e.numel());
  std::memcpy(storage.data(), b.data(), b.size());
  return view(std::as_const(storage));
}

struct quantize_options {
  io::bnb_format format = io::bnb_format::nf4;
  std::size_t block = 0;
  bool nested = false;
  std::optional<std::regex> only;
};

//! Memory the quantize command may spend on keeping scales, tables and quant states between its
//! planning and writing passes (beyond it they are recomputed): 256 MB covers the scales of a
//! checkpoint of ~8 G parameters at block 64.
constexpr std::size_t small_budget = std::size_t{256} << 20;

bool default_selected(io::tensor_entry const& e) {
  return e.shape.size() == 2 && e.name.ends_with(".weight") &&
         e.name.find("embed") == std::string::npos && e.name.find("lm_head") == std::string::npos;
}

quantized_weight quantize_entry(io::safetensors_reader const& r, io::tensor_entry const& e,
                                quantize_options const& o) {
  return with_float_type(e.type, [&]<class T>(T) {
    std::vector<T> storage;
    auto const x = values_of<T>(r, e, storage);
    if (o.format == io::bnb_format::int8)
      return quantized_weight{io::quantize_int8(exec::host{}, e.name, x, e.shape)};
    return quantized_weight{
        io::quantize_bnb(exec::host{}, e.name, o.format, x, e.shape, o.block, o.nested)};
  });
}

//! Throws when `e` cannot be stored in bitsandbytes' LLM.int8 layout (a linear layer's weight).
void check_int8_selectable(io::tensor_entry const& e) {
  if (e.shape.size() != 2 || !io::int8_prefix(e.name))
    throw usage_error("--format int8 stores linear weights (2-D, named *.weight) as bitsandbytes' "
                      "Linear8bitLt does; '" +
                      e.name + "' is " + shape_string(e.shape) + ": narrow --only");
}

//! Output shards written to their temporary files, not yet renamed into place: a run commits
//! them all once every shard is written, so an error in a later shard leaves no output shard
//! (and an earlier run's output in OUT's directory stays whole, not half replaced).
using pending_shards = std::vector<std::unique_ptr<io::safetensors_stream_writer>>;

//! Writes one output shard: `items` in the reference order, converting with `convert` (which
//! returns the bytes of a converted item; it may cache per source weight), into a temporary file
//! added to `pending` (the caller commits it). Returns the bytes of its tensors.
template <class Convert>
std::uint64_t write_shard(fs::path const& out, io::safetensors_reader const& r,
                          std::vector<output_item> items, Convert&& convert, progress& p,
                          pending_shards& pending) {
  std::ranges::stable_sort(items, [](output_item const& a, output_item const& b) {
    int const ra = io::detail::reference_rank(a.spec.type),
              rb = io::detail::reference_rank(b.spec.type);
    return ra != rb ? ra > rb : a.spec.name < b.spec.name;
  });
  std::vector<io::tensor_spec> specs;
  for (auto const& it : items)
    specs.push_back(it.spec);
  r.advise_sequential();
  auto& w = *pending.emplace_back(
      std::make_unique<io::safetensors_stream_writer>(out, specs, r.metadata()));
  std::uint64_t const total = w.tensors().empty() ? 0 : w.tensors().back().end;
  std::set<io::tensor_entry const*> done;
  for (auto const& it : items) {
    if (it.converted)
      w.write(convert(it));
    else
      w.write(r.bytes(*it.source));
    // input bytes count once per source tensor (a quantized weight makes several outputs)
    p.step(done.insert(it.source).second ? it.source->nbytes() : 0);
    r.release(*it.source); // keep the resident set at about one tensor
  }
  return total;
}

//! Output paths: OUT itself, or for a sharded IN, OUT's directory + each shard's file name.
std::vector<fs::path> output_paths(checkpoint const& in, fs::path const& in_path,
                                   fs::path const& out) {
  if (in.sharded != is_index(out))
    throw usage_error(in.sharded ? "IN is a sharded checkpoint (*.index.json); OUT must be one too"
                                 : "IN is a single file; OUT must not be an *.index.json");
  if (!in.sharded)
    return {out};
  auto const out_dir = out.has_parent_path() ? out.parent_path() : fs::path(".");
  auto const in_dir = in_path.has_parent_path() ? in_path.parent_path() : fs::path(".");
  std::error_code ec;
  if (fs::equivalent(out_dir, in_dir, ec))
    throw usage_error("OUT's directory is IN's directory: the output shards would replace the "
                      "input shards; choose another directory");
  if (!fs::is_directory(out_dir))
    throw io_error("the output directory '" + out_dir.string() + "' does not exist");
  std::vector<fs::path> paths;
  for (auto const& s : in.shards)
    paths.push_back(out_dir / s.file);
  return paths;
}

template <class Plan>
int convert_checkpoint(std::string const& verb, std::string const& in_path,
                       std::string const& out_path, Plan&& plan) {
  auto const in = checkpoint::open(in_path);
  auto const outs = output_paths(in, in_path, out_path);
  if (!in.sharded) {
    std::error_code ec;
    if (fs::equivalent(in_path, out_path, ec))
      throw usage_error("IN and OUT are the same file");
  }
  std::uint64_t bytes = 0;
  for (auto const& s : in.shards)
    bytes += s.reader.data_size();
  progress p("qmem " + verb, bytes);
  std::map<std::string, std::string> weight_map;
  std::uint64_t total_size = 0;
  pending_shards pending; // destroyed uncommitted on an error: their temporaries are removed
  for (std::size_t i = 0; i < in.shards.size(); ++i) {
    auto const names = plan(in.shards[i].reader, outs[i], p, total_size, pending);
    for (auto const& n : names)
      weight_map[n] = in.shards[i].file;
  }
  p.done();
  for (auto& w : pending)
    w->commit();
  if (in.sharded)
    write_index(out_path, in.index_metadata, total_size, weight_map);
  return 0;
}

int quantize(std::vector<std::string> const& args, quantize_options o) {
  if (args.size() != 2)
    throw usage_error("quantize takes IN and OUT; got " + std::to_string(args.size()) +
                      " arguments");
  if (o.format == io::bnb_format::int8) {
    if (o.block != 0)
      throw usage_error("--block does not apply to --format int8 (one scale per row)");
    if (o.nested)
      throw usage_error("--double-quant does not apply to --format int8 (bitsandbytes' "
                        "LLM.int8 keeps its row scales in F32)");
  }
  if (o.block == 0)
    o.block = 64;
  if (o.format != io::bnb_format::int8 && !quant::valid_block_size<quant::nf4>(o.block))
    throw usage_error("--block " + std::to_string(o.block) +
                      " is not a power of two in [32, 4096] for " +
                      std::string(io::to_string(o.format)));
  return convert_checkpoint(
      "quantize", args[0], args[1],
      [&](io::safetensors_reader const& r, fs::path const& out, progress& p, std::uint64_t& total,
          pending_shards& pending) {
        bnb_keys const keys(r);
        std::vector<output_item> items;
        std::map<std::string, quantized_weight, std::less<>> smalls;
        std::size_t small_bytes = 0;
        for (auto const& e : r.tensors()) {
          bool const selectable = is_floating(e.type) && e.numel() != 0 && !keys.is_aux(e.name) &&
                                  !keys.is_weight(e.name) && !keys.is_int8(e.name);
          bool const selected =
              selectable && (o.only ? std::regex_search(e.name, *o.only) : default_selected(e));
          if (!selected) {
            items.push_back({{e.name, e.type, e.shape}, &e, false});
            continue;
          }
          if (o.format == io::bnb_format::int8)
            check_int8_selectable(e);
          // the quant-state JSON's length depends on the data (nested_offset): plan with one
          // quantization, convert with another (deterministic: the same bytes)
          auto w = quantize_entry(r, e, o);
          r.release(e);
          w.check_readable();
          for (auto const& [spec, bytes] : w.tensors())
            items.push_back({spec, &e, true});
          // keep the small tensors (scales, tables, state: ~3% of the input at block 64) while
          // they fit the budget, so the write pass quantizes each weight once more (for its
          // codes) instead of once per dtype section of the output
          std::size_t const small = w.stored_bytes() - w.code_bytes();
          if (small_bytes + small <= small_budget) {
            small_bytes += small;
            w.drop_codes();
            smalls.emplace(e.name, std::move(w));
          }
        }
        std::optional<quantized_weight> cache;
        std::vector<std::string> names;
        for (auto const& it : items)
          names.push_back(it.spec.name);
        total += write_shard(
            out, r, std::move(items),
            [&](output_item const& it) -> std::span<std::byte const> {
              quantized_weight const* w = nullptr;
              if (auto const found = smalls.find(it.source->name);
                  found != smalls.end() && it.spec.name != it.source->name)
                w = &found->second;
              if (w == nullptr) {
                if (!cache || cache->name() != it.source->name)
                  cache = quantize_entry(r, *it.source, o);
                w = &*cache;
              }
              for (auto const& [spec, bytes] : w->tensors())
                if (spec.name == it.spec.name) {
                  if (bytes.size() != io::detail::checked_nbytes(it.spec.shape, it.spec.type))
                    throw error("internal: the second quantization of '" + it.source->name +
                                "' differs in size from the first");
                  return bytes;
                }
              throw error("internal: no tensor '" + it.spec.name + "' in the quantization");
            },
            p, pending);
        return names;
      });
}

int dequantize(std::vector<std::string> const& args, std::optional<dtype> out_type) {
  if (args.size() != 2)
    throw usage_error("dequantize takes IN and OUT; got " + std::to_string(args.size()) +
                      " arguments");
  return convert_checkpoint(
      "dequantize", args[0], args[1],
      [&](io::safetensors_reader const& r, fs::path const& out, progress& p, std::uint64_t& total,
          pending_shards& pending) {
        bnb_keys const keys(r);
        std::vector<output_item> items;
        for (auto const& e : r.tensors()) {
          if (keys.is_aux(e.name))
            continue;
          if (keys.is_int8(e.name)) {
            auto const w = io::read_int8_weight(r, e.name); // validates up front
            r.release(e);
            items.push_back({{e.name, out_type.value_or(dtype::f16), w.shape()}, &e, true});
            continue;
          }
          if (!keys.is_weight(e.name)) {
            items.push_back({{e.name, e.type, e.shape}, &e, false});
            continue;
          }
          auto const w = io::read_bnb_weight(r, e.name); // validates the whole weight up front
          r.release(e);
          items.push_back({{e.name, out_type.value_or(w.state.type), w.state.shape}, &e, true});
        }
        std::vector<std::string> names;
        for (auto const& it : items)
          names.push_back(it.spec.name);
        std::vector<std::byte> buffer;
        total += write_shard(
            out, r, std::move(items),
            [&](output_item const& it) -> std::span<std::byte const> {
              auto dequantize_into = [&](auto const& w) {
                with_float_type(it.spec.type, [&]<class T>(T) {
                  buffer.resize(w.numel() * sizeof(T));
                  w.dequantize(exec::host{},
                               tensor_view<T>(reinterpret_cast<T*>(buffer.data()), w.numel()));
                });
              };
              if (keys.is_int8(it.source->name))
                dequantize_into(io::read_int8_weight(r, it.source->name));
              else
                dequantize_into(io::read_bnb_weight(r, it.source->name));
              return buffer;
            },
            p, pending);
        return names;
      });
}

// --- arguments --------------------------------------------------------------------------------

//! Splits `--name=value` and `--name value`; returns the positional arguments.
struct parsed_args {
  std::map<std::string, std::string> options; // name -> value ("" for flags)
  std::vector<std::string> positional;
};

parsed_args parse(std::vector<std::string> const& argv, std::set<std::string> const& with_value,
                  std::set<std::string> const& flags) {
  parsed_args p;
  for (std::size_t i = 0; i < argv.size(); ++i) {
    std::string a = argv[i];
    if (a == "--") {
      p.positional.insert(p.positional.end(), argv.begin() + static_cast<std::ptrdiff_t>(i) + 1,
                          argv.end());
      break;
    }
    if (!a.starts_with("--")) {
      p.positional.push_back(a);
      continue;
    }
    std::string value;
    bool has_value = false;
    if (auto const eq = a.find('='); eq != std::string::npos) {
      value = a.substr(eq + 1);
      a = a.substr(0, eq);
      has_value = true;
    }
    if (flags.contains(a)) {
      if (has_value)
        throw usage_error(a + " takes no value");
      p.options[a] = "";
    } else if (with_value.contains(a)) {
      if (!has_value) {
        if (i + 1 >= argv.size())
          throw usage_error(a + " needs a value");
        value = argv[++i];
      }
      p.options[a] = value;
    } else {
      throw usage_error("unknown option " + a);
    }
  }
  return p;
}

int run(std::vector<std::string> const& argv) {
  if (argv.empty())
    throw usage_error("no command; expected inspect, quantize or dequantize");
  std::string const cmd = argv[0];
  std::vector<std::string> const rest(argv.begin() + 1, argv.end());
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::fputs(usage_text, stdout);
    return 0;
  }
  if (cmd == "--version") { // the library's version (core/config.hpp), not a copy of it
    std::printf("qmem %d.%d.%d\n", QMEM_VERSION_MAJOR, QMEM_VERSION_MINOR, QMEM_VERSION_PATCH);
    return 0;
  }
  if (cmd == "inspect") {
    auto const p = parse(rest, {}, {});
    return inspect(p.positional);
  }
  if (cmd == "quantize") {
    auto const p = parse(rest, {"--format", "--block", "--only"}, {"--double-quant"});
    quantize_options o;
    if (!p.options.contains("--format"))
      throw usage_error("quantize needs --format nf4|fp4|int8");
    auto const& f = p.options.at("--format");
    if (f == "nf4")
      o.format = io::bnb_format::nf4;
    else if (f == "fp4")
      o.format = io::bnb_format::fp4;
    else if (f == "int8")
      o.format = io::bnb_format::int8;
    else
      throw usage_error("--format is '" + f + "'; expected nf4, fp4 or int8");
    if (p.options.contains("--block")) {
      auto const& b = p.options.at("--block");
      std::size_t v = 0;
      auto const [ptr, ec] = std::from_chars(b.data(), b.data() + b.size(), v);
      if (ec != std::errc{} || ptr != b.data() + b.size() || v == 0)
        throw usage_error("--block is '" + b + "'; expected a positive integer");
      o.block = v;
    }
    o.nested = p.options.contains("--double-quant");
    if (p.options.contains("--only")) {
      try {
        o.only = std::regex(p.options.at("--only"), std::regex::ECMAScript);
      } catch (std::regex_error const& e) {
        throw usage_error("--only '" + p.options.at("--only") +
                          "' is not a valid regular "
                          "expression: " +
                          e.what());
      }
    }
    return quantize(p.positional, std::move(o));
  }
  if (cmd == "dequantize") {
    auto const p = parse(rest, {"--dtype"}, {});
    std::optional<dtype> t;
    if (p.options.contains("--dtype")) {
      auto const& d = p.options.at("--dtype");
      if (d == "bf16")
        t = dtype::bf16;
      else if (d == "f16")
        t = dtype::f16;
      else if (d == "f32")
        t = dtype::f32;
      else
        throw usage_error("--dtype is '" + d + "'; expected bf16, f16 or f32");
    }
    return dequantize(p.positional, t);
  }
  throw usage_error("unknown command '" + cmd + "'; expected inspect, quantize or dequantize");
}

//! The message on one line.
std::string one_line(std::string s) {
  std::ranges::replace(s, '\n', ' ');
  return s;
}

} // namespace
} // namespace qmem::cli

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  try {
    return qmem::cli::run(args);
  } catch (qmem::cli::usage_error const& e) {
    std::fprintf(stderr, "qmem: error: %s (see qmem --help)\n",
                 qmem::cli::one_line(e.what()).c_str());
    return 2;
  } catch (std::exception const& e) {
    std::fprintf(stderr, "qmem: error: %s\n", qmem::cli::one_line(e.what()).c_str());
    return 1;
  }
}
