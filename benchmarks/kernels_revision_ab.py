"""The CPU kernels of another git revision against this working tree's, in one process.

    PYTHONPATH=src python benchmarks/kernels_revision_ab.py --against 88673d0 --dtype bf16 --rounds 12
    PYTHONPATH=src python benchmarks/kernels_revision_ab.py --against 88673d0 --dtype bf16 --train --rounds 6
    PYTHONPATH=src python benchmarks/kernels_revision_ab.py --against HEAD~1 --model tnt_b_patch16_224 --batch 8

For a change to the C++ kernels alone (word attention, the whole inner block, the LayerNorm, the residual addition),
where timing two checkouts one after the other on a shared machine compares the machine's load more than the code:
the revision's kernel sources (`git show REV:src/tnt_vision/kernels/...`) are built beside this tree's (torch's
extension builder, cached per source), and the two builds are alternated (`bench.interleaved_times`: warm-up, order
rotated each round). First the operators alone at the model's sizes for --batch, fp32 and bf16, each result checked
against the other build's (within 1e-5, or one bf16 step: a change may reorder a sum); then the whole model, one set
of weights, with `kernels.cpu_kernels` answering with one build or the other. Medians with the batch, dtype, threads
and machine.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import ModuleType
from unittest import mock

import torch

from tnt_vision import kernels
from tnt_vision.bench import (
    ab_parser,
    constant,
    cpu_name,
    medians_ms,
    model_ab_line,
    model_ab_times,
    operator_medians_ms,
    set_threads,
)
from tnt_vision.kernels.inner_block import block_arguments
from tnt_vision.models import create_model
from tnt_vision.models.layers import TransformerBlock
from tnt_vision.models.tnt import TNTConfig

ROOT = Path(__file__).resolve().parents[1]
KERNELS = Path("src/tnt_vision/kernels")


def revision_sources(revision: str, into: Path) -> Path:
    """The kernel sources of `revision` written into `into` (a file added after it left out: its sources do not
    use it); one clear line where git does not have the kernels there."""
    first = kernels.SOURCES[0]  # the module itself: a revision without it has no kernels
    for name in kernels.SOURCES + kernels.HEADERS:
        shown = subprocess.run(
            ["git", "show", f"{revision}:{(KERNELS / name).as_posix()}"], cwd=ROOT, capture_output=True, check=False
        )
        if shown.returncode != 0 and name == first:
            reason = (shown.stderr.decode(errors="replace").strip().splitlines() or ["git failed"])[0]
            raise SystemExit(f"--against {revision}: no {KERNELS / name} there ({reason})")
        if shown.returncode == 0:
            (into / name).write_bytes(shown.stdout)
    return into


def answering(build: ModuleType) -> AbstractContextManager[object]:
    """Every kernel call of the model served by `build`."""
    return mock.patch.object(kernels, "cpu_kernels", constant(build))


def operators(builds: dict[str, ModuleType], args: argparse.Namespace) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        print(f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}, batch {args.batch}:")
        for what, (function, call) in operator_calls(create_model(args.model).cfg, args.batch, dtype).items():
            if not all(hasattr(build, function) for build in builds.values()):
                print(f"  {what}: not in {args.against}'s kernels")
                continue
            check_same(*(call(build) for build in builds.values()), bf16=dtype == torch.bfloat16)
            timed = {name: (lambda b=build, c=call: c(b)) for name, build in builds.items()}
            (this, that), (ours, theirs) = builds, operator_medians_ms(timed, args.rounds).values()
            print(f"  {what}: {this} {ours:.3f} ms, {that} {theirs:.3f} ms ({theirs / ours:.2f}x)")


def operator_calls(
    cfg: TNTConfig, batch: int, dtype: torch.dtype
) -> dict[str, tuple[str, Callable[[ModuleType], object]]]:
    """Each kernel at the model's sizes for `batch`, as the build's function it needs and a call on a build (its
    inputs made here, once, so that a timed call is the kernel alone): the words' attention and its backward, their
    LayerNorm, the outer stream's first residual addition with the second norm (the branch and the norm's output in
    `dtype`, into a fresh sum), the inner MLP's GELU backward with fc1's bias sums (the gradient copied into one
    buffer first: the kernel writes over it), the outer attention's softmax and the column sums of a gradient; in
    fp32, the whole inner block (`word_block`, inference)."""
    sentences = batch * cfg.grid_size[0] * cfg.grid_size[1]
    qkv = torch.randn(sentences, cfg.num_words, 3 * cfg.inner_dim).to(dtype)
    grad = torch.randn(sentences, cfg.num_words, cfg.inner_dim).to(dtype)
    words = torch.randn(sentences, cfg.num_words, cfg.inner_dim)
    stream = torch.randn(batch, 1 + sentences // batch, cfg.outer_dim)
    branch = torch.randn_like(stream).to(dtype)
    heads, scale, bf16 = cfg.inner_heads, (cfg.inner_dim // cfg.inner_heads) ** -0.5, dtype == torch.bfloat16
    inner, outer = norm(cfg.inner_dim), norm(cfg.outer_dim)

    def add_and_norm(build: ModuleType) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty_like(stream)
        return out, build.add_rows(stream, branch, out, *outer, 1e-5, bf16)

    hidden = torch.randn(sentences * cfg.num_words, int(cfg.inner_dim * cfg.mlp_ratio)).to(dtype)
    hidden_grad, written = torch.randn_like(hidden), torch.empty_like(hidden)
    tokens = stream.shape[1]
    scores = (torch.randn(batch, cfg.outer_heads, tokens, tokens) * 3).to(dtype)

    def gelu_backward(build: ModuleType) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in build.gelu_backward_and_value(written.copy_(hidden_grad), hidden, True))

    block = TransformerBlock(cfg.inner_dim, heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias)
    weights, qkv_bias, _, eps = block_arguments(block)
    weights, qkv_bias = [w.detach() for w in weights], None if qkv_bias is None else qkv_bias.detach()
    whole_block = {  # fp32 words in both settings (their stream is fp32 under bf16 autocast): timed once
        f"inner block {tuple(words.shape)}": (
            "word_block_forward",
            lambda b: b.word_block_forward(words, weights, qkv_bias, heads, scale, eps),
        )
    }
    return {
        **(whole_block if dtype == torch.float32 else {}),
        f"word attention {tuple(qkv.shape)}": (
            "word_attention_forward",
            lambda b: b.word_attention_forward(qkv, heads, scale),
        ),
        "its backward": ("word_attention_backward", lambda b: b.word_attention_backward(grad, qkv, heads, scale)),
        f"LayerNorm {tuple(words.shape)}": ("layer_norm", lambda b: b.layer_norm(words, *inner, 1e-5, bf16)),
        f"add + LayerNorm {tuple(stream.shape)}": ("add_rows", add_and_norm),
        # the GELU backward took its third argument (the sums) with column_sums
        f"GELU backward + sums {tuple(hidden.shape)}": ("column_sums", gelu_backward),
        f"softmax {tuple(scores.shape)}": ("softmax_rows", lambda b: b.softmax_rows(scores)),
        f"column sums {tuple(hidden.shape)}": ("column_sums", lambda b: b.column_sums(hidden_grad)),
    }


def norm(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm's weight and bias, the same for both builds."""
    generator = torch.Generator().manual_seed(width)
    return torch.randn(width, generator=generator), torch.randn(width, generator=generator)


def check_same(a: object, b: object, bf16: bool) -> None:
    tolerance = {"atol": 1e-5, "rtol": 2**-7 if bf16 else 1e-5}
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b), strict=True):
        torch.testing.assert_close(x, y, **tolerance)


def main() -> None:
    parser = ab_parser(__doc__, rounds=8)
    parser.add_argument("--against", required=True, help="the git revision whose kernels to compare against")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    mine = kernels.cpu_kernels()
    if mine is None:
        raise SystemExit("the CPU kernels could not be built here; nothing to compare")
    with tempfile.TemporaryDirectory() as workdir:
        other = kernels.build_cpu_kernels(directory=revision_sources(args.against, Path(workdir)))
    builds = {"this tree": mine, args.against: other}
    print(f"{threads} threads, {cpu_name()}, torch {torch.__version__}; medians of {args.rounds} rounds")
    operators(builds, args)
    functions = [name for name in dir(mine) if not name.startswith("_") and callable(getattr(mine, name))]
    missing = [name for name in functions if not hasattr(other, name)]
    if missing:  # its other functions' signatures may differ too: the Python here calls this tree's
        raise SystemExit(f"--against {args.against}: its kernels lack {', '.join(missing)}: no whole-model run")
    variants = {"this tree": None, args.against: lambda: answering(other)}
    print(model_ab_line(args, medians_ms(model_ab_times(args, variants, dtype=args.dtype)), args.dtype))


if __name__ == "__main__":
    main()
