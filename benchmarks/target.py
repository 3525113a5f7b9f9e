"""Compile to a latency target, against uniform pruning and Torch-Pruning (+ NNCF int8) at equal measured latency.

    python benchmarks/target.py [--models cnn,resnet18] [--targets torch:0.5,torch:0.25,onnxruntime-int8:0.25,...]
                                [--recovery none,distill] [--epochs 3] [--random resnet50,mobilenet_v2]
                                [--random-batches 1,8] [--repeats 20] [--sessions 3] [--threads 2]

Trained models (scikit-learn's digits: the tests' CNN at 8x8, torchvision's resnet18 at 32x32;
batch 32): for each target (RUNTIME:FRACTION of the original's latency in the runtime's float
flavour) and each recovery (none, or distillation from the original for ``--epochs``):

- slimfx: ``compile(target="latency=F", runtime=R)`` (the plan chooses channel widths per group
  and, on an int8 runtime, int8);
- uniform: slimfx's ``prune-channels:ratio=r`` (L1, every group alike), then int8 on an int8
  runtime (``fold-bn,quantize``);
- Torch-Pruning: ``MetaPruner`` (L1 group magnitude, classifier kept) at ratio r, then NNCF's
  ``nncf.quantize`` of its ONNX file on an int8 runtime (the strongest peer route).

The ratio r of both baselines is searched (bisection, the structure quantized min-max while
searching) until their measured latency reaches slimfx's measured latency; then they get the
same recovery as slimfx; every route folds BatchNorm. Every route is timed here by the same harness: in the runtime
(torch eager, or onnxruntime on the route's ONNX file), the median of ``--sessions`` sessions
of ``--repeats`` runs each. Accuracy is measured in the runtime on the 297 test digits.

Random-weight models (``--random``, 224x224, latency only, sensitivity on random calibration
data): slimfx's measured latency against the target on each runtime, at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from tabulate import tabulate

import slimfx
from slimfx.backends import onnx as ort_tools
from slimfx.backends.timing import module_latency_ms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from digits import resnet18_on_digits, split, trained_cnn  # noqa: E402  (the tests' digits data and models)

BATCH = 32
SEARCH_STEPS = 7  # bisection steps of a baseline's ratio
MAX_RATIO = 0.9


@dataclass(frozen=True)
class Deployed:
    """What a route deploys: a torch module (torch eager) or an ONNX file (onnxruntime)."""

    module: nn.Module | None = None
    onnx: Path | None = None

    def latency_ms(self, x: torch.Tensor, sessions: int, repeats: int, threads: int) -> float:
        """The median over ``sessions`` fresh sessions of each one's median over ``repeats`` runs."""
        figures = []
        for _ in range(sessions):
            if self.module is not None:
                figures.append(module_latency_ms(self.module, (x,), repeats))
            else:
                figures.append(ort_tools.latency_ms(ort_tools.session(self.onnx, threads), (x,), repeats))
        return statistics.median(figures)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.module is not None:
            with torch.no_grad():
                logits = self.module(x)
        else:
            logits = torch.from_numpy(ort_tools.run(ort_tools.session(self.onnx), (x,))[0])
        return float((logits.argmax(1) == y).float().mean())


@dataclass(frozen=True)
class Row:
    route: str
    ms: float
    goal_ms: float
    accuracy: float | None
    macs: int
    chose: str


@dataclass(frozen=True)
class Setting:
    """One compile to a target: the runtime, the fraction, and the data."""

    runtime: str
    fraction: float
    recovery: bool
    epochs: int
    calib: list[torch.Tensor]
    train: list[tuple[torch.Tensor, torch.Tensor]]
    x_test: torch.Tensor
    y_test: torch.Tensor
    sessions: int
    repeats: int
    threads: int
    folder: Path

    @property
    def int8(self) -> bool:
        return self.runtime.endswith("-int8")

    @property
    def distill(self) -> str:
        return f"distill:epochs={self.epochs}"

    def deploy(self, module: nn.Module, example: torch.Tensor, name: str) -> Deployed:
        if self.runtime == "torch":
            return Deployed(module=module)
        path = self.folder / f"{name}-{len(list(self.folder.iterdir()))}.onnx"
        return Deployed(onnx=ort_tools.export_onnx(module, (example,), path))

    def time(self, deployed: Deployed, example: torch.Tensor) -> float:
        return deployed.latency_ms(example, self.sessions, self.repeats, self.threads)


# -- routes ---------------------------------------------------------------------------------------
def slimfx_route(model: nn.Module, example: torch.Tensor, s: Setting, original_ms: float) -> Row:
    result = slimfx.compile(
        model,
        example,
        target=f"latency={s.fraction:g}",
        runtime=s.runtime,
        calib_data=s.calib,
        train_data=s.train if s.recovery else None,
        eval_data=list(zip(s.x_test.split(100), s.y_test.split(100))),
        progress=_progress,
    )
    target = result.report.target
    deployed = s.deploy(result.module, example, "slimfx")
    ms = s.time(deployed, example)
    return Row(
        "slimfx target",
        ms,
        s.fraction * original_ms,
        deployed.accuracy(s.x_test, s.y_test),
        result.report.after.totals.macs,
        _chose(target.plan) + f" (target run measured {target.measured / target.original_measured:.3f}x)",
    )


def uniform_route(model: nn.Module, example: torch.Tensor, s: Setting, goal_ms: float, target_ms: float) -> Row:
    def build(ratio: float, final: bool) -> slimfx.CompileResult:
        spec = f"prune-channels:ratio={ratio:.4f}," if ratio > 0 else ""
        if final and s.recovery:
            spec += f"{s.distill},"
        spec += "fold-bn" + (",quantize" + ("" if final else ":calib=minmax") if s.int8 else "")
        data = s.train if final and s.recovery else None
        return slimfx.compile(model, example, spec, calib_data=s.calib, train_data=data)

    ratio = _search(lambda r: s.time(s.deploy(build(r, False).module, example, "probe"), example), goal_ms)
    result = build(ratio, True)
    deployed = s.deploy(result.module, example, "uniform")
    return Row(
        "uniform pruning" + (" + int8" if s.int8 else ""),
        s.time(deployed, example),
        target_ms,
        deployed.accuracy(s.x_test, s.y_test),
        result.report.after.totals.macs,
        f"ratio {ratio:.3f} everywhere" + (", int8" if s.int8 else ""),
    )


def torch_pruning_route(model: nn.Module, example: torch.Tensor, s: Setting, goal_ms: float, target_ms: float) -> Row:
    def pruned(ratio: float) -> nn.Module:
        import torch_pruning as tp

        copied = copy.deepcopy(model).eval()
        if ratio > 0:
            classifier = [m for m in copied.modules() if isinstance(m, nn.Linear)][-1]
            tp.pruner.MetaPruner(
                copied,
                example,
                importance=tp.importance.GroupMagnitudeImportance(p=1),
                pruning_ratio=ratio,
                ignored_layers=[classifier],
            ).step()
        return copied.eval()

    def probe(ratio: float) -> float:
        module = pruned(ratio)
        if s.int8:  # the structure NNCF's int8 will have, quantized quickly for the search
            module = slimfx.compile(module, example, "fold-bn,quantize:calib=minmax", calib_data=s.calib).module
        else:
            module = slimfx.compile(module, example, "fold-bn").module
        return s.time(s.deploy(module, example, "probe"), example)

    ratio = _search(probe, goal_ms)
    module = pruned(ratio)
    recovery = f"{s.distill}," if s.recovery else ""
    module = slimfx.compile(module, example, recovery + "fold-bn", train_data=s.train if s.recovery else None).module
    macs = slimfx.analyze(module, example).totals.macs
    deployed = s.deploy(module, example, "tp")
    name = "Torch-Pruning"
    if s.int8:
        deployed = Deployed(onnx=nncf_int8(deployed.onnx, s.calib, s.folder / "tp-nncf.onnx"))
        name += " + NNCF int8"
    return Row(
        name,
        s.time(deployed, example),
        target_ms,
        deployed.accuracy(s.x_test, s.y_test),
        macs,
        f"ratio {ratio:.3f} (Torch-Pruning's global ratio)" + (", NNCF int8" if s.int8 else ""),
    )


def nncf_int8(onnx_path: Path, calib: list[torch.Tensor], out: Path) -> Path:
    """NNCF's post-training int8 (default preset) of an ONNX model, on the calibration batches."""
    import nncf
    import onnx

    model = onnx.load(str(onnx_path))
    name = model.graph.input[0].name
    dataset = nncf.Dataset([b.numpy() for b in calib], lambda x: {name: x})
    quantized = nncf.quantize(model, dataset, subset_size=sum(len(b) for b in calib))
    onnx.save(quantized, str(out))
    return out


def _search(latency_at: Callable[[float], float], goal_ms: float) -> float:
    """The smallest pruning ratio whose measured latency is at most ``goal_ms`` (bisection)."""
    low, high = 0.0, MAX_RATIO
    if latency_at(low) <= goal_ms:
        return low
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        if latency_at(middle) <= goal_ms:
            high = middle
        else:
            low = middle
    return high


def _chose(plan) -> str:
    pruned = plan.changed_by("prune")
    groups = [c for c in plan.choices if c.chosen.technique == "prune"]
    kept = sum(c.chosen.width for c in groups) / max(sum(c.chosen.channels for c in groups), 1)
    int8 = " + int8" if plan.settings.quantize else ""
    return f"{len(pruned)}/{len(groups)} groups pruned, {kept:.0%} of channels kept{int8}"


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r" + text[:110].ljust(110) + ("\n" if not text else ""))
        sys.stderr.flush()


# -- tables ---------------------------------------------------------------------------------------
def trained_tables(args: argparse.Namespace) -> None:
    cases = []
    if "cnn" in args.models:
        cases.append(("digits CNN (8x8)", trained_cnn(), split()))
    if "resnet18" in args.models:
        cases.append(("resnet18 (digits 32x32)", *resnet18_on_digits(epochs=8)))
    for label, model, data in cases:
        x_train, y_train = data["train"]
        x_test, y_test = data["test"]
        example = x_test[:BATCH]
        calib = list(data["calib"][0][:256].split(BATCH))
        train = list(zip(x_train.split(50), y_train.split(50)))
        for runtime, fraction in args.targets:
            flavour = "torch" if runtime == "torch" else "onnxruntime"
            for recovery in args.recovery:
                with tempfile.TemporaryDirectory() as folder:
                    s = Setting(
                        runtime, fraction, recovery, args.epochs, calib, train, x_test, y_test,
                        args.sessions, args.repeats, args.threads, Path(folder),
                    )  # fmt: skip
                    original = Deployed(module=model) if flavour == "torch" else s.deploy(model, example, "original")
                    original_ms = s.time(original, example)
                    start = time.perf_counter()
                    ours = slimfx_route(model, example, s, original_ms)
                    accuracy = original.accuracy(x_test, y_test)
                    rows = [
                        Row("original fp32", original_ms, original_ms, accuracy, _macs(model, example), "-"),
                        ours,
                        uniform_route(model, example, s, ours.ms, ours.goal_ms),
                        torch_pruning_route(model, example, s, ours.ms, ours.goal_ms),
                    ]
                    seconds = time.perf_counter() - start
                _print_trained(label, s, rows, seconds)


def _print_trained(label: str, s: Setting, rows: list[Row], seconds: float) -> None:
    recovery = f"distillation, {s.epochs} epochs" if s.recovery else "no recovery"
    flavour = "torch eager" if s.runtime == "torch" else "onnxruntime"
    table = [
        [
            r.route,
            f"{r.ms:.3f}",
            f"{r.ms / r.goal_ms:.2f}",
            "-" if r.accuracy is None else f"{r.accuracy:.2%}",
            f"{r.macs / 1e6:.1f}M",
            r.chose,
        ]
        for r in rows
    ]
    print(
        f"\n{label}: latency={s.fraction:g} on {s.runtime} (of the original in {flavour} fp32), {recovery}; "
        f"batch {BATCH}, {s.threads} threads, each route timed here (median of {s.sessions} sessions x "
        f"{s.repeats} runs); {seconds:.0f} s\n"
    )
    headers = ["route", "ms", "ms / target", "accuracy (297 test digits)", "MACs", "what it chose"]
    print(tabulate(table, headers=headers, tablefmt="github"))
    sys.stdout.flush()


def random_tables(args: argparse.Namespace) -> None:
    rows = []
    for name in args.random:
        model = getattr(torchvision.models, name)().eval()
        for batch in args.random_batches:
            example = torch.randn(batch, 3, 224, 224)
            calib = [torch.randn(batch, 3, 224, 224) for _ in range(max(16 // batch, 2))]
            for runtime, fraction in args.targets:
                start = time.perf_counter()
                result = slimfx.compile(
                    model,
                    example,
                    target=f"latency={fraction:g}",
                    runtime=runtime,
                    calib_data=calib,
                    progress=_progress,
                )
                t = result.report.target
                rows.append(
                    [
                        name,
                        batch,
                        runtime,
                        f"{fraction:g}",
                        f"{t.original_measured:.2f}",
                        f"{t.goal:.2f}",
                        f"{t.plan.predicted:.2f}",
                        f"{t.measured:.2f}",
                        f"{t.measured / t.goal:.2f}",
                        _chose(t.plan),
                        f"{time.perf_counter() - start:.0f}",
                    ]
                )
                print(" | ".join(map(str, rows[-1])), file=sys.stderr)
    headers = [
        "model", "batch", "runtime", "target", "original ms (float flavour)", "goal ms", "predicted ms",
        "measured ms", "measured / goal", "what it chose", "s",
    ]  # fmt: skip
    print("\nrandom weights, 224x224, latency only (the target run's own measurement):\n")
    print(tabulate(rows, headers=headers, tablefmt="github"))


def _macs(model: nn.Module, example: torch.Tensor) -> int:
    return slimfx.analyze(model, example).totals.macs


def _targets(text: str) -> list[tuple[str, float]]:
    found = []
    for entry in text.split(","):
        runtime, _, fraction = entry.rpartition(":")
        found.append((runtime, float(fraction)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,resnet18", help="trained models: cnn, resnet18 (empty: none)")
    parser.add_argument(
        "--targets",
        type=_targets,
        default=_targets("torch:0.5,torch:0.25,onnxruntime-int8:0.25,onnxruntime-int8:0.1"),
        help="RUNTIME:FRACTION entries",
    )
    parser.add_argument("--recovery", default="none,distill", help="none, distill, or both (none,distill)")
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs of every route")
    parser.add_argument("--random", default="", help="random-weight models for latency only: resnet50,mobilenet_v2")
    parser.add_argument("--random-batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.recovery = [r == "distill" for r in args.recovery.split(",")]
    args.random = [m for m in args.random.split(",") if m]
    args.random_batches = [int(b) for b in args.random_batches.split(",")]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"CPU: {_cpu()}; torch {torch.__version__}")
    if args.models:
        trained_tables(args)
    if args.random:
        random_tables(args)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
