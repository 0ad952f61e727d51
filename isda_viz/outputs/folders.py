"""The only code that claims, publishes and replaces output folders.

An output of isda-viz is a folder that carries a manifest of our own, `isda-viz-output.json`
(`OutputManifest`: the tool's name and version, the command, every file the run wrote, and the names
beside the folder that link into it). The rules every command follows:

* **claim** (`check_replaceable`, `claim_figure`, `claim_resumable`), before any work: an `--out` is
  absent, an empty folder, or an output of the same command carrying our manifest and holding nothing
  the manifest does not name. Anything else in the way (a file, a link, a folder of the user's, a file
  the user added to an output) is one `IsdaVizError` naming it; nothing is ever replaced because a file
  of a common name (`report.json`, `FIG.json`) sits there.
* **an input is never an output** (`check_inputs_outside`): an input that is, or lies inside, an output
  about to be replaced is refused.
* **publish** (`publish_folder`): the output is assembled aside (`runs.assembled_beside`), its manifest
  written last, then moved into place by one rename, or over an earlier output by one atomic exchange
  of the two folders (Linux `renameat2(RENAME_EXCHANGE)`); the old one is then removed. A kill at any
  point leaves the old output or the new one, never a mix. (Where the file system has no exchange, the
  old folder is moved aside first and put back by the next run should a kill fall between the renames.)
* a **figure** (`grid`, `directions`: `--out FIG.png`) is one folder `FIG_files/` that holds every file,
  the figure itself included as `figure.png`, `figure.json` and `figure.html`; the top-level FIG.png,
  FIG.json and FIG.html are relative symbolic links to those (`FIG_files/figure.png`, ...), made once,
  before the folder is first published. Publishing the folder publishes the figure whole: the links show
  the old figure or the new one. figure.json and figure.html name files relative to the folder above
  FIG_files, where their links FIG.json and FIG.html are (open the page as FIG.html).

Every rename goes through `_move`, so the tests can stop a publication at each of them.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from isda_viz._version import __version__
from isda_viz.errors import IsdaVizError
from isda_viz.readers import Fields, read_json
from isda_viz.runs import write_json_atomic, writing

TOOL = "isda-viz"
MANIFEST = "isda-viz-output.json"
FIGURE_LINKS = (".png", ".json", ".html")     # the names beside FIG_files/ that link into it
FIGURE_INSIDE = "figure"                      # ... to FIG_files/figure.png, figure.json, figure.html
MAX_LISTED = 200_000                          # files an output may hold (a directions figure: a few thousand)


@dataclass(frozen=True)
class OutputManifest:
    """What an output folder holds, written by the run that made it (`MANIFEST` inside the folder).

    `files`: every file the run wrote, as paths relative to the folder (the manifest itself not among them),
    or for a resumable output (the demo) the entries it may hold; `links`: names beside the folder that are
    links into it (a figure's FIG.png, FIG.json, FIG.html)."""
    command: str
    files: tuple[str, ...]
    links: tuple[str, ...] = ()
    tool: str = TOOL
    version: str = __version__
    resumable: bool = False

    def to_dict(self) -> dict:
        return {"tool": self.tool, "version": self.version, "command": self.command, "resumable": self.resumable,
                "files": list(self.files), "links": list(self.links)}


def read_manifest(folder) -> OutputManifest | None:
    """The manifest of the output `folder`, None when it has none; `IsdaVizError` when it is not one of ours."""
    path = Path(folder) / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    fields = Fields(read_json(path, "the output manifest"), f"the output manifest {path}")
    if fields.text("tool") != TOOL:
        fields.fail("tool", f"is {fields.data['tool']!r}, not {TOOL!r}")
    files = fields.items("files", str, max_length=MAX_LISTED)
    for name in files:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or name in (MANIFEST, ".", ""):
            fields.fail("files", f"names {name!r}, which is not a path inside the folder")
    links = fields.items("links", str, default=[], max_length=len(FIGURE_LINKS))
    if any("/" in name or name in ("", ".", "..") for name in links):
        fields.fail("links", "names a path that is not a file beside the folder")
    return OutputManifest(command=fields.text("command", max_length=64), files=tuple(files), links=tuple(links),
                          version=fields.text("version", max_length=64),
                          resumable=fields.flag("resumable", default=False))


def write_manifest(folder: Path, command: str, links: tuple[str, ...] = ()) -> OutputManifest:
    """List every file under `folder` (written last, so that a manifest names a finished output) into its
    manifest; returns it."""
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not p.is_symlink() and p.name != MANIFEST)
    manifest = OutputManifest(command=command, files=tuple(files), links=tuple(links))
    write_json_atomic(manifest.to_dict(), folder / MANIFEST)
    return manifest


# ------------------------------------------------------------------------------------------------ claiming


def _entries(folder: Path) -> list[str]:
    """Every file, folder and link under `folder`, relative, links not followed (at most MAX_LISTED + 1)."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        for name in sorted(dirs) + sorted(files):
            found.append((base / name).as_posix())
            if len(found) > MAX_LISTED:
                return found
    return found


def _ours(entry: str, listed: set[str], folders: set[str]) -> bool:
    """Whether `entry` (relative to an output folder) is a file its manifest names, a folder holding one, the
    manifest, or a temporary of an atomic write of one of them (`.NAME.XXXX.tmp`, left by a kill)."""
    if entry in listed or entry in folders or entry == MANIFEST:
        return True
    head, _, name = entry.rpartition("/")
    temporary = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", name)
    return temporary is not None and (f"{head}/{temporary.group(1)}" if head else temporary.group(1)) in \
        listed | {MANIFEST}


def _shown_list(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_replaceable(out, command: str, what: str = "--out") -> OutputManifest | None:
    """Raise `IsdaVizError` unless the folder `out` may be replaced by an output of `command`: absent, an empty
    folder, or an output of `command` carrying our manifest and holding nothing else. Returns its manifest."""
    out = Path(out)
    _recover(out)
    if out.is_symlink():
        raise IsdaVizError(f"{what} {out} is a symbolic link; give the folder itself (isda-viz replaces outputs "
                           "whole and never writes through a link)")
    if not out.exists():
        return None
    if not out.is_dir():
        raise IsdaVizError(f"{what} {out} is a file; give a folder (isda-viz never replaces a file it did not "
                           "write)")
    manifest = read_manifest(out)
    entries = _entries(out)
    if manifest is None:
        if entries:
            raise IsdaVizError(f"{what} {out} holds files that isda-viz did not write ({_shown_list(entries)}) and "
                               f"no {MANIFEST}; choose another --out or empty it")
        return None
    if manifest.command != command:
        raise IsdaVizError(f"{what} {out} holds the output of `isda-viz {manifest.command}`, not of `isda-viz "
                           f"{command}`; choose another --out")
    listed = set(manifest.files)
    folders = {"/".join(Path(name).parts[:i]) for name in listed for i in range(1, len(Path(name).parts))}
    foreign = [entry for entry in entries if not _ours(entry, listed, folders)]
    if foreign:
        raise IsdaVizError(f"{what} {out} holds {_shown_list(foreign)}, which isda-viz did not write (not in its "
                           f"{MANIFEST}); move it out of the folder or choose another --out")
    return manifest


def figure_files_dir(out_png: Path) -> Path:
    """A figure's folder: FIG_files/ beside FIG.png."""
    return out_png.with_name(out_png.stem + "_files")


def figure_inside(out_png: Path, suffix: str) -> str:
    """The name, inside FIG_files/, of the file FIG.<suffix> links to."""
    return f"{FIGURE_INSIDE}{suffix}"


def _link_target(out_png: Path, suffix: str) -> str:
    return f"{figure_files_dir(out_png).name}/{figure_inside(out_png, suffix)}"


def is_figure_link(path: Path) -> bool:
    """Whether `path` (FIG.png, FIG.json or FIG.html) is the link into FIG_files/ that a figure's publication
    makes (its target exactly `FIG_files/figure.<suffix>`)."""
    path = Path(path)
    return path.is_symlink() and os.readlink(path) == _link_target(path.with_suffix(".png"), path.suffix)


def check_figure_path(out) -> Path:
    """`--out FIG.png` of a figure command (`grid`, `directions`) as a Path; `IsdaVizError` unless it names a
    .png file (not a folder) whose name, and those made beside it, fit the file system."""
    out_png = Path(out)
    if out_png.suffix.lower() != ".png":
        raise IsdaVizError(f"--out must name a .png file, not {out_png}")
    if out_png.is_dir() and not out_png.is_symlink():
        raise IsdaVizError(f"--out {out_png} is a folder; give the figure's file name FIG.png")
    check_name_lengths([out_png, figure_files_dir(out_png)])
    return out_png


def claim_figure(out, command: str) -> Path:
    """`check_figure_path`, and that the figure may be written: FIG.png, FIG.json, FIG.html absent or the links
    a figure of ours made, FIG_files/ as `check_replaceable` wants. `IsdaVizError` naming what is in the way.
    Call it holding FIG.png's lock."""
    out_png = check_figure_path(out)
    for suffix in FIGURE_LINKS:
        path = out_png.with_suffix(suffix)
        if (path.exists() or path.is_symlink()) and not is_figure_link(path):
            raise IsdaVizError(f"{path} is in the way: isda-viz did not write it (a figure's {path.name} is a link "
                               f"into {figure_files_dir(out_png).name}/); move it or choose another --out")
    check_replaceable(figure_files_dir(out_png), command, what="the figure's folder")
    return out_png


def through_figure_link(path) -> Path:
    """Where to (re)write a published figure's file `path` (FIG.html, FIG.json): the file inside FIG_files/ its
    link points to, so the link stays; any other path as it is."""
    path = Path(path)
    return figure_files_dir(path.with_suffix(".png")) / figure_inside(path, path.suffix) \
        if is_figure_link(path) else path


def figure_outputs(out_png: Path) -> list[Path]:
    """Every path a figure's publication writes or replaces: FIG.png, FIG.json, FIG.html and FIG_files/."""
    return [out_png.with_suffix(s) for s in FIGURE_LINKS] + [figure_files_dir(out_png)]


def check_name_lengths(paths) -> None:
    """Refuse a path whose file name (with the temporaries made beside it) would exceed the file system's limit."""
    for path in paths:
        path = Path(path)
        try:
            limit = os.pathconf(next(p for p in [path.parent, *path.parents] if p.exists()), "PC_NAME_MAX")
        except (OSError, ValueError, StopIteration):
            limit = 255
        if len(os.fsencode(path.name)) + 24 > limit:  # `.NAME.tmp.XXXXXXXX` and `.NAME.lock` beside it
            raise IsdaVizError(f"--out {path.name[:40]}... is {len(os.fsencode(path.name))} bytes long; names "
                               f"may have at most {limit - 24} here")


def claim_resumable(out, command: str, entries: tuple[str, ...]) -> None:
    """Claim the folder `out` of a resumable command (the demo), whose stages add outputs to it over several
    runs: absent or empty (then created, with a manifest listing `entries`, the names it may hold), or a
    folder of the same command carrying our manifest whose top-level entries are all listed."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise IsdaVizError(f"--out {out} is {'a symbolic link' if out.is_symlink() else 'a file'}; give a folder")
    manifest = read_manifest(out) if out.is_dir() else None
    present = sorted(os.listdir(out)) if out.is_dir() else []
    if manifest is None and present:
        raise IsdaVizError(f"--out {out} holds files that isda-viz did not write ({_shown_list(present)}) and no "
                           f"{MANIFEST}; choose another --out or empty it")
    if manifest is not None and (manifest.command != command or not manifest.resumable):
        raise IsdaVizError(f"--out {out} holds the output of `isda-viz {manifest.command}`, not of `isda-viz "
                           f"{command}`; choose another --out")
    allowed = set(entries) | {MANIFEST}
    foreign = [name for name in present if name not in allowed and not _stale_of(name, allowed)]
    if foreign:
        raise IsdaVizError(f"--out {out} holds {_shown_list(foreign)}, which isda-viz {command} does not write; "
                           "move it out of the folder or choose another --out")
    if manifest is None:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(OutputManifest(command=command, files=tuple(sorted(entries)), resumable=True).to_dict(),
                              out / MANIFEST)


def _stale_of(name: str, allowed: set[str]) -> bool:
    """A lock, a temporary or a folder moved aside by a publication of an allowed entry (`.NAME.lock`,
    `.NAME.tmp.X`, `.NAME.old.X`, `.NAME.X.tmp`)."""
    match = re.fullmatch(r"\.(.+?)(\.lock|\.tmp\.[^/]+|\.old\.[^/]+|\.[^.]+\.tmp)", name)
    return match is not None and match.group(1) in allowed


def published(out) -> bool:
    """Whether `out` (an output folder, or a figure's FIG.png) is a finished output of ours: its manifest is
    there and every file it names is present (what the demo checks before reusing a stage)."""
    out = Path(out)
    folder = figure_files_dir(out) if out.suffix.lower() == ".png" else out
    try:
        manifest = read_manifest(folder) if folder.is_dir() and not folder.is_symlink() else None
    except IsdaVizError:
        return False
    if manifest is None or not all((folder / name).is_file() for name in manifest.files):
        return False
    return out.suffix.lower() != ".png" or all(is_figure_link(out.with_suffix(s)) for s in FIGURE_LINKS)


def check_inputs_outside(inputs: dict, outputs) -> None:
    """Refuse an input that is, or lies inside, one of `outputs` (paths this run may replace). `inputs`: option
    name → a path or a list of paths (None and names that are not paths on disk are skipped)."""
    replaced = [Path(os.path.realpath(p)) for p in outputs]
    for option, values in inputs.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is None or not (Path(value).exists() or Path(value).is_symlink()):
                continue
            where = Path(os.path.realpath(value))
            for out, given in zip(replaced, outputs):
                if where == out or out in where.parents:
                    raise IsdaVizError(f"{option} {value} is {'' if where == out else 'inside '}--out {given}, "
                                       "which this run writes; an input is never an output: choose another --out")


# ------------------------------------------------------------------------------------------------ publishing

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE); False where the system or
    file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _move(src: Path, dst: Path, exchange: bool = False) -> bool:
    """The one rename of a publication: `src` to `dst`, or with `exchange` the two swapped (False when the file
    system cannot swap; nothing is moved then)."""
    if exchange:
        return _exchange(src, dst)
    os.rename(src, dst)
    return True


def _recover(out: Path) -> None:
    """Undo what a kill between the two renames of a publication without exchange left: `out` moved aside to
    `.NAME.old.*` and nothing in its place. Call it holding `out`'s lock."""
    aside = sorted(out.parent.glob(f".{out.name}.old.*")) if out.parent.is_dir() else []
    if aside and not (out.exists() or out.is_symlink()) and read_manifest(aside[-1]) is not None:
        os.rename(aside[-1], out)
        aside = aside[:-1]
    for stale in aside:
        if read_manifest(stale) is not None:
            shutil.rmtree(stale, ignore_errors=True)


def publish_folder(tmp: Path, out: Path, command: str, links: tuple[str, ...] = ()) -> None:
    """Write the manifest of the finished folder `tmp` (beside `out`; a figure's folder also names `links`),
    check `out` once more (a file may have
    been added meanwhile), and move `tmp` into place: one rename, or one exchange with the earlier output,
    which then lies at `tmp` for the caller (`assembled_beside`) to remove. Call it holding `out`'s lock."""
    write_manifest(tmp, command, links)
    check_replaceable(out, command)
    with writing(out):
        if not out.exists():
            _move(tmp, out)
        elif not _move(tmp, out, exchange=True):
            aside = out.with_name(f".{out.name}.old.{os.getpid()}")
            _move(out, aside)
            _move(tmp, out)
            os.rename(aside, tmp)  # the old output, for the caller to remove with its temporary folder


def publish_figure(assembled: Path, out_png: Path, command: str) -> None:
    """Publish a figure assembled in the temporary folder `assembled` as it would lie beside FIG.png (FIG.png,
    FIG.json, FIG.html and FIG_files/): the three files go into FIG_files/ as figure.*, the links FIG.png,
    FIG.json, FIG.html → FIG_files/figure.* are made where missing (they point at nothing until the folder is
    there), then the folder is published whole (`publish_folder`). Call it holding FIG.png's lock."""
    files = assembled / figure_files_dir(out_png).name
    for suffix in FIGURE_LINKS:
        os.rename(assembled / out_png.with_suffix(suffix).name, files / figure_inside(out_png, suffix))
    names = tuple(out_png.with_suffix(s).name for s in FIGURE_LINKS)
    with writing(out_png):
        for suffix in FIGURE_LINKS:
            link = out_png.with_suffix(suffix)
            if is_figure_link(link):
                continue
            if link.exists() or link.is_symlink():
                raise IsdaVizError(f"{link} is in the way: isda-viz did not write it; move it or choose another --out")
            made = assembled / f".link{suffix}"
            os.symlink(_link_target(out_png, suffix), made)
            _move(made, link)
    publish_folder(files, figure_files_dir(out_png), command, names)


def is_finite_number(value) -> bool:
    """True for an int or float that is not NaN or infinite (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
