"""`tnt detect`: Faster R-CNN + FPN with a TNT backbone on COCO-format data (make-data, train, eval, predict)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from ..dense.checkpoint import build_dense_model, load_dense_model, save_dense_model
from ..dense.data import detection_collate, make_synthetic_coco, read_image
from ..dense.detection import DEFAULT_ANCHOR_SIZES, draw_detections
from ..dense.engine import detection_losses, evaluate_detection, train_detection_epoch
from ..io import atomic_write
from . import _dense


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", help="object detection: Faster R-CNN + FPN on a TNT backbone")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    m = actions.add_parser("make-data", help="write a synthetic COCO-format set from CIFAR-10 (train/ and val/)")
    m.add_argument("--cifar", required=True, help="CIFAR-10 ImageFolder root holding train/ and test/")
    m.add_argument("--out", required=True, help="output folder; gets train/ and val/")
    m.add_argument("--train-images", type=int, default=400)
    m.add_argument("--val-images", type=int, default=100)
    m.add_argument("--image-size", type=int, default=128)
    m.add_argument("--object-size", default="32,64", help="min,max object side in pixels")
    m.add_argument("--max-objects", type=int, default=3, help="objects per image: 0..this many")
    m.add_argument("--classes", default=None, help="comma-separated CIFAR classes (default: all ten)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=make_data)

    t = actions.add_parser("train", help="train on a COCO-format set; evaluates box mAP on --val")
    _dense.add_data_args(t, train=True)
    _dense.add_model_args(t)
    _add_detector_args(t)
    _dense.add_train_args(t)
    _dense.add_runtime_args(t)
    t.set_defaults(func=train)

    e = actions.add_parser("eval", help="COCO box mAP and losses of a trained detector")
    e.add_argument("--checkpoint", required=True, help="model.pt written by `tnt detect train`")
    _dense.add_data_args(e, train=False)
    _dense.add_runtime_args(e)
    e.set_defaults(func=evaluate)

    r = actions.add_parser("predict", help="detect objects in images and draw the boxes (PNG)")
    r.add_argument("images", nargs="+", help="image files")
    r.add_argument("--checkpoint", required=True, help="model.pt written by `tnt detect train`")
    r.add_argument("--out", default="runs/detect/predict", help="folder for <image>_boxes.png")
    r.add_argument("--score-threshold", type=float, default=0.5)
    _dense.add_runtime_args(r)
    r.set_defaults(func=predict)


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("detector")
    g.add_argument("--min-size", type=int, default=800, help="torchvision resizes the short side to this")
    g.add_argument("--max-size", type=int, default=1333, help="... and caps the long side at this")
    g.add_argument(
        "--anchor-sizes",
        default=",".join(map(str, DEFAULT_ANCHOR_SIZES)),
        help="anchor side per FPN level (strides 4..64); scale with the image size",
    )
    g.add_argument("--fpn-channels", type=int, default=256, help="width of the FPN, RPN and box head input")
    g.add_argument(
        "--rpn-proposals",
        type=int,
        default=1000,
        help="proposals kept per image after NMS (before NMS: twice as many); fewer for small images",
    )


def make_data(args: argparse.Namespace) -> int:
    root, out = Path(args.cifar), Path(args.out)
    common = {
        "image_size": args.image_size,
        "objects_per_image": (0, args.max_objects),
        "object_size": tuple(_dense.parse_ints(args.object_size, "--object-size")),
        "classes": args.classes.split(",") if args.classes else None,
    }
    for split, source, n, seed in (
        ("train", "train", args.train_images, args.seed),
        ("val", "test", args.val_images, args.seed + 1),
    ):
        make_synthetic_coco(root / source, out / split, num_images=n, seed=seed, **common)
        print(f"{out / split}: {n} images from {root / source}")
    return 0


def train(args: argparse.Namespace) -> int:
    device = _dense.setup(args)
    out = Path(args.out or "runs/detect")
    train_set, val_set = _dense.datasets(args, "detection", train=True)
    assert train_set is not None
    kwargs = _dense.backbone_kwargs(args)
    meta = {
        "task": "detection",
        "backbone": args.model,
        "overrides": _dense.parse_overrides(args.override),
        "out_indices": list(kwargs["out_indices"]),
        "class_names": train_set.class_names,
        "anchor_sizes": list(_dense.parse_ints(args.anchor_sizes, "--anchor-sizes")),
        "min_size": args.min_size,
        "max_size": args.max_size,
        "rpn_proposals": args.rpn_proposals,
        "fpn_channels": args.fpn_channels,
    }
    model = build_dense_model(meta, pretrained_backbone=args.pretrained_backbone, backbone_kwargs=kwargs).to(device)
    train_loader = _dense.loader(train_set, args.batch_size, detection_collate, shuffle=True, workers=args.workers)
    val_loader = _dense.loader(val_set, args.batch_size, detection_collate, shuffle=False, workers=args.workers)
    optimizer, schedule = _dense.optimizer_and_schedule(model, args)
    _dense.write_json(out / "config.json", _dense.resolved_config(args, meta))

    def measure(tag: str) -> dict:
        torch.manual_seed(args.seed)  # the RPN / ROI samplers draw at random: same draws before and after
        result = {"val_loss": detection_losses(model, val_loader, device)["loss"]}
        result |= evaluate_detection(model, val_loader, val_set, device)
        print(f"{tag}: {_dense.fmt(result)}")
        return result

    metrics: dict = {"epochs": []}
    if args.eval_untrained:
        metrics["untrained"] = measure("untrained")
    for epoch in range(1, args.epochs + 1):
        stats = train_detection_epoch(
            model, optimizer, train_loader, device, clip_grad=args.clip_grad, desc=f"epoch {epoch}"
        )
        schedule.step()
        metrics["epochs"].append({"epoch": epoch, **stats})
        print(f"epoch {epoch}/{args.epochs}: train {_dense.fmt(stats)}")
    metrics["trained"] = measure("trained")
    save_dense_model(out / "model.pt", model, meta)
    _dense.write_json(out / "metrics.json", metrics)
    print(f"wrote {out / 'model.pt'} and {out / 'metrics.json'}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    device = _dense.setup(args)
    model, meta = load_dense_model(args.checkpoint, "detection")
    _, val_set = _dense.datasets(args, "detection", train=False)
    _dense.check_same_classes(meta["class_names"], val_set.class_names)
    model.to(device)
    val_loader = _dense.loader(val_set, args.batch_size, detection_collate, shuffle=False, workers=args.workers)
    torch.manual_seed(0)
    result = {"val_loss": detection_losses(model, val_loader, device)["loss"]}
    result |= evaluate_detection(model, val_loader, val_set, device)
    print(_dense.fmt(result))
    return 0


def predict(args: argparse.Namespace) -> int:
    device = _dense.setup(args)
    model, meta = load_dense_model(args.checkpoint, "detection")
    model.to(device).eval()
    out = Path(args.out)
    for name in args.images:
        path = Path(name)
        image = read_image(path)
        with torch.no_grad():
            (det,) = model([image.to(device)])
        det = {k: v.cpu() for k, v in det.items()}
        drawn = draw_detections(image, det, meta["class_names"], score_threshold=args.score_threshold)
        dst = out / f"{path.stem}_boxes.png"
        atomic_write(dst, lambda tmp, im=drawn: Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp, format="PNG"))
        keep = det["scores"] >= args.score_threshold
        found = [
            f"{meta['class_names'][int(c)]} {s:.2f} [{', '.join(f'{v:.0f}' for v in b)}]"
            for b, c, s in zip(det["boxes"][keep].tolist(), det["labels"][keep], det["scores"][keep], strict=True)
        ]
        print(f"{path} -> {dst}: {len(found)} object(s){': ' if found else ''}{'; '.join(found)}")
    return 0
