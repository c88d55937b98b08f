"""Whether Inductor still gives wrong gradients for training over micro-batch groups (why compiled training takes
the batch whole, `tnt.compiled_training`). Run it on a new torch: where "groups, donated buffers on" matches
eager, the workaround can go.

    PYTHONPATH=src python benchmarks/compiled_groups_check.py                      # TNT-S, depth 1, 2 groups of 2
    PYTHONPATH=src python benchmarks/compiled_groups_check.py --depth 12 --batch 32 --groups 4
    PYTHONPATH=src python benchmarks/compiled_groups_check.py --depth 12 --batch 32 --groups 4 --rounds 5

The cause (torch 2.14): AOTAutograd donates every tensor the forward saves for backward whose storage no forward
input or output and no gradient shares (`collect_fw_donated_buffer_idxs`), without comparing the saved tensors with
each other. Over groups it saves the whole batch's words (the sentence embedding's input) and each group's slice of
them (a block's inner norm input) as separate tensors of one storage; all are donated, and Inductor's backward
writes a group's recomputed norm over its slice while the sentence embedding's norm has yet to read the whole. The
sentence embedding's norm weight then gets a gradient far from eager's. `donated_buffer_repro.py` shows the same with
torch alone.

Three compilations of one model's training step, against eager's gradients (eager in groups): over the groups with
AOTAutograd's donated buffers on (torch's default) and off (`torch._functorch.config.donated_buffer`), and over the
whole batch (what tnt-vision compiles). For each, the largest difference over the parameters (as a fraction of that
gradient's largest value) and the saved tensors that share a storage. Inductor's and AOTAutograd's caches are off:
a cached artifact compiled with donation on was found serving a compilation with it off. Where donation is off,
AOTAutograd does not look for such tensors, and none are listed.

With --rounds N, then N alternating training steps (forward, backward, AdamW; `bench.interleaved_times`) of eager,
compiled over the whole batch, and compiled over the groups the model picks itself with donation off: what the
groups would gain compiled, were donation the user's to turn off.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from torch._functorch._aot_autograd import graph_compile
from torch.multiprocessing.reductions import StorageWeakRef

from tnt_vision.bench import (
    BenchConfig,
    constant,
    cpu_name,
    interleaved_times,
    make_inputs,
    medians_ms,
    set_threads,
    train_step,
    within,
)
from tnt_vision.models import create_model, tnt


@contextlib.contextmanager
def recording_aliases(found: list[str]) -> Iterator[None]:
    """AOTAutograd's donated-buffer choice as it is, recording the saved tensors that share a storage."""
    choose = graph_compile.collect_fw_donated_buffer_idxs

    def collect(fw_ins: Any, user_fw_outs: Any, bw_outs: Any, saved: list[Any]) -> list[int]:
        donated = choose(fw_ins, user_fw_outs, bw_outs, saved)
        shared = defaultdict(list)
        for i, t in enumerate(saved):
            if isinstance(t, torch.Tensor):
                shared[StorageWeakRef(t.untyped_storage())].append(i)
        for members in (m for m in shared.values() if len(m) > 1):
            views = (f"{tuple(saved[i].shape)}@{saved[i].storage_offset()}" for i in members)
            found.append(f"{', '.join(views)} ({sum(i in donated for i in members)} donated)")
        return donated

    with mock.patch.object(graph_compile, "collect_fw_donated_buffer_idxs", collect):
        yield


def groups_of(images: int) -> Any:
    """`TNT.micro_batch` answering `images` a group (eager's groups, at any size), or the whole batch where
    `compiled_training` says so."""

    def micro_batch(model: tnt.TNT, sentences: torch.Tensor) -> int:
        return sentences.shape[0] if tnt.compiled_training(sentences) else images

    return micro_batch


def gradients(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def compiled_gradients(model: torch.nn.Module, x: torch.Tensor, groups: bool, donated: bool) -> tuple[Any, ...]:
    """Gradients of Inductor's compilation, and the saved tensors that share a storage."""
    found: list[str] = []
    torch._dynamo.reset()
    with (
        mock.patch.object(tnt, "compiled_training", constant(False) if groups else tnt.compiled_training),
        mock.patch.object(functorch_config, "donated_buffer", donated),
        recording_aliases(found),
    ):
        return gradients(torch.compile(model, backend="inductor", fullgraph=True), x), found


@contextlib.contextmanager
def grouped_without_donation() -> Iterator[None]:
    """Compiled training over the groups the model picks (as in eager), AOTAutograd's donated buffers off."""
    with (
        mock.patch.object(tnt, "compiled_training", constant(False)),
        mock.patch.object(functorch_config, "donated_buffer", False),
    ):
        yield


def inductor() -> Callable[..., Any]:
    """Inductor as a backend of its own. Dynamo reuses a graph compiled for one copy of a model in another whose
    guards pass, and a torch setting (donation) is not guarded: each compiled contender gets its own backend."""
    from torch._inductor.compile_fx import compile_fx

    def backend(graph: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        return compile_fx(graph, inputs)

    return backend


def timed_steps(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, float]:
    """Median ms of training steps: eager, compiled over the whole batch, compiled over groups without donation."""
    cfg = BenchConfig(model=args.model, batch=args.batch, runs=args.rounds, train=True)
    whole, groups = (torch.compile(copy.deepcopy(model), backend=inductor()) for _ in range(2))
    steps = {
        "eager": train_step(model, cfg),
        "compiled, whole batch": train_step(whole, cfg),
        "compiled, groups, donation off": within(train_step(groups, cfg), grouped_without_donation),
    }
    return medians_ms(interleaved_times(steps, make_inputs(cfg, args.batch), cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tnt_s_patch16_224")
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=0, help="also time training steps, this many rounds")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False
    torch.manual_seed(0)
    model = create_model(args.model, depth=args.depth, num_classes=10, drop_path_rate=0.0).train()
    x = torch.randn(args.batch, 3, model.cfg.img_size, model.cfg.img_size)
    print(
        f"{args.model}, depth {args.depth}, batch {args.batch}, {args.groups} groups in eager, fp32, {threads}"
        f" threads, {cpu_name()}, torch {torch.__version__}"
    )
    check_gradients(model, x, args.batch // args.groups)
    if args.rounds:
        ms = timed_steps(model, args)
        print(f"training steps, the model's own groups, medians of {args.rounds} rounds: ", end="")
        print(", ".join(f"{name} {t:.0f} ms ({ms['eager'] / t:.3f}x eager's speed)" for name, t in ms.items()))


def check_gradients(model: torch.nn.Module, x: torch.Tensor, images: int) -> None:
    """Each compilation's largest gradient difference from eager's (groups of `images` in eager), and its saved
    tensors that share a storage."""
    runs = {
        "groups, donated buffers on": (True, True),
        "groups, donated buffers off": (True, False),
        "whole batch (tnt-vision's)": (False, True),
    }
    with mock.patch.object(tnt.TNT, "micro_batch", groups_of(images)):
        eager = gradients(model, x)
        for name, (groups, donated) in runs.items():
            grads, aliases = compiled_gradients(model, x, groups, donated)
            worst = max(
                ((g - e).abs().max().item() / e.abs().max().item(), n)
                for (n, _), g, e in zip(model.named_parameters(), grads, eager, strict=True)
            )
            print(f"{name}: largest gradient difference {worst[0]:.2e} of its largest value ({worst[1]})")
            for alias, times in Counter(aliases).items():
                print(f"  saved tensors sharing a storage: {alias}" + (f", x{times}" if times > 1 else ""))


if __name__ == "__main__":
    main()
