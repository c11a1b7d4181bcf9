#pragma once
// Support for the blockwise quantize/dequantize tests (blockwise_test.cpp, blockwise_edge_test.cpp):
// the user-declared code tables, the list of every code type, the plain scalar reference written
// from the definition and the check of a backend against it, and the test inputs. Everything is a
// template or inline in qmem::test::blockwise_support, so each unit that includes it has the same
// entities and nothing is defined twice at link time (the reference check's explicit instantiations
// rely on that: user4 and user8 name the same types in every unit).
#include <qmem/quant.hpp>

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "quant/quant_test_support.hpp"

namespace qmem::test::blockwise_support {

using namespace qmem;
using namespace qmem::quant;
using qmem::test::normal_floats;

// A user table (16 values, not symmetric) and a 256-entry one: both become formats by declaring.
inline constexpr code_table<16> user4_values = {{-1.0f, -0.7f, -0.5f, -0.35f, -0.2f, -0.1f, -0.04f,
                                                 0.0f, 0.05f, 0.12f, 0.22f, 0.33f, 0.45f, 0.6f,
                                                 0.8f, 1.0f}};
constexpr code_table<256> make_user8() {
  code_table<256> t{};
  for (int i = 0; i < 256; ++i) // cubic spacing, dense near 0
    t.value[i] = static_cast<float>((i - 128) * (i - 128) * (i - 128)) / (128.0f * 128.0f * 128.0f);
  return t;
}
inline constexpr code_table<256> user8_values = make_user8();
using user4 = table_code<user4_values>;
using user8 = table_code<user8_values>;

template <class... Ts>
struct type_list {};
using all_codes = type_list<dynamic_signed, dynamic_unsigned, linear_signed, nf4, fp4, fp8_e4m3,
                            fp8_e5m2, user4, user8>;

template <class... Ts, class F>
void for_each_type(type_list<Ts...>, F&& f) {
  (f(std::type_identity<Ts>{}), ...);
}

template <class C>
std::string code_name() {
  if constexpr (std::is_same_v<C, user4>)
    return "user4";
  else if constexpr (std::is_same_v<C, user8>)
    return "user8";
  else
    return std::string(to_string(code_id_of_v<C>));
}

// ---- the reference: the definition, element by element ------------------------------------------

template <class C, class T>
void reference_quantize(std::vector<T> const& x, std::size_t block, rounding r,
                        std::vector<std::uint8_t>& codes, std::vector<float>& absmax) {
  std::size_t const n = x.size();
  codes.assign(code_bytes<C>(n), 0);
  absmax.assign(block_count(n, block), 0.0f);
  for (std::size_t b = 0; b < absmax.size(); ++b) {
    float m = 0.0f;
    bool nan = false;
    for (std::size_t i = b * block; i < n && i < (b + 1) * block; ++i) {
      float const a = std::fabs(to_float(x[i]));
      if (std::isnan(a))
        nan = true;
      else if (a > m)
        m = a;
    }
    absmax[b] = nan ? std::numeric_limits<float>::quiet_NaN() : m;
  }
  for (std::size_t i = 0; i < n; ++i) {
    float const xn = to_float(x[i]) * (1.0f / absmax[i / block]);
    std::uint8_t const c = r.stochastic ? encode_stochastic<C>(xn, uniform01(r.seed, i), C::book)
                                        : C::encode(xn, C::book);
    if constexpr (C::bits == 8)
      codes[i] = c;
    else if (i % 2 == 0)
      codes[i / 2] = static_cast<std::uint8_t>((c << 4) | C::zero_code);
    else
      codes[i / 2] = static_cast<std::uint8_t>((codes[i / 2] & 0xf0) | c);
  }
}

template <class C, class T>
std::vector<T> reference_dequantize(std::vector<std::uint8_t> const& codes,
                                    std::vector<float> const& absmax, std::size_t block,
                                    std::size_t n) {
  std::vector<T> y(n);
  for (std::size_t i = 0; i < n; ++i) {
    std::uint8_t const c = C::bits == 8 ? codes[i]
                                        : static_cast<std::uint8_t>(i % 2 == 0 ? codes[i / 2] >> 4
                                                                               : codes[i / 2] & 15);
    y[i] = from_float<T>(C::decode(c, C::book) * absmax[i / block]);
  }
  return y;
}

inline bool same_float(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) ||
         std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b);
}

template <class T>
bool same_value_bits(T a, T b) {
  if constexpr (std::is_same_v<T, float>)
    return same_float(a, b);
  else if constexpr (std::is_same_v<T, double>)
    return (std::isnan(a) && std::isnan(b)) ||
           std::bit_cast<std::uint64_t>(a) == std::bit_cast<std::uint64_t>(b);
  else
    return (std::isnan(a.to_float()) && std::isnan(b.to_float())) || a.bits == b.bits;
}

// The codes and block scales of a float tensor quantized on backend B (quantize_on).
template <class B>
struct quantized_on_backend {
  decltype(B::template alloc<std::uint8_t>(0)) codes;
  decltype(B::template alloc<float>(0)) absmax;

  // The values dequantized to T on B, downloaded.
  template <class C, class T = float>
  std::vector<T> dequantized(std::size_t n, std::size_t block) {
    auto y = B::template alloc<T>(n);
    dequantize_blockwise<C>(B::exec(), tensor_view<std::uint8_t const>(codes.view()),
                            tensor_view<float const>(absmax.view()), block, y.view());
    return B::download(y.view());
  }
};

// x (already on backend B) quantized with code C in blocks of `block`, nearest rounding.
template <class C, class B, class X>
quantized_on_backend<B> quantize_on(X& x, std::size_t block) {
  std::size_t const n = x.view().size();
  quantized_on_backend<B> q{B::template alloc<std::uint8_t>(code_bytes<C>(n)),
                            B::template alloc<float>(block_count(n, block))};
  quantize_blockwise<C>(B::exec(), tensor_view<float const>(x.view()), block, q.codes.view(),
                        q.absmax.view());
  return q;
}

// Quantizes and dequantizes on backend B and compares with the reference: reference_check<B, C>
// holds the check for the four input types of one code as non-inline members, so that a unit can
// leave their instantiation (the CUDA kernels of that code) to another unit with an explicit
// instantiation declaration (below) and that unit instantiates them with one line per code.
template <class B, class C>
struct reference_check {
  template <class T>
  static void one(std::vector<T> const& x, std::size_t block, rounding r, std::string const& what);
  static void run(std::vector<float> const& x, std::size_t block, rounding r,
                  std::string const& what);
  static void run(std::vector<bf16> const& x, std::size_t block, rounding r,
                  std::string const& what);
  static void run(std::vector<f16> const& x, std::size_t block, rounding r,
                  std::string const& what);
  static void run(std::vector<double> const& x, std::size_t block, rounding r,
                  std::string const& what);
};

template <class B, class C>
template <class T>
void reference_check<B, C>::one(std::vector<T> const& x, std::size_t block, rounding r,
                                std::string const& what) {
  CAPTURE(what);
  std::size_t const n = x.size();
  std::vector<std::uint8_t> rc;
  std::vector<float> ra;
  reference_quantize<C>(x, block, r, rc, ra);
  auto dx = B::upload(x);
  auto dc = B::template alloc<std::uint8_t>(code_bytes<C>(n));
  auto da = B::template alloc<float>(block_count(n, block));
  quantize_blockwise<C>(B::exec(), tensor_view<T const>(dx.view()), block, dc.view(), da.view(), r);
  auto const codes = B::download(dc.view());
  auto const absmax = B::download(da.view());
  REQUIRE(absmax.size() == ra.size());
  for (std::size_t b = 0; b < ra.size(); ++b)
    if (!same_float(absmax[b],
                    ra[b])) // one message argument: nvcc rejects doctest's comma form here
      FAIL(qmem::detail::message("absmax[", b, "] = ", absmax[b], ", expected ", ra[b]));
  REQUIRE(codes == rc);
  auto dy = B::template alloc<T>(n);
  dequantize_blockwise<C>(B::exec(), tensor_view<std::uint8_t const>(dc.view()),
                          tensor_view<float const>(da.view()), block, dy.view());
  auto const y = B::download(dy.view());
  auto const ry = reference_dequantize<C, T>(rc, ra, block, n);
  for (std::size_t i = 0; i < n; ++i)
    if (!same_value_bits(y[i], ry[i]))
      FAIL(qmem::detail::message("y[", i, "] differs from the reference"));
}

template <class B, class C>
void reference_check<B, C>::run(std::vector<float> const& x, std::size_t block, rounding r,
                                std::string const& what) {
  one(x, block, r, what);
}
template <class B, class C>
void reference_check<B, C>::run(std::vector<bf16> const& x, std::size_t block, rounding r,
                                std::string const& what) {
  one(x, block, r, what);
}
template <class B, class C>
void reference_check<B, C>::run(std::vector<f16> const& x, std::size_t block, rounding r,
                                std::string const& what) {
  one(x, block, r, what);
}
template <class B, class C>
void reference_check<B, C>::run(std::vector<double> const& x, std::size_t block, rounding r,
                                std::string const& what) {
  one(x, block, r, what);
}

template <class B, class C, class T>
void check_against_reference(std::vector<T> const& x, std::size_t block, rounding r,
                             std::string const& what) {
  reference_check<B, C>::run(x, block, r, what);
}

template <class C>
std::vector<float> input_for(std::size_t n, std::uint32_t seed) {
  auto v = normal_floats(n, seed);
  if constexpr (!C::is_signed)
    for (auto& e : v)
      e = std::fabs(e);
  for (std::size_t i = 0; i < n; i += 97) // outliers, as in bnb's golden data
    v[i] *= 8.0f;
  return v;
}

// The reference check of the 8-bit codes dynamic_signed, dynamic_unsigned, linear_signed and user8
// is instantiated in blockwise_edge_test.cpp, not in blockwise_test.cpp whose test case runs it:
// nvcc compiled the two halves of the instantiations one after the other in one unit, the critical
// path of the CUDA test build (gpu_bench.sh has the figures).
extern template struct reference_check<host_backend, dynamic_signed>;
extern template struct reference_check<host_backend, dynamic_unsigned>;
extern template struct reference_check<host_backend, linear_signed>;
extern template struct reference_check<host_backend, user8>;
#if QMEM_HAS_CUDA() && QMEM_QUANT_HAS_CUDA_BLOCKWISE
extern template struct reference_check<cuda_backend, dynamic_signed>;
extern template struct reference_check<cuda_backend, dynamic_unsigned>;
extern template struct reference_check<cuda_backend, linear_signed>;
extern template struct reference_check<cuda_backend, user8>;
#endif

} // namespace qmem::test::blockwise_support
