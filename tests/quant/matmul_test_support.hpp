#pragma once
// Support for the matmul tests (matmul_test.cpp, matmul_gemv1_test.cpp, matmul_gemvm_test.cpp,
// matmul_gemm_test.cpp): random 4-bit weights, their upload to a backend, the host reference's and
// the GEMV path's functions, and the tolerance checks. Everything is a template, inline or in an
// unnamed namespace, so each test unit that includes it has its own copy and nothing is defined
// twice at link time.
//
// Tolerances of a 4-bit product (docs/matmul.md derives them). The host reference dequantizes
// (w = round_T(code * scale)), sums the exact products in double and rounds once to T.
// - Paths with the same weights (host, CUDA m > 16: dequantize + cuBLASLt; CUDA grad-input): they
//   sum the same exact products in fp32 in another order, on tensor cores that may truncate:
//   |got - ref| <= 2^(1-p) |ref| (two roundings to T of nearby sums, p = 8 for bf16, 11 for f16)
//   + 2 k 2^-24 S, S = sum |x_i w_i|.
// - The CUDA GEMV path (m <= 16) computes sum_b scale_b * sum_{i in b} round_T(v_i) x_i in fp32:
//   checked tightly against that function evaluated in double (the "model"):
//   |got - model| <= 2^(1-p) |model| + 4 (k + 64) 2^-24 S', S' = sum |x_i scale_b round_T(v_i)|;
//   and against the reference with the bound the documentation states: the model's weight
//   scale * round_T(v) and the reference's round_T(v * scale) are both within 2^-p relative of
//   v * scale, which adds 2^(1-p) / (1 - 2^-p) S.
// A misplaced code, scale or row changes a result by about |y|, far above the tight bounds.
#include <qmem/quant/matmul.hpp>
#if QMEM_HAS_CUDA()
#include <qmem/quant/cuda/matmul.cuh>
#endif

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "support/backend.hpp"

namespace {

using namespace qmem;
using namespace qmem::quant;

//! A random 4-bit weight with its scales, owned on the host.
struct host_weight {
  std::size_t rows = 0, cols = 0, block = 64;
  bool nested = false;
  std::vector<std::uint8_t> codes, qabsmax;
  std::vector<float> absmax, absmax2;
  float offset = 0.0f;
};

inline host_weight random_weight(std::size_t rows, std::size_t cols, std::size_t block, bool nested,
                                 std::mt19937& rng) {
  host_weight w;
  w.rows = rows;
  w.cols = cols;
  w.block = block;
  w.nested = nested;
  std::size_t const n = rows * cols;
  std::size_t const blocks = (n + block - 1) / block;
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.25f, 2.0f);
  w.codes.resize((n + 1) / 2);
  for (auto& c : w.codes)
    c = static_cast<std::uint8_t>(byte(rng));
  if (nested) {
    w.qabsmax.resize(blocks);
    for (auto& q : w.qabsmax)
      q = static_cast<std::uint8_t>(byte(rng));
    w.absmax2.resize((blocks + 255) / 256);
    for (auto& a : w.absmax2)
      a = scale(rng);
    w.offset = 0.75f;
  } else {
    w.absmax.resize(blocks);
    for (auto& a : w.absmax)
      a = scale(rng);
  }
  return w;
}

template <class T>
std::vector<T> random_matrix(std::size_t count, std::mt19937& rng) {
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<T> v(count);
  for (auto& x : v)
    x = from_float<T>(d(rng));
  return v;
}

//! The host weight uploaded to backend B (arrays kept alive alongside the view).
template <class B, class Code>
struct backend_weight {
  decltype(B::upload(std::vector<std::uint8_t>{})) codes, qabsmax;
  decltype(B::upload(std::vector<float>{})) absmax, absmax2;
  weight_4bit_view<Code> view;

  explicit backend_weight(host_weight const& h)
      : codes(B::upload(h.codes)), qabsmax(B::upload(h.qabsmax)), absmax(B::upload(h.absmax)),
        absmax2(B::upload(h.absmax2)) {
    view.codes = codes.view();
    view.rows = h.rows;
    view.cols = h.cols;
    view.block_size = h.block;
    if (h.nested) {
      view.scales.qabsmax = qabsmax.view();
      view.scales.absmax2 = absmax2.view();
      view.scales.offset = h.offset;
    } else {
      view.scales.absmax = absmax.view();
    }
  }
};

template <class Code>
weight_4bit_view<Code> host_view(host_weight const& h) {
  weight_4bit_view<Code> v;
  v.codes = {h.codes.data(), h.codes.size()};
  v.rows = h.rows;
  v.cols = h.cols;
  v.block_size = h.block;
  if (h.nested) {
    v.scales.qabsmax = {h.qabsmax.data(), h.qabsmax.size()};
    v.scales.absmax2 = {h.absmax2.data(), h.absmax2.size()};
    v.scales.offset = h.offset;
  } else {
    v.scales.absmax = {h.absmax.data(), h.absmax.size()};
  }
  return v;
}

template <class T>
constexpr int precision_bits = std::is_same_v<T, bf16> ? 8 : 11;

//! Checks got against ref with the tolerance derived above; `terms[i]` is sum |x w| of output i
//! and `depth` the summation length.
//! `sum_coef` multiplies 2^-24 S (2 k for a plain fp32 sum), `weight_coef` multiplies S for the
//! weights' own difference (0 when both sides use the same weights).
template <class T>
void expect_close(std::vector<T> const& got, std::vector<T> const& ref,
                  std::vector<double> const& terms, double sum_coef, double weight_coef,
                  std::string const& what) {
  REQUIRE(got.size() == ref.size());
  std::size_t bad = 0;
  double worst = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    double const r = to_float(ref[i]);
    double const g = to_float(got[i]);
    double const tol = std::ldexp(std::fabs(r), 1 - precision_bits<T>) +
                       sum_coef * std::ldexp(terms[i], -24) + weight_coef * terms[i];
    double const err = std::fabs(g - r);
    worst = std::max(worst, tol > 0 ? err / tol : err);
    if (!(err <= tol)) {
      if (bad < 5)
        MESSAGE(what << ": element " << i << " is " << g << ", reference " << r << ", tolerance "
                     << tol);
      ++bad;
    }
  }
  INFO(what << ": worst error / tolerance = " << worst);
  CHECK(bad == 0);
}

//! 2 k: the fp32 summation term of paths that use the reference's weights.
constexpr double plain_sum(std::size_t k) { return 2.0 * static_cast<double>(k); }
//! 4 (k + 64): the GEMV path's fp32 summation term (docs/matmul.md).
constexpr double gemv_sum(std::size_t k) { return 4.0 * static_cast<double>(k + 64); }
//! 2^(1-p) / (1 - 2^-p): the GEMV path's weight difference against the reference.
template <class T>
double gemv_weight_coef() {
  double const u = std::ldexp(1.0, -precision_bits<T>);
  return 2.0 * u / (1.0 - u);
}

//! The GEMV path's function evaluated in double, rounded once to T, and its sums of |terms|:
//! y[i, j] = sum_l x[i, l] * scale(j * k + l) * round_T(value(code(j * k + l))).
template <class T, class Code>
void gemv_model(host_weight const& hw, std::vector<T> const& x, std::size_t m,
                std::vector<T>& model, std::vector<double>& terms) {
  auto const v = host_view<Code>(hw);
  std::size_t const n = hw.rows, k = hw.cols;
  std::vector<double> w(n * k);
  for (std::size_t i = 0; i < n * k; ++i)
    w[i] = static_cast<double>(qmem::quant::detail::mm::host_scale(v, i / hw.block)) *
           static_cast<double>(qmem::quant::detail::mm::table_value<T>(
               Code::decode(qmem::quant::detail::nibble(hw.codes.data(), i), Code::book)));
  model.assign(m * n, T{});
  terms.assign(m * n, 0.0);
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (std::size_t l = 0; l < k; ++l) {
        double const t = static_cast<double>(to_float(x[i * k + l])) * w[j * k + l];
        acc += t;
        terms[i * n + j] += std::fabs(t);
      }
      model[i * n + j] = from_float<T>(static_cast<float>(acc));
    }
}

template <class B>
auto workspace_for(std::size_t bytes) {
  if constexpr (std::is_same_v<B, qmem::test::host_backend>)
    return B::template alloc<std::byte>(0);
  else
    return B::template alloc<std::byte>(bytes);
}

//! Per output, the sum of |a * w| over the dot product with the reference's weights w (the
//! tolerances' S): the forward's out[i, j] over l of a[i, l] w[j, l] (a = x, m x k), or
//! grad_input's out[i, l] over j of a[i, j] w[j, l] (a = grad_y, m x n).
template <class T, class Code>
std::vector<double> abs_terms(host_weight const& hw, std::vector<T> const& a, std::size_t m,
                              bool grad) {
  std::size_t const n = hw.rows, k = hw.cols;
  std::vector<float> const wd = qmem::quant::detail::mm::host_dequantized<T>(host_view<Code>(hw));
  std::vector<double> terms(m * (grad ? k : n), 0.0);
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j)
      for (std::size_t l = 0; l < k; ++l) {
        T const ai = grad ? a[i * n + j] : a[i * k + l];
        terms[grad ? i * k + l : i * n + j] +=
            std::fabs(static_cast<double>(to_float(ai)) * wd[j * k + l]);
      }
  return terms;
}

//! A forward case: a random n x k weight and m x k input, drawn from `rng` in that order, the
//! host reference's output and its terms (abs_terms).
template <class T>
struct forward_reference {
  host_weight hw;
  std::vector<T> x;
  std::vector<T> ref;
  std::vector<double> terms;
};

template <class T, class Code>
forward_reference<T> make_forward_reference(std::size_t m, std::size_t n, std::size_t k,
                                            std::size_t block, bool nested, std::mt19937& rng) {
  forward_reference<T> f;
  f.hw = random_weight(n, k, block, nested, rng);
  f.x = random_matrix<T>(m * k, rng);
  f.ref.resize(m * n);
  matmul_4bit<T>(exec::host{}, {f.x.data(), f.x.size()}, m, host_view<Code>(f.hw),
                 tensor_view<T>{f.ref.data(), f.ref.size()});
  f.terms = abs_terms<T, Code>(f.hw, f.x, m, false);
  return f;
}

//! "<backend> <what> m=.. n=.. k=.. block=.. plain|nested", naming a checked case.
inline std::string case_name(char const* backend, char const* what, std::size_t m, std::size_t n,
                             std::size_t k, std::size_t block, bool nested) {
  return std::string(backend) + " " + what + " m=" + std::to_string(m) + " n=" + std::to_string(n) +
         " k=" + std::to_string(k) + " block=" + std::to_string(block) +
         (nested ? " nested" : " plain");
}

template <class B, class T, class Code>
void check_forward(std::size_t m, std::size_t n, std::size_t k, std::size_t block, bool nested,
                   std::mt19937& rng) {
  auto const [hw, x, ref, terms] = make_forward_reference<T, Code>(m, n, k, block, nested, rng);
  backend_weight<B, Code> bw(hw);
  auto bx = B::upload(x);
  auto by = B::template alloc<T>(m * n);
  auto ws = workspace_for<B>(matmul_4bit_workspace_bytes<T>(m, bw.view));
  if (m <= gemv_max_rows)
    matmul_4bit<T>(B::exec(), bx.view(), m, bw.view, by.view()); // no workspace needed
  else
    matmul_4bit<T>(B::exec(), bx.view(), m, bw.view, by.view(), ws.view());
  std::vector<T> const got = B::download(by.view());
  std::string const what = case_name(B::name, "forward", m, n, k, block, nested);
  if (std::string(B::name) != "host" && m <= gemv_max_rows) {
    // the GEMV path: tightly against its own function, and within the documented bound of the
    // reference
    std::vector<T> model;
    std::vector<double> mterms;
    gemv_model<T, Code>(hw, x, m, model, mterms);
    expect_close(got, model, mterms, gemv_sum(k), 0.0, what + " (against the GEMV model)");
    expect_close(got, ref, terms, gemv_sum(k), gemv_weight_coef<T>(), what);
  } else {
    expect_close(got, ref, terms, plain_sum(k), 0.0, what);
  }
}

template <class B, class T, class Code>
void check_grad_input(std::size_t m, std::size_t n, std::size_t k, std::size_t block, bool nested,
                      std::mt19937& rng) {
  host_weight const hw = random_weight(n, k, block, nested, rng);
  std::vector<T> const gy = random_matrix<T>(m * n, rng);
  std::vector<T> ref(m * k);
  matmul_4bit_grad_input<T>(exec::host{}, {gy.data(), gy.size()}, m, host_view<Code>(hw),
                            tensor_view<T>{ref.data(), ref.size()});
  std::vector<double> const terms = abs_terms<T, Code>(hw, gy, m, true);

  backend_weight<B, Code> bw(hw);
  auto bg = B::upload(gy);
  auto bx = B::template alloc<T>(m * k);
  auto ws = workspace_for<B>(matmul_4bit_grad_input_workspace_bytes<T>(m, bw.view));
  matmul_4bit_grad_input<T>(B::exec(), bg.view(), m, bw.view, bx.view(), ws.view());
  std::vector<T> const got = B::download(bx.view());
  expect_close(got, ref, terms, plain_sum(n), 0.0,
               case_name(B::name, "grad_input", m, n, k, block, nested));
}

} // namespace

#if QMEM_HAS_CUDA()
namespace {
//! Captures `call()` on stream `s` in a graph (global capture mode), then instantiates, launches
//! and destroys it: checks that `call` did not throw inside the capture (naming `what` in the
//! message when it did) and that the capture, instantiation and launch succeeded. Returns what
//! synchronizing `s` after the launch gave.
template <class Call>
cudaError_t capture_and_replay(cudaStream_t s, char const* what, Call&& call) {
  cudaGraph_t graph = nullptr;
  cuda_detail::check(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal),
                     "cudaStreamBeginCapture");
  bool threw = false;
  try {
    call();
  } catch (std::exception const& ex) {
    threw = true;
    MESSAGE(what << " inside the capture threw: " << ex.what());
  }
  cudaError_t const ended = cudaStreamEndCapture(s, &graph);
  CHECK_FALSE(threw);
  REQUIRE(ended == cudaSuccess);
  cudaGraphExec_t exec = nullptr;
  REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
  REQUIRE(cudaGraphLaunch(exec, s) == cudaSuccess);
  cudaError_t const synced = cudaStreamSynchronize(s);
  (void)cudaGraphExecDestroy(exec);
  (void)cudaGraphDestroy(graph);
  return synced;
}

//! The GEMV kernels' arguments for weight `w` (its codes and scales; n = w.rows, k = w.cols,
//! blocks of w.block_size), a batch of m rows x [m, k] and the output y [m, n], in device memory.
inline cuda_matmul::gemv_args<bf16> gemv_args_for(weight_4bit_view<nf4> const& w, bf16 const* x,
                                                  bf16* y, unsigned m) {
  return {x,      w.codes.data(), cuda_matmul::make_scale_args(w.scales),           y, m,
          w.rows, w.cols,         qmem::quant::detail::mm::log2_exact(w.block_size)};
}

template <cuda_matmul::gemv_shape Shape, bool Nested>
int launch_shape(cuda_matmul::gemv_args<bf16> const& a) {
  cuda_matmul::launch_gemv_fast<nf4, bf16, Nested, Shape>(qmem::test::cuda_backend::exec(), a);
  return Shape.tiles;
}
template <cuda_matmul::gemv1_shape Shape, bool Nested>
int launch_shape(cuda_matmul::gemv_args<bf16> const& a) {
  cuda_matmul::launch_gemv1_fast<nf4, bf16, Nested, Shape>(qmem::test::cuda_backend::exec(), a);
  return Shape.pairs;
}

//! One fast GEMV kernel on a random m x n x k weight against the GEMV model: `launch(a)` launches
//! it with the arguments a and returns its label for the message.
template <class Launch>
void kernel_case(std::size_t m, std::size_t n, std::size_t k, std::size_t block, bool nested,
                 std::mt19937& rng, Launch&& launch) {
  using B = qmem::test::cuda_backend;
  host_weight const hw = random_weight(n, k, block, nested, rng);
  std::vector<bf16> const x = random_matrix<bf16>(m * k, rng);
  std::vector<bf16> model;
  std::vector<double> terms;
  gemv_model<bf16, nf4>(hw, x, m, model, terms);
  backend_weight<B, nf4> bw(hw);
  auto bx = B::upload(x);
  auto by = B::template alloc<bf16>(m * n);
  REQUIRE(cuda_matmul::gemv_fast_path(k, block, bw.view.codes.data(), bx.view().data()));
  auto const a =
      gemv_args_for(bw.view, bx.view().data(), by.view().data(), static_cast<unsigned>(m));
  std::string const label = launch(a);
  expect_close(B::download(by.view()), model, terms, gemv_sum(k), 0.0,
               label + " " + case_name("cuda", "GEMV", m, n, k, block, nested));
}

template <auto Shape>
void variant_case(std::size_t m, std::size_t n, std::size_t k, std::size_t block, bool nested,
                  std::mt19937& rng) {
  constexpr bool batch1 =
      std::is_same_v<std::remove_cv_t<decltype(Shape)>, cuda_matmul::gemv1_shape>;
  REQUIRE((!batch1 || m == 1));
  kernel_case(m, n, k, block, nested, rng, [&](cuda_matmul::gemv_args<bf16> const& a) {
    int const third = nested ? launch_shape<Shape, true>(a) : launch_shape<Shape, false>(a);
    return std::string(batch1 ? "batch-1 " : "") + "variant " + std::to_string(Shape.warps) + "/" +
           std::to_string(Shape.unroll) + "/" + std::to_string(third);
  });
}

//! The streaming batch-1 kernel with shape S on one weight, planned for `sms` multiprocessors (0:
//! the device's; fewer make blocks loop over several tiles), against the GEMV model.
template <cuda_matmul::gemv1_stream_shape S>
void stream_case(std::size_t n, std::size_t k, std::size_t block, bool nested, unsigned sms,
                 std::mt19937& rng) {
  kernel_case(1, n, k, block, nested, rng, [&](cuda_matmul::gemv_args<bf16> const& a) {
    auto const& e = qmem::test::cuda_backend::exec();
    bool const launched = nested ? cuda_matmul::launch_gemv1_stream<nf4, bf16, true, S>(e, a, sms)
                                 : cuda_matmul::launch_gemv1_stream<nf4, bf16, false, S>(e, a, sms);
    REQUIRE(launched);
    return "streaming batch-1 " + std::to_string(S.warps) + "/" + std::to_string(S.depth) +
           (S.async ? " async" : "") + " sms=" + std::to_string(sms);
  });
}
} // namespace

namespace {
//! A weight for the streaming kernel and the multiprocessors its plan is made for.
struct stream_plan_case {
  std::size_t n, k, block;
  unsigned sms;
};

//! Shape S on each of `plans`, with plain scales and, when `nested_too`, nested ones; `Nested`
//! (the other shape for nested scales) defaults to S.
template <cuda_matmul::gemv1_stream_shape S, cuda_matmul::gemv1_stream_shape Nested = S>
void stream_cases(std::initializer_list<stream_plan_case> plans, bool nested_too,
                  std::mt19937& rng) {
  for (auto const& p : plans) {
    stream_case<S>(p.n, p.k, p.block, false, p.sms, rng);
    if (nested_too)
      stream_case<Nested>(p.n, p.k, p.block, true, p.sms, rng);
  }
}
} // namespace
#endif
