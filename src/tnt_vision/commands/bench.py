"""`tnt bench`: images/s, latency and peak memory of a model against timm / onnxruntime, side by side."""

from __future__ import annotations

import argparse
import json

from ..bench import BenchConfig, format_table, run_benchmark
from ..io import atomic_write


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure throughput, latency and peak memory against other implementations")
    p.add_argument("--model", required=True, help="registered model name, e.g. tnt_s_patch16_224")
    p.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="CONTENDER",
        help="timm (same architecture in timm), timm:NAME (any timm model), onnxruntime, or a registered "
        "name; repeatable",
    )
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16 means autocast")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--train", action="store_true", help="time a training step: forward + backward + AdamW")
    p.add_argument("--compile", action="store_true", help="torch.compile every PyTorch contender (in the warm-up)")
    g = p.add_argument_group("measurement")
    g.add_argument("--runs", type=int, default=5, help="timed rounds; the median is reported")
    g.add_argument("--warmup", type=int, default=2, help="untimed calls per contender first")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    g.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency rounds")
    g.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak memory probes")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the full results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = BenchConfig(
        model=args.model,
        against=tuple(args.against),
        batch=args.batch,
        img_size=args.img_size,
        dtype=args.dtype,
        train=args.train,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        latency=not args.no_latency,
        memory=not args.no_memory,
        compile=args.compile,
    )
    report = run_benchmark(cfg)
    print(format_table(report))
    if args.json:
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    return 0
