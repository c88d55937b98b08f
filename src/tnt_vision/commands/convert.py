"""`tnt convert`: any supported checkpoint -> this project's safetensors."""

from __future__ import annotations

import argparse
import dataclasses

from ..models import create_model, load_checkpoint
from ..models.checkpoint import save_safetensors


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint (authors', timm, own) to tnt-vision safetensors")
    p.add_argument("src", help="checkpoint file: .pth, .pth.tar, .safetensors")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--model", required=True, help="registered model name, e.g. tnt_s_patch16_224")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the checkpoint's head")
    p.add_argument("--img-size", type=int, default=None, help="resolution of the converted model")
    p.add_argument("--no-ema", action="store_true", help="take the plain weights even where EMA weights exist")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size)) if v is not None}
    model = create_model(args.model, **overrides)
    report = load_checkpoint(model, args.src, use_ema=not args.no_ema)
    meta = {
        "architecture": args.model,
        "config": dataclasses.asdict(model.cfg),
        "source_format": report["format"],
    }
    save_safetensors(model, args.dst, meta)
    extra = f", {'; '.join(report['resized'])}" if report["resized"] else ""
    print(f"{args.src} ({report['format']} layout) -> {args.dst} ({args.model}{extra})")
    return 0
