"""`isda-viz train-inverter`: train a (classifier, generator) pair's amortized inverter, once."""

from __future__ import annotations

import click

from isda_viz.inversion.amortized import InverterOptions
from isda_viz.inversion.pipelines import VisualizeOptions, make_inverter

from .common import classifier_options, device_option, generator_option, truncation_option

_DEFAULT = InverterOptions()


@click.command("train-inverter")
@classifier_options("Classifier RUN_DIR from `isda-viz train`, or a weights FILE with --classifier-arch "
                    "(default: the shipped Fashion-MNIST ISDA ResNet-32).")
@generator_option
@truncation_option
@click.option("--class-map", type=click.Path(dir_okay=False), default=None,
              help="Which generator class draws each classifier class, when their classes differ.")
@click.option("--data-root", type=click.Path(), default=None,
              help="Folder of the classifier's training data (default: the one it was trained from).")
@click.option("--covariance", type=click.Choice(["full", "diagonal"]), default="full", show_default=True,
              help="Class covariances computed from --data-root for classifiers without their own.")
@click.option("--steps", type=click.IntRange(1, 1_000_000), default=_DEFAULT.steps, show_default=True,
              help="Training steps (each: a batch through Step I's and Step II's passes).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=_DEFAULT.batch_size, show_default=True)
@click.option("--real-images", type=click.IntRange(1, 10_000_000), default=_DEFAULT.real_images, show_default=True,
              help="Training images whose features (and pixels) the inverter learns from.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=_DEFAULT.seed, show_default=True,
              help="Seed of the weights, batches and targets; same seed, same inverter (on the CPU).")
@device_option
def train_inverter_command(classifier, classifier_arch, class_names, generator, truncation, class_map, data_root,
                           covariance, steps, batch_size, real_images, seed, device):
    """Train the amortized inverter of a classifier and generator (minutes), cached for that pair: then
    `augment`, `grid`, `directions` and `explore` draw pictures from a few passes instead of a search."""
    options = VisualizeOptions(classifier=classifier, classifier_arch=classifier_arch, class_names=class_names,
                               generator=generator, truncation=truncation, class_map=class_map, data_root=data_root,
                               covariance=covariance, device=device)
    training = InverterOptions(steps=steps, batch_size=batch_size, real_images=real_images, seed=seed)
    inverter, path = make_inverter(options, training)
    if inverter.info.get("cached"):
        click.echo(f"this pair's inverter for these options is already trained: {path}")
    else:
        click.echo(f"trained the amortized inverter in {inverter.info['seconds']:.1f} s (final loss "
                   f"{inverter.info['final_loss']:.4f}); cached in {path}")
