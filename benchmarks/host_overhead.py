"""The host's work per forward: TNT-S's structure at widths where the arithmetic costs next to nothing.

    PYTHONPATH=src python benchmarks/host_overhead.py --rounds 15
    PYTHONPATH=src python benchmarks/host_overhead.py --dtype bf16 --rounds 15

TNT-S's twelve blocks, heads and layers, at an outer width of 24 and an inner width of 8, on 32 x 32 images (2 x 2
patches of 4 x 4 words), batch 1, inference: what a forward then costs is its Python, the operators' dispatch and
the fast paths' applicability tests, the part that does not shrink with the batch. As in TNT-S, the inner blocks
take the whole-block kernel in inference and the outer ones the layers (`contenders`). It bounds batch-1 latency on the
CPU and, with a GPU's launches on top, how fast the host can issue a GPU forward (TNT-S's bf16 inference on an H200
waits on the host: `benchmarks/README.md`). tnt-vision, timm's TNT and timm's DeiT-S at the same widths alternate
(`interleaved_times`), each timed over --calls forwards a round; medians in microseconds a forward, with the ratio
in each round. Beside them a count the machine's load does not move: the Python function calls of one forward
(cProfile; a C operator counts as one).
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from collections.abc import Callable

import torch

from tnt_vision.bench import (
    BenchConfig,
    ab_parser,
    cpu_name,
    inference_step,
    interleaved_times,
    never,
    round_ratios,
    set_threads,
    timm_equivalent,
)
from tnt_vision.models import TNT, get_spec

NARROW = {"img_size": 32, "outer_dim": 24, "inner_dim": 8, "num_classes": 10}


def contenders(model: str) -> dict[str, torch.nn.Module]:
    cfg = get_spec(model).config.replace(**NARROW)
    ours = TNT(cfg)
    for block in ours.blocks:  # TNT-S's 197 sentences of 384 never take the inner block's kernel; 5 of 24 would
        block.outer.cpu_kernel_applies = never
    return {
        "tnt-vision": ours,
        "timm TNT": timm_equivalent(cfg),
        "timm DeiT-S": timm_equivalent(cfg.replace(tnt_blocks=())),
    }


def per_forward(calls: int) -> Callable[[Callable[[torch.Tensor], object], torch.Tensor], float]:
    """Seconds a forward, over `calls` forwards in a row."""

    def measure(step: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            step(x)
        return (time.perf_counter() - start) / calls

    return measure


def python_calls(step: Callable[[torch.Tensor], object], x: torch.Tensor) -> int:
    """Function calls cProfile counts in one forward (each C operator called from Python counts once)."""
    profile = cProfile.Profile()
    profile.runcall(step, x)
    return pstats.Stats(profile).total_calls  # type: ignore[attr-defined]


def main() -> None:
    parser = ab_parser(__doc__, rounds=15, train=False)
    parser.add_argument("--calls", type=int, default=20, help="forwards timed together in a round")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    cfg = BenchConfig(model=args.model, batch=1, img_size=NARROW["img_size"], dtype=args.dtype, runs=args.rounds)
    steps = {name: inference_step(module, cfg) for name, module in contenders(args.model).items()}
    x = torch.randn(1, 3, cfg.img_size, cfg.img_size)
    times = interleaved_times(steps, [x], cfg, measure=per_forward(args.calls))
    counts = {name: python_calls(step, x) for name, step in steps.items()}
    print(
        f"{args.model}'s structure at widths 24/8, 32x32 images, batch 1, {args.dtype} inference, {threads} threads, "
        f"{cpu_name()}, torch {torch.__version__}; medians of {args.rounds} rounds of {args.calls} forwards"
    )
    print("| contender | us a forward | speed, tnt-vision / it: rounds' median (range) | Python calls a forward |")
    print("|---|---|---|---|")
    ours = times["tnt-vision"]
    for name, runs in times.items():
        ratios = round_ratios(runs, ours)
        ratio = "-" if runs is ours else f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        print(f"| {name} | {statistics.median(runs) * 1e6:.0f} | {ratio} | {counts[name]} |")


if __name__ == "__main__":
    main()
