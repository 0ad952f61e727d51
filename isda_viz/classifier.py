"""A trained classifier, frozen, with what it takes to feed it; loading it; its per-class feature statistics.

`Classifier` wraps a network that has `features(x) -> (N, A)` and a linear
`fc` (every model of `isda_viz.models`), together with its class names and
input normalisation. Its methods take images as the user holds them, uint8
`(N, C, H, W)` in [0, 255] or float in [0, 1] at the classifier's size, and
normalise them themselves; `model` takes the normalised input (and keeps its
gradients: the inverter differentiates through `model.features`).

`load_classifier(spec, device)` reads a run directory written by `isda-viz
train`. It is the one entry point for classifier weights: loaders for other
formats go behind it, selected by what `spec` is and by `arch` for
checkpoints that do not name their architecture.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import IsdaVizError
from .estimator import CovarianceEstimator
from .models import build_model
from .runs import CHECKPOINT, load_checkpoint, resolve_run_dir, save_atomic

STATISTICS_CACHE = "class_statistics.pt"


@dataclass
class Classifier:
    """A frozen classifier (eval mode, no parameter gradients) and its input convention.

    `model(preprocess(x))` gives logits for `x (N, channels, image_size, image_size)` in [0, 1].
    `source` is where the weights came from (the run directory for isda-viz runs); `cache_dir`
    is where derived data (class statistics, feature indexes) may be kept, None for nowhere;
    `fingerprint` identifies the weights, so a cache made from other weights is not reused.
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
    def run_dir(self) -> Path | None:
        """The run directory of an isda-viz run (the same path as `source`)."""
        return self.source

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


def _fingerprint(path: Path) -> str:
    stamp = os.stat(path)
    return f"{stamp.st_size}-{stamp.st_mtime_ns}"


def load_classifier(spec, device="cpu", arch: str | None = None) -> Classifier:
    """The classifier named by `spec` on `device`, frozen.

    `spec`: a run directory written by `isda-viz train`, or its `checkpoint.pt`. `arch` is for
    weights that do not name their architecture; isda-viz runs do, so it must be None for them.
    """
    run_dir = resolve_run_dir(Path(str(spec)).expanduser())
    if not (run_dir / CHECKPOINT).is_file():
        what = "does not exist" if not run_dir.exists() else f"holds no {CHECKPOINT}"
        raise IsdaVizError(f"no classifier run at {run_dir}: it {what} (give a RUN_DIR written by `isda-viz train`)")
    if arch is not None:
        raise IsdaVizError(f"{run_dir} is an isda-viz run, which names its own architecture; leave out the arch")
    return _load_run(run_dir, device)


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
        config=cfg, source=run_dir, cache_dir=run_dir, fingerprint=_fingerprint(run_dir / CHECKPOINT))


def class_statistics(classifier: Classifier, data_root=None, progress: bool = True,
                     batch_size: int = 500) -> CovarianceEstimator:
    """Per-class feature means and covariances (Eqs. 1-3) of the classifier's training set.

    An ISDA run's own estimator when it has one; otherwise one pass over the training images
    the classifier was trained on (its config's dataset, data root and `limit_train`), cached in
    `classifier.cache_dir` under the weights' fingerprint.
    """
    if classifier.estimator is not None:
        return classifier.estimator
    from tqdm import tqdm

    from .data import iterate_batches, load_split

    if classifier.dataset is None:
        raise IsdaVizError(f"the classifier in {classifier.source} names no training set, so its class "
                           "covariances cannot be computed")
    device = classifier.device
    cache = classifier.cache_dir / STATISTICS_CACHE if classifier.cache_dir and classifier.fingerprint else None
    if cache is not None and cache.exists():
        state = load_checkpoint(cache, "class statistics cache")
        if state.get("checkpoint") == classifier.fingerprint:
            return CovarianceEstimator.from_state_dict(state["estimator"], device=device)
    train = load_split(classifier.dataset, True, data_root or classifier.config.get("data_root"),
                       classifier.config.get("limit_train"))
    estimator = CovarianceEstimator(classifier.feature_dim, classifier.num_classes, device=device,
                                    diagonal=classifier.config.get("covariance") == "diagonal")
    for images, labels in tqdm(iterate_batches(train, batch_size, shuffle=False), desc="class statistics",
                               total=-(-len(train) // batch_size), disable=not progress, leave=False):
        estimator.update(classifier.features(images), labels.to(device))
    if cache is not None:
        save_atomic({"checkpoint": classifier.fingerprint, "estimator": estimator.state_dict()}, cache)
    return estimator
