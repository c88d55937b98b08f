"""bf16 training's outer attention by `explicit_attention_bf16` against the model's explicit path, in one process.

    PYTHONPATH=src python benchmarks/explicit_attention_ab.py --batch 32 --rounds 8

Under bf16 autocast on a CPU with bf16 products, training computes the outer attention by explicit products
(`scaled_dot_product_attention`'s backward is slower there). The model's explicit path copies q, k (transposed)
and v before its products and the gradients twice after them; `explicit_attention_bf16` copies each once. First
the outer attention alone (forward and backward) at the model's size for --batch, both results checked against
each other, then the whole training step (forward, backward, AdamW) with one or the other, alternating
(`bench.interleaved_times`: warm-up, order rotated each round). Medians with the batch, threads and machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from unittest import mock

import torch

from tnt_vision.bench import ab_parser, cpu_name, medians_ms, model_ab_times, never, operator_medians_ms, set_threads
from tnt_vision.kernels import emulated_bf16
from tnt_vision.models import create_model
from tnt_vision.models.layers import Attention, fused_attention


@contextlib.contextmanager
def explicit_path() -> Iterator[None]:
    with mock.patch.object(Attention, "explicit_bf16_applies", never):
        yield


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
    ours = forward_backward(attn, qkv, grad)

    def explicit() -> torch.Tensor:
        with explicit_path():
            return ours()

    torch.testing.assert_close(ours(), explicit(), atol=1e-2, rtol=2**-7)
    ms = operator_medians_ms({"ours": ours, "explicit": explicit}, rounds)
    shape = (batch, tokens, 3 * cfg.outer_dim)
    print(
        f"  outer attention {shape}, {cfg.outer_heads} heads, forward + backward: explicit_attention_bf16 "
        f"{ms['ours']:.2f} ms, the explicit path {ms['explicit']:.2f} ms ({ms['explicit'] / ms['ours']:.2f}x)"
    )


def main() -> None:
    args = ab_parser(__doc__, rounds=8, train=False).parse_args()
    args.train = True
    threads = set_threads(args.threads)
    if not emulated_bf16.bf16_hardware():
        raise SystemExit("needs a CPU with bf16 products (AVX512-BF16 or AMX), where the function is taken")
    print(f"{threads} threads, {cpu_name()}, torch {torch.__version__}; medians, bf16, batch {args.batch}:")
    with fused_attention(True):
        operator(args.model, args.batch, max(args.rounds, 12))
    ms = medians_ms(model_ab_times(args, {"ours": None, "explicit": explicit_path}, dtype="bf16"))
    print(
        f"{args.model} training step: explicit_attention_bf16 {ms['ours']:.0f} ms, the explicit path "
        f"{ms['explicit']:.0f} ms ({ms['explicit'] / ms['ours']:.3f}x)"
    )


if __name__ == "__main__":
    main()
