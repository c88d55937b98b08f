"""The compiled residual addition (with the LayerNorm after it) against ATen's, in CPU inference, in one process.

    PYTHONPATH=src python benchmarks/residual_add_ab.py --model tnt_s_patch16_224 --batch 32 --rounds 8 --dtype bf16
    PYTHONPATH=src python benchmarks/residual_add_ab.py --batch 32 --rounds 8 --dtype fp32

Under bf16 autocast the residual stream is fp32 and each branch (a bf16 linear layer's output) bf16: ATen's add
first widens the branch into a temporary, then writes a fresh sum, which the next LayerNorm reads again.
`kernels.residual_add` reads the branch as it is, writes the sum (into the block's own tensor for its second
residual) and, for the first, the norm's bf16 output in the same pass; the TNT block adds the words' update into
the new sentences tensor, where `cat` would copy the sum (fp32 too).

First the operators alone at TNT-S's sizes (batch 32: the outer stream 32 x 197 x 384, the words 6272 x 16 x 24;
every kernel output checked against ATen's), then the whole model: tnt-vision as it is, with the kernel stepped
aside, and with the GELU epilogue (`onednn.GELU_EPILOGUE`, fp32 on AVX-512) off too, alternating
(`bench.model_ab_times`); medians with the batch, threads and machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch

from tnt_vision import kernels
from tnt_vision.bench import (
    ab_parser,
    medians_ms,
    model_ab_times,
    never,
    operator_medians_ms,
    start_kernel_ab,
)
from tnt_vision.kernels import onednn
from tnt_vision.models import layers, tnt

SHAPES = {"outer stream": (32, 197, 384), "words": (6272, 16, 24)}


@contextlib.contextmanager
def aten_adds() -> Iterator[None]:
    """The kernel stepped aside everywhere the model asks for it."""
    with contextlib.ExitStack() as stack:
        for module in (layers, tnt, onednn):
            stack.enter_context(mock.patch.object(module, "residual_add_applies", never))
        yield


@contextlib.contextmanager
def aten_adds_and_gelu() -> Iterator[None]:
    """Also ATen's GELU after oneDNN's first MLP layer (`onednn.GELU_EPILOGUE` off): the code before both."""
    with aten_adds(), mock.patch.object(onednn, "GELU_EPILOGUE", False):
        yield


def operators(rounds: int) -> None:
    for what, shape in SHAPES.items():
        ms = operator_ms(shape, rounds)
        print(f"{what} {tuple(shape)}, fp32 + bf16: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))


def operator_ms(shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    """The fused add and norm against ATen's add and the compiled norm, the in-place add against ATen's."""
    x, y = torch.randn(shape), torch.randn(shape).bfloat16()
    norm = layers.LayerNorm(shape[-1])
    with torch.inference_mode():
        fused, unfused = kernels.residual_add(x, y, norm=norm, bf16_output=True), (x + y, norm(x + y).bfloat16())
        for a, b in zip(fused, unfused, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=2**-7)
        stream = x.clone()  # the in-place additions' own
        return operator_medians_ms(
            {
                "kernel, add + norm": lambda: kernels.residual_add(x, y, norm=norm, bf16_output=True),
                "ATen add, kernel norm": lambda: kernels.narrow_layer_norm(
                    x + y, norm.weight, norm.bias, norm.eps, bf16_output=True
                ),
                "kernel, add in place": lambda: kernels.residual_add(stream, y, out=stream),
                "ATen add": lambda: x + y,
            },
            rounds,
        )


def main() -> None:
    parser = ab_parser(__doc__, rounds=8, train=False)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    args = parser.parse_args()
    args.train = False
    start_kernel_ab(args)
    operators(max(args.rounds, 20))
    variants = {"kernel": None, "aten": aten_adds, "aten, no epilogue": aten_adds_and_gelu}
    ms = medians_ms(model_ab_times(args, variants, dtype=args.dtype))
    print(
        f"{args.model} inference, batch {args.batch}, {args.dtype}: with the kernel {ms['kernel']:.0f} ms, without "
        f"{ms['aten']:.0f} ms ({ms['aten'] / ms['kernel']:.3f}x), also without the GELU epilogue "
        f"{ms['aten, no epilogue']:.0f} ms ({ms['aten, no epilogue'] / ms['kernel']:.3f}x)"
    )


if __name__ == "__main__":
    main()
