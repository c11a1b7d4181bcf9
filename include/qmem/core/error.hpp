#pragma once
//! \file
//! The error types qmem throws from host code, and the precondition-check macro.
//! Device code never throws; kernels report through status words the host then checks.

#include <qmem/core/config.hpp>

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace qmem {

//! Base of every exception qmem throws. The message names what was wrong and what was expected.
class error : public std::runtime_error {
public:
  using std::runtime_error::runtime_error;
};

//! A caller broke a documented precondition: a bad size, shape, pointer, block size, code...
//! Nothing was written when this is thrown.
class bad_argument : public error {
public:
  using error::error;
};

//! A CUDA runtime or driver call failed; `code()` is the cudaError_t value as an int.
class cuda_error : public error {
  int code_;

public:
  cuda_error(std::string const& what, int code) : error(what), code_(code) {}
  [[nodiscard]] int code() const noexcept { return code_; }
};

//! An operating-system I/O call failed (open, read, write, rename, mmap).
class io_error : public error {
public:
  using error::error;
};

//! A file's contents are malformed or hostile (bad header, offsets outside the file, wrong
//! sizes, unknown dtype). Thrown before anything is written to the caller's objects.
class format_error : public io_error {
public:
  using io_error::io_error;
};

namespace detail {

//! Concatenates the streamable arguments into one message.
template <class... Args>
[[nodiscard]] std::string message(Args const&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

template <class Error = bad_argument, class... Args>
[[noreturn]] void raise(Args const&... args) {
  throw Error(message(args...));
}

} // namespace detail
} // namespace qmem

//! Checks a precondition of a public function; on failure throws qmem::bad_argument whose message
//! is `function: <streamed message>`. The message arguments are only evaluated on failure.
//! A macro (not a function) so that the message costs nothing on the success path.
#define QMEM_EXPECTS(cond, ...)                                                                    \
  do {                                                                                             \
    if (!(cond)) [[unlikely]]                                                                      \
      ::qmem::detail::raise<::qmem::bad_argument>(__func__, ": ", __VA_ARGS__);                    \
  } while (false)

//! Internal invariant, checked only with QMEM_DEBUG (hot loops).
#if QMEM_DEBUG
#define QMEM_ASSERT(cond)                                                                          \
  do {                                                                                             \
    if (!(cond))                                                                                   \
      ::qmem::detail::raise<::qmem::error>(__FILE__, ":", __LINE__,                                \
                                           ": internal check failed: ", #cond);                    \
  } while (false)
#else
#define QMEM_ASSERT(cond) ((void)0)
#endif
