"""Shared fixtures: small tensors, and the CIFAR-10 JPEG archive from ../shared/data when it is present."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR10_ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`.../cifar10` with train/ and test/ ImageFolder trees, extracted once per session."""
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR10_ARCHIVE}")
    out = tmp_path_factory.mktemp("data")
    with tarfile.open(CIFAR10_ARCHIVE) as tar:
        tar.extractall(out, filter="data")
    return out / "cifar10"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build (or load the cached) CPU kernels once, before any test or subprocess is timed."""
    from tnt_vision.kernels import cpu_kernels

    cpu_kernels()
