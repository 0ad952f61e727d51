"""The audit's index: exact search against float64 brute force, IVF-PQ recall, the copy score and its calibration.

Searches run over the first 2000 Fashion-MNIST training images, so the module takes seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from isda_viz.data.datasets import DEBIAN_FASHION_MNIST, load_split
from isda_viz.audit.index import NeighbourIndex, calibrate, choose_index_params, copy_score

N_TRAIN = 2000

pytestmark = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(),
                                reason="needs Debian's dataset-fashion-mnist (tests never download)")


def brute_force(base: np.ndarray, queries: np.ndarray, k: int):
    """Independent reference: float64 squared L2 of every pair, sorted by (distance, row)."""
    b, q = base.astype(np.float64), queries.astype(np.float64)
    d2 = ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    order = np.array([np.lexsort((np.arange(len(b)), row))[:k] for row in d2])
    return np.take_along_axis(d2, order, 1), order


@pytest.fixture(scope="module")
def splits():
    return load_split("fashion-mnist", True, limit=N_TRAIN), load_split("fashion-mnist", False)


# ------------------------------------------------------------------------------------- exact search


def test_flat_search_equals_float64_brute_force_on_pixels_and_features(splits):
    train, test = splits
    pixels = train.images.reshape(len(train), -1).numpy()
    queries = test.images[:32].reshape(32, -1).numpy()
    d2, rows = NeighbourIndex.flat(pixels).search(queries, 7)
    ref_d2, ref_rows = brute_force(pixels / 255.0, queries / 255.0, 7)
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(rows, ref_rows)

    rng = np.random.default_rng(1)
    features = rng.normal(size=(3000, 64)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    feature_queries = features[:20] + rng.normal(0, 0.3, size=(20, 64)).astype(np.float32)
    d2, rows = NeighbourIndex.flat(features).search(feature_queries, 5)
    ref_d2, ref_rows = brute_force(features, feature_queries, 5)
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(rows, ref_rows)


def test_ivfpq_returns_exact_distances_and_high_recall(splits):
    train, test = splits
    pixels = train.images.reshape(len(train), -1).numpy()
    queries = test.images[:64].reshape(64, -1).numpy()
    params = choose_index_params("ivfpq", len(pixels), pixels.shape[1])
    d2, rows = NeighbourIndex.train_ivfpq(pixels, params).search(queries, 5)
    ref_d2, ref_rows = brute_force(pixels / 255.0, queries / 255.0, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows, ref_rows)])
    assert recall >= 0.9
    own = ((pixels[rows].astype(np.float64) - queries[:, None, :]) ** 2).sum(-1) / 255.0**2
    np.testing.assert_allclose(d2, own, rtol=1e-12)  # whatever it found, distances are exact
    assert np.all(d2 >= ref_d2 - 1e-12)              # and never better than the true neighbours


def test_auto_picks_flat_for_small_sets_and_ivfpq_for_large():
    assert choose_index_params("auto", 60_000, 784).kind == "flat"
    big = choose_index_params("auto", 1_281_167, 2048)
    assert big.kind == "ivfpq" and big.nlist >= 1024 and big.pca_dim == 128


def test_calibration_flags_at_most_one_percent_and_no_tighter_threshold_exists():
    rng = np.random.default_rng(0)
    d = np.concatenate([rng.gamma(5, 1, 997), [0.0, 0.0, 0.5]])  # a few exact copies among them
    cal = calibrate(d)
    scores = d / np.median(d)
    assert cal["median_distance"] == pytest.approx(np.median(d))
    assert (scores < cal["threshold"]).sum() <= math.floor(0.01 * len(d))
    # reference: the largest candidate threshold that still flags at most 1%
    best = max(t for t in scores if (scores < t).sum() <= 0.01 * len(d))
    assert cal["threshold"] == pytest.approx(best)


def test_copy_score_is_nearest_distance_over_reference_median():
    rng = np.random.default_rng(3)
    reference = rng.gamma(4, 0.5, 501)      # held-out nearest distances
    nearest = rng.gamma(4, 0.5, (7, 3))     # any shape of query distances
    median = float(np.median(reference))
    expected = nearest.astype(np.float64) / np.sort(reference)[250]  # the median of 501 values, by hand
    np.testing.assert_allclose(copy_score(nearest, median), expected, rtol=1e-15)
    assert copy_score(nearest, median).shape == (7, 3)
    assert copy_score(0.0, median) == 0.0
    assert float(copy_score(np.float32(median), median)) == pytest.approx(1.0, rel=1e-7)
    # calibration scores the test images with the same function: its threshold is one of their scores
    cal = calibrate(reference)
    assert cal["threshold"] in set(copy_score(reference, cal["median_distance"]).tolist())
