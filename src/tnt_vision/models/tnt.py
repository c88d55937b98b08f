"""Transformer in Transformer (Han et al., NeurIPS 2021), with the DeiT baseline as its no-inner-transformer case.

Shapes: B images, N = grid_h * grid_w sentences (patches), m words per sentence, c word width, d sentence width.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from ..kernels import exporting_graph, grad_recorded, onednn, residual_add, residual_add_applies
from ..kernels.add_norm import add_norm_applies, add_normed, result_dtypes
from ..kernels.emulated_bf16 import conv2d_bf16, emulating_bf16, fused_linear, native_bf16_autocast
from .layers import LayerNorm, Linear, TransformerBlock, fused_attention_enabled, lean_path, parts_hooked

# Working set one block may touch per micro-batch on the CPU: the widest activation (the inner or outer MLP's
# hidden layer) of a group of images is kept near this size so that it stays in the last-level cache.
CACHE_BLOCK_BYTES = 10 * 2**20
# Under bf16 autocast on a CPU with bf16 products (AMX) the outer layers' products run several times faster and
# want more rows: groups four times as large measured fastest (TNT-S, batch 32 and 64).
BF16_BLOCK_BYTES = 4 * CACHE_BLOCK_BYTES


@dataclass(frozen=True)
class TNTConfig:
    """Everything that defines a TNT (or, with `tnt_blocks=()`, a DeiT) architecture.

    Attributes:
        tnt_blocks: 0-based indices of the blocks that have an inner transformer; None means all of them.
            An empty tuple gives a plain ViT/DeiT with a linear 16x16 patch embedding.
        inner_stride: word size in pixels; a 16x16 patch has (16 / inner_stride)**2 words.
        se_ratio: hidden ratio of the SE module on the outer MLP (0 disables it; the authors use 0.25).
        legacy: the older TNT-S layout (image-wide word convolution, per-word LayerNorm before projection).
        global_pool: "token" (class token) or "avg" (mean of the sentence tokens).
        norm_eps: LayerNorm epsilon of the transformer blocks (TNT: 1e-5, DeiT: 1e-6).
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    depth: int = 12
    outer_dim: int = 384
    outer_heads: int = 6
    inner_dim: int = 24
    inner_heads: int = 4
    inner_stride: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    tnt_blocks: tuple[int, ...] | None = None
    se_ratio: float = 0.0
    sentence_pos: bool = True
    word_pos: bool = True
    legacy: bool = False
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    global_pool: str = "token"
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.tnt_blocks is not None:
            object.__setattr__(self, "tnt_blocks", tuple(sorted(set(self.tnt_blocks))))
        for name, ok in (
            ("img_size must be a positive multiple of patch_size", self.img_size % self.patch_size == 0),
            ("outer_dim must be divisible by outer_heads", self.outer_dim % self.outer_heads == 0),
            (
                "inner_dim must be divisible by inner_heads",
                not self.has_words or self.inner_dim % self.inner_heads == 0,
            ),
            (
                "patch_size must be divisible by inner_stride",
                not self.has_words or self.patch_size % self.inner_stride == 0,
            ),
            ("global_pool must be 'token' or 'avg'", self.global_pool in ("token", "avg")),
            ("depth must be positive", self.depth > 0),
            (
                f"tnt_blocks must lie in 0..{self.depth - 1}",
                all(0 <= i < self.depth for i in self.tnt_blocks or ()),
            ),
        ):
            if not ok:
                raise UserError(f"invalid TNTConfig: {name} (got {self})")

    @property
    def has_words(self) -> bool:
        return self.tnt_blocks is None or len(self.tnt_blocks) > 0

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.img_size // self.patch_size, self.img_size // self.patch_size

    @property
    def words_per_side(self) -> int:
        return math.ceil(self.patch_size / self.inner_stride)

    @property
    def num_words(self) -> int:
        return self.words_per_side**2

    def is_tnt_block(self, index: int) -> bool:
        return self.tnt_blocks is None or index in self.tnt_blocks

    def replace(self, **overrides: Any) -> TNTConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise UserError(f"unknown TNTConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **overrides)


def patchify(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * H/size * W/size, C, size, size), patches in row-major order (as nn.Unfold)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // size, size, W // size, size).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, C, size, size)


def convolve(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`; under bf16 autocast on a CPU without bf16 arithmetic, through fp32 (kernels.emulated_bf16)."""
    return conv2d_bf16(conv, x) if fused_attention_enabled() and emulating_bf16(x) else conv(x)


class WordEmbed(nn.Module):
    """Image -> visual words: a 7x7 stride-s convolution over each 16x16 patch (or, legacy, over the image)."""

    def __init__(self, cfg: TNTConfig) -> None:
        super().__init__()
        self.patch_size, self.words_per_side, self.legacy = cfg.patch_size, cfg.words_per_side, cfg.legacy
        self.proj = nn.Conv2d(cfg.in_chans, cfg.inner_dim, kernel_size=7, stride=cfg.inner_stride, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B*N, c, k, k): convolve each patch, or (legacy) the whole image and then cut it into patches
        if self.legacy:
            x = patchify(convolve(self.proj, x), self.words_per_side)
        else:
            x = convolve(self.proj, patchify(x, self.patch_size))
        # (B*N, m, c), made contiguous once here: the transposed layout would otherwise be inherited by every
        # block's residual stream and copied again by each LayerNorm, linear layer and word projection
        return x.flatten(2).transpose(1, 2).contiguous()


class PatchEmbed(nn.Module):
    """Image -> sentences by a linear projection of each patch (ViT/DeiT)."""

    def __init__(self, cfg: TNTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.outer_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return convolve(self.proj, x).flatten(2).transpose(1, 2)  # (B, N, d)


class SentenceProjection(nn.Module):
    """Words of each sentence -> one sentence-width vector: LN(m*c) -> Linear -> LN(d).

    The legacy layout normalises each word (LN(c)) and has no second norm.
    """

    def __init__(self, num_words: int, inner_dim: int, outer_dim: int, *, bias: bool, legacy: bool = False) -> None:
        super().__init__()
        self.legacy = legacy
        self.norm1 = LayerNorm(inner_dim if legacy else num_words * inner_dim)  # legacy: words, the narrow kernel
        self.proj = Linear(num_words * inner_dim, outer_dim, bias=bias)
        self.norm2 = nn.Identity() if legacy else nn.LayerNorm(outer_dim)

    def forward(self, words: torch.Tensor, batch: int) -> torch.Tensor:
        if self.legacy:
            normed = self.norm1.for_linear(words).reshape(batch, -1, words.shape[1] * words.shape[2])
            return self.norm2(self.proj(normed))
        x = self.sentences(words, batch)
        lean, low = lean_path(self, x)
        if lean:  # the norm's output is not kept for backward (kernels.emulated_bf16)
            return self.norm2(fused_linear(x, self.proj, low, norm=self.norm1))
        return self.norm2(self.proj(self.norm1.for_linear(x)))  # (B, N, d)

    @staticmethod
    def sentences(words: torch.Tensor, batch: int) -> torch.Tensor:
        """(B*N, m, c) words -> (B, N, m*c), each sentence's words side by side."""
        return words.reshape(batch, -1, words.shape[1] * words.shape[2])

    def add_to(self, sentences: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """The sentences (B, 1+N, d) with this projection of the words added to the patches' tokens
        (`add_to_patches`). In GPU inference the second norm and the addition are one pass of the Triton kernel
        (`kernels.add_norm`), which writes the sums straight into the new tensor."""
        if not self.fused_on_gpu(sentences, words):
            return add_to_patches(sentences, self(words, sentences.shape[0]))
        update = self.proj(self.norm1.for_linear(self.sentences(words, sentences.shape[0])))
        cls, patches = sentences.split([1, update.shape[1]], dim=1)
        out = torch.empty(sentences.shape, dtype=result_dtypes(patches, update, self.norm2)[1], device=cls.device)
        out[:, :1] = cls
        add_normed(patches, update, self.norm2, out[:, 1:])
        return out

    def fused_on_gpu(self, sentences: torch.Tensor, words: torch.Tensor) -> bool:
        """Whether `add_to` takes the Triton kernel: GPU inference (`add_norm_applies`), a second norm, no hook."""
        if self.legacy or not fused_attention_enabled() or not add_norm_applies(sentences, words):
            return False  # the cheap tests first: on the CPU the parameters are never listed
        if grad_recorded(self.parameters()):
            return False
        return not (self._forward_hooks or self._forward_pre_hooks or parts_hooked(self))


class TNTBlock(nn.Module):
    """Inner transformer over each sentence's words, word -> sentence projection, outer transformer.

    Without an inner transformer (hybrid models, DeiT) it is a plain ViT block and passes the words through.
    """

    def __init__(self, cfg: TNTConfig, index: int, drop_path: float) -> None:
        super().__init__()
        common: dict[str, Any] = {
            "mlp_ratio": cfg.mlp_ratio,
            "qkv_bias": cfg.qkv_bias,
            "drop": cfg.drop_rate,
            "attn_drop": cfg.attn_drop_rate,
            "drop_path": drop_path,
            "norm_eps": cfg.norm_eps,
        }
        self.inner: TransformerBlock | None = None
        self.word_proj: SentenceProjection | None = None
        if cfg.is_tnt_block(index):
            self.inner = TransformerBlock(cfg.inner_dim, cfg.inner_heads, **common)
            self.word_proj = SentenceProjection(
                cfg.num_words, cfg.inner_dim, cfg.outer_dim, bias=cfg.legacy, legacy=cfg.legacy
            )
        self.outer = TransformerBlock(cfg.outer_dim, cfg.outer_heads, se_ratio=cfg.se_ratio, **common)

    def forward(self, words: torch.Tensor | None, sentences: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.inner is not None and self.word_proj is not None and words is not None:
            words = self.inner(words)  # (B*N, m, c)
            sentences = self.word_proj.add_to(sentences, words)
        return words, self.outer(sentences)


def add_to_patches(sentences: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The sentences (B, 1+N, d) with the words' update (B, N, d) added to the patches' tokens, a fresh tensor.

    In inference on the CPU the compiled kernel adds them straight into the new tensor (`residual_add`; a bf16
    update read as it is), where `cat` would copy the sum once more."""
    cls, patches = sentences.split([1, update.shape[1]], dim=1)  # (see `TNT.split_groups` on split vs slicing)
    if not (fused_attention_enabled() and residual_add_applies(patches, update)):
        return torch.cat([cls, patches + update], dim=1)
    out = torch.empty_like(sentences, memory_format=torch.contiguous_format)
    out[:, :1] = cls
    residual_add(patches, update, out=out[:, 1:])
    return out


def compiled_training(x: torch.Tensor) -> bool:
    """Training traced by torch.compile, where the blocks take the whole batch: over the groups, Inductor's code
    (torch 2.14) gives wrong gradients upstream of the split (TNT-S at batch 32 in four groups: the sentence
    embedding's norm weight 0.72 of its largest value off a float64 reference; at batch 4 in two groups 0.73 off
    eager's). The cause is AOTAutograd's: it saves the whole batch's words (the sentence embedding's input) and
    each group's slice of them as tensors of one storage and donates them all to the backward, where Inductor
    writes over a slice that the whole is still to be read from; with `torch._functorch.config.donated_buffer` off
    the groups match eager. `benchmarks/compiled_groups_check.py` shows it (check a new torch with it) and
    `benchmarks/donated_buffer_repro.py` with torch alone. The whole batch matches (`test_kernels.py`), and the
    groups gained compiled training nothing measurable with donation off (TNT-S fp32 at batch 32: 7079 ms a step
    against the whole batch's 7130, five rounds)."""
    return torch.compiler.is_compiling() and grad_recorded((x,))


# Groups of images through the blocks (`TNT.split_groups`): each group's words (B_g*N, m, c) or None, and sentences.
Groups = list[tuple[torch.Tensor | None, torch.Tensor]]


class TNT(nn.Module):
    """Transformer in Transformer; a DeiT when `cfg.tnt_blocks == ()`. Speaks timm's model API."""

    num_prefix_tokens = 1

    def __init__(self, cfg: TNTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_features = self.embed_dim = cfg.outer_dim
        self.grad_checkpointing = False
        self.cache_blocking = True
        self.pretrained_cfg: dict[str, Any] = {}

        self.word_embed: WordEmbed | None = None
        self.word_pos: nn.Parameter | None = None
        self.sentence_embed: SentenceProjection | None = None
        self.patch_embed: PatchEmbed | None = None
        if cfg.has_words:
            self.word_embed = WordEmbed(cfg)
            if cfg.word_pos:
                self.word_pos = nn.Parameter(torch.zeros(1, cfg.num_words, cfg.inner_dim))
            self.sentence_embed = SentenceProjection(cfg.num_words, cfg.inner_dim, cfg.outer_dim, bias=True)
        else:
            self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.outer_dim))
        n = cfg.grid_size[0] * cfg.grid_size[1]
        self.sentence_pos = nn.Parameter(torch.zeros(1, n + 1, cfg.outer_dim)) if cfg.sentence_pos else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)

        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()  # stochastic depth decay rule
        self.blocks = nn.ModuleList(TNTBlock(cfg, i, rates[i]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.outer_dim, eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head: nn.Module = Linear(cfg.outer_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # ---- initialisation and timm-style helpers -------------------------------------------------------------
    def init_weights(self) -> None:
        for p in (self.cls_token, self.sentence_pos, self.word_pos):
            if p is not None:
                trunc_normal_(p, std=0.02)
        self.apply(_init_module)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "sentence_pos", "word_pos"}

    def train(self, mode: bool = True) -> TNT:
        if mode:  # the inference path's packed weights would only take memory (and go stale) while training
            onednn.release(self.parameters())
        return super().train(mode)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_cache_blocking(self, enable: bool = True) -> None:
        """Run each block over cache-sized groups of images on the CPU (on by default; outputs are unchanged)."""
        self.cache_blocking = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise UserError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # ---- forward ---------------------------------------------------------------------------------------------
    def check_input(self, x: object) -> tuple[int, int]:
        """Validate an image batch and return its sentence grid (rows, columns)."""
        if not isinstance(x, torch.Tensor):
            raise UserError(f"expected a torch.Tensor image batch (B, C, H, W), got {type(x).__name__}")
        if x.ndim != 4:
            raise UserError(f"expected a 4-d image batch (B, C, H, W), got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        p = self.cfg.patch_size
        if c != self.cfg.in_chans:
            raise UserError(f"expected {self.cfg.in_chans} input channels, got {c} (shape {tuple(x.shape)})")
        if h % p or w % p or h == 0 or w == 0:
            raise UserError(f"image height and width must be positive multiples of {p}, got {h}x{w}")
        return h // p, w // p

    def resized_sentence_pos(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """Sentence position encoding for a grid; bicubic interpolation when it is not the trained one."""
        if self.sentence_pos is None or grid == self.cfg.grid_size:
            return self.sentence_pos
        return resample_abs_pos_embed(
            self.sentence_pos, new_size=list(grid), old_size=list(self.cfg.grid_size), num_prefix_tokens=1
        )

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Image -> (words (B*N, m, c) or None, sentences (B, 1+N, d)) before the first block."""
        grid = self.check_input(x)
        B = x.shape[0]
        words = None
        if self.word_embed is not None and self.sentence_embed is not None:
            words = self.word_embed(x)  # (B*N, m, c)
            if self.word_pos is not None:
                words = words + self.word_pos
            sentences = self.sentence_embed(words, B)  # (B, N, d)
        else:
            assert self.patch_embed is not None
            sentences = self.patch_embed(x)
        sentences = torch.cat([self.cls_token.expand(B, -1, -1), sentences], dim=1)  # (B, 1+N, d)
        pos = self.resized_sentence_pos(grid)
        if pos is not None:
            sentences = sentences + pos
        return words, self.pos_drop(sentences)

    def micro_batch(self, sentences: torch.Tensor) -> int:
        """Images per group (`split_groups`): all of them, or on the CPU as many as keep a block's work in cache.

        Every operation of a block acts on one image at a time, so the groups give the same result as the whole
        batch; the CPU gains because each group's activations (16 words per patch make the inner transformer's
        as large as the outer's) are reused from cache instead of memory. Kept under torch.compile in inference
        (which then specialises on the batch size); off in the explicit reference path, while a graph is exported,
        and in training under torch.compile (`compiled_training`).
        """
        B, tokens = sentences.shape[:2]
        if not (self.cache_blocking and sentences.device.type == "cpu" and fused_attention_enabled()):
            return B
        if exporting_graph() or compiled_training(sentences):  # exported: no batch size's grouping baked in
            return B
        cfg = self.cfg
        widest = tokens * cfg.outer_dim * cfg.mlp_ratio
        if cfg.has_words:
            widest = max(widest, (tokens - 1) * cfg.num_words * cfg.inner_dim * cfg.mlp_ratio)
        budget = BF16_BLOCK_BYTES if native_bf16_autocast(sentences) else CACHE_BLOCK_BYTES
        cap = max(1, int(budget // (widest * sentences.element_size())))
        groups = math.ceil(B / cap)
        return math.ceil(B / groups)

    def split_groups(self, words: torch.Tensor | None, sentences: torch.Tensor, step: int) -> Groups:
        """The embedded batch as groups of `step` images (from `micro_batch`), which stay apart through every block:
        concatenating them after each block would copy both streams once more each way (forward and backward)."""
        B = sentences.shape[0]
        if step >= B:
            return [(words, sentences)]
        # split, not slicing: its backward is one concatenation, where each slice's backward would fill a
        # zero tensor of the whole batch and autograd would add them up
        sentence_groups = sentences.split(step)
        word_groups = [None] * len(sentence_groups) if words is None else words.split(step * (words.shape[0] // B))
        return list(zip(word_groups, sentence_groups, strict=True))

    def run_block(self, block: nn.Module, groups: Groups) -> Groups:
        """One block over each group of images."""
        return [self.call_block(block, words, sentences) for words, sentences in groups]

    @staticmethod
    def sentences_of(groups: Groups) -> torch.Tensor:
        """The groups' sentences as one batch (B, 1+N, d)."""
        return groups[0][1] if len(groups) == 1 else torch.cat([sentences for _, sentences in groups])

    def call_block(
        self, block: nn.Module, words: torch.Tensor | None, sentences: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, words, sentences, use_reentrant=False)
        return block(words, sentences)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        words, sentences = self.embed(x)
        groups = self.split_groups(words, sentences, self.micro_batch(sentences))
        for block in self.blocks:
            groups = self.run_block(block, groups)
        return self.norm(self.sentences_of(groups))  # (B, 1+N, d)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Sentence tokens of chosen blocks as (B, d, grid_h, grid_w) maps.

        Args:
            indices: block indices (negative counts from the end), or an int n for the last n blocks;
                None means all blocks.
            norm: apply the final LayerNorm to each map.
            intermediates_only: return only the maps; otherwise (final features, maps).
        """
        take = _take_indices(len(self.blocks), indices)
        grid = self.check_input(x)
        words, sentences = self.embed(x)
        groups = self.split_groups(words, sentences, self.micro_batch(sentences))
        maps = []
        last = len(self.blocks) - 1 if not intermediates_only else max(take)
        for i, block in enumerate(self.blocks[: last + 1]):
            groups = self.run_block(block, groups)
            if i in take:
                sentences = self.sentences_of(groups)
                tokens = self.norm(sentences) if norm else sentences
                maps.append(tokens[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, *grid))
        if intermediates_only:
            return maps
        return self.norm(self.sentences_of(groups)), maps


def _take_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise UserError(f"cannot take the last {indices} of {depth} blocks")
        return list(range(depth - indices, depth))
    take = [i + depth if i < 0 else i for i in indices]
    bad = [i for i, t in zip(indices, take, strict=True) if not 0 <= t < depth]
    if bad:
        raise UserError(f"block indices {bad} out of range for a model of depth {depth}")
    return take


def _init_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
