// core/cuda/runtime.cuh's residency checks: every CUDA entry point refuses a tensor that does not
// live on its execution object's device (pageable host memory presented as device memory, memory
// of another device) with a bad_argument naming the argument, before anything is written; managed
// and pinned memory pass. And check_view's device-memory probe (core/tensor.hpp), through which the
// host backend refuses device memory once a qmem CUDA call has run. The CUDA cases run in the nvcc
// build (skipping with a message without a GPU; the two-device case also without a second GPU).
#include <qmem/core.hpp>
#include <qmem/quant.hpp>

#include <doctest/doctest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "support/backend.hpp"

#if QMEM_HAS_CUDA()
#include <qmem/core/cuda/runtime.cuh>
#include <qmem/memory/cuda_resource.cuh>
#include <qmem/optim/cuda/device_optimizer.cuh>
#include <qmem/optim/rules.hpp>
#include <qmem/optim/state.hpp>
#endif

namespace {

using namespace qmem;

// The probe slot of check_view, swapped for a test's and restored on every path.
class probe_swap {
  qmem::detail::device_memory_probe_fn previous_;

public:
  explicit probe_swap(qmem::detail::device_memory_probe_fn f)
      : previous_(qmem::detail::device_memory_probe.exchange(f)) {}
  probe_swap(probe_swap const&) = delete;
  probe_swap& operator=(probe_swap const&) = delete;
  ~probe_swap() { qmem::detail::device_memory_probe.store(previous_); }
};

float flagged[256]; // the address the test probe reports as device memory

} // namespace

TEST_CASE("check_view: the host backend refuses what the device-memory probe reports") {
  std::vector<float> plain(256, 1.0f);
  std::vector<std::uint8_t> codes(128, 0xA5);
  std::vector<float> absmax(4, -1.0f);
  tensor_view<float const> const dev(flagged, 256, memory_space::host);
  tensor_view<float const> const ok(plain.data(), plain.size(), memory_space::host);
  probe_swap const swap(+[](void const* p) noexcept { return p == static_cast<void*>(flagged); });
  CHECK_THROWS_WITH_AS(
      check_view(dev, "f", "x", true, false),
      doctest::Contains("f: x is device memory (CUDA says so; its view says host)"), bad_argument);
  CHECK_NOTHROW(check_view(ok, "f", "x", true, false));
  // a device-side call: the probe is not asked (check_resident checks at launch)
  CHECK_NOTHROW(check_view(tensor_view<float const>(flagged, 256, memory_space::managed), "f", "x",
                           false, true));
  CHECK_NOTHROW(check_view(dev.subview(0, 0), "f", "x", true, false)); // empty: no byte touched
  // through a host entry point, before anything is written
  CHECK_THROWS_WITH_AS(
      quant::quantize_blockwise<quant::nf4>(exec::host{}, dev, 64, view(codes), view(absmax)),
      doctest::Contains("x is device memory"), bad_argument);
  CHECK(codes == std::vector<std::uint8_t>(128, 0xA5));
  CHECK(absmax == std::vector<float>(4, -1.0f));
}

TEST_CASE("check_view: no probe, no check") {
  probe_swap const swap(nullptr);
  tensor_view<float const> const dev(flagged, 256, memory_space::host);
  CHECK_NOTHROW(check_view(dev, "f", "x", true, false));
}

#if QMEM_HAS_CUDA()

namespace {

using qmem::test::cuda_backend;

// Poisoned (0xA5) device buffers of the blockwise, rowwise and double-quantization outputs.
struct quant_buffers {
  static constexpr std::size_t n = 1024, block = 64, blocks = n / block;
  test::device_array<float> x = cuda_backend::upload(std::vector<float>(n, 0.5f));
  test::device_array<std::uint8_t> codes = cuda_backend::alloc<std::uint8_t>(n / 2);
  test::device_array<float> absmax = cuda_backend::alloc<float>(blocks);
  test::device_array<std::uint8_t> qabsmax = cuda_backend::alloc<std::uint8_t>(blocks);
  test::device_array<float> absmax2 = cuda_backend::alloc<float>(1);
  test::device_array<float> offset = cuda_backend::alloc<float>(1);
  test::device_array<float> y = cuda_backend::alloc<float>(n);
  test::device_array<std::int8_t> q = cuda_backend::alloc<std::int8_t>(n);

  // Every output still holds its poison: nothing was written.
  void check_untouched() const {
    auto const poisoned = [](auto const& a) {
      auto const v = cuda_backend::download(a.view());
      std::vector<unsigned char> bytes(v.size() * sizeof(v[0]));
      std::memcpy(bytes.data(), v.data(), bytes.size());
      for (unsigned char b : bytes)
        if (b != 0xA5)
          return false;
      return true;
    };
    CHECK(poisoned(codes));
    CHECK(poisoned(absmax));
    CHECK(poisoned(qabsmax));
    CHECK(poisoned(absmax2));
    CHECK(poisoned(offset));
    CHECK(poisoned(y));
    CHECK(poisoned(q));
  }
};

// `what` thrown as bad_argument by `f`, whose message contains `text`.
template <class F>
void check_refused(F&& f, std::string const& text) {
  CHECK_THROWS_WITH_AS(f(), doctest::Contains(text.c_str()), bad_argument);
}

} // namespace

TEST_CASE("CUDA entry points refuse pageable host memory presented as device memory") {
  if (test::skip<cuda_backend>())
    return;
  using namespace qmem::quant;
  exec::cuda const e{nullptr, 0};
  quant_buffers d;
  constexpr std::size_t n = quant_buffers::n, block = quant_buffers::block;
  std::vector<float> host_x(n, 0.5f);
  std::vector<std::uint8_t> host_codes(n / 2, 0);
  std::vector<float> host_scales(quant_buffers::blocks, 1.0f);
  tensor_view<float const> const hx(host_x.data(), n, memory_space::device); // a false label
  tensor_view<std::uint8_t const> const hcodes(host_codes.data(), n / 2, memory_space::device);
  tensor_view<float const> const hscales(host_scales.data(), host_scales.size(),
                                         memory_space::device);
  std::string const pageable = " is pageable host memory";
  std::string const on_device_0 = "this call runs on device 0";

  check_refused([&] { quantize_blockwise<nf4>(e, hx, block, d.codes.view(), d.absmax.view()); },
                "quantize_blockwise: x" + pageable);
  check_refused([&] { quantize_blockwise<nf4>(e, hx, block, d.codes.view(), d.absmax.view()); },
                on_device_0);
  check_refused(
      [&] {
        dequantize_blockwise<nf4>(e, hcodes, tensor_view<float const>(d.absmax.view()), block,
                                  d.y.view());
      },
      "dequantize_blockwise: codes" + pageable);
  check_refused(
      [&] {
        quantize_scales(e, hscales, 256, d.qabsmax.view(), d.absmax2.view(), d.offset.view());
      },
      "quantize_scales: absmax" + pageable);
  check_refused(
      [&] {
        dequantize_scales(e, hcodes.subview(0, quant_buffers::blocks),
                          tensor_view<float const>(d.absmax2.view()),
                          tensor_view<float const>(d.offset.view()), 256, d.absmax.view());
      },
      "dequantize_scales: qabsmax" + pageable);
  check_refused(
      [&] {
        dequantize_blockwise_nested<nf4>(e, tensor_view<std::uint8_t const>(d.codes.view()),
                                         tensor_view<std::uint8_t const>(d.qabsmax.view()),
                                         tensor_view<float const>(d.absmax2.view()),
                                         hscales.subview(0, 1), block, 256, d.y.view());
      },
      "dequantize_blockwise_nested: offset" + pageable);
  check_refused(
      [&] { quantize_rowwise(e, hx, 8, n / 8, d.q.view(), d.absmax.view().subview(0, 8)); },
      "quantize_rowwise: x" + pageable);
  check_refused(
      [&] {
        dequantize_rowwise(e, tensor_view<std::int8_t const>(d.q.view()), hscales.subview(0, 8), 8,
                           n / 8, d.y.view());
      },
      "dequantize_rowwise: row_absmax" + pageable);
  d.check_untouched();
}

TEST_CASE("CUDA matmuls refuse pageable host memory presented as device memory") {
  if (test::skip<cuda_backend>())
    return;
  using namespace qmem::quant;
  exec::cuda const e{nullptr, 0};
  constexpr std::size_t rows = 64, cols = 128; // n x k, one batch row
  std::vector<bf16> host_x(cols, from_float<bf16>(1.0f));
  tensor_view<bf16 const> const hx(host_x.data(), cols, memory_space::device);
  auto codes = cuda_backend::upload(std::vector<std::uint8_t>(rows * cols / 2, 0x12));
  auto scales = cuda_backend::upload(std::vector<float>(rows * cols / 64, 1.0f));
  auto y = cuda_backend::alloc<bf16>(rows);
  weight_4bit_view<nf4> w;
  w.codes = codes.view();
  w.scales.absmax = scales.view();
  w.rows = rows;
  w.cols = cols;
  w.block_size = 64;
  CHECK_THROWS_WITH_AS(matmul_4bit<bf16>(e, hx, 1, w, y.view()),
                       doctest::Contains("matmul_4bit: x is pageable host memory"), bad_argument);
  std::vector<float> host_scales(rows * cols / 64, 1.0f);
  weight_4bit_view<nf4> hw = w;
  hw.scales.absmax =
      tensor_view<float const>(host_scales.data(), host_scales.size(), memory_space::device);
  auto x = cuda_backend::upload(host_x);
  CHECK_THROWS_WITH_AS(matmul_4bit<bf16>(e, tensor_view<bf16 const>(x.view()), 1, hw, y.view()),
                       doctest::Contains("matmul_4bit: w.scales.absmax is pageable host memory"),
                       bad_argument);
  std::vector<bf16> host_grad_y(rows, from_float<bf16>(1.0f));
  auto grad_x = cuda_backend::alloc<bf16>(cols);
  auto grad_ws = cuda_backend::alloc<std::byte>(matmul_4bit_grad_input_workspace_bytes<bf16>(1, w));
  CHECK_THROWS_WITH_AS(
      matmul_4bit_grad_input<bf16>(
          e, tensor_view<bf16 const>(host_grad_y.data(), rows, memory_space::device), 1, w,
          grad_x.view(), grad_ws.view()),
      doctest::Contains("matmul_4bit_grad_input: grad_y is pageable host memory"), bad_argument);
  auto const out = cuda_backend::download(y.view());
  std::vector<std::uint16_t> bits(out.size());
  std::memcpy(bits.data(), out.data(), bits.size() * sizeof(bits[0]));
  CHECK(bits == std::vector<std::uint16_t>(rows, 0xA5A5)); // nothing written

  // int8: a in pageable memory
  constexpr std::size_t m = 4, n = 8, k = 16;
  std::vector<std::int8_t> host_a(m * k, 1);
  auto b = cuda_backend::upload(std::vector<std::int8_t>(n * k, 1));
  auto row_scale = cuda_backend::upload(std::vector<float>(m, 1.0f));
  auto col_scale = cuda_backend::upload(std::vector<float>(n, 1.0f));
  auto out8 = cuda_backend::alloc<float>(m * n);
  auto ws = cuda_backend::alloc<std::byte>(matmul_int8_workspace_bytes(m, n)); // 256-aligned
  alignas(16) static std::int8_t aligned_a[m * k];
  std::memcpy(aligned_a, host_a.data(), host_a.size());
  CHECK_THROWS_WITH_AS(
      matmul_int8<float>(
          e, tensor_view<std::int8_t const>(aligned_a, m * k, memory_space::device),
          tensor_view<float const>(row_scale.view()), tensor_view<std::int8_t const>(b.view()),
          tensor_view<float const>(col_scale.view()), m, n, k, out8.view(), ws.view()),
      doctest::Contains("matmul_int8: a is pageable host memory"), bad_argument);
  std::vector<bf16> host_x8(m * k, from_float<bf16>(1.0f));
  auto out16 = cuda_backend::alloc<bf16>(m * n);
  auto lws = cuda_backend::alloc<std::byte>(linear_int8_workspace_bytes(m, n, k));
  CHECK_THROWS_WITH_AS(
      linear_int8<bf16>(
          e, tensor_view<bf16 const>(host_x8.data(), host_x8.size(), memory_space::device),
          tensor_view<std::int8_t const>(b.view()), tensor_view<float const>(col_scale.view()), m,
          n, k, 0.0f, out16.view(), lws.view()),
      doctest::Contains("linear_int8: x is pageable host memory"), bad_argument);
}

TEST_CASE("CUDA entry points take managed and pinned memory") {
  if (test::skip<cuda_backend>())
    return;
  using namespace qmem::quant;
  exec::cuda const e{nullptr, 0};
  constexpr std::size_t n = 1024;
  float* managed = nullptr;
  float* pinned = nullptr;
  cuda_detail::check(cudaMallocManaged(&managed, n * sizeof(float)), "cudaMallocManaged");
  cuda_detail::check(cudaMallocHost(&pinned, n * sizeof(float)), "cudaMallocHost");
  for (std::size_t i = 0; i < n; ++i)
    managed[i] = pinned[i] = static_cast<float>(i % 97) - 48.0f;
  quant_buffers d;
  auto codes2 = cuda_backend::alloc<std::uint8_t>(n / 2);
  auto absmax2 = cuda_backend::alloc<float>(n / 64);
  CHECK_NOTHROW(quantize_blockwise<nf4>(e,
                                        tensor_view<float const>(managed, n, memory_space::managed),
                                        64, d.codes.view(), d.absmax.view()));
  CHECK_NOTHROW(quantize_blockwise<nf4>(e,
                                        tensor_view<float const>(pinned, n, memory_space::pinned),
                                        64, codes2.view(), absmax2.view()));
  CHECK(cuda_backend::download(d.codes.view()) == cuda_backend::download(codes2.view()));
  CHECK(cuda_backend::download(d.absmax.view()) == cuda_backend::download(absmax2.view()));
  // a view whose label says device, over managed memory, is reachable too
  CHECK_NOTHROW(quantize_blockwise<nf4>(e,
                                        tensor_view<float const>(managed, n, memory_space::device),
                                        64, d.codes.view(), d.absmax.view()));
  cuda_backend::sync();
  cuda_detail::check(cudaFree(managed), "cudaFree");
  cuda_detail::check(cudaFreeHost(pinned), "cudaFreeHost");
}

TEST_CASE("CUDA entry points refuse memory of another device") {
  int devices = 0;
  if (!test::gpu_present() || cudaGetDeviceCount(&devices) != cudaSuccess || devices < 2) {
    std::string const why =
        "skipped: this case needs two CUDA devices (found " + std::to_string(devices) + ")";
    std::printf("[qmem] %s\n", why.c_str());
    MESSAGE(why);
    return;
  }
  using namespace qmem::quant;
  constexpr std::size_t n = 1024;
  float* x1 = nullptr; // on device 1
  {
    cuda_detail::device_guard guard(1);
    cuda_detail::check(cudaMalloc(&x1, n * sizeof(float)), "cudaMalloc(device 1)");
    cuda_detail::check(cudaMemset(x1, 0, n * sizeof(float)), "cudaMemset");
    cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
  quant_buffers d; // on device 0
  CHECK_THROWS_WITH_AS(
      quantize_blockwise<nf4>(exec::cuda{nullptr, 0},
                              tensor_view<float const>(x1, n, memory_space::device), 64,
                              d.codes.view(), d.absmax.view()),
      doctest::Contains("quantize_blockwise: x is in the memory of device 1; this call runs on "
                        "device 0"),
      bad_argument);
  // the same call on device 1: now the outputs are on the wrong device
  CHECK_THROWS_WITH_AS(
      quantize_blockwise<nf4>(exec::cuda{nullptr, 1},
                              tensor_view<float const>(x1, n, memory_space::device), 64,
                              d.codes.view(), d.absmax.view()),
      doctest::Contains("codes is in the memory of device 0; this call runs on device 1"),
      bad_argument);
  d.check_untouched();
  {
    cuda_detail::device_guard guard(1);
    cuda_detail::check(cudaFree(x1), "cudaFree");
  }
}

TEST_CASE("CUDA device_optimizer refuses parameters and gradients off its device") {
  if (test::skip<cuda_backend>())
    return;
  namespace oq = qmem::optim;
  exec::cuda const e{nullptr, 0};
  memory::cuda_device_resource dres(0);
  oq::cuda::device_optimizer<oq::adamw, oq::int8_state, float> opt(e, oq::adamw{}, {}, dres);
  std::vector<float> host_param(4096, 1.0f);
  CHECK_THROWS_WITH_AS(opt.add_param(e, tensor_view<float>(host_param.data(), host_param.size(),
                                                           memory_space::device)),
                       doctest::Contains("add_param: param is pageable host memory"), bad_argument);
  CHECK(opt.size() == 0); // nothing added
  auto param = cuda_backend::upload(host_param);
  auto grad = cuda_backend::upload(std::vector<float>(4096, 0.25f));
  opt.add_param(e, param.view());
  std::vector<tensor_view<float const>> grads{tensor_view<float const>(grad.view())};
  opt.bind(e, grads);
  REQUIRE(opt.bound());
  std::vector<float> host_grad(4096, 0.25f);
  std::vector<tensor_view<float const>> bad{
      tensor_view<float const>(host_grad.data(), host_grad.size(), memory_space::device)};
  CHECK_THROWS_WITH_AS(opt.bind(e, bad),
                       doctest::Contains("bind: gradient 0 is pageable host memory"), bad_argument);
  CHECK(opt.bound()); // the previous binding kept
  cuda_backend::sync();
}

TEST_CASE("after a CUDA call the host backend refuses device memory") {
  if (test::skip<cuda_backend>())
    return;
  using namespace qmem::quant;
  quant_buffers d;
  // any qmem CUDA call arms the probe
  quantize_blockwise<nf4>(exec::cuda{nullptr, 0}, tensor_view<float const>(d.x.view()), 64,
                          d.codes.view(), d.absmax.view());
  cuda_backend::sync();
  bool const armed = qmem::detail::device_memory_probe.load() != nullptr;
  REQUIRE(armed);
  std::vector<std::uint8_t> codes(quant_buffers::n / 2, 0xA5);
  std::vector<float> absmax(quant_buffers::blocks, -1.0f);
  CHECK_THROWS_WITH_AS(
      quantize_blockwise<nf4>(exec::host{},
                              tensor_view<float const>(d.x.view().data(), quant_buffers::n,
                                                       memory_space::host), // a false label
                              64, view(codes), view(absmax)),
      doctest::Contains("quantize_blockwise: x is device memory"), bad_argument);
  CHECK(codes == std::vector<std::uint8_t>(quant_buffers::n / 2, 0xA5));
  // managed memory stays usable on the host
  float* managed = nullptr;
  cuda_detail::check(cudaMallocManaged(&managed, quant_buffers::n * sizeof(float)),
                     "cudaMallocManaged");
  for (std::size_t i = 0; i < quant_buffers::n; ++i)
    managed[i] = 0.5f;
  CHECK_NOTHROW(quantize_blockwise<nf4>(
      exec::host{}, tensor_view<float const>(managed, quant_buffers::n, memory_space::managed), 64,
      view(codes), view(absmax)));
  cuda_detail::check(cudaFree(managed), "cudaFree");
}

#endif // QMEM_HAS_CUDA()
