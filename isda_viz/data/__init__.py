"""Datasets (Fashion-MNIST, CIFAR pickles, image folders), batches, image files, synthetic on-disk layouts."""

from isda_viz.data.batches import iterate_batches
from isda_viz.data.datasets import DATASET_NAMES, SPECS, dataset_spec, load_split
from isda_viz.data.images import load_image_file, normalize

__all__ = ["DATASET_NAMES", "SPECS", "dataset_spec", "iterate_batches", "load_image_file", "load_split", "normalize"]
