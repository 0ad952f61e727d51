"""Inversion speed and reach: our defaults against the reference schedule, side by side on the same images.

    python bench/inversion.py [--classifier RUN_DIR] [--generator GAN_DIR] [--images 16] [--reference-cap 3000]
    python bench/inversion.py --compare-only --images 10      # today's defaults vs the new ones (the demo's workload)
    python bench/inversion.py --device cuda --images 16       # the same for BigGAN-deep-128 + ResNet-50 (random weights)

`--compare-only` (`compare_defaults`): today's defaults (4 random starts, 200 + 300 steps) against the new
ones (the learned start of `isda_viz.inversion.encoder`, early stopping), side by side in one run on the
same images and the same a~ draws (those today's pipeline draws for the seed): augmented images per minute
(the encoder's one-off training or cache read is printed apart), median Step I feature error, median Step II
reached-shift error, its floor, and the free-pixel bound on the same targets from each setting's
reconstructions. `--device cuda` builds BigGAN-deep-128 (its published config) and torchvision ResNet-50,
both with random weights (none can be downloaded here; enough for timing, not for the errors), and prints
the same table without the free-pixel bound.

The reference (the paper's public code, CIFAR settings) runs plain gradient descent with momentum 0.9 on
MSE losses: Step I lr 10 for 10,000 iterations, Step II lr 1 for 10,000, both ÷10 every 2,500, one image
per run. Here both schedules run Step I on the same test images in one batch from the same starts (one
start per image, so the comparison is per start), the reference capped at --reference-cap iterations.

Two reference runs:
* "same objective": the reference schedule on exactly our objective. Its MSE means divide the feature term
  by A and the pixel term by P, so eta is scaled by P/A to keep our feature/pixel balance; the objective is
  then ours divided by A, the scale the reference's lr 10 was chosen for. This isolates optimiser and schedule.
* "its own weighting": MSE means with eta 1, the reference's balance, which weighs features P/A times more
  than ours, so its optimum has a lower feature error than ours (a different trade-off, not a faster search).

Goal: the median feature error our defaults end at. The reference's iterations to reach it are measured
when it gets there within the cap; otherwise the cap is printed as a lower bound ("> cap") beside a
power-law extrapolation of the last half of its curve, labelled as such.

Step II's reach is printed against two bounds: the non-negativity floor (the negative part of a~, which
no image's post-ReLU features reach) and free pixels (Adam on every pixel of the reconstruction, no
generator). Last, images per minute of the full default pipeline for 16 images x 4 augmentations.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from isda_viz.inversion.adapter import GeneratorAdapter
from isda_viz.classifiers.statistics import class_statistics
from isda_viz.classifiers.classifier import load_classifier
from isda_viz.generators import load_generator
from isda_viz.inversion.optimizer import InversionOptions, invert_features, negative_target_floor, normalize_latent
from isda_viz.isda.sampling import sample_augmented_features
from isda_viz.pretrained import default_classifier, default_generator
from isda_viz.outputs.report import summarize
from isda_viz.inversion.pipelines import Models, VisualizeOptions, images_per_class, invert_and_augment, learned_start


def first_reaching(history, error):
    """Fewest logged updates (history is logged every 10) after which the median error is <= error, or None."""
    for point in history:
        if point["median_feature_error"] <= error:
            return max(1, point["iteration"])
    return None


def extrapolate(history, error):
    """Iterations for the median error to reach `error`, from a power law e(t) = a t^-b on the last half."""
    tail = [p for p in history[len(history) // 2:] if p["iteration"] > 0 and p["median_feature_error"] > 0]
    if len(tail) < 2:
        return math.inf
    xs = [math.log(p["iteration"]) for p in tail]
    ys = [math.log(p["median_feature_error"]) for p in tail]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-12, sum((x - mx) ** 2 for x in xs))
    if slope >= 0:
        return math.inf  # not improving: never reaches it on this trend
    return math.exp(mx + (math.log(error) - my) / slope)


def timed(fn):
    started = time.time()
    out = fn()
    return out, time.time() - started


def free_pixel_reach(classifier, start_pixels, wanted, shift, iterations, lr=0.05):
    """Median ||f(x) - a~|| / ||a~ - a|| after Adam on the pixels themselves (sigmoid-parametrised in [0, 1])."""
    logits = torch.logit(start_pixels.clamp(1e-3, 1 - 1e-3)).requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    for _ in range(iterations):
        loss = (classifier.model.features(classifier.preprocess(torch.sigmoid(logits))) - wanted).pow(2).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        reached = classifier.model.features(classifier.preprocess(torch.sigmoid(logits)))
    return ((reached - wanted).norm(dim=1) / shift.norm(dim=1)).median().item()


def today_draws(models, images, labels, seed, k, strength, restarts=4):
    """The a~ `(N, K, A)` today's pipeline draws (its rng gives the N·restarts starts first), so that every
    setting compared inverts the same targets."""
    rng = torch.Generator().manual_seed(seed)
    classifier = models.classifier
    models.generator.sample_latent(len(images) * restarts, rng, classifier.device)
    statistics = class_statistics(classifier, classes=labels.tolist())
    target = classifier.features(images.to(classifier.device))
    return sample_augmented_features(target, statistics.slots(labels), statistics.estimator, strength, k, rng)


def compare_defaults(models, images, labels, k=4, seed=0, settings=None, free_pixels=True):
    """Today's defaults against the new ones (learned start, fewer steps, early stopping), side by side on the
    same images and a~ draws: augmented images per minute, median Step I feature error, median Step II
    reached-shift error, its floor and (`free_pixels`) the free-pixel bound on the same targets."""
    settings = settings or {"today (random starts, 4 x 200 + 300 steps)": InversionOptions.make(encoder=False),
                            "new defaults (learned start, early stopping)": InversionOptions.make(encoder=True)}
    wanted = today_draws(models, images, labels, seed, k, 0.5)
    encoder_seconds = None
    if any("encoder" in (o.start, o.augment_start) for o in settings.values()):
        started = time.time()
        _, info = learned_start(models)
        encoder_seconds = time.time() - started
        print(f"learned start: {'read from the cache' if info['cached'] else 'trained'} in {encoder_seconds:.1f} s "
              f"({info['path'] or 'not cached'}); once per (classifier, generator) pair, not counted below")
    rows = []
    for name, opts in settings.items():
        started = time.time()
        result = invert_and_augment(models, images, labels, [""] * len(images),
                                    VisualizeOptions(strength=0.5, num_augmented=k, seed=seed, inversion=opts),
                                    wanted=wanted)
        seconds = time.time() - started - result.seconds.get("encoder_training", 0.0)
        rows.append((name, seconds, summarize(result.entries), result))
    base = rows[0][1]
    print(f"\n{len(images)} images x {k} augmentations, the same a~ for every row")
    print(f"{'setting':<48}{'seconds':>9}{'aug img/min':>13}{'speed':>8}{'step I err':>12}{'step II err':>13}"
          f"{'floor':>8}")
    for name, seconds, s, _ in rows:
        print(f"{name:<48}{seconds:>9.1f}{len(images) * k / seconds * 60:>13.1f}{base / seconds:>7.2f}x"
              f"{s.step1_median_feature_error:>12.4f}{s.step2_median_reached_shift_error:>13.4f}"
              f"{s.step2_median_negative_target_floor:>8.3f}")
    if free_pixels:
        classifier = models.classifier
        flat = wanted.flatten(0, 1).to(classifier.device).float()
        shift = flat - classifier.features(images.to(classifier.device)).repeat_interleave(k, 0)
        for name, _, _, result in rows:
            start = result.reconstructions.to(classifier.device).repeat_interleave(k, 0)
            free = free_pixel_reach(classifier, start, flat, shift, InversionOptions().augment_iterations)
            print(f"free-pixel bound (300 Adam steps on every pixel, from the reconstructions of {name}): {free:.4f}")
    return rows


def gpu_models(device):
    """BigGAN-deep-128 (its published config, random weights) and torchvision ResNet-50 (random weights), for
    timing on a GPU: no weights can be downloaded here."""
    import torchvision
    from pytorch_pretrained_biggan import BigGAN, BigGANConfig

    from isda_viz.classifiers.classifier import Classifier
    from isda_viz.classifiers.foreign import TorchvisionClassifier
    from isda_viz.generators.biggan import BigGANGenerator
    from isda_viz.isda.estimator import CovarianceEstimator

    from pytorch_pretrained_biggan.model import BigGANBatchNorm

    torch.manual_seed(0)
    model = BigGAN(BigGANConfig()).eval()       # the default config is BigGAN-deep-128's
    with torch.no_grad():  # random weights: unit batch-norm statistics overflow, so calibrate them once
        model.generator.bn.weight.fill_(1.0)
        model.generator.bn.bias.zero_()

    def calibrate(module, inputs):
        module.running_means.copy_(inputs[0].mean(dim=(0, 2, 3)).expand_as(module.running_means))
        module.running_vars.copy_(inputs[0].var(dim=(0, 2, 3)).expand_as(module.running_vars))

    model = model.to(device)
    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, BigGANBatchNorm)]
    with torch.no_grad():
        z = (torch.randn(16, 128).clamp(-2, 2) * 0.5).to(device)
        model(z, torch.nn.functional.one_hot(torch.arange(16) * 61, 1000).float().to(device), 0.5)
    for hook in hooks:
        hook.remove()
    generator = BigGANGenerator(model, 0.5, "biggan-deep-128 (random weights)").to(device).freeze()
    net = TorchvisionClassifier(torchvision.models.resnet50(weights=None), "resnet50")
    classifier = Classifier(net.to(device).eval().requires_grad_(False), [str(i) for i in range(1000)],
                            list(net.mean), list(net.std), 3, net.input_size, config={"arch": "torchvision:resnet50"},
                            source="torchvision:resnet50 (random weights)", cache_dir=None, fingerprint=None)
    with torch.no_grad():  # class statistics of random features: enough to draw a~ for timing
        labels = torch.arange(10)
        feats = classifier.model.features(GeneratorAdapter(generator, classifier)(
            generator.sample_latent(40, torch.Generator().manual_seed(1)), labels.repeat(4).to(device)))
    estimator = CovarianceEstimator(feats.shape[1], 1000, diagonal=True)
    estimator.update(feats.cpu(), labels.repeat(4))
    classifier.estimator = estimator.to(device)
    return Models(classifier, generator)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default=None)
    parser.add_argument("--generator", default=None)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--reference-cap", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-only", action="store_true",
                        help="Only today's defaults vs the new ones (the demo's workload with --images 10).")
    parser.add_argument("--device", default="cpu",
                        help="cuda: BigGAN-deep-128 + ResNet-50 with random weights, today's vs the new defaults.")
    args = parser.parse_args()
    if args.device != "cpu":
        models = gpu_models(args.device)
        labels = torch.arange(args.images) % 10    # the classes gpu_models has statistics for
        with torch.no_grad():  # generator images stand in for test images
            images = GeneratorAdapter(models.generator, models.classifier).pixels(
                models.generator.sample_latent(args.images, torch.Generator().manual_seed(2)), labels.to(args.device))
        compare_defaults(models, images, labels, seed=args.seed, free_pixels=False)
        return
    classifier = load_classifier(args.classifier or default_classifier())
    if args.compare_only:
        generator = load_generator(args.generator or default_generator(), "cpu")
        images, labels, _ = images_per_class(classifier, -(-args.images // classifier.num_classes), None)
        compare_defaults(Models(classifier, generator), images[: args.images], labels[: args.images], seed=args.seed)
        return
    generator = load_generator(args.generator or default_generator(), "cpu")
    adapter = GeneratorAdapter(generator, classifier)
    per_class = -(-args.images // classifier.num_classes)
    images, labels, _ = images_per_class(classifier, per_class, None)
    images, labels = images[: args.images], labels[: args.images]
    x = classifier.preprocess(images)
    featurize = classifier.model.features
    with torch.no_grad():
        target = featurize(x)
    y = labels if generator.conditional else None
    z0 = generator.sample_latent(len(images), torch.Generator().manual_seed(args.seed))

    def step1(iterations, lr, opts, desc):
        return timed(lambda: invert_features(lambda z_hat: adapter(z_hat, y), featurize, target, z0, iterations, lr,
                                             opts, pixel_target=x, desc=desc))

    ours_opts = InversionOptions()
    ours, ours_s = step1(ours_opts.reconstruct_iterations, ours_opts.reconstruct_lr, ours_opts, "ours")
    a, p = target.shape[1], x[0].numel()
    rows = {
        "reference, same objective": InversionOptions(optimizer="sgd", momentum=0.9, schedule="step",
                                                      step_every=2500, reduction="mean", eta=ours_opts.eta * p / a),
        "reference, its own weighting": InversionOptions(optimizer="sgd", momentum=0.9, schedule="step",
                                                         step_every=2500, reduction="mean", eta=ours_opts.eta),
    }
    runs = {name: step1(args.reference_cap, 10.0, opts, name) for name, opts in rows.items()}

    goal = ours.feature_error.median().item()
    ours_iters = first_reaching(ours.history, goal) or ours_opts.reconstruct_iterations
    print(f"\nStep I on {len(images)} test images, same starts, one per image; goal = our final median feature "
          f"error {goal:.4f}")
    print(f"{'schedule':<40}{'iterations':>12}{'seconds':>10}{'ratio':>10}{'final err':>11}")
    ours_per_it = ours_s / ours_opts.reconstruct_iterations
    name = f"ours (Adam, cosine, lr {ours_opts.reconstruct_lr})"
    print(f"{name:<40}{ours_iters:>12}{ours_per_it * ours_iters:>10.1f}{'1.0x':>10}{goal:>11.4f}")
    for name, (trace, seconds) in runs.items():
        per_it = seconds / args.reference_cap
        final = trace.feature_error.median().item()
        reached = first_reaching(trace.history, goal)
        if reached is not None:
            print(f"{name:<40}{reached:>12}{per_it * reached:>10.1f}{reached / ours_iters:>9.1f}x{final:>11.4f}"
                  "   (measured)")
        else:
            guess = extrapolate(trace.history, goal)
            guess_text = f"power law says {guess:.0f}" if math.isfinite(guess) else "its trend never gets there"
            cap = args.reference_cap
            print(f"{name:<40}{f'> {cap}':>12}{f'> {per_it * cap:.0f}':>10}{f'> {cap / ours_iters:.1f}x':>10}"
                  f"{final:>11.4f}   (not reached within the cap; {guess_text})")
    print("errors along the way (median feature error after N iterations):")
    marks = [10, 50, 100, 300, 1000, 2000, args.reference_cap]
    totals = {"ours": ours_opts.reconstruct_iterations, **{n: args.reference_cap for n in runs}}
    for name, trace in [("ours", ours)] + [(n, t) for n, (t, _) in runs.items()]:
        by_iteration = {h["iteration"]: h["median_feature_error"] for h in trace.history}
        by_iteration[totals[name]] = trace.feature_error.median().item()
        cells = [f"{m}: {by_iteration[m]:.4f}" for m in marks if m in by_iteration]
        print(f"  {name:<32}" + "  ".join(cells))

    # Step II from our reconstructions, against what any image could reach.
    rng = torch.Generator().manual_seed(args.seed)
    k = 4
    statistics = class_statistics(classifier, classes=labels.tolist())
    wanted = sample_augmented_features(target, statistics.slots(labels), statistics.estimator, 0.5, k,
                                       rng).flatten(0, 1)
    shift = wanted - target.repeat_interleave(k, 0)
    y_aug = y.repeat_interleave(k) if y is not None else None
    step2, step2_s = timed(lambda: invert_features(lambda z_hat: adapter(z_hat, y_aug), featurize, wanted,
                                                   ours.z.repeat_interleave(k, 0), ours_opts.augment_iterations,
                                                   ours_opts.augment_lr, ours_opts, error_scale=shift, desc="step II"))
    with torch.no_grad():
        reconstructions = adapter.pixels(normalize_latent(ours.z), y).repeat_interleave(k, 0)
    free = free_pixel_reach(classifier, reconstructions, wanted, shift, ours_opts.augment_iterations)
    print(f"\nStep II at lambda 0.5, {len(wanted)} targets, median reached-shift error ||f - a~|| / ||a~ - a||:")
    print(f"  ours through the generator ({ours_opts.augment_iterations} iterations, {step2_s:.1f} s): "
          f"{step2.feature_error.median().item():.3f}")
    print(f"  free pixels, no generator ({ours_opts.augment_iterations} Adam steps on every pixel): {free:.3f}")
    print(f"  non-negativity floor, any image at all: {negative_target_floor(wanted, shift).median().item():.3f}"
          f"   ({(wanted < 0).float().mean().item():.1%} of target dimensions are negative)")

    started = time.time()
    result = invert_and_augment(Models(classifier, generator), images, labels, [""] * len(images),
                                VisualizeOptions(strength=0.5, num_augmented=k, seed=args.seed))
    minutes = (time.time() - started) / 60
    print(f"\nfull default pipeline, {len(images)} images x {k} augmentations: {minutes * 60:.1f} s, "
          f"{len(images) / minutes:.1f} images/min ({len(images) * k / minutes:.1f} augmented images/min)")
    summary = dataclasses.asdict(summarize(result.entries))
    print({key: (round(v, 4) if isinstance(v, float) else v) for key, v in summary.items()})


if __name__ == "__main__":
    main()
