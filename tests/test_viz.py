"""Visualisation: recording during a forward pass, the numbers behind the pictures, the pictures, `tnt viz`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from tnt_vision import create_model, list_models
from tnt_vision.cli import main
from tnt_vision.errors import UserError
from tnt_vision.models import get_spec
from tnt_vision.models.layers import Attention, fused_attention_enabled
from tnt_vision.viz import (
    attention_rollout,
    capture,
    class_attention,
    feature_maps,
    feature_tsne,
    inner_attention,
    make_pictures,
    outer_attention,
    word_embeddings,
    write_report,
)
from tnt_vision.viz.figures import grid_maps, tiled_word_means

# Every registered architecture (which blocks have an inner transformer, legacy layout, SE, DeiT) at a width and
# resolution small enough to build in milliseconds; depth stays, so the hybrids' block indices stay valid.
SMALL = {"img_size": 48, "outer_dim": 24, "outer_heads": 2, "inner_dim": 8, "inner_heads": 2}


def distinct_architectures() -> list[str]:
    """One registered name per architecture that stays distinct at the small size (TNT-Ti/S/B differ only in width)."""
    first: dict[object, str] = {}
    for name in list_models():
        first.setdefault(get_spec(name).config.replace(**SMALL), name)
    return list(first.values())


def small_model(name: str, **overrides: object) -> torch.nn.Module:
    return create_model(name, **{**SMALL, **overrides}).eval()


@pytest.fixture(scope="module")
def recorded() -> tuple[torch.nn.Module, object, np.ndarray]:
    """A 2-block TNT-Ti on a 64x64 image (4x4 patches), recorded once, with a display image of that size."""
    torch.manual_seed(0)
    model = create_model("tnt_ti_patch16_224", depth=2, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with capture(model) as rec, torch.no_grad():
        model(x)
    image = np.random.default_rng(0).random((64, 64, 3))
    return model, rec, image


# ---- capture -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", distinct_architectures())
def test_capture_shapes_rows_and_logits(name: str) -> None:
    model = small_model(name)
    cfg = model.cfg
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        reference = model(x)
        with capture(model) as rec:
            logits = model(x)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)

    side = 48 // cfg.patch_size  # the digits presets have 8x8 patches
    B, N, m = 2, side * side, cfg.num_words
    assert rec.grid == (side, side)
    assert len(rec.outer_attn) == len(rec.inner_attn) == len(rec.patch_tokens) == len(rec.word_tokens) == cfg.depth
    for i, block in enumerate(model.blocks):
        assert rec.outer_attn[i].shape == (B, cfg.outer_heads, N + 1, N + 1)
        assert rec.patch_tokens[i].shape == (B, N + 1, cfg.outer_dim)
        torch.testing.assert_close(rec.outer_attn[i].sum(-1), torch.ones(B, cfg.outer_heads, N + 1))
        if block.inner is None:
            assert rec.inner_attn[i] is None
            assert rec.word_tokens[i] is None
        else:
            assert rec.inner_attn[i].shape == (B * N, cfg.inner_heads, m, m)
            assert rec.word_tokens[i].shape == (B * N, m, cfg.inner_dim)
            torch.testing.assert_close(rec.inner_attn[i].sum(-1), torch.ones(B * N, cfg.inner_heads, m))
    assert (rec.inner_attn[0] is None) == (not cfg.has_words)


def test_capture_records_the_blocks_outputs() -> None:
    model = small_model("tnt_s_patch16_224", depth=3)
    x = torch.randn(1, 3, 48, 48)
    with capture(model) as rec, torch.no_grad():
        model(x)
    with torch.no_grad():
        words, sentences = model.embed(x)
        for i, block in enumerate(model.blocks):
            last_input = words, sentences
            words, sentences = block(words, sentences)
            torch.testing.assert_close(rec.patch_tokens[i], sentences, atol=1e-5, rtol=0)
            torch.testing.assert_close(rec.word_tokens[i], words, atol=1e-5, rtol=0)
        # the last block's outer attention, recomputed in float64 from that block's input
        last, attn = model.blocks[-1], model.blocks[-1].outer.attn
        w = last.inner(last_input[0])
        s = torch.cat([last_input[1][:, :1], last_input[1][:, 1:] + last.word_proj(w, 1)], dim=1)
        qkv = torch.nn.functional.linear(last.outer.norm1(s).double(), attn.qkv.weight.double())
        q, k, _ = qkv.reshape(1, 10, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        expected = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
    torch.testing.assert_close(rec.outer_attn[-1].double(), expected, atol=1e-5, rtol=0)


def _hook_free(model: torch.nn.Module) -> bool:
    modules_clean = all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    attention_clean = all("attention_map" not in m.__dict__ for m in model.modules() if isinstance(m, Attention))
    return modules_clean and attention_clean


def test_capture_removes_everything_on_exit_even_after_an_error() -> None:
    model = small_model("tnt_s2_patch16_224")
    with capture(model):
        assert not fused_attention_enabled()
        assert "attention_map" in model.blocks[0].inner.attn.__dict__
        assert model.blocks[0]._forward_hooks
    assert _hook_free(model)
    assert fused_attention_enabled()
    with pytest.raises(RuntimeError, match="boom"), capture(model):
        raise RuntimeError("boom")
    assert _hook_free(model)
    assert fused_attention_enabled()


def test_nested_captures_both_record_and_restore() -> None:
    model = small_model("tnt_ti_patch16_224", depth=2)
    x = torch.randn(1, 3, 48, 48)
    with capture(model) as outer, torch.no_grad():
        with capture(model) as inner:
            model(x)
        torch.testing.assert_close(outer.outer_attn[1], inner.outer_attn[1])
    assert _hook_free(model)


def test_capture_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match="TNT model"), capture(torch.nn.Linear(2, 2)):
        pass


# ---- numbers behind the pictures -------------------------------------------------------------------------------------
def test_grid_and_word_maps_put_values_where_they_belong(recorded) -> None:
    _, rec, _ = recorded
    tokens = rec.patch_tokens[0][1]  # second image
    maps = grid_maps(tokens, rec.grid)
    assert maps.shape == (tokens.shape[1], 4, 4)
    torch.testing.assert_close(maps[:, 2, 3], tokens[1 + 2 * 4 + 3])

    words = rec.word_tokens[1]
    tiled = tiled_word_means(words, rec.grid, sample=1)
    assert tiled.shape == (16, 16)
    # patch (2, 3) of image 1, word (1, 2) of that patch -> pixel row 2*4+1, column 3*4+2
    torch.testing.assert_close(tiled[9, 14], words[16 + 2 * 4 + 3, 1 * 4 + 2].mean())


def test_attention_rollout_is_the_product_of_mixed_maps(recorded) -> None:
    _, rec, _ = recorded
    roll = attention_rollout(rec, sample=1)
    assert roll.shape == (2, 17, 17)
    torch.testing.assert_close(roll.sum(-1), torch.ones(2, 17))
    eye = torch.eye(17, dtype=torch.float64)
    mixed = [0.5 * a[1].double().mean(0) + 0.5 * eye for a in rec.outer_attn]
    torch.testing.assert_close(roll[1].double(), mixed[1] @ mixed[0], atol=1e-6, rtol=0)


# ---- pictures ------------------------------------------------------------------------------------------------------
def _non_blank(path: Path) -> bool:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).var() > 0


def test_every_figure_draws(recorded, tmp_path: Path) -> None:
    _, rec, image = recorded
    other = small_model("deit_ti_patch16_224", depth=2, img_size=64)
    with capture(other) as rec_deit, torch.no_grad():
        other(torch.randn(1, 3, 64, 64))
    figures = {
        "features": feature_maps(rec, [0, 1], image=image, channels=4),
        "tsne": feature_tsne({"tnt": rec, "deit": rec_deit}),
        "words": word_embeddings(rec, [0, -1], image=image),
        "inner": inner_attention(rec, image, [0, 1], patches=[(0, 0), (3, 2)], query_word=0),
        "outer": outer_attention(rec, image, [1], patches=[(1, 1)]),
        "cls": class_attention(rec, image, [0, 1]),
        "rollout": class_attention(rec, image, [1], rollout=True),
    }
    for name, fig in figures.items():
        assert isinstance(fig, Figure)
        fig.savefig(tmp_path / f"{name}.png", dpi=40)
        assert _non_blank(tmp_path / f"{name}.png"), name


def test_overlay_puts_a_patch_where_it_is_in_the_image(recorded) -> None:
    _, rec, image = recorded
    fig = class_attention(rec, image, [0])
    heat = fig.axes[1].images[1]  # panel of block 1: grey image, then the attention map
    assert heat.get_extent() == [0, 64, 64, 0]
    expected = rec.outer_attn[0][0].mean(0)[0, 1:].reshape(4, 4).numpy()
    np.testing.assert_allclose(heat.get_array(), expected)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda rec, img: feature_maps(rec, [2]), "out of range"),
        (lambda rec, img: outer_attention(rec, img, [0], patches=[(4, 0)]), "outside the 4x4 patch grid"),
        (lambda rec, img: inner_attention(rec, img, [0], query_word=16), "query word 16 is out of range"),
        (lambda rec, img: class_attention(rec, img[:32], [0]), "does not match"),
    ],
)
def test_figures_refuse_bad_requests(recorded, call, message: str) -> None:
    _, rec, image = recorded
    with pytest.raises(UserError, match=message):
        call(rec, image)


def test_models_without_words_say_so() -> None:
    image = np.zeros((48, 48, 3))
    for name, message in (
        ("deit_ti_patch16_224", "no inner transformer"),
        ("tnt_s4_patch16_224", r"block 2 has no inner transformer .* blocks with one: 1"),
    ):
        model = small_model(name)
        with capture(model) as rec, torch.no_grad():
            model(torch.randn(1, 3, 48, 48))
        with pytest.raises(UserError, match=message):
            inner_attention(rec, image, [0, 1])
        with pytest.raises(UserError, match=message):
            word_embeddings(rec, [1])
        pictures, notes = make_pictures(rec, image, [1], kinds=None)
        assert "words" not in {p.name for p in pictures}
        assert any("not drawn" in n for n in notes)


# ---- writing the report ----------------------------------------------------------------------------------------------
def test_report_is_all_or_nothing(recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, rec, image = recorded
    pictures, _ = make_pictures(rec, image, [0], kinds=["features", "class-attention"])
    calls = []

    def failing_savefig(self: Figure, path: Path, **kwargs: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    out = tmp_path / "report"
    with pytest.raises(OSError, match="disk full"):
        write_report(out, pictures, input_image=image, details={"model": "m"})
    assert list(tmp_path.iterdir()) == []


def test_report_replaces_only_an_earlier_report(recorded, tmp_path: Path) -> None:
    _, rec, image = recorded
    pictures, _ = make_pictures(rec, image, [0], kinds=["class-attention"])
    out = tmp_path / "report"
    write_report(out, pictures, input_image=image, details={"model": "first"})
    write_report(out, pictures, input_image=image, details={"model": "second"})
    assert "second" in (out / "index.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not empty"):
        write_report(tmp_path / "mine", pictures, input_image=image, details={})
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


# ---- the command line ----------------------------------------------------------------------------------------------
@pytest.fixture
def photo(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_cli_writes_every_picture_and_an_offline_index(photo: Path, tmp_path: Path, capsys) -> None:
    out, weights = tmp_path / "viz", tmp_path / "cifar.pth"
    torch.save(create_model("tnt_ti_patch16_224", num_classes=10).state_dict(), weights)  # another head: not used
    argv = ["viz", "--model", "tnt_ti_patch16_224", "--checkpoint", str(weights), "--image", str(photo)]
    argv += ["--out", str(out), "--blocks", "1,12", "--img-size", "64", "--patches", "0:0,3:3"]
    assert main([*argv, "--compare", "deit_ti_patch16_224", "--rollout"]) == 0
    assert "index.html" in capsys.readouterr().out
    index = (out / "index.html").read_text()
    sources = re.findall(r'src="([^"]+)"', index)
    expected = {"features", "tsne", "words", "inner-attention", "outer-attention", "class-attention", "rollout"}
    assert set(sources) == {"input.png"} | {f"{k}.png" for k in expected}
    assert "http" not in index.replace('lang="en"', "")
    for src in sources:
        assert _non_blank(out / src), src
    assert Image.open(out / "input.png").size == (64, 64)
    assert str(weights) in index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar.pth", "photo.png", "viz"]


def _cli_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("tnt viz: error:") == 1
    return err.strip().splitlines()[-1]


def test_cli_bad_input_is_one_line_and_writes_nothing(photo: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "viz"
    base = ["viz", "--out", str(out)]
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    ti = ["--model", "tnt_ti_patch16_224"]
    assert "cannot read image" in _cli_error([*base, *ti, "--image", str(broken)], capsys)
    assert "image not found" in _cli_error([*base, *ti, "--image", str(tmp_path / "none.png")], capsys)
    err = _cli_error([*base, *ti, "--image", str(photo), "--blocks", "1,13"], capsys)
    assert "block 13 is out of range: the model has 12 blocks (1..12)" in err
    assert "unknown model" in _cli_error([*base, "--model", "tnt_xl", "--image", str(photo)], capsys)
    assert "patch size 16" in _cli_error([*base, *ti, "--image", str(photo), "--img-size", "50"], capsys)
    deit = ["--model", "deit_ti_patch16_224", "--image", str(photo), "--figures", "inner-attention"]
    assert "no inner transformer" in _cli_error([*base, *deit], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jpg", "photo.png"]
