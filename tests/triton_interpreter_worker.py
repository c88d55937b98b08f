"""Run with TRITON_INTERPRET=1: the fused Triton inner block on CPU tensors (Triton's interpreter) against the
plain `TransformerBlock`, block by block (differences relative to the output's size) and through whole models
(logits), and the backward kernel against the plain operators' gradients, block by block and through training
steps; writes the measured differences to argv[1]."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

from helpers import forward_backward
from tnt_vision.kernels import inner_block as ib
from tnt_vision.models import create_model
from tnt_vision.models.layers import TransformerBlock, fused_attention

BLOCKS = {  # name: (width, heads, words, qkv_bias, sentences); 13 sentences leave the last program part-filled
    "tnt_s": (24, 4, 16, False, 13),
    "tnt_b_qkv_bias": (40, 4, 16, True, 13),
    "nine_words": (24, 4, 9, False, 5),
    "one_head_64_words": (32, 1, 64, False, 3),
}


def perturbed_block(width: int, heads: int, qkv_bias: bool) -> TransformerBlock:
    block = TransformerBlock(width, heads, qkv_bias=qkv_bias).eval()
    with torch.no_grad():
        for p in block.parameters():  # LayerNorm 1/0 and zero biases would hide indexing mistakes
            p.add_(0.2 * torch.randn_like(p))
    return block


VARIANTS = {"masked": (64, False, 4), "batched": (128, True, 4)}  # the two attention layouts of ib.CONFIGS


def block_differences() -> dict[str, float]:
    """Every block in both attention layouts, fp32 (exact products), bf16, TF32 and fp16."""
    diffs = {}
    for name, (width, heads, words, qkv_bias, sentences) in BLOCKS.items():
        block = perturbed_block(width, heads, qkv_bias)
        x = torch.randn(sentences, words, width)
        with torch.no_grad():
            reference = block.plain_forward(x)
            scale = max(1.0, reference.abs().max().item())
            low_block, half_block = copy.deepcopy(block).bfloat16(), copy.deepcopy(block).half()
            for variant, config in VARIANTS.items():
                out = ib.inner_block(block, x, config=config)
                diffs[f"{name}_{variant}"] = (out - reference).abs().max().item() / scale
                low = ib.inner_block(low_block, x.bfloat16(), precision="bf16", config=config)
                diffs[f"{name}_{variant}_bf16"] = (low.float() - reference).abs().max().item() / scale
                tf32 = ib.inner_block(block, x, precision="tf32", config=config)  # operands rounded to TF32
                diffs[f"{name}_{variant}_tf32"] = (tf32 - reference).abs().max().item() / scale
                half = ib.inner_block(half_block, x.half(), precision="fp16", config=config)
                diffs[f"{name}_{variant}_fp16"] = (half.float() - reference).abs().max().item() / scale
    return diffs


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest error over a list of tensors, each relative to its own largest value."""
    return max(
        (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-12)
        for a, b in zip(got, want, strict=True)
    )


def backward_differences() -> dict[str, float]:
    """The backward kernel (and the forward with drop-path's branch scales) against the plain operators, every
    block, fp32 in two tile sizes, bf16, TF32 and fp16."""
    diffs = {}
    for name, (width, heads, words, qkv_bias, sentences) in BLOCKS.items():
        block = perturbed_block(width, heads, qkv_bias)
        x, scales = torch.randn(sentences, words, width), torch.tensor([[0.0, 2.0], [1.25, 0.0]]).repeat(8, 1)
        scales = scales[:sentences]
        args = ib.block_arguments(block)
        out = ib.inner_block(block, x, scales=scales)
        diffs[f"{name}_scaled"] = relative_error([out], [ib.reference_block(x, *args, scales=scales)])
        grad = torch.randn_like(x)
        expected = ib.reference_backward(grad, x, *args, scales=scales)
        for rows in (16, 32):
            got = ib.inner_block_backward(block, x, grad, scales=scales, config=(rows, 4))
            diffs[f"{name}_backward_{rows}"] = relative_error(got, expected)
        got = ib.inner_block_backward(block, x, grad, scales=scales, config=(16, 4), slots=1)  # all in one copy
        diffs[f"{name}_backward_one_slot"] = relative_error(got, expected)
        for precision, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32), ("fp16", torch.float16)):
            low = copy.deepcopy(block).to(dtype)
            got = ib.inner_block_backward(low, x.to(dtype), grad.to(dtype), precision=precision, scales=scales)
            diffs[f"{name}_backward_{precision}"] = relative_error(got, expected)
    return diffs


def training_differences() -> dict[str, float]:
    """A training step's gradients through the kernels (eager, and compiled with AOTAutograd) against the
    explicit path, TNT-S with and without q/k/v bias."""
    diffs = {}
    with counted("_launch_backward") as calls:
        for name in ("tnt_s_patch16_224", "tnt_b_patch16_224"):
            model = create_model(name, depth=2, img_size=32, num_classes=10).train()
            x = torch.randn(3, 3, 32, 32)
            with fused_attention(False):
                _, reference = forward_backward(model, x)
            diffs[f"train_{name}"] = relative_error(forward_backward(model, x)[1], reference)
            if name == "tnt_s_patch16_224":
                compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
                diffs["train_compiled"] = relative_error(forward_backward(compiled, x)[1], reference)
    diffs["backward_calls"] = len(calls)
    diffs["train_checkpointed"] = checkpointing_difference()
    return diffs


def checkpointing_difference() -> float:
    """Gradients with drop-path through the kernels, with and without checkpointing (which runs each block again
    in backward): the same masks must be drawn again, so the same seed gives the same gradients."""
    model = create_model("tnt_s_patch16_224", depth=2, img_size=32, num_classes=10, drop_path_rate=0.5).train()
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(1)
    _, plain = forward_backward(model, x)
    model.set_grad_checkpointing()
    torch.manual_seed(1)
    _, checkpointed = forward_backward(model, x)
    return relative_error(checkpointed, plain)


def model_differences() -> dict[str, float]:
    diffs = {"eager_operator_calls": 0}  # eager inference calls the checked kernel itself, not the operator
    with counted("_launch") as calls:
        for name in ("tnt_s_patch16_224", "tnt_b_patch16_224", "tnt_s_legacy_patch16_224"):
            model = create_model(name, depth=2, img_size=32, num_classes=10).eval()
            x = torch.randn(3, 3, 32, 32)
            with torch.inference_mode():
                with fused_attention(False):
                    reference = model(x)
                with counted("fused_inner_block") as operator_calls:
                    diffs[name] = max((model(x) - reference).abs().max().item() for _ in range(2))  # checked, trusted
                diffs["eager_operator_calls"] += len(operator_calls)
                if name == "tnt_s_patch16_224":  # torch.compile keeps the operator in one graph (no break)
                    compiled = torch.compile(model, backend="eager", fullgraph=True)
                    diffs["compiled"] = (compiled(x) - reference).abs().max().item()
    diffs["kernel_calls"] = len(calls)
    return diffs


@contextlib.contextmanager
def counted(name: str, module: ModuleType = ib) -> Iterator[list[int]]:
    """The calls of the kernel launcher `module.<name>` while the block runs (one entry each)."""
    calls: list[int] = []
    original = getattr(module, name)
    setattr(module, name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    try:
        yield calls
    finally:
        setattr(module, name, original)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    warnings.simplefilter("error")  # a kernel the first-use check switched off must fail the test
    results = {**block_differences(), **backward_differences(), **training_differences()}
    results |= model_differences()
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
