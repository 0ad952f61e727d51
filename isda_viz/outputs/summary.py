"""The demo's `summary.json`, and the one table of names of every summary figure.

    {"quick", "from_scratch", "classifier_test_accuracy", "judge_test_accuracy", "gan_class_agreement",
     "step1_median_feature_error", "reconstruction_true_label_rate", "step2_median_reached_shift_error",
     "step2_median_negative_target_floor", "augmented_judge_label_kept_rate",
     "median_pixel_distance_to_reconstruction", "inverter", "audit_queries", "audit_flagged_copies",
     "semantic_{feature,pixels}_{isda,isotropic,other_class}",
     "seconds": {STAGE: seconds}, "models": {"classifier", "judge", "generator"}}

Accuracies and rates in [0, 1], errors relative to feature norms (see `isda_viz.outputs.report`),
the pixel distance RMS in [0, 1] units; a figure that could not be measured is null.
`LABELS` names the figures of report.json's `summary`, of summary.json and of audit.json, for the
demo's terminal table and the HTML pages alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from isda_viz.errors import IsdaVizError
from isda_viz.readers import build_typed, read_json
from isda_viz.runs import write_json_atomic

SUMMARY = "summary.json"

# Human names of the summary figures (keys of report.json "summary", summary.json and audit.json);
# keys not listed are shown under their own name, so new figures still appear.
LABELS = {
    "images": "input images",
    "classifier_test_accuracy": "classifier test accuracy",
    "judge_test_accuracy": "judge test accuracy",
    "gan_class_agreement": "GAN class agreement",
    "step1_median_feature_error": "step I median feature error",
    "step1_median_psnr": "step I median PSNR (dB)",
    "reconstruction_true_label_rate": "reconstructions classified as the true label",
    "step2_median_reached_shift_error": "step II median reached-shift error",
    "step2_median_negative_target_floor": "… its floor (the part of ã no image reaches)",
    "augmented_label_kept_rate": "augmented images keeping their label (classifier)",
    "augmented_judge_label_kept_rate": "augmented images keeping their label (judge)",
    "median_pixel_distance_to_reconstruction": "median RMS pixel distance, augmented vs reconstruction",
    "audit_flagged_copies": "audit: likely copies flagged",
    "threshold": "copy-score threshold (flags ≤ 1% of held-out test images)",
    "median_test_distance": "median nearest-neighbour distance of held-out test images",
    "flagged": "queries flagged as likely copies",
    "inverter": "how codes were found (inverter, refinement steps)",
    "semantic_feature_isda": "class kept in feature space, ISDA noise N(0, λΣ_y)",
    "semantic_feature_isotropic": "… isotropic noise of the same E‖ε‖²",
    "semantic_feature_other_class": "… another class's Σ, same E‖ε‖²",
    "semantic_pixels_isda": "class kept in pixels (judge), ISDA noise",
    "semantic_pixels_isotropic": "… isotropic noise",
    "semantic_pixels_other_class": "… another class's Σ",
}

# The figures a demo shows, in this order (its terminal table and its page).
DEMO_FIGURES = ("classifier_test_accuracy", "judge_test_accuracy", "gan_class_agreement",
                "step1_median_feature_error", "reconstruction_true_label_rate", "step2_median_reached_shift_error",
                "step2_median_negative_target_floor", "augmented_judge_label_kept_rate",
                "median_pixel_distance_to_reconstruction", "audit_flagged_copies")
# The semantic test's overall rates (`isda-viz directions --test`), shown after those where the demo ran it.
SEMANTIC_FIGURES = tuple(f"semantic_{space}_{noise}" for space in ("feature", "pixels")
                         for noise in ("isda", "isotropic", "other_class"))


def figure_label(key: str) -> str:
    """The human name of a summary figure (its key where it has none)."""
    return LABELS.get(key, key)


@dataclass(kw_only=True)
class DemoSummary:
    """A demo's summary.json, and `path`: the file it was written to or read from (not part of the JSON).
    `step2_median_negative_target_floor` and the `semantic_*` rates (fraction of augmentations keeping the
    class, `isda-viz directions --test`) came later: older summaries read back with None."""
    quick: bool
    from_scratch: bool
    classifier_test_accuracy: float | None
    judge_test_accuracy: float | None
    gan_class_agreement: float | None
    step1_median_feature_error: float | None
    reconstruction_true_label_rate: float | None
    step2_median_reached_shift_error: float | None
    step2_median_negative_target_floor: float | None = None
    augmented_judge_label_kept_rate: float | None
    median_pixel_distance_to_reconstruction: float | None
    inverter: str = "search"            # "search", or "amortized + N steps" (`inversion.starts`)
    audit_queries: int | None
    audit_flagged_copies: int | None
    semantic_feature_isda: float | None = None
    semantic_feature_isotropic: float | None = None
    semantic_feature_other_class: float | None = None
    semantic_pixels_isda: float | None = None
    semantic_pixels_isotropic: float | None = None
    semantic_pixels_other_class: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    models: dict[str, str | None] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        del out["path"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "DemoSummary":
        """The summary of a parsed JSON object; raises TypeError on another shape."""
        return cls(**data)

    def figures(self) -> list[tuple[str, object]]:
        """`(key, value)` of each of `DEMO_FIGURES`; the audit's as "FLAGGED of QUERIES" (absent without an audit)."""
        rows = [(key, getattr(self, key)) for key in DEMO_FIGURES if key != "audit_flagged_copies"]
        if self.audit_queries is not None:
            rows.append(("audit_flagged_copies", f"{self.audit_flagged_copies} of {self.audit_queries}"))
        rows += [(key, getattr(self, key)) for key in SEMANTIC_FIGURES if getattr(self, key) is not None]
        rows.append(("inverter", self.inverter))
        return rows

    def table(self) -> str:
        """The figures as a small aligned text table (3 decimals)."""
        def fmt(value):
            return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))

        rows = [(figure_label(key), value) for key, value in self.figures()]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"  {name:<{width}}  {fmt(value)}" for name, value in rows)


def write_summary(summary: DemoSummary, path) -> None:
    """Write `summary` as JSON to `path`, atomically; `summary.path` becomes `path`."""
    write_json_atomic(summary.to_dict(), path)
    summary.path = Path(path)


def read_summary(path) -> DemoSummary:
    """The summary at `path` (a demo folder or its summary.json); `IsdaVizError` when it is not one."""
    path = Path(path)
    file = path / SUMMARY if path.is_dir() else path
    summary = build_typed(DemoSummary, read_json(file, "the demo summary", limit=1 << 20),
                          f"{file} is not a demo summary.json")
    summary.path = file
    return summary
