"""Frozen generators behind one interface (`Generator`), one registered family per module, and
`load_generator`, the one entry point (see `registry.py`).

`load_generator(spec)` accepts `KIND:FILE` for any registered kind (`generator_families()`), or a bare
file, folder or name whose layout a family recognises: a GAN_DIR written by `isda-viz train-gan` (or
its `generator.pt`), a BigGAN-deep folder (`config.json` + `pytorch_model.bin`) or name
(`biggan-deep-128|256|512`), and the pretrained files of the README's "Generators" table.
"""

from __future__ import annotations

from .base import Generator
from .biggan import DEFAULT_TRUNCATION, BigGANGenerator, load_biggan
from .biggan_weights import BIGGAN_NAMES, save_biggan
from .registry import (GeneratorFamily, LoadRequest, generator_families, generator_family, generator_help,
                       generator_table, load_generator, register_generator)
from .wgan import GENERATOR_FILE, STATE_FILE, WGANCritic, WGANGenerator, load_wgan
from .wgan_train import GanConfig, train_gan

__all__ = ["BIGGAN_NAMES", "BigGANGenerator", "GanConfig", "Generator", "GeneratorFamily", "LoadRequest",
           "WGANCritic", "WGANGenerator", "generator_families", "generator_family", "generator_help",
           "generator_table", "load_biggan", "load_generator", "load_wgan", "register_generator", "save_biggan",
           "train_gan"]
