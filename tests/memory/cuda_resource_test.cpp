// CUDA memory resources (memory/cuda_resource.cuh) and the Thrust adapters
// (memory/cuda_thrust.cuh): spaces, alignment, stream-ordered reuse, the managed resource's
// refusal to oversubscribe, and a quantization that reads and writes thrust vectors directly.
// Compiled only by nvcc; without a GPU each case says so and returns.
#include <qmem/core/config.hpp>

#include "support/backend.hpp"

#if QMEM_HAS_CUDA()

#include <qmem/memory/cuda_resource.cuh>
#include <qmem/memory/cuda_thrust.cuh>
#include <qmem/quant.hpp>

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <vector>

using namespace qmem;
using qmem::test::cuda_backend;

TEST_CASE("cuda resources: device pool, pinned and managed memory") {
  if (qmem::test::skip<cuda_backend>())
    return;
  cudaStream_t s = nullptr;
  cuda_detail::check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  {
    memory::cuda_device_resource dev(0, s);
    CHECK(dev.space() == memory_space::device);
    CHECK(dev.device() == 0);
    {
      memory::buffer<float> b(1 << 20, dev, memory::category::workspace);
      CHECK(b.space() == memory_space::device);
      CHECK(reinterpret_cast<std::uintptr_t>(b.data()) % 256 == 0);
      CHECK(dev.used_bytes() >= (1u << 22));
      cuda_detail::check(cudaMemsetAsync(b.data(), 0, b.size_bytes(), s), "cudaMemsetAsync");
    }
    // freed in stream order, the bytes stay reserved in the pool (release threshold: keep all)
    cuda_detail::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    CHECK(dev.used_bytes() == 0);
    CHECK(dev.reserved_bytes() >= (1u << 22));
    dev.trim(0);
    CHECK(dev.reserved_bytes() == 0);
    CHECK_THROWS_AS((void)dev.allocate(64, 512), bad_argument);
    CHECK(dev.allocate_async(0, s) == nullptr);
  }
  {
    memory::cuda_pinned_resource pinned;
    memory::buffer<int> b(1000, pinned);
    CHECK(b.space() == memory_space::pinned);
    for (int i = 0; i < 1000; ++i)
      b[static_cast<std::size_t>(i)] = i; // host-accessible
    CHECK(b[999] == 999);
  }
  {
    memory::cuda_managed_resource managed(0);
    CHECK(managed.space() == memory_space::managed);
    {
      memory::buffer<float> b(1024, managed);
      b[3] = 2.5f;
      CHECK(b[3] == 2.5f);
      CHECK(managed.outstanding_bytes() == 1024 * sizeof(float));
    }
    CHECK(managed.outstanding_bytes() == 0);
    std::size_t free_bytes = 0;
    std::size_t total_bytes = 0;
    cuda_detail::check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
    // more than the device has free: refused, nothing allocated
    CHECK_THROWS_AS((void)managed.allocate(free_bytes + (std::size_t{1} << 30)), cuda_error);
    CHECK(managed.outstanding_bytes() == 0);
  }
  {
    auto& pool = memory::default_device_resource(0);
    CHECK(&pool == &memory::default_device_resource(0));
    memory::device_workspace<double> ws(pool, 1000, s);
    CHECK(ws.data() != nullptr);
    CHECK(ws.size() == 1000);
  }
  cuda_detail::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  cuda_detail::check(cudaStreamDestroy(s), "cudaStreamDestroy");
}

// What docs/memory.md states of every GPU resource: alignments above the runtime's 256 bytes are
// refused before anything is allocated; a zero-byte request gives null (device pool) or a one-byte
// allocation that deallocate takes back (pinned, managed), and the managed counter does not
// count it.
TEST_CASE("cuda resources: zero-byte requests and alignments above 256") {
  if (qmem::test::skip<cuda_backend>())
    return;
  memory::cuda_device_resource dev(0);
  CHECK(dev.allocate(0) == nullptr);
  dev.deallocate(nullptr, 0);
  CHECK_THROWS_AS((void)dev.allocate(64, 512), bad_argument);
  CHECK(dev.used_bytes() == 0);
  memory::cuda_pinned_resource pinned;
  void* p = pinned.allocate(0);
  CHECK(p != nullptr);
  pinned.deallocate(p, 0);
  CHECK_THROWS_AS((void)pinned.allocate(64, 512), bad_argument);
  memory::cuda_managed_resource managed(0);
  void* m = managed.allocate(0);
  CHECK(m != nullptr);
  CHECK(managed.outstanding_bytes() == 0);
  managed.deallocate(m, 0);
  CHECK(managed.outstanding_bytes() == 0);
  CHECK_THROWS_AS((void)managed.allocate(64, 512), bad_argument);
  CHECK(managed.outstanding_bytes() == 0);
  cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

TEST_CASE("cuda resources: thrust vectors are tensor-like") {
  static_assert(tensor_like<thrust::device_vector<float>>);
  static_assert(tensor_like<thrust::host_vector<bf16>>);
  static_assert(
      tensor_like<thrust::host_vector<float, thrust::universal_host_pinned_allocator<float>>>);
  if (qmem::test::skip<cuda_backend>())
    return;
  std::size_t const n = 1000;
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i)
    x[i] = static_cast<float>(static_cast<int>(i % 37) - 18) / 7.0f;
  thrust::device_vector<float> dx(x.begin(), x.end());
  thrust::device_vector<std::uint8_t> dcodes(quant::code_bytes<quant::nf4>(n));
  thrust::device_vector<float> dabsmax(quant::block_count(n, 64));
  auto const xv = view(std::as_const(dx));
  CHECK(xv.space() == memory_space::device);
  CHECK(xv.size() == n);
  static_assert(std::is_same_v<decltype(xv), tensor_view<float const> const>);
  quant::quantize_blockwise<quant::nf4>(exec::cuda{}, xv, 64, view(dcodes), view(dabsmax));
  thrust::host_vector<std::uint8_t> codes = dcodes; // copies back (synchronizes)
  thrust::host_vector<float> absmax = dabsmax;
  CHECK(view(codes).space() == memory_space::host);
  std::vector<std::uint8_t> hc(quant::code_bytes<quant::nf4>(n));
  std::vector<float> ha(quant::block_count(n, 64));
  quant::quantize_blockwise<quant::nf4>(exec::host{}, view(std::as_const(x)), 64, view(hc),
                                        view(ha));
  CHECK(std::vector<std::uint8_t>(codes.begin(), codes.end()) == hc);
  CHECK(std::vector<float>(absmax.begin(), absmax.end()) == ha);
  thrust::host_vector<float, thrust::universal_host_pinned_allocator<float>> pinned(4);
  CHECK(view(pinned).space() == memory_space::pinned);
  // thrust::universal_allocator is cudaMallocManaged: managed memory, which the old adapter called
  // device memory in a device_vector (host algorithms refused it) and host memory in a
  // host_vector (CUDA algorithms refused it)
  thrust::device_vector<float, thrust::universal_allocator<float>> managed_d(4);
  thrust::host_vector<float, thrust::universal_allocator<float>> managed_h(4);
  CHECK(view(managed_d).space() == memory_space::managed);
  CHECK(view(managed_h).space() == memory_space::managed);
  cudaPointerAttributes attributes{};
  cuda_detail::check(cudaPointerGetAttributes(&attributes, view(managed_h).data()),
                     "cudaPointerGetAttributes");
  CHECK(attributes.type == cudaMemoryTypeManaged);
  // a host algorithm takes the managed device_vector
  std::vector<std::uint8_t> mc(quant::code_bytes<quant::nf4>(4));
  std::vector<float> ma(1);
  cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  CHECK_NOTHROW(quant::quantize_blockwise<quant::nf4>(exec::host{}, view(std::as_const(managed_d)),
                                                      64, view(mc), view(ma)));
  // thrust::universal_vector is a vector_base, neither of the two above: it was not tensor-like
  // (qmem::view did not compile) though the header named it
  thrust::universal_vector<float> uni(64, 0.25f);
  thrust::universal_vector<float, thrust::universal_host_pinned_allocator<float>> uni_pinned(4);
  CHECK(view(uni).space() == memory_space::managed);
  CHECK(view(uni).size() == 64);
  CHECK(view(uni_pinned).space() == memory_space::pinned);
  CHECK(view(uni).data() == thrust::raw_pointer_cast(uni.data()));
  thrust::universal_vector<std::uint8_t> uni_codes(quant::code_bytes<quant::nf4>(64));
  thrust::universal_vector<float> uni_absmax(1);
  CHECK_NOTHROW(quant::quantize_blockwise<quant::nf4>(exec::cuda{}, view(std::as_const(uni)), 64,
                                                      view(uni_codes), view(uni_absmax)));
  cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  std::vector<std::uint8_t> uc(quant::code_bytes<quant::nf4>(64));
  std::vector<float> ua(1);
  CHECK_NOTHROW(quant::quantize_blockwise<quant::nf4>(exec::host{}, view(std::as_const(uni)), 64,
                                                      view(uc), view(ua)));
  auto const ucv = view(std::as_const(uni_codes)); // managed: readable here after the sync
  CHECK(std::vector<std::uint8_t>(ucv.begin(), ucv.end()) == uc);
  CHECK(view(std::as_const(uni_absmax))[0] == ua[0]);
}

// The resources checked the runtime's alignment after the allocation had succeeded and threw
// without freeing it (a leak of pinned, managed or pool memory). The CUDA runtime cannot be made
// to return misaligned storage, so this checks the one helper all three now call: the storage
// goes back through `release` before the throw, and only then. (The old helper took no release:
// this case does not compile against it, which is the closest a test comes to failing there.)
TEST_CASE("cuda resources: storage refused for its alignment is released before the throw") {
  alignas(256) static std::byte storage[512];
  int released = 0;
  void* got = nullptr;
  auto release = [&](void* q) noexcept {
    ++released;
    got = q;
  };
  CHECK_NOTHROW(memory::cuda_resource_detail::check_alignment(storage, 256, "test", release));
  CHECK(released == 0);
  CHECK_THROWS_WITH_AS(
      memory::cuda_resource_detail::check_alignment(storage + 64, 256, "cudaHostAlloc", release),
      doctest::Contains("cudaHostAlloc returned storage not aligned to 256 bytes"), qmem::error);
  CHECK(released == 1);
  CHECK(got == storage + 64);
  CHECK_NOTHROW(memory::cuda_resource_detail::check_alignment(storage + 64, 64, "test", release));
  CHECK(released == 1);
}

#endif // QMEM_HAS_CUDA()
