"""The generator report (`generator_report.json`): how much of a classifier's feature space a generator reaches.

    {"format": "isda-viz-generator-report", "version": 1,
     "classifier": SOURCE, "generator": NAME,
     "key": {"classifier": SHA256, "generator": SHA256, "class_map": [INT, ...] | null},
     "settings": {"per_class": N, "k": K, "seed": S, "data": DESCRIPTION, "data_fingerprint": SHA256},
     "feature_dim": A,
     "overall": REACH, "classes": [REACH, ...]}

    REACH = {"class_index": C | null, "class_name": NAME | null, "frechet_distance": FD, "precision": P,
             "recall": R, "real": N_REAL, "generated": N_GENERATED, "real_trace": tr Σ_real,
             "reference": {"frechet_distance", "precision", "recall", "real"} | null}

`frechet_distance` is in squared feature units (≥ 0), `real_trace` (tr of the real features' covariance) its
scale; `precision` and `recall` in [0, 1] (Kynkäänniemi et al. 2019); `reference` scores a second, disjoint
sample of real features as if it were the generator's (what a perfect generator would get at these sample
sizes; null where the data has too few images). `overall` pools every class. One reader (`read_generator_report`)
and one writer (`write_generator_report`); the key says which (classifier, generator, class map) the report is of.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from isda_viz.errors import IsdaVizError
from isda_viz.readers import read_json
from isda_viz.runs import write_json_atomic

GENERATOR_REPORT = "generator_report.json"
FORMAT = "isda-viz-generator-report"
VERSION = 1


@dataclass(frozen=True)
class ReferenceReach:
    """The scores of a second, disjoint real sample in place of the generator's (a perfect generator's)."""
    frechet_distance: float
    precision: float
    recall: float
    real: int


@dataclass(frozen=True)
class Reach:
    """How far a generator's samples of one class (`class_index`; None: every class pooled) are from the real
    features of that class, in the classifier's feature space: Fréchet distance (squared feature units),
    precision and recall in [0, 1], the sample counts, `real_trace` = tr Σ_real (the distance's scale)."""
    class_index: int | None
    class_name: str | None
    frechet_distance: float
    precision: float
    recall: float
    real: int
    generated: int
    real_trace: float
    reference: ReferenceReach | None = None

    def check(self, where: str) -> None:
        """One-line `IsdaVizError` naming `where` for values no measurement gives."""
        scores = [self.frechet_distance, self.real_trace] + ([self.reference.frechet_distance]
                                                              if self.reference else [])
        rates = [self.precision, self.recall] + ([self.reference.precision, self.reference.recall]
                                                  if self.reference else [])
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in scores):
            raise IsdaVizError(f"{where}: a Fréchet distance or trace that is negative or not finite")
        if not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in rates):
            raise IsdaVizError(f"{where}: a precision or recall outside [0, 1]")
        counts = [self.real, self.generated] + ([self.reference.real] if self.reference else [])
        if not all(isinstance(v, int) and v > 0 for v in counts):
            raise IsdaVizError(f"{where}: a sample count that is not a positive integer")


@dataclass(kw_only=True)
class GeneratorReport:
    """A generator report, and `path`: the file it was written to or read from (not part of the JSON)."""
    classifier: str
    generator: str
    key: dict
    settings: dict
    feature_dim: int
    overall: Reach
    classes: list[Reach] = field(default_factory=list)
    path: Path | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}
        del out["path"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "GeneratorReport":
        """The report of a parsed JSON object; raises KeyError/TypeError/AttributeError on another shape."""
        def reach(entry: dict) -> Reach:
            reference = entry.get("reference")
            return Reach(**{**entry, "reference": ReferenceReach(**reference) if reference is not None else None})

        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        return cls(**{**fields, "overall": reach(data["overall"]), "classes": [reach(e) for e in data["classes"]]})

    def summary(self) -> dict:
        """What an inversion report's settings record: the file, and the overall figures."""
        o = self.overall
        return {"file": str(self.path) if self.path else None, "frechet_distance": o.frechet_distance,
                "precision": o.precision, "recall": o.recall, "real": o.real, "generated": o.generated,
                "real_trace": o.real_trace, "k": self.settings.get("k")}

    def table(self) -> str:
        """Every class and the pooled row as an aligned text table: FD, FD/tr Σ_real, precision, recall, counts;
        the reference sample's figures in brackets where there is one."""
        def cell(r: Reach, name: str, fmt: str) -> str:
            value = format(getattr(r, name), fmt)
            return value + (f" [{format(getattr(r.reference, name), fmt)}]" if r.reference is not None else "")

        lines = [f"  {'class':<16} {'FD [reference]':>18} {'FD/trΣ':>7} {'precision':>15} {'recall':>15} "
                 f"{'real':>6} {'generated':>9}"]
        for r in [*self.classes, self.overall]:
            name = "all classes" if r.class_index is None else str(r.class_name)[:16]
            relative = r.frechet_distance / r.real_trace if r.real_trace > 0 else float("nan")
            lines.append(f"  {name:<16} {cell(r, 'frechet_distance', '.4g'):>18} {relative:>7.3f} "
                         f"{cell(r, 'precision', '.3f'):>15} {cell(r, 'recall', '.3f'):>15} {r.real:>6} "
                         f"{r.generated:>9}")
        return "\n".join(lines)


def write_generator_report(report: GeneratorReport, path) -> None:
    """Write `report` as JSON to `path`, atomically; `report.path` becomes `path`."""
    write_json_atomic(report.to_dict(), path)
    report.path = Path(path)


def read_generator_report(path) -> GeneratorReport:
    """The report at `path` (a file, or a folder holding `generator_report.json`), validated: its format and
    version, its shape, and values a measurement can give. Anything else is a one-line `IsdaVizError`."""
    path = Path(path)
    file = path / GENERATOR_REPORT if path.is_dir() else path
    data = read_json(file, "the generator report", limit=16 << 20)
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise IsdaVizError(f"{file} is not a generator report of isda-viz (format {FORMAT}, version {VERSION})")
    try:
        report = GeneratorReport.from_dict(data)
    except (KeyError, TypeError, AttributeError) as e:
        raise IsdaVizError(f"{file} is not a generator report ({type(e).__name__}: {e})") from None
    if not (isinstance(report.key, dict) and isinstance(report.settings, dict) and isinstance(report.feature_dim, int)):
        raise IsdaVizError(f"{file} is not a generator report (its key, settings or feature_dim are of another type)")
    for entry in [*report.classes, report.overall]:
        entry.check(f"{file}, class {entry.class_index}" if entry.class_index is not None else f"{file}, overall")
    report.path = file
    return report
