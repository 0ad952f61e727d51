"""Classifiers: our networks, the public ISDA code's networks, foreign weights (public checkpoints,
torchvision), allow-list loading, the `Classifier` every pipeline takes, and class statistics."""

from isda_viz.classifiers.classifier import Classifier, load_classifier
from isda_viz.classifiers.statistics import ClassStatistics, class_statistics

__all__ = ["ClassStatistics", "Classifier", "class_statistics", "load_classifier"]
