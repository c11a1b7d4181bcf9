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

  //! The index's JSON, refusing a key repeated within an object (nlohmann keeps the last, so a
  //! tensor the weight_map names twice would silently come from the second file named): throws
  //! format_error naming the key, and for a weight_map entry both files.
  static nlohmann::json parse_index(std::string const& text) {
    using json = nlohmann::json;
    std::vector<std::set<std::string>> keys;   // of each open object
    std::map<std::string, std::string> mapped; // the weight_map's entries so far
    std::string top_key;                       // the top-level key being read
    std::string entry;                         // the weight_map key being read
    bool in_map = false;
    auto const callback = [&](int depth, json::parse_event_t event, json& parsed) -> bool {
      switch (event) {
      case json::parse_event_t::object_start:
        keys.emplace_back();
        if (depth == 1)
          in_map = top_key == "weight_map";
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty())
          keys.pop_back();
        if (depth == 1)
          in_map = false;
        break;
      case json::parse_event_t::key: {
        auto const k = parsed.get<std::string>();
        if (depth == 1)
          top_key = k;
        if (in_map && depth == 2)
          entry = k; // a repeat is reported with both files, at its value
        else if (!keys.empty() && !keys.back().insert(k).second)
          throw format_error("the key '" + k + "' appears twice in an object of the index");
        break;
      }
      case json::parse_event_t::value:
        if (in_map && depth == 2) {
          auto const f = parsed.is_string() ? parsed.get<std::string>() : parsed.dump();
          if (auto const [it, fresh] = mapped.emplace(entry, f); !fresh)
            throw format_error("the weight_map maps '" + entry + "' twice, to '" + it->second +
                               "' and to '" + f + "'; expected one shard per tensor");
        }
        break;
      default: break;
      }
      return true;
    };
    return json::parse(text, callback);
  }

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
      j = parse_index(ss.str());
    } catch (format_error const& e) {
      qmem::detail::raise<format_error>(path.string(), ": ", e.what());
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
    std::map<std::string, std::string> file_of; // tensor name -> the shard holding it
    for (auto const& [file, names] : names_by_file) {
      io::safetensors_reader r(dir / file);
      // a name in two shards: a reader would take one of them silently
      for (auto const& e : r.tensors())
        if (auto const [it, fresh] = file_of.emplace(e.name, file); !fresh)
          qmem::detail::raise<format_error>(path.string(), ": the tensor '", e.name,
                                            "' is in two shards, '", it->second, "' and '", file,
                                            "'; expected each name in one shard");
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
