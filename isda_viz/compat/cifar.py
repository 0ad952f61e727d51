"""Drop-in for the public ISDA CIFAR code's `ISDA.py`: `from isda_viz.compat.cifar import ISDALoss` (and
`EstimatorCV`, which its `train.py` imports too).

`ISDALoss(feature_num, class_num)`: full `(C, A, A)` class covariances;
`loss, output = criterion(model, fc, x, target_x, ratio)` with `model(x)` the features `(N, A)` and
`fc(features)` the logits (the public `Full_layer`, in `nn.DataParallel` or not), `ratio` = λ. Returns the
ISDA loss (Eq. 7) and the logits `(N, C)` (float32).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from isda_viz.compat.public import PublicEstimatorCV, PublicISDALoss


class EstimatorCV(PublicEstimatorCV):
    """`ISDA.EstimatorCV`: `CoVariance (C, A, A)`, `Ave (C, A)`, `Amount (C,)`, `update_CV(features, labels)`."""
    diagonal = False


class ISDALoss(PublicISDALoss):
    """`ISDA.ISDALoss(feature_num, class_num)`: `forward(model, fc, x, target_x, ratio)` → `(loss, output)`."""
    estimator_class = EstimatorCV

    def forward(self, model: nn.Module, fc: nn.Module, x: torch.Tensor, target_x: torch.Tensor,
                ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._loss(model(x), fc, target_x, ratio)
