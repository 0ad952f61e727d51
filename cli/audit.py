"""`isda-viz audit`: nearest training images of generated images, and a copy score for each."""

from __future__ import annotations

import click

from isda_viz.audit.run import AuditConfig, run_audit
from isda_viz.data.datasets import DATASET_NAMES
from isda_viz.outputs.html import page_path

from .common import classifier_options, device_option, embed_option


@click.command("audit")
@click.option("--images", "images", multiple=True, type=click.Path(),
              help="Query image files or folders (repeatable); PNG/JPEG of any size, converted to the dataset's.")
@click.option("--from", "from_dir", type=click.Path(), default=None,
              help="An augment/grid --out folder: audit the images its report.json lists.")
@click.option("--dataset", type=click.Choice(DATASET_NAMES), required=True, help="Training set to search.")
@click.option("--data-root", type=click.Path(), default=None, help="Dataset folder (as for train).")
@click.option("--k", type=click.IntRange(min=1), default=5, show_default=True, help="Neighbours per query.")
@click.option("--space", type=click.Choice(["pixel", "feature"]), default="pixel", show_default=True,
              help="pixel: L2 on [0, 1] pixels; feature: cosine distance of the classifier's penultimate features.")
@classifier_options("Classifier RUN_DIR, or a weights FILE with --classifier-arch (needed for --space feature).")
@click.option("--index", "index", type=click.Choice(["flat", "ivfpq", "auto"]), default="auto", show_default=True,
              help="flat: exact; ivfpq: compressed, candidates re-ranked exactly; auto: flat while it fits in 2 GiB.")
@click.option("--index-dir", type=click.Path(file_okay=False), default=None,
              help="Where the training-set index is kept and reused (default: inside the classifier run for "
                   "feature space, $ISDA_VIZ_CACHE/audit or ~/.cache/isda-viz/audit for pixels).")
@device_option
@embed_option
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for audit.json and audit.png.")
@click.option("--limit-train", type=click.IntRange(min=1), default=None, hidden=True,
              help="Index only the first N training images (tests).")
@click.option("--limit-test", type=click.IntRange(min=1), default=None, hidden=True,
              help="Calibrate on the first N test images (tests).")
def audit_command(images, **options):
    """Find each query image's k nearest training images; flag likely copies (audit.json, audit.png)."""
    result = run_audit(AuditConfig(images=list(images), **options), log=click.echo)
    pages = len(result.report.pages)
    more = f" (+{pages - 1} more page{'s' if pages > 2 else ''})" if pages > 1 else ""
    click.echo(f"audit written to {result.out / 'audit.json'} and {result.out / 'audit.png'}{more} "
               f"(index in {result.index_dir})")
    click.echo(result.summary())
    click.echo(f"page: {page_path(result.out)}")
