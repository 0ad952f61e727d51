"""Feature inversion through a frozen generator (the paper's Appendix E, Eqs. 20-21).

Step I reconstructs a real image x with features a = f(x):

    z* = argmin_z ||f(G(z_hat)) - a||^2 + eta ||G(z_hat) - x||^2,   z_hat = (z - mean z) / std z,

from several random starts, keeping the best. Step II samples augmented
features a~ = a + eps, eps ~ N(0, lambda Sigma_y), and from z* finds
z' = argmin ||f(G(z_hat')) - a~||^2, for all images x K augmentations in one batch.

`invert_features` is the optimiser and knows nothing of generators or
classifiers: it drives a `render(z_hat) -> classifier input` and a
`featurize(input) -> (M, A)` it is handed. Both networks are frozen in eval
mode (the reference code leaves them in train mode, so batch-norm statistics
leak between images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from .errors import IsdaVizError
from .estimator import CovarianceEstimator
from .schedules import learning_rate


@dataclass
class InversionOptions:
    """How hard to search. The defaults are the fast ones; the reference schedule is 10,000 + 10,000 SGD steps.

    Step I has a reachable optimum and gets there fastest with a large, cosine-decayed Adam step
    (`bench/inversion.py`). Step II's targets lie partly outside the features any image has, and
    there a smaller step settles lower.
    """

    reconstruct_iterations: int = 200
    augment_iterations: int = 300
    restarts: int = 4
    reconstruct_lr: float = 0.2         # Adam step on z (z_hat has unit std per code)
    augment_lr: float = 0.05
    eta: float = 1.0                    # weight of the pixel term, per pixel, relative to the feature term per dim
    tolerance: float = 0.0              # stop a stage once every relative feature error is below this
    optimizer: str = "adam"             # "adam" | "sgd" (plain momentum gradient descent, as the reference)
    betas: tuple = (0.9, 0.999)         # for adam
    momentum: float = 0.9               # for sgd
    schedule: str = "cosine"            # "cosine" | "constant" | "step" (÷10 every `step_every`)
    step_every: int = 2500
    reduction: str = "sum"              # "sum" of squares (ours) | "mean" (the reference's MSE losses)


def normalize_latent(z: torch.Tensor) -> torch.Tensor:
    """z_hat = (z - mean z) / std z per code, `(M, D)` → `(M, D)`."""
    return (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True).clamp_min(1e-8)


@dataclass
class InversionTrace:
    """What one `invert_features` call found: `z (M, D)`, `images` (classifier input), `features (M, A)`,
    `objective (M,)`, `feature_error (M,)` = ||f - target|| / ||scale||, `history`: the median error after
    `iteration` updates, every 10."""

    z: torch.Tensor
    images: torch.Tensor
    features: torch.Tensor
    objective: torch.Tensor
    feature_error: torch.Tensor
    history: list[dict] = field(default_factory=list)


def _learning_rate(opts: InversionOptions, lr: float, step: int, total: int) -> float:
    return learning_rate(opts.schedule, lr, step, max(1, total), every=opts.step_every)


def invert_features(render: Callable[[torch.Tensor], torch.Tensor],
                    featurize: Callable[[torch.Tensor], torch.Tensor],
                    target: torch.Tensor, z0: torch.Tensor, iterations: int, lr: float, opts: InversionOptions,
                    pixel_target: torch.Tensor | None = None, error_scale: torch.Tensor | None = None,
                    desc: str = "inverting", progress: bool = True) -> InversionTrace:
    """Minimise ||featurize(render(z_hat)) - target||^2 (+ eta ||render(z_hat) - pixel_target||^2) over z.

    `target (M, A)`, `z0 (M, D)`, `pixel_target` like `render`'s output or None; `iterations` steps
    of `opts.optimizer` with peak step size `lr` under `opts.schedule`.
    The feature error reported is ||f - target|| / ||error_scale|| per row
    (`error_scale (M, A)`, default `target`: the relative error). Each row is an
    independent problem; the sum over rows is minimised, so rows do not interact.
    """
    z = z0.detach().clone().requires_grad_(True)
    if opts.optimizer not in ("adam", "sgd"):
        raise IsdaVizError(f"unknown optimizer '{opts.optimizer}'; choose adam or sgd")
    # One tensor, so the update is written out: torch.optim's first step imports torch._dynamo (seconds).
    first, second = torch.zeros_like(z), torch.zeros_like(z)
    scale = (target if error_scale is None else error_scale).norm(dim=1).clamp_min(1e-12)
    history = []
    bar = tqdm(range(iterations), desc=desc, disable=not progress, leave=False)
    error = torch.full((len(target),), float("inf"))
    for step in bar:
        images, _, feature_loss, objective = _objective(render, featurize, z, target, pixel_target, opts)
        (grad,) = torch.autograd.grad(objective.sum(), z)
        with torch.no_grad():
            step_lr = _learning_rate(opts, lr, step, iterations)
            if opts.optimizer == "adam":  # Kingma & Ba, bias-corrected
                b1, b2 = opts.betas
                first.mul_(b1).add_(grad, alpha=1 - b1)
                second.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (second / (1 - b2 ** (step + 1))).sqrt_().add_(1e-8)
                z.addcdiv_(first, denom, value=-step_lr / (1 - b1 ** (step + 1)))
            else:  # heavy-ball gradient descent, as the reference code
                first.mul_(opts.momentum).add_(grad)
                z.add_(first, alpha=-step_lr)
        error = feature_loss.sqrt() / scale
        median = error.median().item()
        if step % 10 == 0 or step == iterations - 1:
            history.append({"iteration": step, "median_feature_error": median})
            bar.set_postfix(median_err=f"{median:.4f}")
        if opts.tolerance and error.max().item() < opts.tolerance:
            break
    bar.close()
    with torch.no_grad():  # the state after the last step, evaluated once more
        images, features, feature_loss, objective = _objective(render, featurize, z, target, pixel_target, opts)
    return InversionTrace(z.detach(), images, features, objective, feature_loss.sqrt() / scale, history)


def _objective(render, featurize, z, target, pixel_target, opts: InversionOptions):
    """Images, features, ||f - target||^2 `(M,)` and the objective (+ eta ||image - pixel_target||^2) `(M,)`."""
    images = render(normalize_latent(z))
    features = featurize(images)
    feature_loss = (features - target).pow(2).sum(1)
    objective = feature_loss / target.shape[1] if opts.reduction == "mean" else feature_loss
    if pixel_target is not None:
        pixel = (images - pixel_target).pow(2).flatten(1)
        objective = objective + opts.eta * (pixel.mean(1) if opts.reduction == "mean" else pixel.sum(1))
    return images, features, feature_loss.detach(), objective


def sample_augmented_features(features: torch.Tensor, labels: torch.Tensor, estimator: CovarianceEstimator,
                              strength: float, k: int, generator: torch.Generator) -> torch.Tensor:
    """a~ = a + eps, eps ~ N(0, strength * Sigma_y): `features (N, A)`, `labels (N,)` → `(N, K, A)`.

    Full covariances are factorised by Cholesky with growing jitter (they are
    often singular: A can exceed the number of features seen); diagonal ones by
    per-dimension standard deviation. Noise is drawn on the CPU from `generator`.
    """
    n, a = features.shape
    noise = torch.randn(n, k, a, generator=generator, dtype=torch.float64)
    cov = estimator.covariance[labels.to(estimator.device)].detach().cpu().double()
    if estimator.diagonal:
        eps = noise * cov.clamp_min(0).sqrt()[:, None, :]
    else:
        eps = torch.einsum("nab,nkb->nka", _cholesky(cov), noise)
    return features[:, None] + (math.sqrt(strength) * eps).to(features)


def _cholesky(cov: torch.Tensor) -> torch.Tensor:
    """Lower factors L with L L^T = cov + jitter I, `(N, A, A)` float64, jitter the smallest that works."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
    base = cov.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)[:, None, None]
    for jitter in (0.0, 1e-10, 1e-8, 1e-6, 1e-4):
        factor, info = torch.linalg.cholesky_ex(cov + jitter * base * eye)
        if not info.any():
            return factor
    raise IsdaVizError("a class covariance is not positive semi-definite; the classifier run's statistics are broken")
