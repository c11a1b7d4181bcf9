// qmem's error types and the precondition macro: the hierarchy callers catch by, the message
// format (`function: what was wrong`), and that message arguments cost nothing on success.
#include <qmem/core.hpp>

#include <doctest/doctest.h>

#include <stdexcept>
#include <string>
#include <type_traits>

static_assert(std::is_base_of_v<std::runtime_error, qmem::error>);
static_assert(std::is_base_of_v<qmem::error, qmem::bad_argument>);
static_assert(std::is_base_of_v<qmem::error, qmem::cuda_error>);
static_assert(std::is_base_of_v<qmem::error, qmem::io_error>);
static_assert(std::is_base_of_v<qmem::io_error, qmem::format_error>);
static_assert(!std::is_base_of_v<qmem::io_error, qmem::bad_argument>);

namespace {

int evaluations = 0;
int counted(int v) {
  ++evaluations;
  return v;
}

// A public-style function with a documented precondition.
int checked_block_size(int block) {
  QMEM_EXPECTS(block == 64 || block == 128, "block size ", block, " is not one of 64, 128",
               " (argument evaluated ", counted(1), " time)");
  return block;
}

} // namespace

TEST_CASE("QMEM_EXPECTS: passes silently, or throws bad_argument naming function and value") {
  evaluations = 0;
  CHECK(checked_block_size(64) == 64);
  CHECK(evaluations == 0); // the message is not built on success
  try {
    checked_block_size(100);
    FAIL("no exception");
  } catch (qmem::bad_argument const& e) {
    CHECK(std::string(e.what()) ==
          "checked_block_size: block size 100 is not one of 64, 128 (argument evaluated 1 time)");
  }
  CHECK(evaluations == 1);
  // callers can catch at any level of the hierarchy
  CHECK_THROWS_AS(checked_block_size(1), qmem::error);
  CHECK_THROWS_AS(checked_block_size(1), std::runtime_error);
}

TEST_CASE("error types carry their message (and cuda_error its code)") {
  qmem::cuda_error const c("cudaMalloc failed: cudaErrorMemoryAllocation", 2);
  CHECK(c.code() == 2);
  CHECK(std::string(c.what()) == "cudaMalloc failed: cudaErrorMemoryAllocation");
  try {
    throw qmem::format_error("model.safetensors: header length 9999999999 exceeds the file");
  } catch (qmem::io_error const& e) {
    CHECK(std::string(e.what()).find("header length") != std::string::npos);
  }
  CHECK(qmem::detail::message("a", 1, ' ', 2.5, "b") == "a1 2.5b");
  CHECK_THROWS_WITH_AS(qmem::detail::raise<qmem::io_error>("open ", "x.bin", ": denied"),
                       "open x.bin: denied", qmem::io_error);
}
