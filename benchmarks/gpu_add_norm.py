"""The add-and-norm Triton kernel (`tnt_vision.kernels.add_norm`) on a GPU: each fusion alone, and in the model.

    PYTHONPATH=src python benchmarks/gpu_add_norm.py --batch 256 --out add_norm.json

1. Each fusion at the model's shapes (batch x 197 tokens of the outer width; bf16 autocast over the fp32 stream,
   and fp32): the plain operators the model ran before (the residual addition, the LayerNorm, the cast the next
   linear layer makes; for the sentences' update, its norm, the addition and the class token's `cat`) against
   the kernel. Medians of CUDA-event timings (`triton.testing.do_bench`), with the floor: the bytes the kernel
   must move over a device-to-device copy's bandwidth measured here; and the host's time to issue one call
   (microseconds, mean of 200 calls without waiting for the GPU), which bounds a model of many small launches.
2. The whole model in inference with the kernel and with it stepped aside (`add_norm_applies` answering no; the
   inner blocks' kernel stays on in both), beside timm's DeiT-S: contenders interleaved round by round
   (`bench.interleaved_times`), CUDA events, medians, images/s; and the host's time to issue one forward (ms,
   medians): where it reaches the GPU's time, the model waits on Python, not on the GPU.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from gpu_inner_block import gpu_parser, gpu_report, median_ms
from torch import nn

from tnt_vision.bench import BenchConfig, build_module, interleaved_times, issue_seconds, make_inputs, never
from tnt_vision.io import atomic_write
from tnt_vision.kernels import add_norm
from tnt_vision.models import create_model, get_spec
from tnt_vision.models import layers as layers_module
from tnt_vision.models import tnt as tnt_module


def issue_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Host microseconds per call of `fn`, the GPU not waited for (mean over `calls`)."""

    def repeated(_: object) -> None:
        for _ in range(calls):
            fn()

    return issue_seconds(repeated, None) / calls * 1e6


def fusion_times(model: str, batch: int, dtype: str, bandwidth: float) -> dict[str, Any]:
    """Plain operators against the kernel for each fusion (ms), and the kernel's floor."""
    cfg = get_spec(model).config
    tokens, width = 1 + cfg.grid_size[0] * cfg.grid_size[1], cfg.outer_dim
    stream = torch.randn(batch, tokens, width, device="cuda")
    low = torch.bfloat16 if dtype == "bf16" else torch.float32  # the branches' and the normed outputs' dtype
    branch = torch.randn(batch, tokens, width, device="cuda").to(low)
    norm = nn.LayerNorm(width).cuda()
    cls, patches = stream.split([1, tokens - 1], dim=1)
    update = branch[:, 1:].contiguous()

    def sentences_update() -> torch.Tensor:
        out = torch.empty_like(stream)
        out[:, :1] = cls
        add_norm.add_normed(patches, update, norm, out[:, 1:])
        return out

    s, b = stream.element_size(), branch.element_size()  # bytes per element: the stream; a branch or a norm
    pairs: dict[str, tuple[Callable[[], object], Callable[[], object], int]] = {  # plain, kernel, bytes moved
        "norm for linear": (lambda: norm(stream).to(low), lambda: add_norm.norm_for_linear(stream, norm), s + b),
        "add and norm": (
            lambda: (stream + branch, norm(stream + branch).to(low)),
            lambda: add_norm.add_and_norm(stream, branch, norm),
            s + b + s + b,
        ),
        "sentences' update": (
            lambda: torch.cat([cls, patches + F.layer_norm(update, (width,), norm.weight, norm.bias)], dim=1),
            sentences_update,
            s + b + s,
        ),
    }
    result: dict[str, Any] = {}
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=dtype == "bf16"):
        for name, (plain, kernel, per_element) in pairs.items():
            floor = stream.numel() * per_element / bandwidth * 1e3
            result[name] = {"plain": median_ms(plain), "kernel": median_ms(kernel), "floor": floor}
            result[name] |= {"plain issue us": issue_us(plain), "kernel issue us": issue_us(kernel)}
    return {"model": model, "dtype": dtype, "batch": batch, "rows": batch * tokens, "width": width, "ms": result}


@contextlib.contextmanager
def stepped_aside() -> Iterator[None]:
    """The model's plain operators where it would take the add-and-norm kernel."""
    with (
        mock.patch.object(layers_module, "add_norm_applies", never),
        mock.patch.object(tnt_module, "add_norm_applies", never),
    ):
        yield


def model_times(model: str, batch: int, dtype: str, runs: int) -> dict[str, Any]:
    """Inference of the whole model with the kernel and without, and timm's DeiT-S: ms per batch (CUDA events),
    the host's ms to issue it, and images/s; medians of interleaved rounds."""
    cfg = BenchConfig(model=model, batch=batch, runs=runs, warmup=3, device="cuda", dtype=dtype)
    ours = create_model(model).cuda().eval()
    deit = build_module("timm:deit_small_patch16_224", model, 224).cuda().eval()

    def forward(
        module: nn.Module, context: Callable[[], Any] = contextlib.nullcontext
    ) -> Callable[[torch.Tensor], object]:
        def step(x: torch.Tensor) -> object:
            with context(), torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=dtype == "bf16"):
                return module(x)

        return step

    steps = {"ours, add-and-norm kernel": forward(ours), "ours, plain norms": forward(ours, stepped_aside)}
    steps["timm deit_small_patch16_224"] = forward(deit)
    inputs = make_inputs(cfg, batch)
    ms = {name: statistics.median(t) * 1e3 for name, t in interleaved_times(steps, inputs, cfg).items()}
    issued = interleaved_times(steps, inputs, cfg, measure=issue_seconds)
    result: dict[str, Any] = {"model": model, "dtype": dtype, "batch": batch, "ms": ms}
    result["issue ms"] = {name: statistics.median(t) * 1e3 for name, t in issued.items()}
    return result | {"images_per_s": {name: batch / t * 1e3 for name, t in ms.items()}}


def main() -> None:
    args = gpu_parser(__doc__, ("bf16", "fp32"), "benchmarks/results/gpu_add_norm.json").parse_args()
    report, bandwidth = gpu_report("fusions", "models")
    for model in args.models:
        for dtype in args.dtypes:
            for kind, row in (("fusions", fusion_times(model, args.batch, dtype, bandwidth)),
                              ("models", model_times(model, args.batch, dtype, args.runs))):  # fmt: skip
                report[kind].append(row)
                print(json.dumps(row))
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))


if __name__ == "__main__":
    main()
