"""A compact class-conditional WGAN-GP generator (and critic) for 28-32 px images, saved and loaded.

Networks (sized so a CPU trains one to recognisable Fashion-MNIST in minutes):

* `WGANGenerator`: z `(N, latent_dim)` → linear → `(4W, S/4, S/4)` → two stages of
  [nearest 2x upsampling, 3x3 conv, conditional batch-norm, ReLU] → 3x3 conv → tanh,
  images `(N, C, S, S)` in [-1, 1]. Conditional batch-norm (de Vries et al. 2017;
  Miyato & Koyama 2018) gives each class its own per-channel scale and shift.
* `WGANCritic`: strided convs with LeakyReLU, no normalisation (the gradient
  penalty is per-sample), global sum pooling, and a projection head
  `f(x, y) = w·h(x) + embed(y)·h(x)` (Miyato & Koyama 2018).

`train_gan` (in `wgan_train.py`) trains them; a GAN_DIR holds `generator.pt`
(`save_generator`, read by `load_wgan`) and `training_state.pt` (for `--resume`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.errors import IsdaVizError
from isda_viz.readers import Fields, check_class_names
from isda_viz.runs import load_checkpoint, save_atomic

from .base import Generator
from .registry import LoadRequest, register_generator

GENERATOR_FILE = "generator.pt"
WGAN_FORMAT = "isda-viz-wgan"  # generator.pt's "format"
STATE_FILE = "training_state.pt"  # critic, optimisers, RNG: what --resume needs beyond generator.pt


# ----------------------------------------------------------------------------------------------------- networks


class ConditionalBatchNorm2d(nn.Module):
    """Batch-norm whose affine scale and shift are looked up per class (plain affine when `num_classes` is None)."""
    def __init__(self, channels: int, num_classes: int | None):
        super().__init__()
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(channels, affine=num_classes is None)
        if num_classes is not None:
            self.embed = nn.Embedding(num_classes, 2 * channels)
            with torch.no_grad():  # start as the identity: scale 1, shift 0
                self.embed.weight[:, :channels].fill_(1.0)
                self.embed.weight[:, channels:].zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = self.bn(x)
        if self.num_classes is None:
            return out
        scale, shift = self.embed(y).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return out * scale + shift


class UpBlock(nn.Module):
    """Nearest 2x upsampling, 3x3 conv, conditional batch-norm, ReLU."""
    def __init__(self, in_channels: int, out_channels: int, num_classes: int | None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)
        self.bn = ConditionalBatchNorm2d(out_channels, num_classes)

    def forward(self, x, y):
        return F.relu(self.bn(self.conv(F.interpolate(x, scale_factor=2, mode="nearest")), y))


class TrainedGenerator(Generator):
    """What the generators of `train-gan` share (`WGANGenerator`, `wgan_resnet.ResNetGenerator`): the fields
    `generator.pt` saves to rebuild them (`arch_config`), labels required when class-conditional, and
    `generate` in [-1, 1]. A subclass builds its layers after `super().__init__(...)` and calls
    `check_labels(y)` first in `forward`."""
    output_range = (-1.0, 1.0)

    def __init__(self, latent_dim: int, num_classes: int | None, channels: int, image_size: int, width: int,
                 class_names: list[str] | None):
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.channels, self.image_size, self.width = channels, image_size, width
        self.class_names = list(class_names) if class_names else None

    def arch_config(self) -> dict:
        """What rebuilds this network (saved in `generator.pt`)."""
        return {"latent_dim": self.latent_dim, "num_classes": self.num_classes, "channels": self.channels,
                "image_size": self.image_size, "width": self.width, "class_names": self.class_names}

    def check_labels(self, y: torch.Tensor | None) -> None:
        if self.conditional and y is None:
            raise IsdaVizError("this WGAN is class-conditional: pass labels y")

    def generate(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """`z (N, latent_dim)`, `y (N,)` class indices (None if unconditional) → `(N, C, S, S)` in [-1, 1]."""
        return self(z, y if self.conditional else None)


class WGANGenerator(TrainedGenerator):
    """Class-conditional (or unconditional) generator: `(N, latent_dim)`, `(N,)` → `(N, C, S, S)` in [-1, 1]."""
    name = "wgan"
    kind = "wgan"
    file_format = WGAN_FORMAT

    def __init__(self, latent_dim: int = 128, num_classes: int | None = 10, channels: int = 1, image_size: int = 28,
                 width: int = 32, class_names: list[str] | None = None):
        if image_size % 4:
            raise IsdaVizError(f"the WGAN generates sizes divisible by 4 (28, 32), not {image_size}")
        super().__init__(latent_dim, num_classes, channels, image_size, width, class_names)
        self.base = image_size // 4
        self.fc = nn.Linear(latent_dim, 4 * width * self.base * self.base, bias=False)
        self.bn0 = ConditionalBatchNorm2d(4 * width, num_classes)
        self.up1 = UpBlock(4 * width, 2 * width, num_classes)
        self.up2 = UpBlock(2 * width, width, num_classes)
        self.to_image = nn.Conv2d(width, channels, 3, 1, 1)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.check_labels(y)
        h = self.fc(z).view(len(z), 4 * self.width, self.base, self.base)
        h = F.relu(self.bn0(h, y))
        h = self.up2(self.up1(h, y), y)
        return torch.tanh(self.to_image(h))


class WGANCritic(nn.Module):
    """Critic `(N, C, S, S)` in [-1, 1], `(N,)` → `(N,)` scores; projection head when class-conditional."""
    def __init__(self, num_classes: int | None = 10, channels: int = 1, width: int = 32):
        super().__init__()
        self.num_classes = num_classes
        # Strided from the first layer: at 28 px a full-resolution first conv costs more than the
        # rest of the critic under the gradient penalty's double backward, for little gain in samples.
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),          # S/2
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),         # S/4
            nn.Conv2d(2 * width, 4 * width, 3, 1, 1), nn.LeakyReLU(0.2),
        )
        self.linear = nn.Linear(4 * width, 1)
        self.embed = nn.Embedding(num_classes, 4 * width) if num_classes is not None else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x).sum(dim=(2, 3))  # (N, 4W)
        out = self.linear(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(1)
        return out


# ------------------------------------------------------------------------------------------------- saving, loading


def save_generator(generator: Generator, path, iteration: int, dataset: str) -> None:
    """Write `generator.pt`: plain weights and the config that rebuilds the network (loads with weights_only=True);
    its "format" is the generator class's `file_format` (`WGANGenerator`, `wgan_resnet.ResNetGenerator`)."""
    save_atomic({"format": generator.file_format, "config": generator.arch_config(), "dataset": dataset,
                 "iteration": iteration, "state_dict": {k: v.detach().cpu().contiguous()
                                                        for k, v in generator.state_dict().items()}}, path)


def _checked_config(config, path: Path) -> dict:
    """A `generator.pt`'s `config`, checked before any layer is built (so a crafted width cannot ask for
    terabytes): the keys `arch_config` writes (WGANGenerator's and ResNetGenerator's alike), each an integer in
    range, distinct class names."""
    fields = Fields(config, f"the generator file {path}: config", "a dict")
    unknown = sorted(set(fields.data) - {"latent_dim", "num_classes", "channels", "image_size", "width",
                                         "class_names"})
    if unknown:
        fields.fail(unknown[0], "is not a setting of the generator")
    checked = {"latent_dim": fields.integer("latent_dim", 1, 4096), "channels": fields.integer("channels", 1, 4),
               "image_size": fields.integer("image_size", 8, 256), "width": fields.integer("width", 1, 1024),
               "num_classes": fields.integer("num_classes", 1, 100_000, default=None)}
    names = fields.data.get("class_names")
    if names is not None:
        checked["class_names"] = check_class_names(names, f"the generator file {path}: config.class_names")
    return checked


def load_wgan(path, device="cpu") -> WGANGenerator:
    """The frozen generator in a `generator.pt` written by `train_gan` (or the GAN_DIR holding one)."""
    return load_saved_generator(path, WGANGenerator, device)


def load_saved_generator(path, network: type[Generator], device="cpu") -> Generator:
    """The frozen `network` in a `generator.pt` that `save_generator` wrote from one (or the GAN_DIR holding it):
    its "format" must be `network.file_format`, its weights must fit its config; one-line errors else."""
    path = Path(path)
    if path.is_dir():
        path = path / GENERATOR_FILE
    ckpt = load_checkpoint(path, "generator file")
    if not isinstance(ckpt, dict) or ckpt.get("format") != network.file_format:
        raise IsdaVizError(f"{path} is not a {network.kind} generator written by isda-viz train-gan")
    try:
        generator = network(**_checked_config(ckpt.get("config"), path))
        generator.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise IsdaVizError(f"{path} is corrupt: its weights do not fit its config "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    generator.name = f"{network.name}:{path.parent}"
    return generator.to(device).freeze()


def _is_gan_dir_or_file(request: LoadRequest) -> bool:
    """A GAN_DIR (its generator.pt not another family's format: the train-gan architectures share the folder
    layout), or a generator.pt of this format."""
    path = request.path
    if path.is_dir():
        if not (path / GENERATOR_FILE).exists():
            return (path / STATE_FILE).exists()  # then load_wgan says generator.pt is missing
        try:
            contents = LoadRequest(str(path / GENERATOR_FILE)).contents()
        except IsdaVizError:
            return True  # unreadable: load_wgan says so
        return not isinstance(contents, dict) or contents.get("format", WGAN_FORMAT) == WGAN_FORMAT
    contents = request.contents()
    return isinstance(contents, dict) and contents.get("format") == WGAN_FORMAT


@register_generator(
    "wgan", summary="the compact class-conditional WGAN-GP of isda-viz train-gan", file="GAN_DIR or its generator.pt",
    dataset="yours (Fashion-MNIST shipped)", resolution="28 or 32 px", source="`isda-viz train-gan` (the shipped "
    "one: `isda_viz/pretrained/`)", licence="yours (the shipped weights: this project's)",
    command="isda-viz augment --image a.png --classifier runs/fmnist-isda --generator runs/fmnist-gan --out out/a",
    recognise=_is_gan_dir_or_file, folder_hint=f"{GENERATOR_FILE} (a train-gan GAN_DIR)")
def load_wgan_family(request: LoadRequest) -> WGANGenerator:
    """The registry's loader: `load_wgan`. Its batch-norm statistics are standing ones already (`train_gan`
    recomputes them before saving), so `standing_statistics` changes nothing."""
    return load_wgan(request.spec, request.device)


@torch.no_grad()
def recompute_batchnorm_statistics(generator: WGANGenerator, batches: int, batch_size: int,
                                   rng: torch.Generator) -> None:
    """Set the running statistics of every batch-norm to their average over `batches` random batches.

    Training normalises with batch statistics; the frozen generator (eval mode)
    uses running ones. Averages over many fresh batches ("standing statistics",
    Brock et al. 2019) make eval-mode samples match train-mode ones, one image at a time.
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    was_training = generator.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    generator.train()
    device = generator.device
    for _ in range(batches):
        z = torch.randn(batch_size, generator.latent_dim, generator=rng).to(device)
        y = torch.randint(generator.num_classes, (batch_size,), generator=rng).to(device) \
            if generator.conditional else None
        generator(z, y)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    generator.train(was_training)


