"""Inversion (the paper's Appendix E): the optimiser, the generator-classifier adapter, and the
augment / grid pipelines that write reports, figures and pages."""

from isda_viz.inversion.optimizer import InversionOptions, augment, invert_features, reconstruct
from isda_viz.inversion.pipelines import VisualizeOptions, augment_images, make_grid

__all__ = ["InversionOptions", "VisualizeOptions", "augment", "augment_images", "invert_features", "make_grid",
           "reconstruct"]
