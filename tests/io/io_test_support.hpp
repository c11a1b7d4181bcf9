#pragma once
// Support shared by the io tests (bnb_test, bnb_int8_test, safetensors_test, and cli_driver, which
// examples/qmem_cli/CMakeLists.txt builds into qmem_cli_tests): the test data directory,
// whole-file reads and a scratch directory removed at scope exit; `using namespace
// qmem::test::io_names;` brings the names every io test uses.
#include <qmem/io.hpp>

#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <unistd.h>
#include <vector>

namespace qmem::test {

//! tests/data (QMEM_TEST_DATA_DIR, set by the build).
inline std::filesystem::path data_dir() { return std::filesystem::path(QMEM_TEST_DATA_DIR); }

//! The bytes of file `p` as a string (empty when it cannot be read).
inline std::string slurp(std::filesystem::path const& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

//! The bytes of file `p` (empty when it cannot be read).
inline std::vector<std::byte> slurp_bytes(std::filesystem::path const& p) {
  std::string const s = slurp(p);
  std::vector<std::byte> out(s.size());
  if (!s.empty())
    std::memcpy(out.data(), s.data(), s.size());
  return out;
}

//! A fresh directory under the system's temporary directory, removed with its contents at scope
//! exit. Unique per process and per instance.
struct scratch_dir {
  std::filesystem::path path;

  scratch_dir() {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("qmem_io_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(path);
  }
  scratch_dir(scratch_dir const&) = delete;
  scratch_dir& operator=(scratch_dir const&) = delete;
  ~scratch_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  //! The number of entries in the directory (temporary files left behind show up here).
  [[nodiscard]] std::size_t entries() const {
    return static_cast<std::size_t>(std::distance(std::filesystem::directory_iterator(path), {}));
  }
};

//! The names the io tests use unqualified (one using-directive per test file).
namespace io_names {
namespace fs = std::filesystem;
using qmem::bf16;
using qmem::dtype;
using qmem::f16;
using qmem::io::bnb_format;
using qmem::io::safetensors_reader;
using qmem::io::safetensors_writer;
using qmem::test::data_dir;
using qmem::test::scratch_dir;
using qmem::test::slurp;
using qmem::test::slurp_bytes;
} // namespace io_names

} // namespace qmem::test
