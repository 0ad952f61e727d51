"""Classifiers trained elsewhere: checkpoints of the public ISDA CIFAR code, and the weights files others come
in (`read_weights_file`: bare state dicts, `.safetensors`, the public ImageNet DDP checkpoint whose pickled
`ISDA_imagenet.ISDALoss` holds diagonal class statistics).

The readers give `registry.ClassifierWeights`, whose model has isda-viz's model shape: `features(x) (N, A)`,
`fc: nn.Linear(A, C)`, `feature_dim = A`, and `forward(x)` = the logits `(N, C)`, in eval mode on the CPU.
Files are read with `safe_load.load_torch_file`, so no code they carry runs; state dicts are loaded strictly,
after dropping the `module.` prefix `nn.DataParallel` / DDP add to every key. The families of the public
CIFAR code register here (`register_public_family`), since their checkpoints share one reader.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from isda_viz.classifiers.public import (
    PUBLIC_CIFAR_MEAN,
    PUBLIC_CIFAR_STD,
    PUBLIC_FORMAT,
    PUBLIC_INPUT_SIZE,
    FullLayer,
    PublicArch,
    PublicModel,
    guess_public_arch,
    parse_public_arch,
)
from isda_viz.classifiers.registry import ClassifierWeights, register_classifier_family
from isda_viz.classifiers.safe_load import SAFETENSORS_SUFFIX, PickledObject, load_torch_file
from isda_viz.data.datasets import CIFAR10_CLASSES, CIFAR100_CLASSES
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


def read_public_isda_checkpoint(path, arch: str, num_classes: int | None = None) -> ClassifierWeights:
    """Read `checkpoint.pth.tar` / `model_best.pth.tar` of the public ISDA CIFAR `train.py`: the loader every
    family of the public code registers (`register_public_family`).

    Its normalisation is `PUBLIC_CIFAR_MEAN/STD` at 32 px; its class statistics are the pickled
    `isda_criterion.estimator`'s (`CoVariance (C, A, A)`, `Ave`, `Amount`), float64; its dataset and class names
    are CIFAR-10/100's from the class count (`public_dataset`).

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
    return ClassifierWeights(
        path=path, arch=spec.name, model=model, mean=list(PUBLIC_CIFAR_MEAN), std=list(PUBLIC_CIFAR_STD),
        image_size=PUBLIC_INPUT_SIZE, dataset=dataset, class_names=class_names,
        class_covariance=covariance, class_mean=mean, class_count=count,
        epoch=int(epoch) if isinstance(epoch, (int, float)) else None,
        best_acc=float(best_acc) if isinstance(best_acc, (int, float, torch.Tensor)) else None)


def register_public_family(name: str, pattern: str, *, names, summary: str, forms=(), rows=(), guess=None,
                           order: int = 100):
    """Decorator registering a family of the public CIFAR code (`registry.register_classifier_family`).

    The decorated `network(m) -> PublicArch` spells the network a name matching `pattern` (`m` its `re.Match`)
    builds; the family's files are read by `read_public_isda_checkpoint`. Returns `network` unchanged.
    """
    def register(network):
        register_classifier_family(name, pattern=pattern, names=names, summary=summary, forms=forms, rows=rows,
                                   format=PUBLIC_FORMAT, network=network, guess=guess, order=order)(
            read_public_isda_checkpoint)
        return network

    return register


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

    def statistics(self, num_classes: int, feature_dim: int):
        """`(covariance, mean, count)` float64 of the pickled loss, or `(None, None, None)` when it has none.

        The public ImageNet `EstimatorCV` keeps a diagonal `CoVariance (C, A)` (population variances),
        `Ave (C, A)` and `Amount (C,)` (features seen over all epochs); a full `(C, A, A)` is read too.
        Shapes other than the model's are a one-line error.
        """
        estimator = getattr(self.criterion, "estimator", None)
        if not isinstance(estimator, PickledObject):
            return None, None, None
        c, a = num_classes, feature_dim
        covariance, mean, count = (getattr(estimator, k, None) for k in ("CoVariance", "Ave", "Amount"))
        for name, value, shapes in (("CoVariance", covariance, ((c, a), (c, a, a))), ("Ave", mean, ((c, a),)),
                                    ("Amount", count, ((c,),))):
            if not isinstance(value, torch.Tensor) or tuple(value.shape) not in shapes:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise IsdaVizError(f"{self.path}: {IMAGENET_CRITERION_KEY}.estimator.{name} should be a tensor of "
                                   f"shape {' or '.join(map(str, shapes))} for this model, found {got}")
        return covariance.to(torch.float64), mean.to(torch.float64), count.to(torch.float64)

    def classifier(self, model: nn.Module, arch: str) -> ClassifierWeights:
        """`ClassifierWeights` of `model` (with its `mean`, `std`, `input_size`, optional `channels` and
        `label_names`) built from this file: its class statistics, epoch and accuracy."""
        covariance, mean, count = self.statistics(model.fc.out_features, model.feature_dim)
        return ClassifierWeights(
            path=self.path, arch=arch, model=model, mean=list(model.mean), std=list(model.std),
            image_size=model.input_size, channels=getattr(model, "channels", 3),
            class_names=getattr(model, "label_names", None), class_covariance=covariance, class_mean=mean,
            class_count=count, epoch=self.epoch, best_acc=self.best_acc)


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
