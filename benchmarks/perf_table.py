"""Regenerate the README's performance table: TNT-Ti/S/B against timm's TNT and timm's DeiT-S.

    PYTHONPATH=src python benchmarks/perf_table.py --models tnt_s_patch16_224 --out benchmarks/results
    PYTHONPATH=src python benchmarks/perf_table.py --device cuda --batch 256 --settings bf16-infer fp32-infer

Each (model, setting) is one `tnt bench` measurement (interleaved contenders, median of --runs rounds,
fresh-process peak memory); the script writes every report as JSON and the table as Markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tnt_vision.bench import BenchConfig, ratio_range, run_benchmark
from tnt_vision.io import atomic_write

MODELS = ("tnt_ti_patch16_224", "tnt_s_patch16_224", "tnt_b_patch16_224")
DEIT_S = "timm:deit_small_patch16_224"
SETTINGS = {
    "fp32-infer": {"dtype": "fp32", "train": False},
    "bf16-infer": {"dtype": "bf16", "train": False},
    "fp32-train": {"dtype": "fp32", "train": True},
    "bf16-train": {"dtype": "bf16", "train": True},
}


def measure(model: str, setting: str, args: argparse.Namespace) -> dict:
    against = ["timm", DEIT_S]
    if setting == "fp32-infer" and args.onnxruntime and not args.compile and args.device == "cpu":
        against.append("onnxruntime")
    cfg = BenchConfig(
        model=model,
        against=tuple(against),
        batch=args.batch,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        latency=setting == "fp32-infer" and not args.compile,  # batch 1 would be another compilation
        memory=args.memory,
        compile=args.compile,
        device=args.device,
        **SETTINGS[setting],
    )
    return run_benchmark(cfg)


def markdown(reports: list[dict]) -> str:
    """One row per (model, setting, contender); ratios are against this project's model in the same run."""
    m = reports[0]["machine"]
    where = m["gpu"] if reports[0]["config"]["device"] == "cuda" else f"{m['cpu']} ({m['cpu_capability']})"
    lines = [
        f"Measured on {where}, {m['threads']} threads, torch {m['torch']}; "
        f"median of {reports[0]['config']['runs']} interleaved runs (per round: ours / it in each round, "
        "median (lowest-highest); spread: (max - min) / median of a contender's runs); peak memory is the whole "
        f"process (importing torch + timm alone: {m.get('import_baseline_mib', float('nan')):.0f} MiB).",
        "",
        "| model | setting | batch | contender | images/s | ours / it | per round | spread | batch-1 ms | peak MiB "
        "| ours / it |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rep in reports:
        c = rep["config"]
        setting = f"{c['dtype']} {'train' if c['train'] else 'inference'}" + (" compiled" if c["compile"] else "")
        ours = rep["results"][0]
        for r in rep["results"]:
            who = "tnt-vision" if r is ours else r["contender"].replace("timm:", "timm ")
            who = "timm TNT" if who == "timm" else who
            latency = f"{r['latency_ms']:.0f}" if r["latency_ms"] is not None else "-"
            memory = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
            mem_ratio = f"{ours['peak_mib'] / r['peak_mib']:.2f}" if r["peak_mib"] is not None else "-"
            lines.append(
                f"| {c['model']} | {setting} | {c['batch']} | {who} | {r['images_per_s']:.2f} | "
                f"{ours['images_per_s'] / r['images_per_s']:.2f} | {per_round(r, r is ours)} | {r['spread']:.0%} | "
                f"{latency} | {memory} | {mem_ratio} |"
            )
    return "\n".join(lines) + "\n"


def per_round(row: dict, ours: bool) -> str:
    """ours / it in each round (`bench.round_ratios`): median (lowest-highest)."""
    if ours:
        return "-"
    return ratio_range([1 / r for r in row["speed_ratio_rounds"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=tuple(SETTINGS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-onnxruntime", dest="onnxruntime", action="store_false")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the fresh-process probes")
    p.add_argument("--compile", action="store_true", help="torch.compile every contender (compiled vs compiled)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: CUDA-event timing on the GPU")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    reports = []
    for model in args.models:
        for setting in args.settings:
            report = measure(model, setting, args)
            reports.append(report)
            name = f"{model}-{setting}{'-compiled' if args.compile else ''}-b{args.batch}.json"
            atomic_write(args.out / name, lambda tmp, r=report: tmp.write_text(json.dumps(r, indent=2) + "\n"))
    table = markdown(reports)
    atomic_write(args.out / "perf_table.md", lambda tmp: tmp.write_text(table))
    print(table)


if __name__ == "__main__":
    main()
