#pragma once
// A checkpoint as the CLI sees it: one safetensors file, or a sharded checkpoint (an
// `*.safetensors.index.json` naming its shards), each shard opened through a memory mapping.

#include <qmem/io.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace qmem::cli {

namespace fs = std::filesystem;

//! True when `p` names a sharded checkpoint's index (`*.index.json`).
inline bool is_index(fs::path const& p) { return p.string().ends_with(".index.json"); }

//! One shard: its file name (relative to the index's directory) and its reader.
struct shard {
  std::string file;
  io::safetensors_reader reader;
};

//! A checkpoint: its shards in the index's order of first mention (or the one file), and the
//! index's other top-level fields and metadata (kept when writing an output index).
struct checkpoint {
  std::vector<shard> shards;
  nlohmann::json index_metadata =
      nlohmann::json::object(); // the index's "metadata" minus total_size
  bool sharded = false;

  //! Opens `path`. Throws io_error/format_error with a one-line reason.
  static checkpoint open(fs::path const& path) {
    checkpoint c;
    if (!is_index(path)) {
      c.shards.push_back(shard{path.filename().string(), io::safetensors_reader(path)});
      return c;
    }
    c.sharded = true;
    std::ifstream in(path);
    if (!in)
      qmem::detail::raise<io_error>("cannot open '", path.string(), "'");
    std::stringstream ss;
    ss << in.rdbuf();
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(ss.str());
    } catch (nlohmann::json::exception const& e) {
      qmem::detail::raise<format_error>(path.string(), ": the index does not parse: ", e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      qmem::detail::raise<format_error>(path.string(), ": the index has no weight_map object");
    if (j.contains("metadata") && j["metadata"].is_object()) {
      c.index_metadata = j["metadata"];
      c.index_metadata.erase("total_size");
    }
    // shards in a stable order: sorted by file name (the Hub's model-0000N-of-0000M names sort
    // in shard order)
    std::map<std::string, std::set<std::string>> names_by_file;
    for (auto const& [name, file] : j["weight_map"].items()) {
      if (!file.is_string())
        qmem::detail::raise<format_error>(path.string(), ": weight_map entry '", name,
                                          "' is not a file name");
      auto const f = file.get<std::string>();
      if (f.empty() || fs::path(f).has_parent_path() || f == "." || f == "..")
        qmem::detail::raise<format_error>(path.string(), ": weight_map entry '", name, "' names '",
                                          f, "'; expected a file next to the index");
      names_by_file[f].insert(name);
    }
    auto const dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
    for (auto const& [file, names] : names_by_file) {
      io::safetensors_reader r(dir / file);
      // the index and the shard must agree on which tensors the shard holds
      for (auto const& e : r.tensors())
        if (!names.contains(e.name))
          qmem::detail::raise<format_error>(path.string(), ": shard '", file, "' holds '", e.name,
                                            "', which the index does not map to it");
      for (auto const& n : names)
        if (!r.contains(n))
          qmem::detail::raise<format_error>(path.string(), ": the index maps '", n, "' to '", file,
                                            "', which does not hold it");
      c.shards.push_back(shard{file, std::move(r)});
    }
    return c;
  }
};

//! Writes a transformers-style index: {"metadata": {..., "total_size": N}, "weight_map": {...}}
//! with sorted keys and 2-space indentation, atomically.
inline void write_index(fs::path const& path, nlohmann::json metadata, std::uint64_t total_size,
                        std::map<std::string, std::string> const& weight_map) {
  nlohmann::json j;
  metadata["total_size"] = total_size;
  j["metadata"] = std::move(metadata);
  j["weight_map"] = nlohmann::json::object();
  for (auto const& [k, v] : weight_map)
    j["weight_map"][k] = v;
  std::string const text = j.dump(2) + "\n";
  io::detail::atomic_file f(path);
  f.write(std::as_bytes(std::span(text)));
  f.commit();
}

} // namespace qmem::cli
