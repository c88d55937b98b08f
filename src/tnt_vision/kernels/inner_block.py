"""TNT's inner transformer block as one Triton kernel each way (GPU inference and training).

The inner block works on sentences of m = 16 words of width c = 24 (TNT-S): every tensor of it is tiny, so on a
GPU the plain path is a chain of memory-bound launches (LayerNorm, q/k/v, attention, projection, LayerNorm, MLP,
residuals), each reading and writing the whole (B*N, m, c) activation, and keeping most of them for backward.
Here (`triton_block`) one program loads the words of a few sentences once, keeps them in registers through the
whole block, and writes the block's output; the backward reads the words and the output's gradient, recomputes
the block, and writes the words' gradient and its share of the weights'. Only the block's input is kept for
backward. Which attention layout, how many rows per program and how many warps is left to Triton's autotuner, per
GPU and shape (`CONFIGS`, `BACKWARD_CONFIGS`). Products take exact fp32 operands for fp32 activations (the 1e-5
of the plain path; TF32 where `torch.set_float32_matmul_precision` allows it) and bf16 or fp16 operands under
autocast or for 16-bit weights, as the plain path's products do.

Drop-path comes in as per-sentence branch scales; dropout inside the block is not served (the plain path runs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import asked_once, grad_recorded, switched_on
from .first_use import checked, take
from .triton_block import (
    BACKWARD,
    CONFIGS,
    EXACT_CONFIGS,
    FORWARD,
    INTERPRETING,
    PRECISIONS,
    backward_kernel,
    forward_kernel,
    gradient_sizes,
    triton,
)

ENV_SWITCH = "TNT_VISION_GPU_KERNELS"  # "0": never use the kernels
MAX_WORDS = 64  # longest sentence served (TNT: 16 words)
MAX_WIDTH = 128  # widest inner transformer served (TNT-S: 24, TNT-B: 40)
INTERPRETER_CONFIG = (64, True, 4)  # Triton's interpreter cannot time configurations
INTERPRETER_BACKWARD_CONFIG = (32, 4)
CHECK_SENTENCES = 255  # what a kernel's first-use check runs on (a last program part-filled)
SLOTS = 64  # the backward's programs add their weight gradients into this many copies (less contention)
__all__ = ["CONFIGS", "EXACT_CONFIGS", "PRECISIONS"]


@asked_once
def triton_available() -> bool:
    return triton is not None and torch.cuda.is_available() and switched_on(ENV_SWITCH)


def _pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, 1 << (n - 1).bit_length())


def inner_block_fits(words: int, width: int, heads: int) -> bool:
    return words <= MAX_WORDS and width <= MAX_WIDTH and width % heads == 0


def inner_block(
    block: Any,
    x: torch.Tensor,
    *,
    precision: str = "ieee",
    config: tuple[int, bool, int] | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """One `TransformerBlock` (pre-norm, GELU MLP, no SE) over (sentences, words, width), in one launch, unchecked.

    With `TRITON_INTERPRET=1` in the environment when this module is imported, Triton's interpreter runs it on
    CPU tensors (slowly; that is how the tests check it where no GPU is present). `precision` is one of
    `PRECISIONS` (what `products` chooses for an input in the model). `config` (rows per program,
    batched attention, warps) fixes what the autotuner would otherwise choose among `CONFIGS` on a GPU.
    `scales` (sentences, 2), if given, multiply the attention's and the MLP's branch per sentence (drop-path).
    """
    return _launch(x, *block_arguments(block), precision=precision, config=config, scales=scales)


def inner_block_backward(
    block: Any,
    x: torch.Tensor,
    grad: torch.Tensor,
    *,
    precision: str = "ieee",
    config: tuple[int, int] | None = None,
    scales: torch.Tensor | None = None,
    slots: int = SLOTS,
) -> list[torch.Tensor]:
    """The gradients of `inner_block` for its output's gradient `grad`, in one launch, unchecked: x's, then the
    weights' in `block_arguments`' order, then the q/k/v bias's (zeros without one). `config` is (rows per program,
    warps), one of `BACKWARD_CONFIGS`; `slots`, how many copies of the weight gradients the programs add into."""
    arguments = block_arguments(block)
    return _launch_backward(grad, x, *arguments, precision=precision, config=config, scales=scales, slots=slots)


def block_arguments(block: Any) -> tuple[list[torch.Tensor], torch.Tensor | None, int, list[float]]:
    """What the kernel takes of a `TransformerBlock`: weights, q/k/v bias, heads, LayerNorm epsilons.

    Asked on every call of the kernels (CPU and GPU): read from the modules' own dicts, where each attribute read
    through `nn.Module.__getattr__` cost about a microsecond (24 us the 28 reads); a parameter computed on access
    (`torch.nn.utils.parametrize`) is not in them, and is then read as an attribute."""
    try:
        return _registered_arguments(block)
    except KeyError:
        pass
    attn, mlp = block.attn, block.mlp
    weights = [
        block.norm1.weight, block.norm1.bias, attn.qkv.weight, attn.proj.weight, attn.proj.bias,
        block.norm2.weight, block.norm2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
    ]  # fmt: skip
    return weights, attn.qkv.bias, attn.num_heads, [block.norm1.eps, block.norm2.eps]


def _registered_arguments(block: Any) -> tuple[list[torch.Tensor], torch.Tensor | None, int, list[float]]:
    """`block_arguments` from the parameters registered in each module's `_parameters` (KeyError where one is not)."""
    parts = block._modules
    attn, mlp = parts["attn"], parts["mlp"]._modules
    norm1, qkv, proj = parts["norm1"]._parameters, attn._modules["qkv"]._parameters, attn._modules["proj"]._parameters
    norm2, fc1, fc2 = parts["norm2"]._parameters, mlp["fc1"]._parameters, mlp["fc2"]._parameters
    weights = [
        norm1["weight"], norm1["bias"], qkv["weight"], proj["weight"], proj["bias"],
        norm2["weight"], norm2["bias"], fc1["weight"], fc1["bias"], fc2["weight"], fc2["bias"],
    ]  # fmt: skip
    return weights, qkv["bias"], attn.num_heads, [parts["norm1"].eps, parts["norm2"].eps]


def _kernel_inputs(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    qkv_bias: torch.Tensor | None,
    heads: int,
    eps: list[float],
    scales: torch.Tensor | None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Both kernels' arguments after their tensors (weights, epsilons, attention scale), and their constants."""
    if triton is None:
        raise RuntimeError("the fused inner block needs triton")
    sentences, words, width = x.shape
    if not inner_block_fits(words, width, heads):
        raise ValueError(f"the fused inner block serves at most {MAX_WORDS} words of width <= {MAX_WIDTH}")
    if scales is not None and scales.shape != (sentences, 2):
        raise ValueError(f"branch scales must have shape ({sentences}, 2), not {tuple(scales.shape)}")
    n1w, n1b, qkv_w, *rest = (w.detach().contiguous() for w in weights)
    qkv_b = qkv_w if qkv_bias is None else qkv_bias.detach().contiguous()  # unread when absent
    constants = {
        "WORDS": words, "WIDTH": width, "HEADS": heads, "HIDDEN": weights[7].shape[0], "M_PAD": _pow2(words),
        "C_PAD": _pow2(width), "H_BLOCK": 32, "HAS_QKV_BIAS": qkv_bias is not None, "HAS_SCALES": scales is not None,
    }  # fmt: skip
    return (n1w, n1b, qkv_w, qkv_b, *rest, *eps, (width // heads) ** -0.5), constants


def _run(
    kernel: str,
    args: tuple[Any, ...],
    sentences: int,
    constants: dict[str, Any],
    precision: str,
    config: tuple[Any, ...] | None,
) -> None:
    """Launch the forward or backward kernel over every sentence: the autotuner's choice, or `config` (rows
    per program, [batched attention,] warps), which the interpreter always needs."""
    grid = lambda meta: (triton.cdiv(sentences, meta["ROWS"] // constants["M_PAD"]),)  # noqa: E731
    if config is None:
        (FORWARD if kernel == "forward" else BACKWARD)[precision][grid](*args, **constants, PRECISION=precision)
        return
    *choices, warps = config
    fixed = dict(zip(("ROWS", "BATCHED"), choices, strict=False))
    fixed["ROWS"] = max(fixed["ROWS"], constants["M_PAD"])  # at least one sentence per program
    jit = forward_kernel if kernel == "forward" else backward_kernel
    jit[grid(fixed)](*args, **constants, **fixed, PRECISION=precision, num_warps=warps)


def _launch(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    qkv_bias: torch.Tensor | None,
    heads: int,
    eps: list[float],
    *,
    precision: str,
    config: tuple[int, bool, int] | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    tail, constants = _kernel_inputs(x, weights, qkv_bias, heads, eps, scales)
    x = x.contiguous()
    out = torch.empty_like(x)
    sentences = x.shape[0]
    args = (x, out, x if scales is None else scales.contiguous(), sentences, sentences.bit_length(), *tail)
    _run("forward", args, sentences, constants, precision, config or (None if x.is_cuda else INTERPRETER_CONFIG))
    return out


def _launch_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    qkv_bias: torch.Tensor | None,
    heads: int,
    eps: list[float],
    *,
    precision: str,
    config: tuple[int, int] | None = None,
    scales: torch.Tensor | None = None,
    slots: int = SLOTS,
) -> list[torch.Tensor]:
    tail, constants = _kernel_inputs(x, weights, qkv_bias, heads, eps, scales)
    x, grad = x.contiguous(), grad.contiguous()
    dx = torch.empty_like(x)
    sizes = gradient_sizes(constants["WIDTH"], constants["HIDDEN"])
    sums = torch.zeros(slots, sum(sizes), device=x.device, dtype=torch.float32)
    sentences = x.shape[0]
    args = (x, grad, dx, x if scales is None else scales.contiguous(), sums, sentences, sentences.bit_length())
    config = config or (None if x.is_cuda else INTERPRETER_BACKWARD_CONFIG)
    _run("backward", (*args, slots, *tail), sentences, constants, precision, config)
    *totals, qkv_total = sums.sum(0).split(sizes)  # copies below: an operator's outputs may not alias
    bias_dtype = weights[2].dtype if qkv_bias is None else qkv_bias.dtype
    grads = [t.view_as(w).to(w.dtype, copy=True) for t, w in zip(totals, weights, strict=True)]
    return [dx, *grads, qkv_total.to(bias_dtype, copy=True)]


def tuned_config(precision: str, kernels: dict[str, Any] | None = None) -> tuple[Any, ...] | None:
    """The configuration the autotuner chose last for a precision (None before its first GPU call): (rows,
    batched, warps) for the forward, (rows, warps) for `kernels=BACKWARD`."""
    best = getattr((kernels or FORWARD).get(precision), "best_config", None)
    if best is None:
        return None
    return (*(best.kwargs[k] for k in ("ROWS", "BATCHED") if k in best.kwargs), best.num_warps)


def inner_block_applies(x: torch.Tensor) -> bool:
    """A CUDA tensor where triton works, or a CPU tensor under Triton's interpreter (`TRITON_INTERPRET=1`)."""
    if not (x.is_cuda or INTERPRETING):  # the cheap test first: asked of every norm and block, on the CPU too
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.dim() != 3:
        return False
    if x.is_cuda:
        return triton_available()
    return x.device.type == "cpu" and triton is not None and switched_on(ENV_SWITCH)


def fused_block(block: Any, x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The block by the checked kernels (`fused_inner_block`, differentiable), its products as precise as the plain
    path's; `scales` (sentences, 2) multiply the two branches per sentence (drop-path's mask).

    Where nothing needs the registered operator (no gradient recorded, no graph captured, a plain tensor) the
    checked forward is called directly: the operator's dispatch cost about as much host time as the rest of the
    call (12 of 24 us on a 2-core Xeon), and a GPU forward of TNT waits on its host."""
    arguments = (*block_arguments(block), products(x), scales)
    weights, qkv_bias = arguments[:2]
    recorded = grad_recorded(t for t in (x, *weights, qkv_bias) if t is not None)
    registered = recorded or type(x) is not torch.Tensor or torch.compiler.is_compiling()
    return (fused_inner_block if registered else _checked_forward)(x, *arguments)


def products(x: torch.Tensor) -> str:
    """The operands the plain path's products would take for x: autocast's dtype under autocast, x's for 16-bit x,
    else exact fp32, or TF32 where the user allows it (`torch.set_float32_matmul_precision("high")`)."""
    if torch.is_autocast_enabled(x.device.type):
        low = torch.get_autocast_dtype(x.device.type)
    elif x.dtype != torch.float32:
        low = x.dtype
    else:
        return "ieee" if float32_matmul_precision() == "highest" else "tf32"
    return "fp16" if low == torch.float16 else "bf16"


@torch.compiler.assume_constant_result  # torch.compile cannot trace the call; it reads the setting once
def float32_matmul_precision() -> str:
    return torch.get_float32_matmul_precision()


# Per (direction, device, dtype, shape) configuration: True once the kernel matched the reference, False after a
# failure (`first_use.checked`).
_CHECKED: dict[tuple[Any, ...], bool] = {}
WHAT = "fused inner-block kernel"


def _checked_forward(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    qkv_bias: torch.Tensor | None,
    heads: int,
    eps: list[float],
    precision: str,
    scales: torch.Tensor | None,
) -> torch.Tensor:
    """The forward kernel, checked against `reference_block` on its first call for each configuration.

    A kernel that fails to compile or disagrees with the reference (say, on a GPU generation it was never run
    on) is switched off for that configuration with one warning, and the reference's result is used: never a
    wrong one.
    """
    return checked(
        _CHECKED,
        _key("forward", x, heads, precision, scales),
        lambda s: _launch(take(x, s), weights, qkv_bias, heads, eps, precision=precision, scales=take(scales, s)),
        lambda s: reference_block(take(x, s), weights, qkv_bias, heads, eps, scales=take(scales, s)),
        x.shape[0],
        CHECK_SENTENCES,
        _tolerance(precision),
        WHAT,
    )


# Registered operators, so that torch.compile keeps the kernels in its graphs as opaque calls; the forward's is
# `_checked_forward` itself, which eager inference calls directly (`fused_block`).
fused_inner_block = torch.library.custom_op("tnt_vision::inner_block", _checked_forward, mutates_args=())


@fused_inner_block.register_fake
def _(x: torch.Tensor, *args: Any) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("tnt_vision::inner_block_backward", mutates_args=())
def fused_inner_block_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    qkv_bias: torch.Tensor | None,
    heads: int,
    eps: list[float],
    precision: str,
    scales: torch.Tensor | None,
) -> list[torch.Tensor]:
    """The backward kernel, checked against `reference_backward` as the forward is against `reference_block`."""

    args = (weights, qkv_bias, heads, eps)
    return checked(
        _CHECKED,
        _key("backward", x, heads, precision, scales),
        lambda s: _launch_backward(take(grad, s), take(x, s), *args, precision=precision, scales=take(scales, s)),
        lambda s: reference_backward(take(grad, s), take(x, s), *args, scales=take(scales, s)),
        x.shape[0],
        CHECK_SENTENCES,
        _tolerance(precision),
        WHAT,
    )


@fused_inner_block_backward.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor], qkv_bias: torch.Tensor | None, *args: Any
      ) -> list[torch.Tensor]:  # fmt: skip
    bias = x.new_empty(3 * x.shape[-1], dtype=(weights[2] if qkv_bias is None else qkv_bias).dtype)
    return [torch.empty_like(x), *(torch.empty_like(w) for w in weights), bias]


def _save_input(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weights, qkv_bias, heads, eps, precision, scales = inputs
    ctx.save_for_backward(x, qkv_bias, scales, *weights)  # the block's input only: the rest is recomputed
    ctx.heads, ctx.eps, ctx.precision = heads, eps, precision


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    x, qkv_bias, scales, *weights = ctx.saved_tensors
    dx, *d_weights, d_qkv_bias = fused_inner_block_backward(
        grad, x, weights, qkv_bias, ctx.heads, ctx.eps, ctx.precision, scales
    )
    return dx, d_weights, None if qkv_bias is None else d_qkv_bias, None, None, None, None


fused_inner_block.register_autograd(_backward, setup_context=_save_input)


def _key(kernel: str, x: torch.Tensor, heads: int, precision: str, scales: torch.Tensor | None) -> tuple[Any, ...]:
    """What a kernel is checked once for: direction, device, dtype, precision, shape, branch scales or none."""
    return (kernel, x.device, x.dtype, precision, tuple(x.shape[1:]), heads, scales is not None)


def _tolerance(precision: str) -> float:
    """How far the kernel may stray from the reference, relative to a result's largest value."""
    return 1e-4 if precision == "ieee" else 5e-2


def reference_block(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    qkv_bias: torch.Tensor | None,
    heads: int,
    eps: list[float],
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the kernel computes, in plain operators: x + proj(attention(LN(x))), then x + fc2(gelu(fc1(LN(x)))),
    each branch times its column of `scales` per sentence where given.

    The attention is explicit products, the fast form for sequences this short on a GPU (`layers.short_on_gpu`):
    this is also the path of every call once the kernel is switched off for a configuration."""
    n1w, n1b, qkv_w, proj_w, proj_b, n2w, n2b, fc1_w, fc1_b, fc2_w, fc2_b = weights
    keep_attn, keep_mlp = _keep(scales)
    width = (x.shape[-1],)
    qkv = F.linear(F.layer_norm(x, width, n1w, n1b, eps[0]), qkv_w, qkv_bias)
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    attended = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    x = x + keep_attn * F.linear(attended.transpose(1, 2).flatten(2), proj_w, proj_b)
    mlp = F.linear(F.gelu(F.linear(F.layer_norm(x, width, n2w, n2b, eps[1]), fc1_w, fc1_b)), fc2_w, fc2_b)
    return x + keep_mlp * mlp


def _keep(scales: torch.Tensor | None) -> tuple[Any, Any]:
    if scales is None:
        return 1.0, 1.0
    return scales[:, 0, None, None], scales[:, 1, None, None]


def reference_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    qkv_bias: torch.Tensor | None,
    heads: int,
    eps: list[float],
    scales: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """What the backward kernel computes, by hand in plain operators (at least fp32): the gradients of
    `reference_block` for its output's gradient, as `inner_block_backward` orders them."""
    work = torch.promote_types(x.dtype, torch.float32)
    grad, x, scales = (None if t is None else t.to(work) for t in (grad, x, scales))
    n1w, n1b, qkv_w, proj_w, proj_b, n2w, n2b, fc1_w, fc1_b, fc2_w, _ = (w.to(work) for w in weights)
    bias = None if qkv_bias is None else qkv_bias.to(work)
    keep_attn, keep_mlp = _keep(scales)
    # the forward, keeping its intermediates
    x_hat1, rstd1 = _normalized(x, eps[0])
    h1 = x_hat1 * n1w + n1b
    q, k, v = F.linear(h1, qkv_w, bias).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)  # (S, heads, M, d)
    scale = q.shape[-1] ** -0.5
    p = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    attended = (p @ v).transpose(1, 2).flatten(2)
    x_hat2, rstd2 = _normalized(x + keep_attn * F.linear(attended, proj_w, proj_b), eps[1])
    h2 = x_hat2 * n2w + n2b
    a = F.linear(h2, fc1_w, fc1_b)
    cdf = 0.5 * (1.0 + torch.erf(a * 0.5**0.5))
    # the MLP branch back
    d_mlp = grad * keep_mlp
    d_a = (d_mlp @ fc2_w) * (cdf + a * torch.exp(-0.5 * a * a) * (2 * torch.pi) ** -0.5)
    d_x1, d_n2w, d_n2b = _layer_norm_backward(d_a @ fc1_w, x_hat2, rstd2, n2w)
    d_x1 = d_x1 + grad
    # the attention branch back
    d_branch = d_x1 * keep_attn
    d_out = (d_branch @ proj_w).unflatten(-1, (heads, -1)).transpose(1, 2)  # (S, heads, M, d)
    d_p = d_out @ v.transpose(-2, -1)
    d_s = p * (d_p - (d_p * p).sum(-1, keepdim=True))
    d_qkv = torch.stack([d_s @ k * scale, d_s.transpose(-2, -1) @ (q * scale), p.transpose(-2, -1) @ d_out])
    d_qkv = d_qkv.permute(1, 3, 0, 2, 4).flatten(2)  # (S, M, 3 * width)
    d_x, d_n1w, d_n1b = _layer_norm_backward(d_qkv @ qkv_w, x_hat1, rstd1, n1w)
    grads = [d_x + d_x1, d_n1w, d_n1b, _outer(d_qkv, h1), _outer(d_branch, attended), _rows(d_branch), d_n2w, d_n2b]
    d_bias = d_qkv.new_zeros(d_qkv.shape[-1]) if qkv_bias is None else _rows(d_qkv)  # none: zeros, as the kernel
    grads += [_outer(d_a, h2), _rows(d_a), _outer(d_mlp, a * cdf), _rows(d_mlp), d_bias]
    like = [x, *weights, weights[2] if qkv_bias is None else qkv_bias]
    return [g.to(t.dtype) for g, t in zip(grads, like, strict=True)]


def _normalized(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    rstd = (var + eps).rsqrt()
    return (x - mean) * rstd, rstd


def _layer_norm_backward(
    d_out: torch.Tensor, x_hat: torch.Tensor, rstd: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm's input gradient, and its weight's and bias's, from its output's gradient."""
    d_hat = d_out * w
    d_x = rstd * (d_hat - d_hat.mean(-1, keepdim=True) - x_hat * (d_hat * x_hat).mean(-1, keepdim=True))
    return d_x, _rows(d_out * x_hat), _rows(d_out)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Sum over every row (a bias's gradient)."""
    return t.flatten(0, -2).sum(0)


def _outer(d_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight gradient: sum over rows of d_out^T inputs."""
    return d_out.flatten(0, -2).T @ inputs.flatten(0, -2)
