"""The one interface the inverter and the figure code use to drive a generator.

A generator maps latent codes `z (N, latent_dim)` (and, when class-conditional,
labels `y (N,)` of its own class indices) to images `(N, channels, image_size,
image_size)` with values in `output_range` (e.g. (-1, 1)). It is frozen: in
eval mode with no parameter gradients, but differentiable in z.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from isda_viz.adapter import to_unit


class Generator(nn.Module):
    """Base class: subclasses set the attributes below and implement `generate`."""

    latent_dim: int
    num_classes: int | None          # None: unconditional
    image_size: int
    channels: int
    output_range: tuple[float, float] = (-1.0, 1.0)
    name: str = "generator"

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def generate(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """`z (N, latent_dim)`, `y (N,)` int or None → images `(N, channels, image_size, image_size)`."""
        raise NotImplementedError

    def sample_latent(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Latent codes from the generator's prior, `(n, latent_dim)` (standard normal by default)."""
        return torch.randn(n, self.latent_dim, generator=generator).to(device or self.device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Generator output → [0, 1]."""
        return to_unit(images, self.output_range)

    def freeze(self) -> "Generator":
        self.eval().requires_grad_(False)
        return self
