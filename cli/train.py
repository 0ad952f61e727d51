"""`isda-viz train`: train a classifier with the ISDA loss (or cross-entropy, or explicit SDA), supervised or
semi-supervised."""

from __future__ import annotations

import click

from isda_viz.classifiers.networks import ARCH_NAMES
from isda_viz.data.datasets import DATASET_NAMES
from isda_viz.training.loop import LOSSES, SSL_METHODS, TrainConfig, fit
from isda_viz.training.recipes import RECIPE_NAMES, apply_recipe

from .common import deterministic_option, device_option, seed_option

_DEFAULT = TrainConfig(out="")


@click.command("train")
@click.option("--dataset", type=click.Choice(DATASET_NAMES), default=_DEFAULT.dataset, show_default=True)
@click.option("--data-root", type=click.Path(), default=None,
              help="Dataset folder (default: Debian's Fashion-MNIST, else a cache that torchvision downloads into).")
@click.option("--arch", type=click.Choice(ARCH_NAMES), default=None, help="Default: resnet32 (resnet50 for ImageNet).")
@click.option("--loss", type=click.Choice(LOSSES), default=_DEFAULT.loss, show_default=True,
              help="isda: Eq. 7; ce: cross-entropy; explicit: Eq. 5 with --samples sampled features per image.")
@click.option("--samples", type=click.IntRange(min=1), default=_DEFAULT.samples, show_default=True,
              help="--loss explicit: augmented features sampled per image and step (M).")
@click.option("--lambda0", type=float, default=_DEFAULT.lambda0, show_default=True,
              help="Final augmentation strength lambda0.")
@click.option("--covariance", type=click.Choice(["full", "diagonal"]), default=None,
              help="Default: full (diagonal for ImageNet-sized features).")
@click.option("--epochs", type=click.IntRange(min=1), default=_DEFAULT.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=_DEFAULT.batch_size, show_default=True)
@click.option("--lr", type=float, default=_DEFAULT.lr, show_default=True)
@click.option("--weight-decay", type=float, default=_DEFAULT.weight_decay, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "step"]), default=_DEFAULT.schedule, show_default=True)
@click.option("--milestones", default=None, metavar="E1,E2,...",
              help="Step schedule: epochs after which the lr is multiplied by --lr-decay (default: 50%,75%).")
@click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), default=_DEFAULT.lr_decay, show_default=True)
@click.option("--nesterov/--no-nesterov", default=_DEFAULT.nesterov, show_default=True, help="Nesterov momentum (0.9).")
@click.option("--recipe", type=click.Choice(RECIPE_NAMES), default=None,
              help="The paper's hyper-parameters for --arch/--dataset; options given explicitly win.")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "off"]), default=None,
              help="CUDA mixed precision (default bf16 where the GPU has it; CPU: off).")
@click.option("--sync-bn", is_flag=True, help="Under torchrun: batch-norm statistics of the global batch.")
@click.option("--labeled", type=click.IntRange(min=1), default=None, metavar="N",
              help="Semi-supervised: keep N labels (class-balanced, seeded by --seed); the rest is unlabeled.")
@click.option("--labeled-batch", type=click.IntRange(min=1), default=None,
              help="--labeled: labeled images per global batch; the rest of --batch-size is unlabeled "
                   "(default: half).")
@click.option("--ssl", type=click.Choice(SSL_METHODS), default=_DEFAULT.ssl, show_default=True,
              help="--labeled: base consistency method (Π-model or mean teacher).")
@click.option("--eta1", type=click.FloatRange(min=0), default=_DEFAULT.eta1, show_default=True,
              help="--labeled: weight of the ISDA consistency term on unlabeled images (Eq. 15); 0: off.")
@click.option("--eta2", type=click.FloatRange(min=0), default=_DEFAULT.eta2, show_default=True,
              help="--labeled: weight of the base method's consistency term.")
@click.option("--rampup", type=click.FloatRange(0, 1), default=_DEFAULT.rampup, show_default=True,
              help="--labeled: sigmoid ramp-up of both consistency weights over this fraction of training.")
@click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), default=_DEFAULT.ema_decay, show_default=True,
              help="--ssl mean-teacher: decay of the teacher's moving average.")
@click.option("--track-bound", is_flag=True,
              help="Log per epoch the ISDA loss (bound) and a Monte-Carlo expected cross-entropy on fixed images.")
@click.option("--bound-samples", type=click.IntRange(min=2), default=_DEFAULT.bound_samples, show_default=True,
              help="--track-bound: Monte-Carlo draws per image.")
@click.option("--bound-subset", type=click.IntRange(min=1), default=_DEFAULT.bound_subset, show_default=True,
              help="--track-bound: fixed (labeled) training images, a seeded random subset.")
@seed_option
@device_option
@deterministic_option
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory to write.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.option("--limit-train", type=click.IntRange(min=1), default=None, help="Use only the first N training images.")
@click.option("--limit-test", type=click.IntRange(min=1), default=None, help="Use only the first N test images.")
@click.option("--skip-bad-images", is_flag=True,
              help="Image folders: skip unreadable files and empty class folders (with a note) instead of refusing.")
@click.option("--workers", type=click.IntRange(min=0), default=_DEFAULT.workers,
              help="DataLoader worker processes per rank (image folders only), kept alive between epochs.")
def train_command(resume, milestones, **options):
    """Train a classifier with the ISDA loss; writes checkpoint.pt, metrics.jsonl, config.json.

    Several GPUs or nodes: torchrun --nproc_per_node N -m isda_viz.cli train ... (see the README).
    """
    if milestones is not None:
        try:
            options["milestones"] = sorted(int(m) for m in milestones.split(","))
        except ValueError:
            raise click.BadParameter("comma-separated epoch numbers, e.g. 80,120", param_hint="--milestones")
    context = click.get_current_context()
    explicit = {name for name in [*options, "milestones"]
                if context.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}
    result = fit(apply_recipe(TrainConfig(**options), explicit), resume=resume, log=click.echo)
    if result:  # empty on ranks other than 0, which write nothing
        click.echo(f"run written to {options['out']} (test accuracy {result.get('test_accuracy', float('nan')):.4f})")
