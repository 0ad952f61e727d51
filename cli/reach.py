"""`isda-viz generator-report`: how much a generator can reach, in the classifier's own feature space."""

from __future__ import annotations

import click

from isda_viz.audit.reach import GeneratorReportOptions, generator_report
from isda_viz.generators.reach import ReachOptions

from .common import classifier_options, device_option, generator_option, seed_option, truncation_option

_DEFAULT = ReachOptions()


@click.command("generator-report")
@classifier_options("Classifier RUN_DIR, or a weights FILE with --classifier-arch (default: the shipped "
                    "Fashion-MNIST ISDA ResNet-32).")
@generator_option
@truncation_option
@click.option("--class-map", type=click.Path(dir_okay=False), default=None,
              help="Which generator class draws each classifier class (JSON {classifier_class: generator_class}, "
                   "or two columns per line), when their classes differ.")
@click.option("--data-root", type=click.Path(), default=None,
              help="The classifier's training images (default: where it was trained).")
@click.option("--per-class", type=click.IntRange(min=2), default=_DEFAULT.per_class, show_default=True,
              help="Generated samples and real images per class (and as many real ones again for the reference).")
@click.option("--k", type=click.IntRange(min=1), default=_DEFAULT.k, show_default=True,
              help="The neighbour whose distance is a k-NN ball's radius (Kynkäänniemi et al. use 3).")
@seed_option
@device_option
def generator_report_command(per_class, k, seed, **options):
    """Fréchet distance and precision/recall of the generator's samples against real training features, per
    class and overall, in the classifier's feature space; cached per (classifier, generator) pair."""
    report = generator_report(GeneratorReportOptions(reach=ReachOptions(per_class=per_class, k=k, seed=seed),
                                                     **options), log=click.echo)
    click.echo(report.table())
    click.echo(f"generator report: {report.path}")
