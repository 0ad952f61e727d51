"""BigGAN-PyTorch's generator (ajbrock/BigGAN-PyTorch, `BigGAN.py` + `layers.py`), rebuilt under its own
parameter names; the `biggan-pytorch` family: its released ImageNet 128×128 `G_ema.pth`, the BigGAN
the ISDA paper inverts through (Appendix E).

The network (facts read from that code; `dab_biggan.py` reuses it, being a fork of it):

* `linear` (spectral-normed) maps z (or its first chunk, with a hierarchical z) to `(16·4·in₀·ch)`,
  viewed as `(in₀·ch, 4, 4)`; then one residual up-block per doubling (`blocks.i.0`, with
  `conv1`, `conv2` 3×3, `conv_sc` 1×1 shortcut, class-conditional norms `bn1`, `bn2`), an attention
  block `blocks.i.1` (`theta`, `phi`, `g`, `o`, `gamma`) after the block reaching the attention
  resolution; `output_layer` = batch norm (`gain`, `bias`), ReLU, 3×3 conv to RGB; tanh.
* Class-conditional batch norm: (x − mean)/√(var + ε) · (1 + gain(c)) + bias(c), statistics in the
  buffers `stored_mean`/`stored_var`. With a shared embedding (`shared`, classes → `shared_dim`),
  c = [shared(y), z chunk] and gain/bias are spectral-normed linear maps without bias; without
  one, c is the class index and gain/bias are per-class tables (`nn.Embedding`).
* Hierarchical z: z splits into (blocks + 1) equal chunks; the first feeds `linear`, chunk i + 1 joins
  the embedding for block i.
* Every conv and linear map is spectral-normed in BigGAN-PyTorch's own layout (`u0`, `sv0`),
  folded once at load (`pretrained.brock_sigma`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from isda_viz.errors import IsdaVizError

from .pretrained import (
    BrockSN,
    PretrainedGenerator,
    StandingNorm,
    build_pretrained,
    residual_up_block,
    self_attention,
    state_shape,
)
from .registry import LoadRequest, register_generator

# Per output resolution, the blocks' input and output widths as multiples of ch (BigGAN-PyTorch's G_arch).
BLOCK_WIDTHS = {32: ((4, 4, 4), (4, 4, 4)),
                128: ((16, 16, 8, 4, 2), (16, 8, 4, 2, 1))}
BOTTOM = 4  # the spatial size `linear`'s output is viewed at


@dataclass(frozen=True)
class BrockLayout:
    """What shapes a BigGAN-PyTorch generator: widths and the structural switches of its `Generator(...)`."""
    ch: int                    # G_ch
    dim_z: int                 # after the hierarchical rounding: chunk · (blocks + 1)
    n_classes: int
    resolution: int            # 32 or 128
    shared_dim: int = 0        # 0: no shared embedding (G_shared off)
    hier: bool = False
    attention: int | None = None   # the resolution after whose block attention sits (G_attn), None: none
    bn_eps: float = 1e-5
    sn_eps: float = 1e-12

    @property
    def widths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ins, outs = BLOCK_WIDTHS[self.resolution]
        return tuple(self.ch * m for m in ins), tuple(self.ch * m for m in outs)

    @property
    def z_chunk(self) -> int:
        """What `linear` reads: the first of (blocks + 1) chunks with a hierarchical z, else all of z."""
        return self.dim_z // (len(self.widths[0]) + 1) if self.hier else self.dim_z

    @property
    def cond_dim(self) -> int:
        """The width the conditional norms' gain and bias maps read (shared embedding + z chunk)."""
        return self.shared_dim + (self.z_chunk if self.hier else 0)


class ClassConditionalNorm(StandingNorm):
    """BigGAN-PyTorch's `ccbn`: `gain`, `bias` (tables or spectral-normed maps), `stored_mean`, `stored_var`."""
    mean_name, var_name = "stored_mean", "stored_var"

    def __init__(self, channels: int, layout: BrockLayout):
        super().__init__(channels, layout.bn_eps)
        if layout.shared_dim:
            self.gain = BrockSN(channels, (layout.cond_dim,), bias=False, eps=layout.sn_eps)
            self.bias = BrockSN(channels, (layout.cond_dim,), bias=False, eps=layout.sn_eps)
        else:
            self.gain = nn.Embedding(layout.n_classes, channels)
            self.bias = nn.Embedding(layout.n_classes, channels)
        self.register_buffer("stored_mean", torch.empty(channels))
        self.register_buffer("stored_var", torch.empty(channels))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gain = 1 + self.gain(cond)[:, :, None, None]
        return self.normalise(x) * gain + self.bias(cond)[:, :, None, None]


class OutputNorm(StandingNorm):
    """BigGAN-PyTorch's unconditional `bn`: parameters `gain`, `bias`; buffers `stored_mean`, `stored_var`."""
    mean_name, var_name = "stored_mean", "stored_var"

    def __init__(self, channels: int, eps: float):
        super().__init__(channels, eps)
        self.gain = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))
        self.register_buffer("stored_mean", torch.empty(channels))
        self.register_buffer("stored_var", torch.empty(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalise(x) * self.gain[:, None, None] + self.bias[:, None, None]


class UpBlock(nn.Module):
    """`GBlock`: `conv1`, `conv2` (3×3), `conv_sc` (1×1 shortcut), `bn1`, `bn2`; doubles the resolution."""

    def __init__(self, c_in: int, c_out: int, layout: BrockLayout):
        super().__init__()
        eps = layout.sn_eps
        self.conv1 = BrockSN(c_out, (c_in, 3, 3), padding=1, eps=eps)
        self.conv2 = BrockSN(c_out, (c_out, 3, 3), padding=1, eps=eps)
        self.conv_sc = BrockSN(c_out, (c_in, 1, 1), padding=0, eps=eps)
        self.bn1 = ClassConditionalNorm(c_in, layout)
        self.bn2 = ClassConditionalNorm(c_out, layout)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return residual_up_block(x, cond, self.bn1, self.conv1, self.bn2, self.conv2, self.conv_sc)


class Attention(nn.Module):
    """`Attention`: 1×1 convs `theta`, `phi` (C/8), `g` (C/2), `o` (back to C), no biases; scalar `gamma`."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.theta = BrockSN(channels // 8, (channels, 1, 1), bias=False, padding=0, eps=eps)
        self.phi = BrockSN(channels // 8, (channels, 1, 1), bias=False, padding=0, eps=eps)
        self.g = BrockSN(channels // 2, (channels, 1, 1), bias=False, padding=0, eps=eps)
        self.o = BrockSN(channels, (channels // 2, 1, 1), bias=False, padding=0, eps=eps)
        self.gamma = nn.Parameter(torch.empty(()))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self_attention(x, self.theta, self.phi, self.g, self.o, self.gamma)


class BrockBigGAN(nn.Module):
    """BigGAN-PyTorch's `Generator`: `z (N, dim_z)`, class indices `y (N,)` → `(N, 3, R, R)` in [-1, 1]."""

    def __init__(self, layout: BrockLayout):
        super().__init__()
        self.layout = layout
        ins, outs = layout.widths
        if layout.shared_dim:
            self.shared = nn.Embedding(layout.n_classes, layout.shared_dim)
        self.linear = BrockSN(ins[0] * BOTTOM ** 2, (layout.z_chunk,), eps=layout.sn_eps)
        blocks = []
        for index, (c_in, c_out) in enumerate(zip(ins, outs)):
            block = [UpBlock(c_in, c_out, layout)]
            if layout.attention == BOTTOM * 2 ** (index + 1):
                block.append(Attention(c_out, layout.sn_eps))
            blocks.append(nn.ModuleList(block))
        self.blocks = nn.ModuleList(blocks)
        self.output_layer = nn.Sequential(OutputNorm(outs[-1], layout.bn_eps), nn.ReLU(),
                                          BrockSN(3, (outs[-1], 3, 3), padding=1, eps=layout.sn_eps))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cond = self.shared(y) if self.layout.shared_dim else y
        if self.layout.hier:
            first, *rest = z.split(self.layout.z_chunk, dim=1)
            conds = [torch.cat([cond, chunk], dim=1) for chunk in rest]
        else:
            first, conds = z, [cond] * len(self.blocks)
        h = self.linear(first).view(len(z), -1, BOTTOM, BOTTOM)
        for blocklist, block_cond in zip(self.blocks, conds):
            for block in blocklist:
                h = block(h, block_cond)
        return torch.tanh(self.output_layer(h))


def read_brock_layout(state: dict[str, torch.Tensor], what: str, *, resolution: int, shared: bool, hier: bool,
                      attention: int | None, sn_eps: float, bn_eps: float = 1e-5) -> BrockLayout:
    """The `BrockLayout` of a state dict, its widths read from the shapes of `linear.weight` and the class tables;
    the structure (resolution, shared embedding, hierarchy, attention) is the family's."""
    out_features, in_features = state_shape(state, "linear.weight", 2, what)
    per_ch = BLOCK_WIDTHS[resolution][0][0] * BOTTOM ** 2
    if out_features % per_ch:
        raise IsdaVizError(f"{what}: linear.weight has {out_features} outputs, not a multiple of {per_ch}: not a "
                           f"{resolution} px BigGAN-PyTorch generator")
    if shared:
        n_classes, shared_dim = state_shape(state, "shared.weight", 2, what)
    else:
        n_classes, shared_dim = state_shape(state, "blocks.0.0.bn1.gain.weight", 2, what)[0], 0
    slots = len(BLOCK_WIDTHS[resolution][0]) + 1
    return BrockLayout(ch=out_features // per_ch, dim_z=in_features * slots if hier else in_features,
                       n_classes=n_classes, resolution=resolution, shared_dim=shared_dim, hier=hier,
                       attention=attention, bn_eps=bn_eps, sn_eps=sn_eps)


def load_brock_generator(request: LoadRequest, kind: str, layout: BrockLayout,
                         state: dict[str, torch.Tensor]) -> PretrainedGenerator:
    """A BigGAN-PyTorch-layout file as a frozen `PretrainedGenerator` (strict, spectral norms folded)."""
    with torch.device("meta"):
        net = BrockBigGAN(layout)
    return build_pretrained(request, net, state, kind=kind, latent_dim=layout.dim_z, num_classes=layout.n_classes,
                            image_size=layout.resolution)


# The released ImageNet model's switches (scripts/launch_BigGAN_bs256x8.sh): --G_shared --shared_dim 128
# --hier --dim_z 120 --G_attn 64 --G_ch 96 --SN_eps 1e-6 --BN_eps 1e-5, 128 px.
IMAGENET = {"resolution": 128, "shared": True, "hier": True, "attention": 64, "sn_eps": 1e-6, "bn_eps": 1e-5}
IMAGENET_WIDTHS = {"ch": 96, "dim_z": 120, "n_classes": 1000, "shared_dim": 128}


def _is_biggan_pytorch(request: LoadRequest) -> bool:
    state = request.tensors()
    return state is not None and "shared.weight" in state and "linear.u0" in state


@register_generator(
    "biggan-pytorch", summary="BigGAN-PyTorch's ImageNet BigGAN, the paper's Appendix E generator",
    file="its G_ema.pth (a plain state dict)", dataset="ImageNet (1,000 classes, ImageNet's class order)",
    resolution="128 px", source="ajbrock/BigGAN-PyTorch README, \"Pretrained models\": the 138k checkpoint (or "
    "the earlier 100k one), a Google Drive archive holding G_ema.pth",
    licence="the repository is MIT; its README states no separate terms for the weights",
    command="isda-viz augment --image dog.jpg --classifier resnet50.pth --classifier-arch torchvision:resnet50 "
            "--generator biggan-pytorch:G_ema.pth --out out/dog",
    recognise=_is_biggan_pytorch)
def load_biggan_pytorch(request: LoadRequest) -> PretrainedGenerator:
    """BigGAN-PyTorch's ImageNet-128 `G_ema.pth`: hierarchical z of 120 (6 chunks of 20), shared embedding of
    128, attention at 64 px; widths read from the file (the released one: ch 96)."""
    what = f"biggan-pytorch:{request.spec}"
    request.contents()  # a folder, a missing or corrupt file: its own error
    state = request.tensors()
    if state is None:
        raise IsdaVizError(f"{what} holds no state dict of tensors (BigGAN-PyTorch saves G_ema.state_dict())")
    layout = read_brock_layout(state, what, **IMAGENET)
    return load_brock_generator(request, "biggan-pytorch", layout, state)
