"""The ISDA loss (the paper's Eq. 7): cross-entropy of covariance-augmented logits.

For a sample of class y with logits z, the upper bound of the expected
cross-entropy over features a + eps, eps ~ N(0, lambda Sigma_y), is the
cross-entropy of

    z_j + (lambda / 2) (w_j - w_y)^T Sigma_y (w_j - w_y).

The quadratic term depends on the sample only through its label, so it is
computed once per class present in the batch: a `(K, C)` table for K present
classes, never the `(N, A, A)`, `(N, C, C)` or `(N, C, A)` tensors of the
reference code. Full covariance: P_k = (W - w_k) Sigma_k is one `(C, A) x (A, A)`
product per class, and because Sigma_k is symmetric the gradient of
d^T Sigma d is 2 Sigma d, i.e. 2 P_k: the backward pass reuses the forward
product instead of a second matrix product. Diagonal covariance: three
`(K, A) x (A, C)` products. `ISDALoss` hands over its estimator itself, so that
with large A each class's covariance is applied as its merged part plus the rows
buffered since (see `CovarianceEstimator`) instead of being rewritten every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import IsdaVizError
from .estimator import CovarianceEstimator

# Gather all present classes' covariances at once when that copy stays below this many bytes;
# past it (large A) loop over classes and use each class's covariance in place.
_GATHER_BYTES = 16 * 2**20


class _FullQuadraticForms(torch.autograd.Function):
    """`s (K, C)`: s[k, j] = (w_j - w_c)^T Sigma_c (w_j - w_c) for c = classes[k].

    Only the products P_k = (W - w_c) Sigma_c `(K, C, A)` are kept for the backward
    pass. Small A: batched over classes. Large A: one class at a time, so each
    class's `(C, A)` blocks stay in cache between the product and the row-wise dot
    (forward) or the two reductions (backward), and no other `(K, C, A)` tensor is made.
    """

    @staticmethod
    def forward(ctx, weight, classes, covariance, multiply):
        """Batched with `covariance (C, A, A)`, or class by class with `multiply(c, x, out)` = x @ Sigma_c."""
        k, (c, a) = len(classes), weight.shape
        ctx.batched = covariance is not None
        if ctx.batched:
            diffs = weight.unsqueeze(0) - weight[classes].unsqueeze(1)          # (K, C, A)
            products = diffs @ covariance[classes].to(weight.dtype)              # (K, C, A)
            s = (products * diffs).sum(-1)
        else:  # each product written straight into its slice
            products = weight.new_empty(k, c, a)
            s = weight.new_empty(k, c)
            for i, cls in enumerate(classes.tolist()):
                diff = weight - weight[cls]                                      # (C, A)
                multiply(cls, diff, out=products[i])
                torch.sum(products[i] * diff, 1, out=s[i])
        ctx.save_for_backward(products, classes)
        return s

    @staticmethod
    def backward(ctx, grad_s):
        # d s[k, j] / d w_j = 2 P[k, j] and d s[k, j] / d w_c = -2 P[k, j] (Sigma symmetric).
        products, classes = ctx.saved_tensors
        grad_s = 2 * grad_s
        if ctx.batched:
            grad_diffs = grad_s.unsqueeze(-1) * products                         # (K, C, A)
            grad_weight = grad_diffs.sum(0)
            grad_class = grad_diffs.sum(1)                                       # (K, A)
        else:
            grad_weight = products.new_zeros(products.shape[1:])
            grad_class = products.new_empty(len(classes), products.shape[2])
            for i in range(len(classes)):
                grad_weight.addcmul_(grad_s[i].unsqueeze(1), products[i])
                torch.mv(products[i].T, grad_s[i], out=grad_class[i])
        grad_weight.index_add_(0, classes, -grad_class)
        return grad_weight, None, None, None


def _diagonal_quadratic_forms(weight, classes, variance):
    """`s (K, C)` for diagonal covariance `variance (C, A)`, by expanding (w_j - w_c)^2."""
    var = variance[classes].to(weight.dtype)                                     # (K, A)
    w_c = weight[classes]                                                        # (K, A)
    return var @ (weight * weight).T - 2 * (var * w_c) @ weight.T + (var * w_c * w_c).sum(1, keepdim=True)


def class_quadratic_forms(weight: torch.Tensor, classes: torch.Tensor,
                          covariance: torch.Tensor | CovarianceEstimator) -> torch.Tensor:
    """`(K, C)` table of (w_j - w_c)^T Sigma_c (w_j - w_c) for each class c in `classes (K,)`.

    `weight (C, A)`; `covariance (C, A, A)` full or `(C, A)` diagonal (per-dimension
    variances), or a `CovarianceEstimator`, whose current covariances are then used
    without merging its buffered rows. Differentiable in `weight`; the covariance is
    treated as a constant.
    """
    if isinstance(covariance, CovarianceEstimator):
        if covariance.defers_merges:
            return _FullQuadraticForms.apply(weight, classes, None, covariance.multiply_covariance)
        covariance = covariance.covariance
    covariance = covariance.detach()
    if covariance.dim() == 2:
        return _diagonal_quadratic_forms(weight, classes, covariance)
    if len(classes) * weight.shape[1] ** 2 * weight.element_size() <= _GATHER_BYTES:
        return _FullQuadraticForms.apply(weight, classes, covariance, None)

    def multiply(c, x, out):  # large A: each class's covariance used in place, not gathered
        return torch.mm(x, covariance[c].to(x.dtype), out=out)
    return _FullQuadraticForms.apply(weight, classes, None, multiply)


def isda_augmented_logits(logits: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          covariance: torch.Tensor | CovarianceEstimator, strength: float) -> torch.Tensor:
    """`(N, C)`: logits + (strength / 2) (w_j - w_y)^T Sigma_y (w_j - w_y).

    `logits (N, C)`, `weight (C, A)` of the final linear layer, `targets (N,)`,
    `covariance (C, A, A)` or `(C, A)` diagonal (or a `CovarianceEstimator`), `strength` = λ >= 0,
    the augmentation strength.
    """
    classes, row = torch.unique(targets, return_inverse=True)
    table = class_quadratic_forms(weight, classes, covariance)
    return logits + (0.5 * strength) * table[row]


class ISDALoss(nn.Module):
    """Cross-entropy of ISDA-augmented logits, with its own online covariance estimator.

    `loss = criterion(features (N, A), fc, targets (N,), strength)`: the estimator is
    first updated with the detached batch features (as in the reference code), then
    the augmented logits use the updated covariances. `strength = 0` returns exactly
    `F.cross_entropy(fc(features), targets)`.
    """

    def __init__(self, num_features: int, num_classes: int, covariance: str = "full"):
        super().__init__()
        if covariance not in ("full", "diagonal"):
            raise ValueError("covariance must be 'full' or 'diagonal'")
        self.estimator = CovarianceEstimator(num_features, num_classes, diagonal=covariance == "diagonal")

    def forward(self, features: torch.Tensor, fc: nn.Linear, targets: torch.Tensor,
                strength: float) -> torch.Tensor:
        if self.estimator.device != features.device:
            self.estimator.to(features.device)
        self.estimator.update(features.detach(), targets)
        logits = fc(features)
        if strength == 0:
            return F.cross_entropy(logits, targets)
        augmented = isda_augmented_logits(logits, fc.weight, targets, self.estimator, strength)
        return F.cross_entropy(augmented, targets)

    def get_extra_state(self) -> dict:
        return self.estimator.state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.estimator = CovarianceEstimator.from_state_dict(state, device=self.estimator.device)


# --- Semi-supervised ISDA (Eqs. 12-15), explicit semantic data augmentation (Eq. 5) and a Monte-Carlo
# estimate of the expected cross-entropy that Eq. 7 and Eq. 15 bound (Eqs. 3-4 and 14). ---

def _times_covariance(covariance, c: int, x: torch.Tensor) -> torch.Tensor:
    """`x (M, A) @ Sigma_c`, differentiable in x; `covariance` as in `class_quadratic_forms`."""
    if isinstance(covariance, CovarianceEstimator):
        if covariance.defers_merges:
            return covariance.multiply_covariance(c, x)
        covariance = covariance.covariance
    sigma = covariance[c].detach().to(x.dtype)
    return x * sigma if sigma.dim() == 1 else x @ sigma


def pairwise_quadratic_forms(weight: torch.Tensor, classes: torch.Tensor,
                             covariance: torch.Tensor | CovarianceEstimator) -> torch.Tensor:
    """`(K, C, C)` table: T[i, k, j] = (w_j - w_k)^T Sigma_c (w_j - w_k) for c = classes[i].

    Every target k against every class j, under one class's covariance (Eq. 15 needs all
    targets k with the covariance of the pseudo label). Written through the Gram matrix
    G_c = W Sigma_c W^T `(C, C)`: T = diag(G)_k + diag(G)_j - 2 G_kj, one `(C, A) x (A, A)`
    and one `(C, A) x (A, C)` product per class instead of the `(C, C, A)` differences.
    `weight (C, A)`; `covariance (C, A, A)`, `(C, A)` diagonal, or a `CovarianceEstimator`
    (treated as a constant). Differentiable in `weight`; the diagonal T[i, k, k] is exactly 0.
    """
    tables = []
    for c in classes.tolist():
        gram = _times_covariance(covariance, c, weight) @ weight.T           # (C, C)
        sq = torch.diagonal(gram)
        tables.append(sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * gram)
    if not tables:
        return weight.new_zeros(0, weight.shape[0], weight.shape[0])
    return torch.stack(tables)


def semi_supervised_augmented_logits(logits: torch.Tensor, weight: torch.Tensor, pseudo_labels: torch.Tensor,
                                     covariance: torch.Tensor | CovarianceEstimator,
                                     strength: float) -> torch.Tensor:
    """`(N, C, C)`: out[n, k, j] = z_nj + (strength / 2) (w_j - w_k)^T Sigma_ỹ (w_j - w_k), ỹ = pseudo_labels[n].

    Row k holds the augmented logits of Eq. 15's k-th term (the supervised Eq. 7 logits
    with target k, but the covariance of the pseudo label). `logits (N, C)`, `weight (C, A)`,
    `pseudo_labels (N,)` int, `covariance` as in `pairwise_quadratic_forms`, `strength` = lambda >= 0.
    """
    classes, row = torch.unique(pseudo_labels, return_inverse=True)
    table = pairwise_quadratic_forms(weight, classes, covariance)            # (K, C, C)
    return logits.unsqueeze(1) + (0.5 * strength) * table[row]


def semi_supervised_isda_loss(logits: torch.Tensor, weight: torch.Tensor, probs: torch.Tensor,
                              covariance: torch.Tensor | CovarianceEstimator, strength: float,
                              pseudo_labels: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Eq. 15, the ISDA consistency term of an unlabeled sample: the upper bound

        -sum_k p_k log softmax_k(z + (lambda / 2) v_k^T Sigma_ỹ v_k),   v_k[j] = w_j - w_k,

    of Eq. 14, the expected -sum_k p_k log softmax_k(W ã + b) over ã ~ N(a, lambda Sigma_ỹ)
    (Jensen's inequality, term by term as in Eq. 7). Up to the entropy of p, which does not
    depend on the network, it bounds the expected KL(p || prediction on ã) of Eq. 13.

    `logits (N, C)` = W a + b of the unlabeled features; `weight (C, A)` of the final
    linear layer; `probs (N, C)` the prediction p the augmented features must agree with
    (rows sum to 1; detached here: p is a constant target, Eq. 15 has no gradient through
    it); `pseudo_labels (N,)` ỹ, default argmax p (Eq. 12). `covariance` holds Sigma_ỹ for
    every class: it must be estimated from LABELED features only (the caller's job, e.g.
    a `CovarianceEstimator` updated with the labeled part of each batch). `strength` =
    lambda >= 0; at 0 this is the soft cross-entropy of p against softmax(z).
    Returns `(N,)` for `reduction="none"`, else the mean. Memory O(N C^2).
    """
    probs = probs.detach()
    if pseudo_labels is None:
        pseudo_labels = probs.argmax(1)
    augmented = semi_supervised_augmented_logits(logits, weight, pseudo_labels, covariance, strength)
    log_probs = torch.diagonal(F.log_softmax(augmented, dim=2), dim1=1, dim2=2)   # (N, C): term k, class k
    loss = -(probs.to(log_probs.dtype) * log_probs).sum(1)
    return loss if reduction == "none" else loss.mean()


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
