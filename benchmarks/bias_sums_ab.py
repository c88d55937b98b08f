"""The bias gradients' column sums by the compiled kernel (alone, and inside the GELU's backward) against ATen's sum,
in one process.

    PYTHONPATH=src python benchmarks/bias_sums_ab.py --dtype bf16 --batch 32 --rounds 8 --train
    PYTHONPATH=src python benchmarks/bias_sums_ab.py --dtype fp32 --batch 32 --rounds 8 --train

A linear layer's bias gradient sums its output's gradient over the rows: TNT's rows are many (TNT-S at batch 32:
100352 words) and narrow (24 channels, 96 in the MLP), where ATen's reduction runs at a fraction of the memory's
speed, and in bf16 it widens each value alone. First the operators at the model's sizes for --batch, fp32 and bf16,
each result checked against ATen's: the column sums of the inner and outer layers' gradients (`column_sums`
against `Tensor.sum`), and the lean MLP's GELU backward summing fc1's bias gradient as it writes it (against the
kernel without the sums, then ATen's sum). Then the whole model (`--train` for the training step, where the sums
are), one set of weights, with the sums by the kernels or stepped aside to ATen's, alternating
(`bench.interleaved_times`: warm-up, order rotated each round). Medians with the batch, dtype, threads and machine.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from unittest import mock

import torch

from tnt_vision import kernels
from tnt_vision.bench import (
    ab_parser,
    medians_ms,
    mlp_layers,
    model_ab_line,
    model_ab_times,
    operator_medians_ms,
    start_kernel_ab,
)
from tnt_vision.kernels import emulated_bf16
from tnt_vision.models import create_model
from tnt_vision.models.tnt import TNTConfig


def aten_sum_rows(x: torch.Tensor) -> torch.Tensor:
    return x.sum(tuple(range(x.ndim - 1)))


def gelu_then_aten_sum(
    grad: torch.Tensor, x: torch.Tensor, sums: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The GELU kernel without its sums, then ATen's sum of the gradient it wrote."""
    grad_x, value, _ = kernels.gelu_backward_and_value(grad, x)
    return grad_x, value, aten_sum_rows(grad_x) if sums else None


@contextlib.contextmanager
def aten_sums() -> Iterator[None]:
    """Every bias gradient of the lean functions summed by ATen."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(emulated_bf16, "sum_rows", aten_sum_rows))
        stack.enter_context(mock.patch.object(emulated_bf16, "gelu_backward_and_value", gelu_then_aten_sum))
        yield


def gradients(cfg: TNTConfig, batch: int) -> dict[str, tuple[int, int]]:
    """The (rows, width) of the gradients whose columns the training step sums, by layer."""
    also = {"inner fc2": "inner fc2, projection", "outer fc2": "outer fc2, projection"}  # the same sizes
    return {also.get(name, name): (rows, width) for name, (rows, _, width) in mlp_layers(cfg, batch).items()}


def operators(cfg: TNTConfig, args: argparse.Namespace) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        print(f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}, batch {args.batch}:")
        for layer, (rows, width) in gradients(cfg, args.batch).items():
            grad = torch.randn(rows, width).to(dtype)
            calls = {"kernel": lambda g=grad: kernels.sum_rows(g), "aten": lambda g=grad: aten_sum_rows(g)}
            ms = checked_ms(calls, args)
            print(f"  column sums, {layer} ({rows} x {width}): kernel {ms['kernel']:.3f} ms, ATen {ms['aten']:.3f} ms")
            if "fc1" in layer:
                hidden, written = torch.randn(rows, width).to(dtype), torch.empty_like(grad)
                calls = {  # the gradient is written over: a copy of it into one buffer first (no fresh pages)
                    "fused": lambda g=grad, h=hidden, w=written: kernels.gelu_backward_and_value(w.copy_(g), h, True),
                    "aten": lambda g=grad, h=hidden, w=written: gelu_then_aten_sum(w.copy_(g), h, True),
                }
                ms = checked_ms(calls, args)
                print(
                    f"  GELU backward with the sums, {layer}: in one pass {ms['fused']:.3f} ms, "
                    f"then ATen's sum {ms['aten']:.3f} ms (a copy of the gradient first in each)"
                )


def checked_ms(calls: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict[str, float]:
    """The calls' medians (`operator_medians_ms`) after checking that they agree (fp32 sums of rows in another order,
    bf16 up to one rounding step)."""
    results = [[t.clone() for t in torch.utils._pytree.tree_leaves(call())] for call in calls.values()]
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=2**-7 if a.dtype == torch.bfloat16 else 1e-4)
    return operator_medians_ms(calls, max(args.rounds, 12))


def main() -> None:
    parser = ab_parser(__doc__, rounds=8)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    args = parser.parse_args()
    start_kernel_ab(args)
    operators(create_model(args.model).cfg, args)
    ms = medians_ms(model_ab_times(args, {"kernel sums": None, "ATen sums": aten_sums}, dtype=args.dtype))
    print(model_ab_line(args, ms, args.dtype))  # inference has no bias gradients: the two should be even


if __name__ == "__main__":
    main()
