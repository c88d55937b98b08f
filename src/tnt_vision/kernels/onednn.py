"""fp32 CPU inference through oneDNN's fused linear layers (the operators torch.compile's CPU backend emits).

`F.linear` copies the bias into its output before the GEMM accumulates onto it, and the GELU after the MLP's
first layer and the block's residual additions each read and write the activation once more. oneDNN's linear
applies the bias, the GELU or the residual addition to each tile of the product while it is in cache. Same
results up to the order of the GEMM's additions. Inference only (these operators have no autograd formula),
fp32, CPU; off while a graph is captured and with `TNT_VISION_CPU_KERNELS=0`.
"""

from __future__ import annotations

import functools

import torch

from . import ENV_SWITCH, capturing_graph, switched_on


@functools.cache
def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_applies(x: torch.Tensor) -> bool:
    """fp32 CPU inference (no gradient recorded, no autocast), outside graph capture, where oneDNN is built in."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu") or capturing_graph():
        return False
    return available() and switched_on(ENV_SWITCH)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, followed by the exact GELU if asked, in one oneDNN call."""
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear_add(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """`residual + F.linear(x, weight, bias)` in one oneDNN call (a residual that is not contiguous: two steps)."""
    if not residual.is_contiguous():
        return residual + linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
