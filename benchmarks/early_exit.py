"""add-exits on models trained on scikit-learn's digits: do early exits really save time?

    python benchmarks/early_exit.py [--repeats 7] [--threads 2]

Models: the digits CNN of the tests (8x8 inputs) and torchvision's resnet18 trained briefly
on the digits upsampled to 32x32 (3 channels). For each: exit distribution on the test
digits, agreement with the full model, accuracy of both, expected MAC speedup (counted, heads
included) and measured latency speedup of the early-exit runtime over the original model
(torch eager fp32) at batch 1 (every test digit on its own, runtime and original interleaved)
and batch 64 (median of interleaved rounds per batch, summed over the test set). Each model
twice: exits spread by MACs, and by latency predicted in torch eager (``runtime=torch``), whose
plan also predicts the expected batch-64 latency speedup (each stage at the rows that reach it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

import slimfx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from digits import resnet18_on_digits, split, trained_cnn  # noqa: E402  (the tests' digits data and models)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def batch_one_ms(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Mean ms per single-row call over every row of ``x`` (a and b interleaved)."""
    times = {"a": [], "b": []}
    with torch.no_grad():
        a(x[:1]), b(x[:1])
        for row in x.split(1):
            for key, m in (("a", a), ("b", b)):
                start = time.perf_counter()
                m(row)
                times[key].append((time.perf_counter() - start) * 1000)
    return statistics.mean(times["a"]), statistics.mean(times["b"])


def batch_64_ms(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Per 64-row batch: the median of interleaved rounds; summed over the batches of ``x``."""
    total = {"a": 0.0, "b": 0.0}
    with torch.no_grad():
        for batch in x.split(64):
            samples = {"a": [], "b": []}
            a(batch), b(batch)
            for _ in range(repeats):
                for key, m in (("a", a), ("b", b)):
                    start = time.perf_counter()
                    m(batch)
                    samples[key].append((time.perf_counter() - start) * 1000)
            for key in total:
                total[key] += statistics.median(samples[key])
    return total["a"], total["b"]


PLACEMENTS = (("", ""), (", by latency", ",runtime=torch"))  # exits spread by MACs, or by predicted eager time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    cnn_data = split()
    cnn = trained_cnn()
    cases = [(f"digits CNN (8x8){by}", cnn, cnn_data, f"add-exits:exits=2{opt}") for by, opt in PLACEMENTS]
    model, data = resnet18_on_digits()
    cases += [(f"resnet18 (digits 32x32){by}", model, data, f"add-exits:exits=3{opt}") for by, opt in PLACEMENTS]
    rows = []
    for label, model, data, spec in cases:
        x_calib, _ = data["calib"]
        x_test, y_test = data["test"]
        start = time.perf_counter()
        result = slimfx.compile(model, x_calib[:64], spec, calib_data=list(x_calib.split(50)))
        seconds = time.perf_counter() - start
        runtime = result.module
        with torch.no_grad():
            outputs, exits = runtime(x_test, return_exits=True)
            reference = model(x_test)
        plan = result.report.exits
        shares = torch.bincount(exits, minlength=len(plan.stats) + 1).float() / len(exits)
        # expected MACs on the test digits, from the counted per-exit costs
        costs = torch.tensor([s.macs_to_exit_per_sample for s in plan.stats] + [plan.final_macs_per_sample])
        expected = float((shares * costs).sum())
        mac_speedup = plan.full_macs_per_sample / expected
        one_orig, one_exit = batch_one_ms(model, runtime, x_test)
        big_orig, big_exit = batch_64_ms(model, runtime, x_test, args.repeats)
        speedup64 = big_orig / big_exit
        predicted = plan.latency.speedup if plan.latency is not None else None
        rows.append(
            [
                label,
                spec.split(":")[1],
                " / ".join(f"{s:.1%}" for s in shares.tolist()),
                f"{float((outputs.argmax(-1) == reference.argmax(-1)).float().mean()):.4f}",
                f"{accuracy(reference, y_test):.4f} -> {accuracy(outputs, y_test):.4f}",
                f"{mac_speedup:.2f}x",
                f"{one_orig / one_exit:.2f}x ({one_orig:.2f} -> {one_exit:.2f} ms)",
                f"{speedup64:.2f}x ({big_orig:.1f} -> {big_exit:.1f} ms)",
                f"{speedup64 / mac_speedup:.2f}",
                "-" if predicted is None else f"{predicted:.2f}x",
                "-" if predicted is None else f"{speedup64 / predicted:.2f}",
                f"{seconds:.1f}",
            ]
        )
        print(f"done {label}", flush=True)
    print(
        f"\n{len(x_test)} test digits; latency: torch eager fp32, {args.threads} threads; "
        f"batch 64: median of {args.repeats} interleaved rounds per batch, summed\n"
    )
    print(
        tabulate(
            rows,
            headers=[
                "model",
                "exits",
                "share per exit (last = full model)",
                "agreement",
                "accuracy (orig -> exits)",
                "expected MAC speedup",
                "batch 1 speedup",
                "batch 64 speedup (test set)",
                "batch-64 speedup / MAC speedup",
                "expected latency speedup (predicted, batch 64)",
                "batch-64 speedup / predicted",
                "compile s",
            ],
            tablefmt="github",
        )
    )


if __name__ == "__main__":
    main()
