"""The registry of classifier families: what `--classifier-arch` can name, and the one type their loaders return.

A family is one module of `isda_viz.classifiers` and one registration, as timm's `register_model`:

    @register_classifier_family("torchvision", prefix="torchvision", names=("torchvision:NAME",), ...)
    def load_torchvision_classifier(path, name) -> ClassifierWeights: ...

The families of the public ISDA CIFAR code register through `foreign.register_public_family`, which adds the
reader they share. Every list of names comes from here: the `--classifier-arch` help (`arch_help`), the error
for an unknown name (`known_archs`), the README's table (`readme_table`; `python -m isda_viz.classifiers.registry`
prints it), and `load_classifier` finds a file's loader here (`find_family`). The registry imports every module of
`isda_viz.classifiers` the first time it is asked (`classifier_families`), so a new family needs no list of
modules edited anywhere.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from isda_viz.errors import IsdaVizError

WEIGHTS_NOTE = "Weights files may be .safetensors."


@dataclass
class ClassifierWeights:
    """A classifier read from a weights file by its family's loader, and what the file says about it.

    `model` has isda-viz's model shape, in eval mode on the CPU: `features(x) (N, A)`, `fc: nn.Linear(A, C)`,
    `feature_dim = A`, `forward(x)` the logits `(N, C)`; it takes `(N, channels, image_size, image_size)` inputs
    in [0, 1] normalised with `mean`/`std`. `path` is the file read (inside a folder too); `arch` the canonical
    `--classifier-arch` spelling. `class_names`: the file's own (the public CIFAR code's from the class count, a
    Hugging Face folder's `label_names`), else None. `dataset`: what the file says it was trained on, else None.
    Class statistics the file holds, float64 on the CPU, else None: `class_covariance (C, A, A)` or its diagonal
    `(C, A)` (population covariances), `class_mean (C, A)`, `class_count (C,)` (features seen, summed over every
    epoch). `epoch` (epochs trained) and `best_acc` (top-1 in percent) when the file records them.
    """

    path: Path
    arch: str
    model: nn.Module
    mean: list[float]
    std: list[float]
    image_size: int
    channels: int = 3
    class_names: list[str] | None = None
    dataset: str | None = None
    class_covariance: torch.Tensor | None = None
    class_mean: torch.Tensor | None = None
    class_count: torch.Tensor | None = None
    epoch: int | None = None
    best_acc: float | None = None

    @property
    def num_classes(self) -> int:
        return self.model.fc.out_features

    def estimator_state(self) -> dict | None:
        """The statistics as `CovarianceEstimator.state_dict()` (`m2 = Σ · n`, float64), or None without any."""
        if self.class_covariance is None:
            return None
        count = self.class_count.to(torch.float64)
        covariance = self.class_covariance.to(torch.float64)
        scale = count.view(-1, *[1] * (covariance.dim() - 1))
        return {"num_features": self.model.feature_dim, "num_classes": self.num_classes,
                "diagonal": covariance.dim() == 2, "m2": covariance * scale,
                "mean64": self.class_mean.to(torch.float64).clone(), "count": count.clone()}


@dataclass(frozen=True)
class ReadmeRow:
    """One row of the README's `--classifier-arch` table (markdown cells)."""
    spellings: str       # the names, e.g. "`resnet20` … `resnet1202`"
    written_by: str      # the file, and what writes it
    feature_width: str   # A, the width of the features ISDA augments
    command: str         # one command that reads such a file


@dataclass(frozen=True)
class ClassifierFamily:
    """One family of `--classifier-arch` names.

    A name belongs to the family when it starts with `prefix:` (then `load` gets what follows the colon) or, for
    families without a prefix, when `pattern` matches it whole (then `load` gets the name). `load(path, name)`
    reads a weights file into `ClassifierWeights`, one-line `IsdaVizError`s for anything that does not fit.
    `names` are the spellings lists show, `forms` the other spellings as templates (`wrnDEPTH_WIDTH`);
    `summary` says what files the family reads (help). `format` is `Classifier.config["format"]`. `network`
    (families of the public CIFAR code): the `public.PublicArch` a `re.Match` of `pattern` spells; `guess`: the
    name a feature state dict was saved from, if its keys tell. `reads_folders`: `--classifier` may be a folder.
    Lists show families by `order`, then in the order they registered.
    """

    name: str
    load: Callable[[Path, str], ClassifierWeights]
    names: tuple[str, ...]
    summary: str
    prefix: str | None = None
    pattern: str | None = None
    forms: tuple[str, ...] = ()
    rows: tuple[ReadmeRow, ...] = ()
    format: str | None = None
    network: Callable | None = None
    guess: Callable[[Mapping[str, torch.Tensor]], str | None] | None = None
    reads_folders: bool = False
    order: int = 100

    def match(self, arch: str) -> re.Match | None:
        """The match of `arch` against this family (`prefix:NAME` or `pattern`), or None."""
        if self.prefix is not None:
            return re.fullmatch(re.escape(self.prefix) + r":(.*)", arch)
        return re.fullmatch(self.pattern, arch)

    def loader_name(self, arch: str) -> str:
        """What `load` gets for `arch`: the part after `prefix:`, or the whole name."""
        return arch[len(self.prefix) + 1:] if self.prefix is not None else arch


_FAMILIES: dict[str, ClassifierFamily] = {}
_discovered = False


def register_classifier_family(name: str, *, names, summary: str, prefix: str | None = None,
                               pattern: str | None = None, forms=(), rows=(), format: str | None = None,
                               network: Callable | None = None, guess=None, reads_folders: bool = False,
                               order: int = 100):
    """Decorator registering `load(path, name) -> ClassifierWeights` as the family `name` (see `ClassifierFamily`).

    Exactly one of `prefix` and `pattern` says which `--classifier-arch` names are the family's. Returns the
    function unchanged. Registering a name twice is an error (two modules claiming one family).
    """
    if (prefix is None) == (pattern is None):
        raise ValueError(f"classifier family {name}: give exactly one of prefix and pattern")

    def register(load):
        family = ClassifierFamily(
            name=name, load=load, names=tuple(names), summary=summary, prefix=prefix, pattern=pattern,
            forms=tuple(forms), rows=tuple(rows), format=format or name, network=network, guess=guess,
            reads_folders=reads_folders, order=order)
        if _FAMILIES.get(name, family) != family:
            raise ValueError(f"two classifier families named {name!r}")
        _FAMILIES[name] = family
        return load

    return register


def unregister_classifier_family(name: str) -> None:
    """Remove a family (a plug-in's, or a test's)."""
    _FAMILIES.pop(name, None)


def _discover() -> None:
    """Import every module of `isda_viz.classifiers` once, so that each registers its families."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("isda_viz.classifiers")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def classifier_families() -> list[ClassifierFamily]:
    """Every registered family, in list order (`order`, then registration)."""
    _discover()
    registered = list(_FAMILIES.values())
    return sorted(registered, key=lambda f: (f.order, registered.index(f)))


def find_family(arch: str) -> ClassifierFamily | None:
    """The family a `--classifier-arch` name belongs to, or None."""
    return next((f for f in classifier_families() if f.match(arch) is not None), None)


def known_archs(families: list[ClassifierFamily] | None = None) -> str:
    """The names of `families` (default: all) for an error message: names, then `(also <forms>)`."""
    families = classifier_families() if families is None else families
    names = [n for f in families for n in f.names]
    forms = [form for f in families for form in f.forms]
    return ", ".join(names) + (f" (also {', '.join(forms)})" if forms else "")


def arch_help() -> str:
    """The `--classifier-arch` help: every family's first names and what it reads."""
    parts = [f"{', '.join(f.names[:2])}{', ...' if len(f.names) > 2 or f.forms else ''} ({f.summary})"
             for f in classifier_families()]
    return (f"What the --classifier FILE holds: {'; '.join(parts)}. The README's table lists every name. "
            f"{WEIGHTS_NOTE} Leave out for an isda-viz RUN_DIR.")


def readme_table() -> str:
    """The README's table of every `--classifier-arch` family (markdown, one row per `ReadmeRow`)."""
    lines = ["| `--classifier-arch` | the file: written by | A | one command |", "|---|---|---|---|"]
    for family in classifier_families():
        lines += [f"| {r.spellings} | {r.written_by} | {r.feature_width} | `{r.command}` |" for r in family.rows]
    return "\n".join(lines)


if __name__ == "__main__":  # run as a script this file is `__main__`; the families register in the package's module
    from isda_viz.classifiers.registry import readme_table as _table

    print(_table())
