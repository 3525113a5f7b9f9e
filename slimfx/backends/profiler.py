"""Measuring a device profile: micro-benchmarks for the roofline, layers timed in isolation.

``profile_device`` times, per runtime, chains of tiny ops (per-call and per-kernel overhead, the
cost of a view), a large add (memory bandwidth), a cached activation (element rate), one layer of
each op class (sustained MACs per millisecond) and one conv at widths 4..64 (the channel step).
``measure_layers`` times the conv and linear kernels of a graph that the profile has no table
for, each alone in the runtime, with the ops the runtime fuses into it, and with ``sweep`` at a
few narrower widths too (what pruning may choose). ``default_profile`` keeps the profile of this
machine, versions and thread count in the user's cache folder.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from slimfx.backends.timing import median_ms
from slimfx.cost_model.device import (
    DeviceProfile,
    LayerConfig,
    LayerTiming,
    Machine,
    ProfileError,
    Roofline,
    RuntimeProfile,
    default_profile_path,
    library_versions,
    load_profile,
    save_profile,
)
from slimfx.cost_model.latency import (
    FUSION_RULES,
    Kernel,
    LatencyPrediction,
    config_of,
    external_inputs,
    find_channel_step,
    kernels,
    predict,
    rules_for,
)
from slimfx.errors import BackendError
from slimfx.ir.capture import capture
from slimfx.ir.graph import Graph
from slimfx.ir.rewrite import GraphBuilder
from slimfx.quant.layers import ActivationQuant, QuantizedLayer, activation_qparams

Progress = Callable[[str], None] | None
PROFILED_RUNTIMES = tuple(FUSION_RULES)  # torch, torch-int8, onnxruntime, onnxruntime-int8
SWEEP_FRACTIONS = (0.25, 0.5, 0.75)
STEP_WIDTHS = tuple(range(4, 68, 4))
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "clip": nn.ReLU6,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "hardsigmoid": nn.Hardsigmoid,
    "hardswish": nn.Hardswish,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}


def cache_mb(level: int) -> float:
    """The level-``level`` caches of all cores together in MB (Linux sysfs); 0 when unknown."""
    total, seen = 0.0, set()
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index*"):
        try:
            if (index / "level").read_text().strip() != str(level):
                continue
            shared = (index / "shared_cpu_list").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if shared not in seen:
            seen.add(shared)
            unit = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(size[-1], 1 / 1024 / 1024)
            total += float(size.rstrip("KMG")) * unit
    return total


MAX_FLUSH_MB = 32.0  # a VM may report the whole socket's L3 (480 MB seen), far more than its cores reach


def flush_mb() -> float:
    """How much a torch kernel measured alone is flushed before each run: half the last-level
    cache (16 MB on a 32 MB L3), between the L2 flush that leaves resnets 5-15% under their
    whole-model time and the full flush that evicts the dispatcher's own hot data and puts
    mobilenets 35-45% over it (measured on a 2-core AMD EPYC); 8 MB when the caches are unknown,
    at most ``MAX_FLUSH_MB``."""
    last = cache_mb(3) or cache_mb(2)
    return min(last / 2, MAX_FLUSH_MB) if last else 8.0


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Bench:
    """Times small modules in one runtime with a fixed thread count (each session on its own).

    In torch, before each timed run it overwrites a buffer (``flush_mb``), so that a kernel
    measured alone finds the caches about as full of other data as inside a whole model, not
    holding its own weights and input from the run before. onnxruntime's kernels
    are timed back to back: the pause a flush makes lets its thread pool fall asleep, which a
    whole model run never does, and costs more than the cache it saves.
    """

    def __init__(self, runtime: str, threads: int, budget_ms: float = 60.0, flush: float | None = None):
        rules_for(runtime)  # a runtime without a latency model fails here
        from slimfx.backends.runtimes import get_runtime

        why = get_runtime(runtime).unavailable()
        if why is not None:
            raise BackendError(f"runtime {runtime} cannot be profiled here: {why}")
        self.runtime, self.threads, self.budget_ms = runtime, threads, budget_ms
        if flush is None:
            flush = 0.0 if runtime.startswith("onnxruntime") else flush_mb()
        self._flush = torch.zeros(int(flush * 1024 * 1024) // 4) if flush else None
        self._folder = tempfile.TemporaryDirectory(prefix="slimfx-profile-")
        self._files = 0
        self._pairs: dict[tuple[int, ...], float] = {}
        self.call_overhead_ms = 0.0  # set once measured: what every timed run spends outside its kernels

    def close(self) -> None:
        self._folder.cleanup()

    def quantize_pair_ms(self, shape: tuple[int, ...]) -> float:
        """A uint8 quantize and dequantize of one float tensor, less the per-call overhead (once per shape)."""
        if shape not in self._pairs:
            pair = ActivationQuant().freeze(*activation_qparams(4.0, False))
            self._pairs[shape] = self.time(pair, (torch.randn(shape),))
        return max(self._pairs[shape] - self.call_overhead_ms, 0.0)

    def time(self, module: nn.Module, inputs: Sequence[torch.Tensor]) -> float:
        """Median ms of ``module(*inputs)`` in this runtime (repeats sized to the time budget)."""
        module = module.eval()
        with _threads(self.threads):
            run = self._runner(module, tuple(inputs))
            return _adaptive_median(run, self.budget_ms, self._flush)

    def _runner(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
        if self.runtime == "torch":
            return _inference(module, inputs)
        if self.runtime == "torch-int8":
            from slimfx.backends.torch_int8 import lower_int8_model

            return _inference(lower_int8_model(_as_graph_module(module, len(inputs))).module, inputs)
        from slimfx.backends import onnx as ort_tools

        self._files += 1
        path = Path(self._folder.name) / f"probe-{self._files}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on a probe only timed (in-place ReLUs)
            ort_tools.export_onnx(module, inputs, path, exporter=ort_tools.TORCHSCRIPT)
        session = ort_tools.session(path, threads=self.threads)
        feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
        return lambda: session.run(None, feed)


def _inference(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return module(*inputs)

    return run


def _adaptive_median(run: Callable[[], object], budget_ms: float, flush: torch.Tensor | None) -> float:
    """Median ms of ``run`` over as many runs as fit the budget (7 to 200), each after a flush;
    the flushes count toward the budget (on a big cache they cost far more than small kernels)."""
    run()
    start = time.perf_counter()
    if flush is not None:
        flush.add_(1.0)
    flushed = time.perf_counter()
    run()
    end = time.perf_counter()
    first, flush_ms = (end - flushed) * 1000, (flushed - start) * 1000
    repeats = int(min(max(budget_ms / max(first + flush_ms, 1e-3), 7), 200))
    if flush is None:
        return median_ms(run, repeats, warmup=2)
    times = []
    for _ in range(repeats):
        flush.add_(1.0)
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _as_graph_module(module: nn.Module, arity: int) -> fx.GraphModule:
    """A graph calling ``module`` (on ``arity`` inputs) as one leaf (what the int8 lowering reads)."""
    if isinstance(module, fx.GraphModule):
        return module
    graph = fx.Graph()
    inputs = [graph.placeholder(f"x{i}") for i in range(arity)]
    root = nn.Module()
    root.add_module("block", module)
    graph.output(graph.call_module("block", tuple(inputs)))
    return fx.GraphModule(root, graph)


# -- modules for a layer configuration ----------------------------------------------------------
class LayerBlock(nn.Module):
    """One table layer as it is measured: the layer and what the runtime fuses into it."""

    def __init__(self, layer: nn.Module, norm: nn.Module | None, takes_residual: bool, activation: nn.Module | None):
        super().__init__()
        self.layer, self.norm, self.activation = layer, norm, activation
        self.takes_residual = takes_residual

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self.layer(x)
        if self.norm is not None:
            y = self.norm(y)
        if residual is not None:
            y = y + residual
        return self.activation(y) if self.activation is not None else y


def build_layer(config: LayerConfig) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A module computing ``config`` (an int8 one as slimfx's quantized layer) and random inputs."""
    torch.manual_seed(0)
    in_channels = config.in_channels
    if config.op == "linear":
        layer: nn.Module = nn.Linear(in_channels, config.out_channels, bias=config.bias)
    else:
        conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[config.op]
        padding = "same" if config.padding == (-1,) else config.padding
        layer = conv(
            in_channels,
            config.out_channels,
            config.kernel,
            config.stride,
            padding,
            config.dilation,
            config.groups,
            config.bias,
        )
    activation_names = [name for name in config.fused if name in _ACTIVATIONS]
    activation = _ACTIVATIONS[activation_names[0]]() if activation_names else None
    norm = None
    if "batchnorm" in config.fused:
        norm = {"conv1d": nn.BatchNorm1d, "conv2d": nn.BatchNorm2d, "conv3d": nn.BatchNorm3d}[config.op](
            config.out_channels
        )
    x = torch.randn(config.in_shape)
    if config.dtype == "int8":
        quantized = QuantizedLayer(layer, activation)
        out_scale, out_zero = activation_qparams(4.0, activation is not None)
        quantized.freeze(*activation_qparams(4.0, False), out_scale, out_zero)
        return quantized, (x,)
    block = LayerBlock(layer, norm, "add" in config.fused, activation)
    if not block.takes_residual:
        return block, (x,)
    with torch.no_grad():
        out = block.layer(x)
    return block, (x, torch.randn(out.shape))


# -- the micro-benchmarks ------------------------------------------------------------------------
class _Chain(nn.Module):
    """``length`` tiny kernels in a row (an add of a constant each), or views."""

    def __init__(self, length: int, views: bool = False):
        super().__init__()
        self.length, self.views = length, views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.length):
            x = (x.reshape(-1) if i % 2 == 0 else x.reshape(4, 4)) if self.views else x + 1.0
        return x + 1.0 if self.views else x


class _Add(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


def _slope(
    bench: Bench, make: Callable[[int], nn.Module], x: torch.Tensor, lengths: tuple[int, int]
) -> tuple[float, float]:
    """(ms per extra link, ms at zero links) from two chain lengths, medians of three tries."""
    short = statistics.median(bench.time(make(lengths[0]), (x,)) for _ in range(3))
    long = statistics.median(bench.time(make(lengths[1]), (x,)) for _ in range(3))
    per = max((long - short) / (lengths[1] - lengths[0]), 0.0)
    return per, max(short - per * lengths[0], 0.0)


def _rate(bench: Bench, config: LayerConfig, overhead_ms: float) -> float:
    """Sustained MACs per ms of one layer configuration."""
    module, inputs = build_layer(config)
    ms = max(bench.time(module, inputs) - overhead_ms, 1e-4)
    layer = module.layer
    if isinstance(layer, nn.Linear):
        macs = inputs[0].numel() // layer.in_features * layer.in_features * layer.out_features
    else:
        with torch.no_grad():
            out = layer(inputs[0])
        macs = out.numel() * layer.weight[0].numel()
    return macs / ms


def measure_runtime(runtime: str, threads: int, progress: Progress = None) -> RuntimeProfile:
    """The roofline and channel step of one runtime, from micro-benchmarks (a few seconds)."""
    bench = Bench(runtime, threads)
    dtype = "int8" if runtime.endswith("int8") else "fp32"

    def say(what: str) -> None:
        if progress is not None:
            progress(f"profiling {runtime}: {what}")

    try:
        say("overheads")
        tiny = torch.randn(16)
        kernel_ms, call_ms = _slope(bench, _Chain, tiny, (1, 33))
        view_ms, _ = _slope(bench, lambda n: _Chain(n, views=True), tiny, (2, 34))
        say("memory bandwidth")
        big = torch.randn(4 * 1024 * 1024)
        add_ms = max(bench.time(_Add(), (big, big)) - call_ms - kernel_ms, 1e-3)
        bytes_per_ms = 3 * big.numel() * 4 / add_ms
        cached = torch.randn(64, 32, 32)
        elem_ms = max(bench.time(nn.ReLU(), (cached,)) - call_ms - kernel_ms, 1e-4)
        elements_per_ms = cached.numel() / elem_ms
        say("MAC rates")
        overhead = call_ms + kernel_ms
        dense = _rate(
            bench, LayerConfig("conv2d", (1, 64, 56, 56), 64, (3, 3), (1, 1), (1, 1), (1, 1), dtype=dtype), overhead
        )
        depthwise = _rate(
            bench,
            LayerConfig("conv2d", (1, 128, 56, 56), 128, (3, 3), (1, 1), (1, 1), (1, 1), groups=128, dtype=dtype),
            overhead,
        )
        pointwise = _rate(
            bench, LayerConfig("conv2d", (1, 128, 28, 28), 128, (1, 1), (1, 1), (0, 0), (1, 1), dtype=dtype), overhead
        )
        linear = _rate(bench, LayerConfig("linear", (8, 1024), 1024, dtype=dtype), overhead)
        say("channel step")
        widths, times = [], []
        for width in STEP_WIDTHS:
            config = LayerConfig("conv2d", (1, 64, 28, 28), width, (3, 3), (1, 1), (1, 1), (1, 1), dtype=dtype)
            module, inputs = build_layer(config)
            widths.append(width)
            times.append(bench.time(module, inputs))
        step = find_channel_step(widths, times)
    finally:
        bench.close()
    roofline = Roofline(dense, depthwise, pointwise, linear, elements_per_ms, bytes_per_ms, kernel_ms, view_ms, call_ms)
    return RuntimeProfile(runtime, roofline, step)


def profile_device(
    runtimes: Sequence[str] = PROFILED_RUNTIMES, threads: int | None = None, progress: Progress = None
) -> DeviceProfile:
    """A new profile of this machine for ``runtimes`` (those that cannot run here are an error)."""
    threads = threads or torch.get_num_threads()
    profile = DeviceProfile(Machine.here(), library_versions(), threads)
    for runtime in runtimes:
        profile.runtimes[runtime] = measure_runtime(runtime, threads, progress)
    return profile


def available_runtimes() -> tuple[str, ...]:
    """The profiled runtimes that can run on this machine."""
    from slimfx.backends.runtimes import get_runtime

    return tuple(r for r in PROFILED_RUNTIMES if get_runtime(r).unavailable() is None)


# -- layer tables --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableFill:
    """What ``measure_layers`` did: configurations measured now, and those already in the profile."""

    measured: int
    known: int


def measure_layers(
    graph: Graph, profile: RuntimeProfile, threads: int, sweep: bool = False, progress: Progress = None
) -> TableFill:
    """Time, alone in ``profile``'s runtime, every conv and linear kernel of ``graph`` whose
    configuration the profile's tables lack (with ``sweep``, also at 1/4, 1/2 and 3/4 of its
    widths, rounded to the channel step); the timings are added to ``profile``."""
    rules = rules_for(profile.runtime)
    wanted: dict[str, Kernel] = {}
    for kernel in kernels(graph, rules):
        if kernel.key is not None:
            wanted.setdefault(kernel.key, kernel)
    missing = [
        k
        for key, k in wanted.items()
        if key not in profile.tables or (sweep and k.config is not None and not profile.tables[key].swept)
    ]
    if not missing:
        return TableFill(0, len(wanted))
    bench = Bench(profile.runtime, threads)
    bench.call_overhead_ms = profile.roofline.call_overhead_ms
    try:
        for index, kernel in enumerate(missing, 1):
            if progress is not None:
                progress(f"measuring {profile.runtime} kernels: {index}/{len(missing)}")
            if kernel.config is not None:
                timing = _layer_timing(bench, kernel.config, profile, sweep)
            else:
                timing = _kernel_timing(bench, graph, kernel, profile)
            if timing is not None:
                profile.tables[timing.key] = timing
    finally:
        bench.close()
    return TableFill(len(missing), len(wanted) - len(missing))


def _alone_ms(bench: Bench, module: nn.Module, inputs: Sequence[torch.Tensor], profile: RuntimeProfile) -> float:
    """A kernel's time in a model, from its time alone: less the per-call overhead and, where the
    runtime converts a lone kernel's input and output (layout, Q/DQ), less that conversion."""
    roofline = profile.roofline
    ms = bench.time(module, inputs) - roofline.call_overhead_ms
    if rules_for(profile.runtime).boundary_copies:
        ms -= _boundary_ms(bench, module, inputs, profile)
    return max(ms, roofline.kernel_overhead_ms)


def _layer_timing(bench: Bench, config: LayerConfig, profile: RuntimeProfile, sweep: bool) -> LayerTiming:
    """A layer timed alone; with ``sweep``, also at 1/4, 1/2 and 3/4 of its input channels (its
    output channels as they are) and of its output channels (inputs as they are), rounded to
    the channel step; a depthwise layer at those shares of its channels."""
    step = profile.channel_step

    def alone(variant: LayerConfig) -> float:
        return _alone_ms(bench, *build_layer(variant), profile)

    ms = alone(config)
    in_sweep: dict[int, float] = {}
    out_sweep: dict[int, float] = {}
    if sweep:
        for fraction in SWEEP_FRACTIONS:
            cin = _round_width(config.in_channels, fraction, step)
            cout = _round_width(config.out_channels, fraction, step)
            if config.depthwise:
                if cin not in out_sweep and cin != config.in_channels:
                    out_sweep[cin] = alone(config.with_widths(cin, cin))
                continue
            groups = config.groups
            if cin != config.in_channels and cin % groups == 0 and cin not in in_sweep:
                in_sweep[cin] = alone(config.with_widths(cin, config.out_channels))
            if cout != config.out_channels and cout % groups == 0 and cout not in out_sweep:
                out_sweep[cout] = alone(config.with_widths(config.in_channels, cout))
    return LayerTiming(
        config.key(),
        ms,
        config.in_channels,
        config.out_channels,
        config.groups,
        tuple(sorted(in_sweep.items())),
        tuple(sorted(out_sweep.items())),
    )


def _kernel_timing(bench: Bench, graph: Graph, kernel: Kernel, profile: RuntimeProfile) -> LayerTiming | None:
    """A non-layer kernel timed alone: its nodes copied into a graph of their own, fed random
    tensors of the shapes they read; None when it cannot run alone (it is then priced by the roofline)."""
    extracted = extract_kernel(graph, kernel)
    if extracted is None:
        return None
    module, inputs = extracted
    try:
        ms = _alone_ms(bench, module, inputs, profile)
    except (BackendError, RuntimeError, TypeError, ValueError):  # not exportable or not lowerable alone
        return None
    moved = kernel.cost.bytes_read + kernel.cost.bytes_written
    return LayerTiming(kernel.signature or "", ms, moved_bytes=moved)


def extract_kernel(graph: Graph, kernel: Kernel) -> tuple[fx.GraphModule, tuple[torch.Tensor, ...]] | None:
    """The kernel's nodes as a module of their own, and random inputs shaped like what they read."""
    group = [graph.node(name) for name in kernel.nodes]
    sources = external_inputs(group)
    builder, env, inputs = GraphBuilder("profile"), {}, []
    for index, source in enumerate(sources):
        meta = graph.info(source).outputs[0]
        env[source] = builder.placeholder(f"input_{index}")
        if meta.dtype.is_floating_point:
            inputs.append(torch.randn(meta.shape, dtype=meta.dtype))
        elif meta.dtype == torch.bool:
            inputs.append(torch.ones(meta.shape, dtype=torch.bool))
        else:
            inputs.append(torch.zeros(meta.shape, dtype=meta.dtype))
    for node in group:
        env[node] = builder.copy(node, lambda n: env[n])
        if node.op == "call_module":
            builder.modules[str(node.target)] = copy.deepcopy(graph.submodule(node))
        elif node.op == "get_attr":
            return None
    builder.output(env[group[-1]])
    try:
        return builder.build(_module_tree(builder.modules)), tuple(inputs)
    except (AttributeError, RuntimeError):
        return None


def _module_tree(modules: dict[str, nn.Module]) -> nn.Module:
    """A root module holding ``modules`` at their dotted paths."""
    root = nn.Module()
    for path, module in modules.items():
        parent = root
        *parents, leaf = path.split(".")
        for name in parents:
            if not hasattr(parent, name):
                parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        parent.add_module(leaf, module)
    return root


def _round_width(channels: int, fraction: float, step: int) -> int:
    return max(step, int(round(channels * fraction / step)) * step) if channels > step else channels


def _boundary_ms(bench: Bench, module: nn.Module, inputs: Sequence[torch.Tensor], profile: RuntimeProfile) -> float:
    """What a lone kernel spends converting its float input and output, which inside a model
    it does not: for an int8 runtime, the quantize of its input and dequantize of its output
    (half of a measured quantize-dequantize pair on each tensor); for a float one, a layout
    copy of each (the roofline's time to read and write them)."""
    with torch.no_grad():
        out = module(*inputs)
    tensors = [x for x in (*inputs, out) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not profile.runtime.endswith("int8"):
        return sum(2 * x.numel() * 4 for x in tensors) / profile.roofline.bytes_per_ms
    return sum(0.5 * bench.quantize_pair_ms(tuple(x.shape)) for x in tensors)


# -- the cached default ----------------------------------------------------------------------------
def default_profile(runtimes: Sequence[str], threads: int | None = None, progress: Progress = None) -> DeviceProfile:
    """This machine's profile for ``runtimes`` from the cache, measuring what it lacks (a cached
    file that is corrupt or was made elsewhere is rebuilt, and the progress line says why)."""
    threads = threads or torch.get_num_threads()
    machine, versions = Machine.here(), library_versions()
    path = default_profile_path(machine, versions, threads)
    profile = None
    if path.exists():
        try:
            profile = load_profile(path)
            profile.check_matches(machine, versions, threads)
        except ProfileError as why:
            if progress is not None:
                progress(f"rebuilding the cached device profile: {why}")
            profile = None
    if profile is None:
        profile = DeviceProfile(machine, versions, threads)
    missing = [r for r in runtimes if r not in profile.runtimes]
    for runtime in missing:
        profile.runtimes[runtime] = measure_runtime(runtime, threads, progress)
    if missing or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_profile(profile, path)
    profile.path = path
    return profile


def checked_profile(path: str | Path, runtimes: Sequence[str], threads: int | None = None) -> DeviceProfile:
    """A user's profile file, refused when it was made elsewhere or lacks a runtime asked for."""
    threads = threads or torch.get_num_threads()
    profile = load_profile(path)
    profile.check_matches(Machine.here(), library_versions(), threads)
    for runtime in runtimes:
        profile.runtime(runtime)
    return profile


@dataclass
class ProfiledRuntime:
    """One runtime's profile within its device profile: what predicting on it needs, and the
    one place that measures what it lacks and keeps the new timings in the profile's file."""

    device: DeviceProfile
    profile: RuntimeProfile
    threads: int

    @staticmethod
    def open(
        runtime: str, profile_file: str | Path | None = None, threads: int | None = None, progress: Progress = None
    ) -> ProfiledRuntime:
        """``profile_file`` (refused when it was made elsewhere or lacks ``runtime``), or the cached
        default profile of this machine (made on first use)."""
        threads = threads or torch.get_num_threads()
        if profile_file is not None:
            device = checked_profile(profile_file, [runtime], threads)
        else:
            device = default_profile([runtime], threads, progress)
        return ProfiledRuntime(device, device.runtime(runtime), threads)

    def fill(self, graph: Graph, sweep: bool = False, progress: Progress = None) -> TableFill:
        """Measure the kernels of ``graph`` the profile lacks (``measure_layers``) and keep them."""
        filled = measure_layers(graph, self.profile, self.threads, sweep=sweep, progress=progress)
        if filled.measured:
            self.keep()
        return filled

    def keep(self) -> None:
        """Save the device profile back to its file (one held in memory only stays there)."""
        if self.device.path is not None:
            save_profile(self.device, self.device.path)

    def predict(self, graph: Graph) -> LatencyPrediction:
        return predict(graph, self.profile, self.threads, str(self.device.path) if self.device.path else None)


def predict_latency(
    graph: Graph,
    runtime: str,
    profile_file: str | Path | None = None,
    threads: int | None = None,
    sweep: bool = False,
    progress: Progress = None,
) -> LatencyPrediction:
    """``graph``'s predicted latency on ``runtime``: from ``profile_file`` (refused when it was
    made elsewhere) or the cached default profile (made on first use), after measuring the
    kernels of ``graph`` it lacks; the new timings are saved back into that profile."""
    profiled = ProfiledRuntime.open(runtime, profile_file, threads, progress)
    profiled.fill(graph, sweep, progress)
    return profiled.predict(graph)


def check_prediction_runtime(runtime: str, profile: str | Path | None) -> None:
    """Errors before any work: a runtime without a latency model or not installed, a profile
    file that is missing, corrupt, made elsewhere, or without that runtime."""
    from slimfx.backends.runtimes import get_runtime

    rules_for(runtime)
    why = get_runtime(runtime).unavailable()
    if why is not None:
        raise BackendError(f"runtime {runtime} cannot run here: {why}")
    if profile is not None:
        checked_profile(profile, [runtime])


def sequence_ms(
    layers: Sequence[nn.Module], in_shape: tuple[int, ...], runtime: str, progress: Progress = None
) -> float | None:
    """Predicted ms of conv and linear ``layers`` run one after another on an input of
    ``in_shape`` (each alone, from the cached default profile's tables, measuring and keeping
    what it lacks); None when one of them is neither a conv nor a linear layer."""
    profiled = ProfiledRuntime.open(runtime, progress=progress)
    profile = profiled.profile
    configs = []
    shape = in_shape
    with torch.no_grad():
        for layer in layers:
            config = config_of(layer, shape)
            if config is None:
                return None
            configs.append(config)
            shape = tuple(layer(torch.zeros(shape)).shape)
    missing = [c for c in dict.fromkeys(configs) if c.key() not in profile.tables]
    if missing:
        bench = Bench(runtime, profiled.threads)
        bench.call_overhead_ms = profile.roofline.call_overhead_ms
        try:
            for config in missing:
                profile.tables[config.key()] = _layer_timing(bench, config, profile, sweep=False)
        finally:
            bench.close()
        profiled.keep()
    return sum(profile.tables[c.key()].ms for c in configs)


def module_ms(module: nn.Module, in_shape: tuple[int, ...], runtime: str, progress: Progress = None) -> float:
    """Predicted ms of ``module``'s kernels on an input of ``in_shape``, the module captured as
    a graph and predicted like a model (fusion rules, tables measured and kept), without the
    per-call overhead a model pays once: what a rewrite compares a layer with its replacement by."""
    graph = capture(copy.deepcopy(module).eval(), (torch.zeros(in_shape),), fallback=False)
    return predict_latency(graph, runtime, progress=progress).kernels_ms
