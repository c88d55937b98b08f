"""Kernels trusted only after their first call for each configuration matched the plain path.

A GPU kernel that fails to compile or disagrees with the plain operators (say, on a GPU generation or Triton
version it was never run on) is switched off for that configuration with one warning, and the plain path's
result is used: never a wrong one. `checked` runs that check and remembers the verdict in the caller's table.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T", torch.Tensor, list[torch.Tensor], tuple[torch.Tensor, ...])
ALL = slice(None)


def checked(
    verdicts: dict[tuple[Any, ...], bool],
    key: tuple[Any, ...],
    kernel: Callable[[slice], T],
    reference: Callable[[slice], T],
    size: int,
    sample: int,
    tolerance: float,
    what: str,
) -> T:
    """The kernel's result over all `size` rows of the first dimension where it ran and (on the first call for
    `key`) matched the reference on the first `sample` (a check costing the same at any batch size), else the
    reference's, the kernel then switched off for `key` in `verdicts` with one warning naming `what`. `kernel`
    and `reference` take the rows to run on; they agree when each result is within `tolerance` times its largest
    value of the reference's."""
    if verdicts.get(key) is False:
        return reference(ALL)
    if key not in verdicts:
        rows = ALL if size <= sample else slice(0, sample)
        out, problem = _tried(kernel, reference, rows, tolerance)
        if problem:
            return _give_up(verdicts, key, what, problem, reference(ALL))
        if problem == "":  # e.g. fp16 gradients a GradScaler made overflow: the check waits for a finite call
            return reference(ALL)
        verdicts[key] = True
        if rows == ALL:
            return out
    try:
        return kernel(ALL)
    except Exception as error:  # checked on fewer rows, but failing here: off all the same
        return _give_up(verdicts, key, what, _reason(error), reference(ALL))


def take(t: torch.Tensor | None, rows: slice) -> Any:
    """The rows of t (None stays None); t itself for all of them, without a view's cost on every call."""
    return t if t is None or rows == ALL else t[rows]


def _tried(kernel: Callable[[slice], T], reference: Callable[[slice], T], rows: slice, tolerance: float
           ) -> tuple[T | None, str | None]:  # fmt: skip
    """The kernel's result on `rows`, and what is wrong with it: None (it matches the reference), "" (the
    reference is not finite: no verdict), or why it cannot be trusted."""
    try:
        out = kernel(rows)
    except Exception as error:  # a triton/driver combination the kernel cannot compile for
        return None, _reason(error)
    expected = reference(rows)
    if not all(t.isfinite().all() for t in listed(expected)):
        return out, ""
    error = disagreement(out, expected, tolerance)
    return out, None if error is None else f"differs from the plain path by {error:.3g}"


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def disagreement(got: T, want: T, tolerance: float) -> float | None:
    """The first largest difference beyond `tolerance` times its tensor's largest value, or None."""
    for a, b in zip(listed(got), listed(want), strict=True):
        error = (a.float() - b.float()).abs().max().item()
        if not error <= tolerance * max(b.float().abs().max().item(), 1e-12):
            return error
    return None


def listed(t: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [t] if isinstance(t, torch.Tensor) else list(t)


def _give_up(verdicts: dict[tuple[Any, ...], bool], key: tuple[Any, ...], what: str, reason: str, fallback: T) -> T:
    verdicts[key] = False
    warnings.warn(f"tnt_vision: {what} off ({reason}); using the plain path", RuntimeWarning, 4)
    return fallback
