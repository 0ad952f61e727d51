"""Class covariances from elsewhere (`--covariance-file F`): Σ_y estimated by another method, used as is.

Methods that estimate the class covariances differently (meta-learned, as in MetaSAug; transferred
between classes, as in TSA) hand isda-viz a file of them; it replaces the statistics pass (and a
classifier's own statistics). Formats:

- `.npy`: the covariances, an array `(C, A, A)` (full) or `(C, A)` (diagonal: per-feature variances);
- `.pt` (read with `weights_only=True`) or `.safetensors`: that tensor alone, or a dict with
  `covariance` and optionally `mean (C, A)`, the class means (default zeros: augmentation uses
  only Σ, a~ = a + eps, eps ~ N(0, λ Σ_y)).

Checked against the classifier (C classes, A features): a regular file no larger than such
statistics can be (`largest_file`, before it is read), dense, finite as float32 (the dtype they
are used in), and for full matrices symmetric and positive semi-definite within `TOLERANCE` of the
largest entry / eigenvalue (variances >= 0 for a diagonal); anything else is a one-line
`IsdaVizError`. The file's Σ is symmetrised ((Σ + Σᵀ) / 2), a class with negative eigenvalues
within the tolerance but beyond round-off (`PROJECT_BELOW`) is replaced by its nearest PSD matrix
(those eigenvalues set to 0), and Σ
is held as a `CovarianceEstimator` of count 1 per class, so its `covariance` is float32(Σ).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from isda_viz.classifiers.safe_load import SAFETENSORS_SUFFIX, load_safetensors
from isda_viz.errors import IsdaVizError
from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.readers import check_tensor, regular_file

COVARIANCE_SUFFIXES = (".pt", ".pth", ".npy", SAFETENSORS_SUFFIX)
TOLERANCE = 1e-4
"""Relative tolerance of the symmetry and PSD checks (float32 round-off of an estimate is ~1e-7)."""
PROJECT_BELOW = 1e-5
"""A class whose smallest eigenvalue is below -PROJECT_BELOW x its largest (yet within `TOLERANCE`) is replaced by
its nearest PSD matrix; above, negative eigenvalues are the round-off of a singular estimate, kept as they are."""
_EIGEN_CHUNK_BYTES = 256 * 2**20


def largest_file(num_classes: int, feature_dim: int) -> int:
    """The most bytes a covariance file for C classes and A features can hold: float64 covariances `(C, A, A)`
    and means `(C, A)`, plus 1% and 1 MB for the container; a larger file is refused before it is read."""
    return int(8 * num_classes * feature_dim * (feature_dim + 1) * 1.01) + (1 << 20)


def _read_arrays(path: Path, option: str, limit: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(covariance, mean or None)` as float64 CPU tensors, from a `.npy`, `.pt` or `.safetensors` file of at most
    `limit` bytes (a regular file: a FIFO or a device is refused from its stat)."""
    suffix = path.suffix.lower()
    if suffix not in COVARIANCE_SUFFIXES:
        raise IsdaVizError(f"{option} {path}: use a .npy, .pt or .safetensors file, not {suffix or 'no suffix'}")
    regular_file(path, option, limit)
    try:
        if suffix == ".npy":
            held = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == SAFETENSORS_SUFFIX:
            held = load_safetensors(path, option)
        else:
            held = torch.load(path, map_location="cpu", weights_only=True)
    except IsdaVizError:
        raise
    except Exception as e:
        raise IsdaVizError(f"{option} {path} is not a readable {suffix} file of tensors "
                           f"({type(e).__name__})") from None
    if isinstance(held, Mapping):
        if not isinstance(held.get("covariance"), torch.Tensor):
            raise IsdaVizError(f"{option} {path} holds {', '.join(sorted(map(str, held))[:5])}: it needs a "
                               "'covariance' tensor (and optionally 'mean')")
        mean = held.get("mean")
        if mean is not None and not isinstance(mean, torch.Tensor):
            raise IsdaVizError(f"{option} {path}: 'mean' must be a tensor")
        held = (held["covariance"], mean)
    elif isinstance(held, torch.Tensor):
        held = (held, None)
    else:
        raise IsdaVizError(f"{option} {path} holds a {type(held).__name__}, not a tensor of covariances")
    for name, t in zip(("the covariances", "'mean'"), held):
        if t is not None:
            check_tensor(t, f"{option} {path}: {name}", dtype=None, finite=False)
    if not all(t is None or t.is_floating_point() for t in held):
        raise IsdaVizError(f"{option} {path}: covariances and means must be floating point")
    return tuple(None if t is None else t.to(torch.float64) for t in held)


def check_covariances(covariance: torch.Tensor, num_classes: int, feature_dim: int, where: str) -> torch.Tensor:
    """`covariance (C, A, A)` or `(C, A)` checked (shape, finite, symmetric, PSD), float64, symmetrised."""
    c, a = num_classes, feature_dim
    if tuple(covariance.shape) not in ((c, a, a), (c, a)):
        raise IsdaVizError(f"{where} has shape {tuple(covariance.shape)}; the classifier needs ({c}, {a}, {a}) "
                           f"(full) or ({c}, {a}) (diagonal): {c} classes, {a} features")
    used = covariance.float()  # the dtype augmentation uses: 1e40 is finite in float64, inf in float32
    if not torch.isfinite(used).all():
        bad = int(torch.nonzero(~torch.isfinite(used.flatten(1)).all(1))[0])
        raise IsdaVizError(f"{where}: the covariance of class {bad} has non-finite entries as float32 "
                           "(inf, NaN, or beyond 3.4e38)")
    scale = covariance.abs().flatten(1).amax(1).clamp_min(torch.finfo(torch.float64).tiny)     # (C,)
    if covariance.dim() == 2:
        low = covariance.amin(1)
        bad = torch.nonzero(low < -TOLERANCE * scale).flatten()
        if len(bad):
            raise IsdaVizError(f"{where}: class {int(bad[0])} has a negative variance ({float(low[bad[0]]):.4g})")
        return covariance.clamp_min(0)
    asymmetry = (covariance - covariance.transpose(1, 2)).abs().flatten(1).amax(1)
    bad = torch.nonzero(asymmetry > TOLERANCE * scale).flatten()
    if len(bad):
        k = int(bad[0])
        raise IsdaVizError(f"{where}: the covariance of class {k} is not symmetric (|Σ - Σᵀ| up to "
                           f"{float(asymmetry[k]):.4g}, largest entry {float(scale[k]):.4g})")
    covariance = (covariance + covariance.transpose(1, 2)) / 2
    chunk = max(1, _EIGEN_CHUNK_BYTES // (8 * a * a))  # classes per eigvalsh call: bounded workspace
    for start in range(0, c, chunk):
        values = torch.linalg.eigvalsh(covariance[start:start + chunk])                      # (k, A) ascending
        floor = -TOLERANCE * values[:, -1].abs().clamp_min(float(scale[start:start + chunk].max()) * 1e-12)
        bad = torch.nonzero(values[:, 0] < floor).flatten()
        if len(bad):
            k = int(bad[0])
            raise IsdaVizError(f"{where}: the covariance of class {start + k} is not positive semi-definite "
                               f"(eigenvalues from {float(values[k, 0]):.4g} to {float(values[k, -1]):.4g})")
        negative = torch.nonzero(values[:, 0] < -PROJECT_BELOW * values[:, -1].abs()).flatten()
        if len(negative):  # within tolerance but beyond round-off: the nearest PSD matrix, which sampling can factor
            block = covariance[start + negative]
            eigenvalues, vectors = torch.linalg.eigh(block)
            covariance[start + negative] = (vectors * eigenvalues.clamp_min(0)[:, None]) @ vectors.transpose(1, 2)
    return covariance


def read_covariance_file(path, num_classes: int, feature_dim: int, device=None,
                         option: str = "--covariance-file") -> CovarianceEstimator:
    """The class covariances in `path` as a `CovarianceEstimator` (C classes, A features) on `device`.

    `covariance` of the result is float32 of the file's (symmetrised) Σ, `mean` the file's means
    (zeros if it has none), `count` 1 per class. `option` names the flag in errors.
    """
    path = Path(str(path)).expanduser()
    covariance, mean = _read_arrays(path, option, largest_file(num_classes, feature_dim))
    covariance = check_covariances(covariance, num_classes, feature_dim, f"{option} {path}")
    if mean is None:
        mean = torch.zeros(num_classes, feature_dim, dtype=torch.float64)
    elif tuple(mean.shape) != (num_classes, feature_dim):
        raise IsdaVizError(f"{option} {path}: 'mean' has shape {tuple(mean.shape)}, the classifier needs "
                           f"({num_classes}, {feature_dim})")
    elif not torch.isfinite(mean.float()).all():
        raise IsdaVizError(f"{option} {path}: 'mean' has non-finite entries as float32 (inf, NaN, or "
                           "beyond 3.4e38)")
    return CovarianceEstimator.from_moments(mean, covariance, torch.ones(num_classes), device=device)
