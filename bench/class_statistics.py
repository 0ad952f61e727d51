"""Throughput of the class-statistics pass against a plain torchvision evaluation loop over the same images.

Both read the same ImageFolder (random JPEGs written to a temporary folder) with the same
evaluation crop (resize 256, centre crop 224), batch size and loader processes, and run the
same torchvision network (random weights) in eval mode:

  plain   `torchvision.datasets.ImageFolder` + `DataLoader` + `net(x)` under inference mode:
          what any evaluation script does, and a floor for any pass over the data.
  ours    `isda_viz.classifiers.classifier.class_statistics` on the classifier `load_classifier` made
          from the saved weights: hook features, float64 full (or diagonal) covariance
          updates per class, the weights' and images' fingerprints and the cache write.

It also times `CovarianceEstimator.update` alone on random features of the same shape,
so the share of the covariance update in the pass is visible. Each method runs
`--repeats` times, alternating; the best time counts. The goal is ours within 10%.

    python bench/class_statistics.py [--arch resnet50] [--classes 4] [--per-class 40] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

from isda_viz.classifiers.statistics import class_statistics
from isda_viz.classifiers.classifier import load_classifier
from isda_viz.isda.estimator import CovarianceEstimator


def write_folder(root: Path, classes: int, per_class: int, size: int, seed: int) -> Path:
    """`root/train/c{i}/{j}.jpg`: smooth random colour images (JPEG-compressible, like photos), `size` px."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / "train" / f"c{c}"
        folder.mkdir(parents=True)
        for j in range(per_class):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{j}.jpg", quality=90)
    return root


def plain_loop(root: Path, net: torch.nn.Module, mean, std, batch_size: int, device) -> int:
    """A plain evaluation loop; returns the number of images seen."""
    data = torchvision.datasets.ImageFolder(str(root / "train"), transform=T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)]))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=0)
    seen = 0
    with torch.inference_mode():
        for x, _ in loader:
            net(x.to(device))
            seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen


def ours(clf, root: Path, classes: int, covariance: str, batch_size: int, cache: Path) -> int:
    """The statistics pass from scratch (a fresh cache folder each time); returns the images merged."""
    clf.cache_dir = cache  # a fresh, empty cache: the pass runs
    statistics = class_statistics(clf, data_root=root, classes=range(classes), covariance=covariance,
                                  progress=False, batch_size=batch_size, workers=0)
    statistics.estimator.covariance  # noqa: B018  (merges the buffered rows: part of the cost)
    if clf.device.type == "cuda":
        torch.cuda.synchronize()
    return int(statistics.estimator.count.sum())


def update_only(n: int, a: int, classes: int, diagonal: bool, batch_size: int, device) -> int:
    """`CovarianceEstimator.update` alone on random features `(n, a)`, in batches as the pass gives them."""
    estimator = CovarianceEstimator(a, classes, diagonal=diagonal, device=device)
    g = torch.Generator().manual_seed(0)
    features = torch.rand(n, a, generator=g).to(device)
    labels = torch.arange(n).div(n / classes, rounding_mode="floor").long().to(device)
    for start in range(0, n, batch_size):
        estimator.update(features[start:start + batch_size], labels[start:start + batch_size])
    estimator.covariance  # noqa: B018
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n


def best_time(fn, repeats: int) -> tuple[float, int]:
    times, seen = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        seen = fn()
        times.append(time.perf_counter() - started)
    return min(times), seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50", help="torchvision model name")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=40,
                        help="images per class; with a handful, the fixed costs (hashing the weights, writing the "
                             "32 MiB-per-class cache) dominate and the ratio measures those, not throughput")
    parser.add_argument("--image-size", type=int, default=320, help="side of the JPEGs on disk, px")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--covariance", choices=["full", "diagonal"], default="full")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_folder(tmp / "data", args.classes, args.per_class, args.image_size, seed=0)
        torch.manual_seed(0)
        net = torchvision.models.get_model(args.arch, weights=None, num_classes=args.classes).eval()
        weights = tmp / f"{args.arch}.pth"
        torch.save(net.state_dict(), weights)
        clf = load_classifier(weights, device, arch=f"torchvision:{args.arch}", data_root=root)
        net = net.to(device)
        a = clf.feature_dim
        n = args.classes * args.per_class
        with torch.inference_mode():  # warm-up (first-call allocations), untimed
            net(torch.zeros(2, 3, 224, 224, device=device))

        plain_s, ours_s = [], []
        for r in range(args.repeats):  # alternate, so a noisy neighbour hurts both alike
            plain_s.append(best_time(lambda: plain_loop(root, net, clf.mean, clf.std, args.batch_size, device), 1))
            ours_s.append(best_time(lambda: ours(clf, root, args.classes, args.covariance, args.batch_size,
                                                 tmp / f"cache{r}"), 1))
        (t_plain, n_plain), (t_ours, n_ours) = min(plain_s), min(ours_s)
        t_update, _ = best_time(lambda: update_only(n, a, args.classes, args.covariance == "diagonal",
                                                    args.batch_size, device), args.repeats)
    assert n_plain == n_ours == n, (n_plain, n_ours, n)

    print(f"\n{args.arch} (A = {a}, {args.covariance} covariance), {n} images of {args.image_size} px in "
          f"{args.classes} classes, 224 px crops, batch {args.batch_size}, {device}, best of {args.repeats}\n")
    rows = [("plain torchvision eval loop", t_plain), ("class_statistics pass (ours)", t_ours),
            ("  of which CovarianceEstimator.update", t_update)]
    print(f"{'':<38}{'seconds':>9}{'images/s':>10}{'vs plain':>10}")
    for name, seconds in rows:
        print(f"{name:<38}{seconds:>9.2f}{n / seconds:>10.1f}{t_plain / seconds:>9.2f}x")
    print(f"\nours / plain throughput: {t_plain / t_ours:.3f} (goal >= 0.90); "
          f"covariance update: {100 * t_update / t_ours:.1f}% of the pass")


if __name__ == "__main__":
    main()
