// CUDA-specific cases of the blockwise kernels (quant/cuda/blockwise.cuh), beyond the shared
// backend tests in blockwise_test.cpp / double_quant_test.cpp (which already run every code type
// and block size on the GPU against the reference): the device encoders against C::encode over
// all 2^32 floats, views at offsets that are not 16-byte aligned (the scalar path), sizes that
// are not a multiple of a thread's vector, grid-stride loops over many blocks per CTA, a tensor of
// more than 2^32 elements, a multi-level offset tree, the one-launch offset mean on exact and
// inexact sums, the nested quantization on every nested block size and unaligned views, double
// quantization in one cooperative kernel (every path against the host; in a graph; the fallback
// when the runtime refuses its grid as too large), the 4-bit dequantization's warp-shuffle
// decoding at 2 and 4 vectors per thread on strided grids and partial last warps, a non-default
// stream and sync_after_launch. Every result is compared bit for bit with the host backend (NaN
// outputs: as NaN, see same_values).
// Compiled only by nvcc; without a GPU each case says so and returns.
#include <qmem/core/config.hpp>

#include "quant/quant_test_support.hpp"
#include "support/backend.hpp"

#if QMEM_HAS_CUDA()

#include <qmem/memory/cuda_resource.cuh>
#include <qmem/quant.hpp>
#include <qmem/quant/cuda/blockwise.cuh>
#include <qmem/quant/double_quant.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace qmem;
using namespace qmem::quant;
using qmem::test::cuda_backend;
using qmem::test::host_backend;

static_assert(cuda_impl::kernels::offset_tree_arity_v == offset_tree_arity,
              "the GPU offset tree must have the host's arity");

// Values with a wide dynamic range per block (so every decade of the dynamic maps is hit),
// outliers, exact zeros, and, when `specials`, NaN, infinities and negative zeros.
std::vector<float> test_values(std::size_t n, std::uint32_t seed, bool specials = false) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    float const scale = std::ldexp(1.0f, static_cast<int>(g() % 40) - 20);
    v[i] = u(g) * scale;
    if (g() % 61 == 0)
      v[i] = 0.0f;
  }
  if (specials && n > 300) {
    v[5] = std::numeric_limits<float>::quiet_NaN();
    v[130] = std::numeric_limits<float>::infinity();
    v[200] = -0.0f;
    for (std::size_t i = 256; i < 320; ++i) // an all-zero block for block sizes <= 64
      v[i] = 0.0f;
  }
  return v;
}

// as<T> and same_bits come from quant_test_support.hpp (qmem::test::convert, same_bits).
template <class T>
std::vector<T> as(std::vector<float> const& v) {
  return qmem::test::convert<T>(v);
}
using qmem::test::same_bits;

template <class T>
bool is_nan_value(T v) {
  return std::isnan(static_cast<double>(to_float(v)));
}

// Dequantized values: the same bits, except that a NaN matches any NaN. A NaN made by arithmetic
// (0 * inf in a block whose absmax is inf) has the hardware's default pattern: x86 gives
// 0xffc00000 (sign set), NVIDIA GPUs 0x7fffffff, which f16 and fp32 outputs keep (bf16 rounds
// every NaN to 0x7fc0). Seen on the H200, 2026-11-29, with f16 inputs that overflow to inf.
template <class T>
bool same_values(std::vector<T> const& a, std::vector<T> const& b) {
  if (a.size() != b.size())
    return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    bool const nan_a = is_nan_value(a[i]);
    if (nan_a != is_nan_value(b[i]))
      return false;
    if (!nan_a && std::memcmp(&a[i], &b[i], sizeof(T)) != 0)
      return false;
  }
  return true;
}

// Quantizes x[offset, offset + n) into codes[code_offset, ...) and dequantizes into
// y[y_offset, ...) on the GPU and on the host; requires identical bits everywhere.
template <class C, class T>
void check_gpu_equals_host(std::vector<float> const& values, std::size_t block, std::size_t offset,
                           std::size_t code_offset, std::size_t y_offset, rounding r = {},
                           exec::cuda const& e = {}) {
  std::size_t const n = values.size() - offset;
  auto const x = as<T>(values);
  std::vector<std::uint8_t> hc(code_bytes<C>(n));
  std::vector<float> ha(block_count(n, block));
  tensor_view<T const> hx(x.data() + offset, n);
  quantize_blockwise<C>(exec::host{}, hx, block, view(hc), view(ha), r);
  std::vector<T> hy(n);
  dequantize_blockwise<C>(exec::host{}, view(std::as_const(hc)), view(std::as_const(ha)), block,
                          view(hy));

  auto dx = cuda_backend::upload(x);
  auto dc = cuda_backend::alloc<std::uint8_t>(code_bytes<C>(n) + code_offset);
  auto da = cuda_backend::alloc<float>(ha.size());
  auto dy = cuda_backend::alloc<T>(n + y_offset);
  auto const xv = tensor_view<T const>(dx.view()).subview(offset, n);
  auto const cv = dc.view().subview(code_offset, code_bytes<C>(n));
  auto const yv = dy.view().subview(y_offset, n);
  // the uploads and the allocations' fills run on the legacy default stream, which a
  // non-blocking stream does not wait for
  cuda_backend::sync();
  quantize_blockwise<C>(e, xv, block, cv, da.view(), r);
  dequantize_blockwise<C>(e, tensor_view<std::uint8_t const>(cv),
                          tensor_view<float const>(da.view()), block, yv);
  auto const gc = cuda_backend::download(tensor_view<std::uint8_t const>(cv));
  auto const ga = cuda_backend::download(da.view());
  auto const gy = cuda_backend::download(tensor_view<T const>(yv));
  REQUIRE(same_bits(ga, ha));
  REQUIRE(gc == hc);
  REQUIRE(same_values(gy, hy));
}

// ---- device encoders == C::encode over every float ---------------------------------------------

// Counts the floats x for which the encoder Enc (device_encoder<C> or normal_encoder<C>) differs
// from C::encode: every float, or when `NormalDomain` those with |x| <= 1 + 2^-23 (what
// x * (1 / absmax) can be when absmax is a finite normal float; about 2^31 values), on which
// normal_encoder is defined (it returns the code in its low C::bits bits).
template <class C, class Enc, bool NormalDomain>
__global__ void count_mismatches(typename Enc::params const p, decltype(C::book) book,
                                 unsigned long long* mismatches) {
  __shared__ typename Enc::storage storage;
  __shared__ std::remove_cv_t<decltype(C::book)> sbook;
  cuda_impl::kernels::copy_to_shared(sbook, book);
  Enc::prepare(storage, p);
  __syncthreads();
  auto const enc = Enc::make(storage, p, sbook);
  constexpr std::uint32_t low_bits = C::bits == 8 ? 0xffu : 0x0fu;
  unsigned long long local = 0;
  std::uint64_t const stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  for (std::uint64_t u = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       u < (std::uint64_t{1} << 32); u += stride) {
    if (NormalDomain && (u & 0x7fffffffu) > 0x3f800001u) // |x| > 1 + 2^-23 or NaN
      continue;
    float const x = qmem::detail::bits_to_float(static_cast<std::uint32_t>(u));
    local += (static_cast<std::uint32_t>(enc(x)) & low_bits) != C::encode(x, sbook) ? 1u : 0u;
  }
  if (local != 0)
    atomicAdd(mismatches, local);
}

template <class C, class Enc, bool NormalDomain>
unsigned long long mismatches() {
  unsigned long long* d = nullptr;
  cuda_detail::check(cudaMalloc(&d, sizeof(unsigned long long)), "cudaMalloc");
  cuda_detail::check(cudaMemset(d, 0, sizeof(unsigned long long)), "cudaMemset");
  count_mismatches<C, Enc, NormalDomain><<<132 * 8, 256>>>(Enc::host_params(0), C::book, d);
  cuda_detail::check(cudaGetLastError(), "count_mismatches");
  unsigned long long h = 0;
  cuda_detail::check(cudaMemcpy(&h, d, sizeof h, cudaMemcpyDeviceToHost), "cudaMemcpy");
  (void)cudaFree(d);
  return h;
}

// rcp_normal against fmath::rcp (__frcp_rn) on every float in [2^-126, 2^126).
__global__ void count_rcp_mismatches(unsigned long long* mismatches) {
  unsigned long long local = 0;
  std::uint32_t const stride = gridDim.x * blockDim.x;
  for (std::uint32_t u = 0x00800000u + blockIdx.x * blockDim.x + threadIdx.x; u < 0x7e800000u;
       u += stride) {
    float const a = qmem::detail::bits_to_float(u);
    local += qmem::detail::float_to_bits(cuda_impl::kernels::rcp_normal(a)) !=
                     qmem::detail::float_to_bits(fmath::rcp(a))
                 ? 1u
                 : 0u;
  }
  if (local != 0)
    atomicAdd(mismatches, local);
}

} // namespace

TEST_CASE("cuda blockwise: rcp_normal equals fmath::rcp on every float in [2^-126, 2^126)") {
  if (qmem::test::skip<cuda_backend>())
    return;
  unsigned long long* d = nullptr;
  cuda_detail::check(cudaMalloc(&d, sizeof(unsigned long long)), "cudaMalloc");
  cuda_detail::check(cudaMemset(d, 0, sizeof(unsigned long long)), "cudaMemset");
  count_rcp_mismatches<<<132 * 8, 256>>>(d);
  cuda_detail::check(cudaGetLastError(), "count_rcp_mismatches");
  unsigned long long h = 0;
  cuda_detail::check(cudaMemcpy(&h, d, sizeof h, cudaMemcpyDeviceToHost), "cudaMemcpy");
  (void)cudaFree(d);
  CHECK(h == 0);
}

TEST_CASE("cuda blockwise: device encoders equal C::encode for all 2^32 floats, normal-domain "
          "encoders for every |x| <= 1 + 2^-23") {
  if (qmem::test::skip<cuda_backend>())
    return;
  auto check = []<class C>(std::type_identity<C>) {
    CHECK(mismatches<C, cuda_impl::device_encoder<C>, false>() == 0);
    CHECK(mismatches<C, cuda_impl::normal_encoder<C>, true>() == 0);
  };
  check(std::type_identity<nf4>{});
  check(std::type_identity<fp4>{});
  check(std::type_identity<dynamic_signed>{});
  check(std::type_identity<dynamic_unsigned>{});
}

TEST_CASE("cuda blockwise: interval tables reproduce C::encode around every threshold (host)") {
  // The host half of the check above: both sides of the midpoint of each pair of neighbouring
  // code values, the values themselves, the bucket edges (k + 1/2) / 16 and k / 16 (rounding to
  // nearest and down) and the domain's ends; for the dispatched layouts and NF4 rounded down.
  auto check = []<class C, class Layout>(std::type_identity<C>, std::type_identity<Layout>) {
    using layout = Layout;
    auto const t = cuda_impl::build_interval_table<C, layout>();
    auto same = [&](float x) {
      CAPTURE(x);
      REQUIRE((cuda_impl::interval_lookup<layout>(x, t.entry) & 0x0fu) == C::encode(x, C::book));
    };
    for (std::size_t i = 0; i + 1 < 16; ++i) {
      float const mid = (C::book.sorted[i] + C::book.sorted[i + 1]) * 0.5f;
      for (float x : {mid, std::nextafter(mid, -2.0f), std::nextafter(mid, 2.0f), C::book.sorted[i],
                      -mid, -std::nextafter(mid, 2.0f)})
        same(x);
    }
    for (int k = -17; k <= 16; ++k) { // the bucket edges (k + 1/2) / 16 and k / 16 in [-1, 1]
      for (float const edge :
           {(static_cast<float>(k) + 0.5f) / 16.0f, static_cast<float>(k) / 16.0f}) {
        if (edge < -1.0f || edge > 1.0f)
          continue;
        for (float x : {edge, std::nextafter(edge, -2.0f), std::nextafter(edge, 2.0f)})
          same(x);
      }
    }
    for (float x : {0.0f, -0.0f, 1.0f, -1.0f, 1.0f + 0x1p-23f, -1.0f - 0x1p-23f, 1e-30f, -1e-30f,
                    1e-45f, -1e-45f, 0.00260417f, -0.00260417f, std::nextafter(0.00260417f, 1.0f),
                    std::nextafter(-0.00260417f, -1.0f)})
      same(x);
  };
  check(std::type_identity<nf4>{}, std::type_identity<cuda_impl::interval_layout_of<nf4>::type>{});
  check(std::type_identity<fp4>{}, std::type_identity<cuda_impl::interval_layout_of<fp4>::type>{});
  // FP4 with buckets rounded to nearest: the -0.0 / tiny-negative transition falls inside a
  // bucket with another one, so this layout cannot hold FP4 (the reason FP4 rounds down)
  CHECK_THROWS_AS((cuda_impl::build_interval_table<fp4, cuda_impl::interval_layout<16>>()),
                  std::logic_error);
  check(std::type_identity<nf4>{},
        std::type_identity<cuda_impl::interval_layout<16, cuda_impl::interval_rounding::down>>{});
}

TEST_CASE("cuda blockwise: bucket_lookup_normal equals C::encode around every midpoint (host)") {
  auto check = []<class C>(std::type_identity<C>) {
    using layout = typename cuda_impl::bucket_layout_of<C>::type;
    auto const& t = cuda_impl::bucket_table_of<C>();
    auto same = [&](float x) {
      CAPTURE(x);
      REQUIRE((cuda_impl::bucket_lookup_normal<layout>(x, t.entry) & 0xffu) ==
              C::encode(x, C::book));
    };
    for (std::size_t i = 0; i + 1 < 256; ++i) {
      float const mid = (C::book.sorted[i] + C::book.sorted[i + 1]) * 0.5f;
      for (float x :
           {mid, std::nextafter(mid, -2.0f), std::nextafter(mid, 2.0f), C::book.sorted[i], -mid})
        same(x);
    }
    for (float x : {0.0f, -0.0f, 1.0f, -1.0f, 1.0f + 0x1p-23f, -1.0f - 0x1p-23f, 1e-30f, -1e-30f,
                    1e-45f, -1e-45f})
      same(x);
  };
  check(std::type_identity<dynamic_signed>{});
  check(std::type_identity<dynamic_unsigned>{});
}

TEST_CASE("cuda blockwise: blocks whose absmax is zero, denormal, huge, inf or NaN") {
  // quantize_whole encodes blocks with a finite normal absmax through normal_encoder and the
  // others through C::encode: one block of each kind, next to ordinary blocks, every block size
  // path (narrow, wide, partial last block).
  if (qmem::test::skip<cuda_backend>())
    return;
  for (std::size_t block : {std::size_t{64}, std::size_t{256}, std::size_t{4096}}) {
    CAPTURE(block);
    auto v = test_values(block * 9 + 5, static_cast<std::uint32_t>(block));
    auto fill = [&](std::size_t b, auto f) {
      for (std::size_t i = 0; i < block; ++i)
        v[b * block + i] = f(i);
    };
    fill(0, [](std::size_t) { return 0.0f; });
    fill(1, [](std::size_t i) { return i % 3 == 0 ? -0.0f : 0.0f; });
    fill(2, [](std::size_t i) { return static_cast<float>(i % 7) * -1e-40f; }); // denormal absmax
    fill(3, [](std::size_t i) { return i == 5 ? 0x1p-126f : 1e-39f * static_cast<float>(i % 3); });
    fill(4,
         [](std::size_t i) { return (i % 2 == 0 ? 3e38f : -1e38f) / static_cast<float>(i + 1); });
    v[5 * block + 3] = std::numeric_limits<float>::infinity();
    v[6 * block + 9] = -std::numeric_limits<float>::infinity();
    v[7 * block + 1] = std::numeric_limits<float>::quiet_NaN();
    check_gpu_equals_host<nf4, bf16>(v, block, 0, 0, 0);
    check_gpu_equals_host<fp4, bf16>(v, block, 0, 0, 0);
    check_gpu_equals_host<nf4, float>(v, block, 0, 0, 0);
    check_gpu_equals_host<fp4, f16>(v, block, 0, 0, 0);
    check_gpu_equals_host<dynamic_signed, float>(v, block, 0, 0, 0);
    check_gpu_equals_host<dynamic_unsigned, bf16>(v, block, 0, 0, 0);
    // An all-zero block gives xn = 0 * inf, whose NaN is 0xffc00000 on x86 and 0x7fffffff on
    // NVIDIA GPUs: fp8 once encoded the NaN's sign (code 255 vs 127, seen on the H200,
    // 2026-11-29); it now encodes every NaN as code 0 (quant/codes.hpp).
    check_gpu_equals_host<fp8_e4m3, bf16>(v, block, 0, 0, 0);
    check_gpu_equals_host<fp8_e5m2, float>(v, block, 0, 0, 0);
  }
}

TEST_CASE("cuda blockwise: bucket tables reproduce C::encode around every table midpoint (host)") {
  // The host half of the check above, cheap enough for every build: both sides of the midpoint
  // of each pair of neighbouring table values, and the special values.
  auto check = []<class C>(std::type_identity<C>) {
    using layout = typename cuda_impl::bucket_layout_of<C>::type;
    auto const& t = cuda_impl::bucket_table_of<C>();
    constexpr std::size_t entries = std::size_t{1} << C::bits;
    for (std::size_t i = 0; i + 1 < entries; ++i) {
      float const mid = (C::book.sorted[i] + C::book.sorted[i + 1]) * 0.5f;
      for (float x :
           {mid, std::nextafter(mid, -2.0f), std::nextafter(mid, 2.0f), C::book.sorted[i], -mid}) {
        REQUIRE(cuda_impl::bucket_lookup<layout>(x, t.entry, t.nan_code, t.negative_zero_code) ==
                C::encode(x, C::book));
      }
    }
    for (float x : {0.0f, -0.0f, 1.0f, -1.0f, 2.0f, -2.0f, 1e-30f, -1e-30f,
                    std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                    std::numeric_limits<float>::quiet_NaN()})
      REQUIRE(cuda_impl::bucket_lookup<layout>(x, t.entry, t.nan_code, t.negative_zero_code) ==
              C::encode(x, C::book));
  };
  check(std::type_identity<dynamic_signed>{});
  check(std::type_identity<dynamic_unsigned>{});
  check(std::type_identity<nf4>{});
  check(std::type_identity<fp4>{});
}

TEST_CASE("cuda blockwise: odd sizes, partial vectors and many blocks per CTA") {
  if (qmem::test::skip<cuda_backend>())
    return;
  for (std::size_t n : {std::size_t{1}, std::size_t{3}, std::size_t{15}, std::size_t{17},
                        std::size_t{4095}, std::size_t{(1u << 20) + 7}}) {
    CAPTURE(n);
    auto const v = test_values(n, static_cast<std::uint32_t>(n), true);
    check_gpu_equals_host<nf4, bf16>(v, 64, 0, 0, 0);
    // quantize_whole with a compile-time block size (whole_fixed_shift): 2-byte inputs in blocks
    // of 64, floats in blocks of 256 (above); the same codes with a runtime size: fp4 from f16 32
    check_gpu_equals_host<fp4, bf16>(v, 64, 0, 0, 0);
    check_gpu_equals_host<fp4, f16>(v, 32, 0, 0, 0);
    check_gpu_equals_host<dynamic_signed, float>(v, 256, 0, 0, 0);
    check_gpu_equals_host<dynamic_signed, bf16>(v, 4096, 0, 0, 0);
    check_gpu_equals_host<dynamic_unsigned, float>(v, 128, 0, 0, 0);
    check_gpu_equals_host<fp8_e4m3, bf16>(v, 512, 0, 0, 0);
    check_gpu_equals_host<nf4, double>(v, 4096, 0, 0, 0);
  }
}

TEST_CASE("cuda blockwise: views at offsets that are not 16-byte aligned") {
  if (qmem::test::skip<cuda_backend>())
    return;
  auto const v = test_values(10007, 7, true);
  for (std::size_t off : {std::size_t{1}, std::size_t{3}, std::size_t{8}}) {
    CAPTURE(off);
    check_gpu_equals_host<nf4, bf16>(v, 64, off, 0, 0);
    check_gpu_equals_host<nf4, bf16>(v, 64, 0, off, 0);
    check_gpu_equals_host<nf4, bf16>(v, 64, 0, 0, off);
    check_gpu_equals_host<dynamic_signed, float>(v, 256, off, off, off);
    check_gpu_equals_host<fp4, float>(v, 1024, off, 0, off);
  }
}

TEST_CASE("cuda blockwise: stochastic rounding draws the host's numbers") {
  if (qmem::test::skip<cuda_backend>())
    return;
  auto const v = test_values(70001, 3);
  rounding const r{true, 12345};
  check_gpu_equals_host<nf4, bf16>(v, 64, 0, 0, 0, r);
  check_gpu_equals_host<dynamic_signed, float>(v, 256, 0, 0, 0, r);
  check_gpu_equals_host<dynamic_unsigned, float>(v, 2048, 1, 1, 0, r);
}

TEST_CASE("cuda blockwise: a stream of its own, and sync_after_launch") {
  if (qmem::test::skip<cuda_backend>())
    return;
  cudaStream_t s = nullptr;
  cuda_detail::check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  auto const v = test_values(100003, 5);
  check_gpu_equals_host<nf4, bf16>(v, 64, 0, 0, 0, {}, exec::cuda{s, 0, false});
  check_gpu_equals_host<dynamic_signed, float>(v, 256, 0, 0, 0, {}, exec::cuda{s, 0, true});
  cuda_detail::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  cuda_detail::check(cudaStreamDestroy(s), "cudaStreamDestroy");
}

TEST_CASE("cuda blockwise: quantization captured in a CUDA graph (global mode) replays to the "
          "host's bits") {
  // The one-time set-up of the launch path (the occupancy query, the 8-bit maps' device tables)
  // runs with the thread's capture mode relaxed and enqueues nothing on the captured stream.
  if (qmem::test::skip<cuda_backend>())
    return;
  cudaStream_t s = nullptr;
  cuda_detail::check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  auto const v = test_values(70001, 11);
  auto check = [&]<class C, class T>(std::type_identity<C>, std::type_identity<T>,
                                     std::size_t block) {
    CAPTURE(block);
    auto const x = as<T>(v);
    std::size_t const n = x.size();
    std::vector<std::uint8_t> hc(code_bytes<C>(n));
    std::vector<float> ha(block_count(n, block));
    quantize_blockwise<C>(exec::host{}, tensor_view<T const>(x.data(), n), block, view(hc),
                          view(ha));
    auto dx = cuda_backend::upload(x);
    auto dc = cuda_backend::alloc<std::uint8_t>(hc.size());
    auto da = cuda_backend::alloc<float>(ha.size());
    // the uploads and the allocations' fills run on the legacy default stream, which a
    // non-blocking stream does not wait for
    cuda_backend::sync();
    cudaGraph_t graph = nullptr;
    cuda_detail::check(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal),
                       "cudaStreamBeginCapture");
    quantize_blockwise<C>(exec::cuda{s, 0, false}, tensor_view<T const>(dx.view()), block,
                          dc.view(), da.view());
    cuda_detail::check(cudaStreamEndCapture(s, &graph), "cudaStreamEndCapture");
    cudaGraphExec_t instance = nullptr;
    cuda_detail::check(cudaGraphInstantiate(&instance, graph, 0), "cudaGraphInstantiate");
    cuda_detail::check(cudaGraphLaunch(instance, s), "cudaGraphLaunch");
    cuda_detail::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    (void)cudaGraphExecDestroy(instance);
    (void)cudaGraphDestroy(graph);
    REQUIRE(cuda_backend::download(dc.view()) == hc);
    REQUIRE(same_bits(cuda_backend::download(da.view()), ha));
  };
  check(std::type_identity<nf4>{}, std::type_identity<bf16>{}, 64);
  check(std::type_identity<fp4>{}, std::type_identity<bf16>{}, 4096);
  check(std::type_identity<dynamic_signed>{}, std::type_identity<float>{}, 256);
  check(std::type_identity<dynamic_unsigned>{}, std::type_identity<f16>{}, 64);
  cuda_detail::check(cudaStreamDestroy(s), "cudaStreamDestroy");
}

TEST_CASE("cuda blockwise: double quantization with a three-level offset tree") {
  if (qmem::test::skip<cuda_backend>())
    return;
  std::size_t const m = 300001; // 1172 leaves' sums -> 5 -> 1
  auto r = test_values(m, 9);
  std::vector<float> absmax(m);
  for (std::size_t i = 0; i < m; ++i)
    absmax[i] = 0.5f + std::fabs(r[i]);
  std::size_t const nb = 256;
  std::vector<std::uint8_t> hq(m);
  std::vector<float> h2(block_count(m, nb));
  std::vector<float> hoff(1);
  quantize_scales(exec::host{}, view(std::as_const(absmax)), nb, view(hq), view(h2), view(hoff));

  auto da = cuda_backend::upload(absmax);
  auto dq = cuda_backend::alloc<std::uint8_t>(m);
  auto d2 = cuda_backend::alloc<float>(h2.size());
  auto doff = cuda_backend::alloc<float>(1);
  exec::cuda const e{};
  quantize_scales(e, tensor_view<float const>(da.view()), nb, dq.view(), d2.view(), doff.view());
  REQUIRE(same_bits(cuda_backend::download(doff.view()), hoff));
  REQUIRE(cuda_backend::download(dq.view()) == hq);
  REQUIRE(same_bits(cuda_backend::download(d2.view()), h2));

  std::vector<float> hback(m);
  dequantize_scales(exec::host{}, view(std::as_const(hq)), view(std::as_const(h2)),
                    view(std::as_const(hoff)), nb, view(hback));
  auto dback = cuda_backend::alloc<float>(m);
  dequantize_scales(e, tensor_view<std::uint8_t const>(dq.view()),
                    tensor_view<float const>(d2.view()), tensor_view<float const>(doff.view()), nb,
                    dback.view());
  REQUIRE(same_bits(cuda_backend::download(dback.view()), hback));

  // one-pass nested dequantization of 8-bit codes, output offset by one element (scalar path)
  std::size_t const block = 64;
  std::size_t const n = m * block - 5;
  std::vector<std::uint8_t> codes(n);
  for (std::size_t i = 0; i < n; ++i)
    codes[i] = static_cast<std::uint8_t>((i * 2654435761u) >> 13);
  std::vector<bf16> hy(n);
  dequantize_blockwise_nested<dynamic_signed>(exec::host{}, view(std::as_const(codes)),
                                              view(std::as_const(hq)), view(std::as_const(h2)),
                                              view(std::as_const(hoff)), block, nb, view(hy));
  auto dc = cuda_backend::upload(codes);
  for (std::size_t y_offset : {std::size_t{0}, std::size_t{1}}) {
    auto dy = cuda_backend::alloc<bf16>(n + y_offset);
    dequantize_blockwise_nested<dynamic_signed>(
        e, tensor_view<std::uint8_t const>(dc.view()), tensor_view<std::uint8_t const>(dq.view()),
        tensor_view<float const>(d2.view()), tensor_view<float const>(doff.view()), block, nb,
        dy.view().subview(y_offset, n));
    REQUIRE(same_bits(
        cuda_backend::download(tensor_view<bf16 const>(dy.view().subview(y_offset, n))), hy));
  }
}

TEST_CASE("cuda blockwise: the one-launch offset mean equals the host's tree, exact warp sums "
          "or not") {
  if (qmem::test::skip<cuda_backend>())
    return;
  // offset_mean sums a warp's 256 values with shuffles only when every order gives the same exact
  // double; the cases below take that path, the ordered fallback at the leaves, at the level above
  // and at the root, and the special values
  auto gpu_offset = [](std::vector<float> const& absmax) {
    auto da = cuda_backend::upload(absmax);
    auto dq = cuda_backend::alloc<std::uint8_t>(absmax.size());
    auto d2 = cuda_backend::alloc<float>(block_count(absmax.size(), 256));
    auto doff = cuda_backend::alloc<float>(1);
    quantize_scales(exec::cuda{}, tensor_view<float const>(da.view()), 256, dq.view(), d2.view(),
                    doff.view());
    return cuda_backend::download(doff.view())[0];
  };
  auto check = [&](std::vector<float> const& absmax) {
    float const host = qmem::quant::detail::tree_mean(absmax.data(), absmax.size());
    float const gpu = gpu_offset(absmax);
    if (std::isnan(host))
      CHECK(std::isnan(gpu));
    else
      CHECK(qmem::detail::float_to_bits(gpu) == qmem::detail::float_to_bits(host));
  };
  std::mt19937 g(17);
  std::uniform_real_distribution<float> u(0.5f, 2.0f);
  {
    INFO("bf16-valued scales: exact at every level");
    std::vector<float> a((std::size_t{1} << 20) + 3);
    for (auto& x : a)
      x = to_float(bf16(u(g)));
    check(a);
  }
  {
    INFO("fp32 scales over 2^-24 .. 2^24: ordered sums at the leaves");
    std::vector<float> a(70001);
    for (auto& x : a)
      x = std::ldexp(u(g), static_cast<int>(g() % 49) - 24);
    check(a);
  }
  {
    INFO("each leaf exact, leaves 2^60 apart: ordered sums above the leaves");
    std::vector<float> a(256 * 300 + 7);
    for (std::size_t i = 0; i < a.size(); ++i)
      a[i] = std::ldexp(to_float(bf16(u(g))), static_cast<int>(i / 256 % 61) - 30);
    check(a);
  }
  {
    INFO("two leaves of 1 and 2^-60: ordered sum at the root only");
    std::vector<float> a(512, 1.0f);
    for (std::size_t i = 256; i < 512; ++i)
      a[i] = std::ldexp(1.0f, -60);
    check(a);
  }
  {
    INFO("negative values, zeros and negative zeros");
    std::vector<float> a(3000, -0.0f);
    check(a);
    for (std::size_t i = 0; i < a.size(); ++i)
      a[i] = i % 3 == 0 ? -u(g) : (i % 3 == 1 ? 0.0f : u(g));
    check(a);
  }
  {
    INFO("subnormal, infinite and NaN values");
    std::vector<float> a(5000, 1.0f);
    a[700] = std::numeric_limits<float>::denorm_min();
    check(a);
    a[4000] = std::numeric_limits<float>::infinity();
    check(a);
    a[10] = std::numeric_limits<float>::quiet_NaN();
    check(a);
  }
}

TEST_CASE("cuda blockwise: the nested quantization on every nested block size, partial blocks "
          "and unaligned views") {
  if (qmem::test::skip<cuda_backend>())
    return;
  // nested_quantize: groups of 2 (nested block 64) to 128 lanes (4096: the CTA's warps combine
  // their maxima), a partial last block and a partial last vector, absmax / qabsmax views at
  // offsets that are not 16- / 4-byte aligned (scalar loads and stores), special values
  auto check = [](std::vector<float> const& absmax, std::size_t nb, std::size_t offset) {
    std::size_t const m = absmax.size();
    std::vector<std::uint8_t> hq(m);
    std::vector<float> h2(block_count(m, nb));
    std::vector<float> hoff(1);
    quantize_scales(exec::host{}, view(absmax), nb, view(hq), view(h2), view(hoff));
    std::vector<float> padded(offset, 1.0f);
    padded.insert(padded.end(), absmax.begin(), absmax.end());
    auto da = cuda_backend::upload(padded);
    auto dq = cuda_backend::alloc<std::uint8_t>(m + offset);
    auto d2 = cuda_backend::alloc<float>(h2.size());
    auto doff = cuda_backend::alloc<float>(1);
    auto const qv = dq.view().subview(offset, m);
    quantize_scales(exec::cuda{}, tensor_view<float const>(da.view()).subview(offset, m), nb, qv,
                    d2.view(), doff.view());
    REQUIRE(same_values(cuda_backend::download(doff.view()), hoff));
    REQUIRE(cuda_backend::download(tensor_view<std::uint8_t const>(qv)) == hq);
    REQUIRE(same_values(cuda_backend::download(d2.view()), h2));
  };
  std::mt19937 g(41);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<float> a(256 * 301 + 13);
  for (auto& x : a)
    x = std::ldexp(u(g), static_cast<int>(g() % 9) - 4);
  for (std::size_t nb : {std::size_t{64}, std::size_t{256}, std::size_t{4096}})
    for (std::size_t offset : {std::size_t{0}, std::size_t{1}, std::size_t{3}}) {
      CAPTURE(nb);
      CAPTURE(offset);
      check(a, nb, offset);
    }
  auto b = a;
  b[100] = std::numeric_limits<float>::infinity();
  check(b, 256, 0);
  b[5000] = std::numeric_limits<float>::quiet_NaN();
  check(b, 256, 1);
  check(std::vector<float>(77, 0.25f), 64, 0); // every scale equal to the offset
}

TEST_CASE("cuda blockwise: double quantization in one cooperative kernel equals the host and "
          "the two-kernel path") {
  if (qmem::test::skip<cuda_backend>())
    return;
  // offset_nested_quantize (scales_path::fused / fused_dependent) against the host and against
  // offset_mean + nested_quantize (two_kernels): sums exact in any order (the one-barrier path)
  // and not (subnormal, infinite, NaN scales, spans too wide for 2^53: the tree level by level
  // behind grid barriers, with one, two and three levels), every nested block size, partial
  // CTAs and blocks, unaligned views
  namespace k = cuda_impl::kernels;
  std::size_t const capacity = k::fused_capacity(0);
  if (capacity == 0) {
    MESSAGE("no cooperative launch on this device: quantize_scales takes the two-kernel path");
    return;
  }
  auto check = [](std::vector<float> const& absmax, std::size_t nb, std::size_t offset,
                  k::scales_path path) {
    std::size_t const m = absmax.size();
    std::vector<std::uint8_t> hq(m);
    std::vector<float> h2(block_count(m, nb));
    std::vector<float> hoff(1);
    quantize_scales(exec::host{}, view(absmax), nb, view(hq), view(h2), view(hoff));
    std::vector<float> padded(offset, 1.0f);
    padded.insert(padded.end(), absmax.begin(), absmax.end());
    auto da = cuda_backend::upload(padded);
    auto dq = cuda_backend::alloc<std::uint8_t>(m + offset);
    auto d2 = cuda_backend::alloc<float>(h2.size());
    auto doff = cuda_backend::alloc<float>(1);
    auto const av = tensor_view<float const>(da.view()).subview(offset, m);
    auto const qv = dq.view().subview(offset, m);
    k::quantize_scales_by(exec::cuda{}, av.data(), m, nb, qv.data(), d2.view().data(),
                          doff.view().data(), path);
    REQUIRE(same_values(cuda_backend::download(doff.view()), hoff));
    REQUIRE(cuda_backend::download(tensor_view<std::uint8_t const>(qv)) == hq);
    REQUIRE(same_values(cuda_backend::download(d2.view()), h2));
  };
  std::mt19937 g(43);
  std::uniform_real_distribution<float> u(0.5f, 2.0f);
  auto bf16_scales = [&](std::size_t m) {
    std::vector<float> a(m);
    for (auto& x : a)
      x = to_float(bf16(u(g)));
    return a;
  };
  std::vector<std::vector<float>> sets;
  sets.push_back(bf16_scales(1));
  sets.push_back(bf16_scales(255));
  sets.push_back(bf16_scales(8192 * 3 + 77)); // partial last CTA
  sets.push_back(bf16_scales((std::size_t{1} << 20) + 3));
  {
    std::vector<float> a(70001); // fp32 over 2^-24 .. 2^24: not exact, two levels
    for (auto& x : a)
      x = std::ldexp(u(g), static_cast<int>(g() % 49) - 24);
    sets.push_back(a);
  }
  {
    std::vector<float> a(300001); // not exact, three levels (1172 leaves -> 5 -> 1)
    for (std::size_t i = 0; i < a.size(); ++i)
      a[i] = std::ldexp(to_float(bf16(u(g))), static_cast<int>(i / 256 % 61) - 30);
    sets.push_back(a);
  }
  {
    std::vector<float> a(512, 1.0f); // exact leaves, inexact root
    for (std::size_t i = 256; i < 512; ++i)
      a[i] = std::ldexp(1.0f, -60);
    sets.push_back(a);
  }
  {
    // m = 4096 scales, a leading bit at 2^20: lowest bits 2^-20 (span 40 = 52 - ceil(log2 m):
    // the one-barrier path), 2^-21 (41: the tree) and 2^-43 (63)
    std::vector<float> a(4096, 1.0f);
    a[7] = std::ldexp(1.0f, 20);
    for (int low : {-20, -21, -43}) {
      a[9] = 1.0f + std::ldexp(1.0f, low);
      sets.push_back(a);
    }
  }
  {
    auto a = bf16_scales(5000);
    for (std::size_t i = 0; i < a.size(); i += 3)
      a[i] = i % 2 == 0 ? -a[i] : 0.0f;
    a[11] = -0.0f;
    sets.push_back(a);
    a[700] = std::numeric_limits<float>::denorm_min();
    sets.push_back(a);
    a[4000] = std::numeric_limits<float>::infinity();
    sets.push_back(a);
    a[10] = std::numeric_limits<float>::quiet_NaN();
    sets.push_back(a);
  }
  sets.push_back(std::vector<float>(77, 0.25f)); // every scale equal to the offset
  sets.push_back(std::vector<float>(3000, 0.0f));
  std::vector<k::scales_path> paths = {k::scales_path::two_kernels, k::scales_path::fused,
                                       k::scales_path::fused_dependent,
                                       k::scales_path::fused_persistent};
  for (std::size_t i = 0; i < sets.size(); ++i)
    for (auto path : paths) {
      CAPTURE(i);
      CAPTURE(static_cast<int>(path));
      check(sets[i], 256, 0, path);
    }
  auto const& a = sets[3];
  for (std::size_t nb : {std::size_t{64}, std::size_t{128}, std::size_t{1024}, std::size_t{4096}})
    for (std::size_t offset : {std::size_t{0}, std::size_t{1}, std::size_t{3}})
      for (auto path : paths) {
        CAPTURE(nb);
        CAPTURE(offset);
        CAPTURE(static_cast<int>(path));
        if (path != k::scales_path::two_kernels && path != k::scales_path::fused)
          check(a, nb, offset, path);
      }
}

TEST_CASE("cuda blockwise: a cooperative launch refused as too large falls back to the two "
          "kernels, with no error left behind") {
  if (qmem::test::skip<cuda_backend>())
    return;
  // the case of a context that holds fewer CTAs than the device's SM count and occupancy promise
  // (MPS with an active-thread limit): quantize_scales chooses the cooperative kernel, the runtime
  // refuses it (cudaErrorCooperativeLaunchTooLarge), the two kernels run instead and the
  // capacity drops below the refused grid. Made real here by a capacity set one CTA above what the
  // device holds.
  namespace k = cuda_impl::kernels;
  std::size_t const promised = k::device_fused_capacity(0);
  if (promised == 0 || promised >= k::fused_tree_limit) {
    MESSAGE("the cooperative kernel's capacity is not bounded by residency on this device");
    return;
  }
  CHECK_THROWS_AS(k::set_fused_capacity(0, k::fused_tree_limit + 1), bad_argument);
  std::mt19937 g(53);
  std::uniform_real_distribution<float> u(0.5f, 2.0f);
  std::size_t const nb = 256;
  auto run = [&](std::size_t m, auto&& call) {
    std::vector<float> a(m);
    for (auto& x : a)
      x = to_float(bf16(u(g)));
    std::vector<std::uint8_t> hq(m);
    std::vector<float> h2(block_count(m, nb));
    std::vector<float> hoff(1);
    quantize_scales(exec::host{}, view(a), nb, view(hq), view(h2), view(hoff));
    auto da = cuda_backend::upload(a);
    auto dq = cuda_backend::alloc<std::uint8_t>(m);
    auto d2 = cuda_backend::alloc<float>(h2.size());
    auto doff = cuda_backend::alloc<float>(1);
    // the uploads and the allocations' fills run on the legacy default stream, which a
    // non-blocking stream does not wait for
    cuda_backend::sync();
    call(tensor_view<float const>(da.view()), dq.view(), d2.view(), doff.view());
    cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    CHECK(cudaGetLastError() == cudaSuccess);
    REQUIRE(same_values(cuda_backend::download(doff.view()), hoff));
    REQUIRE(cuda_backend::download(dq.view()) == hq);
    REQUIRE(same_values(cuda_backend::download(d2.view()), h2));
  };
  std::size_t const over = promised + k::fused_scales_per_cta;
  // 1. the launch helper itself: a grid one CTA past residency is refused, nothing is enqueued
  {
    auto da = cuda_backend::alloc<float>(over);
    auto dq = cuda_backend::alloc<std::uint8_t>(over);
    auto d2 = cuda_backend::alloc<float>(block_count(over, nb));
    auto doff = cuda_backend::alloc<float>(1);
    CHECK_FALSE(k::launch_offset_nested_quantize(exec::cuda{}, da.view().data(), over, nb,
                                                 doff.view().data(), dq.view().data(),
                                                 d2.view().data(), true));
    CHECK(cudaGetLastError() == cudaSuccess);
    CHECK(k::fused_capacity(0) == promised);
  }
  // 2. quantize_scales told the device holds one CTA more: refused, falls back, capacity lowered
  k::set_fused_capacity(0, over);
  CHECK(k::fused_capacity(0) == over);
  run(over,
      [&](auto a, auto q, auto a2, auto off) { quantize_scales(exec::cuda{}, a, nb, q, a2, off); });
  CHECK(k::fused_capacity(0) == promised);
  // 3. every fused path of quantize_scales_by past residency falls back the same way
  for (auto path :
       {k::scales_path::fused, k::scales_path::fused_dependent, k::scales_path::fused_persistent}) {
    CAPTURE(static_cast<int>(path));
    run(over, [&](auto a, auto q, auto a2, auto off) {
      k::quantize_scales_by(exec::cuda{}, a.data(), a.size(), nb, q.data(), a2.data(), off.data(),
                            path);
    });
  }
  // 4. inside a capture the refusal invalidates the capture: quantize_scales throws a cuda_error
  // that says so and lowers the capacity; the next capture takes the two kernels and replays to
  // the host's bits
  {
    cudaStream_t s = nullptr;
    cuda_detail::check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    exec::cuda const e{s, 0, false};
    k::set_fused_capacity(0, over);
    auto da = cuda_backend::alloc<float>(over);
    auto dq = cuda_backend::alloc<std::uint8_t>(over);
    auto d2 = cuda_backend::alloc<float>(block_count(over, nb));
    auto doff = cuda_backend::alloc<float>(1);
    cuda_detail::check(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal),
                       "cudaStreamBeginCapture");
    CHECK_THROWS_AS(quantize_scales(e, tensor_view<float const>(da.view()), nb, dq.view(),
                                    d2.view(), doff.view()),
                    cuda_error);
    cudaGraph_t invalid = nullptr;
    CHECK(cudaStreamEndCapture(s, &invalid) == cudaErrorStreamCaptureInvalidated);
    (void)cudaGetLastError();
    if (invalid != nullptr)
      (void)cudaGraphDestroy(invalid);
    CHECK(k::fused_capacity(0) == promised);
    run(over, [&](auto a, auto q, auto a2, auto off) {
      cudaGraph_t graph = nullptr;
      cuda_detail::check(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal),
                         "cudaStreamBeginCapture");
      quantize_scales(e, a, nb, q, a2, off);
      cuda_detail::check(cudaStreamEndCapture(s, &graph), "cudaStreamEndCapture");
      cudaGraphExec_t instance = nullptr;
      cuda_detail::check(cudaGraphInstantiate(&instance, graph, 0), "cudaGraphInstantiate");
      cuda_detail::check(cudaGraphLaunch(instance, s), "cudaGraphLaunch");
      cuda_detail::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
      (void)cudaGraphExecDestroy(instance);
      (void)cudaGraphDestroy(graph);
    });
    cuda_detail::check(cudaStreamDestroy(s), "cudaStreamDestroy");
  }
  // 5. capacity 0: every size takes the two kernels; then the device's capacity again
  k::set_fused_capacity(0, 0);
  run(3000,
      [&](auto a, auto q, auto a2, auto off) { quantize_scales(exec::cuda{}, a, nb, q, a2, off); });
  k::set_fused_capacity(0, promised);
  CHECK(k::fused_capacity(0) == promised);
  run(promised,
      [&](auto a, auto q, auto a2, auto off) { quantize_scales(exec::cuda{}, a, nb, q, a2, off); });
}

TEST_CASE("cuda blockwise: double quantization of as many scales as the cooperative kernel "
          "holds (every CTA resident) and one more (the two-kernel path)") {
  if (qmem::test::skip<cuda_backend>())
    return;
  std::size_t const capacity = cuda_impl::kernels::fused_capacity(0);
  std::mt19937 g(47);
  std::uniform_real_distribution<float> u(0.5f, 2.0f);
  for (std::size_t const m : {capacity, capacity + 1}) {
    CAPTURE(m);
    std::vector<float> big(m);
    for (auto& x : big)
      x = to_float(bf16(u(g)));
    std::size_t const nb = 256;
    std::vector<std::uint8_t> hq(big.size());
    std::vector<float> h2(block_count(big.size(), nb));
    std::vector<float> hoff(1);
    quantize_scales(exec::host{}, view(big), nb, view(hq), view(h2), view(hoff));
    auto da = cuda_backend::upload(big);
    auto dq = cuda_backend::alloc<std::uint8_t>(big.size());
    auto d2 = cuda_backend::alloc<float>(h2.size());
    auto doff = cuda_backend::alloc<float>(1);
    quantize_scales(exec::cuda{}, tensor_view<float const>(da.view()), nb, dq.view(), d2.view(),
                    doff.view());
    REQUIRE(same_values(cuda_backend::download(doff.view()), hoff));
    REQUIRE(cuda_backend::download(dq.view()) == hq);
    REQUIRE(same_values(cuda_backend::download(d2.view()), h2));
  }
}

// quantize_blockwise_nested<C> (quantize + double quantization in one call) on x[offset, offset
// + n) against the host's quantize_blockwise then quantize_scales, every output bit for bit.
template <class C, class T>
void check_nested_one_call(std::vector<float> const& values, std::size_t block, std::size_t nb,
                           std::size_t offset = 0) {
  CAPTURE(values.size());
  CAPTURE(block);
  CAPTURE(nb);
  CAPTURE(offset);
  std::size_t const n = values.size() - offset;
  std::size_t const m = block_count(n, block);
  auto const x = as<T>(values);
  tensor_view<T const> hx(x.data() + offset, n);
  std::vector<std::uint8_t> hc(code_bytes<C>(n));
  std::vector<float> ha(m);
  std::vector<std::uint8_t> hq(m);
  std::vector<float> h2(block_count(m, nb));
  std::vector<float> hoff(1, -1.f);
  quantize_blockwise<C>(exec::host{}, hx, block, view(hc), view(ha));
  quantize_scales(exec::host{}, view(std::as_const(ha)), nb, view(hq), view(h2), view(hoff));
  auto dx = cuda_backend::upload(x);
  auto dc = cuda_backend::alloc<std::uint8_t>(hc.size());
  auto da = cuda_backend::alloc<float>(m);
  auto dq = cuda_backend::alloc<std::uint8_t>(m);
  auto d2 = cuda_backend::alloc<float>(h2.size());
  auto doff = cuda_backend::upload(std::vector<float>(1, -1.f));
  quantize_blockwise_nested<C>(exec::cuda{}, tensor_view<T const>(dx.view()).subview(offset, n),
                               block, dc.view(), da.view(), nb, dq.view(), d2.view(), doff.view());
  REQUIRE(cuda_backend::download(dc.view()) == hc);
  REQUIRE(same_values(cuda_backend::download(da.view()), ha));
  REQUIRE(same_values(cuda_backend::download(doff.view()), hoff));
  REQUIRE(cuda_backend::download(dq.view()) == hq);
  REQUIRE(same_values(cuda_backend::download(d2.view()), h2));
}

TEST_CASE("cuda blockwise: quantize_blockwise_nested equals the host's two calls") {
  if (qmem::test::skip<cuda_backend>())
    return;
  std::mt19937 g(53);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> v(64 * 9000 + 5);
  for (auto& e : v)
    e = nd(g);
  check_nested_one_call<nf4, bf16>(v, 64, 256);
  check_nested_one_call<fp4, bf16>(v, 64, 256, 3); // unaligned view, partial last block
  check_nested_one_call<dynamic_signed, float>(v, 256, 256);
  // scales over 2^-30 .. 2^30: the offset's sum is not exact in every order
  for (std::size_t i = 0; i < v.size(); ++i)
    v[i] = std::ldexp(v[i], static_cast<int>(i / 64 % 61) - 30);
  check_nested_one_call<nf4, bf16>(v, 64, 4096);
  check_nested_one_call<nf4, bf16>(std::vector<float>{}, 64, 256); // empty: offset 0
}

TEST_CASE("cuda blockwise: double quantization captured in a CUDA graph replays to the host's "
          "bits") {
  if (qmem::test::skip<cuda_backend>())
    return;
  // the 4-bit quantization then quantize_scales (offset_nested_quantize: a cooperative kernel
  // node, programmatic dependent of the quantization) in one capture, replayed twice
  cudaStream_t s = nullptr;
  cuda_detail::check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  auto const x = as<bf16>(test_values(64 * 20011, 13));
  std::size_t const n = x.size();
  std::size_t const m = block_count(n, 64);
  std::vector<std::uint8_t> hc(code_bytes<nf4>(n));
  std::vector<float> ha(m);
  quantize_blockwise<nf4>(exec::host{}, tensor_view<bf16 const>(x.data(), n), 64, view(hc),
                          view(ha));
  std::vector<std::uint8_t> hq(m);
  std::vector<float> h2(block_count(m, 256));
  std::vector<float> hoff(1);
  quantize_scales(exec::host{}, view(std::as_const(ha)), 256, view(hq), view(h2), view(hoff));
  auto dx = cuda_backend::upload(x);
  auto dc = cuda_backend::alloc<std::uint8_t>(hc.size());
  auto da = cuda_backend::alloc<float>(m);
  auto dq = cuda_backend::alloc<std::uint8_t>(m);
  auto d2 = cuda_backend::alloc<float>(h2.size());
  auto doff = cuda_backend::alloc<float>(1);
  // the uploads and the allocations' fills run on the legacy default stream, which a
  // non-blocking stream does not wait for
  cuda_backend::sync();
  exec::cuda const e{s, 0, false};
  cudaGraph_t graph = nullptr;
  cuda_detail::check(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal),
                     "cudaStreamBeginCapture");
  quantize_blockwise<nf4>(e, tensor_view<bf16 const>(dx.view()), 64, dc.view(), da.view());
  quantize_scales(e, tensor_view<float const>(da.view()), 256, dq.view(), d2.view(), doff.view());
  cuda_detail::check(cudaStreamEndCapture(s, &graph), "cudaStreamEndCapture");
  cudaGraphExec_t instance = nullptr;
  cuda_detail::check(cudaGraphInstantiate(&instance, graph, 0), "cudaGraphInstantiate");
  for (int replay = 0; replay < 2; ++replay) {
    cuda_detail::check(cudaGraphLaunch(instance, s), "cudaGraphLaunch");
    cuda_detail::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    REQUIRE(cuda_backend::download(dc.view()) == hc);
    REQUIRE(same_bits(cuda_backend::download(da.view()), ha));
    REQUIRE(same_bits(cuda_backend::download(doff.view()), hoff));
    REQUIRE(cuda_backend::download(dq.view()) == hq);
    REQUIRE(same_bits(cuda_backend::download(d2.view()), h2));
  }
  // the same calls outside a capture take the stream's persistent workspace (one per stream,
  // kept across calls), the capture took the pool's; both give the host's bits, in any order
  namespace k = cuda_impl::kernels;
  double* const on_s = k::persistent_workspace(e);
  double* const on_default = k::persistent_workspace(exec::cuda{});
  if (k::fused_capacity(0) != 0) {
    CHECK(on_s != nullptr);
    CHECK(on_default != nullptr);
    CHECK(on_s != on_default);
    CHECK(k::persistent_workspace(e) == on_s);
  }
  for (int round = 0; round < 2; ++round) {
    cuda_detail::check(cudaMemsetAsync(dq.view().data(), 0, m, s), "cudaMemsetAsync");
    cuda_detail::check(cudaMemsetAsync(d2.view().data(), 0, h2.size() * sizeof(float), s),
                       "cudaMemsetAsync");
    if (round == 0) {
      quantize_blockwise<nf4>(e, tensor_view<bf16 const>(dx.view()), 64, dc.view(), da.view());
      quantize_scales(e, tensor_view<float const>(da.view()), 256, dq.view(), d2.view(),
                      doff.view());
    } else {
      cuda_detail::check(cudaGraphLaunch(instance, s), "cudaGraphLaunch");
    }
    cuda_detail::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    CAPTURE(round);
    REQUIRE(same_bits(cuda_backend::download(doff.view()), hoff));
    REQUIRE(cuda_backend::download(dq.view()) == hq);
    REQUIRE(same_bits(cuda_backend::download(d2.view()), h2));
  }
  (void)cudaGraphExecDestroy(instance);
  (void)cudaGraphDestroy(graph);
  cuda_detail::check(cudaStreamDestroy(s), "cudaStreamDestroy");
}

namespace {
// Launches dequantize_aligned<C, T, Scales, PerStep> on `grid` CTAs (0: the dispatched launch's
// rule, one step per thread) and returns its output.
template <class C, class T, int PerStep, class Scales>
std::vector<T> dequantize_with(tensor_view<std::uint8_t const> codes, Scales scales, std::size_t n,
                               std::size_t block, unsigned grid) {
  namespace k = cuda_impl::kernels;
  auto y = cuda_backend::alloc<T>(n);
  cuda_backend::sync();
  if (grid == 0)
    grid = static_cast<unsigned>(n / k::vector_items<T> / PerStep / k::cta_threads + 1);
  k::dequantize_aligned<C, T, Scales, PerStep><<<grid, k::cta_threads>>>(
      codes.data(), scales, n, k::log2_exact(block), y.view().data(), k::decoded_values_on<C>(0));
  cuda_detail::check(cudaGetLastError(), "dequantize_aligned");
  cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  return cuda_backend::download(tensor_view<T const>(y.view()));
}

// The 4-bit decoding of dequantize_aligned (warp shuffles) with 2 (dispatched) and 4 vectors per
// thread, plain and double-quantized scales, against the host's dequantization.
template <class C, class T>
void check_shuffle_decoding(std::vector<float> const& values, std::size_t block, unsigned grid) {
  std::size_t const n = values.size();
  std::size_t const nb = 256;
  auto const x = as<T>(values);
  std::vector<std::uint8_t> hc(code_bytes<C>(n));
  std::vector<float> ha(block_count(n, block));
  quantize_blockwise<C>(exec::host{}, view(std::as_const(x)), block, view(hc), view(ha));
  std::vector<T> hy(n);
  dequantize_blockwise<C>(exec::host{}, view(std::as_const(hc)), view(std::as_const(ha)), block,
                          view(hy));
  std::vector<std::uint8_t> hq(ha.size());
  std::vector<float> h2(block_count(ha.size(), nb));
  std::vector<float> hoff(1);
  quantize_scales(exec::host{}, view(std::as_const(ha)), nb, view(hq), view(h2), view(hoff));
  std::vector<T> hyn(n);
  dequantize_blockwise_nested<C>(exec::host{}, view(std::as_const(hc)), view(std::as_const(hq)),
                                 view(std::as_const(h2)), view(std::as_const(hoff)), block, nb,
                                 view(hyn));

  auto dc = cuda_backend::upload(hc);
  auto da = cuda_backend::upload(ha);
  auto dq = cuda_backend::upload(hq);
  auto d2 = cuda_backend::upload(h2);
  auto doff = cuda_backend::upload(hoff);
  namespace k = cuda_impl::kernels;
  k::plain_scales const ps{da.view().data()};
  k::nested_scales const ns{dq.view().data(), d2.view().data(), doff.view().data(),
                            k::log2_exact(nb), k::nested_values(0)};
  tensor_view<std::uint8_t const> const cv(dc.view());
  auto both = [&]<int PerStep>() {
    CAPTURE(PerStep);
    CHECK(same_values(dequantize_with<C, T, PerStep>(cv, ps, n, block, grid), hy));
    CHECK(same_values(dequantize_with<C, T, PerStep>(cv, ns, n, block, grid), hyn));
  };
  both.template operator()<2>();
  both.template operator()<4>();
}

// Sizes with a partial last vector, a last warp partly past the end (the shuffle decoding's
// warp-uniform loop), a partial last block; grids of one step per thread and of 1 and 3 CTAs (the
// loop strides); blocks with zero, NaN and infinite absmax (the non-finite-scale path).
void check_shuffle_decoding_at(std::size_t n) {
  for (unsigned grid : {0u, 1u, 3u}) {
    CAPTURE(n);
    CAPTURE(grid);
    auto const v = test_values(n, static_cast<std::uint32_t>(n) + grid, true);
    check_shuffle_decoding<nf4, bf16>(v, 64, grid);
    check_shuffle_decoding<fp4, bf16>(v, 32, grid);
    check_shuffle_decoding<nf4, f16>(v, 4096, grid);
    check_shuffle_decoding<fp4, float>(v, 128, grid);
  }
}
} // namespace

TEST_CASE("cuda blockwise: 4-bit shuffle dequantization equals the host, small sizes") {
  if (qmem::test::skip<cuda_backend>())
    return;
  for (std::size_t n : {std::size_t{1}, std::size_t{15}, std::size_t{17}, std::size_t{4095},
                        std::size_t{8 * 256 * 4 * 3 + 8 * 37 + 3}})
    check_shuffle_decoding_at(n);
}

TEST_CASE("cuda blockwise: 4-bit shuffle dequantization equals the host, 2^20 + 7 elements") {
  if (qmem::test::skip<cuda_backend>())
    return;
  check_shuffle_decoding_at((std::size_t{1} << 20) + 7);
}

namespace {
__global__ void fill_pattern(bf16* x, std::size_t n) {
  std::size_t const stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    std::uint32_t h = static_cast<std::uint32_t>(i ^ (i >> 29)) * 2654435761u;
    h ^= h >> 15;
    x[i] = bf16(static_cast<float>(static_cast<int>(h & 0xffff) - 32768) * (1.0f / 32768.0f) *
                static_cast<float>(1 + (i >> 32)));
  }
}
} // namespace

TEST_CASE("cuda blockwise: more than 2^32 elements (64-bit indexing)") {
  if (qmem::test::skip<cuda_backend>())
    return;
  std::size_t const n = (std::size_t{1} << 32) + 4099; // > 2^32, odd, last block partial
  std::size_t const block = 64;
  std::size_t free_bytes = 0;
  std::size_t total_bytes = 0;
  cuda_detail::check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  std::size_t const need = n * 2 * 2 + n / 2 + n / 16 + (std::size_t{1} << 30);
  if (free_bytes < need) {
    MESSAGE("SKIPPED: needs " << need << " bytes of free device memory, " << free_bytes << " free");
    return;
  }
  bf16* x = nullptr;
  std::uint8_t* codes = nullptr;
  float* absmax = nullptr;
  bf16* y = nullptr;
  std::size_t const blocks = block_count(n, block);
  cuda_detail::check(cudaMalloc(&x, n * sizeof(bf16)), "cudaMalloc");
  cuda_detail::check(cudaMalloc(&codes, code_bytes<nf4>(n)), "cudaMalloc");
  cuda_detail::check(cudaMalloc(&absmax, blocks * sizeof(float)), "cudaMalloc");
  cuda_detail::check(cudaMalloc(&y, n * sizeof(bf16)), "cudaMalloc");
  fill_pattern<<<132 * 8, 256>>>(x, n);
  cuda_detail::check(cudaGetLastError(), "fill_pattern");
  exec::cuda const e{};
  quantize_blockwise<nf4>(
      e, tensor_view<bf16 const>(x, n, memory_space::device), block,
      tensor_view<std::uint8_t>(codes, code_bytes<nf4>(n), memory_space::device),
      tensor_view<float>(absmax, blocks, memory_space::device));
  dequantize_blockwise<nf4>(
      e, tensor_view<std::uint8_t const>(codes, code_bytes<nf4>(n), memory_space::device),
      tensor_view<float const>(absmax, blocks, memory_space::device), block,
      tensor_view<bf16>(y, n, memory_space::device));
  cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");

  // The host recomputes two windows of whole blocks: one straddling 2^32 and the tail.
  for (std::size_t first_block : {(std::size_t{1} << 32) / block - 3, blocks - 5}) {
    CAPTURE(first_block);
    std::size_t const begin = first_block * block;
    std::size_t const count = n - begin < 8 * block ? n - begin : 8 * block;
    std::vector<bf16> hx(count);
    cuda_detail::check(
        cudaMemcpy(hx.data(), x + begin, count * sizeof(bf16), cudaMemcpyDeviceToHost),
        "cudaMemcpy");
    std::vector<std::uint8_t> hc(code_bytes<nf4>(count));
    std::vector<float> ha(block_count(count, block));
    quantize_blockwise<nf4>(exec::host{}, view(std::as_const(hx)), block, view(hc), view(ha));
    std::vector<std::uint8_t> gc(hc.size());
    std::vector<float> ga(ha.size());
    std::vector<bf16> gy(count);
    cuda_detail::check(cudaMemcpy(gc.data(), codes + begin / 2, gc.size(), cudaMemcpyDeviceToHost),
                       "cudaMemcpy");
    cuda_detail::check(cudaMemcpy(ga.data(), absmax + first_block, ga.size() * sizeof(float),
                                  cudaMemcpyDeviceToHost),
                       "cudaMemcpy");
    cuda_detail::check(
        cudaMemcpy(gy.data(), y + begin, count * sizeof(bf16), cudaMemcpyDeviceToHost),
        "cudaMemcpy");
    std::vector<bf16> hy(count);
    dequantize_blockwise<nf4>(exec::host{}, view(std::as_const(hc)), view(std::as_const(ha)), block,
                              view(hy));
    CHECK(gc == hc);
    CHECK(same_bits(ga, ha));
    CHECK(same_bits(gy, hy));
  }
  (void)cudaFree(x);
  (void)cudaFree(codes);
  (void)cudaFree(absmax);
  (void)cudaFree(y);
}

#endif // QMEM_HAS_CUDA()
