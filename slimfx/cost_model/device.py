"""Device profiles: what this machine does per runtime, as measured, stored as JSON.

A ``DeviceProfile`` names the machine (CPU model, cores, the ISA flags that decide which
kernels run), the library versions and the thread count it was measured with, and per runtime
a ``RuntimeProfile``: roofline parameters (sustained MACs per millisecond by op class, memory
bandwidth, per-kernel and per-call overheads), the channel step of its conv kernels, and the
measured layer tables (``LayerTiming``, one per layer configuration, with a width sweep for the
channel counts pruning may choose). The measuring lives in ``backends/profiler.py``; this module
holds the data, its JSON form, and the checks that keep a profile from being used where it was
not made (another machine, other versions, a corrupt file).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any

from slimfx.errors import SlimfxError

PROFILE_SCHEMA = "slimfx.device-profile/1"
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
VERSIONED_PACKAGES = ("slimfx", "torch", "onnxruntime", "onnx")


class ProfileError(SlimfxError):
    """A device profile is missing, corrupt, or was made on another machine or other versions."""


class OpClass(StrEnum):
    """What the roofline distinguishes: the kernels run at very different MAC rates."""

    DENSE_CONV = "dense_conv"
    DEPTHWISE_CONV = "depthwise_conv"
    POINTWISE_CONV = "pointwise_conv"
    LINEAR = "linear"
    ELEMENTWISE = "elementwise"
    VIEW = "view"


@dataclass(frozen=True)
class Machine:
    """The CPU a profile was measured on."""

    cpu: str
    cores: int
    isa: tuple[str, ...]

    @staticmethod
    def here() -> Machine:
        """This machine, read from /proc/cpuinfo (platform's processor name elsewhere)."""
        name, flags = platform.processor() or platform.machine(), set()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            for line in cpuinfo.read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
        return Machine(name, os.cpu_count() or 1, tuple(f for f in ISA_FLAGS if f in flags))

    def describe(self) -> str:
        return f"{self.cpu}, {self.cores} cores, {' '.join(self.isa) or 'no AVX2'}"

    @property
    def int8_saturates(self) -> bool:
        """Whether this CPU's int8 kernels sum uint8 x int8 pairs in int16 (x86 with AVX2 but no
        VNNI: onnxruntime's and fbgemm's u8s8 paths saturate with full-range weights)."""
        return "avx2" in self.isa and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(self.isa)


def library_versions() -> dict[str, str]:
    """The versions a profile depends on (a package that is not installed is left out)."""
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class Roofline:
    """A runtime's sustained rates and fixed costs, measured by micro-benchmarks.

    A kernel takes ``kernel_overhead_ms`` plus the larger of its compute time (MACs at its op
    class's rate, element ops at ``elements_per_ms``) and its memory time (bytes at
    ``bytes_per_ms``); a free view costs ``view_overhead_ms``; a whole run adds ``call_overhead_ms``.
    """

    dense_conv_macs_per_ms: float
    depthwise_conv_macs_per_ms: float
    pointwise_conv_macs_per_ms: float
    linear_macs_per_ms: float
    elements_per_ms: float
    bytes_per_ms: float
    kernel_overhead_ms: float
    view_overhead_ms: float
    call_overhead_ms: float

    def macs_per_ms(self, op_class: OpClass) -> float:
        rates = {
            OpClass.DENSE_CONV: self.dense_conv_macs_per_ms,
            OpClass.DEPTHWISE_CONV: self.depthwise_conv_macs_per_ms,
            OpClass.POINTWISE_CONV: self.pointwise_conv_macs_per_ms,
            OpClass.LINEAR: self.linear_macs_per_ms,
        }
        return rates.get(op_class, self.dense_conv_macs_per_ms)


@dataclass(frozen=True)
class LayerTiming:
    """A layer configuration's measured latency, and sweeps over its channel widths.

    ``in_sweep`` holds (input channels, ms) with the output channels as they are, ``out_sweep``
    (output channels, ms) with the input channels as they are (a depthwise layer: both together,
    in ``out_sweep``). A narrower layer is read off them on the channel step's staircase
    (``cost_model.latency.swept_ms``).
    """

    key: str
    ms: float
    in_channels: int = 0
    out_channels: int = 0
    groups: int = 0
    in_sweep: tuple[tuple[int, float], ...] = ()
    out_sweep: tuple[tuple[int, float], ...] = ()
    moved_bytes: int = 0  # a kernel measured by signature: the bytes it reads and writes

    @property
    def swept(self) -> bool:
        return bool(self.in_sweep or self.out_sweep)


@dataclass
class RuntimeProfile:
    """One runtime's roofline, channel step and layer tables (tables grow as models are measured)."""

    runtime: str
    roofline: Roofline
    channel_step: int
    tables: dict[str, LayerTiming] = field(default_factory=dict)

    def families(self) -> dict[str, list[LayerTiming]]:
        """Tables by width-free family key (what a pruned layer of the same shape is looked up by)."""
        found: dict[str, list[LayerTiming]] = {}
        for timing in self.tables.values():
            found.setdefault(family_of(timing.key), []).append(timing)
        return found


@dataclass
class DeviceProfile:
    """A machine, the versions and threads it was measured with, and each runtime's profile."""

    machine: Machine
    versions: dict[str, str]
    threads: int
    runtimes: dict[str, RuntimeProfile] = field(default_factory=dict)
    path: Path | None = None  # where it was read from or is stored, when it is a file

    def runtime(self, name: str) -> RuntimeProfile:
        if name not in self.runtimes:
            known = ", ".join(self.runtimes) or "none"
            raise ProfileError(
                f"the device profile {self._where()} has no measurements for runtime {name} (it has: {known}); "
                f"run: slimfx profile-device --runtime {name}"
            )
        return self.runtimes[name]

    def _where(self) -> str:
        return str(self.path) if self.path else "(in memory)"

    def check_matches(self, machine: Machine, versions: dict[str, str], threads: int) -> None:
        """A ``ProfileError`` when the profile was measured on another machine, versions or thread count."""
        problems = []
        if self.machine != machine:
            problems.append(f"it was measured on {self.machine.describe()}, this is {machine.describe()}")
        changed = [
            f"{name} {self.versions.get(name, 'absent')} -> {versions.get(name, 'absent')}"
            for name in sorted(set(self.versions) | set(versions))
            if self.versions.get(name) != versions.get(name)
        ]
        if changed:
            problems.append("versions changed: " + ", ".join(changed))
        if self.threads != threads:
            problems.append(f"it was measured with {self.threads} threads, this run uses {threads}")
        if problems:
            raise ProfileError(
                f"the device profile {self._where()} does not fit this run: {'; '.join(problems)}. "
                "Run slimfx profile-device again (or leave --profile out to use the cached default)"
            )

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PROFILE_SCHEMA,
            "machine": asdict(self.machine),
            "versions": dict(self.versions),
            "threads": self.threads,
            "runtimes": {
                name: {
                    "roofline": asdict(p.roofline),
                    "channel_step": p.channel_step,
                    "tables": [asdict(t) for t in p.tables.values()],
                }
                for name, p in self.runtimes.items()
            },
        }

    @staticmethod
    def from_dict(data: Any, where: str = "(in memory)") -> DeviceProfile:
        """Parse a profile's JSON form; anything malformed is a ``ProfileError`` naming the file."""
        try:
            if data.get("schema") != PROFILE_SCHEMA:
                raise ProfileError(f"{where} is not a slimfx device profile (schema {data.get('schema')!r})")
            machine = Machine(str(data["machine"]["cpu"]), int(data["machine"]["cores"]), tuple(data["machine"]["isa"]))
            runtimes = {}
            for name, body in data["runtimes"].items():
                roofline = Roofline(**{f.name: float(body["roofline"][f.name]) for f in fields(Roofline)})
                tables = {}
                for row in body["tables"]:
                    timing = LayerTiming(
                        str(row["key"]),
                        float(row["ms"]),
                        int(row["in_channels"]),
                        int(row["out_channels"]),
                        int(row["groups"]),
                        tuple((int(w), float(ms)) for w, ms in row["in_sweep"]),
                        tuple((int(w), float(ms)) for w, ms in row["out_sweep"]),
                        int(row.get("moved_bytes", 0)),
                    )
                    tables[timing.key] = timing
                runtimes[str(name)] = RuntimeProfile(str(name), roofline, int(body["channel_step"]), tables)
            versions = {str(k): str(v) for k, v in data["versions"].items()}
            return DeviceProfile(machine, versions, int(data["threads"]), runtimes)
        except ProfileError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ProfileError(
                f"{where} is a corrupt device profile ({type(exc).__name__}: {exc}); delete it or run "
                "slimfx profile-device again"
            ) from exc


def save_profile(profile: DeviceProfile, path: str | Path) -> Path:
    """Write ``profile`` as JSON, all or nothing."""
    from slimfx.files.atomic import atomic_write

    text = json.dumps(profile.to_dict(), indent=1)
    atomic_write(path, lambda f: f.write(text.encode()))
    profile.path = Path(path)
    return Path(path)


def load_profile(path: str | Path) -> DeviceProfile:
    """Read a profile file; a missing or corrupt one is a ``ProfileError``."""
    path = Path(path)
    if not path.exists():
        raise ProfileError(f"no device profile at {path}; make one with: slimfx profile-device -o {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{path} is not a readable device profile ({exc}); run slimfx profile-device again") from exc
    profile = DeviceProfile.from_dict(data, str(path))
    profile.path = path
    return profile


def cache_folder() -> Path:
    """Where default profiles are cached: $SLIMFX_CACHE_DIR, else the user's cache folder."""
    if os.environ.get("SLIMFX_CACHE_DIR"):
        return Path(os.environ["SLIMFX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slimfx"


def default_profile_path(machine: Machine, versions: dict[str, str], threads: int) -> Path:
    """The cached default profile's file, keyed by machine, versions and threads."""
    identity = json.dumps([asdict(machine), versions, threads], sort_keys=True)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_folder() / "profiles" / f"device-{digest}.json"


# -- layer keys ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerConfig:
    """Everything a conv or linear kernel's latency depends on, but the runtime and threads
    (which the profile holds): the op, the input shape (batch first), the output channels, the
    kernel geometry, groups, bias, the ops fused into it, and its dtype."""

    op: str  # "conv1d", "conv2d", "conv3d", "linear"
    in_shape: tuple[int, ...]
    out_channels: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True
    fused: tuple[str, ...] = ()  # e.g. ("batchnorm", "relu"), ("add", "relu")
    dtype: str = "fp32"

    @property
    def in_channels(self) -> int:
        return self.in_shape[1] if self.op != "linear" else self.in_shape[-1]

    @property
    def depthwise(self) -> bool:
        return self.op != "linear" and self.groups > 1 and self.groups == self.in_channels

    def key(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def with_widths(self, in_channels: int, out_channels: int) -> LayerConfig:
        """The same layer with other channel counts (a depthwise layer stays depthwise)."""
        shape = list(self.in_shape)
        shape[1 if self.op != "linear" else -1] = in_channels
        groups = in_channels if self.depthwise else self.groups
        return LayerConfig(
            self.op,
            tuple(shape),
            out_channels,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            groups,
            self.bias,
            self.fused,
            self.dtype,
        )


def family_of(key: str) -> str:
    """A layer key with its channel counts and groups left out (depthwise kept as a flag); a
    kernel signature's family (``cost_model.latency.signature_family``)."""
    if not key.startswith("{"):
        return signature_family(key)
    data = json.loads(key)
    config = LayerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    shape = list(config.in_shape)
    shape[1 if config.op != "linear" else -1] = 0
    return json.dumps(
        [config.op, shape, config.kernel, config.stride, config.padding, config.dilation, config.depthwise,
         config.groups > 1, config.bias, config.fused, config.dtype],
        separators=(",", ":"),
    )  # fmt: skip


def round_up(channels: int, step: int) -> int:
    """``channels`` rounded up to a multiple of the channel step."""
    step = max(step, 1)
    return -(-channels // step) * step


def padded_work(in_channels: int, out_channels: int, groups: int, step: int) -> float:
    """Input channels per group times output channels, each rounded up to the channel step
    (depthwise: the channels, rounded up): what a SIMD kernel really computes."""
    step = max(step, 1)

    def up(n: int) -> int:
        return -(-n // step) * step

    if groups > 1 and groups == in_channels:
        return float(up(out_channels))
    return float(up(max(in_channels // max(groups, 1), 1)) * up(out_channels))


def signature_family(signature: str) -> str:
    """A kernel signature with the channel dimension of every shape, and module settings, left out."""
    described, metas = json.loads(signature)
    ops_only = [[op, target.split(":")[0], args] for op, target, args in described]
    shapes = [[[d if i != 1 else 0 for i, d in enumerate(shape)], dtype] for shape, dtype in metas]
    return "kernel:" + json.dumps([ops_only, shapes], separators=(",", ":"))
