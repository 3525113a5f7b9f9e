"""``slimfx demo``: the main job on a model trained here, in well under a minute, offline.

A small CNN is trained on scikit-learn's digits (the data ships with the package: nothing is
downloaded), then compiled to a latency target on one runtime: half the original's latency
there, at most one point of accuracy lost. slimfx plans the channel widths and int8 by
measured sensitivity and predicted latency, distils the pruned model from the original,
measures, and gives choices back if accuracy fell further. The demo prints held-out accuracy
before and after, the plan, and the measured speed, then the command lines that do the same
on a user's own model. (``--model`` shows a fixed pipeline on any model at random init.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx.errors import DataError

TARGET = "latency=0.5"  # half the original's latency in the runtime's float flavour
MAX_DROP = 1.0  # points of held-out accuracy the demo may lose
UNTRAINED_PIPELINE = "prune-channels:ratio=0.5,fold-bn,quantize"  # for a model without training data
BATCH = 32  # latency is measured at this batch size (at batch 1 an 8x8 model is all runtime overhead)


class DigitsCNN(nn.Module):
    """Four conv blocks and a linear head for 8x8 grey digits."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        self.block4 = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@dataclass(frozen=True)
class Split:
    """Images (N, 1, 8, 8) in [0, 1] and their labels."""

    x: torch.Tensor
    y: torch.Tensor

    def batches(self, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.x.split(size), self.y.split(size)))


@dataclass(frozen=True)
class Digits:
    """scikit-learn's digits in a fixed shuffled order: train 900, calibration 600, test 297 rows."""

    train: Split
    calib: Split
    test: Split


def load_digits() -> Digits:
    """The digits split three ways; a clear error when scikit-learn is missing."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DataError('the demo trains on scikit-learn\'s digits: pip install -e ".[demo]"') from None
    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return Digits(Split(x[:900], y[:900]), Split(x[900:1500], y[900:1500]), Split(x[1500:], y[1500:]))


def train_digits_cnn(digits: Digits, epochs: int = 15, progress: Callable[[str], None] | None = None) -> DigitsCNN:
    """The CNN trained on the train split (deterministic), in eval mode."""
    from slimfx.train.loop import fit

    torch.manual_seed(0)
    model = DigitsCNN()
    fit(
        model.parameters(),
        digits.train.batches(50),
        lambda b: F.cross_entropy(model(b[0]), b[1]),
        epochs=epochs,
        lr=3e-3,
        label="training the digits CNN",
        progress=progress,
    )
    return model.eval()


def accuracy(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy of ``model`` on ``split``."""
    from slimfx.metrics import top1_accuracy

    with torch.inference_mode():
        accuracy = top1_accuracy(model(split.x), split.y)
    if accuracy is None:
        raise DataError("the demo's model must output (rows, classes) logits")
    return accuracy


def demo_runtime() -> str:
    """The runtime the demo aims at: onnxruntime int8 where onnxruntime is installed, else torch's."""
    import importlib.util

    return "onnxruntime-int8" if importlib.util.find_spec("onnxruntime") is not None else "torch-int8"


def run_demo(
    show: Callable[[str], None],
    *,
    repeats: int = 20,
    target: str = TARGET,
    runtime: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Train, compile to ``target`` on ``runtime`` with distillation and ``MAX_DROP``, and
    ``show`` accuracy, the plan and the measured speed."""
    import slimfx
    from slimfx.report.tables import render_compile
    from slimfx.target.request import check_target_request

    runtime = runtime or demo_runtime()
    digits = load_digits()
    check_target_request(target, None, runtime, digits.calib.batches(100), MAX_DROP)  # before training
    model = train_digits_cnn(digits, progress=progress)
    example = digits.test.x[:BATCH]
    before = accuracy(model, digits.test)
    show(
        f"== trained a small CNN on scikit-learn's digits ({len(digits.train.y)} train rows, 8x8): "
        f"held-out accuracy {before:.2%} on {len(digits.test.y)} test rows\n\n"
    )
    show(
        f"== slimfx compile --target {target} --runtime {runtime} --max-drop {MAX_DROP:g} "
        "(with --calib, --train and --eval)\n\n"
    )
    result = slimfx.compile(
        model,
        example,
        name="digits CNN",
        target=target,
        runtime=runtime,
        max_drop=MAX_DROP,
        calib_data=digits.calib.batches(100),
        train_data=digits.train.batches(50),
        eval_data=digits.test.batches(100),
        latency_repeats=repeats,
        progress=progress,
    )
    if progress is not None:
        progress("")
    show(render_compile(result.report))
    report, reached = result.report, result.report.target
    compiled = report.runtimes.row(runtime, "compiled") if report.runtimes else None
    if reached is None or compiled is None or compiled.accuracy is None:
        raise DataError(f"the demo's compiled model did not run in {runtime}; see the table above")
    macs = report.after.totals.macs / report.before.totals.macs
    on = "on target" if reached.on_target else "off target"
    show(
        f"\n== on {len(digits.test.y)} held-out test rows: accuracy {before:.2%} (original, torch fp32) -> "
        f"{compiled.accuracy:.2%} (compiled, in {runtime}), {(compiled.accuracy - before) * 100:+.1f} points; "
        f"MACs {macs:.2f}x of the original; measured {reached.measured:.3f} ms per batch of {BATCH}, "
        f"{reached.measured / reached.original_measured:.2f}x the original's {reached.original_measured:.3f} ms in "
        f"{report.runtimes.float_flavour[runtime]} (goal {reached.goal:.3f} ms: {on})\n"
    )
    show(
        "\n== the same on your own model:\n"
        "  torch.save(list_of_calibration_batches, 'calib.pt')\n"
        "  torch.save([(inputs, labels), ...], 'train.pt')\n"
        f"  slimfx compile my_model.py:build --input-shape {','.join(map(str, example.shape))} \\\n"
        f"      --target {target} --runtime {runtime} --max-drop {MAX_DROP:g} \\\n"
        "      --calib calib.pt --train train.pt --eval test.pt --onnx model.onnx\n"
        "  slimfx report my_model.py:build --input-shape 1,1,8,8 --by module-type\n"
    )
