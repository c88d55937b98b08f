"""The table of named variants (paper Tables 1, 5, 12 and the DeiT baselines) and `create_model`."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .tnt import TNT, TNTConfig

TNT_MEAN = TNT_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_AUTHORS_RELEASE = "https://github.com/huawei-noah/Efficient-AI-Backbones/releases/download/tnt/"


@dataclass(frozen=True)
class Weights:
    """Where a variant's released weights live. sha256 is None where no published hash is known."""

    url: str
    file_name: str
    sha256: str | None = None
    top1: float | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: TNTConfig
    paper_params_m: float | None
    paper_flops_g: float | None
    description: str
    mean: tuple[float, float, float] = TNT_MEAN
    std: tuple[float, float, float] = TNT_STD
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    weights: Weights | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def pretrained_cfg(self, cfg: TNTConfig) -> dict[str, Any]:
        return {
            "architecture": self.name,
            "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size),
            "num_classes": cfg.num_classes,
            "mean": self.mean,
            "std": self.std,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "first_conv": "word_embed.proj" if cfg.has_words else "patch_embed.proj",
            "classifier": "head",
            "url": self.weights.url if self.weights else None,
            "sha256": self.weights.sha256 if self.weights else None,
        }


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise UserError(f"model name {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = fnmatch.filter(_REGISTRY, f"*{name.split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise UserError(f"unknown model {name!r}{hint}; see `tnt models`") from None


def create_model(name: str, pretrained: bool | str | Path = False, **overrides: Any) -> TNT:
    """Build a registered model, optionally with weights.

    Args:
        name: a name from `list_models()`.
        pretrained: False, True (the released weights, downloaded once into torch.hub's cache) or a path
            to a checkpoint in any supported format.
        **overrides: `TNTConfig` fields, e.g. `num_classes=10`, `img_size=384`, `drop_path_rate=0.1`.
    """
    spec = get_spec(name)
    cfg = spec.config.replace(**overrides)
    model = TNT(cfg)
    model.pretrained_cfg = spec.pretrained_cfg(cfg)
    if pretrained:
        from .checkpoint import download_weights, load_checkpoint

        path = download_weights(spec) if pretrained is True else Path(pretrained)
        load_checkpoint(model, path)
    return model


def _tnt(dim: int, heads: int, inner_dim: int, inner_heads: int, **kw: Any) -> TNTConfig:
    return TNTConfig(outer_dim=dim, outer_heads=heads, inner_dim=inner_dim, inner_heads=inner_heads, **kw)


def _deit(dim: int, heads: int) -> TNTConfig:
    return TNTConfig(outer_dim=dim, outer_heads=heads, tnt_blocks=(), qkv_bias=True, norm_eps=1e-6)


def _one_based(*blocks: int) -> tuple[int, ...]:
    return tuple(b - 1 for b in blocks)


_S: dict[str, Any] = {"dim": 384, "heads": 6, "inner_dim": 24, "inner_heads": 4}
for _spec in (
    ModelSpec("tnt_ti_patch16_224", _tnt(192, 3, 12, 2), 6.1, 1.4, "TNT-Ti (Table 1)"),
    ModelSpec(
        "tnt_s_patch16_224",
        _tnt(**_S),
        23.8,
        5.2,
        "TNT-S, authors' released layout",
        weights=Weights(_AUTHORS_RELEASE + "tnt_s_81.5.pth.tar", "tnt_s_81.5.pth.tar", top1=81.5),
    ),
    ModelSpec(
        "tnt_b_patch16_224",
        _tnt(640, 10, 40, 4),
        65.6,
        14.1,
        "TNT-B, authors' released layout",
        weights=Weights(_AUTHORS_RELEASE + "tnt_b_82.9.pth.tar", "tnt_b_82.9.pth.tar", top1=82.9),
    ),
    ModelSpec(
        "tnt_s_legacy_patch16_224",
        _tnt(**_S, legacy=True),
        23.8,
        5.2,
        "TNT-S, older layout (timm's legacy weights)",
        weights=Weights(
            "https://github.com/contrastive/pytorch-image-models/releases/download/TNT/tnt_s_patch16_224.pth.tar",
            "tnt_s_patch16_224.pth.tar",
            top1=81.5,
        ),
    ),
    ModelSpec("tnt_s1_patch16_224", _tnt(**_S, tnt_blocks=_one_based(1, 4, 8, 12)), None, 4.8, "TNT-S-1 (Table 5)"),
    ModelSpec("tnt_s2_patch16_224", _tnt(**_S, tnt_blocks=_one_based(1, 6, 12)), None, 4.7, "TNT-S-2 (Table 5)"),
    ModelSpec("tnt_s3_patch16_224", _tnt(**_S, tnt_blocks=_one_based(1, 6)), None, 4.7, "TNT-S-3 (Table 5)"),
    ModelSpec("tnt_s4_patch16_224", _tnt(**_S, tnt_blocks=_one_based(1)), None, 4.6, "TNT-S-4 (Table 5)"),
    ModelSpec("tnt_s_se_patch16_224", _tnt(**_S, se_ratio=0.25), 24.7, 5.2, "TNT-S + SE (Table 12)"),
    ModelSpec(
        "deit_ti_patch16_224",
        _deit(192, 3),
        5.7,
        1.3,
        "DeiT-Ti baseline",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_pct=0.875,
    ),
    ModelSpec(
        "deit_s_patch16_224",
        _deit(384, 6),
        22.1,
        4.6,
        "DeiT-S baseline",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_pct=0.875,
    ),
    ModelSpec(
        "deit_b_patch16_224",
        _deit(768, 12),
        86.4,
        17.6,
        "DeiT-B baseline",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_pct=0.875,
    ),
):
    register(_spec)

# Presets for the built-in `digits` data (8x8 digits upscaled to 32x32): a 4x4 grid of sentences, each of
# 2x2 original pixels, and (TNT) 2x2 words per sentence, one word per original pixel. crop_pct 1.0: a centre
# crop would cut the digits' strokes at the border. The DeiT is the TNT's FLOP-matched baseline (4.6M vs 4.8M).
_DIGITS: dict[str, Any] = {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 4}
register(
    ModelSpec(
        "tnt_digits",
        TNTConfig(**_DIGITS, outer_dim=64, outer_heads=2, inner_dim=16, inner_heads=2, inner_stride=4),
        None,
        None,
        "small TNT for 32x32 inputs (the `digits` demo)",
        crop_pct=1.0,
    )
)
register(
    ModelSpec(
        "deit_digits",
        TNTConfig(**_DIGITS, outer_dim=72, outer_heads=2, tnt_blocks=(), qkv_bias=True, norm_eps=1e-6),
        None,
        None,
        "DeiT baseline with the FLOPs of tnt_digits",
        crop_pct=1.0,
    )
)
