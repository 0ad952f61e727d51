"""Nearest-neighbour audit: are generated images new, or copies of training images?

For each query image we find its k nearest training images (the paper's
Fig. 14) in pixel or feature space, with the index of `isda_viz.audit.index`, and a
copy score (`isda_viz.audit.index.copy_score`)

    copy_score = d(query, nearest training image) / median_t d(t, nearest training image)

with t running over held-out test images. A query is flagged as a likely copy
when its score is below a threshold calibrated so that at most 1% of the
held-out test images would be flagged.

`run_audit` writes `audit.json` and the figure in pages of at most
`QUERIES_PER_PAGE` queries: `audit.png`, then `audit_page2.png`, `audit_page3.png`, ...
(drawn by `isda_viz.outputs.figures.audit_page`), listed under `pages` in audit.json; the
neighbours of the queries the figure shows as small PNGs in `audit_files/` (named under
each neighbour's `file`), and last the page `index.html` (`isda_viz.outputs.html`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from isda_viz import locks
from isda_viz.audit.index import CHUNK, SPACES, Embedder, copy_score, default_index_dir, prepare_index, training_images
from isda_viz.classifiers.classifier import load_classifier
from isda_viz.data.datasets import dataset_spec, load_split
from isda_viz.data.images import load_image_file
from isda_viz.devices import pick_device
from isda_viz.errors import IsdaVizError
from isda_viz.outputs.figures import audit_page, to_pil
from isda_viz.outputs.folders import check_inputs_outside, check_name_lengths, check_replaceable, publish_folder
from isda_viz.outputs.audit_report import (
    AUDIT,
    AuditPage,
    AuditQuery,
    AuditReport,
    IndexRecord,
    Neighbour,
    query_source,
    write_audit,
)
from isda_viz.outputs.html import PAGE, html_fragment, write_html
from isda_viz.outputs.report import read_report
from isda_viz.runs import assembled_beside, save_image_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
QUERIES_PER_PAGE = 16        # queries drawn on one page of the figure
MAX_PAGES = 16               # the figure shows at most QUERIES_PER_PAGE * MAX_PAGES queries (audit.json has all)
NEIGHBOUR_DIR = "audit_files"  # the shown queries' neighbours, one PNG per training image

# ---------------------------------------------------------------------------------------------
# Queries: image files or folders, or the report of an inversion command


@dataclass
class Query:
    """One image to audit: where it came from, and the image `(C, H, W)` uint8 at the dataset's size."""
    source: str
    image: torch.Tensor
    role: str = "image"          # "image", "augmented" or "reconstruction"


def read_query_image(path, channels: int, size: int) -> torch.Tensor:
    """A PNG/JPEG (any size, any mode) → uint8 `(channels, size, size)`, as `load_image_file` converts it."""
    return (load_image_file(path, channels, size) * 255).round().to(torch.uint8)


def queries_from_paths(paths: Iterable, channels: int, size: int) -> list[Query]:
    """Image files, and folders searched recursively for image files (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise IsdaVizError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise IsdaVizError(f"query image not found: {p}")
    return [Query(str(f), read_query_image(f, channels, size)) for f in files]


def queries_from_report(out_dir, channels: int, size: int) -> list[Query]:
    """The augmented images (and reconstructions, marked so) an augment/grid report lists: an augment `--out`
    folder (its report.json) or a grid's FIG.json; file paths are relative to the report."""
    out_dir = Path(out_dir)
    report = read_report(out_dir)
    listed = report.listed_images()
    if not listed:
        raise IsdaVizError(f"the report in {out_dir} lists no images")
    base = out_dir if out_dir.is_dir() else out_dir.parent
    queries = []
    for file, role, origin in listed:
        path = base / file
        queries.append(Query(query_source(path, role, origin), read_query_image(path, channels, size), role))
    return queries


# ---------------------------------------------------------------------------------------------
# The audit


@dataclass
class AuditConfig:
    """Everything that defines an audit; saved in audit.json."""
    out: str
    dataset: str = "fashion-mnist"
    images: list[str] = field(default_factory=list)   # files or folders
    from_dir: str | None = None                        # an augment/grid --out folder with report.json
    data_root: str | None = None
    k: int = 5
    space: str = "pixel"
    classifier: str | None = None                      # run directory or weights file, needed for space="feature"
    classifier_arch: str | None = None                 # what a weights file holds (see load_classifier)
    class_names: str | None = None                     # file naming a weights file's classes
    index: str = "auto"                                # flat | ivfpq | auto
    index_dir: str | None = None                       # default: see default_index_dir
    device: str | None = None
    limit_train: int | None = None                     # index only the first N training images
    limit_test: int | None = None                      # calibrate on the first N test images
    embed: bool = False                                # the page index.html carries its images inline

    def __post_init__(self) -> None:
        """One-line `IsdaVizError`s for options no audit can use."""
        if self.space not in SPACES:
            raise IsdaVizError(f"unknown space '{self.space}'; choose pixel or feature")
        if self.k < 1:
            raise IsdaVizError("--k must be at least 1")
        if self.space == "feature" and not self.classifier:
            raise IsdaVizError("--space feature needs --classifier (a RUN_DIR, or a weights FILE with "
                               "--classifier-arch)")
        if bool(self.images) == bool(self.from_dir):
            raise IsdaVizError("give query images with either --images PATH or --from OUT_DIR (one of them)")


@dataclass
class AuditResult:
    """What an audit wrote and found."""
    out: Path
    report: AuditReport
    index_status: str
    index_dir: Path

    def _repr_html_(self) -> str:
        """Jupyter's view: the audit's page, images inlined."""
        return html_fragment(self.out, embed=True)

    @property
    def flagged(self) -> int:
        return sum(q.flagged for q in self.report.queries)

    def summary(self) -> str:
        r = self.report
        scores = [q.copy_score for q in r.queries]
        return (f"{len(scores)} queries vs {r.index.train_size} {r.dataset} training images "
                f"({r.space} space, {r.index.kind} index {self.index_status}): "
                f"{self.flagged} flagged as likely copies (copy score < {r.threshold:.3f}); "
                f"lowest copy score {min(scores):.3f}, median {np.median(scores):.3f}")


def run_audit(cfg: AuditConfig, progress: bool = True, log: Callable[[str], None] = print) -> AuditResult:
    """Audit the query images of `cfg` against the training set.

    Writes the figure's pages (`page_file`) and the neighbours' PNGs, then `cfg.out/audit.json`,
    which lists them (`pages`, each neighbour's `file`), then the page `cfg.out/index.html`.
    """
    check_name_lengths([Path(cfg.out)])
    with locks.exclusive(cfg.out):
        return _run_audit(cfg, progress, log)


def _run_audit(cfg: AuditConfig, progress: bool, log: Callable[[str], None]) -> AuditResult:
    check_replaceable(cfg.out, "audit")
    check_inputs_outside({"--images": cfg.images, "--from": cfg.from_dir, "--classifier": cfg.classifier,
                          "--class-names": cfg.class_names, "--data-root": cfg.data_root,
                          "--index-dir": cfg.index_dir}, [Path(cfg.out)])
    spec = dataset_spec(cfg.dataset, cfg.data_root)
    if cfg.from_dir:
        queries = queries_from_report(cfg.from_dir, spec.channels, spec.image_size)
    else:
        queries = queries_from_paths(cfg.images, spec.channels, spec.image_size)

    device = pick_device(cfg.device)
    classifier = None
    if cfg.space == "feature":
        classifier = load_classifier(cfg.classifier, device, arch=cfg.classifier_arch, class_names=cfg.class_names,
                                     data_root=cfg.data_root)
        folders = {"folder", "imagenet"}  # the same layout under two names
        other_data = classifier.dataset not in (None, cfg.dataset) and {classifier.dataset, cfg.dataset} - folders
        if other_data or (classifier.channels, classifier.image_size) != (spec.channels, spec.image_size):
            raise IsdaVizError(f"classifier {classifier.source} ({classifier.dataset or 'unknown data'}, "
                               f"{classifier.channels}×{classifier.image_size}² inputs) is not a classifier of "
                               f"{cfg.dataset} ({spec.channels}×{spec.image_size}²); pass a classifier of {cfg.dataset}")
    elif cfg.classifier:
        log("note: --classifier is only used with --space feature; auditing in pixel space")
    embedder = Embedder(cfg.space, classifier, device)

    train_split = training_images(cfg.dataset, cfg.data_root, cfg.limit_train)
    test_split = load_split(cfg.dataset, False, cfg.data_root, cfg.limit_test)
    index_dir = Path(cfg.index_dir).expanduser() if cfg.index_dir else default_index_dir(
        cfg.dataset, cfg.space, classifier.cache_dir if classifier else None, cfg.data_root, cfg.limit_train)
    with locks.exclusive(index_dir, "the audit index", wait=log):  # one builder; the others then reuse it
        index, status = prepare_index(index_dir, cfg.dataset, cfg.space, train_split, test_split, embedder,
                                      cfg.index, progress, log)

    query_rows = np.concatenate([embedder.stored(torch.stack([q.image for q in queries[i:i + CHUNK]]))
                                 for i in range(0, len(queries), CHUNK)])
    d2, rows = index.neighbours.search(query_rows, cfg.k)
    distances = embedder.distance(d2)
    cal = index.calibration
    class_names = list(getattr(train_split, "classes", [])) or spec.class_names
    records = []
    for q, dist, row in zip(queries, distances, rows):
        score = float(copy_score(dist[0], cal["median_distance"]))
        records.append(AuditQuery(
            source=q.source, role=q.role,
            neighbors=[Neighbour(index=int(index.positions[r]), distance=float(d), label=int(index.labels[r]))
                       for d, r in zip(dist, row)],
            copy_score=score, flagged=bool(score < cal["threshold"])))
    report = AuditReport(
        dataset=cfg.dataset, space=cfg.space, k=min(cfg.k, len(index.neighbours)),
        distance=embedder.distance_name, threshold=cal["threshold"],
        median_test_distance=cal["median_distance"], flag_rate=cal["flag_rate"],
        flagged=sum(r.flagged for r in records), class_names=class_names,
        index=IndexRecord(dir=str(index.directory), kind=index.manifest["kind"], status=status,
                         train_size=index.manifest["train_size"],
                         params=dataclasses.asdict(index.neighbours.params)),
        config=dataclasses.asdict(cfg), queries=records)
    out = Path(cfg.out)
    heading = f"{report.k} nearest of {len(train_split)} training images ({embedder.distance_name})"
    with assembled_beside(out) as tmp:  # assembled aside: a failure leaves `out` as it was
        report.pages = write_pages(tmp, queries, records, rows, train_split, class_names, heading,
                                   cal["threshold"], log)
        write_neighbour_files(tmp, records, rows, train_split)
        write_audit(report, tmp / AUDIT)  # a finished audit.json means its figure and files are there
        write_html(tmp, embed=cfg.embed)
        publish_folder(tmp, out, "audit")
    return AuditResult(out, report, status, index.directory)


# ---------------------------------------------------------------------------------------------
# The figure, in pages


def page_file(number: int) -> str:
    """File name of page `number` (1-based) of the audit figure: `audit.png`, then `audit_page2.png`, ..."""
    return "audit.png" if number == 1 else f"audit_page{number}.png"


def write_neighbour_files(out: Path, records: list[AuditQuery], rows: np.ndarray, train_split) -> None:
    """Save the neighbours of the first QUERIES_PER_PAGE * MAX_PAGES queries (those the figure shows)
    as PNGs at the dataset's resolution, one per training image (`audit_files/train_INDEX.png`, INDEX
    its position in the training set), and name each under its neighbour's `file` (relative to `out`).

    `rows (Q, k)`: each query's neighbours as rows of `train_split`; `out` is the audit assembled aside.
    """
    folder = out / NEIGHBOUR_DIR
    written = set()
    for record, row in zip(records[:QUERIES_PER_PAGE * MAX_PAGES], rows):
        for neighbour, r in zip(record.neighbors, row):
            name = f"train_{neighbour.index:07d}.png"
            if name not in written:
                save_image_atomic(to_pil(train_split[int(r)][0].float() / 255), folder / name)
                written.add(name)
            neighbour.file = f"{NEIGHBOUR_DIR}/{name}"


def write_pages(out: Path, queries: list[Query], records: list[AuditQuery], rows: np.ndarray, train_split,
                class_names: list[str], heading: str, threshold: float,
                log: Callable[[str], None] = print) -> list[AuditPage]:
    """Draw the audit figure into `out` in pages of at most QUERIES_PER_PAGE queries, each within 2,000 px.

    `rows (Q, k)`: each query's neighbours as rows of `train_split`; `out` is the audit assembled aside.
    Returns audit.json's `pages`: per page its `file`
    (relative to `out`) and the 0-based positions in `queries` it shows.
    """
    shown = min(len(queries), QUERIES_PER_PAGE * MAX_PAGES)
    if shown < len(queries):
        log(f"the audit figure shows the first {shown} of {len(queries)} queries; audit.json has all")
    n_pages = math.ceil(shown / QUERIES_PER_PAGE)
    pages = []
    for number in range(1, n_pages + 1):
        first = (number - 1) * QUERIES_PER_PAGE
        last = min(first + QUERIES_PER_PAGE, shown)
        lines = [f"audit page {number} of {n_pages}: queries {first + 1}-{last} of {len(queries)}; {heading}",
                 f"copy score = distance to the nearest / median of held-out test images; "
                 f"below {threshold:.3f}: likely copy (red)"]
        neighbours = [[train_split[int(r)][0] for r in row] for row in rows[first:last]]
        picture = audit_page([q.image for q in queries[first:last]], records[first:last], neighbours, class_names,
                             lines, first=first)
        save_image_atomic(picture, out / page_file(number))
        pages.append(AuditPage(file=page_file(number), queries=list(range(first, last))))
    return pages
