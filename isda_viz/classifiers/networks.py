"""Classifiers with one shape the rest of the tool relies on.

Every model has `features(x) -> (N, A)` (the penultimate, deep features ISDA
augments), `fc: nn.Linear(A, C)` and `forward(x) = fc(features(x))`.
CIFAR-style ResNets follow He et al. 2016 (3 stages of 16/32/64 channels, 6n+2
layers); WRN-28-10 follows Zagoruyko & Komodakis; ImageNet models wrap torchvision.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from isda_viz.errors import IsdaVizError


class SqueezeExcitation(nn.Module):
    """Channel gates of Hu et al. 2018: `x * sigmoid(W2 relu(W1 mean_hw(x)))`, `W1 (C/r, C)`, `W2 (C, C/r)`, no biases.

    The two linear maps are `fc.0` and `fc.2`, the names the public ISDA code's `SELayer` saves.
    """
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return x * gates[:, :, None, None]


class BasicBlock(nn.Module):
    """Post-activation basic block (He et al. 2016); `shortcut` (1x1 conv + BN) when the shape changes.

    `se_reduction`: squeeze-excitation on the residual branch before the sum (SE-ResNet), None for none.
    The public ISDA code's ResNet / SE-ResNet blocks are this block, their `downsample` our `shortcut`
    (`public_resnet` maps the name).
    """
    def __init__(self, in_planes: int, planes: int, stride: int = 1, se_reduction: int | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SqueezeExcitation(planes, se_reduction) if se_reduction else None
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; `features` gives `(N, 64)`."""
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.feature_dim = 64
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class WideBlock(nn.Module):
    """Pre-activation block (He et al. 2016b; Zagoruyko & Komodakis): `conv2(relu(bn2(conv1(relu(bn1(x))))))` plus
    the input, or, when the shape changes, plus the 1x1 `shortcut` of the activated input.

    `se_reduction`: squeeze-excitation on the residual branch before the sum (SE-WRN), None for none.
    The public ISDA code's WRN, SE-WRN and pre-activation ResNet blocks are this block, their
    `convShortcut` / `downsample.0` our `shortcut` (`public_resnet` maps the names).
    """
    def __init__(self, in_planes: int, planes: int, stride: int, se_reduction: int | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.se = SqueezeExcitation(planes, se_reduction) if se_reduction else None
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(F.relu(self.bn2(out)))
        if self.se is not None:
            out = self.se(out)
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-width (pre-activation); `features` gives `(N, 64 * width)`."""
    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                layers.append(WideBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.feature_dim = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet to train from scratch, split into `features` and `fc` (`in_channels` other than 3
    replaces its first convolution)."""
    def __init__(self, name: str, num_classes: int, in_channels: int = 3):
        super().__init__()

        net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.fc = net.fc
        net.fc = nn.Identity()
        self.body = net
        self.feature_dim = self.fc.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


ARCHS = {
    "resnet8": lambda c, ch: CifarResNet(8, c, ch),  # tiny: tests and quick runs
    "resnet20": lambda c, ch: CifarResNet(20, c, ch),
    "resnet32": lambda c, ch: CifarResNet(32, c, ch),
    "resnet110": lambda c, ch: CifarResNet(110, c, ch),
    "wrn28_10": lambda c, ch: WideResNet(28, 10, c, ch),
    "resnet18": lambda c, ch: TorchvisionResNet("resnet18", c, ch),
    "resnet50": lambda c, ch: TorchvisionResNet("resnet50", c, ch),
}
ARCH_NAMES = list(ARCHS)


def build_model(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialised classifier with `.features`, `.fc` and `.feature_dim`."""
    if arch not in ARCHS:
        raise IsdaVizError(f"unknown arch '{arch}'; choose one of: {', '.join(ARCH_NAMES)}")
    return ARCHS[arch](num_classes, in_channels)
