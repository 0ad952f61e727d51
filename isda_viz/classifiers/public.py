"""Networks whose parameters carry the names of the public ISDA CIFAR code's.

Facts about the public code (GitHub blackfeather-wang/ISDA-for-Deep-Networks,
folder "Image classification on CIFAR"), which this module reproduces so that
its checkpoints load strictly and give the same outputs in eval mode:

- The feature network returns the penultimate pooled features `(N, A)`:
  `resnet{20,32,44,56,110,1202}_cifar` (`networks/resnet.py`, basic blocks,
  16/32/64 channels, `A = 64`) and `WideResNet(depth, num_classes, widen_factor)`
  (`networks/wideresnet.py`, pre-activation blocks, `A = 64 * widen_factor`,
  its `num_classes` argument unused). The network has no classifier; a separate
  `Full_layer(feature_num, class_num)` holds it as `.fc = nn.Linear(A, C)` and
  the logits are `Full_layer(features)`.
- Both are wrapped in `nn.DataParallel` during training, so every key of the
  saved state dicts starts with `module.` (`module.fc.weight`, `module.fc.bias`).
- Dropout (rate 0 by default) has no parameters and does nothing in eval mode;
  it is left out here.
- Inputs are 32 x 32 RGB in [0, 1] normalised with mean (125.3, 123.0, 113.9)/255
  and std (63.0, 62.1, 66.7)/255 for both CIFAR-10 and CIFAR-100 (the final
  average pool has an 8 x 8 kernel, so no other size gives `(N, A)`).
- `train.py` saves `checkpoint.pth.tar` (and a copy `model_best.pth.tar`) with
  `torch.save` of a dict: `epoch` (int, epochs done), `state_dict` (feature
  network), `fc` (Full_layer), `best_acc` (float, top-1 in percent),
  `optimizer` (SGD state dict), `isda_criterion` (the whole `ISDA.ISDALoss`
  object) and `val_acc` (list of per-epoch top-1 in percent).
- `ISDA.py`: `ISDALoss` (an nn.Module) holds `.estimator`, an `EstimatorCV`
  (a plain object) with `CoVariance (C, A, A)`, `Ave (C, A)` and `Amount (C,)`,
  float32 tensors created on CUDA: each class's running population covariance,
  mean and the number of features seen (summed over every epoch). It also holds
  `.class_num` and `.cross_entropy` (an nn.CrossEntropyLoss).

The modules here are our own code with those names and shapes.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.data.datasets import CIFAR10_CLASSES, CIFAR100_CLASSES  # noqa: F401  (re-exported: the public code's labels)
from isda_viz.errors import IsdaVizError

PUBLIC_CIFAR_MEAN = [125.3 / 255, 123.0 / 255, 113.9 / 255]
PUBLIC_CIFAR_STD = [63.0 / 255, 62.1 / 255, 66.7 / 255]
PUBLIC_INPUT_SIZE = 32

RESNET_DEPTHS = (20, 32, 44, 56, 110, 1202)
"""Depths the public code builds from basic blocks (`resnet{depth}_cifar`)."""


class ResNetBlock(nn.Module):
    """Post-activation basic block; `downsample` (1x1 conv + BN) when the shape changes."""
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class PublicResNet(nn.Module):
    """The public `ResNet_Cifar` feature network: `(N, 3, 32, 32)` → `(N, 64)`."""
    def __init__(self, depth: int):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise IsdaVizError(f"the public code has no basic-block resnet{depth}; "
                               f"choose one of {', '.join(f'resnet{d}' for d in RESNET_DEPTHS)}")
        n = (depth - 2) // 6
        self.feature_num = 64
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[ResNetBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                               for i in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.avg_pool2d(out, 8, stride=1).flatten(1)


class WideBlock(nn.Module):
    """Pre-activation wide block; when the shape changes, the 1x1 `convShortcut` reads the activated input."""
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.convShortcut = None
        if in_planes != planes:
            self.convShortcut = nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class WideStage(nn.Module):
    """The public `NetworkBlock`: its blocks live in `.layer`."""
    def __init__(self, blocks: int, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                                     for i in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class PublicWideResNet(nn.Module):
    """The public `WideResNet(depth, _, widen_factor)` feature network: `(N, 3, 32, 32)` → `(N, 64·k)`."""
    def __init__(self, depth: int, widen_factor: int):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 or widen_factor < 1:
            raise IsdaVizError(f"WideResNet depth must be 6n+4 (n >= 1) and width >= 1, got {depth}, {widen_factor}")
        n, k = (depth - 4) // 6, widen_factor
        self.feature_num = 64 * k
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1 = WideStage(n, 16, 16 * k, 1)
        self.block2 = WideStage(n, 16 * k, 32 * k, 2)
        self.block3 = WideStage(n, 32 * k, 64 * k, 2)
        self.bn1 = nn.BatchNorm2d(64 * k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return F.avg_pool2d(out, 8).flatten(1)


class FullLayer(nn.Module):
    """The public `Full_layer`: `.fc = nn.Linear(A, C)`; logits `(N, C)` from features `(N, A)`."""
    def __init__(self, feature_num: int, class_num: int):
        super().__init__()
        self.class_num = class_num
        self.fc = nn.Linear(feature_num, class_num)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def parse_public_arch(arch: str) -> tuple[str, int, int]:
    """`resnet32`/`resnet110`/`resnet{20,44,56,1202}` → ("resnet", depth, 1); `wrn28_10` → ("wrn", 28, 10).

    The public code's own spellings (`resnet32_cifar`) are accepted too.
    """
    m = re.fullmatch(r"resnet(\d+)(?:_cifar)?|wrn(\d+)_(\d+)", arch)
    if m is None:
        raise IsdaVizError(f"unknown public ISDA architecture '{arch}'; use resnet32, resnet110 or wrn28_10 "
                           f"(also resnet20/44/56/1202, wrnDEPTH_WIDTH)")
    if m.group(1):
        return "resnet", int(m.group(1)), 1
    return "wrn", int(m.group(2)), int(m.group(3))


def build_public_network(arch: str, num_classes: int) -> tuple[nn.Module, FullLayer]:
    """`(feature_net, fc)` named like the public code's: `feature_net(x) (N, A)`, `fc(features) (N, C)`."""
    family, depth, width = parse_public_arch(arch)
    net = PublicResNet(depth) if family == "resnet" else PublicWideResNet(depth, width)
    return net, FullLayer(net.feature_num, num_classes)


class PublicModel(nn.Module):
    """A public-code classifier with isda-viz's model shape.

    `features(x) (N, A)` for `x (N, 3, 32, 32)` normalised as `PUBLIC_CIFAR_MEAN/STD`,
    `fc: nn.Linear(A, C)` (the `Full_layer`'s), `forward(x) = fc(features(x))`.
    """

    def __init__(self, feature_net: nn.Module, full_layer: FullLayer):
        super().__init__()
        self.net = feature_net
        self.fc = full_layer.fc
        self.feature_dim = feature_net.feature_num

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (PUBLIC_INPUT_SIZE, PUBLIC_INPUT_SIZE):
            raise IsdaVizError(f"networks of the public ISDA CIFAR code take 32x32 inputs, got "
                               f"{x.shape[-2]}x{x.shape[-1]}")
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
