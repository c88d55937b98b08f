"""Compile the fused inner block's Triton kernels for every autotuner configuration, in parallel processes.

    PYTHONPATH=src python benchmarks/gpu_warm_cache.py --workers 6

Triton's autotuner compiles its configurations one after another, in the process that first calls the kernel,
and again for each specialization of the arguments (sentence counts that are or are not multiples of 16, the
dtypes a model passes in each mode). For the fused block that is tens of seconds per kernel, paid by every timing
process of a GPU session. This runs the session's workloads (the models' bf16-autocast training steps, fp32
inference, the GPU tests' modes) in `--workers` processes, each with every autotuner narrowed to one
configuration of its own, and replays each launch at the sentence counts the session uses: the kernels land in
Triton's on-disk cache, where the later processes' autotuners find them. It times nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch

from tnt_vision import create_model
from tnt_vision.kernels import inner_block as ib
from tnt_vision.kernels import triton_block as tb

MODELS = ("tnt_s_patch16_224", "tnt_ti_patch16_224", "tnt_b_patch16_224")
# The self-check's sample (255: not a multiple of 16) and batch 256 of 196 patches (50176: a multiple of 16 whose
# bit length, the autotuner's size class, is 16 too): with a model's own call, every specialization the session meets.
SENTENCES = (255, 50176)


def replaying(launch: Callable[..., Any], sentences: tuple[int, ...]) -> Callable[..., Any]:
    """`launch` (the forward's or the backward's), which first runs again on its inputs repeated to each count."""

    def replay(*args: Any, scales: torch.Tensor | None = None, **kwargs: Any) -> Any:
        rows = args[0].shape[0]
        for n in sentences:
            index = torch.arange(n, device=args[0].device) % rows
            grown = [a[index] if isinstance(a, torch.Tensor) and a.shape[:1] == (rows,) else a for a in args]
            launch(*grown, scales=None if scales is None else scales[index], **kwargs)
        return launch(*args, scales=scales, **kwargs)

    return replay


ORIGINAL = {id(t): list(t.configs) for tuners in (ib.FORWARD, ib.BACKWARD) for t in tuners.values()}


def narrowed(worker: int, c_pad: int) -> None:
    """Every autotuner left with one configuration: this worker's (modulo each list's length) among those it
    would try for a shape of `c_pad` padded columns (the backward's pruning keeps fewer away from TNT-S's)."""
    for tuners in (ib.FORWARD, ib.BACKWARD):
        for tuner in tuners.values():
            configs = ORIGINAL[id(tuner)]
            if tuners is ib.BACKWARD:
                configs = tb.verified_backward(configs, {}, M_PAD=16, C_PAD=c_pad)
            tuner.configs = [configs[worker % len(configs)]]


MODES = ("bf16", "fp32", "fp16", "tf32", "bf16-weights")


def modes(name: str) -> Iterator[tuple[str, contextlib.AbstractContextManager[Any], bool]]:
    """(label, context, train) of each mode the session runs this model in: the tables' bf16-autocast training
    and inference for every model; TNT-S's fp32 rows and the GPU tests' modes."""
    yield "bf16", torch.autocast("cuda", torch.bfloat16), True
    if name == "tnt_s_patch16_224":
        yield "fp32", contextlib.nullcontext(), True
        yield "fp16", torch.autocast("cuda", torch.float16), False
        yield "tf32", _matmul_precision("high"), False


@contextlib.contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def warm(worker: int, sentences: tuple[int, ...], kept: tuple[str, ...], device: str = "cuda") -> str:
    """Run the `kept` modes of every model once with this worker's configurations; a line of what it took."""
    start = time.perf_counter()
    ib._launch = replaying(ib._launch, sentences)
    ib._launch_backward = replaying(ib._launch_backward, sentences)
    for name in MODELS:
        model = create_model(name, depth=2, img_size=64, num_classes=10).to(device)
        narrowed(worker, ib._pow2(model.blocks[0].inner.norm1.weight.shape[0]))
        x = torch.randn(5, 3, 64, 64, device=device)
        for label, context, train in modes(name):
            if label not in kept:
                continue
            with context:
                if train:
                    model.train()(x).float().mean().backward()
                else:
                    with torch.inference_mode():
                        model.eval()(x)
        if "bf16-weights" in kept:  # the GPU tests' 16-bit weights
            with torch.inference_mode():
                model.bfloat16().eval()(x.bfloat16())
    checked = sum(ok for ok in ib._CHECKED.values())
    return f"worker {worker}: {checked}/{len(ib._CHECKED)} kernels checked, {time.perf_counter() - start:.0f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=max(map(len, (ib.CONFIGS, ib.EXACT_CONFIGS))))
    p.add_argument("--sentences", type=int, nargs="*", default=list(SENTENCES), help="counts each launch replays")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1")
    args = p.parse_args()
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        options = (tuple(args.sentences), tuple(args.modes), args.device)
        jobs = [pool.submit(warm, w, *options) for w in range(args.workers)]
        for job in jobs:
            print(job.result(), flush=True)
    print(f"warm in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
