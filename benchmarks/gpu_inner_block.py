"""The fused Triton inner block (`tnt_vision.kernels.inner_block`) on a GPU: per configuration, and in the model.

    PYTHONPATH=src python benchmarks/gpu_inner_block.py --batch 256 --out inner_block.json

1. One inner block at the shape of a whole batch (batch x 196 sentences of 16 words): the plain block, the
   autotuned kernel (and the configuration it chose), and every configuration it chooses from, in bf16 autocast,
   fp32 and fp32 with TF32 products allowed. Median of CUDA-event timings (`triton.testing.do_bench`), inputs
   rotated; with the bytes the kernel must move (the words in and out, once) over a device-to-device copy's
   bandwidth measured here, as its floor.
2. The same block's forward + backward: plain (autograd) against both kernels, and the backward kernel alone in
   each configuration it is tuned over, and in the chosen one with fewer and more gradient slots (atomics'
   contention).
3. The whole model with the kernels and without them (`TNT_VISION_GPU_KERNELS`), against timm's TNT: inference,
   and a forward + backward step: contenders interleaved round by round (`bench.interleaved_times`), medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from triton.testing import do_bench

from tnt_vision.bench import BenchConfig, build_module, interleaved_times, make_inputs
from tnt_vision.io import atomic_write
from tnt_vision.kernels import inner_block as ib
from tnt_vision.kernels import triton_block as tb
from tnt_vision.models import create_model

PATCHES = 196  # 224 / 16 squared


def median_ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.empty(2**28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (median_ms(lambda: dst.copy_(src)) / 1e3)


def rotating(inputs: list[torch.Tensor], fn: Callable[[torch.Tensor], object]) -> Callable[[], object]:
    state = {"i": 0}

    def call() -> object:
        state["i"] += 1
        return fn(inputs[state["i"] % len(inputs)])

    return call


def block_times(model: str, batch: int, dtype: str, bandwidth: float) -> dict[str, Any]:
    """One inner block over a batch's sentences: plain, autotuned, each configuration (ms, medians)."""
    block = create_model(model).blocks[0].inner.cuda().eval()
    width, words = block.norm1.normalized_shape[0], 16
    inputs = [torch.randn(batch * PATCHES, words, width, device="cuda") for _ in range(3)]
    with torch.inference_mode(), autocast(dtype):
        precision = ib.products(inputs[0])
        result = {"plain": median_ms(rotating(inputs, block.plain_forward))}
        result["autotuned"] = median_ms(rotating(inputs, lambda x: ib.inner_block(block, x, precision=precision)))
        result["chosen"] = ib.tuned_config(precision)
        for config in ib.EXACT_CONFIGS if precision == "ieee" else ib.CONFIGS:
            kernel = rotating(inputs, lambda x, c=config: ib.inner_block(block, x, precision=precision, config=c))
            result[f"config {config}"] = median_ms(kernel)
    floor_bytes = 2 * inputs[0].numel() * inputs[0].element_size()
    result["floor_ms"] = floor_bytes / bandwidth * 1e3
    return {"model": model, "dtype": dtype, "sentences": batch * PATCHES, "width": width, **result}


def block_training_times(model: str, batch: int, dtype: str) -> dict[str, Any]:
    """One inner block's forward + backward over a batch's sentences: plain and fused; the backward kernel alone
    per configuration (ms, medians)."""
    block = create_model(model).blocks[0].inner.cuda().train()
    width, words = block.norm1.normalized_shape[0], 16
    inputs = [torch.randn(batch * PATCHES, words, width, device="cuda", requires_grad=True) for _ in range(3)]
    grad = torch.randn_like(inputs[0])

    def step(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], object]:
        def run(x: torch.Tensor) -> None:
            with autocast(dtype):
                out = forward(x)
            out.backward(grad)

        return run

    with autocast(dtype):
        precision = ib.products(inputs[0])
    result = {"plain": median_ms(rotating(inputs, step(block.plain_forward)))}
    result["fused"] = median_ms(rotating(inputs, step(lambda x: ib.fused_block(block, x))))
    result["chosen backward"] = ib.tuned_config(precision, ib.BACKWARD)
    for config in tb.EXACT_BACKWARD_CONFIGS if precision == "ieee" else tb.BACKWARD_CONFIGS:
        kernel = lambda x, c=config: ib.inner_block_backward(block, x.detach(), grad, precision=precision, config=c)  # noqa: E731
        result[f"backward {config}"] = median_ms(rotating(inputs, kernel))
    chosen = result["chosen backward"]
    for slots in (1, 8, 512) if chosen else ():  # contention of the weight gradients' atomic additions
        kernel = lambda x, s=slots: ib.inner_block_backward(  # noqa: E731
            block, x.detach(), grad, precision=precision, config=chosen, slots=s
        )
        result[f"backward {chosen}, {slots} slots (default {ib.SLOTS})"] = median_ms(rotating(inputs, kernel))
    return {"model": model, "dtype": dtype, "sentences": batch * PATCHES, "width": width, "fwd+bwd ms": result}


def autocast(dtype: str) -> Any:
    """bf16: autocast; fp32: exact fp32 products; tf32: fp32 with TF32 products allowed (for the model too)."""
    if dtype == "bf16":
        return torch.autocast("cuda", torch.bfloat16)
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
    return nullcontext()


def set_kernel(on: bool) -> None:
    os.environ[ib.ENV_SWITCH] = "1" if on else "0"
    ib.triton_available.cache_clear()


def model_times(model: str, batch: int, dtype: str, runs: int, train: bool = False) -> dict[str, Any]:
    """The whole model, ours with and without the kernels and timm's TNT (ms per batch, medians): inference, or
    with `train` a forward + backward step (no optimizer)."""
    cfg = BenchConfig(model=model, batch=batch, runs=runs, warmup=3, device="cuda")
    ours = create_model(model).cuda().train(train)
    timm_model = build_module("timm", model, 224).cuda().train(train)

    def forward(module: torch.nn.Module, kernel: bool) -> Callable[[torch.Tensor], object]:
        def step(x: torch.Tensor) -> object:
            set_kernel(kernel)
            with torch.inference_mode(not train), autocast(dtype):
                out = module(x)
            if train:
                module.zero_grad(set_to_none=True)
                out.float().mean().backward()
            return out

        return step

    steps = {"ours, fused kernel": forward(ours, True), "ours, plain": forward(ours, False)}
    steps["timm TNT"] = forward(timm_model, False)
    times = interleaved_times(steps, make_inputs(cfg, batch), cfg)
    set_kernel(True)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"model": model, "dtype": dtype, "batch": batch, "train": train, "ms": medians}


def gpu_parser(doc: str, dtypes: tuple[str, ...], out: str) -> argparse.ArgumentParser:
    """The GPU scripts' shared arguments: --models, --dtypes (all of `dtypes` by default), --batch, --runs, --out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tnt_s_patch16_224"])
    p.add_argument("--dtypes", nargs="+", default=list(dtypes), choices=dtypes)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(out))
    return p


def gpu_report(*kinds: str) -> tuple[dict[str, Any], float]:
    """A GPU script's report, started: the GPU, torch, and the copy bandwidth measured here (also returned, bytes
    per second), with an empty list for each kind of row; printed. Exits where there is no GPU or no triton."""
    if not torch.cuda.is_available() or tb.triton is None:
        raise SystemExit("needs a CUDA GPU and triton")
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    report |= {"copy_GB_per_s": bandwidth / 1e9, **{kind: [] for kind in kinds}}
    print(f"{report['gpu']}, torch {torch.__version__}, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    return report, bandwidth


def main() -> None:
    args = gpu_parser(__doc__, ("bf16", "fp32", "tf32"), "benchmarks/results/gpu_inner_block.json").parse_args()
    report, bandwidth = gpu_report("blocks", "models")
    for model in args.models:
        for dtype in args.dtypes:
            row = block_times(model, args.batch, dtype, bandwidth)
            report["blocks"].append(row)
            print(json.dumps(row))
            row = block_training_times(model, args.batch, dtype)
            report["blocks"].append(row)
            print(json.dumps(row))
            for train in (False, True):
                row = model_times(model, args.batch, dtype, args.runs, train)
                report["models"].append(row)
                print(json.dumps(row))
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))


if __name__ == "__main__":
    main()
