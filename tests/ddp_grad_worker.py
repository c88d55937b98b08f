"""Run under `torchrun --nproc_per_node=N` (or plainly for N=1): one DDP forward/backward over a fixed global
batch through `engine.forward_backward`; rank 0 saves the all-reduced gradients to argv[1]."""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tnt_vision import create_model
from tnt_vision.engine import StepParts, forward_backward
from tnt_vision.train import setup_distributed


def main(out: str) -> None:
    d, _device = setup_distributed("cpu")
    torch.manual_seed(0)
    module = create_model("tnt_digits", drop_path_rate=0.0)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = torch.arange(8) % 10
    model = DistributedDataParallel(module) if d.world > 1 else module
    parts = StepParts(
        model=model,
        module=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.0),
        scheduler=None,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1),
        autocast=contextlib.nullcontext,
    )
    forward_backward(parts, images[d.rank :: d.world], targets[d.rank :: d.world])
    if d.rank == 0:
        torch.save({n: p.grad for n, p in module.named_parameters()}, out)
    if d.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
