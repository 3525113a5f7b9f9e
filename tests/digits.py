"""A small CNN trained on scikit-learn's digits (shipped with the package: nothing downloaded)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx.demo import Digits, DigitsCNN, load_digits, train_digits_cnn
from slimfx.train.loop import fit

__all__ = [
    "DigitsCNN",
    "calibration",
    "classifier_on_digits",
    "resnet18_on_digits",
    "split",
    "trained_cnn",
    "upsampled",
    "write_model_file",
]


@functools.lru_cache(maxsize=1)
def digits() -> Digits:
    """The demo's split of scikit-learn's digits (images (N, 1, 8, 8) in [0, 1], labels)."""
    return load_digits()


def split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """train 900, calibration 600, test 297 rows."""
    d = digits()
    return {name: (part.x, part.y) for name, part in (("train", d.train), ("calib", d.calib), ("test", d.test))}


@functools.lru_cache(maxsize=1)
def trained_cnn() -> DigitsCNN:
    """The demo's CNN trained on the train split (deterministic for the seed), in eval mode."""
    return train_digits_cnn(digits())


def upsampled(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Digits as 3-channel ``size`` x ``size`` images (for torchvision's classifiers)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()


def resnet18_on_digits(epochs: int = 4) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """torchvision's resnet18 (10 classes) trained on the digits upsampled to 32x32, and the
    splits at that size."""
    return classifier_on_digits("resnet18", epochs)


def classifier_on_digits(
    name: str, epochs: int = 4, lr: float = 1e-3
) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A torchvision classifier (10 classes) trained on the digits upsampled to 32x32, and the
    splits at that size."""
    import torchvision

    data = {k: (upsampled(x), y) for k, (x, y) in split().items()}
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    train_classifier(model, *data["train"], epochs=epochs, lr=lr)
    return model.eval(), data


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float) -> None:
    """Cross-entropy training in batches of 50 (slimfx's shared loop)."""
    fit(
        model.parameters(),
        list(zip(x.split(50), y.split(50))),
        lambda b: F.cross_entropy(model(b[0]), b[1]),
        epochs=epochs,
        lr=lr,
        label="digits",
    )


def calibration() -> list[torch.Tensor]:
    """The calibration split in batches of 100."""
    return list(split()["calib"][0].split(100))


def write_model_file(folder: Path) -> str:
    """The trained CNN as a user's file model (``digits_model.py:build``, its weights beside it);
    returns the spec the command line takes."""
    weights = folder / "cnn_weights.pt"
    torch.save(trained_cnn().state_dict(), weights)
    source = folder / "digits_model.py"
    source.write_text(
        f"import sys, torch\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nfrom digits import DigitsCNN\n"
        f"def build():\n    model = DigitsCNN()\n    model.load_state_dict(torch.load({str(weights)!r}))\n"
        "    return model.eval()\n"
    )
    return f"{source}:build"
