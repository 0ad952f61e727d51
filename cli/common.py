"""Options several commands share."""

from __future__ import annotations

import click

device_option = click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu).")
seed_option = click.option("--seed", default=0, show_default=True, type=int, help="Random seed; same seed, same outputs.")
truncation_option = click.option("--truncation", type=click.FloatRange(0, 1, min_open=True), default=None,
                                 help="BigGAN truncation (default 0.5; ignored by WGAN generators).")
embed_option = click.option("--embed", is_flag=True,
                            help="Inline the images of the HTML page as data: URIs (the page alone can be mailed).")
