"""Semantic segmentation on the TNT pyramid: a semantic-FPN head (Kirillov et al., 2019) and mIoU.

The paper's ADE20K result (Table 11) uses a Trans2Seg head; a semantic-FPN head is the simpler standard
head for a multi-scale backbone. It brings every pyramid level to stride 4 with conv-GroupNorm-ReLU-upsample
stages, sums them, predicts per-pixel logits and upsamples them to the input size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import get_spec
from .backbone import TNTFeaturePyramid
from .data import IGNORE_INDEX


def _conv_gn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(32, cout), cout), nn.ReLU())


class SemanticFPNHead(nn.Module):
    """Pyramid maps at strides 4 * 2**k -> (B, num_classes, H/4, W/4) logits.

    Args:
        in_channels: channels of every pyramid level.
        num_levels: number of levels, the first at stride 4.
        channels: width of the head.
    """

    def __init__(self, in_channels: int, num_classes: int, *, num_levels: int = 4, channels: int = 128) -> None:
        super().__init__()
        self.scales = nn.ModuleList()
        for level in range(num_levels):
            stages: list[nn.Module] = [_conv_gn_relu(in_channels, channels)]
            for k in range(level):  # level k needs k doublings to reach stride 4
                if k > 0:
                    stages.append(_conv_gn_relu(channels, channels))
                stages.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scales.append(nn.Sequential(*stages))
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        # A level whose size was rounded up on the way down (odd sides) is cropped back to stride 4's grid.
        x = sum(scale(m)[..., : size[0], : size[1]] for scale, m in zip(self.scales, maps, strict=True))
        return self.classifier(x)


class TNTSegmenter(nn.Module):
    """TNT pyramid + semantic-FPN head: [0, 1] images (B, 3, H, W) -> logits (B, num_classes, H, W).

    Normalisation with the variant's mean and std happens inside, as torchvision's detectors do.

    Args:
        backbone: a registered TNT variant.
        num_classes: classes including the background.
        pretrained_backbone: None, True or a classification checkpoint path.
        head_channels: width of the semantic-FPN head.
        **backbone_kwargs: for `TNTFeaturePyramid` (out_indices, frozen_stages, depth, ...).
    """

    def __init__(
        self,
        backbone: str = "tnt_s_patch16_224",
        num_classes: int = 150,
        pretrained_backbone: bool | str | Path | None = None,
        *,
        head_channels: int = 128,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        spec = get_spec(backbone)
        self.backbone = TNTFeaturePyramid(backbone, pretrained=pretrained_backbone, **backbone_kwargs)
        self.head = SemanticFPNHead(
            self.backbone.out_channels, num_classes, num_levels=len(self.backbone.strides), channels=head_channels
        )
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        maps = list(self.backbone((images - self.mean) / self.std).values())
        logits = self.head(maps)  # (B, K, ceil(H/16)*4, ceil(W/16)*4): padded input
        logits = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Pixel cross-entropy, ignoring pixels labelled 255."""
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction=reduction)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted; ignored pixels skipped."""
    keep = target != IGNORE_INDEX
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_scores(confusion: torch.Tensor) -> dict[str, Any]:
    """Per-class IoU, mIoU over the classes that occur (in truth or prediction) and pixel accuracy."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return {
        "miou": iou[present].mean().item() if present.any() else float("nan"),
        "pixel_acc": (tp.sum() / confusion.sum().clamp(min=1)).item(),
        "iou": iou.tolist(),
    }
