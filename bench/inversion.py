"""Pictures in milliseconds: the search against the amortized inverter, side by side on the same images and ã.

    python bench/inversion.py [--images 10] [--first-index 0] [--refine-steps 0,10,20,40,80] [--train]
    python bench/inversion.py --first-index 1000 --images 40      # test images no default run looks at
    python bench/inversion.py --reference                          # the search's schedule vs the paper's
    python bench/inversion.py --device cuda --images 16            # BigGAN-deep-128 + ResNet-50 (random weights)

The default (`compare_inverters`): test images `--first-index` ... (in test-set order) of the classifier's
dataset, K = 4 ISDA draws ã ~ N(a, 0.5 Σ_y) each, drawn as the pipeline draws them for the seed (the prior's
starts first), and every setting inverts exactly those targets through `invert_and_augment`: the search
(`--inverter search`: 4 random starts, 200 + 300 Adam steps), the amortized inverter alone
(`--refine-steps 0`) and with each refinement in `--refine-steps`. Printed per setting: seconds,
augmented images per minute, the ratio to the search, median Step I feature error, median Step II
reached-shift error, and the non-negativity floor; then the free-pixel bound on the same targets (Adam on
every pixel of the search's reconstructions, no generator). `--train` first trains the pair's inverter
(`InverterOptions()`, what `isda-viz train-inverter` does), prints its cost and whether it equals the cached
one bit for bit, and benches that. Run it on a quiet machine: only the ratios printed in one run compare.

`--device cuda` builds BigGAN-deep-128 (its published config) and torchvision ResNet-50 with random
weights (none can be downloaded here), trains an inverter for 50 steps on the generator's own samples
(timing only: its errors mean nothing) and prints the same table without the free-pixel bound.

`--reference` runs the search's Step I schedule beside the reference code's (the paper's public code,
CIFAR settings: plain gradient descent with momentum 0.9 on MSE losses, lr 10, ÷10 every 2,500 steps, one
image per run) on the same images and starts, the reference capped at --reference-cap iterations: "same
objective" (our feature/pixel balance: MSE means need eta scaled by P/A) and "its own weighting" (MSE means
at eta 1, which weighs features P/A times more); then Step II's reach against the floor and free pixels.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from isda_viz.classifiers.classifier import load_classifier
from isda_viz.classifiers.statistics import class_statistics
from isda_viz.data.datasets import load_split
from isda_viz.generators import load_generator
from isda_viz.inversion.adapter import GeneratorAdapter, Models
from isda_viz.inversion.amortized import InverterData, InverterOptions, train_inverter
from isda_viz.inversion.inverter_cache import find_inverter, inverter_data
from isda_viz.inversion.optimizer import InversionOptions, invert_features, negative_target_floor, normalize_latent
from isda_viz.inversion.pipeline import draw_prior
from isda_viz.inversion.pipelines import VisualizeOptions, images_per_class, invert_and_augment
from isda_viz.inversion.starts import AmortizedStart, PriorSearch
from isda_viz.isda.sampling import sample_augmented_features
from isda_viz.outputs.report import summarize
from isda_viz.pretrained import default_classifier, default_generator


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


def augmentation_targets(models, images, labels, seed, k, strength=0.5, restarts=4):
    """The ã `(N, K, A)` the pipeline draws for `seed` (its rng gives the N·restarts prior starts first)."""
    rng = torch.Generator().manual_seed(seed)
    draw_prior(models, len(images), restarts, rng)
    classifier = models.classifier
    statistics = class_statistics(classifier, classes=labels.tolist())
    target = classifier.features(images.to(classifier.device))
    return sample_augmented_features(target, statistics.slots(labels.to(classifier.device)), statistics.estimator,
                                     strength, k, rng)


def compare_inverters(models, images, labels, inverter, refine_steps=(0, 10, 20, 40, 80), k=4, seed=0,
                      free_pixels=True):
    """The search against `inverter` (an `AmortizedInverter`) alone and with each of `refine_steps`, side by
    side on the same images and ã; prints the table and returns its rows `(name, seconds, summary, result)`."""
    wanted = augmentation_targets(models, images, labels, seed, k)
    options = VisualizeOptions(strength=0.5, num_augmented=k, seed=seed, progress=False)
    settings = [("search (4 random starts, 200 + 300 steps)", PriorSearch(InversionOptions()))]
    settings += [(f"amortized + {steps} refine steps" if steps else "amortized alone (--refine-steps 0)",
                  AmortizedStart(inverter, steps)) for steps in refine_steps]
    rows = []
    for name, source in settings:
        started = time.time()
        result = invert_and_augment(models, images, labels, [""] * len(images), options, wanted=wanted,
                                    source=source)
        rows.append((name, time.time() - started, summarize(result.entries), result))
    base = rows[0][1]
    print(f"\n{len(images)} images x {k} augmentations, the same a~ for every row")
    print(f"{'setting':<44}{'seconds':>9}{'aug img/min':>13}{'speed':>9}{'step I err':>12}{'step II err':>13}"
          f"{'floor':>8}")
    for name, seconds, s, _ in rows:
        print(f"{name:<44}{seconds:>9.2f}{len(images) * k / seconds * 60:>13.1f}{base / seconds:>8.1f}x"
              f"{s.step1_median_feature_error:>12.4f}{s.step2_median_reached_shift_error:>13.4f}"
              f"{s.step2_median_negative_target_floor:>8.3f}")
    if free_pixels:
        classifier = models.classifier
        flat = wanted.flatten(0, 1).to(classifier.device).float()
        shift = flat - classifier.features(images.to(classifier.device)).repeat_interleave(k, 0)
        start = rows[0][3].reconstructions.to(classifier.device).repeat_interleave(k, 0)
        free = free_pixel_reach(classifier, start, flat, shift, InversionOptions().augment_iterations)
        print(f"free-pixel bound (300 Adam steps on every pixel, from the search's reconstructions): {free:.4f}")
    return rows


def test_images(classifier, first: int, count: int):
    """Test images `first` ... `first + count - 1` of the classifier's dataset, `(N, C, H, W)` in [0, 1], labels."""
    test = load_split(classifier.dataset, False, classifier.config.get("data_root"), image_size=classifier.image_size)
    chosen = list(range(first, min(first + count, len(test.labels))))
    images = classifier.fit_images(torch.stack([test[i][0] for i in chosen]).float() / 255).cpu()
    return images, test.labels[chosen].clone()


def trained_inverter(models, train: bool):
    """The pair's cached inverter, or with `train` one trained now (its cost printed, compared with the cache)."""
    cached = find_inverter(models, InverterOptions())
    if not train:
        if cached is None:
            raise SystemExit("this pair has no trained inverter: run `isda-viz train-inverter` or pass --train")
        return cached
    started = time.time()
    data = inverter_data(models, InverterOptions())
    adapter = models.adapter()

    def render_features(z_hat, labels):
        image = adapter(z_hat, labels if models.generator.conditional else None)
        return image, models.classifier.model.features(image)

    inverter = train_inverter(render_features, models.generator.sample_latent, models.generator.latent_dim, data)
    print(f"training the pair's inverter (InverterOptions(): {inverter.options.steps} steps, "
          f"{torch.get_num_threads()} threads): {time.time() - started:.1f} s in all, of which training "
          f"{inverter.info['seconds']:.1f} s")
    if cached is not None:
        same = all(torch.equal(t, cached.network.state_dict()[name]) for name, t in inverter.network.state_dict().items())
        print(f"  bit-identical to the cached inverter {cached.info.get('path')}: {same}")
    return inverter


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


def gpu_inverter(models, steps: int = 50):
    """An inverter for the random-weight GPU pair, trained briefly on the generator's own samples (timing only)."""
    classifier, generator = models.classifier, models.generator
    device = classifier.device
    rng = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 10
    adapter = models.adapter()
    with torch.no_grad():
        z = normalize_latent(generator.sample_latent(64, rng, device))
        pixels = adapter(z, labels.to(device))
        features = classifier.model.features(pixels)
    estimator = classifier.estimator
    factors = torch.zeros(1000, features.shape[1])
    factors[:10] = estimator.covariance[:10].clamp_min(0).sqrt().float().cpu()
    vectors = torch.zeros(1000, 1, features.shape[1])
    vectors[:, 0, 0] = 1.0
    data = InverterData(pixels, labels.to(device), features, factors, vectors, torch.ones(1000, 1), list(range(10)))

    def render_features(z_hat, rows):
        image = adapter(z_hat, rows)
        return image, classifier.model.features(image)

    options = InverterOptions(steps=steps, batch_size=16, real_images=64)
    started = time.time()
    inverter = train_inverter(render_features, generator.sample_latent, generator.latent_dim, data, options)
    print(f"inverter: {steps} training steps of batch 16 (+4 samples) in {time.time() - started:.1f} s "
          f"(timing only; the README's budget is {InverterOptions().steps} steps of 64)")
    return inverter


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default=None)
    parser.add_argument("--generator", default=None)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--first-index", type=int, default=None,
                        help="Test images from this index on, in test-set order (default: the demo's, one per class).")
    parser.add_argument("--refine-steps", default="0,10,20,40,80",
                        help="Comma-separated refinements to measure after the amortized passes.")
    parser.add_argument("--train", action="store_true", help="Train the pair's inverter first and time it.")
    parser.add_argument("--reference", action="store_true", help="The search's schedule against the paper's.")
    parser.add_argument("--reference-cap", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu",
                        help="cuda: BigGAN-deep-128 + ResNet-50 with random weights (timing only).")
    args = parser.parse_args()
    steps = tuple(int(x) for x in args.refine_steps.split(",") if x.strip())
    if args.device != "cpu":
        models = gpu_models(args.device)
        labels = torch.arange(args.images) % 10    # the classes gpu_models has statistics for
        with torch.no_grad():  # generator images stand in for test images
            images = GeneratorAdapter(models.generator, models.classifier).pixels(
                models.generator.sample_latent(args.images, torch.Generator().manual_seed(2)), labels.to(args.device))
        compare_inverters(models, images, labels, gpu_inverter(models), steps, seed=args.seed, free_pixels=False)
        return
    classifier = load_classifier(args.classifier or default_classifier())
    generator = load_generator(args.generator or default_generator(), "cpu")
    models = Models(classifier, generator)
    if not args.reference:
        if args.first_index is None:
            images, labels, _ = images_per_class(classifier, -(-args.images // classifier.num_classes), None)
            images, labels = images[: args.images], labels[: args.images]
        else:
            images, labels = test_images(classifier, args.first_index, args.images)
        compare_inverters(models, images, labels, trained_inverter(models, args.train), steps, seed=args.seed)
        return
    reference(classifier, generator, args)


def reference(classifier, generator, args):
    """The search's Step I schedule against the reference code's, then Step II against its bounds."""
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



if __name__ == "__main__":
    main()
