"""The public ISDA CIFAR code's architectures by name: the registry, `Full_layer`, and isda-viz's view of them.

Facts about the public code (GitHub blackfeather-wang/ISDA-for-Deep-Networks,
folder "Image classification on CIFAR"), which these modules reproduce so that
its checkpoints load strictly and give the same outputs in eval mode:

- Every feature network returns the penultimate pooled features `(N, A)`, `A` its
  `feature_num`: ResNet, SE-ResNet, WRN, SE-WRN and pre-activation ResNet
  (`public_resnet`), DenseNet-BC (`public_densenet`), ResNeXt-29 (`public_resnext`),
  Shake-Shake, Shake-ResNeXt and ShakeDrop PyramidNet (`public_shake`); each
  module's docstring gives its names and shapes. The network has no classifier;
  a separate `Full_layer(feature_num, class_num)` holds it as `.fc = nn.Linear(A, C)`
  and the logits are `Full_layer(features)` (the pre-activation ResNets, which
  `train.py` cannot build, hold their own `fc`).
- Both parts are wrapped in `nn.DataParallel` during training, so every key of the
  saved state dicts starts with `module.` (`module.fc.weight`, `module.fc.bias`).
- Dropout (rate 0 by default) has no parameters and does nothing in eval mode;
  it is left out here; the random Shake-Shake / ShakeDrop mixing is its eval-mode scaling.
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

The modules are our own code with those names and shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from isda_viz.classifiers.public_densenet import (
    DENSENET_GROWTH,
    PublicDenseNetBC,
    densenet_arch_name,
    guess_densenet_arch,
)
from isda_viz.classifiers.public_resnet import (
    PREACT_DEPTHS,
    RESNET_DEPTHS,
    PublicPreActResNet,
    PublicResNet,
    PublicWideResNet,
    guess_resnet_arch,
)
from isda_viz.classifiers.public_resnext import PublicResNeXt, guess_resnext_arch
from isda_viz.classifiers.public_shake import (
    PYRAMID_ALPHA,
    PublicShakePyramidNet,
    PublicShakeResNeXt,
    PublicShakeResNet,
    guess_shake_arch,
    pyramidnet_arch_name,
)
from isda_viz.data.datasets import CIFAR10_CLASSES, CIFAR100_CLASSES  # noqa: F401  (re-exported: the public code's labels)
from isda_viz.errors import IsdaVizError

PUBLIC_CIFAR_MEAN = [125.3 / 255, 123.0 / 255, 113.9 / 255]
PUBLIC_CIFAR_STD = [63.0 / 255, 62.1 / 255, 66.7 / 255]
PUBLIC_INPUT_SIZE = 32


class FullLayer(nn.Module):
    """The public `Full_layer`: `.fc = nn.Linear(A, C)`; logits `(N, C)` from features `(N, A)`."""
    def __init__(self, feature_num: int, class_num: int):
        super().__init__()
        self.class_num = class_num
        self.fc = nn.Linear(feature_num, class_num)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@dataclass(frozen=True)
class PublicArch:
    """One `--classifier-arch` name of the public CIFAR code.

    `name` is the canonical spelling; `network(*args)` (`build()`) is the feature network (`forward(x) (N, A)`,
    `.feature_num` = A) with the public parameter names, `network.check(*args)` says whether the public code
    builds it; `own_fc` marks networks that hold their classifier themselves as `fc` (pre-activation ResNets:
    their file is one state dict, `fc.*` among the network's keys).
    """

    name: str
    network: type[nn.Module]
    args: tuple
    own_fc: bool = False

    def build(self) -> nn.Module:
        return self.network(*self.args)


def _resnet(m):
    se, depth = m.group(1) or "", int(m.group(2))
    return PublicArch(f"{se}resnet{depth}", PublicResNet, (depth, bool(se)))


def _wrn(m):
    se, depth, width = m.group(1) or "", int(m.group(2)), int(m.group(3))
    return PublicArch(f"{se}wrn{depth}_{width}", PublicWideResNet, (depth, width, bool(se)))


def _preact(m):
    depth = int(m.group(1))
    return PublicArch(f"preact_resnet{depth}", PublicPreActResNet, (depth,), own_fc=True)


def _densenet(m):
    depth, growth = int(m.group(1)), int(m.group(2) or DENSENET_GROWTH)
    return PublicArch(densenet_arch_name(depth, growth), PublicDenseNetBC, (depth, growth))


def _resnext(m):
    depth, cardinality, width = map(int, m.groups())
    return PublicArch(f"resnext{depth}_{cardinality}_{width}", PublicResNeXt, (depth, cardinality, width))


def _shake_resnet(m):
    depth, width = map(int, m.groups())
    return PublicArch(f"shake_resnet{depth}_2x{width}d", PublicShakeResNet, (depth, width))


def _shake_resnext(m):
    depth, cardinality, width = map(int, m.groups())
    return PublicArch(f"shake_resnext{depth}_2x{cardinality}x{width}d", PublicShakeResNeXt,
                      (depth, cardinality, width))


def _pyramidnet(m):
    depth, alpha = int(m.group(1)), int(m.group(2) or PYRAMID_ALPHA)
    return PublicArch(pyramidnet_arch_name(depth, alpha), PublicShakePyramidNet, (depth, alpha))


_FAMILIES = (
    (r"(se_)?resnet(\d+)(?:_cifar)?", _resnet),
    (r"(se_)?wrn(\d+)_(\d+)", _wrn),
    (r"preact_resnet(\d+)(?:_cifar)?", _preact),
    (r"densenet_bc(\d+)(?:_(\d+))?", _densenet),
    (r"resnext(\d+)_(\d+)_(\d+)", _resnext),
    (r"shake_resnet(\d+)_2x(\d+)d", _shake_resnet),
    (r"shake_resnext(\d+)_2x(\d+)x(\d+)d", _shake_resnext),
    (r"shake_pyramidnet(\d+)(?:_(\d+))?", _pyramidnet),
)

PUBLIC_ARCH_NAMES = (
    *(f"resnet{d}" for d in RESNET_DEPTHS), *(f"se_resnet{d}" for d in RESNET_DEPTHS),
    *(f"preact_resnet{d}" for d in PREACT_DEPTHS), "wrn16_8", "wrn28_10", "se_wrn16_8", "se_wrn28_10",
    "densenet_bc100", "densenet_bc190", "resnext29_8_64", "resnext29_16_64", "shake_resnet26_2x32d",
    "shake_resnet26_2x64d", "shake_resnet26_2x112d", "shake_resnext29_2x4x64d", "shake_pyramidnet272",
)
"""The public CIFAR code's own architectures (its constructors, and what `train.py` builds with its defaults)."""
PUBLIC_ARCH_PATTERNS = ("wrnDEPTH_WIDTH", "se_wrnDEPTH_WIDTH", "densenet_bcDEPTH_GROWTH", "resnextDEPTH_CARD_WIDTH",
                        "shake_resnetDEPTH_2xWIDTHd", "shake_resnextDEPTH_2xCARDxWIDTHd", "shake_pyramidnetDEPTH_ALPHA")
"""The other settings of the same classes (`train.py`'s `--layers`, `--widen-factor`, `--growth-rate`, `--alpha`)."""


def known_public_archs() -> str:
    return f"{', '.join(PUBLIC_ARCH_NAMES)} (also {', '.join(PUBLIC_ARCH_PATTERNS)})"


def match_public_arch(arch: str) -> PublicArch | None:
    """The `PublicArch` an architecture name spells, None for a name of no public family.

    A name of a family with impossible settings (`resnet164`, `wrn27_2`) is a one-line `IsdaVizError`
    saying why.
    """
    for pattern, make in _FAMILIES:
        if (m := re.fullmatch(pattern, arch)) is not None:
            spec = make(m)
            spec.network.check(*spec.args)
            return spec
    return None


def parse_public_arch(arch: str) -> PublicArch:
    """`match_public_arch`, with an unknown name a one-line `IsdaVizError` listing the known ones."""
    spec = match_public_arch(arch)
    if spec is None:
        raise IsdaVizError(f"unknown public ISDA CIFAR architecture '{arch}'; known: {known_public_archs()}")
    return spec


def build_public_network(arch: str, num_classes: int) -> tuple[nn.Module, FullLayer]:
    """`(feature_net, fc)` named like the public code's: `feature_net(x) (N, A)`, `fc(features) (N, C)`.

    For a network with its own `fc` (`PublicArch.own_fc`), `fc` holds those weights: the public state dict
    is `{**feature_net.state_dict(), **fc.state_dict()}`.
    """
    net = parse_public_arch(arch).build()
    return net, FullLayer(net.feature_num, num_classes)


def guess_public_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """The arch name (`resnet110`, `wrn28_10`, `densenet_bc100`, ...) a public feature state dict was saved from,
    if its names and shapes tell."""
    for guess in (guess_resnet_arch, guess_densenet_arch, guess_resnext_arch, guess_shake_arch):
        if (name := guess(state)) is not None:
            return name
    return None


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
