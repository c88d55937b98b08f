"""The model family: registry-wide behaviour, paper numbers and parity with timm's reference TNT."""

from __future__ import annotations

import pytest
import timm
import torch

import tnt_vision
from helpers import randomize_, timm_to_official
from tnt_vision.models import TNTConfig, count_flops, count_params, get_spec, paper_flops, to_native
from tnt_vision.models.checkpoint import load_state_dict
from tnt_vision.models.registry import ModelSpec, register

ALL = tnt_vision.list_models()
SMALL = {"img_size": 64}  # 4x4 sentences: the same architecture at a fraction of the cost


def _close_to_paper(value: float, paper: float) -> bool:
    # The paper prints one decimal: accept 1.5% or the rounding of its last digit, whichever is larger.
    return abs(value - paper) <= max(0.015 * paper, 0.05)


def test_registry_lists_every_variant_of_the_paper() -> None:
    expected = {
        "tnt_ti_patch16_224",
        "tnt_s_patch16_224",
        "tnt_b_patch16_224",
        "tnt_s_legacy_patch16_224",
        "tnt_s_se_patch16_224",
        *(f"tnt_s{i}_patch16_224" for i in range(1, 5)),
        "deit_ti_patch16_224",
        "deit_s_patch16_224",
        "deit_b_patch16_224",
    }
    assert expected <= set(ALL)
    assert tnt_vision.list_models("deit_*_patch16_224") == [
        "deit_b_patch16_224",
        "deit_s_patch16_224",
        "deit_ti_patch16_224",
    ]


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(ModelSpec("tnt_s_patch16_224", TNTConfig(), 1.0, 1.0, "dup"))


def test_unknown_model_and_override_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'tnt_xl'"):
        tnt_vision.create_model("tnt_xl")
    with pytest.raises(ValueError, match=r"unknown TNTConfig field.*inner_dimm"):
        tnt_vision.create_model("tnt_s_patch16_224", inner_dimm=3)
    with pytest.raises(ValueError, match="inner_dim must be divisible by inner_heads"):
        tnt_vision.create_model("tnt_s_patch16_224", inner_heads=5)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_every_parameter_gets_a_finite_gradient(name: str) -> None:
    model = tnt_vision.create_model(name, num_classes=7, **SMALL)
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name: str, tmp_path) -> None:
    model = randomize_(tnt_vision.create_model(name, **SMALL)).eval()
    path = tmp_path / "w.safetensors"
    tnt_vision.models.checkpoint.save_safetensors(model, path)
    clone = tnt_vision.create_model(name, pretrained=path, **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))


@pytest.mark.parametrize("name", ALL)
def test_params_and_flops_match_the_paper(name: str) -> None:
    spec = get_spec(name)
    model = tnt_vision.create_model(name)
    params, flops = count_params(model) / 1e6, count_flops(model) / 1e9
    if spec.paper_params_m is not None:
        assert _close_to_paper(params, spec.paper_params_m), (params, spec.paper_params_m)
    if spec.paper_flops_g is not None:
        assert _close_to_paper(flops, spec.paper_flops_g), (flops, spec.paper_flops_g)


def test_eq17_block_flops_for_tnt_s() -> None:
    # Section 2.3: a standard block costs 376M, a TNT block 429M multiply-adds (d=384, n=196, c=24, m=16).
    tnt_s, plain = TNTConfig(depth=1), TNTConfig(depth=1, tnt_blocks=())
    assert round(paper_flops(plain) / 1e6) == 376
    assert round(paper_flops(tnt_s) / 1e6) == 429
    # The counter sees the same inner-transformer cost: TNT-S minus TNT-S-4 is 11 inner transformers.
    gap = count_flops(tnt_vision.create_model("tnt_s_patch16_224")) - count_flops(
        tnt_vision.create_model("tnt_s4_patch16_224")
    )
    assert abs(gap - 11 * (paper_flops(tnt_s) - paper_flops(plain))) / gap < 0.03


@pytest.mark.parametrize(
    ("overrides", "params_m", "flops_g"),
    [
        ({"inner_stride": 2, "inner_dim": 6, "inner_heads": 2}, 23.8, 5.1),  # Table 8: m=64, c=6
        ({"inner_stride": 8, "inner_dim": 96, "inner_heads": 4}, 25.1, 6.0),  # Table 8: m=4, c=96
    ],
)
def test_words_per_sentence_ablation(overrides: dict, params_m: float, flops_g: float) -> None:
    model = tnt_vision.create_model("tnt_s_patch16_224", **overrides)
    assert _close_to_paper(count_params(model) / 1e6, params_m)
    assert _close_to_paper(count_flops(model) / 1e9, flops_g)


@pytest.mark.parametrize(("sentence_pos", "word_pos"), [(False, False), (True, False), (False, True)])
def test_position_encoding_ablation(sentence_pos: bool, word_pos: bool) -> None:
    model = tnt_vision.create_model("tnt_s_patch16_224", sentence_pos=sentence_pos, word_pos=word_pos, **SMALL)
    names = dict(model.named_parameters())
    assert ("sentence_pos" in names) == sentence_pos
    assert ("word_pos" in names) == word_pos
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("heads", [1, 2, 4, 6, 8])
def test_inner_heads_ablation(heads: int) -> None:
    model = tnt_vision.create_model("tnt_s_patch16_224", inner_heads=heads, **SMALL)
    assert model.blocks[0].inner.attn.num_heads == heads
    assert count_params(model) == count_params(tnt_vision.create_model("tnt_s_patch16_224", **SMALL))


def _timm_pair(name: str, img_size: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    ref = randomize_(timm.create_model(name, img_size=img_size)).eval()
    return ref, ref.state_dict()


# The full 224 input for TNT-S; a 6x6 grid elsewhere keeps the suite fast while testing the same arithmetic.
@pytest.mark.parametrize(
    ("name", "img_size"),
    [("tnt_s_patch16_224", 224), ("tnt_b_patch16_224", 96), ("tnt_s_legacy_patch16_224", 96)],
)
@pytest.mark.parametrize("layout", ["timm", "official"])
def test_logits_match_timm(name: str, img_size: int, layout: str) -> None:
    ref, sd = _timm_pair(name, img_size)
    if layout == "official":
        sd = timm_to_official(sd)
    assert tnt_vision.models.detect_format(sd) == layout
    ours = tnt_vision.create_model(name, img_size=img_size).eval()
    load_state_dict(ours, to_native(sd))
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


def test_deit_matches_timm_deit() -> None:
    ref, sd = _timm_pair("deit_small_patch16_224", 224)
    ours = tnt_vision.create_model("deit_s_patch16_224").eval()
    load_state_dict(ours, to_native(sd))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


def test_gradients_match_timm() -> None:
    ref = randomize_(timm.create_model("tnt_s_patch16_224", img_size=64))
    ours = tnt_vision.create_model("tnt_s_patch16_224", **SMALL)
    load_state_dict(ours, to_native(ref.state_dict()))
    x = torch.randn(2, 3, 64, 64)
    ref(x).logsumexp(-1).sum().backward()
    ours(x).logsumexp(-1).sum().backward()
    ref_grads = to_native({k: p.grad for k, p in ref.named_parameters()})
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("tnt_blocks", [None, (0, 2), ()], ids=["tnt", "hybrid", "deit"])
def test_gradient_checkpointing_gives_the_same_gradients(tnt_blocks: tuple[int, ...] | None) -> None:
    model = randomize_(tnt_vision.create_model("tnt_s_patch16_224", depth=4, tnt_blocks=tnt_blocks, **SMALL))
    x = torch.randn(2, 3, 64, 64)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(x).square().sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing()
    checkpointed = grads()
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)


def test_384_model_of_table_9() -> None:
    model = tnt_vision.create_model("tnt_s_patch16_224", img_size=384).eval()
    assert model.sentence_pos.shape == (1, 24 * 24 + 1, 384)
    assert model.pretrained_cfg["input_size"] == (3, 384, 384)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_other_grid_interpolates_sentence_position_encoding() -> None:
    model = randomize_(tnt_vision.create_model("tnt_s_patch16_224", depth=2)).eval()
    x = torch.randn(1, 3, 160, 96)  # 10x6 sentences, not square
    resized = timm.layers.resample_abs_pos_embed(
        model.sentence_pos, new_size=[10, 6], old_size=[14, 14], num_prefix_tokens=1
    )
    twin = tnt_vision.create_model("tnt_s_patch16_224", depth=2, sentence_pos=False).eval()
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if k != "sentence_pos"})
    with torch.no_grad():
        words, sentences = twin.embed(x)
        sentences = sentences + resized
        for block in twin.blocks:
            words, sentences = block(words, sentences)
        expected = twin.forward_head(twin.norm(sentences))
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        ("not a tensor", "expected a torch.Tensor"),
        (torch.zeros(3, 64, 64), "4-d image batch"),
        (torch.zeros(1, 1, 64, 64), "expected 3 input channels, got 1"),
        (torch.zeros(1, 3, 65, 64), "multiples of 16, got 65x64"),
    ],
)
def test_bad_input_is_a_clear_value_error(x: object, message: str) -> None:
    model = tnt_vision.create_model("tnt_ti_patch16_224", depth=1, **SMALL)
    with pytest.raises(ValueError, match=message):
        model(x)


def test_timm_style_api() -> None:
    model = tnt_vision.create_model("tnt_s_patch16_224", depth=3, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert model.pretrained_cfg["crop_pct"] == 0.9
    assert model.pretrained_cfg["interpolation"] == "bicubic"
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 17, 384)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 384)
        final, maps = model.forward_intermediates(x, indices=[0, -1])
        torch.testing.assert_close(final, feats)
        assert [m.shape for m in maps] == [(2, 384, 4, 4)] * 2
        only = model.forward_intermediates(x, indices=1, intermediates_only=True)
        torch.testing.assert_close(only[0], maps[1])
        with pytest.raises(ValueError, match="out of range"):
            model.forward_intermediates(x, indices=[3])
    model.reset_classifier(5, global_pool="avg")
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, 384)


def test_se_variant_follows_the_authors_code() -> None:
    model = tnt_vision.create_model("tnt_s_se_patch16_224", depth=1, **SMALL).eval()
    block = model.blocks[0].outer
    y = torch.randn(2, 5, 384)
    gate = torch.tanh(block.se.fc2(torch.relu(block.se.fc1(block.se.norm(y.mean(1, keepdim=True))))))
    torch.testing.assert_close(block.se(y), y * gate)
    assert block.se.fc1.out_features == 96  # SE(d, 0.25)
