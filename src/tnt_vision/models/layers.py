"""Transformer pieces shared by TNT's inner and outer transformers and by the DeiT baselines."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from ..kernels import capturing_graph, word_attention, word_attention_applies
from ..kernels.emulated_bf16 import attention_bf16, emulating_bf16, lean_mlp, linear_bf16, mlp_bf16
from ..kernels.inner_block import checked_inner_block, inner_block_applies, inner_block_fits

_FUSED_ATTENTION = True


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
        if fused_attention_enabled() and emulating_bf16(x):
            return linear_bf16(x, self.weight, self.bias)
        return super().forward(x)


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
        qkv = self.qkv(x)
        x = attention_bf16(self.mix, qkv) if fused_attention_enabled() and emulating_bf16(qkv) else self.mix(qkv)
        return self.proj_drop(self.proj(x))

    def mix(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention from the fused projection (B, N, 3C) to the heads' concatenated outputs (B, N, C)."""
        B, N, C3 = qkv.shape
        if self.word_kernel_applies(qkv, N):
            return word_attention(qkv, self.num_heads, self.scale)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.attend(q, k, v).transpose(1, 2).reshape(B, N, C3 // 3)  # attend: (B, heads, N, head_dim)

    def word_kernel_applies(self, qkv: torch.Tensor, tokens: int) -> bool:
        """The compiled kernel serves short sequences (TNT's words) on the CPU, without attention dropout."""
        dropout = self.training and self.attn_drop > 0
        return fused_attention_enabled() and not dropout and word_attention_applies(qkv, tokens, self.head_dim)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        drop = self.attn_drop if self.training else 0.0
        if fused_attention_enabled():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        attn = self.attention_map(q, k)
        return F.dropout(attn, drop) @ v

    def attention_map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights (B, heads, N, N); the hook point for attention visualisation."""
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, *, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the cheap tests first: fp32 inference, the common case, never scans for hooks
        fused = mlp_bf16 if emulating_bf16(x) else lean_mlp if self.lean_applies(x) else None
        if fused is not None and self.fused_applies():
            return fused(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    def fused_applies(self) -> bool:
        """One function for the three layers: no dropout at work, no hook on a layer, not the explicit path."""
        if (self.training and self.drop.p > 0) or not fused_attention_enabled() or capturing_graph():
            return False
        return not parts_hooked(self) and isinstance(self.act, nn.GELU) and self.act.approximate == "none"

    def lean_applies(self, x: torch.Tensor) -> bool:
        """Training in fp32 (no autocast): the lean function saves memory where gradients are recorded."""
        if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())


def parts_hooked(module: nn.Module) -> bool:
    """Whether a part of `module` has a forward hook, which a fused path (not calling the part) would skip."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules() if m is not module)


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
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.se = SqueezeExcite(dim, se_ratio) if se_ratio > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_kernel_applies(x):
            return checked_inner_block(self, x, self.plain_forward)
        return self.plain_forward(x)

    def fused_kernel_applies(self, x: torch.Tensor) -> bool:
        """The one-launch Triton block (kernels.inner_block): GPU inference of short sequences, e.g. TNT's words."""
        if capturing_graph() or not (fused_attention_enabled() and inner_block_applies(x)):
            return False
        if self.training or self.se is not None or not isinstance(self.mlp.act, nn.GELU):
            return False
        if not inner_block_fits(x.shape[1], x.shape[2], self.attn.num_heads):  # before the scans below
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False
        return not parts_hooked(self)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        y = self.mlp(self.norm2(x))
        if self.se is not None:
            y = y + self.se(y)
        return x + self.drop_path(y)
