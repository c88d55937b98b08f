"""tnt-vision on the CPU under torch.compile: the kernels kept in the graph, against eager and plain operators.

    PYTHONPATH=src python benchmarks/compiled_ab.py --rounds 6
    PYTHONPATH=src python benchmarks/compiled_ab.py --dtype bf16 --rounds 6
    PYTHONPATH=src python benchmarks/compiled_ab.py --train --rounds 5

torch.compile keeps the inner block's kernel (`tnt_vision::word_block`) and oneDNN's linear layers with their packed
weights (`tnt_vision::onednn_linear`) as operators in its graph, and traces the explicit path's products for the
outer attention where they beat `scaled_dot_product_attention` (`layers.explicit_products_faster`: bf16 inference
on a CPU without AMX). Three contenders of one model's weights, alternating (`bench.interleaved_times`: the
compilation in the warm-up, the order rotated each round): eager, compiled, and compiled with those three stepped
aside (Inductor's own code for the inner blocks and linear layers, SDPA). Each compiled contender's graph is listed
by its tnt_vision operators (what Inductor was given). Medians with the batch, dtype, threads and machine.

With --train, training steps (forward, backward, AdamW): torch.compile traces the lean training functions of
`kernels.emulated_bf16` (which keep less for backward) with their row kernels as operators, and the third contender
steps them and `explicit_attention_bf16` aside, as compiled training did before (Inductor's code for the layers,
with autograd's saved activations). The contenders' gradients of one batch are checked against eager's first, and
each one's activations kept for backward are counted (`bench.saved_bytes`).
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any
from unittest import mock

import torch
from torch import nn

from tnt_vision.bench import (
    BenchConfig,
    ab_parser,
    autocast,
    constant,
    cpu_name,
    inference_step,
    interleaved_times,
    make_inputs,
    medians_ms,
    never,
    saved_bytes,
    set_threads,
    tnt_vision_operators,
    train_step,
    within,
)
from tnt_vision.models import create_model, layers, tnt


@contextlib.contextmanager
def plain_operators() -> Iterator[None]:
    """The inner blocks, the linear layers and the outer attention by the model's plain operators."""
    with (
        mock.patch.object(layers, "word_block_applies", never),
        mock.patch.object(layers, "onednn_applies", never),
        mock.patch.object(layers, "explicit_products_faster", never),
    ):
        yield


@contextlib.contextmanager
def plain_training() -> Iterator[None]:
    """Training without the lean functions and the explicit bf16 attention (autograd through the layers)."""
    with (
        mock.patch.object(layers, "lean_path", constant((False, None))),
        mock.patch.object(tnt, "lean_path", constant((False, None))),
        mock.patch.object(layers.Attention, "explicit_bf16_applies", never),
    ):
        yield


class Recording:
    """A torch.compile backend: Inductor, after counting the graphs it is given and their tnt_vision operators
    (in training, those of the backward too: Dynamo traces an autograd.Function's backward as a subgraph)."""

    def __init__(self) -> None:
        self.graphs = 0
        self.operators: Counter[str] = Counter()

    def __call__(self, graph: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        self.operators.update(tnt_vision_operators(graph))
        return compile_fx(graph, inputs)

    def __str__(self) -> str:
        operators = ", ".join(f"{name} x{n}" for name, n in sorted(self.operators.items())) or "no tnt_vision operator"
        return f"{self.graphs} graph(s), {operators}"


def contenders(model: nn.Module, train: bool) -> tuple[dict[str, nn.Module], dict[str, Recording]]:
    """Eager `model`, and two compiled copies (their own weights, their own graphs), each with its recording backend;
    all in training or eval mode."""
    model.train(train)
    backends = {"compiled": Recording(), PLAIN: Recording()}
    compiled = {name: torch.compile(copy.deepcopy(model), backend=backend) for name, backend in backends.items()}
    return {"eager": model, **compiled}, backends


PLAIN = "compiled, plain operators"


def checked_gradients(
    modules: dict[str, nn.Module], context: Callable[[], Any], x: torch.Tensor, cfg: BenchConfig
) -> dict[str, float]:
    """Each contender's gradients of one batch (the compilations) against eager fp32's: in fp32 within 1e-4 of
    each tensor's largest, in bf16 no further than twice eager's own bf16 gradients are (or 5e-2); MiB each
    contender keeps for backward."""
    kept, grads = {}, {}
    for name, module in modules.items():
        with context() if name == PLAIN else contextlib.nullcontext():
            grads[name], kept[name] = gradients(module, x, cfg)
    fp32 = cfg.dtype == "fp32"
    reference = grads["eager"] if fp32 else gradients(modules["eager"], x, replace(cfg, dtype="fp32"))[0]
    for name, found in grads.items():
        for got, bf16, want in zip(found, grads["eager"], reference, strict=True):
            scale = want.abs().max().item()
            error = 1e-4 if fp32 else max(5e-2, 2 * (bf16 - want).abs().max().item() / scale)
            torch.testing.assert_close(got, want, atol=error * scale, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    return {name: b / 2**20 for name, b in kept.items()}


def gradients(module: nn.Module, x: torch.Tensor, cfg: BenchConfig) -> tuple[list[torch.Tensor], int]:
    """The parameters' gradients of a cross-entropy step (fixed targets) in fp32, and the bytes kept for backward."""
    with autocast(cfg):
        logits, kept = saved_bytes(lambda: module(x), ignore=list(module.parameters()))
    torch.nn.functional.cross_entropy(logits.float(), torch.arange(x.shape[0]) % logits.shape[-1]).backward()
    grads = [p.grad.float() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return grads, kept


def checked_outputs(
    modules: dict[str, nn.Module], context: Callable[[], Any], x: torch.Tensor, cfg: BenchConfig
) -> None:
    """Each contender's inference output (the compilations) against eager's."""
    steps = {name: inference_step(module, cfg) for name, module in modules.items()}
    outputs = {name: (within(step, context) if name == PLAIN else step)(x).float() for name, step in steps.items()}
    for name, out in outputs.items():
        tolerance = 1e-4 if cfg.dtype == "fp32" else 5e-2 * outputs["eager"].abs().max().item()
        torch.testing.assert_close(out, outputs["eager"], atol=tolerance, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def main() -> None:
    parser = ab_parser(__doc__, rounds=6)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    cfg = BenchConfig(
        model=args.model, batch=args.batch, runs=args.rounds, dtype=args.dtype, warmup=2, train=args.train
    )
    modules, backends = contenders(create_model(args.model), args.train)
    context = plain_training if args.train else plain_operators
    inputs = make_inputs(cfg, args.batch)
    kept = (
        checked_gradients(modules, context, inputs[0], cfg)
        if args.train
        else checked_outputs(modules, context, inputs[0], cfg)
    )
    step = train_step if args.train else inference_step
    steps = {name: step(module, cfg) for name, module in modules.items()}
    steps[PLAIN] = within(steps[PLAIN], context)
    ms = medians_ms(interleaved_times(steps, inputs, cfg))
    mode = "training step" if args.train else "inference"
    print(
        f"{args.model} {mode}, batch {args.batch}, {args.dtype}, {threads} threads, {cpu_name()}, torch "
        f"{torch.__version__}; medians of {args.rounds} rounds"
    )
    base = ms["eager"]
    print(", ".join(f"{name} {t:.0f} ms ({base / t:.3f}x eager's speed)" for name, t in ms.items()))
    if kept:
        print("kept for backward: " + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in kept.items()))
    for name, backend in backends.items():
        print(f"  {name}: {backend}")


if __name__ == "__main__":
    main()
