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


CLASS_MAP_HELP = ("--class-map FILE (JSON {classifier_class: generator_class}, or two columns per line) "
                  "to say which generator class draws each classifier class")


def _require_conditional(generator) -> None:
    if not generator.conditional:
        raise IsdaVizError(f"--class-map maps classes to a class-conditional generator; {generator.name} has none")


def check_compatible(generator, classifier, class_map: torch.Tensor | None = None) -> None:
    """Raise `IsdaVizError` when a class-conditional generator's classes cannot be the classifier's.

    Without `class_map` the class counts must match (class i of the classifier is class i of the
    generator); `class_map` is `read_class_map`'s `(num_classes,)` table.
    """
    if class_map is not None:
        _require_conditional(generator)
    if generator.conditional and class_map is None and generator.num_classes != classifier.num_classes:
        raise IsdaVizError(
            f"generator {generator.name} has {generator.num_classes} classes, the classifier in "
            f"{classifier.source} has {classifier.num_classes}; give {CLASS_MAP_HELP}, or use a generator "
            "trained on the classifier's dataset")
    g, c = generator.channels, classifier.channels
    if not (g == c or g == 1 or (g == 3 and c == 1)):
        raise IsdaVizError(f"cannot map {g}-channel generator images to the {c}-channel classifier in "
                           f"{classifier.source} (only RGB→grayscale and grayscale→any)")


def read_class_map(path, classifier, generator) -> torch.Tensor:
    """`--class-map FILE` → int64 `(classifier.num_classes,)`: the class of the class-conditional `generator`
    that draws each classifier class, -1 if none.

    FILE is JSON, `{classifier_class: generator_class}` (classifier classes by name or index,
    generator classes by index), or text with two columns per line (tab, comma or spaces between
    them; `#` starts a comment). Unknown classes and out-of-range generator indices are errors.
    """
    from pathlib import Path

    from .data import read_json_or_lines

    _require_conditional(generator)
    path = Path(str(path)).expanduser()
    data, lines = read_json_or_lines(path, "--class-map")
    if lines is None:
        if not isinstance(data, dict):
            raise IsdaVizError(f"--class-map {path}: a JSON class map is an object {{classifier_class: generator_class}}")
        pairs = [(str(k), v) for k, v in data.items()]
    else:
        pairs = []
        for number, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split("\t" if "\t" in line else "," if "," in line else None)]
            parts = [p for p in parts if p]
            if len(parts) < 2:
                raise IsdaVizError(f"--class-map {path} line {number}: expected two columns, "
                                   f"classifier class and generator class")
            pairs.append((" ".join(parts[:-1]), parts[-1]))
    generator_classes = generator.num_classes
    table = torch.full((classifier.num_classes,), -1, dtype=torch.long)
    for source, target in pairs:
        try:
            target = int(target)
        except (TypeError, ValueError):
            raise IsdaVizError(f"--class-map {path}: generator class {target!r} is not an index") from None
        if not 0 <= target < generator_classes:
            raise IsdaVizError(f"--class-map {path}: generator class {target} is not in 0-{generator_classes - 1}")
        table[classifier.class_index(source, "--class-map")] = target
    if (table < 0).all():
        raise IsdaVizError(f"--class-map {path} maps no class")
    return table


class GeneratorAdapter(nn.Module):
    """`generator` then `to_classifier_input`: `(z (N, latent_dim), y (N,))` → classifier input `(N, C', S', S')`.

    `y` are the classifier's class indices; `class_map` (`read_class_map`) turns them into the
    generator's (default: the same index). Checks on construction that generator and classifier
    fit together (class count, channels).
    """

    def __init__(self, generator, classifier, class_map: torch.Tensor | None = None):
        super().__init__()
        check_compatible(generator, classifier, class_map)
        self.generator = generator
        self.classifier = classifier
        self.class_map = class_map

    def generator_labels(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """Classifier class indices `(N,)` → the generator's `(N,)`; a class the map leaves out is an error."""
        if y is None or self.class_map is None:
            return y
        mapped = self.class_map.to(y.device)[y]
        if (mapped < 0).any():
            c = int(y[mapped < 0][0])
            raise IsdaVizError(f"--class-map gives no generator class for class {c} "
                               f"({self.classifier.class_names[c]}) of the classifier")
        return mapped

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        """Generator images `(N, C, H, W)` in its output range → classifier input."""
        return to_classifier_input(images, self.generator.output_range, self.classifier)

    def pixels(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Generated images as the classifier sees them, in [0, 1] before normalisation."""
        images = self.generator.generate(z, self.generator_labels(y))
        return to_classifier_pixels(images, self.generator.output_range, self.classifier)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.adapt(self.generator.generate(z, self.generator_labels(y)))

    def logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The classifier's logits `(N, num_classes)` for generated images."""
        return self.classifier.model(self(z, y))
