"""TNT's inner transformer block as one Triton kernel (GPU inference).

The inner block works on sentences of m = 16 words of width c = 24 (TNT-S): every tensor of it is tiny, so on a
GPU the plain path is a chain of memory-bound launches (LayerNorm, q/k/v, attention, projection, LayerNorm, MLP,
residuals), each reading and writing the whole (B*N, m, c) activation. Here one program loads the words of a few
sentences once, keeps them in registers through the whole block, and writes the block's output: the weights
(about 7k numbers) come from the L2 cache.

Layout of one program: R = sentences x M_PAD rows (row r is word r % M_PAD of sentence r // M_PAD), C_PAD columns.
Attention of all R rows at once with a same-sentence mask costs R^2 scores instead of m^2 per sentence, which
keeps every product a `tl.dot` of at least 16x16 (what GPU matrix units need). Each head is the product over all
columns with the other heads' columns zeroed, so no tensor is sliced.

Forward only, without dropout: training takes the plain path.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import switched_on

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with PyTorch's Linux wheels only
    triton = None

ENV_SWITCH = "TNT_VISION_GPU_KERNELS"  # "0": never use the kernel
ROWS = 64  # rows (words) per program
MAX_WIDTH = 128  # widest inner transformer served (TNT-S: 24, TNT-B: 40)


@functools.cache
def triton_available() -> bool:
    return triton is not None and torch.cuda.is_available() and switched_on(ENV_SWITCH)


if triton is not None:

    @triton.jit
    def _dot(a, b, EXACT: tl.constexpr):
        """a @ b of fp32 blocks: exact products for fp32 activations, TF32 (finer than bf16) for 16-bit ones."""
        if EXACT:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b, input_precision="tf32")

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
    def _inner_block_kernel(
        x_ptr, out_ptr, sentences,
        n1w, n1b, qkv_w, qkv_b, proj_w, proj_b, n2w, n2b, fc1_w, fc1_b, fc2_w, fc2_b,
        eps1, eps2, scale,
        WORDS: tl.constexpr, WIDTH: tl.constexpr, HEADS: tl.constexpr, HIDDEN: tl.constexpr,
        M_PAD: tl.constexpr, C_PAD: tl.constexpr, H_BLOCK: tl.constexpr, ROWS: tl.constexpr,
        HAS_QKV_BIAS: tl.constexpr, EXACT: tl.constexpr,
    ):  # fmt: skip
        HEAD_DIM: tl.constexpr = WIDTH // HEADS
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
        q = _dot(h, _weight_t(qkv_w, cols, cols, WIDTH, WIDTH, 0), EXACT)
        k = _dot(h, _weight_t(qkv_w, cols, cols, WIDTH, WIDTH, WIDTH), EXACT)
        v = _dot(h, _weight_t(qkv_w, cols, cols, WIDTH, WIDTH, 2 * WIDTH), EXACT)
        if HAS_QKV_BIAS:
            q += _bias(qkv_b, cols, WIDTH, 0)[None, :]
            k += _bias(qkv_b, cols, WIDTH, WIDTH)[None, :]
            v += _bias(qkv_b, cols, WIDTH, 2 * WIDTH)[None, :]
        same = ((rows // M_PAD)[:, None] == (rows // M_PAD)[None, :]) & (word < WORDS)[None, :]
        attended = tl.zeros((ROWS, C_PAD), dtype=tl.float32)
        for head in tl.static_range(HEADS):
            in_head = (cols // HEAD_DIM == head) & col_ok
            scores = _dot(tl.where(in_head[None, :], q * scale, 0.0), tl.trans(k), EXACT)
            scores = tl.where(same, scores, -1.0e30)
            p = tl.exp(scores - tl.max(scores, axis=1)[:, None])
            p = p / tl.sum(p, axis=1)[:, None]
            attended += _dot(p, tl.where(in_head[None, :], v, 0.0), EXACT)
        x += _dot(attended, _weight_t(proj_w, cols, cols, WIDTH, WIDTH, 0), EXACT)
        x += _bias(proj_b, cols, WIDTH, 0)[None, :]

        # x + fc2(gelu(fc1(LN(x)))), the hidden layer in column blocks
        h = _layer_norm(x, n2w, n2b, cols, WIDTH, eps2)
        mlp = tl.zeros((ROWS, C_PAD), dtype=tl.float32)
        for start in range(0, HIDDEN, H_BLOCK):
            hidden = start + tl.arange(0, H_BLOCK)
            a = _dot(h, _weight_t(fc1_w, cols, hidden, WIDTH, HIDDEN, 0), EXACT)
            a += _bias(fc1_b, hidden, HIDDEN, 0)[None, :]
            a = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
            w2 = tl.load(
                fc2_w + cols[None, :] * HIDDEN + hidden[:, None],
                mask=(hidden[:, None] < HIDDEN) & col_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            mlp += _dot(a, w2, EXACT)
        x += mlp + _bias(fc2_b, cols, WIDTH, 0)[None, :]
        tl.store(out_ptr + offsets, x.to(out_ptr.dtype.element_ty), mask=io_mask)


def _pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, 1 << (n - 1).bit_length())


def inner_block_fits(words: int, width: int, heads: int) -> bool:
    return words <= ROWS and width <= MAX_WIDTH and width % heads == 0


def inner_block(block: Any, x: torch.Tensor, *, exact: bool = True) -> torch.Tensor:
    """One `TransformerBlock` (pre-norm, GELU MLP, no SE) over (sentences, words, width), in one launch.

    With `TRITON_INTERPRET=1` in the environment when this module is imported, Triton's interpreter runs it on
    CPU tensors (slowly; that is how the tests check it where no GPU is present). `exact=False` lets the
    products use TF32 (for 16-bit activations, or under autocast).
    """
    if triton is None:
        raise RuntimeError("the fused inner block needs triton")
    sentences, words, width = x.shape
    attn, mlp = block.attn, block.mlp
    if not inner_block_fits(words, width, attn.num_heads):
        raise ValueError(f"the fused inner block serves at most {ROWS} words of width <= {MAX_WIDTH}")
    x = x.contiguous()
    out = torch.empty_like(x)
    m_pad = _pow2(words, at_least=1)
    params = [p.detach().contiguous() for p in _parameters(block)]
    qkv_bias = attn.qkv.bias
    grid = (triton.cdiv(sentences, ROWS // m_pad),)
    _inner_block_kernel[grid](
        x, out, sentences, *params,
        block.norm1.eps, block.norm2.eps, attn.scale,
        WORDS=words, WIDTH=width, HEADS=attn.num_heads, HIDDEN=mlp.fc1.out_features,
        M_PAD=m_pad, C_PAD=_pow2(width), H_BLOCK=32, ROWS=ROWS,
        HAS_QKV_BIAS=qkv_bias is not None, EXACT=exact,
    )  # fmt: skip
    return out


def _parameters(block: Any) -> list[torch.Tensor]:
    attn, mlp = block.attn, block.mlp
    qkv_bias = attn.qkv.bias if attn.qkv.bias is not None else attn.qkv.weight  # unread when absent
    return [
        block.norm1.weight, block.norm1.bias, attn.qkv.weight, qkv_bias, attn.proj.weight, attn.proj.bias,
        block.norm2.weight, block.norm2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
    ]  # fmt: skip


def inner_block_applies(x: torch.Tensor) -> bool:
    """A CUDA tensor where triton works, or a CPU tensor under Triton's interpreter (`TRITON_INTERPRET=1`)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.dim() != 3:
        return False
    if x.is_cuda:
        return triton_available()
    interpreting = os.environ.get("TRITON_INTERPRET") == "1" and switched_on(ENV_SWITCH)
    return x.device.type == "cpu" and triton is not None and interpreting


# Per (device, dtype, shape) configuration: True once the kernel matched the plain path, False after a failure.
_CHECKED: dict[tuple[Any, ...], bool] = {}


def checked_inner_block(
    block: torch.nn.Module, x: torch.Tensor, plain: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`inner_block`, checked against `plain` on its first call for each configuration.

    A kernel that fails to compile or disagrees with the plain path (say, on a GPU generation it was never run
    on) is switched off for that configuration with one warning, and `plain`'s result is used: never a wrong one.
    """
    exact = x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
    key = (x.device, x.dtype, exact, tuple(x.shape[1:]), block.attn.num_heads)
    if _CHECKED.get(key) is False:
        return plain(x)
    try:
        out = inner_block(block, x, exact=exact)
    except Exception as error:  # a triton/driver combination the kernel cannot compile for
        return _give_up(key, f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}", plain(x))
    if key in _CHECKED:
        return out
    reference = plain(x)
    error = (out.float() - reference.float()).abs().max().item()
    tolerance = (1e-4 if exact else 5e-2) * max(1.0, reference.float().abs().max().item())
    if not error <= tolerance:
        return _give_up(key, f"differs from the plain path by {error:.3g}", reference)
    _CHECKED[key] = True
    return out


def _give_up(key: tuple[Any, ...], reason: str, fallback: torch.Tensor) -> torch.Tensor:
    _CHECKED[key] = False
    warnings.warn(f"tnt_vision: fused inner-block kernel off ({reason}); using the plain path", RuntimeWarning, 3)
    return fallback
