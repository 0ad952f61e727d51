"""Small rules every output shares: may an `--out` folder be written, is a value a finite number."""

from __future__ import annotations

import math
from pathlib import Path

from isda_viz.errors import IsdaVizError


def check_out_dir(out, ours: str | tuple[str, ...] | None = None, what: str = "") -> None:
    """Raise `IsdaVizError` unless `out` may be written: never a file; with `ours` (the file, or files, one
    of which an earlier output of the command holds, e.g. `report.json`, for folders that are replaced
    whole; paths relative to `out`) also absent, empty, or holding one of them. `what` names that output
    in the message ("an augment output")."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IsdaVizError(f"--out {out} is a file; give a folder")
    markers = (ours,) if isinstance(ours, str) else ours
    if markers and out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in markers):
        raise IsdaVizError(f"--out {out} holds files that are not {what}; choose another --out")


def check_figure_path(out) -> Path:
    """`--out FIG.png` of a figure command (`grid`, `directions`) as a Path; `IsdaVizError` unless it names a
    .png file (not a folder)."""
    out_png = Path(out)
    if out_png.suffix.lower() != ".png":
        raise IsdaVizError(f"--out must name a .png file, not {out_png}")
    if out_png.is_dir():
        raise IsdaVizError(f"--out {out_png} is a folder; give the figure's file name FIG.png")
    return out_png


def is_finite_number(value) -> bool:
    """True for an int or float that is not NaN or infinite (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
