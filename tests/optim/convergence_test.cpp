// Convergence on real (small) problems; 8-bit and 4-bit AdamW against the same run with 32-bit
// state (same data, same initialization), final losses compared relative to the 32-bit one:
// - online classification (the goal): an MLP 32 -> 128 -> 8 (tanh, softmax
//   cross-entropy) trained on a stream of fresh mini-batches of 64 from 8 Gaussian clusters with
//   20% label noise, 1200 AdamW steps with a cosine schedule, loss measured on 8192 held-out
//   samples. A stream cannot be memorized, so the loss approaches the noise floor (about 0.80;
//   fp32 reaches 0.85) and the gap measures optimization quality. Default threshold (4096): the
//   4096-element first layer is quantized, the smaller tensors keep fp32 state, as bitsandbytes
//   and torchao do. 8-bit, bf16 and 4-bit state (the specified recipe: block 128, signed dynamic
//   4-bit map / linear map without zero) are held to 1% in the mean over three seed pairs
//   (network, stream). One run's gap is noise-limited: over nine seed pairs (2026-11-29) 8-bit
//   gave -0.53%..+0.48% (mean +0.04%), 4-bit +0.35%..+1.09% (mean +0.68%; one of the nine above
//   1%); the three here: 8-bit 0.14 / 0.02 / 0.08%, 4-bit 0.83 / 0.29 / 0.87% (mean 0.66%).
//   4-bit's systematic gap is the recipe's (the tiny MLP below isolates it: mostly the first
//   moment's 4-bit map, whose smallest magnitude rounds small momenta to 0), not an encoding
//   defect;
// - a tiny full-batch MLP (8 -> 16 -> 8) with every tensor quantized (min_quantized_size 0), so
//   each layer's weights share one 128-element block: 8-bit and bf16 within 1%; 4-bit trains
//   more slowly there (its first moment: |m| below 0.275% of the block's largest rounds to 0, and
//   a block holds weights of very different gradient scales), held to 8% (measured 6.0%; first
//   moment alone 4-bit: 5.8%, second moment alone: 1.2%). No rounding defect behind it: the
//   4-bit encoders equal nearest rounding over every float (host_simd_test.cpp);
// - multinomial logistic regression (32 features, 8 classes; convex, one optimum): 8-bit and 4-bit
//   both reach the 32-bit final loss within 1%.
#include <qmem/optim.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

namespace {

using namespace qmem;

constexpr int in = 8, hid = 16, out = 8, samples = 2048;

// Softmax cross-entropy of one sample's logits z[0, n): returns -log softmax(z)[label]; with dz,
// also writes its gradient (softmax(z) - onehot(label)) * scale into dz[0, n).
double softmax_xent(float const* z, int n, int label, float scale, float* dz) {
  float const zmax = *std::max_element(z, z + n);
  double sum = 0.0;
  for (int k = 0; k < n; ++k)
    sum += std::exp(static_cast<double>(z[k] - zmax));
  if (dz != nullptr) {
    for (int k = 0; k < n; ++k)
      dz[k] = static_cast<float>(std::exp(static_cast<double>(z[k] - zmax)) / sum) * scale;
    dz[label] -= scale;
  }
  return std::log(sum) - static_cast<double>(z[label] - zmax);
}

struct dataset {
  std::vector<float> x; // samples x in
  std::vector<int> y;
};

dataset make_dataset(int dim, float spread) {
  std::mt19937 rng(2024);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> centers(static_cast<std::size_t>(out * dim));
  for (auto& c : centers)
    c = spread * d(rng);
  dataset ds;
  ds.x.resize(static_cast<std::size_t>(samples * dim));
  ds.y.resize(samples);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (int s = 0; s < samples; ++s) {
    int const c = s % out;
    for (int i = 0; i < dim; ++i)
      ds.x[static_cast<std::size_t>(s * dim + i)] =
          centers[static_cast<std::size_t>(c * dim + i)] + d(rng);
    ds.y[s] = u(rng) < 0.15f ? static_cast<int>(u(rng) * out) % out : c;
  }
  return ds;
}

struct mlp {
  std::vector<float> w1, b1, w2, b2;     // parameters
  std::vector<float> gw1, gb1, gw2, gb2; // gradients

  explicit mlp(unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> d(0.0f, 1.0f);
    w1.resize(in * hid);
    b1.assign(hid, 0.0f);
    w2.resize(hid * out);
    b2.assign(out, 0.0f);
    for (auto& w : w1)
      w = d(rng) / std::sqrt(static_cast<float>(in));
    for (auto& w : w2)
      w = d(rng) / std::sqrt(static_cast<float>(hid));
    gw1.resize(w1.size());
    gb1.resize(b1.size());
    gw2.resize(w2.size());
    gb2.resize(b2.size());
  }

  // mean cross-entropy over the data set; fills the gradients
  double loss_and_grad(dataset const& ds) {
    std::fill(gw1.begin(), gw1.end(), 0.0f);
    std::fill(gb1.begin(), gb1.end(), 0.0f);
    std::fill(gw2.begin(), gw2.end(), 0.0f);
    std::fill(gb2.begin(), gb2.end(), 0.0f);
    double loss = 0.0;
    std::vector<float> h(hid), dh(hid), z(out), dz(out);
    float const inv = 1.0f / samples;
    for (int s = 0; s < samples; ++s) {
      float const* x = &ds.x[s * in];
      for (int j = 0; j < hid; ++j) {
        float a = b1[j];
        for (int i = 0; i < in; ++i)
          a += x[i] * w1[i * hid + j];
        h[j] = std::tanh(a);
      }
      for (int k = 0; k < out; ++k) {
        float a = b2[k];
        for (int j = 0; j < hid; ++j)
          a += h[j] * w2[j * out + k];
        z[k] = a;
      }
      loss += softmax_xent(z.data(), out, ds.y[s], inv, dz.data());
      for (int k = 0; k < out; ++k)
        gb2[k] += dz[k];
      for (int j = 0; j < hid; ++j) {
        float acc = 0.0f;
        for (int k = 0; k < out; ++k) {
          gw2[j * out + k] += h[j] * dz[k];
          acc += w2[j * out + k] * dz[k];
        }
        dh[j] = acc * (1.0f - h[j] * h[j]);
        gb1[j] += dh[j];
      }
      for (int i = 0; i < in; ++i)
        for (int j = 0; j < hid; ++j)
          gw1[i * hid + j] += x[i] * dh[j];
    }
    return loss / samples;
  }
};

template <class Policy>
double train(dataset const& ds, int steps) {
  mlp net(7);
  optim::optimizer<optim::adamw, Policy> opt(
      optim::adamw{0.9f, 0.999f, 1e-8f, 1e-4f},
      {.lr = optim::lr_schedule::cosine(1e-2f, 10, steps, 1e-4f), .min_quantized_size = 0});
  opt.add_param(view(net.w1));
  opt.add_param(view(net.b1));
  opt.add_param(view(net.w2));
  opt.add_param(view(net.b2));
  for (int t = 0; t < steps; ++t) {
    net.loss_and_grad(ds);
    std::vector<tensor_view<float const>> gs{
        view(std::as_const(net.gw1)), view(std::as_const(net.gb1)), view(std::as_const(net.gw2)),
        view(std::as_const(net.gb2))};
    opt.step(exec::host{1}, gs);
  }
  return net.loss_and_grad(ds);
}

// An MLP In -> Hid -> 8 (tanh), row-major weights (w1 In x Hid, w2 Hid x 8), trained on a
// stream of mini-batches drawn from 8 Gaussian clusters with label noise.
template <int In, int Hid>
struct stream_mlp {
  static constexpr int classes = 8;
  std::vector<float> w1, b1, w2, b2, gw1, gb1, gw2, gb2;

  explicit stream_mlp(unsigned seed)
      : w1(In * Hid), b1(Hid, 0.0f), w2(Hid * classes), b2(classes, 0.0f), gw1(w1.size()), gb1(Hid),
        gw2(w2.size()), gb2(classes) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (auto& w : w1)
      w = d(rng) / std::sqrt(static_cast<float>(In));
    for (auto& w : w2)
      w = d(rng) / std::sqrt(static_cast<float>(Hid));
  }

  // Mean cross-entropy over the n samples x (n x In) with labels y; gradients when `grad`.
  double loss(float const* x, int const* y, int n, bool grad) {
    if (grad)
      for (auto* v : {&gw1, &gb1, &gw2, &gb2})
        std::fill(v->begin(), v->end(), 0.0f);
    double total = 0.0;
    float h[Hid], dh[Hid], z[classes], dz[classes];
    float const inv = 1.0f / static_cast<float>(n);
    for (int s = 0; s < n; ++s) {
      float const* xs = x + static_cast<std::size_t>(s) * In;
      std::copy(b1.begin(), b1.end(), h);
      for (int i = 0; i < In; ++i)
        for (int j = 0; j < Hid; ++j)
          h[j] += xs[i] * w1[static_cast<std::size_t>(i * Hid + j)];
      for (int j = 0; j < Hid; ++j)
        h[j] = std::tanh(h[j]);
      std::copy(b2.begin(), b2.end(), z);
      for (int j = 0; j < Hid; ++j)
        for (int k = 0; k < classes; ++k)
          z[k] += h[j] * w2[static_cast<std::size_t>(j * classes + k)];
      total += softmax_xent(z, classes, y[s], inv, grad ? dz : nullptr);
      if (!grad)
        continue;
      for (int k = 0; k < classes; ++k)
        gb2[static_cast<std::size_t>(k)] += dz[k];
      for (int j = 0; j < Hid; ++j) {
        float acc = 0.0f;
        for (int k = 0; k < classes; ++k) {
          gw2[static_cast<std::size_t>(j * classes + k)] += h[j] * dz[k];
          acc += w2[static_cast<std::size_t>(j * classes + k)] * dz[k];
        }
        dh[j] = acc * (1.0f - h[j] * h[j]);
        gb1[static_cast<std::size_t>(j)] += dh[j];
      }
      for (int i = 0; i < In; ++i)
        for (int j = 0; j < Hid; ++j)
          gw1[static_cast<std::size_t>(i * Hid + j)] += xs[i] * dh[j];
    }
    return total / n;
  }
};

// Samples from 8 Gaussian clusters (unit variance around fixed centres) with 20% label noise.
struct cluster_stream {
  int dim;
  std::vector<float> centers;
  std::mt19937 rng;
  cluster_stream(int d, float spread, unsigned seed)
      : dim(d), centers(8 * static_cast<std::size_t>(d)), rng(seed) {
    std::mt19937 c(2024);
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (auto& v : centers)
      v = spread * n(c);
  }
  void draw(int count, std::vector<float>& x, std::vector<int>& y) {
    std::normal_distribution<float> n(0.0f, 1.0f);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    std::uniform_int_distribution<int> cls(0, 7);
    x.resize(static_cast<std::size_t>(count * dim));
    y.resize(static_cast<std::size_t>(count));
    for (int s = 0; s < count; ++s) {
      int const k = cls(rng);
      for (int i = 0; i < dim; ++i)
        x[static_cast<std::size_t>(s * dim + i)] =
            centers[static_cast<std::size_t>(k * dim + i)] + n(rng);
      y[static_cast<std::size_t>(s)] = u(rng) < 0.2f ? static_cast<int>(u(rng) * 8) % 8 : k;
    }
  }
};

// The seeds of one stream run: the network's initialization, the training stream, the held-out
// samples.
struct stream_seeds {
  unsigned net, train, held_out;
};

template <class Policy>
double train_stream(int steps, stream_seeds seeds) {
  constexpr int in_dim = 32, hidden = 128, batch = 64;
  stream_mlp<in_dim, hidden> net(seeds.net);
  optim::optimizer<optim::adamw, Policy> opt(
      optim::adamw{0.9f, 0.999f, 1e-8f, 1e-4f},
      {.lr = optim::lr_schedule::cosine(3e-2f, 20, steps, 3e-4f)});
  for (auto* p : {&net.w1, &net.b1, &net.w2, &net.b2})
    opt.add_param(view(*p));
  cluster_stream train_data(in_dim, 1.0f, seeds.train), held_out(in_dim, 1.0f, seeds.held_out);
  std::vector<float> x;
  std::vector<int> y;
  for (int t = 0; t < steps; ++t) {
    train_data.draw(batch, x, y);
    net.loss(x.data(), y.data(), batch, true);
    std::vector<tensor_view<float const>> gs{
        view(std::as_const(net.gw1)), view(std::as_const(net.gb1)), view(std::as_const(net.gw2)),
        view(std::as_const(net.gb2))};
    opt.step(exec::host{1}, gs);
  }
  held_out.draw(8192, x, y);
  return net.loss(x.data(), y.data(), 8192, false);
}

// Multinomial logistic regression: z = x W + b, softmax cross-entropy (convex).
constexpr int features = 32;

double logistic_loss_and_grad(dataset const& ds, std::vector<float> const& w,
                              std::vector<float> const& b, std::vector<float>& gw,
                              std::vector<float>& gb) {
  std::fill(gw.begin(), gw.end(), 0.0f);
  std::fill(gb.begin(), gb.end(), 0.0f);
  double loss = 0.0;
  float z[out], dz[out];
  float const inv = 1.0f / samples;
  for (int s = 0; s < samples; ++s) {
    float const* x = &ds.x[static_cast<std::size_t>(s * features)];
    for (int k = 0; k < out; ++k) {
      float a = b[k];
      for (int i = 0; i < features; ++i)
        a += x[i] * w[i * out + k];
      z[k] = a;
    }
    loss += softmax_xent(z, out, ds.y[s], inv, dz);
    for (int k = 0; k < out; ++k) {
      gb[k] += dz[k];
      for (int i = 0; i < features; ++i)
        gw[i * out + k] += x[i] * dz[k];
    }
  }
  return loss / samples;
}

template <class Policy>
double train_logistic(dataset const& ds, int steps) {
  std::vector<float> w(features * out, 0.0f), b(out, 0.0f), gw(w.size()), gb(b.size());
  optim::optimizer<optim::adamw, Policy> opt(
      optim::adamw{0.9f, 0.999f, 1e-8f, 0.0f},
      {.lr = optim::lr_schedule::cosine(3e-2f, 10, steps, 3e-4f), .min_quantized_size = 0});
  opt.add_param(view(w));
  opt.add_param(view(b));
  for (int t = 0; t < steps; ++t) {
    logistic_loss_and_grad(ds, w, b, gw, gb);
    std::vector<tensor_view<float const>> gs{view(std::as_const(gw)), view(std::as_const(gb))};
    opt.step(exec::host{1}, gs);
  }
  return logistic_loss_and_grad(ds, w, b, gw, gb);
}

} // namespace

TEST_CASE("convergence: tiny MLP, every tensor quantized: 8-bit and bf16 within 1%, 4-bit 8%") {
  auto const ds = make_dataset(in, 1.0f);
  int const steps = 400;
  double const l32 = train<optim::fp32_state>(ds, steps);
  double const l8 = train<optim::int8_state>(ds, steps);
  double const l4 = train<optim::int4_state>(ds, steps);
  double const l16 = train<optim::bf16_state>(ds, steps);
  MESSAGE("MLP final loss: fp32 " << l32 << ", 8-bit " << l8 << ", 4-bit " << l4 << ", bf16 "
                                  << l16);
  CHECK(l32 < 0.6 * std::log(8.0)); // it learned (chance level is ln 8)
  CHECK(std::fabs(l8 - l32) <= 0.01 * l32);
  CHECK(std::fabs(l16 - l32) <= 0.01 * l32);
  CHECK(std::fabs(l4 - l32) <= 0.08 * l32);
}

TEST_CASE(
    "convergence: logistic regression, 8-bit and 4-bit AdamW reach the 32-bit loss within 1%") {
  auto const ds = make_dataset(features, 0.5f);
  int const steps = 200;
  double const l32 = train_logistic<optim::fp32_state>(ds, steps);
  double const l8 = train_logistic<optim::int8_state>(ds, steps);
  double const l4 = train_logistic<optim::int4_state>(ds, steps);
  MESSAGE("logistic final loss: fp32 " << l32 << ", 8-bit " << l8 << ", 4-bit " << l4);
  CHECK(l32 < 0.6 * std::log(8.0));
  CHECK(std::fabs(l8 - l32) <= 0.01 * l32);
  CHECK(std::fabs(l4 - l32) <= 0.01 * l32);
}

TEST_CASE("convergence: MLP on a stream, 8-bit, bf16 and 4-bit AdamW reach the 32-bit loss "
          "within 1% (mean over three seeds)") {
  int const steps = 1200;
  // One run's gap is noisy: over nine seed pairs (2026-11-29) 8-bit ranged -0.53%..+0.48%
  // (mean +0.04%) and 4-bit +0.35%..+1.09% (mean +0.68%), so the mean over three is held to 1%.
  double gap8 = 0.0, gap4 = 0.0, gap16 = 0.0;
  int const runs = 3;
  for (stream_seeds const seeds :
       {stream_seeds{7, 3, 4}, stream_seeds{11, 5, 6}, stream_seeds{23, 9, 10}}) {
    double const l32 = train_stream<optim::fp32_state>(steps, seeds);
    double const l8 = train_stream<optim::int8_state>(steps, seeds);
    double const l4 = train_stream<optim::int4_state>(steps, seeds);
    double const l16 = train_stream<optim::bf16_state>(steps, seeds);
    MESSAGE("stream MLP (seeds " << seeds.net << ", " << seeds.train << ") held-out loss: fp32 "
                                 << l32 << ", 8-bit " << (l8 / l32 - 1) * 100 << "%, 4-bit "
                                 << (l4 / l32 - 1) * 100 << "%, bf16 " << (l16 / l32 - 1) * 100
                                 << "%");
    CHECK(l32 < 0.5 * std::log(8.0)); // it learned (chance level is ln 8; the noise floor ~0.80)
    gap8 += (l8 - l32) / l32 / runs;
    gap4 += (l4 - l32) / l32 / runs;
    gap16 += (l16 - l32) / l32 / runs;
  }
  MESSAGE("mean gaps: 8-bit " << gap8 * 100 << "%, 4-bit " << gap4 * 100 << "%, bf16 "
                              << gap16 * 100 << "%");
  CHECK(std::fabs(gap8) <= 0.01);
  CHECK(std::fabs(gap16) <= 0.01);
  CHECK(std::fabs(gap4) <= 0.01);
}
