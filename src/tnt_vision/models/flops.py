"""Parameter and FLOP counts, measured and from the paper's formulas (Eqs. 14-18).

FLOPs here follow the paper: multiply-adds. `torch.utils.flop_counter` counts 2 per multiply-add.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import fused_attention
from .tnt import TNTConfig


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, img_size: int | None = None) -> int:
    """Multiply-adds of one forward pass on one image, attention products included.

    Fused attention is switched off while counting: the counter cannot see inside
    `scaled_dot_product_attention` on CPU, but it sees the explicit matrix products.
    """
    cfg: TNTConfig = model.cfg
    size = img_size or cfg.img_size
    x = torch.zeros(1, cfg.in_chans, size, size)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with fused_attention(False), counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def paper_flops(cfg: TNTConfig, img_size: int | None = None) -> int:
    """The blocks' multiply-adds by the paper's formulas: Eq. 17 for TNT blocks, Eq. 14 for plain ones."""
    size = img_size or cfg.img_size
    n = (size // cfg.patch_size) ** 2
    d, m, c = cfg.outer_dim, cfg.num_words, cfg.inner_dim
    outer = 2 * n * d * (6 * d + n)
    inner = 2 * n * m * c * (6 * c + m) + n * m * c * d
    return sum(outer + (inner if cfg.has_words and cfg.is_tnt_block(i) else 0) for i in range(cfg.depth))
