"""The public ISDA CIFAR code's residual networks, built from isda-viz's own blocks under its parameter names.

Facts from the public code (`networks/resnet.py`, `se_resnet.py`, `wideresnet.py`, `se_wideresnet.py`):

- `resnet{20,32,44,56,110,1202}_cifar` (`ResNet_Cifar`): `conv1`, `bn1`, `layer1..3` of post-activation basic
  blocks with 16/32/64 channels, 8x8 average pool; `A = 64`. A block's projection is `downsample` (1x1 conv + BN).
- `se_resnet.resnet{…}_cifar`: the same with an `SELayer(planes, 16)` as `se` (`se.fc.0`, `se.fc.2`, no biases)
  on the residual branch after `bn2`.
- `WideResNet(depth, _, k)` and its SE twin: `conv1`, `block{1,2,3}.layer.N` pre-activation blocks (projection
  `convShortcut`, SE as above after `conv2`), `bn1`, 8x8 average pool; `A = 64k`.
- `preact_resnet{110,164,1001}_cifar` (`PreAct_ResNet_Cifar`): `conv1`, `layer1..3` of pre-activation basic
  (110) or bottleneck (164, 1001) blocks, projection `downsample.0` (1x1 conv of the activated input), `bn`,
  8x8 pool and its own `fc`; `A = 64` or `256`. `train.py` has no branch that builds one (and the class has
  no `feature_num`, which `Full_layer` needs), so such a file is the network's own state dict.
- `resnet164_cifar` / `resnet1001_cifar` (bottleneck `ResNet_Cifar`, also the SE ones) cannot be built:
  `ResNet_Cifar._make_layer` passes `dropout_rate` to `Bottleneck`, whose `__init__` has no such argument
  (TypeError), and `feature_num` is fixed at 64 while those networks end in 256 channels.

The basic and pre-activation blocks are `networks.BasicBlock` / `networks.WideBlock`, the same classes
isda-viz trains; only their projection's name differs, which `_publish_child_as` maps when saving and loading.
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.classifiers.foreign import register_public_family
from isda_viz.classifiers.networks import BasicBlock, WideBlock
from isda_viz.classifiers.public import PublicArch
from isda_viz.classifiers.registry import ReadmeRow
from isda_viz.errors import IsdaVizError

RESNET_DEPTHS = (20, 32, 44, 56, 110, 1202)
"""Depths the public code builds from basic blocks (`resnet{depth}_cifar`, also in `se_resnet.py`)."""
BOTTLENECK_RESNET_DEPTHS = (164, 1001)
PREACT_DEPTHS = {110: "basic", 164: "bottleneck", 1001: "bottleneck"}
SE_REDUCTION = 16


def _rename_on_save(module, state, prefix, local_metadata, ours: str, public: str) -> None:
    for key in [k for k in state if k.startswith(prefix + ours + ".")]:
        state[prefix + public + key[len(prefix + ours):]] = state.pop(key)


def _rename_on_load(module, state, prefix, local_metadata, strict, missing, unexpected, errors,
                    ours: str, public: str) -> None:
    for key in [k for k in state if k.startswith(prefix + public + ".")]:
        state[prefix + ours + key[len(prefix + public):]] = state.pop(key)


def _publish_child_as(block: nn.Module, ours: str, public: str) -> None:
    """`block`'s child `ours` is saved and loaded as `public` (`shortcut.0.weight` ↔ `downsample.0.weight`).

    `state_dict()` then shows the public names, so strict loading and its error messages speak them too.
    """
    block.register_state_dict_post_hook(functools.partial(_rename_on_save, ours=ours, public=public))
    block.register_load_state_dict_pre_hook(functools.partial(_rename_on_load, ours=ours, public=public))


def _stage(make_block, in_planes: int, planes: int, blocks: int, stride: int, expansion: int = 1) -> nn.Sequential:
    """`blocks` blocks; the first changes width (`in_planes` → `planes · expansion`) and stride."""
    return nn.Sequential(*[make_block(in_planes if i == 0 else planes * expansion, planes, stride if i == 0 else 1)
                           for i in range(blocks)])


def _publish_shortcuts(net: nn.Module, public: str) -> None:
    for block in net.modules():
        if getattr(block, "shortcut", None) is not None and isinstance(block, (BasicBlock, WideBlock,
                                                                              PreActBottleneck)):
            _publish_child_as(block, "shortcut", public)


class PublicResNet(nn.Module):
    """The public `ResNet_Cifar` (basic blocks), or its SE twin: `(N, 3, 32, 32)` → `(N, 64)`."""
    def __init__(self, depth: int, se: bool = False):
        super().__init__()
        self.check(depth, se)
        n = (depth - 2) // 6
        reduction = SE_REDUCTION if se else None
        self.feature_num = 64
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        block = functools.partial(BasicBlock, se_reduction=reduction)
        self.layer1 = _stage(block, 16, 16, n, 1)
        self.layer2 = _stage(block, 16, 32, n, 2)
        self.layer3 = _stage(block, 32, 64, n, 2)
        _publish_shortcuts(self, "downsample")

    @staticmethod
    def check(depth: int, se: bool = False) -> None:
        """A one-line `IsdaVizError` unless the public code builds this network."""
        if depth in BOTTLENECK_RESNET_DEPTHS:
            raise IsdaVizError(f"the public code cannot build {'se_' if se else ''}resnet{depth}: its ResNet_Cifar "
                               f"passes dropout_rate to Bottleneck, which takes none, and fixes feature_num at 64")
        if depth not in RESNET_DEPTHS:
            prefix = "se_resnet" if se else "resnet"
            raise IsdaVizError(f"the public code has no basic-block {prefix}{depth}; "
                               f"choose one of {', '.join(f'{prefix}{d}' for d in RESNET_DEPTHS)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.avg_pool2d(out, 8, stride=1).flatten(1)


class WideStage(nn.Module):
    """The public `NetworkBlock`: its blocks live in `.layer`."""
    def __init__(self, blocks: int, in_planes: int, planes: int, stride: int, se_reduction: int | None):
        super().__init__()
        self.layer = _stage(functools.partial(WideBlock, se_reduction=se_reduction), in_planes, planes, blocks,
                            stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class PublicWideResNet(nn.Module):
    """The public `WideResNet(depth, _, widen_factor)`, or its SE twin: `(N, 3, 32, 32)` → `(N, 64·k)`."""
    def __init__(self, depth: int, widen_factor: int, se: bool = False):
        super().__init__()
        self.check(depth, widen_factor)
        n, k = (depth - 4) // 6, widen_factor
        reduction = SE_REDUCTION if se else None
        self.feature_num = 64 * k
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1 = WideStage(n, 16, 16 * k, 1, reduction)
        self.block2 = WideStage(n, 16 * k, 32 * k, 2, reduction)
        self.block3 = WideStage(n, 32 * k, 64 * k, 2, reduction)
        self.bn1 = nn.BatchNorm2d(64 * k)
        _publish_shortcuts(self, "convShortcut")

    @staticmethod
    def check(depth: int, widen_factor: int, se: bool = False) -> None:
        if depth < 10 or (depth - 4) % 6 or widen_factor < 1:
            raise IsdaVizError(f"WideResNet depth must be 6n+4 (n >= 1) and width >= 1, got {depth}, {widen_factor}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return F.avg_pool2d(out, 8).flatten(1)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: 1x1 (`planes`), 3x3 (stride), 1x1 (`4·planes`) convolutions, each after BN + ReLU;
    the 1x1 `shortcut` reads the activated input when the shape changes."""
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes * 4:
            self.shortcut = nn.Conv2d(in_planes, planes * 4, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(act)
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class PublicPreActResNet(nn.Module):
    """The public `PreAct_ResNet_Cifar` without its `fc`: `(N, 3, 32, 32)` → `(N, 64)` (110) or `(N, 256)`."""
    def __init__(self, depth: int):
        super().__init__()
        self.check(depth)
        bottleneck = PREACT_DEPTHS[depth] == "bottleneck"
        n, expansion = ((depth - 2) // 9, 4) if bottleneck else ((depth - 2) // 6, 1)
        block = PreActBottleneck if bottleneck else WideBlock
        self.feature_num = 64 * expansion
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.layer1 = _stage(block, 16, 16, n, 1, expansion)
        self.layer2 = _stage(block, 16 * expansion, 32, n, 2, expansion)
        self.layer3 = _stage(block, 32 * expansion, 64, n, 2, expansion)
        self.bn = nn.BatchNorm2d(64 * expansion)
        _publish_shortcuts(self, "downsample.0")

    @staticmethod
    def check(depth: int) -> None:
        if depth not in PREACT_DEPTHS:
            raise IsdaVizError(f"the public code has no preact_resnet{depth}; choose one of "
                               f"{', '.join(f'preact_resnet{d}' for d in PREACT_DEPTHS)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return F.avg_pool2d(F.relu(self.bn(out)), 8, stride=1).flatten(1)


def _block_count(state, pattern: str) -> int | None:
    blocks = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(blocks) + 1 if blocks else None


def guess_resnet_arch(state) -> str | None:
    """`resnet110`, `se_resnet56`, `preact_resnet164`, `wrn28_10`, `se_wrn16_8` … from a feature state dict."""
    n = _block_count(state, r"layer1\.(\d+)\.conv1\.weight$")
    if n and "bn.weight" in state:
        return f"preact_resnet{9 * n + 2 if 'layer1.0.conv3.weight' in state else 6 * n + 2}"
    if n and "bn1.weight" in state and "layer1.0.conv3.weight" not in state:
        return f"{'se_' if 'layer1.0.se.fc.0.weight' in state else ''}resnet{6 * n + 2}"
    n = _block_count(state, r"block1\.layer\.(\d+)\.conv1\.weight$")
    width = state.get("block1.layer.0.conv1.weight")
    if n and width is not None and width.shape[0] % 16 == 0:
        se = "se_" if "block1.layer.0.se.fc.0.weight" in state else ""
        return f"{se}wrn{6 * n + 4}_{width.shape[0] // 16}"
    return None


# ---------------------------------------------------------------- the families, registered

@register_public_family(
    "resnet", r"(se_)?resnet(\d+)(?:_cifar)?", guess=guess_resnet_arch, order=10,
    names=(*(f"resnet{d}" for d in RESNET_DEPTHS), *(f"se_resnet{d}" for d in RESNET_DEPTHS)),
    summary="a checkpoint of the public ISDA CIFAR code's ResNet or SE-ResNet; its format recognised from its keys",
    rows=(ReadmeRow("`resnet20` `resnet32` `resnet44` `resnet56` `resnet110` `resnet1202`",
                    "`train.py --model resnet --layers 110`", "64",
                    "isda-viz augment --image cat.png --classifier checkpoint.pth.tar --classifier-arch resnet110 "
                    "--generator runs/c10-gan --out out/cat"),
          ReadmeRow("`se_resnet20` … `se_resnet1202`", "`train.py --model se_resnet --layers 110`", "64",
                    "isda-viz augment --image cat.png --classifier checkpoint.pth.tar --classifier-arch se_resnet110 "
                    "--generator runs/c10-gan --out out/cat")))
def resnet_arch(m) -> PublicArch:
    """`(se_)resnet{depth}(_cifar)`: `ResNet_Cifar` of basic blocks, or its SE twin."""
    se, depth = m.group(1) or "", int(m.group(2))
    return PublicArch(f"{se}resnet{depth}", PublicResNet, (depth, bool(se)))


@register_public_family(
    "preact_resnet", r"preact_resnet(\d+)(?:_cifar)?", guess=guess_resnet_arch, order=20,
    names=tuple(f"preact_resnet{d}" for d in PREACT_DEPTHS),
    summary="the public code's pre-activation ResNets: the network's own state dict",
    rows=(ReadmeRow("`preact_resnet110`, `preact_resnet164`, `preact_resnet1001`",
                    "not `train.py` (no branch builds one, and the class has no `feature_num` for `Full_layer`): the "
                    "network's own state dict, `torch.save(model.state_dict(), \"preact.pth\")`, bare or under "
                    "`state_dict`, `module.` keys allowed; its `fc` is inside. No class covariances: give "
                    "`--data-root` for a statistics pass", "64, 256, 256",
                    "isda-viz augment --image cat.png --classifier preact.pth --classifier-arch preact_resnet110 "
                    "--data-root ~/data --generator runs/c10-gan --out out/cat"),))
def preact_resnet_arch(m) -> PublicArch:
    """`preact_resnet{depth}(_cifar)`: `PreAct_ResNet_Cifar`, which holds its own `fc`."""
    depth = int(m.group(1))
    return PublicArch(f"preact_resnet{depth}", PublicPreActResNet, (depth,), own_fc=True)


@register_public_family(
    "wrn", r"(se_)?wrn(\d+)_(\d+)", guess=guess_resnet_arch, order=30,
    names=("wrn16_8", "wrn28_10", "se_wrn16_8", "se_wrn28_10"), forms=("wrnDEPTH_WIDTH", "se_wrnDEPTH_WIDTH"),
    summary="the public code's wide ResNets and SE wide ResNets",
    rows=(ReadmeRow("`wrn16_8`, `wrn28_10` (any `wrnDEPTH_WIDTH`)",
                    "`train.py --model wideresnet --layers 28 --widen-factor 10`", "64·width (640)",
                    "isda-viz grid --classifier model_best.pth.tar --classifier-arch wrn28_10 --generator "
                    "runs/c100-gan --data-root ~/data --classes apple,bear --out c100.png"),
          ReadmeRow("`se_wrn16_8`, `se_wrn28_10` (any `se_wrnDEPTH_WIDTH`)",
                    "`train.py --model se_wideresnet --layers 16 --widen-factor 8`", "512, 640",
                    "isda-viz augment --image cat.png --classifier checkpoint.pth.tar --classifier-arch se_wrn16_8 "
                    "--generator runs/c10-gan --out out/cat")))
def wide_resnet_arch(m) -> PublicArch:
    """`(se_)wrn{depth}_{width}`: `WideResNet(depth, _, width)`, or its SE twin."""
    se, depth, width = m.group(1) or "", int(m.group(2)), int(m.group(3))
    return PublicArch(f"{se}wrn{depth}_{width}", PublicWideResNet, (depth, width, bool(se)))
