"""Images in and out of a model: its own eval preprocessing, and the pixels the model saw, for display."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import resolve_data_config
from torch import nn

from ..data.transforms import eval_transform
from ..errors import UserError


def read_image(path: str | Path) -> Image.Image:
    """An RGB PIL image, or a UserError saying why the file cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def preprocess(image: Image.Image, model: nn.Module) -> torch.Tensor:
    """(1, 3, H, W): the model's eval transform from its `pretrained_cfg` (resize, centre crop, normalise)."""
    return eval_transform(model)(image).unsqueeze(0)


def to_display(x: torch.Tensor, model: nn.Module) -> np.ndarray:
    """Undo the normalisation of one preprocessed image: (3, H, W) or (1, 3, H, W) -> (H, W, 3) in [0, 1]."""
    config = resolve_data_config(model=model)
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    pixels = x.reshape(3, *x.shape[-2:]).detach().cpu() * std + mean
    # bicubic resizing overshoots a little at edges
    return pixels.clamp(0, 1).permute(1, 2, 0).numpy()
