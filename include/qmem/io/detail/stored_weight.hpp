#pragma once
//! \file
//! What every quantized weight read from a checkpoint offers beyond its own layout (bnb_weight in
//! io/bnb.hpp, int8_weight in io/bnb_int8.hpp): writing its tensors into a safetensors writer and
//! a dequantized copy in a new vector, written once over the weight's own `tensors()` and
//! `dequantize(e, out)`.

#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/io/safetensors.hpp>

#include <cstddef>
#include <vector>

namespace qmem::io::detail {

//! The shared members of a stored weight `Weight` (CRTP), which provides `name` (its key),
//! `numel()`, `tensors()` (pairs of tensor_spec and bytes), `check_readable(char const*)` and
//! `dequantize(exec::host const&, tensor_view<T>)`. `Weight` brings `dequantize` into its own scope with a using-declaration.
template <class Weight>
struct stored_weight {
  //! Adds every tensor of this weight to `w` (the writer sorts them), or none: throws
  //! bad_argument with `w` unchanged when the file would hold a weight its reader refuses or reads
  //! differently (`Weight::check_readable`), or when a key is already in `w`.
  void add_to(safetensors_writer& w) const {
    self().check_readable("add_to");
    w.add_all(self().tensors());
  }

  //! The dequantized values as a new vector of numel() elements.
  template <float_element T>
  [[nodiscard]] std::vector<T> dequantize(exec::host const& e = {}) const {
    std::vector<T> out(self().numel());
    self().dequantize(e, view(out));
    return out;
  }

protected:
  //! Throws bad_argument unless `out` can take this weight's values: numel() elements in
  //! host-accessible memory, non-null when non-empty.
  template <float_element T>
  void check_output(tensor_view<T> out) const {
    check_view(out, "dequantize", "out", true, false);
    if (out.size() != self().numel())
      qmem::detail::raise<bad_argument>("dequantize: out has ", out.size(), " elements; weight '",
                                        self().name, "' has ", self().numel());
  }

private:
  Weight const& self() const noexcept { return static_cast<Weight const&>(*this); }
};

} // namespace qmem::io::detail
