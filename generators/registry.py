"""The generator registry: a family is one module under `generators/` and one `@register_generator`.

A family's registration carries its loader and what users are told about it; `--generator`'s help,
the error that lists the known kinds and the README's "Generators" table are all made from here.

* `register_generator(kind, ...)` decorates a loader `load(request: LoadRequest) -> Generator`.
* `load_generator(spec, device, truncation, standing_statistics=...)` is the one entry point:
  `KIND:FILE` goes to that family; a bare file, folder or name goes to the family whose
  `recognise(request)` accepts it (e.g. by the file's keys); nothing recognising it lists the kinds.
* Families are found by importing every module of this package (`discover`): adding a family
  touches no other file.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from isda_viz.errors import IsdaVizError
from isda_viz.runs import load_checkpoint

from .base import Generator

_KIND = re.compile(r"^[a-z][a-z0-9-]*$")
# Modules of this package that hold no family, which `discover` skips (a training loop and the generator report
# pull in classifiers and outputs, which loading a generator does not need). Modules named `_*` are skipped too.
_NOT_FAMILIES = {"base", "registry", "wgan_train", "reach"}


@dataclass
class LoadRequest:
    """What `load_generator` was asked for, handed to a family's loader and its `recognise`.

    `spec` is the `--generator` value without its `KIND:` prefix; `path` the file or folder it
    names (None for a bare name such as `biggan-deep-128`); `truncation` None means the family's
    default; `standing_statistics` asks for recomputed batch-norm statistics (families that store
    standing statistics already, or have no batch norm, ignore it).
    """
    spec: str
    device: Any = "cpu"
    truncation: float | None = None
    standing_statistics: bool = True
    kind: str | None = None                      # given as KIND:FILE
    _contents: Any = field(default=None, repr=False)

    @property
    def path(self) -> Path | None:
        path = Path(self.spec).expanduser()
        return path if path.exists() else None

    def contents(self) -> Any:
        """The file's objects, read once with `torch.load(weights_only=True)` (tensors and plain containers
        only; non-finite tensors refused): one `IsdaVizError` for a missing, corrupt or non-weight file."""
        if self._contents is None:
            path = Path(self.spec).expanduser()
            if path.is_dir():
                raise IsdaVizError(f"--generator {path} is a folder, not a weight file")
            self._contents = load_checkpoint(path, "generator file")
        return self._contents

    def tensors(self, wrapper: str | None = None) -> dict[str, torch.Tensor] | None:
        """The file's state dict (under `wrapper` when given), or None when the file holds no such dict of tensors.

        Errors reading the file propagate; a folder, or a file of another shape, gives None (so `recognise`
        can say no).
        """
        if Path(self.spec).expanduser().is_dir():
            return None
        obj = self.contents()
        if wrapper is not None:
            obj = obj.get(wrapper) if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            return None
        return obj


@dataclass(frozen=True)
class GeneratorFamily:
    """One registered family: its loader and the facts shown in help, errors and the README table."""
    kind: str
    load: Callable[[LoadRequest], Generator]
    summary: str                  # one phrase: what the family is
    file: str                     # what `--generator` is given: "GAN_DIR or generator.pt", "G_ema.pth", ...
    dataset: str
    resolution: str
    source: str                   # where the file comes from
    licence: str
    command: str                  # an example command line
    recognise: Callable[[LoadRequest], bool] | None = None   # claims a bare file/folder/name
    folder_hint: str | None = None                         # what a folder of this family holds
    names: tuple[str, ...] = ()                            # bare names that resolve to this family
    module: str = ""


_FAMILIES: dict[str, GeneratorFamily] = {}
_discovered = False


def register_generator(kind: str, *, summary: str, file: str, dataset: str, resolution: str, source: str,
                       licence: str, command: str, recognise: Callable[[LoadRequest], bool] | None = None,
                       folder_hint: str | None = None, names: tuple[str, ...] = ()):
    """Decorator registering `load(request: LoadRequest) -> Generator` as the loader of family `kind`.

    `kind` is what users write before the colon in `--generator KIND:FILE` (lower case, digits, dashes).
    `recognise(request) -> bool` claims bare files (by their keys), folders or names; it is called
    only on what exists (or on `names`), should read the file through `request.tensors()` /
    `request.contents()` (read once, shared by every family) and say no rather than raise for another
    family's file.
    """
    if not _KIND.match(kind):
        raise ValueError(f"generator kind {kind!r}: lower case letters, digits and dashes, starting with a letter")

    def decorate(load: Callable[[LoadRequest], Generator]):
        if kind in _FAMILIES and _FAMILIES[kind].module != load.__module__:
            raise ValueError(f"generator kind {kind!r} registered twice ({_FAMILIES[kind].module}, {load.__module__})")
        _FAMILIES[kind] = GeneratorFamily(kind, load, summary, file, dataset, resolution, source, licence, command,
                                          recognise, folder_hint, tuple(names), load.__module__)
        return load

    return decorate


def discover() -> None:
    """Import every family module of this package (once), so that each registers itself."""
    global _discovered
    if _discovered:
        return
    package = __name__.rsplit(".", 1)[0]
    for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__), key=lambda m: m.name):
        if not info.name.startswith("_") and info.name not in _NOT_FAMILIES:
            importlib.import_module(f"{package}.{info.name}")
    _discovered = True


def generator_families() -> tuple[GeneratorFamily, ...]:
    """Every registered family, in the order of their modules' names (then of registration)."""
    discover()
    return tuple(sorted(_FAMILIES.values(), key=lambda f: f.module))  # stable: registration order within a module


def generator_family(kind: str) -> GeneratorFamily:
    """The family registered as `kind`; `IsdaVizError` listing the known kinds otherwise."""
    discover()
    if kind not in _FAMILIES:
        raise IsdaVizError(f"unknown generator kind '{kind}'; known: {known_kinds()}")
    return _FAMILIES[kind]


def known_kinds() -> str:
    """`kind (file), ...` of every family: what an error listing the known layouts says."""
    return "; ".join(f"{f.kind} ({f.file})" for f in generator_families())


def generator_help() -> str:
    """`--generator`'s help text, made from the registry."""
    kinds = ", ".join(f"{f.kind} ({f.summary}: {f.file})" for f in generator_families())
    names = [n for f in generator_families() for n in f.names]
    return ("KIND:FILE with KIND one of " + kinds + "; or a bare file or folder, its layout recognised from its "
            "keys" + (f"; or a name: {'|'.join(names)}" if names else "") +
            " (default: the shipped Fashion-MNIST WGAN-GP). See the README's Generators table.")


def generator_table() -> str:
    """The README's "Generators" table (markdown), one row per family."""
    rows = ["| kind | dataset | resolution | `--generator` is given | where the file comes from | licence | command |",
            "|---|---|---|---|---|---|---|"]
    for f in generator_families():
        rows.append(f"| `{f.kind}` | {f.dataset} | {f.resolution} | {f.file} | {f.source} | {f.licence} | "
                    f"`{f.command}` |")
    return "\n".join(rows)


def split_spec(spec: str) -> tuple[str | None, str]:
    """`KIND:FILE` → (KIND, FILE) when KIND is a registered kind; else (None, spec)."""
    head, sep, tail = spec.partition(":")
    if sep and _KIND.match(head):
        discover()
        if head in _FAMILIES:
            return head, tail
        if not Path(spec).expanduser().exists():
            raise IsdaVizError(f"--generator {spec}: unknown generator kind '{head}'; known: {known_kinds()}")
    return None, spec


def load_generator(spec: str, device="cpu", truncation: float | None = None, *,
                   standing_statistics: bool = True) -> Generator:
    """The frozen generator `spec` names, on `device`: `KIND:FILE`, or a bare file/folder/name recognised.

    `truncation` None: the family's default prior (BigGAN-deep's 0.5; 1.0, no truncation, elsewhere).
    `standing_statistics`: recompute batch-norm statistics deterministically at load (see each family);
    False keeps the file's stored ones. Unknown kinds, unrecognised layouts, missing or corrupt files
    raise `IsdaVizError` (one line).
    """
    kind, rest = split_spec(str(spec))
    request = LoadRequest(rest, device, truncation, standing_statistics, kind)
    if kind is not None:
        family = generator_family(kind)
    else:
        family = _recognise(request)
    try:
        generator = family.load(request)
    except IsdaVizError as e:
        other = _claimed_by_another(request, family) if kind is not None and request.path is not None else None
        if other is None:
            raise
        raise IsdaVizError(f"{e}; its layout is {other.kind}'s: give {other.kind}:{request.spec}") from None
    generator.kind = family.kind
    return generator


def _claimed_by_another(request: LoadRequest, family: GeneratorFamily) -> GeneratorFamily | None:
    """The family other than `family` whose `recognise` claims the request's file, if any (for a hint)."""
    for other in generator_families():
        if other is not family and other.recognise is not None:
            try:
                if other.recognise(request):
                    return other
            except IsdaVizError:
                return None  # the file cannot be read: the loader's own error says so
    return None


def _recognise(request: LoadRequest) -> GeneratorFamily:
    """The family claiming a bare file, folder or name; one error line listing the known layouts else."""
    families = generator_families()
    for family in families:
        if request.spec in family.names:
            return family
    path = Path(request.spec).expanduser()
    if not path.exists():
        names = [n for f in families for n in f.names]
        raise IsdaVizError(f"--generator {request.spec} not found: give KIND:FILE (kinds: {known_kinds()}), a file or "
                           f"folder whose layout is recognised" + (f", or one of {', '.join(names)}" if names else ""))
    unreadable = None
    for family in families:
        try:
            if family.recognise is not None and family.recognise(request):
                return family
        except IsdaVizError as e:  # the file cannot be read as weights: say so, unless a family claims it by name
            unreadable = unreadable or e
    if unreadable is not None:
        raise unreadable
    if path.is_dir():
        hints = list(dict.fromkeys(f.folder_hint for f in families if f.folder_hint))
        raise IsdaVizError(f"--generator {path} holds neither {' nor '.join(hints)}")
    raise IsdaVizError(f"--generator {path}: its keys match no known generator layout; known: {known_kinds()}; "
                       "give KIND:FILE to load it as one of them")

