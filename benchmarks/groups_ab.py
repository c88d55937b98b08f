"""Micro-batches kept apart through the blocks against joined after every block, the whole model, in one process.

    PYTHONPATH=src python benchmarks/groups_ab.py --model tnt_s_patch16_224 --batch 32 --rounds 10
    PYTHONPATH=src python benchmarks/groups_ab.py --batch 32 --rounds 8 --train --dtype fp32
    PYTHONPATH=src python benchmarks/groups_ab.py --batch 32 --rounds 12 --train --dtype bf16

On the CPU the model runs each block over groups of images sized to stay in cache (`TNT.micro_batch`). The groups
now stay apart from the first block to the last (`TNT.split_groups`, `TNT.run_block`), where the code before
concatenated both streams after every block and split them again for the next: in training that is one more copy
of the words and the sentences each way, forward and backward. The contender "joined per block" restores that
concatenation around this tree's `run_block`. Alternating rounds (`bench.model_ab_times`); the medians, then the
ratio in each round (`bench.round_ratios`, both timed in the same round), with the batch, dtype, threads and
machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch

from tnt_vision.bench import (
    ab_parser,
    cpu_name,
    medians_ms,
    model_ab_line,
    model_ab_times,
    ratio_range,
    round_ratios,
    set_threads,
)
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


def main() -> None:
    parser = ab_parser(__doc__, rounds=8)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    print(f"{threads} threads, {cpu_name()}, torch {torch.__version__}; medians of {args.rounds} rounds")
    times = model_ab_times(args, {"groups apart": None, "joined per block": joined_per_block}, dtype=args.dtype)
    print(model_ab_line(args, medians_ms(times), args.dtype))
    before = [1 / r for r in round_ratios(times["groups apart"], times["joined per block"])]
    print(f"joined per block / groups apart, per round: {ratio_range(before)}")


if __name__ == "__main__":
    main()
