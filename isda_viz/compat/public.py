"""What the two drop-ins share: the public `EstimatorCV`'s interface over a `CovarianceEstimator`, and the
public `ISDALoss`'s attributes and `isda_aug` over `isda_viz.isda.loss`.

The public estimator keeps float32 `CoVariance` (population covariance, `(C, A, A)` or diagonal `(C, A)`),
`Ave (C, A)` and `Amount (C,)` (features seen), merged batch by batch; ours keeps float64 sums and merges
the same way (Chan's rule, the paper's Eqs. 1-3), so the values agree to float rounding. A drop-in
pickles as `{"class_num", "isda_viz_state"}` (the estimator's float64 state): `torch.load` with the drop-in
importable restores it exactly, and isda-viz's checkpoint reader (`classifiers.safe_load`) reads the
statistics without running any code.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.isda.loss import isda_augmented_logits, isda_step


class PublicEstimatorCV:
    """The public `EstimatorCV(feature_num, class_num)`: `update_CV(features, labels)`, `.CoVariance`,
    `.Ave`, `.Amount`, `.class_num`; underneath, `.covariance_estimator`, a `CovarianceEstimator`.

    `CoVariance`, `Ave` and `Amount` are float32 on the estimator's device (the one of the last features
    seen), as the public ones; read them, do not write into them (assigning a whole new tensor to any of
    the three is allowed and replaces that statistic). Under torch.distributed every rank holds the
    statistics of the global batch.
    """

    diagonal = False

    def __init__(self, feature_num: int, class_num: int):
        self.class_num = class_num
        self.covariance_estimator = CovarianceEstimator(feature_num, class_num, diagonal=self.diagonal)

    def update_CV(self, features: torch.Tensor, labels: torch.Tensor) -> None:  # noqa: N802 (the public name)
        """Merge a batch, `features (N, A)` and `labels (N,)`; a batch holding inf/NaN is skipped."""
        if self.covariance_estimator.device != features.device:
            self.covariance_estimator.to(features.device)
        self.covariance_estimator.update(features.detach(), labels, skip_non_finite=True)

    @property
    def CoVariance(self) -> torch.Tensor:  # noqa: N802
        return self.covariance_estimator.covariance

    @CoVariance.setter
    def CoVariance(self, value: torch.Tensor) -> None:  # noqa: N802
        self._replace(covariance=value)

    @property
    def Ave(self) -> torch.Tensor:  # noqa: N802
        return self.covariance_estimator.mean

    @Ave.setter
    def Ave(self, value: torch.Tensor) -> None:  # noqa: N802
        self._replace(mean=value)

    @property
    def Amount(self) -> torch.Tensor:  # noqa: N802
        return self.covariance_estimator.count.float()

    @Amount.setter
    def Amount(self, value: torch.Tensor) -> None:  # noqa: N802
        self._replace(count=value)

    def _replace(self, covariance=None, mean=None, count=None) -> None:
        """Set one statistic, keeping the other two as they read now."""
        est = self.covariance_estimator
        covariance = (est.covariance if covariance is None else covariance).to(est.device, torch.float64)
        count = (est.count if count is None else count).to(est.device, torch.float64)
        state = {**est.state_dict(), "m2": (covariance * count.view(-1, *[1] * (covariance.dim() - 1))).cpu(),
                 "mean64": (est.mean if mean is None else mean).to(torch.float64).cpu(), "count": count.cpu()}
        est.load_state_dict(state)

    def __getstate__(self) -> dict:
        return {"class_num": self.class_num, "isda_viz_state": self.covariance_estimator.state_dict()}

    def __setstate__(self, state: dict) -> None:
        self.class_num = state["class_num"]
        self.covariance_estimator = CovarianceEstimator.from_state_dict(state["isda_viz_state"])


class PublicISDALoss(nn.Module):
    """The public `ISDALoss(feature_num, class_num)`'s attributes (`.estimator`, `.class_num`,
    `.cross_entropy`) and `isda_aug`; each drop-in adds its module's `forward`."""

    estimator_class = PublicEstimatorCV

    def __init__(self, feature_num: int, class_num: int):
        super().__init__()
        self.estimator = self.estimator_class(feature_num, class_num)
        self.class_num = class_num
        self.cross_entropy = nn.CrossEntropyLoss()

    def isda_aug(self, fc: nn.Module, features: torch.Tensor, y: torch.Tensor, labels: torch.Tensor,
                 cv_matrix: torch.Tensor, ratio: float) -> torch.Tensor:
        """The public method: `y (N, C)` + (ratio / 2) (w_j - w_y)^T Sigma_y (w_j - w_y), `w` the first
        parameter of `fc` (its weight), `cv_matrix` `(C, A, A)` or diagonal `(C, A)`. (`features` unused,
        as in the public code.)"""
        return isda_augmented_logits(y, list(fc.parameters())[0], labels, cv_matrix, ratio)

    def _loss(self, features: torch.Tensor, fc: nn.Module, targets: torch.Tensor,
              ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`(loss, logits)` of a batch's features: the estimator updated, then Eq. 7 (`isda_step`)."""
        estimator = self.estimator.covariance_estimator
        return isda_step(estimator, features, fc, targets, ratio, weight=list(fc.parameters())[0])

    def _apply(self, fn, recurse=True):
        """`.cuda()`, `.to(device)`: the estimator follows (the public one is made on the GPU)."""
        super()._apply(fn, recurse)
        self.estimator.covariance_estimator.to(fn(torch.zeros(())).device)
        return self
