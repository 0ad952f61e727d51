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

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from isda_viz.classifiers.registry import ClassifierFamily, classifier_families, known_archs
from isda_viz.data.datasets import CIFAR10_CLASSES, CIFAR100_CLASSES  # noqa: F401  (re-exported: the public code's labels)
from isda_viz.errors import IsdaVizError

PUBLIC_CIFAR_MEAN = [125.3 / 255, 123.0 / 255, 113.9 / 255]
PUBLIC_CIFAR_STD = [63.0 / 255, 62.1 / 255, 66.7 / 255]
PUBLIC_INPUT_SIZE = 32
PUBLIC_FORMAT = "public-isda"
"""`Classifier.config["format"]` of every family of the public CIFAR code (`foreign.register_public_family`)."""


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


def public_families() -> list[ClassifierFamily]:
    """The registered families of the public CIFAR code (each module `public_*.py` registers its own)."""
    return [f for f in classifier_families() if f.format == PUBLIC_FORMAT]


def public_arch_names() -> tuple[str, ...]:
    """The public CIFAR code's own architectures (its constructors, and what `train.py` builds with its defaults)."""
    return tuple(n for f in public_families() for n in f.names)


def known_public_archs() -> str:
    """The public names, then the other settings of the same classes (`train.py`'s `--layers`, `--widen-factor`,
    `--growth-rate`, `--alpha`) as templates."""
    return known_archs(public_families())


def match_public_arch(arch: str) -> PublicArch | None:
    """The `PublicArch` an architecture name spells, None for a name of no public family.

    A name of a family with impossible settings (`resnet164`, `wrn27_2`) is a one-line `IsdaVizError`
    saying why.
    """
    for family in public_families():
        if (m := family.match(arch)) is not None:
            spec = family.network(m)
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
    if its names and shapes tell (each family's `guess`)."""
    guesses = []
    for family in public_families():
        if family.guess is not None and family.guess not in guesses:
            guesses.append(family.guess)
    for guess in guesses:
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
