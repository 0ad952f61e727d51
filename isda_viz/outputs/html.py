"""Self-contained HTML pages for the outputs of `augment`, `grid`, `audit` and `demo`.

Where each page goes (`write_html` decides from what the folder or file holds):

    augment OUT_DIR  (report.json)                      → OUT_DIR/index.html
    grid FIG.png     (FIG.json, FIG_files/)              → FIG.html beside FIG.png (two grids may share a folder)
    audit OUT        (audit.json)                        → OUT/index.html
    demo DIR         (summary.json, figure.json, audit/) → DIR/index.html, images joined to their audit neighbours

A page opens from the file system in any browser with no server and no network:
images are referenced by relative paths (or, with `embed=True`, inlined as
`data:` URIs so the page can be mailed alone); the CSS and the few lines of
JavaScript (sorting a table by a column) are inline. Per input image it shows
the original, the reconstruction and each augmented image at a readable size
(small images enlarged with visible pixels), each with its numbers; the audit's
nearest training images when an audit is joined; a summary table at the top and
a table of every output image sortable by any column (click a header, or open
the page as `index.html#sort=KEY`, `#sort=-KEY` for descending, KEY being the
report's JSON key, e.g. `reached_shift_error` or `copy_score`).

Files a report names but that are gone render as a visible "missing: NAME"
placeholder; every text from a report (file and class names) is escaped.
`html_fragment(path)` gives the same view as one `<div>` with images inlined,
for Jupyter: the results of `augment_images`, `make_grid` (a `Report` with its `path`) and
`run_audit` (an `AuditResult`) display it through `_repr_html_`, as does `HtmlView(path)`.

`augment_images`, `make_grid`, `run_audit` and `run_demo` write their page themselves after
their outputs; `write_html` (re)writes one for any output folder.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from PIL import Image, UnidentifiedImageError

from isda_viz._version import __version__
from isda_viz.errors import IsdaVizError
from isda_viz.outputs.audit_report import AUDIT, AuditQuery, AuditReport, read_audit, split_query_source
from isda_viz.outputs.folders import is_finite_number, through_figure_link
from isda_viz.outputs.report import REPORT, ImageEntry, Report, read_report
from isda_viz.outputs.summary import SUMMARY, DemoSummary, figure_label, read_summary
from isda_viz.runs import write_bytes_atomic

PAGE = "index.html"
DEMO_FIGURE, DEMO_AUDIT = "figure.json", Path("audit") / AUDIT  # where `isda-viz demo` writes them
TILE_PX, THUMB_PX = 128, 56          # shown sizes: images are enlarged by whole factors up to these
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
        ".webp": "image/webp", ".bmp": "image/bmp"}

DEMO_DIRECTIONS = "directions.png"   # the demo's directions figure (`isda-viz directions --test`), when it has one
DECIMALS = {"psnr": 1, "step1_median_psnr": 1}   # everything else: 3 decimals

# The per-image table: (JSON key, header, is a number).
COLUMNS = [("image", "#", True), ("source", "source", False), ("label", "class", False), ("kind", "image", False),
           ("feature_error", "feature error", True), ("psnr", "PSNR dB", True),
           ("reached_shift_error", "reached-shift error", True), ("negative_target_floor", "its floor", True),
           ("predicted", "classifier", False), ("judge_predicted", "judge", False),
           ("pixel_distance", "pixel distance", True)]
AUDIT_COLUMNS = [("copy_score", "copy score", True), ("nearest_distance", "nearest distance", True),
                 ("nearest_label", "nearest class", False), ("flagged", "likely copy", False)]



# ---------------------------------------------------------------------------------------------
# Public entry points


def write_html(path, embed: bool = False, audit=None) -> Path:
    """Write the page of an output folder (or its JSON file, or a grid's FIG.png); returns the page's path.

    `path`: an augment OUT_DIR or its report.json; a grid's FIG.png or FIG.json; an audit folder or its
    audit.json; a demo folder or its summary.json. `embed`: images inlined as data: URIs (the page alone
    is complete) instead of referenced relatively. `audit`: an audit folder (or audit.json) whose
    queries are joined to a report's images (the demo's own audit is joined without it).
    """
    page = _locate(path, audit)
    text = _document(page, embed)
    write_bytes_atomic(text.encode("utf-8"), through_figure_link(page.out))  # a published figure keeps its link
    return page.out


def page_path(path, audit=None) -> Path:
    """Where `write_html(path)` writes the page (the table in this module's docstring)."""
    return _locate(path, audit).out


def html_fragment(path, embed: bool = True, audit=None) -> str:
    """The same view as `write_html` as one `<div>` (scoped CSS, images inlined by default), for notebooks."""
    page = _locate(path, audit)
    return f'<div class="isda-viz">{_style()}{_body(page, embed)}{_script(hash_sort=False)}</div>'


class HtmlView:
    """Displays an output folder inline in Jupyter: `HtmlView("out/shirt")` as a cell's last line."""
    def __init__(self, path, audit=None):
        self.path, self.audit = Path(path), audit

    def _repr_html_(self) -> str:
        return html_fragment(self.path, embed=True, audit=self.audit)

    def __repr__(self) -> str:
        return f"HtmlView({str(self.path)!r})"


# ---------------------------------------------------------------------------------------------
# What a page shows: found from the path given


@dataclass
class _Page:
    kind: str                     # "augment", "grid", "audit" or "demo"
    out: Path                     # the .html file to write
    report: Report | None         # report.json / FIG.json
    report_dir: Path | None       # what the report's file names are relative to
    audit: AuditReport | None
    audit_dir: Path | None
    summary: DemoSummary | None   # the demo's summary.json
    title: str


def _audit_file(audit) -> Path:
    audit = Path(audit)
    return audit / AUDIT if audit.is_dir() else audit


def _display_name(folder: Path) -> str:
    """A folder's name as the reader will see it: an output assembled as `.NAME.tmp.XXXX` beside its
    destination is titled NAME, the folder it is renamed to."""
    match = re.fullmatch(r"\.(.+)\.tmp\.[^.]+", folder.name)
    return match.group(1) if match else folder.name


def _locate(path, audit=None) -> _Page:
    """Which page `path` asks for, with its JSON read."""
    path = Path(path)
    if not path.exists():
        raise IsdaVizError(f"no such folder or file: {path}")
    if path.is_file() and path.suffix.lower() == ".png":           # a grid's FIG.png
        path = path.with_suffix(".json")
        if not path.is_file():
            raise IsdaVizError(f"no {path.name} beside the figure; write_html takes a grid's FIG.png or FIG.json")
    if path.is_dir():
        for name in (SUMMARY, AUDIT, REPORT):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise IsdaVizError(f"{path} holds no {SUMMARY}, {AUDIT} or {REPORT}; give an output folder of "
                               "augment, audit or demo, or a grid's FIG.png")
    folder = path.parent
    extra = read_audit(_audit_file(audit)) if audit is not None else None
    extra_dir = _audit_file(audit).parent if audit is not None else None
    if path.name == SUMMARY:
        summary = read_summary(path)
        figure = folder / DEMO_FIGURE
        report = read_report(figure) if figure.is_file() else None
        audit_path = folder / DEMO_AUDIT
        if extra is None and audit_path.is_file():
            extra, extra_dir = read_audit(audit_path), audit_path.parent
        return _Page("demo", folder / PAGE, report, folder, extra, extra_dir, summary, "isda-viz demo")
    if path.name == AUDIT:
        return _Page("audit", folder / PAGE, None, None, read_audit(path), folder, None,
                     f"isda-viz audit: {_display_name(folder)}")
    if path.suffix.lower() != ".json":
        raise IsdaVizError(f"{path} is not a report; give an output folder or its JSON file")
    report = read_report(path)
    if path.name == REPORT:
        return _Page("augment", folder / PAGE, report, folder, extra, extra_dir, None,
                     f"isda-viz augment: {_display_name(folder)}")
    return _Page("grid", path.with_suffix(".html"), report, folder, extra, extra_dir, None,
                 f"isda-viz grid: {path.stem}")


# ---------------------------------------------------------------------------------------------
# Small pieces


# Bidirectional controls: in a name they would reorder what follows ("abc\u202egnp.exe" shows as "abcexe.png")
_BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SURROGATES = re.compile("[\ud800-\udfff]")


def page_text(value) -> str:
    """`value` as text safe to show on a page: bytes that were not UTF-8 (a class folder's name read with
    surrogate escapes) shown as U+FFFD, bidirectional controls written out as `<U+202E>` so they reorder
    nothing, other lone surrogates replaced. Not yet HTML-escaped (`_esc` does both)."""
    text = str(value)
    if _SURROGATES.search(text):
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            text = _SURROGATES.sub("\ufffd", text)
    return _BIDI_CONTROLS.sub(lambda m: f"<U+{ord(m.group()):04X}>", text)


def page_url(path) -> str:
    """A relative path as a URL: percent-encoded, a name's non-UTF-8 bytes as their own bytes."""
    return quote(Path(path).as_posix(), errors="surrogateescape")


def _esc(value) -> str:
    return html.escape(page_text(value), quote=True)


def _fmt(key: str, value) -> str:
    """A number as shown: 3 decimals (PSNR 1), integers as they are, absent values as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{DECIMALS.get(key, 3)}f}" if math.isfinite(value) else str(value)
    return str(value)


def _data_value(value) -> str:
    """The exact value kept in data-value (what the tests and the sort read): JSON's own text of it."""
    return "" if value is None else json.dumps(value)


class _Names:
    """Class index → name: the report's or audit's class list, else the names the report itself mentions."""
    def __init__(self, report: Report | None, audit: AuditReport | None):
        names = (report.class_names if report else None) or (audit.class_names if audit else None) or []
        self.names = {i: str(n) for i, n in enumerate(names)}
        for entry in report.images if report else []:
            if isinstance(entry.label, int) and entry.label_name is not None:
                self.names.setdefault(entry.label, str(entry.label_name))

    def __call__(self, label) -> str:
        if label is None:
            return "n/a"
        return self.names.get(label, f"class {label}")


@dataclass
class _Ctx:
    """How images are written into this page."""
    html_dir: Path
    embed: bool

    def image(self, path: Path | None, name: str, px: int, alt: str = "") -> str:
        """An `<img>` of the file at `path`, enlarged by a whole factor up to about `px`, or a visible
        'missing: NAME' placeholder when the file is not there (`path` None: never saved)."""
        if path is None or not path.is_file():
            text = f"missing: {name}" if path is not None else f"not saved: {name}"
            shown = text if px >= TILE_PX else text.split(":")[0]      # thumbnails: the word, the name on hover
            return (f'<div class="missing" data-missing="{_esc(name)}" title="{_esc(text)}" '
                    f'style="width:{px}px;height:{px}px">{_esc(shown)}</div>')
        width, height = _image_size(path)
        scale = max(1, px // max(width, height, 1))
        shown_w, shown_h = width * scale, height * scale
        if max(width, height) > 2 * px:             # large images are shown at 2 px on their long side, smoothly
            shrink = 2 * px / max(width, height)
            shown_w, shown_h = round(width * shrink), round(height * shrink)
        if self.embed:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            src = f"data:{MIME.get(path.suffix.lower(), 'application/octet-stream')};base64,{data}"
        else:
            src = page_url(os.path.relpath(path, self.html_dir))
        pixelated = ' class="px"' if scale > 1 else ""
        return (f'<img src="{_esc(src)}" alt="{_esc(alt or name)}" data-file="{_esc(name)}" width="{shown_w}" '
                f'height="{shown_h}"{pixelated}>')


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, from its header; (TILE_PX, TILE_PX) where PIL cannot read it."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError):
        return TILE_PX, TILE_PX


def _number(key: str, label: str, value) -> str:
    return (f'<div class="num" data-key="{_esc(key)}" data-value="{_esc(_data_value(value))}">{_esc(label)} '
            f'<b>{_esc(_fmt(key, value))}</b></div>')


def _direction_shares(shares) -> str:
    """Which directions an augmentation moved along: its share of ||eps||^2 on u_1..u_K of Sigma_y, then the rest."""
    if not isinstance(shares, list) or not shares:
        return ""
    along = " ".join(f"{100 * x:.0f}" for x in shares[:-1])
    return (f'<div class="num shares" data-key="direction_shares" data-value="{_esc(_data_value(shares))}" '
            f'title="share of ‖ε‖² along the top eigen-directions of Σ_y, in %, then the rest">'
            f'‖ε‖² on u1–u{len(shares) - 1} <b>{_esc(along)} · rest {100 * shares[-1]:.0f}%</b></div>')


def _prediction(key: str, label: str, value, true_label, names: _Names) -> str:
    if value is None:
        return ""
    wrong = " wrong" if true_label is not None and value != true_label else ""
    return (f'<div class="num{wrong}" data-key="{_esc(key)}" data-value="{_esc(_data_value(value))}">'
            f'{_esc(label)} <b>{_esc(names(value))}</b></div>')


# ---------------------------------------------------------------------------------------------
# Audit queries: their images and their neighbours


def _query_path(source: str, audit_dir: Path) -> Path:
    """The image file an audit query came from (as recorded; a relative path is tried against the working
    folder, then as a folder beside the audit's, the layout of the demo)."""
    path = Path(split_query_source(source)[0])
    if path.is_absolute() or path.exists():
        return path
    sibling = audit_dir.parent / path.parent.name / path.name
    return sibling if sibling.exists() else path


def _file_key(path: Path) -> tuple[str, str]:
    """How a report's file and an audit query are matched: folder and file name (folders may have moved)."""
    return path.parent.name, path.name


class _Queries:
    """An audit's queries, found by the image file they were made from."""
    def __init__(self, audit: AuditReport | None, audit_dir: Path | None):
        self.audit, self.audit_dir = audit, audit_dir
        self.by_file: dict[tuple[str, str], AuditQuery] = {}
        for q in audit.queries if audit else []:
            self.by_file.setdefault(_file_key(_query_path(q.source, audit_dir)), q)

    def __bool__(self) -> bool:
        return self.audit is not None

    def of(self, path: Path) -> AuditQuery | None:
        return self.by_file.get(_file_key(path))


def _neighbours(query: AuditQuery | None, queries: _Queries, names: _Names, ctx: _Ctx) -> str:
    """The copy score of one query and its k nearest training images (thumbnails where audit.json names
    their files; otherwise training index, class and distance)."""
    if query is None:
        return '<div class="nbrs none">not audited</div>' if queries else ""
    items = []
    for n in query.neighbors:
        index, distance, label = n.index, n.distance, n.label
        thumb = ""
        if n.file:
            thumb = ctx.image(queries.audit_dir / n.file, str(n.file), THUMB_PX, f"training image {index}")
        items.append(f'<li data-key="neighbor" data-index="{_esc(_data_value(index))}" '
                     f'data-distance="{_esc(_data_value(distance))}" data-label="{_esc(_data_value(label))}">'
                     f'{thumb}<span>d <b>{_esc(_fmt("distance", distance))}</b><br>{_esc(names(label))}<br>'
                     f'<i title="index in the training set">#{_esc(index)}</i></span></li>')
    flag = '<div class="flag">likely copy</div>' if query.flagged else ""
    return (f'<div class="nbrs">{flag}{_number("copy_score", "copy score", query.copy_score)}'
            f'<div class="nbr-head">nearest training images</div><ol>{"".join(items)}</ol></div>')


# ---------------------------------------------------------------------------------------------
# The page body


def _original_file(entry: ImageEntry) -> str | None:
    """The original's file: the report's `original.file` where present, else the name augment gives it
    beside the reconstruction (`NNN_original.png`)."""
    if entry.original is not None and entry.original.file:
        return entry.original.file
    recon = entry.reconstruction.file
    if recon and "_reconstruction." in recon:
        return recon.replace("_reconstruction.", "_original.")
    return None


def _tile(heading: str, image_html: str, numbers: str, extra: str = "", flagged: bool = False,
          anchor: str | None = None) -> str:
    cls = "tile flagged" if flagged else "tile"
    anchor = f' id="{anchor}"' if anchor else ""
    return (f'<figure class="{cls}"{anchor}><figcaption>{_esc(heading)}</figcaption>{image_html}'
            f'<div class="nums">{numbers}</div>{extra}</figure>')


def _judge_name(value, names: _Names) -> str:
    return names(value) if value is not None else ""


def _card(i: int, entry: ImageEntry, page: _Page, ctx: _Ctx, names: _Names, queries: _Queries) -> tuple[str, list]:
    """One input image: its tiles, and its rows of the per-image table."""
    base = page.report_dir
    label = entry.label
    tiles, rows = [], []
    original = _original_file(entry)
    tiles.append(_tile("original", ctx.image(base / original if original else None, original or "original", TILE_PX),
                       _prediction("predicted", "classifier", entry.predicted, label, names)))

    def row(kind, path, name, values, query: AuditQuery | None):
        r = {"image": i, "source": entry.source, "label": names(label), "kind": kind,
             "thumb": ctx.image(path, name, THUMB_PX), **values}
        if queries:
            nearest = query.neighbors[0] if query is not None and query.neighbors else None
            r.update(copy_score=query.copy_score if query else None,
                     nearest_distance=nearest.distance if nearest else None,
                     nearest_label=names(nearest.label) if nearest else "",
                     flagged=("yes" if query.flagged else "no") if query else "")
        rows.append(r)

    recon = entry.reconstruction
    name = str(recon.file or "reconstruction")
    path = base / recon.file if recon.file else None
    query = queries.of(path) if path is not None else None
    numbers = (_number("feature_error", "feature err.", recon.feature_error) + _number("psnr", "PSNR (dB)", recon.psnr)
               + _prediction("predicted", "classifier", recon.predicted, label, names)
               + _prediction("judge_predicted", "judge", recon.judge_predicted, label, names))
    tiles.append(_tile("reconstruction", ctx.image(path, name, TILE_PX), numbers,
                       _neighbours(query, queries, names, ctx), bool(query and query.flagged)))
    row("reconstruction", path, name, {"feature_error": recon.feature_error, "psnr": recon.psnr,
                                       "predicted": names(recon.predicted),
                                       "judge_predicted": _judge_name(recon.judge_predicted, names)}, query)
    for j, aug in enumerate(entry.augmented):
        name = str(aug.file or f"augmented {j + 1}")
        path = base / aug.file if aug.file else None
        query = queries.of(path) if path is not None else None
        numbers = (_number("reached_shift_error", "shift error", aug.reached_shift_error)
                   + _number("negative_target_floor", "its floor", aug.negative_target_floor)
                   + _prediction("predicted", "classifier", aug.predicted, label, names)
                   + _prediction("judge_predicted", "judge", aug.judge_predicted, label, names)
                   + _number("pixel_distance", "pixel dist.", aug.pixel_distance)
                   + _direction_shares(aug.direction_shares))
        tiles.append(_tile(f"augmented {j + 1}", ctx.image(path, name, TILE_PX), numbers,
                           _neighbours(query, queries, names, ctx), bool(query and query.flagged)))
        row(f"augmented {j + 1}", path, name,
            {"reached_shift_error": aug.reached_shift_error, "negative_target_floor": aug.negative_target_floor,
             "pixel_distance": aug.pixel_distance, "predicted": names(aug.predicted),
             "judge_predicted": _judge_name(aug.judge_predicted, names)}, query)
    for j, sample in enumerate(entry.samples):
        name = str(sample.file or f"random {j + 1}")
        path = base / name if name else None
        tiles.append(_tile(f"random {j + 1}", ctx.image(path, name, TILE_PX), '<div class="num">same class</div>'))
    heading = f'#{i} · {names(label)} · {entry.source}'
    card = (f'<section class="card" id="image-{i}" data-image="{i}"><h3>{_esc(heading)}</h3>'
            f'<div class="tiles">{"".join(tiles)}</div></section>')
    return card, rows


def _audit_tile(i: int, query: AuditQuery, page: _Page, ctx: _Ctx, names: _Names,
                queries: _Queries) -> tuple[str, dict]:
    """One query of an audit-only page: its tile (image, file name, neighbours) and its table row."""
    path = _query_path(query.source, page.audit_dir)
    nearest = query.neighbors[0] if query.neighbors else None
    tile = _tile(f"#{i} {query.role}", ctx.image(path, path.name, TILE_PX),
                 f'<div class="file" title="{_esc(query.source)}">{_esc(path.name)}</div>',
                 _neighbours(query, queries, names, ctx), query.flagged, f"image-{i}")
    row = {"image": i, "source": query.source, "kind": query.role, "thumb": ctx.image(path, path.name, THUMB_PX),
           "copy_score": query.copy_score, "nearest_distance": nearest.distance if nearest else None,
           "nearest_label": names(nearest.label) if nearest else "",
           "flagged": "yes" if query.flagged else "no"}
    return tile, row


def _summary_table(page: _Page) -> str:
    """The figures at the top: the demo's, the report's summary, and the audit's."""
    rows = []
    if page.summary is not None:
        rows += page.summary.figures()
    elif page.report is not None:
        rows += list(dataclasses.asdict(page.report.summary).items())
    if page.audit is not None and page.summary is None:
        a = page.audit
        rows += [("flagged", f"{a.flagged} of {len(a.queries)}"), ("threshold", a.threshold),
                 ("median_test_distance", a.median_test_distance)]
    body = "".join(f'<tr data-key="{_esc(k)}" data-value="{_esc(_data_value(v))}"><th>{_esc(figure_label(k))}'
                   f'</th><td>{_esc(_fmt(k, v))}</td></tr>' for k, v in rows)
    return f'<table class="summary">{body}</table>' if rows else ""


def _legend(page: _Page) -> str:
    """What the numbers under the images mean."""
    parts = []
    if page.report is not None:
        parts += ["<b>feature err.</b> ‖f(G(ẑ*)) − a‖/‖a‖, how far the reconstruction's features are from the "
                  "original's; <b>PSNR</b> of the reconstruction against the original",
                  "<b>shift error</b> ‖f(G(ẑ′)) − ã‖/‖ã − a‖: 0 = the augmented image carries all of the sampled "
                  "feature shift, 1 = none of it; <b>its floor</b>: the part of the shift no image can reach "
                  "(negative targets); <b>pixel dist.</b>: RMS difference to the reconstruction, [0, 1] pixels",
                  "<b>classifier</b>, <b>judge</b>: the class each network sees (red: not the image's class)",
                  "<b>‖ε‖² on u1–u5</b>: the share (%) of the augmentation's squared norm along each of the top "
                  "eigen-directions of its class covariance Σ_y, and the rest (see `isda-viz directions`)"]
    if page.audit is not None:
        threshold = page.audit.threshold
        below = f" below {_fmt('threshold', threshold)}" if is_finite_number(threshold) else ""
        parts.append("<b>copy score</b>: distance to the nearest training image / the median of held-out test "
                     f"images; likely copy{below}; <b>d</b>: distance of each nearest training image, "
                     "<b>#</b> its index in the training set")
    return f'<p class="meta legend">{"<br>".join(parts)}</p>' if parts else ""


def _settings_line(page: _Page) -> str:
    """What made it: the report's settings, the audit's space and index, the demo's timings."""
    parts = []
    settings = page.report.settings if page.report is not None else None
    if settings is not None:
        parts.append(f"strength λ = {settings.strength}, {settings.num_augmented} augmented per image, "
                     f"seed {settings.seed}")
    if page.audit is not None:
        a = page.audit
        parts.append(f"audit: {a.k} nearest of {a.index.train_size} {a.dataset} "
                     f"training images, {a.distance}, {a.index.kind} index")
    if page.summary is not None:
        seconds = page.summary.seconds
        if seconds:
            parts.append("seconds: " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
        if page.summary.quick:
            parts.append("quick (CI-sized) run")
    return "".join(f"<p class=\"meta\">{_esc(p)}</p>" for p in parts)


def _files_line(page: _Page, embed: bool) -> str:
    """Links to the PNG figures beside the page (not when embedding: the page travels alone)."""
    if embed:
        return ""
    candidates = []
    if page.kind == "grid":
        candidates.append(page.out.with_suffix(".png"))
    elif page.kind == "augment":
        candidates.append(page.report_dir / "grid.png")
    elif page.kind == "demo":
        candidates.append(page.out.parent / Path(DEMO_FIGURE).with_suffix(".png"))
        candidates += [page.out.parent / DEMO_DIRECTIONS, page.out.parent / Path(DEMO_DIRECTIONS).with_suffix(".html")]
    if page.audit_dir is not None:           # every page of the audit figure (older audits: audit.png)
        pages = [p.file for p in page.audit.pages]
        candidates += [page.audit_dir / str(f) for f in pages if f] or [page.audit_dir / "audit.png"]
    links = [f'<a href="{_esc(page_url(os.path.relpath(p, page.out.parent)))}">{_esc(p.name)}</a>'
             for p in candidates if p.is_file()]
    return f'<p class="meta">figures: {" · ".join(links)}</p>' if links else ""


def _data_table(rows: list[dict], columns: list) -> str:
    """Every output image, one row each; sortable by clicking a header (numbers as numbers)."""
    head = "".join(f'<th data-key="{_esc(k)}" data-type="{"number" if num else "text"}" title="sort by {_esc(h)}">'
                   f'{_esc(h)}</th>' for k, h, num in columns)
    body = []
    for r in rows:
        cells = []
        for k, _, num in columns:
            v = r.get(k)
            if k == "kind":
                cells.append(f'<td><a href="#image-{r["image"]}">{r["thumb"]}<span>{_esc(v)}</span></a></td>')
            elif num:
                value, shown = (_data_value(v), _fmt(k, v)) if is_finite_number(v) else ("", "")
                cells.append(f'<td class="n" data-value="{_esc(value)}">{_esc(shown)}</td>')
            else:
                cells.append(f"<td>{_esc('' if v is None else v)}</td>")
        flagged = ' class="flagged"' if r.get("flagged") == "yes" else ""
        body.append(f'<tr{flagged} data-image="{r["image"]}">{"".join(cells)}</tr>')
    return (f'<table class="data sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            '<p class="meta">Click a column header to sort (again for descending).</p>')


def _body(page: _Page, embed: bool) -> str:
    ctx = _Ctx(page.out.parent, embed)
    names = _Names(page.report, page.audit)
    queries = _Queries(page.audit, page.audit_dir)
    cards, rows = [], []
    if page.report is not None:
        for i, entry in enumerate(page.report.images):
            card, entry_rows = _card(i, entry, page, ctx, names, queries)
            cards.append(card)
            rows += entry_rows
        columns = COLUMNS + (AUDIT_COLUMNS if queries else [])
    elif page.audit is not None:
        tiles = []
        for i, query in enumerate(page.audit.queries):
            tile, row = _audit_tile(i, query, page, ctx, names, queries)
            tiles.append(tile)
            rows.append(row)
        cards.append(f'<section class="card queries"><div class="tiles">{"".join(tiles)}</div></section>')
        columns = [COLUMNS[0], COLUMNS[1], ("kind", "query", False)] + AUDIT_COLUMNS
    else:
        columns = []
    per = "Per input image" if page.report is not None else "Per query"
    nav = f'<p class="meta"><a href="#cards">{per}</a> · <a href="#table">Every image, sortable</a></p>'
    parts = [f"<h1>{_esc(page.title)}</h1>", _settings_line(page), _files_line(page, embed), nav if rows else "",
             f'<div class="top">{_summary_table(page)}{_legend(page)}</div>']
    directions = page.out.parent / DEMO_DIRECTIONS
    if page.kind == "demo" and directions.is_file():     # the directions figure; its page has the sliders
        link = "" if embed else (f' (<a href="{_esc(Path(DEMO_DIRECTIONS).with_suffix(".html").as_posix())}">'
                                 'its page, with a slider per direction</a>)')
        parts += [f'<h2 id="directions">Each class\'s top directions of Σ_y, one at a time{link}</h2>',
                  ctx.image(directions, DEMO_DIRECTIONS, max(_image_size(directions)) // 2 + 1,  # its own size
                            "the directions figure")]
    if cards:
        parts += [f'<h2 id="cards">{per}</h2>', *cards]
    if rows:
        parts += ['<h2 id="table">Every image</h2>', _data_table(rows, columns)]
    parts.append(f'<p class="meta">isda-viz {_esc(__version__)}</p>')
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# The document: inline CSS and script


_CSS = """
.isda-viz{font:14px/1.4 system-ui,"DejaVu Sans",Arial,sans-serif;color:#1d1d1f;max-width:1500px;margin:0 auto;
  padding:8px 16px}
.isda-viz h1{font-size:22px;margin:8px 0}.isda-viz h2{font-size:17px;margin:22px 0 8px}
.isda-viz h3{font-size:14px;margin:0 0 8px;font-weight:600;word-break:break-all}
.isda-viz .meta{color:#555;margin:2px 0;font-size:13px}
.isda-viz .top{display:flex;flex-wrap:wrap;gap:8px 40px;align-items:flex-start;margin-top:8px}
.isda-viz .legend{font-size:12px;line-height:1.5;max-width:640px;margin:0}.isda-viz .legend b{color:#333}
.isda-viz table{border-collapse:collapse}
.isda-viz table.summary th{text-align:left;font-weight:normal;padding:2px 16px 2px 0}
.isda-viz table.summary td{font-weight:600;font-variant-numeric:tabular-nums}
.isda-viz table.data{font-size:12px}
.isda-viz table.data th{background:#f1f1f4;cursor:pointer;padding:4px 8px;position:sticky;top:0;user-select:none}
.isda-viz table.data th[aria-sort=ascending]::after{content:" \\25B2"}
.isda-viz table.data th[aria-sort=descending]::after{content:" \\25BC"}
.isda-viz table.data td{border-top:1px solid #e4e4e8;padding:2px 8px;vertical-align:middle;white-space:nowrap}
.isda-viz table.data td.n{text-align:right;font-variant-numeric:tabular-nums}
.isda-viz table.data td a{display:flex;align-items:center;gap:6px;color:inherit}
.isda-viz table.data tr.flagged td{background:#fde8e8}
.isda-viz .card{border:1px solid #d9d9de;border-radius:6px;padding:10px;margin:12px 0}
.isda-viz .tiles{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.isda-viz .tile{margin:0;width:136px;font-size:12px}
.isda-viz .tile.flagged img{outline:3px solid #c0392b}
.isda-viz figcaption{font-weight:600;margin-bottom:3px}
.isda-viz img{display:block;background:#eee}
.isda-viz img.px{image-rendering:pixelated;image-rendering:crisp-edges}
.isda-viz .card:not(.queries) .tile .nums{min-height:84px}
.isda-viz .tile .num{display:flex;justify-content:space-between;gap:4px;color:#444}
.isda-viz .tile .num b{color:#1d1d1f;text-align:right}
.isda-viz .num b{font-variant-numeric:tabular-nums}
.isda-viz .num.wrong b{color:#c0392b}
.isda-viz .missing{display:flex;align-items:center;justify-content:center;text-align:center;box-sizing:border-box;
  border:2px dashed #c0392b;color:#c0392b;font-size:11px;word-break:break-all;padding:4px;background:#fff7f7}
.isda-viz .nbrs{font-size:11px;margin-top:6px;border-top:1px solid #e4e4e8;padding-top:4px;color:#333}
.isda-viz .nbr-head{color:#777;margin-top:2px}
.isda-viz .nbrs ol{margin:2px 0 0;padding:0;list-style:none}
.isda-viz .nbrs li{display:flex;gap:6px;align-items:center;margin:3px 0;line-height:1.25}
.isda-viz .nbrs li img,.isda-viz .nbrs li .missing{flex:none}
.isda-viz .nbrs i{color:#777;font-style:normal}
.isda-viz .file{white-space:nowrap;overflow:hidden;text-overflow:ellipsis;color:#555}
.isda-viz .flag{color:#fff;background:#c0392b;border-radius:3px;padding:0 5px;display:inline-block;font-weight:600}
"""

# Sorting: click a header (again: descending); `#sort=KEY` / `#sort=-KEY` in the page's address sorts on load.
# Rows without a value stay last either way. After loading, each image's naturalWidth is written to its
# data-natural-width (0: it did not load), so a headless browser's dumped DOM says what rendered.
_JS = """
(function(){
function val(td){var v=td.getAttribute('data-value');return v===null?td.textContent.trim():v;}
function sortBy(table,key,desc){
 var ths=table.tHead.rows[0].cells,col=-1,i;
 for(i=0;i<ths.length;i++){ths[i].removeAttribute('aria-sort');if(ths[i].getAttribute('data-key')===key)col=i;}
 if(col<0)return false;
 var num=ths[col].getAttribute('data-type')==='number',body=table.tBodies[0];
 var rows=Array.prototype.slice.call(body.rows);
 rows.forEach(function(r,i){if(r.dataset.order===undefined)r.dataset.order=i;});
 rows.sort(function(a,b){
  var x=val(a.cells[col]),y=val(b.cells[col]);
  if(num){x=x===''?NaN:parseFloat(x);y=y===''?NaN:parseFloat(y);}
  var bx=num?isNaN(x):x==='',by=num?isNaN(y):y==='';
  if(bx||by)return bx&&by?a.dataset.order-b.dataset.order:(bx?1:-1);
  var c=num?x-y:x.localeCompare(y);
  if(desc)c=-c;
  return c||a.dataset.order-b.dataset.order;});
 rows.forEach(function(r){body.appendChild(r);});
 ths[col].setAttribute('aria-sort',desc?'descending':'ascending');
 return true;}
function init(root){
 if(root.getAttribute('data-ready'))return;root.setAttribute('data-ready','1');
 root.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('thead th').forEach(function(th){th.addEventListener('click',function(){
   sortBy(table,th.getAttribute('data-key'),th.getAttribute('aria-sort')==='ascending');});});});}
function hashSort(root){
 var m=/sort=(-?)([^&]+)/.exec(location.hash);if(!m)return;
 root.querySelectorAll('table.sortable').forEach(function(t){
  if(sortBy(t,decodeURIComponent(m[2]),m[1]==='-'))root.setAttribute('data-sorted',decodeURIComponent(m[2]));});}
function loaded(root){
 root.querySelectorAll('img').forEach(function(img){img.setAttribute('data-natural-width',img.naturalWidth);});
 root.setAttribute('data-images-checked',root.querySelectorAll('img').length);}
var roots=document.querySelectorAll('.isda-viz');
roots.forEach(function(r){init(r);if(HASH)hashSort(r);});
function done(){roots.forEach(loaded);}
if(document.readyState==='complete')done();else window.addEventListener('load',done);
})();
"""


def _style() -> str:
    return f"<style>{_CSS}</style>"


def _script(hash_sort: bool) -> str:
    return "<script>" + _JS.replace("HASH", "true" if hash_sort else "false") + "</script>"


def _document(page: _Page, embed: bool) -> str:
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(page.title)}</title>{_style()}</head>\n"
            f'<body><div class="isda-viz">{_body(page, embed)}</div>{_script(hash_sort=True)}</body></html>\n')
