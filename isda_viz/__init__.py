"""isda-viz: implicit semantic data augmentation (ISDA), and pictures of what it augments.

Public names: the ISDA maths (`ISDALoss`, `isda_augmented_logits`,
`CovarianceEstimator`), the classifier a run holds (`Classifier`,
`load_classifier`), and the Appendix E inverter (`invert_features`,
`reconstruct` for Step I, `augment` for Step II). The pipelines are in
`isda_viz.visualize`, training in `isda_viz.train`.
"""

__version__ = "0.1.0"

from .classifier import Classifier, load_classifier  # noqa: E402
from .errors import IsdaVizError  # noqa: E402
from .estimator import CovarianceEstimator  # noqa: E402
from .inversion import augment, invert_features, reconstruct  # noqa: E402
from .isda import ISDALoss, class_quadratic_forms, isda_augmented_logits  # noqa: E402

__all__ = ["Classifier", "CovarianceEstimator", "ISDALoss", "IsdaVizError", "augment", "class_quadratic_forms",
           "invert_features", "isda_augmented_logits", "load_classifier", "reconstruct"]
