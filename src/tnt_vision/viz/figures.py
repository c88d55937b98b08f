"""The paper's pictures (Figures 3-7) drawn from a `Recording`, as matplotlib figures.

Block indices are 0-based, as in `model.blocks` and the recording's lists; titles name blocks 1-based, as the
paper does ("block 12" is index 11). Patches are (row, column) positions on the grid, 0-based. Images are
(H, W, 3) arrays in [0, 1] of the pixels the model saw (`image.to_display`), so every overlay lines up with
the patch grid. Attention shown is the mean over heads; each panel's colours run from 0 to its own maximum,
printed in its corner (a uniform map over N+1 tokens has maximum 100/(N+1) %).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..errors import UserError
from .capture import Recording

PANEL = 1.9  # inches per panel
ATTENTION_CMAP = "inferno"
OVERLAY_ALPHA = 0.6


# ---- checks ------------------------------------------------------------------------------------------------------
def check_blocks(rec: Recording, blocks: Sequence[int], *, words: bool = False) -> list[int]:
    """Validate block indices (negative counts from the end); with `words`, each must have an inner transformer.

    Raises:
        UserError: an index out of range, a block without recorded maps, or (with `words`) without words.
    """
    if not blocks:
        raise UserError("no blocks chosen")
    out = []
    for b in blocks:
        if not -rec.depth <= b < rec.depth:
            raise UserError(f"block index {b} is out of range for a model with {rec.depth} blocks (0..{rec.depth - 1})")
        b %= rec.depth
        if rec.outer_attn[b] is None:
            raise UserError("nothing recorded yet: run a forward pass inside `capture(model)`")
        if words and rec.word_tokens[b] is None:
            raise UserError(_no_words_message(rec, b))
        out.append(b)
    return out


def _no_words_message(rec: Recording, block: int) -> str:
    with_words = [i + 1 for i, w in enumerate(rec.word_tokens) if w is not None]
    if not with_words:
        return "this model has no inner transformer (a DeiT/ViT), so it has no word tokens or inner attention maps"
    listed = ", ".join(map(str, with_words))
    return f"block {block + 1} has no inner transformer (no word tokens or inner attention); blocks with one: {listed}"


def check_patches(rec: Recording, patches: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    rows, cols = rec.grid
    if not patches:
        raise UserError("no patches chosen")
    for r, c in patches:
        if not (0 <= r < rows and 0 <= c < cols):
            raise UserError(f"patch ({r}, {c}) is outside the {rows}x{cols} patch grid (rows 0..{rows - 1})")
    return [(int(r), int(c)) for r, c in patches]


def default_patches(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Four patches spread over the grid: centre, upper left, upper right, lower middle."""
    rows, cols = grid
    picks = [(rows // 2, cols // 2), (rows // 4, cols // 4), (rows // 4, (3 * cols) // 4), ((3 * rows) // 4, cols // 2)]
    return list(dict.fromkeys(picks))


def default_query_word(words_per_side: int) -> int:
    """The word just below and right of a patch's centre."""
    half = words_per_side // 2
    return half * words_per_side + half


# ---- numbers behind the pictures -----------------------------------------------------------------------------------
def grid_maps(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens (N+1, d) of one image -> (d, rows, cols) feature maps (the class token dropped)."""
    return tokens[1:].T.reshape(-1, *grid)


def tiled_word_means(words: torch.Tensor, grid: tuple[int, int], sample: int = 0) -> torch.Tensor:
    """Word tokens (B*N, m, c) -> (rows*k, cols*k): each word's mean over channels, tiled where the word sits."""
    rows, cols = grid
    n = rows * cols
    k = round(words.shape[1] ** 0.5)
    means = words[sample * n : (sample + 1) * n].mean(dim=-1)  # (N, m)
    return means.reshape(rows, cols, k, k).permute(0, 2, 1, 3).reshape(rows * k, cols * k)


def attention_rollout(rec: Recording, sample: int = 0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) over the outer blocks: (depth, N+1, N+1), entry l up to block l.

    Each block's head-mean attention is mixed with the identity for the residual path (0.5 A + 0.5 I, rows
    renormalised) and the products are accumulated from the first block on. The inner transformer only
    refines each patch's own words, so it adds no mixing between patches and is left out.
    """
    check_blocks(rec, range(rec.depth))
    out = []
    rollout = None
    for attn in rec.outer_attn:
        a = attn[sample].double().mean(dim=0)  # (N+1, N+1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[0], dtype=a.dtype)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
        out.append(rollout)
    return torch.stack(out).float()


# ---- drawing helpers ---------------------------------------------------------------------------------------------
def _figure(rows: int, cols: int, title: str) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(PANEL * cols, PANEL * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    return fig, axes


def _overlay(ax: Axes, image: np.ndarray, heat: torch.Tensor, extent: tuple[float, float, float, float]) -> None:
    """Draw `image` in grey, then `heat` over the same extent, scaled from 0 to its maximum (printed in %).

    A grey base keeps the image's colours from mixing with the colour map; nearest interpolation gives one flat
    cell per patch or word, so the cells line up with the grid the model used.
    """
    grey = image @ np.array([0.299, 0.587, 0.114])
    ax.imshow(grey, extent=extent, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
    heat = heat.float().cpu().numpy()
    ax.imshow(
        heat, extent=extent, cmap=ATTENTION_CMAP, alpha=OVERLAY_ALPHA, vmin=0, vmax=heat.max(), interpolation="nearest"
    )
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.text(
        0.97,
        0.03,
        f"max {100 * heat.max():.3g}%",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=7,
        color="white",
        bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.5, "linewidth": 0},
    )


def _outline(ax: Axes, x: float, y: float, size: float, color: str = "cyan", label: str | None = None) -> None:
    ax.add_patch(Rectangle((x, y), size, size, fill=False, edgecolor=color, linewidth=1.5))
    if label:
        ax.text(x + size / 2, y - 1, label, color=color, ha="center", va="bottom", fontsize=9, fontweight="bold")


def _check_image(rec: Recording, image: np.ndarray) -> None:
    if rec.input_size is None or tuple(image.shape[:2]) != tuple(rec.input_size):
        raise UserError(f"image of shape {image.shape[:2]} does not match the recorded input {rec.input_size}")


def _patch_letter(i: int) -> str:
    return chr(ord("a") + i % 26)


# ---- Figure 3a: feature maps ----------------------------------------------------------------------------------------
def feature_maps(
    rec: Recording, blocks: Sequence[int], *, image: np.ndarray | None = None, channels: int = 8, sample: int = 0
) -> Figure:
    """Patch embeddings of chosen blocks reshaped to the grid, for evenly spaced channels (paper Fig. 3a)."""
    blocks = check_blocks(rec, blocks)
    d = rec.patch_tokens[blocks[0]].shape[-1]
    picks = torch.linspace(0, d - 1, min(channels, d)).round().long().tolist()
    lead = int(image is not None)
    fig, axes = _figure(len(blocks), len(picks) + lead, f"Feature maps of {len(picks)} of {d} channels")
    for row, b in enumerate(blocks):
        maps = grid_maps(rec.patch_tokens[b][sample], rec.grid)
        for col, ch in enumerate(picks):
            ax = axes[row, col + lead]
            ax.imshow(maps[ch].cpu().numpy(), cmap="viridis", interpolation="nearest")
            if row == 0:
                ax.set_title(f"channel {ch}", fontsize=9)
        axes[row, lead].set_ylabel(f"block {b + 1}")
        if lead and row > 0:
            axes[row, 0].set_axis_off()
    if lead:
        axes[0, 0].imshow(image)
        axes[0, 0].set_title("input", fontsize=9)
    return fig


# ---- Figure 3b: t-SNE of feature channels ---------------------------------------------------------------------------
def feature_tsne(recordings: Mapping[str, Recording], *, block: int = -1, sample: int = 0, seed: int = 0) -> Figure:
    """t-SNE of one block's feature channels, one panel per model (paper Fig. 3b: TNT vs DeiT, last block).

    Each channel is a point whose coordinates are its values over the patches of the image; a model whose
    channels spread widely has more diverse features.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    fig, axes = _figure(1, len(recordings), "t-SNE of feature channels")
    fig.set_size_inches(3.6 * len(recordings), 3.9)
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for i, (ax, (label, rec)) in enumerate(zip(axes[0], recordings.items(), strict=True)):
        color = colors[i % len(colors)]
        (b,) = check_blocks(rec, [block])
        features = rec.patch_tokens[b][sample, 1:].T.double().cpu().numpy()  # (d, N): one row per channel
        perplexity = min(30.0, (features.shape[0] - 1) / 3)
        # a few hundred points: extra OpenMP threads spin more than they help (20 s instead of 3 s on 2 busy cores)
        with threadpool_limits(limits=1):
            points = TSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
        ax.scatter(points[:, 0], points[:, 1], s=8, color=color, alpha=0.8)
        ax.set_title(f"{label}: block {b + 1}, {len(points)} channels", fontsize=9)
    return fig


# ---- Figure 4: averaged word embeddings -----------------------------------------------------------------------------
def word_embeddings(
    rec: Recording, blocks: Sequence[int], *, image: np.ndarray | None = None, sample: int = 0
) -> Figure:
    """Each word's embedding averaged over channels, tiled where the word sits in the image (paper Fig. 4)."""
    blocks = check_blocks(rec, blocks, words=True)
    lead = int(image is not None)
    fig, axes = _figure(1, len(blocks) + lead, "Averaged word embeddings")
    if lead:
        axes[0, 0].imshow(image)
        axes[0, 0].set_title("input", fontsize=9)
    for col, b in enumerate(blocks):
        ax = axes[0, col + lead]
        ax.imshow(tiled_word_means(rec.word_tokens[b], rec.grid, sample).cpu().numpy(), cmap="gray")
        ax.set_title(f"block {b + 1}", fontsize=9)
    return fig


# ---- Figure 5: inner attention ---------------------------------------------------------------------------------------
def inner_attention(
    rec: Recording,
    image: np.ndarray,
    blocks: Sequence[int],
    *,
    patches: Sequence[tuple[int, int]] | None = None,
    query_word: int | None = None,
    sample: int = 0,
) -> Figure:
    """Attention of one query word over the words of its patch, drawn over the patch pixels (paper Fig. 5)."""
    blocks = check_blocks(rec, blocks, words=True)
    _check_image(rec, image)
    patches = check_patches(rec, patches or default_patches(rec.grid))
    k, p = rec.words_per_side, rec.patch_size
    query = default_query_word(k) if query_word is None else query_word
    if not 0 <= query < k * k:
        raise UserError(f"query word {query} is out of range: a patch has {k * k} words (0..{k * k - 1})")
    n = rec.grid[0] * rec.grid[1]

    fig = Figure(figsize=(PANEL * (len(patches) + 2), PANEL * len(blocks) + 0.6), layout="constrained")
    grid = fig.add_gridspec(len(blocks), len(patches) + 2)
    overview = fig.add_subplot(grid[:, :2])
    overview.imshow(image)
    overview.set_axis_off()
    overview.set_title("query patches", fontsize=9)
    for i, (r, c) in enumerate(patches):
        _outline(overview, c * p, r * p, p, label=_patch_letter(i))
    for row, b in enumerate(blocks):
        for col, (r, c) in enumerate(patches):
            ax = fig.add_subplot(grid[row, col + 2])
            ax.set_xticks([])
            ax.set_yticks([])
            attn = rec.inner_attn[b][sample * n + r * rec.grid[1] + c].mean(dim=0)[query]  # (m,)
            _overlay(ax, image[r * p : (r + 1) * p, c * p : (c + 1) * p], attn.reshape(k, k), (0, p, p, 0))
            _outline(ax, (query % k) * p / k, (query // k) * p / k, p / k, color="lime")
            if row == 0:
                ax.set_title(f"{_patch_letter(col)}: patch ({r}, {c})", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"block {b + 1}")
    fig.suptitle(f"Inner attention of word {query} (green) over the {k * k} words of each patch")
    return fig


# ---- Figure 6: outer attention between patches ----------------------------------------------------------------------
def outer_attention(
    rec: Recording,
    image: np.ndarray,
    blocks: Sequence[int],
    *,
    patches: Sequence[tuple[int, int]] | None = None,
    sample: int = 0,
) -> Figure:
    """Attention of chosen query patches (cyan) over all patches of the image (paper Fig. 6)."""
    blocks = check_blocks(rec, blocks)
    _check_image(rec, image)
    patches = check_patches(rec, patches or default_patches(rec.grid))
    rows, cols = rec.grid
    h, w = rec.input_size
    p = rec.patch_size
    fig, axes = _figure(len(blocks), len(patches), "Outer attention of the query patch (cyan) over all patches")
    for row, b in enumerate(blocks):
        attn = rec.outer_attn[b][sample].mean(dim=0)  # (N+1, N+1)
        for col, (r, c) in enumerate(patches):
            ax = axes[row, col]
            _overlay(ax, image, attn[1 + r * cols + c, 1:].reshape(rows, cols), (0, w, h, 0))
            _outline(ax, c * p, r * p, p)
            if row == 0:
                ax.set_title(f"patch ({r}, {c})", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"block {b + 1}")
    return fig


# ---- Figure 7: class-token attention ---------------------------------------------------------------------------------
def class_attention(
    rec: Recording, image: np.ndarray, blocks: Sequence[int], *, rollout: bool = False, sample: int = 0
) -> Figure:
    """Attention of the class token over the patches (paper Fig. 7); with `rollout`, accumulated up to each block."""
    blocks = check_blocks(rec, blocks)
    _check_image(rec, image)
    rows, cols = rec.grid
    h, w = rec.input_size
    maps = attention_rollout(rec, sample) if rollout else torch.stack([a[sample].mean(dim=0) for a in rec.outer_attn])
    title = "Attention rollout of the class token" if rollout else "Class-token attention over the image"
    fig, axes = _figure(1, len(blocks) + 1, title)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("input", fontsize=9)
    for col, b in enumerate(blocks):
        ax = axes[0, col + 1]
        _overlay(ax, image, maps[b][0, 1:].reshape(rows, cols), (0, w, h, 0))
        ax.set_title(f"{'up to ' if rollout else ''}block {b + 1}", fontsize=9)
    return fig
