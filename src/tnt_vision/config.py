"""The run configuration: one dataclass whose defaults are the paper's (DeiT's) recipe, YAML recipes on top."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


def _f(default: Any, help: str, group: str = "optimisation", **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, "group": group, **kw})


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults reproduce the authors' command line (Table 3 of the paper)."""

    # run
    model: str = _f("tnt_s_patch16_224", "registered model name (see `tnt models`)", "run")
    data: str = _f(
        "digits", "digits | imagefolder:PATH | cifar10:PATH | cifar100:PATH | flowers102:PATH | pets:PATH", "run"
    )
    output: str = _f("runs/train", "output folder: checkpoints, logs, summary", "run")
    epochs: int = _f(300, "training epochs", "run")
    seed: int = _f(0, "random seed; a CPU run with the same seed is bitwise reproducible", "run")
    resume: str = _f("auto", "'auto' (continue from OUTPUT/last.pt if present), 'never', or a checkpoint file", "run")
    finetune: str | None = _f(None, "initialise from this checkpoint, classifier replaced (transfer learning)", "run")
    num_classes: int | None = _f(None, "classes of the classifier (default: those of the data)", "run")
    img_size: int | None = _f(None, "input resolution (default: the model's)", "run")
    save_every_steps: int = _f(0, "also save OUTPUT/last.pt every N optimizer updates (0: only per epoch)", "run")
    tensorboard: bool = _f(False, "also write TensorBoard logs to OUTPUT/tb", "run")
    # data
    download: bool = _f(False, "download the dataset where torchvision can", "data")
    batch_size: int = _f(128, "images per process and micro-batch", "data")
    workers: int = _f(2, "data loader worker processes per training process", "data")
    train_limit: int | None = _f(None, "use a fixed random subset of this many training images", "data")
    val_limit: int | None = _f(None, "use a fixed random subset of this many evaluation images", "data")
    # optimisation
    lr: float = _f(1e-3, "peak learning rate at a global batch of --lr-base-batch (linear scaling rule)")
    lr_base_batch: int = _f(1024, "global batch that --lr refers to; the run uses lr * global_batch / this")
    min_lr: float = _f(1e-5, "final learning rate of the cosine schedule")
    warmup_lr: float = _f(1e-6, "learning rate at the start of the warm-up")
    warmup_epochs: float = _f(5.0, "linear warm-up length in epochs")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on position encodings, class token, norms, biases)")
    opt_eps: float = _f(1e-8, "AdamW epsilon")
    clip_grad: float | None = _f(None, "clip the gradient norm to this value")
    accum_steps: int = _f(1, "gradient accumulation: micro-batches per optimizer update")
    smoothing: float = _f(0.1, "label smoothing")
    drop_path: float = _f(0.1, "stochastic depth rate")
    ema_decay: float = _f(0.99996, "model EMA decay per update (0 disables the EMA)")
    # augmentation
    auto_augment: str | None = _f("rand-m9-mstd0.5-inc1", "timm RandAugment policy ('' or none: off)", "augmentation")
    color_jitter: float = _f(0.4, "colour jitter strength", "augmentation")
    scale: tuple[float, float] = _f((0.08, 1.0), "random resized crop area range", "augmentation", nargs=2)
    hflip: float = _f(0.5, "horizontal flip probability", "augmentation")
    interpolation: str = _f("bicubic", "resize interpolation", "augmentation")
    reprob: float = _f(0.25, "random erasing probability", "augmentation")
    remode: str = _f("pixel", "random erasing mode", "augmentation", choices=("const", "rand", "pixel"))
    mixup: float = _f(0.8, "Mixup alpha (0: off)", "augmentation")
    cutmix: float = _f(1.0, "CutMix alpha (0: off)", "augmentation")
    mixup_prob: float = _f(1.0, "probability of applying Mixup or CutMix to a batch", "augmentation")
    mixup_switch_prob: float = _f(0.5, "probability of CutMix instead of Mixup when both are on", "augmentation")
    repeats: int = _f(3, "repeated augmentation: copies of each image per epoch (1: off)", "augmentation")
    # hardware
    device: str = _f("auto", "auto | cpu | cuda", "hardware", choices=("auto", "cpu", "cuda"))
    amp: str = _f(
        "auto",
        "autocast: auto (fp16 on GPU, off on CPU) | bf16 | fp16 | none",
        "hardware",
        choices=("auto", "bf16", "fp16", "none"),
    )
    threads: int = _f(
        0, "intra-op CPU threads per process (0: torch's default); 1 is fastest for tiny models", "hardware"
    )
    compile: bool = _f(False, "torch.compile the model", "hardware")
    grad_checkpointing: bool = _f(False, "recompute activations in backward to save memory", "hardware")

    def validate(self) -> TrainConfig:
        for name in ("epochs", "batch_size", "accum_steps", "repeats", "lr_base_batch"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "warmup_lr", "weight_decay", "warmup_epochs", "smoothing", "mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        if self.mixup + self.cutmix > 0 and self.batch_size % 2:
            raise UserError(f"Mixup/CutMix pair images: --batch-size must be even, got {self.batch_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML recipe: a mapping of `TrainConfig` field names (dashes or underscores) to values."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse recipe {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"recipe {path} must be a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"recipe {path} has unknown option(s): {', '.join(unknown)}")
    return values


def make_config(recipe: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe's values, then `overrides` (the command line)."""
    values = read_recipe(recipe) if recipe else {}
    values.update(overrides)
    if isinstance(values.get("scale"), list):
        values["scale"] = tuple(values["scale"])
    if values.get("auto_augment") in ("", "none"):
        values["auto_augment"] = None
    return TrainConfig(**values).validate()
