"""A small CNN trained on scikit-learn's digits (shipped with the package: nothing downloaded)."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimfx.train.loop import fit


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        self.block4 = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 8) scaled to [0, 1] and labels, in a fixed shuffled order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


def split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """train 900, calibration 600, test 297 rows."""
    x, y = digits()
    return {"train": (x[:900], y[:900]), "calib": (x[900:1500], y[900:1500]), "test": (x[1500:], y[1500:])}


@functools.lru_cache(maxsize=1)
def trained_cnn(epochs: int = 15) -> DigitsCNN:
    """The CNN trained on the train split (deterministic for the seed), in eval mode."""
    torch.manual_seed(0)
    model = DigitsCNN()
    train_classifier(model, *split()["train"], epochs=epochs, lr=3e-3)
    return model.eval()


def upsampled(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Digits as 3-channel ``size`` x ``size`` images (for torchvision's classifiers)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()


def resnet18_on_digits(epochs: int = 4) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """torchvision's resnet18 (10 classes) trained on the digits upsampled to 32x32, and the
    splits at that size."""
    import torchvision

    data = {k: (upsampled(x), y) for k, (x, y) in split().items()}
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    train_classifier(model, *data["train"], epochs=epochs, lr=1e-3)
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
