"""Compile every configuration of the fused inner block's Triton kernels for a GPU, without a GPU.

    PYTHONPATH=src python benchmarks/gpu_compile_check.py --arch 90 --kernels forward backward

Triton's interpreter (how the tests run the kernels on a CPU) executes the kernels' Python, not Triton's
compiler: code the compiler rejects (a non-constexpr global, a loop variable changing type, code after a
constexpr-guarded `return`) passes there. This compiles each kernel, per precision, shape (TNT-S; TNT-B with q/k/v
bias) and autotuner configuration, for the given architecture with Triton's own compiler and ptxas, and prints
the registers and stack bytes per thread (`cuobjdump -res-usage`; stack beyond a few bytes means spills). It
needs triton with its NVIDIA backend, no GPU. Exits 1 if any configuration fails to compile.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tnt_vision.kernels import triton_block as tb

SHAPES = {  # the inner transformers of TNT-S and TNT-B
    "tnt_s": {"WORDS": 16, "WIDTH": 24, "HEADS": 4, "HIDDEN": 96, "HAS_QKV_BIAS": False, "C_PAD": 32},
    "tnt_b": {"WORDS": 16, "WIDTH": 40, "HEADS": 4, "HIDDEN": 160, "HAS_QKV_BIAS": True, "C_PAD": 64},
}
ELEMENT = {"ieee": "fp32", "tf32": "fp32", "bf16": "bf16", "fp16": "fp16"}  # the activations' dtype per precision
INTEGERS = {"sentences", "size_class", "slots"}
SCALARS = {"eps1", "eps2", "scale"}
ACTIVATIONS = {"x_ptr", "out_ptr", "grad_ptr", "dx_ptr"}
FP32_BUFFERS = {"scales_ptr", "g_ptr"}


def signature(kernel: Any, element: str, constants: dict[str, Any]) -> dict[str, str]:
    """Triton's type per argument: activations in `element`, weights too (16-bit weights), fp32 buffers."""
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in INTEGERS:
            types[name] = "i32"
        elif name in SCALARS:
            types[name] = "fp32"
        else:
            types[name] = "*" + ("fp32" if name in FP32_BUFFERS else element)
    return types


def resources(kernel: Any, precision: str, constants: dict[str, Any], warps: int, arch: int) -> tuple[str, float]:
    """'REG:n STACK:n' of the compiled kernel, and the seconds its compilation took."""
    source = ASTSource(kernel, signature(kernel, ELEMENT[precision], constants), constexprs=constants)
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    seconds = time.perf_counter() - start
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:\d+ STACK:\d+", usage)
    return (found.group(0) if found else "REG:? STACK:?"), seconds


def configurations(kernel: str, precision: str) -> list[tuple[dict[str, Any], int]]:
    """(constants, warps) of every configuration the autotuner chooses from."""
    if kernel == "forward":
        configs = tb.EXACT_CONFIGS if precision == "ieee" else tb.CONFIGS
        return [({"ROWS": rows, "BATCHED": batched}, warps) for rows, batched, warps in configs]
    configs = tb.EXACT_BACKWARD_CONFIGS if precision == "ieee" else tb.BACKWARD_CONFIGS
    return [({"ROWS": rows}, warps) for rows, warps in configs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--kernels", nargs="+", default=["forward", "backward"], choices=("forward", "backward"))
    p.add_argument("--precisions", nargs="+", default=list(tb.PRECISIONS), choices=tb.PRECISIONS)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--quick", action="store_true", help="only each kernel's first configuration (the tests' check)")
    args = p.parse_args()
    failures = 0
    for kernel in args.kernels:
        jit = tb.forward_kernel if kernel == "forward" else tb.backward_kernel
        for shape in args.shapes:
            for precision in args.precisions:
                for config, warps in configurations(kernel, precision)[: 1 if args.quick else None]:
                    constants = {**SHAPES[shape], **config, "M_PAD": 16, "H_BLOCK": 32, "HAS_SCALES": True}
                    constants["PRECISION"] = precision
                    label = f"{kernel} {shape} {precision} {config} warps={warps}"
                    try:
                        usage, seconds = resources(jit, precision, constants, warps, args.arch)
                    except Exception as error:  # report every failing configuration, then exit 1
                        failures += 1
                        print(f"{label}: FAILED {type(error).__name__}: {str(error).strip()[-400:]}", flush=True)
                        continue
                    print(f"{label}: {usage} ({seconds:.1f} s)", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
