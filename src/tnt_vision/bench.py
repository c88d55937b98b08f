"""Throughput, latency and peak memory of a model against contenders (timm, onnxruntime), measured fairly.

Fair here means: every contender gets the same warm-up, inputs rotate between calls (no input stays hot in
cache), contenders are interleaved round by round in one process (so background load hits them alike), the
median of the rounds is reported, and the thread count is fixed and stated. Peak memory is the peak resident
set of a fresh process that runs only that contender (CPU), or the CUDA allocator's peak (GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .errors import UserError
from .models import create_model, get_spec
from .models.tnt import TNTConfig

Step = Callable[[torch.Tensor], object]


@dataclass(frozen=True)
class BenchConfig:
    """What is measured: one model and its contenders under one setting.

    Attributes:
        model: registered name of this project's model (the first contender).
        against: other contenders: "timm" (timm's implementation of the same architecture), "timm:NAME"
            (any timm model, e.g. timm:deit_small_patch16_224), "onnxruntime" (this model exported to ONNX),
            or another registered name.
        train: time a training step (forward, cross-entropy, backward, AdamW) instead of inference.
        latency: also time batch-1 inference (ignored with train).
        memory: also measure each contender's peak memory in a fresh process.
        compile: wrap every PyTorch contender in `torch.compile` (compilation happens in the warm-up).
    """

    model: str
    against: tuple[str, ...] = ()
    batch: int = 32
    img_size: int = 224
    dtype: str = "fp32"
    train: bool = False
    runs: int = 5
    warmup: int = 2
    rotate: int = 3
    threads: int = 0
    device: str = "cpu"
    latency: bool = True
    memory: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("fp32", "bf16"):
            raise UserError(f"--dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.runs < 1 or self.batch < 1 or self.warmup < 0 or self.rotate < 1:
            raise UserError("--runs and --batch must be >= 1, --warmup >= 0")
        if self.compile and self.warmup < 1:
            raise UserError("--compile needs --warmup >= 1, or the compilation itself would be timed")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda requested but no CUDA device is available")

    @property
    def contenders(self) -> tuple[str, ...]:
        return (self.model, *self.against)


# ---- contenders ------------------------------------------------------------------------------------------------
def timm_equivalent(cfg: TNTConfig) -> nn.Module:
    """timm's implementation of a TNT (or DeiT) configuration, randomly initialised."""
    from timm.models import tnt as timm_tnt
    from timm.models.vision_transformer import VisionTransformer

    common = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "num_classes": cfg.num_classes}
    common |= {"depth": cfg.depth, "mlp_ratio": cfg.mlp_ratio, "qkv_bias": cfg.qkv_bias}
    if cfg.tnt_blocks == ():
        return VisionTransformer(embed_dim=cfg.outer_dim, num_heads=cfg.outer_heads, **common)
    if cfg.tnt_blocks is not None or cfg.se_ratio > 0:
        raise UserError("timm has no equivalent of hybrid (tnt_blocks) or SE variants; pick another contender")
    return timm_tnt.TNT(
        embed_dim=cfg.outer_dim,
        inner_dim=cfg.inner_dim,
        num_heads_outer=cfg.outer_heads,
        num_heads_inner=cfg.inner_heads,
        first_stride=cfg.inner_stride,
        legacy=cfg.legacy,
        **common,
    )


def build_module(name: str, model: str, img_size: int) -> nn.Module:
    """The nn.Module behind a contender name (see `BenchConfig.against`)."""
    if name == "timm":
        return timm_equivalent(get_spec(model).config.replace(img_size=img_size))
    if name.startswith("timm:"):
        import timm

        try:
            return timm.create_model(name[5:], img_size=img_size)
        except RuntimeError as e:
            raise UserError(f"unknown timm model {name[5:]!r}: {e}") from None
    try:
        return create_model(name, img_size=img_size)
    except ValueError as e:
        raise UserError(str(e)) from None


def autocast(cfg: BenchConfig) -> Any:
    return torch.autocast(cfg.device, torch.bfloat16) if cfg.dtype == "bf16" else nullcontext()


def inference_step(module: nn.Module, cfg: BenchConfig) -> Step:
    module.eval().to(cfg.device)

    def step(x: torch.Tensor) -> object:
        with torch.inference_mode(), autocast(cfg):
            return module(x)

    return step


def train_step(module: nn.Module, cfg: BenchConfig) -> Step:
    module.train().to(cfg.device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    num_classes = module.num_classes

    def step(x: torch.Tensor) -> object:
        target = torch.randint(num_classes, (x.shape[0],), device=x.device)
        with autocast(cfg):
            loss = nn.functional.cross_entropy(module(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def onnxruntime_options() -> Any:
    """Session options: this process's thread count, and worker threads that sleep when a run ends.

    onnxruntime's threads otherwise spin for a while after each run, taking the cores from the contender timed
    next (measured here: tnt-vision's batch-1 forward 192-213 ms right after onnxruntime's, 119-120 without).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def onnxruntime_step(model: str, cfg: BenchConfig, workdir: Path) -> Step:
    """Export `model` to ONNX (dynamic batch) and run it with onnxruntime on the CPU."""
    if cfg.train or cfg.dtype != "fp32" or cfg.device != "cpu":
        raise UserError("the onnxruntime contender measures fp32 CPU inference only (drop --train/--dtype/--device)")
    import onnxruntime as ort

    from .export import export_onnx

    path = export_onnx(create_model(model, img_size=cfg.img_size).eval(), workdir / f"{model}.onnx", cfg.img_size)
    session = ort.InferenceSession(str(path), onnxruntime_options(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def step(x: torch.Tensor) -> object:
        return session.run(None, {input_name: x.numpy()})

    return step


def build_step(name: str, cfg: BenchConfig, workdir: Path) -> Step:
    if name == "onnxruntime":
        return onnxruntime_step(cfg.model, cfg, workdir)
    module = build_module(name, cfg.model, cfg.img_size)
    if cfg.compile:
        module = torch.compile(module)
    return train_step(module, cfg) if cfg.train else inference_step(module, cfg)


# ---- timing ----------------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(step: Step, x: torch.Tensor, device: str) -> float:
    """Seconds of one call: CUDA events on a GPU, a monotonic clock on the CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(x)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step(x)
    return time.perf_counter() - t0


def issue_seconds(step: Callable[[Any], object], x: Any, device: str = "cuda") -> float:
    """Host seconds to issue one call of `step`, the GPU not waited for (on a CPU, the call's time): where it
    reaches the call's GPU time, the GPU waits on Python."""
    synchronize(device)
    start = time.perf_counter()
    step(x)
    elapsed = time.perf_counter() - start
    synchronize(device)
    return elapsed


def make_inputs(cfg: BenchConfig, batch: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=gen).to(cfg.device) for _ in range(cfg.rotate)]


def interleaved_times(
    steps: dict[str, Step],
    inputs: Sequence[torch.Tensor],
    cfg: BenchConfig,
    measure: Callable[[Step, torch.Tensor], Any] | None = None,
) -> dict[str, list]:
    """Per-contender call times (or what `measure(step, x)` returns for each call): warm-up, then rounds in which
    every contender runs once (order rotated)."""
    names = list(steps)
    for name in names:
        for i in range(cfg.warmup):
            steps[name](inputs[i % len(inputs)])
        synchronize(cfg.device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in tqdm(range(cfg.runs), desc=f"timing batch {inputs[0].shape[0]}", leave=False):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            x = inputs[r % len(inputs)]
            times[name].append(measure(steps[name], x) if measure else time_call(steps[name], x, cfg.device))
    return times


# Timed runs spreading more than this around their median ((max - min) / median) were taken while the machine's
# load changed: `format_table` says so under the table.
NOISY_SPREAD = 0.25


def spread(times: Sequence[float]) -> float:
    """How far one contender's timed runs spread: (max - min) / median."""
    return (max(times) - min(times)) / statistics.median(times)


def round_ratios(base: Sequence[float], other: Sequence[float]) -> list[float]:
    """Per round, the other contender's speed relative to the base's (base time / other time). Both were timed in
    the same round, so a load that comes and goes between rounds moves both; their range tells how far the ratio of
    the medians can be trusted on a busy machine."""
    return [b / o for b, o in zip(base, other, strict=True)]


def timed(times: Sequence[float], base: Sequence[float], batch: int) -> dict[str, Any]:
    """A contender's result row from its step times (seconds) and the base contender's of the same rounds."""
    median = statistics.median(times)
    return {
        "images_per_s": batch / median,
        "step_ms": median * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        "spread": spread(times),
        "speed_ratio_rounds": round_ratios(base, times),
    }


# ---- memory ----------------------------------------------------------------------------------------------------
def release_cached_memory(device: str) -> None:
    """Give the contenders' memory back to the device: on a GPU the caching allocator would otherwise keep what
    the timing runs used (TNT-B training at batch 256: 54 GiB) while a probe needs it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def peak_memory_mib(name: str, cfg: BenchConfig) -> float:
    """Peak memory of running one contender: resident set of a fresh process (CPU), allocator peak (CUDA)."""
    probe = asdict(cfg) | {"against": list(cfg.against), "runs": 2, "warmup": 1, "memory": False, "latency": False}
    cmd = [sys.executable, "-m", "tnt_vision.bench", "--probe", name, json.dumps(probe)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory probe for {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"])


def _probe(name: str, cfg: BenchConfig) -> dict[str, float]:
    """Run one contender (warm-up plus a few calls) in this process and report its peak memory."""
    set_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        step = build_step(name, cfg, Path(tmp))
        inputs = make_inputs(cfg, cfg.batch)
        for i in range(cfg.warmup + cfg.runs):
            step(inputs[i % len(inputs)])
    if cfg.device == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_mib": resident_peak_mib()}


def resident_peak_mib() -> float:
    """This process's peak resident set.

    Linux's VmHWM belongs to the current program image; ru_maxrss would carry the parent's peak across the
    fork + exec of the probe, which is why it is only the fallback (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def tnt_vision_operators(graph: torch.fx.GraphModule) -> list[str]:
    """The tnt_vision operators a Dynamo graph calls (`tnt_vision.layer_norm.default`, ...), its subgraphs' too: an
    autograd.Function's forward and backward, which Dynamo traces as subgraphs."""
    modules = (m for m in graph.modules() if isinstance(m, torch.fx.GraphModule))
    calls = (str(node.target) for m in modules for node in m.graph.nodes if node.op == "call_function")
    return [call for call in calls if call.startswith("tnt_vision.")]


def saved_bytes(fn: Callable[[], Any], ignore: Sequence[torch.Tensor] = ()) -> tuple[Any, int]:
    """Run fn; return its result and the bytes autograd keeps for backward meanwhile (each storage once), except
    `ignore`'s storages (parameters, say)."""
    storages: dict[int, int] = {}
    ignored = {t.untyped_storage().data_ptr() for t in ignore}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in ignored:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def baseline_memory_mib() -> float:
    """Peak resident set of a fresh process that imports torch, timm and this package and runs nothing."""
    code = "import timm, tnt_vision.bench as b; print(b.resident_peak_mib())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


# ---- the whole measurement -------------------------------------------------------------------------------------
def within(step: Step, context: Callable[[], AbstractContextManager[Any]]) -> Step:
    """`step` run inside a fresh `context()` at every call: the same model as another contender of an A/B script
    (a fast path stepped aside, another build swapped in)."""

    def run(x: torch.Tensor) -> object:
        with context():
            return step(x)

    return run


def never(*args: object, **kwargs: object) -> bool:
    """A test that always says no, for the A/B scripts to step a fast path aside: a plain function, not a `Mock`,
    which would keep every tensor it is called with (its call list). It takes any arguments, keywords too (say,
    `add_norm_applies(x, norm=...)`)."""
    return False


def constant(value: object) -> Callable[..., object]:
    """A plain function answering `value` to any arguments, for the A/B scripts to put in place of one under test
    (`mock.patch.object(module, name, constant(...))`): not a `Mock`, for the reason `never` gives."""

    def answer(*args: object, **kwargs: object) -> object:
        return value

    return answer


def model_ab_times(
    args: argparse.Namespace,
    variants: dict[str, Callable[[], AbstractContextManager[Any]] | None],
    dtype: str = "fp32",
    others: dict[str, nn.Module] | None = None,
) -> dict[str, list[float]]:
    """An A/B script's whole-model rounds (`ab_parser`'s model, batch, rounds, --train): one model of ours run as
    it is (a variant of None) and inside each variant's context (`within`), beside `others`' modules, alternating
    (`interleaved_times`); seconds per call, by contender."""
    cfg = BenchConfig(model=args.model, batch=args.batch, runs=args.rounds, train=args.train, dtype=dtype)
    make_step = train_step if args.train else inference_step
    ours = make_step(create_model(args.model), cfg)
    steps = {name: ours if context is None else within(ours, context) for name, context in variants.items()}
    steps |= {name: make_step(module, cfg) for name, module in (others or {}).items()}
    return interleaved_times(steps, make_inputs(cfg, args.batch), cfg)


def model_ab_line(args: argparse.Namespace, ms: dict[str, float], dtype: str) -> str:
    """An A/B script's whole-model result (`ab_parser`'s model, batch, --train): each contender's median in ms (from
    `medians_ms`), and for each after the first its time over the first's."""
    mode = "training step" if args.train else "inference"
    first, *others = ms.items()
    parts = [f"{first[0]} {first[1]:.0f} ms", *(f"{name} {t:.0f} ms ({t / first[1]:.3f}x)" for name, t in others)]
    return f"{args.model} {mode}, batch {args.batch}, {dtype}: " + ", ".join(parts)


def mlp_layers(cfg: TNTConfig, batch: int) -> dict[str, tuple[int, int, int]]:
    """(rows, inputs, outputs) of the model's MLP layers at `batch` images, by name ("inner fc1", ...): the sizes
    the A/B scripts time their operators at."""
    words = batch * cfg.grid_size[0] * cfg.grid_size[1] * cfg.num_words
    tokens = batch * (1 + cfg.grid_size[0] * cfg.grid_size[1])
    inner, outer = cfg.inner_dim, cfg.outer_dim
    return {
        "inner fc1": (words, inner, int(inner * cfg.mlp_ratio)),
        "inner fc2": (words, int(inner * cfg.mlp_ratio), inner),
        "outer fc1": (tokens, outer, int(outer * cfg.mlp_ratio)),
        "outer fc2": (tokens, int(outer * cfg.mlp_ratio), outer),
    }


def operator_medians_ms(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds of argument-free calls alternating (`interleaved_times`: a warm-up call each, the order
    rotated every round)."""
    steps = {name: (lambda _, call=call: call()) for name, call in calls.items()}
    return medians_ms(interleaved_times(steps, [torch.empty(1)], BenchConfig(model="operators", runs=rounds, warmup=1)))


def medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def ab_parser(doc: str, rounds: int, train: bool = True) -> argparse.ArgumentParser:
    """The command line `benchmarks/`' A/B scripts share: --model, --batch, --rounds (this many by default),
    --threads (0: torch's default, see `set_threads`) and, with `train`, --train; a script adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="tnt_s_patch16_224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=0)
    if train:
        parser.add_argument("--train", action="store_true")
    return parser


def set_threads(threads: int) -> int:
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def start_kernel_ab(args: argparse.Namespace) -> None:
    """The start of an A/B script of the compiled CPU kernels: --threads set, one clear line where the kernels
    cannot be built here, and the header line (threads, CPU, torch)."""
    from . import kernels

    threads = set_threads(args.threads)
    if kernels.cpu_kernels() is None:
        raise SystemExit("the CPU kernels could not be built here; nothing to compare")
    print(f"{threads} threads, {cpu_name()}, torch {torch.__version__}; medians")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    info = {
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Measure every contender; returns machine info, the settings and one result row per contender."""
    set_threads(cfg.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        steps = {name: build_step(name, cfg, Path(tmp)) for name in cfg.contenders}
        times = interleaved_times(steps, make_inputs(cfg, cfg.batch), cfg)
        latency = None
        if cfg.latency and not cfg.train:
            latency = interleaved_times(steps, make_inputs(cfg, 1), cfg)
        del steps
    release_cached_memory(cfg.device)  # the memory probes' fresh processes share the GPU with this one
    rows = [
        {
            "contender": name,
            **timed(times[name], times[cfg.model], cfg.batch),
            "latency_ms": statistics.median(latency[name]) * 1e3 if latency else None,
            "peak_mib": peak_memory_mib(name, cfg) if cfg.memory else None,
        }
        for name in cfg.contenders
    ]
    base = rows[0]
    for row in rows:
        row["speed_ratio"] = row["images_per_s"] / base["images_per_s"]
        row["latency_ratio"] = row["latency_ms"] / base["latency_ms"] if latency else None
        row["memory_ratio"] = row["peak_mib"] / base["peak_mib"] if cfg.memory else None
    info = machine() | ({"import_baseline_mib": baseline_memory_mib()} if cfg.memory and cfg.device == "cpu" else {})
    return {"machine": info, "config": asdict(cfg), "results": rows}


def format_table(report: dict[str, Any]) -> str:
    """The side-by-side table: ratios are each contender relative to the first (this project's model)."""
    m, c = report["machine"], report["config"]
    mode = "training step (fwd+bwd+AdamW)" if c["train"] else "inference"
    mode += ", torch.compile (not onnxruntime)" if c["compile"] else ", eager"
    lines = [
        f"{c['model']}: {mode}, {c['dtype']}, batch {c['batch']}, {c['img_size']}px, device {c['device']}",
        f"machine: {m['cpu']} ({m['cpu_capability']}), {m['threads']} threads, torch {m['torch']}; "
        f"median of {c['runs']} interleaved runs after {c['warmup']} warm-up",
        "x ours: the medians' ratio; per round: the ratio in each round, median (range); "
        "spread: (max - min) / median of the runs",
    ]
    if "import_baseline_mib" in m:
        lines.append(
            f"peak memory: whole process; importing torch + timm alone takes {m['import_baseline_mib']:.0f} MiB"
        )
    header = (
        f"{'contender':<34} {'images/s':>9} {'x ours':>7} {'per round':>16} {'step ms':>9} {'spread':>7} "
        f"{'b1 ms':>8} {'peak MiB':>9} {'x ours':>7}"
    )
    lines += [header, "-" * len(header)]

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in report["results"]:
        name = "tnt-vision " + r["contender"] if r["contender"] == c["model"] else r["contender"]
        per_round = "-" if r is report["results"][0] else ratio_range(r["speed_ratio_rounds"])
        lines.append(
            f"{name:<34} {r['images_per_s']:>9.2f} {r['speed_ratio']:>7.2f} {per_round:>16} {r['step_ms']:>9.1f} "
            f"{r['spread']:>7.0%} {fmt(r['latency_ms'], '>8.1f'):>8} {fmt(r['peak_mib'], '>9.0f'):>9} "
            f"{fmt(r['memory_ratio'], '>7.2f'):>7}"
        )
    lines += noisy_runs(report["results"])
    return "\n".join(lines)


def ratio_range(ratios: Sequence[float]) -> str:
    """Per-round ratios as "median (lowest-highest)"."""
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def noisy_runs(results: Sequence[dict[str, Any]]) -> list[str]:
    """A line under the table for each contender whose timed runs spread more than `NOISY_SPREAD`."""
    return [
        f"note: {r['contender']}'s timed runs spread {r['spread']:.0%} around their median: the machine's load "
        "changed while measuring; the per-round ratios show how far the ratios hold (more --runs help)"
        for r in results
        if r["spread"] > NOISY_SPREAD
    ]


if __name__ == "__main__":
    # `python -m tnt_vision.bench --probe NAME CONFIG_JSON`: the fresh process of `peak_memory_mib`
    if len(sys.argv) != 4 or sys.argv[1] != "--probe":
        sys.exit("usage: python -m tnt_vision.bench --probe CONTENDER CONFIG_JSON (internal; use `tnt bench`)")
    raw = json.loads(sys.argv[3])
    print(json.dumps(_probe(sys.argv[2], BenchConfig(**(raw | {"against": tuple(raw["against"])})))))
