"""The `augment` and `grid` pipelines: invert real images, augment their features, render, measure, write.

Data flows one way: images → classifier features a → Step I, `inversion.reconstruct` (z*)
→ a~ = a + eps (`inversion.sample_augmented_features`) → Step II, `inversion.augment` (z')
→ images, predictions and errors → PNGs + the report (`isda_viz.outputs.report`).

Both pipelines take one `VisualizeOptions`, which also names the models; Python callers get
the command line's defaults (shipped weights, the shipped judge, Step II = 3/2 × Step I).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from isda_viz import locks
from isda_viz.classifiers.classifier import Classifier, load_classifier
from isda_viz.classifiers.covariance_file import read_covariance_file
from isda_viz.classifiers.statistics import ClassStatistics, class_statistics
from isda_viz.data.datasets import load_split
from isda_viz.data.images import check_image_path, load_image_file
from isda_viz.bounds import check_count, check_number, check_seed, derived_seed
from isda_viz.devices import check_device, pick_device, use_deterministic
from isda_viz.errors import IsdaVizError
from isda_viz.generators import load_generator
from isda_viz.generators.reach import cached_reach_summary
from isda_viz.inversion.adapter import Models, read_class_map
from isda_viz.inversion.amortized import AmortizedInverter, InverterOptions
from isda_viz.inversion.inverter_cache import find_inverter, train_pair_inverter
from isda_viz.inversion.optimizer import InversionOptions
from isda_viz.inversion.pipeline import InvertedBatch, draw_prior, invert_batch
from isda_viz.inversion.starts import REFINE_STEPS, AmortizedStart, CodeSource, PriorSearch
from isda_viz.isda.directions import augmentation_shares
from isda_viz.isda.estimator import check_covariance
from isda_viz.isda.sampling import sample_augmented_features
from isda_viz.outputs.figures import labelled_grid, to_pil
from isda_viz.outputs.folders import (
    check_figure_path,
    check_inputs_outside,
    check_name_lengths,
    check_replaceable,
    claim_figure,
    figure_files_dir,
    figure_outputs,
    publish_figure,
    publish_folder,
)
from isda_viz.outputs.html import write_html
from isda_viz.outputs.report import (
    REPORT,
    AugmentedEntry,
    ImageEntry,
    ImageFile,
    ReconstructionEntry,
    Report,
    Settings,
    summarize,
    write_report,
)
from isda_viz.pretrained import default_classifier, default_generator, default_judge
from isda_viz.runs import assembled_beside



INVERTERS = ("search", "amortized")
"""The ways `--inverter` names of producing latent codes (`inversion.starts`)."""


MAX_STRENGTH, MAX_LR, MAX_ITERATIONS = 100.0, 10.0, 100_000     # --strength, --lr, --iterations
MAX_AUGMENTED, MAX_RESTARTS = 64, 64                               # --num-augmented, --restarts


@dataclass(kw_only=True)
class VisualizeOptions:
    """Everything `augment` and `grid` share: which models, how strong an augmentation, how hard a search.

    `classifier`/`judge`: RUN_DIRs, or for `classifier` a weights file with `classifier_arch`
    (see `load_classifier`; `class_names` names its classes); `generator`: a GAN_DIR, a BigGAN
    folder or name; `class_map`: a `--class-map` file (`adapter.read_class_map`) when the
    generator's classes are not the classifier's. Left None, the shipped Fashion-MNIST weights are
    used, and with the shipped classifier also the shipped CE judge. `covariance`: full or diagonal
    class covariances for classifiers without statistics of their own. `truncation` is BigGAN's
    (None: its default). `strength` is λ: a~ = a + eps, eps ~ N(0, λ Σ_y); `num_augmented` is K
    per image. `InversionOptions.make` turns the command line's knobs into `inversion`. `embed`:
    the output's HTML page carries its images inline (`data:` URIs) instead of referencing the PNG
    files. `deterministic`: `--deterministic` (`devices.use_deterministic`, process-wide), applied when
    the models are loaded.
    """

    classifier: str | None = None
    classifier_arch: str | None = None
    class_names: str | None = None
    generator: str | None = None
    class_map: str | None = None
    judge: str | None = None
    covariance: str = "full"
    covariance_file: str | None = None
    truncation: float | None = None
    device: str | None = None
    strength: float = 0.5
    num_augmented: int = 4
    inversion: InversionOptions = field(default_factory=InversionOptions.make)   # the search's options
    inverter: str | None = None       # "search" | "amortized"; None: amortized where the pair has one, else search
    refine_steps: int | None = None   # optimiser steps after the amortized passes (None: `starts.REFINE_STEPS`)
    micro_batch: int | None = None    # rows per forward pass (None: `pipeline.auto_micro_batch`)
    seed: int = 0
    data_root: str | None = None      # the classifier's dataset folder (default: the one it was trained from)
    progress: bool = True
    embed: bool = False
    deterministic: bool = False       # CUDA: deterministic kernels, no TF32 (`devices.use_deterministic`)

    def __post_init__(self) -> None:
        """Raise `IsdaVizError` for values no run can use (before any model is loaded): every number finite and
        in its range (`isda_viz.bounds`), the device one this torch has."""
        if not math.isfinite(self.strength) or self.strength < 0:
            raise IsdaVizError(f"--strength must be a finite number >= 0, not {self.strength}")
        check_number(self.strength, "--strength", 0, MAX_STRENGTH)
        if self.truncation is not None:
            check_number(self.truncation, "--truncation", 0, 1, low_open=True)
        for name in ("reconstruct_lr", "augment_lr"):
            check_number(getattr(self.inversion, name), "--lr", 0, MAX_LR, low_open=True)
        check_number(self.inversion.tolerance, "--tolerance", 0, 1e6)
        for name in ("reconstruct_iterations", "augment_iterations"):
            check_count(getattr(self.inversion, name), "--iterations", 0, MAX_ITERATIONS)  # 0: the start alone
        check_covariance(self.covariance)
        check_count(self.num_augmented, "--num-augmented", 1, MAX_AUGMENTED)
        check_count(self.inversion.restarts, "--restarts", 1, MAX_RESTARTS)
        if self.inverter not in (None, *INVERTERS):
            raise IsdaVizError(f"--inverter must be one of {', '.join(INVERTERS)}, not {self.inverter!r}")
        if self.refine_steps is not None:
            check_count(self.refine_steps, "--refine-steps", 0, MAX_ITERATIONS)
        if self.micro_batch is not None:
            check_count(self.micro_batch, "--micro-batch", 1, 1_000_000)
        check_seed(self.seed)
        check_device(self.device)

    def input_paths(self) -> dict:
        """The files and folders these options read, by option name (an input is never an output)."""
        return {"--classifier": self.classifier, "--class-names": self.class_names, "--generator": self.generator,
                "--class-map": self.class_map, "--judge": self.judge, "--covariance-file": self.covariance_file,
                "--data-root": self.data_root}

    def load_models(self) -> Models:
        """The classifier, generator and judge these options name, frozen, on the chosen device."""

        device = pick_device(self.device)
        if self.deterministic:  # before any model or cuBLAS handle exists
            use_deterministic(device)
        judge = self.judge if self.judge is not None or self.classifier is not None else default_judge()
        extra = {} if self.truncation is None else {"truncation": self.truncation}
        classifier = load_classifier(self.classifier or default_classifier(), device, arch=self.classifier_arch,
                                     class_names=self.class_names, data_root=self.data_root)
        if self.covariance_file is not None:  # replaces the classifier's own statistics and any pass
            classifier.estimator = read_covariance_file(self.covariance_file, classifier.num_classes,
                                                        classifier.feature_dim, device=classifier.device)
        generator = load_generator(str(self.generator or default_generator()), device, **extra)
        class_map = None
        if self.class_map is not None:
            class_map = read_class_map(self.class_map, classifier, generator)
        return Models(classifier, generator, load_classifier(judge, device) if judge else None, class_map)


def check_models(models: Models) -> None:
    """Raise `IsdaVizError` unless generator, classifier and judge fit together."""
    models.adapter()  # checks class count (or class map) and channels
    c, j = models.classifier, models.judge
    if j is not None and (j.channels, j.image_size) != (c.channels, c.image_size):
        raise IsdaVizError(f"the judge in {j.source} takes {j.channels}×{j.image_size}² images, the classifier in "
                           f"{c.source} {c.channels}×{c.image_size}²; give a judge trained on the same dataset")


@dataclass
class AugmentationResult:
    """Everything one batch produced. Images are `(·, C, H, W)` in [0, 1] at the classifier's size."""
    originals: torch.Tensor          # (N, C, H, W)
    labels: torch.Tensor             # (N,)
    reconstructions: torch.Tensor    # (N, C, H, W)
    augmented: torch.Tensor          # (N, K, C, H, W)
    entries: list[ImageEntry]        # per image, its report entry (files named, not yet written)
    seconds: dict


def code_source(models: Models, options: VisualizeOptions, log=None) -> CodeSource:
    """The way of producing codes `options.inverter` names: "search", "amortized" (the pair's trained inverter:
    an `IsdaVizError` saying how to train one where there is none), or None: amortized where the pair has an
    inverter, else the search with one note saying how to train one (nothing is trained here)."""
    if options.inverter == "search":
        return PriorSearch(options.inversion)
    inverter = find_inverter(models) if models.classifier.fingerprint is not None else None
    if inverter is not None:
        steps = REFINE_STEPS if options.refine_steps is None else options.refine_steps
        return AmortizedStart(inverter, steps, options.inversion)
    how = train_inverter_command(models, options)
    if options.inverter == "amortized":
        raise IsdaVizError(f"this classifier and generator have no trained amortized inverter; train one with "
                           f"`{how}` (minutes), or use --inverter search")
    (log or _note)(f"no amortized inverter for this classifier and generator: searching (seconds per picture); "
                   f"`{how}` trains one (minutes) and makes pictures about 10x faster")
    return PriorSearch(options.inversion)


def train_inverter_command(models: Models, options: VisualizeOptions) -> str:
    """The `isda-viz train-inverter` command line for the pair these options name."""
    parts = ["isda-viz train-inverter"]
    for flag, value in (("--classifier", options.classifier), ("--classifier-arch", options.classifier_arch),
                        ("--class-names", options.class_names), ("--generator", options.generator),
                        ("--class-map", options.class_map), ("--truncation", options.truncation),
                        ("--data-root", options.data_root), ("--device", options.device)):
        if value is not None:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def invert_and_augment(models: Models, images: torch.Tensor, labels: torch.Tensor, sources: list[str],
                       options: VisualizeOptions, *, wanted: torch.Tensor | None = None,
                       source: CodeSource | None = None) -> AugmentationResult:
    """Step I, sampling and Step II for `images (N, C, H, W)` in [0, 1] (classifier size) with `labels (N,)`,
    through `invert_batch`.

    `wanted (N, K, A)`: augmented features to invert instead of drawing them (e.g. to compare settings on
    the same draws); `source`: the way of producing codes (default: `code_source`)."""
    classifier, k = models.classifier, options.num_augmented
    source = source or code_source(models, options)
    rng = torch.Generator().manual_seed(options.seed)
    labels = labels.to(classifier.device)
    target = classifier.features(images.to(classifier.device))
    prior = draw_prior(models, len(images), options.inversion.restarts, rng)
    statistics = class_statistics(classifier, options.data_root, classes=labels.tolist(),
                                  covariance=options.covariance, progress=options.progress)
    if wanted is None:
        wanted = sample_augmented_features(target, statistics.slots(labels), statistics.estimator,
                                           options.strength, k, rng)                               # (N, K, A)
    wanted = wanted.to(target)
    done = invert_batch(models, images, labels, wanted, source, prior, micro_batch=options.micro_batch,
                        progress=options.progress)
    return augmentation_result(models, done, wanted, sources, statistics)


def augmentation_result(models: Models, done: InvertedBatch, wanted: torch.Tensor, sources: list[str],
                        statistics: ClassStatistics) -> AugmentationResult:
    """`invert_batch`'s result `done` for targets `wanted (N, K, A)` as the report's entries and pictures (also
    `explore`'s "save", whose pictures come from several Step II calls); `statistics` holds the images' classes."""
    labels = done.labels
    shares = augmentation_shares(wanted.to(done.features) - done.features[:, None], labels,
                                 statistics.covariance)                                                  # (N, K, 6)
    distance = (done.pictures - done.reconstructions[:, None]).pow(2).flatten(2).mean(2).sqrt()  # RMS, [0, 1]
    entries = [_image_entry(i, sources[i], int(labels[i]), models.classifier.class_names, done, distance, shares)
               for i in range(len(labels))]
    return AugmentationResult(done.images.cpu(), labels.cpu(), done.reconstructions, done.pictures, entries,
                              done.seconds)


def _image_entry(i: int, source: str, label: int, class_names, done, distance, shares) -> ImageEntry:
    """Image `i`'s report entry from `invert_batch`'s result (files named, not yet written)."""
    return ImageEntry(
        source=source, label=label, label_name=class_names[label], predicted=done.predicted[i],
        original=ImageFile(file=f"{i:03d}_original.png"),
        reconstruction=ReconstructionEntry(
            file=f"{i:03d}_reconstruction.png", feature_error=float(done.feature_error[i]), psnr=float(done.psnr[i]),
            predicted=done.reconstruction_predicted[i], judge_predicted=done.reconstruction_judged[i]),
        augmented=[AugmentedEntry(
            file=f"{i:03d}_augmented_{j}.png", reached_shift_error=float(done.reached_shift_error[i, j]),
            shift_norm=float(done.shift_norm[i, j]), negative_target_floor=float(done.negative_target_floor[i, j]),
            predicted=done.pictures_predicted[i][j], judge_predicted=done.pictures_judged[i][j],
            pixel_distance=float(distance[i, j]), direction_shares=shares[i, j].tolist())
            for j in range(len(done.pictures_predicted[i]))])


def report_settings(options: VisualizeOptions, models: Models, source: CodeSource) -> Settings:
    """The report's `settings` for pictures `source` made under `options`."""
    return Settings(strength=options.strength, num_augmented=options.num_augmented, seed=options.seed,
                    options=source.settings(), classifier=str(models.classifier.source),
                    judge=str(models.judge.source) if models.judge else None, inverter=source.name,
                    refine_steps=getattr(source, "refine_steps", None),
                    generator_reach=cached_reach_summary(models.classifier, models.generator, models.class_map))


def _check_out_dir(out: Path, command: str = "augment") -> None:
    """An --out folder we may replace: absent, empty, or an earlier output of `command` carrying our manifest
    and nothing else (`outputs.folders.check_replaceable`)."""
    check_replaceable(out, command)


def replace_output_dir(tmp: Path, out: Path, command: str = "augment") -> None:
    """Move the finished folder `tmp` (assembled beside `out`) into place, with its manifest; an older output
    of ours is replaced whole, in one step (`outputs.folders.publish_folder`)."""
    publish_folder(tmp, out, command)


def write_images(result: AugmentationResult, class_names: list[str], folder: Path,
                 samples: torch.Tensor | None = None, cell: int = 84) -> None:
    """The PNGs the entries name (original, reconstruction, augmented, samples) and the figure
    `grid.png` into `folder`.

    `samples (N, S, C, H, W)`: random same-class generator images appended to each row, saved
    as the files of each entry's `samples`.
    """
    k = result.augmented.shape[1]
    rows, row_labels, captions = [], [], []
    for i, entry in enumerate(result.entries):
        to_pil(result.originals[i]).save(folder / entry.original.file)
        to_pil(result.reconstructions[i]).save(folder / entry.reconstruction.file)
        for j, a in enumerate(entry.augmented):
            to_pil(result.augmented[i, j]).save(folder / a.file)
        for j, sample in enumerate(entry.samples):
            to_pil(samples[i, j]).save(folder / sample.file)
        row = [result.originals[i], result.reconstructions[i], *result.augmented[i]]
        caption = ["", f"err {entry.reconstruction.feature_error:.3f}",
                   *[class_names[a.predicted][:11] for a in entry.augmented]]
        if samples is not None:
            row += list(samples[i])
            caption += [""] * len(samples[i])
        rows.append(row)
        captions.append(caption)
        row_labels.append(class_names[entry.label])
    headers = ["original", "reconstr.", *[f"augmented {j + 1}" for j in range(k)]]
    if samples is not None:
        headers += [f"random {j + 1}" for j in range(samples.shape[1])]
    labelled_grid(rows, headers, row_labels, cell=cell, captions=captions).save(folder / "grid.png")


def _new_report(result: AugmentationResult, class_names: list[str], settings: Settings) -> Report:
    return Report(images=result.entries, summary=summarize(result.entries), seconds=result.seconds,
                  settings=settings, class_names=list(class_names))


def write_augment_dir(result: AugmentationResult, class_names: list[str], out, settings: Settings,
                      samples: torch.Tensor | None = None, embed: bool | None = None) -> Report:
    """Write OUT_DIR all at once (PNGs, grid.png, report.json and, unless `embed` is None, the page
    index.html): built in a temporary sibling folder, renamed into place when complete, so a failure
    leaves the previous OUT_DIR or none. Returns the report written."""
    out = Path(out)
    report = _new_report(result, class_names, settings)
    with assembled_beside(out) as tmp:
        started = time.time()
        write_images(result, class_names, tmp, samples)
        report.seconds["writing"] = round(time.time() - started, 3)   # the PNGs; the report and page are small
        write_report(report, tmp / REPORT)
        if embed is not None:
            write_html(tmp, embed=embed)
        publish_folder(tmp, out, "augment")
    report.path = out / REPORT
    return report


def write_grid_files(result: AugmentationResult, class_names: list[str], out_png: Path, settings: Settings,
                     samples: torch.Tensor | None, embed: bool) -> Report:
    """Write a grid: FIG_files/ (the single PNGs and their report.json, what `audit --from FIG_files` reads) with
    the figure, its JSON and page, linked to as FIG.png, FIG.json and FIG.html, all assembled in one temporary
    folder and published whole (`outputs.folders.publish_figure`). Returns the report written as FIG.json."""
    files_dir = figure_files_dir(out_png)
    report = _new_report(result, class_names, settings)
    with assembled_beside(out_png, maps_to=out_png.parent) as tmp:
        files = tmp / files_dir.name
        files.mkdir()
        started = time.time()
        write_images(result, class_names, files, samples)
        report.seconds["writing"] = round(time.time() - started, 3)   # the PNGs; the reports and page are small
        os.replace(files / "grid.png", tmp / out_png.name)
        write_report(report, files / REPORT)
        figure = report.with_files_under(files_dir.name)
        write_report(figure, tmp / out_png.with_suffix(".json").name)
        write_html(tmp / out_png.name, embed=embed)
        publish_figure(tmp, out_png, "grid")
    figure.path = out_png.with_suffix(".json")
    return figure


def augment_images(images: list, *, out, label: str | None = None, options: VisualizeOptions | None = None,
                   models: Models | None = None) -> Report:
    """`isda-viz augment`: invert and augment image files (PNG/JPEG, any size or mode); writes OUT_DIR
    (grid.png, one PNG per image, report.json, then the page index.html) and returns its report
    (shown as that page in Jupyter).

    `label`: the class (name or index) of every image; None: each image's predicted class.
    `models`: already loaded models (default: `options.load_models()`).
    """
    options = options or VisualizeOptions()
    if not images:
        raise IsdaVizError("give at least one --image")
    check_name_lengths([Path(out)])
    with locks.exclusive(out):
        return _augment_images(images, Path(out), label, options, models)


def _augment_images(images: list, out: Path, label: str | None, options: VisualizeOptions,
                    models: Models | None) -> Report:
    _check_out_dir(out)
    check_inputs_outside({"--image": images, **options.input_paths()}, [out])
    for path in images:  # a folder, a device or a missing file fails before any model is loaded
        check_image_path(Path(path))
    models = models or options.load_models()
    check_models(models)
    classifier = models.classifier
    pixels = torch.stack([load_image_file(p, classifier.channels, classifier.image_size) for p in images])
    if label is None:
        labels = classifier.predict(pixels)
    else:
        labels = torch.full((len(pixels),), classifier.class_index(label, "--label"))
    source = code_source(models, options)
    result = invert_and_augment(models, pixels, labels, [str(p) for p in images], options, source=source)
    return write_augment_dir(result, classifier.class_names, out, report_settings(options, models, source),
                             embed=options.embed)


def check_distinct_classes(classes: list[str] | None) -> None:
    """`--classes` as given (before any model is loaded): `IsdaVizError` when it names one twice."""
    if classes and len(set(classes)) < len(classes):
        twice = next(c for c in classes if classes.count(c) > 1)
        raise IsdaVizError(f"--classes names {twice} more than once; give each class once")


def chosen_classes(classifier: Classifier, classes: list[str] | None) -> list[int] | None:
    """`--classes` (names or indices) as the classifier's class indices, each class once (`IsdaVizError` for a
    class named twice, e.g. by name and by index); None for all classes. The one reading of `--classes`."""
    check_distinct_classes(classes)
    class_index = [classifier.class_index(c, "--classes") for c in classes] if classes else None
    if class_index and len(set(class_index)) < len(class_index):
        twice = next(c for c in class_index if class_index.count(c) > 1)
        raise IsdaVizError(f"--classes names the class {classifier.class_names[twice]} more than once; "
                           "give each class once")
    return class_index


def images_per_class(classifier: Classifier, per_class: int, classes: list[int] | None, data_root=None):
    """The first `per_class` test images of each class (all classes, or `classes`), `(N, C, H, W)` in [0, 1]."""
    if classifier.dataset is None:
        raise IsdaVizError(f"the classifier in {classifier.source} names no dataset to take test images from; "
                           "give --data-root")
    test = load_split(classifier.dataset, False, data_root or classifier.config.get("data_root"),
                      image_size=classifier.image_size)
    classes = list(range(classifier.num_classes)) if not classes else classes
    chosen = []
    for c in classes:
        index = torch.nonzero(test.labels == c).flatten()[:per_class].tolist()
        if not index:
            raise IsdaVizError(f"no test image of class {c} in {classifier.dataset}")
        chosen += index
    images = classifier.fit_images(torch.stack([test[i][0] for i in chosen]).float() / 255).cpu()
    return images, test.labels[chosen].clone(), [f"{classifier.dataset}:test[{i}]" for i in chosen]


def make_grid(*, out, per_class: int = 1, classes: list[str] | None = None, num_samples: int = 2,
              options: VisualizeOptions | None = None, models: Models | None = None) -> Report:
    """`isda-viz grid`: the paper's figure for test images; writes FIG_files/ PNGs, FIG.json, FIG.png,
    then the page FIG.html.

    Rows: original | reconstruction | K augmented | `num_samples` random samples of the same class
    (class-conditional generators; saved as FIG_files/NNN_sample_J.png). `classes`: names or
    indices (default: all). Returns the report written as FIG.json, its file paths relative to it
    (shown as the page in Jupyter).
    """
    options = options or VisualizeOptions()
    out_png = check_figure_path(out)
    with locks.exclusive(out_png):
        return _make_grid(out_png, per_class, classes, num_samples, options, models)


def _make_grid(out_png: Path, per_class: int, classes: list[str] | None, num_samples: int,
               options: VisualizeOptions, models: Models | None) -> Report:
    claim_figure(out_png, "grid")
    check_inputs_outside(options.input_paths(), figure_outputs(out_png))
    check_distinct_classes(classes)
    models = models or options.load_models()
    check_models(models)
    classifier, generator = models.classifier, models.generator
    class_index = chosen_classes(classifier, classes)
    images, labels, sources = images_per_class(classifier, per_class, class_index, options.data_root)
    source = code_source(models, options)
    result = invert_and_augment(models, images, labels, sources, options, source=source)
    samples = None
    if generator.conditional and num_samples > 0:
        z = generator.sample_latent(len(labels) * num_samples,
                                    torch.Generator().manual_seed(derived_seed(options.seed + 1)))
        with torch.no_grad():
            y = labels.repeat_interleave(num_samples).to(generator.device)
            samples = models.adapter().pixels(z, y).cpu().view(len(labels), num_samples, *images.shape[1:])
        for i, entry in enumerate(result.entries):
            entry.samples = [ImageFile(file=f"{i:03d}_sample_{j}.png") for j in range(num_samples)]
    return write_grid_files(result, classifier.class_names, out_png, report_settings(options, models, source), samples,
                            options.embed)


def make_inverter(options: VisualizeOptions | None = None, training: InverterOptions | None = None,
                  models: Models | None = None) -> tuple[AmortizedInverter, Path]:
    """`isda-viz train-inverter`: train the amortized inverter of the pair `options` names (`training`: its
    budget, default `InverterOptions()`) on the classifier's training images and cache it for that pair
    (`inversion.inverter_cache`); returns it and the file written. Its `info` holds the seconds it took."""
    options = options or VisualizeOptions()
    models = models or options.load_models()
    check_models(models)
    if models.classifier.fingerprint is None:
        raise IsdaVizError(f"the classifier in {models.classifier.source} has no weights file to key an inverter by")
    return train_pair_inverter(models, training or InverterOptions(), options.data_root, options.covariance,
                               options.progress)
