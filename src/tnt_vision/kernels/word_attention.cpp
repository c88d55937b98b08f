// Multi-head self-attention over the words of one sentence (TNT's inner transformer), forward and backward.
//
// A sentence has m words (16 for 16x16 patches and 4x4 words) and each head d channels (6 in TNT-S), so one
// (sentence, head) pair is a 16x16 attention: far too small for a general attention kernel, whose per-call setup
// then dominates. Here one pair is computed in registers/L1, kLanes queries at a time (lanes.h: 16 with AVX-512,
// so one block holds a whole 16-word sentence; 8 with AVX2): everything indexed by the query is one vector, the
// last block padded with zero queries, and loops run over keys j and channels c only. Scores are kept transposed,
// one vector per key: ST[j] = scale * (k_j . q_i)_i, so the softmax over keys is an elementwise max/sum across
// these vectors. Queries are independent in the forward pass; in the backward pass the key and value gradients
// sum over them.
//
// Layout: qkv is the output of the fused q/k/v projection, (P, m, 3C) with C = heads * d, read in place (no
// permute); the output is (P, m, C), ready for the output projection. fp32, or bf16 (autocast's q/k/v on a CPU with
// bf16 products): everything is computed in fp32, and outputs and gradients are rounded to bf16 (to nearest even) as
// a cast of the fp32 results would round. A thread takes whole sentences, all heads: with bf16 it widens a sentence's
// q/k/v (and gradient) to fp32 in one vectorised pass first and rounds its results in one pass at the end, so that
// the loops read each value as the broadcast operand of a multiply-add (where converting scalars where they were
// used took most of the time) and write plain floats.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "lanes.h"

namespace tnt_vision {
namespace {

constexpr int64_t kMaxWords = 64;
constexpr int64_t kMaxHeadDim = 64;  // a block holds kLanes queries, one per lane

// The problem's sizes. Dim is int64_t, or std::integral_constant for common head widths (the paper's: 6 in TNT-Ti
// and TNT-S, 10 in TNT-B), where every loop over channels has a known trip count and unrolls (about 2x faster).
template <typename Dim = int64_t>
struct Shape {
  int64_t sentences, words, heads;
  Dim head_dim;
  int64_t width() const { return heads * head_dim; }
};

// Calls body(shape) with the head width as a compile-time constant where it is one of Widths, else as it is.
template <int64_t Width, int64_t... More, typename F>
void with_head_dim(const Shape<>& s, F&& body) {
  using Fixed = Shape<std::integral_constant<int64_t, Width>>;
  if (s.head_dim == Width) return body(Fixed{s.sentences, s.words, s.heads, {}});
  if constexpr (sizeof...(More) > 0) return with_head_dim<More...>(s, body);
  return body(s);
}

// The widths compiled as constants: the paper's 6 (TNT-Ti, TNT-S) and 10 (TNT-B), and other common ones.
template <typename F>
void with_common_head_dim(const Shape<>& s, F&& body) {
  with_head_dim<6, 8, 10, 12, 16>(s, body);
}

Shape<> check(const at::Tensor& qkv, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu(), "word attention: expected a CPU tensor");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16,
              "word attention: expected float32 or bfloat16, got ", qkv.scalar_type());
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous(), "word attention: expected contiguous (P, m, 3C) q/k/v");
  TORCH_CHECK(heads > 0 && qkv.size(2) % (3 * heads) == 0, "word attention: width not divisible by 3 * heads");
  Shape<> s{qkv.size(0), qkv.size(1), heads, qkv.size(2) / (3 * heads)};
  TORCH_CHECK(s.words <= kMaxWords && s.head_dim <= kMaxHeadDim, "word attention: at most 64 words and 64 channels");
  return s;
}

// One block of queries [first, first + rows) of one (sentence, head) pair; pointers are at the pair's first word
// and channel of the head.
struct Block {
  int64_t first, rows;
};

// dst[c] = factor * (src[i * stride + c])_i over the block's queries, transposed, zero-padded to kLanes.
template <typename Dim>
inline void load_transposed(Lanes* dst, const float* src, int64_t stride, const Block& b, Dim d, float factor) {
  for (int64_t c = 0; c < d; ++c) dst[c] = Lanes{};
  for (int64_t i = 0; i < b.rows; ++i)
    for (int64_t c = 0; c < d; ++c) dst[c][i] = src[(b.first + i) * stride + c] * factor;
}

// dst[i * stride + c] = src[c][i] over the block's queries: the inverse of load_transposed.
template <typename Dim>
inline void store_transposed(float* dst, int64_t stride, const Lanes* src, const Block& b, Dim d) {
  for (int64_t i = 0; i < b.rows; ++i)
    for (int64_t c = 0; c < d; ++c) dst[(b.first + i) * stride + c] = src[c][i];
}

// sum_c x[c] * yT[c]: (x . y_i)_i over the block's queries.
template <typename Dim>
inline Lanes dot_rows(const float* x, const Lanes* yT, Dim d) {
  Lanes row{};
  for (int64_t c = 0; c < d; ++c) row += x[c] * yT[c];
  return row;
}

// Row-major rows of d channels, as vectors over channels (ceil(d / kLanes) per row, zero-padded).
struct ChannelRows {
  static constexpr int64_t kChunks = kMaxHeadDim / kLanes;
  Lanes rows[kMaxWords][kChunks];

  template <typename Dim>
  void load(const float* src, int64_t stride, const Shape<Dim>& s, float factor) {
    for (int64_t i = 0; i < s.words; ++i)
      for (int64_t c = 0; c < s.head_dim; ++c) {
        if (c % kLanes == 0) rows[i][c / kLanes] = Lanes{};
        rows[i][c / kLanes][c % kLanes] = src[i * stride + c] * factor;
      }
  }

  // out_j = sum_i w[i][j] row_i for the m keys j, where w[i][j] = wT[i / kLanes][j][i % kLanes] (kept per query
  // block, one vector per key): a product with the channels in lanes, no sums across lanes. Each key's sum is held
  // in registers as four partial sums over the queries (four independent chains of additions); with the queries
  // outermost the compiler kept the m sums in memory, a load and a store around every multiply-add.
  template <typename Dim>
  void weighted_sums(float* out, int64_t stride, const Lanes (*wT)[kMaxWords], const Shape<Dim>& s) const {
    const int64_t m = s.words, chunks = (s.head_dim + kLanes - 1) / kLanes;
    const auto w = [&](int64_t i, int64_t j) { return wT[i / kLanes][j][i % kLanes]; };
    for (int64_t j = 0; j < m; ++j)
      for (int64_t b = 0; b < chunks; ++b) {
        Lanes a0{}, a1{}, a2{}, a3{};
        int64_t i = 0;
        for (; i + 4 <= m; i += 4) {
          a0 += w(i, j) * rows[i][b];
          a1 += w(i + 1, j) * rows[i + 1][b];
          a2 += w(i + 2, j) * rows[i + 2][b];
          a3 += w(i + 3, j) * rows[i + 3][b];
        }
        for (; i < m; ++i) a0 += w(i, j) * rows[i][b];
        store(out + j * stride + b * kLanes, (a0 + a1) + (a2 + a3), std::min(kLanes, s.head_dim - b * kLanes));
      }
  }
};

// Per-block scratch: scaled queries (transposed), probabilities (one vector per key), 1 / row sums.
struct Scores {
  Lanes qT[kMaxHeadDim];
  Lanes eT[kMaxWords];
  Lanes inv_sum;

  // Fills qT = scale * q^T and eT[j] = (exp(scale q_i . k_j - max_j))_i, so that
  // softmax(scale q k^T)[i][j] = eT[j][i] * inv_sum[i].
  template <typename Dim>
  void compute(const float* q, const float* k, const Shape<Dim>& s, const Block& b, float scale) {
    const int64_t C3 = 3 * s.width();
    load_transposed(qT, q, C3, b, s.head_dim, scale);
    Lanes mx{};
    for (int64_t j = 0; j < s.words; ++j) {
      eT[j] = dot_rows(k + j * C3, qT, s.head_dim);
      mx = j == 0 ? eT[j] : (eT[j] > mx ? eT[j] : mx);  // a NaN score at key 0 makes its query's maximum NaN
    }
    Lanes sum{};
    for (int64_t j = 0; j < s.words; ++j) {
      eT[j] = exp_nonpositive(eT[j] - mx);
      sum += eT[j];
    }
    inv_sum = 1.0f / sum;
  }
};

// A sentence's n values (m rows of q/k/v, or of the output's gradient) in fp32: fp32 ones as they are, bf16 ones
// widened into `scratch`.
inline const float* widened(const float* src, int64_t, std::vector<float>&) { return src; }

inline const float* widened(const c10::BFloat16* src, int64_t n, std::vector<float>& scratch) {
  scratch.resize(n);
  for_each_chunk(n, [&](int64_t c, auto k) { store(scratch.data() + c, load(src + c, k), k); });
  return scratch.data();
}

// Where a sentence's n results are written in fp32: an fp32 output itself, or `scratch`, which `flush` then rounds
// into the bf16 output.
inline float* staged(float* dst, int64_t, std::vector<float>&) { return dst; }

inline float* staged(c10::BFloat16*, int64_t n, std::vector<float>& scratch) {
  scratch.resize(n);
  return scratch.data();
}

inline void flush(float*, const float*, int64_t) {}

inline void flush(c10::BFloat16* dst, const float* src, int64_t n) {
  for_each_chunk(n, [&](int64_t c, auto k) { store(dst + c, load(src + c, k), k); });
}

// One thread's scratch: the block's scores, and the fp32 copies of a sentence's values (see widened and staged).
struct Scratch {
  Scores scores;
  std::vector<float> qkv, grad, out;
};

// Runs body(scratch, sentence) over the sentences in parallel.
template <typename Dim, typename F>
void for_each_sentence(const Shape<Dim>& s, F&& body) {
  at::parallel_for(0, s.sentences, 16, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t p = begin; p < end; ++p) body(scratch, p);
  });
}

// The pair's blocks of up to kLanes queries.
template <typename Dim, typename F>
void for_each_block(const Shape<Dim>& s, F&& body) {
  for (int64_t first = 0; first < s.words; first += kLanes) body(Block{first, std::min(kLanes, s.words - first)});
}

template <typename T>
void forward(const Shape<>& shape, const T* src, T* dst, float scale) {
  with_common_head_dim(shape, [&](const auto& s) {
    const int64_t m = s.words, C = s.width(), C3 = 3 * C;
    const auto d = s.head_dim;
    for_each_sentence(s, [&](Scratch& scratch, int64_t p) {
      const float* qkv = widened(src + p * m * C3, m * C3, scratch.qkv);
      float* out = staged(dst + p * m * C, m * C, scratch.out);
      Scores& scores = scratch.scores;
      for (int64_t h = 0; h < s.heads; ++h) {
        const float* q = qkv + h * d;
        const float* v = q + 2 * C;
        for_each_block(s, [&](const Block& b) {
          scores.compute(q, q + C, s, b, scale);
          Lanes oT[kMaxHeadDim];
          for (int64_t c = 0; c < d; ++c) oT[c] = Lanes{};
          for (int64_t j = 0; j < m; ++j)
            for (int64_t c = 0; c < d; ++c) oT[c] += v[j * C3 + c] * scores.eT[j];
          for (int64_t c = 0; c < d; ++c) oT[c] *= scores.inv_sum;
          store_transposed(out + h * d, C, oT, b, d);
        });
      }
      flush(dst + p * m * C, out, m * C);
    });
  });
}

// One head's part of a sentence's gradient: q (k and v after it) and go at the head's first channel of the
// sentence's first word, gq likewise in the gradient of q/k/v.
template <typename Dim>
void head_backward(Scores& scores, const Shape<Dim>& s, const float* q, const float* go, float* gq, float sc) {
  constexpr int64_t kBlocks = kMaxWords / kLanes;
  const int64_t m = s.words, C = s.width(), C3 = 3 * C;
  const auto d = s.head_dim;
  const float* k = q + C;
  const float* v = q + 2 * C;
  // Per query block, one vector per key j: the probabilities A^T and dS^T.
  Lanes probabilities[kBlocks][kMaxWords];
  Lanes score_grads[kBlocks][kMaxWords];
  for_each_block(s, [&](const Block& b) {
    scores.compute(q, k, s, b, sc);
    Lanes goT[kMaxHeadDim];
    load_transposed(goT, go, C, b, d, 1.0f);
    // A[i][j] = eT[j][i] inv_sum[i]; dA^T[j] = (v_j . dO_i)_i; the softmax correction
    // D_i = sum_j A[i][j] dA[i][j].
    Lanes* a = probabilities[b.first / kLanes];
    Lanes* ds = score_grads[b.first / kLanes];
    Lanes correction{};
    for (int64_t j = 0; j < m; ++j) {
      a[j] = scores.eT[j] * scores.inv_sum;
      ds[j] = dot_rows(v + j * C3, goT, d);
      correction += a[j] * ds[j];
    }
    // dS = A * (dA - D); dQ_i = scale sum_j dS[i][j] k_j.
    Lanes gqT[kMaxHeadDim];
    for (int64_t c = 0; c < d; ++c) gqT[c] = Lanes{};
    for (int64_t j = 0; j < m; ++j) {
      ds[j] = a[j] * (ds[j] - correction);
      for (int64_t c = 0; c < d; ++c) gqT[c] += (k[j * C3 + c] * sc) * ds[j];
    }
    store_transposed(gq, C3, gqT, b, d);
  });
  // dV_j = sum_i A[i][j] dO_i and dK_j = sum_i dS[i][j] (scale q_i), over all queries.
  ChannelRows rows;
  rows.load(go, C, s, 1.0f);
  rows.weighted_sums(gq + 2 * C, C3, probabilities, s);
  rows.load(q, C3, s, sc);
  rows.weighted_sums(gq + C, C3, score_grads, s);
}

// Gradient with respect to qkv, recomputing the probabilities (nothing but qkv is saved by the forward pass).
template <typename T>
void backward(const Shape<>& shape, const T* src, const T* gsrc, T* gdst, float sc) {
  with_common_head_dim(shape, [&](const auto& s) {
    const int64_t m = s.words, C = s.width(), C3 = 3 * C;
    const auto d = s.head_dim;
    for_each_sentence(s, [&](Scratch& scratch, int64_t p) {
      const float* qkv = widened(src + p * m * C3, m * C3, scratch.qkv);
      const float* grad = widened(gsrc + p * m * C, m * C, scratch.grad);
      float* gqkv = staged(gdst + p * m * C3, m * C3, scratch.out);
      for (int64_t h = 0; h < s.heads; ++h)
        head_backward(scratch.scores, s, qkv + h * d, grad + h * d, gqkv + h * d, sc);
      flush(gdst + p * m * C3, gqkv, m * C3);
    });
  });
}

}  // namespace

at::Tensor word_attention_forward(const at::Tensor& qkv, int64_t heads, double scale) {
  const Shape<> shape = check(qkv, heads);
  auto out = at::empty({shape.sentences, shape.words, shape.width()}, qkv.options());
  with_element_type(qkv, [&](auto* src) {
    using T = std::remove_pointer_t<decltype(src)>;
    forward(shape, src, out.data_ptr<T>(), static_cast<float>(scale));
  });
  return out;
}

at::Tensor word_attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv, int64_t heads,
                                      double scale) {
  const Shape<> shape = check(qkv, heads);
  const auto grad = grad_out.contiguous();
  TORCH_CHECK(grad.scalar_type() == qkv.scalar_type() &&
                  grad.sizes() == at::IntArrayRef({shape.sentences, shape.words, shape.width()}),
              "word attention: gradient of the wrong shape or type");
  auto grad_qkv = at::empty_like(qkv);
  with_element_type(qkv, [&](auto* src) {
    using T = std::remove_pointer_t<decltype(src)>;
    backward(shape, src, grad.data_ptr<T>(), grad_qkv.data_ptr<T>(), static_cast<float>(scale));
  });
  return grad_qkv;
}

}  // namespace tnt_vision
