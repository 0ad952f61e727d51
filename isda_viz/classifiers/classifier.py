"""A trained classifier, frozen, with what it takes to feed it; loading it; its per-class feature statistics.

`Classifier` wraps a network that has `features(x) -> (N, A)` and a linear
`fc` (every model of `isda_viz.classifiers.networks`), together with its class names and
input normalisation. Its methods take images as the user holds them, uint8
`(N, C, H, W)` in [0, 255] or float in [0, 1] at the classifier's size, and
normalise them themselves; `model` takes the normalised input (and keeps its
gradients: the inverter differentiates through `model.features`).

`load_classifier(spec, device, arch)` is the one entry point for classifier
weights: a run directory written by `isda-viz train` (arch None), or a weights file
of any registered family (`registry`: a checkpoint of the public ISDA CIFAR code, `arch`
resnet110, wrn28_10, ...; torchvision:NAME; isda-imagenet:densenet121; timm:NAME; ...), read by its
family's loader into `registry.ClassifierWeights` without running code the file carries.

`class_statistics` gives the per-class feature means and covariances
(Eqs. 1-3) the augmentation samples from: the classifier's own (ISDA runs,
public checkpoints) or one streamed pass over the training split under a data
root, for the requested classes only, cached in `Classifier.cache_dir` and keyed
by the weights' hash, the classes and each class's images.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from isda_viz.cache import cache_dir
from isda_viz.classifiers.networks import build_model
from isda_viz.classifiers.registry import ClassifierFamily, ClassifierWeights, find_family, known_archs
from isda_viz.classifiers.run_checkpoint import read_run_checkpoint
from isda_viz.data.datasets import SPECS, detect_dataset, folder_class_names, read_json_or_lines
from isda_viz.data.images import map_channels, normalize, resize
from isda_viz.errors import IsdaVizError
from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.runs import CHECKPOINT, file_sha256, non_finite_tensor, resolve_run_dir

CLASSIFIER_CACHE = "classifiers"
"""Caches of classifiers given as weights files (`cache_dir(CLASSIFIER_CACHE)`, under `cache.cache_root()`), one
folder per file's sha256 (`Classifier.cache_dir`)."""
ARCH_HINT = "ARCH (one of the README's table: resnet110, wrn28_10, torchvision:resnet50, timm:NAME, ...)"


@dataclass
class Classifier:
    """A frozen classifier (eval mode, no parameter gradients) and its input convention.

    `model(preprocess(x))` gives logits for `x (N, channels, image_size, image_size)` in [0, 1].
    `source` is where the weights came from (the run directory of an isda-viz run, else the
    weights file); `cache_dir` is where derived data (class statistics, feature indexes) is
    kept (the run directory, else `CLASSIFIER_CACHE/<sha256 of the file>`); `fingerprint` is the
    sha256 of the weights file, so a cache made from other weights is not reused.
    """

    model: torch.nn.Module
    class_names: list[str]
    mean: list[float]
    std: list[float]
    channels: int
    image_size: int
    estimator: CovarianceEstimator | None = None   # ISDA runs: the class covariances of training
    config: dict = field(default_factory=dict)     # how it was trained (dataset, arch, data_root, ...)
    source: Path | None = None
    cache_dir: Path | None = None
    fingerprint: str | None = None

    def __post_init__(self):
        bad = non_finite_tensor(dict(self.model.state_dict()))
        if bad is not None:  # every prediction would be class 0 and every statistic NaN: refuse at the door
            raise IsdaVizError(f"the classifier weights in {self.source} hold non-finite values (inf or NaN) in the "
                               f"tensor {bad}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def computed_on(self) -> dict:
        """`{"device": "cpu" | "cuda" | ..., "dtype": "float32" | ...}`: where and in what precision its features are
        computed. Part of the key of every cache of derived data (class statistics, the audit's feature index): a
        GPU's features differ from the CPU's in the last bits, so a CPU run never reuses a GPU run's cache."""
        dtype = next(self.model.parameters()).dtype
        return {"device": self.device.type, "dtype": str(dtype).removeprefix("torch.")}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def feature_dim(self) -> int:
        """A, the width of the penultimate features."""
        return self.model.feature_dim

    @property
    def dataset(self) -> str | None:
        """The dataset the classifier was trained on, when known."""
        return self.config.get("dataset")

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """`(N, C, H, W)` in [0, 1] at the classifier's size → normalised input (differentiable)."""

        return normalize(x, self.mean, self.std)

    def fit_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] images `(N, C', H, W)` of any size → the classifier's channels and size.

        Images already of the classifier's shape are returned as they are; others go to the
        classifier's device as [0, 1] floats, resized (bilinear, antialiased) and channel-mapped
        like generator output (`isda_viz.inversion.adapter`).
        """

        if images.shape[1:] == (self.channels, self.image_size, self.image_size):
            return images
        x = images.to(self.device)
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return map_channels(resize(x, self.image_size), self.channels)

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 in [0, 255] or float in [0, 1], `(N, C, H, W)` → normalised input on the classifier's device."""
        if images.shape[1:] != (self.channels, self.image_size, self.image_size):
            raise IsdaVizError(f"the classifier in {self.source} takes {self.channels}×{self.image_size}×"
                               f"{self.image_size} images, not {'×'.join(map(str, images.shape[1:]))}")
        x = images.to(self.device)
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        return self.preprocess(x)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features `(N, A)` of `images` (uint8 or [0, 1] floats, `(N, C, H, W)`)."""
        return self.model.features(self._input(images))

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits `(N, num_classes)` of `images` (uint8 or [0, 1] floats, `(N, C, H, W)`)."""
        return self.model(self._input(images))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class indices, int64 `(N,)` on the CPU."""
        return self.logits(images).argmax(1).cpu()

    def class_index(self, name_or_index: str, option: str = "--label") -> int:
        """A class given by index or (case-insensitive) name; `option` names the flag in the error."""
        text = str(name_or_index).strip()
        if text.lstrip("-").isdigit():
            if 0 <= int(text) < self.num_classes:
                return int(text)
        else:
            lowered = [c.lower() for c in self.class_names]
            if text.lower() in lowered:
                return lowered.index(text.lower())
        raise IsdaVizError(f"{option} {text} is not a class of the classifier; its classes are "
                           f"0-{self.num_classes - 1}: " + ", ".join(self.class_names[:20])
                           + ("…" if self.num_classes > 20 else ""))


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def read_class_names(spec) -> list[str]:
    """Class names from a list, or a file: one name per line, a JSON list, or a JSON object of index → name
    (an `imagenet_class_index.json`-style value `[wnid, name]` gives its last item)."""
    if isinstance(spec, (list, tuple)):
        return [str(c) for c in spec]
    path = Path(str(spec)).expanduser()
    data, lines = read_json_or_lines(path, "--class-names")
    if lines is not None:
        names = [line.strip() for line in lines if line.strip()]
    else:
        if isinstance(data, dict) and all(str(k).isdigit() for k in data):
            data = [data[k] for k in sorted(data, key=int)]
            data = [v[-1] if isinstance(v, list) and v else v for v in data]
        if not isinstance(data, list) or not all(isinstance(v, (str, int)) for v in data):
            raise IsdaVizError(f"--class-names {path}: a JSON file must hold a list of names")
        names = [str(v) for v in data]
    if not names:
        raise IsdaVizError(f"--class-names {path} holds no names")
    repeated = [name for i, name in enumerate(names) if name in names[:i]]
    if repeated:
        first = names.index(repeated[0])
        raise IsdaVizError(f"--class-names {path} names {repeated[0]!r} twice (classes {first} and "
                           f"{names.index(repeated[0], first + 1)}); every class needs its own name")
    return names


def _dataset_class_names(dataset: str) -> list[str]:

    return list(SPECS[dataset].class_names)


def _class_names_for(num_classes: int, class_names, data_root, dataset: str | None, path: Path,
                     log: Callable[[str], None]) -> list[str]:
    """The class names of a weights file: `--class-names`, else the data root's, else indices for 1000 classes."""
    if class_names is not None:
        names, where = read_class_names(class_names), "--class-names"
    elif dataset == "folder":
        names, where = folder_class_names(data_root), f"the class folders of {Path(data_root) / 'train'}"
    elif dataset is not None:
        names, where = _dataset_class_names(dataset), f"{dataset} under {data_root}"
    elif num_classes == 1000:
        log("the classifier has 1000 classes and neither --class-names nor --data-root gives their names; "
            "calling them 0-999 (ImageNet's class indices)")
        return [str(i) for i in range(1000)]
    else:
        raise IsdaVizError(f"{path} classifies {num_classes} classes: name them with --class-names FILE (one per "
                           f"line, or a JSON list) or --data-root (a train/ folder of class folders)")
    if len(names) != num_classes:
        raise IsdaVizError(f"{where} names {len(names)} classes, but {path} classifies {num_classes}")
    return names


def load_classifier(spec, device="cpu", arch: str | None = None, class_names=None, data_root=None,
                    log: Callable[[str], None] | None = None) -> Classifier:
    """The classifier named by `spec` on `device`, frozen.

    `spec`: with `arch` None, a run directory written by `isda-viz train` (or its `checkpoint.pt`);
    otherwise a weights file, `arch` saying what it holds: a name of a registered family (`registry.find_family`;
    the README's table lists them): `resnet110`, `wrn28_10`, `densenet_bc100`, ... for a checkpoint of the
    public ISDA CIFAR code, `torchvision:NAME` for torchvision weights (a checkpoint of the public ImageNet
    DDP script too), `isda-imagenet:densenet121` ... `densenet265` for the public ImageNet DenseNets,
    `timm:NAME` for timm weights (a file or a Hugging Face-style folder). Statistics the file holds become
    `estimator`. Weights files may be `.safetensors`. `class_names`: a file or list naming a weights
    file's classes (default: the file's own, else from `data_root`, whose layout also sets `config["dataset"]`).
    `log` gets notes (default: stderr). Anything that does not fit is a one-line `IsdaVizError`.
    """
    log = log or _note
    path = Path(str(spec)).expanduser()
    if arch is None:
        run_dir = resolve_run_dir(path)
        if path.is_file() and path.name != CHECKPOINT:
            raise IsdaVizError(f"--classifier {path} is a weights file: say what it holds with --classifier-arch "
                               f"{ARCH_HINT}")
        if not (run_dir / CHECKPOINT).is_file():
            what = "does not exist" if not run_dir.exists() else f"holds no {CHECKPOINT}"
            raise IsdaVizError(f"no classifier run at {run_dir}: it {what} (give a RUN_DIR written by `isda-viz "
                               f"train`, or a weights FILE with --classifier-arch {ARCH_HINT})")
        return _load_run(run_dir, device)
    family = find_family(arch)
    _check_weights_path(path, arch, family, data_root)
    if family is None:
        raise IsdaVizError(f"unknown --classifier-arch '{arch}'; known: {known_archs()}")
    weights = family.load(path, family.loader_name(arch))
    return _weights_classifier(weights, path, arch, family.format, class_names, data_root, device, log)


def _check_weights_path(path: Path, arch: str, family: ClassifierFamily | None, data_root) -> None:
    """One-line errors for a `--classifier` that cannot be the weights file `arch` names."""
    if family is not None and family.prefix is not None and not family.loader_name(arch):
        raise IsdaVizError(f"--classifier-arch {arch} names no model (e.g. {family.names[0]})")
    if (path / CHECKPOINT).is_file() or path.name == CHECKPOINT and (path.parent / "config.json").is_file():
        raise IsdaVizError(f"{path} is an isda-viz run, which names its own architecture; leave out --classifier-arch")
    if path.is_dir() and not (family is not None and family.reads_folders):
        raise IsdaVizError(f"--classifier {path} is a folder, not a weights file (and holds no isda-viz run); "
                           f"give the weights FILE for --classifier-arch {arch}")
    if not path.exists():
        raise IsdaVizError(f"--classifier weights file not found: {path}")
    if data_root is not None and not Path(data_root).expanduser().is_dir():
        raise IsdaVizError(f"--data-root {data_root} does not exist")


def _weights_cache(path: Path) -> tuple[str, Path]:
    sha = file_sha256(path)
    return sha, cache_dir(CLASSIFIER_CACHE, create=False) / sha  # written (and checked) only when needed


def _weights_classifier(weights: ClassifierWeights, path: Path, arch: str, file_format: str, class_names,
                        data_root, device, log) -> Classifier:
    """The `Classifier` of what a family's loader read from `path` (`--classifier`, a file or a folder): its class
    names (`class_names`, else the file's own, else `data_root`'s), its dataset (the file's, else `data_root`'s),
    its statistics, its cache (keyed by the weights file's sha256)."""
    dataset = weights.dataset
    if dataset is None and data_root is not None:
        dataset = detect_dataset(data_root)
        if dataset is None:
            raise IsdaVizError(f"--data-root {data_root} holds neither a train/ folder of class folders nor "
                               "torchvision's CIFAR or Fashion-MNIST files")
    names = _class_names_for(weights.num_classes, class_names if class_names is not None else weights.class_names,
                             data_root, dataset, path, log)
    state = weights.estimator_state()
    sha, cache = _weights_cache(weights.path)
    return Classifier(
        weights.model.to(device), names, list(weights.mean), list(weights.std), weights.channels,
        weights.image_size, estimator=CovarianceEstimator.from_state_dict(state, device=device) if state else None,
        config={"dataset": dataset, "arch": arch, "data_root": None if data_root is None else str(data_root),
                "format": file_format},
        source=path, cache_dir=cache, fingerprint=sha)


def _load_run(run_dir: Path, device) -> Classifier:
    """A classifier from an isda-viz run directory (weights may be stored as float16: read as float32)."""
    run = read_run_checkpoint(run_dir / CHECKPOINT, device=device)
    try:
        model = build_model(run.arch, len(run.class_names), run.channels)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in run.model.items()})
    except (KeyError, RuntimeError, TypeError, ValueError, IsdaVizError) as e:
        raise IsdaVizError(f"{run.path} is not a classifier checkpoint of isda-viz ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:120]})") from None
    model.to(device).eval().requires_grad_(False)
    return Classifier(model, run.class_names, run.mean, run.std, run.channels, run.image_size,
                      estimator=run.estimator, config=run.config, source=run_dir, cache_dir=run_dir,
                      fingerprint=file_sha256(run.path))


# ---------------------------------------------------------------- class statistics


