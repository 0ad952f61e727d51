"""The public ISDA CIFAR code's Shake-Shake, Shake-ResNeXt and ShakeDrop PyramidNet, under its parameter names.

Eval mode only matters here, and there the random mixing is a fixed scaling:

- Shake-Shake (`networks/shake_shake.py`): a block is `0.5·branch1(x) + 0.5·branch2(x) + shortcut(x)`.
  `shake_resnet26_2x{32,64,112}d` = `ShakeResNet(26, w)`: `conv_1` (3x3, 16, with bias), `bn_1`,
  `stage_{1,2,3}.N` blocks of width `w, 2w, 4w`, each branch `[ReLU, conv3x3, BN, ReLU, conv3x3, BN]`
  (`branch1.1`, `.2`, `.4`, `.5`); then ReLU, 8x8 pool; `A = 4w`. `shake_resnext29_2x4x64d` =
  `ShakeResNeXt(29, 64, 4)`: `c_in` (3x3, 64, with bias), `layer{1,2,3}.N` with 256/512/1024 channels and
  bottleneck branches `[conv1x1, BN, ReLU, grouped conv3x3, BN, ReLU, conv1x1, BN]` (`.0 .1 .3 .4 .6 .7`);
  `A = 1024`. When the width changes, `shortcut` = BN(concat(conv1(s(relu x)), conv2(s(shift(relu x))))), `s`
  taking every `stride`-th pixel and `shift` moving the image one pixel up-left (zeros entering).
  (`train.py --model shake_shake` builds 2x32d for `--widen-factor 32` or 96 and 2x112d for 112;
  none of its branches builds 2x64d.)
- ShakeDrop PyramidNet (`networks/shake_pyramidnet.py`, `train.py --model shake_pyramidnet --layers 272
  --alpha 200`, bottleneck blocks): block `i` of `3n` (`n = (depth - 2) // 9`) has
  `p_i = 1 - (1 - 0.5 (i + 1) / 3n)` and in eval mode scales its residual by `1 - p_i`. Widths grow by
  `alpha / 3n` per block (`planes = round(16 + alpha (i+1) / 3n)`, output `4·planes`); the shortcut is the
  input (2x2 average pool with `ceil_mode` where the stride is 2), zero-padded to the residual's channels.
  Names: `conv1`, `bn1`, `layer{1,2,3}.N.{bn1,conv1,bn2,conv2,bn3,conv3,bn4}`, `bn_final`; `A = 4·round(16 + alpha)`
  (864 for alpha 200).
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

PYRAMID_ALPHA = 200


class ShakeShortcut(nn.Module):
    """Projection of the Shake-Shake nets: two 1x1 convolutions on the image and on its one-pixel shift."""
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels // 2, 1, 1, 0, bias=False)
        self.conv2 = nn.Conv2d(in_channels, out_channels // 2, 1, 1, 0, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        plain = self.conv1(F.avg_pool2d(x, 1, self.stride))
        shifted = self.conv2(F.avg_pool2d(F.pad(x, (-1, 1, -1, 1)), 1, self.stride))
        return self.bn(torch.cat((plain, shifted), 1))


def _basic_branch(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(),
                         nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels))


def _bottleneck_branch(in_channels: int, mid: int, out_channels: int, cardinality: int, stride: int):
    return nn.Sequential(nn.Conv2d(in_channels, mid, 1, 1, 0, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                         nn.Conv2d(mid, mid, 3, stride, 1, groups=cardinality, bias=False), nn.BatchNorm2d(mid),
                         nn.ReLU(), nn.Conv2d(mid, out_channels, 1, 1, 0, bias=False), nn.BatchNorm2d(out_channels))


class ShakeBlock(nn.Module):
    """Two residual branches made by `make_branch()`, averaged (Shake-Shake in eval mode), plus the shortcut."""
    def __init__(self, in_channels: int, out_channels: int, stride: int, make_branch):
        super().__init__()
        self.shortcut = None if in_channels == out_channels else ShakeShortcut(in_channels, out_channels, stride)
        self.branch1 = make_branch()
        self.branch2 = make_branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = 0.5 * self.branch1(x) + 0.5 * self.branch2(x)
        return mixed + (x if self.shortcut is None else self.shortcut(x))


class PublicShakeResNet(nn.Module):
    """The public `ShakeResNet(depth, base_width)`: `(N, 3, 32, 32)` → `(N, 4·base_width)`."""
    def __init__(self, depth: int, base_width: int):
        super().__init__()
        self.check(depth, base_width)
        n = (depth - 2) // 6
        self.feature_num = 4 * base_width
        self.conv_1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn_1 = nn.BatchNorm2d(16)
        stages, in_channels = [], 16
        for width, stride in ((base_width, 1), (2 * base_width, 2), (4 * base_width, 2)):
            blocks = []
            for i in range(n):
                c_in, s = (in_channels, stride) if i == 0 else (width, 1)
                blocks.append(ShakeBlock(c_in, width, s, lambda c_in=c_in, s=s, w=width: _basic_branch(c_in, w, s)))
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.stage_1, self.stage_2, self.stage_3 = stages

    @staticmethod
    def check(depth: int, base_width: int) -> None:
        if depth < 8 or (depth - 2) % 6 or base_width < 1:
            raise IsdaVizError(f"Shake-Shake ResNet depth must be 6n+2 (n >= 1) and width >= 1, got {depth}, "
                               f"{base_width}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage_3(self.stage_2(self.stage_1(self.bn_1(self.conv_1(x)))))
        return F.avg_pool2d(F.relu(out), 8).flatten(1)


class PublicShakeResNeXt(nn.Module):
    """The public `ShakeResNeXt(depth, w_base, cardinality)`: `(N, 3, 32, 32)` → `(N, 1024)`."""
    def __init__(self, depth: int, cardinality: int, base_width: int):
        super().__init__()
        self.check(depth, cardinality, base_width)
        n = (depth - 2) // 9
        self.feature_num = 1024
        self.c_in = nn.Conv2d(3, 64, 3, padding=1)
        layers, in_channels = [], 64
        for channels, stride in ((64, 1), (128, 2), (256, 2)):
            mid, out = channels * (base_width // 64) * cardinality, channels * 4
            blocks = []
            for i in range(n):
                c_in, s = (in_channels, stride) if i == 0 else (out, 1)
                blocks.append(ShakeBlock(c_in, out, s, lambda c_in=c_in, s=s, m=mid, o=out:
                                         _bottleneck_branch(c_in, m, o, cardinality, s)))
            layers.append(nn.Sequential(*blocks))
            in_channels = out
        self.layer1, self.layer2, self.layer3 = layers

    @staticmethod
    def check(depth: int, cardinality: int, base_width: int) -> None:
        if depth < 11 or (depth - 2) % 9 or cardinality < 1 or base_width < 64:
            raise IsdaVizError(f"Shake-ResNeXt depth must be 9n+2 (n >= 1), cardinality >= 1, width >= 64, "
                               f"got {depth}, {cardinality}, {base_width}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.c_in(x))))
        return F.avg_pool2d(F.relu(out), 8).flatten(1)


class PyramidBottleneck(nn.Module):
    """PyramidNet bottleneck with ShakeDrop in eval mode: `(1 - p_drop) · residual + zero-padded shortcut`."""
    def __init__(self, in_channels: int, planes: int, stride: int, p_drop: float):
        super().__init__()
        self.stride, self.p_drop = stride, p_drop
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(planes * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.bn2(self.conv1(self.bn1(x)))))
        out = self.bn4(self.conv3(F.relu(self.bn3(out))))
        out = (1 - self.p_drop) * out
        shortcut = x if self.stride == 1 else F.avg_pool2d(x, 2, 2, ceil_mode=True)
        extra = out.shape[1] - shortcut.shape[1]
        return out + (F.pad(shortcut, (0, 0, 0, 0, 0, extra)) if extra else shortcut)


class PublicShakePyramidNet(nn.Module):
    """The public `PyramidNet('cifar…', depth, alpha, bottleneck=True)`: (N, 3, 32, 32) → (N, 4·round(16+α))."""
    def __init__(self, depth: int, alpha: int = PYRAMID_ALPHA):
        super().__init__()
        self.check(depth, alpha)
        n = (depth - 2) // 9
        add = alpha / (3 * n * 1.0)
        # The public code's drop probabilities, computed as it does (same floats, same eval scaling).
        p_drop = [1. - (1.0 - (0.5 / (3 * n)) * (i + 1)) for i in range(3 * n)]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        width, in_channels, layers = 16.0, 16, []
        for stride in (1, 2, 2):
            blocks = []
            for i in range(n):
                width += add
                blocks.append(PyramidBottleneck(in_channels, int(round(width)), stride if i == 0 else 1,
                                                p_drop[len(layers) * n + i]))
                in_channels = int(round(width)) * 4
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn_final = nn.BatchNorm2d(in_channels)
        self.feature_num = in_channels

    @staticmethod
    def check(depth: int, alpha: int = PYRAMID_ALPHA) -> None:
        if depth < 11 or (depth - 2) % 9 or alpha < 0:
            raise IsdaVizError(f"PyramidNet depth must be 9n+2 (n >= 1) and alpha >= 0, got {depth}, {alpha}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.bn1(self.conv1(x)))))
        return F.avg_pool2d(F.relu(self.bn_final(out)), 8).flatten(1)


def pyramidnet_arch_name(depth: int, alpha: int) -> str:
    return f"shake_pyramidnet{depth}" if alpha == PYRAMID_ALPHA else f"shake_pyramidnet{depth}_{alpha}"


def _count(state, pattern: str) -> int | None:
    blocks = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(blocks) + 1 if blocks else None


def guess_shake_arch(state) -> str | None:
    """`shake_resnet26_2x32d`, `shake_resnext29_2x4x64d`, `shake_pyramidnet272` … from names and shapes."""
    n = _count(state, r"stage_1\.(\d+)\.branch1\.1\.weight$")
    if n and "conv_1.weight" in state:
        return f"shake_resnet{6 * n + 2}_2x{state['stage_1.0.branch1.1.weight'].shape[0]}d"
    n = _count(state, r"layer1\.(\d+)\.branch1\.3\.weight$")
    if n and "c_in.weight" in state:
        grouped = state["layer1.0.branch1.3.weight"]
        cardinality = grouped.shape[0] // grouped.shape[1]
        return f"shake_resnext{9 * n + 2}_2x{cardinality}x{grouped.shape[1]}d"
    n = _count(state, r"layer1\.(\d+)\.bn4\.weight$")
    final = state.get("bn_final.weight")
    if n and final is not None:
        return pyramidnet_arch_name(9 * n + 2, final.shape[0] // 4 - 16)
    return None


# ---------------------------------------------------------------- the families, registered

@register_public_family(
    "shake_resnet", r"shake_resnet(\d+)_2x(\d+)d", guess=guess_shake_arch, order=60,
    names=("shake_resnet26_2x32d", "shake_resnet26_2x64d", "shake_resnet26_2x112d"),
    forms=("shake_resnetDEPTH_2xWIDTHd",), summary="the public code's Shake-Shake ResNets",
    rows=(ReadmeRow("`shake_resnet26_2x32d`, `shake_resnet26_2x112d`",
                    "`train.py --model shake_shake --widen-factor 32` (or `112`; `96` also builds 2x32d)", "128, 448",
                    "isda-viz augment --image cat.png --classifier checkpoint.pth.tar --classifier-arch "
                    "shake_resnet26_2x112d --generator runs/c10-gan --out out/cat"),
          ReadmeRow("`shake_resnet26_2x64d`",
                    "defined in `networks/shake_shake.py`, but no `train.py` branch builds it: a `train.py` edited "
                    "to do so", "256",
                    "isda-viz augment --image cat.png --classifier checkpoint.pth.tar --classifier-arch "
                    "shake_resnet26_2x64d --generator runs/c10-gan --out out/cat")))
def shake_resnet_arch(m) -> PublicArch:
    """`shake_resnet{depth}_2x{width}d`: `ShakeResNet(depth, width)`."""
    depth, width = map(int, m.groups())
    return PublicArch(f"shake_resnet{depth}_2x{width}d", PublicShakeResNet, (depth, width))


@register_public_family(
    "shake_resnext", r"shake_resnext(\d+)_2x(\d+)x(\d+)d", guess=guess_shake_arch, order=70,
    names=("shake_resnext29_2x4x64d",), forms=("shake_resnextDEPTH_2xCARDxWIDTHd",),
    summary="the public code's Shake-ResNeXt",
    rows=(ReadmeRow("`shake_resnext29_2x4x64d`", "`train.py --model shake_shake_x`", "1024",
                    "isda-viz grid --classifier checkpoint.pth.tar --classifier-arch shake_resnext29_2x4x64d "
                    "--generator runs/c100-gan --data-root ~/data --classes apple,bear --out c100.png"),))
def shake_resnext_arch(m) -> PublicArch:
    """`shake_resnext{depth}_2x{cardinality}x{width}d`: `ShakeResNeXt(depth, width, cardinality)`."""
    depth, cardinality, width = map(int, m.groups())
    return PublicArch(f"shake_resnext{depth}_2x{cardinality}x{width}d", PublicShakeResNeXt,
                      (depth, cardinality, width))


@register_public_family(
    "shake_pyramidnet", r"shake_pyramidnet(\d+)(?:_(\d+))?", guess=guess_shake_arch, order=80,
    names=("shake_pyramidnet272",), forms=("shake_pyramidnetDEPTH_ALPHA",),
    summary="the public code's ShakeDrop PyramidNet",
    rows=(ReadmeRow("`shake_pyramidnet272` (any `shake_pyramidnetDEPTH_ALPHA`)",
                    "`train.py --model shake_pyramidnet --layers 272` (`--alpha 200`, bottleneck blocks)", "864",
                    "isda-viz augment --image cat.png --classifier checkpoint.pth.tar --classifier-arch "
                    "shake_pyramidnet272 --generator runs/c10-gan --out out/cat"),))
def shake_pyramidnet_arch(m) -> PublicArch:
    """`shake_pyramidnet{depth}(_{alpha})`: the ShakeDrop PyramidNet (alpha 200 by default)."""
    depth, alpha = int(m.group(1)), int(m.group(2) or PYRAMID_ALPHA)
    return PublicArch(pyramidnet_arch_name(depth, alpha), PublicShakePyramidNet, (depth, alpha))
