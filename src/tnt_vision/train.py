"""A training run: config -> data -> model -> loop -> checkpoints, logs and a summary.

Single process or `torchrun` (DDP, gloo on CPU, NCCL on GPU); rank 0 logs and saves. Every run resumes from its
own `last.pt`, so re-running the command (or `torchrun --max-restarts`) continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import engine
from .config import TrainConfig
from .data import datasets, transforms
from .errors import UserError
from .io import atomic_write
from .models import create_model, load_checkpoint
from .models.registry import get_spec

# ---- processes, devices, precision -------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(int(os.environ.get("RANK", "0")), world, local), dev


def autocast_for(amp: str, device: torch.device) -> tuple[Any, torch.amp.GradScaler | None]:
    """One autocast context factory and, for fp16 only, a GradScaler."""
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else "none"
    if amp == "none":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def scaled_lr(cfg: TrainConfig, world: int) -> float:
    """The linear scaling rule: `lr` is quoted at a global batch of `lr_base_batch`."""
    return cfg.lr * cfg.batch_size * cfg.accum_steps * world / cfg.lr_base_batch


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only; none on position encodings, class token, norms, biases."""
    skip = set(model.no_weight_decay())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> CosineLRScheduler:
    """Linear warm-up from `warmup_lr`, then cosine to `min_lr`, updated after every optimizer step."""
    warmup = round(cfg.warmup_epochs * updates_per_epoch)
    total = cfg.epochs * updates_per_epoch
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total - warmup, 1),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )


# ---- checkpoints ---------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """torch.save through a temporary file, fsync and rename: a crash or full disk leaves the old file intact."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a damaged file
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


# ---- the run -------------------------------------------------------------------------------------------------------


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches of the current epoch completed (a step checkpoint mid-epoch)
    step: int = 0  # optimizer updates completed
    best_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)


class Run:
    """Holds the assembled pieces of one training run; `fit()` runs it."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.dist, self.device = setup_distributed(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.state = RunState()

        self.splits = self._open_data()
        self.classes = self.splits.classes
        num_classes = cfg.num_classes or len(self.classes)
        if num_classes != len(self.classes):
            raise UserError(f"--num-classes {num_classes} does not match the {len(self.classes)} classes of {cfg.data}")
        self.module = self._build_model(num_classes)
        self.train_loader, self.val_loader, self.sampler = self._build_loaders()
        self.updates_per_epoch = -(-self.batches_per_epoch // cfg.accum_steps)
        self.parts = self._build_parts()
        self.resumed_from = self._maybe_resume()

    # -- assembly
    def _open_data(self) -> datasets.DataSplits:
        """Rank 0 downloads (when asked) while the others wait, then every rank opens the files."""
        wait = self.cfg.download and self.dist.world > 1
        if wait and not self.dist.main:
            dist.barrier()
        splits = datasets.build_splits(self.cfg.data, download=self.cfg.download and self.dist.main)
        if wait and self.dist.main:
            dist.barrier()
        return splits

    def _build_model(self, num_classes: int) -> nn.Module:
        overrides: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": self.cfg.drop_path}
        if self.cfg.img_size:
            overrides["img_size"] = self.cfg.img_size
        try:
            get_spec(self.cfg.model)
            model = create_model(self.cfg.model, **overrides)
        except ValueError as e:
            raise UserError(str(e)) from None
        if self.cfg.finetune:
            report = load_checkpoint(model, self.cfg.finetune, ignore_head=True)
            self.log(f"fine-tuning from {self.cfg.finetune} ({report['format']} layout{_adapted(report)})")
        if self.cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model.to(self.device)

    def _build_loaders(self) -> tuple[DataLoader, DataLoader, datasets.SeededSampler]:
        cfg, pc = self.cfg, self.module.pretrained_cfg
        size = pc["input_size"][-1]
        train_set = datasets.SampleSet(
            datasets.subset(self.splits.train, cfg.train_limit),
            transforms.train_transform(cfg, size, pc["mean"], pc["std"]),
        )
        val_base = datasets.subset(self.splits.val, cfg.val_limit)
        shard = list(range(self.dist.rank, len(val_base), self.dist.world))  # every image exactly once
        val_set = torch.utils.data.Subset(datasets.SampleSet(val_base, transforms.eval_transform(self.module)), shard)
        inner = transforms.train_sampler(
            train_set, repeats=cfg.repeats, rank=self.dist.rank, world=self.dist.world, seed=cfg.seed
        )
        sampler = datasets.SeededSampler(inner, seed=cfg.seed, rank=self.dist.rank, world=self.dist.world)
        self.batches_per_epoch = len(inner) // cfg.batch_size
        if self.batches_per_epoch == 0:
            raise UserError(f"{len(inner)} training images per process is fewer than --batch-size {cfg.batch_size}")
        common = {
            "num_workers": cfg.workers,
            "collate_fn": datasets.collate_skipping,
            "pin_memory": self.device.type == "cuda",
            "persistent_workers": cfg.workers > 0,  # samples are seeded by the sampler, not by worker state
            # a private generator: creating a loader must not consume the global RNG a resumed run restores
            "generator": torch.Generator().manual_seed(cfg.seed),
        }
        train = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **common)
        val = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, **common)
        return train, val, sampler

    def _build_parts(self) -> engine.StepParts:
        cfg = self.cfg
        lr = scaled_lr(cfg, self.dist.world)
        optimizer = torch.optim.AdamW(param_groups(self.module, cfg.weight_decay), lr=lr, eps=cfg.opt_eps)
        autocast, scaler = autocast_for(cfg.amp, self.device)
        model: nn.Module = self.module
        if self.dist.world > 1:
            model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if cfg.compile:
            model = torch.compile(model)
        mixup = transforms.mixup_fn(cfg, self.module.num_classes)
        if mixup is not None:
            from timm.loss import SoftTargetCrossEntropy

            loss_fn: nn.Module = SoftTargetCrossEntropy()  # smoothing is folded into Mixup's targets
        else:
            loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
        return engine.StepParts(
            model=model,
            module=self.module,
            optimizer=optimizer,
            scheduler=build_scheduler(cfg, optimizer, self.updates_per_epoch),
            loss_fn=loss_fn,
            autocast=autocast,
            scaler=scaler,
            ema=ModelEmaV3(self.module, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None,
            mixup=mixup,
            accum_steps=cfg.accum_steps,
            clip_grad=cfg.clip_grad,
            device=self.device,
        )

    # -- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        p = self.parts
        return {
            "model": self.module.state_dict(),
            "state_dict_ema": p.ema.module.state_dict() if p.ema is not None else None,
            "optimizer": p.optimizer.state_dict(),
            "scheduler": p.scheduler.state_dict(),
            "scaler": p.scaler.state_dict() if p.scaler is not None else None,
            "epoch": self.state.epoch,
            "batch": self.state.batch,
            "step": self.state.step,
            "sampler": {"epoch": self.state.epoch, "position": self.state.batch * self.cfg.batch_size},
            "best_top1": self.state.best_top1,
            "history": self.state.history,
            "rng": rng_state(),
            "arch": self.cfg.model,
            "model_config": {"num_classes": self.module.num_classes, "img_size": self.module.cfg.img_size},
            "class_names": self.classes,
            "config": self.cfg.to_dict(),
        }

    def save(self, name: str) -> None:
        if self.dist.main:
            save_checkpoint(self.out / name, self.checkpoint_state())
        if self.dist.world > 1:
            dist.barrier()

    def _maybe_resume(self) -> Path | None:
        resume = self.cfg.resume
        if resume == "never":
            return None
        path = self.out / "last.pt" if resume == "auto" else Path(resume)
        if resume == "auto" and not path.is_file():
            return None
        ckpt = read_checkpoint(path)
        if ckpt.get("class_names") != self.classes:
            raise UserError(
                f"{path} was trained on other classes than {self.cfg.data}: {_class_diff(ckpt, self.classes)}"
            )
        p = self.parts
        self.module.load_state_dict(ckpt["model"])
        if p.ema is not None and ckpt.get("state_dict_ema") is not None:
            p.ema.module.load_state_dict(ckpt["state_dict_ema"])
        p.optimizer.load_state_dict(ckpt["optimizer"])
        p.scheduler.load_state_dict(ckpt["scheduler"])
        if p.scaler is not None and ckpt.get("scaler") is not None:
            p.scaler.load_state_dict(ckpt["scaler"])
        self.state = RunState(ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt["best_top1"], ckpt["history"])
        set_rng_state(ckpt["rng"])
        p.scheduler.step_update(num_updates=self.state.step)
        self.log(f"resuming from {path}: epoch {self.state.epoch}, batch {self.state.batch}, step {self.state.step}")
        return path

    # -- the loop
    def log(self, message: str) -> None:
        if self.dist.main:
            print(message, flush=True)

    def fit(self) -> dict[str, Any]:
        """Train to `cfg.epochs`, evaluating and checkpointing after every epoch; returns the summary."""
        cfg = self.cfg
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(cfg.to_dict())))
        self.log(
            f"{cfg.model} on {cfg.data}: {len(self.classes)} classes, {self.batches_per_epoch} batches/epoch x "
            f"{cfg.batch_size} x {self.dist.world} process(es), lr {scaled_lr(cfg, self.dist.world):.2e}, "
            f"device {self.device}"
        )
        writer = self._tensorboard()
        while self.state.epoch < cfg.epochs:
            record = self._one_epoch()
            if writer is not None:
                for k, v in record.items():
                    if isinstance(v, float):
                        writer.add_scalar(k, v, self.state.epoch)
        if writer is not None:
            writer.close()
        summary = self.summary()
        if self.dist.main:
            write_json(self.out / "summary.json", summary)
        return summary

    def _one_epoch(self) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        self.sampler.set_epoch(st.epoch, start=st.batch * cfg.batch_size)
        save_steps = cfg.save_every_steps

        def on_update(step: int, batches: int) -> None:
            st.step, st.batch = step, batches
            if save_steps and step % save_steps == 0 and batches < self.batches_per_epoch:
                self.save("last.pt")

        try:
            train = engine.train_one_epoch(
                self.parts,
                self.train_loader,
                total_batches=self.batches_per_epoch,
                start_batch=st.batch,
                step=st.step,
                on_update=on_update,
                desc=f"epoch {st.epoch + 1}/{cfg.epochs}",
                show_progress=self.dist.main,
            )
        except engine.NonFiniteLossError as e:
            kept = self.out / "last.pt"
            raise engine.NonFiniteLossError(
                f"{e} at epoch {st.epoch + 1}, step {st.step + 1}; stopped without saving. Last good checkpoint: "
                f"{kept if kept.is_file() else 'none yet'}. Try a lower --lr, --clip-grad or --amp none"
            ) from None
        record = {"epoch": st.epoch + 1, "step": train["step"], "train_loss": train["loss"], "lr": train["lr"]}
        record.update(self._evaluate())
        record.update(
            train_images=train["images"],
            train_seconds=train["seconds"],
            images_per_s=train["images_per_s"],
            train_skipped=train["skipped"],
        )
        st.epoch, st.batch, st.step = st.epoch + 1, 0, train["step"]
        st.history.append(record)
        improved = record["top1"] > st.best_top1
        st.best_top1 = max(st.best_top1, record["top1"])
        self.save("last.pt")
        if improved:
            self.save("best.pt")
        if self.dist.main:
            self._write_logs()
            self.log(
                f"epoch {st.epoch}/{cfg.epochs}: train loss {record['train_loss']:.4f}, "
                f"val loss {record['val_loss']:.4f}, "
                f"top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%, {record['images_per_s']:.0f} img/s"
            )
        return record

    def _evaluate(self) -> dict[str, Any]:
        p = self.parts
        kw = {"device": self.device, "autocast": p.autocast, "show_progress": self.dist.main}
        res = engine.evaluate(self.module, self.val_loader, desc="eval", **kw)
        out = {"val_loss": res["loss"], "top1": res["top1"], "top5": res["top5"], "val_skipped": res["skipped"]}
        out.update(model_top1=res["top1"], model_top5=res["top5"])
        if p.ema is not None:  # `tnt eval` and `tnt predict` use the EMA weights, so they define top-1
            ema = engine.evaluate(p.ema.module, self.val_loader, desc="eval ema", **kw)
            out.update(val_loss=ema["loss"], top1=ema["top1"], top5=ema["top5"])
        return out

    def _tensorboard(self) -> Any:
        if not (self.cfg.tensorboard and self.dist.main):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tb"))

    def _write_logs(self) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self.state.history)
        atomic_write(self.out / "metrics.jsonl", lambda tmp: tmp.write_text(lines))
        plot_curves(self.state.history, self.out / "curves.png", title=f"{self.cfg.model} on {self.cfg.data}")

    def summary(self) -> dict[str, Any]:
        h = self.state.history
        train_time = sum(r["train_seconds"] for r in h)
        images = sum(r["train_images"] for r in h)
        last = h[-1] if h else {}
        return {
            "model": self.cfg.model,
            "data": self.cfg.data,
            "epochs": len(h),
            "top1": last.get("top1"),
            "top5": last.get("top5"),
            "best_top1": self.state.best_top1 if h else None,
            "val_loss": last.get("val_loss"),
            "train_time_s": train_time,
            "images_per_s": images / train_time if train_time else None,
            "global_batch": self.cfg.batch_size * self.cfg.accum_steps * self.dist.world,
            "processes": self.dist.world,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "skipped_images": sum(r["train_skipped"] + r["val_skipped"] for r in h),
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
        }


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss (train, val) and accuracy (top-1, top-5) per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], marker="o", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [r["top1"] for r in history], marker="o", label="top-1")
    ax_acc.plot(epochs, [r["top5"] for r in history], marker="o", label="top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _adapted(report: dict[str, Any]) -> str:
    parts = [*report["resized"], *(["new classifier"] if report["skipped"] else [])]
    return f"; {', '.join(parts)}" if parts else ""


def _class_diff(ckpt: dict[str, Any], classes: list[str]) -> str:
    theirs = ckpt.get("class_names") or []
    return f"checkpoint has {len(theirs)} classes ({', '.join(map(str, theirs[:5]))}...), data has {len(classes)}"


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or continue) a training run and return its summary."""
    run = Run(cfg)
    try:
        return run.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
