"""A compact class-conditional WGAN-GP for 28-32 px images, and `train_gan`, its resumable training loop.

Networks (sized so a CPU trains one to recognisable Fashion-MNIST in minutes):

* `WGANGenerator`: z `(N, latent_dim)` → linear → `(4W, S/4, S/4)` → two stages of
  [nearest 2x upsampling, 3x3 conv, conditional batch-norm, ReLU] → 3x3 conv → tanh,
  images `(N, C, S, S)` in [-1, 1]. Conditional batch-norm (de Vries et al. 2017;
  Miyato & Koyama 2018) gives each class its own per-channel scale and shift.
* `WGANCritic`: strided convs with LeakyReLU, no normalisation (the gradient
  penalty is per-sample), global sum pooling, and a projection head
  `f(x, y) = w·h(x) + embed(y)·h(x)` (Miyato & Koyama 2018).

Training (Gulrajani et al. 2017): the critic minimises `D(fake) - D(real) + λ·(‖∇D(x̂)‖ - 1)²`
on random interpolates x̂, `n_critic` critic steps per generator step, Adam with
β = (0.0 or 0.5, 0.9), learning rates decayed linearly to zero over the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz import __version__
from isda_viz.errors import IsdaVizError
from isda_viz.runs import (append_jsonl, load_checkpoint, pick_device, read_jsonl, save_atomic, save_image_atomic,
                           write_json_atomic)

from .base import Generator

GENERATOR_FILE = "generator.pt"
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


class WGANGenerator(Generator):
    """Class-conditional (or unconditional) generator: `(N, latent_dim)`, `(N,)` → `(N, channels, S, S)` in [-1, 1]."""

    name = "wgan"
    output_range = (-1.0, 1.0)

    def __init__(self, latent_dim: int = 128, num_classes: int | None = 10, channels: int = 1, image_size: int = 28,
                 width: int = 32, class_names: list[str] | None = None):
        super().__init__()
        if image_size % 4:
            raise IsdaVizError(f"the WGAN generates sizes divisible by 4 (28, 32), not {image_size}")
        self.latent_dim, self.num_classes, self.channels, self.image_size = latent_dim, num_classes, channels, image_size
        self.width = width
        self.class_names = list(class_names) if class_names else None
        self.base = image_size // 4
        self.fc = nn.Linear(latent_dim, 4 * width * self.base * self.base, bias=False)
        self.bn0 = ConditionalBatchNorm2d(4 * width, num_classes)
        self.up1 = UpBlock(4 * width, 2 * width, num_classes)
        self.up2 = UpBlock(2 * width, width, num_classes)
        self.to_image = nn.Conv2d(width, channels, 3, 1, 1)

    def arch_config(self) -> dict:
        """What rebuilds this network (saved in `generator.pt`)."""
        return {"latent_dim": self.latent_dim, "num_classes": self.num_classes, "channels": self.channels,
                "image_size": self.image_size, "width": self.width, "class_names": self.class_names}

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditional and y is None:
            raise IsdaVizError("this WGAN is class-conditional: pass labels y")
        h = self.fc(z).view(len(z), 4 * self.width, self.base, self.base)
        h = F.relu(self.bn0(h, y))
        h = self.up2(self.up1(h, y), y)
        return torch.tanh(self.to_image(h))

    def generate(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """`z (N, latent_dim)`, `y (N,)` class indices (None if unconditional) → `(N, C, S, S)` in [-1, 1]."""
        return self(z, y if self.conditional else None)


class WGANCritic(nn.Module):
    """Critic `(N, C, S, S)` in [-1, 1], `(N,)` → `(N,)` scores; projection head when class-conditional."""

    def __init__(self, num_classes: int | None = 10, channels: int = 1, width: int = 32):
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),       # S/2
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.LeakyReLU(0.2),   # S/4
            nn.Conv2d(4 * width, 4 * width, 3, 1, 1), nn.LeakyReLU(0.2),
        )
        self.linear = nn.Linear(4 * width, 1)
        self.embed = nn.Embedding(num_classes, 4 * width) if num_classes is not None else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x).sum(dim=(2, 3))  # (N, 4W)
        out = self.linear(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(1)
        return out
