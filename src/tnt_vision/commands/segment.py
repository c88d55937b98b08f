"""`tnt segment`: semantic segmentation (TNT pyramid + semantic-FPN head) on COCO-format data.

Masks come from the instance annotations (each painted with its category, 0 = background); the synthetic
set of `tnt detect make-data` serves both tasks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..dense.checkpoint import build_dense_model, load_dense_model, save_dense_model
from ..dense.data import read_image, segmentation_collate
from ..dense.engine import evaluate_segmentation, train_segmentation_epoch
from ..io import atomic_write
from . import _dense


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="semantic segmentation: semantic-FPN head on a TNT pyramid")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    t = actions.add_parser("train", help="train with pixel cross-entropy; evaluates mIoU on --val")
    _dense.add_data_args(t, train=True)
    _dense.add_model_args(t)
    t.add_argument("--head-channels", type=int, default=128, help="width of the semantic-FPN head")
    _dense.add_train_args(t)
    _dense.add_runtime_args(t)
    t.set_defaults(func=train)

    e = actions.add_parser("eval", help="mIoU, pixel accuracy and loss of a trained segmenter")
    e.add_argument("--checkpoint", required=True, help="model.pt written by `tnt segment train`")
    _dense.add_data_args(e, train=False)
    _dense.add_runtime_args(e)
    e.set_defaults(func=evaluate)

    r = actions.add_parser("predict", help="predict label masks and save them as palette PNGs")
    r.add_argument("images", nargs="+", help="image files")
    r.add_argument("--checkpoint", required=True, help="model.pt written by `tnt segment train`")
    r.add_argument("--out", default="runs/segment/predict", help="folder for <image>_mask.png")
    _dense.add_runtime_args(r)
    r.set_defaults(func=predict)


def _report(tag: str, result: dict) -> None:
    print(f"{tag}: loss {result['loss']:.4f}, mIoU {result['miou']:.4f}, pixel acc {result['pixel_acc']:.4f}")


def train(args: argparse.Namespace) -> int:
    device = _dense.setup(args)
    out = Path(args.out or "runs/segment")
    train_set, val_set = _dense.datasets(args, "segmentation", train=True)
    assert train_set is not None
    kwargs = _dense.backbone_kwargs(args)
    meta = {
        "task": "segmentation",
        "backbone": args.model,
        "overrides": _dense.parse_overrides(args.override),
        "out_indices": list(kwargs["out_indices"]),
        "class_names": train_set.class_names,
        "head_channels": args.head_channels,
    }
    model = build_dense_model(meta, pretrained_backbone=args.pretrained_backbone, backbone_kwargs=kwargs).to(device)
    train_loader = _dense.loader(train_set, args.batch_size, segmentation_collate, shuffle=True, workers=args.workers)
    val_loader = _dense.loader(val_set, args.batch_size, segmentation_collate, shuffle=False, workers=args.workers)
    optimizer, schedule = _dense.optimizer_and_schedule(model, args)
    _dense.write_json(out / "config.json", _dense.resolved_config(args, meta))

    metrics: dict = {"epochs": []}
    if args.eval_untrained:
        metrics["untrained"] = evaluate_segmentation(model, val_loader, train_set.num_classes, device)
        _report("untrained", metrics["untrained"])
    for epoch in range(1, args.epochs + 1):
        stats = train_segmentation_epoch(
            model, optimizer, train_loader, device, clip_grad=args.clip_grad, desc=f"epoch {epoch}"
        )
        schedule.step()
        metrics["epochs"].append({"epoch": epoch, **stats})
        print(f"epoch {epoch}/{args.epochs}: train loss {stats['loss']:.4f}")
    metrics["trained"] = evaluate_segmentation(model, val_loader, train_set.num_classes, device)
    _report("trained", metrics["trained"])
    save_dense_model(out / "model.pt", model, meta)
    _dense.write_json(out / "metrics.json", metrics)
    print(f"wrote {out / 'model.pt'} and {out / 'metrics.json'}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    device = _dense.setup(args)
    model, meta = load_dense_model(args.checkpoint, "segmentation")
    _, val_set = _dense.datasets(args, "segmentation", train=False)
    _dense.check_same_classes(meta["class_names"], val_set.class_names)
    val_loader = _dense.loader(val_set, args.batch_size, segmentation_collate, shuffle=False, workers=args.workers)
    result = evaluate_segmentation(model.to(device), val_loader, val_set.num_classes, device)
    _report("eval", result)
    names = meta["class_names"]
    print("per-class IoU: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, result["iou"], strict=True)))
    return 0


def _palette(num_classes: int) -> list[int]:
    """Background black, classes in distinct matplotlib tab20 colours."""
    from matplotlib import colormaps

    colours = [(0, 0, 0)] + [
        tuple(int(255 * c) for c in colormaps["tab20"](k % 20)[:3]) for k in range(num_classes - 1)
    ]
    return [v for rgb in colours for v in rgb]


def predict(args: argparse.Namespace) -> int:
    device = _dense.setup(args)
    model, meta = load_dense_model(args.checkpoint, "segmentation")
    model.to(device).eval()
    names = meta["class_names"]
    out = Path(args.out)
    for name in args.images:
        path = Path(name)
        image = read_image(path)
        with torch.no_grad():
            labels = model(image[None].to(device)).argmax(1)[0].cpu().numpy().astype(np.uint8)
        mask = Image.fromarray(labels)  # mode L; putpalette turns it into P, keeping the indices
        mask.putpalette(_palette(len(names)))
        dst = out / f"{path.stem}_mask.png"
        atomic_write(dst, lambda tmp, im=mask: im.save(tmp, format="PNG"))
        counts = np.bincount(labels.ravel(), minlength=len(names))
        found = ", ".join(f"{names[k]} {c / labels.size:.1%}" for k, c in enumerate(counts) if c and k)
        print(f"{path} -> {dst} (pixel value = class index): {found or 'background only'}")
    return 0
