"""Batches: seeded orders, per-rank shards of global batches, crop-and-flip augmentation, labeled subsets."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader

from isda_viz import distributed
from isda_viz.data.datasets import TensorImages
from isda_viz.errors import IsdaVizError


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Random crop after zero padding by `pad` px, and random horizontal flip, per image.

    `x (N, C, H, W)` uint8 or float; randomness drawn from `generator` (CPU) so a
    seed fixes it whatever the device.
    """
    n, _, h, w = x.shape
    flips = torch.rand(n, generator=generator) < 0.5
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)
    idx_n = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    idx_c = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    out = padded[idx_n, idx_c, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    flips = flips.to(x.device).view(n, 1, 1, 1)
    return torch.where(flips, out.flip(3), out)


class _GlobalBatchShards(torch.utils.data.Sampler):
    """Index lists of a rank's part of each global batch of a given order (set per epoch with `set_order`).

    A rank whose part of a batch is empty (the last batch of an evaluation, fewer images than ranks) skips
    it: an empty list cannot be collated. With `set_order(order, seed)` each index travels with its item
    seed `(index, seed + index)` (see `iterate_batches`).
    """
    def __init__(self, batch_size: int, shard: tuple[int, int] | None):
        self.batch_size, self.shard, self.order, self.seed = batch_size, shard, [], None

    def set_order(self, order: list[int], seed: int | None = None) -> None:
        self.order, self.seed = order, seed

    def __iter__(self):
        for start in range(0, len(self.order), self.batch_size):
            batch = self.order[start:start + self.batch_size]
            part = batch[_part(len(batch), self.shard)]
            if not part:
                continue
            yield part if self.seed is None else [(i, item_seed(self.seed, i)) for i in part]

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)


def item_seed(epoch_seed: int, index: int) -> int:
    """The seed of item `index`'s random augmentation in an epoch: a function of the epoch and the image only,
    so a rank, a worker process or a resumed run draws the same crop and flip as one uninterrupted process."""
    return (epoch_seed + index * 1_000_003) % 2**63


def _part(n: int, shard: tuple[int, int] | None) -> slice:
    """Part `rank` of `world` of n items (see `distributed.shard`); everything without a shard."""
    return slice(0, n) if shard is None else distributed.shard(n, *shard)


def iterate_batches(dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
                    num_workers: int = 0, shard: tuple[int, int] | None = None,
                    pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(uint8 (B, C, H, W), int64 (B,))` batches; order drawn from `generator` when shuffling.

    `shard=(rank, world)`: the order and the global batches of `batch_size` are the
    same on every rank, each rank gets its contiguous part of each (for
    distributed training and evaluation; a rank whose part of the last batch is
    empty gets no batch there). Datasets with `random_items` (training image
    folders: random crop and flip) are asked for `(index, item_seed)`, the seed
    drawn from `generator`, so their augmentation does not depend on the rank,
    the worker process or an interruption. Image folders stream through one
    DataLoader per dataset and settings, kept across epochs: `num_workers`
    processes decode JPEGs (kept alive between epochs), batches land in pinned
    memory when `pin_memory` (for asynchronous copies to a GPU).
    """
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if isinstance(dataset, TensorImages):
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            idx = idx[_part(len(idx), shard)]
            yield dataset.images[idx], dataset.labels[idx]
        return

    # Datasets that augment each item at random (training image folders) get a seed per item, drawn once
    # per epoch from `generator`: their DataLoader workers never use their own (per-process) random state.
    seed = None
    if getattr(dataset, "random_items", False):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
    key = (batch_size, shard, num_workers, pin_memory)
    cache = dataset.__dict__.setdefault("_loaders", {})
    if key not in cache:
        sampler = _GlobalBatchShards(batch_size, shard)
        extra = {"persistent_workers": True, "prefetch_factor": 4} if num_workers else {}
        cache[key] = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                                **extra)
    loader = cache[key]
    loader.batch_sampler.set_order(order.tolist(), seed)
    for images, labels in loader:
        yield images, labels


def labeled_subset(labels: torch.Tensor, n_labeled: int, seed: int,
                   num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a training set into `n_labeled` labeled images and the rest, class-balanced and seeded.

    `labels (N,)` int class indices in [0, num_classes). Each class keeps n_labeled // num_classes
    labels and the first n_labeled % num_classes classes one more, chosen uniformly within the
    class by a generator seeded with `seed`: same seed, same split. Returns `(labeled_idx,
    unlabeled_idx)`, sorted int64 indices into `labels` that together cover it exactly once.
    """
    labels = torch.as_tensor(labels).long().cpu()
    if not num_classes <= n_labeled <= len(labels):
        raise IsdaVizError(f"--labeled must be between {num_classes} (one per class) and the {len(labels)} training "
                           f"images, got {n_labeled}")
    generator = torch.Generator().manual_seed(seed)
    base, extra = divmod(n_labeled, num_classes)
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        quota = base + (c < extra)
        if len(members) < quota:
            raise IsdaVizError(f"class {c} has {len(members)} training images, fewer than the {quota} labels "
                               f"a balanced --labeled {n_labeled} needs")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:quota]])
    labeled = torch.cat(chosen).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[labeled] = False
    return labeled, mask.nonzero().squeeze(1)
