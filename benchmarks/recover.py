"""Recovery after pruning by half, then int8: no recovery, fine-tune, KD, KD + hints, PTQ vs Apprentice,
and the peer route (Torch-Pruning + the same fine-tune + onnxruntime's quantize_static).

    python benchmarks/recover.py [--epochs 6] [--seeds 3] [--threads 2] [--repeats 20] [--rounds 5]
                                 [--models cnn,resnet18]

Models trained here on scikit-learn's digits: the tests' digits CNN (8x8) and torchvision's
resnet18 at 32x32. Every route prunes 50% of the channels by filter L1 norm and trains for the
same number of epochs on the same 810 training digits (90 more held out by slimfx's distill
to pick the epoch; the peer's fine-tune trains on all 900). The plain fine-tune is distill
with ``alpha=1,hints=none`` (cross-entropy only), on both slimfx's and Torch-Pruning's model.
int8 rows run in onnxruntime (accuracy from the exported file); fp32 rows in torch. The test set
is 297 digits (one point is 3 digits), so every route runs with ``--seeds`` seeds (the seed of
its training) and the table gives the mean accuracy and the range. Latency: onnxruntime, the
first seed's model, each session timed on its own (median), in rounds over all routes (the median
of the rounds: a load spike on a shared machine hits one round, not one route), against the
original in onnxruntime fp32.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate

import slimfx
from slimfx.backends import onnx as ort_tools

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import resnet18_on_digits, split, trained_cnn  # noqa: E402  (the tests' digits data and models)
from quantize import ort_quantize_static  # noqa: E402  (onnxruntime's recommended static flow)

PRUNE = "prune-channels:ratio=0.5"
INT8 = "fold-bn,quantize"


@dataclass
class Row:
    route: str
    accuracy: float
    macs: int
    onnx: Path
    train_seconds: float


@dataclass
class Route:
    """One route over every seed: the first seed's model is timed, accuracy is averaged."""

    route: str
    accuracies: list[float]
    macs: int
    onnx: Path
    train_seconds: float  # mean over the seeds

    @property
    def accuracy(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)


def over_seeds(runs: list[list[Row]]) -> list[Route]:
    """The same routes run with several seeds, merged route by route."""
    return [
        Route(
            same[0].route,
            [r.accuracy for r in same],
            same[0].macs,
            same[0].onnx,
            sum(r.train_seconds for r in same) / len(same),
        )
        for same in zip(*runs)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of every recovery route")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of every route; accuracy is their mean")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all routes; latency is their median")
    parser.add_argument("--models", default="cnn,resnet18")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    cases = []
    if "cnn" in args.models:
        cases.append(("digits CNN (8x8)", trained_cnn(), split()))
    if "resnet18" in args.models:
        cases.append(("resnet18 (digits 32x32)", *resnet18_on_digits(epochs=8)))
    with tempfile.TemporaryDirectory() as folder:
        for label, model, data in cases:
            runs = [
                routes(model, data, args.epochs, Path(folder) / f"{label.split()[0]}-{seed}", seed)
                for seed in range(args.seeds)
            ]
            print_table(label, over_seeds(runs), data, args.threads, args.repeats, args.rounds)


def routes(model: torch.nn.Module, data: dict, epochs: int, folder: Path, seed: int) -> list[Row]:
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    example = x_test[:1]
    train = list(zip(x_train.split(50), y_train.split(50)))
    calib = list(data["calib"][0].split(100))
    finetune = f"distill:epochs={epochs},alpha=1,hints=none"
    kd = f"distill:epochs={epochs},hints=none"
    kd_hints = f"distill:epochs={epochs}"
    apprentice = "distill:epochs=1,lr=0.0002"
    rows = [torch_row("original fp32", model, example, x_test, y_test, folder, 0.0)]
    for route, spec in [
        ("slimfx prune, no recovery", PRUNE),
        ("slimfx prune + fine-tune (CE)", f"{PRUNE},{finetune}"),
        ("slimfx prune + KD", f"{PRUNE},{kd}"),
        ("slimfx prune + KD + hints", f"{PRUNE},{kd_hints}"),
    ]:
        start = time.perf_counter()
        result = slimfx.compile(model, example, spec, train_data=train, seed=seed)
        rows.append(torch_row(route, result.module, example, x_test, y_test, folder, time.perf_counter() - start))
    for route, spec in [
        ("slimfx KD + hints, int8 (PTQ)", f"{PRUNE},{kd_hints},{INT8}"),
        ("slimfx KD + hints, int8 + Apprentice", f"{PRUNE},{kd_hints},{INT8},{apprentice}"),
    ]:
        start = time.perf_counter()
        result = slimfx.compile(model, example, spec, train_data=train, calib_data=calib, seed=seed)
        seconds = time.perf_counter() - start
        path = result.export_onnx(folder / f"{len(rows)}.onnx")
        rows.append(onnx_row(route, path, result.report.after.totals.macs, x_test, y_test, seconds))
    rows += peer_routes(model, example, train, calib, x_test, y_test, epochs, folder, seed)
    return rows


def peer_routes(model, example, train, calib, x_test, y_test, epochs, folder, seed) -> list[Row]:
    """Torch-Pruning (L1 magnitude, 50%, classifier kept), the same cross-entropy fine-tune,
    then onnxruntime's quantize_static (QDQ, per-channel int8 weights, uint8 activations)."""
    import torch_pruning as tp

    start = time.perf_counter()
    pruned = copy.deepcopy(model)
    classifier = [m for m in pruned.modules() if isinstance(m, torch.nn.Linear)][-1]
    tp.pruner.MetaPruner(
        pruned,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[classifier],
    ).step()
    result = slimfx.compile(
        pruned.eval(), example, f"distill:epochs={epochs},alpha=1,hints=none", train_data=train, seed=seed
    )
    seconds = time.perf_counter() - start
    tuned = torch_row("Torch-Pruning + fine-tune (CE)", result.module, example, x_test, y_test, folder, seconds)
    int8_path = folder / "peer.int8.onnx"
    quantize_seconds = ort_quantize_static(tuned.onnx, int8_path, calib, "minmax")
    quantized = onnx_row(
        "Torch-Pruning + fine-tune + ORT quantize_static",
        int8_path,
        tuned.macs,
        x_test,
        y_test,
        seconds + quantize_seconds,
    )
    return [tuned, quantized]


def torch_row(route, module, example, x_test, y_test, folder, seconds) -> Row:
    with torch.no_grad():
        accuracy = float((module(x_test).argmax(1) == y_test).float().mean())
    macs = slimfx.analyze(module, example).totals.macs
    name = "".join(c if c.isalnum() else "_" for c in route)
    path = ort_tools.export_onnx(module, (example,), folder / f"{name}.onnx")
    return Row(route, accuracy, macs, path, seconds)


def onnx_row(route, path, macs, x_test, y_test, seconds) -> Row:
    (logits,) = ort_tools.run(ort_tools.session(path), (x_test,))
    accuracy = float((torch.from_numpy(logits).argmax(1) == y_test).float().mean())
    return Row(route, accuracy, macs, path, seconds)


def print_table(label: str, rows: list[Route], data: dict, threads: int, repeats: int, rounds: int) -> None:
    x_test = data["test"][0]
    one, many = x_test[:1], x_test[:32]
    sessions = {row.route: ort_tools.session(row.onnx, threads) for row in rows}
    timings: dict[str, list[tuple[float, float]]] = {row.route: [] for row in rows}
    for _ in range(rounds):  # the routes in turn, each session timed on its own; a load spike hits one round
        for row in rows:
            session = sessions[row.route]
            timings[row.route].append(
                (ort_tools.latency_ms(session, (one,), repeats), ort_tools.latency_ms(session, (many,), repeats))
            )
    latency = {route: tuple(statistics.median(t[k] for t in runs) for k in (0, 1)) for route, runs in timings.items()}
    base1, base32 = latency[rows[0].route]
    table = [
        [
            row.route,
            f"{row.accuracy:.1%} ({min(row.accuracies):.1%}-{max(row.accuracies):.1%})",
            f"{row.accuracy - rows[0].accuracy:+.1%}",
            f"{row.macs:,} ({row.macs / rows[0].macs:.2f}x)",
            f"{latency[row.route][0]:.3f} ms ({base1 / latency[row.route][0]:.2f}x)",
            f"{latency[row.route][1]:.3f} ms ({base32 / latency[row.route][1]:.2f}x)",
            f"{row.train_seconds:.1f}",
        ]
        for row in rows
    ]
    print(
        f"\n{label}: {len(x_test)} test digits; latency in onnxruntime (CPUExecutionProvider, {threads} threads), "
        f"median over {rounds} rounds of the median of {repeats}, speedup against the original in onnxruntime "
        f"fp32; accuracy: mean over "
        f"{len(rows[0].accuracies)} seeds (range)\n"
    )
    print(
        tabulate(
            table,
            headers=[
                "route",
                "test accuracy (range)",
                "vs original",
                "MACs",
                "batch 1",
                "batch 32",
                "compile + train s",
            ],
            tablefmt="github",
        )
    )


if __name__ == "__main__":
    main()
