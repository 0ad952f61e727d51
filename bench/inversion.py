"""Inversion speed: our default schedule against the reference schedule, side by side on the same images.

    python bench/inversion.py [--classifier RUN_DIR] [--generator GAN_DIR] [--images 16] [--reference-cap 1500]

The reference (the paper's public code, CIFAR settings) runs plain gradient descent with momentum 0.9 on
MSE losses: Step I lr 10 for 10,000 iterations, Step II lr 1 for 10,000, both ÷10 every 2,500, one image per
run. Here both schedules run on the same 16 test images in one batch (Step I without restarts, so the
comparison is per start), the reference capped at --reference-cap iterations; when it has not reached our
final error by then, the iterations it would need are extrapolated from a power law fitted to the last
half of its error curve, and printed as such. Also prints images per minute of the full default pipeline
(Step I with restarts + Step II) for 16 images x 4 augmentations.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from isda_viz.adapter import GeneratorAdapter
from isda_viz.generators import load_generator
from isda_viz.inversion import InversionOptions, invert_features
from isda_viz.pretrained import default_classifier, default_generator
from isda_viz.runs import load_classifier
from isda_viz.visualize import test_images_per_class, visualize_augmentations


def first_reaching(history, error):
    """First logged iteration whose median error is <= error, or None."""
    for point in history:
        if point["median_feature_error"] <= error:
            return point["iteration"] + 1
    return None


def extrapolate(history, error):
    """Iterations for the median error to reach `error`, from a power law e(t) = a t^-b on the last half."""
    tail = [p for p in history[len(history) // 2:] if p["iteration"] > 0 and p["median_feature_error"] > 0]
    if len(tail) < 2:
        return None
    xs = [math.log(p["iteration"]) for p in tail]
    ys = [math.log(p["median_feature_error"]) for p in tail]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-12, sum((x - mx) ** 2 for x in xs))
    if slope >= 0:
        return math.inf  # not improving: never reaches it on this trend
    return math.exp(mx + (math.log(error) - my) / slope)


def run(render, featurize, target, z0, pixel, iterations, opts, lr):
    started = time.time()
    trace = invert_features(render, featurize, target, z0, iterations, opts, pixel_target=pixel, lr=lr,
                            desc=f"{opts.optimizer} lr {lr}", progress=True)
    return trace, time.time() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default=None)
    parser.add_argument("--generator", default=None)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--reference-cap", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    classifier = load_classifier(args.classifier or default_classifier())
    generator = load_generator(args.generator or default_generator(), "cpu")
    adapter = GeneratorAdapter(generator, classifier)
    per_class = -(-args.images // classifier.num_classes)
    images, labels, _ = test_images_per_class(classifier, per_class, None)
    images, labels = images[: args.images], labels[: args.images]
    x = classifier.preprocess(images)
    with torch.no_grad():
        target = classifier.model.features(x)
    y = labels if generator.conditional else None

    def render(z_hat):
        return adapter(z_hat, y)

    z0 = torch.randn(len(images), generator.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    ours_opts = InversionOptions()
    ours, ours_s = run(render, classifier.model.features, target, z0, x, ours_opts.reconstruct_iterations,
                       ours_opts, ours_opts.lr)
    ref_opts = InversionOptions(optimizer="sgd", momentum=0.9, schedule="step", step_every=2500, reduction="mean")
    reference, ref_s = run(render, classifier.model.features, target, z0, x, args.reference_cap, ref_opts, 10.0)

    goal = ours.history[-1]["median_feature_error"]
    ours_iters = first_reaching(ours.history, goal)
    ref_iters = first_reaching(reference.history, goal)
    how = "measured"
    if ref_iters is None:
        ref_iters, how = extrapolate(reference.history, goal), f"extrapolated past the {args.reference_cap} cap"
    ours_per_it = ours_s / ours_opts.reconstruct_iterations
    ref_per_it = ref_s / args.reference_cap
    print(f"\nStep I on {len(images)} test images, same starts; goal = our final median feature error {goal:.4f}")
    print(f"{'schedule':<34}{'iterations':>14}{'seconds':>12}{'final median err':>18}")
    print(f"{'ours (Adam, cosine, lr 0.05)':<34}{ours_iters:>14}{ours_per_it * ours_iters:>12.1f}{goal:>18.4f}")
    ref_final = reference.history[-1]["median_feature_error"]
    ref_iter_text = f"{ref_iters:.0f}" if math.isfinite(ref_iters) else "never"
    ref_sec = ref_per_it * ref_iters if math.isfinite(ref_iters) else math.inf
    print(f"{'reference (SGD m0.9, lr 10 step)':<34}{ref_iter_text:>14}{ref_sec:>12.1f}{ref_final:>18.4f}"
          f"   ({how}; its error after {args.reference_cap}: {ref_final:.4f})")
    if math.isfinite(ref_iters):
        print(f"iterations ratio reference/ours: {ref_iters / ours_iters:.1f}x (target >= 10x)")

    started = time.time()
    k = 4
    result = visualize_augmentations(classifier, generator, images, labels, 0.5, k, InversionOptions(), args.seed)
    minutes = (time.time() - started) / 60
    print(f"\nfull default pipeline, {len(images)} images x {k} augmentations: {minutes * 60:.1f} s, "
          f"{len(images) / minutes:.1f} images/min ({len(images) * k / minutes:.1f} augmented images/min)")
    from isda_viz.visualize import summarize

    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summarize(result.records).items()})


if __name__ == "__main__":
    main()
