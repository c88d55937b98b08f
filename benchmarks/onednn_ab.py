"""fp32 CPU inference with and without oneDNN's fused linear layers (`tnt_vision.kernels.onednn`), in one process.

    PYTHONPATH=src python benchmarks/onednn_ab.py --batch 32 --rounds 8
    PYTHONPATH=src python benchmarks/onednn_ab.py --batch 1 --rounds 40

Four contenders alternate forward passes on the same model and inputs (after one untimed warm-up round): plain
linear layers, oneDNN's fused ones with the weights in their plain layout, with the weights packed once in
oneDNN's layout with ATen's GELU in place on the output, and the same with the MLP's GELU as oneDNN's epilogue
(`onednn.GELU_EPILOGUE`; the default in fp32 on an AVX-512 CPU); the medians are printed with the batch, threads
and machine.
"""

from __future__ import annotations

import statistics
import time

import torch

from tnt_vision.bench import ab_parser, cpu_name, set_threads
from tnt_vision.kernels import onednn
from tnt_vision.models import create_model


def main() -> None:
    args = ab_parser(__doc__, rounds=8, train=False).parse_args()
    if not onednn.available():
        raise SystemExit("this PyTorch has no oneDNN: nothing to compare")
    threads = set_threads(args.threads)
    model = create_model(args.model).eval()
    inputs = [torch.randn(args.batch, 3, 224, 224) for _ in range(2)]
    defaults = onednn.available, onednn.packed, onednn.GELU_EPILOGUE
    with_onednn, with_packing, _ = defaults
    switches = {
        "plain linear layers": (lambda: False, with_packing, False),
        "oneDNN, plain weights": (with_onednn, lambda weight, rows, dtype=None: weight, False),
        "oneDNN, packed, ATen's GELU": (with_onednn, with_packing, False),
        "oneDNN, GELU epilogue": (with_onednn, with_packing, True),
    }
    times: dict[str, list[float]] = {name: [] for name in switches}
    with torch.inference_mode():
        for i in range(args.rounds + 1):
            for name, (onednn.available, onednn.packed, onednn.GELU_EPILOGUE) in switches.items():
                start = time.perf_counter()
                model(inputs[i % 2])
                if i:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
    onednn.available, onednn.packed, onednn.GELU_EPILOGUE = defaults
    print(f"{args.model}, fp32, batch {args.batch}, {threads} threads, {cpu_name()}, torch {torch.__version__}")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"{name:28s} median {median * 1e3:8.1f} ms  {args.batch / median:7.2f} images/s  ({len(runs)} runs)")


if __name__ == "__main__":
    main()
