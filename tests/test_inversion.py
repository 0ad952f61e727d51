"""The inverter on problems with known answers, the augmented-feature sampler, and image input."""

import numpy as np
import pytest
import torch
from PIL import Image

from isda_viz.errors import IsdaVizError
from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.classifiers.classifier import Classifier
from isda_viz.data.images import load_image_file as load_image
from isda_viz.inversion.optimizer import InversionOptions, augment, invert_features, negative_target_floor, normalize_latent, reconstruct
from isda_viz.isda.sampling import sample_augmented_features


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


def test_class_index_by_name_or_index_names_the_option_in_errors():
    classifier = Classifier(torch.nn.Linear(1, 1), ["T-shirt/top", "Trouser", "Shirt"], [0.5], [0.25], 1, 28)
    assert classifier.class_index("shirt") == 2 and classifier.class_index(" 1") == 1
    for bad in ("3", "-1", "Sock"):
        with pytest.raises(IsdaVizError, match=f"^--classes {bad} is not a class"):
            classifier.class_index(bad, "--classes")


def _toy_problem(seed=1):
    """A smooth generator (one per class: `owner` picks the class of each row) and a linear featurizer."""
    g = torch.Generator().manual_seed(seed)
    gen_w = torch.randn(2, 16, 64, generator=g) / 4
    feat_w = torch.randn(64, 8, generator=g) / 8
    classes = torch.tensor([0, 1, 1])

    def render(z_hat, owner):
        return torch.tanh(torch.einsum("md,mdp->mp", z_hat, gen_w[classes[owner]]))

    def featurize(images):
        return images @ feat_w

    return render, featurize, classes, g


def test_reconstruct_keeps_the_best_of_its_starts():
    render, featurize, classes, g = _toy_problem()
    n, r = 3, 4
    x = render(normalize_latent(torch.randn(n, 16, generator=g)), torch.arange(n))
    target = featurize(x)
    starts = torch.randn(n, r, 16, generator=g)
    opts = InversionOptions(reconstruct_iterations=40, restarts=r)
    step1 = reconstruct(render, featurize, target, starts, opts, pixel_target=x, progress=False)
    assert step1.z.shape == (n, 16) and step1.feature_error.shape == (n,)
    for i in range(n):  # brute force: each start alone, then the lowest objective
        owner = torch.full((r,), i)
        alone = invert_features(lambda z_hat: render(z_hat, owner), featurize, target[i].expand(r, -1), starts[i],
                                40, opts.reconstruct_lr, opts, pixel_target=x[i].expand(r, -1), progress=False)
        best = int(alone.objective.argmin())
        torch.testing.assert_close(step1.z[i], alone.z[best], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step1.objective[i], alone.objective.min(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(step1.feature_error[i],
                                   (alone.features[best] - target[i]).norm() / target[i].norm(), rtol=1e-4, atol=1e-6)
    assert (step1.feature_error < 0.5).all()


def test_augment_starts_from_z_star_and_measures_the_reached_shift():
    render, featurize, classes, g = _toy_problem(2)
    n, k = 3, 2
    z_star = torch.randn(n, 16, generator=g)
    features = featurize(render(normalize_latent(z_star), torch.arange(n)))
    wanted = features[:, None] + 0.1 * torch.randn(n, k, 8, generator=g)
    opts = InversionOptions(augment_iterations=0)
    unmoved = augment(render, featurize, features, wanted, z_star, opts, progress=False)
    # Zero steps: every augmentation is still at its image's z*, so it is exactly one shift away (error 1).
    torch.testing.assert_close(unmoved.z, z_star[:, None].expand(n, k, 16))
    torch.testing.assert_close(unmoved.reached_shift_error, torch.ones(n, k), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unmoved.shift_norm, (wanted - features[:, None]).norm(dim=2))
    moved = augment(render, featurize, features, wanted, z_star, InversionOptions(augment_iterations=200),
                    progress=False)
    assert moved.reached_shift_error.median() < 0.5
    reached = featurize(render(normalize_latent(moved.z.flatten(0, 1)), torch.arange(n).repeat_interleave(k)))
    expected = (reached - wanted.flatten(0, 1)).norm(dim=1) / moved.shift_norm.flatten()
    torch.testing.assert_close(moved.reached_shift_error.flatten(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moved.negative_target_floor.flatten(),
                               negative_target_floor(wanted.flatten(0, 1), (wanted - features[:, None]).flatten(0, 1)))


def test_inversion_options_from_the_command_line_knobs():
    opts = InversionOptions.make(iterations=10, restarts=3)
    assert (opts.reconstruct_iterations, opts.augment_iterations, opts.restarts) == (10, 15, 3)
    assert (opts.reconstruct_lr, opts.augment_lr) == (InversionOptions().reconstruct_lr, InversionOptions().augment_lr)
    assert InversionOptions.make() == InversionOptions()                  # the search's defaults
    sgd = InversionOptions.make(optimizer="sgd", lr=2.0)
    assert (sgd.reconstruct_lr, sgd.augment_lr, sgd.reconstruct_iterations) == (2.0, 2.0, 200)
    with pytest.raises(IsdaVizError, match="needs --lr"):
        InversionOptions.make(optimizer="sgd")


def _objective_along_the_way(render, featurize, target, z0, iterations, lr, opts, pixel_target):
    """Brute force: plain `invert_features` for 0..iterations steps, each row's objective after each."""
    return torch.stack([invert_features(render, featurize, target, z0, t, lr, opts, pixel_target=pixel_target,
                                        progress=False).objective for t in range(iterations + 1)])   # (T+1, M)


@pytest.mark.parametrize("shrink", [True, False])
def test_early_stopping_keeps_each_rows_best_so_far(shrink):
    render, featurize, classes, g = _toy_problem(3)
    m = 3
    owner = torch.arange(m)
    x = render(normalize_latent(torch.randn(m, 16, generator=g)), owner)
    target, z0 = featurize(x), torch.randn(m, 16, generator=g)
    # A large constant step: the objective oscillates, so the last iterate is often not the best one.
    plain = InversionOptions(schedule="constant")
    stopping = InversionOptions(schedule="constant", min_improvement=1e-2)
    iterations, lr = 30, 0.6
    along = _objective_along_the_way(lambda z: render(z, owner), featurize, target, z0, iterations, lr, plain, x)
    row_render = (lambda z_hat, rows: render(z_hat, owner[rows])) if shrink else None
    early = invert_features(lambda z: render(z, owner), featurize, target, z0, iterations, lr, stopping,
                            pixel_target=x, progress=False, row_render=row_render, patience=4)
    # Rows do not interact, so each row's path is the plain run's until it stops: what is returned is the
    # best the row visited, never worse than its start, and its z gives the objective reported.
    assert (early.objective <= along[0] + 1e-6).all()
    assert any(h["active_rows"] < m for h in early.history)        # some row did stop early (the batch shrank)
    for i in range(m):
        visited = along[: iterations + 1, i]
        hit = torch.isclose(visited, early.objective[i], rtol=1e-4, atol=1e-6).nonzero().flatten()
        assert len(hit), "the kept code is one the row visited"
        assert early.objective[i] <= visited[: int(hit[0]) + 1].min() + 1e-6    # the best up to where it was
    # Never stopping (patience longer than the run): the best over the whole run, <= running to the end.
    never = invert_features(lambda z: render(z, owner), featurize, target, z0, iterations, lr,
                            InversionOptions(schedule="constant"), pixel_target=x,
                            progress=False, row_render=row_render, patience=iterations + 5)
    torch.testing.assert_close(never.objective, along.min(0).values, rtol=1e-4, atol=1e-6)
    assert (never.objective <= along[-1] + 1e-6).all()
    recomputed = invert_features(lambda z: render(z, owner), featurize, target, never.z, 0, lr, plain,
                                 pixel_target=x, progress=False)
    torch.testing.assert_close(recomputed.objective, never.objective)
