"""torchvision detectors (Faster R-CNN, Mask R-CNN, RetinaNet) on a TNT + FPN backbone, and drawing their output.

The detectors take lists of (3, H, W) images in [0, 1]; torchvision's transform resizes them (`min_size`,
`max_size`), normalises them with the TNT variant's mean and std, and pads the batch to a multiple of 32,
which the TNT backbone needs to be a multiple of 16.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.utils import draw_bounding_boxes

from ..models import get_spec
from .backbone import tnt_fpn_backbone

DEFAULT_ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one per FPN level, strides 4..64, as torchvision's R-CNNs


def _anchors(sizes: Sequence[int], scales_per_level: int = 1) -> AnchorGenerator:
    per_level = tuple(tuple(int(s * 2 ** (k / scales_per_level)) for k in range(scales_per_level)) for s in sizes)
    return AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * len(per_level))


def _common(
    backbone: str, pretrained_backbone: bool | str | Path | None, fpn_channels: int, backbone_kwargs: dict[str, Any]
) -> dict:
    spec = get_spec(backbone)
    fpn = tnt_fpn_backbone(backbone, pretrained=pretrained_backbone, fpn_channels=fpn_channels, **backbone_kwargs)
    return {
        "backbone": fpn,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
    }


def fasterrcnn_tnt(
    backbone: str = "tnt_s_patch16_224",
    num_classes: int = 91,
    pretrained_backbone: bool | str | Path | None = None,
    *,
    anchor_sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES,
    fpn_channels: int = 256,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN + FPN with a TNT backbone (paper Table 13).

    Args:
        backbone: a registered TNT variant.
        num_classes: object classes plus one for the background (torchvision's convention).
        pretrained_backbone: None, True (released ImageNet weights) or a classification checkpoint path.
        anchor_sizes: one anchor size per FPN level (strides 4, 8, 16, 32, 64); smaller for small images.
        fpn_channels: width of the FPN, the RPN and the box head's input (torchvision: 256).
        backbone_kwargs: for `TNTFeaturePyramid` (out_indices, frozen_stages, drop_path_rate, depth, ...).
        **kwargs: for torchvision's `FasterRCNN` (min_size, max_size, box_score_thresh, ...).
    """
    common = _common(backbone, pretrained_backbone, fpn_channels, backbone_kwargs or {})
    return FasterRCNN(num_classes=num_classes, rpn_anchor_generator=_anchors(anchor_sizes), **common, **kwargs)


def maskrcnn_tnt(
    backbone: str = "tnt_s_patch16_224",
    num_classes: int = 91,
    pretrained_backbone: bool | str | Path | None = None,
    *,
    anchor_sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES,
    fpn_channels: int = 256,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN + FPN with a TNT backbone; arguments as `fasterrcnn_tnt`."""
    common = _common(backbone, pretrained_backbone, fpn_channels, backbone_kwargs or {})
    return MaskRCNN(num_classes=num_classes, rpn_anchor_generator=_anchors(anchor_sizes), **common, **kwargs)


def retinanet_tnt(
    backbone: str = "tnt_s_patch16_224",
    num_classes: int = 91,
    pretrained_backbone: bool | str | Path | None = None,
    *,
    anchor_sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES,
    fpn_channels: int = 256,
    backbone_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> RetinaNet:
    """RetinaNet with a TNT + FPN backbone (three anchor scales per level); arguments as `fasterrcnn_tnt`."""
    common = _common(backbone, pretrained_backbone, fpn_channels, backbone_kwargs or {})
    return RetinaNet(num_classes=num_classes, anchor_generator=_anchors(anchor_sizes, 3), **common, **kwargs)


def draw_detections(
    image: torch.Tensor,
    detections: dict[str, torch.Tensor],
    class_names: Sequence[str],
    *,
    score_threshold: float = 0.5,
) -> torch.Tensor:
    """Boxes with "name score" labels drawn on a (3, H, W) [0, 1] image; returns a uint8 image.

    Args:
        detections: one image's output of a torchvision detector (boxes, labels, scores).
        class_names: names indexed by label (index 0 is the background).
    """
    keep = detections["scores"] >= score_threshold
    boxes, labels, scores = detections["boxes"][keep], detections["labels"][keep], detections["scores"][keep]
    text = [f"{class_names[int(c)]} {s:.2f}" for c, s in zip(labels, scores, strict=True)]
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
    if len(boxes) == 0:
        return canvas
    return draw_bounding_boxes(canvas, boxes, labels=text, colors="red", width=2)
