"""Image-folder loading throughput, side by side in one run: what `--workers` buys an ImageNet-style folder.

Writes a synthetic ImageNet-layout tree (`train/<wnid>/*.JPEG`, 375x500 px like a typical
ImageNet photo, JPEG quality 90) once, then streams one epoch of it through
`isda_viz.data.datasets.iterate_batches` exactly as `train` does (random-resized crop to 224 px,
flip, uint8 batches) with 0, 1, 2, ... worker processes, pinned memory on or off.
Each setting runs `--epochs` epochs over the same persistent loader (the first one
includes starting the workers); the table gives images/s of the later epochs and
the ratio to the in-process loader (workers 0).

    python bench/folder_loader.py                  # 1,024 images, workers 0,1,2
    python bench/folder_loader.py --images 256 --workers 0,2 --epochs 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from isda_viz.data.batches import iterate_batches
from isda_viz.data.datasets import load_split


def write_tree(root: Path, images: int, classes: int = 8, seed: int = 0) -> Path:
    """`root/train/<wnid>/*.JPEG` and a small `root/val/`: smooth random photos of 375x500 px."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(classes, 24, 32, 3), dtype=np.uint8)
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            c = i % classes
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            noise = rng.integers(-40, 41, size=base[c].shape)
            small = np.clip(base[c].astype(int) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(folder / f"{i:06d}.JPEG", quality=90)
    return root


def epoch_rate(dataset, batch: int, workers: int, pin: bool, epochs: int) -> list[float]:
    """Images/s of each epoch through one persistent loader."""
    rates = []
    for epoch in range(epochs):
        order = torch.Generator().manual_seed(epoch)
        started = time.perf_counter()
        seen = 0
        for images, _ in iterate_batches(dataset, batch, True, order, workers, pin_memory=pin):
            seen += len(images)
        rates.append(seen / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--root", default=None, help="Reuse or write the tree here (default: a temporary folder).")
    args = parser.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="isda-viz-folder-bench-"))
    if not (root / "train").is_dir():
        print(f"writing {args.images} JPEGs under {root} ...", flush=True)
        write_tree(root, args.images)
    settings = [(int(w), pin) for w in args.workers.split(",") for pin in (False, True)]
    rows = []
    for workers, pin in settings:
        dataset = load_split("folder", True, root)  # a fresh dataset: its loader (and workers) start here
        rates = epoch_rate(dataset, args.batch, workers, pin, args.epochs)
        steady = statistics.median(rates[1:]) if len(rates) > 1 else rates[0]
        rows.append((workers, pin, rates[0], steady))
        print(f"  workers {workers} pin {pin!s:5}: first epoch {rates[0]:7.1f} img/s, later {steady:7.1f} img/s",
              flush=True)
    reference = next(r[3] for r in rows if r[0] == 0 and not r[1])
    print(f"\n{len(dataset)} images of 375x500 px -> 224 px crops, batch {args.batch}, "
          f"{torch.get_num_threads()} torch threads, {args.epochs} epochs each")
    print(f"{'workers':>7} {'pinned':>6} {'first epoch img/s':>18} {'later img/s':>12} {'x workers 0':>12}")
    for workers, pin, first, steady in rows:
        print(f"{workers:>7} {pin!s:>6} {first:>18.1f} {steady:>12.1f} {steady / reference:>12.2f}")


if __name__ == "__main__":
    main()
