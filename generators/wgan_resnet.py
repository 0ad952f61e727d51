"""The ResNet WGAN-GP of Gulrajani et al. 2017 for 32 px images (`isda-viz train-gan --arch resnet`), and its recipe.

Facts from the paper's CIFAR-10 code (igul222/improved_wgan_training, `gan_cifar_resnet.py`), which these modules
follow (our own code; torch's default initialisation, not theirs):

* Generator: z (128) → linear → `(W, 4, 4)` → 3 residual "up" blocks `W → W` (each: BN, ReLU, 2x nearest
  upsampling (their depth-to-space of 4 copies), 3x3 conv, BN, ReLU, 3x3 conv; shortcut: upsampling, 1x1 conv) →
  BN, ReLU, 3x3 conv to the image's channels → tanh; `W = DIM_G = 128`. Class-conditional, the blocks' batch norms
  are conditional (Dumoulin et al. 2016: a per-class scale, init 1, and offset, init 0, on an affine-free batch
  norm: their `cond_batchnorm`); the last one is a plain batch norm (their `Generator.OutputN` gets no labels).
* Critic: an "optimised" first block (3x3 conv, ReLU, 3x3 conv, 2x2 mean pool; shortcut: mean pool, 1x1 conv),
  a "down" block (ReLU, 3x3 conv, ReLU, 3x3 conv, mean pool; shortcut: 1x1 conv, mean pool), two blocks without
  resampling and an identity shortcut, ReLU, the spatial mean, a linear layer to one score; `W = DIM_D = 128`, no
  normalisation (`NORMALIZATION_D = False`). Their conditional critic was an AC-GAN head; ours is the projection
  of Miyato & Koyama 2018, `f(x, y) = w·h(x) + embed(y)·h(x)`, as the compact critic's.
* Biases everywhere (their `Conv2D` and `Linear` default `biases=True`).

`resnet_generator_parameters` / `resnet_critic_parameters` count the parameters these descriptions give.
Other sizes than 32 px take `log2(S/4)` up blocks. `GULRAJANI` is the training schedule of the same file.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.errors import IsdaVizError

from .registry import LoadRequest, register_generator
from .wgan import GENERATOR_FILE, ConditionalBatchNorm2d, TrainedGenerator, load_saved_generator

GULRAJANI = {
    "n_critic": 5,               # N_CRITIC = 5 (also the paper's Algorithm 1 default)
    "lr_g": 2e-4, "lr_d": 2e-4,  # LR = 2e-4, both Adam optimisers
    "beta1": 0.0, "beta2": 0.9,  # AdamOptimizer(beta1=0., beta2=0.9)
    "iterations": 100_000,       # ITERS = 100000 generator iterations, the learning rates decayed linearly to 0
    "batch_size": 64,            # BATCH_SIZE = 64, the critic's batch
    "generator_batch_size": 128,  # GEN_BS_MULTIPLE = 2: the generator's batch is twice the critic's
    "gp": 10.0,                  # the gradient penalty's weight, lambda = 10
}
"""`--recipe gulrajani`: the schedule of `gan_cifar_resnet.py` (Gulrajani et al. 2017's CIFAR-10 ResNet); the
linear decay (`DECAY = True`: lr · max(0, 1 − iteration / ITERS)) is `train_gan`'s own."""
DEFAULT_WIDTH = 128
"""`DIM_G = DIM_D = 128`."""


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class UpResBlock(nn.Module):
    """Their `ResidualBlock(resample='up')`: `(N, W_in, S, S)` → `(N, W_out, 2S, 2S)`."""
    def __init__(self, in_channels: int, out_channels: int, num_classes: int | None):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(in_channels, num_classes)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.bn2 = ConditionalBatchNorm2d(out_channels, num_classes)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(_up(F.relu(self.bn1(x, y))))
        h = self.conv2(F.relu(self.bn2(h, y)))
        return h + self.shortcut(_up(x))


class ResNetGenerator(TrainedGenerator):
    """Gulrajani et al.'s ResNet generator: `z (N, latent_dim)`, `y (N,)` → `(N, C, S, S)` in [-1, 1]."""
    name = "wgan-resnet"
    kind = "wgan-resnet"
    file_format = "isda-viz-wgan-resnet"

    def __init__(self, latent_dim: int = 128, num_classes: int | None = 10, channels: int = 3, image_size: int = 32,
                 width: int = DEFAULT_WIDTH, class_names: list[str] | None = None):
        blocks = math.log2(image_size / 4) if image_size >= 8 else 0
        if blocks != int(blocks) or blocks < 1:
            raise IsdaVizError(f"the ResNet WGAN generates 4·2^k px images (32: Gulrajani et al.'s), not {image_size}")
        super().__init__(latent_dim, num_classes, channels, image_size, width, class_names)
        self.linear = nn.Linear(latent_dim, 16 * width)
        self.blocks = nn.ModuleList(UpResBlock(width, width, num_classes) for _ in range(int(blocks)))
        self.bn = nn.BatchNorm2d(width)
        self.to_image = nn.Conv2d(width, channels, 3, 1, 1)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.check_labels(y)
        h = self.linear(z).view(len(z), self.width, 4, 4)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.to_image(F.relu(self.bn(h))))


class CriticBlock(nn.Module):
    """Their critic blocks: `first` (`OptimizedResBlockDisc1`: no ReLU before the first conv, mean-pooled input to a
    1x1 shortcut), `down` (`ResidualBlock(resample='down')`: both the residual and the 1x1 shortcut mean-pooled
    after their convs) or neither (identity shortcut)."""
    def __init__(self, in_channels: int, out_channels: int, first: bool = False, down: bool = False):
        super().__init__()
        self.first, self.down = first, down
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if first or down or in_channels != out_channels \
            else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        if self.first:
            return F.avg_pool2d(h, 2) + self.shortcut(F.avg_pool2d(x, 2))
        if self.down:
            return F.avg_pool2d(h, 2) + F.avg_pool2d(self.shortcut(x), 2)
        return h + (x if self.shortcut is None else self.shortcut(x))


class ResNetCritic(nn.Module):
    """Gulrajani et al.'s ResNet critic with a projection head: `(N, C, S, S)`, `(N,)` → `(N,)` scores."""
    def __init__(self, num_classes: int | None = 10, channels: int = 3, width: int = DEFAULT_WIDTH):
        super().__init__()
        self.num_classes = num_classes
        self.blocks = nn.Sequential(CriticBlock(channels, width, first=True), CriticBlock(width, width, down=True),
                                    CriticBlock(width, width), CriticBlock(width, width))
        self.linear = nn.Linear(width, 1)
        self.embed = nn.Embedding(num_classes, width) if num_classes is not None else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.blocks(x)).mean(dim=(2, 3))  # (N, W)
        out = self.linear(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(1)
        return out


def resnet_generator_parameters(width: int, num_classes: int | None, channels: int = 3, latent_dim: int = 128,
                                blocks: int = 3) -> int:
    """The generator's parameter count from the description above: the input linear layer, `blocks` up blocks
    (two 3x3 convs and a 1x1 shortcut, with biases; two conditional batch norms of a scale and an offset per class
    and channel, or one affine pair per channel unconditioned), the output batch norm and 3x3 conv."""
    norm = 2 * width * (num_classes if num_classes is not None else 1)
    block = 2 * (9 * width * width + width) + (width * width + width) + 2 * norm
    return latent_dim * 16 * width + 16 * width + blocks * block + 2 * width + 9 * width * channels + channels


def resnet_critic_parameters(width: int, num_classes: int | None, channels: int = 3) -> int:
    """The critic's parameter count from the description above: the first block (3x3 convs `C → W`, `W → W`, 1x1
    shortcut `C → W`), the down block (two 3x3 convs and a 1x1 shortcut), two plain blocks (two 3x3 convs), the
    linear score and the projection embedding."""
    conv3 = 9 * width * width + width
    first = 9 * channels * width + width + conv3 + channels * width + width
    down = 2 * conv3 + width * width + width
    return first + down + 2 * 2 * conv3 + width + 1 + (num_classes or 0) * width


def _is_resnet_gan(request: LoadRequest) -> bool:
    """A GAN_DIR whose generator.pt, or a generator.pt, is of this format."""
    path = request.path
    if path.is_dir():
        if not (path / GENERATOR_FILE).exists():
            return False
        try:
            contents = LoadRequest(str(path / GENERATOR_FILE)).contents()
        except IsdaVizError:
            return False  # unreadable: the wgan family claims it, and its loader says why
    else:
        contents = request.contents()
    return isinstance(contents, dict) and contents.get("format") == ResNetGenerator.file_format


@register_generator(
    "wgan-resnet", summary="the ResNet WGAN-GP of Gulrajani et al. 2017 (train-gan --arch resnet; its weights' "
    "moving average)", file="GAN_DIR or its generator.pt", dataset="yours (CIFAR-sized data)", resolution="32 px",
    source="`isda-viz train-gan --arch resnet [--recipe gulrajani]`", licence="yours",
    command="isda-viz augment --image cat.png --classifier runs/c10-isda --generator runs/c10-gan --out out/cat",
    recognise=_is_resnet_gan, folder_hint=f"{GENERATOR_FILE} (a train-gan --arch resnet GAN_DIR)")
def load_wgan_resnet(request: LoadRequest) -> ResNetGenerator:
    """The registry's loader: the moving average `train_gan` saved, whose batch-norm statistics are standing ones
    already (recomputed before saving), so `standing_statistics` changes nothing."""
    return load_saved_generator(request.spec, ResNetGenerator, request.device)
