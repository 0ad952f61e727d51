"""`isda-viz augment` and `isda-viz grid`: pictures of ISDA's augmented features."""

from __future__ import annotations

import dataclasses
import functools
import inspect

import click

from isda_viz.inversion.optimizer import InversionOptions
from isda_viz.inversion.pipelines import VisualizeOptions, augment_images, make_grid
from isda_viz.outputs.html import page_path

from .common import (
    classifier_options,
    deterministic_option,
    device_option,
    embed_option,
    generator_option,
    inverter_option,
    refine_steps_option,
    seed_option,
    truncation_option,
)

# The search knobs the options name as they are.
_INVERSION_KNOBS = tuple(inspect.signature(InversionOptions.make).parameters)
_OPTION_FIELDS = {f.name for f in dataclasses.fields(VisualizeOptions)} - {"inversion"}


def visualize_options(fn):
    """The options `augment` and `grid` share (models, strength, search effort), gathered into one
    `VisualizeOptions` passed to the command as `options`."""
    options = [
        classifier_options("Classifier RUN_DIR from `isda-viz train`, or a weights FILE with --classifier-arch "
                           "(default: the shipped Fashion-MNIST ISDA ResNet-32)."),
        generator_option,
        truncation_option,
        click.option("--class-map", type=click.Path(dir_okay=False), default=None,
                     help="Which generator class draws each classifier class, when their classes differ: JSON "
                          "{classifier_class: generator_class} or two columns per line."),
        click.option("--judge", default=None,
                     help="A second classifier RUN_DIR (other seed) whose predictions are reported too "
                          "(default with the shipped classifier: the shipped CE judge)."),
        click.option("--num-augmented", "-k", type=click.IntRange(1, 64), default=4, show_default=True,
                     help="Augmented images per input image."),
        click.option("--strength", type=click.FloatRange(0, 100), default=0.5, show_default=True,
                     help="lambda: augmented features are a + eps, eps ~ N(0, lambda Sigma_y)."),
        inverter_option,
        refine_steps_option,
        click.option("--restarts", type=click.IntRange(1, 64), default=None,
                     help="The search's random starts per image in Step I, the best is kept (default 4)."),
        click.option("--iterations", type=click.IntRange(1, 100_000), default=None,
                     help="The search's Step I iterations (default 200); Step II takes 3/2 as many (default 300)."),
        click.option("--micro-batch", type=click.IntRange(1, 1_000_000), default=None,
                     help="Codes pushed through the networks at once (default: as many as a fixed budget of "
                          "pixels allows); bounds memory, not the results."),
        click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True,
                     help="adam, or sgd: heavy-ball gradient descent as the reference code (needs --lr)."),
        click.option("--lr", type=click.FloatRange(0, 10, min_open=True), default=None,
                     help="Step size on z for both steps (default for adam: 0.2 in Step I, 0.05 in Step II)."),
        click.option("--tolerance", type=click.FloatRange(0, 1e6), default=0.0,
                     help="Stop a stage once every feature error is below this."),
        click.option("--data-root", type=click.Path(), default=None,
                     help="Folder of the classifier's dataset, as given to `train` (default: the one it was "
                          "trained from); read for test images and, for classifiers without class statistics of "
                          "their own (CE runs, torchvision weights), one pass over the shown classes' training "
                          "images (a train/ folder of class folders, or torchvision's CIFAR / Fashion-MNIST files)."),
        click.option("--covariance", type=click.Choice(["full", "diagonal"]), default="full", show_default=True,
                     help="Class covariances computed from --data-root: full (A x A per class) or diagonal."),
        click.option("--covariance-file", type=click.Path(dir_okay=False), default=None,
                     help="Class covariances estimated elsewhere, used instead of the classifier's own or a pass: "
                          ".pt/.npy/.safetensors of shape (C, A, A) or (C, A) (diagonal), or a dict with "
                          "'covariance' (and optional 'mean')."),
        seed_option,
        device_option,
        deterministic_option,
        embed_option,
    ]
    for option in reversed(options):
        fn = option(fn)

    @functools.wraps(fn)
    def wrapper(**kwargs):
        # Parsed options go to their fields by name: the search knobs to `InversionOptions.make`, the rest
        # to `VisualizeOptions`; what neither takes is the command's own.
        knobs = {name: kwargs.pop(name) for name in _INVERSION_KNOBS}
        chosen = {name: kwargs.pop(name) for name in _OPTION_FIELDS & set(kwargs)}
        return fn(options=VisualizeOptions(**chosen, inversion=InversionOptions.make(**knobs)), **kwargs)

    return wrapper


@click.command("augment")
@click.option("--image", "images", multiple=True, required=True, type=click.Path(),
              help="An image file (PNG/JPEG, any size or mode); repeat for several.")
@click.option("--label", default=None, help="Class name or index of the images (default: the classifier's prediction).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder.")
@visualize_options
def augment_command(images, label, out, options):
    """Invert image files through the generator and show K ISDA-augmented versions of each."""
    augment_images(list(images), out=out, label=label, options=options)
    click.echo(f"wrote {out}/grid.png, {out}/report.json and one PNG per image\npage: {page_path(out)}")


@click.command("grid")
@click.option("--per-class", type=click.IntRange(1, 100), default=1, show_default=True, help="Test images per class.")
@click.option("--classes", default=None, help="Comma-separated class names or indices (default: all).")
@click.option("--samples", type=click.IntRange(0, 16), default=2, show_default=True,
              help="Random same-class generator samples per row (class-conditional generators).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Figure file FIG.png.")
@visualize_options
def grid_command(per_class, classes, samples, out, options):
    """The paper's figure for test images: original | reconstruction | K augmented | random same-class samples."""
    chosen = [c.strip() for c in classes.split(",")] if classes else None
    report = make_grid(out=out, per_class=per_class, classes=chosen, num_samples=samples, options=options)
    s = report.summary
    click.echo(f"wrote {out} and its report {out[:-4]}.json: step I median feature error "
               f"{s.step1_median_feature_error:.3f}, step II median reached-shift error "
               f"{s.step2_median_reached_shift_error:.3f} (no image can go below "
               f"{s.step2_median_negative_target_floor:.3f}: the targets' negative part)\npage: {page_path(out)}")
