"""`isda-viz train`: train a classifier with the ISDA loss (or cross-entropy)."""

from __future__ import annotations

import click

from isda_viz.data import DATASET_NAMES
from isda_viz.models import ARCH_NAMES
from isda_viz.train import TrainConfig, fit

from .common import device_option, seed_option


@click.command("train")
@click.option("--dataset", type=click.Choice(DATASET_NAMES), default="fashion-mnist", show_default=True)
@click.option("--data-root", type=click.Path(), default=None,
              help="Dataset folder (default: Debian's Fashion-MNIST, else a cache that torchvision downloads into).")
@click.option("--arch", type=click.Choice(ARCH_NAMES), default=None, help="Default: resnet32 (resnet50 for ImageNet).")
@click.option("--loss", type=click.Choice(["isda", "ce"]), default="isda", show_default=True)
@click.option("--lambda0", type=float, default=0.5, show_default=True, help="Final augmentation strength lambda0.")
@click.option("--covariance", type=click.Choice(["full", "diagonal"]), default=None,
              help="Default: full (diagonal for ImageNet-sized features).")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=float, default=0.1, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "step"]), default="cosine", show_default=True)
@seed_option
@device_option
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory to write.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.option("--limit-train", type=click.IntRange(min=1), default=None, help="Use only the first N training images.")
@click.option("--limit-test", type=click.IntRange(min=1), default=None, help="Use only the first N test images.")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="DataLoader workers (image folders only).")
def train_command(resume, **options):
    """Train a classifier with the ISDA loss; writes checkpoint.pt, metrics.jsonl, config.json."""
    result = fit(TrainConfig(**options), resume=resume, log=click.echo)
    click.echo(f"run written to {options['out']} (test accuracy {result.get('test_accuracy', float('nan')):.4f})")
