"""Run the fused block's backward kernel in each configuration, each in its own process, on a GPU.

    PYTHONPATH=src python benchmarks/gpu_backward_configs.py [--sanitizer] [--models tnt_ti_patch16_224 ...]

On an H100 (torch 2.11, triton 3.6) the autotuned backward met an illegal memory access (and, in other
configurations, NaNs) at TNT-Ti's or TNT-B's shape, which poisons the whole process's CUDA context: this runs every
(model, precision, configuration, sentence count) alone, compares the gradients with the plain operators'
(`inner_block.reference_backward` at the same dtype: the largest relative error over the gradients), and prints a
line per case. `--sanitizer` runs each under compute-sanitizer's memcheck, which names the faulting access.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from tnt_vision import create_model
from tnt_vision.kernels import inner_block as ib
from tnt_vision.kernels import triton_block as tb

MODELS = ("tnt_ti_patch16_224", "tnt_b_patch16_224", "tnt_s_patch16_224")
SENTENCES = (80, 255, 50176)  # the three specializations a model meets (see gpu_warm_cache.py)


def case(name: str, precision: str, rows: int, warps: int, sentences: int, device: str = "cuda") -> str:
    """The largest relative error of the kernel's gradients against the plain operators' at the same dtype."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    block = create_model(name, depth=1).blocks[0].inner.to(device, dtype)
    x = torch.randn(sentences, 16, block.norm1.weight.shape[0], device=device, dtype=dtype)
    grad = torch.randn_like(x)
    got = ib.inner_block_backward(block, x, grad, precision=precision, config=(rows, warps))
    torch.cuda.synchronize() if device == "cuda" else None
    want = ib.reference_backward(grad, x, *ib.block_arguments(block))
    if block.attn.qkv.bias is None:  # the kernel's q/k/v bias slot is left zero
        got, want = got[:-1], want[:-1]
    pairs = zip(got, want, strict=True)
    errors = [(g.float() - w.float()).norm() / w.float().norm().clamp_min(1e-12) for g, w in pairs]
    return f"max relative error {max(errors).item():.2e}"


def cases(models: list[str], sentences: list[int], device: str) -> list[tuple[Any, ...]]:
    every = []
    for name, precision in itertools.product(models, ("bf16", "ieee")):
        configs = tb.EXACT_BACKWARD_CONFIGS if precision == "ieee" else tb.BACKWARD_CONFIGS
        every += [(name, precision, *config, n, device) for config, n in itertools.product(configs, sentences)]
    return every


def launch(arguments: tuple[Any, ...], sanitizer: bool) -> str:
    """One case in a fresh process: its result line, or the first line naming what went wrong."""
    command = [sys.executable, __file__, "--case", *map(str, arguments)]
    if sanitizer:
        command = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "3", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode == 0:  # the case's own line
        summary, verdict = done.stdout.strip().splitlines()[-1], "ok"
    else:  # the first line naming the fault (a Python error, or memcheck's "Invalid ... access")
        lines = (done.stdout + done.stderr).splitlines()
        faults = [line for line in lines if "Error" in line or "Invalid" in line]
        summary, verdict = (faults or lines[-1:] or ["no output"])[0].strip(), "FAILED"
    return f"{verdict} {' '.join(map(str, arguments))}: {summary[:200]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--sanitizer", action="store_true", help="each case under compute-sanitizer --tool memcheck")
    p.add_argument("--sentences", type=int, nargs="+", default=list(SENTENCES))
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1")
    p.add_argument("--case", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        name, precision, rows, warps, sentences, device = args.case
        print(case(name, precision, int(rows), int(warps), int(sentences), device), flush=True)
        return
    with ThreadPoolExecutor(args.jobs) as pool:
        every = cases(args.models, args.sentences, args.device)
        for line in pool.map(lambda c: launch(c, args.sanitizer), every):
            print(line, flush=True)


if __name__ == "__main__":
    main()
