"""What autograd keeps for backward from the inner blocks: the plain block against the fused operator.

    PYTHONPATH=src python benchmarks/saved_activations.py --model tnt_s_patch16_224 --batch 256

Counts the bytes of the distinct tensors autograd saves during one inner block's forward (parameters excluded,
`torch.autograd.graph.saved_tensors_hooks`) for one image's 196 sentences, under bf16 autocast, and scales them
to every inner block of a batch. The plain block is the explicit path, which is what a GPU runs (the words'
attention by explicit products, `layers.short_on_gpu`); the fused block is the registered operator
`tnt_vision::inner_block`, which keeps its input and recomputes the rest in its backward kernel. What it keeps
does not depend on the kernel, so here the operator runs its plain reference (`inner_block.reference_block`) and
no GPU is needed. These are the activations' bytes, not a device's allocator peak.
"""

from __future__ import annotations

import argparse

import torch

from tnt_vision.bench import saved_bytes
from tnt_vision.kernels import inner_block
from tnt_vision.models import create_model, layers
from tnt_vision.models.layers import TransformerBlock, fused_attention


def kept_bytes(block: TransformerBlock, words: torch.Tensor, parameters: list[torch.Tensor]) -> tuple[int, int]:
    """Bytes autograd keeps from one forward of `block` under bf16 autocast (parameters excluded): plain, fused."""
    with torch.autocast("cpu", torch.bfloat16):
        with fused_attention(False):
            _, plain = saved_bytes(lambda: block.plain_forward(words), parameters)
        _, fused = saved_bytes(lambda: fused_without_a_gpu(block, words), parameters)
    return plain, fused


def fused_without_a_gpu(block: TransformerBlock, words: torch.Tensor) -> torch.Tensor:
    """The fused operator (and its autograd formula) with the plain reference in place of the kernel."""
    launch, applies = inner_block._launch, layers.inner_block_applies
    inner_block._launch = lambda x, *args, scales=None, **kwargs: inner_block.reference_block(x, *args, scales=scales)
    layers.inner_block_applies = lambda x: True
    try:
        assert block.fused_kernel_applies(words)
        return block(words)
    finally:
        inner_block._launch, layers.inner_block_applies = launch, applies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tnt_s_patch16_224")
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    model = create_model(args.model).train()
    blocks = [b.inner for b in model.blocks if b.inner is not None]
    block, cfg = blocks[0], model.cfg
    parameters = list(model.parameters())
    patches = cfg.grid_size[0] * cfg.grid_size[1]
    words = torch.randn(patches, cfg.num_words, cfg.inner_dim, requires_grad=True)
    plain, fused = kept_bytes(block, words, parameters)
    scale = len(blocks) * args.batch / 2**30
    print(f"{args.model}, bf16 autocast, one inner block, one image ({patches} sentences of {cfg.num_words} words):")
    print(f"  plain {plain / 2**10:.0f} KiB, fused {fused / 2**10:.0f} KiB ({plain / fused:.1f}x less)")
    total = f"plain {plain * scale:.2f} GiB, fused {fused * scale:.2f} GiB"
    print(f"  {len(blocks)} inner blocks x batch {args.batch}: {total}")


if __name__ == "__main__":
    main()
