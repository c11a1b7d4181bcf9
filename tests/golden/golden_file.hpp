#pragma once
// The bitsandbytes golden file the golden tests read: $QMEM_GOLDEN_FILE when set (any file made by
// shared/golden/make_golden.py), else tests/data/bnb_golden_dev.safetensors. Cases are discovered
// from the key names, never listed here.
#include <qmem/io/safetensors.hpp>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace qmem::test {

//! The path of the golden file to read.
inline std::filesystem::path golden_path() {
  if (char const* env = std::getenv("QMEM_GOLDEN_FILE"); env != nullptr && *env != '\0')
    return env;
  return std::filesystem::path(QMEM_TEST_DATA_DIR) / "bnb_golden_dev.safetensors";
}

//! The golden file, opened once per process (the reader is thread-safe for reads).
inline io::safetensors_reader const& golden_file() {
  static io::safetensors_reader const reader(golden_path());
  return reader;
}

//! Every key of the golden file that starts with `prefix`, in file order.
inline std::vector<std::string> golden_keys(std::string_view prefix = {}) {
  std::vector<std::string> keys;
  for (auto const& t : golden_file().tensors())
    if (std::string_view(t.name).substr(0, prefix.size()) == prefix)
      keys.push_back(t.name);
  return keys;
}

//! Splits a key at '.' ("nf4.bf16.n1000.bs64.q" -> {"nf4", "bf16", "n1000", "bs64", "q"}).
inline std::vector<std::string> split_key(std::string_view key) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  while (true) {
    std::size_t const dot = key.find('.', start);
    parts.emplace_back(key.substr(start, dot == std::string_view::npos ? key.npos : dot - start));
    if (dot == std::string_view::npos)
      break;
    start = dot + 1;
  }
  return parts;
}

} // namespace qmem::test
