"""All the pictures for one image, written as PNGs with an offline `index.html`, all-or-nothing."""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

from ..errors import UserError
from . import figures as F
from .capture import Recording

GENERATOR = "tnt-vision viz"
DPI = 110


@dataclass(frozen=True)
class Kind:
    title: str
    caption: str
    needs_words: bool = False


KINDS: dict[str, Kind] = {
    "features": Kind(
        "Feature maps (Fig. 3a)",
        "Patch embeddings after each chosen block, reshaped to the patch grid, for evenly spaced channels.",
    ),
    "tsne": Kind(
        "t-SNE of feature channels (Fig. 3b)",
        "Each point is one channel of the last block, placed by t-SNE from its values over this image's patches; "
        "the paper reads a wider spread as more diverse features.",
    ),
    "words": Kind(
        "Averaged word embeddings (Fig. 4)",
        "Every visual word's embedding averaged over its channels and drawn where the word sits in the image.",
        needs_words=True,
    ),
    "inner-attention": Kind(
        "Inner attention (Fig. 5)",
        "For each query patch (left), how strongly the query word (green box) attends to each word of the same "
        "patch, averaged over heads.",
        needs_words=True,
    ),
    "outer-attention": Kind(
        "Outer attention between patches (Fig. 6)",
        "How strongly each query patch (cyan box) attends to every patch of the image, averaged over heads.",
    ),
    "class-attention": Kind(
        "Class-token attention (Fig. 7)",
        "How strongly the class token attends to each patch in each chosen block, averaged over heads.",
    ),
    "rollout": Kind(
        "Class-token attention rollout (Fig. 7)",
        "Class-token attention accumulated from the first block up to each chosen block, with the residual "
        "path counted as half of every step (attention rollout, Abnar & Zuidema 2020).",
    ),
}
DEFAULT_KINDS = tuple(k for k in KINDS if k != "rollout")


@dataclass
class Picture:
    name: str
    title: str
    caption: str
    figure: Figure


def make_pictures(
    rec: Recording,
    image: np.ndarray,
    blocks: Sequence[int],
    *,
    kinds: Sequence[str] | None = None,
    patches: Sequence[tuple[int, int]] | None = None,
    query_word: int | None = None,
    rollout: bool = False,
    compare: Mapping[str, Recording] | None = None,
    label: str = "model",
) -> tuple[list[Picture], list[str]]:
    """Draw the chosen kinds of picture for the first image of a recording.

    Args:
        blocks: 0-based block indices.
        kinds: names from `KINDS`. None draws every default kind the model has; word-level pictures then use
            only the chosen blocks that have an inner transformer. Named explicitly, a kind the model cannot
            draw raises a UserError.
        rollout: add the attention rollout picture to the chosen (or default) kinds.
        compare: other models' recordings of the same image, shown next to this one in the t-SNE picture.
        label: this model's name in the t-SNE picture.

    Returns:
        The pictures, and one note for each default kind that was left out and why.
    """
    explicit = kinds is not None
    names = list(kinds if explicit else DEFAULT_KINDS)
    if rollout and "rollout" not in names:
        names.append("rollout")
    unknown = sorted(set(kinds or ()) - set(KINDS))
    if unknown:
        raise UserError(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    blocks = F.check_blocks(rec, blocks)
    if explicit and any(KINDS[k].needs_words for k in names):
        F.check_blocks(rec, blocks, words=True)  # fail before drawing anything
    draw: dict[str, Callable[[list[int]], Figure]] = {
        "features": lambda b: F.feature_maps(rec, b, image=image),
        "tsne": lambda b: F.feature_tsne({label: rec, **(compare or {})}),
        "words": lambda b: F.word_embeddings(rec, b, image=image),
        "inner-attention": lambda b: F.inner_attention(rec, image, b, patches=patches, query_word=query_word),
        "outer-attention": lambda b: F.outer_attention(rec, image, b, patches=patches),
        "class-attention": lambda b: F.class_attention(rec, image, b),
        "rollout": lambda b: F.class_attention(rec, image, b, rollout=True),
    }
    pictures, notes = [], []
    for name in tqdm(names, desc="figures", unit="fig", leave=False):
        kind, chosen = KINDS[name], blocks
        if kind.needs_words and not explicit:
            chosen = [b for b in blocks if rec.word_tokens[b] is not None]
            if not chosen:
                notes.append(f"{kind.title}: not drawn, the chosen blocks have no inner transformer.")
                continue
        pictures.append(Picture(name, kind.title, kind.caption, draw[name](chosen)))
    return pictures, notes


# ---- writing ---------------------------------------------------------------------------------------------------------
def check_out_dir(out: str | Path) -> Path:
    """Refuse an output folder that exists with other content; an earlier `tnt viz` output may be replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_report(out):
        raise UserError(f"output folder {out} is not empty and holds no earlier `tnt viz` output; choose another")
    return out


def write_report(
    out: str | Path,
    pictures: Sequence[Picture],
    *,
    input_image: np.ndarray,
    details: Mapping[str, str],
    notes: Sequence[str] = (),
) -> Path:
    """Write `input.png`, one PNG per picture and `index.html` into `out`, all at once.

    Everything is written into a temporary sibling folder that then replaces `out` by renames, so `out` holds
    either its earlier content or the complete new report, never a part of it.
    """
    out = check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the report is an ordinary folder
    try:
        Image.fromarray((input_image * 255).round().astype(np.uint8)).save(tmp / "input.png")
        for pic in pictures:
            pic.figure.savefig(tmp / f"{pic.name}.png", dpi=DPI)
        (tmp / "index.html").write_text(render_index(pictures, details, notes), encoding="utf-8")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _install(tmp: Path, out: Path) -> None:
    if not out.exists() or not any(out.iterdir()):
        os.replace(tmp, out)  # rename(2) may replace an empty folder
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_report(folder: Path) -> bool:
    index = folder / "index.html"
    return index.is_file() and f'content="{GENERATOR}"' in index.read_text(encoding="utf-8", errors="replace")


def render_index(pictures: Sequence[Picture], details: Mapping[str, str], notes: Sequence[str] = ()) -> str:
    """A self-contained HTML page: the details as a table, then every picture with its title and caption."""
    e = html.escape
    rows = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in details.items())
    sections = "\n".join(
        f'<section id="{e(p.name)}"><h2>{e(p.title)}</h2><p>{e(p.caption)}</p>'
        f'<img src="{e(p.name)}.png" alt="{e(p.title)}"></section>'
        for p in pictures
    )
    toc = " · ".join(f'<a href="#{e(p.name)}">{e(p.title)}</a>' for p in pictures)
    skipped = "".join(f"<p class=note>{e(n)}</p>" for n in notes)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="{GENERATOR}">
<title>What {e(details.get("model", "the model"))} sees</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 2px 12px 2px 0; }}
img {{ max-width: 100%; border: 1px solid #ddd; }} .note {{ color: #666; }}
section {{ margin-top: 2em; }} .input img {{ width: 224px; image-rendering: pixelated; }}
</style>
</head>
<body>
<h1>What {e(details.get("model", "the model"))} sees</h1>
<div class="input"><img src="input.png" alt="input image as the model saw it"></div>
<table>
{rows}
</table>
<p>{toc}</p>
{skipped}
{sections}
</body>
</html>
"""
