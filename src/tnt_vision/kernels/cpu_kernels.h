// The CPU kernels' entry points (contiguous fp32 tensors; the word attention's and GELU's also bf16, and the
// LayerNorm backward's gradient), bound to Python in cpu_kernels.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace tnt_vision {

// body(x's data) with its element type, float* or at::BFloat16* (the kernels taking both check which it is).
template <typename F>
void with_element_type(const at::Tensor& x, F&& body) {
  if (x.scalar_type() == at::kBFloat16)
    body(x.data_ptr<at::BFloat16>());
  else
    body(x.data_ptr<float>());
}

// word_attention.cpp: softmax(scale q k^T) v per head over each sentence's words, from the fused projection
// (P, m, 3C) to (P, m, C), and its gradient with respect to the projection.
at::Tensor word_attention_forward(const at::Tensor& qkv, int64_t heads, double scale);
at::Tensor word_attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv, int64_t heads, double scale);

// word_block.cpp: TNT's inner transformer block (pre-norm attention and exact-GELU MLP, with residuals) over
// (P, m, C) fp32 words in inference; weights as `kernels.inner_block.block_arguments` lists them.
at::Tensor word_block_forward(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                              const std::optional<at::Tensor>& qkv_bias, int64_t heads, double scale,
                              const std::vector<double>& eps);
// rows.cpp: LayerNorm over the last dimension, returning (output, mean, 1/std) as aten::native_layer_norm does;
// the output in fp32 or, with bf16_output, rounded to bf16 (what a bf16 linear layer after it takes).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& bias, double eps, bool bf16_output);
// rows.cpp: out = x + y (x and out fp32, y fp32 or bf16; 3-d tensors of one shape whose rows are contiguous, any
// strides between them; out may be x); with weight and bias defined, returns the LayerNorm of the sum (a fresh
// contiguous tensor, fp32 or, with bf16_output, bf16), else an undefined tensor (None).
at::Tensor add_rows(const at::Tensor& x, const at::Tensor& y, at::Tensor& out,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
                    bool bf16_output);
// rows.cpp: LayerNorm's backward from its output's gradient, input, mean and 1/std: the gradients of the input,
// the weight and the bias (the gradient fp32 or bf16; rows of any width).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   const at::Tensor& weight);
// rows.cpp: the exact GELU's gradient written over `grad` (grad * gelu'(x)), returning gelu(x) (fp32 or bf16) and,
// with `sums`, the fp32 sums of the gradient's columns as written (the bias gradient of a linear layer before the
// GELU), else an undefined tensor (None).
std::tuple<at::Tensor, at::Tensor> gelu_backward_and_value(at::Tensor& grad, const at::Tensor& x, bool sums);
// rows.cpp: softmax over the last dimension of a contiguous fp32 or bf16 tensor (computed in fp32, rounded once).
at::Tensor softmax_rows(const at::Tensor& x);
// rows.cpp: the sums of a contiguous fp32 or bf16 tensor's columns (over all but its last dimension), in fp32.
at::Tensor column_sums(const at::Tensor& x);

}  // namespace tnt_vision
