"""The add-and-norm Triton kernel (`kernels.add_norm`) against the plain operators: `kernel_differences` on any
device (the GPU tests call it), and, run with TRITON_INTERPRET=1, on CPU tensors under Triton's interpreter with
whole models too; writes the measured differences to argv[1]."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from tnt_vision.kernels import add_norm
from tnt_vision.models import create_model
from tnt_vision.models.layers import fused_attention
from triton_interpreter_worker import counted

WIDTHS = (24, 100, 384, 640)  # a word, a width that is no power of two, TNT-S's and TNT-B's sentences
MODES = ("fp32", "autocast", "bf16")  # fp32 tensors; bf16 autocast over an fp32 stream and bf16 branch; bf16 tensors


def perturbed_norm(width: int) -> nn.LayerNorm:
    norm = nn.LayerNorm(width)
    with torch.no_grad():  # weight 1 and bias 0 would hide indexing mistakes
        norm.weight.add_(0.3 * torch.randn(width))
        norm.bias.add_(0.3 * torch.randn(width))
    return norm


def cases(width: int, mode: str, device: str) -> Iterator[tuple[str, Callable[[], tuple[list, list]]]]:
    """(name, call) of each entry point over odd-sized tensors (3 images of 7 rows, the stream a strided view),
    each call giving the kernel's results and the plain operators'."""
    big = torch.randn(3, 8, width, device=device)
    x, y = big[:, 1:], torch.randn(3, 7, width, device=device)  # x: the patches' rows, as in `add_to`
    norm, y_norm = perturbed_norm(width).to(device), perturbed_norm(width).to(device)
    if mode != "fp32":
        y = y.bfloat16()
    if mode == "bf16":
        x, norm, y_norm = x.bfloat16(), norm.bfloat16(), y_norm.bfloat16()

    def added_normed() -> tuple[list, list]:
        out = torch.full_like(big, float("nan"), dtype=add_norm.result_dtypes(x, y, y_norm)[1])
        add_norm.add_normed(x, y, y_norm, out[:, 1:])
        assert out[:, 0].isnan().all()  # only the rows given were written
        return [out[:, 1:]], [x + y_norm(y)]

    yield "norm", lambda: ([add_norm.norm_for_linear(x, norm)], [linear_input(norm(x))])
    yield "add_and_norm", lambda: (list(add_norm.add_and_norm(x, y, norm)), [x + y, linear_input(norm(x + y))])
    yield "add_normed", added_normed


def linear_input(t: torch.Tensor) -> torch.Tensor:
    """What a linear layer multiplies: its input cast to autocast's dtype under autocast."""
    device = t.device.type
    return t.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else t


def kernel_differences(device: str) -> dict[str, float]:
    """For every entry point, width and mode, from the plain operators: the largest difference of an fp32 result
    (`_fp32`) and of a 16-bit one (`_16bit`), each relative to the result's largest value, and the share of a
    16-bit result's elements that differ (`_mismatch`: rounded the other way, where the plain path summed a row
    in another order); 0 where there is no such result."""
    diffs = {}
    for width in WIDTHS:
        for mode in MODES:
            autocast = torch.autocast(device, torch.bfloat16, enabled=mode == "autocast")
            for name, call in cases(width, mode, device):
                with torch.inference_mode(), autocast:
                    results, plain = call()
                found = {"fp32": [0.0], "16bit": [0.0], "mismatch": [0.0]}
                for a, b in zip(results, plain, strict=True):
                    assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
                    assert a.shape == b.shape, (name, a.shape, b.shape)
                    error = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                    found["fp32" if a.dtype == torch.float32 else "16bit"].append(error)
                    if a.dtype != torch.float32:
                        found["mismatch"].append((a != b).float().mean().item())
                diffs |= {f"{name}_{width}_{mode}_{kind}": max(values) for kind, values in found.items()}
    return diffs


def model_differences(device: str) -> dict[str, float]:
    """Logits of small TNT-S/B and DeiT-S models in inference, fp32 and under bf16 autocast, with the kernel and
    by the explicit path (no fast path), relative to the largest logit; and the kernel's launches."""
    diffs = {}
    for name in ("tnt_s_patch16_224", "tnt_b_patch16_224", "deit_s_patch16_224"):
        model = create_model(name, depth=2, img_size=64, num_classes=10).to(device).eval()
        x = torch.randn(3, 3, 64, 64, device=device)
        for mode in ("fp32", "autocast"):
            with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=mode == "autocast"):
                with fused_attention(False):
                    reference = model(x).float()
                with counted("_launch", add_norm) as calls:
                    fast = model(x).float()
            diffs[f"{name}_{mode}"] = ((fast - reference).abs().max() / reference.abs().max()).item()
            diffs[f"{name}_{mode}_launches"] = len(calls)
    return diffs


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    warnings.simplefilter("error")  # a kernel the first-use check switched off must fail the test
    with open(sys.argv[1], "w") as f:
        json.dump({**kernel_differences("cpu"), **model_differences("cpu")}, f)
