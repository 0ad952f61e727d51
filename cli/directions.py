"""`isda-viz directions`: each class's eigen-directions of Sigma_y, one at a time, and the semantic test."""

from __future__ import annotations

import click

from isda_viz.inversion.directions import DirectionsOptions, make_directions

from .augment import visualize_options


@click.command("directions")
@click.option("--image", "images", multiple=True, type=click.Path(),
              help="An image file (PNG/JPEG) to traverse instead of test images; repeat for several.")
@click.option("--label", default=None, help="Class name or index of the --image files (default: the prediction).")
@click.option("--classes", default=None, help="Comma-separated class names or indices (default: all).")
@click.option("--per-class", type=click.IntRange(1, 100), default=1, show_default=True, help="Test images per class.")
@click.option("--directions", "num_directions", type=click.IntRange(1, 256), default=5, show_default=True,
              help="Top eigen-directions of each class covariance to traverse.")
@click.option("--steps", type=int, default=7, show_default=True,
              help="Frames per direction (odd, 3 to 101: t = 0 is one of them).")
@click.option("--range", "extent", type=click.FloatRange(0, 100, min_open=True), default=3.0, show_default=True,
              help="t runs over [-range, range]: targets a + t sqrt(lambda e_k) u_k.")
@click.option("--test", is_flag=True, help="Also run the semantic test: how often ISDA's noise keeps the class, "
                                            "against isotropic and other-class noise of the same expected norm.")
@click.option("--test-draws", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Semantic test: draws per image and noise in feature space.")
@click.option("--pixel-draws", type=click.IntRange(0, 64), default=4, show_default=True,
              help="Semantic test: draws per image and noise inverted to images and judged (<= --test-draws).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Figure file FIG.png.")
@visualize_options
def directions_command(images, label, classes, per_class, num_directions, steps, extent, test, test_draws,
                       pixel_draws, out, options):
    """Traverse the top eigen-directions of each class covariance, one at a time, through the generator."""
    chosen = [c.strip() for c in classes.split(",")] if classes else None
    report = make_directions(out=out, options=DirectionsOptions(
        visualize=options, images=list(images), label=label, classes=chosen, per_class=per_class,
        directions=num_directions, steps=steps, extent=extent, test=test, feature_draws=test_draws,
        pixel_draws=pixel_draws))
    click.echo(f"wrote {out}, its report {out[:-4]}.json and frames in {out[:-4]}_files/\n"
               f"page: {report.path.with_suffix('.html')}")
    if report.test is not None:
        overall = report.test.overall_feature
        click.echo("class kept in feature space: " + ", ".join(
            f"{noise} {getattr(overall, noise).rate:.3f}" for noise in ("isda", "isotropic", "other_class")))
