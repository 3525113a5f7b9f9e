"""slimfx.analyze vs FlopCounterMode vs fvcore: time per model and MACs, in one run.

    python benchmarks/analyze.py [--repeats 5] [--threads 2]

Each tool is timed on its own (warm-up, then the median of repeated runs). slimfx's time
includes tracing, shape propagation and counting; FlopCounterMode and fvcore run the model.
fvcore comes from the optional `bench` extra (pip install -e ".[bench]").
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torchvision
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

import slimfx
from slimfx.backends.timing import median_ms

MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "efficientnet_b0",
    "densenet121",
    "inception_v3",
    "convnext_tiny",
    "regnet_y_400mf",
    "vit_b_16",
]


def slimfx_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    return slimfx.analyze(model, x).totals.macs


def flop_counter_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def fvcore_macs(model: torch.nn.Module, x: torch.Tensor) -> int | None:
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError:
        return None
    analysis = FlopCountAnalysis(model, x)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return int(analysis.total())  # fvcore counts one "flop" per multiply-add


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=MODELS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.models:
        model = torchvision.models.get_model(name, weights=None).eval()
        size = 299 if name == "inception_v3" else 224
        x = torch.randn(1, 3, size, size)
        results = {}
        for tool, fn in (("slimfx", slimfx_macs), ("FlopCounterMode", flop_counter_macs), ("fvcore", fvcore_macs)):
            macs = fn(model, x)
            ms = (
                median_ms(lambda fn=fn, model=model, x=x: fn(model, x), args.repeats, warmup=1)
                if macs is not None
                else None
            )
            results[tool] = (macs, ms)
        s_macs, s_ms = results["slimfx"]
        f_macs, f_ms = results["FlopCounterMode"]
        v_macs, v_ms = results["fvcore"]
        rows.append(
            [
                name,
                f"{s_macs / 1e9:.3f}",
                f"{f_macs / 1e9:.3f}",
                f"{v_macs / 1e9:.3f}" if v_macs else "-",
                f"{s_ms:.0f}",
                f"{f_ms:.0f}",
                f"{v_ms:.0f}" if v_ms else "-",
                f"{s_ms / f_ms:.2f}",
                f"{s_ms / v_ms:.2f}" if v_ms else "-",
            ]
        )
    headers = [
        "model",
        "slimfx GMACs",
        "FlopCounter GMACs",
        "fvcore GMACs",
        "slimfx ms",
        "FlopCounter ms",
        "fvcore ms",
        "slimfx / FlopCounter time",
        "slimfx / fvcore time",
    ]
    print(f"batch 1, {args.threads} threads, median of {args.repeats} runs each, tools timed one after another\n")
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
