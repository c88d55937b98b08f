"""torch.compile gives wrong gradients when tensors saved for backward share a storage: a standalone reproduction
(torch alone) of what `tnt.compiled_training` works around, for a report upstream.

    python benchmarks/donated_buffer_repro.py

A layer keeps its input for backward and recomputes its norm there (as tnt-vision's lean layers do). One such layer
takes a whole tensor, others take slices of it (as TNT's sentence embedding takes the whole batch's words and the
blocks take each micro-batch group's). AOTAutograd saves the whole and the slices as separate tensors of one storage
and donates them all to the backward: `collect_fw_donated_buffer_idxs` compares a saved tensor's storage with the
forward's inputs and outputs and the backward's, not with the other saved tensors. Inductor then writes a slice's
recomputed norm over the slice (its last reader) while the whole is still to be read, and the gradients upstream are
wrong. With `torch._functorch.config.donated_buffer = False` they match eager's. Found on torch 2.14.1, CPU (Inductor's
C++ backend); the caches are off so that each compilation is made anew.
"""

from __future__ import annotations

from typing import Any

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config


@torch.library.custom_op("repro::norm", mutates_args=())
def norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm without affine parameters: output, mean, 1/std (an operator, as a compiled kernel would be)."""
    mean = x.mean(-1, keepdim=True)
    rstd = (x.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
    return (x - mean) * rstd, mean, rstd


@norm.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    stats = x.new_empty((*x.shape[:-1], 1))
    return torch.empty_like(x), stats, stats.clone()


@torch.library.custom_op("repro::norm_backward", mutates_args=())
def norm_backward(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    xhat = (x - mean) * rstd
    return rstd * (grad - grad.mean(-1, keepdim=True) - xhat * (grad * xhat).mean(-1, keepdim=True))


@norm_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class NormLinear(torch.autograd.Function):
    """linear(norm(x)) keeping x itself rather than the norm's output, which backward recomputes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out, mean, rstd = norm(x)
        ctx.save_for_backward(x, mean, rstd, weight)
        return out @ weight.t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, mean, rstd, weight = ctx.saved_tensors
        grad_x = norm_backward(grad @ weight, x, mean, rstd)
        normed = (x - mean) * rstd  # x's size, x's last reader: Inductor may write it over x
        return grad_x, grad.reshape(-1, grad.shape[-1]).t() @ normed.reshape(-1, x.shape[-1])


def model(a: torch.Tensor, m: torch.Tensor, pos: torch.Tensor, w_whole: torch.Tensor, w_part: torch.Tensor) -> Any:
    words = a @ m + pos  # (images * patches, words, width)
    whole = NormLinear.apply(words.reshape(4, 8, 16 * 24), w_whole)  # keeps a view of all of them
    parts = [NormLinear.apply(part, w_part) for part in words.split(16)]  # each keeps a slice
    return whole.square().mean() + sum(part.square().mean() for part in parts)


def gradients(fn: Any, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    fn(*leaves).backward()
    return [t.grad for t in leaves]


def main() -> None:
    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False
    torch.manual_seed(0)
    inputs = [
        torch.randn(32, 16, 24),
        torch.randn(24, 24),
        torch.randn(16, 24),
        torch.randn(64, 384),
        torch.randn(24, 24),
    ]
    eager = gradients(model, inputs)
    for donated in (True, False):
        functorch_config.donated_buffer = donated
        torch._dynamo.reset()
        compiled = gradients(torch.compile(model, fullgraph=True), inputs)
        errors = [((c - e).abs().max() / e.abs().max()).item() for c, e in zip(compiled, eager, strict=True)]
        verdict = "match eager's" if max(errors) < 1e-5 else "WRONG"
        print(
            f"torch {torch.__version__}, donated_buffer={donated}: gradients {verdict}; largest difference of each, "
            f"as a fraction of its largest value: {', '.join(f'{e:.1e}' for e in errors)}"
        )


if __name__ == "__main__":
    main()
