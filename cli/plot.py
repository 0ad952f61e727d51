"""`isda-viz plot`: curves of training runs, bound vs Monte-Carlo, and a feature embedding."""

from __future__ import annotations

import click

from isda_viz.outputs.plot import EMBEDDINGS, plot_runs

from .common import device_option, seed_option


@click.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Figure to write (.png); the numbers go beside it as .csv and .json.")
@click.option("--embedding", type=click.Choice(EMBEDDINGS), default="none", show_default=True,
              help="2-D picture of test features, coloured by class, for runs with a checkpoint.pt.")
@click.option("--embedding-points", type=click.IntRange(min=10), default=2000, show_default=True,
              help="Test images in the embedding (a seeded random subset).")
@click.option("--data-root", type=click.Path(), default=None,
              help="Dataset folder for the embedding (default: the one each run was trained from).")
@seed_option
@device_option
def plot_command(**options):
    """Plot test accuracy and loss per epoch of RUN_DIRS on shared axes (and more when the runs logged it)."""
    paths = plot_runs(**options)
    click.echo(f"figure written to {paths['png']} (numbers: {paths['csv']}, {paths['json']})")
