"""Drop-in for the public ISDA ImageNet code's `ISDA_imagenet.py`: `from isda_viz.compat.imagenet import
ISDALoss`.

`ISDALoss(feature_num, class_num)`: diagonal class covariances `(C, A)` (per-feature variances);
`loss, output = criterion(model, x, target_x, ratio)` calls `model(x, isda=True)` for `(logits, features)`
and reads the final layer as `model.module.fc` (the model in DDP or DataParallel, as the public
`imagenet_DDP.py` has it; `model.fc` for a bare model). Returns the ISDA loss (Eq. 7) and the logits
`(N, C)` (float32, `fc(features)`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from isda_viz.compat.public import PublicEstimatorCV, PublicISDALoss


class EstimatorCV(PublicEstimatorCV):
    """`ISDA_imagenet.EstimatorCV`: diagonal `CoVariance (C, A)`, `Ave (C, A)`, `Amount (C,)`, `update_CV`."""
    diagonal = True


class ISDALoss(PublicISDALoss):
    """`ISDA_imagenet.ISDALoss(feature_num, class_num)`: `forward(model, x, target_x, ratio)` → `(loss, output)`."""
    estimator_class = EstimatorCV

    def forward(self, model: nn.Module, x: torch.Tensor, target_x: torch.Tensor,
                ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        _, features = model(x, isda=True)
        fc = getattr(model, "module", model).fc
        return self._loss(features, fc, target_x, ratio)
