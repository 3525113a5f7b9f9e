"""factorize-convs at target-macs=0.5: what fewer MACs buy in measured time, per method.

    python benchmarks/factorize.py [--target 0.5] [--repeats 7] [--threads 2] [--models ...]

For each image model and method (spatial-svd, tucker2, cp, linear-svd), and for a video
model with separable-3d: MACs and params after (slimfx's counter), compile time,
relative output error on fresh random inputs, and CPU latency (torch eager fp32) at batch 1
and 8, the original and every factorized variant timed in interleaved rounds (median). The
last columns set the measured speedup next to the MAC reduction: extra depth and depthwise
kernels make some methods much slower than their MAC count suggests.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torchvision
from prune import interleaved_latency_ms  # noqa: E402  (benchmarks/ is the script's folder)
from tabulate import tabulate

import slimfx

MODELS = ["resnet18", "vgg16", "r3d_18"]
METHODS = ["spatial-svd", "tucker2", "cp", "linear-svd"]  # for image models
VIDEO = {"r3d_18": (3, 8, 112, 112)}  # Conv3d models: separable-3d, on 8-frame 112x112 clips


def model_and_methods(name: str) -> tuple[torch.nn.Module, tuple[int, ...], list[str]]:
    if name in VIDEO:
        from torchvision.models import video

        return getattr(video, name)(weights=None).eval(), VIDEO[name], ["separable-3d"]
    return torchvision.models.get_model(name, weights=None).eval(), (3, 224, 224), METHODS


def speedup_text(original_ms: float, compiled_ms: float) -> str:
    return f"{original_ms / compiled_ms:.2f}x ({original_ms:.1f} -> {compiled_ms:.1f} ms)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument(
        "--runtime",
        help="also pass runtime=R: factorizations predicted no faster on R are declined, and the predicted "
        "batch-1 speedup (R's device profile) is shown beside the measured one",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.models:
        torch.manual_seed(0)  # the same random-init weights on every run
        model, shape, methods = model_and_methods(name)
        x = torch.randn(1, *shape)
        analysed = slimfx.analyze(model, x, runtime=args.runtime)
        before = analysed.totals
        predicted: dict[str, float] = {}
        extra = f",runtime={args.runtime}" if args.runtime else ""
        variants, info = {"original": model}, {}
        for method in methods:
            start = time.perf_counter()
            result = slimfx.compile(model, x, f"factorize-convs:method={method},target-macs={args.target}{extra}")
            seconds = time.perf_counter() - start
            test = torch.randn(4, *shape)
            with torch.no_grad():
                expected = model(test)
                error = float((result.module(test) - expected).norm() / expected.norm())
            variants[method] = result.module
            if args.runtime and analysed.prediction is not None:
                after_prediction = slimfx.analyze(result.module, x, runtime=args.runtime).prediction
                predicted[method] = analysed.prediction.total_ms / after_prediction.total_ms
            info[method] = (seconds, result.report.after.totals, error, result.report.passes[0].warnings)
            print(f"compiled {name} {method} in {seconds:.1f} s", flush=True)
        latency = {b: interleaved_latency_ms(variants, torch.randn(b, *shape), args.repeats) for b in (1, 8)}
        for method in methods:
            seconds, after, error, warnings_ = info[method]
            for warning in warnings_:
                print(f"{name} {method}: {warning}")
            mac_reduction = before.macs / after.macs
            rows.append(
                [
                    name,
                    method,
                    f"{after.macs / before.macs:.3f}",
                    f"{after.params / before.params:.3f}",
                    f"{seconds:.1f}",
                    f"{error:.3f}",
                    f"{mac_reduction:.2f}x",
                    speedup_text(latency[1]["original"], latency[1][method]),
                    speedup_text(latency[8]["original"], latency[8][method]),
                    *([f"{predicted[method]:.2f}x"] if method in predicted else []),
                ]
            )
    print(
        f"\ntarget-macs={args.target}; latency: torch eager fp32, {args.threads} threads, median of {args.repeats} "
        "interleaved rounds; output error: relative, 4 random inputs (random-init weights)\n"
    )
    print(
        tabulate(
            rows,
            headers=[
                "model",
                "method",
                "MACs after/before",
                "params after/before",
                "compile s",
                "output error",
                "MAC reduction",
                "speedup batch 1",
                "speedup batch 8",
                *([f"predicted speedup batch 1 ({args.runtime})"] if args.runtime else []),
            ],
            tablefmt="github",
        )
    )


if __name__ == "__main__":
    main()
