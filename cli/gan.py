"""`isda-viz train-gan`: train the class-conditional WGAN-GP the inverter uses."""

from __future__ import annotations

import click

from isda_viz.data.datasets import DATASET_NAMES
from isda_viz.generators.wgan_train import GAN_ARCHS, GAN_RECIPES, GanConfig, apply_gan_recipe, train_gan

from .common import classifier_options, deterministic_option, device_option, seed_option

_DEFAULT = GanConfig(out="")


@click.command("train-gan")
@click.option("--dataset", type=click.Choice(DATASET_NAMES), default="fashion-mnist", show_default=True)
@click.option("--data-root", type=click.Path(), default=None, help="Dataset folder (as for `train`).")
@click.option("--iterations", type=click.IntRange(min=1), default=_DEFAULT.iterations, show_default=True,
              help="Generator steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=_DEFAULT.batch_size, show_default=True)
@click.option("--n-critic", type=click.IntRange(min=1), default=_DEFAULT.n_critic, show_default=True,
              help="Critic steps per generator step.")
@click.option("--gp", type=click.FloatRange(min=0), default=_DEFAULT.gp, show_default=True,
              help="Gradient-penalty weight lambda.")
@click.option("--lr-g", type=float, default=_DEFAULT.lr_g, show_default=True, help="Generator Adam learning rate.")
@click.option("--lr-d", type=float, default=_DEFAULT.lr_d, show_default=True, help="Critic Adam learning rate.")
@click.option("--beta1", type=click.Choice(["0.0", "0.5"]), default=str(_DEFAULT.beta1), show_default=True,
              help="Adam beta1 (beta2 is 0.9).")
@click.option("--unconditional", is_flag=True, help="Ignore labels (no class-conditional sampling).")
@click.option("--arch", type=click.Choice(list(GAN_ARCHS)), default=_DEFAULT.arch, show_default=True,
              help="compact: the small WGAN-GP a CPU trains in minutes (Fashion-MNIST); resnet: the ResNet generator "
                   "and critic of Gulrajani et al. 2017 for 32 px (CIFAR), its generator's moving average saved.")
@click.option("--width", type=int, default=None,
              help="Generator channels (default: compact 32, resnet 128, Gulrajani et al.'s DIM_G).")
@click.option("--critic-width", type=int, default=None,
              help="Critic channels (default: compact 32, resnet the generator's width).")
@click.option("--ema-decay", type=float, default=None,
              help="Decay of the moving average of the generator's weights that is saved (default: resnet 0.999, "
                   "compact none).")
@click.option("--recipe", type=click.Choice(list(GAN_RECIPES)), default=None,
              help="gulrajani: their CIFAR schedule (n_critic 5, Adam 2e-4 with beta (0, 0.9), linear decay, "
                   "100k iterations, batches 64/128); options given explicitly win.")
@classifier_options("A `train` RUN_DIR, or a weights FILE with --classifier-arch: report how often it classifies "
                    "samples as their conditioning class.")
@click.option("--limit-train", type=click.IntRange(min=1), default=None, help="Use only the first N training images.")
@click.option("--sample-every", type=click.IntRange(min=1), default=_DEFAULT.sample_every, show_default=True,
              help="Iterations between samples.png, generator.pt and agreement refreshes.")
@seed_option
@device_option
@deterministic_option
@click.option("--out", type=click.Path(file_okay=False), required=True, help="GAN_DIR to write.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last saved iteration.")
def train_gan_command(resume, unconditional, beta1, **options):
    """Train a class-conditional WGAN-GP; writes generator.pt, samples.png, metrics.jsonl into --out."""
    context = click.get_current_context()
    explicit = {name for name in [*options, "beta1"]
                if context.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}
    cfg = apply_gan_recipe(GanConfig(conditional=not unconditional, beta1=float(beta1), **options), explicit)
    record = train_gan(cfg, resume=resume, log=click.echo)
    agreement = f", class agreement {record['agreement']:.3f}" if "agreement" in record else ""
    click.echo(f"GAN written to {options['out']} (generator.pt, samples.png, metrics.jsonl; "
               f"{record.get('iteration', 0)} iterations{agreement})")
