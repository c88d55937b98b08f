"""TNT as a dense backbone: pyramid shapes, torchvision detectors, segmentation, weights, data checks, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tnt_vision import create_model
from tnt_vision.cli import main
from tnt_vision.dense import (
    AnnotationError,
    CocoData,
    TNTFeaturePyramid,
    TNTSegmenter,
    TNTSingleScale,
    confusion_matrix,
    fasterrcnn_tnt,
    iou_scores,
    maskrcnn_tnt,
    read_coco,
    retinanet_tnt,
)
from tnt_vision.dense.engine import coco_map
from tnt_vision.models.checkpoint import save_safetensors

TINY = {"depth": 2, "img_size": 32}  # tiny trunks: two blocks, position encoding stored for a 2x2 grid
PYRAMID = {"out_indices": (0, 0, 1, 1), **TINY}
# Small images hold few objects: 50 proposals instead of 1000 keep the box head (most of the time) cheap.
DETECTOR = {
    "min_size": 64,
    "max_size": 96,
    "anchor_sizes": (8, 16, 32, 64, 128),
    **dict.fromkeys(("rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test"), 100),
    **dict.fromkeys(("rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test"), 50),
    "box_batch_size_per_image": 64,
    "fpn_channels": 64,
}


def _pyramid(name: str = "tnt_ti_patch16_224", **kw: object) -> TNTFeaturePyramid:
    return TNTFeaturePyramid(name, **{**PYRAMID, **kw})


def _targets(masks: bool = False) -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 20.0, 60.0, 60.0]])
    one = {"boxes": boxes, "labels": torch.tensor([1, 2])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    if masks:
        m = torch.zeros(2, 64, 64, dtype=torch.uint8)
        m[0, 6:30, 4:40] = 1
        m[1, 20:60, 20:60] = 1
        one["masks"], empty["masks"] = m, torch.zeros(0, 64, 64, dtype=torch.uint8)
    return [one, empty]


# ---- backbone ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tnt_ti_patch16_224", "tnt_s_legacy_patch16_224", "deit_ti_patch16_224"])
@pytest.mark.parametrize("size", [(32, 32), (64, 96), (48, 80), (50, 70)])
def test_pyramid_strides_and_channels(name: str, size: tuple[int, int]) -> None:
    model = _pyramid(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    grid = [-(-s // 16) for s in size]  # sides that are not a multiple of 16 are padded up
    assert list(out) == ["0", "1", "2", "3"]
    assert model.strides == (4, 8, 16, 32)
    for (key, fmap), stride in zip(out.items(), model.strides, strict=True):
        expected = [g * 16 // stride if stride <= 16 else -(-g // 2) for g in grid]
        assert tuple(fmap.shape) == (2, model.out_channels, *expected), key
    assert model.out_channels == create_model(name, **TINY).embed_dim


def test_unaligned_input_is_zero_padded() -> None:
    model = _pyramid().eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        a, b = model(x), model(F.pad(x, (0, 10, 0, 14)))
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_single_scale_is_pooled_last_block() -> None:
    model = TNTSingleScale("tnt_ti_patch16_224", **TINY).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
        (last,) = model.trunk.forward_intermediates(x, [1], norm=True, intermediates_only=True)
    assert out.shape == (2, 192, 2, 3)
    assert model.stride == 32
    torch.testing.assert_close(out, F.avg_pool2d(last, 2))


def test_loads_classification_weights_into_trunk(tmp_path: Path) -> None:
    source = create_model("tnt_ti_patch16_224", num_classes=10, depth=2)  # stored at 224: pos is resized
    path = save_safetensors(source, tmp_path / "cls.safetensors")
    model = _pyramid(pretrained=path, out_indices=(0, 1, 1, 1))
    trunk, ref = model.trunk.state_dict(), source.state_dict()
    assert set(trunk) == {k for k in ref if not k.startswith(("head.", "norm."))}
    for key, value in trunk.items():
        if key != "sentence_pos":
            torch.testing.assert_close(value, ref[key], rtol=0, atol=0, msg=key)
    assert trunk["sentence_pos"].shape == (1, 1 + 4, 192)
    torch.testing.assert_close(trunk["sentence_pos"][:, 0], ref["sentence_pos"][:, 0])


def test_frozen_stages_and_checkpointing() -> None:
    model = _pyramid(frozen_stages=1, drop_path_rate=0.1).train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("trunk.word_embed") for n in frozen)
    assert any(n.startswith("trunk.blocks.0.") for n in frozen)
    assert not any(n.startswith(("trunk.blocks.1.", "necks.")) for n in frozen)
    assert not model.trunk.blocks[0].training
    assert model.trunk.blocks[1].training

    plain, ckpt = _pyramid().train(), _pyramid(grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 32, 48)
    for m in (plain, ckpt):
        sum(v.square().mean() for v in m(x).values()).backward()
    g_plain = plain.trunk.word_embed.proj.weight.grad
    torch.testing.assert_close(ckpt.trunk.word_embed.proj.weight.grad, g_plain)


# ---- torchvision detectors ------------------------------------------------------------------------------------------
def test_fasterrcnn_losses_reach_backbone_and_detects() -> None:
    model = fasterrcnn_tnt("tnt_ti_patch16_224", num_classes=3, backbone_kwargs=PYRAMID, **DETECTOR)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    losses = model(images, _targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grad = model.backbone.body.trunk.word_embed.proj.weight.grad
    assert grad is not None
    assert grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 48, 80)])
    assert set(out[0]) == {"boxes", "labels", "scores"}
    assert len(out[0]["boxes"]) > 0
    boxes = out[0]["boxes"]
    assert (boxes[:, 0] >= 0).all()
    assert (boxes[:, 2] <= 80).all()
    assert (boxes[:, 3] <= 48).all()


def test_empty_targets_train() -> None:
    model = fasterrcnn_tnt("tnt_ti_patch16_224", num_classes=3, backbone_kwargs=PYRAMID, **DETECTOR)
    empty = _targets()[1]
    losses = model([torch.rand(3, 64, 64)], [empty])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.trunk.word_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("builder", [maskrcnn_tnt, retinanet_tnt])
def test_maskrcnn_and_retinanet_wiring(builder: object) -> None:
    model = builder("tnt_ti_patch16_224", num_classes=3, backbone_kwargs=PYRAMID, **DETECTOR)
    losses = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], _targets(masks=True))
    assert len(losses) >= 2
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.trunk.blocks[0].outer.attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 64)])
    assert out["boxes"].shape[1] == 4
    if builder is maskrcnn_tnt:
        assert out["masks"].shape[1:] == (1, 64, 64)


# ---- segmentation ---------------------------------------------------------------------------------------------------
def test_segmenter_output_shape() -> None:
    model = TNTSegmenter("tnt_ti_patch16_224", num_classes=5, head_channels=16, **PYRAMID)
    for size in [(64, 64), (50, 70), (32, 96)]:
        logits = model(torch.rand(2, 3, *size))
        assert logits.shape == (2, 5, *size)
    F.cross_entropy(logits, torch.randint(0, 5, (2, 32, 96))).backward()
    assert model.backbone.trunk.word_embed.proj.weight.grad.abs().sum() > 0


def test_miou_hand_computed() -> None:
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255], [2, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0], [2, 2, 0, 0]])
    cm = confusion_matrix(pred, target, num_classes=4)
    # class 0: tp 3, fp 3, fn 1 -> 3/7; class 1: tp 2, fp 1, fn 1 -> 2/4; class 2: tp 2, fn 2 -> 2/4; class 3 absent
    scores = iou_scores(cm)
    assert scores["iou"][:3] == pytest.approx([3 / 7, 0.5, 0.5])
    assert np.isnan(scores["iou"][3])
    assert scores["miou"] == pytest.approx((3 / 7 + 0.5 + 0.5) / 3)
    assert scores["pixel_acc"] == pytest.approx(7 / 11)


# ---- data -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-like ImageFolder: three classes of four 32x32 images of one flat colour each."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog", "ship"):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                colour = rng.integers(0, 256, 3, dtype=np.uint8)
                Image.fromarray(np.broadcast_to(colour, (32, 32, 3)).copy()).save(root / split / name / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def synthetic(fake_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    assert main(["detect", "make-data", "--cifar", str(fake_cifar), "--out", str(out), "--train-images", "6",
                 "--val-images", "4", "--image-size", "64", "--object-size", "16,28"]) == 0  # fmt: skip
    return out


def test_synthetic_set_boxes_match_masks(synthetic: Path) -> None:
    data = CocoData(synthetic / "train", masks=True)
    assert data.class_names == ["background", "cat", "dog", "ship"]
    assert len(data) == 6
    n_objects = 0
    for image, target in data:
        assert image.shape == (3, 64, 64)
        assert image.min() >= 0
        assert image.max() <= 1
        for box, mask in zip(target["boxes"], target["masks"], strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            n_objects += 1
    assert n_objects > 0
    seg = CocoData(synthetic / "train", task="segmentation")
    image, mask = seg[0]
    _, target = data[0]
    painted = torch.zeros(64, 64, dtype=torch.long)
    for m, label in zip(target["masks"], target["labels"], strict=True):
        painted[m.bool()] = label
    assert torch.equal(mask, painted)


def test_coco_map_perfect_and_empty(synthetic: Path) -> None:
    data = CocoData(synthetic / "val")
    perfect = [
        {"image_id": t["image_id"], "label": int(c), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": 1.0}
        for _, t in data
        for b, c in zip(t["boxes"].tolist(), t["labels"], strict=True)
    ]
    assert coco_map(data, perfect)["AP"] == pytest.approx(1.0)
    assert coco_map(data, [])["AP"] == 0.0


def _bad_annotations(tmp_path: Path, mutate: object) -> Path:
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    mutate(data)
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d["annotations"][1].update(bbox=[1, 1, 0, 2]), r"annotations\[1\]: 'bbox'"),
        (lambda d: d["annotations"][1].update(image_id=7), r"annotations\[1\]: 'image_id'"),
        (lambda d: d["annotations"][0].update(category_id=3), r"annotations\[0\]: 'category_id'"),
        (lambda d: d["images"][0].pop("file_name"), r"images\[0\]"),
        (lambda d: d.pop("categories"), r"categories: missing"),
    ],
)
def test_malformed_annotations_name_file_and_entry(tmp_path: Path, mutate: object, where: str) -> None:
    path = _bad_annotations(tmp_path, mutate)
    with pytest.raises(AnnotationError, match=rf"{tmp_path}.*annotations\.json: {where}"):
        read_coco(path)


def test_cli_reports_malformed_annotations(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _bad_annotations(tmp_path, lambda d: d["annotations"][1].update(bbox="wide"))
    code = main(["detect", "eval", "--checkpoint", str(tmp_path / "none.pt"), "--val", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "checkpoint not found" in err
    code = main(["segment", "train", "--train", str(path), "--val", str(path), "--model", "tnt_ti_patch16_224"])
    err = capsys.readouterr().err
    assert code == 2
    assert "annotations[1]: 'bbox'" in err
    assert "Traceback" not in err


# ---- end to end through the CLI --------------------------------------------------------------------------------
_TINY_CLI = ["--model", "tnt_ti_patch16_224", "--override", "depth=2", "--override", "img_size=64",
             "--out-indices", "0,0,1,1", "--batch-size", "3", "--epochs", "1", "--threads", "2"]  # fmt: skip


@pytest.mark.slow
def test_detect_cli_train_eval_predict(synthetic: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "det"
    data = ["--train", str(synthetic / "train"), "--val", str(synthetic / "val")]
    sizes = ["--min-size", "64", "--max-size", "64", "--anchor-sizes", "8,16,32,64,128", "--rpn-proposals", "50",
             "--fpn-channels", "32"]  # fmt: skip
    assert main(["detect", "train", *data, *_TINY_CLI, *sizes, "--eval-untrained", "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"untrained", "trained", "epochs"} <= set(metrics)
    assert np.isfinite(metrics["epochs"][0]["loss"])
    assert 0 <= metrics["trained"]["AP"] <= 1
    assert main(["detect", "eval", "--checkpoint", str(run / "model.pt"), "--val", str(synthetic / "val")]) == 0
    image = synthetic / "val" / "images" / "000001.png"
    out = tmp_path / "pred"
    args = ["--checkpoint", str(run / "model.pt"), "--out", str(out), "--score-threshold", "0"]
    assert main(["detect", "predict", str(image), *args]) == 0
    drawn = Image.open(out / "000001_boxes.png")
    assert drawn.size == (64, 64)
    assert drawn.mode == "RGB"
    assert main(["segment", "eval", "--checkpoint", str(run / "model.pt"), "--val", str(synthetic / "val")]) == 2
    assert "not a segmentation model" in capsys.readouterr().err


@pytest.mark.slow
def test_segment_cli_train_eval_predict(synthetic: Path, tmp_path: Path) -> None:
    run = tmp_path / "seg"
    data = ["--train", str(synthetic / "train"), "--val", str(synthetic / "val")]
    assert main(["segment", "train", *data, *_TINY_CLI, "--head-channels", "16", "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["trained"]["miou"] <= 1
    assert main(["segment", "eval", "--checkpoint", str(run / "model.pt"), "--val", str(synthetic / "val")]) == 0
    image = synthetic / "val" / "images" / "000002.png"
    assert main(["segment", "predict", str(image), "--checkpoint", str(run / "model.pt"), "--out", str(tmp_path)]) == 0
    mask = Image.open(tmp_path / "000002_mask.png")
    assert mask.mode == "P"
    assert mask.size == (64, 64)
    assert max(np.asarray(mask).ravel()) < 4


@pytest.mark.slow
def test_short_training_beats_the_untrained_model(synthetic: Path, tmp_path: Path) -> None:
    data = ["--train", str(synthetic / "train"), "--val", str(synthetic / "val")]
    tiny = [*_TINY_CLI[: _TINY_CLI.index("--epochs")], "--epochs", "20", "--threads", "2", "--lr", "1e-3"]
    seg = tmp_path / "seg"
    assert main(["segment", "train", *data, *tiny, "--head-channels", "16", "--eval-untrained", "--out", str(seg)]) == 0
    metrics = json.loads((seg / "metrics.json").read_text())
    assert metrics["trained"]["loss"] < 0.6 * metrics["untrained"]["loss"]
    assert metrics["trained"]["miou"] > metrics["untrained"]["miou"]
    det = tmp_path / "det"
    sizes = ["--min-size", "64", "--max-size", "64", "--anchor-sizes", "8,16,32,64,128", "--rpn-proposals", "50",
             "--fpn-channels", "32"]  # fmt: skip
    assert main(["detect", "train", *data, *tiny, *sizes, "--eval-untrained", "--out", str(det)]) == 0
    metrics = json.loads((det / "metrics.json").read_text())
    assert metrics["trained"]["val_loss"] < 0.5 * metrics["untrained"]["val_loss"]
    assert metrics["trained"]["AP"] >= metrics["untrained"]["AP"]
