"""Residual additions and the LayerNorms after them, one pass over the rows each, for GPU inference (Triton).

Once the inner blocks are one kernel each (`inner_block`), the outer transformer's memory-bound operators take
most of a GPU's inference time (TNT-S, bf16 autocast, batch 256 on an H100: LayerNorm 5.3 ms over 51 calls,
additions 3.2, casts 1.7, of 25): every LayerNorm reads the fp32 residual stream and writes fp32 that autocast
then casts for the linear layer after it, and every residual addition reads and writes the stream once more.
`add_and_norm` does it in one pass over each row: the sum x + y (y optionally layer-normed first, as the sentence
projection's second norm before its addition to the patches' tokens) written where it goes, and the LayerNorm of
the sum written in the dtype the next linear layer takes (autocast's). The same values as the plain operators:
sums and norms in fp32, each result rounded once to the dtype the plain path stores it in.

Like the inner block, each configuration is compared with the plain operators on its first call
(`first_use.checked`); the plain path serves training, graph capture and export.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import capturing_graph, grad_recorded
from .first_use import checked, take
from .inner_block import inner_block_applies
from .triton_block import triton

MAX_WIDTH = 4096  # widest row served (TNT-B's sentences: 640)
CHECK_IMAGES = 2  # what the first-use check runs on
ELEMENTS = 4096  # per program: rows x the padded width
_CHECKED: dict[tuple[Any, ...], bool] = {}
WHAT = "fused add-and-norm kernel"
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

if triton is not None:
    import triton.language as tl

    from .triton_block import round_to

    @triton.jit
    def _rows(ptr, row, per_image, stride_image, stride_row, cols):
        """Pointers to rows (image, index) = divmod(row, per_image) of a tensor with contiguous rows."""
        image, index = row // per_image, row % per_image
        return ptr + (image * stride_image + index * stride_row)[:, None] + cols[None, :]

    @triton.jit
    def _norm(v, w_ptr, b_ptr, cols, mask, WIDTH: tl.constexpr, eps):
        """LayerNorm of each row of v (fp32, zeros where masked), as ATen computes it."""
        mean = tl.sum(v, axis=1) / WIDTH
        centred = tl.where(mask, v - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / WIDTH + eps)
        w = tl.load(w_ptr + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
        return centred * rstd[:, None] * w[None, :] + b[None, :]

    @triton.jit
    def _add_norm_kernel(
        x_ptr, y_ptr, total_ptr, normed_ptr, y_w, y_b, n_w, n_b, rows, per_image,
        x_si, x_sr, y_si, y_sr, t_si, t_sr, n_si, n_sr, y_eps, n_eps,
        WIDTH: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_Y: tl.constexpr, NORM_Y: tl.constexpr,
        NORM: tl.constexpr, Y_NORMED: tl.constexpr, TOTAL: tl.constexpr, NORMED: tl.constexpr,
    ):  # fmt: skip
        """total = x + y (y layer-normed first with NORM_Y), stored; the LayerNorm of total (of x without y) stored
        with NORM. Y_NORMED, TOTAL and NORMED name the dtype each result is rounded to ("fp32", "bf16", "fp16")."""
        row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = (row < rows)[:, None] & (cols < WIDTH)[None, :]
        total = tl.load(_rows(x_ptr, row, per_image, x_si, x_sr, cols), mask=mask, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(_rows(y_ptr, row, per_image, y_si, y_sr, cols), mask=mask, other=0.0).to(tl.float32)
            if NORM_Y:
                y = round_to(_norm(y, y_w, y_b, cols, mask, WIDTH, y_eps), Y_NORMED)
            total = round_to(total + y, TOTAL)
            tl.store(_rows(total_ptr, row, per_image, t_si, t_sr, cols), total, mask=mask)
        if NORM:
            normed = round_to(_norm(total, n_w, n_b, cols, mask, WIDTH, n_eps), NORMED)
            tl.store(_rows(normed_ptr, row, per_image, n_si, n_sr, cols), normed, mask=mask)


def add_norm_applies(x: torch.Tensor, *others: torch.Tensor | None, norm: nn.LayerNorm | None = None) -> bool:
    """Whether the kernel (`norm_for_linear`, `add_and_norm`, `add_normed`) takes x and the others (y), with `norm`'s
    parameters: 3-d with contiguous rows of at most MAX_WIDTH, on a GPU where Triton works (or on the CPU under
    Triton's interpreter), where no gradient is recorded and no graph is captured."""
    if not inner_block_applies(x) or x.shape[-1] > MAX_WIDTH:  # the cheap test first: it says no on the CPU
        return False
    parameters = () if norm is None else (norm.weight, norm.bias)
    tensors = [x, *(t for t in (*others, *parameters) if t is not None)]
    if any(t.stride(-1) != 1 for t in tensors):
        return False
    return not grad_recorded(tensors) and not capturing_graph()


def norm_for_linear(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """`norm(x)` in the dtype the next linear layer takes (autocast's, else x's), where `add_norm_applies`."""
    return _checked_launch(x, None, None, norm, None)[1]


def add_and_norm(x: torch.Tensor, y: torch.Tensor, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, `norm_for_linear` of it) in one pass, the sum a fresh tensor, where `add_norm_applies`."""
    return _checked_launch(x, y, None, norm, None)


def add_normed(x: torch.Tensor, y: torch.Tensor, y_norm: nn.LayerNorm, out: torch.Tensor) -> None:
    """x + `y_norm(y)` written into `out` (say, the patches' rows of a larger tensor), where `add_norm_applies`."""
    _checked_launch(x, y, y_norm, None, out)


def _checked_launch(
    x: torch.Tensor,
    y: torch.Tensor | None,
    y_norm: nn.LayerNorm | None,
    norm: nn.LayerNorm | None,
    out: torch.Tensor | None,
) -> tuple[Any, Any]:
    """(x + y (`y_norm(y)` with `y_norm`; x itself without y), `norm` of it or None without `norm`) by one launch
    of the kernel, checked against the plain operators on its first call per configuration. The sum goes into
    `out` where given, else into a fresh tensor."""
    dtypes = result_dtypes(x, y, y_norm)
    if y is not None and out is None:
        out = torch.empty(x.shape, dtype=dtypes[1], device=x.device)
    normed = None if norm is None else torch.empty(x.shape, dtype=dtypes[2], device=x.device)
    key = (x.device, x.dtype, None if y is None else y.dtype, y_norm is not None, *dtypes, x.shape[-1])
    if _CHECKED.get(key):  # trusted: one launch, nothing more (this runs for every norm of the model)
        _launch(x, y, out, normed, y_norm, norm, dtypes)
        return (x if y is None else out), normed
    results = [t for t in (None if y is None else out, normed) if t is not None]

    def kernel(s: slice) -> list[torch.Tensor]:
        _launch(take(x, s), take(y, s), take(out, s), take(normed, s), y_norm, norm, dtypes)
        return [take(t, s) for t in results]

    def reference(s: slice) -> list[torch.Tensor]:  # fresh tensors: the check compares them with the kernel's
        xs = take(x, s)
        total = xs if y is None else (xs + (take(y, s) if y_norm is None else _layer_norm(take(y, s), y_norm)))
        plain = [] if y is None else [total.to(dtypes[1])]
        return plain if norm is None else [*plain, _layer_norm(plain[0] if plain else xs, norm).to(dtypes[2])]

    tolerance = 1e-4 if set(dtypes) == {torch.float32} else 2e-2  # a bf16 result may round the other way
    got = checked(_CHECKED, key, kernel, reference, x.shape[0], CHECK_IMAGES, tolerance, WHAT)
    for result, value in zip(results, got, strict=True):
        if value.data_ptr() != result.data_ptr():  # the plain operators' (the kernel is off)
            result.copy_(value)
    return (x if y is None else out), normed


def result_dtypes(
    x: torch.Tensor, y: torch.Tensor | None, y_norm: nn.LayerNorm | None
) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """The dtypes the plain path stores y's norm, the sum and its norm in: a LayerNorm writes its input's dtype, or
    fp32 under CUDA's autocast (which lists it among the fp32 operators; the CPU's keeps the input's); the next
    linear layer takes the norm of the sum in autocast's dtype."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    y_normed = torch.float32 if (autocast and device == "cuda") or y is None else y.dtype
    total = x.dtype if y is None else torch.promote_types(x.dtype, y.dtype if y_norm is None else y_normed)
    return y_normed, total, torch.get_autocast_dtype(device) if autocast else total


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm | None) -> torch.Tensor:
    assert norm is not None
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _launch(
    x: torch.Tensor,
    y: torch.Tensor | None,
    total: torch.Tensor | None,
    normed: torch.Tensor | None,
    y_norm: nn.LayerNorm | None,
    norm: nn.LayerNorm | None,
    dtypes: tuple[torch.dtype, torch.dtype, torch.dtype],
) -> None:
    """One launch over every row of x (images, rows, width); unread tensors stand in for those absent."""
    images, per_image, width = x.shape
    block = triton.next_power_of_2(width)
    rows = max(1, ELEMENTS // block)
    has_y = y is not None
    y, total, normed = (x if t is None else t for t in (y, total, normed))
    y_w, y_b, y_eps = (x, x, 0.0) if y_norm is None else (y_norm.weight, y_norm.bias, y_norm.eps)
    n_w, n_b, n_eps = (x, x, 0.0) if norm is None else (norm.weight, norm.bias, norm.eps)
    _add_norm_kernel[(triton.cdiv(images * per_image, rows),)](
        x, y, total, normed, y_w, y_b, n_w, n_b, images * per_image, per_image, x.stride(0), x.stride(1),
        y.stride(0), y.stride(1), total.stride(0), total.stride(1), normed.stride(0), normed.stride(1), y_eps, n_eps,
        WIDTH=width, BLOCK=block, ROWS=rows, HAS_Y=has_y, NORM_Y=y_norm is not None, NORM=norm is not None,
        Y_NORMED=_TYPES[dtypes[0]], TOTAL=_TYPES[dtypes[1]], NORMED=_TYPES[dtypes[2]],
        num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
