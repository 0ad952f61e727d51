"""The public ISDA CIFAR code's DenseNet-BC (`networks/densenet_bc.py`), under its parameter names.

How its `train.py` builds one (`--model densenet_bc --layers D`): `DenseNet(growth_rate=k (--growth-rate,
default 12), block_config=((D - 4) // 6,) * 3, compression=0.5, num_init_features=24, bn_size=4,
small_inputs=True)`. So `densenet_bc100` is k = 12 with 16 layers per block, and `densenet_bc190` is k = 12
too unless trained with `--growth-rate 40` (`densenet_bc190_40`); the first convolution has 24 channels
whatever k is.

Names: `features.conv0` (3x3, no bias), `features.denseblock{1,2,3}.denselayer{i}.{norm1,conv1,norm2,conv2}`
(BN-ReLU-1x1 conv to `4k`, BN-ReLU-3x3 conv to `k`, each layer reading the concatenation of all before it),
`features.transition{1,2}.{norm,conv}` (BN-ReLU-1x1 conv to `floor(c · 0.5)`, 2x2 average pool),
`features.norm_final`; the features are `avg_pool_8(relu(norm_final(...)))`, `A` their channel count
(342 for densenet_bc100). Dropout (rate 0 by default) is off in eval mode and left out.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.classifiers.foreign import register_public_family
from isda_viz.classifiers.public import PublicArch
from isda_viz.classifiers.registry import ReadmeRow
from isda_viz.errors import IsdaVizError

DENSENET_GROWTH = 12
DENSENET_INIT_FEATURES = 24
DENSENET_COMPRESSION = 0.5
DENSENET_BN_SIZE = 4


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (`bn_size · k` channels), BN-ReLU-3x3 conv (`k`): `k` new channels from all earlier ones."""
    def __init__(self, in_channels: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, earlier: list[torch.Tensor]) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(torch.cat(earlier, 1))))
        return self.conv2(F.relu(self.norm2(out)))


class DenseBlock(nn.Module):
    """`layers` dense layers named `denselayer1…`; output: the input and every layer's channels, concatenated."""
    def __init__(self, layers: int, in_channels: int, growth: int, bn_size: int):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(in_channels + i * growth, growth, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.children():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv to `out_channels`, then a 2x2 average pool (half the resolution)."""
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2, 2)


class PublicDenseNetBC(nn.Module):
    """The public `DenseNet` as `train.py` builds it for 32x32 inputs: `(N, 3, 32, 32)` → `(N, A)`."""
    def __init__(self, depth: int, growth: int = DENSENET_GROWTH):
        super().__init__()
        self.check(depth, growth)
        layers = (depth - 4) // 6
        channels = DENSENET_INIT_FEATURES
        parts: list[tuple[str, nn.Module]] = [("conv0", nn.Conv2d(3, channels, 3, 1, 1, bias=False))]
        for i in range(3):
            parts.append((f"denseblock{i + 1}", DenseBlock(layers, channels, growth, DENSENET_BN_SIZE)))
            channels += layers * growth
            if i < 2:
                parts.append((f"transition{i + 1}", Transition(channels, int(channels * DENSENET_COMPRESSION))))
                channels = int(channels * DENSENET_COMPRESSION)
        parts.append(("norm_final", nn.BatchNorm2d(channels)))
        self.features = nn.Sequential(OrderedDict(parts))
        self.feature_num = channels

    @staticmethod
    def check(depth: int, growth: int = DENSENET_GROWTH) -> None:
        if depth < 10 or (depth - 4) % 6 or growth < 1:
            raise IsdaVizError(f"DenseNet-BC depth must be 6n+4 (n >= 1) and growth rate >= 1, got {depth}, {growth}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.relu(self.features(x)), 8).flatten(1)


def densenet_arch_name(depth: int, growth: int) -> str:
    return f"densenet_bc{depth}" if growth == DENSENET_GROWTH else f"densenet_bc{depth}_{growth}"


def guess_densenet_arch(state) -> str | None:
    """`densenet_bc100`, `densenet_bc190_40` … from the layer count and the 3x3 convolutions' width."""
    layers = {int(m.group(1)) for k in state if (m := re.match(r"features\.denseblock1\.denselayer(\d+)\.", k))}
    conv = state.get("features.denseblock1.denselayer1.conv2.weight")
    if not layers or conv is None:
        return None
    return densenet_arch_name(6 * max(layers) + 4, conv.shape[0])


@register_public_family(
    "densenet_bc", r"densenet_bc(\d+)(?:_(\d+))?", guess=guess_densenet_arch, order=40,
    names=("densenet_bc100", "densenet_bc190"), forms=("densenet_bcDEPTH_GROWTH",),
    summary="the public code's DenseNet-BC",
    rows=(ReadmeRow("`densenet_bc100`, `densenet_bc190`",
                    "`train.py --model densenet_bc --layers 100` (growth rate 12, compression 0.5, 24 initial "
                    "channels: what `train.py` builds)", "342, 657",
                    "isda-viz augment --image cat.png --classifier checkpoint.pth.tar --classifier-arch "
                    "densenet_bc100 --generator runs/c10-gan --out out/cat"),
          ReadmeRow("`densenet_bc190_40` (any `densenet_bcDEPTH_GROWTH`)",
                    "`train.py --model densenet_bc --layers 190 --growth-rate 40` (still 24 initial channels: 25.0 M "
                    "parameters, not the 25.6 M of the DenseNet paper's 80)", "2176",
                    "isda-viz grid --classifier checkpoint.pth.tar --classifier-arch densenet_bc190_40 --generator "
                    "runs/c100-gan --data-root ~/data --classes apple,bear --out c100.png")))
def densenet_arch(m) -> PublicArch:
    """`densenet_bc{depth}(_{growth})`: the public `DenseNet` as `train.py` builds it (growth 12 by default)."""
    depth, growth = int(m.group(1)), int(m.group(2) or DENSENET_GROWTH)
    return PublicArch(densenet_arch_name(depth, growth), PublicDenseNetBC, (depth, growth))
