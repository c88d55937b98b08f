"""Images/s of the TNT feature pyramid (the detection backbone, without FPN and heads) at detection sizes.

PYTHONPATH=src python benchmarks/dense_backbone.py --model tnt_s_patch16_224 --size 800 1216 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from tnt_vision.dense import TNTFeaturePyramid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tnt_s_patch16_224")
    p.add_argument("--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = TNTFeaturePyramid(args.model).to(device).eval()
    x = torch.randn(args.batch_size, 3, *args.size, device=device)
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            out = model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.iters
    shapes = ", ".join(f"{tuple(v.shape[-2:])}" for v in out.values())
    print(
        f"{args.model} pyramid, {args.batch_size}x3x{args.size[0]}x{args.size[1]} fp32 eval on {device} "
        f"({torch.get_num_threads()} threads): {seconds:.2f} s/batch, {args.batch_size / seconds:.3f} images/s; "
        f"maps {shapes}"
    )


if __name__ == "__main__":
    main()
