"""The report `augment` and `grid` write (`report.json`, `FIG.json`) and `audit` and `demo` read.

One record per input image: its reconstruction (Step I) and its K augmented
images (Step II), each with the PNG it was saved as (relative to the report),
then `summary` (medians and rates, `summarize`), `seconds` per stage and
`settings`. The JSON keys are the field names below, in this order:

    {"images": [{"source", "label", "label_name", "predicted",
                 "reconstruction": {"file", "feature_error", "psnr", "predicted", "judge_predicted"},
                 "augmented": [{"file", "reached_shift_error", "shift_norm", "negative_target_floor",
                                "predicted", "judge_predicted", "pixel_distance", "direction_shares"}, ...],
                 "original": {"file"}, "samples": [{"file"}, ...]}, ...],
     "summary": {...}, "seconds": {"step1", "step2", "writing"}, "settings": {...}, "class_names": [...]}

Errors are relative to feature norms (no unit), `psnr` in dB, `pixel_distance` RMS in [0, 1]
pixel units; `judge_predicted` is null without a judge; `direction_shares` the share of ||eps||^2 along
each of the top 5 eigen-directions of Sigma_y and the rest (`isda.directions`; null in older reports). `original` (the input as the classifier
saw it), `samples` (grid: random same-class generator images) and `class_names` came later:
reports written before them read back with `original` None, `samples` empty, `class_names` None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from isda_viz.errors import IsdaVizError
from isda_viz.readers import build_typed, check_relative_files, read_json
from isda_viz.runs import write_json_atomic

REPORT = "report.json"
MAX_REPORT_BYTES = 64 << 20    # a report of thousands of images is a few MB

# How a written report shows itself in Jupyter: `path -> HTML`, set by `isda_viz.outputs` to the page of
# `isda_viz.outputs.html`. The page renders from the types here, so this module imports nothing of it.
_notebook_view: Callable[[Path], str] | None = None


def set_notebook_view(view: Callable[[Path], str]) -> None:
    """Make `view(path)` what `Report._repr_html_` shows for a report written to `path`."""
    global _notebook_view
    _notebook_view = view


@dataclass(kw_only=True)
class ReconstructionEntry:
    """Step I for one image: `feature_error` = ||f(G(z_hat*)) - a|| / ||a||, `psnr` (dB) against the image."""
    file: str
    feature_error: float
    psnr: float
    predicted: int
    judge_predicted: int | None = None


@dataclass(kw_only=True)
class AugmentedEntry:
    """Step II for one augmentation: `reached_shift_error` = ||f(G(z_hat')) - a~|| / ||a~ - a||,
    `shift_norm` = ||a~ - a||, `negative_target_floor` its lower bound for any image,
    `pixel_distance` the RMS difference to the reconstruction in [0, 1] units."""

    file: str
    reached_shift_error: float
    shift_norm: float
    negative_target_floor: float
    predicted: int
    judge_predicted: int | None = None
    pixel_distance: float
    direction_shares: list[float] | None = None   # share of ||eps||^2 along u_1..u_5 of Sigma_y, then the rest


@dataclass(kw_only=True)
class ImageFile:
    """An image saved beside the report without numbers of its own (the original, a random sample)."""
    file: str


@dataclass(kw_only=True)
class ImageEntry:
    """One input image: where it came from, its (given or predicted) label, the classifier's prediction;
    `original` its saved file, `samples` random generator images of its class (grid only)."""

    source: str
    label: int
    label_name: str
    predicted: int
    reconstruction: ReconstructionEntry
    augmented: list[AugmentedEntry]
    original: ImageFile | None = None
    samples: list[ImageFile] = field(default_factory=list)

    def files(self) -> list[ImageFile | ReconstructionEntry | AugmentedEntry]:
        """Every record here that names a saved file."""
        return ([self.original] if self.original else []) + [self.reconstruction, *self.augmented, *self.samples]


@dataclass(kw_only=True)
class Summary:
    """Medians and rates over a report's images: the figures the README states."""
    images: int
    step1_median_feature_error: float | None
    step1_median_psnr: float | None
    reconstruction_true_label_rate: float
    step2_median_reached_shift_error: float | None
    step2_median_negative_target_floor: float | None
    augmented_label_kept_rate: float
    augmented_judge_label_kept_rate: float | None
    median_pixel_distance_to_reconstruction: float | None


@dataclass(kw_only=True)
class Settings:
    """How a report was made: λ (`strength`), K, seed, the inversion options, the classifier and judge sources,
    and the way codes were produced: `inverter` "search" or "amortized" (`inversion.starts`), with
    `refine_steps` optimiser steps after the amortized passes (None for the search);
    `generator_reach`: how much the generator can reach in the classifier's features, as the pair's cached
    generator report says (`GeneratorReport.summary()`: its file, overall Fréchet distance, precision, recall,
    sample counts; None when the pair has none cached: `isda-viz generator-report` measures it)."""
    strength: float
    num_augmented: int
    seed: int
    options: dict
    classifier: str
    judge: str | None = None
    inverter: str = "search"
    refine_steps: int | None = None
    generator_reach: dict | None = None


@dataclass(kw_only=True)
class Report:
    """A report, and `path`: the JSON file it was written to or read from (not part of the JSON; None
    while only in memory). Displayed in Jupyter as the page of `isda_viz.outputs.html` when `path` is set."""

    images: list[ImageEntry]
    summary: Summary
    seconds: dict[str, float] = field(default_factory=dict)
    settings: Settings | None = None
    class_names: list[str] | None = None
    path: Path | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        del out["path"]
        for key in ("settings", "class_names"):
            if out[key] is None:
                del out[key]
        for entry in out["images"]:
            if entry["original"] is None:
                del entry["original"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        """The report of a parsed JSON object; raises KeyError/TypeError/AttributeError on another shape."""
        def image(entry: dict) -> ImageEntry:
            original = entry.get("original")
            return ImageEntry(**{**entry, "reconstruction": ReconstructionEntry(**entry["reconstruction"]),
                                 "augmented": [AugmentedEntry(**a) for a in entry["augmented"]],
                                 "original": ImageFile(**original) if original is not None else None,
                                 "samples": [ImageFile(**s) for s in entry.get("samples", [])]})

        settings = data.get("settings")
        return cls(images=[image(entry) for entry in data["images"]], summary=Summary(**data["summary"]),
                   seconds=dict(data.get("seconds", {})),
                   settings=Settings(**settings) if settings is not None else None,
                   class_names=list(data["class_names"]) if data.get("class_names") is not None else None)

    def _repr_html_(self) -> str | None:
        """Jupyter's view: the page of the written report, images inlined (None: not written, plain repr)."""
        if self.path is None or _notebook_view is None:
            return None
        return _notebook_view(self.path)

    def listed_images(self) -> list[tuple[str, str, str]]:
        """Every image file the report lists, as `(file, "reconstruction" | "augmented", source)`."""
        listed = []
        for entry in self.images:
            listed.append((entry.reconstruction.file, "reconstruction", entry.source))
            listed += [(a.file, "augmented", entry.source) for a in entry.augmented]
        return listed

    def with_files_under(self, folder: str) -> "Report":
        """A copy whose file paths are prefixed with `folder/` (a report written beside the image folder)."""
        copy = Report.from_dict(self.to_dict())
        for entry in copy.images:
            for record in entry.files():
                record.file = f"{folder}/{record.file}"
        return copy


def summarize(images: list[ImageEntry]) -> Summary:
    """Medians (upper median for even counts) and rates over a report's images."""
    def median(values):
        values = sorted(values)
        return values[len(values) // 2] if values else None

    augmented = [(a, entry.label) for entry in images for a in entry.augmented]
    judged = [(a, label) for a, label in augmented if a.judge_predicted is not None]
    return Summary(
        images=len(images),
        step1_median_feature_error=median([e.reconstruction.feature_error for e in images]),
        step1_median_psnr=median([e.reconstruction.psnr for e in images]),
        reconstruction_true_label_rate=sum(e.reconstruction.predicted == e.label for e in images) / max(1, len(images)),
        step2_median_reached_shift_error=median([a.reached_shift_error for a, _ in augmented]),
        step2_median_negative_target_floor=median([a.negative_target_floor for a, _ in augmented]),
        augmented_label_kept_rate=sum(a.predicted == label for a, label in augmented) / max(1, len(augmented)),
        augmented_judge_label_kept_rate=(sum(a.judge_predicted == label for a, label in judged) / len(judged)
                                         if judged else None),
        median_pixel_distance_to_reconstruction=median([a.pixel_distance for a, _ in augmented]),
    )


def write_report(report: Report, path) -> None:
    """Write `report` as JSON to `path`, atomically; `report.path` becomes `path`."""
    write_json_atomic(report.to_dict(), path)
    report.path = Path(path)


def read_report(path) -> Report:
    """The report at `path`: an augment `--out` folder (its report.json) or a report file (e.g. grid's FIG.json).

    Raises `IsdaVizError` when there is none or it is not a report of augment or grid.
    """
    path = Path(path)
    file = path / REPORT if path.is_dir() else path
    if not file.exists():
        raise IsdaVizError(f"{path} has no {REPORT}; give the --out folder of an augment run or a grid's FIG.json")
    where = f"{file} is not a report of augment or grid"
    report = build_typed(Report, read_json(file, "the report", limit=MAX_REPORT_BYTES), where)
    check_relative_files([record.file for entry in report.images for record in entry.files()], where)
    report.path = file
    return report
