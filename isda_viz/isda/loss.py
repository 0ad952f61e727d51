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

import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.isda.estimator import CovarianceEstimator, check_covariance

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


def isda_loss(logits: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              covariance: torch.Tensor | CovarianceEstimator, strength: float) -> torch.Tensor:
    """Eq. 7, the one path training, the bound of `--track-bound`, `ISDALoss` and the benches take: the mean
    cross-entropy of `isda_augmented_logits` (arguments as there); exactly `F.cross_entropy(logits, targets)`
    at `strength` = 0."""
    if strength == 0:
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(isda_augmented_logits(logits, weight, targets, covariance, strength), targets)


def isda_step(estimator: CovarianceEstimator, features: torch.Tensor, fc: nn.Module, targets: torch.Tensor,
              strength: float, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the ISDA loss with its online estimator: `(loss, logits (N, C))`, what `ISDALoss` and the
    public code's drop-ins (`isda_viz.compat`) compute.

    `features (N, A)` (gradients flow through them and `fc`), `fc` the final layer (`fc(features)` are the
    logits; `weight (C, A)` its weight matrix, default `fc.weight`), `targets (N,)`, `strength` = λ. The
    estimator (moved to the features' device) is first updated with the detached features, skipping a batch
    with inf/NaN features (an fp16 overflow, which the GradScaler skips too), then Eq. 7 uses the updated
    covariances. Under a caller's autocast (bf16/fp16) the features are cast to float32 (at least) and the
    logits, quadratic forms and cross-entropy are computed in it: the network before still runs in low
    precision, ISDA's sums and forms do not.
    """
    if estimator.device != features.device:
        estimator.to(features.device)
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(features.device.type, enabled=False):
        features = features.to(dtype)
        weight = (fc.weight if weight is None else weight).to(dtype)
        if isinstance(fc, nn.Linear):  # a bf16/fp16 layer too (a model cast with .half()): its float32 copy
            logits = F.linear(features, fc.weight.to(dtype), None if fc.bias is None else fc.bias.to(dtype))
        else:  # e.g. the public code's Full_layer in DataParallel: its own forward, in float32
            logits = fc(features).to(dtype)
        estimator.update(features.detach(), targets, skip_non_finite=True)
        return isda_loss(logits, weight, targets, estimator, strength), logits


class ISDALoss(nn.Module):
    """Cross-entropy of ISDA-augmented logits, with its own online covariance estimator.

    `loss = criterion(features (N, A), fc, targets (N,), strength)`: the estimator is
    first updated with the detached batch features (as in the reference code), then
    the augmented logits use the updated covariances. `strength = 0` returns exactly
    `F.cross_entropy(fc(features), targets)`. Under a caller's autocast the loss is
    computed in float32, and a batch with inf/NaN features is not merged (`isda_step`).
    """

    def __init__(self, num_features: int, num_classes: int, covariance: str = "full"):
        super().__init__()
        check_covariance(covariance)
        self.estimator = CovarianceEstimator(num_features, num_classes, diagonal=covariance == "diagonal")

    def forward(self, features: torch.Tensor, fc: nn.Linear, targets: torch.Tensor,
                strength: float) -> torch.Tensor:
        return isda_step(self.estimator, features, fc, targets, strength)[0]

    def get_extra_state(self) -> dict:
        return self.estimator.state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.estimator = CovarianceEstimator.from_state_dict(state, device=self.estimator.device)


# --- Semi-supervised ISDA (Eqs. 12-15), explicit semantic data augmentation (Eq. 5) and a Monte-Carlo
# estimate of the expected cross-entropy that Eq. 7 and Eq. 15 bound (Eqs. 3-4 and 14). ---


