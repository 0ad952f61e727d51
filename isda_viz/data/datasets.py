"""Datasets: a registry of names, uint8 image tensors, batch augmentation, normalisation.

Every dataset yields images as uint8 tensors `(C, H, W)` in [0, 255] and int
labels; the classifier sees `normalize(x)` of `x` in [0, 1]. Small datasets
(Fashion-MNIST, CIFAR) live in memory as one `(N, C, H, W)` uint8 tensor so a
CPU batch costs an index, not a DataLoader round trip; image folders stream
through a DataLoader.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import Dataset
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST
from torchvision.datasets.folder import IMG_EXTENSIONS

from isda_viz.cache import cache_dir, cache_root
from isda_viz.data.images import open_rgb, eval_transform
from isda_viz.errors import IsdaVizError
from isda_viz.readers import parse_json, read_text

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The ImageNet normalisation (per RGB channel) that torchvision, timm and the public ImageNet code use: the one copy."""

SPECS = {
    "fashion-mnist": DatasetSpec("fashion-mnist", 10, 1, 28, [0.2860], [0.3530], FASHION_MNIST_CLASSES),
    "cifar10": DatasetSpec("cifar10", 10, 3, 32, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616], CIFAR10_CLASSES),
    "cifar100": DatasetSpec("cifar100", 100, 3, 32, [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762],
                            CIFAR100_CLASSES),
    "imagenet": DatasetSpec("imagenet", 1000, 3, 224, list(IMAGENET_MEAN), list(IMAGENET_STD),
                            default_arch="resnet50", default_covariance="diagonal"),
    "folder": DatasetSpec("folder", 0, 3, 224, list(IMAGENET_MEAN), list(IMAGENET_STD),
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


SHOWN_OFFENDERS = 3  # bad files or classes named in one error line


def _walk_images(class_dir: Path, seen: set[str], root: Path) -> list[Path]:
    """Image files under `class_dir` (ImageFolder's extensions) in ImageFolder's order (folders sorted by
    path, files by name), following each symlinked folder at most once; a folder link that leads back
    into its own ancestors is an `IsdaVizError` naming it. Broken symlinks are kept (the caller reports them)."""
    listed: list[tuple[str, list[str]]] = []

    def walk(folder: Path, ancestors: frozenset) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            raise IsdaVizError(f"cannot list {folder}: {os.strerror(e.errno)}") from None
        names = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks
            except OSError as e:  # a link to itself (or a longer loop of links): ELOOP
                raise IsdaVizError(f"symbolic link loop in the image folder: {entry.path} -> "
                                   f"{os.readlink(entry.path) if entry.is_symlink() else '?'} "
                                   f"({os.strerror(e.errno)}); remove the link") from None
            if is_dir:
                path, real = Path(entry.path), os.path.realpath(entry.path)
                if real in ancestors:
                    link = next((q for q in [path, *path.parents] if q.is_symlink()), path)
                    raise IsdaVizError(f"symbolic link loop in the image folder: {link} -> {os.readlink(link)} "
                                       f"leads back to {real}; remove the link")
                if real not in seen:  # another link to a folder already read is followed once only
                    seen.add(real)
                    walk(path, ancestors | {real})
            elif Path(entry.name).suffix.lower() in IMG_EXTENSIONS:
                names.append(entry.name)
        listed.append((str(folder), sorted(names)))

    real = os.path.realpath(class_dir)
    seen.add(real)
    walk(class_dir, frozenset({real, os.path.realpath(root)}))
    return [Path(folder) / name for folder, names in sorted(listed) for name in names]


def _bad_image(path: Path) -> str | None:
    """Why `path` cannot be read as an image (from its header only), or None."""
    if not path.exists():
        return "a broken symbolic link" if path.is_symlink() else "missing"
    if not path.is_file():
        return "not a regular file"
    try:
        with open(path, "rb") as f, PILImage.open(f):
            return None
    except PILImage.DecompressionBombError:
        return None  # a huge image: refused, with the limit named, when it is read
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return "not an image" if isinstance(e, UnidentifiedImageError) else f"unreadable ({type(e).__name__})"


def _offenders(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN_OFFENDERS} more" if len(items) > SHOWN_OFFENDERS else ""
    return ", ".join(items[:SHOWN_OFFENDERS]) + more


def scan_image_folder(root: Path, skip_bad: bool = False, log=None) -> tuple[list[str], list[tuple[str, int]]]:
    """`(class names, [(file, class index)])` of an ImageNet-layout folder (one sub-folder per class), every
    file checked from its header first. Unreadable files and classes without images are one `IsdaVizError`
    naming the first few, or with `skip_bad` skipped with one note (`log`, default stderr)."""
    root = Path(root)
    log = log or (lambda message: print(f"note: {message}", file=sys.stderr))
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not class_dirs:
        raise IsdaVizError(f"{root} holds no class folders (one sub-folder of images per class)")
    seen: set[str] = set()
    files = {d.name: _walk_images(d, seen, root) for d in class_dirs}
    flat = [f for found in files.values() for f in found]
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=8) as pool:  # header reads wait on the disk
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # the size is judged when read
        reasons = dict(zip(flat, pool.map(_bad_image, flat)))
    bad = [f"{f} ({why})" for f, why in reasons.items() if why is not None]
    empty = [str(root / name) for name, found in files.items() if not any(reasons[f] is None for f in found)]
    if len(empty) == len(files):
        raise IsdaVizError(f"no class folder under {root} holds a readable image ({_offenders(bad) or 'all empty'})")
    if bad and not skip_bad:
        raise IsdaVizError(f"{len(bad)} file(s) under {root} cannot be read as images: {_offenders(bad)}; "
                           "remove them, or pass --skip-bad-images to train without them")
    if empty and not skip_bad:
        raise IsdaVizError(f"{len(empty)} class folder(s) hold no images: {_offenders(empty)}; remove them, "
                           "or pass --skip-bad-images to train without them")
    if bad or empty:
        log(f"skipping {len(bad)} unreadable file(s) ({_offenders(bad) or 'none'}) and {len(empty)} empty "
            f"class folder(s) ({_offenders(empty) or 'none'}) under {root}")
    classes = [name for name in files if str(root / name) not in empty]
    samples = [(str(f), i) for i, name in enumerate(classes) for f in files[name] if reasons[f] is None]
    return classes, samples


class _ScannedFolder(Dataset):
    """ImageFolder's items `(transform(image), class index)` over the files `scan_image_folder` found."""
    def __init__(self, root: Path, transform, skip_bad: bool):
        self.root = str(root)
        self.classes, self.samples = scan_image_folder(root, skip_bad)
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(open_rgb(path)), label


class FolderImages(Dataset):
    """An ImageFolder whose items are uint8 `(3, S, S)` tensors (resize + centre crop, or random crop).
    Its files are checked before use (`scan_image_folder`; `skip_bad`: skip unreadable ones).

    Training folders crop and flip at random (`random_items`): `dataset[(i, seed)]` draws item i's crop and
    flip from `seed` alone (the process's random state is left as it was), `dataset[i]` from that state."""
    def __init__(self, root: Path, image_size: int, train: bool, skip_bad: bool = False):
        self.random_items = train

        if train:
            tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()])
        else:
            tf = eval_transform(image_size)
        self.folder = _ScannedFolder(root, tf, skip_bad)
        self.classes = self.folder.classes
        self.labels = torch.tensor(self.folder.targets)
        self._indices: list[int] | None = None

    def __len__(self) -> int:
        return len(self._indices) if self._indices is not None else len(self.folder)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        j = self._indices[i] if self._indices is not None else i
        if seed is None:
            return self.folder[j]
        with torch.random.fork_rng(devices=[]):  # torchvision's random transforms draw from torch's CPU state
            torch.manual_seed(seed)
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
    roots = [data_root] if data_root else [DEBIAN_FASHION_MNIST, cache_root()]
    for root in roots:
        img, lab = _find_idx(root, f"{prefix}-images-idx3-ubyte"), _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        if img and lab:
            images = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1)
            labels = torch.from_numpy(_read_idx(lab).astype(np.int64))
            return TensorImages(images, labels, FASHION_MNIST_CLASSES)
    # Fallback where Debian's package is not installed: torchvision's download.
    root = data_root or cache_dir()
    try:

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
    root = data_root or cache_root()
    try:
        return _cifar_from_files(name, train, root)
    except FileNotFoundError:
        pass
    root = data_root or cache_dir()
    try:  # not there: torchvision's download (which verifies the official files' md5)

        (CIFAR10 if name == "cifar10" else CIFAR100)(str(root), train=train, download=True)
    except Exception as e:
        raise IsdaVizError(
            f"{name} not found under {root} and could not be downloaded ({type(e).__name__}); "
            f"pass --data-root to a folder holding torchvision's {CIFAR_LAYOUTS[name][0]}/ files"
        ) from None
    return _cifar_from_files(name, train, root)


def _folder(name: str, train: bool, data_root: Path | None, image_size: int, skip_bad: bool = False) -> FolderImages:
    if data_root is None:
        raise IsdaVizError(f"--dataset {name} needs --data-root, a folder with train/ and val/ (or test/) class folders")
    candidates = ["train"] if train else ["val", "test"]
    for sub in candidates:
        if (data_root / sub).is_dir():
            return FolderImages(data_root / sub, image_size, train, skip_bad)
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
               image_size: int | None = None, skip_bad_images: bool = False):
    """The train or test split of a dataset: items `(uint8 (C,H,W), int)`, `.labels (N,)`, `.classes`.

    `image_size` sets the size image folders are cropped to (default: the dataset's, 224);
    `skip_bad_images`: image folders skip unreadable files and empty classes (with a note) instead of
    refusing them.
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
        ds = _folder(name, train, root, image_size or spec.image_size, skip_bad_images)
    return ds.subset(limit)


def read_json_or_lines(path: Path, option: str) -> tuple[object, list[str] | None]:
    """A small file the user names with `option` (`--class-names`, `--class-map`): `(its JSON value, None)` when
    it starts with `{` or `[` (strict JSON then, nesting and size bounded: `readers.parse_json`), else
    `(None, its lines)`. A missing file, a FIFO or device, more than 16 MB or text that is not UTF-8 is an
    `IsdaVizError`."""
    text = read_text(path, option)
    if text.lstrip("\ufeff \t\r\n").startswith(("{", "[")):
        return parse_json(text.lstrip("\ufeff"), path, option), None
    return None, text.splitlines()


