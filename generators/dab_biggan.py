"""The `dab-biggan` family: DiffAugment-BigGAN for CIFAR (mit-han-lab/data-efficient-gans,
`DiffAugment-biggan-cifar/`), its released CIFAR-10 and CIFAR-100 generators.

That folder is a fork of BigGAN-PyTorch, so the network is `biggan_pytorch.BrockBigGAN` in the
configuration its CIFAR scripts train (`scripts/*.sh` and the `utils.py` defaults): G_ch 64, dim_z 128,
no shared embedding (`G_shared` off: each conditional norm's gain and bias are per-class tables read by
the class index), no hierarchical z, no attention (`--G_attn 0`), three up-blocks 4→8→16→32 px of
256 channels, BN ε 1e-5, spectral norm ε 1e-8 (`u0`/`sv0` in the file), tanh output. Its `eval.py`
samples z ~ N(0, 1) (`z_var` 1) and, `G_eval_mode` being off, evaluates with batch statistics; the
loader's standing statistics stand in for them (see the README).

The released files (`[DiffAugment-][cr-]biggan-cifar{10,100}[-0.2|-0.1].pth`, 24 in all) are each a plain
`G_ema.state_dict()` saved by PyTorch 1.4 (the legacy, non-zip format); the class count (10 or 100) is
read from the file.
"""

from __future__ import annotations

from isda_viz.errors import IsdaVizError

from .biggan_pytorch import load_brock_generator, read_brock_layout
from .pretrained import PretrainedGenerator
from .registry import LoadRequest, register_generator

CIFAR = {"resolution": 32, "shared": False, "hier": False, "attention": None, "sn_eps": 1e-8, "bn_eps": 1e-5}
CIFAR_WIDTHS = {"ch": 64, "dim_z": 128}


def _is_dab_biggan(request: LoadRequest) -> bool:
    state = request.tensors()
    return (state is not None and "linear.u0" in state and "shared.weight" not in state
            and "output_layer.0.stored_mean" in state)


@register_generator(
    "dab-biggan", summary="DiffAugment-BigGAN for CIFAR-10/100 (mit-han-lab/data-efficient-gans)",
    file="one of its 24 .pth files, e.g. DiffAugment-biggan-cifar10.pth (a plain G_ema state dict)",
    dataset="CIFAR-10 or CIFAR-100 (the file's class count)", resolution="32 px",
    source="mit-han-lab/data-efficient-gans, DiffAugment-biggan-cifar/README.md: "
           "https://data-efficient-gans.mit.edu/models/[DiffAugment-][cr-]biggan-cifar{10,100}[-0.2|-0.1].pth",
    licence="BSD-2-Clause (that folder's LICENSE; BigGAN-PyTorch's MIT for the code it builds on)",
    command="isda-viz augment --image cat.png --classifier checkpoint.pth.tar --classifier-arch resnet110 "
            "--generator dab-biggan:DiffAugment-biggan-cifar10.pth --out out/cat",
    recognise=_is_dab_biggan)
def load_dab_biggan(request: LoadRequest) -> PretrainedGenerator:
    """A DiffAugment-BigGAN CIFAR file (widths and class count read from it; the released ones: ch 64, dim_z 128)."""
    what = f"dab-biggan:{request.spec}"
    request.contents()  # a folder, a missing or corrupt file: its own error
    state = request.tensors()
    if state is None:
        raise IsdaVizError(f"{what} holds no state dict of tensors (the released files are G_ema.state_dict())")
    layout = read_brock_layout(state, what, **CIFAR)
    return load_brock_generator(request, "dab-biggan", layout, state)
