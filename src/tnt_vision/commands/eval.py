"""`tnt eval`: top-1/top-5 and loss of a checkpoint with the weights' own preprocessing (EMA when present)."""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.data import DataLoader

from ..data import SampleSet, build_splits, collate_skipping
from ..data.datasets import subset
from ..data.transforms import eval_transform
from ..engine import evaluate
from ..errors import UserError
from ..inference import load_trained


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: top-1, top-5, loss")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--checkpoint", required=True, help="weights file")
    p.add_argument("--data", required=True, help="digits | imagefolder:PATH | cifar10:PATH | ...")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    p.add_argument("--val-limit", type=int, default=None, help="evaluate a fixed random subset of this size")
    p.add_argument("--no-ema", action="store_true", help="use the plain weights even where EMA weights exist")
    p.add_argument("--download", action="store_true", help="download the dataset where torchvision can")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    splits = build_splits(args.data, download=args.download)
    loaded = load_trained(args.model, args.checkpoint, use_ema=not args.no_ema, class_names=splits.classes)
    if loaded.class_names != splits.classes:
        raise UserError(
            f"{args.checkpoint} has {len(loaded.class_names)} classes ({', '.join(loaded.class_names[:4])}, ...) "
            f"but {args.data} has {len(splits.classes)} ({', '.join(splits.classes[:4])}, ...)"
        )
    data = SampleSet(subset(splits.val, args.val_limit), eval_transform(loaded.model))
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_skipping)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = evaluate(loaded.model.to(device), loader, device=device)
    res.update(model=args.model, checkpoint=str(args.checkpoint), data=args.data, weights=loaded.source)
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{args.model} ({loaded.source} weights) on {args.data}: top-1 {res['top1']:.2f}%, top-5 "
            f"{res['top5']:.2f}%, loss {res['loss']:.4f} over {res['images']} images"
            + (f", {res['skipped']} unreadable skipped" if res["skipped"] else "")
        )
    return 0
