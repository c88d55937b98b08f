// TNT's inner transformer block over each sentence's words, whole, in inference: LayerNorm, q/k/v, multi-head
// attention, projection and residual, LayerNorm, the exact-GELU MLP and residual, in one pass over the words.
//
// A sentence is m words (16 in TNT) of C channels (24 in TNT-S), and every tensor of the block is tiny: run as
// separate operators, each reads and writes the whole (P, m, C) activation (or its 3C or 4C widening), and the
// products, with K or N of 24, run far below the machine's rate. Here a thread takes whole sentences and keeps one
// sentence's activations in L1, transposed: a channel is one vector over the words (kLanes words a vector, so one
// AVX-512 register holds a channel of a 16-word sentence), so that everything done per word (LayerNorm's sums over
// channels, the GELU, the residuals, the softmax over keys) is elementwise across vectors, and every product is a
// run of multiply-adds of a weight (a broadcast scalar) by a channel vector, with a block of outputs in registers.
// Attention keeps the queries in lanes, as word_attention.cpp does. fp32 throughout (the words' residual stream is
// fp32 under bf16 autocast too); sums in another order than ATen's, the GELU's normal distribution by the rational
// function of lanes.h and the softmax's exponential by its polynomial, so results agree with the layers' to a few
// fp32 steps of the outputs' scale.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "lanes.h"

namespace tnt_vision {
namespace {

constexpr int64_t kMaxVectors = 2;  // words per sentence: at most 2 * kLanes (32 with AVX-512, 16 with AVX2)
constexpr int64_t kMaxBlockWidth = 128;

// One channel over a sentence's words: NV vectors of kLanes words (the last zero-padded).
template <int64_t NV>
struct Channel {
  Lanes v[NV];
};

// The block's parameters, weights transposed to (in, out) so that a product's block of outputs reads its weights
// for one input channel from one run of memory.
struct Parameters {
  int64_t words, width, hidden, heads;
  float eps1, eps2, scale;
  const float *norm1_w, *norm1_b, *norm2_w, *norm2_b, *qkv_b, *proj_b, *fc1_b, *fc2_b;
  std::vector<float> qkv_t, proj_t, fc1_t, fc2_t;
};

std::vector<float> transposed(const at::Tensor& weight) {
  const auto t = weight.t().contiguous();
  return {t.data_ptr<float>(), t.data_ptr<float>() + t.numel()};
}

const float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

// out(j, sum_k w_t[k * J + j] in[k] + init(j)) for the outputs j of [j0, j0 + JB): the block's sums in registers.
template <int64_t NV, int64_t JB, typename Init, typename Out>
inline void product_block(const float* w_t, int64_t J, int64_t K, const Channel<NV>* in, int64_t j0, Init&& init,
                          Out&& out) {
  Channel<NV> acc[JB];
#pragma GCC unroll 32
  for (int64_t jj = 0; jj < JB; ++jj) acc[jj] = init(j0 + jj);
  for (int64_t k = 0; k < K; ++k) {
    const Channel<NV> x = in[k];
    const float* w = w_t + k * J + j0;
#pragma GCC unroll 32
    for (int64_t jj = 0; jj < JB; ++jj)
#pragma GCC unroll 4
      for (int64_t v = 0; v < NV; ++v) acc[jj].v[v] += w[jj] * x.v[v];
  }
#pragma GCC unroll 32
  for (int64_t jj = 0; jj < JB; ++jj) out(j0 + jj, acc[jj]);
}

// All J outputs of a product with K inputs: blocks as wide as the registers allow, then narrower ones.
template <int64_t NV, typename Init, typename Out>
inline void product(const float* w_t, int64_t J, int64_t K, const Channel<NV>* in, Init&& init, Out&& out) {
  constexpr int64_t kWide = NV == 1 ? 24 : 12;
  int64_t j = 0;
  for (; j + kWide <= J; j += kWide) product_block<NV, kWide>(w_t, J, K, in, j, init, out);
  for (; j + 4 <= J; j += 4) product_block<NV, 4>(w_t, J, K, in, j, init, out);
  for (; j < J; ++j) product_block<NV, 1>(w_t, J, K, in, j, init, out);
}

// out[c] = LayerNorm over the C channels of each word of x (two passes: the mean, then the variance about it).
template <int64_t NV>
inline void layer_norm(const Channel<NV>* x, Channel<NV>* out, int64_t C, const float* w, const float* b, float eps) {
  const float inv_c = 1.0f / static_cast<float>(C);
  for (int64_t v = 0; v < NV; ++v) {
    Lanes sum{};
    for (int64_t c = 0; c < C; ++c) sum += x[c].v[v];
    const Lanes mean = sum * inv_c;
    Lanes squares{};
    for (int64_t c = 0; c < C; ++c) {
      const Lanes d = x[c].v[v] - mean;
      squares += d * d;
    }
    const Lanes rstd = 1.0f / sqrt_lanes(squares * inv_c + eps);
    for (int64_t c = 0; c < C; ++c) out[c].v[v] = (x[c].v[v] - mean) * rstd * w[c] + b[c];
  }
}

template <int64_t NV>
inline Channel<NV> splat_channel(float value) {
  Channel<NV> c;
  for (int64_t v = 0; v < NV; ++v) c.v[v] = splat(value);
  return c;
}

#if TNT_VISION_LANES == 16
// Where word i's first value lies in a sentence's rows (i * C) and the mask of its m words: a channel's gather or
// scatter (Sentence::load and store).
inline std::pair<__m512i, __mmask16> word_rows(int64_t m, int64_t C) {
  const __m512i words = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  return {_mm512_mullo_epi32(words, _mm512_set1_epi32(static_cast<int>(C))), static_cast<__mmask16>((1u << m) - 1)};
}
#endif

// One thread's activations of one sentence, each channel over the words.
template <int64_t NV>
struct Sentence {
  std::vector<Channel<NV>> x, normed, qkv, mixed, hidden;
  explicit Sentence(const Parameters& p)
      : x(p.width), normed(p.width), qkv(3 * p.width), mixed(p.width), hidden(p.hidden) {}

  // The sentence's rows (m, C) at src, transposed into x (padding words zero): with AVX-512 and a sentence in one
  // vector, a channel is one gather of its m words (scattered back by store), else value by value.
  void load(const float* src, int64_t m, int64_t C) {
#if TNT_VISION_LANES == 16
    if constexpr (NV == 1) {
      const auto [rows, words] = word_rows(m, C);
      for (int64_t c = 0; c < C; ++c)
        x[c].v[0] = std::bit_cast<Lanes>(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), words, rows, src + c, 4));
      return;
    }
#endif
    auto* lanes = reinterpret_cast<float*>(x.data());
    std::fill(lanes, lanes + C * NV * kLanes, 0.0f);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < C; ++c) lanes[c * NV * kLanes + i] = src[i * C + c];
  }

  void store(float* dst, int64_t m, int64_t C) const {
#if TNT_VISION_LANES == 16
    if constexpr (NV == 1) {
      const auto [rows, words] = word_rows(m, C);
      for (int64_t c = 0; c < C; ++c)
        _mm512_mask_i32scatter_ps(dst + c, words, rows, std::bit_cast<__m512>(x[c].v[0]), 4);
      return;
    }
#endif
    const auto* lanes = reinterpret_cast<const float*>(x.data());
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < C; ++c) dst[i * C + c] = lanes[c * NV * kLanes + i];
  }

  // mixed = the heads' attention outputs from qkv (q scaled already), for heads of d channels.
  void attend(const Parameters& p) {
    const int64_t d = p.width / p.heads;
    const auto each_head = [&](auto dim) {
      for (int64_t h = 0; h < p.heads; ++h) attend_head(p, h * d, dim);
    };
    switch (d) {  // the paper's head widths as constants, so that the loops over a head's channels unroll
      case 6:
        return each_head(std::integral_constant<int64_t, 6>{});
      case 10:
        return each_head(std::integral_constant<int64_t, 10>{});
      default:
        return each_head(d);
    }
  }

  // One head (channels [first, first + d) of q, k and v): queries in lanes, one score vector per key, and the
  // output's d channels summed over the keys side by side (d independent chains of multiply-adds).
  template <typename Dim>
  void attend_head(const Parameters& p, int64_t first, Dim d) {
    const int64_t m = p.words, C = p.width;
    // word j of a channel, read from memory (a variable lane of a vector would go through the stack)
    const auto lane = [](const Channel<NV>& c, int64_t j) { return reinterpret_cast<const float*>(&c)[j]; };
    const Channel<NV>* q = qkv.data() + first;
    const Channel<NV>* k = q + C;
    const Channel<NV>* val = q + 2 * C;
    for (int64_t v = 0; v < NV; ++v) {
      Lanes scores[kMaxVectors * kLanes];
      Lanes mx{};
      for (int64_t j = 0; j < m; ++j) {
        Lanes s{};
        for (int64_t c = 0; c < d; ++c) s += lane(k[c], j) * q[c].v[v];
        scores[j] = s;
        mx = j == 0 ? s : (s > mx ? s : mx);
      }
      Lanes sum{};
      for (int64_t j = 0; j < m; ++j) {
        scores[j] = exp_nonpositive(scores[j] - mx);
        sum += scores[j];
      }
      Lanes out[kMaxBlockWidth];
      for (int64_t c = 0; c < d; ++c) out[c] = Lanes{};
      for (int64_t j = 0; j < m; ++j)
        for (int64_t c = 0; c < d; ++c) out[c] += lane(val[c], j) * scores[j];
      const Lanes inv_sum = 1.0f / sum;
      for (int64_t c = 0; c < d; ++c) mixed[first + c].v[v] = out[c] * inv_sum;
    }
  }

  // x = block(x): the pre-norm attention and MLP with their residuals.
  void block(const Parameters& p) {
    const int64_t C = p.width;
    layer_norm(x.data(), normed.data(), C, p.norm1_w, p.norm1_b, p.eps1);
    product(p.qkv_t.data(), 3 * C, C, normed.data(),
            [&](int64_t j) { return splat_channel<NV>(p.qkv_b ? p.qkv_b[j] : 0.0f); },
            [&](int64_t j, const Channel<NV>& y) {
              Channel<NV>& out = qkv[j];
              for (int64_t v = 0; v < NV; ++v) out.v[v] = j < C ? y.v[v] * p.scale : y.v[v];
            });
    attend(p);
    product(p.proj_t.data(), C, C, mixed.data(),
            [&](int64_t j) {
              Channel<NV> init = x[j];
              for (int64_t v = 0; v < NV; ++v) init.v[v] += p.proj_b[j];
              return init;
            },
            [&](int64_t j, const Channel<NV>& y) { x[j] = y; });
    layer_norm(x.data(), normed.data(), C, p.norm2_w, p.norm2_b, p.eps2);
    product(p.fc1_t.data(), p.hidden, C, normed.data(), [&](int64_t j) { return splat_channel<NV>(p.fc1_b[j]); },
            [&](int64_t j, const Channel<NV>& y) {
              for (int64_t v = 0; v < NV; ++v) hidden[j].v[v] = y.v[v] * normal_cdf(y.v[v]);  // the exact GELU
            });
    product(p.fc2_t.data(), C, p.hidden, hidden.data(),
            [&](int64_t j) {
              Channel<NV> init = x[j];
              for (int64_t v = 0; v < NV; ++v) init.v[v] += p.fc2_b[j];
              return init;
            },
            [&](int64_t j, const Channel<NV>& y) { x[j] = y; });
  }
};

template <int64_t NV>
void forward(const Parameters& p, const float* src, float* dst, int64_t sentences) {
  const int64_t m = p.words, C = p.width;
  at::parallel_for(0, sentences, 8, [&](int64_t begin, int64_t end) {
    Sentence<NV> s(p);
    for (int64_t i = begin; i < end; ++i) {
      s.load(src + i * m * C, m, C);
      s.block(p);
      s.store(dst + i * m * C, m, C);
    }
  });
}

// The parameter, contiguous, after checking its device, type and shape.
at::Tensor checked(const at::Tensor& t, at::IntArrayRef shape, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "word block: ", what,
              " must be an fp32 CPU tensor");
  TORCH_CHECK(t.sizes() == shape, "word block: ", what, " of shape ", t.sizes(), ", expected ", shape);
  return t.contiguous();
}

}  // namespace

at::Tensor word_block_forward(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                              const std::optional<at::Tensor>& qkv_bias, int64_t heads, double scale,
                              const std::vector<double>& eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.is_contiguous(),
              "word block: expected contiguous fp32 (sentences, words, width) words on the CPU");
  TORCH_CHECK(weights.size() == 11 && eps.size() == 2, "word block: expected 11 weights and 2 epsilons");
  const int64_t m = x.size(1), C = x.size(2), hidden = weights[7].size(0);
  TORCH_CHECK(m >= 1 && m <= kMaxVectors * kLanes, "word block: at most ", kMaxVectors * kLanes, " words");
  TORCH_CHECK(C <= kMaxBlockWidth && heads > 0 && C % heads == 0, "word block: width ", C, " for ", heads, " heads");
  const char* names[] = {"norm1 weight", "norm1 bias", "qkv weight", "proj weight", "proj bias", "norm2 weight",
                         "norm2 bias",   "fc1 weight", "fc1 bias",   "fc2 weight",  "fc2 bias"};
  const std::vector<std::vector<int64_t>> shapes = {{C}, {C}, {3 * C, C}, {C, C}, {C}, {C}, {C}, {hidden, C},
                                                    {hidden}, {C, hidden}, {C}};
  std::vector<at::Tensor> w;  // held until the kernel returns: contiguous copies where a parameter is not
  for (size_t i = 0; i < weights.size(); ++i) w.push_back(checked(weights[i], shapes[i], names[i]));
  std::optional<at::Tensor> bias;
  if (qkv_bias.has_value() && qkv_bias->defined()) bias = checked(*qkv_bias, {3 * C}, "qkv bias");
  const Parameters p{m,
                     C,
                     hidden,
                     heads,
                     static_cast<float>(eps[0]),
                     static_cast<float>(eps[1]),
                     static_cast<float>(scale),
                     w[0].data_ptr<float>(),
                     w[1].data_ptr<float>(),
                     w[5].data_ptr<float>(),
                     w[6].data_ptr<float>(),
                     data_or_null(bias),
                     w[4].data_ptr<float>(),
                     w[8].data_ptr<float>(),
                     w[10].data_ptr<float>(),
                     transposed(w[2]),
                     transposed(w[3]),
                     transposed(w[7]),
                     transposed(w[9])};
  auto out = at::empty_like(x);
  const int64_t sentences = x.size(0);
  if (m <= kLanes)
    forward<1>(p, x.data_ptr<float>(), out.data_ptr<float>(), sentences);
  else
    forward<2>(p, x.data_ptr<float>(), out.data_ptr<float>(), sentences);
  return out;
}

}  // namespace tnt_vision
