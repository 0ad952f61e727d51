"""`isda-viz augment` and `isda-viz grid`: pictures of ISDA's augmented features."""

from __future__ import annotations

import functools

import click

from isda_viz.inversion import InversionOptions
from isda_viz.pretrained import default_classifier, default_generator, default_judge
from isda_viz.runs import load_classifier, pick_device
from isda_viz.visualize import augment_images, make_grid

from .common import device_option, seed_option, user_errors


def inversion_options(fn):
    """The options `augment` and `grid` share: models, strength, search effort."""
    options = [
        click.option("--classifier", default=None,
                     help="Classifier RUN_DIR from `isda-viz train` (default: the shipped Fashion-MNIST ISDA ResNet-32)."),
        click.option("--generator", default=None,
                     help="GAN_DIR from `isda-viz train-gan`, biggan-deep-128|256|512, or a local BigGAN folder "
                          "(default: the shipped Fashion-MNIST WGAN-GP)."),
        click.option("--judge", default=None,
                     help="A second classifier RUN_DIR (other seed) whose predictions are reported too "
                          "(default with the shipped classifier: the shipped CE judge)."),
        click.option("--num-augmented", "-k", type=click.IntRange(1, 64), default=4, show_default=True,
                     help="Augmented images per input image."),
        click.option("--strength", type=click.FloatRange(0, 100), default=0.5, show_default=True,
                     help="lambda: augmented features are a + eps, eps ~ N(0, lambda Sigma_y)."),
        click.option("--restarts", type=click.IntRange(1, 64), default=4, show_default=True,
                     help="Random starts per image in Step I (the best is kept)."),
        click.option("--iterations", type=click.IntRange(1), default=None,
                     help="Step I iterations (default 200); Step II takes 3/2 as many (default 300)."),
        click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True,
                     help="adam, or sgd: heavy-ball gradient descent as the reference code (needs --lr)."),
        click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
                     help="Step size on z for both steps (default for adam: 0.2 in Step I, 0.05 in Step II)."),
        click.option("--tolerance", type=float, default=0.0, help="Stop a stage once every feature error is below this."),
        seed_option,
        device_option,
    ]
    for option in reversed(options):
        fn = option(fn)

    @functools.wraps(fn)
    def wrapper(classifier, generator, judge, restarts, iterations, optimizer, lr, tolerance, device, **kwargs):
        from isda_viz.generators import load_generator

        if optimizer == "sgd" and lr is None:
            # Adam's steps are scale-free; gradient descent's depend on the loss scale, so no default fits.
            raise click.UsageError("--optimizer sgd needs --lr (gradient descent has no default step size here)")
        dev = pick_device(device)
        opts = InversionOptions(restarts=restarts, optimizer=optimizer, tolerance=tolerance)
        if iterations:
            opts.reconstruct_iterations, opts.augment_iterations = iterations, iterations * 3 // 2
        if lr is not None:
            opts.reconstruct_lr = opts.augment_lr = lr
        if classifier is None and judge is None:
            judge = default_judge()
        models = {
            "classifier": load_classifier(classifier or default_classifier(), dev),
            "generator": load_generator(generator or default_generator(), dev),
            "judge": load_classifier(judge, dev) if judge else None,
        }
        return fn(opts=opts, **models, **kwargs)

    return wrapper


@click.command("augment")
@click.option("--image", "images", multiple=True, required=True, type=click.Path(),
              help="An image file (PNG/JPEG, any size or mode); repeat for several.")
@click.option("--label", default=None, help="Class name or index of the images (default: the classifier's prediction).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output folder.")
@inversion_options
@user_errors
def augment_command(images, label, out, opts, classifier, generator, judge, num_augmented, strength, seed):
    """Invert image files through the generator and show K ISDA-augmented versions of each."""
    folder = augment_images(list(images), classifier, generator, out, label, num_augmented, strength, opts, seed, judge)
    click.echo(f"wrote {folder}/grid.png, {folder}/report.json and one PNG per image")


@click.command("grid")
@click.option("--per-class", type=click.IntRange(1, 100), default=1, show_default=True, help="Test images per class.")
@click.option("--classes", default=None, help="Comma-separated class names or indices (default: all).")
@click.option("--samples", type=click.IntRange(0, 16), default=2, show_default=True,
              help="Random same-class generator samples per row (class-conditional generators).")
@click.option("--data-root", type=click.Path(), default=None, help="Dataset folder, as given to `train`.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Figure file FIG.png.")
@inversion_options
@user_errors
def grid_command(per_class, classes, samples, data_root, out, opts, classifier, generator, judge, num_augmented,
                 strength, seed):
    """The paper's figure for test images: original | reconstruction | K augmented | random same-class samples."""
    chosen = [c.strip() for c in classes.split(",")] if classes else None
    report = make_grid(classifier, generator, out, per_class, chosen, num_augmented, strength, samples, opts, seed,
                       judge, data_root)
    s = report["summary"]
    click.echo(f"wrote {out} and its report {out[:-4]}.json: step I median feature error "
               f"{s['step1_median_feature_error']:.3f}, step II median reached-shift error "
               f"{s['step2_median_reached_shift_error']:.3f} (no image can go below "
               f"{s['step2_median_negative_target_floor']:.3f}: the targets' negative part)")
