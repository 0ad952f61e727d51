"""BigGAN-deep (`pytorch_pretrained_biggan`) behind the `Generator` interface, with its truncated prior.

Where the weights come from (names, caches, download, strict loading) is `biggan_weights.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from isda_viz.errors import IsdaVizError
from isda_viz.readers import read_json

from .base import Generator
from .biggan_weights import BIGGAN_NAMES, CONFIG_NAME, WEIGHTS_NAME, load_biggan_model
from .registry import LoadRequest, register_generator

DEFAULT_TRUNCATION = 0.5  # quality/diversity trade-off of Brock et al.'s truncation trick


def load_biggan(spec: str, device="cpu", truncation: float = DEFAULT_TRUNCATION) -> "BigGANGenerator":
    """The frozen BigGAN of a folder or a model name (see `biggan_weights.resolve_biggan`), loaded strictly."""
    name = str(spec) if str(spec) in BIGGAN_NAMES else f"biggan:{spec}"
    return BigGANGenerator(load_biggan_model(spec), truncation, name).to(device).freeze()


def _is_biggan_config(path: Path) -> bool:
    """Whether `path` is pytorch-pretrained-biggan's config.json (a train-gan GAN_DIR has a config.json too)."""
    try:
        config = read_json(path, "BigGAN config", limit=1 << 20)  # a regular file only: a FIFO never blocks here
    except IsdaVizError:
        return path.is_file()  # unreadable: let the loader say what is wrong with it
    return isinstance(config, dict) and "channel_width" in config and "layers" in config


def _is_biggan_folder(request: LoadRequest) -> bool:
    path = request.path
    if path.is_dir():
        return (path / WEIGHTS_NAME).exists() or _is_biggan_config(path / CONFIG_NAME)
    return path.name == WEIGHTS_NAME or (path.name == CONFIG_NAME and _is_biggan_config(path))


@register_generator(
    "biggan-deep", summary="pytorch-pretrained-biggan's ImageNet BigGAN-deep", file="a folder with config.json + "
    "pytorch_model.bin, or a name", dataset="ImageNet (1,000 classes)", resolution="128, 256, 512 px",
    source="huggingface/pytorch-pretrained-BigGAN (downloaded by name where online, into the cache root)",
    licence="Apache-2.0 (the package's, and DeepMind's TF-Hub BigGAN-deep weights it converts)",
    command="isda-viz augment --image dog.jpg --classifier resnet50.pth --classifier-arch torchvision:resnet50 "
            "--generator biggan-deep-128 --out out/dog",
    recognise=_is_biggan_folder, folder_hint=f"{CONFIG_NAME} + {WEIGHTS_NAME} (a BigGAN-deep folder)",
    names=BIGGAN_NAMES)
def load_biggan_deep(request: LoadRequest) -> "BigGANGenerator":
    """The registry's loader: `load_biggan` of the folder, the folder holding the file, or the name.

    BigGAN-deep's batch-norm statistics are stored per truncation (interpolated by the package), so
    `standing_statistics` changes nothing."""
    path = Path(request.spec).expanduser()
    spec = str(path.parent) if path.is_file() else request.spec
    truncation = DEFAULT_TRUNCATION if request.truncation is None else request.truncation
    return load_biggan(spec, request.device, truncation)


def truncated_normal(n: int, dim: int, truncation: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`(n, dim)` standard normals truncated to [-2, 2] (by resampling), times `truncation`.

    The prior of BigGAN's truncation trick, as `pytorch_pretrained_biggan.truncated_noise_sample`.
    """
    z = torch.randn(n, dim, generator=generator)
    outside = z.abs() > 2
    while outside.any():
        z[outside] = torch.randn(int(outside.sum()), generator=generator)
        outside = z.abs() > 2
    return z * truncation


class BigGANGenerator(Generator):
    """A BigGAN-deep: `z (N, z_dim)`, class indices `y (N,)` → RGB `(N, 3, S, S)` in [-1, 1].

    Labels become one-hot class vectors; `truncation` in (0, 1] selects the
    batch-norm statistics the model was exported with and scales `sample_latent`.
    """

    channels = 3
    output_range = (-1.0, 1.0)
    kind = "biggan-deep"

    def __init__(self, model, truncation: float = DEFAULT_TRUNCATION, name: str = "biggan"):
        super().__init__()
        if not 0 < truncation <= 1:
            raise IsdaVizError(f"BigGAN truncation must be in (0, 1], not {truncation}")
        self.model = model
        self.truncation = float(truncation)
        self.name = name
        config = model.config
        self.latent_dim = config.z_dim
        self.num_classes = config.num_classes
        # 4x4 doubled by every up-sampling layer (output_dim in the config is not always the truth).
        self.image_size = 4 * 2 ** sum(bool(layer[0]) for layer in config.layers)

    def generate(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """`z (N, latent_dim)`, `y (N,)` class indices in [0, num_classes) → `(N, 3, S, S)` in [-1, 1]."""
        if y is None:
            raise IsdaVizError("BigGAN is class-conditional: pass class labels y")
        y = torch.as_tensor(y, device=z.device).long()
        if y.numel() and (y.min() < 0 or y.max() >= self.num_classes):
            raise IsdaVizError(f"BigGAN class labels must be in [0, {self.num_classes})")
        one_hot = F.one_hot(y, self.num_classes).to(z.dtype)
        return self.model(z, one_hot, self.truncation)

    def sample_latent(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Truncated-normal latent codes `(n, latent_dim)`, in [-2·truncation, 2·truncation]."""
        return truncated_normal(n, self.latent_dim, self.truncation, generator).to(device or self.device)
