"""The one inversion pipeline: a batch of images and their targets in, codes, pictures and numbers out.

`augment`, `grid`, `directions`, the semantic test and `explore` all call `invert_batch` (or its two halves,
`reconstruct_batch` and `augment_batch`, when one Step I serves many Step II calls): for images x
`(N, C, H, W)` with labels y and Step II targets ã `(N, M, A)` (augmentations, traversal frames, test
draws: anything in feature space),

    a = f(x);  Step I  z* from `source.step1_starts`, then `reconstruct` (Eq. 20);
               Step II z' from `source.step2_starts` (None: z*), then `augment` (Eq. 21);

then renders every code, measures it (feature error and PSNR of the reconstruction, reached-shift error and
its floor for each target) and has the classifier (and the judge) classify every picture. The `CodeSource`
(`inversion.starts`) is the one seam where a way of producing codes plugs in: the search from the prior,
the amortized inverter, a future one.

Rows are processed in micro-batches of whole images, at most `micro_batch` rows (codes) at a time per
forward pass (default `auto_micro_batch`: a budget of pixels through both networks), so a 1,000-class
BigGAN grid or a 10,000-target test never holds every row's graph at once; every row is an independent
problem, so the codes are those of one batch (to float tolerance: batched kernels may sum in another order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from isda_viz.inversion.adapter import Models
from isda_viz.inversion.optimizer import augment, normalize_latent, reconstruct
from isda_viz.inversion.starts import CodeSource

PIXEL_BUDGET = 1 << 22
"""Pixels (generator output + classifier input, per row) one micro-batch may push through the networks."""


@dataclass
class Reconstructed:
    """Step I's result for a batch (`reconstruct_batch`). Pictures are `(N, C, H, W)` in [0, 1] at the
    classifier's size; predictions are class indices (the judge's None without a judge)."""

    images: torch.Tensor              # (N, C, H, W) the originals
    labels: torch.Tensor              # (N,)
    features: torch.Tensor            # (N, A) a = f(x)
    predicted: list[int]              # the classifier's class of each original
    z_star: torch.Tensor              # (N, D) Step I's codes (raw; the generator sees normalize_latent(z))
    star_features: torch.Tensor       # (N, A) f(G(z*))
    reconstructions: torch.Tensor     # (N, C, H, W)
    feature_error: torch.Tensor       # (N,) ||f(G(z*)) - a|| / ||a||
    psnr: torch.Tensor                # (N,) dB, reconstruction against the original
    reconstruction_predicted: list[int]
    reconstruction_judged: list
    seconds: float


@dataclass
class Augmented:
    """Step II's result for a batch (`augment_batch`): per image its M targets' codes and pictures."""

    z: torch.Tensor                   # (N, M, D) Step II's codes
    pictures: torch.Tensor            # (N, M, C, H, W)
    reached_shift_error: torch.Tensor  # (N, M) ||f(G(z')) - a~|| / ||a~ - a||
    shift_norm: torch.Tensor          # (N, M) ||a~ - a||
    negative_target_floor: torch.Tensor  # (N, M)
    pictures_predicted: list[list[int]]  # (N, M)
    pictures_judged: list[list]
    seconds: float


@dataclass
class InvertedBatch(Reconstructed, Augmented):
    """`invert_batch`'s result: both steps' fields, and `seconds` {"step1": s, "step2": s}."""
    seconds: dict


def auto_micro_batch(models: Models) -> int:
    """Rows per forward pass: `PIXEL_BUDGET` over the pixels one row puts through the generator and classifier."""
    g, c = models.generator, models.classifier
    per_row = g.channels * g.image_size ** 2 + c.channels * c.image_size ** 2
    return max(1, PIXEL_BUDGET // per_row)


def draw_prior(models: Models, n: int, restarts: int, rng: torch.Generator) -> torch.Tensor:
    """`(n, restarts, D)` codes from the generator's prior, drawn from `rng` first (whichever source inverts,
    so the draws after them, e.g. ã, are the same for a seed)."""
    generator = models.generator
    return generator.sample_latent(n * restarts, rng, models.classifier.device).view(n, restarts, generator.latent_dim)


def _chunks(n: int, rows_per_item: int, micro_batch: int) -> list[slice]:
    """Slices of `n` items, each of at most `micro_batch` rows (at least one item)."""
    per = max(1, micro_batch // max(1, rows_per_item))
    return [slice(i, min(n, i + per)) for i in range(0, n, per)]


def invert_batch(models: Models, images: torch.Tensor, labels: torch.Tensor, wanted: torch.Tensor,
                 source: CodeSource, prior: torch.Tensor, *, micro_batch: int | None = None,
                 progress: bool = True) -> InvertedBatch:
    """Step I and Step II for `images (N, C, H, W)` in [0, 1] (classifier size), `labels (N,)`, targets
    `wanted (N, M, A)`, starting where `source` says; `prior (N, R, D)` from `draw_prior`."""
    step1 = reconstruct_batch(models, images, labels, source, prior, micro_batch=micro_batch, progress=progress)
    step2 = augment_batch(models, step1, wanted, source, micro_batch=micro_batch, progress=progress)
    fields = {**vars(step1), **vars(step2), "seconds": {"step1": round(step1.seconds, 3),
                                                        "step2": round(step2.seconds, 3)}}
    return InvertedBatch(**fields)


class _Networks:
    """The pair as the optimiser and the sources see it: `render(ẑ, labels)` → classifier input, and
    `render_features` → (input, features); labels are the classifier's (dropped for unconditional generators)."""

    def __init__(self, models: Models):
        self.adapter, self.classifier = models.adapter(), models.classifier
        self.conditional = models.generator.conditional

    def render(self, z_hat, rows_labels):
        return self.adapter(z_hat, rows_labels if self.conditional else None)

    def render_features(self, z_hat, rows_labels):
        image = self.render(z_hat, rows_labels)
        return image, self.classifier.model.features(image)


def reconstruct_batch(models: Models, images: torch.Tensor, labels: torch.Tensor, source: CodeSource,
                      prior: torch.Tensor, *, micro_batch: int | None = None, progress: bool = True) -> Reconstructed:
    """Step I (Eq. 20) for `images (N, C, H, W)` in [0, 1] with `labels (N,)`, from `source.step1_starts`."""
    classifier, judge, device = models.classifier, models.judge, models.classifier.device
    images, labels = images.to(device), labels.to(device)
    micro_batch = micro_batch or auto_micro_batch(models)
    networks = _Networks(models)
    features = classifier.features(images)
    with torch.no_grad():
        predicted = classifier.model.fc(features).argmax(1).tolist()
    started = time.time()
    parts = [_step1(models, networks, source, images[part], labels[part], features[part], prior[part], progress)
             for part in _chunks(len(images), max(prior.shape[1], 1), micro_batch)]
    z_star, star_features, feature_error = (torch.cat([p[i] for p in parts]) for i in range(3))
    reconstructions = _pixels(networks.adapter, z_star, labels if networks.conditional else None, micro_batch)
    mse = (reconstructions - images).pow(2).flatten(1).mean(1)
    seconds = time.time() - started
    return Reconstructed(
        images=images, labels=labels, features=features, predicted=predicted, z_star=z_star,
        star_features=star_features, reconstructions=reconstructions.cpu(), feature_error=feature_error.cpu(),
        psnr=(10 * torch.log10(1 / mse.clamp_min(1e-12))).cpu(),
        reconstruction_predicted=_classes(classifier, reconstructions, micro_batch),
        reconstruction_judged=_classes(judge, reconstructions, micro_batch), seconds=seconds)


def augment_batch(models: Models, step1: Reconstructed, wanted: torch.Tensor, source: CodeSource, *,
                  micro_batch: int | None = None, progress: bool = True) -> Augmented:
    """Step II (Eq. 21) for targets `wanted (N, M, A)` of `step1`'s images, from `source.step2_starts`
    (e.g. every slider position of `explore` after one Step I)."""
    classifier, judge = models.classifier, models.judge
    wanted = wanted.to(step1.features)
    micro_batch = micro_batch or auto_micro_batch(models)
    networks = _Networks(models)
    n, m = wanted.shape[:2]
    started = time.time()
    parts = [_step2(models, networks, source, step1.features[part], step1.labels[part], wanted[part],
                    step1.z_star[part], step1.star_features[part], progress) for part in _chunks(n, m, micro_batch)]
    z, reached, floor, shift = (torch.cat([p[i] for p in parts]) for i in range(4))
    rows_labels = step1.labels.repeat_interleave(m) if networks.conditional else None
    pictures = _pixels(networks.adapter, z.flatten(0, 1), rows_labels, micro_batch)
    seconds = time.time() - started
    flat_predicted, flat_judged = _classes(classifier, pictures, micro_batch), _classes(judge, pictures, micro_batch)
    return Augmented(
        z=z, pictures=pictures.view(n, m, *pictures.shape[1:]).cpu(), reached_shift_error=reached.cpu(),
        shift_norm=shift.cpu(), negative_target_floor=floor.cpu(),
        pictures_predicted=[flat_predicted[i * m:(i + 1) * m] for i in range(n)],
        pictures_judged=[flat_judged[i * m:(i + 1) * m] for i in range(n)], seconds=seconds)


def _step1(models: Models, networks: _Networks, source: CodeSource, images, labels, features, prior, progress):
    """Step I for one micro-batch: `(z* (n, D), its features (n, A), feature error (n,))`."""
    classifier = models.classifier
    pixels = classifier.preprocess(images)
    starts = source.step1_starts(networks.render_features, features, labels, prior, pixels)
    result = reconstruct(lambda z_hat, owner: networks.render(z_hat, labels[owner]), classifier.model.features,
                         features, starts, source.refinement, pixel_target=pixels, progress=progress)
    return result.z, result.features, result.feature_error


def _step2(models: Models, networks: _Networks, source: CodeSource, features, labels, wanted, z_star, star_features,
           progress):
    """Step II for one micro-batch: `(z' (n, M, D), reached-shift error, floor, shift norm (n, M))`."""
    starts = source.step2_starts(networks.render_features, wanted, labels, z_star, star_features)
    result = augment(lambda z_hat, owner: networks.render(z_hat, labels[owner]), models.classifier.model.features,
                     features, wanted, z_star, source.refinement, progress=progress, starts=starts)
    return result.z, result.reached_shift_error, result.negative_target_floor, result.shift_norm


@torch.no_grad()
def _pixels(adapter, z: torch.Tensor, labels: torch.Tensor | None, micro_batch: int) -> torch.Tensor:
    """Codes `(M, D)` → pictures `(M, C, H, W)` in [0, 1] as the classifier sees them."""
    parts = [adapter.pixels(normalize_latent(z[i:i + micro_batch]), None if labels is None else
                            labels[i:i + micro_batch]) for i in range(0, len(z), micro_batch)]
    return torch.cat(parts)


def _classes(model, pictures: torch.Tensor, micro_batch: int) -> list:
    """The classes `model` gives pictures `(M, C, H, W)`, or Nones without a model."""
    if model is None:
        return [None] * len(pictures)
    return torch.cat([model.predict(pictures[i:i + micro_batch]) for i in range(0, len(pictures), micro_batch)]).tolist()
