"""How much a generator can reach, as a number, in a classifier's own feature space (`isda-viz generator-report`).

For each class, real training images and the generator's samples of that class go through the classifier's
`features`; the report gives (per class, and over every class pooled):

* the Fréchet distance between the two feature distributions seen as Gaussians (Heusel et al. 2017's FID, but in
  the classifier's feature space, so no Inception weights are needed and it works offline for any classifier):
  `‖μ_r − μ_g‖² + tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})` (`frechet_distance`);
* precision and recall against k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019, k = 3 as theirs): the
  fraction of generated features inside some real feature's ball (radius: its distance to its k-th nearest real
  neighbour), and the fraction of real features inside some generated feature's ball (`precision_recall`).
  Recall is what inversion cares about: a real feature outside every generated ball is a place no sample of
  the generator lands near, so Step II's targets there are reached only approximately.

A second, disjoint sample of real features is scored the same way where the data has enough images (the
`reference`: what a generator drawing the real distribution exactly would get at these sample sizes: the
distance's sampling noise and the finite-sample precision/recall). Samples are drawn from seeded generators:
same seed, same report. Reports are cached per (classifier, generator, class map) beside the classifier's
class statistics (`generator_reach`, `cached_generator_report`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from isda_viz.cache import cache_dir, module_fingerprint
from isda_viz.classifiers.classifier import CLASSIFIER_CACHE, Classifier
from isda_viz.classifiers.statistics import StatisticsData, statistics_data
from isda_viz.data.batches import iterate_batches
from isda_viz.data.datasets import TensorImages
from isda_viz.errors import IsdaVizError
from isda_viz.outputs.generator_report import (
    GeneratorReport,
    Reach,
    ReferenceReach,
    read_generator_report,
    write_generator_report,
)
from isda_viz.pretrained import HERE as SHIPPED

from .base import Generator, to_classifier_pixels

REPORTS_DIR = "generator-reports"
"""Folder in the classifier's cache holding its generator reports, one per (generator, class map)."""
POOLED_LIMIT = 10_000
"""At most this many features per side enter the pooled precision/recall (its k-NN search is quadratic)."""


@dataclass(frozen=True)
class ReachOptions:
    """`per_class`: samples per class of each side (real images: fewer where a class has fewer); `k`: the
    neighbour whose distance is a ball's radius; `seed`: every random draw (images chosen, latent codes)."""
    per_class: int = 500
    k: int = 3
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise IsdaVizError(f"--k must be a positive integer, got {self.k}")
        if not isinstance(self.per_class, int) or self.per_class <= self.k:
            raise IsdaVizError(f"--per-class must be more than --k ({self.k}): each sample needs k neighbours; "
                               f"got {self.per_class}")


# ---------------------------------------------------------------- the two measures, on features

def feature_moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(mean (A,), covariance (A, A))` of `features (N, A)`, float64, the covariance unbiased (N − 1)."""
    x = features.to(torch.float64)
    centred = x - x.mean(0)
    return x.mean(0), centred.T @ centred / max(len(x) - 1, 1)


def frechet_distance(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """`‖μa − μb‖² + tr(Σa) + tr(Σb) − 2 tr((Σa Σb)^{1/2})`, float64, ≥ 0.

    `tr((Σa Σb)^{1/2}) = tr((Σa^{1/2} Σb Σa^{1/2})^{1/2})`, the sum of the square roots of the eigenvalues of a
    symmetric PSD matrix: no general matrix square root, no complex parts (rank-deficient Σ are fine).
    """
    mean_a, cov_a, mean_b, cov_b = (t.to(torch.float64) for t in (mean_a, cov_a, mean_b, cov_b))
    values, vectors = torch.linalg.eigh((cov_a + cov_a.T) / 2)
    root_a = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(float(distance), 0.0)


def knn_radii(points: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """`(N,)`: each point's distance to its k-th nearest other point of `points (N, A)` (float64)."""
    points = points.to(torch.float64)
    return torch.cat([torch.cdist(points[i:i + chunk], points).kthvalue(k + 1, dim=1).values  # +1: itself, at 0
                      for i in range(0, len(points), chunk)])


def manifold_coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction in [0, 1] of `queries (M, A)` inside at least one ball `‖q − centres_j‖ ≤ radii_j`."""
    queries, centres = queries.to(torch.float64), centres.to(torch.float64)
    inside = sum(int((torch.cdist(queries[i:i + chunk], centres) <= radii).any(1).sum())
                 for i in range(0, len(queries), chunk))
    return inside / len(queries)


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al.'s improved precision and recall of `generated (M, A)` against `real (N, A)`:
    precision = coverage of the generated points by the real k-NN balls, recall = of the real by the generated."""
    return (manifold_coverage(generated, real, knn_radii(real, k)),
            manifold_coverage(real, generated, knn_radii(generated, k)))


def reach_of(real: torch.Tensor, generated: torch.Tensor, k: int, class_index: int | None = None,
             class_name: str | None = None, reference: torch.Tensor | None = None) -> Reach:
    """Both measures of `generated (M, A)` against `real (N, A)`, and of `reference (N', A)` (a second real
    sample) in the generator's place when given."""
    mean_r, cov_r = feature_moments(real)
    precision, recall = precision_recall(real, generated, k)
    scored = None
    if reference is not None:
        ref_precision, ref_recall = precision_recall(real, reference, k)
        scored = ReferenceReach(frechet_distance(mean_r, cov_r, *feature_moments(reference)), ref_precision,
                                ref_recall, len(reference))
    return Reach(class_index=class_index, class_name=class_name,
                 frechet_distance=frechet_distance(mean_r, cov_r, *feature_moments(generated)),
                 precision=precision, recall=recall, real=len(real), generated=len(generated),
                 real_trace=float(cov_r.trace()), reference=scored)


# ---------------------------------------------------------------- features of real images and of samples

def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


@torch.no_grad()
def real_class_features(classifier: Classifier, data: StatisticsData, classes: list[int], count: int,
                        rng: torch.Generator, progress: bool = True) -> dict[int, torch.Tensor]:
    """Features `(n_c, A)` float64 of up to `count` training images of each class, chosen at random by `rng`
    (the first ones of a random order, so a larger `count` extends a smaller one's choice)."""
    labels = torch.as_tensor(data.images.labels)
    chosen = {}
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        chosen[c] = members[torch.randperm(len(members), generator=rng)[:count]]
    index = torch.cat(list(chosen.values()))
    images = data.images
    subset = TensorImages(images.images[index], labels[index], images.classes) if isinstance(images, TensorImages) \
        else Subset(images, index.tolist())
    workers = 0 if isinstance(images, TensorImages) or len(index) <= 2000 else min(8, os.cpu_count() or 1)
    rows = []
    with tqdm(total=len(index), desc="real features", unit="img", disable=not progress, leave=False) as bar:
        for batch, _ in iterate_batches(subset, 250, shuffle=False, num_workers=workers):
            rows.append(classifier.features(classifier.fit_images(batch)).to("cpu", torch.float64))
            bar.update(len(batch))
    features = torch.cat(rows)
    sizes = [len(chosen[c]) for c in classes]
    return dict(zip(classes, features.split(sizes)))


@torch.no_grad()
def generated_features(classifier: Classifier, generator: Generator, count: int, label: int | None,
                       rng: torch.Generator, batch_size: int = 250) -> torch.Tensor:
    """Features `(count, A)` float64 of `count` samples of the generator's class `label` (None: unconditional),
    latent codes from its prior drawn with `rng`."""
    rows = []
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        z = generator.sample_latent(n, rng, generator.device)
        y = None if label is None else torch.full((n,), label, dtype=torch.long, device=generator.device)
        pixels = to_classifier_pixels(generator.generate(z, y), generator.output_range, classifier)
        rows.append(classifier.features(pixels.to(classifier.device)).to("cpu", torch.float64))
    return torch.cat(rows)


# ---------------------------------------------------------------- the report of a (classifier, generator) pair

def generator_fingerprint(generator: Generator) -> str:
    """What identifies a generator in cache keys: its kind, truncation (BigGAN) and weights, not its name (which
    holds the folder it was loaded from: the same weights elsewhere are the same generator)."""
    return module_fingerprint(generator, {"kind": type(generator).__name__,
                                          "truncation": getattr(generator, "truncation", None)})


def reach_key(classifier: Classifier, generator: Generator, class_map: torch.Tensor | None = None) -> dict:
    """Which pair a report is of: both networks' fingerprints and the class map (`(C,)` generator class per
    classifier class, −1: none; None: the same index)."""
    return {"classifier": classifier.fingerprint, "generator": generator_fingerprint(generator),
            "class_map": None if class_map is None else [int(v) for v in class_map]}


def reach_settings(options: ReachOptions, data: StatisticsData) -> dict:
    """How a report was measured: the options and the real images (their description and fingerprint)."""
    digest = hashlib.sha256(json.dumps(data.class_fingerprints, sort_keys=True).encode()).hexdigest()
    return {"per_class": options.per_class, "k": options.k, "seed": options.seed, "data": data.description,
            "data_fingerprint": digest}


def drawable_classes(classifier: Classifier, generator: Generator, class_map: torch.Tensor | None) -> list[int]:
    """The classifier classes the generator has samples of (all, or those `class_map` maps); a class-conditional
    generator with another class count and no map is a one-line `IsdaVizError`."""
    if class_map is not None:
        return torch.nonzero(class_map >= 0).flatten().tolist()
    if generator.conditional and generator.num_classes != classifier.num_classes:
        raise IsdaVizError(f"generator {generator.name} has {generator.num_classes} classes, the classifier in "
                           f"{classifier.source} has {classifier.num_classes}: give --class-map FILE to say which "
                           "generator class draws each classifier class")
    return list(range(classifier.num_classes))


def _portable(name: str) -> str:
    """`name` with the folder of the shipped weights spelled `isda_viz/pretrained`: the same in every install."""
    return name.replace(str(SHIPPED), "isda_viz/pretrained")


def _subsample(features: torch.Tensor | None, rng: torch.Generator) -> torch.Tensor | None:
    if features is None or len(features) <= POOLED_LIMIT:
        return features
    return features[torch.randperm(len(features), generator=rng)[:POOLED_LIMIT]]


def measure_reach(classifier: Classifier, generator: Generator, data: StatisticsData,
                  options: ReachOptions = ReachOptions(), class_map: torch.Tensor | None = None,
                  progress: bool = True) -> GeneratorReport:
    """The report of `generator` against the training images `data` (`statistics_data`) in `classifier`'s features.

    Per class: `options.per_class` real features (fewer where the class has fewer images), the next as many as the
    reference where the class has them all, and as many generated ones (the generator's class `class_map[c]`).
    Pooled: every class's, at most `POOLED_LIMIT` per side. A class with no more than k images is an error.
    """
    n, k = options.per_class, options.k
    classes = drawable_classes(classifier, generator, class_map)
    pools = real_class_features(classifier, data, classes, 2 * n, torch.Generator().manual_seed(options.seed),
                                progress)
    short = [c for c in classes if len(pools[c]) <= k]
    if short:
        raise IsdaVizError(f"class {short[0]} ({classifier.class_names[short[0]]}) has {len(pools[short[0]])} "
                           f"training images in {data.description}: the k-NN manifolds need more than k = {k}")
    sample_rng = torch.Generator().manual_seed(options.seed + 1)
    entries, generated = [], {}
    for c in tqdm(classes, desc="generator report", unit="class", disable=not progress, leave=False):
        real, reference = pools[c][:n], pools[c][n:2 * n] if len(pools[c]) >= 2 * n else None
        if generator.conditional:
            label = c if class_map is None else int(class_map[c])
            generated[c] = generated_features(classifier, generator, n, label, sample_rng)
            entries.append(reach_of(real, generated[c], k, c, classifier.class_names[c], reference))
    pooled = generated_features(classifier, generator, n * len(classes), None, sample_rng) \
        if not generator.conditional else torch.cat([generated[c] for c in classes])
    has_reference = all(len(pools[c]) >= 2 * n for c in classes)
    pool_rng = torch.Generator().manual_seed(options.seed + 2)
    overall = reach_of(_subsample(torch.cat([pools[c][:n] for c in classes]), pool_rng), _subsample(pooled, pool_rng),
                       k, reference=_subsample(torch.cat([pools[c][n:2 * n] for c in classes]), pool_rng)
                       if has_reference else None)
    return GeneratorReport(classifier=_portable(str(classifier.source)), generator=_portable(generator.name),
                           key=reach_key(classifier, generator, class_map), settings=reach_settings(options, data),
                           feature_dim=classifier.feature_dim, overall=overall, classes=entries)


def report_folders(classifier: Classifier) -> list[Path]:
    """Where a classifier's generator reports are kept, in the order looked in and written to: beside its class
    statistics (its run directory, or its weights' cache folder), then the user's cache for its weights (for a
    classifier whose own folder cannot be written, e.g. installed read-only)."""
    folders = [classifier.cache_dir / REPORTS_DIR] if classifier.cache_dir is not None else []
    if classifier.fingerprint is not None:
        user = cache_dir(CLASSIFIER_CACHE, create=False) / classifier.fingerprint / REPORTS_DIR
        folders += [user] if user not in folders else []
    return folders


def _report_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json"


def cached_generator_report(classifier: Classifier, generator: Generator, class_map: torch.Tensor | None = None,
                            settings: dict | None = None) -> GeneratorReport | None:
    """The cached report of this pair (and, if given, measured with `settings`), else None. Reads only: never
    measures. An unreadable cache file counts as absent."""
    key = reach_key(classifier, generator, class_map)
    for folder in report_folders(classifier):
        file = folder / _report_name(key)
        if not file.is_file():
            continue
        try:
            report = read_generator_report(file)
        except IsdaVizError:
            continue
        if report.key == key and (settings is None or report.settings == settings):
            return report
    return None


def cached_reach_summary(classifier: Classifier, generator: Generator,
                         class_map: torch.Tensor | None = None) -> dict | None:
    """`GeneratorReport.summary()` of the pair's cached report (any settings), else None: what an inversion
    report's settings record. Reads only."""
    report = cached_generator_report(classifier, generator, class_map)
    return None if report is None else report.summary()


def generator_reach(classifier: Classifier, generator: Generator, options: ReachOptions = ReachOptions(),
                    data_root=None, class_map: torch.Tensor | None = None, progress: bool = True,
                    log=_note) -> GeneratorReport:
    """The report of the pair for `options` and the training images under `data_root` (default: where the
    classifier was trained): from the cache when it holds one measured so, else `measure_reach` now, cached
    (`report_folders`; the first that can be written) and returned with `path` set."""
    data = statistics_data(classifier, data_root, drawable_classes(classifier, generator, class_map))
    cached = cached_generator_report(classifier, generator, class_map, reach_settings(options, data))
    if cached is not None:
        return cached
    report = measure_reach(classifier, generator, data, options, class_map, progress)
    name, why = _report_name(report.key), "no cache folder"
    for folder in report_folders(classifier):
        try:
            write_generator_report(report, folder / name)
            return report
        except (OSError, IsdaVizError) as e:
            why = type(e).__name__
    log(f"the generator report was not cached in {', '.join(map(str, report_folders(classifier)))} ({why})")
    return report
