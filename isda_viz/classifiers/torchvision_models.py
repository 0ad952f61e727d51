"""torchvision classifiers with the user's weights (`--classifier-arch torchvision:NAME`).

The network is `torchvision.models.<NAME>(weights=None, num_classes=C)`, C the row count of the file's final
linear layer, loaded strictly (nothing is downloaded). Its features are the input of that layer, captured by a
forward hook while torchvision's own forward runs; inputs use the default weights' eval preprocessing
(ImageNet's normalisation, 224 px for most). The public ISDA ImageNet code trains torchvision's ResNets and
ResNeXts, so a checkpoint of its `imagenet_DDP.py` is read here too, with the diagonal class statistics its
pickled loss holds (`foreign.WeightsFile.statistics`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from isda_viz.classifiers.foreign import load_strict, read_weights_file
from isda_viz.classifiers.registry import ClassifierWeights, ReadmeRow, register_classifier_family
from isda_viz.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from isda_viz.errors import IsdaVizError


def _torchvision_builder(name: str):
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = [n for n in names if n.startswith(name[:4])][:6] or names[:6]
        raise IsdaVizError(f"torchvision has no classification model '{name}' (e.g. {', '.join(close)})")
    return torchvision.models.get_model_builder(name)


def _probe(builder) -> nn.Module:
    """The network with default settings, for its layer names; on the meta device (no memory, no init) if it can."""
    try:
        with torch.device("meta"):
            return builder(weights=None)
    except (NotImplementedError, RuntimeError):  # a builder that computes its widths from tensor values
        return builder(weights=None)


def _last_linear(net: nn.Module, name: str) -> str:
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise IsdaVizError(f"torchvision {name} has no final nn.Linear layer to take features from")
    return linears[-1]


def torchvision_preprocessing(name: str) -> tuple[list[float], list[float], int]:
    """`(mean, std, input size)` of the default weights' eval transform (ImageNet's), without downloading."""
    try:
        transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        return list(transform.mean), list(transform.std), int(transform.crop_size[0])
    except (ValueError, AttributeError, KeyError):
        return list(IMAGENET_MEAN), list(IMAGENET_STD), 224


class HookedTorchvisionClassifier(nn.Module):
    """A torchvision network with isda-viz's model shape.

    `features(x) (N, A)` is the input of the final linear layer `fc`, captured by a
    forward hook while the network runs its own forward; `forward(x)` is the
    network's own output `(N, C)`. `mean`, `std`, `input_size` are the default
    weights' eval preprocessing (ImageNet normalisation, 224 for most).
    """

    def __init__(self, net: nn.Module, name: str):
        super().__init__()
        self.net = net
        self.name = name
        self.fc_name = _last_linear(net, name)
        self.feature_dim = self.fc.in_features
        self.num_classes = self.fc.out_features
        self.mean, self.std, self.input_size = torchvision_preprocessing(name)

    @property
    def fc(self) -> nn.Linear:
        return self.net.get_submodule(self.fc_name)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        captured = []
        handle = self.fc.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
        try:
            self.net(x)
        finally:
            handle.remove()
        if not captured:
            raise IsdaVizError(f"torchvision {self.name}: its final linear layer {self.fc_name} was not called")
        return captured[-1].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_classifier_family(
    "torchvision", prefix="torchvision", names=("torchvision:NAME",), order=100,
    summary="torchvision weights, e.g. torchvision:resnet50; also a checkpoint of the public ImageNet DDP script",
    rows=(ReadmeRow("`torchvision:NAME` (any classification model of torchvision)",
                    "torchvision weights you trained: a plain `state_dict`, or a dict holding one under "
                    "`state_dict` or `model` (`module.` prefixes dropped)",
                    "the input of the final linear layer (2048 for resnet50)",
                    "isda-viz augment --image dog.jpg --classifier resnet50.pth --classifier-arch torchvision:resnet50 "
                    "--data-root /data/imagenet --generator biggan-deep-128 --out out/dog"),
          ReadmeRow("`torchvision:resnet18` … `resnet152`, `torchvision:resnext50_32x4d`, `…resnext101_32x8d`",
                    "the public ImageNet `imagenet_DDP.py` (its `checkpoint.pth.tar` / `model_best.pth.tar`: DDP's "
                    "`module.` keys, and its ISDA loss's diagonal class statistics, so no `--data-root` pass)",
                    "512 (ResNet-18/34), 2048",
                    "isda-viz augment --image dog.jpg --classifier model_best.pth.tar --classifier-arch "
                    "torchvision:resnet50 --generator biggan-deep-128 --out out/dog")))
def load_torchvision_classifier(path, name: str, num_classes: int | None = None) -> ClassifierWeights:
    """`torchvision.models.<name>(weights=None, num_classes=C)` with the weights in `path`, in eval mode.

    `path`: a plain state dict (torch or `.safetensors`), or a dict holding one under `state_dict`
    or `model` (e.g. a checkpoint of the public ImageNet DDP script, whose class statistics come with it);
    `module.` prefixes are dropped. `C` is the row count of the final linear layer's weight in the file; a
    `num_classes` that differs is an error. The model is a `HookedTorchvisionClassifier`.
    """
    path = Path(path)
    builder = _torchvision_builder(name)
    weights = read_weights_file(path, f"torchvision {name} weights")
    state = weights.state
    fc_name = _last_linear(_probe(builder), name)
    fc_weight = state.get(f"{fc_name}.weight")
    if fc_weight is None or fc_weight.dim() != 2:
        raise IsdaVizError(f"{path} has no {fc_name}.weight, the final layer of torchvision {name}; "
                           f"is it a {name}? (keys: {', '.join(list(state)[:2])}, ...)")
    if num_classes is not None and num_classes != fc_weight.shape[0]:
        raise IsdaVizError(f"{path} classifies {fc_weight.shape[0]} classes, not {num_classes}")
    net = builder(weights=None, num_classes=fc_weight.shape[0])
    load_strict(net, state, f"{path}: torchvision {name} weights")
    model = HookedTorchvisionClassifier(net, name).eval().requires_grad_(False)
    return weights.classifier(model, f"torchvision:{name}")
