"""Semi-supervised ISDA (the paper's Eqs. 12-15): the consistency term of unlabeled samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from isda_viz.isda.estimator import CovarianceEstimator


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
