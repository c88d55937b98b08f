"""The CPU word-attention kernel against an earlier revision of it and against SDPA, in one process.

    PYTHONPATH=src python benchmarks/word_attention_ab.py --against HEAD~1 --rounds 12

Builds the CPU kernels (`src/tnt_vision/kernels/*.cpp`) as they are in the working tree (what tnt-vision uses)
and as they were at git revision `--against` (same flags, its own extension name), then alternates three contenders on
the inner attention of TNT-Ti, TNT-S and TNT-B at `--batch` images (196 sentences of 16 words each): this kernel,
the other revision's, and the model's path without the kernel (`Attention.mix`: `scaled_dot_product_attention`
with its permutes; its backward through autograd). Forward and backward are timed separately, round 0 warms up;
medians are printed with the threads and machine, and every contender's output and gradient is checked against
this kernel's.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch.utils import cpp_extension

from tnt_vision.bench import cpu_name
from tnt_vision.kernels import _CFLAGS, _DIR, cpu_kernels
from tnt_vision.models.layers import Attention

# The paper's models: inner width and heads.
MODELS = {"TNT-Ti": (12, 2), "TNT-S": (24, 4), "TNT-B": (40, 4)}
WORDS = 16
# A contender: forward() -> output, and backward(output) -> the gradient with respect to q/k/v.
Contender = tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def git(*args: str) -> str:
    """git's output, or one line saying why it failed (an unknown revision, no repository)."""
    try:
        return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        reason = getattr(error, "stderr", None) or str(error)
        raise SystemExit(f"git {' '.join(args)}: {reason.strip().splitlines()[0]}") from None


def build_revision(revision: str) -> ModuleType:
    """The kernels' sources (every .cpp and .h beside them) at a git revision, compiled like the working tree's."""
    top = Path(git("rev-parse", "--show-toplevel").strip()).resolve()
    folder = _DIR.resolve().relative_to(top).as_posix()
    listing = git("ls-tree", "--name-only", f"{revision}:{folder}").split()
    names = [name for name in listing if name.endswith((".cpp", ".h"))]
    workdir, digest = Path(tempfile.mkdtemp()), hashlib.sha256()
    for name in names:
        text = git("show", f"{revision}:{folder}/{name}")
        (workdir / name).write_text(text)
        digest.update(text.encode())
    return cpp_extension.load(
        name=f"tnt_vision_ab_{digest.hexdigest()[:12]}",
        sources=[str(workdir / name) for name in names if name.endswith(".cpp")],
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
    )


def kernel(module: ModuleType, qkv: torch.Tensor, grad: torch.Tensor, heads: int, scale: float) -> Contender:
    return (
        lambda: module.word_attention_forward(qkv, heads, scale),
        lambda out: module.word_attention_backward(grad, qkv, heads, scale),
    )


def sdpa(qkv: torch.Tensor, grad: torch.Tensor, heads: int) -> Contender:
    """The model's own path where the kernel does not apply: `Attention.mix` through SDPA."""
    attention = Attention(qkv.shape[-1] // 3, heads)
    attention.word_kernel_applies = lambda qkv, tokens: False  # type: ignore[method-assign]
    leaf = qkv.clone().requires_grad_()
    return lambda: attention.mix(leaf), lambda out: torch.autograd.grad(out, leaf, grad)[0]


def timed(run: Callable[..., torch.Tensor], *args: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = run(*args)
    return time.perf_counter() - start, result


def compare(contenders: dict[str, Contender], rounds: int) -> dict[str, tuple[float, float, float]]:
    """Median forward and backward seconds per contender, alternating, and its largest difference from the first."""
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in contenders}
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i in range(rounds + 1):
        for name, (forward, backward) in contenders.items():
            forward_time, out = timed(forward)
            backward_time, grad = timed(backward, out)
            results[name] = out.detach(), grad
            if i:  # round 0 warms up
                times[name][0].append(forward_time)
                times[name][1].append(backward_time)
    first = results[next(iter(contenders))]
    return {
        name: (
            statistics.median(forward_times),
            statistics.median(backward_times),
            max((a - b).abs().max().item() for a, b in zip(results[name], first, strict=True)),
        )
        for name, (forward_times, backward_times) in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="HEAD", help="git revision of the other kernel (default HEAD)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    current = cpu_kernels()
    if current is None:
        raise SystemExit("the CPU kernels could not be built here: nothing to compare")
    modules = {"this kernel": current, f"kernel at {args.against}": build_revision(args.against)}
    print(f"fp32, batch {args.batch}, {args.threads} threads, {cpu_name()}, torch {torch.__version__}")
    print("| model | contender | forward ms | backward ms | this kernel's speed-up, fwd / bwd | max difference |")
    print("|---|---|---|---|---|---|")
    for model, (width, heads) in MODELS.items():
        qkv = torch.randn(args.batch * 196, WORDS, 3 * width)
        grad = torch.randn(args.batch * 196, WORDS, width)
        scale = (width // heads) ** -0.5
        contenders = {name: kernel(module, qkv, grad, heads, scale) for name, module in modules.items()}
        contenders["SDPA"] = sdpa(qkv, grad, heads)
        medians = compare(contenders, args.rounds)
        ours_forward, ours_backward, _ = medians["this kernel"]
        for name, (forward, backward, difference) in medians.items():
            print(
                f"| {model} | {name} | {forward * 1e3:.2f} | {backward * 1e3:.2f} | "
                f"{forward / ours_forward:.2f}x / {backward / ours_backward:.2f}x | {difference:.1e} |"
            )


if __name__ == "__main__":
    main()
