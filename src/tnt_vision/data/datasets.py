"""Datasets behind `--data SPEC`: built-in digits, ImageFolder trees and torchvision's readers.

Every dataset here yields raw `(PIL image, label)` pairs; `SampleSet` applies the transform, gives each sample
its own random seed (so augmentation does not depend on worker count or on where a resumed run restarts) and
turns an unreadable image into a skipped sample instead of a crash.
"""

from __future__ import annotations

import random
import urllib.error
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, Dataset, Sampler, default_collate

from ..errors import UserError

# Exceptions that mean "this one image is broken", not "the program is broken".
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError)
KINDS = ("digits", "imagefolder", "cifar10", "cifar100", "flowers102", "pets")


@dataclass
class DataSplits:
    """The train and evaluation sets of one `--data SPEC`, with class names in label order."""

    train: Dataset
    val: Dataset
    classes: list[str]
    spec: str


# ---- digits ------------------------------------------------------------------------------------------------------
class DigitsDataset(Dataset):
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as RGB PIL images of 8x8 pixels.

    The split is fixed and independent of any seed: samples whose index is a multiple of 5 form the test set
    (360 images), the other 1,437 the training set. Upscaling is the transform's job (bicubic resize).
    """

    def __init__(self, train: bool) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        keep = np.arange(len(digits.target)) % 5 != 0 if train else np.arange(len(digits.target)) % 5 == 0
        self.images = (digits.images[keep] * (255.0 / 16.0)).round().astype(np.uint8)  # (n, 8, 8)
        self.targets = digits.target[keep].tolist()
        self.classes = [str(d) for d in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index], mode="L").convert("RGB"), self.targets[index]


# ---- folders and torchvision readers -----------------------------------------------------------------------------
def _image_folder(root: Path, split: str) -> Dataset:
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(root), loader=_load_rgb, allow_empty=False)
    except FileNotFoundError as e:
        raise UserError(f"{split} folder {root} has no class folders with images ({e})") from None


def _load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def _folder_splits(root: Path) -> tuple[Dataset, Dataset]:
    train_dir = root / "train"
    val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or val_dir is None:
        raise UserError(f"{root} must contain train/ and val/ (or test/) folders of class sub-folders")
    train, val = _image_folder(train_dir, "train"), _image_folder(val_dir, "val")
    if train.classes != val.classes:
        raise UserError(f"train/ and {val_dir.name}/ of {root} have different class folders")
    return train, val


def _torchvision_splits(kind: str, root: Path, download: bool) -> tuple[Dataset, Dataset]:
    from torchvision import datasets as tvd

    def make(split: str) -> Dataset:
        if kind in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
            return cls(str(root), train=split == "train", download=download)
        if kind == "flowers102":  # the paper fine-tunes on train+val and reports test accuracy
            if split == "train":
                return ConcatDataset([tvd.Flowers102(str(root), split=s, download=download) for s in ("train", "val")])
            return tvd.Flowers102(str(root), split="test", download=download)
        return tvd.OxfordIIITPet(str(root), split="trainval" if split == "train" else "test", download=download)

    try:
        return make("train"), make("test")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise UserError(f"cannot download {kind} into {root} ({getattr(e, 'reason', e)}); are you offline?") from None
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        hint = "" if download else "; pass --download to fetch it"
        raise UserError(f"{kind} not found or corrupt under {root}{hint} ({str(e).splitlines()[0]})") from None


def _class_names(kind: str, train: Dataset) -> list[str]:
    base = train.datasets[0] if isinstance(train, ConcatDataset) else train
    names = getattr(base, "classes", None)
    if names:
        return [str(n) for n in names]
    if kind == "flowers102":  # torchvision has no names for Flowers-102
        return [f"flower_{i}" for i in range(102)]
    raise UserError(f"cannot find class names for {kind}")


def build_splits(spec: str, *, download: bool = False) -> DataSplits:
    """Parse `--data SPEC` (`digits`, `imagefolder:PATH`, `cifar10:PATH`, ...) and open both splits."""
    kind, _, path = spec.partition(":")
    if kind not in KINDS:
        raise UserError(f"unknown data kind {kind!r} in --data {spec!r}; expected one of {', '.join(KINDS)}")
    if kind == "digits":
        train, val = DigitsDataset(train=True), DigitsDataset(train=False)
        return DataSplits(train, val, train.classes, spec)
    if not path:
        raise UserError(f"--data {kind} needs a path: --data {kind}:PATH")
    root = Path(path).expanduser()
    if not root.exists() and not (download and kind != "imagefolder"):
        raise UserError(f"data path not found: {root}")
    if kind == "imagefolder":
        train, val = _folder_splits(root)
    else:
        train, val = _torchvision_splits(kind, root, download)
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"{spec}: empty split (train {len(train)}, val {len(val)} images)")
    return DataSplits(train, val, _class_names(kind, train), spec)


def subset(dataset: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """A fixed random subset of `limit` samples (all classes represented), or the dataset itself."""
    if not limit or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    return torch.utils.data.Subset(dataset, sorted(order.tolist()))


def sample_name(dataset: Dataset, index: int) -> str:
    """A file name for warnings where the dataset knows it, otherwise the index."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    samples = getattr(dataset, "samples", None)
    return str(samples[index][0]) if samples is not None else f"sample #{index}"


# ---- transform, per-sample seeds, skipping -----------------------------------------------------------------------
class SampleSet(Dataset):
    """Applies a transform to a raw dataset; unreadable images come back as None (see `collate_skipping`).

    Indexed by an int (evaluation) or by `(index, seed)` from `SeededSampler` (training): the transform then
    runs under that seed, so a sample's augmentation is the same whichever worker or resumed run draws it.
    """

    def __init__(self, base: Dataset, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        index, seed = key if isinstance(key, tuple) else (key, None)
        try:
            img, target = self.base[index]
        except UNREADABLE as e:
            warnings.warn(f"skipping unreadable image {sample_name(self.base, index)}: {e}", stacklevel=2)
            return None
        if seed is None:
            return self.transform(img), target
        with _seeded(seed):
            return self.transform(img), target


class _seeded:  # noqa: N801 - used like a function
    """Run a block under fixed torch / random / numpy seeds, restoring the previous states after."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.states = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.states[0])
        random.setstate(self.states[1])
        np.random.set_state(self.states[2])


class SeededSampler(Sampler):
    """Wraps a (distributed) sampler: yields `(index, seed)` pairs and can start part-way through an epoch.

    The seed of the k-th sample of this rank is derived from (run seed, epoch, its position in the global
    order k * world + rank), so a 2-process run augments exactly as a 1-process run over the same global batch.
    """

    def __init__(self, sampler: Any, *, seed: int, rank: int = 0, world: int = 1) -> None:
        self.sampler, self.seed, self.rank, self.world = sampler, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip its first `start` samples (a resumed run)."""
        self.sampler.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.sampler) - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        for k, index in enumerate(self.sampler):
            if k >= self.start:
                yield int(index), base + k * self.world + self.rank


def collate_skipping(batch: Sequence[tuple[torch.Tensor, int] | None]) -> tuple[Any, Any, int]:
    """Stack the readable samples; the third element counts the skipped ones."""
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return None, None, skipped
    images, targets = default_collate(kept)
    return images, targets, skipped
