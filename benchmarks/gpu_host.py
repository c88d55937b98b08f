"""Where the host's time goes while it issues one GPU inference forward: tnt-vision's TNT against timm's DeiT-S.

    PYTHONPATH=src python benchmarks/gpu_host.py --batch 256 --dtype bf16
    PYTHONPATH=src python benchmarks/gpu_host.py --device cpu --batch 1 --rounds 3   # the wiring, on a CPU

TNT-S's bf16 inference on a GPU waits on the host about as long as on the GPU (`benchmarks/README.md`). For each
contender, in interleaved rounds (`bench.interleaved_times`, medians): the host's ms to issue a forward (the GPU
not waited for) and the forward's ms (CUDA events). Then, for one more forward of each, torch.profiler's view: the
GPU's busy time (its kernels' device time summed; a forward taking longer waits on the host) and the host-side
entries by their own CPU time (operators and CUDA runtime calls, where a synchronising call such as
`cudaStreamSynchronize` or a blocking copy would show); and cProfile's: the count of Python calls and the
functions by their own time, by their cumulative time and by their calls.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from tnt_vision.bench import (
    BenchConfig,
    Step,
    build_module,
    inference_step,
    interleaved_times,
    issue_seconds,
    make_inputs,
    synchronize,
)

CONTENDERS = ("timm:deit_small_patch16_224",)


def host_operators(step: Step, x: torch.Tensor, device: str, top: int) -> list[str]:
    """One call under torch.profiler: the GPU's busy time (its kernels' device time summed, each kernel once: the
    operators' entries count their kernels again; a forward taking longer waits on its host), then the `top`
    host-side entries by their own CPU time: name, calls, ms."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step(x)
        synchronize(device)
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    lines = [f"GPU busy {busy:.2f} ms (kernels' device time summed)"]
    return lines + [f"{e.key}: {e.count} calls, {e.self_cpu_time_total / 1e3:.2f} ms" for e in by_host[:top]]


def python_functions(step: Step, x: torch.Tensor, device: str, top: int) -> tuple[int, str, str, str]:
    """cProfile of one call: the number of Python calls, and the `top` functions by own time, by cumulative time
    and by their number of calls (where the calls come from)."""
    profiler = cProfile.Profile()
    profiler.enable()
    step(x)
    profiler.disable()
    synchronize(device)
    listings = []
    for order in ("tottime", "cumtime", "ncalls"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(order).print_stats(top)
        listings.append(text.getvalue().split("\n\n", 2)[-1].rstrip())
    return pstats.Stats(profiler).total_calls, *listings  # type: ignore[attr-defined]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tnt_s_patch16_224")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--top", type=int, default=25, help="entries listed of each profile")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = p.parse_args()
    cfg = BenchConfig(model=args.model, against=CONTENDERS, batch=args.batch, dtype=args.dtype, runs=args.rounds,
                      warmup=3, device=args.device)  # fmt: skip
    steps = {name: inference_step(build_module(name, cfg.model, cfg.img_size), cfg) for name in cfg.contenders}
    inputs = make_inputs(cfg, cfg.batch)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}, batch {cfg.batch}, {cfg.dtype} inference; medians of {cfg.runs}")
    issued = interleaved_times(steps, inputs, cfg, measure=lambda s, x: issue_seconds(s, x, args.device))
    device_s = interleaved_times(steps, inputs, cfg)
    for name in steps:
        host, forward = (statistics.median(times[name]) * 1e3 for times in (issued, device_s))
        ratio = statistics.median(i / d for i, d in zip(issued[name], device_s[name], strict=True))
        print(f"{name}: host {host:.2f} ms to issue a forward, {forward:.2f} ms a forward (host / forward {ratio:.2f})")
    x = inputs[0]
    for name, step in steps.items():
        calls, own, cumulative, counted = python_functions(step, x, args.device, args.top)
        report = [f"== {name}: host operators by own CPU time", *host_operators(step, x, args.device, args.top)]
        report += [f"== {name}: {calls} Python calls; by own time", own, f"== {name}: by cumulative time", cumulative]
        report += [f"== {name}: by calls", counted]
        print(*report, sep="\n")


if __name__ == "__main__":
    main()
