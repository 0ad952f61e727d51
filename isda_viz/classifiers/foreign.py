"""Classifiers trained elsewhere: checkpoints of the public ISDA CIFAR code, torchvision weights, and the
weights files they come in (`read_weights_file`: bare state dicts, `.safetensors`, the public ImageNet DDP
checkpoint whose pickled `ISDA_imagenet.ISDALoss` holds diagonal class statistics).

Both readers return a module with isda-viz's model shape: `features(x) (N, A)`,
`fc: nn.Linear(A, C)`, `feature_dim = A`, and `forward(x)` = the logits `(N, C)`,
in eval mode on the CPU. Files are read with `safe_load.load_torch_file`, so no
code they carry runs; state dicts are loaded strictly, after dropping the
`module.` prefix `nn.DataParallel` / DDP add to every key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from isda_viz.classifiers.public import (
    PUBLIC_CIFAR_MEAN,
    PUBLIC_CIFAR_STD,
    PUBLIC_INPUT_SIZE,
    FullLayer,
    PublicArch,
    PublicModel,
    guess_public_arch,
    parse_public_arch,
)
from isda_viz.classifiers.safe_load import SAFETENSORS_SUFFIX, PickledObject, load_torch_file
from isda_viz.data.datasets import CIFAR10_CLASSES, CIFAR100_CLASSES, IMAGENET_MEAN, IMAGENET_STD
from isda_viz.errors import IsdaVizError

PUBLIC_CHECKPOINT_KEYS = ("state_dict", "fc")
"""Keys that mark a checkpoint of the public ISDA CIFAR `train.py` (it also has
`isda_criterion`, `epoch`, `best_acc`, `optimizer`, `val_acc`)."""


def _is_tensor_mapping(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def is_public_isda_checkpoint(obj) -> bool:
    """True for the dict the public CIFAR `train.py` saves: `state_dict` and `fc` both state dicts."""
    return isinstance(obj, Mapping) and all(_is_tensor_mapping(obj.get(k)) for k in PUBLIC_CHECKPOINT_KEYS)


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> OrderedDict:
    """The state dict with the `module.` that `nn.DataParallel`/DDP put before every key removed."""
    if all(k.startswith("module.") for k in state):
        return OrderedDict((k[len("module."):], v) for k, v in state.items())
    return OrderedDict(state)


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:2]) + (", ..." if len(keys) > 2 else "")


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, hint: str = "") -> None:
    """`module.load_state_dict(state, strict=True)` with a one-line error listing what does not fit.

    `what` names the file and part ("model.pth: state_dict"); `hint` ends the message
    (e.g. which architecture the keys look like).
    """
    expected = module.state_dict()
    # Checkpoints from torch < 0.4.1 have no BatchNorm `num_batches_tracked`; BatchNorm fills it in.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = [f"{len(missing)} missing ({_examples(missing)})" if missing else "",
                f"{len(unexpected)} unexpected ({_examples(unexpected)})" if unexpected else "",
                f"{len(shapes)} of another shape ({_examples(shapes)})" if shapes else ""]
    problems = [p for p in problems if p]
    if problems:
        raise IsdaVizError(f"{what} does not fit: {'; '.join(problems)}{'; ' + hint if hint else ''}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise IsdaVizError(f"{what} does not load: {str(e).strip().splitlines()[0][:160]}") from None


# ---------------------------------------------------------------- public ISDA CIFAR code

def public_dataset(num_classes: int) -> tuple[str | None, list[str]]:
    """The public code trains on CIFAR-10 or CIFAR-100 only: `(dataset, class names)` from the class count."""
    if num_classes == 10:
        return "cifar10", list(CIFAR10_CLASSES)
    if num_classes == 100:
        return "cifar100", list(CIFAR100_CLASSES)
    return None, [f"class {i}" for i in range(num_classes)]


@dataclass
class PublicCheckpoint:
    """A checkpoint of the public ISDA CIFAR code, read into isda-viz's shapes.

    `model` is in eval mode on the CPU and takes `(N, 3, 32, 32)` inputs in [0, 1]
    normalised with `mean`/`std`. The class statistics are the checkpoint's
    `isda_criterion.estimator` as float64 (None when the file has none):
    `class_covariance (C, A, A)` (`CoVariance`, population covariance),
    `class_mean (C, A)` (`Ave`), `class_count (C,)` (`Amount`: features seen,
    summed over all epochs, so epochs × training images per class).
    `best_acc` is top-1 accuracy in percent; `epoch` the epochs trained.
    """

    path: Path
    arch: str
    model: PublicModel
    num_classes: int
    dataset: str | None
    class_names: list[str]
    mean: list[float] = field(default_factory=lambda: list(PUBLIC_CIFAR_MEAN))
    std: list[float] = field(default_factory=lambda: list(PUBLIC_CIFAR_STD))
    image_size: int = PUBLIC_INPUT_SIZE
    channels: int = 3
    class_covariance: torch.Tensor | None = None
    class_mean: torch.Tensor | None = None
    class_count: torch.Tensor | None = None
    epoch: int | None = None
    best_acc: float | None = None

    def estimator_state(self) -> dict | None:
        """The statistics as `CovarianceEstimator.state_dict()` (full covariance; `m2 = Σ · n`), or None."""
        if self.class_covariance is None:
            return None
        return {"num_features": self.model.feature_dim, "num_classes": self.num_classes, "diagonal": False,
                "m2": self.class_covariance * self.class_count[:, None, None],
                "mean64": self.class_mean.clone(), "count": self.class_count.clone()}


def _public_statistics(criterion, num_classes: int, feature_dim: int, path: Path):
    """`(covariance, mean, count)` float64 from the pickled `ISDALoss`, checked against the model's shapes."""
    estimator = getattr(criterion, "estimator", None) if isinstance(criterion, PickledObject) else None
    if not isinstance(estimator, PickledObject):
        return None, None, None
    c, a = num_classes, feature_dim
    parts = []
    for name, shape in (("CoVariance", (c, a, a)), ("Ave", (c, a)), ("Amount", (c,))):
        value = getattr(estimator, name, None)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise IsdaVizError(f"{path}: isda_criterion.estimator.{name} should be a tensor of shape {shape} "
                               f"for this model, found {got}")
        parts.append(value.to(torch.float64))
    return tuple(parts)


def _from_flat_weights(obj):
    """A flat state dict (`.safetensors`, which holds no nesting) of a public network: the feature
    network's keys plus the `Full_layer`'s `fc.weight`/`fc.bias`, as the `state_dict`/`fc` pair of a checkpoint."""
    if not _is_tensor_mapping(obj) or "fc.weight" not in strip_module_prefix(obj):
        return obj
    flat = strip_module_prefix(obj)
    fc = OrderedDict((k, v) for k, v in flat.items() if k.startswith("fc."))
    return {"state_dict": OrderedDict((k, v) for k, v in flat.items() if k not in fc), "fc": fc}
def _public_state_dicts(ckpt, spec: PublicArch, path: Path) -> tuple[OrderedDict, OrderedDict]:
    """`(feature network state, Full_layer state)` of a public file, `module.` prefixes dropped.

    A `train.py` checkpoint holds them as `state_dict` and `fc`; a network with its own `fc` (pre-activation
    ResNets, which `train.py` cannot build) is one state dict, bare or under `state_dict`, whose `fc.*` are split off.
    """
    if spec.own_fc:
        state = ckpt if _is_tensor_mapping(ckpt) else (
            ckpt.get("state_dict") if isinstance(ckpt, Mapping) and _is_tensor_mapping(ckpt.get("state_dict"))
            else None)
        if state is None:
            held = ", ".join(sorted(map(str, ckpt))[:6]) if isinstance(ckpt, Mapping) else type(ckpt).__name__
            raise IsdaVizError(f"{path} holds no state dict of {spec.name} (a dict of tensors, or one under "
                               f"'state_dict'); found {held}")
        state = strip_module_prefix(state)
        return (OrderedDict((k, v) for k, v in state.items() if not k.startswith("fc.")),
                OrderedDict((k, v) for k, v in state.items() if k.startswith("fc.")))
    if not is_public_isda_checkpoint(ckpt):
        held = ", ".join(sorted(map(str, ckpt))[:6]) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise IsdaVizError(f"{path} is not a checkpoint of the public ISDA CIFAR code (it needs 'state_dict' and "
                           f"'fc' state dicts; found {held}); for torchvision weights use torchvision:NAME")
    return strip_module_prefix(ckpt["state_dict"]), strip_module_prefix(ckpt["fc"])


def read_public_isda_checkpoint(path, arch: str, num_classes: int | None = None) -> PublicCheckpoint:
    """Read `checkpoint.pth.tar` / `model_best.pth.tar` of the public ISDA CIFAR `train.py`.

    `arch`: a `parse_public_arch` name (`resnet110`, `wrn28_10`, `se_resnet110`, `densenet_bc100`, ...). A flat
    state dict (`.safetensors`: the feature network's keys and `fc.weight`/`fc.bias`) is read too.
    `num_classes` defaults to the row count of the file's `fc` weight; a different
    value is an error. The feature network and `Full_layer` load strictly; any
    mismatch, a truncated file or a global outside the allow-list is a one-line
    `IsdaVizError`.
    """
    path = Path(path)
    spec = parse_public_arch(arch)
    ckpt = load_torch_file(path, "public ISDA checkpoint")
    if path.suffix.lower() == SAFETENSORS_SUFFIX and not spec.own_fc:
        ckpt = _from_flat_weights(ckpt)
    features_state, fc_state = _public_state_dicts(ckpt, spec, path)
    fc_weight = fc_state.get("fc.weight")
    if fc_weight is None or fc_weight.dim() != 2:
        raise IsdaVizError(f"{path}: 'fc' has no 2-d fc.weight (keys: {_examples(list(fc_state))})")
    file_classes = fc_weight.shape[0]
    if num_classes is not None and num_classes != file_classes:
        raise IsdaVizError(f"{path} classifies {file_classes} classes, not {num_classes}")
    guess = guess_public_arch(features_state)
    hint = f"the file looks like {guess}" if guess and guess != spec.name else ""
    net = spec.build()
    full_layer = FullLayer(net.feature_num, file_classes)
    load_strict(net, features_state, f"{path}: state_dict for {spec.name}", hint)
    load_strict(full_layer, fc_state, f"{path}: fc for {spec.name}", hint)
    model = PublicModel(net, full_layer).eval().requires_grad_(False)
    covariance, mean, count = _public_statistics(ckpt.get("isda_criterion") if isinstance(ckpt, Mapping) else None,
                                                 file_classes, model.feature_dim, path)
    dataset, class_names = public_dataset(file_classes)
    epoch, best_acc = (ckpt.get("epoch"), ckpt.get("best_acc")) if isinstance(ckpt, Mapping) else (None, None)
    return PublicCheckpoint(
        path=path, arch=spec.name, model=model, num_classes=file_classes, dataset=dataset, class_names=class_names,
        class_covariance=covariance, class_mean=mean, class_count=count,
        epoch=int(epoch) if isinstance(epoch, (int, float)) else None,
        best_acc=float(best_acc) if isinstance(best_acc, (int, float, torch.Tensor)) else None)


# ---------------------------------------------------------------- torchvision classifiers

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


def load_torchvision_classifier(path, name: str, num_classes: int | None = None,
                                weights: WeightsFile | None = None) -> HookedTorchvisionClassifier:
    """`torchvision.models.<name>(weights=None, num_classes=C)` with the weights in `path`, in eval mode.

    `path`: a plain state dict (torch or `.safetensors`), or a dict holding one under `state_dict`
    or `model` (e.g. a checkpoint of the public ImageNet DDP script); `module.` prefixes are dropped.
    `C` is the row count of the final linear layer's weight in the file; a `num_classes` that
    differs is an error. `weights`: the file already read by `read_weights_file` (which also
    gives its class statistics, if any).
    """
    path = Path(path)
    builder = _torchvision_builder(name)
    state = (weights or read_weights_file(path, f"torchvision {name} weights")).state
    fc_name = _last_linear(_probe(builder), name)
    fc_weight = state.get(f"{fc_name}.weight")
    if fc_weight is None or fc_weight.dim() != 2:
        raise IsdaVizError(f"{path} has no {fc_name}.weight, the final layer of torchvision {name}; "
                           f"is it a {name}? (keys: {_examples(list(state))})")
    if num_classes is not None and num_classes != fc_weight.shape[0]:
        raise IsdaVizError(f"{path} classifies {fc_weight.shape[0]} classes, not {num_classes}")
    net = builder(weights=None, num_classes=fc_weight.shape[0])
    load_strict(net, state, f"{path}: torchvision {name} weights")
    return HookedTorchvisionClassifier(net, name).eval().requires_grad_(False)


# ---------------------------------------------------------------- weights files and the public ImageNet checkpoint

IMAGENET_CRITERION_KEY = "criterion_isda"
"""Where the public ImageNet `imagenet_DDP.py` pickles its `ISDA_imagenet.ISDALoss` (beside `epoch`,
`state_dict` (DDP: `module.` keys), `best_acc1`, `optimizer`)."""


@dataclass
class WeightsFile:
    """A classifier's weights as users hold them: a bare state dict, or a training checkpoint holding one.

    `state`: the state dict, `module.` prefixes dropped. `criterion`: the pickled loss of the
    public ImageNet DDP script (`criterion_isda`, an inert `PickledObject`) or None. `epoch` and
    `best_acc` (top-1 %, the script's `best_acc1`) when the file records them.
    """

    path: Path
    state: OrderedDict
    criterion: PickledObject | None = None
    epoch: int | None = None
    best_acc: float | None = None

    def estimator_state(self, num_classes: int, feature_dim: int) -> dict | None:
        """The pickled loss's statistics as `CovarianceEstimator.state_dict()`, or None when it has none.

        The public ImageNet `EstimatorCV` keeps a diagonal `CoVariance (C, A)` (population variances),
        `Ave (C, A)` and `Amount (C,)` (features seen over all epochs); a full `(C, A, A)` is read too.
        `m2 = Σ · n`, float64. Shapes other than the model's are a one-line error.
        """
        estimator = getattr(self.criterion, "estimator", None)
        if not isinstance(estimator, PickledObject):
            return None
        c, a = num_classes, feature_dim
        covariance, mean, count = (getattr(estimator, k, None) for k in ("CoVariance", "Ave", "Amount"))
        for name, value, shapes in (("CoVariance", covariance, ((c, a), (c, a, a))), ("Ave", mean, ((c, a),)),
                                    ("Amount", count, ((c,),))):
            if not isinstance(value, torch.Tensor) or tuple(value.shape) not in shapes:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise IsdaVizError(f"{self.path}: {IMAGENET_CRITERION_KEY}.estimator.{name} should be a tensor of "
                                   f"shape {' or '.join(map(str, shapes))} for this model, found {got}")
        count = count.to(torch.float64)
        covariance = covariance.to(torch.float64)
        scale = count.view(-1, *[1] * (covariance.dim() - 1))
        return {"num_features": a, "num_classes": c, "diagonal": covariance.dim() == 2,
                "m2": covariance * scale, "mean64": mean.to(torch.float64), "count": count}


def _number(value) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return float(value) if isinstance(value, (int, float)) else None


def read_weights_file(path, what: str = "weights") -> WeightsFile:
    """A bare state dict (torch or `.safetensors`) or a checkpoint holding one under `state_dict` or `model`.

    Read without running code the file carries (`load_torch_file`). A checkpoint of the public
    CIFAR code (which needs its own `--classifier-arch`) and a file without a state dict are
    one-line errors.
    """
    path = Path(path)
    obj = load_torch_file(path, what)
    if is_public_isda_checkpoint(obj):
        guess = guess_public_arch(strip_module_prefix(obj["state_dict"]))
        raise IsdaVizError(f"{path} is a checkpoint of the public ISDA CIFAR code, not {what}; "
                           f"use --classifier-arch {guess or 'NAME (resnet110, wrn28_10, ...)'}")
    state = obj if _is_tensor_mapping(obj) else next(
        (obj[k] for k in ("state_dict", "model") if isinstance(obj, Mapping) and _is_tensor_mapping(obj.get(k))),
        None)
    if state is None:
        held = ", ".join(sorted(map(str, obj))[:6]) if isinstance(obj, Mapping) else type(obj).__name__
        raise IsdaVizError(f"{path} holds no state dict (a dict of tensors, or one under 'state_dict' or 'model'); "
                           f"found {held}")
    meta = obj if state is not obj else {}
    criterion = meta.get(IMAGENET_CRITERION_KEY)
    epoch = _number(meta.get("epoch"))
    return WeightsFile(path=path, state=strip_module_prefix(state),
                       criterion=criterion if isinstance(criterion, PickledObject) else None,
                       epoch=None if epoch is None else int(epoch),
                       best_acc=_number(meta.get("best_acc1", meta.get("best_prec1"))))
