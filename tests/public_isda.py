"""A transcription of the public ISDA code's losses (github.com/blackfeather-wang/ISDA-for-Deep-Networks:
`Image classification on CIFAR/ISDA.py`, `Image classification on ImageNet/ISDA_imagenet.py`), written
here to test the drop-ins (`isda_viz.compat`) against and to time them beside (`bench/compat_speed.py`).

The same operations in the same order as the public modules (one-hot masks over all C classes, batch
statistics of every class, the weighted merge w = m / (m + n) with NaN weights zeroed, the per-sample
`(N, C, A) x (N, A, A) x (N, A, C)` products of which the diagonal is kept, or the `(N, C, A)` products of
the diagonal case), with the one change that tensors live on the device asked for instead of `.cuda()`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class PublicEstimatorCV:
    """`EstimatorCV`: float32 `CoVariance` (`(C, A, A)`, or `(C, A)` with `diagonal`), `Ave (C, A)`, `Amount (C,)`."""

    def __init__(self, feature_num: int, class_num: int, diagonal: bool = False, device="cpu"):
        self.class_num, self.diagonal, self.device = class_num, diagonal, device
        shape = (class_num, feature_num) if diagonal else (class_num, feature_num, feature_num)
        self.CoVariance = torch.zeros(shape, device=device)
        self.Ave = torch.zeros(class_num, feature_num, device=device)
        self.Amount = torch.zeros(class_num, device=device)

    def update_CV(self, features: torch.Tensor, labels: torch.Tensor) -> None:  # noqa: N802
        n, a = features.shape
        c = self.class_num
        onehot = torch.zeros(n, c, device=features.device).scatter_(1, labels.view(-1, 1), 1)
        mask = onehot.view(n, c, 1).expand(n, c, a)                              # (N, C, A)
        sorted_features = features.view(n, 1, a).expand(n, c, a) * mask
        per_class_feature = mask.sum(0)                                           # (C, A) counts
        per_class_feature[per_class_feature == 0] = 1
        batch_mean = sorted_features.sum(0) / per_class_feature                  # (C, A)
        centred = sorted_features - batch_mean.expand(n, c, a) * mask            # (N, C, A)
        seen = onehot.sum(0)                                                     # (C,)
        if self.diagonal:
            batch_var = centred.pow(2).sum(0) / per_class_feature                # (C, A)
            weight = seen.view(c, 1).expand(c, a) / (seen.view(c, 1).expand(c, a) + self.Amount.view(c, 1).expand(c, a))
            weight[weight != weight] = 0
            shift = weight * (1 - weight) * (self.Ave - batch_mean).pow(2)
            self.CoVariance = (self.CoVariance * (1 - weight) + batch_var * weight).detach() + shift.detach()
            self.Ave = (self.Ave * (1 - weight) + batch_mean * weight).detach()
        else:
            batch_cov = torch.bmm(centred.permute(1, 2, 0), centred.permute(1, 0, 2)) \
                / per_class_feature.view(c, a, 1).expand(c, a, a)                   # (C, A, A)
            weight_cov = seen.view(c, 1, 1).expand(c, a, a)
            weight_cov = weight_cov / (weight_cov + self.Amount.view(c, 1, 1).expand(c, a, a))
            weight_cov[weight_cov != weight_cov] = 0
            weight_mean = seen.view(c, 1).expand(c, a)
            weight_mean = weight_mean / (weight_mean + self.Amount.view(c, 1).expand(c, a))
            weight_mean[weight_mean != weight_mean] = 0
            delta = self.Ave - batch_mean
            shift = weight_cov * (1 - weight_cov) * torch.bmm(delta.view(c, a, 1), delta.view(c, 1, a))
            self.CoVariance = (self.CoVariance * (1 - weight_cov) + batch_cov * weight_cov).detach() + shift.detach()
            self.Ave = (self.Ave * (1 - weight_mean) + batch_mean * weight_mean).detach()
        self.Amount += seen


class PublicISDALoss(nn.Module):
    """`ISDA.ISDALoss` (full covariance; `forward(model, fc, x, target_x, ratio)`), or with `imagenet`
    `ISDA_imagenet.ISDALoss` (diagonal; `forward(model, x, target_x, ratio)`, `model(x, isda=True)`)."""

    def __init__(self, feature_num: int, class_num: int, imagenet: bool = False, device="cpu"):
        super().__init__()
        self.estimator = PublicEstimatorCV(feature_num, class_num, diagonal=imagenet, device=device)
        self.class_num, self.imagenet = class_num, imagenet
        self.cross_entropy = nn.CrossEntropyLoss()

    def isda_aug(self, fc, features, y, labels, cv_matrix, ratio):
        n, a = features.shape
        c = self.class_num
        weight = list(fc.parameters())[0]                                           # (C, A)
        every_class = weight.expand(n, c, a)
        own_class = torch.gather(every_class, 1, labels.view(n, 1, 1).expand(n, c, a))
        sigma = cv_matrix[labels]
        if self.imagenet:
            sigma2 = ratio * ((weight - own_class).pow(2) * sigma.view(n, 1, a).expand(n, c, a)).sum(2)
        else:
            diff = every_class - own_class                                           # (N, C, A)
            sigma2 = ratio * torch.bmm(torch.bmm(diff, sigma), diff.permute(0, 2, 1))  # (N, C, C)
            sigma2 = (sigma2 * torch.eye(c, device=y.device).expand(n, c, c)).sum(2).view(n, c)
        return y + 0.5 * sigma2

    def forward(self, *args):
        if self.imagenet:
            model, x, target_x, ratio = args
            y, features = model(x, isda=True)
            fc = model.module.fc
        else:
            model, fc, x, target_x, ratio = args
            features = model(x)
            y = fc(features)
        self.estimator.update_CV(features.detach(), target_x)
        augmented = self.isda_aug(fc, features, y, target_x, self.estimator.CoVariance.detach(), ratio)
        return self.cross_entropy(augmented, target_x), y
