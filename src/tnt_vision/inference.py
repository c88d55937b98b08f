"""Models ready for evaluation and prediction: weights, class names and the weights' own preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .data import transforms
from .data.datasets import UNREADABLE
from .errors import UserError
from .models import create_model
from .models.checkpoint import load_checkpoint_object, read_checkpoint_file


def _is_plain_state_dict(obj: dict) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


@dataclass
class Loaded:
    model: nn.Module
    class_names: list[str]
    source: str  # "ema" or "model": which weights of the file were loaded


def checkpoint_meta(obj: Any) -> dict[str, Any]:
    """`class_names` and `model_config` of a checkpoint this project wrote (its loaded contents); {} for others."""
    if not isinstance(obj, dict) or _is_plain_state_dict(obj):
        return {}
    meta = {k: obj[k] for k in ("class_names", "model_config", "arch") if k in obj}
    meta["has_ema"] = isinstance(obj.get("state_dict_ema"), dict)
    return meta


def load_trained(
    model_name: str, checkpoint: str | Path, *, use_ema: bool = True, class_names: list[str] | None = None
) -> Loaded:
    """Build `model_name` shaped like the checkpoint (classes, resolution) and load its weights (EMA first).

    Args:
        class_names: names to use when the checkpoint carries none (e.g. the data's folders).
    """
    obj = read_checkpoint_file(checkpoint)  # read once: metadata and weights
    meta = checkpoint_meta(obj)
    names = meta.get("class_names") or class_names
    overrides = dict(meta.get("model_config") or {})
    if names and "num_classes" not in overrides:
        overrides["num_classes"] = len(names)
    try:
        model = create_model(model_name, **overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    load_checkpoint_object(model, obj, use_ema=use_ema, source=str(checkpoint))
    if not names:
        names = imagenet_names() if model.num_classes == 1000 else [str(i) for i in range(model.num_classes)]
    return Loaded(model.eval(), list(names), "ema" if use_ema and meta.get("has_ema") else "model")


def imagenet_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


@torch.no_grad()
def predict(loaded: Loaded, paths: list[str | Path], top_k: int = 5) -> list[dict[str, Any]]:
    """Top-k class names with probabilities for each image file."""
    tf = transforms.eval_transform(loaded.model)
    out = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"image not found: {path}")
        try:
            with Image.open(path) as img:
                x = tf(img.convert("RGB"))[None]
        except UNREADABLE as e:
            raise UserError(f"cannot read image {path}: {e}") from None
        probs = loaded.model(x).softmax(dim=1)[0]
        p, idx = probs.topk(min(top_k, probs.numel()))
        out.append(
            {
                "image": str(path),
                "top": [[loaded.class_names[i], float(q)] for q, i in zip(p, idx.tolist(), strict=True)],
            }
        )
    return out
