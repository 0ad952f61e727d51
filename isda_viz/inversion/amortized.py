"""The amortized inverter: target features → latent codes in a few feed-forward passes, one network per pair.

Every picture isda-viz draws is an inversion, ẑ with f(G(ẑ)) ≈ a target. The search (`optimizer.py`) solves
each from scratch with hundreds of gradient steps, although `augment`, `grid`, `directions` and `explore`
invert the same (classifier f, generator G) pair again and again. Like the iterative residual encoders of
GAN inversion (ReStyle, Alaluf et al. 2021; In-Domain GAN Inversion and pSp/e4e refine an encoder's code
with a few optimisation steps), `InverterNetwork` learns the inversion once per pair. Pass t sees the target
ã `(A)`, the features f_t = f(G(ẑ_t)) `(A)` of its current code, ẑ_t `(D)` itself and the class (and in
Step I, where the image x is known, the residual x − G(ẑ_t) pooled to 8×8 per channel), and moves the code:

    ẑ_{t+1} = normalize(ẑ_t + h(x_t) + U(x_t) V(x_t)ᵀ r_t / √A),

x_t the pass's inputs (standardised), r_t = (max(ã, 0) − f_t) / σ the standardised residual to the target's
reachable part (the features are averages of ReLU outputs, never negative). The second term is a learned
local pseudo-inverse of rank `rank`, linear in the residual, so the update scales with the shift asked for,
as a Gauss-Newton step J⁺ r would; h adds what is not linear in it.

* Step I (reconstruct x, a = f(x)): `reconstruct_passes` passes from a learned code per class.
* Step II (augment, ã = a + ε): `augment_passes` passes from Step I's code ẑ*, whose features are known.

`train_inverter` trains it through both networks, frozen, on the targets it will meet: real training
images' features a (with their pixels), ISDA draws ã ~ N(a, λΣ_y) with λ log-uniform over `strengths`,
traversal targets a + t √(λ e_k) u_k along the top eigen-directions, and the generator's own samples. The
loss of each pass is the search's own objective divided by the row's error scale, so the two are measured
on one scale: (‖f − a‖² + η ‖G − x‖²) / ‖a‖² in Step I, ‖f − ã‖² / ‖ã − a‖² (the squared reached-shift
error) in Step II. Each pass is trained on its own loss with its inputs detached (as ReStyle does), so a
step costs one forward and backward pass through G and f per pass and row. A fixed budget of steps, seeded:
the same seed gives the same weights on the CPU.

Nothing here knows either network: the caller hands in `render_features(ẑ (M, D), labels (M,)) →
(classifier input, features (M, A))`. `inversion.store` caches trained inverters per pair.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from isda_viz.errors import IsdaVizError
from isda_viz.inversion.optimizer import normalize_latent

RenderFeatures = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""`(ẑ (M, D), classifier labels (M,)) → (classifier input (M, C, H, W), features (M, A))`, differentiable."""

RECONSTRUCT, AUGMENT = 0.0, 1.0   # the pass's mode input: which step it serves


@dataclass
class InverterOptions:
    """How an inverter is trained: a fixed, seeded budget (about 6 min on 2 CPU cores for the shipped pair).

    Each of `steps` Adam steps (cosine-decayed from `lr`) draws `batch_size` real training images (of
    `real_images` drawn once) and `generator_fraction` as many generator samples, runs Step I's
    `reconstruct_passes` and then Step II's `augment_passes` towards one target per row: an ISDA draw
    ã ~ N(a, λΣ_y), or with probability `traversal_fraction` a traversal target a + t √(λ e_k) u_k (|t|
    uniform in [0.5, `extent`], either sign, k among the top `directions`), λ log-uniform over `strengths`.
    `eta` weighs Step I's pixel term as the search's does.
    """

    steps: int = 500
    batch_size: int = 64
    generator_fraction: float = 0.25
    reconstruct_passes: int = 4
    augment_passes: int = 3
    hidden: int = 512
    depth: int = 2
    rank: int = 16
    lr: float = 3e-3
    strengths: tuple = (0.1, 8.0)
    traversal_fraction: float = 0.25
    extent: float = 3.0
    directions: int = 5
    eta: float = 1.0
    real_images: int = 8192
    seed: int = 0

    def __post_init__(self) -> None:
        """Raise `IsdaVizError` for a budget no training can use."""
        self.strengths = tuple(float(s) for s in self.strengths)
        whole = {"steps": 1, "batch_size": 1, "reconstruct_passes": 1, "augment_passes": 1, "hidden": 1,
                 "depth": 1, "rank": 1, "directions": 1, "real_images": 1, "seed": 0}
        for name, low in whole.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise IsdaVizError(f"inverter option {name} must be a whole number >= {low}, not {value!r}")
        for name in ("generator_fraction", "lr", "traversal_fraction", "extent", "eta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise IsdaVizError(f"inverter option {name} must be a finite number >= 0, not {value!r}")
        low, high = self.strengths if len(self.strengths) == 2 else (float("nan"), 0.0)
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise IsdaVizError(f"inverter strengths must be two finite numbers 0 < low <= high, not {self.strengths}")


class InverterNetwork(nn.Module):
    """One pass of the inverter: `step(target (M, A), current (M, A), ẑ (M, D), labels (M,), mode, pixels)` → ẑ'.

    `labels` are the classifier's classes (`num_classes` of them; the class is an input, and picks Step I's
    learned start `start[label]`); `feature_mean`/`feature_std` standardise features (set from the training
    features). Step I also sees where its picture differs from the image it reconstructs: the residual
    x − G(ẑ) (classifier input, `(M, channels, H, W)`) average-pooled to `POOL`×`POOL` per channel, divided
    by `pixel_scale`, so any image size gives the same inputs; Step II has no image and sees zeros there. The
    last layer starts near zero, so an untrained inverter stays at its start.
    """

    POOL = 8

    def __init__(self, feature_dim: int, latent_dim: int, num_classes: int, hidden: int = 512, depth: int = 2,
                 rank: int = 16, channels: int = 1):
        super().__init__()
        self.feature_dim, self.latent_dim, self.num_classes, self.rank = feature_dim, latent_dim, num_classes, rank
        self.channels = channels
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.register_buffer("pixel_scale", torch.ones(()))
        self.start = nn.Parameter(torch.zeros(num_classes, latent_dim))
        inputs = 3 * feature_dim + latent_dim + num_classes + 1 + channels * self.POOL ** 2
        layers: list[nn.Module] = [nn.Linear(inputs, hidden), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, latent_dim + rank * (latent_dim + feature_dim))
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    def shape(self) -> dict:
        """What rebuilds this network: its sizes."""
        return {"feature_dim": self.feature_dim, "latent_dim": self.latent_dim, "num_classes": self.num_classes,
                "hidden": self.trunk[0].out_features, "depth": len(self.trunk) // 2, "rank": self.rank,
                "channels": self.channels}

    def starts(self, labels: torch.Tensor) -> torch.Tensor:
        """Step I's first code per row, `(M, D)`, normalised."""
        return normalize_latent(self.start[labels])

    def pooled(self, residual: torch.Tensor | None, rows: int, like: torch.Tensor) -> torch.Tensor:
        """The pixel residual `(M, channels, H, W)` as `(M, channels·POOL²)` inputs (zeros for None)."""
        if residual is None:
            return like.new_zeros(rows, self.channels * self.POOL ** 2)
        return nn.functional.adaptive_avg_pool2d(residual, self.POOL).flatten(1).to(like) / self.pixel_scale

    def step(self, target: torch.Tensor, current: torch.Tensor, z_hat: torch.Tensor, labels: torch.Tensor,
             mode: float, pixel_residual: torch.Tensor | None = None) -> torch.Tensor:
        """The next code `(M, D)` (normalised) from the target and current features `(M, A)`, the current code
        and, in Step I, the pixel residual `(M, channels, H, W)`."""
        a, d = self.feature_dim, self.latent_dim
        target_std = (target - self.feature_mean) / self.feature_std
        current_std = (current - self.feature_mean) / self.feature_std
        residual = target_std.clamp_min(-self.feature_mean / self.feature_std) - current_std
        one_hot = nn.functional.one_hot(labels.long(), self.num_classes).to(target_std)
        inputs = torch.cat([target_std, current_std, residual, z_hat, one_hot, torch.full_like(target_std[:, :1], mode),
                            self.pooled(pixel_residual, len(target), target_std)], 1)
        out = self.head(self.trunk(inputs))
        direct = out[:, :d]
        u = out[:, d:d + self.rank * d].view(-1, d, self.rank)
        v = out[:, d + self.rank * d:].view(-1, a, self.rank)
        return normalize_latent(z_hat + direct + torch.einsum("ndk,nak,na->nd", u, v, residual) / math.sqrt(a))


@dataclass
class AmortizedInverter:
    """A trained `network` and how many passes each step takes; `options` it was trained with, `info` its cost."""
    network: InverterNetwork
    reconstruct_passes: int
    augment_passes: int
    options: InverterOptions = field(default_factory=InverterOptions)
    info: dict = field(default_factory=dict)

    def reconstruct(self, render_features: RenderFeatures, target: torch.Tensor, labels: torch.Tensor,
                    pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step I's codes `(N, D)` for `target (N, A)`, the features of the images `pixels (N, C, H, W)`
        (classifier input; None: unknown), and their features `(N, A)` (no gradients)."""
        return self._passes(render_features, target, labels, self.network.starts(labels), None,
                            self.reconstruct_passes, RECONSTRUCT, pixels)

    def augment(self, render_features: RenderFeatures, wanted: torch.Tensor, labels: torch.Tensor,
                z_star: torch.Tensor, star_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step II's codes `(M, D)` for `wanted (M, A)` from normalised codes `z_star (M, D)` (ẑ*) with features
        `star_features (M, A)`."""
        return self._passes(render_features, wanted, labels, z_star, star_features, self.augment_passes, AUGMENT)

    @torch.no_grad()
    def _passes(self, render_features, target, labels, z_hat, current, passes: int, mode: float, pixels=None):
        network = self.network
        target, z_hat = target.to(network.feature_mean), z_hat.to(network.feature_mean)
        image = None
        if current is None or pixels is not None:
            image, current = render_features(z_hat, labels)
        for _ in range(passes):
            residual = None if pixels is None else pixels - image
            z_hat = network.step(target, current.to(target), z_hat, labels, mode, residual)
            image, current = render_features(z_hat, labels)
        return z_hat, current

    def export(self, render_features: RenderFeatures) -> "ExportedInverter":
        """The whole inversion as one module: `forward(target, labels, ...)` → codes (see `ExportedInverter`)."""
        return ExportedInverter(self, render_features)


class ExportedInverter(nn.Module):
    """One call for every pass: `forward(target (M, A), labels (M,), pixels=None)` → Step I's codes `(M, D)`
    (`pixels`: the images reconstructed, classifier input); with normalised codes `z_star (M, D)` (and
    optionally their `star_features`), Step II's codes from there."""

    def __init__(self, inverter: AmortizedInverter, render_features: RenderFeatures):
        super().__init__()
        self.network = inverter.network
        self.reconstruct_passes, self.augment_passes = inverter.reconstruct_passes, inverter.augment_passes
        self.render_features = render_features

    @torch.no_grad()
    def forward(self, target: torch.Tensor, labels: torch.Tensor, pixels: torch.Tensor | None = None,
                z_star: torch.Tensor | None = None, star_features: torch.Tensor | None = None) -> torch.Tensor:
        inverter = AmortizedInverter(self.network, self.reconstruct_passes, self.augment_passes)
        if z_star is None:
            return inverter.reconstruct(self.render_features, target, labels, pixels)[0]
        if star_features is None:
            star_features = self.render_features(z_star, labels)[1]
        return inverter.augment(self.render_features, target, labels, z_star, star_features)[0]


# ------------------------------------------------------------------------------------------------- training


@dataclass
class InverterData:
    """What an inverter trains on. `images (M, C, H, W)` real training images as the classifier takes them
    (normalised input: Step I's pixel target), `labels (M,)`, `features (M, A)`; per classifier class
    `factors`, square roots of Σ_c (`(C, A, A)` Cholesky or `(C, A)` diagonal standard deviations), and its
    top eigen-directions `vectors (C, K, A)` with eigenvalues `values (C, K)`; `classes`: the classes the
    generator can draw (samples are drawn among them)."""
    images: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor
    factors: torch.Tensor
    vectors: torch.Tensor
    values: torch.Tensor
    classes: list[int]


def _draw_targets(data: InverterData, features: torch.Tensor, labels: torch.Tensor, options: InverterOptions,
                  rng: torch.Generator) -> torch.Tensor:
    """One Step II target per row, `(M, A)`: ã = a + ε, ε ~ N(0, λΣ_y), or a traversal target a + t √(λ e_k) u_k."""
    m, a = features.shape
    low, high = options.strengths
    strength = torch.exp(torch.empty(m).uniform_(math.log(low), math.log(high), generator=rng))
    noise = torch.randn(m, a, generator=rng)
    factors = data.factors[labels.cpu()]
    eps = noise * factors if factors.dim() == 2 else torch.einsum("mab,mb->ma", factors, noise)
    k = torch.randint(data.vectors.shape[1], (m,), generator=rng)
    # |t| from half a standard deviation on: the loss is relative to the shift, which t near 0 makes vanish
    t = torch.empty(m).uniform_(min(0.5, options.extent), options.extent, generator=rng)
    t = t * (torch.randint(2, (m,), generator=rng) * 2 - 1)
    along = data.vectors[labels.cpu(), k] * (t * data.values[labels.cpu(), k].clamp_min(0).sqrt())[:, None]
    traverse = torch.rand(m, generator=rng) < options.traversal_fraction
    offset = torch.where(traverse[:, None], along, eps) * strength.sqrt()[:, None]
    return features + offset.to(features)


def _batch(data: InverterData, render_features: RenderFeatures, sample_latent, options: InverterOptions,
           rng: torch.Generator):
    """A training batch: real rows then generator samples; `(features, labels, pixel targets)`."""
    rows = torch.randint(len(data.labels), (options.batch_size,), generator=rng)
    features, labels, pixels = data.features[rows], data.labels[rows], data.images[rows]
    samples = int(round(options.generator_fraction * options.batch_size))
    if samples:
        z = normalize_latent(sample_latent(samples, rng, features.device))
        drawn = torch.as_tensor(data.classes)[torch.randint(len(data.classes), (samples,), generator=rng)]
        with torch.no_grad():
            sample_pixels, sample_features = render_features(z, drawn.to(features.device))
        features = torch.cat([features, sample_features])
        labels = torch.cat([labels, drawn.to(labels.device)])
        pixels = torch.cat([pixels, sample_pixels])
    return features, labels, pixels


def _training_step(network: InverterNetwork, render_features: RenderFeatures, data: InverterData, sample_latent,
                   options: InverterOptions, rng: torch.Generator) -> float:
    """Step I's passes then Step II's on one batch, each pass's loss back-propagated on its own; the loss summed."""
    features, labels, pixels = _batch(data, render_features, sample_latent, options, rng)
    total = 0.0
    z_hat = network.starts(labels)
    with torch.no_grad():
        image, current = render_features(z_hat, labels)
    scale = features.pow(2).sum(1).clamp_min(1e-12)
    for _ in range(options.reconstruct_passes):
        z_hat = network.step(features, current, z_hat.detach(), labels, RECONSTRUCT, pixels - image.detach())
        image, reached = render_features(z_hat, labels)
        pixel = (image - pixels).pow(2).flatten(1).sum(1)
        loss = ((reached - features).pow(2).sum(1) + options.eta * pixel) / scale
        loss.mean().backward()
        total += loss.mean().item()
        current = reached.detach()
    wanted = _draw_targets(data, features, labels, options, rng)
    scale = (wanted - features).pow(2).sum(1).clamp_min(1e-12)
    z_hat = z_hat.detach()
    for _ in range(options.augment_passes):
        z_hat = network.step(wanted, current, z_hat.detach(), labels, AUGMENT)
        reached = render_features(z_hat, labels)[1]
        loss = (reached - wanted).pow(2).sum(1) / scale
        loss.mean().backward()
        total += loss.mean().item()
        current = reached.detach()
    return total


def train_inverter(render_features: RenderFeatures, sample_latent, latent_dim: int, data: InverterData,
                   options: InverterOptions | None = None, progress: bool = True) -> AmortizedInverter:
    """An inverter for one pair, trained within `options`' budget (one tqdm bar showing the loss).

    `sample_latent(n, rng, device)`: the generator's prior over codes of `latent_dim`. The network's initial weights, the batches and
    the targets all come from `options.seed`, so the same seed gives the same weights (on the CPU; CUDA
    kernels may differ between runs). Returns it in eval mode without parameter gradients; its `info`
    holds the training seconds and the final loss.
    """
    options = options or InverterOptions()
    started = time.time()
    device = data.features.device
    with torch.random.fork_rng(devices=[]):  # its initial weights from the seed, not the global stream
        torch.manual_seed(options.seed)
        network = InverterNetwork(data.features.shape[1], latent_dim, data.factors.shape[0], options.hidden,
                                  options.depth, options.rank, data.images.shape[1]).to(device)
    rng = torch.Generator().manual_seed(options.seed)
    with torch.no_grad():
        network.feature_mean.copy_(data.features.mean(0))
        std = data.features.std(0)
        network.feature_std.copy_(std.clamp_min(1e-3 * float(std.max()) + 1e-12))
        pooled = nn.functional.adaptive_avg_pool2d(data.images[:1024], InverterNetwork.POOL)
        network.pixel_scale.fill_(float(pooled.std()) + 1e-12)
        network.start.copy_(normalize_latent(sample_latent(network.num_classes, rng, device)))
    adam = torch.optim.Adam(network.parameters(), lr=options.lr)
    loss = float("nan")
    with tqdm(range(options.steps), desc="training the amortized inverter", disable=not progress,
              leave=False) as bar:
        for step in bar:
            loss = _training_step(network, render_features, data, sample_latent, options, rng)
            adam.step()
            adam.zero_grad(set_to_none=True)
            for group in adam.param_groups:  # cosine decay: the last steps settle
                group["lr"] = options.lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / options.steps))
            if not math.isfinite(loss):
                raise IsdaVizError(f"training the inverter diverged at step {step} (loss {loss}); "
                                   "try a smaller learning rate")
            bar.set_postfix(loss=f"{loss:.4f}")
    network.eval().requires_grad_(False)
    info = {"seconds": round(time.time() - started, 1), "final_loss": loss, "device": str(device)}
    return AmortizedInverter(network, options.reconstruct_passes, options.augment_passes, options, info)


def options_dict(options: InverterOptions) -> dict:
    """`options` as JSON-ready values (the cache key, the report's settings)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()}
