"""Semi-supervised ISDA (Eq. 15), explicit SDA (Eq. 5), the Monte-Carlo expected cross-entropy, labeled subsets.

References are float64 loops written straight from the formulas, Gauss-Hermite quadrature for
the two-class expectation, and Monte-Carlo checks with tolerances stated in standard errors.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.data.batches import labeled_subset
from isda_viz.errors import IsdaVizError
from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.isda.sampling import (
    covariance_factors,
    expected_cross_entropy_mc,
    explicit_sda_loss,
    sample_augmented_features,
    sample_offsets,
)
from isda_viz.isda.loss import isda_augmented_logits
from isda_viz.isda.semi import semi_supervised_augmented_logits, semi_supervised_isda_loss

# Monte-Carlo comparisons allow this many standard errors (a false failure ~1e-4 per comparison).
Z = 4.0


def _spd(c, a, generator, dtype=torch.float64):
    m = torch.randn(c, a, a, dtype=dtype, generator=generator)
    return m @ m.transpose(1, 2) / a


def _sigma(covariance, c):
    return covariance[c] if covariance.dim() == 3 else torch.diag(covariance[c])


def _brute_force_eq15(logits, weight, probs, pseudo, covariance, strength):
    """Per-sample -sum_k p_k log softmax_k(z + strength/2 (w_j - w_k)^T Sigma_ỹ (w_j - w_k)), plain loops."""
    n, c = logits.shape
    losses, rows = [], []
    for i in range(n):
        sigma = _sigma(covariance, int(pseudo[i]))
        loss, table = 0.0, []
        for k in range(c):
            aug = torch.stack([logits[i, j] + 0.5 * strength * ((weight[j] - weight[k]) @ sigma
                                                               @ (weight[j] - weight[k])) for j in range(c)])
            table.append(aug)
            loss = loss - probs[i, k] * (aug[k] - torch.logsumexp(aug, 0))
        losses.append(loss)
        rows.append(torch.stack(table))
    return torch.stack(losses), torch.stack(rows)


@pytest.mark.parametrize("diagonal", [False, True])
def test_eq15_logits_loss_and_gradients_match_brute_force(diagonal):
    g = torch.Generator().manual_seed(0)
    n, a, c, strength = 9, 6, 5, 0.7
    logits = torch.randn(n, c, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(c, a, dtype=torch.float64, generator=g, requires_grad=True)
    cov = _spd(c, a, g)
    cov = torch.diagonal(cov, dim1=1, dim2=2).clone() if diagonal else cov
    probs = F.softmax(logits * 1.5, 1)  # attached to the graph: Eq. 15 must not differentiate through p
    pseudo = probs.argmax(1)
    assert len(pseudo.unique()) >= 2

    ours = semi_supervised_isda_loss(logits, weight, probs, cov, strength, reduction="none")
    ref, ref_logits = _brute_force_eq15(logits, weight, probs.detach(), pseudo, cov, strength)
    torch.testing.assert_close(semi_supervised_augmented_logits(logits, weight, pseudo, cov, strength), ref_logits,
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(semi_supervised_isda_loss(logits, weight, probs, cov, strength), ref.mean())

    upstream = torch.rand(n, dtype=torch.float64, generator=g)
    g_ours = torch.autograd.grad((ours * upstream).sum(), (logits, weight))
    g_ref = torch.autograd.grad((ref * upstream).sum(), (logits, weight))
    for mine, theirs in zip(g_ours, g_ref):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


def test_eq15_with_an_estimator_that_buffers_rows_matches_brute_force():
    # A = 260 >= the estimator's deferral threshold: Sigma_c is applied as merged part + buffered rows.
    g = torch.Generator().manual_seed(1)
    n, a, c = 6, 260, 4
    est = CovarianceEstimator(a, c)
    est.update(torch.randn(80, a, generator=g), torch.arange(80) % c)
    est.update(torch.randn(8, a, generator=g), torch.arange(8) % c)
    assert est.defers_merges and max(est._pending_len) > 0
    weight = (torch.randn(c, a, generator=g) * 0.1).requires_grad_()
    logits = torch.randn(n, c, generator=g)
    probs = F.softmax(logits, 1)
    ours = semi_supervised_isda_loss(logits, weight, probs, est, 0.5, reduction="none")
    ours.sum().backward()
    cov = est.covariance.double()
    w64 = weight.detach().double().requires_grad_()
    ref, _ = _brute_force_eq15(logits.double(), w64, probs.double(), probs.argmax(1), cov, 0.5)
    ref.sum().backward()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_eq15_at_zero_strength_is_the_soft_cross_entropy_and_honours_given_pseudo_labels():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 4, generator=g)
    weight = torch.randn(4, 3, generator=g)
    probs = F.softmax(torch.randn(7, 4, generator=g), 1)
    cov = _spd(4, 3, g, torch.float32)
    soft_ce = -(probs * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(semi_supervised_isda_loss(logits, weight, probs, cov, 0.0), soft_ce)
    # Pseudo labels other than argmax p pick other covariances: the loss changes.
    other = (probs.argmax(1) + 1) % 4
    assert not torch.allclose(semi_supervised_isda_loss(logits, weight, probs, cov, 1.0),
                              semi_supervised_isda_loss(logits, weight, probs, cov, 1.0, pseudo_labels=other))


@pytest.mark.parametrize("strength", [0.2, 1.0])
def test_eq15_upper_bounds_the_monte_carlo_expectation_of_eq14(strength):
    g = torch.Generator().manual_seed(3)
    n, a, c = 5, 4, 3
    fc = nn.Linear(a, c).double()
    with torch.no_grad():
        fc.weight.copy_(torch.randn(c, a, dtype=torch.float64, generator=g) * 0.7)
    features = torch.randn(n, a, dtype=torch.float64, generator=g)
    cov = _spd(c, a, g)
    with torch.no_grad():
        logits = fc(features)
        probs = F.softmax(logits, 1)
        bound = semi_supervised_isda_loss(logits, fc.weight, probs, cov, strength, reduction="none")
    mc_gen = torch.Generator().manual_seed(30)
    for i in range(n):
        mean, stderr = expected_cross_entropy_mc(features[i:i + 1], fc, probs[i:i + 1], cov, strength,
                                                 samples=100_000, generator=mc_gen)
        assert 0 < stderr < 0.01
        assert mean <= bound[i].item() + Z * stderr
        assert mean >= -(probs[i] * probs[i].log()).sum().item() - 1e-9  # cross-entropy >= entropy of p


def _two_class_quadrature(features, weight, bias, target, cov, strength):
    """E[CE] for C = 2 exactly: the logit gap d = (w_o - w_y)^T ã + b_o - b_y is Gaussian and CE = softplus(d)."""
    nodes, weights = np.polynomial.hermite.hermgauss(120)
    other = 1 - target
    v = (weight[other] - weight[target]).numpy()
    mu = float(v @ features.numpy() + bias[other] - bias[target])
    s = math.sqrt(strength * float(v @ cov[target].numpy() @ v))
    d = mu + math.sqrt(2) * s * nodes
    return float((weights * np.logaddexp(0, d)).sum() / math.sqrt(math.pi))


def test_monte_carlo_estimate_matches_quadrature_and_its_stderr_is_calibrated():
    g = torch.Generator().manual_seed(4)
    a, strength = 3, 0.8
    fc = nn.Linear(a, 2).double()
    features = torch.randn(6, a, dtype=torch.float64, generator=g)
    targets = torch.tensor([0, 1, 0, 1, 1, 0])
    cov = _spd(2, a, g)
    exact = np.mean([_two_class_quadrature(features[i], fc.weight.detach(), fc.bias.detach(), int(targets[i]),
                                           cov, strength) for i in range(6)])
    # In chunks of 64 draws (max_elements), as on a large batch.
    estimates = [expected_cross_entropy_mc(features, fc, targets, cov, strength, samples=1000,
                                           generator=torch.Generator().manual_seed(s), max_elements=64 * 6 * a)
                 for s in range(40)]
    means = np.array([m for m, _ in estimates])
    stderrs = np.array([s for _, s in estimates])
    assert abs(means.mean() - exact) < Z * means.std(ddof=1) / math.sqrt(len(means))
    # The reported stderr is the spread of the estimate across seeds (40 seeds: the ratio itself spreads ~11%).
    assert 0.6 < means.std(ddof=1) / stderrs.mean() < 1.4
    # Same seed, same estimate.
    assert expected_cross_entropy_mc(features, fc, targets, cov, strength, samples=1000,
                                     generator=torch.Generator().manual_seed(0), max_elements=64 * 6 * a) == estimates[0]


@pytest.mark.parametrize("diagonal", [False, True])
def test_eq7_bound_is_above_the_monte_carlo_expected_cross_entropy(diagonal):
    g = torch.Generator().manual_seed(5)
    n, a, c, strength = 10, 6, 4, 1.0
    fc = nn.Linear(a, c).double()
    features = torch.randn(n, a, dtype=torch.float64, generator=g)
    targets = torch.arange(n) % c
    cov = _spd(c, a, g)
    cov = torch.diagonal(cov, dim1=1, dim2=2).clone() if diagonal else cov
    with torch.no_grad():
        bound = F.cross_entropy(isda_augmented_logits(fc(features), fc.weight, targets, cov, strength), targets)
        mean, stderr = expected_cross_entropy_mc(features, fc, targets, cov, strength, samples=20_000,
                                                 generator=torch.Generator().manual_seed(50))
        plain = F.cross_entropy(fc(features), targets).item()
    assert mean <= bound.item() + Z * stderr
    assert mean > plain - Z * stderr  # CE is convex in the features: augmenting cannot lower its expectation


def test_explicit_sda_with_many_samples_approaches_the_expected_cross_entropy_below_the_isda_bound():
    g = torch.Generator().manual_seed(6)
    n, a, c, strength, samples = 8, 5, 4, 1.5, 20_000
    fc = nn.Linear(a, c).double()
    with torch.no_grad():
        fc.weight.mul_(3)  # a visible gap between the bound and the expectation
    features = torch.randn(n, a, dtype=torch.float64, generator=g)
    targets = torch.arange(n) % c
    cov = _spd(c, a, g)
    with torch.no_grad():
        explicit = explicit_sda_loss(features, fc, targets, cov, strength, samples,
                                     torch.Generator().manual_seed(60)).item()
        mean, stderr = expected_cross_entropy_mc(features, fc, targets, cov, strength, samples=samples,
                                                 generator=torch.Generator().manual_seed(61))
        bound = F.cross_entropy(isda_augmented_logits(fc(features), fc.weight, targets, cov, strength), targets).item()
    # Both are M-draw means of the same quantity, so each has (about) the stderr the estimator reports.
    assert abs(explicit - mean) < Z * math.sqrt(2) * stderr
    assert bound - mean > 10 * stderr  # the bound is not tight at this strength ...
    assert explicit < bound            # ... and explicit augmentation stays below it


def test_explicit_sda_is_cross_entropy_at_zero_strength_seeded_and_differentiable():
    g = torch.Generator().manual_seed(7)
    fc = nn.Linear(5, 3)
    features = torch.randn(6, 5, generator=g, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    cov = torch.rand(3, 5, generator=g)  # diagonal
    torch.testing.assert_close(explicit_sda_loss(features, fc, targets, cov, 0.0, 3),
                               F.cross_entropy(fc(features), targets))
    one = explicit_sda_loss(features, fc, targets, cov, 1.0, 4, torch.Generator().manual_seed(1))
    two = explicit_sda_loss(features, fc, targets, cov, 1.0, 4, torch.Generator().manual_seed(1))
    assert torch.equal(one, two)
    one.backward()
    assert features.grad.abs().sum() > 0 and fc.weight.grad.abs().sum() > 0
    with pytest.raises(IsdaVizError):
        explicit_sda_loss(features, fc, targets, cov, 1.0, 0)


def test_labeled_subset_is_class_balanced_seeded_and_partitions_the_set():
    g = torch.Generator().manual_seed(8)
    labels = torch.randint(0, 10, (3000,), generator=g)
    labeled, unlabeled = labeled_subset(labels, 1003, seed=5, num_classes=10)
    counts = torch.bincount(labels[labeled], minlength=10)
    assert counts.tolist() == [101, 101, 101] + [100] * 7  # 1003 = 10 x 100 + 3 spread over classes 0-2
    assert torch.equal(torch.cat([labeled, unlabeled]).sort().values, torch.arange(3000))
    assert torch.equal(labeled, labeled.sort().values) and torch.equal(unlabeled, unlabeled.sort().values)
    again, _ = labeled_subset(labels, 1003, seed=5, num_classes=10)
    other, _ = labeled_subset(labels, 1003, seed=6, num_classes=10)
    assert torch.equal(labeled, again) and not torch.equal(labeled, other)
    with pytest.raises(IsdaVizError, match="between 10"):
        labeled_subset(labels, 9, seed=0, num_classes=10)
    with pytest.raises(IsdaVizError, match="fewer than"):
        labeled_subset(torch.tensor([0] * 50 + [1] * 3), 10, seed=0, num_classes=2)


def test_one_factorisation_and_one_draw_serve_explicit_sda_and_inversion():
    """covariance_factors: L L^T = Sigma (exact for positive definite, within the jitter for singular ones);
    explicit SDA and inversion draw the same eps for the same seed, class and strength."""
    g = torch.Generator().manual_seed(4)
    a, c = 6, 3
    cov = _spd(c, a, g).float()
    rank_two = torch.randn(2, a, generator=g, dtype=torch.float64)
    cov[2] = (rank_two.T @ rank_two).float()                          # singular
    factors = covariance_factors(cov, torch.arange(c))
    assert factors.dtype == torch.float64 and torch.equal(factors, factors.tril())
    rebuilt = factors @ factors.transpose(1, 2)
    torch.testing.assert_close(rebuilt[:2], cov[:2].double(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rebuilt[2], cov[2].double(), rtol=0, atol=1e-6 * cov[2].diagonal().mean().item())
    diagonal = covariance_factors(cov.diagonal(dim1=1, dim2=2), torch.tensor([1]))
    torch.testing.assert_close(diagonal, cov[1].diagonal().double().sqrt().unsqueeze(0))

    est = CovarianceEstimator(a, c)
    est.update(torch.randn(200, a, generator=g), torch.arange(200) % c)
    features, labels = torch.randn(4, a, generator=g), torch.tensor([2, 0, 2, 1])
    present, rows = torch.unique(labels, return_inverse=True)
    eps = sample_offsets(covariance_factors(est, present), rows, 3, 0.7, torch.Generator().manual_seed(9))
    augmented = sample_augmented_features(features, labels, est, 0.7, 3, torch.Generator().manual_seed(9))
    torch.testing.assert_close(augmented, features[:, None] + eps.float())
