"""The report `audit` writes (`audit.json`) and the figures, pages and the demo read.

One record per query image with its k nearest training images and its copy score, then how
the index was built, the audit's own config and the figure's pages. The JSON keys are the field
names below, in this order:

    {"dataset", "space", "k", "distance", "threshold", "median_test_distance", "flag_rate", "flagged",
     "class_names", "index": {"dir", "kind", "status", "train_size", "params"}, "config": {...},
     "queries": [{"source", "role", "neighbors": [{"index", "distance", "label", "file"}, ...],
                  "copy_score", "flagged"}, ...],
     "pages": [{"file", "queries": [0, 1, ...]}, ...]}

`distance` and `median_test_distance` are in the audit's space (`distance` names it: RMS pixel
distance in [0, 1] units, or 1 - cosine of unit features), `copy_score` = nearest distance / the
median of held-out test images (no unit), `threshold` the score below which a query is `flagged`
(calibrated so that `flag_rate` <= 1% of test images would be). A neighbour's `index` is its place
in the training set, `file` its PNG relative to audit.json (only for the queries the figure shows;
absent otherwise). `pages` came later: older audits read back with none (their figure is audit.png).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from isda_viz.errors import IsdaVizError
from isda_viz.readers import build_typed, check_relative_files, read_json
from isda_viz.runs import write_json_atomic

AUDIT = "audit.json"


@dataclass(kw_only=True)
class Neighbour:
    """One of a query's k nearest training images: training-set position, distance, class, its PNG."""
    index: int
    distance: float
    label: int
    file: str | None = None


@dataclass(kw_only=True)
class AuditQuery:
    """One audited image: `source` (its file; for queries from a report "PATH (augmented from ORIGIN)" or
    "PATH (reconstruction of ORIGIN)"), `role` ("image", "augmented" or "reconstruction")."""
    source: str
    role: str
    neighbors: list[Neighbour]
    copy_score: float
    flagged: bool


_ROLE_WORDS = {"reconstruction": "reconstruction of", "augmented": "augmented from"}
_SOURCE = re.compile(r"^(?P<path>.*?) \((?P<words>reconstruction of|augmented from) (?P<origin>.*)\)$", re.S)


def query_source(path, role: str, origin: str) -> str:
    """The `source` of a query taken from a report (`audit --from`): "PATH (augmented from ORIGIN)" or "PATH
    (reconstruction of ORIGIN)"; `split_query_source` reads it back. The one place that format lives."""
    return f"{path} ({_ROLE_WORDS[role]} {origin})"


def split_query_source(source: str) -> tuple[str, str | None]:
    """`(PATH, "augmented from ORIGIN")` of a `query_source`, or `(source, None)` for a query given as a file."""
    match = _SOURCE.match(source)
    return (match.group("path"), f"{match.group('words')} {match.group('origin')}") if match else (source, None)


@dataclass(kw_only=True)
class IndexRecord:
    """The FAISS index searched: its folder, kind (flat or ivfpq), whether it was built or reused, its size."""
    dir: str
    kind: str
    status: str
    train_size: int
    params: dict


@dataclass(kw_only=True)
class AuditPage:
    """One PNG page of the audit figure and the 0-based positions in `queries` it shows."""
    file: str
    queries: list[int]


@dataclass(kw_only=True)
class AuditReport:
    """An audit.json, and `path`: the file it was written to or read from (not part of the JSON)."""
    dataset: str
    space: str
    k: int
    distance: str
    threshold: float
    median_test_distance: float
    flag_rate: float
    flagged: int
    class_names: list[str]
    index: IndexRecord
    config: dict
    queries: list[AuditQuery]
    pages: list[AuditPage] = field(default_factory=list)
    path: Path | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        del out["path"]
        for query in out["queries"]:
            for neighbour in query["neighbors"]:
                if neighbour["file"] is None:
                    del neighbour["file"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "AuditReport":
        """The audit of a parsed JSON object; raises KeyError/TypeError/AttributeError on another shape."""
        queries = [AuditQuery(**{**q, "neighbors": [Neighbour(**n) for n in q["neighbors"]]})
                   for q in data["queries"]]
        return cls(**{**data, "index": AuditIndex(**data["index"]), "queries": queries,
                      "pages": [AuditPage(**p) for p in data.get("pages", [])]})

    def neighbour_files(self) -> list[str]:
        """The `file` of every neighbour that has one (relative to audit.json)."""
        return [n.file for q in self.queries for n in q.neighbors if n.file]


def write_audit(report: AuditReport, path) -> None:
    """Write `report` as JSON to `path`, atomically; `report.path` becomes `path`."""
    write_json_atomic(report.to_dict(), path)
    report.path = Path(path)


def read_audit(path) -> AuditReport:
    """The audit at `path`: an audit `--out` folder (its audit.json) or the file itself.

    Raises `IsdaVizError` when there is none or it is not an audit.json of `isda-viz audit`.
    """
    path = Path(path)
    file = path / AUDIT if path.is_dir() else path
    if not file.exists():
        raise IsdaVizError(f"{path} has no {AUDIT}; give the --out folder of an audit")
    where = f"{file} is not an audit.json of isda-viz audit"
    report = build_typed(AuditReport, read_json(file, "the audit", limit=64 << 20), where)
    check_relative_files([p.file for p in report.pages] + [n.file for q in report.queries for n in q.neighbors
                                                           if n.file is not None], where)
    report.path = file
    return report
