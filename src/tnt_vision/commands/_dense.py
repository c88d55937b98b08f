"""Arguments and plumbing shared by `tnt detect` and `tnt segment` (not a verb itself)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from ..dense.data import CocoData
from ..errors import UserError
from ..io import atomic_write


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tnt_s_patch16_224", help="registered TNT variant for the backbone")
    g.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="TNTConfig field of the backbone, e.g. depth=4 (repeatable)",
    )
    g.add_argument(
        "--out-indices", default="2,5,8,11", help="0-based blocks feeding strides 4,8,16,32 (paper: 2,5,8,11)"
    )
    g.add_argument("--pretrained-backbone", default=None, help="classification checkpoint for the trunk")
    g.add_argument("--frozen-stages", type=int, default=-1, help="-1: train all; k: freeze embeddings + k blocks")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the trunk")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")


def add_data_args(p: argparse.ArgumentParser, *, train: bool) -> None:
    g = p.add_argument_group("data")
    if train:
        g.add_argument("--train", required=True, help="COCO JSON, or a folder holding annotations.json")
        g.add_argument("--train-images", default=None, help="image folder (default: the JSON's folder)")
    g.add_argument("--val", required=True, help="COCO JSON, or a folder holding annotations.json")
    g.add_argument("--val-images", default=None, help="image folder (default: the JSON's folder)")
    g.add_argument("--batch-size", type=int, default=2)
    g.add_argument("--workers", type=int, default=0, help="data loader processes")


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=12)
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (cosine decay per epoch)")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-untrained", action="store_true", help="also evaluate the model before training")
    g.add_argument("--out", default=None, help="output folder (default: runs/<verb>)")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--override needs KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


def parse_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} needs comma-separated integers, got {text!r}") from None


def backbone_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "out_indices": parse_ints(args.out_indices, "--out-indices"),
        "frozen_stages": args.frozen_stages,
        "drop_path_rate": args.drop_path,
        "grad_checkpointing": args.grad_checkpointing,
        **parse_overrides(args.override),
    }


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "seed", None) is not None:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
    try:
        return torch.device(args.device)
    except RuntimeError as e:
        raise UserError(f"bad --device {args.device!r}: {e}") from None


def loader(dataset: Dataset, batch_size: int, collate: Any, *, shuffle: bool, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, num_workers=workers)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def resolved_config(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """The run's flags (without argparse's handler) and the model recipe, for `config.json`."""
    return {k: v for k, v in vars(args).items() if not callable(v)} | {"meta": meta}


def datasets(args: argparse.Namespace, task: str, *, train: bool) -> tuple[CocoData | None, CocoData]:
    """The --val set, and with `train` the --train set too (checked to have the same categories)."""
    val = CocoData(args.val, args.val_images, task=task)
    if not train:
        return None, val
    tr = CocoData(args.train, args.train_images, task=task)
    check_same_classes(tr.class_names, val.class_names)
    return tr, val


def optimizer_and_schedule(
    model: torch.nn.Module, args: argparse.Namespace
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters, cosine-annealed over --epochs."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1))


def check_same_classes(train: list[str], val: list[str]) -> None:
    if train != val:
        raise UserError(f"training and validation sets have different categories: {train[1:]} vs {val[1:]}")


def fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
