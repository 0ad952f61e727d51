"""The learned start: an encoder E: features a `(A)` → latent z `(D)` for one (classifier, generator) pair.

Searching every inversion from random codes ignores that `augment`, `grid` and `directions` invert
the same pair thousands of times. Like the hybrid GAN-inversion methods (In-Domain GAN Inversion,
pSp/e4e: an encoder gives the start, a few optimisation steps refine it), `train_encoder` fits a small
MLP once on the generator's own samples, z from its prior and a = f(G(z_hat)), with two losses:

    ||E(a) - z||^2 / D                                 (the code: cheap, no network in the loop)
    ||f(G(E(a)_hat)) - a||^2 / ||a||^2                 (the features: through both frozen networks)

and `cached_encoder` keeps it in the classifier's cache folder (`Classifier.cache_dir`, beside the class
statistics), keyed by both networks' hashes and the training options, so another classifier or generator
trains a new one and a damaged cache file is rebuilt, never trusted.

Like the optimiser, nothing here knows either network: the caller hands in
`render(z_hat (M, D), labels (M,) or None) -> classifier input`, `featurize(input) -> (M, A)` and the
generator's `sample_latent(n, rng, device)`. Conditional generators: the encoder also sees the class
(one-hot over the classifier's classes), and is trained on `classes`, the classes the generator draws.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from isda_viz.cache import module_fingerprint  # noqa: F401  (what the encoder's key is made of)
from isda_viz.inversion.optimizer import normalize_latent
from isda_viz.runs import load_checkpoint, save_atomic, write_json_atomic

ENCODER_DIR = "encoders"
"""Folder in `Classifier.cache_dir` holding trained encoders (`.pt`, with their `.json` key beside)."""
FORMAT = 1


@dataclass
class EncoderOptions:
    """How an encoder is trained: a fixed budget of generator samples and steps, so the same seed gives the
    same encoder on any machine (about 20-40 s on 2 CPU cores for the shipped 28 px pair, see
    `bench/inversion.py`).

    `samples` (z, a) pairs are drawn once; `code_steps` Adam steps on the code loss alone (batches of
    `batch_size`), then `feature_steps` on code + `feature_weight` × feature loss, rendering
    `feature_batch` rows through both networks per step.
    """

    samples: int = 4096
    hidden: int = 512
    code_steps: int = 1500
    batch_size: int = 256
    feature_steps: int = 100
    feature_batch: int = 64
    feature_weight: float = 1.0
    lr: float = 1e-3
    seed: int = 0


class LatentEncoder(nn.Module):
    """`(features (M, A), labels (M,) or None)` → latent codes `(M, D)` (raw; the generator sees
    `normalize_latent` of them). Features are standardised with the training samples' mean and std;
    with `num_classes`, the class enters one-hot."""

    def __init__(self, feature_dim: int, latent_dim: int, num_classes: int | None = None, hidden: int = 512):
        super().__init__()
        self.feature_dim, self.latent_dim, self.num_classes = feature_dim, latent_dim, num_classes
        inputs = feature_dim + (num_classes or 0)
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, latent_dim))
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = (features - self.feature_mean) / self.feature_std
        if self.num_classes:
            if labels is None:
                raise ValueError("this encoder is class-conditional: pass labels")
            x = torch.cat([x, nn.functional.one_hot(labels.long(), self.num_classes).to(x.dtype)], 1)
        return self.net(x)


Render = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]   # (z_hat (M, D), labels (M,)|None) → input


def _draw_samples(render: Render, featurize, sample_latent, classes, n: int, rng: torch.Generator, device,
                  chunk: int = 256):
    """`z (n, D)`, `a (n, A)`, `labels (n,)` or None: codes from the prior and their images' features."""
    z = sample_latent(n, rng, device)
    labels = None
    if classes is not None:
        choice = torch.randint(len(classes), (n,), generator=rng)
        labels = torch.as_tensor(classes, dtype=torch.long)[choice].to(device)
    with torch.inference_mode():
        features = torch.cat([featurize(render(normalize_latent(z[i:i + chunk]),
                                               None if labels is None else labels[i:i + chunk]))
                              for i in range(0, n, chunk)])
    return z, features.clone(), labels


def train_encoder(render: Render, featurize: Callable[[torch.Tensor], torch.Tensor], sample_latent,
                  classes: list[int] | None, num_classes: int | None, options: EncoderOptions | None = None,
                  device=None, progress: bool = True) -> LatentEncoder:
    """An encoder trained on the generator's own samples within `options`' budget (one tqdm bar).

    `classes`: the classifier class indices to draw (conditional generators; `render` maps them to the
    generator's), None for unconditional ones; `num_classes`: the encoder's one-hot width (None:
    unconditional). Returns it in eval mode without parameter gradients.
    """
    options = options or EncoderOptions()
    rng = torch.Generator().manual_seed(options.seed)
    total = options.samples // 256 + options.code_steps + options.feature_steps
    bar = tqdm(total=total, desc="learned start: training the encoder", disable=not progress, leave=False)
    z, features, labels = _draw_samples(render, featurize, sample_latent, classes, options.samples, rng, device)
    bar.update(options.samples // 256)
    with torch.random.fork_rng(devices=[]):  # its initial weights from the seed too, not the global stream
        torch.manual_seed(options.seed)
        encoder = LatentEncoder(features.shape[1], z.shape[1], num_classes if classes is not None else None,
                                options.hidden).to(features.device)
    encoder.feature_mean.copy_(features.mean(0))
    encoder.feature_std.copy_(features.std(0).clamp_min(1e-3 * features.std(0).max().item() + 1e-12))
    adam = torch.optim.Adam(encoder.parameters(), lr=options.lr)
    steps = options.code_steps + options.feature_steps
    for step in range(steps):
        with_features = step >= options.code_steps
        size = options.feature_batch if with_features else options.batch_size
        rows = torch.randint(len(z), (size,), generator=rng).to(z.device)
        y = None if labels is None else labels[rows]
        predicted = encoder(features[rows], y)
        loss = (predicted - z[rows]).pow(2).mean()
        if with_features:
            reached = featurize(render(normalize_latent(predicted), y))
            relative = (reached - features[rows]).pow(2).sum(1) / features[rows].pow(2).sum(1).clamp_min(1e-12)
            loss = loss + options.feature_weight * relative.mean()
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()
        for group in adam.param_groups:  # cosine decay: the last steps settle
            group["lr"] = options.lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (step + 1) / steps)).item())
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return encoder.eval().requires_grad_(False)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def encoder_key(classifier_fingerprint: str, generator_fingerprint: str, classes: list[int] | None,
                num_classes: int | None, options: EncoderOptions) -> dict:
    """What a cached encoder must match to be reused: both networks, the classes drawn, the training options."""
    return {"format": FORMAT, "classifier": classifier_fingerprint, "generator": generator_fingerprint,
            "classes": classes, "num_classes": num_classes, "options": asdict(options)}


def _load_cached(path: Path, key: dict, device) -> LatentEncoder | None:
    """The encoder in `path` (`.pt`, its key in `.json`) if its key is `key` and it loads whole; else None."""
    key_file = path.with_suffix(".json")
    if not key_file.exists() or not path.exists():
        return None
    try:
        if json.loads(key_file.read_text()) != key:
            return None
        state = load_checkpoint(path, "encoder cache")
        shape = state["shape"]
        encoder = LatentEncoder(shape["feature_dim"], shape["latent_dim"], shape["num_classes"], shape["hidden"])
        encoder.load_state_dict(state["state_dict"])
        if not all(torch.isfinite(t).all() for t in encoder.state_dict().values()):
            raise ValueError("non-finite weights")
    except Exception as e:  # noqa: BLE001 - any damage (truncated file, wrong tensors) means: rebuild it
        _note(f"the cached encoder {path} is unreadable ({type(e).__name__}); training it again")
        return None
    return encoder.to(device).eval().requires_grad_(False)


def cached_encoder(cache_dir, key: dict, train: Callable[[], LatentEncoder], device=None,
                   log: Callable[[str], None] = _note) -> tuple[LatentEncoder, dict]:
    """The encoder cached in `cache_dir/encoders` under `key`, else `train()`'s, then saved there.

    `cache_dir`: a folder, None (no cache), or a list of folders: read from the first holding a valid
    entry, written to the first that can be written (e.g. the classifier's folder, then the user's cache
    when the weights are installed read-only). Returns the encoder and what happened: `{"cached": bool,
    "seconds": training time, "path": file or None}`. The `.pt` is written first and its key last, both
    atomically: a key means a complete file; a damaged or non-matching entry is trained again.
    """
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folders = [] if cache_dir is None else [cache_dir] if isinstance(cache_dir, (str, Path)) else list(cache_dir)
    paths = [Path(folder) / ENCODER_DIR / f"{name}.pt" for folder in folders]
    for path in paths:
        encoder = _load_cached(path, key, device)
        if encoder is not None:
            return encoder, {"cached": True, "seconds": 0.0, "path": str(path)}
    started = time.time()
    encoder = train()
    seconds = round(time.time() - started, 1)
    state = {"shape": {"feature_dim": encoder.feature_dim, "latent_dim": encoder.latent_dim,
                       "num_classes": encoder.num_classes, "hidden": encoder.net[0].out_features},
             "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()}}
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)   # no key for a file being replaced
            save_atomic(state, path)
            write_json_atomic(key, path.with_suffix(".json"))
        except OSError as e:
            log(f"the encoder is not cached in {path.parent} ({type(e).__name__})")
            continue
        return encoder, {"cached": False, "seconds": seconds, "path": str(path)}
    return encoder, {"cached": False, "seconds": seconds, "path": None}
