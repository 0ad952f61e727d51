"""Frozen generators behind one interface (`Generator`), and `load_generator`, which picks the right one.

`load_generator(spec)` accepts
* a GAN_DIR written by `isda-viz train-gan` (or its `generator.pt`): the class-conditional WGAN-GP;
* a BigGAN folder holding `config.json` + `pytorch_model.bin` (always works offline);
* a BigGAN name, `biggan-deep-128|256|512`: a local copy, else a download where online.
"""

from __future__ import annotations

from pathlib import Path

from isda_viz.errors import IsdaVizError

from .base import Generator
from .biggan import DEFAULT_TRUNCATION, BigGANGenerator, load_biggan
from .biggan_weights import BIGGAN_NAMES, save_biggan
from .wgan import GENERATOR_FILE, STATE_FILE, WGANCritic, WGANGenerator, load_wgan
from .wgan_train import GanConfig, train_gan

__all__ = ["BIGGAN_NAMES", "BigGANGenerator", "GanConfig", "Generator", "WGANCritic", "WGANGenerator",
           "load_biggan", "load_generator", "load_wgan", "save_biggan", "train_gan"]


def load_generator(spec: str, device="cpu", truncation: float = DEFAULT_TRUNCATION) -> Generator:
    """The frozen generator named by `spec` (GAN_DIR, BigGAN folder or BigGAN name), on `device`.

    `truncation` applies to BigGAN only. Missing or corrupt files raise `IsdaVizError`.
    """
    path = Path(str(spec)).expanduser()
    if path.is_file():
        if path.name in ("config.json", "pytorch_model.bin"):
            return load_biggan(str(path.parent), device, truncation)
        return load_wgan(path, device)
    if path.is_dir():
        if (path / GENERATOR_FILE).exists() or (path / STATE_FILE).exists():
            return load_wgan(path, device)
        if (path / "config.json").exists() or (path / "pytorch_model.bin").exists():
            return load_biggan(str(path), device, truncation)
        raise IsdaVizError(f"--generator {path} holds neither {GENERATOR_FILE} (a train-gan GAN_DIR) nor "
                           "config.json + pytorch_model.bin (a BigGAN folder)")
    if str(spec) in BIGGAN_NAMES:
        return load_biggan(str(spec), device, truncation)
    raise IsdaVizError(f"--generator {spec} not found: give a GAN_DIR written by train-gan, a BigGAN folder "
                       f"(config.json + pytorch_model.bin) or one of {', '.join(BIGGAN_NAMES)}")
