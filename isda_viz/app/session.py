"""The model side of `isda-viz explore`: open an image, move along its class's directions, draw, refine, save.

One `ExploreSession` holds the models and the images open in the page (`View`s, the last `MAX_VIEWS` kept).
Everything here is the inversion pipeline's work called with the app's targets, not a second copy of it:

    open    Step I once per image (`pipeline.reconstruct_batch`), the top K eigen-directions of Σ_y
            (`isda.directions.class_directions`);
    move    the sliders t (K,) and λ → ã = a + Σ_k t_k √(λ e_k) u_k (`combined_traversal_target`) →
            Step II (`pipeline.augment_batch`, one target) → the picture, its classes, reached-shift error
            and change map against the reconstruction;
    draw    8 ε ~ N(0, λΣ_y) (`isda_noise`) beside 8 isotropic ε of the same expected squared norm
            (`isotropic_noise`), one Step II call of 16 targets;
    refine  more optimiser steps from the code on screen (`starts.FromCodes`);
    save    the pictures on screen as `augment`'s output folder (`pipelines.write_augment_dir`, its report.json).

Not thread-safe: the app's one worker thread (`app.worker`) calls these one at a time.
"""

from __future__ import annotations

import re
import secrets
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from isda_viz import locks
from isda_viz.classifiers.statistics import ClassStatistics, class_statistics
from isda_viz.data.images import load_image_file
from isda_viz.errors import IsdaVizError
from isda_viz.inversion.adapter import Models
from isda_viz.inversion.amortized import AmortizedInverter
from isda_viz.inversion.pipeline import Augmented, InvertedBatch, Reconstructed, augment_batch, draw_prior, \
    reconstruct_batch
from isda_viz.inversion.pipelines import (
    VisualizeOptions,
    augmentation_result,
    code_source,
    images_per_class,
    report_settings,
    write_augment_dir,
)
from isda_viz.inversion.starts import REFINE_STEPS, AmortizedStart, CodeSource, FromCodes
from isda_viz.isda.directions import ClassDirections, class_directions, combined_traversal_target, isda_noise, \
    isotropic_noise
from isda_viz.outputs.directions import change_heatmap

SLIDER_RANGE = 3.0
"""Each direction's slider runs over t ∈ [-3, 3] standard deviations √(λ e_k) of that direction."""
DRAWS = 8
"""ISDA draws (and as many isotropic ones) per "draw"."""
TOP_CLASSES = 3
CHANGE_SCALE = 0.5
"""The change map is white where a pixel moved by this much (pixel values in [0, 1]) from the reconstruction."""
MOVE_REFINE_STEPS = 0
"""Optimiser steps after the amortized passes for each slider position unless `--refine-steps` says otherwise:
the inverter alone, so the picture follows the slider; "refine" adds `REFINE_STEPS`."""
MAX_VIEWS = 16
"""Images kept open (their Step I and pictures); the oldest is dropped after this many."""
SAVE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A save folder's name: one path component, no leading dot (so never `.` or `..`)."""


@dataclass
class Picture:
    """One picture on screen: `pixels (C, H, W)` in [0, 1], its classes, and how well it reached its target.

    `step2`: the `Augmented` (one image, one target) it came from, None for the reconstruction itself;
    `wanted (A,)` its target ã; `top` the classifier's `TOP_CLASSES` (class, probability); `change (3, H, W)`
    the heat map of |picture - reconstruction|; `pixel_distance` their RMS difference in [0, 1]."""

    pixels: torch.Tensor
    wanted: torch.Tensor
    predicted: int
    top: list[tuple[int, float]]
    judged: int | None
    step2: Augmented | None = None
    reached_shift_error: float | None = None
    change: torch.Tensor | None = None
    pixel_distance: float = 0.0
    t: list[float] = field(default_factory=list)
    strength: float = 0.0


@dataclass
class Drawn:
    """One "draw": `isda` and `isotropic` pictures `(DRAWS, C, H, W)` and their classes; `step2` the ISDA half's
    Step II result and `wanted (DRAWS, A)` its targets (what "save" writes)."""

    isda: torch.Tensor
    isotropic: torch.Tensor
    isda_predicted: list[int]
    isotropic_predicted: list[int]
    step2: Augmented
    wanted: torch.Tensor
    strength: float


@dataclass
class View:
    """An image open in the page: its Step I, its class's directions and what is on screen now."""

    id: str
    source: str                      # "fashion-mnist:test[12]", "upload:NAME"
    label: int
    step1: Reconstructed
    directions: ClassDirections
    original_top: list[tuple[int, float]]
    original_judged: int | None
    reconstruction: Picture
    current: Picture
    drawn: Drawn | None = None
    draws_made: int = 0


class ExploreSession:
    """The models, the thumbnails, the open images; every page action as one method (see the module's docstring).

    `options`: the models' and search's options (`strength` is λ's start, `refine_steps` the slider pictures'
    refinement, default `MOVE_REFINE_STEPS`); `directions` K; `per_class`/`classes`: the thumbnails (test images);
    `save_dir`: where "save" writes; `inverter`: an amortized inverter trained for `models` (default: the pair's
    cached one, `code_source`). `notes` collects what the page should say (e.g. the search is used)."""

    def __init__(self, models: Models, options: VisualizeOptions, *, directions: int = 5, per_class: int = 4,
                 classes: list[str] | None = None, save_dir: Path = Path("explore-saves"),
                 inverter: AmortizedInverter | None = None):
        classifier = models.classifier
        if not 1 <= directions <= classifier.feature_dim:
            raise IsdaVizError(f"--directions must be between 1 and the classifier's {classifier.feature_dim} "
                               f"feature dimensions, not {directions}")
        self.models, self.options, self.k, self.save_dir = models, options, directions, Path(save_dir)
        self.notes: list[str] = []
        self.step1_source, self.move_source = _sources(models, options, self.notes.append, inverter)
        self.searching = not isinstance(self.move_source, AmortizedStart)
        chosen = [classifier.class_index(c, "--classes") for c in classes] if classes else None
        self.thumbnails, self.thumbnail_labels, self.thumbnail_sources = _thumbnails(models, per_class, chosen,
                                                                                     options, self.notes.append)
        self._statistics: dict[int, ClassStatistics] = {}
        self._directions: dict[int, ClassDirections] = {}
        self.views: OrderedDict[str, View] = OrderedDict()

    # -- opening images ------------------------------------------------------------------------------------------
    def open_thumbnail(self, index: int) -> View:
        """Open test image `index` of `thumbnails` (Step I once)."""
        if not 0 <= index < len(self.thumbnails):
            raise IsdaVizError(f"no thumbnail {index}; there are {len(self.thumbnails)}")
        return self._open(self.thumbnails[index:index + 1], int(self.thumbnail_labels[index]),
                          self.thumbnail_sources[index])

    def open_upload(self, data: bytes, name: str = "upload", label: str | None = None) -> View:
        """Open an uploaded image file's bytes with `augment --image`'s checks (`load_image_file`: size limits,
        decompression bombs, non-images are `IsdaVizError`s); `label` a class name or index (None: predicted)."""
        classifier = self.models.classifier
        chosen = None if label in (None, "") else classifier.class_index(label, "class")
        with tempfile.TemporaryDirectory(prefix="isda-viz-upload-") as folder:
            path = Path(folder) / "upload"
            path.write_bytes(data)
            try:
                pixels = load_image_file(path, classifier.channels, classifier.image_size)[None]
            except IsdaVizError as e:
                raise IsdaVizError(str(e).replace(str(path), f"the uploaded file {name!r}")) from None
        if chosen is None:
            chosen = int(classifier.predict(pixels)[0])
        return self._open(pixels, chosen, f"upload:{name}")

    def _open(self, image: torch.Tensor, label: int, source: str) -> View:
        """Step I for `image (1, C, H, W)` in [0, 1] of class `label`; the view is kept (the oldest dropped)."""
        models, classifier = self.models, self.models.classifier
        rng = torch.Generator().manual_seed(self.options.seed)
        prior = draw_prior(models, 1, self.options.inversion.restarts, rng)            # as `augment` draws it
        step1 = reconstruct_batch(models, image, torch.tensor([label]), self.step1_source, prior,
                                  micro_batch=self.options.micro_batch, progress=False)
        directions = self._class_directions(label)
        reconstruction = self._reconstruction_picture(step1)
        judge = models.judge
        view = View(id=secrets.token_hex(8), source=source, label=label, step1=step1, directions=directions,
                    original_top=top_classes(classifier, step1.images)[0],
                    original_judged=None if judge is None else int(judge.predict(step1.images)[0]),
                    reconstruction=reconstruction, current=reconstruction)
        self.views[view.id] = view
        while len(self.views) > MAX_VIEWS:
            self.views.popitem(last=False)
        return view

    def view(self, view_id: str) -> View:
        """The open image `view_id`; a `KeyError` once it was dropped (the page opens it again)."""
        view = self.views[view_id]
        self.views.move_to_end(view_id)
        return view

    def statistics(self, label: int) -> ClassStatistics:
        """Σ_y of class `label` (the classifier's own, else one pass over that class's training images, cached)."""
        if label not in self._statistics:
            self._statistics[label] = class_statistics(self.models.classifier, self.options.data_root,
                                                       classes=[label], covariance=self.options.covariance,
                                                       progress=self.options.progress)
        return self._statistics[label]

    def _class_directions(self, label: int) -> ClassDirections:
        if label not in self._directions:
            self._directions[label] = class_directions(self.statistics(label).covariance(label), self.k)
        return self._directions[label]

    def _reconstruction_picture(self, step1: Reconstructed) -> Picture:
        pixels = step1.reconstructions[0]
        judged = step1.reconstruction_judged[0]
        return Picture(pixels=pixels, wanted=step1.features[0], predicted=step1.reconstruction_predicted[0],
                       top=top_classes(self.models.classifier, pixels[None])[0], judged=judged,
                       change=change_heatmap(pixels, pixels, CHANGE_SCALE), t=[0.0] * self.k,
                       strength=self.options.strength)

    # -- the page's actions ---------------------------------------------------------------------------------------
    def target(self, view: View, t: list[float], strength: float) -> torch.Tensor:
        """ã `(1, 1, A)` for slider positions `t` (K values in [-SLIDER_RANGE, SLIDER_RANGE]) and λ = `strength`."""
        t, strength = check_position(t, strength, self.k)
        device = view.step1.features.device
        d = view.directions
        wanted = combined_traversal_target(view.step1.features, d.vectors[None].to(device), d.values[None].to(device),
                                           strength, torch.tensor([t], dtype=torch.float64, device=device))
        return wanted[:, None]

    def move(self, view_id: str, t: list[float], strength: float) -> Picture:
        """The picture for slider positions `t` and λ: Step II towards `target` from the view's z*
        (the reconstruction itself where the target is a)."""
        view = self.view(view_id)
        wanted = self.target(view, t, strength)
        if torch.equal(wanted[0, 0], view.step1.features[0]):
            view.current = replace(view.reconstruction, t=list(map(float, t)), strength=float(strength))
            return view.current
        step2 = augment_batch(self.models, view.step1, wanted, self.move_source, micro_batch=self.options.micro_batch,
                              progress=False)
        view.current = self._picture(view, step2, wanted[0, 0], t, strength)
        return view.current

    def _picture(self, view: View, step2: Augmented, wanted: torch.Tensor, t, strength) -> Picture:
        pixels, reconstruction = step2.pictures[0, 0], view.reconstruction.pixels
        return Picture(pixels=pixels, wanted=wanted, predicted=step2.pictures_predicted[0][0],
                       top=top_classes(self.models.classifier, pixels[None])[0], judged=step2.pictures_judged[0][0],
                       step2=step2, reached_shift_error=float(step2.reached_shift_error[0, 0]),
                       change=change_heatmap(pixels, reconstruction, CHANGE_SCALE),
                       pixel_distance=float((pixels - reconstruction).pow(2).mean().sqrt()),
                       t=list(map(float, t)), strength=float(strength))

    def refine(self, view_id: str) -> Picture:
        """`REFINE_STEPS` more optimiser steps for the picture on screen, from its own code (Step I's objective for
        the reconstruction, Step II's for a moved picture)."""
        view = self.view(view_id)
        current, inversion = view.current, self.options.inversion
        if current.step2 is None:   # the reconstruction: refine z*, and every later move starts from the better one
            source = FromCodes(view.step1.z_star, None, REFINE_STEPS, inversion)
            prior = view.step1.z_star[:, None]
            view.step1 = reconstruct_batch(self.models, view.step1.images, view.step1.labels, source, prior,
                                           micro_batch=self.options.micro_batch, progress=False)
            view.reconstruction = self._reconstruction_picture(view.step1)
            view.current = replace(view.reconstruction, t=current.t, strength=current.strength)
            return view.current
        source = FromCodes(None, current.step2.z, REFINE_STEPS, inversion)
        step2 = augment_batch(self.models, view.step1, current.wanted[None, None], source,
                              micro_batch=self.options.micro_batch, progress=False)
        view.current = self._picture(view, step2, current.wanted, current.t, current.strength)
        return view.current

    def draw(self, view_id: str, strength: float) -> Drawn:
        """`DRAWS` ISDA augmentations ε ~ N(0, λΣ_y) and `DRAWS` isotropic ε ~ N(0, λ tr(Σ_y)/A I) of the view's
        image, inverted in one Step II call; the n-th draw of an image is the same for a seed."""
        view = self.view(view_id)
        _, strength = check_position([0.0] * self.k, strength, self.k)
        if strength == 0:
            raise IsdaVizError("λ is 0: every draw would be the reconstruction; move the λ slider up first")
        statistics = self.statistics(view.label)
        slots = statistics.slots(torch.tensor([view.label]))
        rng = torch.Generator().manual_seed(self.options.seed + 1 + view.draws_made)
        noise = torch.cat([isda_noise(slots, statistics.estimator, strength, DRAWS, rng),
                           isotropic_noise(slots, statistics.estimator, strength, DRAWS, rng)], 1)   # (1, 2D, A)
        features = view.step1.features
        wanted = features[:, None] + noise.to(features)
        step2 = augment_batch(self.models, view.step1, wanted, self.move_source, micro_batch=self.options.micro_batch,
                              progress=False)
        view.draws_made += 1
        predicted = step2.pictures_predicted[0]
        view.drawn = Drawn(isda=step2.pictures[0, :DRAWS], isotropic=step2.pictures[0, DRAWS:],
                           isda_predicted=predicted[:DRAWS], isotropic_predicted=predicted[DRAWS:],
                           step2=_first_targets(step2, DRAWS), wanted=wanted[0, :DRAWS], strength=strength)
        return view.drawn

    def save(self, view_id: str, name: str | None = None) -> Path:
        """The view's pictures (the moved picture, then the last ISDA draws) as `augment`'s output folder
        `save_dir/name` (default `<source>-<n>`): PNGs, grid.png, report.json; an earlier save of that name is
        replaced, any other folder refused. Returns the folder."""
        view = self.view(view_id)
        folder = self.save_dir / check_save_name(name or self._next_save_name(view))
        parts = [(p.step2, p.wanted[None]) for p in (view.current,) if p.step2 is not None]
        if view.drawn is not None:
            parts.append((view.drawn.step2, view.drawn.wanted))
        if not parts:
            raise IsdaVizError("nothing to save yet: move a slider or draw first")
        step2 = _concatenate([p[0] for p in parts])
        wanted = torch.cat([w for _, w in parts]).to(view.step1.features)[None]
        done = InvertedBatch(**{**vars(view.step1), **vars(step2),
                                "seconds": {"step1": round(view.step1.seconds, 3), "step2": round(step2.seconds, 3)}})
        result = augmentation_result(self.models, done, wanted, [view.source], self.statistics(view.label))
        strength = view.current.strength if view.current.step2 is not None else view.drawn.strength
        settings = report_settings(replace(self.options, strength=strength, num_augmented=wanted.shape[1]),
                                   self.models, self.move_source)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        with locks.exclusive(folder):
            write_augment_dir(result, self.models.classifier.class_names, folder, settings, embed=False)
        return folder

    def _next_save_name(self, view: View) -> str:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", view.source).strip("-.")[:40] or "image"
        n = 1
        while (self.save_dir / f"{stem}-{n:03d}").exists():
            n += 1
        return f"{stem}-{n:03d}"


def _sources(models: Models, options: VisualizeOptions, note, inverter: AmortizedInverter | None = None
             ) -> tuple[CodeSource, CodeSource]:
    """Step I's way of producing codes (the pair's: `code_source`, or `inverter` where given; the amortized inverter
    refined by `REFINE_STEPS` unless `--refine-steps` says otherwise) and the slider pictures' (the same inverter
    refined by `refine_steps`, default `MOVE_REFINE_STEPS`); the search for both where the pair has no inverter."""
    if inverter is not None and options.inverter != "search":
        steps = REFINE_STEPS if options.refine_steps is None else options.refine_steps
        step1 = AmortizedStart(inverter, steps, options.inversion)
    else:
        step1 = code_source(models, options, log=note)
    if not isinstance(step1, AmortizedStart):
        if options.inverter == "search":   # without an inverter, `code_source`'s own note says it
            note("--inverter search: each picture is a search and takes seconds")
        return step1, step1
    steps = MOVE_REFINE_STEPS if options.refine_steps is None else options.refine_steps
    return step1, AmortizedStart(step1.inverter, steps, options.inversion)


def _thumbnails(models: Models, per_class: int, classes: list[int] | None, options: VisualizeOptions, note):
    """The first `per_class` test images of each class `(N, C, H, W)`, their labels and sources; none (with a
    note) where the classifier names no dataset to take them from (weights files)."""
    classifier = models.classifier
    if classifier.dataset is None:
        note(f"the classifier in {classifier.source} names no dataset, so there are no test images to pick: "
             "upload one")
        c, s = classifier.channels, classifier.image_size
        return torch.zeros(0, c, s, s), torch.zeros(0, dtype=torch.long), []
    return images_per_class(classifier, per_class, classes, options.data_root)


@torch.no_grad()
def top_classes(classifier, pictures: torch.Tensor, k: int = TOP_CLASSES) -> list[list[tuple[int, float]]]:
    """The classifier's `k` most probable classes of each of `pictures (M, C, H, W)` in [0, 1], with their
    softmax probabilities."""
    probabilities = torch.softmax(classifier.logits(pictures).double(), 1).cpu()
    values, indices = probabilities.topk(min(k, probabilities.shape[1]), 1)
    return [[(int(i), float(v)) for i, v in zip(row_i, row_v)] for row_i, row_v in zip(indices, values)]


def check_position(t, strength, k: int) -> tuple[list[float], float]:
    """Slider values from the page: `t` K finite numbers in [-SLIDER_RANGE, SLIDER_RANGE], λ a finite number >= 0;
    anything else an `IsdaVizError`."""
    if not isinstance(t, (list, tuple)) or len(t) != k:
        raise IsdaVizError(f"t must be a list of {k} numbers (one per direction)")
    values = []
    for value in (*t, strength):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                or value in (float("inf"), float("-inf")):
            raise IsdaVizError(f"slider values must be finite numbers, not {value!r}")
        values.append(float(value))
    if any(abs(v) > SLIDER_RANGE for v in values[:-1]):
        raise IsdaVizError(f"t must lie in [-{SLIDER_RANGE:g}, {SLIDER_RANGE:g}]")
    if values[-1] < 0:
        raise IsdaVizError(f"λ must be >= 0, not {values[-1]:g}")
    return values[:-1], values[-1]


def check_save_name(name: str) -> str:
    """A save folder's name: one path component of letters, digits, `_`, `.`, `-` (not starting with a dot), so
    a save never lands outside the save folder."""
    if not isinstance(name, str) or not SAVE_NAME.fullmatch(name):
        raise IsdaVizError(f"a save name is up to 64 letters, digits, '_', '.' or '-', not starting with '.' "
                           f"(one folder inside the save folder), not {str(name)[:80]!r}")
    return name


def _first_targets(step2: Augmented, m: int) -> Augmented:
    """The first `m` targets of a one-image `Augmented`."""
    return Augmented(z=step2.z[:, :m], pictures=step2.pictures[:, :m],
                     reached_shift_error=step2.reached_shift_error[:, :m], shift_norm=step2.shift_norm[:, :m],
                     negative_target_floor=step2.negative_target_floor[:, :m],
                     pictures_predicted=[step2.pictures_predicted[0][:m]],
                     pictures_judged=[step2.pictures_judged[0][:m]], seconds=step2.seconds)


def _concatenate(parts: list[Augmented]) -> Augmented:
    """One-image `Augmented`s joined along their targets."""
    return Augmented(z=torch.cat([p.z for p in parts], 1), pictures=torch.cat([p.pictures for p in parts], 1),
                     reached_shift_error=torch.cat([p.reached_shift_error for p in parts], 1),
                     shift_norm=torch.cat([p.shift_norm for p in parts], 1),
                     negative_target_floor=torch.cat([p.negative_target_floor for p in parts], 1),
                     pictures_predicted=[sum((p.pictures_predicted[0] for p in parts), [])],
                     pictures_judged=[sum((p.pictures_judged[0] for p in parts), [])],
                     seconds=sum(p.seconds for p in parts))
