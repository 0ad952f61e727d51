"""What `augment` and `grid` do: invert real images, augment their features, render, measure, write.

Data flows one way: images → classifier features a → Step I (z*) → a~ = a + eps
→ Step II (z') → images, predictions and errors → PNGs + report.json.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import GeneratorAdapter
from .data import load_image_file, load_split
from .errors import IsdaVizError
from .estimator import CovarianceEstimator
from .figures import labelled_grid
from .inversion import InversionOptions, invert_features, normalize_latent, sample_augmented_features
from .runs import Classifier, load_checkpoint, save_atomic, write_json_atomic

STATISTICS_CACHE = "class_statistics.pt"


def class_statistics(classifier: Classifier, data_root=None, batch_size: int = 500,
                     progress: bool = True) -> CovarianceEstimator:
    """The run's per-class feature covariances: its ISDA estimator, or (CE runs) one pass over the
    training set, cached in the run directory beside the checkpoint it was computed from."""
    if classifier.estimator is not None:
        return classifier.estimator
    from tqdm import tqdm

    from .data import iterate_batches

    cache = classifier.run_dir / STATISTICS_CACHE
    stamp = os.stat(classifier.run_dir / "checkpoint.pt")
    key = f"{stamp.st_size}-{stamp.st_mtime_ns}"
    device = next(classifier.model.parameters()).device
    if cache.exists():
        state = load_checkpoint(cache, "class statistics cache")
        if state.get("checkpoint") == key:
            return CovarianceEstimator.from_state_dict(state["estimator"], device=device)
    train = load_split(classifier.dataset, True, data_root or classifier.config.get("data_root"),
                       classifier.config.get("limit_train"))  # the images the run was trained on
    estimator = CovarianceEstimator(classifier.model.feature_dim, classifier.num_classes, device=device,
                                    diagonal=classifier.config.get("covariance") == "diagonal")
    with torch.no_grad():
        for images, labels in tqdm(iterate_batches(train, batch_size, shuffle=False), desc="class statistics",
                                   total=-(-len(train) // batch_size), disable=not progress, leave=False):
            x = classifier.preprocess(images.to(device).float() / 255)
            estimator.update(classifier.model.features(x), labels.to(device))
    save_atomic({"checkpoint": key, "estimator": estimator.state_dict()}, cache)
    return estimator


def negative_target_floor(wanted: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """||min(a~, 0)|| / ||a~ - a|| per row, `(M, A)` → `(M,)`: a lower bound on the reached-shift error.

    Every architecture here takes its features as averages of ReLU outputs, so no image has a negative
    feature; a Gaussian a~ has some, and that part of the shift cannot be reached by any image.
    """
    return wanted.clamp(max=0).norm(dim=1) / shift.norm(dim=1).clamp_min(1e-12)


@dataclass
class AugmentationResult:
    """Everything one batch produced. Images are `(·, C, H, W)` in [0, 1] at the classifier's size."""

    originals: torch.Tensor          # (N, C, H, W)
    labels: torch.Tensor             # (N,)
    reconstructions: torch.Tensor    # (N, C, H, W)
    augmented: torch.Tensor          # (N, K, C, H, W)
    records: list[dict]              # per image, the report.json entry without file names
    seconds: dict


def _predict(classifier: Classifier | None, unit: torch.Tensor) -> list[int] | list[None]:
    if classifier is None:
        return [None] * len(unit)
    if unit.shape[-1] != classifier.image_size or unit.shape[1] != classifier.channels:
        raise IsdaVizError("the judge classifier takes images of another size or channel count than the classifier")
    with torch.no_grad():
        return classifier.model(classifier.preprocess(unit)).argmax(1).tolist()


def visualize_augmentations(classifier: Classifier, generator, images: torch.Tensor, labels: torch.Tensor,
                            strength: float, num_augmented: int, opts: InversionOptions, seed: int = 0,
                            judge: Classifier | None = None, data_root=None, progress: bool = True
                            ) -> AugmentationResult:
    """Step I, sampling and Step II for `images (N, C, H, W)` in [0, 1] (classifier size) with `labels (N,)`."""
    if strength < 0:
        raise IsdaVizError("--strength must be >= 0")
    if num_augmented < 1:
        raise IsdaVizError("--num-augmented must be >= 1")
    adapter = GeneratorAdapter(generator, classifier)
    device = next(classifier.model.parameters()).device
    n, r, k = len(images), opts.restarts, num_augmented
    rng = torch.Generator().manual_seed(seed)
    images, labels = images.to(device), labels.to(device)
    featurize = classifier.model.features
    timings = {}

    with torch.no_grad():
        x = classifier.preprocess(images)
        target = featurize(x)
        predicted = classifier.model.fc(target).argmax(1).tolist()
    gen_labels = labels if generator.conditional else None

    def renderer(y):
        return lambda z_hat: adapter(z_hat, y)

    def pixels(z, y):
        with torch.no_grad():
            return adapter.pixels(normalize_latent(z), y)

    # Step I: R restarts per image in one batch, keep the best objective.
    started = time.time()
    z0 = torch.randn(n * r, generator.latent_dim, generator=rng).to(device)
    y_rep = gen_labels.repeat_interleave(r) if gen_labels is not None else None
    step1 = invert_features(renderer(y_rep), featurize, target.repeat_interleave(r, 0), z0,
                            opts.reconstruct_iterations, opts.reconstruct_lr, opts,
                            pixel_target=x.repeat_interleave(r, 0), desc="step I: reconstruct", progress=progress)
    best = step1.objective.view(n, r).argmin(1) + torch.arange(n, device=device) * r
    z_star = step1.z[best]
    recon_unit = pixels(z_star, gen_labels)
    timings["reconstruct"] = time.time() - started

    # Sampling and Step II: N x K problems in one batch, each starting from its image's z*.
    started = time.time()
    statistics = class_statistics(classifier, data_root, progress=progress)
    wanted = sample_augmented_features(target, labels, statistics, strength, k, rng)    # (N, K, A)
    y_aug = gen_labels.repeat_interleave(k) if gen_labels is not None else None
    shift = (wanted - target[:, None]).reshape(n * k, -1)
    floor = negative_target_floor(wanted.reshape(n * k, -1), shift)
    step2 = invert_features(renderer(y_aug), featurize, wanted.reshape(n * k, -1), z_star.repeat_interleave(k, 0),
                            opts.augment_iterations, opts.augment_lr, opts, error_scale=shift,
                            desc="step II: augment", progress=progress)
    aug_unit = pixels(step2.z, y_aug).view(n, k, *recon_unit.shape[1:])
    timings["augment"] = time.time() - started

    recon_pred, recon_judge = _predict(classifier, recon_unit), _predict(judge, recon_unit)
    flat_aug = aug_unit.flatten(0, 1)
    aug_pred, aug_judge = _predict(classifier, flat_aug), _predict(judge, flat_aug)
    mse = (recon_unit - images).pow(2).flatten(1).mean(1)
    distance = (aug_unit - recon_unit[:, None]).pow(2).flatten(2).mean(2).sqrt()          # RMS, [0, 1] units
    recon_error = step1.feature_error[best]
    records = []
    for i in range(n):
        records.append({
            "label": int(labels[i]), "label_name": classifier.class_names[int(labels[i])],
            "predicted": predicted[i],
            "reconstruction": {"feature_error": float(recon_error[i]),
                               "psnr": float(10 * torch.log10(1 / mse[i].clamp_min(1e-12))),
                               "predicted": recon_pred[i], "judge_predicted": recon_judge[i]},
            "augmented": [{"reached_shift_error": float(step2.feature_error[i * k + j]),
                           "shift_norm": float(shift[i * k + j].norm()),
                           "negative_target_floor": float(floor[i * k + j]),
                           "predicted": aug_pred[i * k + j], "judge_predicted": aug_judge[i * k + j],
                           "pixel_distance": float(distance[i, j])} for j in range(k)],
        })
    return AugmentationResult(images.cpu(), labels.cpu(), recon_unit.cpu(), aug_unit.cpu(), records, timings)


def summarize(records: list[dict]) -> dict:
    """Medians and rates over a report's images: the figures the targets are stated in."""
    def median(values):
        values = sorted(values)
        return values[len(values) // 2] if values else None

    augmented = [a for r in records for a in r["augmented"]]
    judged = [a for a, r in ((a, r) for r in records for a in r["augmented"]) if a["judge_predicted"] is not None]
    return {
        "images": len(records),
        "step1_median_feature_error": median([r["reconstruction"]["feature_error"] for r in records]),
        "step1_median_psnr": median([r["reconstruction"]["psnr"] for r in records]),
        "reconstruction_true_label_rate": sum(r["reconstruction"]["predicted"] == r["label"] for r in records)
        / max(1, len(records)),
        "step2_median_reached_shift_error": median([a["reached_shift_error"] for a in augmented]),
        "step2_median_negative_target_floor": median([a["negative_target_floor"] for a in augmented]),
        "augmented_label_kept_rate": sum(a["predicted"] == r["label"] for r in records for a in r["augmented"])
        / max(1, len(augmented)),
        "augmented_judge_label_kept_rate": (sum(a["judge_predicted"] == r["label"] for r in records
                                                for a in r["augmented"] if a["judge_predicted"] is not None)
                                            / len(judged)) if judged else None,
        "median_pixel_distance_to_reconstruction": median([a["pixel_distance"] for a in augmented]),
    }


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary folder into place; an older output of ours is replaced whole."""
    if out.exists():
        if any(out.iterdir()) and not (out / "report.json").exists():
            shutil.rmtree(tmp)
            raise IsdaVizError(f"--out {out} holds files that are not an augment output; choose another --out")
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
        os.replace(out, old / "dir")
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def write_outputs(result: AugmentationResult, sources: list[str], class_names: list[str], folder: Path,
                  samples: torch.Tensor | None = None, cell: int = 84) -> dict:
    """PNGs per image, the figure `grid.png` and `report.json` into `folder`; returns the report."""
    from .figures import to_pil

    k = result.augmented.shape[1]
    report_images, rows, row_labels, captions = [], [], [], []
    for i, record in enumerate(result.records):
        stem = f"{i:03d}"
        to_pil(result.originals[i]).save(folder / f"{stem}_original.png")
        to_pil(result.reconstructions[i]).save(folder / f"{stem}_reconstruction.png")
        record = {"source": sources[i], **record}
        record["reconstruction"] = {"file": f"{stem}_reconstruction.png", **record["reconstruction"]}
        for j in range(k):
            name = f"{stem}_augmented_{j}.png"
            to_pil(result.augmented[i, j]).save(folder / name)
            record["augmented"][j] = {"file": name, **record["augmented"][j]}
        report_images.append(record)
        row = [result.originals[i], result.reconstructions[i], *result.augmented[i]]
        caption = ["", f"err {record['reconstruction']['feature_error']:.3f}",
                   *[class_names[a["predicted"]][:11] for a in record["augmented"]]]
        if samples is not None:
            row += list(samples[i])
            caption += [""] * len(samples[i])
        rows.append(row)
        captions.append(caption)
        row_labels.append(class_names[record["label"]])
    headers = ["original", "reconstr.", *[f"augmented {j + 1}" for j in range(k)]]
    if samples is not None:
        headers += [f"random {j + 1}" for j in range(samples.shape[1])]
    labelled_grid(rows, headers, row_labels, cell=cell, captions=captions).save(folder / "grid.png")
    report = {"images": report_images, "summary": summarize(report_images), "seconds": result.seconds}
    return report


def write_augment_dir(result: AugmentationResult, sources: list[str], class_names: list[str], out,
                      extra: dict | None = None, samples: torch.Tensor | None = None) -> dict:
    """Write OUT_DIR all at once: built in a temporary sibling folder, renamed into place when complete.
    Returns the report written as OUT_DIR/report.json."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp."))
    try:
        report = {**write_outputs(result, sources, class_names, tmp, samples), **(extra or {})}
        write_json_atomic(report, tmp / "report.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, out)
    return report


def _settings(strength, num_augmented, seed, opts: InversionOptions, classifier: Classifier, judge) -> dict:
    """What a report records of how it was made."""
    return {"strength": strength, "num_augmented": num_augmented, "seed": seed, "options": dict(opts.__dict__),
            "classifier": str(classifier.run_dir), "judge": str(judge.run_dir) if judge else None}


def parse_label(label: str | None, class_names: list[str]) -> int | None:
    """A class given by index or (case-insensitive) name; None stays None."""
    if label is None:
        return None
    if label.lstrip("-").isdigit():
        index = int(label)
        if 0 <= index < len(class_names):
            return index
    else:
        lowered = [c.lower() for c in class_names]
        if label.lower() in lowered:
            return lowered.index(label.lower())
    raise IsdaVizError(f"--label {label} is not a class of the classifier run; its classes are 0-{len(class_names) - 1}: "
                       + ", ".join(class_names[:20]) + ("…" if len(class_names) > 20 else ""))


def augment_images(image_paths: list, classifier: Classifier, generator, out, label: str | None = None,
                   num_augmented: int = 4, strength: float = 0.5, opts: InversionOptions | None = None,
                   seed: int = 0, judge: Classifier | None = None, progress: bool = True) -> Path:
    """`isda-viz augment`: invert and augment image files; writes OUT_DIR (grid.png, PNGs, report.json)."""
    opts = opts or InversionOptions()
    if not image_paths:
        raise IsdaVizError("give at least one --image")
    images = torch.stack([load_image_file(p, classifier.channels, classifier.image_size) for p in image_paths])
    fixed = parse_label(label, classifier.class_names)
    device = next(classifier.model.parameters()).device
    if fixed is None:
        with torch.no_grad():
            labels = classifier.model(classifier.preprocess(images.to(device))).argmax(1).cpu()
    else:
        labels = torch.full((len(images),), fixed)
    result = visualize_augmentations(classifier, generator, images, labels, strength, num_augmented, opts, seed,
                                     judge, progress=progress)
    extra = {"settings": _settings(strength, num_augmented, seed, opts, classifier, judge)}
    write_augment_dir(result, [str(p) for p in image_paths], classifier.class_names, out, extra)
    return Path(out)


def test_images_per_class(classifier: Classifier, per_class: int, classes: list[int] | None, data_root=None):
    """The first `per_class` test images of each class (all classes, or `classes`), `(N, C, H, W)` in [0, 1]."""
    test = load_split(classifier.dataset, False, data_root or classifier.config.get("data_root"))
    classes = list(range(classifier.num_classes)) if not classes else classes
    chosen = []
    for c in classes:
        index = torch.nonzero(test.labels == c).flatten()[:per_class].tolist()
        if not index:
            raise IsdaVizError(f"no test image of class {c} in {classifier.dataset}")
        chosen += index
    images = torch.stack([test[i][0] for i in chosen]).float() / 255
    return images, test.labels[chosen].clone(), [f"{classifier.dataset}:test[{i}]" for i in chosen]


def make_grid(classifier: Classifier, generator, out_png, per_class: int = 1, classes: list | None = None,
              num_augmented: int = 4, strength: float = 0.5, num_samples: int = 2,
              opts: InversionOptions | None = None, seed: int = 0, judge: Classifier | None = None,
              data_root=None, progress: bool = True) -> dict:
    """`isda-viz grid`: the paper's figure for test images; writes FIG.png, FIG.json and FIG_files/ PNGs.

    Rows: original | reconstruction | K augmented | random samples of the same class (class-conditional
    generators). Returns the report (also written as FIG.json, file paths relative to it).
    """
    opts = opts or InversionOptions()
    out_png = Path(out_png)
    if out_png.suffix.lower() != ".png":
        raise IsdaVizError(f"--out must name a .png file, not {out_png}")
    class_index = [parse_label(str(c), classifier.class_names) for c in classes] if classes else None
    images, labels, sources = test_images_per_class(classifier, per_class, class_index, data_root)
    result = visualize_augmentations(classifier, generator, images, labels, strength, num_augmented, opts, seed,
                                     judge, data_root, progress)
    samples = None
    if generator.conditional and num_samples > 0:
        rng = torch.Generator().manual_seed(seed + 1)
        z = torch.randn(len(labels) * num_samples, generator.latent_dim, generator=rng).to(generator.device)
        with torch.no_grad():
            y = labels.repeat_interleave(num_samples).to(generator.device)
            samples = GeneratorAdapter(generator, classifier).pixels(z, y).cpu().view(len(labels), num_samples,
                                                                            *images.shape[1:])
    files_dir = out_png.with_name(out_png.stem + "_files")
    extra = {"settings": _settings(strength, num_augmented, seed, opts, classifier, judge)}
    report = write_augment_dir(result, sources, classifier.class_names, files_dir, extra, samples)
    # The figure and its report beside it; the report's file paths are made relative to FIG.json.
    for record in report["images"]:
        record["reconstruction"]["file"] = f"{files_dir.name}/{record['reconstruction']['file']}"
        for a in record["augmented"]:
            a["file"] = f"{files_dir.name}/{a['file']}"
    write_json_atomic(report, out_png.with_suffix(".json"))
    shutil.copyfile(files_dir / "grid.png", out_png.with_suffix(".png.tmp"))
    os.replace(out_png.with_suffix(".png.tmp"), out_png)
    return report
