"""bf16 training's forward products by oneDNN's linear layer against `F.linear` (ATen's addmm), in one process.

    PYTHONPATH=src python benchmarks/lean_linear_ab.py --batch 32 --rounds 8

Under bf16 autocast on a CPU with bf16 products, the lean functions of `kernels.emulated_bf16` (training's MLPs and
projections) multiply bf16 operands. ATen's addmm first copies the bias into every row of its output, then
accumulates the product onto it; oneDNN's linear adds the bias to each tile of the product in cache. First each
layer of the model alone at its size for --batch (both results checked against each other: the same products up
to the order of the sums), then the whole training step (forward, backward, AdamW) with oneDNN's or ATen's
products, alternating (`bench.interleaved_times`: warm-up, order rotated each round). Medians with the batch,
threads and machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F

from tnt_vision import bench
from tnt_vision.kernels import emulated_bf16
from tnt_vision.models import create_model
from tnt_vision.models.tnt import TNTConfig


@contextlib.contextmanager
def aten_products() -> Iterator[None]:
    with mock.patch.object(emulated_bf16, "_bf16_product", F.linear):
        yield


def layers(cfg: TNTConfig, batch: int) -> dict[str, tuple[int, int, int]]:
    """(rows, inputs, outputs) of the model's linear layers with a bias that it times, by name."""
    return bench.mlp_layers(cfg, batch)


def operators(cfg: TNTConfig, batch: int, rounds: int) -> None:
    for name, (rows, fan_in, fan_out) in layers(cfg, batch).items():
        operands = [torch.randn(*shape).bfloat16() for shape in ((rows, fan_in), (fan_out, fan_in), (fan_out,))]
        calls = {
            "onednn": lambda ops=operands: emulated_bf16._bf16_product(*ops),
            "aten": lambda ops=operands: F.linear(*ops),
        }
        torch.testing.assert_close(calls["onednn"]().float(), calls["aten"]().float(), atol=0.05, rtol=2**-7)
        ms = bench.operator_medians_ms(calls, rounds)
        print(f"  {name} ({rows} x {fan_in} -> {fan_out}): oneDNN {ms['onednn']:.3f} ms, ATen {ms['aten']:.3f} ms")


def main() -> None:
    args = bench.ab_parser(__doc__, rounds=8, train=False).parse_args()
    args.train = True
    threads = bench.set_threads(args.threads)
    if not (emulated_bf16.onednn_linear_available() and emulated_bf16.bf16_hardware()):
        raise SystemExit("needs oneDNN and a CPU with bf16 products (AVX512-BF16 or AMX): nothing to compare")
    print(f"{threads} threads, {bench.cpu_name()}, torch {torch.__version__}; medians, bf16, batch {args.batch}:")
    operators(create_model(args.model).cfg, args.batch, max(args.rounds, 12))
    variants = {"oneDNN's products": None, "ATen's": aten_products}
    ms = bench.medians_ms(bench.model_ab_times(args, variants, dtype="bf16"))
    print(bench.model_ab_line(args, ms, "bf16"))


if __name__ == "__main__":
    main()
