"""bf16 autocast on CPUs without bf16 arithmetic: the same products through fp32 matrix units.

Under `torch.autocast("cpu", torch.bfloat16)` a linear layer rounds its input and weight to bf16, multiplies
with fp32 accumulation and rounds the output to bf16. A bf16 x bf16 product is exact in fp32, so an fp32 GEMM
of the rounded operands followed by the same output rounding computes that result up to the order of the
additions. On a CPU without bf16 instructions (no AVX512-BF16, no AMX) PyTorch emulates the bf16 GEMM, which
on the AVX2 development machine is about 8x slower than the fp32 one (a 1576x384x1536 layer: 108 ms against
12.5 ms); here the fp32 GEMM does the work. Attention over bf16 q/k/v and the embedding convolutions are
likewise computed in fp32 and rounded. Gradients follow autocast's: bf16-rounded, then cast to the input's and
parameters' own dtypes.

For backward only bf16 activations are kept, fewer than autocast keeps: no bf16 copies of the weights (rounded
again in backward), no GELU output (recomputed from the MLP's hidden layer), and of the attention only its bf16
q/k/v (the fp32 attention is recomputed). The lean MLP function also serves fp32 training, without rounding.

Where the CPU has bf16 arithmetic, outside autocast, while a graph is captured, and with
`TNT_VISION_CPU_KERNELS=0`, nothing here applies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, low: torch.dtype | None) -> torch.Tensor:
    """`F.linear`; with `low=BF16`, autocast's bf16 linear of a bf16 input as an fp32 GEMM (bf16 output)."""
    if low is None:
        return F.linear(x, weight, bias)
    return F.linear(x.float(), _rounded(weight), None if bias is None else _rounded(bias)).to(low)


def _linear_grads(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs: tuple[bool, ...], low: torch.dtype | None
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of `_linear` for its input, weight and bias (None where not needed); rounded to `low` if given."""
    g, w, x = (grad, weight, x) if low is None else (_rounded(grad), _rounded(weight), x.float())
    g_2d = g.reshape(-1, g.shape[-1])
    need_x, need_weight, need_bias = needs
    grads = (
        g @ w if need_x else None,
        g_2d.t() @ x.reshape(-1, x.shape[-1]) if need_weight else None,
        g_2d.sum(0) if need_bias else None,
    )
    return grads if low is None else tuple(None if t is None else t.to(low) for t in grads)


def _cast(grads: tuple[torch.Tensor | None, ...], dtypes: tuple[torch.dtype | None, ...]) -> tuple[Any, ...]:
    """Gradients to the dtypes of the tensors they belong to, as autocast's casts do in backward."""
    return tuple(None if g is None or d is None else g.to(d) for g, d in zip(grads, dtypes, strict=True))


def _dtypes(*tensors: torch.Tensor | None) -> tuple[torch.dtype | None, ...]:
    return tuple(None if t is None else t.dtype for t in tensors)


# The weights are saved as they are (parameters: no copy) and rounded again in backward; autocast would keep a
# bf16 copy of every weight per call.
class _Bf16Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x16 = x.to(BF16)
        ctx.save_for_backward(x16, weight)
        ctx.dtypes = _dtypes(x, weight, bias)
        return _linear(x16, weight, bias, BF16)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x16, weight = ctx.saved_tensors
        return _cast(_linear_grads(grad, x16, weight, ctx.needs_input_grad, BF16), ctx.dtypes)


class _LeanMlp(torch.autograd.Function):
    """fc2(gelu(fc1(x))) keeping only fc1's input and output for backward, where the GELU is recomputed.

    Autograd would also keep the GELU output, the largest activation of a block (four times the token width),
    and autocast bf16 copies of both weights. `low=None`: products in x's dtype; `low=BF16`: autocast's bf16
    products through fp32, with bf16 activations kept.
    """

    @staticmethod
    def forward(ctx: Any, low: torch.dtype | None, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = params
        x_in = x if low is None else x.to(low)
        hidden = _linear(x_in, w1, b1, low)
        ctx.save_for_backward(x_in, hidden, w1, w2)
        ctx.low, ctx.dtypes = low, _dtypes(x, *params)
        return _linear(F.gelu(hidden), w2, b2, low)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, hidden, w1, w2 = ctx.saved_tensors
        _, need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        grad_act, grad_w2, grad_b2 = _linear_grads(grad, F.gelu(hidden), w2, (True, need_w2, need_b2), ctx.low)
        grad_hidden = torch.ops.aten.gelu_backward(grad_act, hidden)  # in bf16 under low=BF16, like autocast's GELU
        grad_x, grad_w1, grad_b1 = _linear_grads(grad_hidden, x, w1, (need_x, need_w1, need_b1), ctx.low)
        return None, *_cast((grad_x, grad_w1, grad_b1, grad_w2, grad_b2), ctx.dtypes)


def conv2d_bf16(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """What `conv(x)` computes under bf16 autocast, in fp32 (autograd through the casts)."""
    with torch.autocast("cpu", enabled=False):
        bias = None if conv.bias is None else _rounded(conv.bias)
        return conv._conv_forward(_rounded(x), _rounded(conv.weight), bias).to(BF16)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What `F.linear` computes under bf16 autocast, by an fp32 GEMM (call where `emulating_bf16(x)`)."""
    with torch.autocast("cpu", enabled=False):
        return _Bf16Linear.apply(x, weight, bias)


def mlp_bf16(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """What `fc2(gelu(fc1(x)))` computes under bf16 autocast, by fp32 GEMMs (call where `emulating_bf16(x)`)."""
    with torch.autocast("cpu", enabled=False):
        return _LeanMlp.apply(BF16, x, w1, b1, w2, b2)


def lean_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """`fc2(gelu(fc1(x)))` (no autocast) keeping only x and the hidden layer for backward."""
    return _LeanMlp.apply(None, x, w1, b1, w2, b2)


def attention_bf16(mix: Callable[[torch.Tensor], torch.Tensor], qkv: torch.Tensor) -> torch.Tensor:
    """`mix` (attention from the fused projection) of bf16 q/k/v computed in fp32, output rounded to bf16.

    For backward only the bf16 projection is kept, and the fp32 attention is recomputed from it
    (`torch.utils.checkpoint`): the fp32 operands and outputs it would save are twice to four times larger.
    """

    def fp32_mix(qkv16: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return mix(qkv16.float()).to(BF16)

    if not torch.is_grad_enabled():
        return fp32_mix(qkv)
    return checkpoint(fp32_mix, qkv, use_reentrant=False)
