"""Small synthetic datasets written in the real on-disk layouts, for tests and benchmarks.

- `write_cifar10(root, n_train, n_test)`: torchvision's `cifar-10-batches-py/`
  (`data_batch_1..5`, `test_batch`, `batches.meta`): pickled dicts with `data`
  `(n, 3072)` uint8 (channel-major rows of 32x32 images), `labels` list of int,
  `batch_label`, `filenames`; meta `label_names`, `num_cases_per_batch`, `num_vis`.
- `write_cifar100(root, ...)`: `cifar-100-python/` (`train`, `test`, `meta`) with
  `fine_labels`, `coarse_labels`; meta `fine_label_names`, `coarse_label_names`.
- `write_image_folders(root, ...)`: an ImageNet-style `train/<class>/*.JPEG` and
  `val/<class>/*.JPEG` tree of small JPEGs.

Images are class-dependent colour blobs plus noise, so a classifier can learn
something from a few dozen of them. Everything is drawn from `seed`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _images(n: int, num_classes: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`(n, size, size, 3)` uint8 images and `(n,)` labels, each class a different colour and blob position."""
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        hue = np.array([np.sin(c * 1.3), np.sin(c * 2.1 + 1), np.sin(c * 0.7 + 2)]) * 0.5 + 0.5
        cy, cx = (c * 0.37) % 1, (c * 0.61) % 1
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)[..., None]
        img = 255 * (0.2 + 0.7 * blob * hue) + rng.normal(0, 20, (size, size, 3))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return images, labels


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)   # the release files are Python 2 pickles


def _rows(images: np.ndarray) -> np.ndarray:
    """`(n, 32, 32, 3)` → CIFAR's `(n, 3072)` rows: 1024 red, then green, then blue values."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1).copy()


def write_cifar10(root, n_train: int = 50, n_test: int = 20, seed: int = 0) -> Path:
    """`root/cifar-10-batches-py` with `n_train` images split over the five training batches; returns root."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train, train_labels = _images(n_train, 10, 32, rng)
    for b, idx in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _dump({"batch_label": f"training batch {b} of 5", "labels": [int(v) for v in train_labels[idx]],
               "data": _rows(train[idx]), "filenames": [f"img_{b}_{i}.png" for i in idx]}, folder / f"data_batch_{b}")
    test, test_labels = _images(n_test, 10, 32, rng)
    _dump({"batch_label": "testing batch 1 of 1", "labels": [int(v) for v in test_labels], "data": _rows(test),
           "filenames": [f"test_{i}.png" for i in range(n_test)]}, folder / "test_batch")
    _dump({"num_cases_per_batch": -(-n_train // 5), "label_names": names, "num_vis": 3072}, folder / "batches.meta")
    return Path(root)


def write_cifar100(root, n_train: int = 50, n_test: int = 20, seed: int = 0, num_classes: int = 100) -> Path:
    """`root/cifar-100-python` (`train`, `test`, `meta`); coarse label = fine label // 5; returns root."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        images, labels = _images(n, num_classes, 32, rng)
        _dump({"filenames": [f"{name}_{i}.png" for i in range(n)], "batch_label": f"{name} batch",
               "fine_labels": [int(v) for v in labels], "coarse_labels": [int(v) // 5 for v in labels],
               "data": _rows(images)}, folder / name)
    _dump({"fine_label_names": [f"fine_{c:03d}" for c in range(100)],
           "coarse_label_names": [f"coarse_{c:02d}" for c in range(20)]}, folder / "meta")
    return Path(root)


def write_image_folders(root, classes=("n01440764", "n01443537", "n01484850"), per_class_train: int = 8,
                        per_class_val: int = 3, size: int = 48, seed: int = 0) -> Path:
    """ImageNet-style `root/train/<wnid>/*.JPEG` and `root/val/<wnid>/*.JPEG` of `size`-pixel JPEGs."""
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", per_class_train), ("val", per_class_val)):
        images, labels = _images(per_class * len(classes), len(classes), size, rng)
        for i, (img, c) in enumerate(zip(images, labels)):
            folder = Path(root) / split / classes[c]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{classes[c]}_{i:05d}.JPEG", quality=90)
    return Path(root)
