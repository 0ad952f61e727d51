"""A trained classifier, frozen, with what it takes to feed it; loading it; its per-class feature statistics.

`Classifier` wraps a network that has `features(x) -> (N, A)` and a linear
`fc` (every model of `isda_viz.models`), together with its class names and
input normalisation. Its methods take images as the user holds them, uint8
`(N, C, H, W)` in [0, 255] or float in [0, 1] at the classifier's size, and
normalise them themselves; `model` takes the normalised input (and keeps its
gradients: the inverter differentiates through `model.features`).

`load_classifier(spec, device, arch)` is the one entry point for classifier
weights: a run directory written by `isda-viz train` (arch None), a checkpoint
of the public ISDA CIFAR code (`arch` resnet32, resnet110, wrn28_10, ...) or a
torchvision weights file (`arch` "torchvision:NAME"); the foreign formats are
read by `isda_viz.foreign` without running code the files carry.

`class_statistics` gives the per-class feature means and covariances
(Eqs. 1-3) the augmentation samples from: the classifier's own (ISDA runs,
public checkpoints) or one streamed pass over the training split under a data
root, for the requested classes only, cached in `Classifier.cache_dir` and keyed
by the weights' hash, the classes and each class's images.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import CACHE_ROOT, read_json_or_lines
from .errors import IsdaVizError
from .estimator import CovarianceEstimator
from .models import build_model
from .runs import CHECKPOINT, file_sha256, load_checkpoint, resolve_run_dir, save_atomic, write_json_atomic

CLASSIFIER_CACHE = CACHE_ROOT / "classifiers"
"""Caches of classifiers given as weights files, one folder per file's sha256 (`Classifier.cache_dir`)."""
STATISTICS_DIR = "class-statistics"
"""Folder in `Classifier.cache_dir` holding computed class statistics (`.pt`, with a `.json` key beside)."""
PUBLIC_ARCHS = ("resnet32", "resnet110", "wrn28_10")
ARCH_HELP = "resnet32|resnet110|wrn28_10 (public ISDA CIFAR checkpoints) or torchvision:NAME"


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

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
        from .data import normalize

        return normalize(x, self.mean, self.std)

    def fit_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] images `(N, C', H, W)` of any size → the classifier's channels and size.

        Images already of the classifier's shape are returned as they are; others go to the
        classifier's device as [0, 1] floats, resized (bilinear, antialiased) and channel-mapped
        like generator output (`isda_viz.adapter`).
        """
        from .adapter import map_channels, resize

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
    return names


def _dataset_class_names(dataset: str) -> list[str]:
    from .data import SPECS

    return list(SPECS[dataset].class_names)


def _class_names_for(num_classes: int, class_names, data_root, dataset: str | None, path: Path,
                     log: Callable[[str], None]) -> list[str]:
    """The class names of a weights file: `--class-names`, else the data root's, else indices for 1000 classes."""
    from .data import folder_class_names

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
    otherwise a weights file, `arch` saying what it holds: `resnet32`, `resnet110`, `wrn28_10` (or
    another `public_models.parse_public_arch` name) for a checkpoint of the public ISDA CIFAR code,
    whose class statistics become `estimator`; `torchvision:NAME` for torchvision weights
    (ImageNet normalisation and input size). `class_names`: a file or list naming a weights
    file's classes (default: from `data_root`, whose layout also sets `config["dataset"]`).
    `log` gets notes (default: stderr). Anything that does not fit is a one-line `IsdaVizError`.
    """
    log = log or _note
    path = Path(str(spec)).expanduser()
    if arch is None:
        run_dir = resolve_run_dir(path)
        if path.is_file() and path.name != CHECKPOINT:
            raise IsdaVizError(f"--classifier {path} is a weights file: say what it holds with --classifier-arch "
                               f"{ARCH_HELP}")
        if not (run_dir / CHECKPOINT).is_file():
            what = "does not exist" if not run_dir.exists() else f"holds no {CHECKPOINT}"
            raise IsdaVizError(f"no classifier run at {run_dir}: it {what} (give a RUN_DIR written by `isda-viz "
                               f"train`, or a weights FILE with --classifier-arch {ARCH_HELP})")
        return _load_run(run_dir, device)
    if path.is_dir() or path.name == CHECKPOINT and (path.parent / "config.json").is_file():
        raise IsdaVizError(f"{path} is an isda-viz run, which names its own architecture; leave out --classifier-arch")
    if not path.is_file():
        raise IsdaVizError(f"--classifier weights file not found: {path}")
    if data_root is not None and not Path(data_root).expanduser().is_dir():
        raise IsdaVizError(f"--data-root {data_root} does not exist")
    if arch.startswith("torchvision:"):
        return _load_torchvision(path, arch.split(":", 1)[1], class_names, data_root, device, log)
    from .public_models import parse_public_arch

    try:
        parse_public_arch(arch)
    except IsdaVizError:
        raise IsdaVizError(f"unknown --classifier-arch '{arch}'; use {ARCH_HELP}") from None
    return _load_public(path, arch, class_names, data_root, device, log)


def _weights_cache(path: Path) -> tuple[str, Path]:
    sha = file_sha256(path)
    return sha, CLASSIFIER_CACHE / sha


def _load_public(path: Path, arch: str, class_names, data_root, device, log) -> Classifier:
    """A checkpoint of the public ISDA CIFAR code; its `isda_criterion` statistics become the estimator."""
    from .foreign import read_public_isda_checkpoint

    ck = read_public_isda_checkpoint(path, arch)
    names = read_class_names(class_names) if class_names is not None else ck.class_names
    if len(names) != ck.num_classes:
        raise IsdaVizError(f"--class-names names {len(names)} classes, but {path} classifies {ck.num_classes}")
    state = ck.estimator_state()
    sha, cache = _weights_cache(path)
    return Classifier(
        ck.model.to(device), names, ck.mean, ck.std, ck.channels, ck.image_size,
        estimator=CovarianceEstimator.from_state_dict(state, device=device) if state else None,
        config={"dataset": ck.dataset, "arch": arch, "data_root": None if data_root is None else str(data_root),
                "format": "public-isda"},
        source=path, cache_dir=cache, fingerprint=sha)


def _load_torchvision(path: Path, name: str, class_names, data_root, device, log) -> Classifier:
    """A torchvision network with the weights in `path`; features from a hook on its final linear layer."""
    from .data import detect_dataset
    from .foreign import load_torchvision_classifier

    model = load_torchvision_classifier(path, name)
    dataset = detect_dataset(data_root) if data_root is not None else None
    if data_root is not None and dataset is None:
        raise IsdaVizError(f"--data-root {data_root} holds neither a train/ folder of class folders nor "
                           "torchvision's CIFAR or Fashion-MNIST files")
    names = _class_names_for(model.num_classes, class_names, data_root, dataset, path, log)
    sha, cache = _weights_cache(path)
    return Classifier(
        model.to(device), names, list(model.mean), list(model.std), 3, model.input_size,
        config={"dataset": dataset, "arch": f"torchvision:{name}",
                "data_root": None if data_root is None else str(data_root), "format": "torchvision"},
        source=path, cache_dir=cache, fingerprint=sha)


def _load_run(run_dir: Path, device) -> Classifier:
    """A classifier from an isda-viz run directory (weights may be stored as float16: read as float32)."""
    ckpt = load_checkpoint(run_dir / CHECKPOINT, "classifier checkpoint")
    try:
        cfg = ckpt["config"]
        model = build_model(cfg["arch"], len(ckpt["class_names"]), ckpt["input"]["channels"])
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()})
    except (KeyError, RuntimeError, TypeError) as e:
        raise IsdaVizError(f"{run_dir / CHECKPOINT} is not a classifier checkpoint of isda-viz ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:120]})") from None
    model.to(device).eval().requires_grad_(False)
    est = ckpt.get("estimator")
    return Classifier(
        model, list(ckpt["class_names"]), list(ckpt["normalization"]["mean"]), list(ckpt["normalization"]["std"]),
        ckpt["input"]["channels"], ckpt["input"]["size"],
        estimator=CovarianceEstimator.from_state_dict(est, device=device) if est else None,
        config=cfg, source=run_dir, cache_dir=run_dir, fingerprint=file_sha256(run_dir / CHECKPOINT))


# ---------------------------------------------------------------- class statistics


@dataclass
class ClassStatistics:
    """Per-class feature statistics (Eqs. 1-3) of some of a classifier's classes.

    `estimator` has `len(classes)` slots: slot i holds class `classes[i]` (every class, in order,
    for a classifier's own statistics).
    """

    estimator: CovarianceEstimator
    classes: list[int]

    def slots(self, labels: torch.Tensor) -> torch.Tensor:
        """Class indices `(N,)` → the estimator's slots `(N,)`, on `labels`' device."""
        position = {c: i for i, c in enumerate(self.classes)}
        missing = sorted({int(c) for c in labels.tolist()} - set(position))
        if missing:
            raise IsdaVizError(f"no class statistics for class {missing[0]} (computed for {self.classes[:10]})")
        return torch.tensor([position[int(c)] for c in labels.tolist()], dtype=torch.long, device=labels.device)

    def covariance(self, c: int) -> torch.Tensor:
        """Σ_c, `(A, A)` (or its diagonal `(A,)`) float32."""
        return self.estimator.covariance[self.classes.index(c)]


@dataclass
class StatisticsData:
    """The training images of some classes, and what identifies each class's images (for the cache)."""

    images: object                    # a Dataset of (uint8 (C, H, W), class index)
    class_fingerprints: dict[int, str]
    description: str


def statistics_data(classifier: Classifier, data_root, classes: list[int]) -> StatisticsData:
    """The training images of `classes` under `data_root` (default: where the classifier was trained).

    Layouts: a `train/` of class folders named like the classifier's classes (read with the
    evaluation crop at the classifier's size), or torchvision's CIFAR / Fashion-MNIST files
    (only the classifier's own training subset for isda-viz runs). Only files of the wanted classes
    are listed or read. A class's fingerprint hashes its files' names, sizes and modification times, or its pixels.
    """
    from .data import FOLDER_DATASETS, FileImages, TensorImages, detect_dataset, image_files, load_split

    root = data_root or classifier.config.get("data_root")
    dataset = classifier.dataset if data_root is None or classifier.config.get("format") is None else None
    if dataset is None and root is not None:
        dataset = detect_dataset(root)
    if dataset is None:
        raise IsdaVizError(f"the classifier in {classifier.source} has no class statistics of its own: give "
                           "--data-root, its training data (a train/ folder of class folders, or torchvision's "
                           "CIFAR or Fashion-MNIST files), for one pass over the classes shown")
    if dataset in FOLDER_DATASETS:
        train = Path(root).expanduser() / "train"
        paths, labels, fingerprints = [], [], {}
        for c in classes:
            folder = train / classifier.class_names[c]
            files = image_files(folder) if folder.is_dir() else []
            if not files:
                raise IsdaVizError(f"no training images of class {c} ({classifier.class_names[c]}): "
                                   f"{folder} is missing or holds no image files")
            digest = hashlib.sha256()
            for f in files:
                stat = f.stat()
                digest.update(f"{f.relative_to(folder)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
            paths += files
            labels += [c] * len(files)
            fingerprints[c] = digest.hexdigest()
        return StatisticsData(FileImages(paths, labels, classifier.image_size, classifier.channels), fingerprints,
                              str(train))
    split = load_split(dataset, True, root, classifier.config.get("limit_train"))
    if len(split.classes) != classifier.num_classes:
        raise IsdaVizError(f"{dataset} has {len(split.classes)} classes, the classifier in {classifier.source} "
                           f"{classifier.num_classes}; give the --data-root it was trained on")
    keep = torch.isin(split.labels, torch.tensor(classes))
    images, labels = split.images[keep], split.labels[keep]
    fingerprints = {c: hashlib.sha256(images[labels == c].contiguous().numpy().tobytes()).hexdigest()
                    for c in classes}
    return StatisticsData(TensorImages(images, labels, split.classes), fingerprints, f"{dataset} training split")


def class_statistics(classifier: Classifier, data_root=None, classes: Sequence[int] | None = None,
                     covariance: str = "full", progress: bool = True, batch_size: int | None = None,
                     workers: int | None = None) -> ClassStatistics:
    """Per-class feature means and covariances (Eqs. 1-3) of `classes` (default: all).

    The classifier's own statistics when it has them (ISDA runs, public ISDA checkpoints), whatever
    `covariance` says. Otherwise one streamed pass over the training images of `classes` only
    (`statistics_data`), float64 accumulation, `covariance` "full" (`(A, A)` per class: 32 MiB for
    A = 2048) or "diagonal"; the result is cached in `classifier.cache_dir` and reused by any later
    call for the same weights and covariance type whose classes it covers with the same images.
    `workers`: DataLoader processes for image files (default: up to 8 for more than 2,000 files).
    """
    if covariance not in ("full", "diagonal"):
        raise IsdaVizError(f"--covariance must be full or diagonal, not {covariance}")
    if classifier.estimator is not None:
        return ClassStatistics(classifier.estimator, list(range(classifier.num_classes)))
    classes = sorted({int(c) for c in (range(classifier.num_classes) if classes is None else classes)})
    if not classes or classes[0] < 0 or classes[-1] >= classifier.num_classes:
        raise IsdaVizError(f"class statistics asked for classes {classes[:5]}, not classes of the classifier")
    data = statistics_data(classifier, data_root, classes)
    cached = _cached_statistics(classifier, data, classes, covariance)
    if cached is not None:
        return cached
    estimator = _statistics_pass(classifier, data, classes, covariance == "diagonal", progress, batch_size, workers)
    _save_statistics(classifier, data, classes, covariance, estimator)
    return ClassStatistics(estimator, classes)


def _statistics_pass(classifier: Classifier, data: StatisticsData, classes: list[int], diagonal: bool,
                     progress: bool, batch_size: int | None, workers: int | None) -> CovarianceEstimator:
    """One pass of `classifier.features` over `data.images`, merged into a float64 estimator slot per class."""
    import os

    from tqdm import tqdm

    from .data import TensorImages, iterate_batches

    device = classifier.device
    batch_size = batch_size or (500 if classifier.image_size <= 64 else 64)
    files = not isinstance(data.images, TensorImages)
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if files and len(data.images) > 2000 else 0
    slot = torch.full((classifier.num_classes,), -1, dtype=torch.long)
    slot[classes] = torch.arange(len(classes))
    estimator = CovarianceEstimator(classifier.feature_dim, len(classes), diagonal=diagonal, device=device)
    with tqdm(total=len(data.images), desc=f"class statistics ({len(classes)} classes)", unit="img",
              disable=not progress, leave=False) as bar:
        for images, labels in iterate_batches(data.images, batch_size, shuffle=False, num_workers=workers):
            estimator.update(classifier.features(classifier.fit_images(images)), slot[labels].to(device))
            bar.update(len(labels))
    return estimator


def _statistics_key(classifier: Classifier, data: StatisticsData, classes: list[int], covariance: str) -> dict:
    return {"weights": classifier.fingerprint, "covariance": covariance, "classes": classes,
            "data": {str(c): data.class_fingerprints[c] for c in classes}}


def _cached_statistics(classifier: Classifier, data: StatisticsData, classes: list[int],
                       covariance: str) -> ClassStatistics | None:
    """Statistics cached for these weights and covariance type whose classes cover `classes` with the same images."""
    if classifier.cache_dir is None or classifier.fingerprint is None:
        return None
    for key_file in sorted((classifier.cache_dir / STATISTICS_DIR).glob(f"{covariance}-*.json")):
        try:
            key = json.loads(key_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if key.get("weights") != classifier.fingerprint:
            continue
        held = {int(c): fp for c, fp in key.get("data", {}).items()}
        if all(held.get(c) == data.class_fingerprints[c] for c in classes):
            state = load_checkpoint(key_file.with_suffix(".pt"), "class statistics cache")
            rows = torch.tensor([key["classes"].index(c) for c in classes])
            state = {**state, "num_classes": len(classes),
                     **{k: state[k][rows] for k in ("m2", "mean64", "count")}}
            return ClassStatistics(CovarianceEstimator.from_state_dict(state, device=classifier.device), classes)
    return None


def _save_statistics(classifier: Classifier, data: StatisticsData, classes: list[int], covariance: str,
                     estimator: CovarianceEstimator) -> None:
    """`<covariance>-<hash of the key>.pt` and its key as `.json` (written last: a key means a complete file)."""
    if classifier.cache_dir is None or classifier.fingerprint is None:
        return
    key = _statistics_key(classifier, data, classes, covariance)
    name = f"{covariance}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"
    folder = classifier.cache_dir / STATISTICS_DIR
    try:
        for old in folder.glob("*.json"):  # statistics of weights this folder no longer holds (a retrained run)
            if json.loads(old.read_text()).get("weights") != classifier.fingerprint:
                old.with_suffix(".pt").unlink(missing_ok=True)
                old.unlink()
        save_atomic(estimator.state_dict(), folder / f"{name}.pt")
        write_json_atomic(key, folder / f"{name}.json")
    except (OSError, json.JSONDecodeError) as e:  # a read-only cache (e.g. installed weights): the pass just is not kept
        _note(f"class statistics not cached in {folder} ({type(e).__name__})")
