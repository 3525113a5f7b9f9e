"""Structure rewrites against channel pruning at equal measured latency, each recovered alike.

    python benchmarks/rewrites.py [--models resnet18,mobilenet_v2] [--epochs 3] [--repeats 20]
                                  [--sessions 3] [--threads 2] [--random resnet50,densenet121]

Trained models (torchvision's resnet18 and mobilenet_v2 trained here on scikit-learn's digits
at 32x32): for each rewrite (its options in the table), the rewritten model's MACs (share of
the original's), its predicted latency (torch eager, this machine's device profile), its
measured latency in torch eager fp32 and onnxruntime fp32 at batch 1 and 32 (each the median of
``--sessions`` sessions of ``--repeats`` runs), and the accuracy on the 297 test digits before
recovery and after distillation from the original for ``--epochs``. Against it, slimfx's
``prune-channels:ratio=r`` (L1), r searched (bisection) until its measured torch batch-1
latency reaches the rewrite's, with the same distillation. A rewrite that changes nothing is
shown as such. ``--random``: random-init models at 224x224, speed only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from tabulate import tabulate

import slimfx
from slimfx.backends import onnx as ort_tools

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from digits import classifier_on_digits  # noqa: E402  (the tests' digits data)
from target import Deployed, _cpu, _search  # noqa: E402  (the target benchmark's timing harness)

REWRITES = {
    "resnet18": ["fire", "crelu:similarity=0.5", "drop-blocks:target-latency=0.75", "drop-blocks:target-latency=0.5"],
    "mobilenet_v2": ["mixconv:energy=0.5", "crelu:similarity=0.5", "drop-blocks:target-latency=0.75"],
}
TRAINING = {"resnet18": (4, 1e-3), "mobilenet_v2": (8, 3e-3)}
RANDOM_REWRITES = ["fire", "mixconv:energy=0.5", "drop-blocks:target-latency=0.75"]


@dataclass(frozen=True)
class Timings:
    torch_b1: float
    torch_b32: float
    ort_b1: float
    ort_b32: float


@dataclass(frozen=True)
class Row:
    route: str
    macs: float
    predicted_ms: float | None
    timings: Timings
    before: float | None
    after: float | None


@dataclass(frozen=True)
class Bench:
    example: torch.Tensor
    batch: torch.Tensor
    sessions: int
    repeats: int
    threads: int
    folder: Path

    def timings(self, module: nn.Module) -> Timings:
        onnx = ort_tools.export_onnx(module, (self.example,), self.folder / f"m{time.monotonic_ns()}.onnx")
        torch_deployed, ort_deployed = Deployed(module=module), Deployed(onnx=onnx)
        return Timings(
            torch_deployed.latency_ms(self.example, self.sessions, self.repeats, self.threads),
            torch_deployed.latency_ms(self.batch, self.sessions, self.repeats, self.threads),
            ort_deployed.latency_ms(self.example, self.sessions, self.repeats, self.threads),
            ort_deployed.latency_ms(self.batch, self.sessions, self.repeats, self.threads),
        )

    def torch_b1(self, module: nn.Module) -> float:
        return Deployed(module=module).latency_ms(self.example, self.sessions, self.repeats, self.threads)


def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean())


def predicted_ms(module: nn.Module, example: torch.Tensor) -> float | None:
    report = slimfx.analyze(module, example, runtime="torch")
    return report.prediction.total_ms if report.prediction is not None else None


def macs_share(result: slimfx.CompileResult) -> float:
    return result.report.after.totals.macs / result.report.before.totals.macs


def trained_rows(name: str, args: argparse.Namespace, bench: Bench) -> list[Row]:
    epochs, lr = TRAINING[name]
    model, data = classifier_on_digits(name, epochs, lr)
    x_test, y_test = data["test"]
    calib = list(zip(data["calib"][0].split(100), data["calib"][1].split(100)))
    train = list(zip(data["train"][0].split(50), data["train"][1].split(50)))
    distill = f"distill:epochs={args.epochs}"
    original = accuracy(model, x_test, y_test)
    rows = [
        Row(
            "original",
            1.0,
            predicted_ms(model, bench.example),
            bench.timings(model),
            original,
            None,
        )
    ]
    for spec in REWRITES[name]:
        plain = slimfx.compile(model, bench.example, spec, calib_data=calib)
        rewritten = [d for d in plain.report.passes[-1].decisions if d.action in ("rewritten", "removed")]
        if not rewritten:
            print(f"{name} {spec}: nothing rewritten ({plain.report.passes[-1].decisions[0].reason})")
            continue
        recovered = slimfx.compile(model, bench.example, f"{spec},{distill}", calib_data=calib, train_data=train)
        timings = bench.timings(recovered.module)
        rows.append(
            Row(
                f"{spec} ({len(rewritten)} layers)",
                macs_share(recovered),
                predicted_ms(recovered.module, bench.example),
                timings,
                accuracy(plain.module, x_test, y_test),
                accuracy(recovered.module, x_test, y_test),
            )
        )

        def latency_at(ratio: float) -> float:
            if ratio == 0:
                return bench.torch_b1(model)
            return bench.torch_b1(slimfx.compile(model, bench.example, f"prune-channels:ratio={ratio:.4f}").module)

        ratio = _search(latency_at, timings.torch_b1)
        pruning = f"prune-channels:ratio={ratio:.3f}"
        plain = slimfx.compile(model, bench.example, pruning)
        recovered = slimfx.compile(model, bench.example, f"{pruning},{distill}", calib_data=calib, train_data=train)
        rows.append(
            Row(
                f"  vs {pruning}",
                macs_share(recovered),
                predicted_ms(recovered.module, bench.example),
                bench.timings(recovered.module),
                accuracy(plain.module, x_test, y_test),
                accuracy(recovered.module, x_test, y_test),
            )
        )
    return rows


def random_rows(name: str, bench: Bench) -> list[Row]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    calib = [torch.randn(4, 3, 224, 224) for _ in range(2)]
    rows = [Row("original", 1.0, predicted_ms(model, bench.example), bench.timings(model), None, None)]
    for spec in RANDOM_REWRITES:
        result = slimfx.compile(model, bench.example, spec, calib_data=calib)
        changed = [d for d in result.report.passes[-1].decisions if d.action in ("rewritten", "removed")]
        if changed:
            label = f"{spec} ({len(changed)} layers)"
            rows.append(
                Row(
                    label,
                    macs_share(result),
                    predicted_ms(result.module, bench.example),
                    bench.timings(result.module),
                    None,
                    None,
                )
            )
    return rows


def print_rows(title: str, rows: list[Row]) -> None:
    base = rows[0].timings
    table = []
    for r in rows:
        t = r.timings
        table.append(
            [
                r.route,
                f"{r.macs:.3f}",
                f"{r.predicted_ms:.2f}" if r.predicted_ms is not None else "-",
                f"{t.torch_b1:.2f} ({t.torch_b1 / base.torch_b1:.2f}x)",
                f"{t.torch_b32:.1f} ({t.torch_b32 / base.torch_b32:.2f}x)",
                f"{t.ort_b1:.2f} ({t.ort_b1 / base.ort_b1:.2f}x)",
                f"{t.ort_b32:.1f} ({t.ort_b32 / base.ort_b32:.2f}x)",
                f"{r.before:.2%}" if r.before is not None else "-",
                f"{r.after:.2%}" if r.after is not None else "-",
            ]
        )
    headers = [
        "route",
        "MACs",
        "pred. torch ms",
        "torch b1 ms",
        "torch b32 ms",
        "ORT b1 ms",
        "ORT b32 ms",
        "acc.",
        "acc. distilled",
    ]
    print(f"\n{title}\n")
    print(tabulate(table, headers, tablefmt="github"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--random", default="")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"CPU: {_cpu()}; torch {torch.__version__}; {args.threads} threads")
    with tempfile.TemporaryDirectory() as folder:
        for name in filter(None, args.models.split(",")):
            example = torch.randn(1, 3, 32, 32)
            bench = Bench(example, torch.randn(32, 3, 32, 32), args.sessions, args.repeats, args.threads, Path(folder))
            start = time.time()
            rows = trained_rows(name, args, bench)
            print_rows(f"{name} trained on digits at 32x32 ({time.time() - start:.0f} s)", rows)
        for name in filter(None, args.random.split(",")):
            bench = Bench(
                torch.randn(1, 3, 224, 224),
                torch.randn(32, 3, 224, 224),
                args.sessions,
                args.repeats,
                args.threads,
                Path(folder),
            )
            print_rows(f"{name} random-init at 224x224 (speed only)", random_rows(name, bench))


if __name__ == "__main__":
    main()
