"""The directions traversal against `augment`, per image made, and the feature-space semantic test across λ.

    python bench/directions.py [--iterations N] [--restarts R] [--repeats 1] [--per-class 50] [--draws 200] [--smoke]

1. Speed, side by side in one run on the same 10 test images (one per class) of the shipped weights:
   `invert_and_augment` (augment/grid: Step I, then 4 augmented images per image) against
   `traverse_directions` (directions: Step I, then 10 classes x 5 directions x 7 steps = 350 frames, the
   t = 0 frame shared by an image's directions, so 310 Step II problems), each from Step I to pixels and
   predictions, alternated --repeats times (the fastest of each kept). Printed: frames per minute against
   augmented images per minute, and their ratio.
2. The semantic test in feature space for --per-class test images of every class at several λ: the
   share of a + eps the last layer keeps in the class, eps from ISDA's N(0, λΣ_y), isotropic noise and
   another class's covariance at the same expected squared norm, with 95% Wilson intervals.
3. The same test in pixels, at scale (`--pixel-draws`, default 20 per image and noise, λ = 0.5, 2, 8): each
   test image's Step I once, then every a + eps of the three noises inverted by the pair's amortized
   inverter (`--refine-steps`, default 0: the inverter alone) through `augment_batch`, judged by the shipped
   CE judge; beside it the feature-space rate of exactly those draws.
"""

from __future__ import annotations

import argparse
import time

import torch

from isda_viz.classifiers.classifier import load_classifier
from isda_viz.classifiers.statistics import class_statistics
from isda_viz.generators import load_generator
from isda_viz.inversion.directions import DirectionsOptions, traverse_directions
from isda_viz.inversion.optimizer import InversionOptions
from isda_viz.inversion.inverter_cache import find_inverter
from isda_viz.inversion.pipeline import augment_batch, draw_prior, reconstruct_batch
from isda_viz.inversion.pipelines import Models, VisualizeOptions, invert_and_augment, images_per_class
from isda_viz.inversion.starts import AmortizedStart
from isda_viz.isda.directions import (NOISES, binomial_interval, class_directions, isda_noise, isotropic_noise,
                                      kept_class, other_class_noise, pick_other_classes)
from isda_viz.pretrained import default_classifier, default_generator, default_judge


def speed(models: Models, inversion: InversionOptions, k: int = 4, directions: int = 5, steps: int = 7,
          repeats: int = 1):
    """Seconds of each pipeline, alternating `repeats` times (the fastest of each is kept: load on a shared
    machine only ever slows a run down)."""
    classifier = models.classifier
    images, labels, sources = images_per_class(classifier, 1, None)
    options = VisualizeOptions(num_augmented=k, inversion=inversion, progress=False, inverter="search")
    statistics = class_statistics(classifier, progress=False)
    tops = {c: class_directions(statistics.covariance(c), directions) for c in range(classifier.num_classes)}
    augment_s = directions_s = float("inf")
    for _ in range(repeats):
        started = time.time()
        invert_and_augment(models, images, labels, sources, options)
        augment_s = min(augment_s, time.time() - started)
        started = time.time()
        traverse_directions(models, images, labels, sources, tops, None,
                            DirectionsOptions(visualize=options, directions=directions, steps=steps))
        directions_s = min(directions_s, time.time() - started)
    made_augment, made_frames = len(images) * k, len(images) * directions * steps
    per_min_augment, per_min_frames = made_augment / augment_s * 60, made_frames / directions_s * 60
    print(f"\nspeed, shipped weights, Step I {inversion.reconstruct_iterations} x {inversion.restarts} starts, "
          f"Step II {inversion.augment_iterations} iterations, measured side by side in this run:")
    print(f"  augment:    {made_augment:4d} augmented images in {augment_s:6.1f} s = {per_min_augment:8.1f} per minute")
    print(f"  directions: {made_frames:4d} frames           in {directions_s:6.1f} s = {per_min_frames:8.1f} per minute")
    print(f"  frames per minute / augmented images per minute = {per_min_frames / per_min_augment:.2f}")


def _noises(classifier, labels, estimator, strength: float, draws: int, seed: int) -> dict:
    """The three noises of the semantic test for `labels`, `(N, draws, A)` each, drawn from one generator seeded
    with `seed` in a fixed order (so the feature and pixel sweeps test the same draws)."""
    g = torch.Generator().manual_seed(seed)
    others = pick_other_classes(labels, classifier.num_classes, g)
    return {"isda": isda_noise(labels, estimator, strength, draws, g),
            "isotropic": isotropic_noise(labels, estimator, strength, draws, g),
            "other_class": other_class_noise(labels, others, estimator, strength, draws, g)}


def _rate(kept: int, total: int) -> str:
    """`kept / total` and its 95% interval, as the tables print them."""
    low, high = binomial_interval(kept, total)
    return f"{kept / total:.3f} [{low:.3f}, {high:.3f}]"


def semantic_sweep(classifier, per_class: int, draws: int, strengths: list[float], seed: int = 0):
    images, labels, _ = images_per_class(classifier, per_class, None)
    features = classifier.features(images)
    estimator = class_statistics(classifier, progress=False).estimator
    with torch.no_grad():
        clean = int((classifier.model.fc(features).argmax(1) == labels).sum())
    print(f"\nsemantic test in feature space: {len(labels)} test images ({per_class} per class, {clean} classified "
          f"correctly without noise), {draws} draws per image and noise; class kept, rate [95% interval]")
    print(f"  {'lambda':>7}" + "".join(f"{noise:>26}" for noise in NOISES))
    for strength in strengths:
        noises = _noises(classifier, labels, estimator, strength, draws, seed)
        cells = []
        for noise in NOISES:
            kept, total = int(kept_class(classifier.model.fc, features, labels, noises[noise]).sum()), len(labels) * draws
            cells.append(_rate(kept, total))
        print(f"  {strength:>7g}" + "".join(f"{c:>26}" for c in cells))


def pixel_sweep(models: Models, per_class: int, draws: int, strengths: list[float], refine_steps: int = 0,
                seed: int = 0):
    """The semantic test in pixels: each image's a + eps inverted (the amortized inverter, `refine_steps` more)
    and judged, per noise and λ, beside the last layer's verdict on the same a + eps."""
    classifier, judge = models.classifier, models.judge
    inverter = find_inverter(models)
    if inverter is None:
        raise SystemExit("the pixel-space test needs the pair's amortized inverter (isda-viz train-inverter)")
    source = AmortizedStart(inverter, refine_steps)
    images, labels, _ = images_per_class(classifier, per_class, None)
    estimator = class_statistics(classifier, progress=False).estimator
    started = time.time()
    step1 = reconstruct_batch(models, images, labels, source, draw_prior(models, len(images), 1,
                              torch.Generator().manual_seed(seed)), progress=False)
    print(f"\nsemantic test in pixels: {len(labels)} test images, {draws} draws per image and noise, inverted by "
          f"the amortized inverter + {refine_steps} refine steps, judged by {judge.source.name}; class kept, rate "
          f"[95% interval]; feature space on the same draws in brackets after it (Step I {time.time() - started:.0f} s)")
    print(f"  {'lambda':>7}" + "".join(f"{noise + ' (pixels | features)':>48}" for noise in NOISES))
    for strength in strengths:
        noises = _noises(classifier, labels, estimator, strength, draws, seed)
        wanted = torch.cat([step1.features[:, None] + noises[noise].to(step1.features) for noise in NOISES], 1)
        started = time.time()
        step2 = augment_batch(models, step1, wanted, source, progress=False)
        judged = torch.tensor(step2.pictures_judged).view(len(labels), len(NOISES), draws)
        cells = []
        for index, noise in enumerate(NOISES):
            pixels = int((judged[:, index] == labels[:, None]).sum())
            features = int(kept_class(classifier.model.fc, step1.features, labels, noises[noise]).sum())
            total = len(labels) * draws
            cells.append(f"{_rate(pixels, total)} | {features / total:.3f}")
        print(f"  {strength:>7g}" + "".join(f"{c:>48}" for c in cells) + f"   ({time.time() - started:.0f} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=None, help="Step I iterations (Step II 3/2 as many)")
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two pipelines this many times")
    parser.add_argument("--pixel-draws", type=int, default=20, help="pixel-space test: draws per image and noise")
    parser.add_argument("--refine-steps", type=int, default=0, help="pixel-space test: steps after the inverter")
    parser.add_argument("--pixels-only", action="store_true", help="only the pixel-space test")
    parser.add_argument("--pixel-strengths", type=lambda text: [float(v) for v in text.split(",")],
                        default=[0.5, 2, 8], help="pixel-space test: the values of lambda, comma-separated")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.iterations, args.restarts, args.per_class, args.draws, args.pixel_draws = 2, 1, 2, 20, 2
    classifier = load_classifier(default_classifier())
    models = Models(classifier, load_generator(str(default_generator()), "cpu"), load_classifier(default_judge()))
    if not args.pixels_only:
        speed(models, InversionOptions.make(iterations=args.iterations, restarts=args.restarts), repeats=args.repeats)
        semantic_sweep(classifier, args.per_class, args.draws, [0.5, 2, 8, 32, 128])
    pixel_sweep(models, args.per_class, args.pixel_draws, args.pixel_strengths, args.refine_steps)


if __name__ == "__main__":
    main()
