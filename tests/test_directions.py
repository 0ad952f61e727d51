"""`isda-viz directions`: the eigen-directions of Sigma_y, the semantic test's noises, the pipeline and its page.

The maths is checked against float64 brute force and on synthetic linear classifiers whose answer is
known; the pipeline runs with the shipped weights on two classes, 2 Step I iterations and 3 steps.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from isda_viz.cli.main import main
from isda_viz.errors import IsdaVizError
from isda_viz.isda.directions import (augmentation_shares, binomial_interval, class_directions, direction_shares,
                                      isda_noise, isotropic_noise, kept_class, other_class_noise,
                                      pick_other_classes, traversal_steps, traversal_targets)
from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.outputs.directions import read_directions_report

from test_html import needs_browser, render

FAST = ["--iterations", "2", "--restarts", "1", "--steps", "3"]


def _estimator(features_per_class: list[torch.Tensor], diagonal: bool = False) -> CovarianceEstimator:
    est = CovarianceEstimator(features_per_class[0].shape[1], len(features_per_class), diagonal=diagonal)
    for c, f in enumerate(features_per_class):
        est.update(f.float(), torch.full((len(f),), c))
    return est


def _random_estimator(a=6, classes=3, seed=0, diagonal=False) -> CovarianceEstimator:
    g = torch.Generator().manual_seed(seed)
    mixes = [torch.randn(a, a, generator=g) * (c + 1) for c in range(classes)]
    return _estimator([torch.randn(200, a, generator=g) @ m + 3 for m in mixes], diagonal)


# ---------------------------------------------------------------------------------------------
# The directions


def test_directions_are_eigh_of_sigma_sorted_with_the_sign_rule():
    est = _random_estimator()
    for c in range(3):
        sigma = est.covariance[c]
        values, vectors = torch.linalg.eigh(sigma.double())
        top = class_directions(sigma, 4)
        assert torch.allclose(top.values, values.flip(0)[:4], rtol=1e-12, atol=1e-12)
        assert (top.values[:-1] >= top.values[1:]).all()
        for k in range(4):
            expected = vectors[:, -1 - k]
            assert torch.allclose(top.vectors[k].abs(), expected.abs(), atol=1e-10)
            assert top.vectors[k][top.vectors[k].abs().argmax()] > 0                  # the documented sign rule
            assert torch.allclose(sigma.double() @ top.vectors[k], top.values[k] * top.vectors[k], atol=1e-4)
        assert torch.allclose(top.shares, top.values / sigma.double().trace())
        assert 0 < float(top.shares.sum()) <= 1 and math.isclose(top.rest_share, 1 - float(top.shares.sum()))
        squares = values.clamp_min(0).pow(2).sum()
        assert math.isclose(top.effective_rank, float(values.clamp_min(0).sum() ** 2 / squares), rel_tol=1e-9)
        again = class_directions(sigma.clone(), 4)
        assert torch.equal(again.vectors, top.vectors)                                 # runs repeat
    diagonal = _random_estimator(diagonal=True).covariance[1]
    top = class_directions(diagonal, 3)
    order = diagonal.double().argsort(descending=True)[:3]
    assert torch.equal(top.vectors.argmax(1), order) and torch.allclose(top.values, diagonal.double()[order])
    with pytest.raises(IsdaVizError, match="--directions"):
        class_directions(est.covariance[0], 7)


def test_traversal_targets_start_at_a_and_step_by_sqrt_lambda_e_along_u():
    est = _random_estimator()
    top = class_directions(est.covariance[2], 3)
    a = torch.rand(2, 6)
    t = traversal_steps(5, 2.0)
    assert t.tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0]
    targets = traversal_targets(a, top.vectors.expand(2, -1, -1), top.values.expand(2, -1), 0.5, t)
    assert targets.shape == (2, 3, 5, 6)
    assert torch.equal(targets[:, :, 2], a[:, None].expand(-1, 3, -1))                  # t = 0 is a itself
    step = (targets[:, :, 3] - a[:, None]).double()
    expected = (0.5 * top.values).sqrt()[:, None] * top.vectors
    assert torch.allclose(step, expected.expand(2, -1, -1), atol=1e-5)


def test_direction_shares_add_up_and_see_a_pure_direction():
    top = class_directions(_random_estimator().covariance[0], 3)
    eps = torch.randn(50, 6, dtype=torch.float64)
    shares = direction_shares(eps, top.vectors)
    assert shares.shape == (50, 4) and (shares >= 0).all()
    assert torch.allclose(shares.sum(1), torch.ones(50, dtype=torch.float64))
    brute = (eps @ top.vectors.T) ** 2 / (eps ** 2).sum(1, keepdim=True)
    assert torch.allclose(shares[:, :3], brute)
    pure = direction_shares(2.5 * top.vectors[1:2], top.vectors)
    assert torch.allclose(pure, torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64), atol=1e-12)
    by_class = augmentation_shares(eps.view(5, 10, 6), torch.tensor([0, 1, 0, 2, 1]),
                                   lambda c: _random_estimator().covariance[c], k=3)
    assert torch.allclose(by_class[0], shares[:10]) and by_class.shape == (5, 10, 4)


# ---------------------------------------------------------------------------------------------
# The semantic test's noises


def test_the_three_noises_have_isdas_expected_squared_norm():
    est = _random_estimator(a=5, classes=3, seed=2)
    labels, others = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])
    strength, draws = 0.7, 4000
    traces = est.covariance.double().diagonal(dim1=1, dim2=2).sum(1)
    g = torch.Generator().manual_seed(0)
    noises = {"isda": isda_noise(labels, est, strength, draws, g),
              "isotropic": isotropic_noise(labels, est, strength, draws, g),
              "other_class": other_class_noise(labels, others, est, strength, draws, g)}
    for name, eps in noises.items():
        assert eps.shape == (3, draws, 5)
        squared = eps.pow(2).sum(2)                                                       # (3, draws)
        for i in range(3):
            mean, stderr = squared[i].mean(), squared[i].std() / math.sqrt(draws)
            assert abs(mean - strength * traces[i]) < 4 * stderr, (name, i, float(mean), float(traces[i]))
    iso = noises["isotropic"][0]                                       # isotropic: the same variance on every axis
    assert torch.allclose(iso.var(0), torch.full((5,), strength * float(traces[0]) / 5, dtype=torch.float64), rtol=0.15)
    shape = torch.cov(noises["other_class"][0].T) / (traces[0] / traces[2])      # Sigma_y' scaled to Sigma_y's norm
    assert torch.allclose(shape, strength * est.covariance[2].double(), rtol=0.15, atol=0.05 * float(traces[2]))
    picked = pick_other_classes(torch.tensor([0, 1, 2] * 100), 3, torch.Generator().manual_seed(1))
    assert (picked != torch.tensor([0, 1, 2] * 100)).all() and set(picked.tolist()) == {0, 1, 2}


def test_feature_space_test_on_a_linear_classifier_with_a_known_answer():
    """Sigma_y lies along a direction orthogonal to every w_j - w_y: ISDA's noise never changes the logit
    differences, so it keeps the class every time; isotropic noise of the same norm often does not."""
    a_dim, classes, y = 8, 3, 1
    g = torch.Generator().manual_seed(0)
    fc = torch.nn.Linear(a_dim, classes)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(classes, a_dim, generator=g))
        fc.bias.zero_()
    differences = (fc.weight - fc.weight[y]).detach().double()[[0, 2]]            # (2, A)
    null = torch.linalg.svd(differences, full_matrices=True).Vh[2:]               # orthogonal to both
    v = null[0] / null[0].norm()
    assert (differences @ v).abs().max() < 1e-10
    centre = torch.linalg.lstsq(differences, torch.tensor([-0.5, -0.5], dtype=torch.float64)).solution
    samples = [torch.randn(100, a_dim, generator=g).double() for _ in range(classes)]
    samples[y] = centre + torch.randn(400, 1, generator=g).double() * 3 * v        # Sigma_y = 9 v v^T
    est = _estimator(samples)
    features = centre.float()[None].expand(20, -1)          # margin 0.5 over both other classes
    labels = torch.full((20,), y)
    assert (fc(features).argmax(1) == y).all()
    isda = isda_noise(labels, est, 1.0, 300, g)
    iso = isotropic_noise(labels, est, 1.0, 300, g)
    assert kept_class(fc, features, labels, isda).tolist() == [300] * 20
    kept_isotropic = int(kept_class(fc, features, labels, iso).sum())
    assert kept_isotropic < 0.8 * 20 * 300
    manual = (fc(features[:, None] + iso.float()).argmax(2) == y).sum().item()
    assert kept_isotropic == manual


def test_binomial_interval_is_wilsons():
    low, high = binomial_interval(8, 10)
    assert abs(low - 0.4902) < 1e-4 and abs(high - 0.9433) < 1e-4
    assert binomial_interval(0, 0) == (0.0, 1.0)
    low, high = binomial_interval(400, 400)
    assert high == pytest.approx(1.0) and 0.99 < low < 1
    for kept, total in [(1, 7), (50, 100), (999, 1000)]:
        low, high = binomial_interval(kept, total)
        assert low < kept / total < high


# ---------------------------------------------------------------------------------------------
# The command with the shipped weights


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def figure(tmp_path_factory):
    out = tmp_path_factory.mktemp("directions") / "fig.png"
    result = _invoke("directions", "--classes", "Trouser,8", *FAST, "--directions", 3, "--test", "--test-draws", 300,
                     "--pixel-draws", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"page: {out.with_suffix('.html')}" in result.output
    return out


def test_directions_command_writes_frames_report_figure_and_page(figure):
    from isda_viz.classifiers.classifier import load_classifier
    from isda_viz.pretrained import default_classifier

    report = read_directions_report(figure.with_suffix(".json"))
    assert report.t == [-3.0, 0.0, 3.0] and [c.label for c in report.classes] == [1, 8]
    estimator = load_classifier(default_classifier()).estimator
    for summary in report.classes:
        top = class_directions(estimator.covariance[summary.label], 3)
        assert summary.eigenvalues == top.values.tolist() and summary.shares == top.shares.tolist()
    folder = figure.parent
    assert [im.label for im in report.images] == [1, 8]
    for image in report.images:
        assert [d.k for d in image.directions] == [1, 2, 3]
        zero = [Image.open(folder / d.frames[1].file).tobytes() for d in image.directions]
        assert zero[0] == zero[1] == zero[2]                             # t = 0 is one shared problem
        for d in image.directions:
            assert [f.t for f in d.frames] == report.t and d.frames[1].pixel_distance == 0.0
            assert d.frames[1].reached_shift_error is None and d.frames[0].reached_shift_error > 0
            assert Image.open(folder / d.change_file).mode == "RGB"
            plus, minus = (np.asarray(Image.open(folder / d.frames[j].file), dtype=np.float64) for j in (2, 0))
            changed = np.abs(plus - minus).max() / 255
            assert changed <= report.change_scale + 2 / 255
    frames = sum(len(d.frames) for im in report.images for d in im.directions)
    assert frames == 2 * 3 * 3
    png = Image.open(figure)
    assert png.width >= 4 * 72 and png.height > 2 * 3 * 72
    test = report.test
    assert test.judged_by == "judge" and [c.label for c in test.classes] == [1, 8]
    for noise in ("isda", "isotropic", "other_class"):
        kept = getattr(test.overall_feature, noise)
        assert kept.total == 2 * 300 and kept.kept == sum(getattr(c.feature, noise).kept for c in test.classes)
        assert kept.low <= kept.rate <= kept.high
        assert getattr(test.overall_pixels, noise).total == 2 * 2
    assert all(o not in (im.label,) for o, im in zip(test.other_classes, report.images))
    raw = json.loads(figure.with_suffix(".json").read_text())
    assert set(raw["test"]["overall_feature"]) == {"isda", "isotropic", "other_class"}


@needs_browser
def test_directions_page_sliders_step_through_frames(figure, tmp_path):
    report = read_directions_report(figure.with_suffix(".json"))
    page = figure.with_suffix(".html")
    still = render(page, tmp_path)
    images = still.find_all("img")
    per_direction = len(report.t) + 2                                    # frames, the player, the heat map
    assert len(images) == sum(2 + per_direction * len(im.directions) for im in report.images)
    assert all(int(img.attrs["data-natural-width"]) > 0 for img in images)
    moved = render(page, tmp_path, "#slide=1.2=0")
    for dom, frame in ((still, 1), (moved, 0)):
        direction = dom.find("div", cls="direction", data_image="1", data_direction="2")
        assert direction.attrs["data-frame"] == str(frame)
        player = direction.find(cls="player").find("img")
        assert player.attrs["data-file"] == report.images[1].directions[1].frames[frame].file
        info = {n.attrs["data-key"]: json.loads(n.attrs["data-value"])
                for n in direction.find(cls="frame-info").find_all(cls="num")}
        shown = report.images[1].directions[1].frames[frame]
        assert info["t"] == shown.t and info["pixel_distance"] == shown.pixel_distance
    other = moved.find("div", cls="direction", data_image="0", data_direction="2")
    assert other.attrs["data-frame"] == "1"                              # only the slider moved changed
    for cell in still.find("table", cls="test").find_all("td"):
        if "data-kept" not in cell.attrs:
            continue
        space, noise = cell.attrs["data-key"].split(".")
        row = cell.parent.attrs["data-class"]
        test = report.test
        counts = (test.overall_feature if space == "feature" else test.overall_pixels) if row == "all classes" else \
            getattr(next(c for c in test.classes if c.label_name == row), space)
        kept = getattr(counts, noise)
        assert (int(cell.attrs["data-kept"]), int(cell.attrs["data-total"])) == (kept.kept, kept.total)
        assert json.loads(cell.attrs["data-value"]) == kept.rate and float(cell.attrs["data-low"]) == kept.low


def _error_line(result):
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "never.png"
    base = [*FAST, "--classes", "0", "--out", out]
    assert "'--directions': 0 is not in the range 1<=x<=256" in _error_line(_invoke("directions", *base,
                                                                                    "--directions", 0))
    assert "more than the classifier's 64 feature" in _error_line(_invoke("directions", *base, "--directions", 65))
    assert "not a class" in _error_line(_invoke("directions", *FAST, "--classes", "Sock", "--out", out))
    assert "--steps must be odd" in _error_line(_invoke("directions", *base, "--steps", 4))

    from isda_viz.inversion.pipelines import VisualizeOptions

    load = VisualizeOptions.load_models

    def without_statistics(self):                     # the shipped classifier as if it had no estimator or dataset
        models = load(self)
        models.classifier.estimator, models.classifier.config = None, {}
        return models

    monkeypatch.setattr(VisualizeOptions, "load_models", without_statistics)
    image = tmp_path / "x.png"
    Image.new("L", (28, 28), 128).save(image)
    line = _error_line(_invoke("directions", *FAST, "--image", image, "--label", 0, "--out", out))
    assert "no class statistics of its own" in line and "--data-root" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_augmented_images_record_their_share_along_the_class_directions(tmp_path, monkeypatch):
    """grid's report: each augmented image's share of ||eps||^2 along the top 5 directions of Sigma_y and the
    rest, equal to the shares of the eps it was made from; shown on its tile."""
    import isda_viz.inversion.pipelines as pipelines
    from isda_viz.classifiers.classifier import load_classifier
    from isda_viz.pretrained import default_classifier
    from test_html import parse

    drawn = {}
    sample = pipelines.sample_augmented_features

    def recording(features, *args):
        drawn["eps"] = sample(features, *args) - features[:, None]
        return drawn["eps"] + features[:, None]

    monkeypatch.setattr(pipelines, "sample_augmented_features", recording)
    out = tmp_path / "g.png"
    result = _invoke("grid", "--classes", "3", "--samples", 0, "--iterations", 2, "--restarts", 1, "-k", 3,
                     "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    shares = [a["direction_shares"] for a in report["images"][0]["augmented"]]
    top = class_directions(load_classifier(default_classifier()).estimator.covariance[3], 5)
    expected = direction_shares(drawn["eps"][0], top.vectors)
    assert torch.allclose(torch.tensor(shares, dtype=torch.float64), expected, atol=1e-6)
    assert all(len(s) == 6 and abs(sum(s) - 1) < 1e-9 for s in shares)
    shown = [json.loads(n.attrs["data-value"]) for n in parse(out.with_suffix(".html").read_text()).find_all(
        cls="shares")]
    assert shown == shares
