"""Options several commands share."""

from __future__ import annotations

import click

from isda_viz.classifiers.registry import arch_help
from isda_viz.generators.registry import generator_help
from isda_viz.inversion.starts import REFINE_STEPS

device_option = click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu).")
deterministic_option = click.option(
    "--deterministic", is_flag=True,
    help="CUDA: deterministic kernels, no TF32, cuBLAS workspace setting, so the same seed gives bit-identical "
         "results on this machine (slower; an operation without a deterministic kernel is named and refused). "
         "The CPU is deterministic without it.")
seed_option = click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1),
                           help="Random seed, 0 to 2**63 - 1; same seed, same outputs.")
truncation_option = click.option("--truncation", type=click.FloatRange(0, 1, min_open=True), default=None,
                                 help="Truncation of a BigGAN's latent prior (default: 0.5 for biggan-deep, "
                                      "1, none, for the other BigGANs; ignored by WGAN generators).")
generator_option = click.option("--generator", default=None, metavar="KIND:FILE|PATH|NAME", help=generator_help())
embed_option = click.option("--embed", is_flag=True,
                            help="Inline the images of the HTML page as data: URIs (the page alone can be mailed).")


def classifier_options(classifier_help: str):
    """`--classifier`, `--classifier-arch`, `--class-names`: a RUN_DIR, or a weights FILE and what it holds.

    The command receives them as `classifier`, `classifier_arch`, `class_names`.
    """
    options = [
        click.option("--classifier", default=None, help=classifier_help),
        click.option("--classifier-arch", default=None, metavar="ARCH", help=arch_help()),
        click.option("--class-names", type=click.Path(dir_okay=False), default=None,
                     help="File naming the classes of a --classifier FILE, one per line or a JSON list "
                          "(default: --data-root's train/ folders)."),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate

inverter_option = click.option(
    "--inverter", type=click.Choice(["search", "amortized"]), default=None,
    help="How latent codes are found: amortized (the pair's trained inverter, a few feed-forward passes, then "
         "--refine-steps optimiser steps; `isda-viz train-inverter` trains one) or search (random starts, hundreds "
         "of optimiser steps). Default: amortized where the pair has a trained inverter, else search.")

refine_steps_option = click.option(
    "--refine-steps", type=click.IntRange(0, 100_000), default=None,
    help=f"Optimiser steps after the amortized inverter's passes, in Step I and in Step II (default {REFINE_STEPS}; "
         "0: the inverter alone).")
