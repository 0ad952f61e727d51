"""ISDA logits and loss against brute-force float64 references and a Monte Carlo expectation."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.isda.loss import ISDALoss, isda_augmented_logits
from isda_viz.isda.estimator import CovarianceEstimator


def _brute_force(logits, weight, targets, covariance, strength):
    """Per sample and class: z_j + strength/2 (w_j - w_y)^T Sigma_y (w_j - w_y), in plain loops."""
    n, c = logits.shape
    out = logits.clone()
    for i in range(n):
        y = targets[i]
        sigma = covariance[y] if covariance.dim() == 3 else torch.diag(covariance[y])
        for j in range(c):
            d = weight[j] - weight[y]
            out[i, j] = logits[i, j] + 0.5 * strength * (d @ sigma @ d)
    return out


def _spd(c, a, generator):
    m = torch.randn(c, a, a, dtype=torch.float64, generator=generator)
    return m @ m.transpose(1, 2) / a


@pytest.mark.parametrize("diagonal", [False, True])
def test_augmented_logits_and_gradient_match_brute_force(diagonal):
    g = torch.Generator().manual_seed(0)
    n, a, c = 23, 7, 6
    logits = torch.randn(n, c, dtype=torch.float64, generator=g)
    weight = torch.randn(c, a, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, c - 1, (n,), generator=g)  # class c-1 absent from the batch
    cov = _spd(c, a, g)
    cov = torch.diagonal(cov, dim1=1, dim2=2).clone() if diagonal else cov
    ours = isda_augmented_logits(logits, weight, targets, cov, 0.8)
    ref = _brute_force(logits, weight, targets, cov, 0.8)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    upstream = torch.randn(n, c, dtype=torch.float64, generator=g)
    (g_ours,) = torch.autograd.grad((ours * upstream).sum(), weight)
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), weight)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda w: isda_augmented_logits(logits, w, targets, cov, 0.8), (weight,))


def test_large_feature_dimension_loops_over_classes_exactly():
    # A = 1100 in float32: gathering all present covariances would exceed the gather budget.
    g = torch.Generator().manual_seed(3)
    n, a, c = 5, 1100, 4
    weight = torch.randn(c, a, generator=g, requires_grad=True)
    targets = torch.tensor([0, 2, 2, 3, 0])
    cov = torch.randn(c, a, 32, generator=g)
    cov = cov @ cov.transpose(1, 2) / 32
    logits = torch.zeros(n, c)
    ours = isda_augmented_logits(logits, weight, targets, cov, 1.0)
    ref = _brute_force(logits.double(), weight.double(), targets, cov.double(), 1.0)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-3)


def test_strength_zero_is_exactly_cross_entropy_and_still_updates_statistics():
    g = torch.Generator().manual_seed(1)
    fc = nn.Linear(5, 4)
    features = torch.randn(9, 5, generator=g)
    targets = torch.randint(0, 4, (9,), generator=g)
    criterion = ISDALoss(5, 4)
    criterion.estimator.update(torch.randn(40, 5, generator=g) * 3, torch.randint(0, 4, (40,), generator=g))
    loss = criterion(features, fc, targets, 0.0)
    assert torch.equal(loss, F.cross_entropy(fc(features), targets))
    assert criterion.estimator.count.sum() == 49


def test_loss_uses_estimator_updated_with_the_batch():
    g = torch.Generator().manual_seed(2)
    fc = nn.Linear(4, 3).double()
    features = torch.randn(12, 4, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 3, (12,), generator=g)
    criterion = ISDALoss(4, 3)
    loss = criterion(features, fc, targets, 0.5)
    est = CovarianceEstimator(4, 3)
    est.update(features.detach(), targets)
    ref = F.cross_entropy(_brute_force(fc(features), fc.weight, targets, est.covariance.double(), 0.5), targets)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert features.grad is not None and fc.weight.grad is not None


@pytest.mark.parametrize("strength", [0.1, 0.5, 2.0])
def test_isda_loss_upper_bounds_the_monte_carlo_expected_cross_entropy(strength):
    """Proposition 1: E_eps[CE(W(a + eps) + b)] <= ISDA loss, eps ~ N(0, strength Sigma_y); close for small strength."""
    g = torch.Generator().manual_seed(4)
    n, a, c, samples = 6, 5, 4, 200_000
    weight = torch.randn(c, a, dtype=torch.float64, generator=g) * 0.6
    bias = torch.randn(c, dtype=torch.float64, generator=g)
    features = torch.randn(n, a, dtype=torch.float64, generator=g)
    targets = torch.arange(n) % c
    cov = _spd(c, a, g)
    logits = features @ weight.T + bias
    augmented = isda_augmented_logits(logits, weight, targets, cov, strength)
    bound = F.cross_entropy(augmented, targets, reduction="none")
    chol = torch.linalg.cholesky(cov * strength)
    for i in range(n):
        eps = torch.randn(samples, a, dtype=torch.float64, generator=g) @ chol[targets[i]].T
        mc = F.cross_entropy((features[i] + eps) @ weight.T + bias, targets[i].expand(samples), reduction="none")
        mean, stderr = mc.mean().item(), mc.std().item() / math.sqrt(samples)
        assert mean <= bound[i].item() + 4 * stderr
        if strength <= 0.5:  # the bound is tight for small augmentation strength (the paper's Fig. 9)
            assert bound[i].item() - mean <= 0.05 + 0.25 * strength * bound[i].item()


def test_isda_loss_state_round_trips_through_module_state_dict():
    criterion = ISDALoss(3, 2, covariance="diagonal")
    criterion.estimator.update(torch.randn(10, 3), torch.randint(0, 2, (10,)))
    other = ISDALoss(3, 2, covariance="diagonal")
    other.load_state_dict(criterion.state_dict())
    assert torch.equal(other.estimator.covariance, criterion.estimator.covariance)
