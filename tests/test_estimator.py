"""CovarianceEstimator against numpy float64 statistics of every feature seen."""

import numpy as np
import pytest
import torch

from isda_viz.isda.estimator import CovarianceEstimator


def _stream(seed, batches, n, a, c, absent=()):
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        y = torch.randint(0, c, (n,), generator=g)
        for k in absent:
            y[y == k] = (k + 1) % c
        # Class-dependent offsets far from zero stress the merge's numerical stability.
        x = torch.randn(n, a, generator=g) * 2 + 50 * y[:, None].float() + 3
        yield x, y


@pytest.mark.parametrize("diagonal", [False, True])
def test_matches_population_statistics_of_all_features_seen(diagonal):
    a, c = 6, 5
    est = CovarianceEstimator(a, c, diagonal=diagonal)
    xs, ys = [], []
    for x, y in _stream(0, 9, 17, a, c, absent=(3,)):
        est.update(x, y)
        xs.append(x.double().numpy())
        ys.append(y.numpy())
    x, y = np.concatenate(xs), np.concatenate(ys)
    for k in range(c):
        xk = x[y == k]
        assert est.count[k].item() == len(xk)
        if len(xk) == 0:  # never seen: stays zero
            assert est.mean[k].abs().max() == 0 and est.covariance[k].abs().max() == 0
            continue
        cov = np.cov(xk.T, bias=True)  # population (divide-by-n) covariance
        expected = np.diag(cov) if diagonal else cov
        np.testing.assert_allclose(est.mean[k].numpy(), xk.mean(0), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(est.covariance[k].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert est.count[3] == 0


def test_batch_order_and_split_do_not_matter():
    a, c = 4, 3
    x = torch.randn(60, a, dtype=torch.float64)
    y = torch.randint(0, c, (60,))
    one = CovarianceEstimator(a, c)
    one.update(x, y)
    many = CovarianceEstimator(a, c)
    for i in range(0, 60, 7):
        many.update(x[i:i + 7], y[i:i + 7])
    torch.testing.assert_close(one.covariance, many.covariance, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one.count, many.count)


def test_single_feature_class_has_zero_covariance():
    est = CovarianceEstimator(3, 2)
    est.update(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([1]))
    assert est.covariance[1].abs().max() == 0
    torch.testing.assert_close(est.mean[1], torch.tensor([1.0, 2.0, 3.0]))


def test_large_feature_dimension_uses_the_chunked_path():
    # A = 2100: one class's (A, A) float64 scatter exceeds the chunk budget, so classes merge one by one.
    a, c = 2100, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, a, generator=g)
    y = torch.tensor([0, 0, 0, 2, 2, 0, 2, 2, 0, 0, 2, 2])
    est = CovarianceEstimator(a, c)
    est.update(x[:6], y[:6])
    est.update(x[6:], y[6:])
    for k in (0, 2):
        xk = x[y == k].double().numpy()
        np.testing.assert_allclose(est.covariance[k].numpy(), np.cov(xk.T, bias=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("diagonal", [False, True])
def test_state_dict_round_trip_continues_identically(diagonal):
    a, c = 5, 4
    stream = list(_stream(2, 4, 11, a, c))
    full = CovarianceEstimator(a, c, diagonal)
    for x, y in stream:
        full.update(x, y)
    half = CovarianceEstimator(a, c, diagonal)
    for x, y in stream[:2]:
        half.update(x, y)
    restored = CovarianceEstimator.from_state_dict(half.state_dict())
    for x, y in stream[2:]:
        restored.update(x, y)
    assert torch.equal(restored.covariance, full.covariance)
    assert torch.equal(restored.mean, full.mean)
    with pytest.raises(ValueError):
        CovarianceEstimator(a, c + 1, diagonal).load_state_dict(half.state_dict())
