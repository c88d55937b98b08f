"""bf16 autocast on a CPU with bf16 products (AMX): tnt-vision against its previous bf16 path and timm, in one
process.

    PYTHONPATH=src python benchmarks/bf16_ab.py --model tnt_s_patch16_224 --batch 32 --rounds 15
    PYTHONPATH=src python benchmarks/bf16_ab.py --batch 32 --rounds 7 --train

Three contenders alternate (`bench.interleaved_times`: a warm-up call each, order rotated every round), all under
`torch.autocast("cpu", torch.bfloat16)`: tnt-vision as it is; tnt-vision as it was before its bf16 path (the
words' attention by `scaled_dot_product_attention` in bf16, ATen's GELU and its backward in the lean MLP's backward
pass instead of the fused kernel, autocast's `F.linear` and GELU instead of oneDNN's
linear layers, LayerNorm outputs in fp32 then cast, micro-batches of the fp32 size, SDPA for the sentences'
attention in training); timm's TNT with the same configuration. Medians and the spread
(lowest, highest) are printed with the batch, threads and machine.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from unittest import mock

import torch

from tnt_vision import kernels
from tnt_vision.bench import ab_parser, build_module, cpu_name, model_ab_times, never, set_threads
from tnt_vision.kernels import emulated_bf16, onednn
from tnt_vision.models import layers as tnt_layers
from tnt_vision.models import tnt


def fp32_word_attention_only(qkv: torch.Tensor, tokens: int, head_dim: int) -> bool:
    """The kernel's test before bf16 q/k/v were taken (a plain function: a `Mock` would keep every tensor)."""
    return qkv.dtype == torch.float32 and kernels.word_attention_applies(qkv, tokens, head_dim)


def fp32_gelu_only(*tensors: torch.Tensor, applies: Callable[..., bool] = kernels.elementwise_applies) -> bool:
    """The elementwise kernels' test before they took bf16."""
    return all(t.dtype == torch.float32 for t in tensors) and applies(*tensors)


def onednn_without_autocast(x: torch.Tensor) -> bool:
    return not torch.is_autocast_enabled("cpu") and onednn.onednn_applies(x)


@contextlib.contextmanager
def previous_bf16_path() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(tnt_layers, "word_attention_applies", fp32_word_attention_only))
        stack.enter_context(mock.patch.object(kernels, "elementwise_applies", fp32_gelu_only))
        stack.enter_context(mock.patch.object(tnt_layers, "onednn_applies", onednn_without_autocast))
        stack.enter_context(mock.patch.object(tnt_layers, "native_bf16_autocast", never))  # LayerNorm.for_linear
        stack.enter_context(mock.patch.object(tnt_layers, "bf16_training_on_cpu", never))  # SDPA in training
        stack.enter_context(mock.patch.object(tnt, "BF16_BLOCK_BYTES", tnt.CACHE_BLOCK_BYTES))
        yield


def main() -> None:
    args = ab_parser(__doc__, rounds=7).parse_args()
    threads = set_threads(args.threads)
    if not emulated_bf16.bf16_hardware():
        raise SystemExit("this CPU has no bf16 products: bf16 autocast takes the emulated path (rows_ab.py)")
    variants = {"tnt-vision": None, "previous": previous_bf16_path}
    times = model_ab_times(args, variants, "bf16", others={"timm": build_module("timm", args.model, 224)})
    what = "training step" if args.train else "inference"
    print(
        f"{args.model} {what}, batch {args.batch}, bf16 autocast, {threads} threads, {cpu_name()}, "
        f"torch {torch.__version__}"
    )
    base = statistics.median(times["tnt-vision"])
    for name, t in times.items():
        ms = [s * 1e3 for s in t]
        print(
            f"  {name:10s} median {statistics.median(ms):7.0f} ms (lowest {min(ms):.0f}, highest {max(ms):.0f}), "
            f"tnt-vision {statistics.median(t) / base:.2f}x as fast"
        )


if __name__ == "__main__":
    main()
