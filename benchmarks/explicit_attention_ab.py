"""bf16 training's outer attention by `explicit_attention_bf16` against the model's explicit path, in one process.

    PYTHONPATH=src python benchmarks/explicit_attention_ab.py --batch 32 --rounds 8

Under bf16 autocast on a CPU with bf16 products, training computes the outer attention by explicit products
(`scaled_dot_product_attention`'s backward is slower there). The model's explicit path copies q, k (transposed)
and v before its products and the gradients twice after them; `explicit_attention_bf16` copies each once, takes the
compiled softmax (`kernels.softmax_rows`), and recomputes the attention weights in backward rather than keep them
(`emulated_bf16.RECOMPUTE_WEIGHTS`). Five contenders: `explicit_attention_bf16`, the same keeping the weights, the
same with ATen's softmax, the explicit path, and `scaled_dot_product_attention` (as where bf16 is not multiplied in
hardware). First the outer attention alone (forward and backward) at the model's size for --batch, the results
checked against each other, with the bytes each keeps for backward (and its softmax alone, the kernel against
ATen's), then the whole training step (forward, backward, AdamW), alternating
(`bench.interleaved_times`: warm-up, order rotated each round). Medians with the batch, threads and machine.

With --infer, bf16 inference instead, where a CPU without AMX tiles takes `explicit_attention_bf16` and one with
them `scaled_dot_product_attention` (`layers.bf16_inference_without_amx`): the two (the machine's answer to
`emulated_bf16.amx_tiles` stepped aside either way), the outer attention's forward alone, then the whole model.

    PYTHONPATH=src python benchmarks/explicit_attention_ab.py --infer --rounds 8
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
    constant,
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
from tnt_vision.models import create_model, layers
from tnt_vision.models.layers import Attention, fused_attention


@contextlib.contextmanager
def sdpa() -> Iterator[None]:
    """Training's outer attention by `scaled_dot_product_attention`, as bf16 training without bf16 products."""
    with mock.patch.object(layers, "bf16_training_on_cpu", never):
        yield


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


def amx_says(answer: bool) -> AbstractContextManager[object]:
    """`emulated_bf16.amx_tiles` answering `answer`."""
    return mock.patch.object(emulated_bf16, "amx_tiles", constant(answer))


INFERENCE_VARIANTS = {
    "explicit products (no AMX)": functools.partial(amx_says, False),
    "SDPA (AMX)": functools.partial(amx_says, True),
}
VARIANTS = {
    "ours": None,
    "keeping the weights": kept_weights,
    "ATen's softmax": atens_softmax,
    "explicit path": explicit_path,
    "SDPA": sdpa,
}


def forward_backward(attn: Attention, qkv: torch.Tensor, grad: torch.Tensor) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16):
            out = attn.mix(qkv)
        return torch.autograd.grad(out, qkv, grad)[0]

    return call


def outer_attention(model: str, batch: int) -> tuple[Attention, torch.Tensor]:
    """The model's outer attention (its fresh weights) and a random bf16 q/k/v projection of `batch` images."""
    cfg = create_model(model).cfg
    tokens = 1 + cfg.grid_size[0] * cfg.grid_size[1]
    return Attention(cfg.outer_dim, cfg.outer_heads), torch.randn(batch, tokens, 3 * cfg.outer_dim).bfloat16()


def operator(model: str, batch: int, rounds: int) -> None:
    attn, qkv = outer_attention(model, batch)
    attn.train()
    qkv.requires_grad_()
    (batch, tokens, width), heads = qkv.shape, attn.num_heads
    grad = torch.randn(batch, tokens, width // 3).bfloat16()
    call = forward_backward(attn, qkv, grad)
    calls = {name: call if context is None else in_context(call, context) for name, context in VARIANTS.items()}
    results = [call() for call in calls.values()]
    for other in results[1:]:
        torch.testing.assert_close(results[0], other, atol=1e-2 * other.abs().max().item(), rtol=2**-7)
    ms = operator_medians_ms(calls, rounds)
    print(f"  outer attention {tuple(qkv.shape)}, {heads} heads, forward + backward:")
    print("    " + ", ".join(f"{name} {t:.2f} ms" for name, t in ms.items()))
    kept = {name: kept_mib(attn, qkv, context) for name, context in VARIANTS.items()}
    print("    kept for backward: " + ", ".join(f"{name} {mib:.1f} MiB" for name, mib in kept.items()))
    scores = (torch.randn(batch, heads, tokens, tokens) * 3).bfloat16()
    softmaxes = {"kernel": lambda: kernels.softmax_rows(scores), "ATen": lambda: aten_softmax(scores)}
    torch.testing.assert_close(softmaxes["kernel"](), softmaxes["ATen"](), atol=1e-6, rtol=2**-7)
    ms = operator_medians_ms(softmaxes, rounds)
    print(f"  its softmax alone {tuple(scores.shape)}: kernel {ms['kernel']:.2f} ms, ATen {ms['ATen']:.2f} ms")


def inference_operator(model: str, batch: int, rounds: int) -> None:
    attn, qkv = outer_attention(model, batch)
    attn.eval()

    def call() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
            return attn.mix(qkv)

    calls = {name: in_context(call, context) for name, context in INFERENCE_VARIANTS.items()}
    explicit, sdpa = (call() for call in calls.values())
    torch.testing.assert_close(explicit, sdpa, atol=1e-2 * sdpa.abs().max().item(), rtol=2**-7)
    ms = operator_medians_ms(calls, rounds)
    print(f"  outer attention {tuple(qkv.shape)}, {attn.num_heads} heads, forward (inference):")
    print("    " + ", ".join(f"{name} {t:.2f} ms" for name, t in ms.items()))


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
    parser = ab_parser(__doc__, rounds=8, train=False)
    parser.add_argument("--infer", action="store_true", help="bf16 inference: explicit products against SDPA")
    args = parser.parse_args()
    args.train = not args.infer
    threads = set_threads(args.threads)
    if not emulated_bf16.bf16_hardware():
        raise SystemExit("needs a CPU with bf16 products (AVX512-BF16 or AMX), where the function is taken")
    print(f"{threads} threads, {cpu_name()}, torch {torch.__version__}; medians, bf16, batch {args.batch}:")
    with fused_attention(True):
        (operator if args.train else inference_operator)(args.model, args.batch, max(args.rounds, 12))
    variants = VARIANTS if args.train else INFERENCE_VARIANTS
    print(model_ab_line(args, medians_ms(model_ab_times(args, variants, dtype="bf16")), "bf16"))


if __name__ == "__main__":
    main()
