"""Micro-batches kept apart through the blocks against joined after every block, the whole model, in one process.

    PYTHONPATH=src python benchmarks/groups_ab.py --model tnt_s_patch16_224 --batch 32 --rounds 10
    PYTHONPATH=src python benchmarks/groups_ab.py --batch 32 --rounds 8 --train --dtype fp32
    PYTHONPATH=src python benchmarks/groups_ab.py --batch 32 --rounds 12 --train --dtype bf16

On the CPU the model runs each block over groups of images sized to stay in cache (`TNT.micro_batch`). The groups
now stay apart from the first block to the last (`TNT.split_groups`, `TNT.run_block`), where the code before
concatenated both streams after every block and split them again for the next: in training that is one more copy
of the words and the sentences each way, forward and backward. The contender "joined per block" restores that
concatenation around this tree's `run_block`. First a few profiled calls of each, alternating: their
concatenations' count and self time, the work the change removes; then alternating rounds
(`bench.model_ab_times`): the medians and the ratio in each round (`bench.round_ratios`, both timed in the same
round), with the batch, dtype, threads and machine. Under bf16 autocast at batch 32 the whole batch is one group
(`micro_batch`'s budget is four times larger there): the two contenders are then the same code, and their ratio
is the noise of a whole-model A/B on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from unittest import mock

import torch
from torch.profiler import profile

from tnt_vision.bench import (
    BenchConfig,
    ab_parser,
    cpu_name,
    inference_step,
    make_inputs,
    medians_ms,
    model_ab_line,
    model_ab_times,
    ratio_range,
    round_ratios,
    set_threads,
    train_step,
)
from tnt_vision.models import create_model
from tnt_vision.models.tnt import TNT, Groups


@contextlib.contextmanager
def joined_per_block() -> Iterator[None]:
    """Each block's groups concatenated into the whole batch and split again, as before the groups stayed apart."""
    run_block = TNT.run_block

    def joining(model: TNT, block: torch.nn.Module, groups: Groups) -> Groups:
        out = run_block(model, block, groups)
        if len(out) == 1:
            return out
        words = None if out[0][0] is None else torch.cat([w for w, _ in out])
        return model.split_groups(words, model.sentences_of(out), out[0][1].shape[0])

    with mock.patch.object(TNT, "run_block", joining):
        yield


# The contenders, each run inside its context: this tree as it is, and with the per-block join restored.
CONTENDERS = {"groups apart": contextlib.nullcontext, "joined per block": joined_per_block}


def concatenations(args: argparse.Namespace, rounds: int = 3) -> None:
    """Profiled calls of each contender, alternating after one unprofiled call each (the first calls allocate the
    memory and AdamW's state): how many concatenations a call runs and their self time in each round."""
    cfg = BenchConfig(model=args.model, batch=args.batch, train=args.train, dtype=args.dtype)
    step = (train_step if args.train else inference_step)(create_model(args.model), cfg)
    x = make_inputs(cfg, args.batch)[0]
    found: dict[str, list[tuple[int, float]]] = {name: [] for name in CONTENDERS}
    for r in range(rounds + 1):
        for name, context in CONTENDERS.items():
            with context(), profile() as prof:
                step(x)
            cats = [e for e in prof.key_averages() if e.key == "aten::cat"]
            if r:
                found[name].append((cats[0].count, cats[0].self_cpu_time_total / 1e3) if cats else (0, 0.0))
    for name, calls in found.items():
        times = ", ".join(f"{ms:.1f}" for _, ms in calls)
        print(f"{name}: {calls[0][0]} concatenations a call, {times} ms in {rounds} rounds")


def main() -> None:
    parser = ab_parser(__doc__, rounds=8)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    print(f"{threads} threads, {cpu_name()}, torch {torch.__version__}; medians of {args.rounds} rounds")
    concatenations(args)
    times = model_ab_times(args, CONTENDERS, dtype=args.dtype)
    print(model_ab_line(args, medians_ms(times), args.dtype))
    before = [1 / r for r in round_ratios(times["groups apart"], times["joined per block"])]
    print(f"joined per block / groups apart, per round: {ratio_range(before)}")


if __name__ == "__main__":
    main()
