"""The fused (default) attention path against the explicit reference path, and the bench command.

The fused path (`scaled_dot_product_attention`) is what `create_model(...)` runs; the explicit path
(`fused_attention(False)`: softmax weights from `Attention.attention_map`, then a matmul) is the reference that
FLOP counters and attention visualisation rely on. Parity with timm is in test_models.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import statistics
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest
import torch

from helpers import forward_backward, randomize_
from tnt_vision import bench, kernels
from tnt_vision.bench import (
    BenchConfig,
    ab_parser,
    baseline_memory_mib,
    build_step,
    make_inputs,
    model_ab_times,
    onnxruntime_options,
    operator_medians_ms,
    peak_memory_mib,
    saved_bytes,
    timm_equivalent,
    within,
)
from tnt_vision.cli import main
from tnt_vision.kernels import emulated_bf16, onednn
from tnt_vision.models import create_model, layers, tnt
from tnt_vision.models.layers import Attention, Mlp, TransformerBlock, fused_attention, lean_path, parts_hooked

TINY = {"depth": 2, "img_size": 32, "num_classes": 10}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("name", "overrides"),
    [("tnt_s_patch16_224", {}), ("tnt_s_legacy_patch16_224", {}), ("tnt_s_se_patch16_224", {"tnt_blocks": (1,)})],
    ids=["tnt_s", "legacy", "hybrid_se"],
)
def test_fused_path_matches_explicit_path(name: str, overrides: dict, dtype: torch.dtype) -> None:
    model = create_model(name, **TINY, **overrides).train()
    x = torch.randn(2, 3, 32, 32)
    fused, fused_grads = forward_backward(model, x, dtype)
    with fused_attention(False):
        plain, plain_grads = forward_backward(model, x, dtype)
    assert_close_with_gradients(model, (fused, fused_grads), (plain, plain_grads), TOLERANCE[dtype])


def assert_close_with_gradients(model: torch.nn.Module, fast: tuple, reference: tuple, tol: float) -> None:
    """Outputs within `tol` (absolute), each parameter's gradient within `tol` of its largest entry."""
    torch.testing.assert_close(fast[0], reference[0], atol=tol, rtol=0)
    names = (n for n, _ in model.named_parameters())
    for name, g_fast, g_ref in zip(names, fast[1], reference[1], strict=True):
        assert (g_fast - g_ref).abs().max() <= tol * g_ref.abs().max().clamp_min(1e-12), name


def test_bf16_autocast_stays_close_to_fp32_reference() -> None:
    model = create_model("tnt_s_patch16_224", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        with fused_attention(False):
            reference = model(x)
        with torch.autocast("cpu", torch.bfloat16):
            fast = model(x).float()
    assert (fast - reference).abs().max() <= 0.05 * reference.abs().max()


@pytest.mark.parametrize("norm", [False, True], ids=["linear", "norm_linear"])
def test_fused_linear_computes_what_autocast_computes(norm: bool) -> None:
    """linear(x) and linear(LayerNorm(x)) through fp32 GEMMs: autocast's bf16 results, forward and backward."""
    x = torch.randn(3, 50, 384, requires_grad=True)
    linear = torch.nn.Linear(384, 1152)
    layer_norm = randomized(torch.nn.LayerNorm(384)) if norm else None
    grad = torch.randn(3, 50, 1152)
    results = []
    for emulate in (True, False):
        with torch.autocast("cpu", torch.bfloat16):
            if emulate:
                y = emulated_bf16.fused_linear(x, linear, emulated_bf16.BF16, layer_norm)
            else:
                y = linear(x if layer_norm is None else layer_norm(x))
        (y.float() * grad).sum().backward()
        params = [*linear.parameters(), *(() if layer_norm is None else layer_norm.parameters())]
        results.append([y, x.grad, *(p.grad for p in params)])
        x.grad = None
        for p in params:
            p.grad = None
    for emulated, native in zip(*results, strict=True):
        assert emulated.dtype == native.dtype
        # bf16 results: equal up to one rounding step of the last bit (sums in another order)
        torch.testing.assert_close(emulated.float(), native.float(), rtol=1e-2, atol=1e-2 * native.abs().max().item())


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial norm weights and biases, so that their gradients and effect are tested."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def test_bf16_emulation_matches_native_autocast_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced on (whatever this CPU has), the fp32-GEMM route gives autocast's results, forward and backward; so do
    the same lean functions with bf16 GEMMs, which training takes where the CPU multiplies bf16."""
    model = create_model("tnt_s_patch16_224", **TINY).train()
    x = torch.randn(2, 3, 32, 32)
    calls: Counter[str] = Counter()

    def counted(name: str) -> Callable[..., torch.Tensor]:
        function = getattr(emulated_bf16, name)
        return lambda *args, **kwargs: calls.update([name]) or function(*args, **kwargs)

    for where, name in [("layers", "fused_linear"), ("tnt", "fused_linear"), ("layers", "fused_mlp")]:
        monkeypatch.setattr(f"tnt_vision.models.{where}.{name}", counted(name))
    monkeypatch.setattr("tnt_vision.models.layers.attention_projection_bf16", counted("attention_projection_bf16"))
    monkeypatch.setattr(emulated_bf16, "native_bf16", lambda: False)
    emulated = forward_backward(model, x, torch.bfloat16)
    # per block (2): inner and outer q/k/v, the word projection; the sentence embedding; the head
    assert calls == {"fused_linear": 2 * 3 + 2, "fused_mlp": 2 * 2, "attention_projection_bf16": 2 * 2}
    monkeypatch.setattr(emulated_bf16, "native_bf16", lambda: True)
    monkeypatch.setattr(emulated_bf16, "bf16_hardware", lambda: False)  # bf16 arithmetic autocast alone knows
    native = forward_backward(model, x, torch.bfloat16)
    assert sum(calls.values()) == 8 + 4 + 4  # not used
    assert_close_with_gradients(model, emulated, native, TOLERANCE[torch.bfloat16])
    monkeypatch.setattr(emulated_bf16, "bf16_hardware", lambda: True)  # x86 with bf16 products: bf16 GEMMs
    lean = forward_backward(model, x, torch.bfloat16)
    # the lean functions of the blocks and the sentence embedding; the head and the attention as autocast's
    assert calls == {"fused_linear": 8 + 2 * 3 + 1, "fused_mlp": 4 + 2 * 2, "attention_projection_bf16": 4}
    assert_close_with_gradients(model, lean, native, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("part", ["mlp", "word_attention", "attention", "block"])
def test_bf16_emulated_parts_match_autocast_and_keep_bf16_only(part: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLP, attention and whole block under emulated bf16: autocast's results, keeping only bf16 activations
    (and the block's fp32 residual stream) for backward."""
    tokens, dim, heads = (16, 24, 4) if part != "attention" else (50, 64, 2)  # TNT's words, then its sentences
    parts = {"mlp": lambda: Mlp(dim, 4 * dim), "block": lambda: TransformerBlock(dim, heads)}
    module = randomized(parts.get(part, lambda: Attention(dim, heads))()).train()
    x = torch.randn(3, tokens, dim, requires_grad=True)
    results = []
    for native in (True, False):
        monkeypatch.setattr(emulated_bf16, "native_bf16", lambda native=native: native)
        x.grad = None
        out, grads = forward_backward(module, x, torch.bfloat16)
        results.append((out, grads, x.grad.clone()))
    (native_out, native_grads, native_input_grad), (out, grads, input_grad) = results
    assert_close_with_gradients(module, (out, grads), (native_out, native_grads), TOLERANCE[torch.bfloat16])
    assert (input_grad - native_input_grad).abs().max() <= TOLERANCE[torch.bfloat16] * native_input_grad.abs().max()

    with torch.autocast("cpu", torch.bfloat16):
        _, kept = saved_bytes(lambda: module(x), ignore=list(module.parameters()))
    if part == "mlp":
        assert kept == 2 * x.numel() * (1 + 4)  # bf16 input and hidden activation (the GELU is recomputed)
    elif part == "block":
        # fp32 input and mid-block residual (with each norm's mean and 1/std), bf16 q/k/v and MLP hidden layer:
        # no LayerNorm output (recomputed from the residual), no GELU output, no attention output (recomputed)
        per_token = 4 * (dim + 2) * 2 + 2 * (3 * dim + 4 * dim)
        assert kept == x.shape[0] * tokens * per_token
    else:  # the bf16 input of the q/k/v layer and its output; the fp32 attention is recomputed for backward
        assert kept == 2 * x.numel() * (1 + 3)


def test_bf16_attention_recomputed_with_the_same_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The attention recomputed in backward draws the forward's dropout mask again: gradients as if it were kept."""
    monkeypatch.setattr(emulated_bf16, "native_bf16", lambda: False)
    module = randomized(Attention(24, 4, attn_drop=0.5)).train()
    x = torch.randn(3, 16, 24)
    results = []
    for checkpointed in (False, True):
        if checkpointed:  # a hook on the projection: torch.utils.checkpoint of the attention, then the projection
            module.proj.register_forward_hook(lambda *args: None)
        torch.manual_seed(0)
        results.append(forward_backward(module, x, torch.bfloat16))
    assert_close_with_gradients(module, results[0], results[1], 1e-6)


def test_bf16_emulation_steps_aside(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 8)
    monkeypatch.setattr(emulated_bf16, "native_bf16", lambda: False)
    assert not emulated_bf16.emulating_bf16(x)  # no autocast
    with torch.autocast("cpu", torch.float16):
        assert not emulated_bf16.emulating_bf16(x)
    with torch.autocast("cpu", torch.bfloat16):
        assert emulated_bf16.emulating_bf16(x)
        assert not emulated_bf16.emulating_bf16(x.double())  # autocast does not touch float64
        monkeypatch.setenv("TNT_VISION_CPU_KERNELS", "0")
        assert not emulated_bf16.emulating_bf16(x)
        monkeypatch.delenv("TNT_VISION_CPU_KERNELS")
        monkeypatch.setattr(emulated_bf16, "native_bf16", lambda: True)
        assert not emulated_bf16.emulating_bf16(x)


@pytest.mark.skipif(not onednn.available(), reason="this PyTorch has no oneDNN")
@pytest.mark.parametrize(
    ("name", "overrides"),
    [("tnt_s_patch16_224", {}), ("tnt_s_legacy_patch16_224", {}), ("tnt_s_se_patch16_224", {"tnt_blocks": (1,)})],
    ids=["tnt_s", "legacy", "hybrid_se"],
)
def test_onednn_inference_matches_explicit_path(name: str, overrides: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    model = randomize_(create_model(name, **TINY, **overrides)).eval()
    x = torch.randn(2, 3, 32, 32)
    calls: Counter[str] = Counter()
    for module, fn in ((onednn, "linear"), (onednn, "linear_add"), (layers, "word_block")):
        original = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, f=original, n=fn, **k: calls.update([n]) or f(*a, **k))
    with torch.inference_mode():
        fast = model(x)
        with fused_attention(False):
            plain = model(x)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    if name == "tnt_s_patch16_224" and kernels.kernels_available():  # per block (2): the inner one by the CPU
        # kernel; the outer one's q/k/v, MLP and 2 residual projections; the word projections, the head
        assert calls == {"word_block": 2, "linear": 2 * (2 + 1) + 2, "linear_add": 2 * 2}
    elif name == "tnt_s_patch16_224":  # without the CPU kernels, the inner blocks by oneDNN too
        assert calls == {"linear": 2 * (2 * 2 + 1) + 2, "linear_add": 2 * 2 * 2}
    else:
        assert calls["linear"] > 0


@pytest.mark.skipif(
    not (onednn.available() and emulated_bf16.bf16_hardware()), reason="this CPU has no bf16 products for oneDNN"
)
def test_onednn_bf16_autocast_inference_computes_what_autocast_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast on a CPU with bf16 products: autocast's linear layers (bf16 operands, bias and output,
    GELU on the rounded output), one oneDNN call each; the whole model within bf16 rounding of the explicit path."""
    x, weight, bias = torch.randn(2, 7, 16) * 3, torch.randn(32, 16), torch.randn(32)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        expected = torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias))
        out = onednn.linear(x, weight, bias, gelu=True)
        assert out.dtype == torch.bfloat16
        # one bf16 step at most: the same bf16 product up to the order of the GEMM's additions
        torch.testing.assert_close(out, expected, atol=1e-30, rtol=2**-7)
        residual = torch.randn(2, 7, 32)
        out = onednn.linear_add(x, weight, bias, residual)  # the fp32 residual stream stays fp32
        torch.testing.assert_close(out, residual + torch.nn.functional.linear(x, weight, bias), atol=0, rtol=0)

    model = randomize_(create_model("tnt_s_patch16_224", **TINY)).eval()
    calls: Counter[str] = Counter()
    original = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda *a, **k: calls.update(["linear"]) or original(*a, **k))
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        fast = model(images).float()
        with fused_attention(False):
            plain = model(images).float()
    assert calls["linear"] > 0
    assert (fast - plain).abs().max() <= TOLERANCE[torch.bfloat16] * plain.abs().max()


@pytest.mark.skipif(
    not (onednn.available() and emulated_bf16.bf16_hardware()), reason="this CPU has no bf16 products for oneDNN"
)
def test_bf16_training_products_are_onednn_linear_layers_computing_autocasts_linear() -> None:
    """bf16 training's lean functions multiply by oneDNN's linear layer (the bias in its epilogue, no copy into the
    output first): autocast's bf16 linear up to the order of the sums, and the same gradients as with ATen's
    products (`benchmarks/lean_linear_ab.py`'s other contender), whose sizes are the model's."""
    ab = benchmark_module("lean_linear_ab")
    assert ab.layers(create_model("tnt_s_patch16_224").cfg, batch=32)["outer fc1"] == (6304, 384, 1536)
    x, weight, bias = torch.randn(2, 7, 16).bfloat16(), torch.randn(32, 16).bfloat16(), torch.randn(32).bfloat16()
    out = emulated_bf16._bf16_product(x, weight, bias)
    with torch.autocast("cpu", torch.bfloat16):
        expected = torch.nn.functional.linear(x, weight, bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=1e-30, rtol=2**-7)

    model = randomize_(create_model("tnt_s_patch16_224", **TINY)).train()
    images = torch.randn(2, 3, 32, 32)
    calls: Counter[str] = Counter()
    original = torch.ops.mkldnn._linear_pointwise

    def counted(*args: object) -> torch.Tensor:
        calls.update(["onednn"])
        return original(*args)

    with mock.patch.object(torch.ops.mkldnn, "_linear_pointwise", counted):
        out, grads = forward_backward(model, images, torch.bfloat16)
    assert calls["onednn"] > 0
    with ab.aten_products():
        aten_out, aten_grads = forward_backward(model, images, torch.bfloat16)
    torch.testing.assert_close(out, aten_out, atol=1e-2, rtol=2**-6)
    for a, b in zip(grads, aten_grads, strict=True):
        assert (a - b).abs().max() <= TOLERANCE[torch.bfloat16] * b.abs().max().clamp(min=1e-6)


def test_explicit_bf16_attention_computes_the_explicit_paths_attention_and_gradient(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`explicit_attention_bf16` (bf16 training's outer attention on a CPU with bf16 products): the explicit path's
    output under bf16 autocast and its gradient for the projection, within one bf16 step (the softmax kernel's
    exponential is not ATen's); against float64 within bf16's rounding. Taken in bf16 training only, not with
    attention dropout or in the explicit path."""
    attn = Attention(64, 4).train()
    qkv = (torch.randn(3, 11, 192) * 2).bfloat16().requires_grad_()
    grad = torch.randn(3, 11, 64).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        out, kept = saved_bytes(lambda: emulated_bf16.explicit_attention_bf16(qkv, 4, attn.scale), ignore=[qkv])
        with fused_attention(False):
            expected = attn.mix(qkv)
    assert kept == qkv.numel() * 2  # q, k and v in bf16; the weights are recomputed in backward
    torch.testing.assert_close(out, expected, atol=1e-2 * expected.abs().max().item(), rtol=2**-7)
    (grad_qkv,) = torch.autograd.grad(out, qkv, grad)
    (expected_grad,) = torch.autograd.grad(expected, qkv, grad)
    torch.testing.assert_close(grad_qkv, expected_grad, atol=1e-2 * expected_grad.abs().max().item(), rtol=2**-7)
    wide = qkv.detach().double().requires_grad_()
    q, k, v = wide.view(3, 11, 3, 4, 16).permute(2, 0, 3, 1, 4)
    exact = (torch.softmax(q @ k.transpose(-2, -1) * attn.scale, -1) @ v).transpose(1, 2).reshape(3, 11, 64)
    (exact_grad,) = torch.autograd.grad(exact, wide, grad.double())
    assert (out.double() - exact).abs().max() <= 2e-2 * exact.abs().max()
    assert (grad_qkv.double() - exact_grad).abs().max() <= 3e-2 * exact_grad.abs().max()

    monkeypatch.setattr(emulated_bf16, "bf16_hardware", lambda: True)
    monkeypatch.setattr(emulated_bf16, "amx_tiles", lambda: True)
    with torch.autocast("cpu", torch.bfloat16):
        assert attn.explicit_bf16_applies(qkv)
        assert not attn.explicit_bf16_applies(qkv.float())
        assert not attn.explicit_bf16_applies(qkv.detach())  # no gradient recorded: inference, with AMX SDPA's
        with fused_attention(False):
            assert not attn.explicit_bf16_applies(qkv)
        assert not Attention(64, 4, attn_drop=0.1).train().explicit_bf16_applies(qkv)
        ab = benchmark_module("explicit_attention_ab")  # its contenders: the explicit path, SDPA, ATen's softmax
        with ab.explicit_path():
            assert not attn.explicit_bf16_applies(qkv)
        with ab.sdpa():  # scaled_dot_product_attention, as where bf16 is not multiplied in hardware
            assert not attn.explicit_bf16_applies(qkv)
            assert not layers.bf16_training_on_cpu(qkv)
            by_sdpa = attn.mix(qkv)
        torch.testing.assert_close(by_sdpa, out, atol=1e-2 * out.abs().max().item(), rtol=2**-7)
        with ab.atens_softmax():
            with_atens = emulated_bf16.explicit_attention_bf16(qkv, 4, attn.scale)
        torch.testing.assert_close(with_atens, out, atol=1e-2 * out.abs().max().item(), rtol=2**-7)
        with ab.kept_weights():  # the same weights kept: the same bits
            with_weights, kept_too = saved_bytes(lambda: emulated_bf16.explicit_attention_bf16(qkv, 4, attn.scale))
        assert torch.equal(torch.autograd.grad(with_weights, qkv, grad)[0], grad_qkv)
        assert kept_too == kept + 3 * 4 * 11 * 11 * 2
    assert not attn.explicit_bf16_applies(qkv)  # no autocast


@pytest.mark.parametrize("epilogue", [False, True, None], ids=["aten", "epilogue", "default"])
def test_onednn_gelu_in_place_or_as_epilogue(epilogue: bool | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if not onednn.available():
        pytest.skip("this PyTorch has no oneDNN")
    monkeypatch.setattr(onednn, "GELU_EPILOGUE", epilogue)
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert onednn.gelu_epilogue(torch.float32) == (avx512 if epilogue is None else epilogue)
    assert onednn.gelu_epilogue(torch.bfloat16) == bool(epilogue)  # autocast rounds the product before its GELU
    x, weight, bias = torch.randn(2, 7, 16) * 3, torch.randn(32, 16), torch.randn(32)
    with torch.inference_mode():
        expected = torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias))
        torch.testing.assert_close(onednn.linear(x, weight, bias, gelu=True), expected, atol=1e-5, rtol=0)


def test_onednn_steps_aside() -> None:
    x = torch.randn(2, 16, 8)
    block = TransformerBlock(8, 2).eval()
    assert not onednn.onednn_applies(x)  # gradients are recorded
    with torch.no_grad():
        assert onednn.onednn_applies(x) == onednn.available()
        assert not onednn.onednn_applies(x.double())
        with torch.autocast("cpu", torch.bfloat16):  # autocast's bf16 products, where the CPU has them
            assert onednn.onednn_applies(x) == (onednn.available() and emulated_bf16.bf16_hardware())
            assert not onednn.onednn_applies(x.double())
        with torch.autocast("cpu", torch.float16):
            assert not onednn.onednn_applies(x)
        assert block.onednn_forward_applies(x) == onednn.available()
        assert not block.train().onednn_forward_applies(x)  # dropout and drop-path would be skipped
        block.eval().norm2.register_forward_hook(lambda *args: None)
        assert not block.onednn_forward_applies(x)


def test_explicit_path_computes_every_attention_through_attention_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """The attention-visualisation contract: inner and outer weights come from `attention_map` and are used."""
    model = create_model("tnt_s_patch16_224", **TINY).eval()
    seen: list[tuple[int, ...]] = []
    original = Attention.attention_map

    def recording(self: Attention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        weights = original(self, q, k)
        seen.append(tuple(weights.shape))
        return torch.zeros_like(weights)  # zero weights must change the output if they are really used

    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode(), fused_attention(False):
        reference = model(x)
        monkeypatch.setattr(Attention, "attention_map", recording)
        zeroed = model(x)
    words, sentences = model.cfg.num_words, 1 + (32 // 16) ** 2
    inner = (2 * 4, model.cfg.inner_heads, words, words)
    outer = (2, model.cfg.outer_heads, sentences, sentences)
    assert seen == [inner, outer] * TINY["depth"]
    assert not torch.allclose(reference, zeroed)


def test_bf16_training_on_a_cpu_with_bf16_products_attends_by_explicit_products(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """There `scaled_dot_product_attention`'s backward is slow: the sentences' attention takes explicit products
    (`explicit_attention_bf16`; the words' the kernel), with SDPA's results; CPUs without bf16 products, and
    inference on one with AMX, keep SDPA."""
    attention = randomized(Attention(64, 2)).train()
    x = torch.randn(3, 70, 64, requires_grad=True)  # more tokens than the word kernel takes
    calls: list[int] = []
    original = layers.explicit_attention_bf16
    monkeypatch.setattr(layers, "explicit_attention_bf16", lambda *a: calls.append(1) or original(*a))
    results = []
    for hardware in (True, False):
        monkeypatch.setattr(emulated_bf16, "bf16_hardware", lambda hardware=hardware: hardware)
        monkeypatch.setattr(emulated_bf16, "native_bf16", lambda: True)  # autocast's own bf16 products either way
        x.grad = None
        out, grads = forward_backward(attention, x, torch.bfloat16)
        results.append((out, grads, x.grad.clone()))
        assert calls == [1]  # the explicit products once, with bf16 products only
    (explicit, explicit_grads, explicit_input_grad), (sdpa, sdpa_grads, sdpa_input_grad) = results
    assert_close_with_gradients(attention, (explicit, explicit_grads), (sdpa, sdpa_grads), TOLERANCE[torch.bfloat16])
    assert (explicit_input_grad - sdpa_input_grad).abs().max() <= 3e-2 * sdpa_input_grad.abs().max()
    monkeypatch.setattr(emulated_bf16, "bf16_hardware", lambda: True)
    monkeypatch.setattr(emulated_bf16, "amx_tiles", lambda: True)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        attention(x)
    assert calls == [1]


def test_bf16_inference_without_amx_attends_by_explicit_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU that multiplies bf16 by AVX512-BF16 alone (no AMX tiles): bf16 inference's sentences' attention takes
    `explicit_attention_bf16`, with SDPA's results (within bf16's rounding; both near the fp32 output); with AMX,
    SDPA."""
    attention = randomized(Attention(64, 2)).eval()
    x = torch.randn(3, 70, 64)  # more tokens than the word kernel takes
    calls: list[int] = []
    original = layers.explicit_attention_bf16
    monkeypatch.setattr(layers, "explicit_attention_bf16", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(emulated_bf16, "bf16_hardware", lambda: True)
    monkeypatch.setattr(emulated_bf16, "native_bf16", lambda: True)  # autocast's own bf16 products either way
    outputs = {}
    ab = benchmark_module("explicit_attention_ab")  # its inference contenders: amx_tiles answering no, then yes
    for amx in (False, True):
        with ab.amx_says(amx), torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
            outputs[amx] = attention(x).float()
        assert calls == [1]  # without AMX only
    torch.testing.assert_close(outputs[False], outputs[True], atol=2e-2 * outputs[True].abs().max().item(), rtol=0)
    with torch.inference_mode():
        reference = attention(x)
    for out in outputs.values():
        assert (out - reference).abs().max() <= TOLERANCE[torch.bfloat16] * reference.abs().max()


def test_default_path_does_not_call_attention_map(monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_model("tnt_ti_patch16_224", **TINY).eval()
    monkeypatch.setattr(Attention, "attention_map", lambda *a: pytest.fail("fused path used attention_map"))
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))


def test_timm_equivalent_has_our_architecture() -> None:
    cfg = create_model("tnt_ti_patch16_224", **TINY).cfg
    ours = sum(p.numel() for p in create_model("tnt_ti_patch16_224", **TINY).parameters())
    assert sum(p.numel() for p in timm_equivalent(cfg).parameters()) == ours


def test_bench_command_writes_json(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "tnt_ti_patch16_224", "--img-size", "32", "--batch", "2", "--runs", "2"]
    args += ["--warmup", "0", "--against", "timm", "--no-memory", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert [r["contender"] for r in report["results"]] == ["tnt_ti_patch16_224", "timm"]
    first = report["results"][0]
    assert first["images_per_s"] > 0
    assert len(first["step_ms_all"]) == 2
    assert first["latency_ms"] > 0
    assert first["speed_ratio_rounds"] == [1.0, 1.0]
    timm = report["results"][1]
    ours_ms, timm_ms = first["step_ms_all"], timm["step_ms_all"]
    assert timm["speed_ratio_rounds"] == pytest.approx([a / b for a, b in zip(ours_ms, timm_ms, strict=True)])
    assert timm["spread"] == pytest.approx(abs(timm_ms[0] - timm_ms[1]) / statistics.median(timm_ms))
    assert report["machine"]["threads"] >= 1
    assert report["machine"]["torch"] == torch.__version__
    assert "images/s" in capsys.readouterr().out


def test_bench_table_gives_the_ratios_range_over_rounds_and_notes_noisy_runs() -> None:
    """Per round, each contender's speed relative to ours (both timed in that round) and how far a contender's
    runs spread: one note under the table for each contender whose runs spread more than `NOISY_SPREAD`."""
    cfg = BenchConfig(model="tnt_s_patch16_224", against=("timm",), runs=3, memory=False, latency=False)
    times = {"tnt_s_patch16_224": [1.0, 1.5, 1.1], "timm": [1.4, 1.45, 1.5]}
    rows = [
        {"contender": name, **bench.timed(t, times[cfg.model], 32), "latency_ms": None, "peak_mib": None}
        for name, t in times.items()
    ]
    for row in rows:
        row |= {"speed_ratio": row["images_per_s"] / rows[0]["images_per_s"], "memory_ratio": None}
    assert rows[0]["spread"] == pytest.approx(0.5 / 1.1)
    assert rows[1]["speed_ratio_rounds"] == pytest.approx([1 / 1.4, 1.5 / 1.45, 1.1 / 1.5])
    report = {"machine": bench.machine(), "config": asdict(cfg), "results": rows}
    table = bench.format_table(report).splitlines()
    assert "0.73 (0.71-1.03)" in next(line for line in table if line.startswith("timm "))
    notes = [line for line in table if line.startswith("note:")]
    assert len(notes) == 1
    assert "tnt_s_patch16_224's timed runs spread 45%" in notes[0]


def test_bench_compile_wraps_every_pytorch_contender(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    compiled: list[str] = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(type(module).__module__) or module)
    args = ["bench", "--model", "tnt_ti_patch16_224", "--img-size", "32", "--batch", "2", "--runs", "1"]
    args += ["--against", "timm", "--no-memory", "--no-latency", "--compile"]
    assert main([*args, "--warmup", "0"]) == 2  # compilation would be timed
    assert "--warmup >= 1" in capsys.readouterr().err
    assert main([*args, "--warmup", "1"]) == 0
    assert compiled == ["tnt_vision.models.tnt", "timm.models.tnt"]
    assert "torch.compile" in capsys.readouterr().out


def test_bench_frees_the_timed_models_before_the_memory_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the probes' fresh processes share the device: the timed models' memory must be given back first
    (an H100 ran out of memory probing timm's TNT-B while the timing process held 54 GiB)."""
    built: list[weakref.ref] = []

    def build_module(*args: object) -> torch.nn.Module:
        module = original(*args)
        built.append(weakref.ref(module))
        return module

    def probe(name: str, cfg: BenchConfig) -> float:
        assert [ref() for ref in built] == [None, None], f"a timed model is alive while {name} is probed"
        return 1.0

    original = bench.build_module
    monkeypatch.setattr(bench, "build_module", build_module)
    monkeypatch.setattr(bench, "peak_memory_mib", probe)
    cfg = BenchConfig(model="tnt_ti_patch16_224", against=("timm",), batch=2, img_size=32, runs=1, warmup=0)
    report = bench.run_benchmark(replace(cfg, latency=False))
    assert [row["peak_mib"] for row in report["results"]] == [1.0, 1.0]


@pytest.mark.slow
def test_bench_training_step_and_fresh_process_memory() -> None:
    cfg = BenchConfig(model="tnt_ti_patch16_224", batch=2, img_size=32, train=True, runs=1, warmup=0)
    # parameters, gradients and AdamW's two moments: at least 4 fp32 copies of the weights above the imports
    weights_mib = 4 * 4 * sum(p.numel() for p in create_model("tnt_ti_patch16_224").parameters()) / 2**20
    assert peak_memory_mib("tnt_ti_patch16_224", cfg) - baseline_memory_mib() > weights_mib


def test_bench_rejects_what_onnxruntime_cannot_measure(capsys: pytest.CaptureFixture) -> None:
    args = ["bench", "--model", "tnt_ti_patch16_224", "--img-size", "32", "--batch", "2", "--train"]
    assert main([*args, "--against", "onnxruntime", "--no-memory"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_bench_onnxruntime_threads_sleep_between_runs() -> None:
    """Spinning onnxruntime workers would take the cores from the contender timed after it."""
    pytest.importorskip("onnxruntime")
    options = onnxruntime_options()
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert options.get_session_config_entry(key) == "0"
    assert options.intra_op_num_threads == torch.get_num_threads()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("part", ["mlp", "block"])
def test_lean_training_path_matches_plain_and_keeps_less(part: str, dtype: torch.dtype) -> None:
    """fp32/fp64 training: the fused MLP and the block with fused norms, against the plain layers."""
    tokens, dim = 16, 24
    module = (Mlp(dim, 4 * dim) if part == "mlp" else TransformerBlock(dim, 4)).to(dtype).train()
    randomized(module)
    x = torch.randn(5, tokens, dim, dtype=dtype, requires_grad=True)
    grad = torch.randn(5, tokens, dim, dtype=dtype)

    def run(lean: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        module.zero_grad(set_to_none=True)
        x.grad = None
        with fused_attention(lean):
            assert lean_path(module, x) == (lean, None)
            out, kept = saved_bytes(lambda: module(x), ignore=list(module.parameters()))
        out.backward(grad)
        return out.detach(), [x.grad, *(p.grad for p in module.parameters())], kept

    lean_out, lean_grads, lean_kept = run(True)
    plain_out, plain_grads, plain_kept = run(False)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(lean_out, plain_out, atol=tol, rtol=tol)
    for lean_g, plain_g in zip(lean_grads, plain_grads, strict=True):
        torch.testing.assert_close(lean_g, plain_g, atol=tol, rtol=tol)
    activation = x.numel() * x.element_size()
    # not kept: the GELU output (4 activations wide) and, in the block, both LayerNorms' outputs
    assert lean_kept <= plain_kept - activation * (4 if part == "mlp" else 6)


def test_lean_path_steps_aside_where_it_would_change_behaviour() -> None:
    def lean(mlp: Mlp, x: torch.Tensor) -> bool:
        return lean_path(mlp, x)[0] and mlp.fusable()

    x = torch.randn(2, 4, 8, requires_grad=True)
    assert lean(Mlp(8, 32).train(), x)
    assert not lean(Mlp(8, 32, drop=0.1).train(), x)  # dropout between the layers
    assert lean(Mlp(8, 32, drop=0.1).eval(), x)
    with torch.no_grad():
        assert not lean(Mlp(8, 32), x)
    with torch.autocast("cpu", torch.bfloat16):  # lean unless autocast's own bf16 products are all there is
        expected = not emulated_bf16.native_bf16() or emulated_bf16.bf16_hardware()
        assert lean(Mlp(8, 32), x) == expected
        with torch.no_grad():  # inference: lean under emulation only
            assert lean(Mlp(8, 32), x) == (not emulated_bf16.native_bf16())
    with fused_attention(False):
        assert not lean(Mlp(8, 32), x)
    frozen = Mlp(8, 32).requires_grad_(False)
    assert not lean(frozen, x.detach())
    assert lean(frozen, x)  # gradients still flow to the input
    hooked = Mlp(8, 32)
    seen = []
    hooked.fc1.register_forward_hook(lambda *args: seen.append(1))
    assert not lean(hooked, x)  # the hook must see fc1 called
    hooked(x)
    assert seen == [1]
    block = TransformerBlock(8, 2).train()
    assert lean_path(block, x)[0]
    block.norm1.register_forward_hook(lambda *args: seen.append(2))
    assert not lean_path(block, x)[0]
    block(x).sum().backward()
    assert seen == [1, 2]


def test_never_steps_aside_predicates_called_with_keywords(monkeypatch: pytest.MonkeyPatch) -> None:
    """The A/B scripts put `bench.never` in place of fast paths' predicates, some called with keywords
    (`add_norm_applies(x, norm=...)`, which every LayerNorm asks): the model runs with it. On the CPU that predicate
    says no anyway, so the outputs agree; what fails without keywords is the call (as `gpu_add_norm.py` did)."""
    for module in (layers, tnt):
        monkeypatch.setattr(module, "add_norm_applies", bench.never)
    model = randomize_(create_model("tnt_s_patch16_224", **TINY)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        stepped_aside = model(x)
    monkeypatch.undo()
    with torch.inference_mode():
        torch.testing.assert_close(stepped_aside, model(x))


@pytest.mark.skipif(
    not (onednn.available() and onednn._packing_available()), reason="this PyTorch cannot pack oneDNN weights"
)
def test_onednn_packed_weights_follow_the_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed weights are remade after every kind of change to a parameter, and dropped in training mode."""
    monkeypatch.setattr(layers, "word_block_applies", bench.never)  # every linear layer by oneDNN, the inner too
    model = randomize_(create_model("tnt_s_patch16_224", **TINY))
    x = torch.randn(2, 3, 32, 32)
    linear_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def check() -> None:
        with torch.inference_mode():
            fast = model.eval()(x)
            with fused_attention(False):
                plain = model(x)
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)

    check()
    assert all(onednn._PACKED.get(id(w)) for w in linear_weights)
    model.load_state_dict(randomize_(create_model("tnt_s_patch16_224", **TINY)).state_dict())  # in place
    check()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()(x).square().mean().backward()
    assert not any(onednn._PACKED.get(id(w)) for w in linear_weights)
    check()
    optimizer.step()  # in place, after the packing
    check()
    for weight in linear_weights:  # new storage, same version counter
        weight.data = torch.randn_like(weight) * 0.05
    check()
    weight = model.head.weight
    weight.data = weight.data[:, :-1].contiguous()  # a narrower head's weight: another shape
    model.head.in_features -= 1
    with torch.inference_mode():
        packed = onednn.packed(weight, 2)
    assert packed.shape == weight.shape


@pytest.mark.skipif(
    not (onednn.available() and onednn._packing_available()), reason="this PyTorch cannot pack oneDNN weights"
)
def test_onednn_packed_weights_go_with_their_parameter() -> None:
    """The packed copies (and biases cast to bf16) are kept by the tensor's id: its entry goes when the tensor does,
    never met by a tensor that reuses the id; `release` empties the entry and keeps it (one finalizer a tensor)."""
    layer = torch.nn.Linear(8, 4)
    key = id(layer.weight)
    with torch.inference_mode():
        low = onednn.cast(layer.bias, torch.bfloat16)
        assert onednn.cast(layer.bias, torch.bfloat16) is low
        assert torch.equal(low, layer.bias.to(torch.bfloat16))
    with torch.no_grad():
        layer.bias.add_(1.0)  # in place: a new version
    with torch.inference_mode():
        assert torch.equal(onednn.cast(layer.bias, torch.bfloat16), layer.bias.to(torch.bfloat16))
    with torch.inference_mode():
        first = onednn.packed(layer.weight, 2)
        assert onednn.packed(layer.weight, 2) is first  # packed once
    onednn.release([layer.weight])
    assert onednn._PACKED[key] == {}
    with torch.inference_mode():
        assert onednn.packed(layer.weight, 2) is not first
    del layer, first
    assert key not in onednn._PACKED


def test_profiler_labels_only_while_a_profiler_records() -> None:
    assert isinstance(kernels.profiled("tnt_vision::layer_norm"), contextlib.nullcontext)
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu) as profile, kernels.profiled("tnt_vision::a_label"):
        torch.ones(2).sum()
    assert "tnt_vision::a_label" in {event.name for event in profile.events()}


def test_parts_hooked_finds_a_hook_at_any_depth() -> None:
    """Forward hooks and pre-hooks on children, grandchildren and deeper count; the module's own do not (it is
    called), nor other kinds of hook, nor an empty slot."""
    block = TransformerBlock(8, 2)
    block.register_module("absent", None)
    block.register_forward_hook(lambda *args: None)
    block.register_full_backward_hook(lambda *args: None)
    assert not parts_hooked(block)
    for part in (block.norm1, block.attn.qkv, block.mlp.act):
        for register in (part.register_forward_hook, part.register_forward_pre_hook):
            handle = register(lambda *args: None)
            assert parts_hooked(block)
            assert parts_hooked(block.attn) == (part is block.attn.qkv)
            handle.remove()
            assert not parts_hooked(block)


def test_onednn_leaves_inference_weights_unpacked() -> None:
    with torch.inference_mode():
        weight = torch.randn(4, 3)
    assert onednn.packed(weight, 2) is weight


def benchmark_module(name: str) -> ModuleType:
    """A script of benchmarks/ imported as a module."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ab_scripts_share_a_command_line_and_run_a_contender_within_its_context() -> None:
    """`bench.ab_parser` and `bench.within`, which the A/B scripts of benchmarks/ build their contenders with."""
    args = ab_parser("an A/B script\nmore", rounds=7).parse_args(["--train"])
    assert (args.model, args.batch, args.rounds, args.threads, args.train) == ("tnt_s_patch16_224", 32, 7, 0, True)
    assert not hasattr(ab_parser("inference only", rounds=3, train=False).parse_args([]), "train")
    entered: list[bool] = []

    @contextlib.contextmanager
    def stepped_aside() -> Iterator[None]:
        entered.append(True)
        yield

    variant = within(lambda x: x * 2, stepped_aside)
    assert [variant(torch.tensor(1.0)).item(), variant(torch.tensor(2.0)).item()] == [2.0, 4.0]
    assert entered == [True, True]  # a fresh context at every call


def test_gpu_host_profiles_a_forward_on_the_cpu_too() -> None:
    """`benchmarks/gpu_host.py`'s measures, on the CPU (its --device cpu): the issue time, the profiler's host
    entries under the GPU's busy time (none here), and cProfile's count and listings of the Python calls."""
    gpu_host = benchmark_module("gpu_host")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    x = torch.randn(4, 8)
    assert bench.issue_seconds(model, x, "cpu") > 0
    lines = gpu_host.host_operators(model, x, "cpu", top=3)
    assert lines[0] == "GPU busy 0.00 ms (kernels' device time summed)"
    assert len(lines) == 4
    assert any(line.startswith("aten::") for line in lines[1:])
    calls, *listings = gpu_host.python_functions(model, x, "cpu", top=5)
    assert calls > 3
    assert len(listings) == 3
    for listing in listings:  # the header, then the top 5 functions: the modules' calls among them
        assert listing.splitlines()[0].split()[:2] == ["ncalls", "tottime"]
        assert len(listing.splitlines()) == 6
        assert "_call_impl" in listing


def test_ab_scripts_time_operators_and_the_whole_model_alternating() -> None:
    """`bench.operator_medians_ms` and `bench.model_ab_times`: every contender timed each round, the variant's
    context entered at each of its calls (`BenchConfig`'s two warm-up calls, then the rounds)."""
    calls: list[str] = []
    ms = operator_medians_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert set(ms) == {"a", "b"}
    assert all(t >= 0 for t in ms.values())
    assert calls.count("a") == calls.count("b") == 4  # one warm-up call, three rounds
    entered: list[bool] = []

    @contextlib.contextmanager
    def stepped_aside() -> Iterator[None]:
        entered.append(True)
        yield

    args = ab_parser("an A/B script", rounds=2).parse_args(["--model", "tnt_ti_patch16_224", "--batch", "1"])
    times = model_ab_times(args, {"as is": None, "aside": stepped_aside}, others={"other": torch.nn.Identity()})
    assert set(times) == {"as is", "aside", "other"}
    assert all(len(t) == 2 for t in times.values())
    assert len(entered) == 4


def test_ab_scripts_share_the_whole_model_line_and_the_mlp_sizes() -> None:
    """`bench.model_ab_line` (each contender's median, the others over the first) and `bench.mlp_layers` (the MLP
    layers' rows, inputs and outputs at a batch), which the A/B scripts print and time at."""
    args = ab_parser("an A/B script", rounds=2).parse_args(["--train", "--batch", "8"])
    line = bench.model_ab_line(args, {"ours": 100.0, "theirs": 150.0}, "bf16")
    assert line == "tnt_s_patch16_224 training step, batch 8, bf16: ours 100 ms, theirs 150 ms (1.500x)"
    sizes = bench.mlp_layers(create_model("tnt_s_patch16_224").cfg, batch=32)
    assert sizes == {
        "inner fc1": (100352, 24, 96),
        "inner fc2": (100352, 96, 24),
        "outer fc1": (6304, 384, 1536),
        "outer fc2": (6304, 1536, 384),
    }


def test_bf16_ab_steps_each_piece_of_the_bf16_path_aside(monkeypatch: pytest.MonkeyPatch) -> None:
    """`benchmarks/bf16_ab.py`'s "previous" contender: no bf16 word or GELU kernel, oneDNN, bf16 norms, explicit
    attention or larger micro-batches under bf16 autocast; fp32 as it is."""
    ab = benchmark_module("bf16_ab")
    monkeypatch.setattr(emulated_bf16, "bf16_hardware", lambda: True)
    qkv, x = torch.randn(2, 16, 72).bfloat16(), torch.randn(2, 16, 24, requires_grad=True)

    def bf16_pieces() -> list[bool]:
        with torch.autocast("cpu", torch.bfloat16):
            with torch.no_grad():
                pieces = [layers.word_attention_applies(qkv, 16, 6), layers.onednn_applies(x)]
                pieces += [kernels.elementwise_applies(qkv)]
                pieces += [layers.native_bf16_autocast(x), tnt.BF16_BLOCK_BYTES > tnt.CACHE_BLOCK_BYTES]
            return [*pieces, layers.bf16_training_on_cpu(x)]

    available = kernels.kernels_available()
    expected = [available, onednn.available(), available, True, True, True]
    assert bf16_pieces() == expected
    with ab.previous_bf16_path():
        assert bf16_pieces() == [False] * 6
        assert layers.word_attention_applies(qkv.float(), 16, 6) == available
        assert kernels.elementwise_applies(qkv.float()) == available
    assert bf16_pieces() == expected


def test_bias_sums_ab_steps_the_kernel_sums_aside_for_the_same_gradients() -> None:
    """`benchmarks/bias_sums_ab.py`: the training step's bias gradients summed by the kernels (the column sums, the
    GELU backward's) as it is, by ATen's sum within `aten_sums`, the same gradients either way; the shapes it
    times are the model's."""
    ab = benchmark_module("bias_sums_ab")
    sizes = ab.gradients(create_model("tnt_s_patch16_224").cfg, batch=32)
    assert sizes == {
        "inner fc1": (100352, 96),
        "inner fc2, projection": (100352, 24),
        "outer fc1": (6304, 1536),
        "outer fc2, projection": (6304, 384),
    }
    model = create_model("tnt_ti_patch16_224", depth=2, img_size=32).train()
    x = torch.randn(2, 3, 32, 32)

    def grads_and_sums() -> tuple[list[torch.Tensor], int]:
        with torch.profiler.profile() as profile:
            grads = forward_backward(model, x)[1]
        return grads, sum(e.name == "tnt_vision::column_sums" for e in profile.events())

    kernel_grads, kernel_sums = grads_and_sums()
    with ab.aten_sums():
        aten_grads, aten_sums = grads_and_sums()
    assert aten_sums == 0
    assert kernel_sums >= (2 * 2 if kernels.kernels_available() else 0)  # at least a block's MLP and projection
    for a, b in zip(kernel_grads, aten_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_fused_inner_block_keeps_only_its_input_for_backward() -> None:
    """`benchmarks/saved_activations.py`: autograd's saved bytes, plain block against the fused operator."""
    saved = benchmark_module("saved_activations")
    model = create_model("tnt_ti_patch16_224", depth=1).train()
    block = model.blocks[0].inner
    words = torch.randn(196, 16, 12, requires_grad=True)
    plain, fused = saved.kept_bytes(block, words, list(model.parameters()))
    assert fused == words.numel() * 4  # the fp32 input, nothing else
    assert plain > 8 * fused


def test_time_breakdown_sorts_operators_into_products_attention_and_rest(tmp_path: Path) -> None:
    breakdown = benchmark_module("time_breakdown")
    assert breakdown.kind("aten::addmm") == breakdown.kind("mkldnn::_linear_pointwise") == "products"
    assert breakdown.kind("tnt_vision::word_attention_backward") == "attention"
    assert breakdown.kind("aten::native_layer_norm") == "rest"
    cfg = BenchConfig(model="tnt_ti_patch16_224", against=("timm",), batch=2, img_size=32, runs=2, warmup=1)
    steps = {name: build_step(name, cfg, tmp_path) for name in cfg.contenders}
    inputs = make_inputs(cfg, cfg.batch)
    medians = breakdown.breakdown(steps, inputs, cfg)
    for m in medians.values():
        assert m["products"] > 0
        assert m["attention"] > 0
        assert m["rest"] >= 0  # the operators' self times lie inside the timed call
    assert "bound with these products" in breakdown.report(cfg, medians, threads=1)
    shapes = breakdown.product_shapes(steps["timm"], inputs[0], top=2)
    assert len(shapes) == 2
    assert all("GFLOP/s" in line for line in shapes)
    operators = breakdown.costliest_operators(steps[cfg.model], inputs[0], top=3)
    assert len(operators) == 3
    assert all(" calls, " in line for line in operators)


def test_host_overhead_times_equivalent_narrow_models_and_counts_their_calls() -> None:
    """`benchmarks/host_overhead.py`: ours and timm's TNT at the same narrow widths (the same parameters), DeiT-S
    beside them; the Python calls of a forward counted, the fast path's and the explicit path's apart."""
    host = benchmark_module("host_overhead")
    models = host.contenders("tnt_s_patch16_224")
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert sizes["tnt-vision"] == sizes["timm TNT"] > sizes["timm DeiT-S"]
    ours = models["tnt-vision"]
    assert (ours.cfg.outer_dim, len(ours.blocks)) == (24, 12)
    with torch.inference_mode():  # the sentences by the layers, as TNT-S's 197 tokens of 384
        assert not any(block.outer.cpu_kernel_applies(torch.randn(1, 5, 24)) for block in ours.blocks)
    cfg = BenchConfig(model="tnt_s_patch16_224", batch=1, img_size=32)
    step = bench.inference_step(ours, cfg)
    x = torch.randn(1, 3, 32, 32)
    assert host.per_forward(2)(step, x) > 0
    fast = host.python_calls(step, x)
    with fused_attention(False):
        explicit = host.python_calls(step, x)
    assert min(fast, explicit) > 1000
    assert fast != explicit  # the count sees which path ran


def test_kernels_revision_ab_builds_from_a_revision_and_serves_the_model_from_a_build(tmp_path: Path) -> None:
    """`benchmarks/kernels_revision_ab.py`: a revision's kernel sources from git (one clear line for a revision
    without them), each operator call at the model's sizes, and the model's kernel calls served by a given build."""
    ab = benchmark_module("kernels_revision_ab")
    if not (ab.ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = ab.revision_sources("HEAD", tmp_path)
    assert sorted(p.name for p in written.iterdir()) == sorted(kernels.SOURCES + kernels.HEADERS)
    assert all(p.stat().st_size > 0 for p in written.iterdir())
    with pytest.raises(SystemExit, match="--against no-such-revision: no src/tnt_vision/kernels/"):
        ab.revision_sources("no-such-revision", tmp_path)
    build = kernels.cpu_kernels()
    if build is None:
        pytest.skip("the CPU kernels could not be compiled here")
    calls = ab.operator_calls(create_model("tnt_ti_patch16_224").cfg, batch=1, dtype=torch.bfloat16)
    assert len(calls) == 7
    for function, call in calls.values():
        assert hasattr(build, function)
        ab.check_same(call(build), call(build), bf16=True)
    stand_in = object()
    with ab.answering(stand_in):
        assert kernels.cpu_kernels() is stand_in
    assert kernels.cpu_kernels() is build
