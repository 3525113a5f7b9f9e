"""Small models the tests share: one channel-coupling pattern each, attention blocks, BatchNorm statistics."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomize_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics so that folding it is a real test."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


# -- small hand-built models, one coupling pattern each ----------------------------------------
def conv_bn(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 8), conv_bn(3, 12), conv_bn(20, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.head(self.c(y).mean((2, 3)))


class Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.left, self.right = conv_bn(3, 16), conv_bn(8, 8), conv_bn(8, 8)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        left, right = self.a(x).chunk(2, dim=1)
        y = torch.cat([self.left(left), self.right(right)], 1)
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


class SizedSplit(nn.Module):
    """Splits with literal sizes: Res2Net's ``split(8, 1)`` with a hierarchy of convs, and a
    ``torch.split`` into unequal parts."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 24), conv_bn(8, 8), conv_bn(8, 8)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        p0, p1, p2 = self.a(x).split(8, 1)
        y1 = self.b(p1)
        y2 = self.c(p2 + y1)
        y = torch.cat([p0, y1, y2], 1)
        front, back = torch.split(y, [6, 18], dim=1)
        y = torch.cat([back, front], 1)
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


class GhostSlice(nn.Module):
    """GhostNet's module: a conv, a cheap depthwise conv of its output, both concatenated and
    cut to a literal channel count with ``[:, :8]``."""

    def __init__(self) -> None:
        super().__init__()
        self.primary = conv_bn(3, 6)
        self.cheap = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6))
        self.after = conv_bn(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x1 = self.primary(x)
        y = torch.cat([x1, self.cheap(x1)], 1)[:, :8]
        return self.head(F.adaptive_avg_pool2d(self.after(y), 1).flatten(1))


class PerChannelNorms(nn.Module):
    """Norms that normalize each channel alone: InstanceNorm (affine and not, module and
    functional) and a GroupNorm with one channel per group."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(8, 8), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.InstanceNorm2d(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.c(self.b(self.a(x)))
        y = F.instance_norm(y) + y
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.g, self.c = conv_bn(3, 16), conv_bn(16, 24, groups=4), conv_bn(24, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.c(self.g(self.a(x))).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 16)
        self.squeeze, self.expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.b = conv_bn(16, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.a(x)
        scale = torch.sigmoid(self.expand(F.relu(self.squeeze(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(self.b(y * scale).mean((2, 3)))


class Shuffle(nn.Module):
    """ShuffleNet's shuffle written out: view into (groups, c/groups), transpose, flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 8), conv_bn(3, 8), conv_bn(16, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(self.c(y).mean((2, 3)))


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn(3, 8)
        self.fc1, self.bn, self.fc2 = nn.Linear(8 * 4 * 4, 32), nn.BatchNorm1d(32), nn.Linear(32, 5)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(self.a(x), 4).flatten(1)
        return self.fc2(F.relu(self.bn(self.fc1(y))))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = conv_bn(3, 16), nn.Sequential(conv_bn(16, 8), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = self.stem(x)
        y = F.relu(y + self.block(y))
        return self.head(y.mean((2, 3)))


# -- attention ----------------------------------------------------------------------------------------
class MatmulAttention(nn.Module):
    """Self-attention written with torch.matmul and the @ operator."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        scores = torch.softmax(torch.matmul(self.q(x), self.k(x).transpose(-1, -2)) / 4, dim=-1)
        return self.out((scores @ self.v(x)).mean(1))


class SelfAttentionBlock(nn.Module):
    """A transformer block the way torchvision writes it: nn.MultiheadAttention called as a module."""

    def __init__(self, masked: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 5)
        self.register_buffer("mask", torch.zeros(12, 12, dtype=torch.bool) if masked else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        y, _ = self.attention(y, y, y, need_weights=False, attn_mask=self.mask)
        return self.head((x + y).mean(1))


# -- norm + activation in one layer, as timm writes it ----------------------------------------------
class BatchNormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` in miniature: a BatchNorm2d subclass whose forward calls
    ``F.batch_norm`` and then its own dropout and activation."""

    def __init__(self, channels: int, act: type[nn.Module] = nn.SiLU):
        super().__init__(channels)
        self.drop, self.act = nn.Identity(), act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class NormActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), BatchNormAct(16, nn.SiLU)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), BatchNormAct(32, nn.ReLU)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
