"""Training and evaluation loops for detection (torchvision losses, COCO mAP) and segmentation (CE, mIoU)."""

from __future__ import annotations

import contextlib
import io
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .data import CocoData, coco_api
from .segmentation import confusion_matrix, iou_scores, segmentation_loss

COCO_STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


def _to(target: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in target.items()}


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip_grad: float | None, params: Any) -> None:
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"loss is {loss.item()}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        nn.utils.clip_grad_norm_(params, clip_grad)
    optimizer.step()


def train_detection_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    device: torch.device,
    *,
    clip_grad: float | None = None,
    desc: str = "train",
) -> dict[str, float]:
    """One pass of a torchvision detector in train mode; returns the mean of each loss and their sum."""
    model.train()
    sums: dict[str, float] = defaultdict(float)
    steps = 0
    bar = tqdm(loader, desc=desc, leave=False)
    for images, targets in bar:
        losses = model([im.to(device) for im in images], [_to(t, device) for t in targets])
        loss = sum(losses.values())
        _step(optimizer, loss, clip_grad, model.parameters())
        for k, v in losses.items():
            sums[k] += v.item()
        sums["loss"] += loss.item()
        steps += 1
        bar.set_postfix(loss=f"{sums['loss'] / steps:.3f}")
    return {k: v / max(steps, 1) for k, v in sums.items()}


@torch.no_grad()
def detection_losses(model: nn.Module, loader: Iterable, device: torch.device) -> dict[str, float]:
    """Mean train-mode losses without updating anything (dropout and drop path stay off for the trunk).

    torchvision detectors only return losses in train mode; the trunk has no BatchNorm, so this is the
    loss the next training step would see, used to compare before and after training.
    """
    was_training = model.training
    model.train()
    for m in model.modules():  # dropout / drop path off; the detection heads have no other train-time state
        if isinstance(m, nn.Dropout) or type(m).__name__ == "DropPath":
            m.eval()
    sums: dict[str, float] = defaultdict(float)
    steps = 0
    for images, targets in tqdm(loader, desc="loss", leave=False):
        losses = model([im.to(device) for im in images], [_to(t, device) for t in targets])
        for k, v in losses.items():
            sums[k] += v.item()
        sums["loss"] += sum(v.item() for v in losses.values())
        steps += 1
    model.train(was_training)
    return {k: v / max(steps, 1) for k, v in sums.items()}


@torch.no_grad()
def predict_detections(model: nn.Module, loader: Iterable, device: torch.device) -> list[dict[str, Any]]:
    """COCO result entries (image_id, category label, bbox xywh, score) for every image of the loader."""
    model.eval()
    results = []
    for images, targets in tqdm(loader, desc="detect", leave=False):
        outputs = model([im.to(device) for im in images])
        for out, target in zip(outputs, targets, strict=True):
            boxes = out["boxes"].cpu()
            boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
            for box, label, score in zip(boxes.tolist(), out["labels"].tolist(), out["scores"].tolist(), strict=True):
                results.append({"image_id": target["image_id"], "label": label, "bbox": box, "score": score})
    return results


def coco_map(dataset: CocoData, results: list[dict[str, Any]]) -> dict[str, float]:
    """COCO box AP (pycocotools COCOeval) of detections with contiguous labels on `dataset`."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(COCO_STATS, 0.0)
    cat_of = {label: cat for cat, label in dataset.label_of.items()}
    dets = [
        {"image_id": r["image_id"], "category_id": cat_of[r["label"]], "bbox": r["bbox"], "score": r["score"]}
        for r in results
    ]
    gt = coco_api(dataset.data)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        evaluator = COCOeval(gt, gt.loadRes(dets), iouType="bbox")
        evaluator.params.imgIds = dataset.image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a size range has no ground truth; keep that as "not measured" (nan)
    return {k: float(v) if v >= 0 else float("nan") for k, v in zip(COCO_STATS, evaluator.stats, strict=False)}


def evaluate_detection(model: nn.Module, loader: Iterable, dataset: CocoData, device: torch.device) -> dict:
    return coco_map(dataset, predict_detections(model, loader, device))


def train_segmentation_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    device: torch.device,
    *,
    clip_grad: float | None = None,
    desc: str = "train",
) -> dict[str, float]:
    """One pass of pixel cross-entropy training; returns the mean loss."""
    model.train()
    total, steps = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False)
    for images, masks in bar:
        loss = segmentation_loss(model(images.to(device)), masks.to(device))
        _step(optimizer, loss, clip_grad, model.parameters())
        total += loss.item()
        steps += 1
        bar.set_postfix(loss=f"{total / steps:.3f}")
    return {"loss": total / max(steps, 1)}


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: Iterable, num_classes: int, device: torch.device) -> dict:
    """Cross-entropy per labelled pixel, mIoU, pixel accuracy and per-class IoU over a loader."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    total = 0.0
    for images, masks in tqdm(loader, desc="evaluate", leave=False):
        logits = model(images.to(device))
        total += segmentation_loss(logits, masks.to(device), reduction="sum").item()
        confusion += confusion_matrix(logits.argmax(1).cpu(), masks, num_classes)
    # a mean over pixels, not over batches, so the result does not depend on the batch size
    return {"loss": total / max(int(confusion.sum()), 1), **iou_scores(confusion)}
