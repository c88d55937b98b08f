// Row- and element-wise kernels where ATen's general ones leave time on the table (contiguous, fp32 unless noted):
//
// - LayerNorm over narrow rows (TNT's words: 12 to 40 channels), where ATen's CPU kernel takes about twice as
//   long as the memory traffic needs: a row here is a few vectors and two horizontal sums. Its backward likewise,
//   with the weight's and bias's gradients summed per thread in vectors; it takes rows of any width (faster than
//   ATen's at 384 too) and a bf16 gradient as it is (as a bf16 linear layer's backward gives it). The forward can
//   also write its output rounded to bf16, at any row width, for a bf16 linear layer after it (bf16 autocast on
//   bf16 hardware).
// - The residual stream's update x + y (x fp32, the branch y fp32 or bf16 as a bf16 linear layer gives it) into a
//   given output (x itself, a fresh tensor, or part of a larger one), optionally followed by the LayerNorm of the
//   sum while its row is in L1: ATen's mixed-dtype add first copies y to a widened temporary, then writes a fresh
//   sum that the LayerNorm reads again.
// - The exact GELU's backward fused with its value. A lean MLP keeps only the GELU's input h and needs, in its
//   backward pass, both gelu(h) (for fc2's weight gradient) and grad * gelu'(h): one pass over h and grad instead
//   of two (ATen's GELU and GELU-backward each evaluate erf), with Phi and phi from one exponential. fp32, or bf16
//   (the lean MLP under bf16 autocast): read widened, computed in fp32, both results rounded as they are written.
//   It can also sum the gradient's columns as it writes them: the bias gradient of the linear layer before the GELU,
//   which ATen's sum would read again.
// - Softmax over the last dimension (bf16 attention weights in bf16 training's explicit attention: ATen's bf16
//   softmax over TNT-S's 197 tokens takes 1.5x as long as one pass of exponentials in fp32 with a bf16 store).
// - The sums of a matrix's columns (a linear layer's bias gradient), fp32 or bf16, where ATen's reduction over the
//   rows of TNT's narrow and bf16 gradients runs at a fraction of the memory's speed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "lanes.h"

namespace tnt_vision {
namespace {

void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, what, ": expected a float32 CPU tensor");
  TORCH_CHECK(x.is_contiguous(), what, ": expected a contiguous tensor");
}

// An elementwise kernel's tensor: contiguous fp32 or bf16 on the CPU (bf16 values computed in fp32, rounded as
// they are written).
void check_elementwise(const at::Tensor& x, const char* what) {
  const bool fits = x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16);
  TORCH_CHECK(fits, what, ": expected a float32 or bfloat16 CPU tensor");
  TORCH_CHECK(x.is_contiguous(), what, ": expected a contiguous tensor");
}

// for_each_chunk over n values in parallel.
template <typename F>
void for_each_chunk_parallel(int64_t n, F&& body) {
  const int64_t whole = n / kLanes;
  at::parallel_for(0, whole, 2048, [&](int64_t begin, int64_t end) {
    for_each_chunk((end - begin) * kLanes, [&](int64_t c, auto k) { body(begin * kLanes + c, k); });
  });
  if (whole * kLanes < n) body(whole * kLanes, n - whole * kLanes);
}

// v with the lanes from k on set to zero.
inline Lanes only_first(int64_t k, Lanes v) {
  return k == kLanes ? v : (first_lanes(k) ? v : Lanes{});
}

// Sum over a row of n values of value(c, k), the vector of its values c to c + k.
template <typename F>
float row_sum(int64_t n, F&& value) {
  Lanes acc{};
  for_each_chunk(n, [&](int64_t c, auto k) { acc += value(c, k); });
  return sum_lanes(acc);
}

// LayerNorm of up to kLanes rows at a time (rows of n fp32 values; weight w and bias b): `add` takes a row's mean and
// centred squares (two passes, the row in L1: no cancellation in the variance), `normalize` writes the group's rows
// with their 1/std from one vector square root and division, where one per row is a chain of latency that a
// narrow row's arithmetic cannot hide.
struct NormGroup {
  const float *w, *b;
  int64_t n;
  float inv_n, eps;
  const float* rows[kLanes];
  int64_t size = 0;
  Lanes mu{}, var{};

  // Takes the row; true once the group is full.
  bool add(const float* row) {
    const float m = row_sum(n, [&](int64_t c, auto k) { return load(row + c, k); }) * inv_n;
    mu[size] = m;
    var[size] = row_sum(n, [&](int64_t c, auto k) {
      const Lanes d = only_first(k, load(row + c, k) - m);
      return d * d;
    });
    rows[size] = row;
    return ++size == kLanes;
  }

  // Writes row i of the group to out(i), then starts a new group; returns the rows' 1/std.
  template <typename Out>
  Lanes normalize(Out&& out) {
    const Lanes rs = 1.0f / sqrt_lanes(var * inv_n + eps);
    for (int64_t i = 0; i < size; ++i) {
      auto* dst = out(i);
      for_each_chunk(n, [&](int64_t c, auto k) {
        store(dst + c, (load(rows[i] + c, k) - mu[i]) * rs[i] * load(w + c, k) + load(b + c, k), k);
      });
    }
    size = 0;
    return rs;
  }
};

constexpr int64_t kSumBlock = 64;  // rows summed before they join a thread's sums of the parameters' gradients

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// p[0:kLanes] += v (p holds whole vectors: the tail lanes of v are zero).
inline void add(float* p, Lanes v) { store(p, load(p) + v); }

// The sums of the columns of a stream of rows of n values, fp32 or bf16, gathered as the values are written (or as
// they are, with nothing to write): the stream is cut into periods of lcm(n, kLanes) values, so that a period's
// vector v holds the same columns in every period, and periods into blocks of about kBlockValues (at least 8
// periods), in L1 or L2. A thread writes a block in the stream's order (write(i, k): the k values from i), then sums
// it down the periods, up to kGroup vectors at a time with their sums in registers, into its own sums (fewer
// rounding steps than one long sum); `columns` folds the threads' sums and the periods' columns, and the stream's
// last values short of a period.
template <typename T>
class ColumnSums {
 public:
  ColumnSums(const T* values, int64_t total, int64_t n)
      : values_(values),
        total_(total),
        n_(n),
        period_(std::lcm(std::max<int64_t>(n, 1), kLanes)),
        block_(std::max<int64_t>(8, kBlockValues / period_)),
        sums_(at::get_num_threads() * period_, 0.0f) {}

  // Writes (write(i, k)) and sums the whole stream, in parallel; returns the n column sums (fp32).
  template <typename Write>
  at::Tensor operator()(Write&& write) {
    if (total_ == 0) return at::zeros({n_}, at::TensorOptions().dtype(at::kFloat));
    const int64_t periods = total_ / period_, blocks = (periods + block_ - 1) / block_;
    const int64_t grain = std::max<int64_t>(1, kParallelValues / (block_ * period_));  // small sums: one thread
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      float* thread_sums = sums_.data() + at::get_thread_num() * period_;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t first = b * block_, count = std::min(periods, first + block_) - first;
        for_each_chunk(count * period_, [&](int64_t c, auto k) { write(first * period_ + c, k); });
        add_block(values_ + first * period_, count, thread_sums);
      }
    });
    const int64_t rest = periods * period_;
    for_each_chunk(total_ - rest, [&](int64_t c, auto k) { write(rest + c, k); });
    return columns(rest);
  }

 private:
  static constexpr int64_t kBlockValues = 8192;
  static constexpr int64_t kParallelValues = 1 << 17;  // below this many values a second thread costs more
  static constexpr int kGroup = 8;

  // Adds the `count` periods from `block` into `thread_sums`, kGroup vectors at a time, then one at a time.
  void add_block(const T* block, int64_t count, float* thread_sums) const {
    int64_t v = 0;
    for (; v + kGroup * kLanes <= period_; v += kGroup * kLanes) add_group<kGroup>(block + v, count, thread_sums + v);
    for (; v < period_; v += kLanes) add_group<1>(block + v, count, thread_sums + v);
  }

  template <int G>
  void add_group(const T* first, int64_t count, float* thread_sums) const {
    Lanes acc[G] = {};
    for (int64_t p = 0; p < count; ++p) {
      for (int j = 0; j < G; ++j) acc[j] += load(first + p * period_ + j * kLanes);
    }
    for (int j = 0; j < G; ++j) add(thread_sums + j * kLanes, acc[j]);
  }

  // The threads' sums folded by column, with the values from `rest` on (less than a period) added one by one.
  at::Tensor columns(int64_t rest) const {
    auto out = at::zeros({n_}, at::TensorOptions().dtype(at::kFloat));
    float* dst = out.data_ptr<float>();
    for (int64_t i = rest; i < total_; ++i) dst[(i - rest) % n_] += static_cast<float>(values_[i]);
    for (int64_t t = 0; t < static_cast<int64_t>(sums_.size()); t += period_) {
      for (int64_t j = 0; j < period_; ++j) dst[j % n_] += sums_[t + j];
    }
    return out;
  }

  const T* values_;
  int64_t total_, n_, period_, block_;
  std::vector<float> sums_;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& bias, double eps, bool bf16_output) {
  check_input(x, "layer norm");
  check_input(weight, "layer norm weight");
  check_input(bias, "layer norm bias");
  const int64_t n = x.size(-1), rows = n > 0 ? x.numel() / n : 0;
  TORCH_CHECK(weight.numel() == n && bias.numel() == n, "layer norm: weight and bias must have ", n, " values");
  auto out = at::empty_like(x, bf16_output ? at::kBFloat16 : at::kFloat);
  auto shape = x.sizes().vec();
  shape.back() = 1;
  auto mean = at::empty(shape, x.options()), rstd = at::empty(shape, x.options());
  const float *src = x.data_ptr<float>(), *w = weight.data_ptr<float>(), *b = bias.data_ptr<float>();
  float *means = mean.data_ptr<float>(), *rstds = rstd.data_ptr<float>();
  const float inv_n = 1.0f / static_cast<float>(n), epsilon = static_cast<float>(eps);
  const auto normalize = [&](auto* dst) {
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      NormGroup group{w, b, n, inv_n, epsilon};
      for (int64_t first = begin; first < end; first += kLanes) {
        for (int64_t r = first; r < std::min(first + kLanes, end); ++r) group.add(src + r * n);
        const int64_t size = group.size;
        const Lanes mu = group.mu;
        const Lanes rs = group.normalize([&](int64_t i) { return dst + (first + i) * n; });
        store(means + first, mu, size);
        store(rstds + first, rs, size);
      }
    });
  };
  if (bf16_output)
    normalize(out.data_ptr<at::BFloat16>());
  else
    normalize(out.data_ptr<float>());
  return {out, mean, rstd};
}

at::Tensor add_rows(const at::Tensor& x, const at::Tensor& y, at::Tensor& out,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                    bool bf16_output) {
  for (const at::Tensor* t : {&x, &y, static_cast<const at::Tensor*>(&out)}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 3 && t->stride(2) == 1,
                "residual add: expected 3-d CPU tensors with contiguous rows");
    TORCH_CHECK(t->sizes() == x.sizes(), "residual add: shapes ", x.sizes(), ", ", y.sizes(), ", ", out.sizes());
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "residual add: expected float32 x");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16, "residual add: y float32 or bf16");
  const bool norm = weight.has_value() && bias.has_value();
  const int64_t n = x.size(2), inner = x.size(1), rows = x.size(0) * inner;
  if (norm) {
    check_input(*weight, "residual add's layer norm weight");
    check_input(*bias, "residual add's layer norm bias");
    TORCH_CHECK(weight->numel() == n && bias->numel() == n, "residual add: weight and bias must have ", n, " values");
  }
  at::Tensor normed;
  if (norm) normed = at::empty(x.sizes(), x.options().dtype(bf16_output ? at::kBFloat16 : at::kFloat));
  // the offset of row (i, j) of a (a, b, n) tensor
  const auto offset = [](const at::Tensor& t) {
    return [s0 = t.stride(0), s1 = t.stride(1)](int64_t i, int64_t j) { return i * s0 + j * s1; };
  };
  const auto x_at = offset(x), y_at = offset(y), out_at = offset(out);
  const float* src = x.data_ptr<float>();
  float* sums = out.data_ptr<float>();
  const float inv_n = 1.0f / static_cast<float>(n), epsilon = static_cast<float>(eps);
  const float* w = norm ? weight->data_ptr<float>() : nullptr;
  const float* bb = norm ? bias->data_ptr<float>() : nullptr;
  with_element_type(y, [&](const auto* branch) {
    if (!norm && x.is_contiguous() && y.is_contiguous() && out.is_contiguous()) {  // no rows to walk
      for_each_chunk_parallel(x.numel(), [&](int64_t i, auto k) {
        store(sums + i, load(src + i, k) + load(branch + i, k), k);
      });
      return;
    }
    const auto run = [&](auto dst) {
      constexpr bool normalize = !std::is_same_v<decltype(dst), std::nullptr_t>;
      at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
        NormGroup group{w, bb, n, inv_n, epsilon};
        int64_t first = begin;  // the group's first row
        const auto normalize_group = [&] {
          if constexpr (normalize) group.normalize([&](int64_t g) { return dst + (first + g) * n; });
        };
        // (i, j) stepped along with r: a division per row would cost as much as a narrow row's arithmetic
        for (int64_t r = begin, i = begin / inner, j = begin % inner; r < end; ++r, j = j + 1 == inner ? 0 : j + 1) {
          if (r > begin && j == 0) ++i;
          const float* a = src + x_at(i, j);
          const auto* b = branch + y_at(i, j);
          float* s = sums + out_at(i, j);
          for_each_chunk(n, [&](int64_t c, auto k) { store(s + c, load(a + c, k) + load(b + c, k), k); });
          if (normalize && group.add(s)) {
            normalize_group();
            first = r + 1;
          }
        }
        if (group.size > 0) normalize_group();
      });
    };
    if (!norm)
      run(nullptr);
    else if (bf16_output)
      run(normed.data_ptr<at::BFloat16>());
    else
      run(normed.data_ptr<float>());
  });
  return normed;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   const at::Tensor& weight) {
  check_elementwise(grad, "layer norm backward gradient");
  check_input(x, "layer norm backward input");
  check_input(mean, "layer norm backward mean");
  check_input(rstd, "layer norm backward 1/std");
  check_input(weight, "layer norm backward weight");
  const int64_t n = x.size(-1), rows = n > 0 ? x.numel() / n : 0;
  TORCH_CHECK(grad.sizes() == x.sizes(), "layer norm backward: gradient of shape ", grad.sizes(), " for ", x.sizes());
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows, "layer norm backward: one mean and 1/std per row");
  TORCH_CHECK(weight.numel() == n, "layer norm backward: ", weight.numel(), " weights for rows of ", n);
  auto grad_x = at::empty_like(x);
  const float *src = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  const float *means = mean.data_ptr<float>(), *rstds = rstd.data_ptr<float>();
  float* dst = grad_x.data_ptr<float>();
  const float inv_n = 1.0f / static_cast<float>(n);
  // Each thread adds its rows' shares of the weight's and bias's gradients into its own sums: a block of rows at a
  // time into a block sum, then that into the thread's (fewer rounding steps than one long sum).
  const int64_t threads = at::get_num_threads(), width = round_up(n);
  std::vector<float> sums(threads * 2 * width, 0.0f);
  with_element_type(grad, [&](const auto* g) {
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      float* thread_sums = sums.data() + at::get_thread_num() * 2 * width;
      std::vector<float> block_sums(2 * width);
      for (int64_t block = begin; block < end; block += kSumBlock) {
        std::fill(block_sums.begin(), block_sums.end(), 0.0f);
        for (int64_t r = block; r < std::min(end, block + kSumBlock); ++r) {
          const float *row = src + r * n, mu = means[r], rs = rstds[r];
          const auto* g_row = g + r * n;
          const auto x_hat = [&](int64_t c, auto k) { return (load(row + c, k) - mu) * rs; };
          // with d = grad * weight: grad_x = rs (d - mean(d) - x_hat mean(d x_hat)); the tails' zeros add nothing
          const float mean_d =
              inv_n * row_sum(n, [&](int64_t c, auto k) { return load(g_row + c, k) * load(w + c, k); });
          const float mean_dx = inv_n * row_sum(n, [&](int64_t c, auto k) {
            return load(g_row + c, k) * load(w + c, k) * x_hat(c, k);
          });
          for_each_chunk(n, [&](int64_t c, auto k) {
            const Lanes gc = load(g_row + c, k), xc = x_hat(c, k);
            store(dst + r * n + c, rs * (gc * load(w + c, k) - mean_d - xc * mean_dx), k);
            add(block_sums.data() + c, gc * xc);
            add(block_sums.data() + width + c, gc);
          });
        }
        for_each_chunk(n, [&](int64_t c, auto) {
          add(thread_sums + c, load(block_sums.data() + c));
          add(thread_sums + width + c, load(block_sums.data() + width + c));
        });
      }
    });
  });
  auto grad_weight = at::zeros_like(weight), grad_bias = at::zeros_like(weight);
  float *gw = grad_weight.data_ptr<float>(), *gb = grad_bias.data_ptr<float>();
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t c = 0; c < n; ++c) {
      gw[c] += sums[t * 2 * width + c];
      gb[c] += sums[t * 2 * width + width + c];
    }
  }
  return {grad_x, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> gelu_backward_and_value(at::Tensor& grad, const at::Tensor& x, bool sums) {
  check_elementwise(x, "gelu");
  check_elementwise(grad, "gelu gradient");
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), "gelu: gradient of shape ",
              grad.sizes(), " and type ", grad.scalar_type(), " for input ", x.sizes(), " of ", x.scalar_type());
  TORCH_CHECK(!sums || x.dim() > 0, "gelu: column sums need rows");
  auto value = at::empty_like(x);
  at::Tensor column_sums;
  with_element_type(x, [&](auto* src) {
    using T = std::remove_pointer_t<decltype(src)>;
    T *g = grad.data_ptr<T>(), *dst = value.data_ptr<T>();
    const auto step = [&](int64_t i, auto k) {
      const Lanes v = load(src + i, k);
      const Normal n = normal(v);
      store(dst + i, v * n.cdf, k);
      store(g + i, load(g + i, k) * (n.cdf + v * n.pdf), k);  // gelu'(x) = Phi(x) + x phi(x)
    };
    if (sums)  // of the gradient as written (bf16: rounded)
      column_sums = ColumnSums<T>(g, x.numel(), x.size(-1))(step);
    else
      for_each_chunk_parallel(x.numel(), step);
  });
  return {value, column_sums};
}

at::Tensor softmax_rows(const at::Tensor& x) {
  check_elementwise(x, "softmax");
  TORCH_CHECK(x.dim() > 0, "softmax: expected rows, got a 0-d tensor");
  auto out = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n > 0 ? x.numel() / n : 0;
  with_element_type(x, [&](auto* src) {
    using T = std::remove_pointer_t<decltype(src)>;
    T* dst = out.data_ptr<T>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> exps(round_up(n));  // a row's exponentials, in L1 until they are scaled
      for (int64_t r = begin; r < end; ++r) {
        const T* row = src + r * n;
        Lanes top = splat(-std::numeric_limits<float>::infinity());
        for_each_chunk(n, [&](int64_t c, auto k) {
          const Lanes v = load(row + c, k);
          top = v > top && (k == kLanes || first_lanes(k)) ? v : top;
        });
        const float largest = max_lanes(top);
        const float total = row_sum(n, [&](int64_t c, auto k) {
          const Lanes d = load(row + c, k) - largest;  // exp(d) is 0 in fp32 below -103.3; -inf's is exactly 0
          const Lanes e = only_first(k, d < -87.0f ? Lanes{} : exp_nonpositive(d));
          store(exps.data() + c, e);
          return e;
        });
        const float scale = 1.0f / total;
        for_each_chunk(n, [&](int64_t c, auto k) { store(dst + r * n + c, load(exps.data() + c) * scale, k); });
      }
    });
  });
  return out;
}

at::Tensor column_sums(const at::Tensor& x) {
  check_elementwise(x, "column sums");
  TORCH_CHECK(x.dim() > 0, "column sums: expected rows, got a 0-d tensor");
  at::Tensor sums;
  with_element_type(x, [&](const auto* src) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(src)>>;
    sums = ColumnSums<T>(src, x.numel(), x.size(-1))([](int64_t, auto) {});  // nothing to write
  });
  return sums;
}

}  // namespace tnt_vision
