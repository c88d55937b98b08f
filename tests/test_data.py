"""Data specs, the fixed digits split, per-sample seeding and skipping of unreadable images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from tnt_vision.data import datasets
from tnt_vision.errors import UserError


def test_digits_split_is_fixed_and_disjoint() -> None:
    train, test = datasets.DigitsDataset(train=True), datasets.DigitsDataset(train=False)
    assert (len(train), len(test)) == (1437, 360)
    from sklearn.datasets import load_digits

    ref = load_digits()
    assert test.targets == ref.target[::5].tolist()  # every 5th sample, starting at 0
    img, label = test[0]
    assert img.size == (8, 8) and img.mode == "RGB" and label == 0  # noqa: PT018
    assert sorted(set(test.targets)) == list(range(10))


@pytest.mark.parametrize("spec", ["mnist", "cifar10", "imagefolder"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(UserError):
        datasets.build_splits(spec)


def test_seeded_sampler_gives_every_sample_its_global_position() -> None:
    data = list(range(12))

    def items(rank: int, world: int, start: int = 0) -> list[tuple[int, int]]:
        inner = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=3)
        s = datasets.SeededSampler(inner, seed=3, rank=rank, world=world)
        s.set_epoch(1, start=start)
        return list(s)

    single = items(0, 1)
    two = sorted(items(0, 2) + items(1, 2), key=lambda t: t[1])
    assert two == single  # same (index, seed) pairs whichever way the global batch is split
    assert items(0, 1, start=5) == single[5:]  # a resumed epoch continues with the same seeds
    assert len({seed for _, seed in single}) == 12


def test_sample_augmentation_depends_only_on_its_seed() -> None:
    base = datasets.DigitsDataset(train=False)
    from torchvision import transforms as T

    ds = datasets.SampleSet(base, T.Compose([T.RandomResizedCrop(16), T.ToTensor()]))
    state = torch.get_rng_state()
    a = ds[(0, 123)][0]
    torch.rand(5)  # the global stream moves on ...
    b = ds[(0, 123)][0]
    assert torch.equal(a, b)  # ... the sample does not
    assert not torch.equal(a, ds[(0, 124)][0])
    torch.set_rng_state(state)
    ds[(0, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # and the global stream is left untouched


def test_unreadable_image_is_none_and_collate_counts_it(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "c").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / split / "c" / "ok.png")
    (tmp_path / "train" / "c" / "bad.png").write_bytes(b"junk")
    splits = datasets.build_splits(f"imagefolder:{tmp_path}")
    from torchvision.transforms import ToTensor

    ds = datasets.SampleSet(splits.train, ToTensor())
    with pytest.warns(UserWarning, match="bad.png"):
        batch = [ds[i] for i in range(len(ds))]
    images, _, skipped = datasets.collate_skipping(batch)
    assert (images.shape[0], skipped) == (1, 1)
