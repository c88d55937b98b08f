"""TNT as a dense-prediction backbone: a multi-scale pyramid (paper appendix A.3) and a single-scale map (DETR).

A TNT keeps one resolution, stride 16, in every block. Faster R-CNN + FPN (paper Table 13) takes the sentence
tokens of blocks 3, 6, 9 and 12 and resamples them to strides 4, 8, 16 and 32 with transposed convolutions,
an identity and a strided convolution (the "simple feature pyramid" of BEiT / ViTDet). DETR (Table 10) takes
the last block's stride-16 map pooled 2x2 to stride 32.

Inputs may have any height and width, varying from batch to batch: the trunk interpolates its sentence
position encoding to the grid, and sides that are not a multiple of 16 are zero-padded at the bottom and
right, so a map covers ceil(H / 16) * 16 rows of the image (the padding is in whatever space the input is,
e.g. normalised pixels).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from ..models import TNT, create_model, get_spec, load_checkpoint
from ..models.checkpoint import download_weights

PYRAMID_STRIDES = (4, 8, 16, 32)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad a (B, C, H, W) batch at the bottom and right so that H and W are multiples of `multiple`."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def build_trunk(
    model_name: str,
    *,
    pretrained: bool | str | Path | None = None,
    **overrides: Any,
) -> TNT:
    """A registered TNT without its classifier, with classification weights loaded where asked.

    Args:
        pretrained: None/False (random), True (the variant's released ImageNet weights) or a checkpoint path in
            any format `tnt_vision.load_checkpoint` reads; the classifier in the file is ignored.
        **overrides: `TNTConfig` fields, e.g. `img_size` (the resolution the position encoding is stored at),
            `depth`, `drop_path_rate`.
    """
    trunk = create_model(model_name, num_classes=0, **overrides)
    if pretrained:
        path = download_weights(get_spec(model_name)) if pretrained is True else Path(pretrained)
        load_checkpoint(trunk, path, ignore_head=True)
    return trunk


class _TNTBackbone(nn.Module):
    """Shared trunk handling: building, loading, padding, frozen stages and gradient checkpointing."""

    def __init__(
        self,
        model_name: str,
        indices: Sequence[int],
        *,
        pretrained: bool | str | Path | None,
        frozen_stages: int,
        grad_checkpointing: bool,
        drop_path_rate: float,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self.trunk = build_trunk(model_name, pretrained=pretrained, drop_path_rate=drop_path_rate, **overrides)
        depth = len(self.trunk.blocks)
        self.indices = [i + depth if i < 0 else i for i in indices]
        bad = [i for i in self.indices if not 0 <= i < depth]
        if bad:
            raise ValueError(f"block indices {list(indices)} out of range for {model_name} of depth {depth}")
        if not -1 <= frozen_stages <= depth:
            raise ValueError(f"frozen_stages must lie in -1..{depth}, got {frozen_stages}")
        self.patch_size = self.trunk.cfg.patch_size
        self.embed_dim = self.trunk.embed_dim
        self.frozen_stages = frozen_stages
        self.trunk.set_grad_checkpointing(grad_checkpointing)
        self._freeze()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def _frozen_modules(self) -> list[nn.Module]:
        """frozen_stages = k: nothing for -1, the embeddings for 0, the embeddings and blocks 1..k for k > 0."""
        if self.frozen_stages < 0:
            return []
        t = self.trunk
        embeds = [m for m in (t.word_embed, t.sentence_embed, t.patch_embed) if m is not None]
        return embeds + list(t.blocks[: self.frozen_stages])

    def _freeze(self) -> None:
        if self.frozen_stages < 0:
            return
        for p in (self.trunk.cls_token, self.trunk.sentence_pos, self.trunk.word_pos):
            if p is not None:
                p.requires_grad_(False)
        for module in self._frozen_modules():
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> _TNTBackbone:
        super().train(mode)
        for module in self._frozen_modules():  # frozen stages run without dropout / drop path
            module.eval()
        return self

    def block_maps(self, x: torch.Tensor, *, norm: bool) -> list[torch.Tensor]:
        """Sentence tokens of the chosen blocks as (B, d, ceil(H/16), ceil(W/16)) maps, in `indices` order."""
        x = pad_to_multiple(x, self.patch_size)
        # The trunk yields one map per distinct block, in block order; indices may repeat or be unsorted.
        blocks = sorted(set(self.indices))
        maps = self.trunk.forward_intermediates(x, blocks, norm=norm, intermediates_only=True)
        by_block = dict(zip(blocks, maps, strict=True))
        return [by_block[i] for i in self.indices]


def _neck(dim: int, stride: int) -> nn.Sequential:
    """Stride-16 map -> map at `stride` (appendix A.3), each ending in a LayerNorm over channels."""
    if stride == 4:
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            LayerNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        ]
    elif stride == 8:
        layers = [nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)]
    elif stride == 16:
        layers = []
    elif stride == 32:
        layers = [nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1)]
    else:
        raise ValueError(f"no neck for stride {stride}")
    return nn.Sequential(*layers, LayerNorm2d(dim))


class TNTFeaturePyramid(_TNTBackbone):
    """TNT trunk + necks: an ordered dict of maps at strides 4, 8, 16 and 32, keyed "0".."3" as torchvision's.

    The norm is a LayerNorm over channels (as ViTDet) rather than BatchNorm, so it behaves the same for
    detection's batches of one or two images. `out_channels` is the trunk width d, the same at every level.

    Args:
        model_name: a registered variant, e.g. "tnt_s_patch16_224".
        out_indices: 0-based blocks whose tokens feed strides 4, 8, 16 and 32 (the paper: blocks 3, 6, 9, 12).
        pretrained: None, True (released ImageNet weights) or a classification checkpoint path.
        frozen_stages: -1 trains everything; 0 freezes the embeddings; k freezes them and blocks 1..k.
        grad_checkpointing: recompute each block in backward to save activation memory.
        drop_path_rate: stochastic depth of the trunk (linearly increasing over the blocks).
        **overrides: further `TNTConfig` fields, e.g. `depth=4` or `img_size=512` (the size the sentence
            position encoding is stored at; other sizes are interpolated from it).
    """

    strides = PYRAMID_STRIDES

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int] = (2, 5, 8, 11),
        *,
        pretrained: bool | str | Path | None = None,
        frozen_stages: int = -1,
        grad_checkpointing: bool = False,
        drop_path_rate: float = 0.0,
        **overrides: Any,
    ) -> None:
        if len(out_indices) != len(PYRAMID_STRIDES):
            raise ValueError(f"out_indices needs one block per stride {PYRAMID_STRIDES}, got {tuple(out_indices)}")
        super().__init__(
            model_name,
            out_indices,
            pretrained=pretrained,
            frozen_stages=frozen_stages,
            grad_checkpointing=grad_checkpointing,
            drop_path_rate=drop_path_rate,
            **overrides,
        )
        # Blocks after the last tapped one and the classification norm would get no gradient: drop them.
        del self.trunk.blocks[max(self.indices) + 1 :]
        self.trunk.norm = nn.Identity()
        self.out_channels = self.embed_dim
        self.necks = nn.ModuleList(_neck(self.embed_dim, s) for s in PYRAMID_STRIDES)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.block_maps(x, norm=False)
        return OrderedDict((str(i), neck(m)) for i, (neck, m) in enumerate(zip(self.necks, maps, strict=True)))


class TNTSingleScale(_TNTBackbone):
    """One stride-32 map for DETR-style heads: the last block's normed stride-16 map, 2x2 average pooled.

    Returns a (B, d, ceil(H/16) // 2, ceil(W/16) // 2) tensor; `out_channels` is d and `stride` 32.
    Arguments as `TNTFeaturePyramid`, with `out_index` the one block to take (default: the last).
    """

    stride = 32

    def __init__(
        self,
        model_name: str,
        out_index: int = -1,
        *,
        pretrained: bool | str | Path | None = None,
        frozen_stages: int = -1,
        grad_checkpointing: bool = False,
        drop_path_rate: float = 0.0,
        **overrides: Any,
    ) -> None:
        super().__init__(
            model_name,
            [out_index],
            pretrained=pretrained,
            frozen_stages=frozen_stages,
            grad_checkpointing=grad_checkpointing,
            drop_path_rate=drop_path_rate,
            **overrides,
        )
        del self.trunk.blocks[self.indices[0] + 1 :]
        self.out_channels = self.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (features,) = self.block_maps(x, norm=True)
        return F.avg_pool2d(features, kernel_size=2, stride=2)


class TNTWithFPN(nn.Module):
    """`TNTFeaturePyramid` + torchvision's `FeaturePyramidNetwork`: the `backbone` of FasterRCNN, MaskRCNN,
    RetinaNet. Returns maps "0".."3" (strides 4..32) and "pool" (stride 64), each with `out_channels`.

    The role torchvision's `BackboneWithFPN` plays for ResNets, whose layer-name wiring a TNT cannot use.
    """

    def __init__(self, body: TNTFeaturePyramid, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=[body.out_channels] * len(body.strides),
            out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def tnt_fpn_backbone(
    model_name: str = "tnt_s_patch16_224",
    *,
    pretrained: bool | str | Path | None = None,
    fpn_channels: int = 256,
    **pyramid_kwargs: Any,
) -> TNTWithFPN:
    """A TNT feature pyramid with an FPN on top; `pyramid_kwargs` go to `TNTFeaturePyramid`."""
    return TNTWithFPN(TNTFeaturePyramid(model_name, pretrained=pretrained, **pyramid_kwargs), fpn_channels)
