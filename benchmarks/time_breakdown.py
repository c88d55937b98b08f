"""Where a TNT forward (or training step) spends its time, tnt-vision against timm: products, attention, the rest.

    PYTHONPATH=src python benchmarks/time_breakdown.py --model tnt_s_patch16_224 --batch 32 --rounds 5
    PYTHONPATH=src python benchmarks/time_breakdown.py --batch 32 --train --rounds 3
    PYTHONPATH=src python benchmarks/time_breakdown.py --batch 1 --rounds 20
    PYTHONPATH=src python benchmarks/time_breakdown.py --batch 32 --train --rounds 1 --shapes 12
    PYTHONPATH=src python benchmarks/time_breakdown.py --device cuda --dtype bf16 --batch 256 --ops 15

Each round profiles one call of each contender (`bench.interleaved_times`: after an untimed warm-up call each,
the order rotated from round to round) with
torch.profiler and sorts the operators' self time into matrix products (GEMMs: linear layers, batched products),
attention kernels (SDPA, softmax, tnt-vision's word attention) and the rest (wall time minus both). The
medians are printed with the batch, dtype, threads and machine, then the bound they imply: timm's time over
tnt-vision's time in products and attention is the most any implementation using these GEMMs could gain over
timm, were all its other work free. With --shapes N, one more profiled call of each contender lists its N
costliest matrix-product shapes with their GFLOP/s (the machine's GEMM rate for them); with --ops N, its N
costliest operators of any kind. On a GPU (--device cuda) the times are the kernels' device time per operator.
"""

from __future__ import annotations

import functools
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from tnt_vision.bench import (
    BenchConfig,
    Step,
    ab_parser,
    build_step,
    cpu_name,
    interleaved_times,
    make_inputs,
    set_threads,
    synchronize,
)

PRODUCTS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_addmm_activation",
    "mkldnn::_linear_pointwise",
)
ATTENTION = ("scaled_dot_product", "softmax", "word_attention")
KINDS = ("products", "attention", "rest")


def kind(op: str) -> str:
    if op in PRODUCTS:
        return "products"
    return "attention" if any(part in op for part in ATTENTION) else "rest"


def profiled(step: Step, x: torch.Tensor, device: str, shapes: bool = False) -> tuple[Any, float]:
    """One call under torch.profiler (with the GPU's kernels on cuda): the profile and the call's wall ms."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=shapes) as prof:
        synchronize(device)
        start = time.perf_counter()
        step(x)
        synchronize(device)
        wall = (time.perf_counter() - start) * 1e3
    return prof, wall


def self_ms(event: Any, device: str) -> float:
    """An operator's own time: its kernels' device time on a GPU, its CPU time otherwise."""
    return (event.self_device_time_total if device == "cuda" else event.self_cpu_time_total) / 1e3


def profiled_call(step: Step, x: torch.Tensor, device: str = "cpu") -> dict[str, float]:
    """Milliseconds of one call: wall time, and its operators' self time per kind (the rest is what is left)."""
    prof, wall = profiled(step, x, device)
    spent = {"products": 0.0, "attention": 0.0}
    for event in prof.key_averages():
        if (k := kind(event.key)) in spent:
            spent[k] += self_ms(event, device)
    return {"total": wall, **spent, "rest": wall - sum(spent.values())}


def breakdown(steps: dict[str, Step], inputs: list[torch.Tensor], cfg: BenchConfig) -> dict[str, dict[str, float]]:
    """Median milliseconds per kind for each contender: `cfg.runs` interleaved rounds after `cfg.warmup` calls."""
    measure = functools.partial(profiled_call, device=cfg.device)
    calls = interleaved_times(steps, inputs, cfg, measure=measure)
    return {name: {k: statistics.median(c[k] for c in runs) for k in runs[0]} for name, runs in calls.items()}


def product_shapes(step: Step, x: torch.Tensor, top: int, device: str = "cpu") -> list[str]:
    """The `top` matrix products of one call by time: operator, operand shapes, calls, ms and GFLOP/s."""
    prof, _ = profiled(step, x, device, shapes=True)
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        ms = self_ms(event, device)
        if event.key not in PRODUCTS or ms == 0:
            continue
        a, b = matrices(event.key, event.input_shapes)
        flops = 2 * math.prod(a) * b[-1] * event.count
        rows.append((ms, f"{event.key} {a} x {b}: {event.count} calls, {ms:.1f} ms, {flops / ms / 1e6:.0f} GFLOP/s"))
    return [line for _, line in sorted(rows, reverse=True)[:top]]


def costliest_operators(step: Step, x: torch.Tensor, top: int, device: str = "cpu") -> list[str]:
    """The `top` operators of one call by self time, of any kind: name, calls, ms."""
    prof, _ = profiled(step, x, device)
    rows = [(self_ms(e, device), f"{e.key}: {e.count} calls, {self_ms(e, device):.2f} ms") for e in prof.key_averages()]
    return [line for ms, line in sorted(rows, reverse=True)[:top] if ms > 0]


def matrices(op: str, shapes: list[list[int]]) -> tuple[list[int], list[int]]:
    """The two operands' shapes of a product (oneDNN's linear: input and (out, in) weight, as (in, out))."""
    if op == "aten::addmm":
        return shapes[1], shapes[2]
    if op == "mkldnn::_linear_pointwise":
        weight = next(shape for shape in shapes[1:] if len(shape) == 2)
        return shapes[0], weight[::-1]
    return shapes[0], shapes[1]


def report(cfg: BenchConfig, medians: dict[str, dict[str, float]], threads: int) -> str:
    what = "training step (forward, backward, AdamW)" if cfg.train else "inference forward"
    lines = [
        f"{cfg.model}, {what}, batch {cfg.batch}, {cfg.dtype}, {threads} threads, {where(cfg.device)}, "
        f"torch {torch.__version__}; medians in ms",
        "| contender | total | products | attention | rest |",
        "|---|---|---|---|---|",
    ]
    for name, m in medians.items():
        shares = " | ".join(f"{m[k]:.1f} ({m[k] / m['total']:.0%})" for k in KINDS)
        lines.append(f"| {name} | {m['total']:.1f} | {shares} |")
    ours, timm = medians[cfg.model], medians["timm"]
    lines += [
        f"measured: tnt-vision {timm['total'] / ours['total']:.2f}x timm",
        f"bound with these products and attention kernels: "
        f"{timm['total'] / (ours['products'] + ours['attention']):.2f}x timm",
    ]
    return "\n".join(lines)


def where(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def main() -> None:
    parser = ab_parser(__doc__, rounds=5)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--shapes", type=int, default=0, help="also list the N costliest product shapes")
    parser.add_argument("--ops", type=int, default=0, help="also list the N costliest operators of any kind")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    setting = {"batch": args.batch, "img_size": args.img_size, "dtype": args.dtype, "train": args.train}
    setting |= {"runs": args.rounds, "warmup": 1 if args.device == "cpu" else 3, "device": args.device}
    cfg = BenchConfig(model=args.model, against=("timm",), **setting)
    threads = set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        steps = {name: build_step(name, cfg, Path(tmp)) for name in cfg.contenders}
        inputs = make_inputs(cfg, cfg.batch)
        print(report(cfg, breakdown(steps, inputs, cfg), threads))
        for name, step in steps.items() if args.shapes else ():
            print(f"{name}:", *product_shapes(step, inputs[0], args.shapes, args.device), sep="\n  ")
        for name, step in steps.items() if args.ops else ():
            print(f"{name}:", *costliest_operators(step, inputs[0], args.ops, args.device), sep="\n  ")


if __name__ == "__main__":
    main()
