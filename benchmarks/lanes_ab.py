"""The CPU kernels with 16-lane vectors (AVX-512) against the same kernels with 8 (AVX2's width), in one process.

    PYTHONPATH=src python benchmarks/lanes_ab.py --model tnt_s_patch16_224 --batch 32 --rounds 7
    PYTHONPATH=src python benchmarks/lanes_ab.py --batch 32 --rounds 5 --train --dtype bf16

On a CPU with AVX-512 the kernels are built with 16 fp32 values per vector; a second build here takes 8
(`TNT_VISION_LANES=8`), as they were before. First the operators at TNT-S's sizes (the words' attention forward
and backward over one batch of 32 images, LayerNorm over 24-channel rows and its backward, GELU's backward and
value over the MLPs' hidden layers), each result checked against the other build's; then the whole model, the
8-lane build swapped in for one contender (same weights). `bench.interleaved_times` alternates them (a warm-up
call each, order rotated every round); medians are printed with the batch, dtype, threads and machine, and for the
model also the median of the rounds' own ratios (a round's two calls run back to back: steadier where the
machine's speed drifts).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from types import ModuleType
from unittest import mock

import torch

from tnt_vision import kernels
from tnt_vision.bench import ab_parser, cpu_name, medians_ms, model_ab_times, operator_medians_ms, set_threads

Call = Callable[[ModuleType], object]


def operator_calls(dtype: torch.dtype) -> dict[str, Call]:
    """TNT-S's kernel calls, taking the module to use: the words' attention over a batch of 32 images, LayerNorm and
    GELU over one fp32 micro-batch of 8."""
    qkv = torch.randn(6272, 16, 72).to(dtype)
    grad_out = torch.randn(6272, 16, 24).to(dtype)
    rows, weight, bias = torch.randn(25088, 24) * 2 + 1, torch.randn(24), torch.randn(24)
    _, mean, rstd = torch.native_layer_norm(rows, [24], weight, bias, 1e-5)
    grad_rows = torch.randn_like(rows)
    hidden = {what: torch.randn(shape).to(dtype) for what, shape in (("inner", (25088, 96)), ("outer", (1576, 1536)))}
    return {
        "word attention": lambda m: m.word_attention_forward(qkv, 4, 6**-0.5),
        "word attention backward": lambda m: m.word_attention_backward(grad_out, qkv, 4, 6**-0.5),
        "LayerNorm, 24 channels": lambda m: m.layer_norm(rows, weight, bias, 1e-5, False),
        "LayerNorm backward, 24 channels": lambda m: m.layer_norm_backward(grad_rows, rows, mean, rstd, weight),
        **{
            f"GELU backward, value and sums, {what} MLP": lambda m, h=h: m.gelu_backward_and_value(
                torch.ones_like(h), h, True
            )
            for what, h in hidden.items()
        },
    }


def operators(builds: dict[str, ModuleType], dtype: torch.dtype, rounds: int) -> None:
    for what, call in operator_calls(dtype).items():
        results = [call(module) for module in builds.values()]
        for a, b in zip(*(r if isinstance(r, tuple) else (r,) for r in results), strict=True):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
        ms = operator_medians_ms({name: (lambda m=module, c=call: c(m)) for name, module in builds.items()}, rounds)
        print(f"  {what}: " + ", ".join(f"{name} {t:.2f} ms" for name, t in ms.items()))


def model_step(builds: dict[str, ModuleType], args: argparse.Namespace) -> None:
    def eight_lanes() -> ModuleType:  # a plain function: a Mock would keep every tensor it is called with
        return builds["8 lanes"]

    swapped = {"16 lanes": None, "8 lanes": lambda: mock.patch.object(kernels, "cpu_kernels", eight_lanes)}
    times = model_ab_times(args, swapped, args.dtype)
    ms = medians_ms(times)
    paired = statistics.median(a / b for a, b in zip(times["8 lanes"], times["16 lanes"], strict=True))
    what = "training step" if args.train else "inference"
    print(
        f"{args.model} {what}, batch {args.batch}, {args.dtype}: 16 lanes {ms['16 lanes']:.0f} ms, 8 lanes "
        f"{ms['8 lanes']:.0f} ms ({ms['8 lanes'] / ms['16 lanes']:.3f}x; median of the rounds' ratios {paired:.3f}x)"
    )


def main() -> None:
    parser = ab_parser(__doc__, rounds=7)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    wide = kernels.cpu_kernels()
    if wide is None or wide.lanes != 16:
        raise SystemExit("the kernels here are not built with 16 lanes (no AVX-512 or no compiler): nothing to compare")
    builds = {"16 lanes": wide, "8 lanes": kernels.build_cpu_kernels("TNT_VISION_LANES=8")}
    print(f"{threads} threads, {cpu_name()}, torch {torch.__version__}; medians")
    print(f"operators ({args.dtype}; LayerNorm's input always fp32):")
    operators(builds, torch.bfloat16 if args.dtype == "bf16" else torch.float32, max(args.rounds, 15))
    model_step(builds, args)


if __name__ == "__main__":
    main()
