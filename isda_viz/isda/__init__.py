"""The paper's maths, with no I/O: the covariance estimator (Eqs. 1-3), the ISDA loss (Eq. 7), its
semi-supervised form (Eqs. 12-15), draws of the augmentation noise (Eq. 5 and the Monte-Carlo
expected cross-entropy), and the schedules (lambda = lambda0 * t / T)."""

from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.isda.loss import ISDALoss, class_quadratic_forms, isda_augmented_logits, isda_loss
from isda_viz.isda.sampling import expected_cross_entropy_mc, explicit_sda_loss, sample_augmented_features
from isda_viz.isda.schedules import isda_strength
from isda_viz.isda.semi import semi_supervised_isda_loss

__all__ = ["CovarianceEstimator", "ISDALoss", "class_quadratic_forms", "expected_cross_entropy_mc",
           "explicit_sda_loss", "isda_augmented_logits", "isda_loss", "isda_strength", "sample_augmented_features",
           "semi_supervised_isda_loss"]
