// Custom tensor: how a framework's own tensor type plugs into qmem.
//
// qmem never asks a framework to convert its tensors into a qmem type. It reads four things
// through one customization point, qmem::tensor_traits<T>: the element type, a pointer to the first
// element, the element count, and the memory space (host, pinned, device, managed). Contiguous
// standard ranges (std::vector, std::array, std::span) work out of the box; any other type is
// made tensor-like by specializing the traits, once, next to the type. From then on every qmem
// algorithm accepts it through qmem::view(t), a non-owning tensor_view, and a tensor on the wrong
// side (device memory handed to a host call) is refused with a message instead of crashing.
//
// Here `mini::tensor` stands for a framework's tensor (an Eigen map, a LibTorch tensor, ...): it
// owns its storage, has a shape and knows whether it lives on the GPU. The program quantizes one
// to NF4 with double quantization (QLoRA's storage), dequantizes into another, and shows the check
// that refuses a device tensor on the host path.
#include <qmem/qmem.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <utility>
#include <vector>

namespace mini {

//! A framework's dense float tensor: shared storage, a shape, a device flag.
class tensor {
  std::shared_ptr<float[]> storage_;
  std::vector<std::int64_t> shape_;
  std::size_t numel_ = 0;
  bool on_gpu_ = false;

public:
  explicit tensor(std::vector<std::int64_t> shape, bool on_gpu = false)
      : shape_(std::move(shape)), on_gpu_(on_gpu) {
    numel_ = 1;
    for (auto d : shape_)
      numel_ *= static_cast<std::size_t>(d);
    storage_ = std::make_shared<float[]>(numel_);
  }
  float* data() noexcept { return storage_.get(); }
  float const* data() const noexcept { return storage_.get(); }
  std::size_t numel() const noexcept { return numel_; }
  std::vector<std::int64_t> const& shape() const noexcept { return shape_; }
  bool on_gpu() const noexcept { return on_gpu_; }
};

} // namespace mini

// The one piece of glue: how qmem reads a mini::tensor. `data` has a const and a mutable overload
// so that a const tensor gives a view of const elements.
template <>
struct qmem::tensor_traits<mini::tensor> {
  using element_type = float;
  static float* data(mini::tensor& t) noexcept { return t.data(); }
  static float const* data(mini::tensor const& t) noexcept { return t.data(); }
  static std::size_t size(mini::tensor const& t) noexcept { return t.numel(); }
  static qmem::memory_space space(mini::tensor const& t) noexcept {
    return t.on_gpu() ? qmem::memory_space::device : qmem::memory_space::host;
  }
};

static_assert(qmem::tensor_like<mini::tensor>);
static_assert(std::same_as<qmem::tensor_element_t<mini::tensor const>, float const>);

int main() {
  mini::tensor w({256, 512});
  for (std::size_t i = 0; i < w.numel(); ++i) // a smooth pattern with a few large values
    w.data()[i] =
        0.05f * std::sin(0.001f * static_cast<float>(i * 7 % 4099)) + (i % 997 == 0 ? 0.5f : 0.0f);

  qmem::quant::format_desc const qlora{qmem::quant::code_id::nf4, 64, true, 256};
  qmem::exec::host const host{};
  mini::tensor const& cw = w;
  auto const q = qmem::quant::quantize(host, qmem::view(cw), w.shape(), qlora);

  mini::tensor back({256, 512});
  q.dequantize(host, qmem::view(back));

  double se = 0, sx = 0;
  for (std::size_t i = 0; i < w.numel(); ++i) {
    double const d = static_cast<double>(w.data()[i]) - back.data()[i];
    se += d * d;
    sx += static_cast<double>(w.data()[i]) * w.data()[i];
  }
  std::printf("mini::tensor %lld x %lld -> NF4 (block 64, double quant): %zu bytes, %.3f bits per "
              "parameter, relative RMSE %.4f\n",
              static_cast<long long>(w.shape()[0]), static_cast<long long>(w.shape()[1]),
              q.size_bytes(), q.bits_per_parameter(), std::sqrt(se / sx));

  // A tensor that says it lives on the GPU cannot go through the host path.
  mini::tensor const gpu({4, 64}, /*on_gpu=*/true);
  try {
    (void)qmem::quant::quantize(host, qmem::view(gpu), gpu.shape(), qlora);
    std::printf("error: a device tensor was accepted by the host path\n");
    return 1;
  } catch (qmem::bad_argument const& e) {
    std::printf("refused as expected: %s\n", e.what());
  }
  return 0;
}
