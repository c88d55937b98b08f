"""Checkpoint formats, mismatches, resolution changes, downloads and `tnt convert`."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import timm
import torch

import tnt_vision
from helpers import randomize_, timm_to_official
from tnt_vision.cli import main
from tnt_vision.models import CheckpointError, get_spec, load_checkpoint
from tnt_vision.models.checkpoint import download_weights, read_state_dict, save_safetensors
from tnt_vision.models.registry import Weights

SMALL = {"img_size": 64, "depth": 2}


@pytest.fixture(scope="module")
def ref() -> torch.nn.Module:
    """A timm TNT-S (2 blocks, 64x64) with random weights: the source of every file below."""
    return randomize_(timm.create_model("tnt_s_patch16_224", img_size=64, depth=2)).eval()


def _logits(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
        lambda sd: {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    ],
    ids=["plain", "state_dict", "ddp-model", "compiled-model"],
)
@pytest.mark.parametrize("layout", ["timm", "official"])
def test_torch_save_files_load_in_every_wrapping(ref, wrap, layout: str, tmp_path) -> None:
    sd = ref.state_dict() if layout == "timm" else timm_to_official(ref.state_dict())
    path = tmp_path / "w.pth.tar"
    torch.save(wrap(sd), path)
    model = tnt_vision.create_model("tnt_s_patch16_224", **SMALL)
    report = load_checkpoint(model, path)
    assert report["format"] == layout
    torch.testing.assert_close(_logits(model), _logits(ref), atol=1e-5, rtol=0)


def test_ema_weights_are_preferred_and_can_be_declined(ref, tmp_path) -> None:
    plain = tnt_vision.create_model("tnt_s_patch16_224", **SMALL).state_dict()
    ema = tnt_vision.models.to_native(ref.state_dict())
    path = tmp_path / "run.pth"
    torch.save({"model": plain, "state_dict_ema": ema}, path)
    torch.testing.assert_close(read_state_dict(path)["head.weight"], ema["head.weight"])
    torch.testing.assert_close(read_state_dict(path, use_ema=False)["head.weight"], plain["head.weight"])


def test_safetensors_round_trip_keeps_metadata(tmp_path) -> None:
    from safetensors import safe_open

    model = tnt_vision.create_model("tnt_ti_patch16_224", **SMALL)
    path = save_safetensors(model, tmp_path / "m.safetensors", {"architecture": "tnt_ti_patch16_224"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["architecture"] == "tnt_ti_patch16_224"
    clone = tnt_vision.create_model("tnt_ti_patch16_224", pretrained=path, **SMALL)
    torch.testing.assert_close(_logits(clone), _logits(model), atol=0, rtol=0)


def test_another_architecture_is_refused_with_every_mismatch_named(tmp_path) -> None:
    path = tmp_path / "ti.safetensors"
    save_safetensors(tnt_vision.create_model("tnt_ti_patch16_224", **SMALL), path)
    with pytest.raises(
        CheckpointError,
        match=r"does not fit tnt_s_patch16_224: 68 shape mismatch: blocks.0.inner.attn.proj.bias: file \(12,\) vs",
    ):
        load_checkpoint(tnt_vision.create_model("tnt_s_patch16_224", **SMALL), path)
    with pytest.raises(CheckpointError, match=r"4 missing: .*patch_embed.proj.weight; 41 unexpected: blocks.0.inner"):
        load_checkpoint(tnt_vision.create_model("deit_ti_patch16_224", **SMALL), path)


def test_head_can_be_replaced_for_fine_tuning(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    source = tnt_vision.create_model("tnt_ti_patch16_224", **SMALL)
    save_safetensors(source, path)
    model = tnt_vision.create_model("tnt_ti_patch16_224", num_classes=10, **SMALL)
    with pytest.raises(CheckpointError, match=r"head.weight: file \(1000, 192\) vs model \(10, 192\)"):
        load_checkpoint(model, path)
    report = load_checkpoint(model, path, ignore_head=True)
    assert report["skipped"] == ["head.bias", "head.weight"]
    torch.testing.assert_close(model.norm.weight, source.norm.weight)


def test_other_resolution_loads_with_interpolated_position_encoding(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    source = randomize_(tnt_vision.create_model("tnt_ti_patch16_224", **SMALL))
    save_safetensors(source, path)
    model = tnt_vision.create_model("tnt_ti_patch16_224", img_size=96, depth=2)
    report = load_checkpoint(model, path)
    assert report["resized"] == ["sentence_pos (1, 17, 192) -> (1, 37, 192)"]
    expected = timm.layers.resample_abs_pos_embed(source.sentence_pos, [6, 6], [4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.sentence_pos, expected)


def test_unreadable_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(bad)
    torch.save({"epoch": 1}, bad)
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        read_state_dict(bad)


def _spec_with(tmp_path, ref, sha256: str | None) -> tnt_vision.models.ModelSpec:
    release = tmp_path / "release" / "tnt_s_81.5.pth.tar"
    release.parent.mkdir()
    torch.save(timm_to_official(ref.state_dict()), release)
    digest = sha256 if sha256 is not None else hashlib.sha256(release.read_bytes()).hexdigest()
    weights = Weights(release.as_uri(), "tnt_s_81.5.pth.tar", sha256=digest)
    return dataclasses.replace(get_spec("tnt_s_patch16_224"), weights=weights)


def test_pretrained_download_verifies_and_caches(ref, tmp_path, monkeypatch) -> None:
    spec = _spec_with(tmp_path, ref, sha256=None)
    monkeypatch.setitem(tnt_vision.models.registry._REGISTRY, "tnt_s_patch16_224", spec)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    model = tnt_vision.create_model("tnt_s_patch16_224", pretrained=True, **SMALL)
    torch.testing.assert_close(_logits(model), _logits(ref), atol=1e-5, rtol=0)
    assert (tmp_path / "hub" / "checkpoints" / "tnt_s_81.5.pth.tar").is_file()


def test_pretrained_download_rejects_a_wrong_hash(ref, tmp_path) -> None:
    spec = _spec_with(tmp_path, ref, sha256="0" * 64)
    with pytest.raises(CheckpointError, match="expected 0000"):
        download_weights(spec, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "tnt_s_81.5.pth.tar").exists()


def test_offline_download_says_how_to_pass_a_local_file(tmp_path) -> None:
    spec = dataclasses.replace(
        get_spec("tnt_s_patch16_224"), weights=Weights("http://127.0.0.1:9/tnt_s_81.5.pth.tar", "tnt_s_81.5.pth.tar")
    )
    with pytest.raises(CheckpointError, match=r"cannot download .*pretrained='/path/tnt_s_81.5.pth.tar'"):
        download_weights(spec, cache_dir=tmp_path)


def test_convert_command_writes_native_safetensors(ref, tmp_path, capsys) -> None:
    src = tmp_path / "official.pth.tar"
    torch.save(timm_to_official(ref.state_dict()), src)
    dst = tmp_path / "out.safetensors"
    args = [str(src), str(dst), "--model", "tnt_s_patch16_224", "--img-size", "64"]
    with pytest.MonkeyPatch.context() as mp:
        # `tnt convert` builds the registered depth; a 2-block reference keeps this test fast.
        mp.setitem(
            tnt_vision.models.registry._REGISTRY,
            "tnt_s_patch16_224",
            dataclasses.replace(
                get_spec("tnt_s_patch16_224"), config=get_spec("tnt_s_patch16_224").config.replace(depth=2)
            ),
        )
        assert main(["convert", *args]) == 0
    assert "official layout" in capsys.readouterr().out
    model = tnt_vision.create_model("tnt_s_patch16_224", pretrained=dst, **SMALL)
    torch.testing.assert_close(_logits(model), _logits(ref), atol=1e-5, rtol=0)


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys) -> None:
    assert (
        main(
            ["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors"), "--model", "tnt_s_patch16_224"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "checkpoint not found" in err
    assert main(["convert", "a", "b", "--model", "tnt_huge"]) == 2
    assert "unknown model 'tnt_huge'" in capsys.readouterr().err
