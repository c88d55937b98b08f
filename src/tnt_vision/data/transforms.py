"""Training and evaluation transforms, Mixup/CutMix and samplers: timm's pieces, configured from a run config."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageOps
from timm.data import Mixup, auto_augment, create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from torch import nn
from torch.utils.data import Dataset, DistributedSampler


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, kept working on Pillow >= 13.

    RandAugment's `PosterizeIncreasing` keeps 0 bits at magnitude 10 (reached with `mstd0.5` noise around m9);
    older Pillow turned that into a black image, Pillow 13 raises ValueError. Keep the old result.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


for _name, _op in list(auto_augment.NAME_TO_OP.items()):
    if _op is auto_augment.posterize:
        auto_augment.NAME_TO_OP[_name] = _posterize


def train_transform(cfg: Any, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """DeiT's training augmentation from the run config: random resized crop, flip, RandAugment, colour
    jitter, random erasing (`cfg` fields of `TrainConfig`; `auto_augment=None` switches RandAugment off)."""
    return create_transform(
        input_size=img_size,
        is_training=True,
        scale=tuple(cfg.scale),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment or None,
        interpolation=cfg.interpolation,
        mean=mean,
        std=std,
        re_prob=cfg.reprob,
        re_mode=cfg.remode,
        re_count=1,
    )


def eval_transform(model: nn.Module) -> Any:
    """The weights' own preprocessing (`model.pretrained_cfg`: size, mean/std, interpolation, crop_pct)."""
    return create_transform(**resolve_data_config({}, model=model), is_training=False)


def mixup_fn(cfg: Any, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix with label smoothing folded into the soft targets, or None when both are off."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode="batch",
        label_smoothing=cfg.smoothing,
        num_classes=num_classes,
    )


def train_sampler(dataset: Dataset, *, repeats: int, rank: int, world: int, seed: int) -> Any:
    """Repeated augmentation (timm's RepeatAugSampler, DeiT's x3) or a shuffling DistributedSampler.

    Both are used in single-process runs too (world 1), so one and many processes see the same order.
    """
    if repeats > 1:
        return RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=True, num_repeats=repeats)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
