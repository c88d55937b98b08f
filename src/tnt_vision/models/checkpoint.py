"""Reading, converting and loading checkpoints: the authors' release, timm's layouts and this project's own.

Every format is converted to this project's key names ("native") before loading, so a model has one
state_dict layout whatever file it came from.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from ..errors import UserError
from ..io import atomic_write
from .registry import ModelSpec

StateDict = dict[str, torch.Tensor]
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "model", "state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


# ---- reading ---------------------------------------------------------------------------------------------------
def read_checkpoint_file(path: str | Path) -> Any:
    """The object in a `.safetensors` or torch.save file (tensors only), or one clear error saying why not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def read_state_dict(path: str | Path, *, use_ema: bool = True) -> StateDict:
    """Tensors of a `.safetensors` or torch.save file, unwrapped from training-checkpoint dicts.

    Args:
        use_ema: prefer EMA weights (`state_dict_ema` / `model_ema`) where the file holds them.
    """
    return unwrap_state_dict(read_checkpoint_file(path), use_ema=use_ema, source=str(path))


def unwrap_state_dict(obj: Any, *, use_ema: bool = True, source: str = "checkpoint") -> StateDict:
    order = _WRAPPER_KEYS if use_ema else (*_WRAPPER_KEYS[2:], *_WRAPPER_KEYS[:2])
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in order if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise CheckpointError(f"{source} holds no state_dict (top-level keys: {sorted(obj)[:8]})")
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state_dict")
    out = {}
    for k, v in obj.items():
        for prefix in _PREFIXES:
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


# ---- format detection and conversion -----------------------------------------------------------------------------
def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """One of "native", "official" (the authors' release), "timm" (TNT, current or legacy), "timm_vit"."""
    keys = set(sd)
    if "word_embed.proj.weight" in keys or "blocks.0.outer.norm1.weight" in keys:
        return "native"
    if "outer_pos" in keys or "inner_pos" in keys or any(".inner_attn." in k for k in keys):
        return "official"
    if "patch_pos" in keys or "pixel_pos" in keys or "pixel_embed.proj.weight" in keys:
        return "timm"
    if "pos_embed" in keys or "blocks.0.attn.qkv.weight" in keys:
        return "timm_vit"
    raise CheckpointError(f"unrecognised checkpoint layout (first keys: {sorted(keys)[:6]})")


_BLOCK = r"^blocks\.(\d+)\."
_RULES: dict[str, list[tuple[str, str]]] = {
    "official": [
        (r"^patch_embed\.proj\.", "word_embed.proj."),
        (r"^outer_pos$", "sentence_pos"),
        (r"^inner_pos$", "word_pos"),
        (r"^proj_norm1\.", "sentence_embed.norm1."),
        (r"^proj\.", "sentence_embed.proj."),
        (r"^proj_norm2\.", "sentence_embed.norm2."),
        (_BLOCK + r"inner_norm1\.", r"blocks.\1.inner.norm1."),
        (_BLOCK + r"inner_attn\.", r"blocks.\1.inner.attn."),
        (_BLOCK + r"inner_norm2\.", r"blocks.\1.inner.norm2."),
        (_BLOCK + r"inner_mlp\.", r"blocks.\1.inner.mlp."),
        (_BLOCK + r"proj_norm1\.", r"blocks.\1.word_proj.norm1."),
        (_BLOCK + r"proj\.", r"blocks.\1.word_proj.proj."),
        (_BLOCK + r"proj_norm2\.", r"blocks.\1.word_proj.norm2."),
        (_BLOCK + r"outer_norm1\.", r"blocks.\1.outer.norm1."),
        (_BLOCK + r"outer_attn\.", r"blocks.\1.outer.attn."),
        (_BLOCK + r"outer_norm2\.", r"blocks.\1.outer.norm2."),
        (_BLOCK + r"outer_mlp\.", r"blocks.\1.outer.mlp."),
        (_BLOCK + r"se_layer\.fc\.0\.", r"blocks.\1.outer.se.norm."),
        (_BLOCK + r"se_layer\.fc\.1\.", r"blocks.\1.outer.se.fc1."),
        (_BLOCK + r"se_layer\.fc\.3\.", r"blocks.\1.outer.se.fc2."),
    ],
    "timm": [
        (r"^pixel_embed\.proj\.", "word_embed.proj."),
        (r"^patch_pos$", "sentence_pos"),
        (r"^pixel_pos$", "word_pos"),
        (r"^norm1_proj\.", "sentence_embed.norm1."),
        (r"^proj\.", "sentence_embed.proj."),
        (r"^norm2_proj\.", "sentence_embed.norm2."),
        (_BLOCK + r"norm_in\.", r"blocks.\1.inner.norm1."),
        (_BLOCK + r"attn_in\.", r"blocks.\1.inner.attn."),
        (_BLOCK + r"norm_mlp_in\.", r"blocks.\1.inner.norm2."),
        (_BLOCK + r"mlp_in\.", r"blocks.\1.inner.mlp."),
        (_BLOCK + r"norm1_proj\.", r"blocks.\1.word_proj.norm1."),
        (_BLOCK + r"proj\.", r"blocks.\1.word_proj.proj."),
        (_BLOCK + r"norm2_proj\.", r"blocks.\1.word_proj.norm2."),
        (_BLOCK + r"norm_out\.", r"blocks.\1.outer.norm1."),
        (_BLOCK + r"attn_out\.", r"blocks.\1.outer.attn."),
        (_BLOCK + r"norm_mlp\.", r"blocks.\1.outer.norm2."),
        (_BLOCK + r"mlp\.", r"blocks.\1.outer.mlp."),
    ],
    "timm_vit": [
        (r"^pos_embed$", "sentence_pos"),
        (_BLOCK + r"(norm1|attn|norm2|mlp)\.", r"blocks.\1.outer.\2."),
    ],
}


def to_native(sd: Mapping[str, torch.Tensor], fmt: str | None = None) -> StateDict:
    """Convert a state_dict of any supported layout to this project's key names and tensor layouts."""
    fmt = fmt or detect_format(sd)
    if fmt == "native":
        return dict(sd)
    rules = [(re.compile(p), r) for p, r in _RULES[fmt]]
    out: StateDict = {}
    for key, value in sd.items():
        if key == "outer_tokens":  # an unused zero tensor in the authors' release
            continue
        for pattern, repl in rules:
            new = pattern.sub(repl, key)
            if new != key:
                key = new
                break
        out[key] = value
    if out.get("word_pos") is not None and out["word_pos"].ndim == 4:  # timm keeps it as (1, c, k, k)
        out["word_pos"] = out["word_pos"].flatten(2).transpose(1, 2).contiguous()  # (1, m, c)
    return _fuse_qk_v(out)


def _fuse_qk_v(sd: StateDict) -> StateDict:
    """Separate `qk` and `v` projections (authors', timm's TNT) -> one `qkv` projection (rows q, k, v)."""
    out = {}
    for key, value in sd.items():
        if ".attn.qk." in key:
            v_key = key.replace(".attn.qk.", ".attn.v.")
            out[key.replace(".attn.qk.", ".attn.qkv.")] = torch.cat([value, sd[v_key]], dim=0)
        elif ".attn.v." not in key:
            out[key] = value
    return out


# ---- loading -----------------------------------------------------------------------------------------------------
def load_checkpoint(
    model: nn.Module, path: str | Path, *, use_ema: bool = True, ignore_head: bool = False
) -> dict[str, Any]:
    """Load any supported checkpoint file into `model` (a `TNT`), converting and resizing as needed.

    The sentence position encoding is interpolated (bicubic) when the file was trained at another
    resolution. Keys or shapes that do not fit raise a `CheckpointError` listing every mismatch.

    Args:
        use_ema: take EMA weights where the file has them.
        ignore_head: leave the classifier as it is (fine-tuning to another number of classes).

    Returns:
        A report: the detected format and what was adapted.
    """
    return load_checkpoint_object(
        model, read_checkpoint_file(path), use_ema=use_ema, ignore_head=ignore_head, source=str(path)
    )


def load_checkpoint_object(
    model: nn.Module, obj: Any, *, use_ema: bool = True, ignore_head: bool = False, source: str = "checkpoint"
) -> dict[str, Any]:
    """`load_checkpoint` for a file's contents already in memory (a state_dict or a training checkpoint)."""
    raw = unwrap_state_dict(obj, use_ema=use_ema, source=source)
    fmt = detect_format(raw)
    return load_state_dict(model, to_native(raw, fmt), ignore_head=ignore_head, source=source, fmt=fmt)


def load_state_dict(
    model: nn.Module,
    sd: StateDict,
    *,
    ignore_head: bool = False,
    source: str = "state_dict",
    fmt: str = "native",
) -> dict[str, Any]:
    report: dict[str, Any] = {"format": fmt, "resized": [], "skipped": []}
    target = model.state_dict()
    if ignore_head:
        report["skipped"] = sorted(k for k in sd if k.startswith("head."))
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd.update({k: v for k, v in target.items() if k.startswith("head.")})
    pos = sd.get("sentence_pos")
    if pos is not None and "sentence_pos" in target and pos.shape != target["sentence_pos"].shape:
        sd["sentence_pos"] = _resize_sentence_pos(pos, model)
        report["resized"].append(f"sentence_pos {tuple(pos.shape)} -> {tuple(sd['sentence_pos'].shape)}")
    problems = _mismatches(target, sd)
    if problems:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise CheckpointError(f"{source} ({fmt} layout) does not fit {arch}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
    return report


def _resize_sentence_pos(pos: torch.Tensor, model: nn.Module) -> torch.Tensor:
    n = pos.shape[1] - 1
    side = round(n**0.5)
    if side * side != n or pos.shape[2] != model.cfg.outer_dim:
        return pos  # not a square grid of the same width: reported as a shape mismatch
    return resample_abs_pos_embed(pos, new_size=list(model.cfg.grid_size), old_size=[side, side], num_prefix_tokens=1)


def _mismatches(target: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], limit: int = 12) -> list[str]:
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    shapes = sorted(
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in set(target) & set(sd)
        if sd[k].shape != target[k].shape
    )
    out = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            out.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return out


# ---- saving and downloading --------------------------------------------------------------------------------------
def save_safetensors(model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a model's weights in this project's layout as `.safetensors`, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "layout": "tnt-vision"}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_weights(spec: ModelSpec, cache_dir: str | Path | None = None) -> Path:
    """The released weights of a variant, from torch.hub's cache or downloaded there (hash-checked)."""
    if spec.weights is None:
        raise CheckpointError(
            f"{spec.name} has no released weights; pass a checkpoint file instead (pretrained='path/to/file')"
        )
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    dst = folder / spec.weights.file_name
    if not dst.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(spec.weights.url, str(dst), progress=True)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CheckpointError(
                f"cannot download {spec.weights.url} ({reason}); if offline, fetch the file elsewhere and pass "
                f"it: create_model({spec.name!r}, pretrained='/path/{spec.weights.file_name}') or "
                f"--checkpoint /path/{spec.weights.file_name}"
            ) from None
    digest = sha256_of(dst)
    if spec.weights.sha256 is None:
        warnings.warn(f"no published sha256 for {spec.weights.url}; {dst} has sha256 {digest}", stacklevel=2)
    elif digest != spec.weights.sha256:
        dst.unlink()
        raise CheckpointError(
            f"{dst} has sha256 {digest}, expected {spec.weights.sha256}: the download was corrupt and is removed"
        )
    return dst
