"""Small Fashion-MNIST weights shipped with the package, made by its own commands.

Each folder holds what the command wrote (float16 weights where that keeps the
figures) and `provenance.json`: the exact command, seed, commit, wall time and
metrics. `augment`, `grid` and `demo` use them when no models are given.
"""

from __future__ import annotations

from pathlib import Path

from isda_viz.errors import IsdaVizError

HERE = Path(__file__).parent
CLASSIFIER, JUDGE, GENERATOR = "fmnist-isda-resnet32", "fmnist-ce-resnet32", "fmnist-wgan-gp"


def _shipped(name: str, weights: str, option: str) -> Path:
    folder = HERE / name
    if not (folder / weights).exists():
        raise IsdaVizError(f"this installation ships no {name} weights; pass {option}")
    return folder


def default_classifier() -> Path:
    return _shipped(CLASSIFIER, "checkpoint.pt", "--classifier RUN_DIR")


def default_judge() -> Path | None:
    """The shipped CE judge, or None when not shipped (the judge is optional)."""
    return HERE / JUDGE if (HERE / JUDGE / "checkpoint.pt").exists() else None


def default_generator() -> Path:
    return _shipped(GENERATOR, "generator.pt", "--generator GAN_DIR")
