// The Python module of the CPU kernels (torch's C++ extension builder compiles it with the other sources here).
#include <torch/extension.h>

#include "cpu_kernels.h"
#include "lanes.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.attr("lanes") = tnt_vision::kLanes;  // fp32 values per vector: 16 where built for AVX-512, else 8
  module.attr("bf16_flushes_subnormals") = tnt_vision::kBf16FlushesSubnormals;  // AVX512-BF16's rounding
  module.def("word_attention_forward", &tnt_vision::word_attention_forward,
             "word attention forward (CPU, fp32 or bf16)");
  module.def("word_attention_backward", &tnt_vision::word_attention_backward,
             "word attention backward (CPU, fp32 or bf16)");
  module.def("word_block_forward", &tnt_vision::word_block_forward,
             "TNT's inner transformer block over each sentence's words, in inference (CPU, fp32)");
  module.def("layer_norm", &tnt_vision::layer_norm,
             "LayerNorm over the last dimension (CPU, fp32; output fp32 or bf16)");
  module.def("add_rows", &tnt_vision::add_rows,
             "residual add over rows, optionally followed by LayerNorm (CPU, fp32 stream, fp32 or bf16 branch)");
  module.def("layer_norm_backward", &tnt_vision::layer_norm_backward,
             "LayerNorm backward (CPU, fp32; the gradient also bf16)");
  module.def("gelu_backward_and_value", &tnt_vision::gelu_backward_and_value,
             "exact GELU's gradient in place of grad, its value and optionally its column sums (CPU, fp32 or bf16)");
  module.def("softmax_rows", &tnt_vision::softmax_rows, "softmax over the last dimension (CPU, fp32 or bf16)");
  module.def("column_sums", &tnt_vision::column_sums, "sums over all but the last dimension (CPU, fp32 or bf16)");
}
