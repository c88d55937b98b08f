"""The compiled CPU kernels under AddressSanitizer: TNT training and inference through them, any out-of-bounds read
or write reported where it happens.

    PYTHONPATH=src python benchmarks/kernels_asan_check.py            # about three minutes on 2 cores

Builds the kernels (`kernels.build_cpu_kernels`) with `-fsanitize=address` and runs, in a process started with
GCC's ASan runtime preloaded (and libstdc++ before it, which ASan's exception interceptor needs), a training step
(forward and backward) and an inference forward of each model below in fp32 and under bf16 autocast: at 224x224
over groups of one image (`tnt.CACHE_BLOCK_BYTES` at a byte: several groups and their split), and at small sizes
with odd batches. PyTorch's CPU tensors come from `posix_memalign`, which ASan intercepts, so every tensor has red
zones on both sides, and the kernels' vector loads and stores are checked against them (the script first checks
that a byte past a tensor's end is poisoned). Masked vector accesses (the rows' tails) are not instrumented by GCC;
they cannot fault, and their masked-off lanes are not read. Run it after changing a kernel.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch

CHILD = "TNT_VISION_ASAN_CHILD"
SANITIZE = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
MODELS = ("tnt_s_patch16_224", "tnt_ti_patch16_224", "tnt_b_patch16_224")  # head widths 6, 6 and 10 (TNT-B)
SIZES = ((224, 3), (224, 2), (64, 5), (32, 1))  # image size, batch


def runtime(library: str) -> str:
    """The compiler's own copy of `library` (what its `-fsanitize=address` links against)."""
    compiler = os.environ.get("CXX", "c++")
    try:
        done = subprocess.run([compiler, f"-print-file-name={library}"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise SystemExit(f"no C++ compiler {compiler!r} (set CXX): the kernels cannot be built here") from None
    path = done.stdout.strip()
    if not os.path.isabs(path):
        raise SystemExit(f"{compiler} has no {library} (AddressSanitizer's runtime): install the compiler's libasan")
    return path


def restart_with_asan() -> int:
    env = {**os.environ, CHILD: "1", "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1"}
    env["LD_PRELOAD"] = " ".join(runtime(name) for name in ("libasan.so", "libstdc++.so"))
    return subprocess.run([sys.executable, *sys.argv], env=env, check=False).returncode


def red_zones() -> bool:
    """Whether ASan guards a CPU tensor's memory: the byte after its end poisoned, its last one not."""
    poisoned = ctypes.CDLL(None).__asan_address_is_poisoned
    poisoned.restype, poisoned.argtypes = ctypes.c_int, [ctypes.c_void_p]
    t = torch.empty(1000)
    return poisoned(t.data_ptr() + t.nbytes) == 1 and poisoned(t.data_ptr() + t.nbytes - 1) == 0


def exercise(name: str, size: int, batch: int, bf16: bool) -> None:
    """A training step and an inference forward of `name` through the kernels."""
    from tnt_vision.models import create_model

    model = create_model(name, depth=2, num_classes=10, img_size=size).train()
    x = torch.randn(batch, 3, size, size)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = model(x).float().square().mean()
    loss.backward()
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        model.eval()(x)


def check(models: list[str]) -> None:
    from tnt_vision import kernels
    from tnt_vision.models import tnt

    if not red_zones():
        raise SystemExit("tensors have no red zones: AddressSanitizer is not active in this process")
    with mock.patch.object(kernels, "_CFLAGS", [*kernels._CFLAGS, *SANITIZE]):
        kernels.cpu_kernels.cache_clear()
        module = kernels.cpu_kernels()
    if module is None or b"__asan_report" not in Path(module.__file__).read_bytes():
        raise SystemExit("the kernels could not be built with -fsanitize=address")
    print(f"kernels built with AddressSanitizer ({Path(module.__file__).name}); tensors have red zones", flush=True)
    with mock.patch.object(tnt, "CACHE_BLOCK_BYTES", 1), mock.patch.object(tnt, "BF16_BLOCK_BYTES", 1):
        for name in models:
            for size, batch in SIZES:
                for bf16 in (False, True):
                    exercise(name, size, batch, bf16)
                    print(
                        f"  {name} at {size}x{size}, batch {batch}, {'bf16' if bf16 else 'fp32'}: no report", flush=True
                    )
    print("no out-of-bounds access reported")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    if os.environ.get(CHILD) != "1":
        sys.exit(restart_with_asan())
    check(args.models)


if __name__ == "__main__":
    main()
