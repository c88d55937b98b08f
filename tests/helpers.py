"""Reference conversions and forward/backward runs used by several tests."""

from __future__ import annotations

import torch

_TIMM_TO_OFFICIAL = (
    ("pixel_embed.", "patch_embed."),
    ("patch_pos", "outer_pos"),
    ("norm1_proj", "proj_norm1"),
    ("norm2_proj", "proj_norm2"),
    ("norm_in.", "inner_norm1."),
    ("attn_in.", "inner_attn."),
    ("norm_mlp_in.", "inner_norm2."),
    ("mlp_in.", "inner_mlp."),
    ("norm_out.", "outer_norm1."),
    ("attn_out.", "outer_attn."),
    ("norm_mlp.", "outer_norm2."),
    (".mlp.", ".outer_mlp."),
)


def timm_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of timm's `checkpoint_filter_fn`: timm's TNT keys -> the authors' released keys."""
    out = {}
    for key, value in sd.items():
        for old, new in _TIMM_TO_OFFICIAL:
            key = key.replace(old, new)
        if key == "pixel_pos":
            key, value = "inner_pos", value.flatten(2).transpose(1, 2)  # (1, c, k, k) -> (1, m, c)
        out[key] = value
    out["outer_tokens"] = torch.zeros(1, sd["patch_pos"].shape[1] - 1, sd["patch_pos"].shape[2])
    return out


def randomize_(model: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    """Perturb every parameter, norms and biases included, so a swapped key cannot go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def forward_backward(
    model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and every parameter's gradient of mean(output^2), under bf16 autocast when asked."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    return out.float().detach(), [p.grad.float() for p in model.parameters()]
