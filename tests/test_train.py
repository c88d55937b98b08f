"""Training runs end to end: resume after SIGKILL, DDP gradients, failure handling, schedule and recipe wiring."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import tnt_vision.train as train_mod
from tnt_vision import cli, create_model, load_checkpoint
from tnt_vision.config import FIELDS, TrainConfig, make_config, read_recipe
from tnt_vision.data import transforms

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}

# A tiny run that still exercises every random part of the recipe: RandAugment, erasing, Mixup/CutMix,
# drop path, EMA, and step checkpoints in the middle of an epoch.
TINY = {
    "model": "tnt_digits",
    "data": "digits",
    "epochs": 2,
    "batch_size": 8,
    "workers": 0,
    "train_limit": 48,
    "val_limit": 32,
    "lr": 1e-3,
    "lr_base_batch": 8,
    "warmup_epochs": 1,
    "repeats": 1,
    "ema_decay": 0.9,
    "drop_path": 0.1,
    "amp": "none",
    "threads": 1,
}


def tiny_config(**extra: object) -> TrainConfig:
    return make_config(**{**TINY, **extra})


def tiny_args(out: Path, **extra: object) -> list[str]:
    args = ["train", "--output", str(out)]
    for k, v in {**TINY, **extra}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def tnt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tnt_vision", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {**ckpt["model"], **{f"ema.{k}": v for k, v in ckpt["state_dict_ema"].items()}}


# ---- resume --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = tiny_args(killed, save_every_steps=1)
    proc = subprocess.Popen([sys.executable, "-m", "tnt_vision", *args], env=ENV, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while not (killed / "last.pt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # land somewhere after the first step checkpoint, not on it
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = torch.load(killed / "last.pt", weights_only=True)
    assert (interrupted_at["epoch"], interrupted_at["batch"]) < (TINY["epochs"], 0), "killed too late to test resume"

    resumed = tnt(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    uninterrupted = tnt(*tiny_args(full, save_every_steps=1))
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    a, b = weights(full / "last.pt"), weights(killed / "last.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # the whole run's outputs are there and readable
    summary = json.loads((full / "summary.json").read_text())
    assert summary["epochs"] == 2
    assert 0 <= summary["top1"] <= 100
    assert summary["images_per_s"] > 0
    assert len((full / "metrics.jsonl").read_text().splitlines()) == 2
    assert (full / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert read_recipe(full / "config.yaml")["train_limit"] == 48


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny digits run, in-process."""
    out = tmp_path_factory.mktemp("run")
    train_mod.train(tiny_config(output=str(out), epochs=1))
    return out


def test_checkpoint_is_unwrapped_and_loads(trained: Path) -> None:
    ckpt = torch.load(trained / "last.pt", weights_only=True)
    assert ckpt["class_names"] == [str(d) for d in range(10)]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    for key in ("optimizer", "scheduler", "rng", "sampler", "config", "state_dict_ema", "epoch", "step"):
        assert key in ckpt
    model = create_model("tnt_digits")
    load_checkpoint(model, trained / "best.pt")
    assert torch.equal(model.head.weight, ckpt["state_dict_ema"]["head.weight"])  # EMA weights preferred


def test_eval_and_predict_commands(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["eval", "--model", "tnt_digits", "--checkpoint", str(trained / "last.pt"), "--data", "digits"]
    assert cli.main([*argv, "--json", "--workers", "0", "--val-limit", "32"]) == 0
    res = json.loads(capsys.readouterr().out)
    summary = json.loads((trained / "summary.json").read_text())
    assert res["images"] == 32
    assert res["weights"] == "ema"
    assert res["top1"] == pytest.approx(summary["top1"])  # same weights, same images, same preprocessing
    img = tmp_path / "digit.png"
    Image.new("RGB", (8, 8), (255, 255, 255)).save(img)
    assert (
        cli.main(["predict", "--model", "tnt_digits", "--checkpoint", str(trained / "last.pt"), str(img), "--json"])
        == 0
    )
    top = json.loads(capsys.readouterr().out)["top"]
    assert len(top) == 5
    assert {name for name, _ in top} <= {str(d) for d in range(10)}
    assert sum(p for _, p in top) <= 1 + 1e-6
    assert top[0][1] >= top[-1][1]


def test_finetune_replaces_head_and_interpolates(trained: Path, tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "two", classes=("a", "b"), per_class=4)
    out = tmp_path / "ft"
    cfg = tiny_config(
        train_limit=None,
        val_limit=None,
        data=f"imagefolder:{folder}",
        output=str(out),
        epochs=1,
        img_size=48,
        finetune=str(trained / "last.pt"),
    )
    train_mod.train(cfg)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["model"]["head.weight"].shape == (2, 64)
    assert ckpt["model"]["sentence_pos"].shape == (1, 37, 64)  # 6x6 grid + class token


# ---- DDP -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(tmp_path: Path) -> None:
    worker = str(ROOT / "tests" / "ddp_grad_worker.py")
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, worker, str(single)], env=ENV, check=True, timeout=120)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    res = subprocess.run([*launcher, worker, str(double)], env=ENV, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    g1, g2 = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_torchrun_train_matches_single_process(tmp_path: Path) -> None:
    """The same `tnt train` under torchrun (2 x 4 images) ends where one process (1 x 8) does, rank 0 saving."""
    common = tiny_args(tmp_path / "x", epochs=1, drop_path=0, mixup=0, cutmix=0, warmup_epochs=0)[3:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run(
        [*launcher, "-m", "tnt_vision", "train", "--output", str(tmp_path / "two"), *common, "--batch-size", "4"],
        env=ENV, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    one = tnt("train", "--output", str(tmp_path / "one"), *common, "--batch-size", "8")
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "two" / "last.pt")
    for name in a:  # AdamW's first steps divide by sqrt(v): float rounding of the all-reduce is amplified a little
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, msg=name)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2


# ---- failures ------------------------------------------------------------------------------------------------


def image_folder(root: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 4) -> Path:
    for split in ("train", "val"):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                Image.new("RGB", (20, 20), (60 * i, 30 * j, 100)).save(root / split / name / f"{j}.png")
    return root


def test_corrupt_image_is_skipped_named_and_counted(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "data")
    bad = folder / "train" / "a" / "broken.png"
    bad.write_bytes(b"not a png at all")
    cfg = tiny_config(
        train_limit=None,
        val_limit=None,
        batch_size=4,
        epochs=1,
        data=f"imagefolder:{folder}",
        output=str(tmp_path / "out"),
    )
    with pytest.warns(UserWarning, match="broken.png"):
        summary = train_mod.train(cfg)
    assert summary["skipped_images"] == 1
    assert summary["epochs"] == 1


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "data path not found"),
        ("empty", "no class folders"),
        ("flag", "unrecognized arguments: --no-such-flag"),
        ("value", "--batch-size must be at least 1"),
        ("mismatch", "classes"),
        ("recipe", "unknown option(s): learning_rate"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(
    case: str, message: str, tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture
) -> None:
    out = ["--output", str(tmp_path / "o")]
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir()
    (tmp_path / "r.yaml").write_text("learning_rate: 1\n")
    folder = f"imagefolder:{image_folder(tmp_path / 'f')}"
    argv = {
        "missing": ["train", "--data", f"imagefolder:{tmp_path / 'nope'}", *out],
        "empty": ["train", "--data", f"imagefolder:{tmp_path / 'empty'}", *out],
        "flag": ["train", "--no-such-flag", *out],
        "value": ["train", "--batch-size", "0", *out],
        "mismatch": ["eval", "--model", "tnt_digits", "--checkpoint", str(trained / "last.pt"), "--data", folder],
        "recipe": ["train", "-c", str(tmp_path / "r.yaml"), *out],
    }[case]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls = {"n": 0}
    original = torch.nn.CrossEntropyLoss.forward

    def poisoned(self: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = original(self, logits, target)
        return loss * math.nan if calls["n"] == 4 else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", poisoned)
    out = tmp_path / "out"
    code = cli.main([*tiny_args(out, save_every_steps=1, mixup=0, cutmix=0)])
    err = capsys.readouterr().err
    assert code == 2
    assert "loss is nan" in err
    assert "last.pt" in err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_failing_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    cfg = tiny_config(output=str(out), epochs=1)
    train_mod.train(cfg)
    before = (out / "last.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj: object, f: object, *a: object, **k: object) -> None:
        real_save(obj, f, *a, **k)  # a partial file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train_mod.train(tiny_config(output=str(out), epochs=2))
    assert (out / "last.pt").read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []


# ---- schedule, parameter groups, recipe wiring ---------------------------------------------------------------


def test_linear_scaling_rule() -> None:
    cfg = TrainConfig(batch_size=128)
    assert train_mod.scaled_lr(cfg, world=8) == pytest.approx(1e-3)
    assert train_mod.scaled_lr(TrainConfig(batch_size=64, accum_steps=2), world=1) == pytest.approx(1.25e-4)


def test_warmup_then_cosine_schedule() -> None:
    cfg = TrainConfig(epochs=10, warmup_epochs=2, lr=1e-3, lr_base_batch=128, batch_size=128)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=train_mod.scaled_lr(cfg, 1))
    sched = train_mod.build_scheduler(cfg, opt, updates_per_epoch=10)

    def lr_at(step: int) -> float:
        sched.step_update(num_updates=step)
        return opt.param_groups[0]["lr"]

    assert lr_at(0) == pytest.approx(1e-6)
    assert lr_at(10) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(20) == pytest.approx(1e-3)
    assert lr_at(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)  # half-way through the cosine
    assert lr_at(100) == pytest.approx(1e-5)


def test_no_weight_decay_groups_match_timm() -> None:
    from timm.optim import param_groups_weight_decay

    model = create_model("tnt_digits")
    ours = train_mod.param_groups(model, 0.05)
    no_decay = {id(p) for p in ours[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert {"cls_token", "sentence_pos", "word_pos", "norm.weight", "head.bias"} <= names
    assert "head.weight" not in names
    assert "blocks.0.outer.attn.qkv.weight" not in names
    ref = param_groups_weight_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay())
    ref_no_decay = next(g for g in ref if g["weight_decay"] == 0.0)
    assert {id(p) for p in ref_no_decay["params"]} == no_decay


def test_deit_recipe_is_the_default_and_wires_timm_pieces() -> None:
    recipe = make_config(RECIPES / "deit.yaml")
    default = TrainConfig()
    assert recipe == default
    mix = transforms.mixup_fn(default, 1000)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.label_smoothing) == (0.8, 1.0, 0.1)
    tf = repr(transforms.train_transform(default, 224, (0.5,) * 3, (0.5,) * 3))
    assert "RandAugment" in tf
    assert "RandomErasing" in tf
    assert "ColorJitter" not in tf  # timm (and so DeiT) ignores colour jitter when RandAugment is on
    assert "p=0.25" in tf
    assert "mode=pixel" in tf
    sampler = transforms.train_sampler(list(range(100)), repeats=3, rank=0, world=1, seed=0)
    assert type(sampler).__name__ == "RepeatAugSampler"
    assert sampler.num_repeats == 3
    for name in ("finetune.yaml", "digits.yaml"):
        assert set(read_recipe(RECIPES / name)) <= set(FIELDS)


def test_mixup_run_uses_soft_target_loss(tmp_path: Path) -> None:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    run = train_mod.Run(tiny_config(output=str(tmp_path), mixup=0.8, cutmix=1.0))
    assert isinstance(run.parts.mixup, Mixup)
    assert isinstance(run.parts.loss_fn, SoftTargetCrossEntropy)
    plain = train_mod.Run(tiny_config(output=str(tmp_path / "p"), mixup=0, cutmix=0))
    assert plain.parts.mixup is None
    assert plain.parts.loss_fn.label_smoothing == 0.1


def test_randaugment_posterize_to_zero_bits_gives_black_image() -> None:
    from PIL import Image as PILImage
    from timm.data.auto_augment import NAME_TO_OP

    img = PILImage.new("RGB", (8, 8), (200, 100, 50))
    out = NAME_TO_OP["PosterizeIncreasing"](img, 0)  # what magnitude 10 asks for
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))
    assert NAME_TO_OP["PosterizeIncreasing"](img, 4).getpixel((0, 0)) == (192, 96, 48)


def test_accumulation_and_checkpointing_match_one_big_batch(tmp_path: Path) -> None:
    """2 micro-batches of 4 with activation recomputation == 1 batch of 8: same updates, same weights."""
    plain = {"drop_path": 0, "mixup": 0, "cutmix": 0, "epochs": 1}
    train_mod.train(tiny_config(**plain, output=str(tmp_path / "big"), batch_size=8))
    train_mod.train(
        tiny_config(**plain, output=str(tmp_path / "acc"), batch_size=4, accum_steps=2, grad_checkpointing=True)
    )
    a, b = weights(tmp_path / "big" / "last.pt"), weights(tmp_path / "acc" / "last.pt")
    assert torch.load(tmp_path / "acc" / "last.pt", weights_only=True)["step"] == 6
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, msg=name)
