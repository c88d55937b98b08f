"""The compiled CPU word-attention kernel and cache-blocked blocks against float64 and unblocked references.

Both are fast paths of the default eager model; the reference path (`fused_attention(False)`) and plain
`scaled_dot_product_attention` define what they must compute.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import add_norm_worker
import triton_interpreter_worker
from helpers import forward_backward, randomize_
from tnt_vision import bench, kernels
from tnt_vision.bench import never
from tnt_vision.kernels import add_norm, cpu_kernels, emulated_bf16, inner_block, triton_block, word_attention
from tnt_vision.kernels import onednn as onednn_module
from tnt_vision.models import create_model, tnt
from tnt_vision.models import layers as tnt_layers
from tnt_vision.models.layers import Attention, TransformerBlock, fused_attention

ROOT = Path(__file__).resolve().parents[1]
needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernels could not be compiled here")


def reference_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64, from and to the kernel's layouts."""
    P, m, C3 = qkv.shape
    d = C3 // 3 // heads
    q, k, v = qkv.double().reshape(P, m, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(P, m, heads * d)


# Head widths 6, 8, 10, 12 and 16 are compiled as constants, others not; the kernel takes 16 queries at a time
# (AVX-512) or 8 (AVX2): the word counts cover whole blocks, part blocks and both.
@needs_kernels
@pytest.mark.parametrize(
    ("words", "heads", "head_dim"),
    [(16, 4, 6), (16, 4, 10), (16, 6, 8), (16, 2, 12), (4, 2, 8), (13, 2, 16), (9, 1, 1), (20, 3, 7), (64, 1, 64)],
)
def test_word_attention_matches_float64_forward_and_backward(words: int, heads: int, head_dim: int) -> None:
    qkv = (torch.randn(37, words, 3 * heads * head_dim, dtype=torch.float64) * 2).requires_grad_()
    fast_in = qkv.detach().float().requires_grad_()
    scale = head_dim**-0.5
    expected, out = reference_attention(qkv, heads), word_attention(fast_in, heads, scale)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    out.backward(grad.float())
    assert out.shape == expected.shape
    # As accurate as PyTorch's own fp32 attention, measured against the same float64 reference.
    torch_in = qkv.detach().float().requires_grad_()
    torch_out = reference_attention_fp32(torch_in, heads)
    torch_out.backward(grad.float())
    assert error(out, expected) <= max(2e-6, 2 * error(torch_out, expected))
    assert error(fast_in.grad, qkv.grad) <= max(1e-5, 2 * error(torch_in.grad, qkv.grad))


def reference_attention_fp32(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    P, m, C3 = qkv.shape
    q, k, v = qkv.reshape(P, m, 3, heads, C3 // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(P, m, C3 // 3)


def error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return (value.double() - reference).abs().max().item()


@needs_kernels
@pytest.mark.parametrize(("words", "heads", "head_dim"), [(16, 4, 6), (16, 4, 10), (9, 2, 7)])
def test_word_attention_over_bf16_is_the_fp32_kernel_rounded(words: int, heads: int, head_dim: int) -> None:
    """bf16 q/k/v (autocast's): the fp32 computation of the same values, output and gradient rounded to bf16."""
    qkv = (torch.randn(37, words, 3 * heads * head_dim) * 2).bfloat16().requires_grad_()
    wide = qkv.detach().float().requires_grad_()
    scale = head_dim**-0.5
    out, expected = word_attention(qkv, heads, scale), word_attention(wide, heads, scale)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.float())
    assert out.dtype == qkv.grad.dtype == torch.bfloat16
    # one bf16 step at most (2^-7 relative at the bottom of a binade): the same fp32 values rounded, up to the order
    # of their additions in the two compiled versions
    one_step = {"atol": 1e-30, "rtol": 2**-7}
    torch.testing.assert_close(out, expected.bfloat16(), **one_step)
    torch.testing.assert_close(qkv.grad, wide.grad.bfloat16(), **one_step)
    assert error(out, reference_attention(qkv, heads)) <= 2**-8 * reference_attention(qkv, heads).abs().max()


@needs_kernels
def test_word_attention_takes_strided_input_and_propagates_nan() -> None:
    wide = torch.randn(8, 16, 200)
    qkv = wide[:, :, :72]  # a non-contiguous view
    torch.testing.assert_close(word_attention(qkv, 4, 6**-0.5).double(), reference_attention(qkv, 4), atol=2e-6, rtol=0)
    qkv = qkv.clone()
    qkv[3, 5, 0] = math.nan  # one query of sentence 3, head 0
    out = word_attention(qkv, 4, 6**-0.5)
    assert out[3, 5, :6].isnan().all()
    assert not out[[0, 1, 2, 4, 5, 6, 7]].isnan().any()


@needs_kernels
def test_word_attention_refuses_what_it_cannot_compute() -> None:
    module = cpu_kernels()
    with pytest.raises(RuntimeError, match="float32"):
        module.word_attention_forward(torch.randn(2, 16, 72, dtype=torch.float64), 4, 1.0)
    with pytest.raises(RuntimeError, match="at most 64 words"):
        module.word_attention_forward(torch.randn(2, 65, 72), 4, 1.0)
    with pytest.raises(RuntimeError, match="divisible"):
        module.word_attention_forward(torch.randn(2, 16, 70), 4, 1.0)


# ---- LayerNorm over narrow rows, GELU's backward ---------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("width", [1, 7, 8, 12, 24, 40, 64])
def test_narrow_layer_norm_and_its_backward_match_float64(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(7, 91, width, dtype=torch.float64) * 3 + 1  # 637 rows: more than one thread's share
    weight, bias = torch.randn(width, dtype=torch.float64), torch.randn(width, dtype=torch.float64)
    expected = torch.native_layer_norm(x, [width], weight, bias, 1e-5)
    x32, w32, b32 = x.float(), weight.float(), bias.float()
    assert kernels.narrow_layer_norm_applies(x32, [width], w32, b32)
    fast = kernels.native_layer_norm(x32, [width], w32, b32, 1e-5)
    plain = torch.native_layer_norm(x32, [width], w32, b32, 1e-5)
    for out, ours, aten in zip(expected, fast, plain, strict=True):  # output, mean, 1/std: as accurate as ATen's
        assert ours.shape == aten.shape
        assert error(ours, out) <= max(2e-6, 2 * error(aten, out))
    # the backward from the kernel's statistics, against ATen's from its own
    grad = torch.randn_like(x)
    aten_backward = torch.ops.aten.native_layer_norm_backward
    expected_grads = aten_backward(grad, x, [width], *expected[1:], weight, bias, [True] * 3)
    with kernel_calls(monkeypatch) as calls:
        ours = kernels.native_layer_norm_backward(grad.float(), x32, [width], *fast[1:], w32, b32, [True] * 3)
    assert calls == [1]  # the kernel's, not ATen's
    aten = aten_backward(grad.float(), x32, [width], *plain[1:], w32, b32, [True] * 3)
    for g_ours, g_aten, g_expected in zip(ours, aten, expected_grads, strict=True):
        assert g_ours.shape == g_aten.shape
        assert error(g_ours, g_expected) <= max(1e-5, 2 * error(g_aten, g_expected))


@needs_kernels
@pytest.mark.parametrize("width", [24, 100, 384])
def test_layer_norm_backward_takes_any_width_and_a_bf16_gradient(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward kernel over rows of any width (the outer norms' 384), from an fp32 gradient or a bf16 one (a bf16
    linear layer's, read as it is): as accurate as ATen's from the widened gradient, against float64."""
    x = torch.randn(5, 67, width, dtype=torch.float64) * 3 + 1
    weight, bias = torch.randn(width, dtype=torch.float64), torch.randn(width, dtype=torch.float64)
    x32, w32, b32 = x.float(), weight.float(), bias.float()
    _, mean, rstd = torch.native_layer_norm(x32, [width], w32, b32, 1e-5)
    aten_backward = torch.ops.aten.native_layer_norm_backward
    for grad in (torch.randn_like(x32), torch.randn_like(x32).bfloat16()):
        exact = aten_backward(grad.double(), x, [width], mean.double(), rstd.double(), weight, bias, [True] * 3)
        with kernel_calls(monkeypatch) as calls:
            ours = kernels.native_layer_norm_backward(grad, x32, [width], mean, rstd, w32, b32, [True] * 3)
        assert calls == [1]
        aten = aten_backward(grad.float(), x32, [width], mean, rstd, w32, b32, [True] * 3)
        for g_ours, g_aten, g_exact in zip(ours, aten, exact, strict=True):
            assert g_ours.dtype == torch.float32
            assert error(g_ours, g_exact) <= max(1e-5, 2 * error(g_aten, g_exact))


@contextlib.contextmanager
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """A list that gains an entry for each call into the compiled module while the context is open."""
    calls: list[int] = []
    compiled = kernels._kernels
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "_kernels", lambda: calls.append(1) or compiled())
        yield calls


@needs_kernels
def test_narrow_layer_norm_keeps_nan_to_its_row_and_leaves_other_calls_to_aten(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(6, 16, 24)
    x[2, 3, 5] = math.nan
    weight, bias = torch.randn(24), torch.randn(24)
    out = kernels.native_layer_norm(x.transpose(0, 1).contiguous().transpose(0, 1), [24], weight, bias, 1e-6)[0]
    assert out[2, 3].isnan().all()
    out[2, 3] = 0.0
    assert out.isfinite().all()
    torch.testing.assert_close(out, F.layer_norm(x, [24], weight, bias, 1e-6).nan_to_num(0.0), atol=2e-6, rtol=0)
    grad = torch.randn_like(x)
    _, mean, rstd = kernels.native_layer_norm(x, [24], weight, bias, 1e-6)
    with kernel_calls(monkeypatch) as calls:
        grad_x, grad_w, grad_b = kernels.native_layer_norm_backward(grad, x, [24], mean, rstd, weight, bias, [True] * 3)
    assert calls == [1]
    assert grad_x[2, 3].isnan().all()
    assert grad_w.isnan().all()  # every channel's sum has the NaN row's share
    assert grad_b.isfinite().all()
    grad_x[2, 3] = 0.0
    assert grad_x.isfinite().all()
    needs = [False, True, False]  # what is not asked for is None, as from ATen
    assert [g is None for g in kernels.native_layer_norm_backward(grad, x, [24], mean, rstd, weight, bias, needs)] == [
        True, False, True
    ]  # fmt: skip
    with torch.enable_grad(), kernel_calls(monkeypatch) as calls:  # double backward: ATen's to record
        grads = kernels.native_layer_norm_backward(grad.requires_grad_(), x, [24], mean, rstd, weight, bias, needs)
    assert grads[1].grad_fn is not None
    assert calls == []
    for call in (
        (torch.randn(4, 65), [65], torch.randn(65), torch.randn(65)),  # wide rows: ATen's forward is as fast
        (torch.randn(4, 24, requires_grad=True), [24], torch.randn(24), torch.randn(24)),  # autograd: ATen's
        (torch.randn(4, 24, dtype=torch.float64), [24], torch.randn(24).double(), torch.randn(24).double()),
        (torch.randn(4, 24), [24], None, None),
        (torch.randn(4, 4, 6), [4, 6], torch.randn(4, 6), torch.randn(4, 6)),
    ):
        assert not kernels.narrow_layer_norm_applies(*call)


@needs_kernels
def test_gelu_backward_and_value_matches_float64_and_its_special_values() -> None:
    x = torch.cat([torch.linspace(-14, 14, 40001), torch.randn(9999) * 3]).double()
    grad = torch.randn_like(x)
    fast_grad = grad.float()
    value_expected = F.gelu(x)
    grad_expected = torch.ops.aten.gelu_backward(grad, x)
    grad_out, value, sums = kernels.gelu_backward_and_value(fast_grad, x.float())
    assert grad_out is fast_grad  # written over the incoming gradient
    assert sums is None
    aten_grad = torch.ops.aten.gelu_backward(grad.float(), x.float())
    assert error(value, value_expected) <= max(5e-7, 2 * error(F.gelu(x.float()), value_expected))
    assert error(grad_out, grad_expected) <= max(1e-6, 2 * error(aten_grad, grad_expected))
    special = torch.tensor([math.nan, math.inf, -math.inf, 0.0, 1e30, -1e30, 1e-30, -40.0, 40.0])
    ones = torch.ones_like(special)
    grad_out, value, _ = kernels.gelu_backward_and_value(ones.clone(), special)
    # float64's values: ATen's fp32 GELU gives NaN for +inf in its AVX-512 loop (inf in its AVX2 and scalar ones)
    torch.testing.assert_close(value, F.gelu(special.double()).float(), equal_nan=True)
    torch.testing.assert_close(grad_out, torch.ops.aten.gelu_backward(ones, special), equal_nan=True)
    half = x.half()  # other dtypes: ATen's functions, the gradient not overwritten
    grad_half = grad.half()
    grad_out, value, sums = kernels.gelu_backward_and_value(grad_half, half, sums=True)
    assert grad_out is not grad_half
    torch.testing.assert_close(value, F.gelu(half))
    torch.testing.assert_close(sums, grad_out.sum(0))


def as_stored(t: torch.Tensor) -> torch.Tensor:
    """fp32 t rounded to bf16 as the kernels store it: as torch rounds, but where the build rounds by AVX512-BF16's
    instruction, values below fp32's normal range become zeros of their sign."""
    if cpu_kernels().bf16_flushes_subnormals:
        t = torch.where(t.abs() < torch.finfo(torch.float32).tiny, t * 0.0, t)
    return t.bfloat16()


@needs_kernels
def test_bf16_stores_round_to_nearest_even_and_flush_only_where_the_instruction_does() -> None:
    """The kernels' bf16 rounding (here the GELU gradient at x = 0, g / 2): ties to even, infinities and NaN kept,
    and fp32 subnormal results zero (of their sign) only in a build with AVX512-BF16's instruction."""
    halves = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-7 + 2**-8), 3.0, math.inf, -math.inf, math.nan])
    subnormal = torch.tensor([2e-38, -6e-39, 2.2e-38, 0.0])  # halved: below 1.2e-38
    grad = torch.cat([halves * 2, subnormal]).bfloat16()
    out = grad.clone()
    kernels.gelu_backward_and_value(out, torch.zeros_like(grad))
    expected = (grad.float() * 0.5).bfloat16()
    torch.testing.assert_close(out[:7], expected[:7], atol=0, rtol=0, equal_nan=True)
    if cpu_kernels().bf16_flushes_subnormals:
        assert out[7:].float().tolist() == [0.0, 0.0, 0.0, 0.0]
        assert torch.ones(4).copysign(out[7:].float()).tolist() == [1.0, -1.0, 1.0, 1.0]
    else:
        torch.testing.assert_close(out[7:], expected[7:], atol=0, rtol=0)
    torch.testing.assert_close(out, as_stored(grad.float() * 0.5), atol=0, rtol=0, equal_nan=True)


@needs_kernels
def test_gelu_backward_and_value_over_bf16_is_the_fp32_kernel_rounded() -> None:
    """bf16 (the lean MLP's hidden layer under bf16 autocast): the fp32 computation of the same values, both
    results rounded to bf16 as they are written, within one bf16 step of ATen's bf16 GELU and its backward."""
    x = torch.cat([torch.linspace(-14, 14, 4001), torch.randn(999) * 3, torch.tensor([math.nan, math.inf, -math.inf])])
    x, grad = x.bfloat16(), torch.randn_like(x).bfloat16()
    grad_out, value, _ = kernels.gelu_backward_and_value(grad.clone(), x)
    wide_grad, wide_value, _ = kernels.gelu_backward_and_value(grad.float(), x.float())
    assert grad_out.dtype == value.dtype == torch.bfloat16
    torch.testing.assert_close(value, as_stored(wide_value), atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(grad_out, as_stored(wide_grad), atol=0, rtol=0, equal_nan=True)
    finite = x.isfinite()
    one_step = {"atol": 1e-6, "rtol": 2**-7}  # ATen's fp32 GELU is 0 below -5.5, this one's tail 2e-7 there
    torch.testing.assert_close(value[finite], F.gelu(x)[finite], **one_step)
    torch.testing.assert_close(grad_out[finite], torch.ops.aten.gelu_backward(grad, x)[finite], **one_step)


BF16_STEP = {"atol": 1e-4, "rtol": 2**-7}  # one rounding step of bf16, near zero fp32's sum error


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_backward_sums_the_columns_of_the_gradient_it_writes(dtype: torch.dtype) -> None:
    """With `sums`, the gradient's column sums (fc1's bias gradient in the lean MLP) come from the same pass: the sums
    of the values written (bf16: as rounded), in the gradient's dtype, over rows whose stream ends in a period."""
    for shape in ((300, 96), (7, 13, 40), (5, 1536)):
        x, grad = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        grad_out, value, sums = kernels.gelu_backward_and_value(grad.clone(), x, sums=True)
        plain_grad, plain_value, _ = kernels.gelu_backward_and_value(grad.clone(), x)
        # the same values up to the compiler's contraction of a multiply and an add (no sums: no rows to follow)
        values = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else BF16_STEP
        torch.testing.assert_close(grad_out, plain_grad, **values)
        torch.testing.assert_close(value, plain_value, **values)
        assert sums.dtype == dtype
        assert sums.shape == (shape[-1],)
        expected = grad_out.double().flatten(0, -2).sum(0)
        tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else BF16_STEP
        torch.testing.assert_close(sums.double(), expected, **tolerance)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_rows_matches_float64_and_atens_special_values(dtype: torch.dtype) -> None:
    """The softmax kernel (bf16 training's attention weights) against float64 over rows of whole vectors, tails and
    both, in fp32 or rounded once to bf16; -inf scores give exact zeros, a NaN or an all -inf row NaN, as ATen's."""
    for width in (1, 7, 16, 197, 300):
        x = (torch.randn(5, 3, width) * 4).to(dtype)
        out = kernels.softmax_rows(x)
        expected = torch.softmax(x.double(), -1)
        assert out.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), expected, atol=1e-7, rtol=1e-6)
        else:
            torch.testing.assert_close(out, as_stored(expected.float()), atol=1e-6, rtol=2**-8)
    x = torch.randn(4, 40).to(dtype)
    x[0, 3], x[1, 5], x[2] = -math.inf, math.nan, -math.inf
    x[3, 7] = 1e30  # no overflow: the largest score is subtracted first
    out, expected = kernels.softmax_rows(x), torch.softmax(x.float(), -1)
    assert out[0, 3] == 0
    assert out[1:3].isnan().all()
    torch.testing.assert_close(out.float(), expected, atol=1e-6, rtol=2**-7, equal_nan=True)
    for other in (torch.randn(3, 9, requires_grad=True), torch.randn(9, 3).t(), torch.randn(3, 9).double()):
        assert not kernels.elementwise_applies(other)  # ATen's softmax
        torch.testing.assert_close(kernels.softmax_rows(other), torch.softmax(other, -1))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_rows_matches_float64_over_periods_tails_and_blocks(dtype: torch.dtype) -> None:
    """A linear layer's bias gradient, summed over all but the last dimension in fp32 and returned in the input's
    dtype: rows of whole vectors and not (a period of several rows), streams ending inside a period, more periods
    than a block of sums, one row, none; against float64, and as ATen sums where the kernel does not apply."""
    for shape in ((100, 24), (4097, 96), (37, 1536), (1001, 7), (3, 5, 40), (1, 17), (0, 24), (64 * 3 + 1, 24 * 17)):
        x = torch.randn(shape).to(dtype)
        assert kernels.elementwise_applies(x)
        got = kernels.sum_rows(x)
        assert got.dtype == dtype
        assert got.shape == (shape[-1],)
        expected = x.double().flatten(0, -2).sum(0)
        tolerance = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else BF16_STEP
        torch.testing.assert_close(got.double(), expected, **tolerance)
    tracked = torch.randn(30, 24, requires_grad=True)
    for x in (tracked, torch.randn(30, 24).t(), torch.randn(30, 24, dtype=torch.float64)):  # ATen's sum
        assert not kernels.elementwise_applies(x)
        torch.testing.assert_close(kernels.sum_rows(x), x.sum(0))


@needs_kernels
def test_the_8_lane_build_computes_what_the_16_lane_build_does() -> None:
    """On an AVX-512 CPU the kernels are built with 16 lanes, elsewhere (AVX2) with 8: the 8-lane build, compiled
    here too (`TNT_VISION_LANES=8`), gives every kernel's results up to the order of additions (bf16 outputs up to
    one rounding step), over sizes with whole vectors, tails, and both."""
    native = cpu_kernels()
    if native.lanes != 16:
        pytest.skip("the kernels here are built with 8 lanes: every other test runs that build")
    narrow = kernels.build_cpu_kernels("TNT_VISION_LANES=8")
    assert narrow.lanes == 8
    fp32, one_step = {"atol": 1e-5, "rtol": 1e-5}, {"atol": 1e-5, "rtol": 2**-7}

    def same(kernel: str, args: tuple[Any, ...], tolerance: dict[str, float]) -> None:
        """The kernel's results from both builds, each given its own copies of the tensors (some write in place)."""
        results = [
            getattr(module, kernel)(*(a.clone() if torch.is_tensor(a) else a for a in args))
            for module in (native, narrow)
        ]
        for a, b in zip(*(torch.utils._pytree.tree_leaves(r) for r in results), strict=True):
            torch.testing.assert_close(a, b, **tolerance)

    for dtype, tolerance in ((torch.float32, fp32), (torch.bfloat16, one_step)):
        for words, heads, head_dim in ((16, 4, 6), (9, 2, 7), (20, 3, 10)):
            qkv = torch.randn(11, words, 3 * heads * head_dim).to(dtype)
            grad = torch.randn(11, words, heads * head_dim).to(dtype)
            same("word_attention_forward", (qkv, heads, 0.4), tolerance)
            same("word_attention_backward", (grad, qkv, heads, 0.4), tolerance)
        x = torch.randn(10007).to(dtype)  # parallel chunks of whole vectors, then a tail
        same("gelu_backward_and_value", (torch.randn_like(x), x, False), tolerance)
        rows = x[:9990].view(-1, 45)  # column sums over periods of 720 values (16 rows), then 14 rows
        same("gelu_backward_and_value", (torch.randn_like(rows), rows, True), tolerance)
        same("column_sums", (rows,), tolerance)
        same("softmax_rows", (rows * 3,), tolerance)
    block = randomize_(TransformerBlock(24, 4, qkv_bias=True), scale=0.3)
    weights, qkv_bias, heads, eps = inner_block.block_arguments(block)
    for words in (16, 9, 5):  # two vectors of words with 8 lanes, one with 16; a part of one
        same("word_block_forward", (torch.randn(11, words, 24), weights, qkv_bias, heads, 0.4, eps), fp32)
    for width in (7, 24, 40, 384):
        x, weight, bias = torch.randn(301, width), torch.randn(width), torch.randn(width)
        same("layer_norm", (x, weight, bias, 1e-5, False), fp32)
        same("layer_norm", (x, weight, bias, 1e-5, True), one_step)
        _, mean, rstd = torch.native_layer_norm(x, [width], weight, bias, 1e-5)
        same("layer_norm_backward", (torch.randn_like(x), x, mean, rstd, weight), fp32)
        same("layer_norm_backward", (torch.randn_like(x).bfloat16(), x, mean, rstd, weight), fp32)
        x3 = x.view(7, 43, width)
        for y in (torch.randn_like(x3), torch.randn_like(x3).bfloat16()):  # the sum written, the norm returned
            sums = [torch.empty_like(x3) for _ in range(2)]
            builds = zip((native, narrow), sums, strict=True)
            normed = [module.add_rows(x3, y, out, weight, bias, 1e-5, True) for module, out in builds]
            torch.testing.assert_close(*sums, atol=0, rtol=0)
            torch.testing.assert_close(*normed, **one_step)


@needs_kernels
@pytest.mark.parametrize("width", [12, 24, 384])
def test_layer_norm_for_a_bf16_linear_is_rounded_as_it_is_written(width: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast on a CPU with bf16 products, `LayerNorm.for_linear` is the fp32 norm rounded to bf16
    (the kernel at any width); elsewhere, with a hook, or where a gradient is recorded, the norm's own output."""
    norm = tnt_layers.LayerNorm(width)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(37, 16, width) * 3 + 1
    monkeypatch.setattr(emulated_bf16, "bf16_hardware", lambda: True)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = norm.for_linear(x)
        expected = norm(x)
    assert out.dtype == torch.bfloat16
    assert expected.dtype == torch.float32
    # within one bf16 step: the fp32 values can differ in their last bits (the order of a row's sums)
    torch.testing.assert_close(out, expected.bfloat16(), atol=1e-30, rtol=2**-7)
    with torch.autocast("cpu", torch.bfloat16):
        assert norm.for_linear(x).dtype == torch.float32  # gradients recorded
    with torch.no_grad():
        assert norm.for_linear(x).dtype == torch.float32  # no autocast
        with torch.autocast("cpu", torch.bfloat16):
            norm.register_forward_hook(lambda *args: None)
            assert norm.for_linear(x).dtype == torch.float32
            monkeypatch.setattr(emulated_bf16, "bf16_hardware", lambda: False)
            assert tnt_layers.LayerNorm(width).for_linear(x).dtype == torch.float32


@needs_kernels
@pytest.mark.parametrize("width", [7, 24, 384])
@pytest.mark.parametrize("branch", [torch.float32, torch.bfloat16], ids=["fp32_branch", "bf16_branch"])
def test_residual_add_and_its_norm_match_aten(width: int, branch: torch.dtype) -> None:
    """`residual_add`: x + y exactly as ATen adds an fp32 stream and an fp32 or bf16 branch, written into a fresh
    tensor, x itself, or a slice of a larger tensor; the norm after it as LayerNorm computes it (within one bf16
    step when rounded to bf16, the fp32 values can differ in their last bits: the order of a row's sums)."""
    norm = torch.nn.LayerNorm(width)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x, y = torch.randn(5, 37, width) * 3 + 1, torch.randn(5, 37, width).to(branch)
    with torch.no_grad():
        expected = x + y
        assert kernels.residual_add_applies(x, y)
        total, normed = kernels.residual_add(x, y)
        assert normed is None
        assert total.data_ptr() != x.data_ptr()
        torch.testing.assert_close(total, expected, atol=0, rtol=0)
        for bf16_output in (False, True):
            total, normed = kernels.residual_add(x, y, norm=norm, bf16_output=bf16_output)
            torch.testing.assert_close(total, expected, atol=0, rtol=0)
            want = norm(expected)
            if bf16_output:
                assert normed.dtype == torch.bfloat16
                # atol: an output near zero is a cancellation (weight * x_hat + bias), its last bits are noise
                torch.testing.assert_close(normed, want.bfloat16(), atol=1e-5, rtol=2**-7)
            else:
                torch.testing.assert_close(normed, want, atol=1e-5, rtol=1e-5)
        stream = x.clone()
        assert kernels.residual_add(stream, y, out=stream)[0] is stream
        torch.testing.assert_close(stream, expected, atol=0, rtol=0)
        # into the patches' rows of a (5, 1 + 37, width) tensor, from the patches' rows of another: strided rows
        sentences = torch.randn(5, 38, width)
        patches = sentences[:, 1:]
        out = torch.full_like(sentences, float("nan"))
        kernels.residual_add(patches, y, out=out[:, 1:])
        torch.testing.assert_close(out[:, 1:], patches + y, atol=0, rtol=0)
        assert out[:, 0].isnan().all()  # the class token's rows untouched
        with pytest.raises(ValueError, match="contiguous rows"):
            kernels.residual_add(x, y, out=torch.empty(x.shape[::-1]).transpose(0, 2))
        # what the kernel does not take: other shapes, dtypes, rows that are not contiguous, recorded gradients
        assert not kernels.residual_add_applies(x, y[:, :1])
        assert not kernels.residual_add_applies(x.double(), y)
        assert not kernels.residual_add_applies(x.transpose(1, 2), y.transpose(1, 2))
        assert not kernels.residual_add_applies(x.bfloat16(), y)
    assert not kernels.residual_add_applies(x.requires_grad_(), y)


@needs_kernels
def test_fused_residual_adds_leave_the_block_input_and_intermediates_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under bf16 autocast inference the blocks update their own sums in place (`onednn_forward`) and the TNT block
    adds the words' update into a fresh tensor (`add_to_patches`): no caller's tensor changes, and the model
    computes what the plain path computes (within bf16 rounding)."""
    monkeypatch.setattr(emulated_bf16, "bf16_hardware", lambda: True)
    used: list[str] = []
    original = kernels.residual_add
    for module in (tnt_layers, tnt, onednn_module):
        monkeypatch.setattr(module, "residual_add", lambda *a, **k: used.append("add") or original(*a, **k))
    model = create_model("tnt_s_patch16_224", depth=2, img_size=32, num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        block = model.blocks[0].outer
        x = torch.randn(2, 5, 384)
        before = x.clone()
        block(x)
        torch.testing.assert_close(x, before, atol=0, rtol=0)
        # the first block's map (a view of its output) as the whole run leaves it, and from a run that stops there
        _, maps = model.forward_intermediates(images)
        first = model.forward_intermediates(images, indices=[0], intermediates_only=True)[0]
        torch.testing.assert_close(maps[0], first, atol=0, rtol=0)
        fast = model(images).float()
        with fused_attention(False):
            plain = model(images).float()
    assert len(used) >= 2 * (3 + 3)  # per block: inner and outer, the norm's, the in-place one; the patches'
    assert (fast - plain).abs().max() <= 3e-2 * plain.abs().max()


def attention_calls(model: torch.nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Run the model and return the sequence length of every attention call that took the kernel."""
    taken: list[int] = []
    original = Attention.word_kernel_applies

    def spy(self: Attention, qkv: torch.Tensor, tokens: int) -> bool:
        applies = original(self, qkv, tokens)
        if applies:
            taken.append(tokens)
        return applies

    monkeypatch.setattr(Attention, "word_kernel_applies", spy)
    model(x)
    return taken


@needs_kernels
def test_model_uses_the_kernel_for_words_only_and_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tnt_layers, "word_block_applies", never)  # the whole-block kernel has its own tests below
    model = create_model("tnt_s_patch16_224", depth=2, img_size=144, num_classes=10).eval()
    x = torch.randn(1, 3, 144, 144)
    with torch.inference_mode():
        assert attention_calls(model, x, monkeypatch) == [16, 16]  # the words; 82 sentence tokens are too many
        assert attention_calls(model, x[..., :32, :32], monkeypatch) == [16, 5, 16, 5]  # any short sequence
        with fused_attention(False):
            assert attention_calls(model, x, monkeypatch) == []
        with torch.autocast("cpu", torch.bfloat16):
            monkeypatch.setattr(emulated_bf16, "native_bf16", lambda: True)
            assert attention_calls(model, x, monkeypatch) == [16, 16]  # bf16 q/k/v: widened as it reads them
            monkeypatch.setattr(emulated_bf16, "native_bf16", lambda: False)
            assert attention_calls(model, x, monkeypatch) == [16, 16]  # bf16 emulated through fp32: the kernel too
    dropping = create_model("tnt_s_patch16_224", depth=2, img_size=32, num_classes=10, attn_drop_rate=0.1).train()
    assert attention_calls(dropping, x, monkeypatch) == []


@needs_kernels
@pytest.mark.parametrize("name", ["tnt_s_patch16_224", "tnt_b_patch16_224", "tnt_s_legacy_patch16_224"])
def test_model_with_kernel_matches_reference_path(name: str) -> None:
    model = create_model(name, depth=3, img_size=64, num_classes=10, drop_path_rate=0.0).train()
    x = torch.randn(3, 3, 64, 64)
    fast, fast_grads = forward_backward(model, x)
    with fused_attention(False):
        slow, slow_grads = forward_backward(model, x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    for g_fast, g_slow in zip(fast_grads, slow_grads, strict=True):
        assert (g_fast - g_slow).abs().max() <= 1e-5 * g_slow.abs().max().clamp_min(1e-12)


def word_block_reference(block: TransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's explicit path in float64, on copies."""
    twin = copy.deepcopy(block).double()
    with fused_attention(False):
        return twin(x.double())


@needs_kernels
@pytest.mark.parametrize(
    ("words", "width", "heads", "qkv_bias"),
    [(16, 24, 4, False), (16, 12, 2, False), (16, 40, 4, True), (9, 24, 4, False), (25, 24, 4, False), (1, 8, 2, True)],
    ids=["tnt_s", "tnt_ti", "tnt_b+bias", "9_words", "25_words", "1_word"],
)
def test_word_block_kernel_computes_the_block(words: int, width: int, heads: int, qkv_bias: bool) -> None:
    """The whole inner block in one pass (`kernels.word_block`) against a float64 recomputation of the explicit
    path: TNT-Ti/S/B's widths and heads, a q/k/v bias, sentences of one vector of words or two (25 words with
    16 lanes; AVX2's 8 lanes serve 16 at most) or a part of one."""
    if words > 2 * cpu_kernels().lanes:
        pytest.skip(f"{words} words are more than this build serves")
    block = randomize_(TransformerBlock(width, heads, qkv_bias=qkv_bias), scale=0.3).eval()
    x = torch.randn(37, words, width)  # a last thread's share part-filled
    assert block.cpu_kernel_applies(x) is False  # grad mode is on
    with torch.inference_mode():
        assert block.cpu_kernel_applies(x)
        fast = block(x)
    reference = word_block_reference(block, x)
    assert (fast.double() - reference).abs().max() <= 1e-5 * reference.abs().max()
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        assert block.cpu_kernel_applies(x)  # the words' stream is fp32 under autocast: the same fp32 block
        torch.testing.assert_close(block(x), fast, atol=0, rtol=0)


@needs_kernels
def test_model_runs_its_inner_blocks_by_the_block_kernel_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    """In inference each inner block takes the kernel (fp32 and bf16 autocast); never the sentences' 50 tokens of
    384, nor in training, with gradients, on the reference path, with a hook on a part of the block or an SE
    block, nor under fp16 autocast."""
    taken: list[tuple[int, ...]] = []
    original = tnt_layers.word_block

    def spy(x: torch.Tensor, *args: Any) -> torch.Tensor:
        taken.append(tuple(x.shape[1:]))
        return original(x, *args)

    monkeypatch.setattr(tnt_layers, "word_block", spy)

    def calls(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
        taken.clear()
        model(x)
        return list(taken)

    model = create_model("tnt_s_patch16_224", depth=2, img_size=112, num_classes=10).eval()
    x = torch.randn(2, 3, 112, 112)
    assert calls(model, x) == []  # gradients recorded for the parameters
    with torch.inference_mode():
        assert calls(model, x) == [(16, 24), (16, 24)]
        with torch.autocast("cpu", torch.bfloat16):
            assert calls(model, x) == [(16, 24), (16, 24)]
        with torch.autocast("cpu", torch.float16):
            assert calls(model, x) == []
        with fused_attention(False):
            assert calls(model, x) == []
        handle = model.blocks[1].inner.mlp.fc1.register_forward_hook(lambda *_: None)
        assert calls(model, x) == [(16, 24)]
        handle.remove()
        assert calls(model.train(), x) == []
    hybrid = create_model("tnt_s_se_patch16_224", depth=2, img_size=32, num_classes=10, tnt_blocks=(1,)).eval()
    with torch.inference_mode():
        assert calls(hybrid, torch.randn(1, 3, 32, 32)) == [(16, 24)]  # the TNT block's words only
        words = torch.randn(3, 16, 24)
        assert TransformerBlock(24, 4).eval().cpu_kernel_applies(words)
        assert not TransformerBlock(24, 4, se_ratio=0.25).eval().cpu_kernel_applies(words)  # SE: the layers


@needs_kernels
def test_word_block_kernel_names_a_wrong_argument_and_takes_a_parameter_in_any_layout() -> None:
    block = TransformerBlock(24, 4).eval()
    weights, qkv_bias, heads, eps = inner_block.block_arguments(block)
    x = torch.randn(3, 16, 24)
    with pytest.raises(RuntimeError, match="word block: fc1 weight of shape"):
        kernels.word_block(x, [*weights[:7], weights[7][:, :8], *weights[8:]], qkv_bias, heads, 0.4, eps)
    with pytest.raises(RuntimeError, match="word block: norm2 bias must be an fp32 CPU tensor"):
        kernels.word_block(x, [*weights[:6], weights[6].double(), *weights[7:]], qkv_bias, heads, 0.4, eps)
    strided = [*weights[:3], weights[3].t().contiguous().t(), *weights[4:]]  # a parameter in another layout
    with torch.no_grad():
        same = kernels.word_block(x, strided, qkv_bias, heads, 0.4, eps)
        torch.testing.assert_close(same, kernels.word_block(x, weights, qkv_bias, heads, 0.4, eps), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="word block: expected contiguous fp32"):
        kernels.word_block(x.double(), weights, qkv_bias, heads, 0.4, eps)
    with pytest.raises(RuntimeError, match="word block: width 24 for 5 heads"):
        kernels.word_block(x, weights, qkv_bias, 5, 0.4, eps)


def test_failed_build_warns_once_and_the_plain_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import cpp_extension

    def broken(**_: object) -> None:
        raise RuntimeError("Error building extension 'tnt_vision_cpu'\nc++: command not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    kernels.cpu_kernels.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="CPU kernels unavailable .*command not found|Error building"):
            assert kernels.cpu_kernels() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # cached: no second warning, no second attempt
            assert kernels.cpu_kernels() is None
            model = create_model("tnt_s_patch16_224", depth=1, img_size=32, num_classes=10).eval()
            with torch.inference_mode():
                assert model(torch.randn(1, 3, 32, 32)).isfinite().all()
    finally:
        kernels.cpu_kernels.cache_clear()


def test_switch_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    kernels.cpu_kernels.cache_clear()
    try:
        assert kernels.cpu_kernels() is None
        assert not kernels.word_attention_applies(torch.randn(2, 16, 72), 16, 6)
    finally:
        kernels.cpu_kernels.cache_clear()


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("tnt_s_patch16_224", {}), ("deit_s_patch16_224", {}), ("tnt_s_se_patch16_224", {"tnt_blocks": (0, 2)})],
    ids=["tnt", "deit", "hybrid_se"],
)
def test_cache_blocking_gives_the_unblocked_result(name: str, overrides: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_model(name, depth=3, img_size=32, num_classes=10, **overrides).train()
    x = torch.randn(7, 3, 32, 32)
    sentences = torch.zeros(7, 5, model.cfg.outer_dim)
    assert model.micro_batch(sentences) == 7  # small images fit the default budget whole
    monkeypatch.setattr(tnt, "CACHE_BLOCK_BYTES", 1)  # one image per group
    assert model.micro_batch(sentences) == 1
    blocked, blocked_grads = forward_backward(model, x)
    with torch.no_grad():  # the groups stay apart through the blocks: each map joins them
        blocked_maps = model.forward_intermediates(x, indices=[0, -1], norm=True)
    model.set_cache_blocking(False)
    assert model.micro_batch(sentences) == 7
    whole, whole_grads = forward_backward(model, x)
    with torch.no_grad():
        whole_maps = model.forward_intermediates(x, indices=[0, -1], norm=True)
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(blocked_maps, whole_maps, atol=1e-5, rtol=1e-5)  # normed: O(1) values
    for g_blocked, g_whole in zip(blocked_grads, whole_grads, strict=True):
        torch.testing.assert_close(g_blocked, g_whole, atol=1e-6, rtol=1e-5)


def test_micro_batches_are_balanced_and_sized_by_the_widest_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_model("tnt_s_patch16_224")
    per_image = 197 * 1536 * 4  # outer MLP hidden layer of one 224px image, fp32 (the inner one: 196 * 16 * 96)
    monkeypatch.setattr(tnt, "CACHE_BLOCK_BYTES", 8 * per_image)
    assert model.micro_batch(torch.zeros(32, 197, 384)) == 8
    assert model.micro_batch(torch.zeros(9, 197, 384)) == 5  # two groups of 5 and 4, not 8 and 1
    assert model.micro_batch(torch.zeros(32, 197, 384, dtype=torch.bfloat16)) == 16  # half the bytes per image
    with fused_attention(False):
        assert model.micro_batch(torch.zeros(32, 197, 384)) == 32
    monkeypatch.setattr(tnt, "BF16_BLOCK_BYTES", 16 * per_image)
    for hardware in (False, True):  # under bf16 autocast, the bf16 budget where the CPU multiplies bf16
        monkeypatch.setattr(emulated_bf16, "bf16_hardware", lambda hardware=hardware: hardware)
        with torch.autocast("cpu", torch.bfloat16):
            assert model.micro_batch(torch.zeros(32, 197, 384)) == (16 if hardware else 8)


@needs_kernels
def test_torch_compile_keeps_the_kernel_in_its_graph_with_gradients() -> None:
    model = create_model("tnt_s_patch16_224", depth=2, img_size=32, num_classes=10, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    graphs: list[torch.fx.GraphModule] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(model, backend=recording_backend, fullgraph=True)(x)
    assert sum("tnt_vision.word_attention" in gm.code for gm in graphs) == 1
    # fake-tensor shapes and the registered backward hold up under AOTAutograd
    torch._dynamo.reset()
    compiled, compiled_grads = forward_backward(torch.compile(model, backend="aot_eager", fullgraph=True), x)
    eager, eager_grads = forward_backward(model, x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    for g_compiled, g_eager in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(g_compiled, g_eager, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_asked_once_probes_once_and_is_a_constant_to_torch_compile() -> None:
    """`kernels.asked_once`: the probe runs at the first call only (again after `cache_clear`), and Dynamo takes its
    answer as a constant rather than tracing into it (here a probe it cannot trace: a graph break with fullgraph)."""
    calls: list[str] = []

    def probe() -> str:
        calls.append("asked")
        return torch.backends.cpu.get_cpu_capability()  # returns a str: Dynamo cannot put it in a graph

    capability = kernels.asked_once(probe)
    assert capability() == capability() == torch.backends.cpu.get_cpu_capability()
    assert calls == ["asked"]
    capability.cache_clear()
    capability()
    assert calls == ["asked", "asked"]

    torch._dynamo.reset()
    x = torch.ones(3)
    compiled = torch.compile(lambda t: t * len(capability()), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), x * len(torch.backends.cpu.get_cpu_capability()))
    with pytest.raises(torch._dynamo.exc.Unsupported):  # the same probe without the mark
        torch.compile(lambda t: t * len(probe()), backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_torch_compile_keeps_the_inference_kernels_in_one_graph(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU inference under torch.compile: one graph, holding the inner block's kernel (`tnt_vision::word_block`)
    and oneDNN's linear layers (`tnt_vision::onednn_linear`, where eager takes them), with eager's output through
    AOTAutograd's fake tensors and through Inductor; the packed weights are made once, not on every call."""
    model = create_model("tnt_s_patch16_224", depth=2, img_size=32, num_classes=10).eval()
    randomize_(model)
    x = torch.randn(3, 3, 32, 32)
    targets: list[str] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    autocast = torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16")
    torch._dynamo.reset()
    with torch.inference_mode(), autocast:
        eager = model(x).float()
        torch.compile(model, backend=recording, fullgraph=True)(x)
        layers_by_onednn = onednn_module.available() and (dtype == "fp32" or emulated_bf16.bf16_hardware())
        assert targets.count("tnt_vision.word_block.default") == 2, targets
        # per block: q/k/v and projection of the outer attention, MLP's two layers: each inner block's are the
        # kernel's; one for the stem's sentence projection, one per block for the words' projection, and the head
        assert targets.count("tnt_vision.onednn_linear.default") == (2 * 4 + 1 + 2 + 1 if layers_by_onednn else 0)
        torch._dynamo.reset()
        through_fakes = torch.compile(model, backend="aot_eager", fullgraph=True)
        made: list[torch.Tensor] = []  # copies made (packed or cast) from here on: none, eager made them all
        kept = onednn_module._kept
        monkeypatch.setattr(
            onednn_module, "_kept", lambda t, key, make: kept(t, key, lambda v: made.append(t) or make(v))
        )
        outputs = [through_fakes(x).float() for _ in range(2)]
        assert not made  # the parameters themselves reach the operator, which finds eager's copies of them
        torch._dynamo.reset()
        if dtype == "fp32":  # Inductor's generated code calling the operators (a minute's compilation; one dtype)
            outputs.append(torch.compile(model, fullgraph=True)(x).float())
    tolerance = 1e-5 if dtype == "fp32" else 2e-2 * eager.abs().max().item()
    for out in outputs:
        torch.testing.assert_close(out, eager, atol=tolerance, rtol=0)
    torch._dynamo.reset()


def test_compiled_inference_operators_pass_torch_library_checks() -> None:
    """The registered inference operators' schemas, fake tensors (shape, dtype) and dispatch, by `opcheck`."""
    x, weight, bias, residual = torch.randn(2, 5, 16), torch.randn(24, 16), torch.randn(24), torch.randn(2, 5, 24)
    if onednn_module.available():
        for gelu, added in ((False, None), (True, None), (False, residual)):
            torch.library.opcheck(onednn_module._compiled_linear, (x, weight, bias, gelu, added))
        torch.library.opcheck(onednn_module._compiled_linear, (x.bfloat16(), weight, None, False, None))
    if cpu_kernels() is not None:
        block = TransformerBlock(24, 4).eval()
        weights, qkv_bias, heads, eps = inner_block.block_arguments(block)
        words, weights = torch.randn(7, 16, 24), [w.detach() for w in weights]  # inference: no autograd formula
        torch.library.opcheck(kernels._word_block, (words, weights, qkv_bias, heads, block.attn.scale, eps))


@needs_kernels
def test_row_kernel_operators_pass_torch_library_checks() -> None:
    """The row kernels' operators, which torch.compile keeps in traced training (`kernels._kernel`): schemas, fake
    tensors (shape, dtype), the GELU backward's declared write over its gradient, and dispatch, by `opcheck`."""
    x, weight, bias = torch.randn(9, 5, 24), torch.randn(24), torch.randn(24)
    for bf16_output in (False, True):
        torch.library.opcheck(kernels._layer_norm_operator, (x, weight, bias, 1e-5, bf16_output))
    _, mean, rstd = torch.native_layer_norm(x, [24], weight, bias, 1e-5)
    for grad in (torch.randn(9, 5, 24), torch.randn(9, 5, 24).bfloat16()):
        torch.library.opcheck(kernels._layer_norm_backward_operator, (grad, x, mean, rstd, weight))
    for dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(40, 96).to(dtype)
        for sums in (False, True):
            torch.library.opcheck(kernels._gelu_backward_and_value_operator, (torch.randn_like(hidden), hidden, sums))
        torch.library.opcheck(kernels._softmax_rows_operator, (hidden,))
        torch.library.opcheck(kernels._column_sums_operator, (hidden,))


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_torch_compile_traces_the_lean_training_functions_with_their_kernels(
    dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU training under torch.compile: one graph, in which Dynamo traces the lean training functions
    (`emulated_bf16`'s autograd.Functions) with the row kernels they call as operators, forward and backward, over
    the whole batch where eager takes groups of images (`tnt.compiled_training`); eager's gradients through
    AOTAutograd's fake tensors and its partition, and in fp32 through Inductor; kept for backward, what the lean
    functions keep (their norms' outputs are recomputed, not kept, as without compile)."""
    if dtype == "bf16" and not emulated_bf16.bf16_hardware():
        pytest.skip("bf16 training is traced only where the CPU multiplies bf16 (the emulation steps aside)")
    # At 224x224 (197 tokens: the outer attention is not the word kernel's) in groups of two images, where Inductor
    # gives wrong gradients over the groups (AOTAutograd's donated buffers: `tnt.compiled_training`; this test
    # fails at Inductor without it)
    model = create_model("tnt_s_patch16_224", depth=1, num_classes=10, drop_path_rate=0.0).train()
    randomize_(model)
    x, low = torch.randn(4, 3, 224, 224), torch.bfloat16 if dtype == "bf16" else torch.float32
    two_images = 2 * 197 * 1536 * 4  # the widest activation of two images (the MLP's hidden layer) in fp32
    monkeypatch.setattr(tnt, "CACHE_BLOCK_BYTES", two_images)
    monkeypatch.setattr(tnt, "BF16_BLOCK_BYTES", two_images)
    assert model.micro_batch(torch.zeros(4, 197, 384)) == 2  # eager: two groups
    operators: list[str] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        operators.extend(bench.tnt_vision_operators(gm))
        return gm.forward

    parameters = list(model.parameters())
    (eager, eager_grads), eager_kept = bench.saved_bytes(lambda: forward_backward(model, x, low), parameters)
    torch._dynamo.reset()
    forward_backward(torch.compile(model, backend=recording, fullgraph=True), x, low)
    rows = {"layer_norm", "layer_norm_backward", "gelu_backward_and_value", "column_sums"}
    expected = rows | {"word_attention"} | ({"softmax_rows"} if dtype == "bf16" else set())  # the outer attention
    assert {call.split(".")[1] for call in operators} >= expected, operators
    runs = {"fakes": "aot_eager", "partition": "aot_eager_decomp_partition"}
    if dtype == "fp32":  # Inductor's generated code (one dtype: a minute's compilation)
        runs["inductor"] = "inductor"
    # bf16: each gradient no further from fp32's than twice eager's own bf16 one is (or 5e-2 of its largest value)
    reference = forward_backward(model, x)[1] if dtype == "bf16" else eager_grads
    for name, backend in runs.items():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        (out, grads), kept = bench.saved_bytes(lambda c=compiled: forward_backward(c, x, low), parameters)
        tolerance = 1e-5 if dtype == "fp32" else 2e-2
        torch.testing.assert_close(out, eager, atol=tolerance * eager.abs().max().item(), rtol=0, msg=name)
        for got, bf16, want in zip(grads, eager_grads, reference, strict=True):
            scale = want.abs().max().item()
            if dtype == "bf16":
                tolerance = max(5e-2, 2 * (bf16 - want).abs().max().item() / scale)
            torch.testing.assert_close(got, want, atol=tolerance * scale, rtol=0, msg=name)
        if name == "partition":  # less than autograd's layers would keep; in fp32 about what eager keeps (in bf16
            # the partition keeps the weights' bf16 copies, which eager casts again, a large part at this batch)
            torch._dynamo.reset()
            with monkeypatch.context() as layers_only:  # the lean functions stepped aside: autograd's layers
                for module in (tnt_layers, tnt):
                    layers_only.setattr(module, "lean_path", bench.constant((False, None)))
                plain = torch.compile(model, backend=backend, fullgraph=True)
                _, plain_kept = bench.saved_bytes(lambda p=plain: forward_backward(p, x, low), parameters)
            assert kept <= min(1.2 * eager_kept if dtype == "fp32" else kept, 0.85 * plain_kept), (kept, plain_kept)
    torch._dynamo.reset()


# ---- the fused Triton inner block (GPU inference) ------------------------------------------------------------

needs_triton = pytest.mark.skipif(inner_block.triton is None, reason="triton is not installed")


def interpreted(worker: str, tmp_path: Path) -> dict[str, float]:
    """The differences a worker script in tests/ measured with TRITON_INTERPRET=1 (Triton's interpreter runs the GPU
    kernels on CPU tensors), in a process of its own: the interpreter is chosen when Triton is imported."""
    out = tmp_path / "diffs.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    script = ROOT / "tests" / worker
    res = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@needs_triton
def test_triton_inner_block_matches_plain_block_under_the_interpreter(tmp_path: Path) -> None:
    """Triton's interpreter runs the GPU kernel on CPU tensors, so this check needs no GPU."""
    diffs = interpreted("triton_interpreter_worker.py", tmp_path)
    for name in triton_interpreter_worker.BLOCKS:
        for variant in triton_interpreter_worker.VARIANTS:
            assert diffs[f"{name}_{variant}"] <= 1e-5, (name, variant, diffs)  # exact fp32 products
            assert diffs[f"{name}_{variant}_bf16"] <= 3e-2, (name, variant, diffs)
            assert diffs[f"{name}_{variant}_tf32"] <= 1e-2, (name, variant, diffs)
            assert diffs[f"{name}_{variant}_fp16"] <= 1e-2, (name, variant, diffs)
        assert diffs[f"{name}_scaled"] <= 1e-5, (name, diffs)  # drop-path's branch scales
        for rows in (16, 32):  # gradients, each relative to its own size
            assert diffs[f"{name}_backward_{rows}"] <= 1e-5, (name, rows, diffs)
        assert diffs[f"{name}_backward_one_slot"] <= 1e-5, (name, diffs)
        assert diffs[f"{name}_backward_tf32"] <= 5e-3, (name, diffs)  # operands rounded to fp16's 10 mantissa bits
        assert diffs[f"{name}_backward_bf16"] <= 3e-2, (name, diffs)
        assert diffs[f"{name}_backward_fp16"] <= 5e-3, (name, diffs)
    for name in ("tnt_s_patch16_224", "tnt_b_patch16_224", "tnt_s_legacy_patch16_224"):
        assert diffs[name] <= 1e-5, (name, diffs[name])
    assert diffs["compiled"] <= 1e-5
    assert diffs["kernel_calls"] == 14  # 3 models x 2 inner blocks x 2 passes, and compiled TNT-S's 2 blocks
    assert diffs["eager_operator_calls"] == 0  # the registered operator only where autograd or a graph needs it
    for name in ("train_tnt_s_patch16_224", "train_tnt_b_patch16_224", "train_compiled", "train_checkpointed"):
        assert diffs[name] <= 1e-5, (name, diffs[name])  # a training step's gradients, eager and compiled
    assert diffs["backward_calls"] == 6  # TNT-S, compiled TNT-S and TNT-B: 2 inner blocks each


def test_the_models_work_where_triton_is_not_installed() -> None:
    """Triton ships with PyTorch's Linux wheels only: elsewhere the kernels' modules import and step aside."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from tnt_vision.kernels import inner_block\n"
        "from tnt_vision.models import create_model\n"
        "assert inner_block.triton is None and not inner_block.inner_block_applies(torch.randn(2, 16, 24))\n"
        "model = create_model('tnt_s_patch16_224', depth=1, img_size=32, num_classes=3)\n"
        "model(torch.randn(2, 3, 32, 32)).sum().backward()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@needs_triton
def test_the_autotuner_tries_only_configurations_holding_whole_sentences() -> None:
    """The GPU autotuner's pruning (not run under the interpreter, which launches fixed configurations)."""
    configs = triton_block.FORWARD["bf16"].configs
    assert triton_block.whole_sentences(configs, {}, M_PAD=16) == configs  # 16 words: every configuration
    pruned = triton_block.whole_sentences(triton_block.BACKWARD["ieee"].configs, {}, M_PAD=64)
    assert sorted((c.kwargs["ROWS"], c.num_warps) for c in pruned) == [(64, 4), (64, 8)]  # 16, 32 rows -> 64


@needs_triton
def test_the_backward_autotuner_keeps_the_smallest_tile_away_from_tnt_s_shape() -> None:
    """Only TNT-S's padded width (32 columns) has run every backward configuration right on a GPU."""
    configs = triton_block.BACKWARD["bf16"].configs
    assert triton_block.verified_backward(configs, {}, M_PAD=16, C_PAD=32) == configs
    for c_pad in (16, 64):  # TNT-Ti, TNT-B
        (kept,) = triton_block.verified_backward(configs, {}, M_PAD=16, C_PAD=c_pad)
        assert (kept.kwargs["ROWS"], kept.num_warps) == (32, 4)
    (kept,) = triton_block.verified_backward(triton_block.BACKWARD["ieee"].configs, {}, M_PAD=16, C_PAD=64)
    assert (kept.kwargs["ROWS"], kept.num_warps) == (16, 4)


@needs_triton
def test_triton_compiles_both_kernels_for_a_hopper_gpu_without_one() -> None:
    """Triton's own compiler and ptxas (which the interpreter never runs) accept the kernels for sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(ROOT / "src")}
    script = ROOT / "benchmarks" / "gpu_compile_check.py"
    args = ["--quick", "--precisions", "bf16", "--shapes", "tnt_s"]
    res = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert res.stdout.count("REG:") == 2, res.stdout  # forward and backward


def test_inner_block_steps_aside_on_the_cpu_and_where_it_cannot_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    block = create_model("tnt_s_patch16_224", depth=1, img_size=32, drop_path_rate=0.1).blocks[0].inner.eval()
    words = torch.randn(4, 16, 24)
    assert not block.fused_kernel_applies(words)  # plain CPU tensors: the CPU has its own fast paths
    monkeypatch.setattr(inner_block, "inner_block_applies", lambda x: True)
    monkeypatch.setattr(tnt_layers, "inner_block_applies", lambda x: True)
    with torch.no_grad():
        assert block.fused_kernel_applies(words)
        with fused_attention(False):
            assert not block.fused_kernel_applies(words)  # the explicit reference path
        assert not block.fused_kernel_applies(torch.randn(4, 65, 24))  # more words than one program holds
        handle = block.attn.qkv.register_forward_hook(lambda *args: None)
        assert not block.fused_kernel_applies(words)  # a hook on a part of the block must be called
        handle.remove()
        assert block.fused_kernel_applies(words)
    assert block.train().fused_kernel_applies(words)  # training with gradients and drop-path: the backward kernel
    with deterministic_algorithms():
        assert not block.fused_kernel_applies(words)  # its atomic sums have no fixed order
        with torch.no_grad():
            assert block.fused_kernel_applies(words)
    block.attn.proj_drop.p = 0.1
    assert not block.fused_kernel_applies(words)  # dropout inside the block
    assert block.eval().fused_kernel_applies(words)  # ... is off in inference
    block.mlp.act = torch.nn.GELU(approximate="tanh")
    assert not block.fused_kernel_applies(words)  # the kernel's GELU is the exact one


@contextlib.contextmanager
def global_setting(read: Callable[[], object], write: Callable[[Any], None], value: object) -> Iterator[None]:
    """One of torch's global settings changed for the block, then restored."""
    previous = read()
    write(value)
    try:
        yield
    finally:
        write(previous)


def deterministic_algorithms() -> contextlib.AbstractContextManager[None]:
    return global_setting(torch.are_deterministic_algorithms_enabled, torch.use_deterministic_algorithms, True)


def test_branch_scales_are_drop_paths_mask_per_sentence() -> None:
    block = create_model("tnt_s_patch16_224", depth=2, img_size=32, drop_path_rate=0.5).blocks[1].inner.train()
    keep = 1 - block.drop_path.drop_prob
    scales = block.branch_scales(torch.randn(20000, 16, 24))
    assert scales.shape == (20000, 2)
    assert scales.dtype == torch.float32
    assert set(scales.unique().tolist()) == {0.0, 1 / keep}
    assert abs((scales > 0).float().mean().item() - keep) < 0.02  # each branch kept with probability keep
    assert abs(torch.corrcoef((scales > 0).float().T)[0, 1].item()) < 0.05  # the two branches independently
    assert block.eval().branch_scales(torch.randn(3, 16, 24)) is None
    assert create_model("tnt_s_patch16_224", depth=1, img_size=32).blocks[0].inner.train().branch_scales(
        torch.randn(3, 16, 24)) is None  # fmt: skip


def test_block_arguments_read_registered_and_computed_parameters() -> None:
    """The kernels' arguments come from the modules' own dicts, or, for a parameter computed on access
    (`torch.nn.utils.parametrize`), from the attribute: the kernel must see the weight the layer would use."""
    block = triton_interpreter_worker.perturbed_block(24, 4, True)
    weights, bias, heads, eps = inner_block.block_arguments(block)
    attn, mlp = block.attn, block.mlp
    expected = [block.norm1.weight, block.norm1.bias, attn.qkv.weight, attn.proj.weight, attn.proj.bias]
    expected += [block.norm2.weight, block.norm2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    assert all(a is b for a, b in zip(weights, expected, strict=True))
    assert (bias, heads, eps) == (attn.qkv.bias, 4, [1e-5, 1e-5])
    assert inner_block.block_arguments(TransformerBlock(24, 4))[1] is None  # no q/k/v bias

    class Doubled(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(mlp.fc1, "weight", Doubled())
    computed = inner_block.block_arguments(block)[0][7]
    torch.testing.assert_close(computed, mlp.fc1.weight)
    torch.testing.assert_close(computed, 2 * mlp.fc1.parametrizations.weight.original)


def test_reference_backward_is_autograd_of_the_reference_block() -> None:
    """The backward kernel's check and fallback (`reference_backward`, gradients by hand) against autograd."""
    for width, heads, words, qkv_bias in ((24, 4, 16, False), (40, 4, 9, True)):
        block = triton_interpreter_worker.perturbed_block(width, heads, qkv_bias).double()
        weights, bias, heads, eps = inner_block.block_arguments(block)
        x = torch.randn(6, words, width, dtype=torch.float64, requires_grad=True)
        scales = torch.tensor([[0.0, 1.25], [1.25, 1.25], [1.25, 0.0]], dtype=torch.float64).repeat(2, 1)
        out = inner_block.reference_block(x, weights, bias, heads, eps, scales=scales)
        grad = torch.randn_like(out)
        leaves = [x, *weights, *([bias] if qkv_bias else [])]
        expected = list(torch.autograd.grad(out, leaves, grad))
        with torch.no_grad():
            got = inner_block.reference_backward(grad, x, weights, bias, heads, eps, scales=scales)
        if not qkv_bias:
            assert not got.pop().any()  # no bias: zeros, as the kernel leaves them
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_first_use_check_runs_on_a_few_sentences_of_a_large_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its cost must not grow with the batch: a check on the first CHECK_SENTENCES, then the kernel on all."""
    block = triton_interpreter_worker.perturbed_block(24, 4, False)
    weights, bias, heads, eps = inner_block.block_arguments(block)
    x, grad = torch.randn(7, 16, 24), torch.randn(7, 16, 24)
    monkeypatch.setattr(inner_block, "_CHECKED", {})
    monkeypatch.setattr(inner_block, "CHECK_SENTENCES", 3)
    kernel_sizes, reference_sizes = [], []
    monkeypatch.setattr(inner_block, "_launch_backward", lambda g, *a, precision, **k: kernel_sizes.append(len(g))
                        or reference(g, *a, **k))  # fmt: skip
    reference = inner_block.reference_backward
    monkeypatch.setattr(inner_block, "reference_backward", lambda g, *a, **k: reference_sizes.append(len(g)) or
                        reference(g, *a, **k))  # fmt: skip
    for _ in range(2):
        got = inner_block.fused_inner_block_backward(grad, x, weights, bias, heads, eps, "ieee", None)
    assert kernel_sizes == [3, 7, 7]  # checked on 3 sentences, then trusted
    assert reference_sizes == [3]
    for a, b in zip(got, reference(grad, x, weights, bias, heads, eps), strict=True):
        torch.testing.assert_close(a, b)


def test_the_first_use_check_waits_for_finite_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 training's first steps often overflow (GradScaler's first scale): no verdict on infinities."""
    block = triton_interpreter_worker.perturbed_block(24, 4, False)
    weights, bias, heads, eps = inner_block.block_arguments(block)
    x, grad = torch.randn(3, 16, 24), torch.randn(3, 16, 24)
    monkeypatch.setattr(inner_block, "_CHECKED", {})
    monkeypatch.setattr(inner_block, "_launch_backward", lambda g, *a, **k: inner_block.reference_backward(g, *a))
    overflowed = grad.clone()
    overflowed[0, 0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inner_block.fused_inner_block_backward(overflowed, x, weights, bias, heads, eps, "fp16", None)
        assert inner_block._CHECKED == {}
        inner_block.fused_inner_block_backward(grad, x, weights, bias, heads, eps, "fp16", None)
    assert list(inner_block._CHECKED.values()) == [True]


def test_a_backward_kernel_that_disagrees_is_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    block = triton_interpreter_worker.perturbed_block(24, 4, False)
    weights, bias, heads, eps = inner_block.block_arguments(block)
    x, grad = torch.randn(3, 16, 24), torch.randn(3, 16, 24)
    expected = inner_block.reference_backward(grad, x, weights, bias, heads, eps)
    monkeypatch.setattr(inner_block, "_CHECKED", {})
    monkeypatch.setattr(inner_block, "_launch_backward", lambda *a, **k: [g * 1.01 for g in expected])
    with pytest.warns(RuntimeWarning, match="differs from the plain path"):
        got = inner_block.fused_inner_block_backward(grad, x, weights, bias, heads, eps, "ieee", None)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert list(inner_block._CHECKED.values()) == [False]


def test_a_kernel_that_fails_or_disagrees_is_switched_off_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    block = create_model("tnt_s_patch16_224", depth=1, img_size=32).blocks[0].inner.eval()
    words = torch.randn(4, 16, 24)
    expected = block.plain_forward(words)
    monkeypatch.setattr(inner_block, "_CHECKED", {})
    calls = []

    def wrong(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return x + 1

    monkeypatch.setattr(inner_block, "_launch", wrong)
    with pytest.warns(RuntimeWarning, match="differs from the plain path"):
        first = inner_block.fused_block(block, words)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = inner_block.fused_block(block, words)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert len(calls) == 1  # not tried again for this configuration

    def failing(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("PTX compile failed\nlong details")

    monkeypatch.setattr(inner_block, "_launch", failing)
    with pytest.warns(RuntimeWarning, match=r"off \(RuntimeError: PTX compile failed\); using the plain path"):
        out = inner_block.fused_block(block.double(), words.double())
    torch.testing.assert_close(out, block.plain_forward(words.double()))


def test_reference_block_is_the_plain_block() -> None:
    """The kernel's check and fallback (`reference_block`) compute what `TransformerBlock.plain_forward` does."""
    for width, heads, qkv_bias in ((24, 4, False), (40, 4, True)):
        block = triton_interpreter_worker.perturbed_block(width, heads, qkv_bias).double()
        words = torch.randn(6, 16, width, dtype=torch.float64)
        with torch.no_grad():
            reference = inner_block.reference_block(words, *inner_block.block_arguments(block))
            torch.testing.assert_close(reference, block.plain_forward(words), rtol=1e-12, atol=1e-12)


def test_only_an_export_counts_as_exporting(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.11's Dynamo folds `torch.compiler.is_exporting()` to True in every torch.compile graph (seen on an
    H200 and an H100: the compiled model ran without the fused block); the flag torch.export sets decides."""
    if not hasattr(torch.compiler, "_is_exporting_flag"):
        pytest.skip("this torch has no export flag")
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)  # as torch 2.11's Dynamo answers it
    assert not kernels.exporting_graph()
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True)  # as torch.export sets it
    assert kernels.exporting_graph()


def test_the_fused_operators_take_no_argument_with_a_default() -> None:
    """torch 2.11's dispatcher drops a trailing argument equal to its default before autograd sees the call (seen on
    an H100: drop-path's `scales=None` went missing and the backward's gradients no longer matched the inputs)."""
    for op in (torch.ops.tnt_vision.inner_block, torch.ops.tnt_vision.inner_block_backward):
        defaulted = [a.name for a in op.default._schema.arguments if a.has_default_value()]
        assert not defaulted, (op, defaulted)


def test_the_switch_keeps_the_interpreted_kernel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    words = torch.randn(4, 16, 24)
    monkeypatch.setattr(inner_block, "INTERPRETING", True)  # as if TRITON_INTERPRET=1 at import
    assert inner_block.inner_block_applies(words) == (inner_block.triton is not None)
    monkeypatch.setenv(inner_block.ENV_SWITCH, "0")
    assert not inner_block.inner_block_applies(words)


needs_gpu_triton = pytest.mark.skipif(
    not torch.cuda.is_available() or inner_block.triton is None, reason="needs a CUDA GPU and triton"
)


TNT_S_WORDS = (24, 4, 16, False)  # width, heads, words, qkv bias
EXACT, BACKWARD = triton_block.EXACT_BACKWARD_CONFIGS, triton_block.BACKWARD_CONFIGS
GPU_CASES = [("ieee", config, TNT_S_WORDS) for config in inner_block.EXACT_CONFIGS]
GPU_CASES += [("bf16", config, TNT_S_WORDS) for config in inner_block.CONFIGS]
GPU_CASES += [(precision, (64, batched, 4), TNT_S_WORDS) for precision in ("tf32", "fp16") for batched in (False, True)]
GPU_CASES += [(precision, (32 if precision == "ieee" else 64, batched, 4), shape) for precision in ("ieee", "bf16")
              for batched in (False, True) for shape in ((40, 4, 16, True), (24, 4, 9, False))]  # fmt: skip


def float32_matmul_precision(precision: str) -> contextlib.AbstractContextManager[None]:
    return global_setting(torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, precision)


def test_products_follow_the_plain_paths_precision() -> None:
    x = torch.randn(2, 16, 24)
    assert inner_block.products(x) == "ieee"
    assert inner_block.products(x.bfloat16()) == "bf16"
    assert inner_block.products(x.half()) == "fp16"
    with torch.autocast("cpu", torch.bfloat16):
        assert inner_block.products(x) == "bf16"
    with float32_matmul_precision("high"):
        assert inner_block.products(x) == "tf32"


@needs_gpu_triton
@pytest.mark.parametrize(("precision", "config", "shape"), GPU_CASES)
def test_every_gpu_configuration_matches_the_plain_block(precision: str, config: tuple, shape: tuple) -> None:
    """Each configuration the autotuner may pick, against the plain block in float64 (odd sentence counts leave the
    last program part-filled; nine words leave padded rows), as close as the plain block at that precision."""
    width, heads, words, qkv_bias = shape
    block = triton_interpreter_worker.perturbed_block(width, heads, qkv_bias).cuda()
    x = torch.randn(1001, words, width, device="cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    with torch.no_grad(), float32_matmul_precision("high" if precision == "tf32" else "highest"):
        reference = block.double().plain_forward(x.double())
        out = inner_block.inner_block(block.to(dtype), x.to(dtype), precision=precision, config=config)
        plain = block.plain_forward(x.to(dtype))

    def error(y: torch.Tensor) -> float:
        return ((y.double() - reference).norm() / reference.norm()).item()

    assert error(out) <= max(2 * error(plain), 1e-6), (error(out), error(plain))


GPU_BACKWARD_CASES = [(p, c, TNT_S_WORDS) for p in ("ieee", "bf16") for c in (EXACT if p == "ieee" else BACKWARD)]
GPU_BACKWARD_CASES += [(p, (32, 4), TNT_S_WORDS) for p in ("tf32", "fp16")]
GPU_BACKWARD_CASES += [(p, (16 if p == "ieee" else 32, 4), shape) for p in ("ieee", "bf16")
                       for shape in ((40, 4, 16, True), (24, 4, 9, False))]  # fmt: skip


@needs_gpu_triton
@pytest.mark.parametrize(("precision", "config", "shape"), GPU_BACKWARD_CASES)
def test_every_gpu_backward_configuration_matches_the_plain_block(precision: str, config: tuple, shape: tuple) -> None:
    """The backward kernel in each configuration the autotuner may pick, against float64 gradients, as close as
    the plain block's own gradients (autograd) at that precision; with drop-path's branch scales."""
    width, heads, words, qkv_bias = shape
    block = triton_interpreter_worker.perturbed_block(width, heads, qkv_bias).cuda()
    x, grad = torch.randn(1001, words, width, device="cuda"), torch.randn(1001, words, width, device="cuda")
    scales = (torch.rand(1001, 2, device="cuda") > 0.2).float() / 0.8
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    weights, bias, _, eps = inner_block.block_arguments(block.double())
    reference = inner_block.reference_backward(grad.double(), x.double(), weights, bias, heads, eps, scales=scales)
    with float32_matmul_precision("high" if precision == "tf32" else "highest"):
        low = block.to(dtype)
        fast = inner_block.inner_block_backward(low, x.to(dtype), grad.to(dtype), precision=precision,
                                                config=config, scales=scales)  # fmt: skip
        weights, bias, _, eps = inner_block.block_arguments(low)
        leaves = [x.to(dtype).requires_grad_(), *weights, *([bias] if qkv_bias else [])]
        out = inner_block.reference_block(leaves[0], weights, bias, heads, eps, scales=scales.to(dtype))
        plain = list(torch.autograd.grad(out, leaves, grad.to(dtype)))
    if not qkv_bias:
        assert not fast.pop().any()
        reference.pop()
    for name, got, own, want in zip(GRADIENT_NAMES, fast, plain, reference, strict=False):
        error = ((got.double() - want).norm() / want.norm()).item()
        assert error <= max(2 * ((own.double() - want).norm() / want.norm()).item(), 1e-6), (name, error)


GRADIENT_NAMES = ["x", "norm1.w", "norm1.b", "qkv.w", "proj.w", "proj.b", "norm2.w", "norm2.b", "fc1.w", "fc1.b"]
GRADIENT_NAMES += ["fc2.w", "fc2.b", "qkv.b"]


@needs_gpu_triton
@pytest.mark.parametrize("mode", ["fp32", "bf16_autocast"])
def test_training_on_the_gpu_matches_the_plain_path(mode: str) -> None:
    """A training step's gradients through both kernels against the explicit path (no kernel)."""
    model = create_model("tnt_s_patch16_224", depth=2, img_size=64, num_classes=10).cuda().train()
    x = torch.randn(5, 3, 64, 64, device="cuda")

    def gradients() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16, enabled=mode == "bf16_autocast"):
            model(x).float().square().mean().backward()
        return [p.grad.float() for p in model.parameters()]

    with fused_attention(False):
        reference = gradients()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = gradients()
    assert any(key[0] == "backward" and key[1].type == "cuda" and ok for key, ok in inner_block._CHECKED.items())
    tolerance = 1e-4 if mode == "fp32" else 5e-2
    for p, got, want in zip(model.parameters(), fast, reference, strict=True):
        assert (got - want).abs().max().item() <= tolerance * want.abs().max().item() + 1e-7, p.shape


@needs_gpu_triton
@pytest.mark.parametrize("mode", ["fp32", "tf32", "bf16_autocast", "fp16_autocast", "bf16_weights"])
def test_triton_inner_block_on_the_gpu_matches_the_plain_path(mode: str) -> None:
    model = create_model("tnt_s_patch16_224", depth=2, img_size=64, num_classes=10).cuda().eval()
    x = torch.randn(5, 3, 64, 64, device="cuda")
    if mode == "bf16_weights":
        model, x = model.bfloat16(), x.bfloat16()
    low = torch.float16 if mode == "fp16_autocast" else torch.bfloat16
    autocast = torch.autocast("cuda", low, enabled=mode.endswith("autocast"))
    with torch.inference_mode(), autocast, float32_matmul_precision("high" if mode == "tf32" else "highest"):
        with fused_attention(False):
            reference = model(x).float()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fast = model(x).float()
    assert any(key[1].type == "cuda" and ok for key, ok in inner_block._CHECKED.items())
    tolerance = 1e-4 if mode == "fp32" else 3e-2 * reference.abs().max().item()
    assert (fast - reference).abs().max().item() <= tolerance


@needs_gpu_triton
def test_compiled_model_on_the_gpu_keeps_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator in the graph Dynamo captures, then launched by Inductor's compiled code (the CPU twin of this
    check, under Triton's interpreter, passes: `test_triton_inner_block_matches_plain_block_under_the_interpreter`)."""
    model = create_model("tnt_s_patch16_224", depth=2, img_size=64, num_classes=10).cuda().eval()
    x = torch.randn(5, 3, 64, 64, device="cuda")
    graphs = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append({str(node.target) for node in gm.graph.nodes})
        return gm.forward

    calls = []
    launch = inner_block._launch
    monkeypatch.setattr(inner_block, "_launch", lambda *a, **k: calls.append(1) or launch(*a, **k))
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        with fused_attention(False):
            reference = model(x).float()
        torch.compile(model, backend=recording, fullgraph=True)(x)
        assert any("tnt_vision.inner_block" in target for target in graphs[0]), sorted(graphs[0])
        calls.clear()
        torch._dynamo.reset()  # Inductor next, not the recorded graph again
        compiled = torch.compile(model, fullgraph=True)(x).float()
    assert len(calls) == 2  # one per inner block, inside the compiled graph
    assert (compiled - reference).abs().max().item() <= 3e-2 * reference.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_short_word_attention_on_the_gpu_matches_sdpa_with_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Explicit products for the words' attention (`layers.short_on_gpu`) against the fused attention kernels."""
    model = create_model("tnt_s_patch16_224", depth=2, img_size=64, num_classes=10).cuda()
    x = torch.randn(5, 3, 64, 64, device="cuda")
    explicit = forward_backward(model, x)
    monkeypatch.setattr(tnt_layers, "SHORT_SEQUENCE", 0)
    fused = forward_backward(model, x)
    for a, b in zip(explicit, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- the add-and-norm Triton kernel (GPU inference) -------------------------------------------------------------


def check_add_norm_differences(diffs: dict[str, float]) -> None:
    """fp32 results within rounding of the plain operators'; 16-bit ones equal but for the rare element rounded
    the other way (the plain path sums a row in another order)."""
    for width in add_norm_worker.WIDTHS:
        for name in ("norm", "add_and_norm", "add_normed"):
            for mode in add_norm_worker.MODES:
                case = f"{name}_{width}_{mode}"
                assert diffs[f"{case}_fp32"] <= 1e-6, (case, diffs)
                assert diffs[f"{case}_16bit"] <= 1e-2, (case, diffs)
                assert diffs[f"{case}_mismatch"] <= 1e-2, (case, diffs)


def check_add_norm_models(diffs: dict[str, float]) -> None:
    for name, per_block in (("tnt_s_patch16_224", 4), ("tnt_b_patch16_224", 4), ("deit_s_patch16_224", 2)):
        assert diffs[f"{name}_fp32"] <= 1e-5, (name, diffs)
        assert diffs[f"{name}_autocast"] <= 3e-2, (name, diffs)
        for mode in ("fp32", "autocast"):  # each of the 2 blocks' norms, and the first-use checks' samples
            assert 2 * per_block <= diffs[f"{name}_{mode}_launches"] <= 4 * per_block, (name, mode, diffs)


@needs_triton
def test_add_norm_kernel_matches_the_plain_operators_under_the_interpreter(tmp_path: Path) -> None:
    diffs = interpreted("add_norm_worker.py", tmp_path)
    check_add_norm_differences(diffs)
    check_add_norm_models(diffs)


@needs_gpu_triton
def test_add_norm_kernel_on_the_gpu_matches_the_plain_operators() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_add_norm_differences(add_norm_worker.kernel_differences("cuda"))
        check_add_norm_models(add_norm_worker.model_differences("cuda"))
    assert any(key[0].type == "cuda" for key in add_norm._CHECKED)


def test_add_norm_steps_aside_where_it_cannot_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training, graph capture, rows it cannot address, hooks and the explicit path take the plain operators."""
    monkeypatch.setattr(add_norm, "inner_block_applies", lambda x: True)  # as on a GPU
    x, y = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    assert add_norm.add_norm_applies(x, y)
    assert not add_norm.add_norm_applies(x, y.requires_grad_())
    with torch.no_grad():
        assert add_norm.add_norm_applies(x, y)
    assert not add_norm.add_norm_applies(torch.randn(2, 5, add_norm.MAX_WIDTH + 1))
    assert not add_norm.add_norm_applies(x.transpose(1, 2))
    norm = tnt_layers.LayerNorm(24)
    assert not norm.fused_on_gpu(x)  # its parameters record gradients
    with torch.no_grad():
        assert norm.fused_on_gpu(x)
        with fused_attention(False):
            assert not norm.fused_on_gpu(x)
        norm.register_forward_hook(lambda *args: None)
        assert not norm.fused_on_gpu(x)
    model = create_model("tnt_s_patch16_224", depth=1, img_size=32).eval()
    proj, sentences, words = model.blocks[0].word_proj, torch.randn(2, 5, 384), torch.randn(8, 16, 24)
    with torch.no_grad():
        assert proj.fused_on_gpu(sentences, words)
        proj.norm2.register_forward_hook(lambda *args: None)
        assert not proj.fused_on_gpu(sentences, words)
    legacy = create_model("tnt_s_legacy_patch16_224", depth=1, img_size=32).eval().blocks[0].word_proj
    with torch.no_grad():
        assert not legacy.fused_on_gpu(sentences, words)  # no second norm to fuse


def test_an_add_norm_kernel_that_disagrees_is_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """One warning, the plain operators' result then and after, no second try for the configuration."""
    monkeypatch.setattr(add_norm, "_CHECKED", {})
    calls = []

    def wrong(x: torch.Tensor, y: torch.Tensor, total: torch.Tensor, normed: torch.Tensor, *args: object) -> None:
        calls.append(1)
        total.copy_(x + y + 1)
        normed.copy_(x)

    monkeypatch.setattr(add_norm, "_launch", wrong)
    norm, x, y = add_norm_worker.perturbed_norm(24), torch.randn(3, 5, 24), torch.randn(3, 5, 24)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="add-and-norm kernel off .*differs from the plain path"):
            first = add_norm.add_and_norm(x, y, norm)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = add_norm.add_and_norm(x, y, norm)
        for total, normed in (first, second):
            torch.testing.assert_close(total, x + y)
            torch.testing.assert_close(normed, norm(x + y))
    assert len(calls) == 1
