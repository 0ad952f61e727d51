"""Class statistics on demand: the per-class mean and covariance of a classifier's features (Eqs. 1-3).

For classifiers that carry no estimator of their own (torchvision, timm, public
weights without `CoVariance`): one streamed pass over the training images of the
classes asked for, float64, full or diagonal, cached by the weights' sha256 and
a fingerprint of the images.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from isda_viz.classifiers.classifier import Classifier, _note
from isda_viz.classifiers.covariance_file import read_covariance_file
from isda_viz.data.batches import iterate_batches
from isda_viz.data.datasets import FOLDER_DATASETS, TensorImages, detect_dataset, load_split
from isda_viz.data.images import FileImages, image_files
from isda_viz.errors import IsdaVizError
from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.readers import Fields, read_json
from isda_viz.runs import load_checkpoint, save_atomic, write_json_atomic

STATISTICS_DIR = "class-statistics"
"""Folder in `Classifier.cache_dir` holding computed class statistics (`.pt`, with a `.json` key beside)."""


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
                     workers: int | None = None, covariance_file=None) -> ClassStatistics:
    """Per-class feature means and covariances (Eqs. 1-3) of `classes` (default: all).

    The classifier's own statistics when it has them (ISDA runs, public ISDA checkpoints), whatever
    `covariance` says. Otherwise one streamed pass over the training images of `classes` only
    (`statistics_data`), float64 accumulation, `covariance` "full" (`(A, A)` per class: 32 MiB for
    A = 2048) or "diagonal"; the result is cached in `classifier.cache_dir` and reused by any later
    call for the same weights and covariance type whose classes it covers with the same images.
    `workers`: DataLoader processes for image files (default: up to 8 for more than 2,000 files).
    `covariance_file`: covariances estimated elsewhere (`covariance_file.read_covariance_file`), used
    for every class instead of the classifier's own or a pass. `covariance` is checked where it is an
    option (`VisualizeOptions`, `check_covariance`).
    """
    if covariance_file is not None:
        estimator = read_covariance_file(covariance_file, classifier.num_classes, classifier.feature_dim,
                                         device=classifier.device)
        return ClassStatistics(estimator, list(range(classifier.num_classes)))
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
            "data": {str(c): data.class_fingerprints[c] for c in classes}, "computed_on": classifier.computed_on}


def read_statistics_key(path) -> dict:
    """A class-statistics cache key (`<covariance>-<hash>.json`), checked: `weights` and `covariance` strings,
    `classes` distinct class indices, `data` a fingerprint string per class. `IsdaVizError` naming the file."""
    fields = Fields(read_json(path, "class statistics cache key", limit=4 << 20), f"the class statistics cache key "
                    f"{path}")
    fields.text("weights", max_length=256)
    fields.text("covariance", max_length=64)
    classes = fields.items("classes", int, max_length=100_000)
    if len(set(classes)) != len(classes) or any(c < 0 for c in classes):
        fields.fail("classes", "must be distinct class indices")
    data = fields.mapping("data")
    if sorted(data.data) != sorted(str(c) for c in classes):
        fields.fail("data", "must hold one fingerprint per class of 'classes'")
    for c in data.data:
        data.text(c, max_length=256)
    return fields.data


def read_cached_statistics(key_file: Path, key: dict, classes: list[int], classifier: Classifier) -> ClassStatistics:
    """The statistics of `classes` (all held by `key`) from the cache entry beside `key_file`, checked as an
    estimator state of the key's classes and the classifier's features (`CovarianceEstimator.read_state`)."""
    path = key_file.with_suffix(".pt")
    held = CovarianceEstimator.read_state(load_checkpoint(path, "class statistics cache"),
                                          f"the class statistics cache {path}", num_features=classifier.feature_dim,
                                          num_classes=len(key["classes"])).state_dict()
    rows = torch.tensor([key["classes"].index(c) for c in classes])
    state = {**held, "num_classes": len(classes), **{k: held[k][rows] for k in ("m2", "mean64", "count")}}
    return ClassStatistics(CovarianceEstimator.from_state_dict(state, device=classifier.device), classes)


def _cached_statistics(classifier: Classifier, data: StatisticsData, classes: list[int],
                       covariance: str) -> ClassStatistics | None:
    """Statistics cached for these weights and covariance type, computed on this device type in this precision,
    whose classes cover `classes` with the same images. A cache entry that is not one (a FIFO, broken JSON, a
    wrong shape) is skipped with a note."""
    if classifier.cache_dir is None or classifier.fingerprint is None:
        return None
    for key_file in sorted((classifier.cache_dir / STATISTICS_DIR).glob(f"{covariance}-*.json")):
        try:
            key = read_statistics_key(key_file)
            if key["weights"] != classifier.fingerprint or key.get("computed_on") != classifier.computed_on:
                continue  # other weights, or features computed on another device or in another precision
            held = {int(c): fp for c, fp in key["data"].items()}
            if all(held.get(c) == data.class_fingerprints[c] for c in classes):
                return read_cached_statistics(key_file, key, classes, classifier)
        except IsdaVizError as e:
            _note(f"skipping a class statistics cache entry: {e}")
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
            try:
                stale = read_statistics_key(old)["weights"] != classifier.fingerprint
            except IsdaVizError:
                continue  # not a key of ours: left alone
            if stale:
                old.with_suffix(".pt").unlink(missing_ok=True)
                old.unlink()
        save_atomic(estimator.state_dict(), folder / f"{name}.pt")
        write_json_atomic(key, folder / f"{name}.json")
    except (OSError, IsdaVizError, json.JSONDecodeError) as e:  # a read-only cache (e.g. installed weights): the pass just is not kept
        _note(f"class statistics not cached in {folder} ({type(e).__name__})")
