"""`tnt predict`: top-5 class names with probabilities for image files."""

from __future__ import annotations

import argparse
import json

from ..inference import load_trained, predict


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images: top-5 class names with probabilities")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--checkpoint", required=True, help="weights: this project's checkpoint, authors', timm's")
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image")
    p.add_argument("--no-ema", action="store_true", help="use the plain weights even where EMA weights exist")
    p.add_argument("--json", action="store_true", help="print one JSON line per image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loaded = load_trained(args.model, args.checkpoint, use_ema=not args.no_ema)
    for result in predict(loaded, args.images, top_k=args.top_k):
        if args.json:
            print(json.dumps(result))
        else:
            ranked = ", ".join(f"{name} {p:.3f}" for name, p in result["top"])
            print(f"{result['image']}: {ranked}")
    return 0
