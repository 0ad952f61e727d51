"""Draws of the ISDA noise eps ~ N(0, lambda Sigma_y), and what uses them.

One factorisation and one sampler serve explicit semantic data augmentation
(Eq. 5), the Monte-Carlo estimate of the expected cross-entropy that Eqs. 7 and 15
bound (Eqs. 3-4 and 14), and the augmented features the inverter turns into
images (Step II, a~ = a + eps).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.errors import IsdaVizError
from isda_viz.isda.estimator import CovarianceEstimator


def _covariance_factors(covariance: torch.Tensor | CovarianceEstimator, classes: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    """Square roots L of Sigma_c (L L^T = Sigma_c) for c in `classes (K,)`: `(K, A, A)`, or `(K, A)` standard
    deviations for a diagonal covariance. An eigendecomposition, not Cholesky: estimated covariances are
    often singular (fewer samples than dimensions), and tiny negative eigenvalues from rounding count as 0."""
    if isinstance(covariance, CovarianceEstimator):
        covariance = covariance.covariance
    sigma = covariance.detach()[classes].to(torch.float64)
    if sigma.dim() == 2:
        return sigma.clamp_min(0).sqrt().to(dtype)
    values, vectors = torch.linalg.eigh(sigma)
    return (vectors * values.clamp_min(0).sqrt().unsqueeze(1)).to(dtype)


def _sample_offsets(factors: torch.Tensor, rows: torch.Tensor, samples: int, strength: float,
                    generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """`(samples, N, A)` draws of eps ~ N(0, strength Sigma_c), c = classes[rows[n]], on `like`'s device and dtype.

    Standard normals come from `generator` on its own device (CPU by default), so a seed fixes them
    whatever device the features are on."""
    n, a = len(rows), like.shape[1]
    device = generator.device if generator is not None else like.device
    u = torch.randn(samples, n, a, generator=generator, device=device, dtype=like.dtype).to(like.device)
    if factors.dim() == 2:
        return math.sqrt(strength) * u * factors[rows]
    eps = torch.empty_like(u)
    for i in range(len(factors)):  # class by class: no (N, A, A) gather of the factors
        members = (rows == i).nonzero().squeeze(1)
        eps[:, members] = u[:, members] @ factors[i].T
    return math.sqrt(strength) * eps


def explicit_sda_loss(features: torch.Tensor, fc: nn.Linear, targets: torch.Tensor,
                      covariance: torch.Tensor | CovarianceEstimator, strength: float, samples: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 5, explicit semantic data augmentation: mean cross-entropy over `samples` = M augmented
    features per image, ã_m ~ N(a, strength Sigma_y) drawn afresh each call.

    The naive method ISDA replaces: an M-sample Monte-Carlo estimate of the expected
    cross-entropy that Eq. 7 bounds (M -> infinity gives the expectation, not the bound).
    `features (N, A)` (gradients flow through them and through `fc`), `fc` the final
    `nn.Linear(A, C)`, `targets (N,)`, `covariance (C, A, A)`, `(C, A)` diagonal or a
    `CovarianceEstimator` (a constant), `strength` = lambda >= 0, `samples` >= 1.
    Memory: an `(M, N, A)` tensor.
    """
    if samples < 1:
        raise IsdaVizError(f"explicit augmentation needs at least 1 sample per image, got {samples}")
    classes, rows = torch.unique(targets, return_inverse=True)
    factors = _covariance_factors(covariance, classes, features.dtype).to(features.device)
    augmented = features.unsqueeze(0) + _sample_offsets(factors, rows, samples, strength, generator, features)
    logits = fc(augmented)                                                          # (M, N, C)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.repeat(samples))


@torch.no_grad()
def expected_cross_entropy_mc(features: torch.Tensor, fc: nn.Linear, targets: torch.Tensor,
                              covariance: torch.Tensor | CovarianceEstimator, strength: float,
                              samples: int = 1000, generator: torch.Generator | None = None,
                              classes: torch.Tensor | None = None,
                              max_elements: int = 2**23) -> tuple[float, float]:
    """Monte-Carlo estimate of the expected cross-entropy that the ISDA losses bound, and its standard error.

    Supervised (Eqs. 3-4, bounded by Eq. 7): `targets (N,)` int labels, mean over images of
    E[CE(W ã + b, y)] with ã ~ N(a, strength Sigma_y). Semi-supervised (Eq. 14, bounded
    by Eq. 15): `targets (N, C)` probabilities p, E[-sum_k p_k log softmax_k(W ã + b)] with
    ã ~ N(a, strength Sigma_ỹ), ỹ = `classes (N,)` (default argmax p, Eq. 12).
    `features (N, A)`, `fc` the final `nn.Linear(A, C)`, `covariance` as in `explicit_sda_loss`,
    `samples` >= 2 draws per image, taken in chunks of at most `max_elements` augmented
    feature values so memory stays bounded. Returns `(mean, stderr)` in nats; stderr is the
    standard error of the mean over the draws (the images are fixed), from per-image
    sample variances: sqrt(sum_i var_i / samples) / N.
    """
    if samples < 2:
        raise IsdaVizError(f"a Monte-Carlo estimate with a standard error needs at least 2 samples, got {samples}")
    soft = targets.dim() == 2
    if classes is None:
        classes = targets.argmax(1) if soft else targets
    present, rows = torch.unique(classes, return_inverse=True)
    factors = _covariance_factors(covariance, present, features.dtype).to(features.device)
    n, a = features.shape
    chunk = max(1, min(samples, max_elements // max(1, n * a)))
    total = torch.zeros(n, dtype=torch.float64, device=features.device)
    total_sq = torch.zeros_like(total)
    done = 0
    while done < samples:
        m = min(chunk, samples - done)
        log_probs = F.log_softmax(fc(features.unsqueeze(0) + _sample_offsets(factors, rows, m, strength,
                                                                             generator, features)), dim=2)
        if soft:
            ce = -(log_probs * targets.to(log_probs.dtype).unsqueeze(0)).sum(2)            # (m, N)
        else:
            ce = -log_probs.gather(2, targets.view(1, n, 1).expand(m, n, 1)).squeeze(2)
        ce = ce.to(torch.float64)
        total += ce.sum(0)
        total_sq += (ce * ce).sum(0)
        done += m
    mean = total / samples
    variance = ((total_sq - samples * mean * mean) / (samples - 1)).clamp_min(0)
    return mean.mean().item(), math.sqrt(variance.sum().item() / samples) / n


def sample_augmented_features(features: torch.Tensor, labels: torch.Tensor, estimator: CovarianceEstimator,
                              strength: float, k: int, generator: torch.Generator) -> torch.Tensor:
    """a~ = a + eps, eps ~ N(0, strength * Sigma_y): `features (N, A)`, `labels (N,)` → `(N, K, A)`.

    Full covariances are factorised by Cholesky with growing jitter (they are
    often singular: A can exceed the number of features seen); diagonal ones by
    per-dimension standard deviation. Noise is drawn on the CPU from `generator`.
    """
    n, a = features.shape
    noise = torch.randn(n, k, a, generator=generator, dtype=torch.float64)
    cov = estimator.covariance[labels.to(estimator.device)].detach().cpu().double()
    if not torch.isfinite(cov).all():
        raise IsdaVizError("a class covariance holds inf or NaN: the classifier's features of its training images are "
                           "not finite (check its weights and the images it saw)")
    if estimator.diagonal:
        eps = noise * cov.clamp_min(0).sqrt()[:, None, :]
    else:
        eps = torch.einsum("nab,nkb->nka", _cholesky(cov), noise)
    return features[:, None] + (math.sqrt(strength) * eps).to(features)


def _cholesky(cov: torch.Tensor) -> torch.Tensor:
    """Lower factors L with L L^T = cov + jitter I, `(N, A, A)` float64, jitter the smallest that works."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
    base = cov.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)[:, None, None]
    for jitter in (0.0, 1e-10, 1e-8, 1e-6, 1e-4):
        factor, info = torch.linalg.cholesky_ex(cov + jitter * base * eye)
        if not info.any():
            return factor
    raise IsdaVizError("a class covariance is not positive semi-definite; the classifier run's statistics are broken")
