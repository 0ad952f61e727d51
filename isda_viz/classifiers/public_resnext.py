"""The public ISDA CIFAR code's ResNeXt-29 (`networks/resnext.py`), under its parameter names.

`resnext29_8_64` / `resnext29_16_64` are `CifarResNeXt(depth 29, cardinality 8 | 16, base width 64)`;
`train.py --model resnext` builds them for `--cardinality 8` / `16` only. Names: `conv_1_3x3` (3x3, 64, no bias),
`bn_1`, `stage_{1,2,3}.N` bottlenecks (`conv_reduce` 1x1 to `D·C`, `bn_reduce`, `conv_conv` grouped 3x3 (C groups,
stride), `bn`, `conv_expand` 1x1 to `4·planes`, `bn_expand`, projection `downsample.{0,1}` (1x1 conv + BN) when
the shape changes; `planes` 64/128/256, `D = floor(planes · base_width / 64)`), then an 8x8 average pool;
`A = 1024`.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.classifiers.foreign import register_public_family
from isda_viz.classifiers.public import PublicArch
from isda_viz.classifiers.registry import ReadmeRow
from isda_viz.errors import IsdaVizError


class ResNeXtBottleneck(nn.Module):
    """Aggregated-transform bottleneck (Xie et al. 2017, form C): relu(BN(1x1), BN(grouped 3x3), BN(1x1) + input)."""
    def __init__(self, in_planes: int, planes: int, cardinality: int, base_width: int, stride: int = 1):
        super().__init__()
        inner = planes * base_width // 64 * cardinality
        self.conv_reduce = nn.Conv2d(in_planes, inner, 1, 1, 0, bias=False)
        self.bn_reduce = nn.BatchNorm2d(inner)
        self.conv_conv = nn.Conv2d(inner, inner, 3, stride, 1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(inner)
        self.conv_expand = nn.Conv2d(inner, planes * 4, 1, 1, 0, bias=False)
        self.bn_expand = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or in_planes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)))
        out = F.relu(self.bn(self.conv_conv(out)))
        out = self.bn_expand(self.conv_expand(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + out)


class PublicResNeXt(nn.Module):
    """The public `CifarResNeXt(depth, cardinality, base_width)`: `(N, 3, 32, 32)` → `(N, 1024)`."""
    def __init__(self, depth: int, cardinality: int, base_width: int):
        super().__init__()
        self.check(depth, cardinality, base_width)
        n = (depth - 2) // 9
        self.feature_num = 256 * 4
        self.conv_1_3x3 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2)):
            stages.append(nn.Sequential(*[
                ResNeXtBottleneck(in_planes if i == 0 else planes * 4, planes, cardinality, base_width,
                                  stride if i == 0 else 1) for i in range(n)]))
            in_planes = planes * 4
        self.stage_1, self.stage_2, self.stage_3 = stages

    @staticmethod
    def check(depth: int, cardinality: int, base_width: int) -> None:
        if depth < 11 or (depth - 2) % 9 or cardinality < 1 or base_width < 1:
            raise IsdaVizError(f"ResNeXt depth must be 9n+2 (n >= 1), cardinality and width >= 1, "
                               f"got {depth}, {cardinality}, {base_width}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_1(self.conv_1_3x3(x)))
        out = self.stage_3(self.stage_2(self.stage_1(out)))
        return F.avg_pool2d(out, 8).flatten(1)


def guess_resnext_arch(state) -> str | None:
    """`resnext29_8_64` … from the block count and the first grouped convolution's shape."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"stage_1\.(\d+)\.conv_reduce\.", k))}
    conv = state.get("stage_1.0.conv_conv.weight")
    if not blocks or conv is None or conv.shape[0] % conv.shape[1]:
        return None
    cardinality = conv.shape[0] // conv.shape[1]
    return f"resnext{9 * max(blocks) + 11}_{cardinality}_{conv.shape[1]}"


@register_public_family(
    "resnext", r"resnext(\d+)_(\d+)_(\d+)", guess=guess_resnext_arch, order=50,
    names=("resnext29_8_64", "resnext29_16_64"), forms=("resnextDEPTH_CARD_WIDTH",),
    summary="the public code's ResNeXt-29",
    rows=(ReadmeRow("`resnext29_8_64`, `resnext29_16_64`",
                    "`train.py --model resnext --cardinality 8` (or `16`; no other cardinality builds a model)", "1024",
                    "isda-viz augment --image cat.png --classifier checkpoint.pth.tar --classifier-arch "
                    "resnext29_8_64 --generator runs/c10-gan --out out/cat"),))
def resnext_arch(m) -> PublicArch:
    """`resnext{depth}_{cardinality}_{width}`: `CifarResNeXt(depth, cardinality, base width)`."""
    depth, cardinality, width = map(int, m.groups())
    return PublicArch(f"resnext{depth}_{cardinality}_{width}", PublicResNeXt, (depth, cardinality, width))
