// Multi-head self-attention over the words of one sentence (TNT's inner transformer), forward and backward.
//
// A sentence has m words (16 for 16x16 patches and 4x4 words) and each head d channels (6 in TNT-S), so one
// (sentence, head) pair is a 16x16 attention: far too small for a general attention kernel, whose per-call setup
// then dominates. Here one pair is computed in registers/L1 with every inner loop running over the m queries
// (contiguous, vectorised by the compiler). Scores are kept transposed: ST[j][i] = scale * k_j . q_i, so the
// softmax over keys j is an elementwise max/sum across rows.
//
// Layout: qkv is the output of the fused q/k/v projection, (P, m, 3C) with C = heads * d, read in place (no
// permute); the output is (P, m, C), ready for the output projection. fp32 only.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kMaxWords = 64;
constexpr int64_t kMaxHeadDim = 64;

// exp(x) for x <= 0 (softmax arguments after subtracting the maximum), as Cephes' expf: x = n ln2 + r with
// |r| <= ln2/2, a degree-6 polynomial for exp(r), then a multiply by 2^n built from its exponent bits. Written
// without library calls so that loops over it vectorise. Relative error about 1e-7.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// row[i] = sum_c x[c] * yT[c][i] for the m queries i: one row of a transposed product, vectorised over i.
inline void transposed_row(float* row, const float* x, const float (*yT)[kMaxWords], int64_t m, int64_t d) {
  for (int64_t i = 0; i < m; ++i) row[i] = 0.0f;
  for (int64_t c = 0; c < d; ++c) {
    const float xc = x[c];
    for (int64_t i = 0; i < m; ++i) row[i] += xc * yT[c][i];
  }
}

struct Shape {
  int64_t sentences, words, heads, head_dim;
  int64_t width() const { return heads * head_dim; }
};

Shape check(const torch::Tensor& qkv, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu(), "word attention: expected a CPU tensor");
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat, "word attention: expected float32, got ", qkv.scalar_type());
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous(), "word attention: expected contiguous (P, m, 3C) q/k/v");
  TORCH_CHECK(heads > 0 && qkv.size(2) % (3 * heads) == 0, "word attention: width not divisible by 3 * heads");
  Shape s{qkv.size(0), qkv.size(1), heads, qkv.size(2) / (3 * heads)};
  TORCH_CHECK(s.words <= kMaxWords && s.head_dim <= kMaxHeadDim, "word attention: at most 64 words and 64 channels");
  return s;
}

// Per-(sentence, head) scratch: scaled queries (transposed), probabilities (transposed), row statistics.
struct Pair {
  float qT[kMaxHeadDim][kMaxWords];
  float aT[kMaxWords][kMaxWords];
  float inv_sum[kMaxWords];

  // Fills qT = scale * q^T and aT = softmax(scale * q k^T)^T (unnormalised; multiply column i by inv_sum[i]).
  void probabilities(const float* base, const Shape& s, int64_t h, float scale) {
    const int64_t m = s.words, d = s.head_dim, C3 = 3 * s.width();
    const float* q = base + h * d;
    const float* k = base + s.width() + h * d;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < d; ++c) qT[c][i] = q[i * C3 + c] * scale;
    float mx[kMaxWords];
    for (int64_t j = 0; j < m; ++j) {
      float* row = aT[j];
      transposed_row(row, k + j * C3, qT, m, d);
      for (int64_t i = 0; i < m; ++i) mx[i] = j == 0 || row[i] > mx[i] ? row[i] : mx[i];
    }
    float sum[kMaxWords] = {};
    for (int64_t j = 0; j < m; ++j) {
      float* row = aT[j];
      for (int64_t i = 0; i < m; ++i) {
        row[i] = exp_nonpositive(row[i] - mx[i]);
        sum[i] += row[i];
      }
    }
    for (int64_t i = 0; i < m; ++i) inv_sum[i] = 1.0f / sum[i];
    for (int64_t j = 0; j < m; ++j)
      for (int64_t i = 0; i < m; ++i) aT[j][i] *= inv_sum[i];
  }
};

template <typename F>
void for_each_pair(const Shape& s, F&& body) {
  at::parallel_for(0, s.sentences * s.heads, 64, [&](int64_t begin, int64_t end) {
    Pair pair;
    for (int64_t ph = begin; ph < end; ++ph) body(pair, ph / s.heads, ph % s.heads);
  });
}

}  // namespace

torch::Tensor word_attention_forward(const torch::Tensor& qkv, int64_t heads, double scale) {
  const Shape s = check(qkv, heads);
  const int64_t m = s.words, d = s.head_dim, C = s.width(), C3 = 3 * C;
  auto out = torch::empty({s.sentences, m, C}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for_each_pair(s, [&](Pair& pair, int64_t p, int64_t h) {
    const float* base = src + p * m * C3;
    pair.probabilities(base, s, h, static_cast<float>(scale));
    const float* v = base + 2 * C + h * d;
    float oT[kMaxHeadDim][kMaxWords];
    for (int64_t c = 0; c < d; ++c)
      for (int64_t i = 0; i < m; ++i) oT[c][i] = 0.0f;
    for (int64_t j = 0; j < m; ++j)
      for (int64_t c = 0; c < d; ++c) {
        const float vc = v[j * C3 + c];
        for (int64_t i = 0; i < m; ++i) oT[c][i] += vc * pair.aT[j][i];
      }
    float* o = dst + p * m * C + h * d;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < d; ++c) o[i * C + c] = oT[c][i];
  });
  return out;
}

// Gradient with respect to qkv, recomputing the probabilities (nothing but qkv is saved by the forward pass).
torch::Tensor word_attention_backward(const torch::Tensor& grad_out, const torch::Tensor& qkv, int64_t heads,
                                      double scale) {
  const Shape s = check(qkv, heads);
  const int64_t m = s.words, d = s.head_dim, C = s.width(), C3 = 3 * C;
  const auto grad = grad_out.contiguous();
  TORCH_CHECK(grad.scalar_type() == torch::kFloat && grad.sizes() == torch::IntArrayRef({s.sentences, m, C}),
              "word attention: gradient of the wrong shape or type");
  auto grad_qkv = torch::empty_like(qkv);
  const float* src = qkv.data_ptr<float>();
  const float* gsrc = grad.data_ptr<float>();
  float* gdst = grad_qkv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  for_each_pair(s, [&](Pair& pair, int64_t p, int64_t h) {
    const float* base = src + p * m * C3;
    pair.probabilities(base, s, h, sc);
    const float* k = base + C + h * d;
    const float* v = base + 2 * C + h * d;
    const float* go = gsrc + p * m * C + h * d;
    float* gq = gdst + p * m * C3 + h * d;
    float* gk = gq + C;
    float* gv = gq + 2 * C;
    float goT[kMaxHeadDim][kMaxWords];
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < d; ++c) goT[c][i] = go[i * C + c];
    // dA^T[j][i] = v_j . dO_i, and the softmax correction D_i = sum_j A[i][j] dA[i][j].
    float dsT[kMaxWords][kMaxWords];
    float D[kMaxWords] = {};
    for (int64_t j = 0; j < m; ++j) {
      float* row = dsT[j];
      transposed_row(row, v + j * C3, goT, m, d);
      for (int64_t i = 0; i < m; ++i) D[i] += pair.aT[j][i] * row[i];
      // dV_j = sum_i A[i][j] dO_i
      for (int64_t c = 0; c < d; ++c) {
        float acc = 0.0f;
        for (int64_t i = 0; i < m; ++i) acc += pair.aT[j][i] * goT[c][i];
        gv[j * C3 + c] = acc;
      }
    }
    // dS = A * (dA - D); dK_j = sum_i dS[i][j] (scale q_i); dQ_i = scale sum_j dS[i][j] k_j.
    float gqT[kMaxHeadDim][kMaxWords];
    for (int64_t c = 0; c < d; ++c)
      for (int64_t i = 0; i < m; ++i) gqT[c][i] = 0.0f;
    for (int64_t j = 0; j < m; ++j) {
      float* row = dsT[j];
      for (int64_t i = 0; i < m; ++i) row[i] = pair.aT[j][i] * (row[i] - D[i]);
      for (int64_t c = 0; c < d; ++c) {
        float acc = 0.0f;
        for (int64_t i = 0; i < m; ++i) acc += row[i] * pair.qT[c][i];
        gk[j * C3 + c] = acc;
        const float kc = k[j * C3 + c] * sc;
        for (int64_t i = 0; i < m; ++i) gqT[c][i] += kc * row[i];
      }
    }
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < d; ++c) gq[i * C3 + c] = gqT[c][i];
  });
  return grad_qkv;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("word_attention_forward", &word_attention_forward, "word attention forward (CPU, fp32)");
  module.def("word_attention_backward", &word_attention_backward, "word attention backward (CPU, fp32)");
}
