"""Saving and rebuilding trained detectors and segmenters: weights plus the recipe that rebuilds the model.

A file holds `{"model": state_dict, "meta": {...}}`. `meta` names the task, the TNT variant and its overrides,
the classes and the detector's sizes, so `load_dense_model` needs nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..io import atomic_write
from ..models.checkpoint import read_checkpoint_file
from .detection import fasterrcnn_tnt
from .segmentation import TNTSegmenter


def build_dense_model(
    meta: dict[str, Any],
    *,
    pretrained_backbone: bool | str | Path | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """The model a checkpoint's `meta` describes, untrained unless `pretrained_backbone` is given.

    Args:
        backbone_kwargs: `TNTFeaturePyramid` arguments (frozen_stages, drop_path_rate, ...); by default the
            ones in `meta` (out_indices and the TNT overrides).
    """
    if backbone_kwargs is None:
        backbone_kwargs = {"out_indices": tuple(meta["out_indices"]), **meta.get("overrides", {})}
    num_classes = len(meta["class_names"])
    if meta["task"] == "detection":
        n = meta["rpn_proposals"]
        return fasterrcnn_tnt(
            meta["backbone"],
            num_classes=num_classes,
            pretrained_backbone=pretrained_backbone,
            anchor_sizes=tuple(meta["anchor_sizes"]),
            fpn_channels=meta["fpn_channels"],
            backbone_kwargs=backbone_kwargs,
            min_size=meta["min_size"],
            max_size=meta["max_size"],
            rpn_pre_nms_top_n_train=2 * n,
            rpn_pre_nms_top_n_test=2 * n,
            rpn_post_nms_top_n_train=n,
            rpn_post_nms_top_n_test=n,
        )
    if meta["task"] == "segmentation":
        return TNTSegmenter(
            meta["backbone"],
            num_classes=num_classes,
            pretrained_backbone=pretrained_backbone,
            head_channels=meta["head_channels"],
            **backbone_kwargs,
        )
    raise UserError(f"unknown task {meta['task']!r} in checkpoint meta")


def save_dense_model(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: torch.save({"model": state, "meta": meta}, tmp))


def load_dense_model(path: str | Path, task: str) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model and its meta from `save_dense_model`'s file; `task` is what the caller expects."""
    obj = read_checkpoint_file(path)
    if not isinstance(obj, dict) or "meta" not in obj or "model" not in obj:
        raise UserError(f"{path} is not a tnt detect/segment checkpoint (no 'meta' and 'model')")
    meta = obj["meta"]
    if meta.get("task") != task:
        raise UserError(f"{path} holds a {meta.get('task')} model, not a {task} model")
    model = build_dense_model(meta)
    model.load_state_dict(obj["model"])
    return model, meta
