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
        if timm_count != "all":
            step = max(1, len(names) // int(timm_count))  # spread over the families, not the first few
            names = names[::step][: int(timm_count)]
        models += [(f"timm:{name}", lambda n=name: timm.create_model(n, pretrained=False)) for name in names]
    return models


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
    build_failed, too_large, cnns, opaque_models = 0, 0, [], 0
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
        x, graph = None, None
        for size in (args.size, 224, 256, 299):
            try:
                x = torch.randn(1, 3, size, size)
                graph = capture(model, (x,))
                break
            except ShapeError:
                continue
            except CaptureError as exc:
                capture_failed.append((name, str(exc).splitlines()[0][:160]))
                break
        if graph is None:
            if not capture_failed or capture_failed[-1][0] != name:
                capture_failed.append((name, "no input size among the ones tried fits"))
            continue
        opaque_models += bool(graph.opaque)
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
    captured = len(models) - build_failed - too_large - len(capture_failed)
    print(
        f"\n{len(models)} models listed, {build_failed} could not be built at random init, {too_large} skipped "
        f"(over {args.max_params:g}M params), {captured} captured "
        f"({opaque_models} with opaque parts), {len(capture_failed)} did not capture; "
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
    for spec, tally in tallies.items():
        for name, why in tally.crashed:
            print(f"crash: {spec} on {name}: {why}")
    for name, why in capture_failed:
        print(f"no capture: {name}: {why}")


if __name__ == "__main__":
    main()
