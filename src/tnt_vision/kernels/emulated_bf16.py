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
again in backward), no GELU output (recomputed from the MLP's hidden layer), no LayerNorm output where a linear
layer follows it (recomputed from the norm's input, the residual stream, kept anyway), and of the attention only
its bf16 q/k/v (the fp32 attention is recomputed). The linear and MLP functions also serve fp32 training,
without rounding (`low=None`), and bf16 training on an x86 CPU with bf16 products (AVX512-BF16 or AMX), where
their products are bf16 GEMMs (`_operand`) and they keep less than autocast would (TNT-S at batch 32: a peak of
3722 against 4350 MiB, speed within the noise).

The emulation steps aside where the CPU has bf16 arithmetic, outside autocast, while a graph is captured, and with
`TNT_VISION_CPU_KERNELS=0`; `native_bf16_autocast` tells the fast paths made for autocast's own bf16 products
(oneDNN's bf16 linear layers, bf16 LayerNorm outputs, larger micro-batches) to act. torch.compile traces the
functions for fp32 and native bf16 training (and `_ExplicitAttention`), with the compiled kernels they call as
registered operators; exported graphs take the layers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import (
    ENV_SWITCH,
    asked_once,
    capturing_graph,
    gelu_backward_and_value,
    native_layer_norm,
    native_layer_norm_backward,
    softmax_rows,
    sum_rows,
    switched_on,
)

BF16 = torch.bfloat16


@asked_once
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (or is not one whose lack of it we know how to detect)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX"):  # ARM and others: leave autocast as it is
        return True
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: True)() for probe in probes)


def emulating_bf16(x: torch.Tensor) -> bool:
    """CPU autocast to bf16, on a CPU without bf16 arithmetic, outside graph capture."""
    if not _bf16_autocast(x) or native_bf16():  # the cheap tests first: asked of every linear layer
        return False
    return not capturing_graph() and switched_on(ENV_SWITCH)


def native_bf16_autocast(x: torch.Tensor) -> bool:
    """CPU autocast to bf16 on an x86 CPU with bf16 products, where autocast's own bf16 products apply (and the fast
    paths made for them: oneDNN's bf16 linear layers, larger micro-batches)."""
    return _bf16_autocast(x) and bf16_hardware()


def native_bf16_without_amx(x: torch.Tensor) -> bool:
    """`native_bf16_autocast` on a CPU that multiplies bf16 by AVX512-BF16 alone, without AMX tiles."""
    return native_bf16_autocast(x) and not amx_tiles()


@asked_once
def bf16_hardware() -> bool:
    """Whether this is an x86 CPU that multiplies bf16 in hardware (AVX512-BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


@asked_once
def amx_tiles() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), which oneDNN's bf16 kernels use; a CPU may
    multiply bf16 by AVX512-BF16 alone (AMD Zen 4), where the fastest kernels are not always the same ones."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def _bf16_autocast(x: torch.Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype not in (torch.float32, BF16) or not torch.is_autocast_enabled("cpu"):
        return False  # autocast leaves other dtypes (float64) alone
    return torch.get_autocast_dtype("cpu") == BF16


def _rounded(t: torch.Tensor) -> torch.Tensor:
    return t.to(BF16).float()


def _operand(t: torch.Tensor) -> torch.Tensor:
    """t as an operand of autocast's bf16 products: bf16 where the CPU multiplies bf16, else rounded to bf16 and
    held in fp32 for an fp32 GEMM (a bf16 x bf16 product is exact in fp32: the same result)."""
    return t.to(BF16) if bf16_hardware() else _rounded(t)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, low: torch.dtype | None) -> torch.Tensor:
    """`F.linear`; with `low=BF16`, autocast's bf16 linear of a bf16 input (bf16 output; see `_operand`)."""
    if low is None:
        return F.linear(x, weight, bias)
    operands = _operand(x), _operand(weight), None if bias is None else _operand(bias)
    return _lowered(_bf16_product(*operands) if operands[0].dtype == BF16 else F.linear(*operands), low)


def _bf16_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` of bf16 operands (fp32 accumulation, bf16 output): by oneDNN's linear layer where it is built in,
    which adds the bias to each tile of the product, where ATen's addmm first copies it into every row of the output
    (TNT-S at batch 32, 2 threads: the outer fc1 3.39 against 4.53 ms, the inner one 1.28 against 1.71;
    `benchmarks/lean_linear_ab.py`)."""
    if onednn_linear_available() and x.is_contiguous():
        if torch.compiler.is_compiling():  # Inductor lowers oneDNN's own operator only for constant (frozen) weights
            return _onednn_bf16_linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


@torch.library.custom_op("tnt_vision::bf16_linear", mutates_args=(), device_types="cpu")
def _onednn_bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`_bf16_product` by oneDNN as one opaque call in a torch.compile graph, for weights that change (training)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_onednn_bf16_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@asked_once
def onednn_linear_available() -> bool:
    """Whether this PyTorch has oneDNN's linear layer (`torch.ops.mkldnn._linear_pointwise`; `onednn.available`)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _linear_grads(
    grad: torch.Tensor,
    x: Callable[[], torch.Tensor],
    weight: torch.Tensor,
    needs: tuple[bool, ...],
    low: torch.dtype | None,
    grad_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of `_linear` for its input (`x()`, asked for only if the weight needs it), weight and bias (or
    `grad_bias` as given: summed where `grad` was made).

    None where not needed; rounded to `low` if given.
    """
    g, w = _grad_operands(grad, weight, low)
    need_x, need_weight, need_bias = needs
    grad_w, summed = _parameter_grads(g, x, weight, need_weight, need_bias and grad_bias is None, low)
    return _lowered(g @ w, low) if need_x else None, grad_w, summed if grad_bias is None else grad_bias


def _grad_operands(grad: torch.Tensor, weight: torch.Tensor, low: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    """The output gradient and the weight as `_linear`'s backward multiplies them (bf16-rounded under `low`)."""
    return (grad, weight) if low is None else (_operand(grad), _operand(weight))


def _parameter_grads(
    g: torch.Tensor,
    x: Callable[[], torch.Tensor],
    weight: torch.Tensor,
    need_weight: bool,
    need_bias: bool,
    low: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`_linear`'s weight and bias gradients from `_grad_operands`' g (None where not needed)."""
    g_2d = g.reshape(-1, g.shape[-1])
    x_2d = (x() if low is None else _operand(x())).reshape(-1, weight.shape[1])
    grad_w = _lowered(g_2d.t() @ x_2d, low) if need_weight else None
    return grad_w, _lowered(sum_rows(g_2d), low) if need_bias else None


def _widened(x: torch.Tensor, low: torch.dtype | None) -> torch.Tensor:
    """x in fp32 under emulated bf16 (where autocast computes in fp32), as it is otherwise."""
    return x if low is None else x.float()


def _lowered(x: torch.Tensor, low: torch.dtype | None) -> torch.Tensor:
    """x rounded to `low` under emulated bf16, as it is otherwise."""
    return x if low is None else x.to(low)


def _cast(grads: tuple[torch.Tensor | None, ...], dtypes: tuple[torch.dtype | None, ...]) -> tuple[Any, ...]:
    """Gradients to the dtypes of the tensors they belong to, as autocast's casts do in backward."""
    return tuple(None if g is None or d is None else g.to(d) for g, d in zip(grads, dtypes, strict=True))


def _dtypes(*tensors: torch.Tensor | None) -> tuple[torch.dtype | None, ...]:
    return tuple(None if t is None else t.dtype for t in tensors)


# The first linear layer's input of the fused functions below: x, or LayerNorm(x) (the pre-norm of a transformer
# block). `norm` is (normalized_shape, eps) and the norm's weight and bias are inputs of the function.
NormSpec = tuple[list[int], float]
Norm = NormSpec | None


def _first_input(
    x: torch.Tensor, norm: Norm, norm_params: tuple[torch.Tensor | None, ...], low: torch.dtype | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The first linear's input, and the tensors backward keeps to have it again.

    Without a norm: x (rounded to `low`), kept. With one: LayerNorm(x) computed like autocast's (in fp32) and
    rounded to `low`; kept are x itself (the residual stream: no copy) and the norm's statistics, and the
    normalised input is recomputed in backward. Autograd would keep both x and the normalised input.
    """
    if norm is None:
        x_in = _lowered(x, low)
        return x_in, (x_in,)
    out, mean, rstd = _normalised(x, norm, norm_params, low)
    return out, (x, mean, rstd)


def _first_input_again(
    kept: Sequence[torch.Tensor], norm: Norm, norm_params: tuple[torch.Tensor | None, ...], low: torch.dtype | None
) -> torch.Tensor:
    if norm is None:
        return kept[0]
    if torch.compiler.is_compiling():
        return _normalised_by(kept, norm_params, low)
    return _normalised(kept[0], norm, norm_params, low)[0]


def _normalised_by(
    kept: Sequence[torch.Tensor], norm_params: tuple[torch.Tensor | None, ...], low: torch.dtype | None
) -> torch.Tensor:
    """LayerNorm(x) again from the forward's mean and 1/std, as pointwise operators: what torch.compile's backward
    recomputes, in one fused pass. The forward's norm call again would be merged with the forward's own by
    AOTAutograd's common-subexpression pass, and its output kept for backward (the memory this module saves)."""
    x, mean, rstd = kept
    weight, bias = norm_params
    out = (_widened(x, low) - mean) * rstd
    out = out if weight is None else out * weight
    return _lowered(out if bias is None else out + bias, low)


def _normalised(
    x: torch.Tensor,
    norm: NormSpec,
    norm_params: tuple[torch.Tensor | None, ...],
    low: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm(x) computed like autocast's (in fp32) and rounded to `low` (bf16) as it is written, with its mean
    and 1/std."""
    return native_layer_norm(_widened(x, low), norm[0], *norm_params, norm[1], bf16_output=low is not None)


def _first_input_grads(
    grad: torch.Tensor | None,
    kept: Sequence[torch.Tensor],
    norm: Norm,
    norm_params: tuple[torch.Tensor | None, ...],
    needs: Sequence[bool],
    low: torch.dtype | None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients for x and the norm's weight and bias from the gradient of the first linear's input."""
    if norm is None or grad is None:
        return grad, None, None
    x, mean, rstd = kept
    # a bf16 gradient under low=BF16: the kernel reads it as it is, ATen's backward after widening it
    return native_layer_norm_backward(grad, _widened(x, low), norm[0], mean, rstd, *norm_params, list(needs))


def _first_linear_grads(
    ctx: Any,
    grad: torch.Tensor,
    kept: Sequence[torch.Tensor],
    norm_params: tuple[torch.Tensor | None, ...],
    weight: torch.Tensor,
    needs: Sequence[bool],
    grad_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients for x, the norm's weight and bias, and the first linear layer's weight and bias (`needs` in that
    order; the bias's as given, if it is) from the gradient of that layer's output; its input is recomputed only if
    its weight needs it."""
    low, norm = ctx.low, ctx.norm
    *needs_in, need_w, need_b = needs
    x_in = functools.partial(_first_input_again, kept, norm, norm_params, low)
    grad_in, grad_w, grad_b = _linear_grads(grad, x_in, weight, (any(needs_in), need_w, need_b), low, grad_bias)
    return *_first_input_grads(grad_in, kept, norm, norm_params, needs_in, low), grad_w, grad_b


class _Linear(torch.autograd.Function):
    """linear(x) or linear(LayerNorm(x)), in x's dtype (`low=None`) or as autocast's bf16 linear (`low=BF16`).

    Weights are kept as they are (parameters: no copy) and rounded again in backward; autocast would keep a bf16
    copy of every weight per call. See `_first_input` for the input.
    """

    @staticmethod
    def forward(ctx: Any, low: torch.dtype | None, norm: Norm, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        norm_w, norm_b, weight, bias = params
        x_in, kept = _first_input(x, norm, (norm_w, norm_b), low)
        ctx.save_for_backward(*kept, norm_w, norm_b, weight)
        ctx.low, ctx.norm, ctx.dtypes = low, norm, _dtypes(x, *params)
        return _linear(x_in, weight, bias, low)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        *kept, norm_w, norm_b, weight = ctx.saved_tensors
        grads = _first_linear_grads(ctx, grad, kept, (norm_w, norm_b), weight, ctx.needs_input_grad[2:])
        return None, None, *_cast(grads, ctx.dtypes)


class _LeanMlp(torch.autograd.Function):
    """fc2(gelu(fc1(x))) or fc2(gelu(fc1(LayerNorm(x)))), keeping fc1's output and what `_first_input` keeps.

    The GELU is recomputed in backward; autograd would also keep its output, the largest activation of a block
    (four times the token width), and autocast bf16 copies of both weights. `low=None`: products in x's dtype;
    `low=BF16`: autocast's bf16 products through fp32, with bf16 activations kept.
    """

    @staticmethod
    def forward(ctx: Any, low: torch.dtype | None, norm: Norm, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        norm_w, norm_b, w1, b1, w2, b2 = params
        x_in, kept = _first_input(x, norm, (norm_w, norm_b), low)
        hidden = _linear(x_in, w1, b1, low)
        ctx.save_for_backward(*kept, hidden, norm_w, norm_b, w1, w2)
        ctx.low, ctx.norm, ctx.dtypes = low, norm, _dtypes(x, *params)
        return _linear(F.gelu(hidden), w2, b2, low)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        *kept, hidden, norm_w, norm_b, w1, w2 = ctx.saved_tensors
        *needs_first, need_w2, need_b2 = ctx.needs_input_grad[2:]
        g, w = _grad_operands(grad, w2, ctx.low)
        # GELU's gradient, its recomputed value (for fc2's weight gradient) and fc1's bias gradient in one pass over
        # the hidden layer; in bf16 under low=BF16, like autocast's GELU
        need_b1 = needs_first[-1]
        grad_hidden, activation, grad_b1 = gelu_backward_and_value(_lowered(g @ w, ctx.low), hidden, need_b1)
        grad_w2, grad_b2 = _parameter_grads(g, lambda: activation, w2, need_w2, need_b2, ctx.low)
        grads = _first_linear_grads(ctx, grad_hidden, kept, (norm_w, norm_b), w1, needs_first, grad_b1)
        return None, None, *_cast((*grads, grad_w2, grad_b2), ctx.dtypes)


def conv2d_bf16(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """What `conv(x)` computes under bf16 autocast, in fp32 (autograd through the casts)."""
    with torch.autocast("cpu", enabled=False):
        bias = None if conv.bias is None else _rounded(conv.bias)
        return conv._conv_forward(_rounded(x), _rounded(conv.weight), bias).to(BF16)


def _norm(norm: nn.LayerNorm | None) -> tuple[Norm, tuple[torch.Tensor | None, torch.Tensor | None]]:
    if norm is None:
        return None, (None, None)
    return (list(norm.normalized_shape), norm.eps), (norm.weight, norm.bias)


def fused_linear(
    x: torch.Tensor, linear: nn.Linear, low: torch.dtype | None, norm: nn.LayerNorm | None = None
) -> torch.Tensor:
    """`linear(norm(x))` (or `linear(x)`) keeping less for backward (`_Linear`).

    `low=BF16`: what autocast computes, by fp32 GEMMs (call where `emulating_bf16(x)`); `low=None`: no autocast.
    """
    with torch.autocast("cpu", enabled=False):
        meta, params = _norm(norm)
        return _Linear.apply(low, meta, x, *params, linear.weight, linear.bias)


def fused_mlp(
    x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, low: torch.dtype | None, norm: nn.LayerNorm | None = None
) -> torch.Tensor:
    """`fc2(gelu(fc1(norm(x))))` (or without the norm) keeping less for backward (`_LeanMlp`); `low` as above."""
    with torch.autocast("cpu", enabled=False):
        meta, params = _norm(norm)
        return _LeanMlp.apply(low, meta, x, *params, fc1.weight, fc1.bias, fc2.weight, fc2.bias)


def _fp32_attention(mix: Callable[[torch.Tensor], torch.Tensor], qkv: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", enabled=False):
        return mix(qkv.float()).to(BF16)


def attention_bf16(mix: Callable[[torch.Tensor], torch.Tensor], qkv: torch.Tensor) -> torch.Tensor:
    """`mix` (attention from the fused projection) of bf16 q/k/v computed in fp32, output rounded to bf16.

    For backward only the bf16 projection is kept, and the fp32 attention is recomputed from it
    (`torch.utils.checkpoint`): the fp32 operands and outputs it would save are twice to four times larger.
    """
    if not torch.is_grad_enabled():
        return _fp32_attention(mix, qkv)
    return checkpoint(_fp32_attention, mix, qkv, use_reentrant=False)


class _AttentionProjection(torch.autograd.Function):
    """proj(mix(qkv)) as autocast computes it, keeping only the bf16 q/k/v (and the projection's weight).

    The fp32 attention is recomputed in backward (with the random state of the forward, for attention dropout),
    and its output serves the projection's weight gradient there: it is not kept either.
    """

    @staticmethod
    def forward(
        ctx: Any, mix: Callable[[torch.Tensor], torch.Tensor], qkv: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        weight, bias = params
        ctx.mix, ctx.rng, ctx.dtypes = mix, torch.get_rng_state(), _dtypes(qkv, *params)
        ctx.save_for_backward(qkv, weight)
        return _linear(_fp32_attention(mix, qkv), weight, bias, BF16)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qkv, weight = ctx.saved_tensors
        _, need_qkv, need_w, need_b = ctx.needs_input_grad
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):
            torch.set_rng_state(ctx.rng)
            qkv = qkv.detach().requires_grad_()
            attention = _fp32_attention(ctx.mix, qkv)
        grad_attention, grad_w, grad_b = _linear_grads(grad, attention.detach, weight, (need_qkv, need_w, need_b), BF16)
        grad_qkv = torch.autograd.grad(attention, qkv, grad_attention)[0] if need_qkv else None
        return None, *_cast((grad_qkv, grad_w, grad_b), ctx.dtypes)


def attention_projection_bf16(
    mix: Callable[[torch.Tensor], torch.Tensor], qkv: torch.Tensor, proj: nn.Linear
) -> torch.Tensor:
    """`proj(mix(qkv))` as bf16 autocast computes it, by fp32 products, keeping only the bf16 q/k/v for backward."""
    with torch.autocast("cpu", enabled=False):
        return _AttentionProjection.apply(mix, qkv, proj.weight, proj.bias)


# Whether `_ExplicitAttention` recomputes its attention weights in backward rather than keep them: the same product and
# softmax as in forward, the same bits. Under bf16 the weights were the largest single thing TNT-S kept for backward
# (batch 32: 14.2 MiB a block against 13.9 for q, k and v; 171 of 1609 MB in all, a throwaway count); recomputing them
# costs 8 ms a block (forward + backward 52.3 against 44.0 ms; the training step 3454 against 3343 ms, 0.97x;
# `benchmarks/explicit_attention_ab.py`); the step's peak memory went from 0.704x to 0.69x timm's (`perf_table.py`).
RECOMPUTE_WEIGHTS = True


def _attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) over the last dimension, for q already scaled. Never recorded, so that a backward building a
    graph takes the same kernels as the forward did."""
    with torch.no_grad():
        return softmax_rows(q @ k.transpose(-2, -1))


class _ExplicitAttention(torch.autograd.Function):
    """softmax(scale q k^T) v per head from the fused projection (B, N, 3C) to (B, N, C), all bf16, by explicit
    products: what the model's explicit path computes under bf16 autocast, with fewer copies.

    The explicit path scales q in its permuted layout, then the batched products copy q, k (transposed) and v into
    contiguous blocks, and in backward the heads' gradients are stacked and then copied again into the projection's
    layout. Here q (scaled), k and v are each copied once into (B, heads, N, d) blocks, k^T is a view the product
    reads as it is, and the three gradients are written straight into the projection's layout (q's with its scale).
    The softmax is the compiled kernel's (`softmax_rows`) where it applies. Kept for backward: the three blocks; the
    bf16 attention weights, which the explicit path keeps too, are recomputed from them (`RECOMPUTE_WEIGHTS`).
    """

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        batch, tokens, width = qkv.shape
        q_in, k_in, v_in = qkv.view(batch, tokens, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
        q = torch.mul(q_in, scale, out=torch.empty_like(q_in, memory_format=torch.contiguous_format))
        k, v = k_in.contiguous(), v_in.contiguous()
        weights = _attention_weights(q, k)
        ctx.save_for_backward(q, k, v, *(() if RECOMPUTE_WEIGHTS else (weights,)))
        ctx.scale = scale
        return (weights @ v).transpose(1, 2).reshape(batch, tokens, width // 3)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, *kept = ctx.saved_tensors
        weights = kept[0] if kept else _attention_weights(q, k)
        batch, heads, tokens, dim = q.shape
        # (B, heads, N, d) in one copy: both products below would copy the transposed view again
        grad_out = grad.reshape(batch, tokens, heads, dim).transpose(1, 2).contiguous()
        grad_scores = torch._softmax_backward_data(grad_out @ v.transpose(-2, -1), weights, -1, weights.dtype)
        grad_qkv = torch.empty(batch, tokens, 3, heads, dim, dtype=grad.dtype, device=grad.device)
        grad_q, grad_k, grad_v = grad_qkv.permute(2, 0, 3, 1, 4)
        grad_q.copy_(torch.mul(grad_scores @ k, ctx.scale))  # not `out=grad_q`: torch.compile cannot trace that
        grad_k.copy_(grad_scores.transpose(-2, -1) @ q)
        grad_v.copy_(weights.transpose(-2, -1) @ grad_out)
        return grad_qkv.view(batch, tokens, 3 * heads * dim), None, None


def explicit_attention_bf16(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Multi-head attention from a bf16 fused projection (B, N, 3C) by explicit products (`_ExplicitAttention`):
    for bf16 training on a CPU with bf16 products, where `scaled_dot_product_attention`'s backward is slower, and
    bf16 inference on one without AMX, where its forward is (`layers.bf16_inference_without_amx`)."""
    with torch.autocast("cpu", enabled=False):
        return _ExplicitAttention.apply(qkv, heads, scale)
