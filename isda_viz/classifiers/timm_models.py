"""Classifiers built by timm (`--classifier-arch timm:NAME`), with the user's weights.

timm is optional (`pip install 'isda-viz[timm]'`) and imported only here, when a timm classifier
is asked for. The network is `timm.create_model(NAME, pretrained=False, num_classes=C)`, C the
row count of the weights' final layer, loaded strictly; nothing is downloaded. Its features are
timm's own `forward_head(forward_features(x), pre_logits=True)`, its final layer
`get_classifier()` (which must be an `nn.Linear`: ISDA augments the input of a linear layer), and
its input size, mean and std come from the model's `pretrained_cfg`.

The weights are a file (a state dict saved with torch, or `.safetensors`; a dict holding one under
`state_dict` or `model` too) or a local Hugging Face-style folder as timm's `push_to_hub` writes
it: `config.json` (`architecture`, `num_classes`, optional `model_args` and `pretrained_cfg`,
whose values override the model's defaults) beside `model.safetensors` or `pytorch_model.bin`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from isda_viz.classifiers.foreign import load_strict, read_weights_file
from isda_viz.classifiers.registry import (
    ClassifierWeights,
    ReadmeRow,
    register_classifier_family,
)
from isda_viz.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from isda_viz.errors import IsdaVizError
from isda_viz.readers import MAX_CLASSES, Fields, check_class_names, check_network_size, read_json

TIMM_EXTRA = "pip install 'isda-viz[timm]'"
HF_CONFIG = "config.json"
MAX_TIMM_INPUT = 4096            # pixels per side of a timm model's input
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
"""The weights file of a Hugging Face-style folder, in the order looked for."""


def import_timm():
    """The timm module, or a one-line `IsdaVizError` naming the extra that installs it."""
    try:
        import timm
    except ImportError:
        raise IsdaVizError(f"--classifier-arch timm:NAME needs the timm package: {TIMM_EXTRA}") from None
    return timm


def read_hf_folder(folder: Path) -> tuple[Path, dict]:
    """`(weights file, config)` of a Hugging Face-style timm folder; one-line errors for what is missing."""
    config_file = folder / HF_CONFIG
    if not config_file.is_file():
        raise IsdaVizError(f"--classifier {folder} is a folder without {HF_CONFIG}: give a weights file, or a "
                           f"Hugging Face-style folder ({HF_CONFIG} + {' or '.join(HF_WEIGHTS)})")
    config = read_timm_config(config_file)
    weights = next((folder / f for f in HF_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        raise IsdaVizError(f"{folder} holds {HF_CONFIG} but no weights file ({' or '.join(HF_WEIGHTS)})")
    return weights, config


# model_args a config.json may not set: isda-viz sets the class count, never loads or downloads through timm, and
# builds on the CPU
_RESERVED_MODEL_ARGS = ("num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                        "cache_dir", "device", "dtype", "features_only", "scriptable", "exportable", "no_jit")
_PREPROCESSING = ("input_size", "mean", "std", "crop_pct", "interpolation")   # pretrained_cfg keys isda-viz uses


def read_timm_config(path: Path) -> dict:
    """A Hugging Face-style timm folder's `config.json`, checked as it is read (at most 1 MB of strict JSON): an
    optional `architecture` string, `num_classes` 1-100,000, `model_args` an object of plain values (numbers,
    strings, true/false, lists of them) without the keys isda-viz sets itself, `pretrained_cfg` an object whose
    preprocessing keys (`check_preprocessing`) are kept, `label_names` distinct names. `IsdaVizError` otherwise."""
    fields = Fields(read_json(path, "timm config", limit=1 << 20), f"the timm config {path}")
    config = {"architecture": fields.text("architecture", default=None, max_length=200),
              "num_classes": fields.integer("num_classes", 1, MAX_CLASSES, default=None)}
    model_args = fields.mapping("model_args", default=None)
    if model_args is not None:
        for key, value in model_args.data.items():
            if key in _RESERVED_MODEL_ARGS:
                model_args.fail(key, "is set by isda-viz, not by a config.json")
            plain = (int, float, str, bool)
            if not (value is None or _is_plain(value, plain) or
                    (isinstance(value, list) and len(value) <= 64 and all(_is_plain(v, plain) for v in value))):
                model_args.fail(key, "must be a number, a string, true/false or a short list of them")
        config["model_args"] = dict(model_args.data)
    pretrained = fields.mapping("pretrained_cfg", default=None)
    if pretrained is not None:
        kept = {k: v for k, v in pretrained.data.items() if k in _PREPROCESSING}
        check_preprocessing(kept, f"{fields.where}: pretrained_cfg")
        config["pretrained_cfg"] = kept
    if fields.data.get("label_names") is not None:
        config["label_names"] = check_class_names(fields.data["label_names"], f"{fields.where}: label_names")
    return config


def _is_plain(value, kinds) -> bool:
    return isinstance(value, kinds) and not (isinstance(value, float) and not math.isfinite(value)) and \
        not (isinstance(value, str) and len(value) > 200)


def check_preprocessing(cfg: dict, where: str) -> dict:
    """timm preprocessing settings (`pretrained_cfg`'s `input_size`, `mean`, `std`) checked: `input_size`
    [channels 1-4, H, W] with H = W in 8-`MAX_TIMM_INPUT`, `mean`/`std` one finite number per channel, std > 0."""
    fields = Fields(cfg, where, "an object")
    channels = 3
    if "input_size" in cfg:
        size = fields.items("input_size", int, length=3)
        if not 1 <= size[0] <= 4 or not all(8 <= v <= MAX_TIMM_INPUT for v in size[1:]):
            fields.fail("input_size", f"must be [channels 1-4, height, width] with sides 8-{MAX_TIMM_INPUT}, "
                                      f"not {size}")
        channels = size[0]
    for key in ("mean", "std"):
        if key in cfg:
            values = fields.items(key, (int, float))
            if len(values) != channels or (key == "std" and any(v <= 0 for v in values)):
                fields.fail(key, f"must be {channels} finite numbers{' > 0' if key == 'std' else ''}, not {values}")
    return cfg


def _create(timm, name: str, **kwargs) -> nn.Module:
    if kwargs:  # a config's widths are checked on the meta device before any weight is allocated
        check_network_size(lambda: timm.create_model(name, pretrained=False, **kwargs), f"timm {name} with {kwargs}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise IsdaVizError(f"timm cannot build {name} with {kwargs or 'its defaults'} "
                           f"({type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''})"
                           ) from None


def _classifier_name(net: nn.Module, name: str) -> str:
    """The qualified module name of `net.get_classifier()` (e.g. `fc`, `head`, `head.fc`)."""
    head = net.get_classifier()
    if not isinstance(head, nn.Linear):
        raise IsdaVizError(f"timm {name}'s final layer (get_classifier()) is a {type(head).__name__}, not an "
                           "nn.Linear; ISDA augments the features a linear layer classifies")
    return next(n for n, m in net.named_modules() if m is head)


class TimmClassifier(nn.Module):
    """A timm network with isda-viz's model shape.

    `features(x) (N, A)` = `forward_head(forward_features(x), pre_logits=True)`; `fc` =
    `get_classifier()`, `nn.Linear(A, C)`; `forward(x)` = the network's logits `(N, C)`. `mean`,
    `std`, `input_size`, `channels` from `pretrained_cfg`; `label_names` the class names a
    Hugging Face-style folder's `config.json` gives (None without).
    """

    def __init__(self, net: nn.Module, name: str, label_names: list[str] | None = None):
        super().__init__()
        self.net = net
        self.name = name
        self.label_names = label_names
        _classifier_name(net, name)
        self.fc = net.get_classifier()
        self.feature_dim = self.fc.in_features
        self.num_classes = self.fc.out_features
        cfg = getattr(net, "pretrained_cfg", None) or {}
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(cfg).items() if k in _PREPROCESSING}
        check_preprocessing(cfg, f"timm {name}'s pretrained_cfg")
        channels, height, width = cfg.get("input_size", (3, 224, 224))
        if height != width:
            raise IsdaVizError(f"timm {name} takes {height}x{width} inputs; isda-viz handles square inputs only")
        self.channels, self.input_size = int(channels), int(height)
        self.mean = [float(v) for v in cfg.get("mean", IMAGENET_MEAN)]
        self.std = [float(v) for v in cfg.get("std", IMAGENET_STD)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_classifier_family(
    "timm", prefix="timm", names=("timm:NAME",), reads_folders=True, order=120,
    summary=f"timm weights: a file or a Hugging Face-style folder; needs {TIMM_EXTRA}",
    rows=(ReadmeRow("`timm:NAME` (any timm model whose final layer is linear)",
                    "timm weights: a file, or a Hugging Face-style folder (`config.json` + `model.safetensors`); "
                    f"needs `{TIMM_EXTRA}`",
                    "timm's `num_features` (768 for convnext_tiny)",
                    "isda-viz augment --image dog.jpg --classifier ~/convnext_tiny/ --classifier-arch "
                    "timm:convnext_tiny --generator biggan-deep-128 --out out/dog"),))
def load_timm_classifier(path, name: str, num_classes: int | None = None) -> ClassifierWeights:
    """timm's `name` with the weights at `path` (a file, or a Hugging Face-style folder), in eval mode
    (a `TimmClassifier`).

    `ClassifierWeights.path` is the weights file itself, also inside a folder. A folder's `config.json` must name the same `architecture`; its `model_args`
    go to `create_model`, its `pretrained_cfg` overrides the model's preprocessing and its
    `label_names` (one per class) become the classifier's `label_names`.
    """
    timm = import_timm()
    path = Path(path)
    config = {}
    if path.is_dir():
        path, config = read_hf_folder(path)
        architecture = config.get("architecture")
        if architecture is not None and architecture != name:
            raise IsdaVizError(f"{path.parent}/{HF_CONFIG} is a timm {architecture}, not {name}; "
                               f"use --classifier-arch timm:{architecture}")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:5]}*")[:6]
        raise IsdaVizError(f"timm has no model '{name}'" + (f" (e.g. {', '.join(close)})" if close else ""))
    model_args = dict(config.get("model_args") or {})
    overlay = {"pretrained_cfg_overlay": dict(config["pretrained_cfg"])} if config.get("pretrained_cfg") else {}
    weights = read_weights_file(path, f"timm {name} weights")
    head_name = _classifier_name(_create(timm, name, **model_args), name)
    head_weight = weights.state.get(f"{head_name}.weight")
    if head_weight is None or head_weight.dim() != 2:
        raise IsdaVizError(f"{path} has no {head_name}.weight, the final layer of timm {name}; is it a {name}? "
                           f"(keys: {', '.join(list(weights.state)[:3])}, ...)")
    if num_classes is not None and num_classes != head_weight.shape[0]:
        raise IsdaVizError(f"{path} classifies {head_weight.shape[0]} classes, not {num_classes}")
    net = _create(timm, name, num_classes=head_weight.shape[0], **model_args, **overlay)
    load_strict(net, weights.state, f"{path}: timm {name} weights")
    labels = config.get("label_names")
    if labels is not None and len(labels) != head_weight.shape[0]:
        raise IsdaVizError(f"{path.parent / HF_CONFIG}: label_names names {len(labels)} classes, but {path} "
                           f"classifies {head_weight.shape[0]}")
    return weights.classifier(TimmClassifier(net, name, labels).eval().requires_grad_(False), f"timm:{name}")
