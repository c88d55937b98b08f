"""The compiled LayerNorm (forward, backward) for narrow rows and the fused GELU backward against ATen's, in one
process.

    PYTHONPATH=src python benchmarks/rows_ab.py --model tnt_s_patch16_224 --batch 32 --rounds 5
    PYTHONPATH=src python benchmarks/rows_ab.py --batch 32 --rounds 5 --train

Two contenders share one model (same weights): tnt-vision as it is, and tnt-vision with these kernels stepped
aside (ATen's LayerNorm and its backward for every row width, ATen's GELU and GELU-backward in the lean MLP's
backward pass, ATen's sums for the bias gradients). `bench.interleaved_times` alternates them (warm-up, order
rotated each round); medians are printed with the batch, threads and machine. First the operators alone at the
sizes of one micro-batch (8 images): the inner LayerNorm and its backward over TNT-S's 25088 rows of 24 channels
and TNT-Ti's 50176 of 12, and GELU's backward and value (with the bias gradient's column sums) over TNT-S's inner
and outer MLP's hidden layers; every kernel output is checked against ATen's. `bias_sums_ab.py` takes the column
sums alone.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator, Sequence
from unittest import mock

import torch
import torch.nn.functional as F

from tnt_vision import kernels
from tnt_vision.bench import (
    ab_parser,
    medians_ms,
    model_ab_times,
    never,
    operator_medians_ms,
    start_kernel_ab,
)
from tnt_vision.kernels import emulated_bf16
from tnt_vision.models import layers as tnt_layers


def aten_gelu_backward_and_value(
    grad: torch.Tensor, x: torch.Tensor, sums: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    grad_x = torch.ops.aten.gelu_backward(grad, x)
    return grad_x, F.gelu(x), aten_sum_rows(grad_x) if sums else None


def aten_sum_rows(x: torch.Tensor) -> torch.Tensor:
    return x.sum(tuple(range(x.ndim - 1)))


@contextlib.contextmanager
def aten_rows() -> Iterator[None]:
    """The kernels stepped aside, as without them (the LayerNorm's backward follows its forward's test)."""
    with contextlib.ExitStack() as stack:
        for module in (kernels, tnt_layers):
            stack.enter_context(mock.patch.object(module, "narrow_layer_norm_applies", never))
        stack.enter_context(mock.patch.object(emulated_bf16, "gelu_backward_and_value", aten_gelu_backward_and_value))
        stack.enter_context(mock.patch.object(emulated_bf16, "sum_rows", aten_sum_rows))
        yield


def operators(rounds: int) -> None:
    for rows, width in ((25088, 24), (50176, 12)):  # TNT-S's and TNT-Ti's words
        layer_norm_ms(rows, width, rounds)
    for rows, width, what in ((25088, 96, "inner"), (1576, 1536, "outer")):
        ms = gelu_ms(rows, width, rounds)
        print(
            f"GELU backward and value, {what} MLP ({rows} x {width}, with a copy of the gradient each): "
            f"kernel {ms['kernel']:.3f} ms, ATen {ms['aten']:.3f} ms"
        )


def layer_norm_ms(rows: int, width: int, rounds: int) -> None:
    x, weight, bias = torch.randn(rows, width) * 2 + 1, torch.randn(width), torch.randn(width)
    ms = checked_ms(
        lambda: kernels.native_layer_norm(x, [width], weight, bias, 1e-5),
        lambda: torch.native_layer_norm(x, [width], weight, bias, 1e-5),
        rounds,
    )
    print(f"LayerNorm, {rows} rows of {width}: kernel {ms['kernel']:.3f} ms, ATen {ms['aten']:.3f} ms")
    grad, needs = torch.randn_like(x), [True] * 3
    _, mean, rstd = torch.native_layer_norm(x, [width], weight, bias, 1e-5)
    ms = checked_ms(
        lambda: kernels.native_layer_norm_backward(grad, x, [width], mean, rstd, weight, bias, needs),
        lambda: torch.ops.aten.native_layer_norm_backward(grad, x, [width], mean, rstd, weight, bias, needs),
        rounds,
        atol=1e-3,  # the weight's gradient sums all rows
    )
    print(f"LayerNorm backward, {rows} rows of {width}: kernel {ms['kernel']:.3f} ms, ATen {ms['aten']:.3f} ms")


def checked_ms(
    kernel: Callable[[], Sequence[torch.Tensor]],
    aten: Callable[[], Sequence[torch.Tensor]],
    rounds: int,
    atol: float = 1e-5,
) -> dict[str, float]:
    """The two calls' medians (`operator_medians_ms`), after checking that they give the same tensors."""
    for a, b in zip(kernel(), aten(), strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    return operator_medians_ms({"kernel": kernel, "aten": aten}, rounds)


def gelu_ms(rows: int, width: int, rounds: int) -> dict[str, float]:
    hidden, grad = torch.randn(rows, width), torch.randn(rows, width)
    return checked_ms(
        lambda: kernels.gelu_backward_and_value(grad.clone(), hidden, sums=True),
        lambda: aten_gelu_backward_and_value(grad.clone(), hidden, sums=True),
        rounds,
        atol=1e-4,  # the bias sums over all rows, added in another order (up to 6e-5 apart, the facd361 kernels too)
    )


def model_steps(args: argparse.Namespace) -> None:
    ms = medians_ms(model_ab_times(args, {"kernels": None, "aten": aten_rows}))
    what = "training step" if args.train else "inference"
    print(
        f"{args.model} {what}, batch {args.batch}, fp32: with the kernels {ms['kernels']:.0f} ms, without "
        f"{ms['aten']:.0f} ms ({ms['aten'] / ms['kernels']:.3f}x)"
    )


def main() -> None:
    args = ab_parser(__doc__, rounds=5).parse_args()
    start_kernel_ab(args)
    operators(max(args.rounds, 20))
    model_steps(args)


if __name__ == "__main__":
    main()
