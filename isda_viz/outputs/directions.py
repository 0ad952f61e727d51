"""The report of `isda-viz directions` (FIG.json), its figure (FIG.png) and its page (FIG.html).

FIG.json, written and read only through `DirectionsReport` (keys are the field names below):

    {"t": [-3.0, ..., 3.0],
     "classes": [{"label", "label_name", "trace", "effective_rank", "mean_cosine",
                  "eigenvalues": [K], "shares": [K], "rest_share"}, ...],
     "images": [{"source", "label", "label_name", "predicted", "original": {"file"},
                 "reconstruction": {"file", "feature_error", "psnr", "predicted", "judge_predicted"},
                 "directions": [{"k", "eigenvalue", "share", "change_file",
                                 "frames": [{"t", "file", "reached_shift_error", "negative_target_floor",
                                             "shift_norm", "predicted", "judge_predicted", "pixel_distance"}]}]}],
     "test": null | {"feature_draws", "pixel_draws", "judged_by",
                     "classes": [{"label", "label_name", "feature": COUNTS, "pixels": COUNTS | null, "clean": KEPT}],
                     "overall_feature": COUNTS, "overall_pixels": COUNTS | null, "overall_clean": KEPT,
                     "other_classes": [y' per image]},
     "settings": {...}, "seconds": {...}, "class_names": [...], "change_scale"}

    COUNTS = {"isda": KEPT, "isotropic": KEPT, "other_class": KEPT}, KEPT = {"kept", "total", "rate", "low", "high"}

`k` counts directions from 1 (largest eigenvalue); `share` = e_k / tr Sigma_y; `mean_cosine` =
|cos(u_1, class mean)|; `effective_rank` = tr(Sigma)^2 / tr(Sigma^2). Frame errors are relative
(`reached_shift_error` = ||f(G(z_hat')) - target|| / ||target - a||, null at t = 0 where there is no
shift), `pixel_distance` the RMS difference to the t = 0 frame in [0, 1] units; `change_file` the heat
map of |frame(+max t) - frame(-max t)|. `low`/`high`: the 95% Wilson interval of `rate` = kept / total.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from isda_viz.errors import IsdaVizError
from isda_viz.outputs.figures import font, labelled_grid
from isda_viz.outputs.folders import through_figure_link
from isda_viz.outputs.html import _Ctx, _esc, _fmt, _script, _style
from isda_viz.outputs.report import ImageFile, ReconstructionEntry
from isda_viz.readers import build_typed, check_relative_files, read_json
from isda_viz.runs import write_bytes_atomic, write_json_atomic

NOISE_LABELS = {"isda": "ISDA: N(0, λΣ_y)", "isotropic": "isotropic: N(0, λ tr(Σ_y)/A · I)",
                "other_class": "other class: N(0, λΣ_y′), same E‖ε‖²"}


@dataclass(kw_only=True)
class Kept:
    """How many of `total` augmentations kept their class, the rate and its 95% interval [low, high]."""
    kept: int
    total: int
    rate: float | None
    low: float
    high: float


@dataclass(kw_only=True)
class NoiseCounts:
    """One `Kept` per noise of the semantic test."""
    isda: Kept
    isotropic: Kept
    other_class: Kept


@dataclass(kw_only=True)
class ClassTest:
    """The semantic test for one class: in feature space and, when run, in pixels (the judge)."""
    label: int
    label_name: str
    feature: NoiseCounts
    pixels: NoiseCounts | None = None
    clean: Kept | None = None         # the class's images whose own features a the last layer puts in it


@dataclass(kw_only=True)
class SemanticTest:
    """Per class and overall; `feature_draws`, `pixel_draws` per image and noise; `judged_by` "judge" or
    "classifier" (no judge given); `other_classes`: per image the class y' of its other-class control."""
    feature_draws: int
    pixel_draws: int
    judged_by: str
    classes: list[ClassTest]
    overall_feature: NoiseCounts
    overall_pixels: NoiseCounts | None = None
    overall_clean: Kept | None = None
    other_classes: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class ClassSummary:
    """The spectrum of one class covariance: its top-K eigenvalues and their shares of the trace."""
    label: int
    label_name: str
    trace: float
    effective_rank: float
    mean_cosine: float | None
    eigenvalues: list[float]
    shares: list[float]
    rest_share: float


@dataclass(kw_only=True)
class Frame:
    """One inverted target a + t sqrt(lambda e_k) u_k."""
    t: float
    file: str
    reached_shift_error: float | None
    negative_target_floor: float | None
    shift_norm: float
    predicted: int
    judge_predicted: int | None = None
    pixel_distance: float


@dataclass(kw_only=True)
class Direction:
    """The traversal of one image along u_k: its frames in order of t, and where its pixels change."""
    k: int
    eigenvalue: float
    share: float
    change_file: str
    frames: list[Frame]


@dataclass(kw_only=True)
class DirectionsImage:
    """One input image: where it came from, Step I's reconstruction, one traversal per direction."""
    source: str
    label: int
    label_name: str
    predicted: int
    original: ImageFile
    reconstruction: ReconstructionEntry
    directions: list[Direction]


@dataclass(kw_only=True)
class DirectionsSettings:
    """How the figure was made (`inverter`, `refine_steps`: as in `outputs.report.Settings`)."""
    strength: float
    directions: int
    steps: int
    extent: float
    seed: int
    covariance: str
    options: dict
    classifier: str
    judge: str | None = None
    inverter: str = "search"
    refine_steps: int | None = None


@dataclass(kw_only=True)
class DirectionsReport:
    """FIG.json; `path` is where it was written or read (not part of the JSON)."""
    t: list[float]
    classes: list[ClassSummary]
    images: list[DirectionsImage]
    test: SemanticTest | None = None
    settings: DirectionsSettings | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    change_scale: float = 1.0      # the |difference| shown as white in the heat maps, [0, 1] pixel units
    path: Path | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        del out["path"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "DirectionsReport":
        """The report of a parsed JSON object; raises KeyError/TypeError/ValueError on another shape."""
        return _build(cls, data)

    def with_files_under(self, folder: str) -> "DirectionsReport":
        """A copy whose file paths are prefixed with `folder/` (the report written beside its image folder)."""
        copy = DirectionsReport.from_dict(self.to_dict())
        for image in copy.images:
            for record in (image.original, image.reconstruction):
                record.file = f"{folder}/{record.file}"
            for direction in image.directions:
                direction.change_file = f"{folder}/{direction.change_file}"
                for frame in direction.frames:
                    frame.file = f"{folder}/{frame.file}"
        return copy


def _build(kind, value):
    """`value` (parsed JSON) as the type `kind`: dataclasses, lists of them, optional ones, plain values."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if value is None else _build(options[0], value)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        return [_build(typing.get_args(kind)[0], v) for v in value]
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise TypeError(f"expected an object for {kind.__name__}, got {type(value).__name__}")
        hints = typing.get_type_hints(kind)
        names = {f.name for f in dataclasses.fields(kind) if f.init and f.name != "path"}
        return kind(**{k: _build(hints[k], v) for k, v in value.items() if k in names})
    if origin is dict:
        return dict(value)
    return value


def _files_of(image: DirectionsImage) -> list[str]:
    return [image.original.file, image.reconstruction.file] + [
        f for d in image.directions for f in [d.change_file, *(frame.file for frame in d.frames)]]


def write_directions_report(report: DirectionsReport, path) -> None:
    """Write `report` as JSON to `path`, atomically; `report.path` becomes `path`."""
    write_json_atomic(report.to_dict(), path)
    report.path = Path(path)


def read_directions_report(path) -> DirectionsReport:
    """The report FIG.json at `path` (or beside a FIG.png); `IsdaVizError` when it is not one."""
    path = Path(path)
    path = path.with_suffix(".json") if path.suffix.lower() == ".png" else path
    where = f"{path} is not a report of isda-viz directions"
    report = build_typed(DirectionsReport, read_json(path, "the directions report", limit=256 << 20), where)
    check_relative_files([f for image in report.images for f in _files_of(image)], where)
    report.path = path
    return report


# ---------------------------------------------------------------------------------------------
# The figure


def change_heatmap(plus: torch.Tensor, minus: torch.Tensor, scale: float) -> torch.Tensor:
    """|plus - minus| averaged over channels, `(C, H, W)` each in [0, 1] → an RGB heat map `(3, H, W)`
    in [0, 1]: black (no change) through red and yellow to white at a difference of `scale`."""
    x = ((plus - minus).abs().mean(0) / max(scale, 1e-12)).clamp(0, 1)
    return torch.stack([(3 * x).clamp(0, 1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)])


def draw_directions_figure(report: DirectionsReport, frames: list[torch.Tensor], changes: list[torch.Tensor],
                           cell: int = 72) -> Image.Image:
    """FIG.png: per image a title line, then one row per direction (label: k and its share of tr Sigma_y),
    columns t, and a last column, the heat map of where the pixels change.

    `frames[i] (K, S, C, H, W)` and `changes[i] (K, 3, H, W)` in [0, 1] for `report.images[i]`.
    Captions under the frames: the classifier's class (with a * where it is not the image's)."""
    names = report.class_names
    headers = [f"t = {t:+.1f}" for t in report.t] + ["changes"]
    blocks = []
    for image, frame, change in zip(report.images, frames, changes):
        rows = [[*frame[d], change[d]] for d in range(len(image.directions))]
        row_labels = [f"u{d.k}  {100 * d.share:.0f}%" for d in image.directions]
        captions = [[_caption(names, f.predicted, image.label) for f in d.frames] + [""] for d in image.directions]
        grid = labelled_grid(rows, headers, row_labels, cell=cell, captions=captions)
        strength = f" · strength {report.settings.strength:g}" if report.settings else ""
        title = (f"{image.label_name} · {image.source}{strength} · changes: |frame(t max) - frame(-t max)|, "
                 f"white at {report.change_scale:.2f}")
        blocks.append((title, grid))
    text = font(max(12, cell // 6))
    line = max(12, cell // 6) + 10
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(max(g.width for _, g in blocks), max(int(measure.textlength(t, font=text)) + 12 for t, _ in blocks))
    canvas = Image.new("RGB", (width, sum(g.height + line for _, g in blocks)), "white")
    draw, top = ImageDraw.Draw(canvas), 0
    for title, grid in blocks:
        draw.text((6, top + 4), title, fill="black", font=text)
        canvas.paste(grid, (0, top + line))
        top += line + grid.height
    return canvas


def _caption(names: list[str], predicted: int, label: int) -> str:
    name = names[predicted] if 0 <= predicted < len(names) else str(predicted)
    return name[:11] + ("*" if predicted != label else "")


# ---------------------------------------------------------------------------------------------
# The page

_PAGE_CSS = """
.isda-viz .direction{display:flex;gap:14px;align-items:flex-start;margin:8px 0;padding-top:8px;
  border-top:1px solid #e4e4e8}
.isda-viz .direction .about{width:150px;font-size:12px}
.isda-viz .direction input.slider{width:150px}
.isda-viz .frames{display:flex;gap:4px;flex-wrap:wrap}
.isda-viz .frame{font-size:11px;width:64px;border:2px solid transparent}
.isda-viz .frame.current{border-color:#2f6fd6}
.isda-viz .frame .nums{display:none}
.isda-viz .frame-info .num{display:flex;justify-content:space-between;gap:4px;color:#444}
.isda-viz .frame .wrong{color:#c0392b}
.isda-viz table.test td,.isda-viz table.test th{padding:2px 10px;border-top:1px solid #e4e4e8;text-align:right}
.isda-viz table.test th:first-child,.isda-viz table.test td:first-child{text-align:left}
"""

# Each slider shows frame i of its direction in the player (the frame's own image); `#slide=I.K=J` in the
# page's address moves image I's direction K to frame J on load, through the same input event.
_SLIDER_JS = """
(function(){
function show(d,i){
 var frames=d.querySelectorAll('.frame'),f=frames[i];if(!f)return;
 frames.forEach(function(x){x.classList.remove('current');});f.classList.add('current');
 var img=f.querySelector('img'),player=d.querySelector('.player img');
 if(img&&player){player.src=img.src;player.setAttribute('data-file',img.getAttribute('data-file'));}
 d.setAttribute('data-frame',i);d.querySelector('.frame-info').innerHTML=f.querySelector('.nums').innerHTML;}
document.querySelectorAll('.isda-viz .direction').forEach(function(d){
 var s=d.querySelector('input.slider');s.addEventListener('input',function(){show(d,+s.value);});show(d,+s.value);});
var m=/slide=(\\d+)\\.(\\d+)=(\\d+)/.exec(location.hash);
if(m){var d=document.querySelector('.direction[data-image="'+m[1]+'"][data-direction="'+m[2]+'"]');
 if(d){var s=d.querySelector('input.slider');s.value=m[3];s.dispatchEvent(new Event('input'));}}
})();
"""


def _value(key: str, label: str, value) -> str:
    shown = _fmt(key, value)
    return (f'<span class="num" data-key="{_esc(key)}" data-value="{_esc(json.dumps(value))}">{_esc(label)} '
            f'<b>{_esc(shown)}</b></span>')


def _class_value(key: str, label: str, value: int | None, true_label: int, names: list[str]) -> str:
    if value is None:
        return ""
    wrong = ' wrong' if value != true_label else ""
    name = names[value] if 0 <= value < len(names) else f"class {value}"
    return (f'<span class="num{wrong}" data-key="{_esc(key)}" data-value="{_esc(json.dumps(value))}">{_esc(label)} '
            f'<b>{_esc(name)}</b></span>')


def _direction_html(i: int, image: DirectionsImage, direction: Direction, base: Path, ctx: _Ctx,
                    names: list[str]) -> str:
    """One direction of one image: its numbers, the slider and player, its frames and the heat map."""
    frames = []
    for j, f in enumerate(direction.frames):
        nums = (_value("t", "t", f.t) + _value("reached_shift_error", "shift err.", f.reached_shift_error)
                + _value("pixel_distance", "pixel dist.", f.pixel_distance)
                + _class_value("predicted", "classifier", f.predicted, image.label, names)
                + _class_value("judge_predicted", "judge", f.judge_predicted, image.label, names))
        name = names[f.predicted] if 0 <= f.predicted < len(names) else str(f.predicted)
        wrong = ' class="wrong"' if f.predicted != image.label else ""
        frames.append(f'<div class="frame" data-index="{j}">{ctx.image(base / f.file, f.file, 56)}'
                      f'<div>t {f.t:+.1f}</div><div{wrong}>{_esc(name)}</div><div class="nums">{nums}</div></div>')
    middle = len(direction.frames) // 2
    shown = direction.frames[middle]
    about = (f'<div class="about"><b>u{direction.k}</b>: {100 * direction.share:.1f}% of tr Σ'
             f'<br>{_value("eigenvalue", "eigenvalue", direction.eigenvalue)}'
             f'<br><input class="slider" type="range" min="0" max="{len(direction.frames) - 1}" step="1" '
             f'value="{middle}" aria-label="t along u{direction.k}"><div class="frame-info"></div></div>')
    player = f'<div class="player">{ctx.image(base / shown.file, shown.file, 140)}</div>'
    change = (f'<figure class="tile"><figcaption>where it changes</figcaption>'
              f'{ctx.image(base / direction.change_file, direction.change_file, 84)}</figure>')
    return (f'<div class="direction" data-image="{i}" data-direction="{direction.k}">{about}{player}'
            f'<div class="frames">{"".join(frames)}</div>{change}</div>')


def _image_card(i: int, image: DirectionsImage, base: Path, ctx: _Ctx, names: list[str]) -> str:
    recon = image.reconstruction
    head = (f'<figure class="tile"><figcaption>original</figcaption>'
            f'{ctx.image(base / image.original.file, image.original.file, 84)}</figure>'
            f'<figure class="tile"><figcaption>reconstruction</figcaption>'
            f'{ctx.image(base / recon.file, recon.file, 84)}'
            f'{_value("feature_error", "feature err.", recon.feature_error)}</figure>')
    body = "".join(_direction_html(i, image, d, base, ctx, names) for d in image.directions)
    return (f'<section class="card" data-image="{i}"><h3>#{i} · {_esc(image.label_name)} · {_esc(image.source)}</h3>'
            f'<div class="tiles">{head}</div>{body}</section>')


def _kept_cells(counts: NoiseCounts | None, where: str) -> str:
    if counts is None:
        return "".join("<td>n/a</td>" for _ in NOISE_LABELS)
    cells = []
    for noise in NOISE_LABELS:
        k: Kept = getattr(counts, noise)
        cells.append(f'<td data-key="{where}.{noise}" data-kept="{k.kept}" data-total="{k.total}" '
                     f'data-value="{_esc(json.dumps(k.rate))}" data-low="{k.low!r}" data-high="{k.high!r}">'
                     f'{_esc(_fmt("rate", k.rate))} [{k.low:.3f}, {k.high:.3f}] ({k.kept}/{k.total})</td>')
    return "".join(cells)


def semantic_test_table(test: SemanticTest) -> str:
    """The test as an HTML table: rows per class and overall, per noise the rate kept, its 95% interval
    and the counts, in feature space and in pixels."""
    head = "".join(f"<th>{_esc(label)}</th>" for label in NOISE_LABELS.values()) + "<th>no noise (images)</th>"
    rows = []
    for name, feature, pixels, clean in ([(c.label_name, c.feature, c.pixels, c.clean) for c in test.classes]
                                         + [("all classes", test.overall_feature, test.overall_pixels,
                                             test.overall_clean)]):
        plain = f"<td>{clean.kept}/{clean.total}</td>" if clean is not None else "<td>n/a</td>"
        rows.append(f'<tr data-class="{_esc(name)}" data-space="feature"><td>{_esc(name)}, feature space</td>'
                    f'{_kept_cells(feature, "feature")}{plain}</tr>')
        rows.append(f'<tr data-class="{_esc(name)}" data-space="pixels"><td>{_esc(name)}, pixels ({test.judged_by})'
                    f'</td>{_kept_cells(pixels, "pixels")}<td></td></tr>')
    return (f'<table class="test"><thead><tr><th>class kept: rate [95% interval] (kept/total)</th>{head}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table>'
            f'<p class="meta">{test.feature_draws} draws per image and noise in feature space (the last layer on '
            f'a + ε), {test.pixel_draws} in pixels ({test.judged_by} on the inverted images).</p>')


def directions_body(report: DirectionsReport, html_dir: Path, embed: bool) -> str:
    """The page's content (no document around it), its images relative to `html_dir` or inlined."""
    ctx, base = _Ctx(html_dir, embed), report.path.parent
    s = report.settings
    parts = [f"<h1>isda-viz directions: {_esc(report.path.stem)}</h1>"]
    if s is not None:
        parts.append(f'<p class="meta">top {s.directions} eigen-directions u_k of Σ_y; targets a + t·√(λ·e_k)·u_k '
                     f'for {s.steps} values of t in [−{s.extent:g}, {s.extent:g}], λ = {s.strength:g}, seed {s.seed}, '
                     f'each inverted from z*; slide to step through a direction.</p>')
    spectrum = "".join(f'<tr data-label="{c.label}"><td>{_esc(c.label_name)}</td>'
                       f'<td>{_esc(", ".join(f"{100 * x:.1f}%" for x in c.shares))}</td>'
                       f'<td>{100 * (1 - c.rest_share):.1f}%</td><td>{c.effective_rank:.2f}</td>'
                       f'<td>{_esc(_fmt("cos", c.mean_cosine))}</td></tr>' for c in report.classes)
    parts.append('<h2>Class covariances</h2><table class="test"><thead><tr><th>class</th><th>shares of tr Σ_y</th>'
                 '<th>top K together</th><th>effective rank</th><th>|cos(u1, mean)|</th></tr></thead>'
                 f'<tbody>{spectrum}</tbody></table>')
    if report.test is not None:
        parts += ['<h2 id="test">Do the directions keep the class?</h2>', semantic_test_table(report.test)]
    parts.append('<h2>Per input image</h2>')
    parts += [_image_card(i, image, base, ctx, report.class_names) for i, image in enumerate(report.images)]
    return "".join(parts)


def write_directions_page(report: DirectionsReport, embed: bool = False) -> Path:
    """FIG.html beside the report's FIG.json; returns its path."""
    out = report.path.with_suffix(".html")
    text = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>isda-viz directions: {_esc(report.path.stem)}</title>{_style()}<style>{_PAGE_CSS}</style>'
            f'</head>\n<body><div class="isda-viz">{directions_body(report, out.parent, embed)}</div>'
            f'<script>{_SLIDER_JS}</script>{_script(hash_sort=False)}</body></html>\n')
    write_bytes_atomic(text.encode("utf-8"), through_figure_link(out))  # a published figure keeps its link
    return out
