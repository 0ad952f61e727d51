"""The one interface the inverter and the figure code use to drive a generator.

A generator maps latent codes `z (N, latent_dim)` (and, when class-conditional,
labels `y (N,)` of its own class indices) to images `(N, channels, image_size,
image_size)` with values in `output_range` (e.g. (-1, 1)). It is frozen: in
eval mode with no parameter gradients, but differentiable in z.

Also here: generator output → classifier input (value range, size, channels),
differentiable, so gradients flow from the classifier's features back to z.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from isda_viz.data.images import map_channels, resize


class Generator(nn.Module):
    """Base class: subclasses set the attributes below and implement `generate`."""
    latent_dim: int
    num_classes: int | None          # None: unconditional
    image_size: int
    channels: int
    output_range: tuple[float, float] = (-1.0, 1.0)
    name: str = "generator"          # says where it was loaded from
    kind: str = "generator"          # its registered family (`generators.registry`), set by `load_generator`

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


def to_unit(images: torch.Tensor, output_range: tuple[float, float]) -> torch.Tensor:
    """Images with values in `output_range` → [0, 1], clamped like a saved image would be."""
    lo, hi = output_range
    return ((images - lo) / (hi - lo)).clamp(0, 1)


def to_classifier_input(images: torch.Tensor, output_range: tuple[float, float], classifier) -> torch.Tensor:
    """Generator images `(N, C, H, W)` with values in `output_range` → the classifier's normalised input.

    `classifier` is an `isda_viz.classifiers.classifier.Classifier` (anything with `channels`,
    `image_size` and `preprocess`). Values are clamped to [0, 1] like a saved image would be.
    """
    return classifier.preprocess(to_classifier_pixels(images, output_range, classifier))


def to_classifier_pixels(images: torch.Tensor, output_range: tuple[float, float], classifier) -> torch.Tensor:
    """Generator images → `(N, classifier channels, size, size)` in [0, 1]: what is saved and measured."""
    return map_channels(resize(to_unit(images, output_range), classifier.image_size), classifier.channels)
