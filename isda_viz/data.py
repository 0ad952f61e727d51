"""Datasets: a registry of names, uint8 image tensors, batch augmentation, normalisation.

Every dataset yields images as uint8 tensors `(C, H, W)` in [0, 255] and int
labels; the classifier sees `normalize(x)` of `x` in [0, 1]. Small datasets
(Fashion-MNIST, CIFAR) live in memory as one `(N, C, H, W)` uint8 tensor so a
CPU batch costs an index, not a DataLoader round trip; image folders stream
through a DataLoader.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from . import distributed
from .errors import IsdaVizError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CACHE_ROOT = Path(os.environ.get("ISDA_VIZ_CACHE", Path.home() / ".cache" / "isda-viz"))

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]

CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]
"""CIFAR-100's fine labels in label order (torchvision's `CIFAR100.classes`)."""


@dataclass
class DatasetSpec:
    """What a classifier and a generator must agree on about a dataset."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    class_names: list[str] = field(default_factory=list)
    default_arch: str = "resnet32"
    default_covariance: str = "full"


SPECS = {
    "fashion-mnist": DatasetSpec("fashion-mnist", 10, 1, 28, [0.2860], [0.3530], FASHION_MNIST_CLASSES),
    "cifar10": DatasetSpec("cifar10", 10, 3, 32, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], CIFAR10_CLASSES),
    "cifar100": DatasetSpec("cifar100", 100, 3, 32, [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762],
                            CIFAR100_CLASSES),
    "imagenet": DatasetSpec("imagenet", 1000, 3, 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                            default_arch="resnet50", default_covariance="diagonal"),
    "folder": DatasetSpec("folder", 0, 3, 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                          default_arch="resnet50", default_covariance="diagonal"),
}
DATASET_NAMES = list(SPECS)
FOLDER_DATASETS = ("imagenet", "folder")  # streamed from image folders (ImageNet layout), not held in memory


class TensorImages(Dataset):
    """Images held in memory: `images (N, C, H, W)` uint8, `labels (N,)` int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]):
        self.images, self.labels, self.classes = images, labels, class_names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def subset(self, n: int | None) -> "TensorImages":
        """The first n images (all when n is None)."""
        if n is None or n >= len(self):
            return self
        return TensorImages(self.images[:n], self.labels[:n], self.classes)


def eval_transform(image_size: int):
    """PIL image → uint8 `(C, S, S)`: resize the short side to S·256/224, centre crop S (ImageNet's evaluation)."""
    import torchvision.transforms as T

    return T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.PILToTensor()])


class FolderImages(Dataset):
    """An ImageFolder whose items are uint8 `(3, S, S)` tensors (resize + centre crop, or random crop)."""

    def __init__(self, root: Path, image_size: int, train: bool):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder

        if train:
            tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()])
        else:
            tf = eval_transform(image_size)
        self.folder = ImageFolder(str(root), transform=tf, loader=lambda p: _open_rgb(p))
        self.classes = self.folder.classes
        self.labels = torch.tensor(self.folder.targets)
        self._indices: list[int] | None = None

    def __len__(self) -> int:
        return len(self._indices) if self._indices is not None else len(self.folder)

    def __getitem__(self, i):
        j = self._indices[i] if self._indices is not None else i
        return self.folder[j]

    def __getstate__(self):  # DataLoader workers get the images, not the loaders kept on the dataset
        return {k: v for k, v in self.__dict__.items() if k != "_loaders"}

    def subset(self, n: int | None) -> "FolderImages":
        if n is None or n >= len(self):
            return self
        g = torch.Generator().manual_seed(0)  # folders are sorted by class: take a mixed subset
        self._indices = torch.randperm(len(self.folder), generator=g)[:n].sort().values.tolist()
        self.labels = self.labels[self._indices]
        return self


class FileImages(Dataset):
    """Image files with given labels, items uint8 `(channels, S, S)` by `eval_transform` (no randomness)."""

    def __init__(self, paths: list[Path], labels: list[int], image_size: int, channels: int = 3):
        self.paths, self.labels = list(paths), torch.tensor(labels, dtype=torch.int64)
        self.transform, self.mode = eval_transform(image_size), {1: "L", 3: "RGB"}[channels]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with open(self.paths[i], "rb") as f:
            image = Image.open(f).convert(self.mode)
        return self.transform(image), int(self.labels[i])


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted (the extensions torchvision's ImageFolder reads)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


def _open_rgb(path):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), as in the MNIST distribution."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for sub in ("", "FashionMNIST/raw", "raw"):
        for suffix in (".gz", ""):
            p = root / sub / (stem + suffix)
            if p.exists():
                return p
    return None


def _fashion_mnist(train: bool, data_root: Path | None) -> TensorImages:
    prefix = "train" if train else "t10k"
    roots = [data_root] if data_root else [DEBIAN_FASHION_MNIST, CACHE_ROOT]
    for root in roots:
        img, lab = _find_idx(root, f"{prefix}-images-idx3-ubyte"), _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        if img and lab:
            images = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1)
            labels = torch.from_numpy(_read_idx(lab).astype(np.int64))
            return TensorImages(images, labels, FASHION_MNIST_CLASSES)
    # Fallback where Debian's package is not installed: torchvision's download.
    root = data_root or CACHE_ROOT
    try:
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(str(root), train=train, download=True)
    except Exception as e:  # no network, bad root
        raise IsdaVizError(
            f"Fashion-MNIST not found under {root} and could not be downloaded ({type(e).__name__}); "
            "install Debian's package (apt-get install dataset-fashion-mnist) or pass --data-root "
            "to a folder holding the *-idx?-ubyte.gz files"
        ) from None
    return TensorImages(ds.data.unsqueeze(1).clone(), ds.targets.clone(), FASHION_MNIST_CLASSES)


# torchvision's on-disk CIFAR layouts: folder, training files, test file, meta file, label key, class-name key.
CIFAR_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR's python pickles (dicts of str, bytes, lists and numpy arrays) and refuses anything else,
    so a crafted file cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise IsdaVizError(f"{path} is not a CIFAR python pickle ({type(e).__name__}: {str(e)[:100]})") from None


def _cifar_from_files(name: str, train: bool, root: Path) -> TensorImages:
    """Read torchvision's CIFAR-10/100 python files under `root` (or `root/<folder>`) in torchvision's order.

    We read the pickles ourselves rather than through torchvision, whose loader
    checks each file's md5 against the official release (so a re-packed or
    synthetic copy in the same format is refused) and unpickles without limits.
    """
    folder, train_files, test_file, meta_file, label_key, names_key = CIFAR_LAYOUTS[name]
    base = root / folder if (root / folder).is_dir() else root
    files = train_files if train else [test_file]
    missing = [f for f in files + [meta_file] if not (base / f).is_file()]
    if missing:
        raise FileNotFoundError(base / missing[0])
    images, labels = [], []
    for f in files:
        entry = _read_cifar_pickle(base / f)
        try:
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels.extend(int(v) for v in entry[label_key])
        except (KeyError, ValueError, TypeError) as e:
            raise IsdaVizError(f"{base / f} lacks CIFAR's 'data' (N, 3072) uint8 and '{label_key}' "
                               f"({type(e).__name__})") from None
        images.append(data)
    meta = _read_cifar_pickle(base / meta_file)
    if names_key not in meta:
        raise IsdaVizError(f"{base / meta_file} has no '{names_key}'")
    stacked = torch.from_numpy(np.concatenate(images)).contiguous()
    if len(stacked) != len(labels):
        raise IsdaVizError(f"{base}: {len(stacked)} images but {len(labels)} labels")
    return TensorImages(stacked, torch.tensor(labels, dtype=torch.int64), [str(c) for c in meta[names_key]])


def _cifar(name: str, train: bool, data_root: Path | None) -> TensorImages:
    root = data_root or CACHE_ROOT
    try:
        return _cifar_from_files(name, train, root)
    except FileNotFoundError:
        pass
    try:  # not there: torchvision's download (which verifies the official files' md5)
        from torchvision.datasets import CIFAR10, CIFAR100

        (CIFAR10 if name == "cifar10" else CIFAR100)(str(root), train=train, download=True)
    except Exception as e:
        raise IsdaVizError(
            f"{name} not found under {root} and could not be downloaded ({type(e).__name__}); "
            f"pass --data-root to a folder holding torchvision's {CIFAR_LAYOUTS[name][0]}/ files"
        ) from None
    return _cifar_from_files(name, train, root)


def _folder(name: str, train: bool, data_root: Path | None, image_size: int) -> FolderImages:
    if data_root is None:
        raise IsdaVizError(f"--dataset {name} needs --data-root, a folder with train/ and val/ (or test/) class folders")
    candidates = ["train"] if train else ["val", "test"]
    for sub in candidates:
        if (data_root / sub).is_dir():
            return FolderImages(data_root / sub, image_size, train)
    raise IsdaVizError(f"no {' or '.join(candidates)}/ folder of class folders under {data_root}")


def detect_dataset(data_root) -> str | None:
    """Which layout `data_root` holds: "folder" (a `train/` of class folders), torchvision's "cifar10" or
    "cifar100" files, "fashion-mnist" IDX files, or None."""
    root = Path(data_root).expanduser()
    if (root / "train").is_dir():
        return "folder"
    if (root / "cifar-10-batches-py").is_dir():
        return "cifar10"
    if (root / "cifar-100-python").is_dir():
        return "cifar100"
    if _find_idx(root, "train-images-idx3-ubyte") is not None:
        return "fashion-mnist"
    return None


def folder_class_names(data_root) -> list[str] | None:
    """Class names of a `data_root/train/` of class folders, in ImageFolder's (sorted) order; None without one."""
    train = Path(data_root).expanduser() / "train"
    if not train.is_dir():
        return None
    return sorted(d.name for d in train.iterdir() if d.is_dir())


def dataset_spec(name: str, data_root: str | Path | None = None) -> DatasetSpec:
    """The spec of a dataset name; for `folder`, class names are read from its train folder."""
    if name not in SPECS:
        raise IsdaVizError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_NAMES)}")
    spec = SPECS[name]
    if name in FOLDER_DATASETS and data_root is not None:
        classes = folder_class_names(data_root)
        if classes is not None:
            spec = DatasetSpec(**{**spec.__dict__, "num_classes": len(classes), "class_names": classes})
    return spec


def load_split(name: str, train: bool, data_root: str | Path | None = None, limit: int | None = None,
               image_size: int | None = None):
    """The train or test split of a dataset: items `(uint8 (C,H,W), int)`, `.labels (N,)`, `.classes`.

    `image_size` sets the size image folders are cropped to (default: the dataset's, 224).
    """
    spec = dataset_spec(name, data_root)
    root = Path(data_root).expanduser() if data_root else None
    if root is not None and not root.exists():
        raise IsdaVizError(f"--data-root {root} does not exist")
    if name == "fashion-mnist":
        ds = _fashion_mnist(train, root)
    elif name in ("cifar10", "cifar100"):
        ds = _cifar(name, train, root)
    else:
        ds = _folder(name, train, root, image_size or spec.image_size)
    return ds.subset(limit)


def load_image_file(path, channels: int, size: int) -> torch.Tensor:
    """Any image file → `(channels, size, size)` in [0, 1]: mode converted (alpha over white), centre square
    crop, resized to `size`. Missing or unreadable files raise `IsdaVizError`."""
    import torchvision.transforms.functional as TF
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise IsdaVizError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            mode = {1: "L", 3: "RGB"}.get(channels)
            if mode is None:
                raise IsdaVizError(f"the classifier takes {channels}-channel images; only 1 or 3 can be made from files")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                background = Image.new("RGBA", img.size, "white")
                img = Image.alpha_composite(background, img.convert("RGBA"))
            img = img.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise IsdaVizError(f"cannot read image {path}: {type(e).__name__}: {str(e).splitlines()[0][:100]}") from None
    side = min(img.size)  # centre square, then PIL's antialiased bicubic resize
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return TF.pil_to_tensor(img).float() / 255


def read_json_or_lines(path: Path, option: str) -> tuple[object, list[str] | None]:
    """A small file the user names with `option` (`--class-names`, `--class-map`): `(its JSON value, None)`,
    or `(None, its lines)` when it is not JSON. A missing file is an `IsdaVizError`."""
    if not path.is_file():
        raise IsdaVizError(f"{option} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text), None
    except json.JSONDecodeError:
        return None, text.splitlines()


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """`(N, C, H, W)` floats in [0, 1] → the classifier's input, `(x - mean) / std` per channel."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


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
    """Index lists of a rank's part of each global batch of a given order (set per epoch with `set_order`)."""

    def __init__(self, batch_size: int, shard: tuple[int, int] | None):
        self.batch_size, self.shard, self.order = batch_size, shard, []

    def set_order(self, order: list[int]) -> None:
        self.order = order

    def __iter__(self):
        for start in range(0, len(self.order), self.batch_size):
            batch = self.order[start:start + self.batch_size]
            yield batch[_part(len(batch), self.shard)]

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)


def _part(n: int, shard: tuple[int, int] | None) -> slice:
    """Part `rank` of `world` of n items (see `distributed.shard`); everything without a shard."""
    return slice(0, n) if shard is None else distributed.shard(n, *shard)


def iterate_batches(dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
                    num_workers: int = 0, shard: tuple[int, int] | None = None,
                    pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(uint8 (B, C, H, W), int64 (B,))` batches; order drawn from `generator` when shuffling.

    `shard=(rank, world)`: the order and the global batches of `batch_size` are the
    same on every rank, each rank gets its contiguous part of each (for
    distributed training and evaluation). Image folders stream through one
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
    from torch.utils.data import DataLoader

    key = (batch_size, shard, num_workers, pin_memory)
    cache = dataset.__dict__.setdefault("_loaders", {})
    if key not in cache:
        sampler = _GlobalBatchShards(batch_size, shard)
        extra = {"persistent_workers": True, "prefetch_factor": 4} if num_workers else {}
        cache[key] = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                                **extra)
    loader = cache[key]
    loader.batch_sampler.set_order(order.tolist())
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
