"""bf16 autocast on CPUs without bf16 arithmetic: the same products through fp32 matrix units.

Under `torch.autocast("cpu", torch.bfloat16)` a linear layer rounds its input and weight to bf16, multiplies
with fp32 accumulation and rounds the output to bf16. A bf16 x bf16 product is exact in fp32, so an fp32 GEMM
of the rounded operands followed by the same output rounding computes that result up to the order of the
additions. On a CPU without bf16 instructions (no AVX512-BF16, no AMX) PyTorch emulates the bf16 GEMM, which
on the AVX2 development machine is about 8x slower than the fp32 one (a 1576x384x1536 layer: 108 ms against
12.5 ms); here the fp32 GEMM does the work. Attention over bf16 q/k/v and the embedding convolutions are
likewise computed in fp32 and rounded. Gradients follow autocast's: bf16-rounded, then cast to the input's and
parameters' own dtypes.

Where the CPU has bf16 arithmetic, outside autocast, while a graph is captured, and with
`TNT_VISION_CPU_KERNELS=0`, nothing here applies.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from . import ENV_SWITCH, capturing_graph, switched_on

BF16 = torch.bfloat16


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (or is not one whose lack of it we know how to detect)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX"):  # ARM and others: leave autocast as it is
        return True
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: True)() for probe in probes)


def emulating_bf16(x: torch.Tensor) -> bool:
    """CPU autocast to bf16, on a CPU without bf16 arithmetic, outside graph capture."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, BF16) or not torch.is_autocast_enabled("cpu"):
        return False  # autocast leaves other dtypes (float64) alone
    if torch.get_autocast_dtype("cpu") != BF16 or capturing_graph():
        return False
    return not native_bf16() and switched_on(ENV_SWITCH)


def _rounded(t: torch.Tensor) -> torch.Tensor:
    return t.to(BF16).float()


class _Bf16Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x16, w16 = x.to(BF16), weight.to(BF16)
        ctx.save_for_backward(x16, w16)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return F.linear(x16.float(), w16.float(), None if bias is None else _rounded(bias)).to(BF16)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x16, w16 = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        need_x, need_weight, need_bias = ctx.needs_input_grad
        g = _rounded(grad)
        g_2d = g.reshape(-1, g.shape[-1])
        grad_x = (g @ w16.float()).to(BF16).to(x_dtype) if need_x else None
        grad_w = (g_2d.t() @ x16.reshape(-1, x16.shape[-1]).float()).to(BF16).to(w_dtype) if need_weight else None
        grad_b = g_2d.sum(0).to(BF16).to(b_dtype) if need_bias and b_dtype is not None else None
        return grad_x, grad_w, grad_b


def conv2d_bf16(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """What `conv(x)` computes under bf16 autocast, in fp32 (autograd through the casts)."""
    with torch.autocast("cpu", enabled=False):
        bias = None if conv.bias is None else _rounded(conv.bias)
        return conv._conv_forward(_rounded(x), _rounded(conv.weight), bias).to(BF16)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What `F.linear` computes under bf16 autocast, by an fp32 GEMM (call where `emulating_bf16(x)`)."""
    with torch.autocast("cpu", enabled=False):
        return _Bf16Linear.apply(x, weight, bias)
