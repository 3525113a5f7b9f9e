"""Every pass over a wide corpus: how many models each pass changes, declines entirely, or crashes on.

    python benchmarks/corpus.py [--timm 150] [--no-torchvision] [--size 64] [--passes SPEC;SPEC...]

Models are built at random init (nothing downloaded): the torchvision classifiers and the first
N timm models that timm can build (``--timm all`` for every one). Each model is captured once
(opaque parts counted), then each pass runs on it alone. A pass that raises anything but a
clear ``SlimfxError`` about the model's data counts as a crash and is listed. For the CNNs
(models with convs and no attention or matmul), the share that ``prune-channels`` brings to at
most 0.8x MACs is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from tabulate import tabulate

import slimfx
from slimfx.errors import CaptureError, ShapeError
from slimfx.ir import ops
from slimfx.ir.capture import capture
from slimfx.ir.graph import Graph

DEFAULT_PASSES = "fold-bn;prune-channels:ratio=0.3;quantize:calib=minmax;factorize-convs"


@dataclass
class PassTally:
    changed: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    crashed: list[tuple[str, str]] = field(default_factory=list)
    mac_ratios: dict[str, float] = field(default_factory=dict)
    unfolded: list[tuple[str, str, str]] = field(default_factory=list)  # fold-bn: (model, BatchNorm, why)


TIMM_FAMILIES = (
    "resnet*",
    "resnext*",
    "res2net*",
    "efficientnet*",
    "tf_efficientnet*",
    "mobilenetv2*",
    "mobilenetv3*",
    "regnet*",
    "densenet*",
    "dpn*",
    "cspdarknet*",
    "cspresnet*",
    "ghostnet*",
    "rexnet*",
    "repvgg*",
    "mixnet*",
    "mnasnet*",
    "fbnet*",
    "vovnet*",
    "ese_vovnet*",
    "mobileone*",
    "hrnet*",
    "dla*",
    "convnext*",
    "mobilevit*",
    "twins*",
    "crossvit*",
    "vit_tiny*",
    "deit_tiny*",
    "levit*",
    "edgenext*",
    "efficientformer*",
)


def corpus(timm_count: str, torchvision_models: bool) -> list[tuple[str, object]]:
    """(name, builder) pairs; builders make the model at random init. timm models come from
    the CNN families the issue names and a few others, in timm's order."""
    models: list[tuple[str, object]] = []
    if torchvision_models:
        import torchvision

        for name in torchvision.models.list_models(module=torchvision.models):
            models.append((f"torchvision:{name}", lambda n=name: torchvision.models.get_model(n, weights=None)))
    if timm_count != "0":
        import timm

        names = sorted({n for family in TIMM_FAMILIES for n in timm.list_models(family)})
        if timm_count != "all" and int(timm_count) < len(names):  # spread over the families, not the first few
            count = int(timm_count)
            names = [names[i * len(names) // count] for i in range(count)]
        models += [(f"timm:{name}", lambda n=name: timm.create_model(n, pretrained=False)) for name in names]
    return models


def sizes_to_try(model: torch.nn.Module, first: int) -> list[int]:
    """Square input sizes to try: ``first``, then the model's own (timm's pretrained config), then common ones."""
    own = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1]
    return list(dict.fromkeys([first, own, 224, 256, 299]))


def capture_somewhere(model: torch.nn.Module, sizes: list[int]) -> tuple[torch.Tensor, Graph] | str:
    """(example input, graph) at the first size the model runs at, or why not: it runs at none
    (not a capture failure), or it runs but does not capture."""
    for size in sizes:
        x = torch.randn(1, 3, size, size)
        try:
            with torch.no_grad():
                model(x)
        except Exception:
            continue
        try:
            return x, capture(model, (x,))
        except (CaptureError, ShapeError) as exc:
            return f"runs at {size} but: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return f"runs at none of the sizes {sizes}"


def is_cnn(graph: Graph) -> bool:
    modules = [graph.submodule(n) for n in graph.nodes() if n.op == "call_module"]
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in modules)
    attention = any(isinstance(m, torch.nn.MultiheadAttention) for m in modules) or any(
        ops.MATMULS.matches(n, graph.submodule) or n.target is torch.nn.functional.scaled_dot_product_attention
        for n in graph.nodes()
    )
    return has_conv and not attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm", default="150", help="how many timm models (a number, 0, or all)")
    parser.add_argument("--no-torchvision", action="store_true")
    parser.add_argument("--size", type=int, default=64, help="input size tried first (the model's own if it fails)")
    parser.add_argument("--passes", default=DEFAULT_PASSES, help="pass specs separated by ';'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-params", type=float, default=100, help="skip models above this many million params")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    specs = args.passes.split(";")
    tallies = {spec: PassTally() for spec in specs}
    capture_failed: list[tuple[str, str]] = []
    no_run: list[tuple[str, str]] = []  # models that run at none of the sizes tried: not a capture failure
    build_failed, too_large, cnns, opaque_models, fixed_models = 0, 0, [], 0, 0
    start = time.perf_counter()
    models = corpus(args.timm, not args.no_torchvision)
    for index, (name, build) in enumerate(models, 1):
        print(f"[{index}/{len(models)}] {name}", file=sys.stderr, flush=True)
        try:
            torch.manual_seed(0)
            model = build().eval()
        except Exception:
            build_failed += 1
            continue
        if sum(p.numel() for p in model.parameters()) > args.max_params * 1e6:
            too_large += 1
            continue
        outcome = capture_somewhere(model, sizes_to_try(model, args.size))
        if isinstance(outcome, str):
            (no_run if outcome.startswith("runs at none") else capture_failed).append((name, outcome))
            continue
        x, graph = outcome
        opaque_models += bool(graph.opaque)
        fixed_models += graph.fixed_shapes
        if is_cnn(graph):
            cnns.append(name)
        for spec in specs:
            tally = tallies[spec]
            try:
                calib = [x.repeat(4, 1, 1, 1)] if "quantize" in spec or "thinet" in spec else None
                result = slimfx.compile(model, x, spec, calib_data=calib)
            except Exception as exc:
                tally.crashed.append((name, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
                continue
            record = result.report.passes[-1]
            if spec.startswith("fold-bn"):  # a BatchNorm right after a conv or linear must fold
                tally.unfolded += [
                    (name, d.target, d.reason)
                    for d in record.decisions
                    if d.action != "folded" and not d.reason.startswith("its input comes from")
                ]
            (tally.changed if record.changed else tally.declined).append(name)
            before, after = result.report.before.totals.macs, result.report.after.totals.macs
            tally.mac_ratios[name] = after / before if before else 1.0
    rows = []
    for spec, tally in tallies.items():
        ratios = list(tally.mac_ratios.values())
        rows.append(
            [
                spec,
                len(tally.changed),
                len(tally.declined),
                len(tally.crashed),
                f"{statistics.median(ratios):.3f}" if ratios else "-",
            ]
        )
    captured = len(models) - build_failed - too_large - len(capture_failed) - len(no_run)
    print(
        f"\n{len(models)} models listed, {build_failed} could not be built at random init, {too_large} skipped "
        f"(over {args.max_params:g}M params), {len(no_run)} ran at none of the input sizes tried, {captured} "
        f"captured ({opaque_models} with opaque parts, {fixed_models} at fixed shapes), of the models that run "
        f"{len(capture_failed)} did not capture; "
        f"{time.perf_counter() - start:.0f} s in all\n"
    )
    print(
        tabulate(
            rows,
            headers=["pass", "changed", "declined entirely", "crashed", "median MACs after/before"],
            tablefmt="github",
        )
    )
    prune = next((t for s, t in tallies.items() if s.startswith("prune-channels")), None)
    if prune is not None and cnns:
        small = [n for n in cnns if prune.mac_ratios.get(n, 1.0) <= 0.8]
        print(
            f"\nCNNs: {len(cnns)}; prune-channels brings {len(small)} ({len(small) / len(cnns):.0%}) "
            "to at most 0.8x MACs"
        )
    fold = next((t for s, t in tallies.items() if s.startswith("fold-bn")), None)
    if fold is not None:
        print(f"\nfold-bn: {len(fold.unfolded)} BatchNorms right after a conv or linear left unfolded")
        for name, bn, why in fold.unfolded[:40]:
            print(f"  unfolded: {name}: {bn}: {why}")
    for spec, tally in tallies.items():
        for name, why in tally.crashed:
            print(f"crash: {spec} on {name}: {why}")
    for name, why in capture_failed:
        print(f"no capture: {name}: {why}")
    for name, why in no_run:
        print(f"does not run: {name}: {why}")


if __name__ == "__main__":
    main()
