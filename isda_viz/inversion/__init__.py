"""Inversion (the paper's Appendix E): the optimiser, the generator-classifier adapter, the amortized inverter,
the one pipeline every picture goes through (`pipeline.invert_batch`), and the augment / grid pipelines that
write reports, figures and pages."""

from isda_viz.inversion.amortized import AmortizedInverter, InverterOptions, train_inverter
from isda_viz.inversion.optimizer import InversionOptions, augment, invert_features, reconstruct
from isda_viz.inversion.pipeline import invert_batch
from isda_viz.inversion.pipelines import VisualizeOptions, augment_images, make_grid, make_inverter

__all__ = ["AmortizedInverter", "InversionOptions", "InverterOptions", "VisualizeOptions", "augment",
           "augment_images", "invert_batch", "invert_features", "make_grid", "make_inverter", "reconstruct",
           "train_inverter"]
