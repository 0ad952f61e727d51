"""What the pretrained BigGAN families (`dab_biggan`, `studiogan_biggan`, `biggan_pytorch`) share.

* Spectral norm, folded once at load: each layer keeps the file's own tensors under the file's own
  names, and `fold_()` divides its weight by the σ that the original code computes in eval mode
  from the file's singular vectors (`brock_sigma`: BigGAN-PyTorch's layers, `u0`/`sv0`;
  `torch_sigma`: torch's `spectral_norm`, `weight_orig`/`weight_u`/`weight_v`). After that the
  layers are plain convolutions and linear maps: no power iteration runs while inverting.
* Batch norms (`StandingNorm`) that normalise with their stored statistics, and standing
  statistics (Brock et al. 2019, App. C.1): each norm's mean and (biased) variance averaged over
  seeded batches of the generator's own samples, the normalisation each batch saw; cached under
  the cache root beside the weight file's sha256 (`standing_statistics`).
* BigGAN's residual up-block and self-attention as functions (`residual_up_block`, `self_attention`),
  called by each family's modules with the file's own layer names.
* `load_strictly`: the file's keys and shapes against the rebuilt network's, one `IsdaVizError`
  naming the keys that differ.
* `PretrainedGenerator`: the `Generator` around a rebuilt network (labels checked, truncated prior).
"""

from __future__ import annotations

import hashlib
import math
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from isda_viz.cache import cache_dir
from isda_viz.errors import IsdaVizError
from isda_viz.runs import file_sha256, load_checkpoint, save_atomic

from .base import Generator
from .biggan import truncated_normal

STANDING_BATCHES = 16       # BigGAN-PyTorch's default number of standing-statistics accumulations
STANDING_BATCH_SIZE = 64
STANDING_SEED = 0
STANDING_FORMAT = "isda-viz-standing-statistics-1"
STANDING_CACHE = "standing-statistics"


# ------------------------------------------------------------------------------------------------- spectral norm


def brock_sigma(weight: torch.Tensor, u: torch.Tensor, eps: float) -> torch.Tensor:
    """σ of a BigGAN-PyTorch spectral-norm layer in eval mode: one power-iteration step from its stored
    `u (1, out)`, not written back: v = û W, u' = v̂ Wᵀ, σ = v Wᵀ u'ᵀ (x̂ = x / max(‖x‖, eps)),
    W = `weight` viewed as `(out, in·k·k)`. Returns a scalar tensor."""
    w = weight.reshape(weight.shape[0], -1)
    v = F.normalize(u @ w, eps=eps)
    u_new = F.normalize(v @ w.t(), eps=eps)
    return ((v @ w.t()) @ u_new.t()).squeeze()


def torch_sigma(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """σ of `torch.nn.utils.spectral_norm` in eval mode: uᵀ W v with its stored `u (out,)` and `v (in·k·k,)`,
    W = `weight` viewed as `(out, in·k·k)` (dim 0: convolutions, linear maps). Returns a scalar tensor."""
    return torch.dot(u, weight.reshape(weight.shape[0], -1) @ v)


class _Folding(nn.Module):
    """A conv (`padding` given) or linear layer whose weight is divided by its σ once (`fold_`)."""
    weight_name = "weight"

    def __init__(self, out_features: int, in_shape: tuple[int, ...], bias: bool, padding: int | None):
        super().__init__()
        self.padding = padding
        self.register_parameter(self.weight_name, nn.Parameter(torch.empty(out_features, *in_shape)))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.folded = False

    def sigma(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def fold_(self) -> None:
        """Divide the weight by σ (once; the singular vectors stay as the file had them)."""
        if not self.folded:
            weight = getattr(self, self.weight_name)
            weight.div_(self.sigma())
            self.folded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, self.weight_name)
        if self.padding is None:
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, padding=self.padding)


class BrockSN(_Folding):
    """BigGAN-PyTorch's `SNConv2d`/`SNLinear` layout: `weight`, `bias`, `u0 (1, out)`, `sv0 (1,)` (sv0 is a log)."""

    def __init__(self, out_features: int, in_shape: tuple[int, ...], bias: bool = True, padding: int | None = None,
                 eps: float = 1e-12):
        super().__init__(out_features, in_shape, bias, padding)
        self.eps = eps
        self.register_buffer("u0", torch.empty(1, out_features))
        self.register_buffer("sv0", torch.empty(1))

    def sigma(self) -> torch.Tensor:
        return brock_sigma(self.weight, self.u0, self.eps)


class TorchSN(_Folding):
    """`torch.nn.utils.spectral_norm`'s layout: `weight_orig`, `bias`, `weight_u (out,)`, `weight_v (in·k·k,)`."""
    weight_name = "weight_orig"

    def __init__(self, out_features: int, in_shape: tuple[int, ...], bias: bool = True, padding: int | None = None):
        super().__init__(out_features, in_shape, bias, padding)
        self.register_buffer("weight_u", torch.empty(out_features))
        self.register_buffer("weight_v", torch.empty(math.prod(in_shape)))

    def sigma(self) -> torch.Tensor:
        return torch_sigma(self.weight_orig, self.weight_u, self.weight_v)


def fold_spectral_norms(net: nn.Module) -> int:
    """Fold every spectral-norm layer of `net` (see `_Folding.fold_`); returns how many."""
    layers = [m for m in net.modules() if isinstance(m, _Folding)]
    for layer in layers:
        layer.fold_()
    return len(layers)


# -------------------------------------------------------------------------------------------------- batch norm


class _Accumulator:
    """Sums of per-batch means and biased variances `(C,)`, in float64."""

    def __init__(self):
        self.mean = self.var = None
        self.count = 0

    def add(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        mean, var = mean.double(), var.double()
        self.mean = mean if self.mean is None else self.mean + mean
        self.var = var if self.var is None else self.var + var
        self.count += 1


class StandingNorm(nn.Module):
    """A batch norm over `(N, C, H, W)` storing its statistics under the file's names (`mean_name`, `var_name`).

    Eval mode normalises with the stored statistics (what a frozen generator must do: one image's output
    then does not depend on the batch it is in); train mode, and the standing-statistics pass, with the
    batch's own mean and biased variance, as the original code's training mode; nothing is updated.
    """
    mean_name = "running_mean"
    var_name = "running_var"

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.channels, self.eps = channels, eps
        self.accumulator: _Accumulator | None = None

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, self.mean_name), getattr(self, self.var_name)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """`(x − mean) / √(var + eps)` per channel, `x (N, C, H, W)`."""
        if self.accumulator is None and not self.training:
            mean, var = self.statistics()
            return F.batch_norm(x, mean, var, None, None, False, 0.0, self.eps)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        if self.accumulator is not None:
            self.accumulator.add(mean, var)
        return F.batch_norm(x, mean, var, None, None, False, 0.0, self.eps)


def standing_norms(net: nn.Module) -> dict[str, StandingNorm]:
    """`{module name: norm}` of every `StandingNorm` in `net`, in module order."""
    return {name: m for name, m in net.named_modules() if isinstance(m, StandingNorm)}


def statistics_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The stored statistics of every norm, under their state-dict names."""
    state = {}
    for name, norm in standing_norms(net).items():
        prefix = f"{name}." if name else ""
        mean, var = norm.statistics()
        state[prefix + norm.mean_name], state[prefix + norm.var_name] = mean, var
    return state


@torch.no_grad()
def recompute_standing_statistics(generator: "PretrainedGenerator", batches: int = STANDING_BATCHES,
                                  batch_size: int = STANDING_BATCH_SIZE, seed: int = STANDING_SEED,
                                  progress: bool = True) -> None:
    """Set every norm's statistics to its batch mean and biased variance averaged over `batches` batches.

    Batch b draws `batch_size` latent codes from the generator's prior (`sample_latent`, its truncation)
    and uniformly random classes, all from one `torch.Generator` seeded with `seed`: same seed, same
    statistics. Each norm sees, as in the original code's training mode, the batch statistics of its input.
    """
    norms = list(standing_norms(generator).values())
    rng = torch.Generator().manual_seed(seed)
    device = generator.device
    for norm in norms:
        norm.accumulator = _Accumulator()
    try:
        for _ in tqdm(range(batches), desc=f"standing statistics ({batches} × {batch_size} samples)",
                      disable=not progress, leave=False):
            z = generator.sample_latent(batch_size, rng, device)
            y = torch.randint(generator.num_classes, (batch_size,), generator=rng).to(device)
            generator.generate(z, y)
        for norm in norms:
            mean, var = norm.statistics()
            mean.copy_(norm.accumulator.mean / norm.accumulator.count)
            var.copy_(norm.accumulator.var / norm.accumulator.count)
    finally:
        for norm in norms:
            norm.accumulator = None


def standing_statistics(generator: "PretrainedGenerator", weights: Path, batches: int = STANDING_BATCHES,
                        batch_size: int = STANDING_BATCH_SIZE, seed: int = STANDING_SEED) -> Path:
    """Give `generator` standing statistics: read from the cache, else recomputed and cached; returns the cache file.

    The cache file, `<cache root>/standing-statistics/<kind>-<key>.pt`, is keyed by the sha256 of the
    weight file and every setting that changes the result (kind, truncation, batches, batch size, seed,
    device type); an entry whose names or shapes do not fit, or that cannot be read, is recomputed.
    """
    settings = {"format": STANDING_FORMAT, "weights_sha256": file_sha256(weights), "kind": generator.kind,
                "truncation": generator.truncation, "batches": batches, "batch_size": batch_size, "seed": seed,
                "device": generator.device.type}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir(STANDING_CACHE) / f"{generator.kind}-{key}.pt"
    expected = statistics_state(generator.net)
    if path.is_file():
        try:
            entry = load_checkpoint(path, "standing-statistics cache entry")
            stored = entry["statistics"]
            if entry.get("settings") == settings and stored.keys() == expected.keys() and \
                    all(stored[k].shape == v.shape for k, v in expected.items()):
                with torch.no_grad():
                    for name, tensor in expected.items():
                        tensor.copy_(stored[name])
                return path
        except (IsdaVizError, KeyError, TypeError, AttributeError):
            pass  # a damaged or foreign entry: computed again below
    recompute_standing_statistics(generator, batches, batch_size, seed)
    save_atomic({"settings": settings, "statistics": {k: v.detach().cpu().clone()
                                                      for k, v in statistics_state(generator.net).items()}}, path)
    return path


# ------------------------------------------------------------------------------------------------ BigGAN pieces


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2× upsampling, `(N, C, H, W)` → `(N, C, 2H, 2W)` (both projects' `F.interpolate`)."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def residual_up_block(x: torch.Tensor, cond: torch.Tensor | None, bn1, conv1, bn2, conv2, shortcut) -> torch.Tensor:
    """BigGAN's generator block: h = conv2(relu(bn2(conv1(up(relu(bn1(x, c)))), c))), out = h + shortcut(up(x)).

    `x (N, C_in, H, W)` → `(N, C_out, 2H, 2W)`; `cond` is what the conditional norms read (class indices
    or a class embedding with a latent chunk).
    """
    h = conv1(upsample2(F.relu(bn1(x, cond))))
    h = conv2(F.relu(bn2(h, cond)))
    return h + shortcut(upsample2(x))


def self_attention(x: torch.Tensor, theta, phi, g, out, gain: torch.Tensor) -> torch.Tensor:
    """SA-GAN's attention as BigGAN uses it: x + gain · out(g_pooled · softmax(θᵀ φ_pooled)ᵀ).

    `x (N, C, H, W)`; θ, φ: 1×1 convs to C/8 channels, g to C/2, `out` back to C; φ and g are 2×2
    max-pooled, so each of the H·W positions attends over H·W/4 pooled ones.
    """
    n, _, h, w = x.shape
    query = theta(x).flatten(2)                               # (N, C/8, HW)
    key = F.max_pool2d(phi(x), 2).flatten(2)                  # (N, C/8, HW/4)
    value = F.max_pool2d(g(x), 2).flatten(2)                  # (N, C/2, HW/4)
    attention = F.softmax(torch.bmm(query.transpose(1, 2), key), dim=-1)   # (N, HW, HW/4)
    attended = torch.bmm(value, attention.transpose(1, 2)).view(n, -1, h, w)
    return x + gain * out(attended)


# ---------------------------------------------------------------------------------------------- strict loading


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def differing_keys(expected: dict[str, tuple], state: dict[str, torch.Tensor]) -> str | None:
    """What differs between the expected `{name: shape}` and a state dict, in words; None when nothing does."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    parts = [f"{label}: {_names(keys)}" for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    return "; ".join(parts) or None


def load_strictly(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `net` (built on the meta device) by assignment, exactly its keys and shapes.

    Floating-point tensors become float32. Anything that differs raises one `IsdaVizError` naming the keys.
    """
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    differs = differing_keys(expected, state)
    if differs:
        raise IsdaVizError(f"{what}: the keys differ from the layout's ({differs})")
    net.load_state_dict({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()},
                        strict=True, assign=True)


def state_shape(state: dict[str, torch.Tensor], key: str, ndim: int, what: str) -> tuple[int, ...]:
    """The shape of `state[key]`, which must exist with `ndim` dimensions (what a layout's widths are read from)."""
    tensor = state.get(key)
    if not isinstance(tensor, torch.Tensor):
        raise IsdaVizError(f"{what}: the keys differ from the layout's (missing: {key})")
    if tensor.dim() != ndim:
        raise IsdaVizError(f"{what}: {key} has shape {tuple(tensor.shape)}, not {ndim} dimensions")
    return tuple(tensor.shape)


# --------------------------------------------------------------------------------------------------- the wrapper


class PretrainedGenerator(Generator):
    """A rebuilt pretrained BigGAN (`net`, the file's own names) behind the `Generator` interface.

    `generate(z (N, latent_dim), y (N,) class indices)` → RGB `(N, 3, S, S)` in [-1, 1].
    `sample_latent` draws the prior: standard normal at `truncation` 1 (what the three projects
    evaluate with), else BigGAN's truncation trick (normal truncated to [−2, 2], times `truncation`).
    """
    channels = 3
    output_range = (-1.0, 1.0)

    def __init__(self, net: nn.Module, *, kind: str, latent_dim: int, num_classes: int, image_size: int,
                 truncation: float = 1.0, name: str = "generator"):
        super().__init__()
        if not 0 < truncation <= 1:
            raise IsdaVizError(f"{kind} truncation must be in (0, 1], not {truncation}")
        self.net, self.kind, self.name = net, kind, name
        self.latent_dim, self.num_classes, self.image_size = latent_dim, num_classes, image_size
        self.truncation = float(truncation)

    def generate(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """`z (N, latent_dim)`, `y (N,)` class indices in [0, num_classes) → `(N, 3, S, S)` in [-1, 1]."""
        if y is None:
            raise IsdaVizError(f"{self.name} is class-conditional: pass class labels y")
        y = torch.as_tensor(y, device=z.device).long()
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            bad = int(y.max()) if int(y.max()) >= self.num_classes else int(y.min())
            raise IsdaVizError(f"class index {bad} is beyond the {self.num_classes} classes of {self.name} "
                               f"(0–{self.num_classes - 1})")
        if z.dim() != 2 or z.shape[1] != self.latent_dim or len(z) != len(y):
            raise IsdaVizError(f"{self.name} takes z of shape (N, {self.latent_dim}) with N labels, not "
                               f"{tuple(z.shape)} with {len(y)}")
        return self.net(z, y)

    def sample_latent(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """`(n, latent_dim)` codes from the prior (standard normal, or truncated: see the class)."""
        if self.truncation == 1.0:
            z = torch.randn(n, self.latent_dim, generator=generator)
        else:
            z = truncated_normal(n, self.latent_dim, self.truncation, generator)
        return z.to(device or self.device)


def build_pretrained(request, net: nn.Module, state: dict[str, torch.Tensor], *, kind: str, latent_dim: int,
                     num_classes: int, image_size: int) -> PretrainedGenerator:
    """The loaders' common tail: strict load, spectral norms folded, the wrapper, standing statistics (or the
    file's, with `request.standing_statistics` False), frozen on `request.device`."""
    path = Path(request.spec).expanduser()
    load_strictly(net, state, f"{kind}:{path}")
    fold_spectral_norms(net)
    truncation = 1.0 if request.truncation is None else request.truncation
    generator = PretrainedGenerator(net, kind=kind, latent_dim=latent_dim, num_classes=num_classes,
                                    image_size=image_size, truncation=truncation, name=f"{kind}:{path}")
    generator = generator.to(request.device).freeze()
    if request.standing_statistics:
        standing_statistics(generator, path)
    return generator
