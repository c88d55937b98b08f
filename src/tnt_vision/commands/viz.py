"""`tnt viz`: the paper's pictures (Figures 3-7) for one image, as PNGs and an offline index.html."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..models import TNT, TNTConfig, create_model, get_spec, load_checkpoint
from ..viz import KINDS, Recording, capture, make_pictures, preprocess, read_image, to_display, write_report
from ..viz.report import check_out_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("viz", help="draw feature maps, t-SNE, word embeddings and attention maps for an image")
    p.add_argument("--model", required=True, help="registered model name, e.g. tnt_s_patch16_224")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights in any supported format (default: random)")
    p.add_argument("--image", type=Path, required=True, help="image file (any format PIL reads)")
    p.add_argument("--out", type=Path, required=True, help="output folder for the PNGs and index.html")
    p.add_argument("--blocks", default=None, help="1-based blocks to show, e.g. 1,6,12 (default: first, middle, last)")
    p.add_argument("--compare", default=None, help="a second model for the t-SNE picture, e.g. deit_s_patch16_224")
    p.add_argument("--compare-checkpoint", type=Path, default=None, help="weights of the --compare model")
    p.add_argument(
        "--figures",
        default=None,
        help=f"comma-separated subset of {','.join(KINDS)} (default: all the model has, rollout only with --rollout)",
    )
    p.add_argument("--rollout", action="store_true", help="also draw the attention rollout of the class token")
    p.add_argument("--patches", default=None, help="query patches as ROW:COL pairs on the patch grid, e.g. 7:7,3:10")
    p.add_argument("--query-word", type=int, default=None, help="word index inside a patch for the inner attention")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and t-SNE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = check_out_dir(args.out)
    image = read_image(args.image)
    blocks = parse_blocks(args.blocks, model_config(args.model, args.img_size).depth)  # before the slow part
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.checkpoint, args.img_size)
    rec, pixels = record(model, image)
    compare = {}
    if args.compare:
        other = build_model(args.compare, args.compare_checkpoint, args.img_size)
        compare[args.compare] = record(other, image)[0]
    pictures, notes = make_pictures(
        rec,
        pixels,
        [b - 1 for b in blocks],
        kinds=parse_kinds(args.figures),
        rollout=args.rollout,
        patches=parse_patches(args.patches),
        query_word=args.query_word,
        compare=compare,
        label=args.model,
    )
    details = {
        "model": args.model,
        "weights": str(args.checkpoint) if args.checkpoint else f"random (seed {args.seed})",
        "image": str(args.image),
        "input": f"{pixels.shape[1]}x{pixels.shape[0]}, {model.cfg.patch_size}px patches, {_grid(rec)} grid",
        "blocks": ", ".join(map(str, blocks)),
    }
    if args.compare:
        details["compared with"] = f"{args.compare} ({args.compare_checkpoint or 'random weights'})"
    write_report(out, pictures, input_image=pixels, details=details, notes=notes)
    print(f"{len(pictures)} pictures for {args.image} -> {out / 'index.html'}")
    return 0


def model_config(name: str, img_size: int | None) -> TNTConfig:
    try:
        cfg = get_spec(name).config
    except ValueError as e:
        raise UserError(str(e)) from None
    if img_size is not None and (img_size <= 0 or img_size % cfg.patch_size):
        raise UserError(f"--img-size {img_size} is not a positive multiple of the patch size {cfg.patch_size}")
    return cfg.replace(**_overrides(img_size))


def build_model(name: str, checkpoint: Path | None, img_size: int | None) -> TNT:
    """A model in eval mode; with a checkpoint, its weights (the classifier is not used, so not loaded)."""
    model_config(name, img_size)
    model = create_model(name, **_overrides(img_size))
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, ignore_head=True)
    return model.eval()


def record(model: TNT, image: Image.Image) -> tuple[Recording, np.ndarray]:
    """One forward pass over the preprocessed image; the recording and the pixels the model saw."""
    x = preprocess(image, model)
    with capture(model) as rec, torch.no_grad():
        model(x)
    return rec, to_display(x, model)


def parse_blocks(text: str | None, depth: int) -> list[int]:
    """'1,6,12' -> [1, 6, 12] (1-based, checked against the depth); None -> first, middle and last block."""
    if text is None:
        return sorted({1, max(1, depth // 2), depth})
    try:
        blocks = [int(t) for t in text.split(",")]
    except ValueError:
        raise UserError(f"--blocks wants comma-separated block numbers like 1,6,12, got {text!r}") from None
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise UserError(f"block {bad[0]} is out of range: the model has {depth} blocks (1..{depth})")
    return list(dict.fromkeys(blocks))


def parse_patches(text: str | None) -> list[tuple[int, int]] | None:
    if text is None:
        return None
    try:
        return [(int(r), int(c)) for r, c in (t.split(":") for t in text.split(","))]
    except ValueError:
        raise UserError(f"--patches wants ROW:COL pairs like 7:7,3:10, got {text!r}") from None


def parse_kinds(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _overrides(img_size: int | None) -> dict[str, int]:
    return {"img_size": img_size} if img_size else {}


def _grid(rec: Recording) -> str:
    rows, cols = rec.grid
    return f"{rows}x{cols}"
