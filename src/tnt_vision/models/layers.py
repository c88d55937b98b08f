"""Transformer pieces shared by TNT's inner and outer transformers and by the DeiT baselines."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from ..kernels import (
    exporting_graph,
    grad_recorded,
    narrow_layer_norm,
    narrow_layer_norm_applies,
    onednn,
    residual_add,
    residual_add_applies,
    word_attention,
    word_attention_applies,
    word_block,
    word_block_applies,
)
from ..kernels.add_norm import add_and_norm, add_norm_applies, norm_for_linear
from ..kernels.emulated_bf16 import (
    BF16,
    attention_bf16,
    attention_projection_bf16,
    emulating_bf16,
    explicit_attention_bf16,
    fused_linear,
    fused_mlp,
    native_bf16_autocast,
    native_bf16_without_amx,
)
from ..kernels.inner_block import block_arguments, fused_block, inner_block_applies, inner_block_fits
from ..kernels.onednn import onednn_applies

_FUSED_ATTENTION = True
SHORT_SEQUENCE = 32  # longest sequence `short_on_gpu` sends to explicit products (0: none)


def fused_attention_enabled() -> bool:
    return _FUSED_ATTENTION


@contextlib.contextmanager
def fused_attention(enabled: bool) -> Iterator[None]:
    """Switch between the fast paths and the explicit reference path; both give the same result.

    Fast (the default): `scaled_dot_product_attention`, the compiled CPU word-attention kernel where it applies,
    and cache-sized micro-batches on the CPU. Explicit: one matrix product per step over the whole batch, which is
    what FLOP counters and attention-map recorders see.
    """
    global _FUSED_ATTENTION
    previous, _FUSED_ATTENTION = _FUSED_ATTENTION, enabled
    try:
        yield
    finally:
        _FUSED_ATTENTION = previous


class Linear(nn.Linear):
    """`nn.Linear` with the same parameters and state dict, and the fast bf16 path of `kernels.emulated_bf16`.

    Under bf16 autocast on a CPU without bf16 arithmetic, its products are fp32 GEMMs of bf16-rounded operands.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cpu:  # both fast paths are the CPU's: one test for the GPU's 62 layers a TNT-S forward
            return super().forward(x)
        if fused_attention_enabled() and emulating_bf16(x):
            return fused_linear(x, self, BF16)
        if onednn_path(self, x):
            return onednn.linear(x, self.weight, self.bias)
        return super().forward(x)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` with the same parameters and state dict, and the compiled kernel for narrow rows.

    TNT's words have 12 to 40 channels, where ATen's CPU LayerNorm takes about twice as long as the kernel
    (`kernels.narrow_layer_norm`): fp32 CPU rows of at most 64 values where no gradient is recorded, in the fast
    path. Training reaches it through the lean functions of `kernels.emulated_bf16`, which keep the statistics
    for the kernel's backward (`kernels.native_layer_norm_backward`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = list(self.normalized_shape)
        if fused_attention_enabled() and narrow_layer_norm_applies(x, shape, self.weight, self.bias):
            return narrow_layer_norm(x, self.weight, self.bias, self.eps)[0]
        return super().forward(x)

    def for_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's output for the linear layer after it. Under bf16 autocast on a CPU with bf16 products
        (inference, no hook on the norm) the kernel rounds it to bf16 as it writes it, rows of any width: the
        linear layer would round autocast's fp32 LayerNorm output to bf16 in another pass. In GPU inference the
        Triton kernel writes it in the linear layer's dtype likewise (`kernels.add_norm`)."""
        if self.fused_on_gpu(x):
            return norm_for_linear(x, self)
        if not self.writes_bf16(x):
            return self(x)
        return narrow_layer_norm(x, self.weight, self.bias, self.eps, bf16_output=True)[0]

    def add_for_linear(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + y, `for_linear` of it): a residual update and the norm after it. Where the norm writes bf16 (see
        `for_linear`) in one pass of the compiled kernel over each row (`residual_add`), which also reads a bf16 y
        as it is; in GPU inference in one pass of the Triton kernel (`kernels.add_norm`); the sum is a fresh tensor in
        every case."""
        if x.shape == y.shape and self.fused_on_gpu(x, y):
            return add_and_norm(x, y, self)
        if self.writes_bf16(x) and residual_add_applies(x, y):
            total, normed = residual_add(x, y, norm=self, bf16_output=True)
            assert normed is not None
            return total, normed
        total = x + y
        return total, self.for_linear(total)

    def fused_on_gpu(self, *tensors: torch.Tensor) -> bool:
        """Whether `add_norm`'s Triton kernel serves this norm over these tensors (`add_norm_applies`: GPU
        inference, rows of any width up to its limit), outside the explicit path, without a hook on the norm."""
        hooked = self._forward_hooks or self._forward_pre_hooks
        if hooked or not fused_attention_enabled() or len(self.normalized_shape) != 1:
            return False
        return add_norm_applies(*tensors, norm=self)  # its parameters read only where the device test says yes

    def writes_bf16(self, x: torch.Tensor) -> bool:
        """Whether the kernel writes `for_linear`'s output in bf16: bf16 autocast on a CPU with bf16 products, no
        hook on the norm, and the kernel takes it (one dimension, fp32, no gradient recorded; any width)."""
        hooked = self._forward_hooks or self._forward_pre_hooks
        if hooked or not (fused_attention_enabled() and native_bf16_autocast(x)):
            return False
        return narrow_layer_norm_applies(x, list(self.normalized_shape), self.weight, self.bias, widest=math.inf)


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection.

    The authors' code has separate `qk` and `v` projections; their concatenation (rows q, k, v) is `qkv`,
    which lets one GEMM serve all three.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_qkv(self.qkv(x))

    def from_qkv(self, qkv: torch.Tensor) -> torch.Tensor:
        """The attention's output from its fused q/k/v projection."""
        if not (fused_attention_enabled() and emulating_bf16(qkv)):
            return self.proj_drop(self.proj(self.mix(qkv)))
        if parts_hooked(self):  # the projection's hooks must see it called
            return self.proj_drop(self.proj(attention_bf16(self.mix, qkv)))
        return self.proj_drop(attention_projection_bf16(self.mix, qkv, self.proj))

    def mix(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention from the fused projection (B, N, 3C) to the heads' concatenated outputs (B, N, C)."""
        B, N, C3 = qkv.shape
        if self.word_kernel_applies(qkv, N):
            return word_attention(qkv, self.num_heads, self.scale)
        if self.explicit_bf16_applies(qkv):
            return explicit_attention_bf16(qkv, self.num_heads, self.scale)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.attend(q, k, v).transpose(1, 2).reshape(B, N, C3 // 3)  # attend: (B, heads, N, head_dim)

    def word_kernel_applies(self, qkv: torch.Tensor, tokens: int) -> bool:
        """The compiled kernel serves short sequences (TNT's words) on the CPU, without attention dropout."""
        dropout = self.weights_dropout() > 0
        return fused_attention_enabled() and not dropout and word_attention_applies(qkv, tokens, self.head_dim)

    def explicit_bf16_applies(self, qkv: torch.Tensor) -> bool:
        """bf16 training on a CPU with bf16 products (`bf16_training_on_cpu`), and bf16 inference on one without
        AMX (`bf16_inference_without_amx`), take `explicit_attention_bf16`: the explicit path's products with fewer
        copies; not with attention dropout, nor in an exported graph."""
        dropout = self.weights_dropout() > 0
        fits = qkv.dtype == BF16 and qkv.is_contiguous() and not dropout and fused_attention_enabled()
        return fits and bf16_explicit_on_cpu(qkv) and not exporting_graph()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        drop = self.weights_dropout()
        if fused_attention_enabled() and not explicit_products_faster(q):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        attn = self.attention_map(q, k)
        return F.dropout(attn, drop) @ v

    def weights_dropout(self) -> float:
        """The dropout probability on the attention weights now: `attn_drop` in training, else 0."""
        return self.attn_drop if self.training else 0.0

    def dropout_rate(self) -> float:
        """The largest dropout probability at work in training (attention weights or the projection's output)."""
        return max(self.attn_drop, self.proj_drop.p)

    def attention_map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights (B, heads, N, N); the hook point for attention visualisation."""
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def explicit_products_faster(q: torch.Tensor) -> bool:
    """Where the explicit path's products beat `scaled_dot_product_attention`: short sequences on a GPU, and bf16 on
    a CPU in training or (without AMX) in inference. In eager CPU bf16 `explicit_attention_bf16` takes the attention
    before this path (`Attention.explicit_bf16_applies`); under torch.compile this path is the one traced: compiled
    TNT-S's bf16 inference on the AMD machine ran at 0.97-1.02x eager's speed with SDPA traced and 1.04-1.08x with
    these products (throwaway timings, batch 32, 2 threads; `benchmarks/README.md`, `benchmarks/compiled_ab.py`)."""
    return short_on_gpu(q) or bf16_explicit_on_cpu(q)


def bf16_explicit_on_cpu(q: torch.Tensor) -> bool:
    """bf16 autocast on a CPU where explicit products beat SDPA: in training (`bf16_training_on_cpu`), and in
    inference without AMX (`bf16_inference_without_amx`); the autocast test first, asked of every attention."""
    return native_bf16_autocast(q) and (bf16_training_on_cpu(q) or bf16_inference_without_amx(q))


def short_on_gpu(q: torch.Tensor) -> bool:
    """Sequences as short as TNT's 16 words on a GPU, where explicit products beat the fused attention kernels.

    Measured on an H200 (torch 2.11, bf16, TNT-S's words at batch 256: 50176 x 4 heads x 16 words x 6 dims):
    `scaled_dot_product_attention` 3.76 ms forward, 14.9 ms forward + backward; explicit products 0.52 and 1.49
    (`benchmarks/gpu_short_attention.py`). A whole training step: 160 ms against 310.
    """
    return q.is_cuda and q.shape[-2] <= SHORT_SEQUENCE


def bf16_training_on_cpu(q: torch.Tensor) -> bool:
    """Training under bf16 autocast on a CPU with bf16 products, where `scaled_dot_product_attention`'s backward is
    slower than explicit products: TNT-S's outer attention (batch 32, 6 heads, 197 tokens of 64), forward and
    backward, 66 ms against 27 (Intel Xeon with AMX, 2 threads; in fp32 the two are even)."""
    return grad_recorded((q,)) and native_bf16_autocast(q)


def bf16_inference_without_amx(q: torch.Tensor) -> bool:
    """Inference under bf16 autocast on a CPU that multiplies bf16 by AVX512-BF16 without AMX tiles (AMD Zen 4),
    where `scaled_dot_product_attention`'s bf16 kernel is slower than `explicit_attention_bf16`: TNT-S's outer
    attention at batch 32, 12.2-12.3 against 19.0-19.1 ms a block in two runs (16.3 against 23.0 in a third), the
    whole model's bf16 inference 1.09-1.10x (AMD EPYC, 2 threads; `benchmarks/explicit_attention_ab.py --infer`).
    With AMX, SDPA was the faster: 8.5 ms against 17.6 by the model's explicit path (Intel Xeon)."""
    return not grad_recorded((q,)) and native_bf16_without_amx(q)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, *, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lean, low = lean_path(self, x)
        if lean and self.fusable():
            return fused_mlp(x, self.fc1, self.fc2, low)
        if onednn_path(self, x) and self.fusable():  # no on the GPU and in training at its first test
            return self.drop(self.fc2(onednn.linear(x, self.fc1.weight, self.fc1.bias, gelu=True)))
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    def fusable(self) -> bool:
        """One function can replace the three layers: exact GELU, no dropout at work."""
        gelu = isinstance(self.act, nn.GELU) and self.act.approximate == "none"
        return gelu and not (self.training and self.drop.p > 0)


def lean_path(module: nn.Module, x: torch.Tensor) -> tuple[bool, torch.dtype | None]:
    """Whether `module` may run the fused functions of `kernels.emulated_bf16`, which keep less for backward,
    and their `low` dtype: BF16 under emulated bf16 autocast and in training under native bf16 autocast (there
    the products are bf16 ones), None in training without autocast.

    Not in the explicit path, not in an exported graph, and not where a part of `module` has a hook (the fused
    functions do not call the parts). torch.compile traces them, their kernels as operators (`kernels._kernel`).
    The cheap tests first: fp32 inference never scans for hooks.
    """
    native_training = native_bf16_autocast(x) and _needs_grad(module, x)
    low = BF16 if emulating_bf16(x) or native_training else None
    if low is None and not records_grad(module, x):
        return False, None
    if not fused_attention_enabled() or exporting_graph() or parts_hooked(module):
        return False, None
    return True, low


def onednn_path(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` may run oneDNN's fused linear layers (`kernels.onednn`): fp32 CPU inference in the fast
    path, no hook on a part of `module` (the fused calls skip the parts)."""
    return fused_attention_enabled() and onednn_applies(x) and not parts_hooked(module)


def records_grad(module: nn.Module, x: torch.Tensor) -> bool:
    """Training without autocast: gradients are recorded for x or for the module's parameters."""
    return not torch.is_autocast_enabled(x.device.type) and _needs_grad(module, x)


def _needs_grad(module: nn.Module, x: torch.Tensor) -> bool:
    return grad_recorded(itertools.chain((x,), module.parameters()))


def parts_hooked(module: nn.Module) -> bool:
    """Whether a part of `module` has a forward hook, which a fused path (not calling the part) would skip.

    Asked on every forward of every block: a walk of the children's dicts, without `modules()`' generators, set of
    modules seen and names (1754 of the 15205 Python calls of a TNT-S forward, `benchmarks/host_overhead.py`)."""
    parts = list(module._modules.values())
    while parts:
        part = parts.pop()
        if part is not None:
            if part._forward_hooks or part._forward_pre_hooks:
                return True
            parts.extend(part._modules.values())
    return False


class SqueezeExcite(nn.Module):
    """Channel attention over the token mean (paper Table 12; the authors' `SE(dim, 0.25)`).

    Returns `x * tanh(fc2(relu(fc1(norm(mean(x))))))`; the block adds it to its input.
    """

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.norm(x.mean(dim=1, keepdim=True))  # (B, 1, C)
        return x * torch.tanh(self.fc2(F.relu(self.fc1(a))))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x)) (optionally with SE on the MLP output)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        se_ratio: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.se = SqueezeExcite(dim, se_ratio) if se_ratio > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_kernel_applies(x):
            return fused_block(self, x, self.branch_scales(x))
        if self.cpu_kernel_applies(x):
            weights, qkv_bias, heads, eps = block_arguments(self)
            return word_block(x, weights, qkv_bias, heads, self.attn.scale, eps)
        return self.plain_forward(x)

    def cpu_kernel_applies(self, x: torch.Tensor) -> bool:
        """The compiled CPU block (`kernels.word_block`), one pass over each sentence's words: short sequences, e.g.
        TNT's words, in CPU inference (fp32 weights; fp32, or bf16 autocast, whose words' stream is fp32 too)."""
        if not x.is_cpu or self.training or self.se is not None or not fused_attention_enabled():
            return False
        if not word_block_applies(x, self.attn.num_heads) or self.attn.qkv.weight.dtype != torch.float32:
            return False
        return self.mlp.fusable() and not parts_hooked(self)

    def fused_kernel_applies(self, x: torch.Tensor) -> bool:
        """The Triton block (kernels.inner_block), one launch forward and one backward: short sequences, e.g. TNT's
        words, on a GPU, in inference and training (drop-path included; dropout inside the block is not).

        Kept under torch.compile (an opaque operator in its graph), not in graphs that leave PyTorch."""
        if not (fused_attention_enabled() and inner_block_applies(x)):  # the cheap tests first
            return False
        if not inner_block_fits(x.shape[1], x.shape[2], self.attn.num_heads) or exporting_graph():  # outer blocks: no
            return False
        if self.se is not None or not self.mlp.fusable() or (self.training and self.attn.dropout_rate() > 0):
            return False
        if torch.are_deterministic_algorithms_enabled() and _needs_grad(self, x):
            return False  # the backward sums weight gradients by atomic additions, in no fixed order
        return not parts_hooked(self)

    def branch_scales(self, x: torch.Tensor) -> torch.Tensor | None:
        """Drop-path's keep mask for the fused block: (sentences, 2) scales of the attention's and the MLP's
        branch, drawn as `DropPath` draws them (one per sample of x, i.e. per sentence); None where it is off."""
        drop = self.drop_path
        if not (self.training and isinstance(drop, DropPath) and drop.drop_prob > 0):
            return None
        keep = 1.0 - drop.drop_prob
        scales = torch.empty(x.shape[0], 2, device=x.device).bernoulli_(keep)
        return scales.div_(keep) if drop.scale_by_keep else scales

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        lean, low = lean_path(self, x)
        if lean and self.mlp.fusable():
            return self.lean_forward(x, low)
        if self.onednn_forward_applies(x):
            return self.onednn_forward(x)
        x, normed = self.norm2.add_for_linear(x, self.drop_path(self.attn(self.norm1.for_linear(x))))
        return self.add_mlp(x, self.mlp(normed))

    def lean_forward(self, x: torch.Tensor, low: torch.dtype | None) -> torch.Tensor:
        """`plain_forward` with each LayerNorm fused into the layer after it: its output is not kept for backward."""
        x = x + self.drop_path(self.attn.from_qkv(fused_linear(x, self.attn.qkv, low, norm=self.norm1)))
        return self.add_mlp(x, fused_mlp(x, self.mlp.fc1, self.mlp.fc2, low, norm=self.norm2))

    def onednn_forward_applies(self, x: torch.Tensor) -> bool:
        """fp32 CPU inference (kernels.onednn) of a block whose dropouts are off, without SE and hooks."""
        if not x.is_cpu or self.training or self.se is not None:
            return False
        return self.mlp.fusable() and onednn_path(self, x)

    def onednn_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`plain_forward` in inference with the bias, the GELU and (in fp32) both residual additions done by
        oneDNN; under bf16 autocast the norms write bf16 for the layers after them (`LayerNorm.for_linear`), and
        the first residual addition is fused with the second norm, the second done in place (`residual_add`)."""
        attn, mlp = self.attn, self.mlp
        mixed = attn.mix(attn.qkv(self.norm1.for_linear(x)))
        x, normed = self.attention_residual(x, mixed)
        hidden = onednn.linear(normed, mlp.fc1.weight, mlp.fc1.bias, gelu=True)
        return onednn.linear_add(hidden, mlp.fc2.weight, mlp.fc2.bias, x, in_place=True)  # x: the block's own

    def attention_residual(self, x: torch.Tensor, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + proj(mixed), its second norm for the MLP) in inference (`onednn_forward`): a fresh sum."""
        proj = self.attn.proj
        if torch.is_autocast_enabled("cpu"):  # a bf16 branch: added and normed in one pass where the kernel applies
            return self.norm2.add_for_linear(x, onednn.linear(mixed, proj.weight, proj.bias))
        x = onednn.linear_add(mixed, proj.weight, proj.bias, x)
        return x, self.norm2.for_linear(x)

    def add_mlp(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The residual update by the MLP's output y (and the SE module's)."""
        if self.se is not None:
            y = y + self.se(y)
        return x + self.drop_path(y)
