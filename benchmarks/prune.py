"""prune-channels vs Torch-Pruning at the same ratio, measured in one run.

    python benchmarks/prune.py [--ratio 0.5] [--repeats 15] [--threads 2] [--models ...]

For each model and criterion (BN scale, L1), both tools prune a copy of the same randomly
initialized model at the same per-layer ratio, classifier kept. Reported per tool:
- pruning wall time: slimfx's capture (tracing, shapes) plus the pass (costs, channel
  analysis, scoring, physical removal); in brackets its whole ``compile``, which adds the
  verification run and before/after reports. Torch-Pruning: dependency graph, scoring, ``step()``;
- MACs and params after, both counted by ``slimfx.analyze`` (one counter for all);
- CPU latency (torch eager fp32, 2 threads) at batch 1 and 8: the original and both pruned
  models are timed in interleaved rounds and the median of each is kept;
- batch-8 speedup over the original divided by the MAC reduction (1.0 = latency fell as
  much as MACs did).

Torch-Pruning comes from the optional `bench` extra (pip install -e ".[bench]").
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torchvision
from tabulate import tabulate

import slimfx
from slimfx.ir.capture import capture
from slimfx.passes.base import PassContext
from slimfx.passes.prune_channels import PruneChannels

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "densenet121"]
CRITERIA = ["bn-scale", "l1"]


def randomized(name: str) -> torch.nn.Module:
    """A torchvision model with random BatchNorm scales, so the criteria have something to rank."""
    model = torchvision.models.get_model(name, weights=None).eval()
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator))
    return model


def classifier(model: torch.nn.Module) -> torch.nn.Module:
    return (
        model.fc
        if hasattr(model, "fc")
        else model.classifier[-1]
        if isinstance(model.classifier, torch.nn.Sequential)
        else model.classifier
    )


def prune_slimfx(model: torch.nn.Module, x: torch.Tensor, criterion: str, ratio: float) -> torch.nn.Module:
    """Capture and the pass alone: what pruning needs (channel analysis included)."""
    graph = capture(copy.deepcopy(model), (x,))
    PruneChannels(ratio=ratio, criterion=criterion).run(graph, PassContext())
    return graph.module


def compile_slimfx(model: torch.nn.Module, x: torch.Tensor, criterion: str, ratio: float) -> torch.nn.Module:
    """The whole user-facing compile: also verification runs and before/after reports."""
    return slimfx.compile(model, x, f"prune-channels:ratio={ratio},criterion={criterion}").module


def prune_torch_pruning(model: torch.nn.Module, x: torch.Tensor, criterion: str, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    importance = (
        tp.importance.BNScaleImportance() if criterion == "bn-scale" else tp.importance.GroupMagnitudeImportance(p=1)
    )
    pruner = tp.pruner.MetaPruner(
        model, x, importance=importance, pruning_ratio=ratio, ignored_layers=[classifier(model)]
    )
    pruner.step()
    return model


def timed(fn, *args) -> tuple[float, torch.nn.Module]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def interleaved_latency_ms(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms per model; one call of each per round, so drift hits all alike."""
    samples: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)  # warm-up
        for _ in range(repeats):
            for key, m in models.items():
                start = time.perf_counter()
                m(x)
                samples[key].append((time.perf_counter() - start) * 1000)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=MODELS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.models:
        for criterion in CRITERIA:
            model = randomized(name)
            x = torch.randn(1, 3, 224, 224)
            ours_s, ours = timed(prune_slimfx, model, x, criterion, args.ratio)
            compile_s, compiled = timed(compile_slimfx, model, x, criterion, args.ratio)
            assert slimfx.analyze(compiled, x).totals.macs == slimfx.analyze(ours, x).totals.macs
            theirs_s, theirs = timed(prune_torch_pruning, model, x, criterion, args.ratio)
            counts = {k: slimfx.analyze(m, x).totals for k, m in (("orig", model), ("slimfx", ours), ("tp", theirs))}
            latency = {
                b: interleaved_latency_ms(
                    {"orig": model, "slimfx": ours, "tp": theirs}, torch.randn(b, 3, 224, 224), args.repeats
                )
                for b in (1, 8)
            }
            for tool, seconds in ((f"slimfx (compile {compile_s:.2f} s)", ours_s), ("Torch-Pruning", theirs_s)):
                key = "tp" if tool == "Torch-Pruning" else "slimfx"
                mac_ratio = counts[key].macs / counts["orig"].macs
                speedup8 = latency[8]["orig"] / latency[8][key]
                rows.append(
                    [
                        name,
                        criterion,
                        tool,
                        f"{seconds:.2f}",
                        f"{counts[key].macs / 1e9:.3f}",
                        f"{mac_ratio:.3f}",
                        f"{counts[key].params / 1e6:.2f}",
                        f"{latency[1]['orig']:.1f} -> {latency[1][key]:.1f}",
                        f"{latency[8]['orig']:.1f} -> {latency[8][key]:.1f}",
                        f"{speedup8:.2f}x",
                        f"{speedup8 * mac_ratio:.2f}",
                    ]
                )
            print(f"done {name} {criterion}", flush=True)
    headers = [
        "model",
        "criterion",
        "tool",
        "prune s",
        "GMACs after",
        "MACs after/before",
        "M params after",
        "batch 1 ms (orig -> pruned)",
        "batch 8 ms (orig -> pruned)",
        "batch-8 speedup",
        "speedup / MAC reduction",
    ]
    print(
        f"\nratio {args.ratio}, classifier kept; latency: torch eager fp32, {args.threads} threads, "
        f"median of {args.repeats} interleaved rounds\n"
    )
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
