"""isda-viz: implicit semantic data augmentation (ISDA), and pictures of what it augments.

Public names: the ISDA maths (`ISDALoss`, `isda_augmented_logits`,
`CovarianceEstimator`), models, training (`fit`, `TrainConfig`) and the stages
built on them.
"""

__version__ = "0.1.0"

from .errors import IsdaVizError  # noqa: E402
from .estimator import CovarianceEstimator  # noqa: E402
from .isda import ISDALoss, class_quadratic_forms, isda_augmented_logits  # noqa: E402

__all__ = ["CovarianceEstimator", "ISDALoss", "IsdaVizError", "class_quadratic_forms", "isda_augmented_logits"]
