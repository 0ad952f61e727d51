"""Generator output → classifier input: value range, size, channels, normalisation.

A generator and a classifier need not agree on image size or channels (a 128 px
RGB BigGAN can feed a 28 px grayscale Fashion-MNIST classifier). Every step here
is differentiable, so gradients flow from the classifier's features back to the
generator's latent code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import IsdaVizError

# ITU-R BT.601 luma weights, as in PIL's convert("L") and torchvision's rgb_to_grayscale.
LUMINANCE = (0.299, 0.587, 0.114)


def map_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """`(N, C, H, W)` → `(N, channels, H, W)`: RGB → gray by luminance, gray → RGB by repetition."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 3 and channels == 1:
        weights = torch.tensor(LUMINANCE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    raise IsdaVizError(f"cannot map {c}-channel generator images to a {channels}-channel classifier "
                       "(only RGB→grayscale and grayscale→any)")


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """`(N, C, H, W)` → `(N, C, size, size)`, bilinear with antialiasing (no aliasing when shrinking 128 → 28)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def to_classifier_input(images: torch.Tensor, output_range: tuple[float, float], classifier) -> torch.Tensor:
    """Generator images `(N, C, H, W)` with values in `output_range` → the classifier's normalised input.

    `classifier` is an `isda_viz.classifier.Classifier` (anything with `channels`,
    `image_size` and `preprocess`). Values are clamped to [0, 1] like a saved image would be.
    """
    return classifier.preprocess(to_classifier_pixels(images, output_range, classifier))


def to_unit(images: torch.Tensor, output_range: tuple[float, float]) -> torch.Tensor:
    """Images with values in `output_range` → [0, 1], clamped like a saved image would be."""
    lo, hi = output_range
    return ((images - lo) / (hi - lo)).clamp(0, 1)


def to_classifier_pixels(images: torch.Tensor, output_range: tuple[float, float], classifier) -> torch.Tensor:
    """Generator images → `(N, classifier channels, size, size)` in [0, 1]: what is saved and measured."""
    return map_channels(resize(to_unit(images, output_range), classifier.image_size), classifier.channels)


def check_compatible(generator, classifier) -> None:
    """Raise `IsdaVizError` when a class-conditional generator's classes cannot be the classifier's."""
    if generator.conditional and generator.num_classes != classifier.num_classes:
        raise IsdaVizError(
            f"generator {generator.name} has {generator.num_classes} classes, the classifier in "
            f"{classifier.source} has {classifier.num_classes}; use a generator trained on the classifier's dataset")
    g, c = generator.channels, classifier.channels
    if not (g == c or g == 1 or (g == 3 and c == 1)):
        raise IsdaVizError(f"cannot map {g}-channel generator images to the {c}-channel classifier in "
                           f"{classifier.source} (only RGB→grayscale and grayscale→any)")


class GeneratorAdapter(nn.Module):
    """`generator` then `to_classifier_input`: `(z (N, latent_dim), y (N,))` → classifier input `(N, C', S', S')`.

    Checks on construction that generator and classifier fit together (class count, channels).
    """

    def __init__(self, generator, classifier):
        super().__init__()
        check_compatible(generator, classifier)
        self.generator = generator
        self.classifier = classifier

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        """Generator images `(N, C, H, W)` in its output range → classifier input."""
        return to_classifier_input(images, self.generator.output_range, self.classifier)

    def pixels(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Generated images as the classifier sees them, in [0, 1] before normalisation."""
        return to_classifier_pixels(self.generator.generate(z, y), self.generator.output_range, self.classifier)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.adapt(self.generator.generate(z, y))

    def logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The classifier's logits `(N, num_classes)` for generated images."""
        return self.classifier.model(self(z, y))
