"""The DenseNet-BC networks of the public ISDA ImageNet code (`isda-imagenet:densenet121` ... `densenet265`).

The public ImageNet script trains its own DenseNet-BC, not torchvision's: the first convolution has
`num_init_features = 24` filters (torchvision: 64), transitions halve the width with
`int(width * 0.5)`, the last BatchNorm is `features.norm_final` (torchvision: `norm5`) and the
final layer `fc` (torchvision: `classifier`). DenseNet-121 therefore ends in 1019 features, not
1024, and DenseNet-265 (blocks 6, 12, 64, 48; no torchvision builder) in 2683. After
`features` come a ReLU and `avg_pool2d(kernel_size=7)`, which is the global average at the
script's 224 px input (a 7 x 7 map). Inputs are normalised with ImageNet's mean and std.

`PublicImageNetDenseNet` carries the public parameter names (so its checkpoints load strictly);
`ImageNetDenseNetClassifier` gives it isda-viz's model shape.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.classifiers.foreign import load_strict, read_weights_file
from isda_viz.classifiers.registry import (
    ClassifierWeights,
    ReadmeRow,
    register_classifier_family,
)
from isda_viz.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from isda_viz.errors import IsdaVizError

IMAGENET_INPUT_SIZE = 224
FINAL_POOL = 7
"""The kernel of the public forward's last `avg_pool2d` (a 7 x 7 map at 224 px)."""

IMAGENET_DENSENET_BLOCKS = {
    "densenet121": (6, 12, 24, 16),
    "densenet169": (6, 12, 32, 32),
    "densenet201": (6, 12, 48, 32),
    "densenet265": (6, 12, 64, 48),
}
"""Layers per dense block of each DenseNet-BC the public ImageNet script builds (growth rate 32)."""


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (to `bottleneck` channels) then BN-ReLU-Conv3x3 (to `growth` channels)."""

    def __init__(self, in_channels: int, growth: int, bottleneck: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bottleneck, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck)
        self.conv2 = nn.Conv2d(bottleneck, growth, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class _DenseBlock(nn.Module):
    """`layers` dense layers `denselayer1..`, each fed the concatenation of the input and all earlier outputs."""

    def __init__(self, layers: int, in_channels: int, growth: int, bottleneck: int):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(in_channels + i * growth, growth, bottleneck))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [x]
        for layer in self.children():
            maps.append(layer(torch.cat(maps, 1)))
        return torch.cat(maps, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 to `out_channels`, then 2 x 2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(in_channels)), ("relu", nn.ReLU()),
            ("conv", nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)),
            ("pool", nn.AvgPool2d(kernel_size=2, stride=2))]))


class PublicImageNetDenseNet(nn.Module):
    """DenseNet-BC with the public ImageNet code's names: `features.{conv0,norm0,denseblockN,transitionN,
    norm_final}`, `fc`. `forward(x)` gives the logits `(N, C)` of `x (N, 3, 224, 224)`."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int = 1000, growth: int = 32, init_features: int = 24,
                 bottleneck_factor: int = 4, compression: float = 0.5):
        super().__init__()
        layers: list[tuple[str, nn.Module]] = [
            ("conv0", nn.Conv2d(3, init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(init_features)), ("relu0", nn.ReLU()),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
        width = init_features
        for i, count in enumerate(blocks):
            layers.append((f"denseblock{i + 1}", _DenseBlock(count, width, growth, bottleneck_factor * growth)))
            width += count * growth
            if i < len(blocks) - 1:
                layers.append((f"transition{i + 1}", _Transition(width, int(width * compression))))
                width = int(width * compression)
        layers.append(("norm_final", nn.BatchNorm2d(width)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.feature_num = width
        self.fc = nn.Linear(width, num_classes)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The input of `fc`, `(N, feature_num)`: ReLU, then the public code's 7 x 7 average pool."""
        maps = self.features(x)
        if min(maps.shape[-2:]) < FINAL_POOL:
            raise IsdaVizError(f"the public ImageNet DenseNet pools a {FINAL_POOL}x{FINAL_POOL} map: it takes "
                               f"{IMAGENET_INPUT_SIZE} px inputs, got {x.shape[-2]}x{x.shape[-1]}")
        return F.avg_pool2d(F.relu(maps), kernel_size=FINAL_POOL).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


def build_imagenet_densenet(name: str, num_classes: int = 1000) -> PublicImageNetDenseNet:
    """`densenet121|169|201|265` as the public ImageNet script builds it, with `num_classes` outputs."""
    if name not in IMAGENET_DENSENET_BLOCKS:
        raise IsdaVizError(f"the public ISDA ImageNet code has no DenseNet '{name}'; use isda-imagenet:"
                           + "|".join(IMAGENET_DENSENET_BLOCKS)
                           + " (its ResNets and ResNeXts have torchvision's names: torchvision:NAME)")
    return PublicImageNetDenseNet(IMAGENET_DENSENET_BLOCKS[name], num_classes)


class ImageNetDenseNetClassifier(nn.Module):
    """A `PublicImageNetDenseNet` with isda-viz's model shape: `features(x) (N, A)`, `fc`, `feature_dim`,
    `forward(x)` the logits; `mean`, `std`, `input_size` as the public script's evaluation transform."""

    def __init__(self, net: PublicImageNetDenseNet, name: str):
        super().__init__()
        self.net = net
        self.name = name
        self.fc = net.fc
        self.feature_dim = net.feature_num
        self.num_classes = net.fc.out_features
        self.mean, self.std, self.input_size = list(IMAGENET_MEAN), list(IMAGENET_STD), IMAGENET_INPUT_SIZE

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.pooled(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_classifier_family(
    "isda-imagenet", prefix="isda-imagenet", names=(f"isda-imagenet:{'|'.join(IMAGENET_DENSENET_BLOCKS)}",),
    summary="the public ISDA ImageNet DenseNets", order=110,
    rows=(ReadmeRow("`isda-imagenet:densenet121` … `densenet265`",
                    "the public ImageNet DenseNet-BC-121 / -169 / -201 / -265: a checkpoint of `imagenet_DDP.py` "
                    "(with its diagonal class statistics), or the released bare weights",
                    "1019 (121), 2683 (265)",
                    "isda-viz augment --image dog.jpg --classifier densenet121.pth.tar --classifier-arch "
                    "isda-imagenet:densenet121 --generator biggan-deep-128 --out out/dog"),))
def load_imagenet_densenet(path, name: str, num_classes: int | None = None) -> ClassifierWeights:
    """The public ImageNet DenseNet `name` with the weights in `path`, in eval mode
    (an `ImageNetDenseNetClassifier`), and what the file holds besides.

    `path`: the public DDP script's `checkpoint.pth.tar` / `model_best.pth.tar` (`module.` keys, its
    pickled `ISDA_imagenet.ISDALoss`, whose diagonal statistics come with it), or a bare state dict (torch or
    `.safetensors`, e.g. the released pretrained files); loaded strictly. `C` is the row count of the file's
    `fc.weight`.
    """
    if name not in IMAGENET_DENSENET_BLOCKS:
        build_imagenet_densenet(name)  # the one-line error naming the known ones
    weights = read_weights_file(path, f"public ISDA ImageNet {name} weights")
    fc_weight = weights.state.get("fc.weight")
    if fc_weight is None or fc_weight.dim() != 2:
        raise IsdaVizError(f"{path} has no 2-d fc.weight, the final layer of the public ImageNet {name} "
                           f"(keys: {', '.join(list(weights.state)[:3])}, ...)")
    if num_classes is not None and num_classes != fc_weight.shape[0]:
        raise IsdaVizError(f"{path} classifies {fc_weight.shape[0]} classes, not {num_classes}")
    net = build_imagenet_densenet(name, fc_weight.shape[0])
    load_strict(net, weights.state, f"{path}: public ImageNet {name} weights")
    return weights.classifier(ImageNetDenseNetClassifier(net, name).eval().requires_grad_(False),
                              f"isda-imagenet:{name}")
