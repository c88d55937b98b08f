"""Where the time of a TNT forward (or training step) goes, tnt-vision against timm: matrix products, the rest.

    PYTHONPATH=src python benchmarks/time_breakdown.py --model tnt_s_patch16_224 --batch 32 --rounds 5
    PYTHONPATH=src python benchmarks/time_breakdown.py --batch 32 --train --rounds 3
    PYTHONPATH=src python benchmarks/time_breakdown.py --batch 1 --rounds 20

Each round profiles one call of each contender (interleaved, after an untimed warm-up call each) with
torch.profiler and sorts the operators' self time into matrix products (GEMMs: linear layers, batched products),
attention kernels (SDPA, softmax, tnt-vision's word attention) and the rest (wall time minus both). The
medians are printed with the batch, dtype, threads and machine, then the bound they imply: timm's time over
tnt-vision's time in products and attention is the most any implementation using these GEMMs could gain over
timm, were all its other work free.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tnt_vision.bench import BenchConfig, Step, build_step, cpu_name, make_inputs, set_threads

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


def profiled_call(step: Step, x: torch.Tensor) -> dict[str, float]:
    """Milliseconds of one call: wall time, and its operators' self time per kind (the rest is what is left)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step(x)
        wall = (time.perf_counter() - start) * 1e3
    spent = dict.fromkeys(KINDS, 0.0)
    for event in prof.key_averages():
        spent[kind(event.key)] += event.self_cpu_time_total / 1e3
    spent["rest"] = wall - spent["products"] - spent["attention"]
    return {"total": wall} | spent


def breakdown(cfg: BenchConfig, rounds: int) -> dict[str, dict[str, float]]:
    """Median milliseconds per kind for each contender, calls interleaved round by round."""
    with tempfile.TemporaryDirectory() as tmp:
        steps = {name: build_step(name, cfg, Path(tmp)) for name in cfg.contenders}
        inputs = make_inputs(cfg, cfg.batch)
        for step in steps.values():
            step(inputs[0])
        calls: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
        for r in range(rounds):
            for name, step in steps.items():
                calls[name].append(profiled_call(step, inputs[r % len(inputs)]))
    return {name: {k: statistics.median(c[k] for c in runs) for k in runs[0]} for name, runs in calls.items()}


def report(cfg: BenchConfig, medians: dict[str, dict[str, float]], threads: int) -> str:
    what = "training step (forward, backward, AdamW)" if cfg.train else "inference forward"
    lines = [
        f"{cfg.model}, {what}, batch {cfg.batch}, {cfg.dtype}, {threads} threads, {cpu_name()}, "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tnt_s_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    cfg = BenchConfig(model=args.model, against=("timm",), batch=args.batch, dtype=args.dtype, train=args.train)
    threads = set_threads(args.threads)
    print(report(cfg, breakdown(cfg, args.rounds), threads))


if __name__ == "__main__":
    main()
