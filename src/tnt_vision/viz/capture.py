"""Record what a TNT (or DeiT) computes in each block during an ordinary forward pass.

The recorder forces the explicit attention path (`fused_attention(False)`), where every `Attention` computes its
softmax weights through `attention_map(q, k)`. It wraps that method on each attention instance and puts forward
hooks on the blocks; leaving the context restores both, so the fused fast path is untouched outside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.layers import Attention, fused_attention

_MISSING = object()


@dataclass
class Recording:
    """One entry per block (index as in `model.blocks`), overwritten by every forward pass inside the context.

    Attributes:
        inner_attn: (B*N, heads, m, m) word-to-word attention; None where a block has no inner transformer.
        outer_attn: (B, heads, N+1, N+1) attention between the class token (index 0) and the patches.
        patch_tokens: (B, N+1, d) sentence tokens after the block (class token first).
        word_tokens: (B*N, m, c) word tokens after the block; None where it has no inner transformer.
        input_size: (H, W) of the last image batch, which fixes the patch grid.
        patch_size: the model's patch size in pixels.
        words_per_side: words along each side of a patch (m = words_per_side**2).
    """

    depth: int
    patch_size: int
    words_per_side: int
    inner_attn: list[torch.Tensor | None] = field(default_factory=list)
    outer_attn: list[torch.Tensor | None] = field(default_factory=list)
    patch_tokens: list[torch.Tensor | None] = field(default_factory=list)
    word_tokens: list[torch.Tensor | None] = field(default_factory=list)
    input_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("inner_attn", "outer_attn", "patch_tokens", "word_tokens"):
            setattr(self, name, [None] * self.depth)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch rows and columns of the last recorded image batch."""
        if self.input_size is None:
            raise RuntimeError("nothing recorded yet: run a forward pass inside `capture(model)`")
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size


@contextlib.contextmanager
def capture(model: nn.Module) -> Iterator[Recording]:
    """Record attention maps and tokens of every block while the context is open.

    Example:
        >>> with capture(model) as rec, torch.no_grad():
        ...     logits = model(images)
        >>> rec.outer_attn[-1].shape  # (B, heads, N+1, N+1)

    Logits equal those of a normal forward pass (the explicit attention path replaces the fused kernel).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(model, "cfg"):
        raise TypeError(f"capture() needs a tnt_vision TNT model, got {type(model).__name__}")
    cfg = model.cfg
    rec = Recording(depth=len(blocks), patch_size=cfg.patch_size, words_per_side=cfg.words_per_side)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    wrapped: list[tuple[Attention, object]] = []

    def remember_size(_module: nn.Module, args: tuple) -> None:
        rec.input_size = tuple(args[0].shape[-2:])

    try:
        handles.append(model.register_forward_pre_hook(remember_size))
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_hook(_token_hook(rec, i, has_words=block.inner is not None)))
            if block.inner is not None:
                wrapped.append(_wrap_attention_map(block.inner.attn, rec.inner_attn, i))
            wrapped.append(_wrap_attention_map(block.outer.attn, rec.outer_attn, i))
        with fused_attention(False):
            yield rec
    finally:
        for handle in handles:
            handle.remove()
        for attn, previous in reversed(wrapped):
            if previous is _MISSING:
                del attn.attention_map
            else:
                attn.attention_map = previous


def _token_hook(rec: Recording, index: int, *, has_words: bool) -> Callable:
    def hook(_block: nn.Module, _args: tuple, output: tuple[torch.Tensor | None, torch.Tensor]) -> None:
        words, sentences = output
        rec.patch_tokens[index] = sentences.detach()
        rec.word_tokens[index] = words.detach() if has_words and words is not None else None

    return hook


def _wrap_attention_map(attn: Attention, store: list[torch.Tensor | None], index: int) -> tuple[Attention, object]:
    """Shadow `attn.attention_map` with an instance attribute that records its result; return what to restore."""
    previous = attn.__dict__.get("attention_map", _MISSING)
    compute = attn.attention_map  # the bound method, or an outer recorder when captures nest

    def attention_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        weights = compute(q, k)
        store[index] = weights.detach()
        return weights

    attn.attention_map = attention_map
    return attn, previous
