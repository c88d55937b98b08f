"""CPU inference through oneDNN's fused linear layers (the operators torch.compile's CPU backend emits): fp32, and
bf16 autocast on a CPU with bf16 products.

`F.linear` copies the bias into its output before the GEMM accumulates onto it, and the GELU after the MLP's
first layer and the block's residual additions each read and write the activation once more. oneDNN's linear
applies the bias or the residual addition to each tile of the product while it is in cache, and in fp32 on an
AVX-512 CPU the exact GELU too (elsewhere ATen's vectorised GELU runs in place on the output: `GELU_EPILOGUE`). Same
results up to the order of the GEMM's additions. Under bf16 autocast the input, weight and bias are cast to bf16
as autocast casts them and the output is bf16, autocast's result (there the bias copy and the GELU's fresh output
cost more than the product: TNT-S's outer fc1 and GELU at batch 32, 31 ms against 11); the residual stream stays
fp32, so the residual additions are `kernels.residual_add`'s there. Inference only (these operators have no
autograd formula), CPU; off in exported graphs and with `TNT_VISION_CPU_KERNELS=0`; torch.compile keeps each layer
in its graph as one registered operator (`tnt_vision::onednn_linear`).

Each weight is reordered once (per dtype) into oneDNN's blocked layout (as torch.compile's freezing does) instead
of on every call; the copy is kept beside the parameter, remade when the parameter changes (version counter, storage
or shape), and dropped by `release` (the model does so when it is put in training mode).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import ENV_SWITCH, exporting_graph, residual_add, residual_add_applies, switched_on
from .emulated_bf16 import BF16, native_bf16_autocast
from .emulated_bf16 import onednn_linear_available as available

# oneDNN's exact GELU as the GEMM's epilogue against ATen's GELU in place on the output. In fp32 the two give the
# same bits. On the AVX2 development machine the epilogue made TNT-S fp32 inference at batch 32 5-7% slower in all
# (3141 against 2985 ms, 3038 against 2841; TNT-Ti 1013 against 948, TNT-B at batch 8 1851 against 1744); on the
# AVX-512 machine each fp32 layer with its GELU is faster with it (medians of 30-200 calls, 2 threads: TNT-S's outer
# first MLP layer at batch 32 56.4 against 57.7 ms, the inner one 22.2 against 24.4, at batch 1 1.35 against 1.44
# and 0.244 against 0.282), and the whole model 2-8% (`benchmarks/onednn_ab.py`). Under bf16 autocast the epilogue
# applies the GELU before the output is rounded to bf16, where autocast rounds the product first: ATen's then.
# None: the epilogue for fp32 where the CPU has AVX-512; True or False: for every dtype, or never.
GELU_EPILOGUE: bool | None = None


@functools.cache  # asked in eager calls and inside the operator at run time, never where Dynamo traces
def _packing_available() -> bool:
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def onednn_applies(x: torch.Tensor) -> bool:
    """CPU inference (no gradient recorded) in fp32 without autocast, or under bf16 autocast on a CPU with bf16
    products; not in exported graphs, where oneDNN is built in. torch.compile keeps the layers as operators."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or exporting_graph():
        return False
    fp32 = x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    if not (fp32 or native_bf16_autocast(x)):
        return False
    return available() and switched_on(ENV_SWITCH)


# id(tensor) -> {(dtype, packed or cast): (its values then; their address, layout and version; the copy)}. An entry
# goes when its tensor does (a finalizer, registered with the entry), so no other tensor meets it under the same id.
# Holding the values keeps their storage alive, so a tensor given new storage (`weight.data = ...`) cannot land at
# the same address and pass for the one copied. A plain dict: a `WeakIdKeyDictionary` made a weak reference on
# every lookup, 110 times a TNT-S forward.
_PACKED: dict[int, dict[tuple[torch.dtype, bool], tuple[torch.Tensor, tuple[Any, ...], torch.Tensor]]] = {}


def packed(weight: torch.Tensor, rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`weight` in `dtype` and oneDNN's blocked layout for products with about `rows` rows, reordered once per
    weight value.

    Weights made under inference mode carry no version counter, so they are used as they are (cast to `dtype`).
    """
    if weight.is_inference() or not _packing_available():
        return weight.to(dtype)
    return _kept(weight, (dtype, True), lambda values: torch.ops.mkldnn._reorder_linear_weight(values.to(dtype), rows))


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)`, cast once per value of a parameter (a bias under bf16 autocast, cast on every call by
    autocast), as `packed` keeps its weights."""
    if tensor.dtype == dtype or tensor.is_inference():
        return tensor.to(dtype)
    return _kept(tensor, (dtype, False), lambda values: values.to(dtype))


def _kept(
    tensor: torch.Tensor, key: tuple[torch.dtype, bool], make: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`make(tensor.detach())`, kept for `tensor` under `key` and remade when its address, layout or version change."""
    stamp = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor._version)
    entries = _PACKED.get(id(tensor))
    if entries is None:
        entries = _PACKED[id(tensor)] = {}
        weakref.finalize(tensor, _PACKED.pop, id(tensor), None)
    entry = entries.get(key)
    if entry is None or entry[1] != stamp:
        values = tensor.detach()
        entry = entries[key] = (values, stamp, make(values))
    return entry[2]


def release(weights: Iterable[torch.Tensor]) -> None:
    """Drop the copies kept of `weights` and biases (their memory; a stale copy is never used)."""
    for weight in weights:
        _PACKED.get(id(weight), {}).clear()  # the entry and its finalizer stay: one of each per weight


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """`F.linear(x, weight, bias)` in one oneDNN call, followed by the exact GELU if asked (see `GELU_EPILOGUE`).

    Under autocast (bf16, where `onednn_applies`) the operands are cast to bf16 first, as autocast casts them.
    """
    if torch.is_autocast_enabled("cpu"):
        x = x.to(BF16)
    if torch.compiler.is_compiling():
        return _compiled_linear(x, weight, bias, gelu, None)
    if bias is not None and bias.dtype != x.dtype:
        bias = cast(bias, x.dtype)
    weight = packed(weight, _rows(x), x.dtype)
    if gelu and gelu_epilogue(x.dtype):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.ops.aten.gelu_(out) if gelu else out


def gelu_epilogue(dtype: torch.dtype) -> bool:
    """Whether `linear` applies its GELU as oneDNN's epilogue (see `GELU_EPILOGUE`)."""
    if GELU_EPILOGUE is not None:
        return GELU_EPILOGUE
    return dtype == torch.float32 and _avx512()


@functools.cache  # as `_packing_available`
def _avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def linear_add(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, in_place: bool = False
) -> torch.Tensor:
    """`residual + F.linear(x, weight, bias)` in one oneDNN call; in two steps for a residual that is not contiguous
    and under autocast (a bf16 product added to the fp32 residual stream: by `residual_add`, into `residual` itself
    with `in_place`, which the caller allows only for a tensor it owns)."""
    if torch.is_autocast_enabled("cpu"):
        branch = linear(x, weight, bias)
        if residual_add_applies(residual, branch):
            return residual_add(residual, branch, out=residual if in_place else None)[0]
        return residual + branch
    if not residual.is_contiguous():
        return residual + linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return _compiled_linear(x, weight, bias, False, residual)
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed(weight, _rows(x)), bias, "add")


# Under torch.compile the layers are one registered operator (inference only: no autograd formula), so that the
# graph keeps oneDNN's calls with the weights packed once, where Inductor would multiply by the unpacked weights
# (and, under bf16 autocast, cast them on every call). Eager calls skip the operator's dispatch; the operator runs
# the eager functions (x already in the product's dtype; fp32 for a residual).
@torch.library.custom_op("tnt_vision::onednn_linear", mutates_args=(), device_types="cpu")
def _compiled_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool, residual: torch.Tensor | None
) -> torch.Tensor:
    return linear(x, weight, bias, gelu) if residual is None else linear_add(x, weight, bias, residual)


@_compiled_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, *arguments: object) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
