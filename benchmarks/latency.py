"""Predicted against measured latency over the torchvision classifiers, per runtime.

    python benchmarks/latency.py [--models a,b] [--limit N] [--batches 1,8] [--runtimes R,...]
                                 [--pruned N] [--max-ms 400] [--rounds 3] [--size 224]

A fresh device profile is measured first (one run, this machine). Per model and batch, each
runtime's prediction comes from that profile after the model's kernels are timed alone
(``measure_layers``); the measurement is the whole model in that runtime, the median of
``--rounds`` interleaved rounds (the runtimes' sessions take turns, each timed on its own).
``onnxruntime-int8`` runs slimfx's int8 graph (``quantize``, 2 random calibration batches).
Pruned variants: for the first ``--pruned`` models, width sweeps are measured on the original,
the model is pruned at a random ratio in [0.3, 0.7] (one ratio per model, L1), and the pruned
graph is predicted from the original's tables only (nothing is measured on it), then measured.
A model is skipped at a batch where its eager time (batch x its batch-1 time) would exceed
``--max-ms`` (named in the output).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torchvision
from tabulate import tabulate

import slimfx
from slimfx.backends.profiler import measure_layers, profile_device
from slimfx.backends.runtimes import Workspace, get_runtime
from slimfx.backends.timing import module_latency_ms
from slimfx.cost_model.latency import predict
from slimfx.ir.capture import capture

FLOAT_RUNTIMES = ("torch", "onnxruntime")
SKIP = {"inception_v3", "googlenet"}  # need 299x299 / aux outputs in eval: not part of the plain corpus


@dataclass(frozen=True)
class Row:
    model: str
    variant: str  # "original", "int8" or "pruned 0.42"
    batch: int
    runtime: str
    predicted_ms: float
    measured_ms: float

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1


def classifiers() -> list[str]:
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(n for n in names if n not in SKIP)


def interleaved_ms(sessions: dict[str, object], inputs: tuple[torch.Tensor, ...], rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each session's median of 10 runs, the sessions taking turns."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            times[name].append(session.latency_ms(inputs, 10))
    return {name: statistics.median(values) for name, values in times.items()}


def predicted_ms(graph, profile, runtime: str, threads: int, sweep: bool = False) -> float:
    runtime_profile = profile.runtime(runtime)
    measure_layers(graph, runtime_profile, threads, sweep=sweep)
    return predict(graph, runtime_profile, threads).total_ms


def run_model(name: str, batch: int, runtimes: list[str], profile, args, rng: random.Random, prune: bool) -> list[Row]:
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(batch, 3, args.size, args.size)
    rows: list[Row] = []
    graph = capture(model, (x,))
    floats = [r for r in runtimes if r in FLOAT_RUNTIMES]
    predictions = {r: predicted_ms(graph, profile, r, threads, sweep=prune) for r in floats}
    with Workspace((x,)) as workspace:
        sessions = {r: get_runtime(r).session(model, workspace) for r in floats}
        measured = interleaved_ms(sessions, (x,), args.rounds)
    rows += [Row(name, "original", batch, r, predictions[r], measured[r]) for r in floats]
    if "onnxruntime-int8" in runtimes:
        calib = [torch.randn(batch, 3, args.size, args.size) for _ in range(2)]
        result = slimfx.compile(model, x, "quantize", calib_data=calib)
        predicted = predicted_ms(result.graph, profile, "onnxruntime-int8", threads)
        with Workspace((x,)) as workspace:
            session = get_runtime("onnxruntime-int8").session(result.module, workspace)
            ms = interleaved_ms({"int8": session}, (x,), args.rounds)["int8"]
        rows.append(Row(name, "int8", batch, "onnxruntime-int8", predicted, ms))
    if prune:
        ratio = round(rng.uniform(0.3, 0.7), 2)
        result = slimfx.compile(model, x, f"prune-channels:ratio={ratio}")
        pruned = {r: predict(result.graph, profile.runtime(r), threads).total_ms for r in floats}  # no measuring
        with Workspace((x,)) as workspace:
            sessions = {r: get_runtime(r).session(result.module, workspace) for r in floats}
            measured = interleaved_ms(sessions, (x,), args.rounds)
        rows += [Row(name, f"pruned {ratio}", batch, r, pruned[r], measured[r]) for r in floats]
    return rows


def summary(rows: list[Row]) -> list[list[object]]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        key = f"{row.runtime}, pruned" if row.variant.startswith("pruned") else row.runtime
        groups.setdefault(key, []).append(row)
    table = []
    for key, group in groups.items():
        errors = [abs(r.error) for r in group]
        table.append(
            [
                key,
                len(group),
                f"{sum(e <= 0.10 for e in errors) / len(errors):.0%}",
                f"{sum(e <= 0.25 for e in errors) / len(errors):.0%}",
                f"{statistics.median(errors):.1%}",
                f"{statistics.median(r.error for r in group):+.1%}",
            ]
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated torchvision model names (default: every classifier)")
    parser.add_argument("--limit", type=int, help="only the first N models")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runtimes", default="torch,onnxruntime,onnxruntime-int8")
    parser.add_argument("--pruned", type=int, default=12, help="models that also get a pruned variant")
    parser.add_argument(
        "--max-ms", type=float, default=300.0, help="skip a model at a batch where its eager time would exceed this"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    names = args.models.split(",") if args.models else classifiers()
    names = names[: args.limit] if args.limit else names
    runtimes = args.runtimes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    start = time.time()
    profile = profile_device(runtimes, progress=lambda s: print(f"  {s}", file=sys.stderr))
    print(f"{profile.machine.describe()}; {profile.threads} threads; profiled in {time.time() - start:.0f} s")
    rng = random.Random(0)
    rows: list[Row] = []
    skipped: list[str] = []
    pruned_left = args.pruned
    for name in names:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name).eval()
        eager = module_latency_ms(model, (torch.randn(1, 3, args.size, args.size),), 3)
        for batch in batches:
            if eager * batch > args.max_ms:  # its eager time at this batch, estimated from batch 1
                skipped.append(f"{name} batch {batch} (~{eager * batch:.0f} ms in eager)")
                continue
            prune = pruned_left > 0 and batch == batches[0]
            try:
                found = run_model(name, batch, runtimes, profile, args, rng, prune)
            except Exception as exc:  # a model a runtime cannot run is listed, not the end of the run
                skipped.append(f"{name} batch {batch} ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
                continue
            pruned_left -= prune
            rows += found
            for row in found:
                print(
                    f"{row.model:22s} {row.variant:12s} b{row.batch} {row.runtime:17s} "
                    f"predicted {row.predicted_ms:9.2f} ms  measured {row.measured_ms:9.2f} ms  {row.error:+.1%}",
                    flush=True,
                )
    print()
    print(
        tabulate(
            [[r.model, r.variant, r.batch, r.runtime, f"{r.predicted_ms:.2f}", f"{r.measured_ms:.2f}",
              f"{r.error:+.1%}"]
             for r in rows],
            headers=["model", "variant", "batch", "runtime", "predicted ms", "measured ms", "error"],
            tablefmt="github",
        )
    )  # fmt: skip
    print()
    print(
        tabulate(
            summary(rows),
            headers=["runtime", "predictions", "within ±10%", "within ±25%", "median |error|", "median error"],
            tablefmt="github",
        )
    )
    if skipped:
        print("\nskipped: " + "; ".join(skipped))
    print(f"\n{len({r.model for r in rows})} models, {len(rows)} predictions, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
