"""tnt-vision's CPU inference under torch.compile: the kernels kept in the graph, against eager and plain operators.

    PYTHONPATH=src python benchmarks/compiled_ab.py --rounds 6
    PYTHONPATH=src python benchmarks/compiled_ab.py --dtype bf16 --rounds 6

torch.compile keeps the inner block's kernel (`tnt_vision::word_block`) and oneDNN's linear layers with their packed
weights (`tnt_vision::onednn_linear`) as operators in its graph, and traces the explicit path's products for the
outer attention where they beat `scaled_dot_product_attention` (`layers.explicit_products_faster`: bf16 inference
on a CPU without AMX). Three contenders of one model's weights, alternating (`bench.interleaved_times`: the
compilation in the warm-up, the order rotated each round): eager, compiled, and compiled with those three stepped
aside (Inductor's own code for the inner blocks and linear layers, SDPA). Each compiled contender's graph is listed
by its tnt_vision operators (what Inductor was given). Medians with the batch, dtype, threads and machine.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from torch import nn

from tnt_vision.bench import (
    BenchConfig,
    ab_parser,
    cpu_name,
    inference_step,
    interleaved_times,
    make_inputs,
    medians_ms,
    never,
    set_threads,
    within,
)
from tnt_vision.models import create_model, layers


@contextlib.contextmanager
def plain_operators() -> Iterator[None]:
    """The inner blocks, the linear layers and the outer attention by the model's plain operators."""
    with (
        mock.patch.object(layers, "word_block_applies", never),
        mock.patch.object(layers, "onednn_applies", never),
        mock.patch.object(layers, "explicit_products_faster", never),
    ):
        yield


class Recording:
    """A torch.compile backend: Inductor, after counting the graphs it is given and their tnt_vision operators."""

    def __init__(self) -> None:
        self.graphs = 0
        self.operators: Counter[str] = Counter()

    def __call__(self, graph: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        calls = (str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        self.operators.update(call for call in calls if call.startswith("tnt_vision."))
        return compile_fx(graph, inputs)

    def __str__(self) -> str:
        operators = ", ".join(f"{name} x{n}" for name, n in sorted(self.operators.items())) or "no tnt_vision operator"
        return f"{self.graphs} graph(s), {operators}"


def compiled_step(model: nn.Module, cfg: BenchConfig, backend: Recording) -> Callable[[torch.Tensor], object]:
    """Inference by a compiled copy of `model` (its own weights' copy: its own graphs)."""
    return inference_step(torch.compile(copy.deepcopy(model), backend=backend), cfg)


def main() -> None:
    parser = ab_parser(__doc__, rounds=6, train=False)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    cfg = BenchConfig(model=args.model, batch=args.batch, runs=args.rounds, dtype=args.dtype, warmup=2)
    model = create_model(args.model)
    backends = {"compiled": Recording(), "compiled, plain operators": Recording()}
    steps = {
        "eager": inference_step(model, cfg),
        "compiled": compiled_step(model, cfg, backends["compiled"]),
        "compiled, plain operators": within(
            compiled_step(model, cfg, backends["compiled, plain operators"]), plain_operators
        ),
    }
    inputs = make_inputs(cfg, args.batch)
    outputs = {name: step(inputs[0]).float() for name, step in steps.items()}  # the compilations, checked
    for name, out in outputs.items():
        tolerance = 1e-4 if args.dtype == "fp32" else 5e-2 * outputs["eager"].abs().max().item()
        torch.testing.assert_close(out, outputs["eager"], atol=tolerance, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    ms = medians_ms(interleaved_times(steps, inputs, cfg))
    print(
        f"{args.model} inference, batch {args.batch}, {args.dtype}, {threads} threads, {cpu_name()}, torch "
        f"{torch.__version__}; medians of {args.rounds} rounds"
    )
    base = ms["eager"]
    print(", ".join(f"{name} {t:.0f} ms ({base / t:.3f}x eager's speed)" for name, t in ms.items()))
    for name, backend in backends.items():
        print(f"  {name}: {backend}")


if __name__ == "__main__":
    main()
