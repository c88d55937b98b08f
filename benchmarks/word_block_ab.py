"""The inner transformer block in one compiled pass over each sentence's words against the layers it replaces, in
CPU inference, in one process.

    PYTHONPATH=src python benchmarks/word_block_ab.py --batch 32 --rounds 8 --dtype fp32
    PYTHONPATH=src python benchmarks/word_block_ab.py --batch 32 --rounds 8 --dtype bf16
    PYTHONPATH=src python benchmarks/word_block_ab.py --batch 1 --rounds 20 --dtype fp32

`kernels.word_block` (`word_block.cpp`) runs TNT's whole inner block (LayerNorm, q/k/v, the attention over the
words, projection and residual, LayerNorm, the GELU MLP and residual) with one sentence's activations in L1,
where the model's other fast path runs it as eight operators over the whole activation (oneDNN's linear layers,
the word-attention kernel, the norms and residual additions). First one inner block alone at the model's sizes
for --batch (the kernel's output checked against the other path's), then the whole model: as it is, and with the
kernel stepped aside (`word_block_applies` answering no), alternating (`bench.model_ab_times`); medians and the
ratio in each round (both timed in the same round), with the batch, dtype, threads and machine.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from unittest import mock

import torch

from tnt_vision.bench import (
    BenchConfig,
    ab_parser,
    autocast,
    medians_ms,
    model_ab_line,
    model_ab_times,
    never,
    operator_medians_ms,
    ratio_range,
    round_ratios,
    start_kernel_ab,
)
from tnt_vision.models import create_model, layers


def layer_by_layer() -> AbstractContextManager[object]:
    """The kernel stepped aside: the inner block by the model's other fast path."""
    return mock.patch.object(layers, "word_block_applies", never)


def block_ms(model_name: str, batch: int, dtype: str, rounds: int) -> dict[str, float]:
    """One inner block over the words of `batch` images, by the kernel and layer by layer (outputs compared)."""
    model = create_model(model_name).eval()
    block = model.blocks[0].inner
    cfg = model.cfg
    words = torch.randn(batch * cfg.grid_size[0] * cfg.grid_size[1], cfg.num_words, cfg.inner_dim)
    with torch.inference_mode(), autocast(BenchConfig(model=model_name, dtype=dtype)):
        fused = block(words)
        with layer_by_layer():
            reference = block(words)
        atol = 1e-5 if dtype == "fp32" else 0.05  # bf16: the layers round their products, the kernel does not
        torch.testing.assert_close(fused, reference, atol=atol, rtol=0)

        def unfused() -> torch.Tensor:
            with layer_by_layer():
                return block(words)

        return operator_medians_ms({"kernel": lambda: block(words), "layer by layer": unfused}, rounds)


def main() -> None:
    parser = ab_parser(__doc__, rounds=8, train=False)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    args.train = False
    start_kernel_ab(args)
    ms = block_ms(args.model, args.batch, args.dtype, max(args.rounds, 20))
    print(
        f"one inner block, batch {args.batch}, {args.dtype}: kernel {ms['kernel']:.3f} ms, layer by layer "
        f"{ms['layer by layer']:.3f} ms ({ms['layer by layer'] / ms['kernel']:.2f}x)"
    )
    times = model_ab_times(args, {"kernel": None, "layer by layer": layer_by_layer}, dtype=args.dtype)
    print(model_ab_line(args, medians_ms(times), args.dtype))
    print(f"layer by layer / kernel, per round: {ratio_range(round_ratios(times['layer by layer'], times['kernel']))}")


if __name__ == "__main__":
    main()
