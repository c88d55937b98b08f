"""Optional kernels: here the CPU ones (word attention, narrow LayerNorm and its backward, GELU's backward),
compiled once per machine on first use (torch's C++ extension builder, cached); in `inner_block` the inner
transformer block as Triton kernels (forward and backward) for GPUs.

Nothing needs them: without a C++ compiler, on other devices and dtypes, or with `TNT_VISION_CPU_KERNELS=0`, every
layer takes its plain PyTorch path, which computes the same function.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import platform
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch

ENV_SWITCH = "TNT_VISION_CPU_KERNELS"
_DIR = Path(__file__).parent
SOURCES = ("cpu_kernels.cpp", "word_attention.cpp", "rows.cpp", "word_block.cpp")  # and the headers they include
HEADERS = ("cpu_kernels.h", "lanes.h")
# No -ffast-math: NaN and infinity keep their meaning; reassociation lets the compiler vectorise the reductions.
# C++20 (std::bit_cast): torch's extensions build as C++20 from 2.14 on, as C++17 before; the later flag wins.
_CFLAGS = [
    "-std=c++20",
    "-O3",
    "-fopenmp",
    "-march=native",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fassociative-math",
    "-fno-signed-zeros",
]
log = logging.getLogger(__name__)
Answer = TypeVar("Answer")


def profiled(name: str) -> AbstractContextManager[Any]:
    """The profiler's label for a kernel's call (`record_function`), entered only while a profiler records: entering
    one costs about 7 us and a dozen Python calls, 60 times a TNT-S forward."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


def asked_once(probe: Callable[[], Answer]) -> Callable[[], Answer]:
    """`probe` (a fact of this machine or this PyTorch) run at its first call only, its answer kept (`cache_clear`
    forgets it), and read by torch.compile as a constant where Dynamo meets it: a plain function marked so, where
    Dynamo would trace through `functools.cache`'s wrapper (with a warning) into probes it cannot trace."""
    answers: list[Answer] = []

    @functools.wraps(probe)
    def ask() -> Answer:
        if not answers:
            answers.append(probe())
        return answers[0]

    ask.cache_clear = answers.clear  # type: ignore[attr-defined]
    return torch.compiler.assume_constant_result(ask)


def switched_on(switch: str) -> bool:
    """Whether the environment leaves a fast path on: only the value "0" turns one off."""
    return os.environ.get(switch, "1") != "0"


def _machine_key(flags: list[str], directory: Path = _DIR) -> str:
    """What the compiled code depends on: the source, flags, torch, and this CPU (`-march=native`)."""
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text(errors="replace").splitlines()
        cpu += "".join(line for line in lines if line.startswith(("model name", "flags", "Features")))[:4096]
    sources = [(directory / name).read_bytes() for name in _present(SOURCES + HEADERS, directory)]
    material = [*sources, " ".join(flags).encode(), torch.__version__.encode(), cpu.encode()]
    return hashlib.sha256(b"\0".join(material)).hexdigest()[:12]


def _present(names: tuple[str, ...], directory: Path) -> list[str]:
    """The files of `names` in `directory`: all of them here; an earlier revision's sources (`build_cpu_kernels`'
    directory) may predate some."""
    return [name for name in names if (directory / name).exists()]


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None (with one warning) where it cannot be built."""
    if not switched_on(ENV_SWITCH):
        return None
    try:
        return build_cpu_kernels()
    except Exception as error:  # no compiler, no ninja, an unusual platform: the plain path still works
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(
            f"tnt_vision: CPU kernels unavailable ({reason}); using the plain PyTorch path "
            f"(set {ENV_SWITCH}=0 to skip the attempt)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def build_cpu_kernels(*defines: str, directory: Path = _DIR) -> ModuleType:
    """Compiles the CPU kernels, or loads this machine's cached build, with extra preprocessor definitions (a
    benchmark's variant: `TNT_VISION_LANES=8` builds the 8-lane kernels on an AVX-512 CPU), from the sources in
    `directory` (another revision's, for `benchmarks/kernels_revision_ab.py`)."""
    from torch.utils import cpp_extension

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" is not news here
    flags = [*_CFLAGS, *(f"-D{define}" for define in defines)]
    log.info("compiling tnt_vision's CPU kernels (once per machine, about a minute)")
    return cpp_extension.load(
        name=f"tnt_vision_cpu_{_machine_key(flags, directory)}",
        sources=[str(directory / name) for name in _present(SOURCES, directory)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def _kernels() -> ModuleType:
    module = cpu_kernels()
    if module is None:  # only reachable by calling the op directly: `word_attention_applies` checks first
        raise RuntimeError("tnt_vision's CPU kernels are not available on this machine")
    return module


# Registered operators rather than an autograd.Function, so that torch.compile keeps the kernel in its graph
# (an opaque call with a known output shape) instead of tracing the plain attention.
@torch.library.custom_op("tnt_vision::word_attention", mutates_args=(), device_types="cpu")
def _word_attention(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    return _kernels().word_attention_forward(qkv, heads, scale)


@_word_attention.register_fake
def _(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    return qkv.new_empty((*qkv.shape[:-1], qkv.shape[-1] // 3))


@torch.library.custom_op("tnt_vision::word_attention_backward", mutates_args=(), device_types="cpu")
def _word_attention_backward(grad: torch.Tensor, qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    return _kernels().word_attention_backward(grad, qkv, heads, scale)


@_word_attention_backward.register_fake
def _(grad: torch.Tensor, qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    return torch.empty_like(qkv)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    qkv, ctx.heads, ctx.scale = inputs
    ctx.save_for_backward(qkv)  # contiguous (see word_attention); backward recomputes the probabilities from it


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    (qkv,) = ctx.saved_tensors
    return _word_attention_backward(grad, qkv, ctx.heads, ctx.scale), None, None


_word_attention.register_autograd(_backward, setup_context=_setup_context)


def _kernel(name: str, operator: Any, *arguments: Any) -> Any:
    """The compiled kernel `name` on `arguments`: called directly in eager (no operator dispatch on the host path;
    profiled under the operator's name), and under torch.compile through its registered `operator`, one opaque call
    in the graph (the lean training functions of `emulated_bf16` are traced with their kernels)."""
    if torch.compiler.is_compiling():
        return operator(*arguments)
    with profiled(operator._qualname):
        return getattr(_kernels(), name)(*arguments)


@torch.library.custom_op("tnt_vision::layer_norm", mutates_args=(), device_types="cpu")
def _layer_norm_operator(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, bf16_output: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().layer_norm(x, weight, bias, eps, bf16_output)


@_layer_norm_operator.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, bf16_output: bool) -> tuple[Any, ...]:
    statistics = x.new_empty((*x.shape[:-1], 1))
    return torch.empty_like(x, dtype=torch.bfloat16 if bf16_output else x.dtype), statistics, statistics.clone()


@torch.library.custom_op("tnt_vision::layer_norm_backward", mutates_args=(), device_types="cpu")
def _layer_norm_backward_operator(
    grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().layer_norm_backward(grad, x, mean, rstd, weight)


@_layer_norm_backward_operator.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> tuple:
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


# The gradient is written over `grad`; without `sums` the second output is empty (an operator returns no None).
@torch.library.custom_op("tnt_vision::gelu_backward_and_value", mutates_args=("grad",), device_types="cpu")
def _gelu_backward_and_value_operator(
    grad: torch.Tensor, x: torch.Tensor, sums: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    value, column_sums = _kernels().gelu_backward_and_value(grad, x, sums)
    return value, x.new_empty(0, dtype=torch.float32) if column_sums is None else column_sums


@_gelu_backward_and_value_operator.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, sums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[-1] if sums else 0, dtype=torch.float32)


@torch.library.custom_op("tnt_vision::softmax_rows", mutates_args=(), device_types="cpu")
def _softmax_rows_operator(x: torch.Tensor) -> torch.Tensor:
    return _kernels().softmax_rows(x)


@_softmax_rows_operator.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("tnt_vision::column_sums", mutates_args=(), device_types="cpu")
def _column_sums_operator(x: torch.Tensor) -> torch.Tensor:
    return _kernels().column_sums(x)


@_column_sums_operator.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[-1], dtype=torch.float32)


# LayerNorm rows at most this wide take the compiled forward kernel with an fp32 output; over wide rows ATen's is as
# fast. On the AVX2 development machine (calls from Python, 2 threads, medians), forward over 25088 rows of 24
# channels 0.55 against 0.87 ms, 50176 rows of 12 1.38 against 2.19, 15680 of 40 0.45 against 0.60; backward 0.54
# against 0.75, 1.62 against 2.84, 0.84 against 0.84. Over 1576 rows of 384, ATen's forward 0.19 ms against the
# kernel's 0.20. The backward kernel takes rows of any width: on the AVX-512 machine over 6304 rows of 384, 1.03
# against ATen's 1.45 ms (fp32 gradient), 1.29 against 2.02 (bf16 gradient, ATen's after a widening copy).
MAX_NARROW_ROW = 64


def native_layer_norm(
    x: torch.Tensor,
    shape: list[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    bf16_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`torch.native_layer_norm` (output, mean, 1/std), by the compiled kernel where it applies. With `bf16_output`
    the output is rounded to bf16, by the kernel as it writes it at any row width (else in a second pass)."""
    widest = math.inf if bf16_output else MAX_NARROW_ROW
    if weight is not None and bias is not None and narrow_layer_norm_applies(x, shape, weight, bias, widest):
        return narrow_layer_norm(x, weight, bias, eps, bf16_output)
    out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
    return out.to(torch.bfloat16) if bf16_output else out, mean, rstd


def narrow_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, bf16_output: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compiled LayerNorm over x's last dimension (output, mean, 1/std); call where it applies. With
    `bf16_output` the output is rounded to bf16 as it is written (what a bf16 linear layer after it takes)."""
    arguments = x.contiguous(), weight.contiguous(), bias.contiguous(), eps, bf16_output
    return _kernel("layer_norm", _layer_norm_operator, *arguments)


def native_layer_norm_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    shape: list[int],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    needs: list[bool],
) -> tuple[torch.Tensor | None, ...]:
    """`aten::native_layer_norm_backward` (the gradients of x, weight and bias, None where `needs` says no), by the
    compiled kernel for fp32 x at any row width, with an fp32 or bf16 gradient (a bf16 linear layer's, read as it
    is: no widened copy), where the forward kernel would apply and mean and 1/std are fp32 CPU tensors too."""
    fits = grad.device.type == "cpu" and grad.dtype in (torch.float32, torch.bfloat16)
    fits = fits and all(map(cpu_fp32, (mean, rstd))) and not grad_recorded((grad, mean, rstd))
    if fits and weight is not None and bias is not None and narrow_layer_norm_applies(x, shape, weight, bias, math.inf):
        arguments = [t.contiguous() for t in (grad, x, mean, rstd, weight)]
        grads = _kernel("layer_norm_backward", _layer_norm_backward_operator, *arguments)
        return tuple(g if need else None for g, need in zip(grads, needs, strict=True))
    grad = grad.to(x.dtype)
    return tuple(torch.ops.aten.native_layer_norm_backward(grad, x, shape, mean, rstd, weight, bias, needs))


def narrow_layer_norm_applies(
    x: torch.Tensor,
    shape: list[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    widest: float = MAX_NARROW_ROW,
) -> bool:
    """Whether the compiled LayerNorm takes this call: rows of at most `widest` fp32 values on the CPU, with
    weight and bias, where no gradient is recorded (inference, and inside the lean functions of `emulated_bf16`,
    which keep the statistics it returns for `native_layer_norm_backward`), outside exported graphs."""
    if len(shape) != 1 or shape[0] > widest or weight is None or bias is None:
        return False
    if not all(map(cpu_fp32, (x, weight, bias))) or grad_recorded((x, weight, bias)):
        return False
    return not exporting_graph() and kernels_available()


def gelu_backward_and_value(
    grad: torch.Tensor, x: torch.Tensor, sums: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(grad * gelu'(x), gelu(x), and with `sums` that gradient summed over all but its last dimension, else None)
    for the exact GELU, in one pass where the kernel applies (`elementwise_applies` to both, of one shape and
    dtype), which writes the gradient over `grad`. bf16 is computed in fp32 and rounded once, as ATen's bf16 GELU
    is; the sums are of the gradient as written, in its dtype (as `sum_rows` gives them): the bias gradient of the
    linear layer before the GELU, without reading the gradient again."""
    if grad.shape == x.shape and grad.dtype == x.dtype and x.ndim > 0 and elementwise_applies(grad, x):
        value, column_sums = _kernel("gelu_backward_and_value", _gelu_backward_and_value_operator, grad, x, sums)
        return grad, value, column_sums.to(grad.dtype) if sums else None
    grad_x = torch.ops.aten.gelu_backward(grad, x)
    return grad_x, torch.nn.functional.gelu(x), sum_rows(grad_x) if sums else None


def softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`torch.softmax(x, -1)`: by the compiled kernel for contiguous fp32 and bf16 CPU tensors where no gradient is
    recorded (computed in fp32 from one pass of exponentials, rounded once; ATen's bf16 softmax over rows of 197 takes
    1.5x as long), else by ATen. A row with a NaN or +inf, or all -inf, is NaN throughout (ATen's keeps the zeros
    beside a +inf)."""
    if x.ndim > 0 and elementwise_applies(x):
        return _kernel("softmax_rows", _softmax_rows_operator, x)
    return torch.softmax(x, -1)


def sum_rows(x: torch.Tensor) -> torch.Tensor:
    """x summed over all but its last dimension, in x's dtype (a linear layer's bias gradient from its output's):
    by the compiled kernel for contiguous fp32 and bf16 CPU tensors (accumulating in fp32, as ATen does), where no
    gradient is recorded, else by ATen."""
    if x.ndim > 0 and elementwise_applies(x):
        return _kernel("column_sums", _column_sums_operator, x).to(x.dtype)
    return x.sum(tuple(range(x.ndim - 1)))


def residual_add_applies(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether `residual_add` takes x + y: an fp32 CPU stream x and a branch y of its shape, fp32 or bf16 (a bf16
    linear layer's output), each with contiguous rows, where no gradient is recorded, outside graph capture."""
    if not (cpu_fp32(x) and y.device.type == "cpu" and y.dtype in (torch.float32, torch.bfloat16)):
        return False
    if x.shape != y.shape or x.ndim == 0 or _rows_view(x) is None or _rows_view(y) is None:
        return False
    return not grad_recorded((x, y)) and not capturing_graph() and kernels_available()


def _rows_view(t: torch.Tensor) -> torch.Tensor | None:
    """t as the kernel's (a, b, n) rows: itself when 3-d with contiguous rows, flattened when contiguous."""
    if t.ndim == 3 and t.stride(-1) == 1:
        return t
    return t.view(1, -1, t.shape[-1]) if t.is_contiguous() else None


def residual_add(
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor | None = None,
    norm: torch.nn.LayerNorm | None = None,
    bf16_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x + y, the LayerNorm `norm` of it or None) by the compiled kernel; call where `residual_add_applies`.

    The sum goes into `out` (x itself for an in-place update, a slice of a larger tensor, or a fresh tensor when
    None), read from y as it is (a bf16 branch without ATen's widened temporary); the norm (fp32 weight and bias,
    one dimension) reads each row of the sum while it is in L1, its output rounded to bf16 with `bf16_output`.
    The same sum as `x + y`; the norm as `norm(x + y)` (`.to(torch.bfloat16)`) up to the order of a row's sums."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    rows = _rows_view(out) if out.shape == x.shape else None
    if rows is None:
        raise ValueError(f"residual_add: out must be of x's shape {tuple(x.shape)} with contiguous rows")
    if norm is not None and x.shape[-1] <= MAX_NARROW_ROW:  # TNT's words: ATen-free, but in two passes (faster)
        total = residual_add(x, y, out)[0]
        return total, narrow_layer_norm(total, norm.weight, norm.bias, norm.eps, bf16_output)[0]
    weight, bias = (None, None) if norm is None else (norm.weight, norm.bias)
    eps = 0.0 if norm is None else norm.eps
    with profiled("tnt_vision::residual_add"):
        normed = _kernels().add_rows(_rows_view(x), _rows_view(y), rows, weight, bias, eps, bf16_output)
    return out, None if normed is None else normed.view(x.shape)


def elementwise_applies(*tensors: torch.Tensor) -> bool:
    """Whether the elementwise and row kernels (the GELU's, the softmax, the column sums) take these tensors:
    contiguous fp32 or bf16 CPU ones, no gradient recorded for them, outside exported graphs."""
    fits = all(map(_elementwise_operand, tensors))
    return fits and not grad_recorded(tensors) and not exporting_graph() and kernels_available()


def grad_recorded(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether autograd records a gradient for any of these tensors (read lazily, only where grad mode is on)."""
    return torch.is_grad_enabled() and any(map(_requires_grad, tensors))


# `map` over the tensors in these tests, not a generator expression: torch.compile cannot close a generator that
# `any` or `all` left unfinished, in the lean training functions it traces (torch 2.14: "generator already executing").
def _requires_grad(t: torch.Tensor) -> bool:
    return t.requires_grad


def _elementwise_operand(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and t.is_contiguous()


def cpu_fp32(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32


MAX_WORDS = MAX_HEAD_DIM = 64


def word_attention_applies(qkv: torch.Tensor, tokens: int, head_dim: int) -> bool:
    """Whether `word_attention` can take this projection output: fp32 or bf16 CPU, small sequences, not exported."""
    fits = qkv.device.type == "cpu" and qkv.dtype in (torch.float32, torch.bfloat16)
    if not fits or tokens > MAX_WORDS or head_dim > MAX_HEAD_DIM:
        return False
    return not exporting_graph() and kernels_available()


@torch.compiler.assume_constant_result  # torch.compile reads the answer once instead of tracing the build
def kernels_available() -> bool:
    return cpu_kernels() is not None


MAX_BLOCK_WIDTH = 128  # widest inner transformer `word_block` serves (TNT-S: 24, TNT-B: 40)


def word_block_applies(x: torch.Tensor, heads: int) -> bool:
    """Whether `word_block` can take these words: fp32 (sentences, words, width) on the CPU, at most two vectors of
    words (32 with AVX-512, 16 with AVX2), where no gradient is recorded, in fp32 or under bf16 autocast (the words'
    stream is fp32 there too), outside exports; torch.compile keeps it as an operator in its graph."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 3 or torch.is_grad_enabled():
        return False
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    _, words, width = x.shape
    if width > MAX_BLOCK_WIDTH or width % heads or exporting_graph() or not kernels_available():
        return False
    return words <= 2 * kernel_lanes() and x.is_contiguous()


@asked_once
def kernel_lanes() -> int:
    """The compiled kernels' vector width in fp32 values (16 with AVX-512, 8 with AVX2); where they are built."""
    return _kernels().lanes


def word_block(x: torch.Tensor, *arguments: Any) -> torch.Tensor:
    """TNT's inner transformer block (pre-norm attention and exact-GELU MLP with their residuals) over each
    sentence's words in one pass, in inference: the compiled kernel of `word_block.cpp`, fp32 throughout. The
    arguments after the words are the operator's (`_word_block`); `kernels.inner_block.block_arguments` lists them."""
    return _kernel("word_block_forward", _word_block, x, *arguments)


# Inference only (`word_block_applies`: no gradient recorded), so no autograd formula is registered.
@torch.library.custom_op("tnt_vision::word_block", mutates_args=(), device_types="cpu")
def _word_block(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    qkv_bias: torch.Tensor | None,
    heads: int,
    scale: float,
    eps: list[float],
) -> torch.Tensor:
    return _kernels().word_block_forward(x, weights, qkv_bias, heads, scale, eps)


@_word_block.register_fake
def _(x: torch.Tensor, *arguments: object) -> torch.Tensor:
    return torch.empty_like(x)


def capturing_graph() -> bool:
    """Whether a tracer, compiler or exporter is recording this call (fast paths then step aside for plain ops)."""
    return torch.compiler.is_compiling() or exporting_graph()


def exporting_graph() -> bool:
    """Whether the graph being recorded leaves PyTorch (TorchScript, ONNX, torch.export): standard ops only."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    # The flag torch.export sets and is_exporting() returns: torch 2.11's Dynamo folds is_exporting() itself to True
    # in every torch.compile graph, which would leave the fast paths out of them.
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is not None:
        return flag
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.6; before it any graph counts
    return torch.compiler.is_compiling() if is_exporting is None else is_exporting()


def word_attention(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v per head, from the fused projection (P, m, 3C) to (P, m, C), with autograd.

    fp32, or bf16 (autocast's q/k/v on a CPU with bf16 products), computed in fp32 with the output and gradient
    rounded to bf16, where `scaled_dot_product_attention` over 16 words took a third of TNT-S's bf16 forward.
    """
    return _word_attention(qkv.contiguous(), heads, scale)  # once here, so the saved q/k/v is contiguous too
