"""Attention over TNT's 16 words on a GPU: the fused kernels of `scaled_dot_product_attention` against explicit
products (`layers.short_on_gpu`), alone and in a training step.

    PYTHONPATH=src python benchmarks/gpu_short_attention.py --batch 256 --out short_attention.json

1. The attention alone at the inner transformer's shape for a whole batch (batch x 196 sentences, heads, 16
   words, head width) in bf16: forward, and forward + backward; `triton.testing.do_bench` medians.
2. A bf16-autocast training step of the whole model (forward, backward, AdamW) with the words' attention by
   explicit products (the default) and by `scaled_dot_product_attention` (`layers.SHORT_SEQUENCE = 0`), against
   timm's TNT: contenders interleaved round by round (`bench.interleaved_times`), medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from tnt_vision.bench import BenchConfig, build_module, interleaved_times, make_inputs, train_step
from tnt_vision.io import atomic_write
from tnt_vision.models import get_spec, layers

PATCHES = 196


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def attention_times(model: str, batch: int) -> dict[str, Any]:
    cfg = get_spec(model).config
    shape = (batch * PATCHES, cfg.inner_heads, cfg.num_words, cfg.inner_dim // cfg.inner_heads)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    result: dict[str, Any] = {"model": model, "shape": shape}
    for name, fn in (("sdpa", F.scaled_dot_product_attention), ("explicit", explicit)):

        def backward(fn: Callable[..., torch.Tensor] = fn) -> None:
            torch.autograd.backward(fn(q, k, v), grad)

        with torch.no_grad():
            result[f"{name} forward ms"] = do_bench(lambda fn=fn: fn(q, k, v), return_mode="median")
        result[f"{name} forward+backward ms"] = do_bench(backward, grad_to_none=[q, k, v], return_mode="median")
    return result


def training_times(model: str, batch: int, runs: int) -> dict[str, Any]:
    cfg = BenchConfig(model=model, batch=batch, dtype="bf16", train=True, runs=runs, warmup=3, device="cuda")

    def with_short_sequence(limit: int, step: Callable[[torch.Tensor], object]) -> Callable[[torch.Tensor], object]:
        def run(x: torch.Tensor) -> object:
            layers.SHORT_SEQUENCE = limit
            return step(x)

        return run

    default = layers.SHORT_SEQUENCE
    steps = {
        "ours, explicit word attention": with_short_sequence(default, train_step(build_module(model, model, 224), cfg)),
        "ours, sdpa word attention": with_short_sequence(0, train_step(build_module(model, model, 224), cfg)),
        "timm TNT": train_step(build_module("timm", model, 224), cfg),
    }
    times = interleaved_times(steps, make_inputs(cfg, batch), cfg)
    layers.SHORT_SEQUENCE = default
    return {"model": model, "batch": batch, "ms": {name: statistics.median(t) * 1e3 for name, t in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tnt_s_patch16_224"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_short_attention.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(0)
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for model in args.models:
        for row in (attention_times(model, args.batch), training_times(model, args.batch, args.runs)):
            report["rows"].append(row)
            print(json.dumps(row))
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))


if __name__ == "__main__":
    main()
