"""`tnt export`: a model (random or from a checkpoint) -> ONNX, TorchScript or an ExportedProgram, checked."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import UserError
from ..export import FORMATS, SUFFIXES, export_model
from ..models import create_model, load_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX / TorchScript / ExportedProgram and check it")
    p.add_argument("--model", required=True, help="registered model name, e.g. tnt_s_patch16_224")
    p.add_argument("--checkpoint", default=None, help="weights to load (any supported format); random if omitted")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--output", default=None, help="output file (default: MODEL.onnx / .pt / .pt2 here)")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="weights and input dtype")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the checkpoint's head")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size)) if v is not None}
    try:
        model = create_model(args.model, **overrides)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    output = Path(args.output or f"{args.model}{SUFFIXES[args.format]}")
    report = export_model(model, output, args.format, img_size=model.cfg.img_size, dtype=DTYPES[args.dtype])
    source = args.checkpoint or "random weights"
    print(f"{args.model} ({source}) -> {output} [{args.format}], max |diff| vs PyTorch {report['max_abs_diff']:.2e}")
    return 0
