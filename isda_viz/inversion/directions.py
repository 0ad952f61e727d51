"""`isda-viz directions`: each class's eigen-directions of Sigma_y, one at a time, and the semantic test.

Data flows one way: images → features a → Step I, `reconstruct` (z*) → the top K eigenvectors u_k of
Sigma_y (`isda.directions.class_directions`) → targets a + t sqrt(lambda e_k) u_k for S values of t
(and, with the test, a + eps for the test's three noises) → Step II, `augment`, every target of every
image in one batch from its z* → frames, predictions, distances → FIG_files/, FIG.json, FIG.png, FIG.html
(`isda_viz.outputs.directions`).

The t = 0 target is a itself, shared by an image's directions (one problem, not K identical ones).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from isda_viz import locks
from isda_viz.bounds import check_count, check_memory, check_number, derived_seed
from isda_viz.classifiers.statistics import ClassStatistics, class_statistics
from isda_viz.data.images import load_image_file
from isda_viz.errors import IsdaVizError
from isda_viz.inversion.pipeline import draw_prior, invert_batch
from isda_viz.inversion.pipelines import (
    Models,
    VisualizeOptions,
    check_distinct_classes,
    check_models,
    chosen_classes,
    code_source,
    images_per_class,
)
from isda_viz.inversion.starts import CodeSource
from isda_viz.isda.directions import (
    NOISES,
    ClassDirections,
    binomial_interval,
    class_directions,
    isda_noise,
    isotropic_noise,
    kept_class,
    other_class_noise,
    pick_other_classes,
    traversal_steps,
    traversal_targets,
)
from isda_viz.outputs.directions import (
    ClassSummary,
    ClassTest,
    Direction,
    DirectionsImage,
    DirectionsReport,
    DirectionsSettings,
    Frame,
    Kept,
    NoiseCounts,
    SemanticTest,
    change_heatmap,
    draw_directions_figure,
    write_directions_page,
    write_directions_report,
)
from isda_viz.outputs.figures import to_pil
from isda_viz.outputs.folders import (
    check_figure_path,
    check_inputs_outside,
    claim_figure,
    figure_files_dir,
    figure_outputs,
    publish_figure,
)
from isda_viz.outputs.report import ImageFile, ReconstructionEntry
from isda_viz.runs import assembled_beside

FILES_REPORT = "directions.json"     # the report inside FIG_files/, its paths relative to that folder
DRAW_CHUNK = 250                     # feature-space test draws per sampling call (bounds memory for large A)
MAX_DIRECTIONS, MAX_STEPS, MAX_RANGE = 256, 101, 100.0           # --directions, --steps, --range
MAX_TEST_DRAWS, MAX_PIXEL_DRAWS = 100_000, 64                     # --test-draws, --pixel-draws (<= --test-draws)


@dataclass(kw_only=True)
class DirectionsOptions:
    """What `isda-viz directions` draws: `visualize` (the options `augment` and `grid` share; its
    `num_augmented` is not used), the inputs (`images` files with `label`, else `per_class` test images
    of `classes`, names or indices, default all), `directions` K, `steps` S (odd, so t = 0 is a frame)
    over [-`extent`, `extent`], and the semantic `test` with `feature_draws` and `pixel_draws` per image
    and noise."""

    visualize: VisualizeOptions = field(default_factory=VisualizeOptions)
    images: list = field(default_factory=list)
    label: str | None = None
    classes: list[str] | None = None
    per_class: int = 1
    directions: int = 5
    steps: int = 7
    extent: float = 3.0
    test: bool = False
    feature_draws: int = 1000
    pixel_draws: int = 4

    def __post_init__(self) -> None:
        """Raise `IsdaVizError` for values no run can use (before any model is loaded); `visualize` checks itself."""
        if self.directions < 1:
            raise IsdaVizError("--directions must be >= 1")
        check_count(self.directions, "--directions", 1, MAX_DIRECTIONS)
        if self.steps < 3 or self.steps % 2 == 0 or self.steps > MAX_STEPS:
            raise IsdaVizError(f"--steps must be odd, from 3 to {MAX_STEPS}, so that t = 0 is one of the frames "
                               f"(not {self.steps})")
        check_number(self.extent, "--range", 0, MAX_RANGE, low_open=True)
        check_count(self.per_class, "--per-class", 1, 100)
        if self.test:
            check_count(self.feature_draws, "--test-draws", 1, MAX_TEST_DRAWS)
            check_count(self.pixel_draws, "--pixel-draws", 0, min(self.feature_draws, MAX_PIXEL_DRAWS))
        check_distinct_classes(self.classes)


@dataclass
class Traversal:
    """What one batch produced: `frames (N, K, S, C, H, W)`, `changes (N, K, 3, H, W)` and per image its
    report entry; `test_pixels (N, 3, P, C, H, W)` the inverted test targets (noises in `NOISES` order)."""
    originals: torch.Tensor
    reconstructions: torch.Tensor
    frames: torch.Tensor
    changes: torch.Tensor
    images: list[DirectionsImage]
    test_pixels: torch.Tensor | None
    change_scale: float
    seconds: dict
    source: CodeSource


def make_directions(*, out, options: DirectionsOptions | None = None,
                    models: Models | None = None) -> DirectionsReport:
    """`isda-viz directions`: writes FIG_files/ (every frame as a PNG), FIG.json, FIG.png and the page FIG.html;
    returns the report written as FIG.json (file paths relative to it)."""
    options = options or DirectionsOptions()
    out_png = check_figure_path(out)
    with locks.exclusive(out_png):  # one writer per figure
        return _make_directions(out_png, options, models)


def _make_directions(out_png: Path, options: DirectionsOptions, models: Models | None) -> DirectionsReport:
    files_dir = figure_files_dir(out_png)
    _check_files_dir(out_png)
    check_inputs_outside({"--image": options.images, **options.visualize.input_paths()}, figure_outputs(out_png))
    vis = options.visualize
    models = models or vis.load_models()
    check_models(models)
    classifier = models.classifier
    if options.directions > classifier.feature_dim:
        raise IsdaVizError(f"--directions {options.directions} is more than the classifier's "
                           f"{classifier.feature_dim} feature dimensions")
    images, labels, sources = _inputs(models, options)
    _check_plan(options, len(images), classifier.feature_dim, classifier.channels * classifier.image_size ** 2)
    test_rng = torch.Generator().manual_seed(derived_seed(vis.seed + 1))  # the test's own: frames do not depend on it
    others = pick_other_classes(labels, classifier.num_classes, test_rng) if options.test else None
    wanted_classes = sorted(set(labels.tolist()) | (set(others.tolist()) if others is not None else set()))
    statistics = class_statistics(classifier, vis.data_root, classes=wanted_classes, covariance=vis.covariance,
                                  progress=vis.progress)
    tops = {c: class_directions(statistics.covariance(c), options.directions) for c in sorted(set(labels.tolist()))}
    noises = _test_noises(statistics, labels, others, options, test_rng) if options.test else None
    traversal = traverse_directions(models, images, labels, sources, tops, noises, options)
    test = _semantic_test(models, statistics, images, labels, others, noises, traversal, options) \
        if options.test else None
    report = DirectionsReport(t=traversal_steps(options.steps, options.extent).tolist(),
                              classes=_class_summaries(statistics, tops, classifier.class_names),
                              images=traversal.images, test=test, settings=_settings(options, models, traversal.source),
                              seconds=traversal.seconds, class_names=list(classifier.class_names),
                              change_scale=traversal.change_scale)
    return _write(report, traversal, out_png, files_dir, vis.embed)


def _check_plan(options: DirectionsOptions, n: int, feature_dim: int, pixels: int) -> None:
    """Refuse, before any search, a figure whose one Step II batch or test draws exceed the memory budget: per
    image 1 + K (S - 1) + 3 P inverted rows (each its image, gradients and Adam state: about 16 floats of 4 bytes
    per pixel and per feature), and 3 M float64 feature draws per image."""
    rows = n * (1 + options.directions * (options.steps - 1) + 3 * (options.pixel_draws if options.test else 0))
    check_memory(rows * 16 * 4 * (pixels + feature_dim), f"inverting {rows} targets in one batch",
                 "--directions, --steps, --pixel-draws or the number of images")
    if options.test:
        check_memory(3 * n * options.feature_draws * feature_dim * 8, f"{options.feature_draws} test draws per image",
                     "--test-draws or the number of images")


def _inputs(models: Models, options: DirectionsOptions):
    """The images `(N, C, H, W)` in [0, 1], their labels `(N,)` and sources: files, or test images per class."""
    classifier = models.classifier
    if options.images:
        pixels = torch.stack([load_image_file(p, classifier.channels, classifier.image_size) for p in options.images])
        if options.label is None:
            labels = classifier.predict(pixels)
        else:
            labels = torch.full((len(pixels),), classifier.class_index(options.label, "--label"))
        return pixels, labels, [str(p) for p in options.images]
    chosen = chosen_classes(classifier, options.classes)
    return images_per_class(classifier, options.per_class, chosen, options.visualize.data_root)


def _test_noises(statistics: ClassStatistics, labels, others, options: DirectionsOptions, rng) -> dict:
    """Per noise name, eps `(N, M, A)` float64: the feature-space test's draws (the first P also go to pixels)."""
    slots, other_slots = statistics.slots(labels), statistics.slots(others)
    strength, estimator = options.visualize.strength, statistics.estimator
    draws = {noise: [] for noise in NOISES}
    done = 0
    while done < options.feature_draws:
        m = min(DRAW_CHUNK, options.feature_draws - done)
        draws["isda"].append(isda_noise(slots, estimator, strength, m, rng))
        draws["isotropic"].append(isotropic_noise(slots, estimator, strength, m, rng))
        draws["other_class"].append(other_class_noise(slots, other_slots, estimator, strength, m, rng))
        done += m
    return {noise: torch.cat(chunks, 1) for noise, chunks in draws.items()}


def traverse_directions(models: Models, images, labels, sources, tops: dict[int, ClassDirections], noises: dict | None,
                        options: DirectionsOptions, source: CodeSource | None = None) -> Traversal:
    """Step I once per image, then every frame (and test target) of every image as Step II targets of one
    `invert_batch` call (micro-batched), from the codes `source` gives (default: `code_source`)."""
    classifier, vis = models.classifier, options.visualize
    source = source or code_source(models, vis)
    device = classifier.device
    n, k, s = len(images), options.directions, options.steps
    rng = torch.Generator().manual_seed(vis.seed)
    images, labels = images.to(device), labels.to(device)
    features = classifier.features(images)
    prior = draw_prior(models, n, vis.inversion.restarts, rng)                               # as augment's
    t = traversal_steps(s, options.extent)
    vectors = torch.stack([tops[int(c)].vectors for c in labels.tolist()]).to(device)
    values = torch.stack([tops[int(c)].values for c in labels.tolist()]).to(device)
    targets = traversal_targets(features, vectors, values, vis.strength, t.to(device))      # (N, K, S, A)
    moving = torch.cat([targets[:, :, : s // 2], targets[:, :, s // 2 + 1:]], 2).flatten(1, 2)
    wanted = [features[:, None], moving]                                 # t = 0 first, then K x (S - 1) frames
    p = options.pixel_draws if noises is not None else 0
    if p:
        wanted += [features[:, None] + noises[noise][:, :p].to(features) for noise in NOISES]
    done = invert_batch(models, images, labels, torch.cat(wanted, 1), source, prior, micro_batch=vis.micro_batch,
                        progress=vis.progress)
    frames_count = 1 + k * (s - 1)
    frames = _frame_order(done.pictures[:, :frames_count], k, s)                          # (N, K, S, C, H, W)
    errors = [_frame_order(v[:, :frames_count], k, s) for v in
              (done.reached_shift_error, done.negative_target_floor, done.shift_norm)]
    predicted = [_frame_order(torch.tensor(rows)[:, :frames_count], k, s) if rows[0][0] is not None else None
                 for rows in (done.pictures_predicted, done.pictures_judged)]
    test_pixels = done.pictures[:, frames_count:].reshape(n, len(NOISES), p, *images.shape[1:]) if p else None
    change = (frames[:, :, -1] - frames[:, :, 0]).abs().mean(2)
    scale = max(float(change.max()), 1e-6)
    changes = torch.stack([torch.stack([change_heatmap(frames[i, d, -1], frames[i, d, 0], scale)
                                        for d in range(k)]) for i in range(n)]).cpu()
    entries = _entries(models, labels, sources, tops, frames, errors, predicted, done, t)
    return Traversal(images.cpu(), done.reconstructions, frames, changes, entries, test_pixels, scale,
                     dict(done.seconds), source)


def _frame_order(rows: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """Step II's rows per image `(N, 1 + K (S - 1), ...)` (t = 0 first) → `(N, K, S, ...)` in order of t."""
    zero, moving = rows[:, :1], rows[:, 1:].reshape(rows.shape[0], k, s - 1, *rows.shape[2:])
    zero = zero[:, None].expand(-1, k, *zero.shape[1:])
    return torch.cat([moving[:, :, : s // 2], zero, moving[:, :, s // 2:]], 2)


def _entries(models: Models, labels, sources, tops, frames, errors, predicted, done, t):
    """The report entries of every image, direction and frame (file names relative to FIG_files/);
    `predicted`: the classifier's and the judge's classes of the frames `(N, K, S)` (None: no judge)."""
    classifier = models.classifier
    n, k, s = frames.shape[:3]
    distance = (frames - frames[:, :, s // 2: s // 2 + 1]).pow(2).flatten(3).mean(3).sqrt()    # RMS (N, K, S)
    shift_error, floor, shift_norm = errors
    by_classifier, by_judge = predicted
    entries = []
    for i in range(n):
        label = int(labels[i])
        top = tops[label]
        directions = []
        for d in range(k):
            frame_list = []
            for j in range(s):
                zero = j == s // 2
                frame_list.append(Frame(
                    t=float(t[j]), file=f"{i:03d}_u{d + 1}_{j}.png",
                    reached_shift_error=None if zero else float(shift_error[i, d, j]),
                    negative_target_floor=None if zero else float(floor[i, d, j]),
                    shift_norm=0.0 if zero else float(shift_norm[i, d, j]), predicted=int(by_classifier[i, d, j]),
                    judge_predicted=None if by_judge is None else int(by_judge[i, d, j]),
                    pixel_distance=float(distance[i, d, j])))
            directions.append(Direction(k=d + 1, eigenvalue=float(top.values[d]), share=float(top.shares[d]),
                                        change_file=f"{i:03d}_u{d + 1}_change.png", frames=frame_list))
        entries.append(DirectionsImage(
            source=sources[i], label=label, label_name=classifier.class_names[label], predicted=done.predicted[i],
            original=ImageFile(file=f"{i:03d}_original.png"),
            reconstruction=ReconstructionEntry(
                file=f"{i:03d}_reconstruction.png", feature_error=float(done.feature_error[i]),
                psnr=float(done.psnr[i]), predicted=done.reconstruction_predicted[i],
                judge_predicted=done.reconstruction_judged[i]),
            directions=directions))
    return entries


def _kept(kept: int, total: int) -> Kept:
    low, high = binomial_interval(kept, total)
    return Kept(kept=kept, total=total, rate=kept / total if total else None, low=low, high=high)


def _counts(kept: dict[str, torch.Tensor], total: dict[str, torch.Tensor], rows: torch.Tensor) -> NoiseCounts:
    """The noises' counts summed over the images `rows` (a boolean mask `(N,)`)."""
    return NoiseCounts(**{noise: _kept(int(kept[noise][rows].sum()), int(total[noise][rows].sum()))
                          for noise in NOISES})


def _semantic_test(models: Models, statistics: ClassStatistics, images, labels, others, noises: dict,
                   traversal: Traversal, options: DirectionsOptions) -> SemanticTest:
    """Per class and overall: the share of a + eps the last layer keeps in the class (every draw), and
    the share of the inverted a + eps (the first `pixel_draws` draws) the judge keeps."""
    classifier = models.classifier
    features = classifier.features(images.to(classifier.device))
    with torch.no_grad():
        clean = (classifier.model.fc(features).argmax(1) == labels.to(features.device)).cpu()
    feature_kept = {noise: kept_class(classifier.model.fc, features, labels, noises[noise]) for noise in NOISES}
    feature_total = {noise: torch.full((len(labels),), noises[noise].shape[1]) for noise in NOISES}
    pixel_kept = pixel_total = None
    judge = models.judge or classifier
    if traversal.test_pixels is not None:
        n, _, p = traversal.test_pixels.shape[:3]
        pixel_kept, pixel_total = {}, {}
        for index, noise in enumerate(NOISES):
            predicted = judge.predict(traversal.test_pixels[:, index].flatten(0, 1)).view(n, p)
            pixel_kept[noise] = (predicted == labels.cpu()[:, None]).sum(1)
            pixel_total[noise] = torch.full((n,), p)
    classes = []
    for c in sorted(set(labels.tolist())):
        rows = labels.cpu() == c
        classes.append(ClassTest(label=c, label_name=classifier.class_names[c],
                                 feature=_counts(feature_kept, feature_total, rows),
                                 pixels=_counts(pixel_kept, pixel_total, rows) if pixel_kept else None,
                                 clean=_kept(int(clean[rows].sum()), int(rows.sum()))))
    everything = torch.ones(len(labels), dtype=torch.bool)
    return SemanticTest(feature_draws=options.feature_draws, pixel_draws=options.pixel_draws,
                        judged_by="judge" if models.judge is not None else "classifier", classes=classes,
                        overall_feature=_counts(feature_kept, feature_total, everything),
                        overall_pixels=_counts(pixel_kept, pixel_total, everything) if pixel_kept else None,
                        overall_clean=_kept(int(clean.sum()), len(labels)),
                        other_classes=others.tolist())


def _class_summaries(statistics: ClassStatistics, tops: dict[int, ClassDirections],
                     class_names: list[str]) -> list[ClassSummary]:
    summaries = []
    for c, top in tops.items():
        mean = statistics.estimator.mean[statistics.classes.index(c)].detach().cpu().double()
        norm = float(mean.norm())
        cosine = abs(float(top.vectors[0] @ mean)) / norm if norm > 0 else None
        summaries.append(ClassSummary(label=c, label_name=class_names[c], trace=top.trace,
                                      effective_rank=top.effective_rank, mean_cosine=cosine,
                                      eigenvalues=top.values.tolist(), shares=top.shares.tolist(),
                                      rest_share=top.rest_share))
    return summaries


def _settings(options: DirectionsOptions, models: Models, source: CodeSource) -> DirectionsSettings:
    vis = options.visualize
    return DirectionsSettings(strength=vis.strength, directions=options.directions, steps=options.steps,
                              extent=options.extent, seed=vis.seed, covariance=vis.covariance,
                              options=source.settings(), classifier=str(models.classifier.source),
                              judge=str(models.judge.source) if models.judge else None, inverter=source.name,
                              refine_steps=getattr(source, "refine_steps", None))


def _check_files_dir(out_png: Path) -> None:
    """The figure FIG.png may be written: FIG_files/ absent, empty, or an earlier output of `directions` carrying
    our manifest, and FIG.png, FIG.json, FIG.html absent or its links (`outputs.folders.claim_figure`)."""
    claim_figure(out_png, "directions")


def _write(report: DirectionsReport, traversal: Traversal, out_png: Path, files_dir: Path,
           embed: bool) -> DirectionsReport:
    """FIG_files/ with every frame, the figure, its JSON and page (linked to as FIG.png, FIG.json, FIG.html), all
    assembled in one temporary folder and published whole (`outputs.folders.publish_figure`), as `grid` does."""
    with assembled_beside(out_png, maps_to=out_png.parent) as tmp:
        files = tmp / files_dir.name
        files.mkdir()
        started = time.time()
        for i, image in enumerate(report.images):
            to_pil(traversal.originals[i]).save(files / image.original.file)
            to_pil(traversal.reconstructions[i]).save(files / image.reconstruction.file)
            for d, direction in enumerate(image.directions):
                to_pil(traversal.changes[i, d]).save(files / direction.change_file)
                for j, frame in enumerate(direction.frames):
                    to_pil(traversal.frames[i, d, j]).save(files / frame.file)
        report.seconds["writing"] = round(time.time() - started, 3)   # the PNGs; reports and page are small
        write_directions_report(report, files / FILES_REPORT)
        draw_directions_figure(report, list(traversal.frames), list(traversal.changes)).save(tmp / out_png.name)
        placed = report.with_files_under(files_dir.name)
        write_directions_report(placed, tmp / out_png.with_suffix(".json").name)
        write_directions_page(placed, embed=embed)
        publish_figure(tmp, out_png, "directions")
    placed.path = out_png.with_suffix(".json")
    return placed
