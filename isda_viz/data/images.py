"""Image files and image tensors: reading any image file, the evaluation crop, value and channel conversions.

Tensors here are `(N, C, H, W)` (or `(C, H, W)` for one image) with values in [0, 1]
unless a docstring says uint8 [0, 255]. Every tensor operation is differentiable,
so the inverter's gradients flow through `resize` and `map_channels`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from isda_viz.errors import IsdaVizError


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

        with open(self.paths[i], "rb") as f:
            image = Image.open(f).convert(self.mode)
        return self.transform(image), int(self.labels[i])


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted (the extensions torchvision's ImageFolder reads)."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


def open_rgb(path):

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def load_image_file(path, channels: int, size: int) -> torch.Tensor:
    """Any image file → `(channels, size, size)` in [0, 1]: mode converted (alpha over white), centre square
    crop, resized to `size`. Missing or unreadable files raise `IsdaVizError`."""

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
    """`(N, C, H, W)` → `(N, C, size, size)`, bilinear with antialiasing (no aliasing when shrinking 128 → 28)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
