"""Exports (ONNX with a dynamic batch, TorchScript, ExportedProgram) reproduce the eager model."""

from __future__ import annotations

import pytest
import torch

from tnt_vision.cli import main
from tnt_vision.export import ONNX_TOLERANCE, export_model, load_exported
from tnt_vision.models import create_model
from tnt_vision.models.checkpoint import save_safetensors

TINY = {"depth": 2, "img_size": 32, "num_classes": 10}


@pytest.mark.parametrize(
    ("fmt", "suffix", "tolerance"),
    [("onnx", ".onnx", ONNX_TOLERANCE), ("torchscript", ".pt", 1e-5), ("exported-program", ".pt2", 1e-5)],
)
def test_export_matches_pytorch_at_another_batch_size(fmt: str, suffix: str, tolerance: float, tmp_path) -> None:
    model = create_model("tnt_s_patch16_224", **TINY).eval()
    path = tmp_path / f"model{suffix}"
    report = export_model(model, path, fmt, img_size=32)
    assert report["max_abs_diff"] <= tolerance
    x = torch.randn(5, 3, 32, 32)  # neither the traced batch (2) nor the checked one (3)
    with torch.inference_mode():
        expected = model(x)
        loaded = load_exported(path, fmt)
        got = loaded(x)
    assert got.shape == (5, 10)
    assert (got - expected).abs().max() <= tolerance
    if fmt != "onnx":  # no tnt_vision operator: the file must load where tnt_vision is not installed
        assert "word_attention" not in str(getattr(loaded, "inlined_graph", None) or loaded.graph)


def test_export_command_loads_the_checkpoint(tmp_path, capsys: pytest.CaptureFixture) -> None:
    trained = create_model("deit_ti_patch16_224", img_size=32, num_classes=10).eval()
    save_safetensors(trained, tmp_path / "w.safetensors")
    out = tmp_path / "m.pt"
    args = ["export", "--model", "deit_ti_patch16_224", "--img-size", "32", "--num-classes", "10"]
    args += ["--checkpoint", str(tmp_path / "w.safetensors"), "--format", "torchscript", "--output", str(out)]
    assert main(args) == 0
    assert str(out) in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(load_exported(out, "torchscript")(x), trained(x), atol=1e-5, rtol=0)


def test_unsupported_combination_is_one_clear_line(tmp_path, capsys: pytest.CaptureFixture) -> None:
    args = ["export", "--model", "tnt_ti_patch16_224", "--format", "onnx", "--dtype", "bf16"]
    assert main([*args, "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "fp32" in err
    assert not (tmp_path / "m.onnx").exists()
