#pragma once
//! \file
//! POSIX file plumbing for the I/O layer: a read-only memory mapping and an atomically replaced
//! output file (temporary file in the target's directory, fsync, rename, fsync of the directory).

#include <qmem/core/error.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <span>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <utility>

namespace qmem::io::detail {

//! `what 'path': strerror(err)`.
[[noreturn]] inline void raise_errno(char const* what, std::filesystem::path const& path, int err) {
  qmem::detail::raise<io_error>(what, " '", path.string(), "': ", std::strerror(err));
}

//! A whole file mapped read-only (private mapping). An empty file maps to an empty span.
//! The mapping outlives any change to the file's name; truncating the file underneath a live
//! mapping is undefined (SIGBUS), as with every mmap-based reader.
class mapped_file {
  std::byte const* data_ = nullptr;
  std::size_t size_ = 0;

public:
  mapped_file() = default;

  //! Maps `path`. Throws io_error when it cannot be opened, is not a regular file, or mmap fails.
  explicit mapped_file(std::filesystem::path const& path) {
    int const fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
      raise_errno("cannot open", path, errno);
    struct ::stat st {};
    if (::fstat(fd, &st) != 0) {
      int const err = errno;
      ::close(fd);
      raise_errno("cannot stat", path, err);
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      qmem::detail::raise<io_error>("'", path.string(), "' is not a regular file");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ != 0) {
      void* const p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        int const err = errno;
        ::close(fd);
        raise_errno("cannot memory-map", path, err);
      }
      data_ = static_cast<std::byte const*>(p);
    }
    ::close(fd); // the mapping keeps the file alive
  }

  mapped_file(mapped_file&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  mapped_file& operator=(mapped_file&& o) noexcept {
    if (this != &o) {
      unmap();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  mapped_file(mapped_file const&) = delete;
  mapped_file& operator=(mapped_file const&) = delete;
  ~mapped_file() { unmap(); }

  [[nodiscard]] std::span<std::byte const> bytes() const noexcept { return {data_, size_}; }

  //! Tells the kernel the whole mapping will be read once, front to back (MADV_SEQUENTIAL: read
  //! ahead more, and pages behind the reader may be dropped early); release() drops a range.
  void advise_sequential() const noexcept {
    if (data_ != nullptr)
      ::madvise(const_cast<std::byte*>(data_), size_, MADV_SEQUENTIAL);
  }

  //! Drops the resident pages wholly inside [offset, offset + size) (they are re-read from the
  //! file if touched again). Keeps the resident set of a pass over a file larger than RAM at about
  //! one tensor. Out-of-range parts are ignored.
  void release(std::size_t offset, std::size_t size) const noexcept {
    if (data_ == nullptr || offset >= size_)
      return;
    size = std::min(size, size_ - offset);
    auto const page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    auto const base = reinterpret_cast<std::uintptr_t>(data_);
    std::uintptr_t const first = (base + offset + page - 1) / page * page;
    std::uintptr_t const last = (base + offset + size) / page * page;
    if (first < last)
      ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
  }

private:
  void unmap() noexcept {
    if (data_ != nullptr)
      ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }
};

//! An output file that appears under its final name only when `commit()` succeeds. The bytes go
//! to a temporary file in the same directory (so the final rename is atomic on POSIX file
//! systems); commit flushes it to disk, renames it over the target and flushes the directory.
//! Destroying an uncommitted file removes the temporary.
class atomic_file {
  std::filesystem::path target_;
  std::filesystem::path temp_;
  int fd_ = -1;

public:
  //! Creates the temporary file next to `target`. Throws io_error when that fails.
  explicit atomic_file(std::filesystem::path target) : target_(std::move(target)) {
    static std::atomic<unsigned> counter{0};
    auto const dir = target_.has_parent_path() ? target_.parent_path() : std::filesystem::path(".");
    for (int attempt = 0; attempt < 100; ++attempt) {
      // (appends rather than `"." + string`: g++ 12 -O3 warns falsely on that, -Wrestrict)
      std::string name(1, '.');
      name += target_.filename().string();
      name += ".tmp.";
      name += std::to_string(::getpid());
      name += '.';
      name += std::to_string(counter.fetch_add(1));
      temp_ = dir / name;
      fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd_ >= 0)
        return;
      if (errno != EEXIST)
        raise_errno("cannot create a temporary file for", target_, errno);
    }
    qmem::detail::raise<io_error>("cannot create a temporary file for '", target_.string(),
                                  "': 100 names taken");
  }
  atomic_file(atomic_file const&) = delete;
  atomic_file& operator=(atomic_file const&) = delete;
  ~atomic_file() { discard(); }

  [[nodiscard]] std::filesystem::path const& target() const noexcept { return target_; }
  [[nodiscard]] bool open() const noexcept { return fd_ >= 0; }

  //! Appends `bytes` (retrying short writes and EINTR). Throws bad_argument after commit or
  //! discard (nothing written), io_error on failure.
  void write(std::span<std::byte const> bytes) {
    QMEM_EXPECTS(fd_ >= 0, "the file '", target_.string(), "' was already committed or discarded");
    while (!bytes.empty()) {
      std::size_t const chunk = std::min<std::size_t>(bytes.size(), std::size_t{1} << 30);
      ::ssize_t const n = ::write(fd_, bytes.data(), chunk);
      if (n < 0) {
        if (errno == EINTR)
          continue;
        raise_errno("cannot write", temp_, errno);
      }
      bytes = bytes.subspan(static_cast<std::size_t>(n));
    }
  }

  //! Flushes the data to disk, renames the temporary over the target, flushes the directory.
  //! Throws bad_argument after commit or discard, io_error on failure (after a failed flush the
  //! file stays open and uncommitted; after a failed close or rename the temporary is removed).
  void commit() {
    QMEM_EXPECTS(fd_ >= 0, "the file '", target_.string(), "' was already committed or discarded");
    if (::fsync(fd_) != 0)
      raise_errno("cannot flush", temp_, errno);
    int const fd = std::exchange(fd_, -1);
    if (::close(fd) != 0) {
      int const err = errno;
      ::unlink(temp_.c_str());
      raise_errno("cannot close", temp_, err);
    }
    if (::rename(temp_.c_str(), target_.c_str()) != 0) {
      int const err = errno;
      ::unlink(temp_.c_str());
      raise_errno("cannot rename the temporary file to", target_, err);
    }
    auto const dir = target_.has_parent_path() ? target_.parent_path() : std::filesystem::path(".");
    int const dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) { // best effort: some file systems refuse fsync on a directory
      ::fsync(dfd);
      ::close(dfd);
    }
  }

  //! Closes and removes the temporary file (no-op after commit).
  void discard() noexcept {
    if (fd_ >= 0) {
      ::close(fd_);
      fd_ = -1;
      ::unlink(temp_.c_str());
    }
  }
};

} // namespace qmem::io::detail
