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


def covariance_factors(covariance: torch.Tensor | CovarianceEstimator, classes: torch.Tensor) -> torch.Tensor:
    """Square roots L of Sigma_c (L L^T = Sigma_c) for c in `classes (K,)`, float64 on the covariance's device:
    lower Cholesky factors `(K, A, A)`, or `(K, A)` standard deviations for a diagonal covariance.

    Estimated covariances are often singular (A can exceed the number of features seen), so a class
    whose Cholesky fails (an error, or a factor that is not finite) gets the smallest jitter that works,
    relative to its mean variance: +jitter * mean(diag Sigma_c) * I, jitter in 1e-10 ... 1e-4 (none for
    positive definite classes).
    """
    if isinstance(covariance, CovarianceEstimator):
        covariance = covariance.covariance
    sigma = covariance.detach()[classes.to(covariance.device)].to(torch.float64)
    if not torch.isfinite(sigma).all():
        raise IsdaVizError("a class covariance holds inf or NaN: the classifier's features of its training images are "
                           "not finite (check its weights and the images it saw)")
    if sigma.dim() == 2:
        return sigma.clamp_min(0).sqrt()
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device)
    base = sigma.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)[:, None, None]
    factors, todo = torch.empty_like(sigma), torch.arange(len(sigma), device=sigma.device)
    for jitter in (0.0, 1e-10, 1e-8, 1e-6, 1e-4):
        factor, info = torch.linalg.cholesky_ex(sigma[todo] + jitter * base[todo] * eye)
        # CUDA's batched Cholesky can report success (info 0) with NaN in the factor of a singular matrix:
        # a factor counts only if it is finite, else the class goes on to the next jitter.
        done = (info == 0) & torch.isfinite(factor).flatten(1).all(1)
        factors[todo[done]] = factor[done]
        todo = todo[~done]
        if not len(todo):
            return factors
    raise IsdaVizError("a class covariance is not positive semi-definite; the classifier run's statistics are broken")


def sample_offsets(factors: torch.Tensor, rows: torch.Tensor, samples: int, strength: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The one draw of the ISDA noise: `(N, samples, A)` float64 eps ~ N(0, strength Sigma_c), c = the class
    of `factors` (from `covariance_factors`) at `rows[n]`, on the factors' device.

    Standard normals `(N, samples, A)` float64 come from `generator` on its own device (CPU by default),
    so a seed fixes them whatever device the features are on; eps_n = sqrt(strength) L_c u_n.
    """
    n, a = len(rows), factors.shape[-1]
    device = generator.device if generator is not None else factors.device
    u = torch.randn(n, samples, a, generator=generator, device=device, dtype=torch.float64).to(factors.device)
    rows = rows.to(factors.device)
    if factors.dim() == 2:
        return math.sqrt(strength) * (u * factors[rows][:, None, :])
    eps = torch.empty_like(u)
    for i in range(len(factors)):  # class by class: no (N, A, A) gather of the factors
        members = (rows == i).nonzero().squeeze(1)
        eps[members] = u[members] @ factors[i].T
    return math.sqrt(strength) * eps


def _factors_of(covariance, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`covariance_factors` of the classes present in `classes (N,)`, and each row's place among them `(N,)`."""
    present, rows = torch.unique(classes, return_inverse=True)
    return covariance_factors(covariance, present), rows


def _augmented(features: torch.Tensor, factors: torch.Tensor, rows: torch.Tensor, samples: int, strength: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """`(samples, N, A)` features a + eps (`sample_offsets`), in the features' dtype and device."""
    eps = sample_offsets(factors, rows, samples, strength, generator)
    return features.unsqueeze(0) + eps.transpose(0, 1).to(features)


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
    factors, rows = _factors_of(covariance, targets)
    logits = fc(_augmented(features, factors, rows, samples, strength, generator))      # (M, N, C)
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
    factors, rows = _factors_of(covariance, classes)
    n, a = features.shape
    chunk = max(1, min(samples, max_elements // max(1, n * a)))
    total = torch.zeros(n, dtype=torch.float64, device=features.device)
    total_sq = torch.zeros_like(total)
    done = 0
    while done < samples:
        m = min(chunk, samples - done)
        log_probs = F.log_softmax(fc(_augmented(features, factors, rows, m, strength, generator)), dim=2)
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
    """a~ = a + eps, eps ~ N(0, strength * Sigma_y): `features (N, A)`, `labels (N,)` → `(N, K, A)`
    (`covariance_factors`, `sample_offsets`; the noise is drawn on `generator`'s device, the CPU by default)."""
    factors, rows = _factors_of(estimator, labels)
    return features[:, None] + sample_offsets(factors, rows, k, strength, generator).to(features)
