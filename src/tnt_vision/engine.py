"""One training epoch and one evaluation pass. The run (`train.py`) assembles the pieces they take."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .errors import UserError


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the run stops before the bad step touches the weights."""


@dataclass
class StepParts:
    """What a training step needs. `model` may be wrapped (DDP, torch.compile); `module` never is."""

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm scheduler stepped per optimizer update
    loss_fn: nn.Module
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None = None
    ema: Any = None  # timm.utils.ModelEmaV3
    mixup: Callable | None = None
    accum_steps: int = 1
    clip_grad: float | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def forward_backward(parts: StepParts, images: torch.Tensor, targets: torch.Tensor, *, sync: bool = True) -> float:
    """Loss and gradients of one micro-batch (scaled for accumulation); returns the unscaled loss value.

    Raises:
        NonFiniteLossError: before backward, so the weights and optimizer state stay as they were.
    """
    images, targets = images.to(parts.device, non_blocking=True), targets.to(parts.device, non_blocking=True)
    if parts.mixup is not None:
        if images.shape[0] % 2:  # Mixup pairs samples; a skipped image can leave an odd batch
            images, targets = images[:-1], targets[:-1]
        images, targets = parts.mixup(images, targets)
    no_sync = getattr(parts.model, "no_sync", None)
    with contextlib.nullcontext() if sync or no_sync is None else no_sync():
        with parts.autocast():
            loss = parts.loss_fn(parts.model(images), targets)
        value = loss.detach().float()
        if world_size() > 1:  # every rank must agree to stop, or the others would hang in all-reduce
            dist.all_reduce(value)
            value /= world_size()
        value = value.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value}")
        loss = loss / parts.accum_steps
        (parts.scaler.scale(loss) if parts.scaler is not None else loss).backward()
    return value


def optimizer_step(parts: StepParts, step: int) -> None:
    """Clip, step, zero the gradients, update the EMA and the learning rate for update number `step + 1`."""
    if parts.scaler is not None:
        if parts.clip_grad:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(parts.module.parameters(), parts.clip_grad)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        if parts.clip_grad:
            nn.utils.clip_grad_norm_(parts.module.parameters(), parts.clip_grad)
        parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.ema is not None:
        parts.ema.update(parts.module, step=step + 1)
    parts.scheduler.step_update(num_updates=step + 1)


def train_one_epoch(
    parts: StepParts,
    loader: Iterable,
    *,
    total_batches: int,
    start_batch: int = 0,
    step: int = 0,
    on_update: Callable[[int, int], None] | None = None,
    desc: str = "train",
    show_progress: bool = True,
) -> dict[str, float]:
    """Train over `loader` (already positioned at `start_batch` of an epoch of `total_batches`).

    Args:
        step: optimizer updates done before this call (drives the schedule and the EMA warm-up).
        on_update: called as `on_update(step, batches_done)` after every optimizer update (step checkpoints).

    Returns:
        loss (mean over this call's samples), lr, images, images_per_s, skipped, step, seconds.
    """
    parts.model.train()
    loss_sum, images_seen, skipped = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, total=total_batches, initial=start_batch, desc=desc, disable=not show_progress, leave=False)
    for batch_index, (images, targets, n_skipped) in enumerate(bar, start=start_batch):
        skipped += n_skipped
        last = batch_index + 1 == total_batches
        update = (batch_index + 1) % parts.accum_steps == 0 or last
        if images is not None and images.shape[0] > (1 if parts.mixup else 0):
            loss = forward_backward(parts, images, targets, sync=update)
            loss_sum += loss * images.shape[0]
            images_seen += images.shape[0]
        if update:
            optimizer_step(parts, step)
            step += 1
            if on_update is not None:
                on_update(step, batch_index + 1)
        rate = images_seen * world_size() / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(
            loss=f"{loss_sum / max(images_seen, 1):.4f}", lr=f"{current_lr(parts):.2e}", img_s=f"{rate:.0f}"
        )
    seconds = time.perf_counter() - start
    loss_sum, images_seen, skipped = _all_sum([loss_sum, images_seen, skipped], parts.device)
    return {
        "loss": loss_sum / max(images_seen, 1),
        "lr": current_lr(parts),
        "images": int(images_seen),
        "images_per_s": images_seen / max(seconds, 1e-9),
        "skipped": int(skipped),
        "step": step,
        "seconds": seconds,
    }


def current_lr(parts: StepParts) -> float:
    return max(g["lr"] for g in parts.optimizer.param_groups)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    desc: str = "eval",
    show_progress: bool = True,
) -> dict[str, float]:
    """Cross-entropy, top-1 and top-5 accuracy (percent) over `loader`, summed over all ranks.

    Returns:
        loss, top1, top5, images, skipped.
    """
    model.eval()
    loss_sum, correct1, correct5, n, skipped = 0.0, 0, 0, 0, 0
    for images, targets, n_skipped in tqdm(loader, desc=desc, disable=not show_progress, leave=False):
        skipped += n_skipped
        if images is None:
            continue
        images, targets = images.to(device), targets.to(device)
        with autocast():
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        n += images.shape[0]
    loss_sum, correct1, correct5, n, skipped = _all_sum([loss_sum, correct1, correct5, n, skipped], device)
    return {
        "loss": loss_sum / max(n, 1),
        "top1": 100.0 * correct1 / max(n, 1),
        "top5": 100.0 * correct5 / max(n, 1),
        "images": int(n),
        "skipped": int(skipped),
    }
