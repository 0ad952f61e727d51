"""isda-viz: implicit semantic data augmentation (ISDA), and pictures of what it augments.

Public names: the ISDA maths (`ISDALoss`, `isda_augmented_logits`,
`CovarianceEstimator`), the classifier a run holds (`Classifier`,
`load_classifier`), and the Appendix E inverter (`invert_features`,
`reconstruct` for Step I, `augment` for Step II), and the live explorer (`explore`,
`ExploreOptions`: `isda-viz explore` from Python, shown inline in Jupyter). The subpackages follow the
data's one-way path: `isda` (the paper's maths) and `data` → `classifiers` →
`training` / `inversion` (the pipelines) / `audit` → `outputs` (reports, figures,
pages, plots); `generators` and `cli` sit beside them.
"""

from isda_viz._version import __version__
from isda_viz.classifiers.classifier import Classifier, load_classifier
from isda_viz.errors import IsdaVizError
from isda_viz.inversion.optimizer import augment, invert_features, reconstruct
from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.isda.loss import ISDALoss, class_quadratic_forms, isda_augmented_logits

__all__ = ["Classifier", "CovarianceEstimator", "ExploreOptions", "ISDALoss", "IsdaVizError", "__version__", "augment",
           "class_quadratic_forms", "explore", "invert_features", "isda_augmented_logits", "load_classifier",
           "reconstruct"]


def __getattr__(name: str):
    """`explore` and `ExploreOptions` (`isda_viz.app`), imported when first used: the app sits above the
    pipelines, which `import isda_viz` need not load."""
    if name in ("explore", "ExploreOptions"):
        import isda_viz.app as app
        return getattr(app, name)
    raise AttributeError(f"module 'isda_viz' has no attribute {name!r}")
