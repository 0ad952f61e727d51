"""Feature inversion through a frozen generator: the paper's Appendix E (Eqs. 20-21).

Step I, `reconstruct` (Eq. 20): for a real image x with features a = f(x),

    z* = argmin_z ||f(G(z_hat)) - a||^2 + eta ||G(z_hat) - x||^2,   z_hat = (z - mean z) / std z,

solved from R starts per image at once; the start with the lowest objective is kept.

Step II, `augment` (Eq. 21): for augmented features a~ = a + eps, eps ~ N(0, lambda Sigma_y)
(`sample_augmented_features`), from z*,

    z' = argmin_z ||f(G(z_hat)) - a~||^2,

for all images x K augmentations in one batch; its error is measured against the shift,
||f(G(z_hat')) - a~|| / ||a~ - a||, whose lower bound for any image is `negative_target_floor`.

`invert_features` is the optimiser under both steps. Nothing here knows either
network's class: the caller hands in `render(z_hat, owner) -> classifier input`
(the generator through the adapter; `owner (M,)` says which image each row
belongs to, e.g. to pick its class label) and `featurize(input) -> (M, A)`, and
draws the starting codes from the generator's prior. Both networks are frozen
in eval mode (the reference code leaves them in train mode, so batch-norm
statistics leak between images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from isda_viz.errors import IsdaVizError
from isda_viz.isda.schedules import learning_rate


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
    reconstruct_patience: int = 0       # > 0: a row leaves Step I's batch after this many steps without improving
    augment_patience: int = 0           # the same in Step II (best-so-far is kept per row)
    min_improvement: float = 1e-3       # improving: by more than this fraction of its best objective

    @classmethod
    def make(cls, iterations: int | None = None, lr: float | None = None, optimizer: str = "adam",
             restarts: int | None = None, tolerance: float = 0.0) -> "InversionOptions":
        """The search's options from the knobs `augment`, `grid` and `directions` offer: `iterations` of
        Step I (Step II takes 3/2 as many; default 200 + 300), `restarts` random starts (default 4) and one
        `lr` for both steps (default 0.2 and 0.05 for adam)."""
        if optimizer == "sgd" and lr is None:
            # Adam's steps are scale-free; gradient descent's depend on the loss scale, so no default fits.
            raise IsdaVizError("--optimizer sgd needs --lr (gradient descent has no default step size here)")
        opts = cls(optimizer=optimizer, tolerance=tolerance)
        if restarts is not None:
            opts.restarts = restarts
        if iterations:
            opts.reconstruct_iterations, opts.augment_iterations = iterations, iterations * 3 // 2
        if lr is not None:
            opts.reconstruct_lr = opts.augment_lr = lr
        return opts


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
                    desc: str = "inverting", progress: bool = True,
                    row_render: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                    patience: int = 0) -> InversionTrace:
    """Minimise ||featurize(render(z_hat)) - target||^2 (+ eta ||render(z_hat) - pixel_target||^2) over z.

    `target (M, A)`, `z0 (M, D)`, `pixel_target` like `render`'s output or None; `iterations` steps
    of `opts.optimizer` with peak step size `lr` under `opts.schedule`.
    The feature error reported is ||f - target|| / ||error_scale|| per row
    (`error_scale (M, A)`, default `target`: the relative error). Each row is an
    independent problem; the sum over rows is minimised, so rows do not interact.

    With `patience` > 0 each row keeps its best-so-far code and leaves the batch once its objective
    has not improved by `opts.min_improvement` (relative) for `patience` steps (`_invert_early_stopping`);
    `row_render(z_hat (m, D), rows (m,))` renders a subset of the rows, so the batch shrinks (without it
    the whole batch is rendered and converged rows are only frozen).
    """
    if opts.optimizer not in ("adam", "sgd"):
        raise IsdaVizError(f"unknown optimizer '{opts.optimizer}'; choose adam or sgd")
    if patience > 0:
        return _invert_early_stopping(render, featurize, target, z0, iterations, lr, opts, pixel_target,
                                      error_scale, desc, progress, row_render, patience)
    z = z0.detach().clone().requires_grad_(True)
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
            _update(z, grad, first, second, opts, _learning_rate(opts, lr, step, iterations), step)
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


def _update(z, grad, first, second, opts: InversionOptions, step_lr: float, step: int) -> None:
    """One in-place step of `opts.optimizer` on `z` (rows independent: every operation is elementwise)."""
    if opts.optimizer == "adam":  # Kingma & Ba, bias-corrected
        b1, b2 = opts.betas
        first.mul_(b1).add_(grad, alpha=1 - b1)
        second.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (second / (1 - b2 ** (step + 1))).sqrt_().add_(1e-8)
        z.addcdiv_(first, denom, value=-step_lr / (1 - b1 ** (step + 1)))
    else:  # heavy-ball gradient descent, as the reference code
        first.mul_(opts.momentum).add_(grad)
        z.add_(first, alpha=-step_lr)


def _invert_early_stopping(render, featurize, target, z0, iterations, lr, opts: InversionOptions, pixel_target,
                           error_scale, desc, progress, row_render, patience: int) -> InversionTrace:
    """`invert_features` with per-row early stopping (from the schedule's second half on): the rows still
    improving form the batch; every row
    returns the best code it visited (by objective), so stopping early never returns a worse code than
    the one the row had when it stopped, and never a worse one than its start."""
    m = len(target)
    z_all = z0.detach().clone()
    first, second = torch.zeros_like(z_all), torch.zeros_like(z_all)
    best_z, best = z_all.clone(), torch.full((m,), float("inf"), device=z_all.device)
    stale = torch.zeros(m, dtype=torch.long, device=z_all.device)
    active = torch.arange(m, device=z_all.device)
    scale = (target if error_scale is None else error_scale).norm(dim=1).clamp_min(1e-12)
    history = []
    bar = tqdm(range(iterations + 1), desc=desc, disable=not progress, leave=False)
    for step in bar:  # step == iterations: only the objective after the last update
        rows = active if row_render is not None else torch.arange(m, device=z_all.device)
        z = z_all[rows].requires_grad_(step < iterations)
        draw = render if row_render is None else (lambda z_hat: row_render(z_hat, rows))
        with torch.set_grad_enabled(step < iterations):
            _, _, feature_loss, objective = _objective(
                draw, featurize, z, target[rows], None if pixel_target is None else pixel_target[rows], opts)
        value = objective.detach()
        if row_render is None:  # the whole batch was rendered: the active rows' part
            value, feature_loss = value[active], feature_loss[active]
        improved = value < best[active]
        best_z[active[improved]] = z_all[active[improved]]
        stale[active] = torch.where(value < best[active] * (1 - opts.min_improvement), 0, stale[active] + 1)
        best[active[improved]] = value[improved]
        error = feature_loss.sqrt() / scale[active]
        median = error.median().item()
        if step % 10 == 0 or step >= iterations - 1:
            history.append({"iteration": step, "median_feature_error": median, "active_rows": len(active)})
            bar.set_postfix(median_err=f"{median:.4f}", rows=len(active))
        if step == iterations or (opts.tolerance and error.max().item() < opts.tolerance):
            break
        # Rows that have converged leave before the step; not in the schedule's first half, where a plateau
        # is the large step oscillating, not convergence (the decayed steps after it still gain).
        keep = (stale[active] < patience) | (step < iterations // 2)
        (grad,) = torch.autograd.grad(objective.sum(), z)
        active = active[keep]
        if not len(active):
            break
        with torch.no_grad():
            grad = grad[keep] if row_render is not None else grad[active]
            zs, fs, ss = z_all[active], first[active], second[active]
            _update(zs, grad, fs, ss, opts, _learning_rate(opts, lr, step, iterations), step)
            z_all[active], first[active], second[active] = zs, fs, ss
    bar.close()
    with torch.no_grad():  # the kept codes, evaluated once more
        images, features, feature_loss, objective = _objective(render, featurize, best_z, target, pixel_target, opts)
    return InversionTrace(best_z, images, features, objective, feature_loss.sqrt() / scale, history)


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


Render = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (z_hat (M, D), owner (M,)) -> classifier input


@dataclass
class Reconstruction:
    """Step I's result per image: `z (N, D)` = z* (raw codes; the generator sees `normalize_latent(z)`),
    `images` the classifier input it renders to, `features (N, A)` its features,
    `feature_error (N,)` = ||f(G(z_hat*)) - a|| / ||a||,
    `objective (N,)`, and the search's `history` (over all starts)."""

    z: torch.Tensor
    images: torch.Tensor
    feature_error: torch.Tensor
    objective: torch.Tensor
    history: list[dict]
    features: torch.Tensor | None = None


def reconstruct(render: Render, featurize: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor,
                starts: torch.Tensor, opts: InversionOptions, pixel_target: torch.Tensor | None = None,
                progress: bool = True) -> Reconstruction:
    """Step I (Eq. 20): z* for `target (N, A)` features (and `pixel_target`, the images, `(N, ...)`),
    searched from `starts (N, R, D)`, all N·R problems in one batch; the best start per image is kept."""
    n, r = starts.shape[:2]
    owner = torch.arange(n, device=target.device).repeat_interleave(r)
    trace = invert_features(lambda z_hat: render(z_hat, owner), featurize, target.repeat_interleave(r, 0),
                            starts.flatten(0, 1), opts.reconstruct_iterations, opts.reconstruct_lr, opts,
                            pixel_target=None if pixel_target is None else pixel_target.repeat_interleave(r, 0),
                            desc="step I: reconstruct", progress=progress,
                            row_render=lambda z_hat, rows: render(z_hat, owner[rows]),
                            patience=opts.reconstruct_patience)
    best = trace.objective.view(n, r).argmin(1) + torch.arange(n, device=trace.objective.device) * r
    return Reconstruction(trace.z[best], trace.images[best], trace.feature_error[best], trace.objective[best],
                          trace.history, trace.features[best])


@dataclass
class Augmentation:
    """Step II's result: `z (N, K, D)` = z', `images (N, K, ...)` classifier input,
    `reached_shift_error (N, K)` = ||f(G(z_hat')) - a~|| / ||a~ - a||, `shift_norm (N, K)` = ||a~ - a||,
    `negative_target_floor (N, K)` (the part of the shift no image reaches), `history`."""

    z: torch.Tensor
    images: torch.Tensor
    reached_shift_error: torch.Tensor
    shift_norm: torch.Tensor
    negative_target_floor: torch.Tensor
    history: list[dict]


def augment(render: Render, featurize: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor,
            wanted: torch.Tensor, z_star: torch.Tensor, opts: InversionOptions,
            progress: bool = True, starts: torch.Tensor | None = None) -> Augmentation:
    """Step II (Eq. 21): z' for augmented features `wanted (N, K, A)` of images with `features (N, A)`,
    each of the N·K problems starting from its image's `z_star (N, D)` (or from `starts (N, K, D)`,
    e.g. the amortized inverter's), all in one batch."""
    n, k = wanted.shape[:2]
    owner = torch.arange(n, device=features.device).repeat_interleave(k)
    flat = wanted.reshape(n * k, -1)
    shift = (wanted - features[:, None]).reshape(n * k, -1)
    z0 = z_star.repeat_interleave(k, 0) if starts is None else starts.reshape(n * k, -1)
    trace = invert_features(lambda z_hat: render(z_hat, owner), featurize, flat, z0,
                            opts.augment_iterations, opts.augment_lr, opts, error_scale=shift,
                            desc="step II: augment", progress=progress,
                            row_render=lambda z_hat, rows: render(z_hat, owner[rows]),
                            patience=opts.augment_patience)
    return Augmentation(trace.z.view(n, k, -1), trace.images.view(n, k, *trace.images.shape[1:]),
                        trace.feature_error.view(n, k), shift.norm(dim=1).view(n, k),
                        negative_target_floor(flat, shift).view(n, k), trace.history)


def negative_target_floor(wanted: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """||min(a~, 0)|| / ||a~ - a|| per row, `(M, A)` → `(M,)`: a lower bound on the reached-shift error.

    Every architecture here takes its features as averages of ReLU outputs, so no image has a negative
    feature; a Gaussian a~ has some, and that part of the shift cannot be reached by any image.
    """
    return wanted.clamp(max=0).norm(dim=1) / shift.norm(dim=1).clamp_min(1e-12)


