"""Image files and image tensors: reading any image file, the evaluation crop, value and channel conversions.

Tensors here are `(N, C, H, W)` (or `(C, H, W)` for one image) with values in [0, 1]
unless a docstring says uint8 [0, 255]. Every tensor operation is differentiable,
so the inverter's gradients flow through `resize` and `map_channels`.
"""

from __future__ import annotations

import functools

import os
import stat
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from isda_viz.errors import IsdaVizError


MAX_PIXELS_ENV = "ISDA_VIZ_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 2 * 89_478_485  # PIL's own refusal limit (twice the size it warns about)


def max_image_pixels() -> int:
    """The largest image (width × height) isda-viz opens: `$ISDA_VIZ_MAX_IMAGE_PIXELS`, default 178,956,970.
    Images over half of it are read with a note; larger ones are refused as possible decompression bombs."""
    raw = os.environ.get(MAX_PIXELS_ENV, "")
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.replace("_", "").replace(",", ""))
    except ValueError:
        raise IsdaVizError(f"{MAX_PIXELS_ENV}={raw!r} is not a whole number of pixels") from None
    if value < 1:
        raise IsdaVizError(f"{MAX_PIXELS_ENV} must be at least 1, not {value}")
    return value


def check_image_path(path: Path, what: str = "image") -> None:
    """Refuse what cannot be an image file: missing, a folder, a device or pipe (e.g. a link to /dev/zero)."""
    if not path.exists():
        raise IsdaVizError(f"{what} not found: {path}" + (" (a broken symbolic link)" if path.is_symlink() else ""))
    if path.is_dir():
        raise IsdaVizError(f"{what} {path} is a folder, not an image file")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise IsdaVizError(f"{what} {path} is not a regular file (a device, pipe or socket); give an image file")


def open_image(path, mode: str | None = None, note=None) -> Image.Image:
    """Open and decode an image file (converted to `mode` when given), refusing possible decompression bombs
    (over `max_image_pixels()`) and turning PIL's warnings into one-line notes (`note`, default stderr)."""
    path = Path(path)
    limit = max_image_pixels()
    note = note or (lambda message: print(f"note: {message}", file=sys.stderr))
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the limit is ours, checked on the header before any pixel is decoded
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with open(path, "rb") as f, Image.open(f) as img:
                pixels = img.width * img.height
                if pixels > limit:
                    raise IsdaVizError(
                        f"image {path} claims {img.width} × {img.height} = {pixels:,} pixels, over the limit of "
                        f"{limit:,} (a decompression bomb?); if it is real, raise the limit with "
                        f"{MAX_PIXELS_ENV}={pixels}")
                if pixels > limit // 2:
                    note(f"image {path} is large ({img.width} × {img.height} = {pixels:,} pixels); reading it")
                img.load()
                out = img.convert(mode) if mode is not None else img.copy()
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    for w in caught:
        note(f"image {path}: {str(w.message).splitlines()[0][:200]}")
    return out


def eval_transform(image_size: int):
    """PIL image → uint8 `(C, S, S)`: resize the short side to S·256/224, centre crop S (ImageNet's evaluation)."""
    return T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.PILToTensor()])


class FileImages(Dataset):
    """Image files with given labels, items uint8 `(channels, S, S)` by `eval_transform` (no randomness)."""
    def __init__(self, paths: list[Path], labels: list[int], image_size: int, channels: int = 3):
        self.paths, self.labels = list(paths), torch.tensor(labels, dtype=torch.int64)
        self.transform, self.mode = eval_transform(image_size), {1: "L", 3: "RGB"}[channels]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):

        return self.transform(open_image(self.paths[i], self.mode)), int(self.labels[i])


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted (the extensions torchvision's ImageFolder reads)."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


def open_rgb(path):
    """An image file as an RGB PIL image (see `open_image`)."""
    return open_image(path, "RGB")


def load_image_file(path, channels: int, size: int) -> torch.Tensor:
    """Any image file → `(channels, size, size)` in [0, 1]: mode converted (alpha over white), centre square
    crop, resized to `size`. Missing or unreadable files raise `IsdaVizError`."""

    path = Path(path)
    check_image_path(path)
    try:
        with open_image(path) as img:
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


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """`(N, C, H, W)` floats in [0, 1] → the classifier's input, `(x - mean) / std` per channel."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


# ITU-R BT.601 luma weights, as in PIL's convert("L") and torchvision's rgb_to_grayscale.
LUMINANCE = (0.299, 0.587, 0.114)


def map_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """`(N, C, H, W)` → `(N, channels, H, W)`: RGB → gray by luminance, gray → RGB by repetition."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 3 and channels == 1:
        weights = torch.tensor(LUMINANCE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    raise IsdaVizError(f"cannot map {c}-channel generator images to a {channels}-channel classifier "
                       "(only RGB→grayscale and grayscale→any)")


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """`(N, C, H, W)` → `(N, C, size, size)`, bilinear with antialiasing (no aliasing when shrinking 128 → 28).

    On CUDA under `--deterministic` (torch's deterministic algorithms on), where interpolation's backward
    has no deterministic kernel, the same resize as two matrix products (`resize_matrix`), whose backward
    is deterministic; equal to the interpolation to float rounding."""
    if x.shape[-2:] == (size, size):
        return x
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        rows = resize_matrix(x.shape[-2], size).to(x.device, x.dtype)          # (size, H)
        cols = resize_matrix(x.shape[-1], size).to(x.device, x.dtype)          # (size, W)
        return rows @ x @ cols.T
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@functools.lru_cache(maxsize=16)
def resize_matrix(source: int, size: int) -> torch.Tensor:
    """`(size, source)` float64 weights of antialiased bilinear resizing along one axis: row i says how much
    each source pixel contributes to output pixel i. The interpolation is separable and linear, so resizing
    `x (N, C, H, W)` is `R_H @ x @ R_W^T`; the rows are torch's own weights, read off by resizing the unit
    vectors (the columns of an identity image, resized along its height only; on the CPU, in float64)."""
    unit = torch.eye(source, dtype=torch.float64)[None, None]                  # (1, 1, source, source)
    return F.interpolate(unit, size=(size, source), mode="bilinear", align_corners=False, antialias=True)[0, 0]
