"""The generator report: its two measures against float64 brute force, its answers where they are known (a generator
that reproduces the real features; one that draws a single class for every label), its cache and file, and the
command, `train-gan` and the inversion reports that record it."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from click.testing import CliRunner
from PIL import Image

from isda_viz.classifiers.classifier import Classifier, load_classifier
from isda_viz.classifiers.statistics import StatisticsData, statistics_data
from isda_viz.cli.main import main
from isda_viz.data.datasets import TensorImages, load_split
from isda_viz.errors import IsdaVizError
from isda_viz.generators import load_generator
from isda_viz.generators.base import Generator
from isda_viz.generators.reach import (
    REPORTS_DIR,
    ReachOptions,
    cached_reach_summary,
    feature_moments,
    frechet_distance,
    generator_reach,
    knn_radii,
    manifold_coverage,
    measure_reach,
    precision_recall,
)
from isda_viz.generators.wgan import WGANGenerator, recompute_batchnorm_statistics, save_generator
from isda_viz.outputs.generator_report import GENERATOR_REPORT, read_generator_report

# ---------------------------------------------------------------- the measures, against brute force


def _random_covariance(dim: int, rank: int, seed: int) -> torch.Tensor:
    factor = torch.randn(dim, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return factor @ factor.T


@pytest.mark.parametrize("rank_a, rank_b", [(12, 12), (5, 12), (3, 4)])  # full and rank-deficient
def test_frechet_distance_is_the_formula_with_scipy_s_matrix_square_root(rank_a, rank_b):
    dim = 12
    cov_a, cov_b = _random_covariance(dim, rank_a, 1), _random_covariance(dim, rank_b, 2)
    mean_a, mean_b = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    a, b = cov_a.numpy(), cov_b.numpy()
    cross = scipy.linalg.sqrtm(a @ b)
    expected = float(np.sum((mean_a - mean_b).numpy() ** 2) + np.trace(a) + np.trace(b) - 2 * np.trace(cross).real)
    assert frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert frechet_distance(mean_a, cov_a, mean_a, cov_a) == pytest.approx(0, abs=1e-8)


def test_feature_moments_are_numpy_s_mean_and_unbiased_covariance():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    mean, cov = feature_moments(x)
    assert mean.dtype == cov.dtype == torch.float64
    np.testing.assert_allclose(mean.numpy(), x.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-14)


def _brute_radii(points, k):
    return [sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)[k - 1] for i, p in enumerate(points)]


def _brute_coverage(queries, centres, radii):
    return sum(any(math.dist(q, c) <= r for c, r in zip(centres, radii)) for q in queries) / len(queries)


def test_knn_radii_and_coverage_are_the_brute_force_ones():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(37, 5, generator=g), torch.randn(29, 5, generator=g) * 1.3 + 0.4
    real_list, fake_list = real.double().tolist(), fake.double().tolist()
    for k in (1, 3, 5):
        radii = knn_radii(real, k, chunk=8)  # several chunks
        assert radii.dtype == torch.float64
        np.testing.assert_allclose(radii.numpy(), _brute_radii(real_list, k), rtol=1e-9)
        fake_radii = _brute_radii(fake_list, k)
        precision, recall = precision_recall(real, fake, k)
        assert precision == _brute_coverage(fake_list, real_list, _brute_radii(real_list, k))
        assert recall == _brute_coverage(real_list, fake_list, fake_radii)
    assert manifold_coverage(real, real, knn_radii(real, 3)) == 1.0


# ---------------------------------------------------------------- known answers, through a classifier and a generator

CLASSES, PER_CLASS = 4, 60


class _PixelFeatures(nn.Module):
    """Features: the 16 normalised pixels of a 1 x 4 x 4 image; a linear `fc`."""
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, CLASSES)
        self.feature_dim = 16

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


def _synthetic_images() -> TensorImages:
    """`PER_CLASS` images per class, uint8 1 x 4 x 4, class c's pixels around 40 + 60c (clusters far apart)."""
    g = torch.Generator().manual_seed(7)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    pixels = 40 + 60 * labels[:, None, None, None] + 8 * torch.randn(len(labels), 1, 4, 4, generator=g)
    return TensorImages(pixels.round().clamp(0, 255).to(torch.uint8), labels, [f"c{i}" for i in range(CLASSES)])


class _ReplayGenerator(Generator):
    """Draws the training images themselves: the i-th sample of a batch of class y is class `draw(y)`'s i-th
    image, in [0, 1] (so through `to_classifier_pixels` its features are the real ones, bit for bit)."""
    latent_dim, num_classes, image_size, channels, output_range = 2, CLASSES, 4, 1, (0.0, 1.0)

    def __init__(self, images: TensorImages, draw=lambda y: y):
        super().__init__()
        self.images, self.draw = images, draw
        self.anchor = nn.Parameter(torch.zeros(1))  # a device, and something to fingerprint

    def generate(self, z, y=None):
        picked = [torch.nonzero(self.images.labels == self.draw(int(label))).flatten()[i] for i, label in enumerate(y)]
        return self.images.images[torch.stack(picked)].float() / 255


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    images = _synthetic_images()
    classifier = Classifier(_PixelFeatures().eval(), list(images.classes), [0.0], [1.0], 1, 4,
                            source=tmp_path_factory.mktemp("clf"), cache_dir=None, fingerprint="synthetic")
    data = StatisticsData(images, {c: f"class {c}" for c in range(CLASSES)}, "synthetic")
    return classifier, data, images


def test_a_generator_reproducing_the_real_features_has_distance_0_and_precision_recall_1(synthetic):
    classifier, data, images = synthetic
    report = measure_reach(classifier, _ReplayGenerator(images), data, ReachOptions(per_class=PER_CLASS),
                           progress=False)
    assert len(report.classes) == CLASSES and report.feature_dim == 16
    for entry in [*report.classes, report.overall]:
        assert entry.frechet_distance == pytest.approx(0, abs=1e-9)
        assert (entry.precision, entry.recall) == (1.0, 1.0)
        assert entry.reference is None  # every image is in the real sample: none left for a reference
    assert (report.overall.real, report.overall.generated) == (CLASSES * PER_CLASS, CLASSES * PER_CLASS)
    features = images.images[images.labels == 2].float().div(255).flatten(1).double()
    assert report.classes[2].real_trace == pytest.approx(float(torch.cov(features.T).trace()), rel=1e-9)


def test_a_generator_drawing_one_class_for_every_label_has_recall_near_one_over_c(synthetic):
    classifier, data, images = synthetic
    report = measure_reach(classifier, _ReplayGenerator(images, draw=lambda y: 0), data,
                           ReachOptions(per_class=PER_CLASS), progress=False)
    assert report.overall.recall == pytest.approx(1 / CLASSES, abs=0.02)
    assert report.overall.precision == 1.0  # every sample is a real image (of class 0)
    first, *others = report.classes
    assert (first.precision, first.recall, first.frechet_distance) == (1.0, 1.0, pytest.approx(0, abs=1e-9))
    for entry in others:
        assert (entry.precision, entry.recall) == (0.0, 0.0)
        assert entry.frechet_distance > 10 * entry.real_trace  # the class means are far apart


def test_same_seed_same_report_and_the_reference_sample(synthetic):
    classifier, data, images = synthetic
    generator = _ReplayGenerator(images)
    options = ReachOptions(per_class=PER_CLASS // 2, k=2, seed=5)  # half per side: a reference of the other half
    a, b = (measure_reach(classifier, generator, data, options, progress=False) for _ in range(2))
    assert a == b
    for entry in a.classes:
        assert entry.reference is not None and entry.reference.real == PER_CLASS // 2
        assert 0 < entry.reference.frechet_distance < entry.real_trace and entry.recall < 1


# ---------------------------------------------------------------- the file, the cache, the command, train-gan


def _tiny_gan(path, seed: int):
    """A random class-conditional WGAN (each test its own `seed`: its own generator, so its own cache entry)."""
    torch.manual_seed(seed)
    generator = WGANGenerator(latent_dim=16, num_classes=10, width=8)
    recompute_batchnorm_statistics(generator, 2, 32, torch.Generator().manual_seed(0))
    save_generator(generator, path / "generator.pt", iteration=0, dataset="fashion-mnist")
    return path


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error_line(result) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_the_command_writes_the_report_to_the_pair_s_cache_and_reuses_it(tiny_run, tmp_path, monkeypatch):
    gan = _tiny_gan(tmp_path, seed=1)
    result = _invoke("generator-report", "--classifier", tiny_run, "--generator", gan, "--per-class", 12)
    assert result.exit_code == 0, result.output
    file = Path(result.output.split("generator report: ")[-1].strip())
    assert file.parent == tiny_run / REPORTS_DIR and "all classes" in result.output
    report = read_generator_report(file)
    classifier, generator = load_classifier(tiny_run), load_generator(str(gan))
    assert report.settings["per_class"] == 12 and len(report.classes) == 10
    assert report.key["classifier"] == classifier.fingerprint and report.key["class_map"] is None
    # what the file holds is what the measure gives (same seed, same samples)
    again = measure_reach(classifier, generator, statistics_data(classifier, None, list(range(10))),
                          ReachOptions(per_class=12), progress=False)
    assert again == report
    # a second run reads the cache; a new seed measures again, beside it
    monkeypatch.setattr("isda_viz.generators.reach.measure_reach", lambda *a, **k: pytest.fail("measured again"))
    cached = generator_reach(classifier, generator, ReachOptions(per_class=12), progress=False)
    assert cached == report and cached.path == file
    assert cached_reach_summary(classifier, generator) == report.summary()
    assert report.summary()["file"] == str(file) and report.summary()["recall"] == report.overall.recall
    other = WGANGenerator(latent_dim=16, num_classes=10, width=8).freeze()
    assert cached_reach_summary(classifier, other) is None


def test_an_inversion_report_records_the_cached_generator_report(tiny_run, tmp_path):
    gan = _tiny_gan(tmp_path / "gan", seed=2)
    Image.fromarray(load_split("fashion-mnist", False, limit=1).images[0, 0].numpy()).save(tmp_path / "x.png")
    args = ("augment", "--image", tmp_path / "x.png", "--classifier", tiny_run, "--generator", gan, "--iterations",
            2, "--restarts", 1, "-k", 1, "--inverter", "search")
    assert _invoke(*args, "--out", tmp_path / "before").exit_code == 0
    before = json.loads((tmp_path / "before" / "report.json").read_text())["settings"]
    assert before["generator_reach"] is None  # nothing cached: nothing measured implicitly
    assert _invoke("generator-report", "--classifier", tiny_run, "--generator", gan, "--per-class", 8).exit_code == 0
    assert _invoke(*args, "--out", tmp_path / "after").exit_code == 0
    after = json.loads((tmp_path / "after" / "report.json").read_text())["settings"]["generator_reach"]
    report = read_generator_report(after["file"])
    assert after == json.loads(json.dumps(report.summary())) and report.settings["per_class"] == 8


def test_train_gan_ends_with_the_generator_report(gan_dir_with_classifier, tiny_run):
    gan_dir, output = gan_dir_with_classifier
    report = read_generator_report(gan_dir / GENERATOR_REPORT)
    assert "generator report: Fréchet distance" in output and str(gan_dir / GENERATOR_REPORT) in output
    generator = load_generator(str(gan_dir))
    cached = generator_reach(load_classifier(tiny_run), generator, ReachOptions(seed=0), progress=False)
    assert dataclasses.replace(cached, path=None) == dataclasses.replace(report, path=None)
    assert report.settings["per_class"] == ReachOptions().per_class and len(report.classes) == 10


@pytest.fixture(scope="module")
def gan_dir_with_classifier(tmp_path_factory, tiny_run):
    out = tmp_path_factory.mktemp("gan") / "gan"
    result = _invoke("train-gan", "--limit-train", 256, "--batch-size", 16, "--n-critic", 1, "--sample-every", 2,
                     "--iterations", 2, "--classifier", tiny_run, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_bad_options_and_files_are_one_line_errors(tiny_run, tmp_path):
    gan = _tiny_gan(tmp_path, seed=3)
    assert "--per-class must be more than --k (3)" in _error_line(
        _invoke("generator-report", "--classifier", tiny_run, "--generator", gan, "--per-class", 3))
    eleven = WGANGenerator(latent_dim=16, num_classes=11, width=8)
    (tmp_path / "eleven").mkdir()
    save_generator(eleven, tmp_path / "eleven" / "generator.pt", iteration=0, dataset="fashion-mnist")
    assert "--class-map" in _error_line(_invoke("generator-report", "--classifier", tiny_run, "--generator",
                                                tmp_path / "eleven", "--per-class", 8))
    good = generator_reach(load_classifier(tiny_run), load_generator(str(gan)), ReachOptions(per_class=8),
                           progress=False)
    data = json.loads(good.path.read_text())
    for field, value, message in (("format", "other", "not a generator report"),
                                  ("overall", {**data["overall"], "recall": 1.5}, "outside [0, 1]"),
                                  ("overall", {**data["overall"], "frechet_distance": -1}, "negative"),
                                  ("classes", [{"class_index": 0}], "not a generator report")):
        broken = tmp_path / f"broken-{field}.json"
        broken.write_text(json.dumps({**data, field: value}))
        with pytest.raises(IsdaVizError, match=re.escape(message)) as e:
            read_generator_report(broken)
        assert "\n" not in str(e.value)
    with pytest.raises(IsdaVizError, match="more than --k"):
        ReachOptions(per_class=2, k=2)


def test_the_pooled_sets_are_capped(monkeypatch, synthetic):
    classifier, data, images = synthetic
    monkeypatch.setattr("isda_viz.generators.reach.POOLED_LIMIT", 100)
    report = measure_reach(classifier, _ReplayGenerator(images), data, ReachOptions(per_class=PER_CLASS),
                           progress=False)
    assert (report.overall.real, report.overall.generated) == (100, 100)
    assert [e.real for e in report.classes] == [PER_CLASS] * CLASSES
    assert list(itertools.chain(*[[e.precision, e.recall] for e in report.classes])) == [1.0] * 2 * CLASSES


def test_the_shipped_pair_ships_its_report_and_inversions_of_it_record_it():
    from isda_viz.pretrained import HERE, default_classifier, default_generator

    summary = cached_reach_summary(load_classifier(default_classifier()), load_generator(str(default_generator())))
    assert summary is not None and Path(summary["file"]).parent.parent == HERE / "fmnist-isda-resnet32"
    report = read_generator_report(summary["file"])
    assert report.settings["per_class"] == ReachOptions().per_class and report.classifier.startswith("isda_viz/")
    assert (summary["precision"], summary["recall"], summary["real"]) == (report.overall.precision,
                                                                         report.overall.recall, 5000)
