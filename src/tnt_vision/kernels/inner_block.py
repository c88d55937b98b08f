"""TNT's inner transformer block as one Triton kernel (GPU inference).

The inner block works on sentences of m = 16 words of width c = 24 (TNT-S): every tensor of it is tiny, so on a
GPU the plain path is a chain of memory-bound launches (LayerNorm, q/k/v, attention, projection, LayerNorm, MLP,
residuals), each reading and writing the whole (B*N, m, c) activation. Here one program loads the words of a few
sentences once, keeps them in registers through the whole block, and writes the block's output: the weights
(about 7k numbers) come from the L2 cache.

Layout of one program: R = sentences x M_PAD rows (row r is word r % M_PAD of sentence r // M_PAD), C_PAD columns,
M_PAD >= 16 and every product a `tl.dot` (what GPU matrix units need). Each head is the product over all columns
with the other heads' columns zeroed, so no tensor is sliced. Attention comes in two layouts: all R rows against
all R with a same-sentence mask (R^2 scores per head, 2-D products), or each sentence against itself (M_PAD^2
scores, batched 3-D products). Which layout, how many rows per program and how many warps is left to Triton's
autotuner, per GPU and shape (`CONFIGS`). Products take exact fp32 operands for fp32 activations (the 1e-5 of
the plain path; TF32 where `torch.set_float32_matmul_precision` allows it) and bf16 or fp16 operands under
autocast or for 16-bit weights, as the plain path's products do.

Forward only, without dropout: training takes the plain path.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from . import switched_on

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with PyTorch's Linux wheels only
    triton = None

ENV_SWITCH = "TNT_VISION_GPU_KERNELS"  # "0": never use the kernel
MAX_WORDS = 64  # longest sentence served (TNT: 16 words)
MAX_WIDTH = 128  # widest inner transformer served (TNT-S: 24, TNT-B: 40)
# What the autotuner picks from on each GPU, per shape: (rows per program, batched attention, warps per program).
# Exact fp32 products run on the plain FP32 units and need many registers: only the smallest tiles pay there.
CONFIGS = ((64, False, 4), (128, False, 8), (64, True, 4), (128, True, 4), (128, True, 8), (256, True, 8))
EXACT_CONFIGS = ((32, False, 4), (32, True, 4))
PRECISIONS = ("ieee", "tf32", "bf16", "fp16")  # the products' operands: exact fp32, TF32, bf16, fp16 (`products`)
INTERPRETER_CONFIG = (64, True, 4)  # Triton's interpreter cannot time configurations


@torch.compiler.assume_constant_result  # torch.compile reads the answer once
@functools.cache
def triton_available() -> bool:
    return triton is not None and torch.cuda.is_available() and switched_on(ENV_SWITCH)


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as Triton itself does at import

if triton is not None:
    _EMULATE_BF16 = tl.constexpr(INTERPRETING)  # a jit function reads module globals only as constexpr

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """a @ b (2-D or batched 3-D) with fp32 accumulation, the operands taken as PRECISION says (see
        `products`). Triton's interpreter multiplies bf16 blocks wrongly (and truncates to bf16), so there the
        operands, rounded to bf16, are multiplied in fp32."""
        if PRECISION == "fp16":  # one branch per precision: Triton compiles the code after a constexpr `return`
            product = tl.dot(a.to(tl.float16), b.to(tl.float16))
        elif PRECISION == "bf16" and _EMULATE_BF16:
            product = tl.dot(_round_bf16(a), _round_bf16(b), input_precision="ieee")
        elif PRECISION == "bf16":
            product = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            product = tl.dot(a, b, input_precision=PRECISION)
        return product

    @triton.jit
    def _round_bf16(x):
        """fp32 rounded to the nearest bf16 (ties to even), as the GPU converts, kept in fp32."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _layer_norm(x, w_ptr, b_ptr, cols, WIDTH: tl.constexpr, eps):
        valid = cols < WIDTH
        mean = tl.sum(x, axis=1) / WIDTH
        diff = tl.where(valid[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / WIDTH + eps)
        w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        return diff * rstd[:, None] * w[None, :] + b[None, :]

    @triton.jit
    def _weight_t(w_ptr, in_idx, out_idx, IN: tl.constexpr, OUT: tl.constexpr, ROW0):
        """Tile (in, out) of W^T for an nn.Linear weight W of shape (*, IN), taking W's rows ROW0 + out_idx."""
        mask = (in_idx[:, None] < IN) & (out_idx[None, :] < OUT)
        return tl.load(w_ptr + (ROW0 + out_idx[None, :]) * IN + in_idx[:, None], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _bias(b_ptr, idx, OUT: tl.constexpr, ROW0):
        return tl.load(b_ptr + ROW0 + idx, mask=idx < OUT, other=0.0).to(tl.float32)

    @triton.jit
    def _softmax(scores, axis: tl.constexpr):
        p = tl.exp(scores - tl.expand_dims(tl.max(scores, axis=axis), axis))
        return p / tl.expand_dims(tl.sum(p, axis=axis), axis)

    @triton.jit
    def _attention_masked(
        q, k, v, rows, cols,
        WORDS: tl.constexpr, WIDTH: tl.constexpr, HEADS: tl.constexpr, M_PAD: tl.constexpr, ROWS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """All R rows against all R rows, scores across sentences masked out: R^2 scores per head, 2-D products."""
        HEAD_DIM: tl.constexpr = WIDTH // HEADS
        word = rows % M_PAD
        same = ((rows // M_PAD)[:, None] == (rows // M_PAD)[None, :]) & (word < WORDS)[None, :]
        attended = tl.zeros(q.shape, dtype=tl.float32)
        for head in tl.static_range(HEADS):
            in_head = ((cols // HEAD_DIM) == head) & (cols < WIDTH)
            scores = _dot(tl.where(in_head[None, :], q, 0.0), tl.trans(k), PRECISION)
            p = _softmax(tl.where(same, scores, -1.0e30), 1)
            attended += _dot(p, tl.where(in_head[None, :], v, 0.0), PRECISION)
        return attended

    @triton.jit
    def _attention_batched(
        q, k, v, cols,
        WORDS: tl.constexpr, WIDTH: tl.constexpr, HEADS: tl.constexpr, M_PAD: tl.constexpr, ROWS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Each sentence's M_PAD rows against its own: batched 3-D products, M_PAD^2 scores per sentence and head."""
        HEAD_DIM: tl.constexpr = WIDTH // HEADS
        C_PAD: tl.constexpr = q.shape[1]
        S: tl.constexpr = ROWS // M_PAD
        key_ok = tl.arange(0, M_PAD) < WORDS
        k3 = tl.permute(tl.reshape(k, (S, M_PAD, C_PAD)), (0, 2, 1))
        attended = tl.zeros((S, M_PAD, C_PAD), dtype=tl.float32)
        for head in tl.static_range(HEADS):
            in_head = ((cols // HEAD_DIM) == head) & (cols < WIDTH)
            qh = tl.reshape(tl.where(in_head[None, :], q, 0.0), (S, M_PAD, C_PAD))
            vh = tl.reshape(tl.where(in_head[None, :], v, 0.0), (S, M_PAD, C_PAD))
            p = _softmax(tl.where(key_ok[None, None, :], _dot(qh, k3, PRECISION), -1.0e30), 2)
            attended += _dot(p, vh, PRECISION)
        return tl.reshape(attended, (ROWS, C_PAD))

    @triton.jit
    def _inner_block_kernel(
        x_ptr, out_ptr, sentences, size_class,
        n1w, n1b, qkv_w, qkv_b, proj_w, proj_b, n2w, n2b, fc1_w, fc1_b, fc2_w, fc2_b,
        eps1, eps2, scale,
        WORDS: tl.constexpr, WIDTH: tl.constexpr, HEADS: tl.constexpr, HIDDEN: tl.constexpr,
        M_PAD: tl.constexpr, C_PAD: tl.constexpr, H_BLOCK: tl.constexpr, ROWS: tl.constexpr,
        HAS_QKV_BIAS: tl.constexpr, PRECISION: tl.constexpr, BATCHED: tl.constexpr,
    ):  # fmt: skip
        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, C_PAD)
        sentence = tl.program_id(0) * (ROWS // M_PAD) + rows // M_PAD
        word = rows % M_PAD
        row_ok = (word < WORDS) & (sentence < sentences)
        col_ok = cols < WIDTH
        offsets = (sentence * WORDS + word)[:, None] * WIDTH + cols[None, :]
        io_mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + offsets, mask=io_mask, other=0.0).to(tl.float32)

        # x + proj(attention(LN(x)))
        h = _layer_norm(x, n1w, n1b, cols, WIDTH, eps1)
        q = _dot(h, _weight_t(qkv_w, cols, cols, WIDTH, WIDTH, 0), PRECISION)
        k = _dot(h, _weight_t(qkv_w, cols, cols, WIDTH, WIDTH, WIDTH), PRECISION)
        v = _dot(h, _weight_t(qkv_w, cols, cols, WIDTH, WIDTH, 2 * WIDTH), PRECISION)
        if HAS_QKV_BIAS:
            q += _bias(qkv_b, cols, WIDTH, 0)[None, :]
            k += _bias(qkv_b, cols, WIDTH, WIDTH)[None, :]
            v += _bias(qkv_b, cols, WIDTH, 2 * WIDTH)[None, :]
        if BATCHED:
            attended = _attention_batched(q * scale, k, v, cols, WORDS, WIDTH, HEADS, M_PAD, ROWS, PRECISION)
        else:
            attended = _attention_masked(q * scale, k, v, rows, cols, WORDS, WIDTH, HEADS, M_PAD, ROWS, PRECISION)
        x += _dot(attended, _weight_t(proj_w, cols, cols, WIDTH, WIDTH, 0), PRECISION)
        x += _bias(proj_b, cols, WIDTH, 0)[None, :]

        # x + fc2(gelu(fc1(LN(x)))), the hidden layer in column blocks
        h = _layer_norm(x, n2w, n2b, cols, WIDTH, eps2)
        mlp = tl.zeros((ROWS, C_PAD), dtype=tl.float32)
        for start in range(0, HIDDEN, H_BLOCK):
            hidden = start + tl.arange(0, H_BLOCK)
            a = _dot(h, _weight_t(fc1_w, cols, hidden, WIDTH, HIDDEN, 0), PRECISION)
            a += _bias(fc1_b, hidden, HIDDEN, 0)[None, :]
            a = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
            w2 = tl.load(
                fc2_w + cols[None, :] * HIDDEN + hidden[:, None],
                mask=(hidden[:, None] < HIDDEN) & col_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            mlp += _dot(a, w2, PRECISION)
        x += mlp + _bias(fc2_b, cols, WIDTH, 0)[None, :]
        tl.store(out_ptr + offsets, x.to(out_ptr.dtype.element_ty), mask=io_mask)

    def _autotuned(configs: tuple[tuple[int, bool, int], ...]) -> Any:
        # size_class (the sentence count's bit length) is unused by the kernel: it keys a new tuning per batch scale
        return triton.autotune(
            [triton.Config({"ROWS": rows, "BATCHED": batched}, num_warps=warps) for rows, batched, warps in configs],
            key=["size_class", "WORDS", "WIDTH", "HEADS", "HIDDEN"],
        )(_inner_block_kernel)

    _TUNED = {precision: _autotuned(EXACT_CONFIGS if precision == "ieee" else CONFIGS) for precision in PRECISIONS}


def _pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, 1 << (n - 1).bit_length())


def inner_block_fits(words: int, width: int, heads: int) -> bool:
    return words <= MAX_WORDS and width <= MAX_WIDTH and width % heads == 0


def inner_block(
    block: Any, x: torch.Tensor, *, precision: str = "ieee", config: tuple[int, bool, int] | None = None
) -> torch.Tensor:
    """One `TransformerBlock` (pre-norm, GELU MLP, no SE) over (sentences, words, width), in one launch, unchecked.

    With `TRITON_INTERPRET=1` in the environment when this module is imported, Triton's interpreter runs it on
    CPU tensors (slowly; that is how the tests check it where no GPU is present). `precision` is one of
    `PRECISIONS` (what `products` chooses for an input in the model). `config` (rows per program,
    batched attention, warps) fixes what the autotuner would otherwise choose among `CONFIGS` on a GPU.
    """
    return _launch(x, *block_arguments(block), precision=precision, config=config)


def block_arguments(block: Any) -> tuple[list[torch.Tensor], torch.Tensor | None, int, list[float]]:
    """What the kernel takes of a `TransformerBlock`: weights, q/k/v bias, heads, LayerNorm epsilons."""
    attn, mlp = block.attn, block.mlp
    weights = [
        block.norm1.weight, block.norm1.bias, attn.qkv.weight, attn.proj.weight, attn.proj.bias,
        block.norm2.weight, block.norm2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
    ]  # fmt: skip
    return weights, attn.qkv.bias, attn.num_heads, [block.norm1.eps, block.norm2.eps]


def _launch(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    qkv_bias: torch.Tensor | None,
    heads: int,
    eps: list[float],
    *,
    precision: str,
    config: tuple[int, bool, int] | None = None,
) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("the fused inner block needs triton")
    sentences, words, width = x.shape
    if not inner_block_fits(words, width, heads):
        raise ValueError(f"the fused inner block serves at most {MAX_WORDS} words of width <= {MAX_WIDTH}")
    x = x.contiguous()
    out = torch.empty_like(x)
    m_pad = _pow2(words)  # a sentence's rows: at least 16, the smallest side of a matrix-unit product
    n1w, n1b, qkv_w, *rest = (w.detach().contiguous() for w in weights)
    qkv_b = qkv_w if qkv_bias is None else qkv_bias.detach().contiguous()  # unread when absent
    args = (x, out, sentences, sentences.bit_length(), n1w, n1b, qkv_w, qkv_b, *rest, *eps, (width // heads) ** -0.5)
    shape = {"WORDS": words, "WIDTH": width, "HEADS": heads, "HIDDEN": weights[7].shape[0]}
    shape |= {"M_PAD": m_pad, "C_PAD": _pow2(width), "H_BLOCK": 32, "HAS_QKV_BIAS": qkv_bias is not None}
    config = config or (None if x.is_cuda else INTERPRETER_CONFIG)
    if config is None:
        grid = lambda meta: (triton.cdiv(sentences, meta["ROWS"] // m_pad),)  # noqa: E731
        _TUNED[precision][grid](*args, **shape, PRECISION=precision)
    else:
        rows, batched, warps = config
        grid = (triton.cdiv(sentences, rows // m_pad),)
        _inner_block_kernel[grid](*args, **shape, PRECISION=precision, ROWS=rows, BATCHED=batched, num_warps=warps)
    return out


def tuned_config(precision: str) -> tuple[int, bool, int] | None:
    """The configuration the autotuner chose last for a precision (None before its first GPU call)."""
    best = getattr(_TUNED[precision], "best_config", None) if triton is not None else None
    return None if best is None else (best.kwargs["ROWS"], best.kwargs["BATCHED"], best.num_warps)


def inner_block_applies(x: torch.Tensor) -> bool:
    """A CUDA tensor where triton works, or a CPU tensor under Triton's interpreter (`TRITON_INTERPRET=1`)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.dim() != 3:
        return False
    if x.is_cuda:
        return triton_available()
    return x.device.type == "cpu" and triton is not None and INTERPRETING and switched_on(ENV_SWITCH)


def fused_block(block: Any, x: torch.Tensor) -> torch.Tensor:
    """The block by the checked kernel (`fused_inner_block`), its products as precise as the plain path's."""
    weights, qkv_bias, heads, eps = block_arguments(block)
    return fused_inner_block(x, weights, qkv_bias, heads, eps, products(x))


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


# Per (device, dtype, shape) configuration: True once the kernel matched the reference, False after a failure.
_CHECKED: dict[tuple[Any, ...], bool] = {}


# A registered operator, so that torch.compile keeps the kernel in its graph as one opaque call.
@torch.library.custom_op("tnt_vision::inner_block", mutates_args=())
def fused_inner_block(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    qkv_bias: torch.Tensor | None,
    heads: int,
    eps: list[float],
    precision: str,
) -> torch.Tensor:
    """The kernel, checked against `reference_block` on its first call for each configuration.

    A kernel that fails to compile or disagrees with the reference (say, on a GPU generation it was never run
    on) is switched off for that configuration with one warning, and the reference's result is used: never a
    wrong one.
    """
    key = (x.device, x.dtype, precision, tuple(x.shape[1:]), heads)
    if _CHECKED.get(key) is False:
        return reference_block(x, weights, qkv_bias, heads, eps)
    try:
        out = _launch(x, weights, qkv_bias, heads, eps, precision=precision)
    except Exception as error:  # a triton/driver combination the kernel cannot compile for
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        return _give_up(key, reason, reference_block(x, weights, qkv_bias, heads, eps))
    if key in _CHECKED:
        return out
    reference = reference_block(x, weights, qkv_bias, heads, eps)
    error = (out.float() - reference.float()).abs().max().item()
    tolerance = (1e-4 if precision == "ieee" else 5e-2) * max(1.0, reference.float().abs().max().item())
    if not error <= tolerance:
        return _give_up(key, f"differs from the plain path by {error:.3g}", reference)
    _CHECKED[key] = True
    return out


@fused_inner_block.register_fake
def _(x: torch.Tensor, *args: Any) -> torch.Tensor:
    return torch.empty_like(x)


def reference_block(
    x: torch.Tensor, weights: list[torch.Tensor], qkv_bias: torch.Tensor | None, heads: int, eps: list[float]
) -> torch.Tensor:
    """What the kernel computes, in plain operators: x + proj(attention(LN(x))), then x + fc2(gelu(fc1(LN(x)))).

    The attention is explicit products, the fast form for sequences this short on a GPU (`layers.short_on_gpu`):
    this is also the path of every call once the kernel is switched off for a configuration."""
    n1w, n1b, qkv_w, proj_w, proj_b, n2w, n2b, fc1_w, fc1_b, fc2_w, fc2_b = weights
    width = (x.shape[-1],)
    qkv = F.linear(F.layer_norm(x, width, n1w, n1b, eps[0]), qkv_w, qkv_bias)
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    attended = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    x = x + F.linear(attended.transpose(1, 2).flatten(2), proj_w, proj_b)
    return x + F.linear(F.gelu(F.linear(F.layer_norm(x, width, n2w, n2b, eps[1]), fc1_w, fc1_b)), fc2_w, fc2_b)


def _give_up(key: tuple[Any, ...], reason: str, fallback: torch.Tensor) -> torch.Tensor:
    _CHECKED[key] = False
    warnings.warn(f"tnt_vision: fused inner-block kernel off ({reason}); using the plain path", RuntimeWarning, 3)
    return fallback
