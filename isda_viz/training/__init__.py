"""Training: `TrainConfig`, the paper's recipes, the loop (`fit`), semi-supervised batches."""

from isda_viz.training.loop import TrainConfig, fit

__all__ = ["TrainConfig", "fit"]
