"""The inverter on problems with known answers, the augmented-feature sampler, and image input."""

import numpy as np
import pytest
import torch
from PIL import Image

from isda_viz.errors import IsdaVizError
from isda_viz.estimator import CovarianceEstimator
from isda_viz.inversion import InversionOptions, invert_features, normalize_latent, sample_augmented_features
from isda_viz.data import load_image_file as load_image
from isda_viz.visualize import parse_label


def test_normalize_latent_has_zero_mean_unit_std_per_code():
    z = torch.randn(5, 32) * 3 + 7
    zh = normalize_latent(z)
    torch.testing.assert_close(zh.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(zh.std(1), torch.ones(5), atol=1e-5, rtol=0)


def test_inverter_recovers_reachable_features_of_a_smooth_generator():
    # A known generator/featurizer pair: every target is reachable, so the error must go to ~0.
    g = torch.Generator().manual_seed(1)
    gen_w = torch.randn(16, 64, generator=g) / 4
    feat_w = torch.randn(64, 8, generator=g) / 8

    def render(z_hat):
        return torch.tanh(z_hat @ gen_w)

    def featurize(images):
        return images @ feat_w

    true_z = torch.randn(6, 16, generator=g)
    target = featurize(render(normalize_latent(true_z)))
    opts = InversionOptions()
    z0 = torch.randn(6, 16, generator=g)
    start = invert_features(render, featurize, target, z0, 0, 0.05, opts, progress=False)
    trace = invert_features(render, featurize, target, z0, 500, 0.05, opts, progress=False)
    assert trace.feature_error.median() < 0.01 and trace.feature_error.max() < 0.1
    assert start.feature_error.min() > 0.2
    assert trace.history[0]["median_feature_error"] > trace.history[-1]["median_feature_error"]
    # Rows are independent problems: solving a row alone gives the same answer.
    alone = invert_features(render, featurize, target[:1], trace.z[:1], 0, 0.05, opts, progress=False)
    torch.testing.assert_close(alone.features, trace.features[:1])


def test_pixel_term_pulls_towards_the_pixel_target():
    g = torch.Generator().manual_seed(1)
    gen_w = torch.randn(8, 20, generator=g)

    def render(z_hat):
        return z_hat @ gen_w

    def featurize(images):
        return images[:, :2]  # features see only 2 of 20 pixels: the pixel term must decide the rest

    pixels = render(normalize_latent(torch.randn(3, 8, generator=g)))
    z0 = torch.randn(3, 8, generator=g)
    free = invert_features(render, featurize, pixels[:, :2], z0, 300, 0.05, InversionOptions(eta=0.0),
                           progress=False)
    tied = invert_features(render, featurize, pixels[:, :2], z0, 300, 0.05, InversionOptions(eta=1.0),
                           pixel_target=pixels, progress=False)
    assert (tied.images - pixels).norm() < 0.5 * (free.images - pixels).norm()


@pytest.mark.parametrize("diagonal", [False, True])
def test_augmented_features_have_covariance_strength_times_sigma(diagonal):
    a, c = 4, 3
    g = torch.Generator().manual_seed(2)
    est = CovarianceEstimator(a, c, diagonal=diagonal)
    mixing = torch.randn(a, a, generator=g)
    x = torch.randn(400, a, generator=g) @ mixing
    y = torch.arange(400) % c
    est.update(x, y)
    features = torch.randn(2, a, dtype=torch.float64, generator=g)
    labels = torch.tensor([1, 2])
    samples = sample_augmented_features(features, labels, est, 0.5, 100_000, g)   # (2, K, A)
    assert samples.shape == (2, 100_000, a)
    for i, label in enumerate(labels.tolist()):
        eps = (samples[i] - features[i]).numpy()
        expected = 0.5 * est.covariance[label].double().numpy()
        expected = np.diag(expected) if diagonal else expected
        np.testing.assert_allclose(eps.mean(0), 0, atol=0.02)
        np.testing.assert_allclose(np.cov(eps.T, bias=True), expected, rtol=0.05, atol=0.02)


def test_singular_covariance_is_sampled_with_jitter():
    est = CovarianceEstimator(5, 1)
    est.update(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))  # rank 1: not positive definite
    out = sample_augmented_features(torch.zeros(1, 5), torch.tensor([0]), est, 1.0, 10, torch.Generator())
    assert torch.isfinite(out).all()


def test_load_image_converts_any_mode_and_size(tmp_path):
    rgba = Image.new("RGBA", (60, 40), (255, 0, 0, 255))
    rgba.save(tmp_path / "red.png")
    gray = load_image(tmp_path / "red.png", 1, 28)
    assert gray.shape == (1, 28, 28) and 0.25 < gray.mean() < 0.35  # luminance of pure red is 0.299
    Image.new("L", (10, 10), 255).save(tmp_path / "white.jpg")
    rgb = load_image(tmp_path / "white.jpg", 3, 32)
    assert rgb.shape == (3, 32, 32) and rgb.min() > 0.95
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(IsdaVizError, match="cannot read image"):
        load_image(tmp_path / "broken.png", 1, 28)
    with pytest.raises(IsdaVizError, match="not found"):
        load_image(tmp_path / "missing.png", 1, 28)
    with pytest.raises(IsdaVizError, match="only 1 or 3"):
        load_image(tmp_path / "white.jpg", 4, 28)


def test_parse_label_by_name_or_index():
    names = ["T-shirt/top", "Trouser", "Shirt"]
    assert parse_label("shirt", names) == 2 and parse_label("1", names) == 1 and parse_label(None, names) is None
    for bad in ("3", "-1", "Sock"):
        with pytest.raises(IsdaVizError, match="not a class"):
            parse_label(bad, names)
