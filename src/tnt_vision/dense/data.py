"""COCO-format data for detection and segmentation, and a synthetic COCO-format set built from CIFAR-10.

A data set is a folder with `annotations.json` (COCO instances: images, annotations with `bbox` [x, y, w, h]
and optional `segmentation` polygons or RLE, categories) and the image files it names. Detection reads boxes
and labels; semantic segmentation paints each instance's mask with its category (0 is background, crowd
regions are ignored).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from ..errors import UserError
from ..io import atomic_write

ANNOTATIONS = "annotations.json"
IGNORE_INDEX = 255


class AnnotationError(UserError):
    """A COCO annotation file that cannot be read or has a malformed entry."""


# ---- reading and checking COCO files ------------------------------------------------------------------------------
def _require(ok: bool, path: Path, where: str, problem: str, entry: Any) -> None:
    if not ok:
        shown = json.dumps(entry)[:200] if not isinstance(entry, str) else entry
        raise AnnotationError(f"{path}: {where}: {problem} (entry: {shown})")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def read_coco(path: str | Path) -> dict[str, Any]:
    """Load and check a COCO instances file; errors name the file and the offending entry."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not valid JSON: {e}") from None
    _require(isinstance(data, dict), path, "top level", "must be an object", type(data).__name__)
    for key in ("images", "annotations", "categories"):
        _require(isinstance(data.get(key), list), path, key, "missing or not a list", key)
    categories = {}
    for i, c in enumerate(data["categories"]):
        ok = isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)
        _require(ok, path, f"categories[{i}]", "needs an integer 'id' and a string 'name'", c)
        _require(c["id"] not in categories, path, f"categories[{i}]", "duplicate category id", c)
        categories[c["id"]] = c
    images = {}
    for i, im in enumerate(data["images"]):
        ok = isinstance(im, dict) and isinstance(im.get("id"), int) and isinstance(im.get("file_name"), str)
        ok = ok and all(isinstance(im.get(k), int) and im[k] > 0 for k in ("width", "height"))
        _require(ok, path, f"images[{i}]", "needs an integer 'id', 'file_name', positive 'width' and 'height'", im)
        _require(im["id"] not in images, path, f"images[{i}]", "duplicate image id", im)
        images[im["id"]] = im
    for i, a in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        _require(isinstance(a, dict) and isinstance(a.get("id"), int), path, where, "needs an integer 'id'", a)
        _require(a.get("image_id") in images, path, where, "'image_id' names no image", a)
        _require(a.get("category_id") in categories, path, where, "'category_id' names no category", a)
        box = a.get("bbox")
        ok = isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)
        _require(ok and box[2] > 0 and box[3] > 0, path, where, "'bbox' must be [x, y, w, h] with w, h > 0", a)
        seg = a.get("segmentation")
        ok = seg is None or (isinstance(seg, dict) and "counts" in seg and "size" in seg)
        ok = ok or (isinstance(seg, list) and all(isinstance(p, list) and len(p) >= 6 for p in seg))
        _require(ok, path, where, "'segmentation' must be polygons [[x, y, ...]] or RLE {size, counts}", a)
    return data


def coco_api(data: dict[str, Any]) -> Any:
    """A pycocotools `COCO` index over already-loaded annotations (quietly: it prints progress)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as a (3, H, W) float tensor in [0, 1]."""
    try:
        image = Image.open(path).convert("RGB")
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return pil_to_tensor(image).float() / 255


class CocoData(Dataset):
    """Images of a COCO-format folder as [0, 1] tensors with detection or segmentation targets.

    Labels are contiguous: category `categories[k - 1]` has label k, label 0 is the background.

    Args:
        annotations: a COCO instances JSON file, or a folder holding `annotations.json`.
        image_root: folder the images' `file_name`s are relative to (default: the JSON file's folder).
        task: "detection" (target: boxes xyxy, labels, image_id, and masks if `masks`) or
            "segmentation" (target: a (H, W) long mask of labels, 255 where ignored).
    """

    def __init__(
        self,
        annotations: str | Path,
        image_root: str | Path | None = None,
        *,
        task: str = "detection",
        masks: bool = False,
    ) -> None:
        if task not in ("detection", "segmentation"):
            raise ValueError(f"task must be 'detection' or 'segmentation', got {task!r}")
        path = Path(annotations)
        path = path / ANNOTATIONS if path.is_dir() else path
        self.root = Path(image_root) if image_root is not None else path.parent
        self.task, self.masks = task, masks
        self.data = read_coco(path)
        self.coco = coco_api(self.data)
        self.image_ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.label_of = {c: k + 1 for k, c in enumerate(self.cat_ids)}
        self.class_names = ["background", *(self.coco.cats[c]["name"] for c in self.cat_ids)]

    @property
    def num_classes(self) -> int:
        """Object classes plus the background."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, image_id: int) -> torch.Tensor:
        return read_image(self.root / self.coco.imgs[image_id]["file_name"])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image_id = self.image_ids[index]
        image = self.load_image(image_id)
        anns = self.coco.imgToAnns.get(image_id, [])
        if self.task == "segmentation":
            return image, self.semantic_mask(image_id, anns)
        boxes = torch.tensor([a["bbox"] for a in anns if not a.get("iscrowd")], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns if not a.get("iscrowd")]).long(),
            "image_id": image_id,
        }
        if self.masks:
            h, w = image.shape[-2:]
            masks = [torch.from_numpy(self.coco.annToMask(a)) for a in anns if not a.get("iscrowd")]
            target["masks"] = torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8)
        return image, target

    def semantic_mask(self, image_id: int, anns: Sequence[dict[str, Any]]) -> torch.Tensor:
        info = self.coco.imgs[image_id]
        mask = np.zeros((info["height"], info["width"]), dtype=np.int64)
        for a in anns:
            if a.get("segmentation") is None:
                continue
            m = self.coco.annToMask(a).astype(bool)
            mask[m] = IGNORE_INDEX if a.get("iscrowd") else self.label_of[a["category_id"]]
        return torch.from_numpy(mask)


def detection_collate(batch: Sequence[tuple[torch.Tensor, Any]]) -> tuple[list[torch.Tensor], list[Any]]:
    """torchvision detectors take lists of images and targets of varying sizes."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def segmentation_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images and masks, padding to the largest (images with 0, masks with the ignore index)."""
    h = max(im.shape[-2] for im, _ in batch)
    w = max(im.shape[-1] for im, _ in batch)
    images = torch.zeros(len(batch), 3, h, w)
    masks = torch.full((len(batch), h, w), IGNORE_INDEX, dtype=torch.long)
    for i, (im, m) in enumerate(batch):
        images[i, :, : im.shape[-2], : im.shape[-1]] = im
        masks[i, : m.shape[-2], : m.shape[-1]] = m
    return images, masks


# ---- synthetic data from CIFAR-10 ---------------------------------------------------------------------------------
def _background(rng: random.Random, size: int) -> Image.Image:
    """A smooth colour field with mild noise: textured, but unlike any CIFAR object."""
    coarse = np.array([[[rng.randrange(256) for _ in range(3)] for _ in range(4)] for _ in range(4)], dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)


def _place(rng: random.Random, size: int, side: int, taken: list[tuple[int, int, int, int]]) -> tuple[int, int] | None:
    """A top-left corner for a side x side object that overlaps no earlier one (None after 50 tries)."""
    for _ in range(50):
        x, y = rng.randrange(size - side + 1), rng.randrange(size - side + 1)
        if all(x + side <= a or a + s <= x or y + side <= b or b + s <= y for a, b, s, _ in taken):
            return x, y
    return None


def make_synthetic_coco(
    cifar_root: str | Path,
    out_dir: str | Path,
    *,
    num_images: int = 200,
    image_size: int = 128,
    objects_per_image: tuple[int, int] = (0, 3),
    object_size: tuple[int, int] = (32, 64),
    classes: Sequence[str] | None = None,
    seed: int = 0,
) -> Path:
    """Write a COCO-format detection/segmentation set: CIFAR images pasted as ellipses onto plain backgrounds.

    Each object is a CIFAR-10 image resized to a random side, cut to the inscribed ellipse (its instance mask)
    and pasted where it overlaps no other object; its box is the mask's tight box. Images may hold no object.

    Args:
        cifar_root: an ImageFolder split, e.g. `.../cifar10/train` (one folder per class).
        out_dir: receives `annotations.json` and `images/`.
        objects_per_image: inclusive range of the number of objects.
        object_size: inclusive range of object sides in pixels.
        classes: class folder names to use (default: all).
    """
    from pycocotools import mask as mask_utils

    cifar_root, out_dir = Path(cifar_root), Path(out_dir)
    folders = sorted(p for p in cifar_root.iterdir() if p.is_dir()) if cifar_root.is_dir() else []
    if classes is not None:
        missing = sorted(set(classes) - {p.name for p in folders})
        if missing:
            raise UserError(f"{cifar_root} has no class folder(s) {', '.join(missing)}")
        folders = [p for p in folders if p.name in classes]
    files = {p.name: sorted(p.glob("*.*")) for p in folders}
    if not files or not all(files.values()):
        raise UserError(f"{cifar_root} is not an image folder with one non-empty sub-folder per class")
    lo, hi = object_size
    if not 0 < lo <= hi <= image_size:
        raise UserError(f"object sizes {object_size} must lie within 1..{image_size}")
    rng = random.Random(seed)
    names = sorted(files)
    coco: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
    }
    for image_id in tqdm(range(1, num_images + 1), desc="synthetic images", leave=False):
        canvas = _background(rng, image_size)
        taken: list[tuple[int, int, int, int]] = []
        for _ in range(rng.randint(*objects_per_image)):
            side = rng.randint(lo, hi)
            corner = _place(rng, image_size, side, taken)
            if corner is None:
                continue
            k = rng.randrange(len(names))
            obj = Image.open(rng.choice(files[names[k]])).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
            ellipse = Image.new("L", (side, side))
            ImageDraw.Draw(ellipse).ellipse((0, 0, side - 1, side - 1), fill=255)
            canvas.paste(obj, corner, ellipse)
            full = Image.new("L", (image_size, image_size))
            full.paste(ellipse, corner)
            mask = np.asfortranarray((np.asarray(full) > 0).astype(np.uint8))
            rle = mask_utils.encode(mask)
            rle["counts"] = rle["counts"].decode("ascii")
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": k + 1,
                    "bbox": [x, y, w, h],
                    "area": float(mask.sum()),
                    "segmentation": rle,
                    "iscrowd": 0,
                }
            )
            taken.append((*corner, side, k))
        file_name = f"images/{image_id:06d}.png"
        atomic_write(out_dir / file_name, lambda tmp, im=canvas: im.save(tmp, format="PNG"))
        coco["images"].append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
    atomic_write(out_dir / ANNOTATIONS, lambda tmp: tmp.write_text(json.dumps(coco)))
    return out_dir
