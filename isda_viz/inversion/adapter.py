"""A generator and a classifier as one differentiable map z → features, and the checks that they fit.

They need not agree on image size or channels (a 128 px RGB BigGAN can feed a
28 px grayscale Fashion-MNIST classifier): `isda_viz.generators.base.to_classifier_input`
converts, and gradients flow from the classifier's features back to the latent code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from isda_viz.data.datasets import read_json_or_lines
from isda_viz.errors import IsdaVizError
from isda_viz.generators.base import to_classifier_input, to_classifier_pixels

if TYPE_CHECKING:
    from isda_viz.classifiers.classifier import Classifier
    from isda_viz.generators.base import Generator

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


@dataclass
class Models:
    """The frozen networks a pipeline drives: the classifier, the generator, an optional judge (a second
    classifier whose predictions are reported too) and the class map (`read_class_map`)."""
    classifier: Classifier
    generator: Generator
    judge: Classifier | None = None
    class_map: torch.Tensor | None = None   # (classifier classes,) generator class of each, -1: none

    def adapter(self) -> GeneratorAdapter:
        """The generator as the classifier sees it, conditioned through `class_map`."""
        return GeneratorAdapter(self.generator, self.classifier, self.class_map)
