"""The `studiogan-biggan` family: PyTorch-StudioGAN's BigGAN for CIFAR-10 (POSTECH-CVLab/PyTorch-StudioGAN,
`src/models/big_resnet.py` with `src/configs/CIFAR10/BigGAN.yaml`), rebuilt under its own parameter names.

Facts read from that code (v0.4 layout, the one its Hugging Face checkpoints load into strictly):

* the checkpoint `model=G_ema-best-weights-step=N.pth` is `{"state_dict": G_ema.state_dict()}`;
* z of 80 split into 4 chunks of 20 (hierarchical): chunk 0 feeds `linear0` (spectral-normed, to
  `(4·96, 4, 4)`); the class index feeds `shared` (an embedding of 128, no spectral norm), and block
  i's conditional norms read [shared(y), chunk i + 1] (148 wide);
* three `GenBlock`s of 384 channels, 4→8→16→32 px (`bn1`, `conv2d1` 3×3, `bn2`, `conv2d2` 3×3,
  `conv2d0` 1×1 shortcut), a `SelfAttention` after the second (`conv1x1_theta`, `conv1x1_phi`,
  `conv1x1_g`, `conv1x1_attn`, `sigma`), then `bn4` (affine batch norm), ReLU, `conv2d5` 3×3, tanh;
* conditional norm: `bn` (a batch norm without affine, ε 1e-4) · (1 + gain(c)) + bias(c), gain and bias
  spectral-normed linear maps without bias; every conv and linear map is spectral-normed by torch's
  `spectral_norm` (eps 1e-6; `weight_orig`, `weight_u`, `weight_v`), folded once at load.
* Its evaluation samples z ~ N(0, 1) (`truncation_factor` −1) and class indices; labels are class indices.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from isda_viz.errors import IsdaVizError

from .pretrained import (
    PretrainedGenerator,
    StandingNorm,
    TorchSN,
    build_pretrained,
    residual_up_block,
    self_attention,
    state_shape,
)
from .registry import LoadRequest, register_generator

BOTTOM = 4
BLOCKS = 3            # 32 px: in and out widths all 4·g_conv_dim
ATTENTION_AFTER = 2   # attn_g_loc [2]: after the second block
BN_EPS = 1e-4         # ops.batchnorm_2d's default, used for every norm of this generator


class TorchBatchNorm(StandingNorm):
    """`nn.BatchNorm2d`'s layout: `running_mean`, `running_var`, `num_batches_tracked`; `weight`, `bias` if affine."""

    def __init__(self, channels: int, affine: bool):
        super().__init__(channels, BN_EPS)
        self.register_buffer("running_mean", torch.empty(channels))
        self.register_buffer("running_var", torch.empty(channels))
        self.register_buffer("num_batches_tracked", torch.empty((), dtype=torch.long))
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.empty(channels))
            self.bias = nn.Parameter(torch.empty(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalise(x)
        return out * self.weight[:, None, None] + self.bias[:, None, None] if self.affine else out


class ConditionalNorm(nn.Module):
    """StudioGAN's `ConditionalBatchNorm2d`: `bn` (no affine), `gain`, `bias` (spectral-normed, no bias)."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.bn = TorchBatchNorm(channels, affine=False)
        self.gain = TorchSN(channels, (cond_dim,), bias=False)
        self.bias = TorchSN(channels, (cond_dim,), bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * (1 + self.gain(cond))[:, :, None, None] + self.bias(cond)[:, :, None, None]


class GenBlock(nn.Module):
    """StudioGAN's `GenBlock`: `bn1`, `bn2`, `conv2d0` (1×1 shortcut), `conv2d1`, `conv2d2` (3×3)."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int):
        super().__init__()
        self.bn1 = ConditionalNorm(cond_dim, c_in)
        self.bn2 = ConditionalNorm(cond_dim, c_out)
        self.conv2d0 = TorchSN(c_out, (c_in, 1, 1), padding=0)
        self.conv2d1 = TorchSN(c_out, (c_in, 3, 3), padding=1)
        self.conv2d2 = TorchSN(c_out, (c_out, 3, 3), padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return residual_up_block(x, cond, self.bn1, self.conv2d1, self.bn2, self.conv2d2, self.conv2d0)


class SelfAttention(nn.Module):
    """StudioGAN's generator `SelfAttention`: 1×1 convs without bias, gain `sigma (1,)`."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1x1_theta = TorchSN(channels // 8, (channels, 1, 1), bias=False, padding=0)
        self.conv1x1_phi = TorchSN(channels // 8, (channels, 1, 1), bias=False, padding=0)
        self.conv1x1_g = TorchSN(channels // 2, (channels, 1, 1), bias=False, padding=0)
        self.conv1x1_attn = TorchSN(channels, (channels // 2, 1, 1), bias=False, padding=0)
        self.sigma = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self_attention(x, self.conv1x1_theta, self.conv1x1_phi, self.conv1x1_g, self.conv1x1_attn, self.sigma)


class StudioBigGAN(nn.Module):
    """StudioGAN's 32 px BigGAN `Generator`: `z (N, 4·chunk)`, class indices `y (N,)` → `(N, 3, 32, 32)`, [-1, 1]."""

    def __init__(self, conv_dim: int, chunk: int, shared_dim: int, num_classes: int):
        super().__init__()
        width, cond_dim = 4 * conv_dim, shared_dim + chunk
        self.chunk, self.width = chunk, width
        self.linear0 = TorchSN(width * BOTTOM ** 2, (chunk,))
        self.shared = nn.Embedding(num_classes, shared_dim)
        blocks = []
        for index in range(BLOCKS):
            blocks.append(nn.ModuleList([GenBlock(width, width, cond_dim)]))
            if index + 1 == ATTENTION_AFTER:
                blocks.append(nn.ModuleList([SelfAttention(width)]))
        self.blocks = nn.ModuleList(blocks)
        self.bn4 = TorchBatchNorm(width, affine=True)
        self.conv2d5 = TorchSN(3, (width, 3, 3), padding=1)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        first, *rest = z.split(self.chunk, dim=1)
        shared = self.shared(y)
        conds = iter([torch.cat([shared, chunk], dim=1) for chunk in rest])
        h = self.linear0(first).view(len(z), self.width, BOTTOM, BOTTOM)
        for blocklist in self.blocks:
            for block in blocklist:
                h = block(h) if isinstance(block, SelfAttention) else block(h, next(conds))
        return torch.tanh(self.conv2d5(torch.relu(self.bn4(h))))


def _state(request: LoadRequest) -> dict[str, torch.Tensor] | None:
    """The generator's state dict: under "state_dict" (StudioGAN's checkpoints), or the bare dict."""
    return request.tensors("state_dict") or request.tensors()


def _is_studiogan_biggan(request: LoadRequest) -> bool:
    state = _state(request)
    return state is not None and "linear0.weight_orig" in state and "bn4.running_mean" in state


@register_generator(
    "studiogan-biggan", summary="PyTorch-StudioGAN's BigGAN for CIFAR-10",
    file="model=G_ema-best-weights-step=N.pth ({\"state_dict\": ...})", dataset="CIFAR-10", resolution="32 px",
    source="POSTECH-CVLab/PyTorch-StudioGAN README, \"Benchmark\": its Hugging Face Hub checkpoints "
           "(Mingguksky/PyTorch-StudioGAN), the CIFAR10 BigGAN run's G_ema file",
    licence="MIT (StudioGAN is MIT apart from its StyleGAN and FID parts, which this does not use)",
    command="isda-viz augment --image cat.png --classifier checkpoint.pth.tar --classifier-arch resnet110 "
            "--generator 'studiogan-biggan:model=G_ema-best-weights-step=N.pth' --out out/cat",
    recognise=_is_studiogan_biggan)
def load_studiogan_biggan(request: LoadRequest) -> PretrainedGenerator:
    """StudioGAN's CIFAR-10 BigGAN checkpoint; widths read from the file (the released one: g_conv_dim 96,
    z_dim 80, g_shared_dim 128, 10 classes)."""
    what = f"studiogan-biggan:{request.spec}"
    request.contents()  # a folder, a missing or corrupt file: its own error
    state = _state(request)
    if state is None:
        raise IsdaVizError(f"{what} holds no state dict of tensors (StudioGAN saves {{\"state_dict\": ...}})")
    net = studio_network(state, what)
    return build_pretrained(request, net, state, kind="studiogan-biggan", latent_dim=net.chunk * (BLOCKS + 1),
                            num_classes=net.shared.num_embeddings, image_size=32)


def studio_network(state: dict[str, torch.Tensor], what: str) -> StudioBigGAN:
    """An empty `StudioBigGAN` (meta device) of the widths a state dict's `linear0` and `shared` shapes say."""
    out_features, chunk = state_shape(state, "linear0.weight_orig", 2, what)
    num_classes, shared_dim = state_shape(state, "shared.weight", 2, what)
    if out_features % (4 * BOTTOM ** 2):
        raise IsdaVizError(f"{what}: linear0.weight_orig has {out_features} outputs, not a multiple of "
                           f"{4 * BOTTOM ** 2}: not StudioGAN's 32 px BigGAN")
    with torch.device("meta"):
        return StudioBigGAN(out_features // (4 * BOTTOM ** 2), chunk, shared_dim, num_classes)
