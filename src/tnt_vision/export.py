"""Deployable forms of a model: ONNX (dynamic batch), TorchScript and torch.export's ExportedProgram.

Every export is checked against the eager model on a batch of a different size than the one it was traced
with, so a batch dimension frozen by mistake fails the check instead of shipping.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .io import atomic_write

FORMATS = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
ONNX_TOLERANCE = 1e-4


def example_input(batch: int, img_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(dtype)


def export_onnx(model: nn.Module, path: str | Path, img_size: int) -> Path:
    """ONNX with a dynamic batch dimension (input "images", output "logits")."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress chatter and deprecation notes

        def write(tmp: Path) -> None:
            program = torch.onnx.export(
                model,
                (example_input(2, img_size),),
                dynamo=True,
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes={"x": {0: batch}},
                external_data=False,
                verbose=False,
            )
            program.save(str(tmp))

        return atomic_write(path, write)


def export_torchscript(model: nn.Module, path: str | Path, img_size: int, dtype: torch.dtype) -> Path:
    """A traced TorchScript module (tracing keeps the batch size symbolic for these models)."""
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.9+ marks TorchScript deprecated; it still serves C++ runtimes that predate torch.export
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example_input(2, img_size, dtype), check_trace=False)
        return atomic_write(path, lambda tmp: torch.jit.save(traced, str(tmp)))


def export_program(model: nn.Module, path: str | Path, img_size: int, dtype: torch.dtype) -> Path:
    """torch.export's ExportedProgram with a dynamic batch dimension, saved as .pt2."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (example_input(2, img_size, dtype),), dynamic_shapes={"x": {0: batch}})
    buffer = io.BytesIO()  # torch.export.save insists on a .pt2 name, which atomic_write's temporary lacks
    torch.export.save(program, buffer)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def load_exported(path: str | Path, fmt: str) -> object:
    """A callable taking an image batch: an onnxruntime session wrapper, a ScriptModule or a program module."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path))
    return torch.export.load(str(path)).module()


def export_model(
    model: nn.Module, path: str | Path, fmt: str, *, img_size: int, dtype: torch.dtype = torch.float32
) -> dict[str, float | str]:
    """Export `model` and check the file against it on a batch of 3.

    Returns:
        {"path", "format", "max_abs_diff"}. Raises UserError for an unsupported combination or a failed check.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx" and dtype != torch.float32:
        raise UserError("ONNX export is fp32 only here (onnxruntime's CPU kernels lack bf16); use --dtype fp32")
    model = model.eval().to(dtype)
    if fmt == "onnx":
        export_onnx(model, path, img_size)
    elif fmt == "torchscript":
        export_torchscript(model, path, img_size, dtype)
    else:
        export_program(model, path, img_size, dtype)
    x = example_input(3, img_size, dtype)
    with torch.inference_mode():
        expected = model(x).float()
        got = load_exported(path, fmt)(x).float()
    diff = (expected - got).abs().max().item()
    tolerance = ONNX_TOLERANCE if fmt == "onnx" else _tolerance(dtype)
    if not diff <= tolerance:
        raise UserError(f"exported {fmt} differs from PyTorch by {diff:.3g} (tolerance {tolerance:g}): {path}")
    return {"path": str(path), "format": fmt, "max_abs_diff": diff}


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 5e-2
