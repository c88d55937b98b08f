"""Write the first test digits as PNG files (for `tnt predict`): `python -m tnt_vision.data.digits_png DIR [N]`."""

from __future__ import annotations

import sys
from pathlib import Path

from ..io import atomic_write
from .datasets import DigitsDataset


def write_test_digits(folder: str | Path, count: int = 4) -> list[Path]:
    """The first `count` images of the digits test split, as 8x8 PNGs named `test<i>_label<d>.png`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    test = DigitsDataset(train=False)
    paths = []
    for i in range(min(count, len(test))):
        img, label = test[i]
        path = folder / f"test{i}_label{label}.png"
        atomic_write(path, lambda tmp, img=img: img.save(tmp, format="PNG"))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_test_digits(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4):
        print(p)
