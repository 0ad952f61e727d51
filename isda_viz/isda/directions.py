"""What ISDA varies for a class: the eigen-directions of Sigma_y, and a test that they are semantic.

ISDA's augmentation for class y is eps ~ N(0, lambda Sigma_y) (`sampling.sample_augmented_features`).
Written in the eigenbasis of Sigma_y = sum_k e_k u_k u_k^T, eps = sum_k sqrt(lambda e_k) g_k u_k with
g_k ~ N(0, 1): the augmentation moves along each u_k by a standard normal number of
sqrt(lambda e_k), and the direction's share of the expected ||eps||^2 is e_k / tr Sigma_y.

The semantic test compares how often an augmented feature keeps its class under three noises of
the same expected squared norm lambda tr Sigma_y:

    isda         eps ~ N(0, lambda Sigma_y)
    isotropic    eps ~ N(0, lambda tr(Sigma_y) / A I)
    other_class  eps ~ N(0, lambda Sigma_y') tr(Sigma_y) / tr(Sigma_y'), y' another class

If ISDA's directions are semantic (they change an image without changing its class) the first keeps
the class more often than the other two. Counts get a 95% Wilson score interval (`binomial_interval`).
Nothing here reads or writes files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from isda_viz.errors import IsdaVizError
from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.isda.sampling import sample_augmented_features

NOISES = ("isda", "isotropic", "other_class")
Z_95 = 1.959963984540054       # the standard normal's 97.5% quantile


@dataclass
class ClassDirections:
    """The top eigen-directions of one class covariance Sigma_y `(A, A)` (or its diagonal `(A,)`).

    `vectors (K, A)` float64 unit eigenvectors u_k, `values (K,)` their eigenvalues e_k (descending,
    clamped at 0), `shares (K,)` = e_k / tr Sigma_y, `trace` = tr Sigma_y, `effective_rank` =
    tr(Sigma)^2 / tr(Sigma^2) over every eigenvalue. Sign rule: each u_k is turned so that its entry of
    largest magnitude is positive (the first such entry on a tie), so runs repeat.
    """

    vectors: torch.Tensor
    values: torch.Tensor
    shares: torch.Tensor
    trace: float
    effective_rank: float

    @property
    def rest_share(self) -> float:
        """The share of tr Sigma_y outside the top K directions, in [0, 1]."""
        return max(0.0, 1.0 - float(self.shares.sum()))


def class_directions(covariance: torch.Tensor, k: int) -> ClassDirections:
    """The top `k` eigen-directions of `covariance` (`(A, A)` symmetric PSD, or `(A,)` a diagonal),
    from `torch.linalg.eigh` in float64, sorted by eigenvalue (largest first)."""
    a = covariance.shape[-1]
    if not 1 <= k <= a:
        raise IsdaVizError(f"--directions must be between 1 and the feature dimension {a}, not {k}")
    sigma = covariance.detach().to("cpu", torch.float64)
    if sigma.dim() == 1:                      # diagonal: the eigenvectors are the coordinate axes
        all_values, order = sigma.clamp_min(0).sort(descending=True, stable=True)
        vectors = torch.zeros(k, a, dtype=torch.float64)
        vectors[torch.arange(k), order[:k]] = 1.0
    else:
        all_values, basis = torch.linalg.eigh(sigma)            # ascending
        all_values, vectors = all_values.flip(0).clamp_min(0), basis.flip(1).T[:k].clone()
        largest = vectors.abs().argmax(1)
        vectors *= torch.sign(vectors[torch.arange(k), largest]).unsqueeze(1)
    trace = float(all_values.sum())
    square = float(all_values.pow(2).sum())
    shares = all_values[:k] / trace if trace > 0 else torch.zeros(k, dtype=torch.float64)
    return ClassDirections(vectors, all_values[:k].clone(), shares, trace,
                           trace * trace / square if square > 0 else 0.0)


def direction_shares(eps: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """The share of ||eps||^2 along each of `vectors (K, A)` (orthonormal) and the rest: `eps (M, A)` →
    `(M, K + 1)`, each row in [0, 1] summing to 1 (all zeros for eps = 0)."""
    eps = eps.to(torch.float64)
    squared = eps.pow(2).sum(1, keepdim=True)
    along = (eps @ vectors.to(eps).T).pow(2) / squared.clamp_min(1e-300)
    rest = (1 - along.sum(1, keepdim=True)).clamp_min(0)
    return torch.where(squared > 0, torch.cat([along, rest], 1), torch.zeros(()).to(eps))


def traversal_steps(steps: int, extent: float) -> torch.Tensor:
    """`steps` values of t evenly spaced over [-extent, extent], float64 `(S,)`."""
    return torch.linspace(-extent, extent, steps, dtype=torch.float64)


def traversal_targets(features: torch.Tensor, vectors: torch.Tensor, values: torch.Tensor, strength: float,
                      t: torch.Tensor) -> torch.Tensor:
    """a + t sqrt(lambda e_k) u_k: `features (N, A)`, each image's `vectors (N, K, A)` and `values (N, K)`,
    `t (S,)` → `(N, K, S, A)` in the features' dtype (t = 0 gives a itself)."""
    scale = (strength * values.to(torch.float64)).sqrt()                                         # (N, K)
    offsets = t.view(1, 1, -1, 1) * (scale[..., None, None] * vectors.to(torch.float64)[:, :, None])
    return features[:, None, None] + offsets.to(features)


def combined_traversal_target(features: torch.Tensor, vectors: torch.Tensor, values: torch.Tensor,
                              strength: float, t: torch.Tensor) -> torch.Tensor:
    """a + sum_k t_k sqrt(lambda e_k) u_k, every direction moved at once (one slider per direction):
    `features (N, A)`, `vectors (N, K, A)`, `values (N, K)`, `t (N, K)` → `(N, A)` in the features' dtype.
    Each term is `traversal_targets`' offset in the same float64 operations, so with one t_k non-zero the
    target is bit for bit that direction's `traversal_targets` target."""
    scale = (strength * values.to(torch.float64)).sqrt()                                         # (N, K)
    offsets = t.to(torch.float64)[..., None] * (scale[..., None] * vectors.to(torch.float64))    # (N, K, A)
    return features + offsets.sum(1).to(features)


def isda_noise(labels: torch.Tensor, estimator: CovarianceEstimator, strength: float, draws: int,
               generator: torch.Generator) -> torch.Tensor:
    """eps ~ N(0, lambda Sigma_y) for estimator slots `labels (N,)`: `(N, draws, A)` float64, CPU."""
    zeros = torch.zeros(len(labels), estimator.num_features, dtype=torch.float64)
    return sample_augmented_features(zeros, labels, estimator, strength, draws, generator)


def class_traces(estimator: CovarianceEstimator) -> torch.Tensor:
    """tr Sigma_c of every slot, float64 `(C,)` on the CPU."""
    cov = estimator.covariance.detach().to("cpu", torch.float64)
    return cov.sum(1) if estimator.diagonal else cov.diagonal(dim1=1, dim2=2).sum(1)


def isotropic_noise(labels: torch.Tensor, estimator: CovarianceEstimator, strength: float, draws: int,
                    generator: torch.Generator) -> torch.Tensor:
    """eps ~ N(0, lambda tr(Sigma_y) / A I): ISDA's expected squared norm, no preferred direction.
    `labels (N,)` estimator slots → `(N, draws, A)` float64, CPU."""
    a = estimator.num_features
    scale = (strength * class_traces(estimator)[labels.cpu()] / a).sqrt()
    return torch.randn(len(labels), draws, a, generator=generator, dtype=torch.float64) * scale[:, None, None]


def other_class_noise(labels: torch.Tensor, others: torch.Tensor, estimator: CovarianceEstimator,
                      strength: float, draws: int, generator: torch.Generator) -> torch.Tensor:
    """eps ~ N(0, lambda Sigma_y') tr(Sigma_y) / tr(Sigma_y'): another class's directions at ISDA's
    expected squared norm. `labels (N,)`, `others (N,)` estimator slots of y and y' → `(N, draws, A)`."""
    traces = class_traces(estimator)
    if (traces[others.cpu()] <= 0).any():
        raise IsdaVizError("another class's covariance is zero; the other-class control cannot be scaled")
    scale = (traces[labels.cpu()] / traces[others.cpu()]).sqrt()
    return isda_noise(others, estimator, strength, draws, generator) * scale[:, None, None]


def pick_other_classes(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """For each class index in `labels (N,)` one other class, uniformly among the `num_classes - 1` others."""
    if num_classes < 2:
        raise IsdaVizError("the other-class control needs a classifier of at least two classes")
    offset = torch.randint(1, num_classes, (len(labels),), generator=generator)
    return (labels.cpu() + offset) % num_classes


@torch.no_grad()
def kept_class(fc: nn.Linear, features: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """How many of each image's augmented features a + eps the last layer still assigns to its class:
    `features (N, A)`, `labels (N,)` class indices, `eps (N, M, A)` → int64 counts `(N,)` in [0, M]."""
    weight = fc.weight.detach()
    augmented = features.detach()[:, None].to(weight) + eps.to(weight)
    predicted = fc(augmented).argmax(2)
    return (predicted == labels.to(predicted.device)[:, None]).sum(1).cpu()


def binomial_interval(kept: int, total: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a rate `kept / total` (`(0, 1)` for no trials)."""
    if total <= 0:
        return 0.0, 1.0
    p, z2 = kept / total, Z_95 * Z_95
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = Z_95 * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


TOP_DIRECTIONS = 5   # the directions each augmented image of `augment`/`grid` is broken down along


def augmentation_shares(eps: torch.Tensor, labels: torch.Tensor, covariance_of, k: int = TOP_DIRECTIONS
                        ) -> torch.Tensor:
    """The share of each augmentation's ||eps||^2 along the top `k` directions of its class and the rest:
    `eps (N, K, A)`, `labels (N,)` class indices, `covariance_of(c)` Sigma_c → float64 `(N, K, k + 1)`
    (k capped at A)."""
    k = min(k, eps.shape[-1])
    tops = {c: class_directions(covariance_of(c), k) for c in sorted(set(labels.tolist()))}
    return torch.stack([direction_shares(eps[i], tops[int(c)].vectors) for i, c in enumerate(labels.tolist())])
