"""bf16 training's outer attention by `explicit_attention_bf16` against the model's explicit path, in one process.

    PYTHONPATH=src python benchmarks/explicit_attention_ab.py --batch 32 --rounds 8

Under bf16 autocast on a CPU with bf16 products, training computes the outer attention by explicit products
(`scaled_dot_product_attention`'s backward is slower there). The model's explicit path copies q, k (transposed)
and v before its products and the gradients twice after them; `explicit_attention_bf16` copies each once, takes the
compiled softmax (`kernels.softmax_rows`), and recomputes the attention weights in backward rather than keep them
(`emulated_bf16.RECOMPUTE_WEIGHTS`). Four contenders: `explicit_attention_bf16`, the same keeping the weights, the
same with ATen's softmax, and the explicit path. First the outer attention alone (forward and backward) at the
model's size for --batch, the results checked against each other, with the bytes each keeps for backward (and its
softmax alone, the kernel against ATen's), then the whole training step (forward, backward, AdamW), alternating
(`bench.interleaved_times`: warm-up, order rotated each round). Medians with the batch, threads and machine.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from unittest import mock

import torch

from tnt_vision import kernels
from tnt_vision.bench import (
    ab_parser,
    cpu_name,
    medians_ms,
    model_ab_line,
    model_ab_times,
    never,
    operator_medians_ms,
    saved_bytes,
    set_threads,
    within,
)
from tnt_vision.kernels import emulated_bf16
from tnt_vision.models import create_model
from tnt_vision.models.layers import Attention, fused_attention


@contextlib.contextmanager
def explicit_path() -> Iterator[None]:
    with mock.patch.object(Attention, "explicit_bf16_applies", never):
        yield


def aten_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, -1)


@contextlib.contextmanager
def atens_softmax() -> Iterator[None]:
    with mock.patch.object(emulated_bf16, "softmax_rows", aten_softmax):
        yield


@contextlib.contextmanager
def kept_weights() -> Iterator[None]:
    with mock.patch.object(emulated_bf16, "RECOMPUTE_WEIGHTS", False):
        yield


VARIANTS = {
    "ours": None,
    "keeping the weights": kept_weights,
    "ATen's softmax": atens_softmax,
    "explicit path": explicit_path,
}


def forward_backward(attn: Attention, qkv: torch.Tensor, grad: torch.Tensor) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16):
            out = attn.mix(qkv)
        return torch.autograd.grad(out, qkv, grad)[0]

    return call


def operator(model: str, batch: int, rounds: int) -> None:
    cfg = create_model(model).cfg
    tokens = 1 + cfg.grid_size[0] * cfg.grid_size[1]
    attn = Attention(cfg.outer_dim, cfg.outer_heads).train()
    qkv = torch.randn(batch, tokens, 3 * cfg.outer_dim).bfloat16().requires_grad_()
    grad = torch.randn(batch, tokens, cfg.outer_dim).bfloat16()
    call = forward_backward(attn, qkv, grad)
    calls = {name: call if context is None else in_context(call, context) for name, context in VARIANTS.items()}
    results = [call() for call in calls.values()]
    for other in results[1:]:
        torch.testing.assert_close(results[0], other, atol=1e-2 * other.abs().max().item(), rtol=2**-7)
    ms = operator_medians_ms(calls, rounds)
    print(f"  outer attention {(batch, tokens, 3 * cfg.outer_dim)}, {cfg.outer_heads} heads, forward + backward:")
    print("    " + ", ".join(f"{name} {t:.2f} ms" for name, t in ms.items()))
    kept = {name: kept_mib(attn, qkv, context) for name, context in VARIANTS.items()}
    print("    kept for backward: " + ", ".join(f"{name} {mib:.1f} MiB" for name, mib in kept.items()))
    scores = (torch.randn(batch, cfg.outer_heads, tokens, tokens) * 3).bfloat16()
    softmaxes = {"kernel": lambda: kernels.softmax_rows(scores), "ATen": lambda: aten_softmax(scores)}
    torch.testing.assert_close(softmaxes["kernel"](), softmaxes["ATen"](), atol=1e-6, rtol=2**-7)
    ms = operator_medians_ms(softmaxes, rounds)
    print(f"  its softmax alone {tuple(scores.shape)}: kernel {ms['kernel']:.2f} ms, ATen {ms['ATen']:.2f} ms")


def kept_mib(attn: Attention, qkv: torch.Tensor, context: Callable[[], AbstractContextManager] | None) -> float:
    """MiB autograd keeps for backward from one forward of the outer attention (q/k/v's own storage excluded)."""

    def forward() -> torch.Tensor:
        with contextlib.nullcontext() if context is None else context(), torch.autocast("cpu", torch.bfloat16):
            return attn.mix(qkv)

    return saved_bytes(forward, ignore=[qkv])[1] / 2**20


def in_context(call: Callable[[], torch.Tensor], context: Callable[[], AbstractContextManager]) -> Callable[[], object]:
    """call inside a fresh context() at each call (`bench.within` for an argument-free call)."""
    return functools.partial(within(lambda _: call(), context), None)


def main() -> None:
    args = ab_parser(__doc__, rounds=8, train=False).parse_args()
    args.train = True
    threads = set_threads(args.threads)
    if not emulated_bf16.bf16_hardware():
        raise SystemExit("needs a CPU with bf16 products (AVX512-BF16 or AMX), where the function is taken")
    print(f"{threads} threads, {cpu_name()}, torch {torch.__version__}; medians, bf16, batch {args.batch}:")
    with fused_attention(True):
        operator(args.model, args.batch, max(args.rounds, 12))
    print(model_ab_line(args, medians_ms(model_ab_times(args, VARIANTS, dtype="bf16")), "bf16"))


if __name__ == "__main__":
    main()
