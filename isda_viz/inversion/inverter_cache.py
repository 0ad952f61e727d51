"""Trained amortized inverters, kept per (classifier, generator) pair: found, trained on request, saved.

An inverter is only valid for the networks it was trained through, so each is filed under a key of
everything it depends on (`inverter_key`): the classifier's weights (sha256), the generator's parameters and
buffers (`module_fingerprint`, with its kind and truncation), the class map, the training options, and the
device type and dtype it was trained on (CUDA training is not bit-reproducible, so a GPU-trained inverter
never stands in for a CPU one). It lives beside the class statistics, in `Classifier.cache_dir`/`inverters/`
(`NAME.pt`, weights only, and its key `NAME.json`, written last: a key means a complete file), or in the
user's classifier cache when that folder cannot be written. The shipped pair's inverter ships with the
package.

`find_inverter` only reads (never trains): a missing entry is None, a damaged, mismatched or foreign one
(a pickled global, NaN weights, the wrong shapes) is None with a note, and `train-inverter`
(`train_pair_inverter`) trains it again. Nothing is ever unpickled beyond tensors (`runs.load_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from isda_viz.cache import cache_dir, module_fingerprint
from isda_viz.classifiers.classifier import CLASSIFIER_CACHE
from isda_viz.classifiers.statistics import class_statistics, statistics_data
from isda_viz.errors import IsdaVizError
from isda_viz.inversion.adapter import Models
from isda_viz.inversion.amortized import (
    AmortizedInverter,
    InverterData,
    InverterNetwork,
    InverterOptions,
    options_dict,
    train_inverter,
)
from isda_viz.isda.directions import class_directions
from isda_viz.isda.sampling import covariance_factors
from isda_viz.readers import read_json
from isda_viz.runs import load_checkpoint, save_atomic, write_json_atomic

INVERTER_DIR = "inverters"
"""Folder in a classifier's cache holding trained inverters (`NAME.pt` + its key `NAME.json`)."""
FORMAT = 2
MAX_KEY_BYTES = 1 << 20          # a key file is a few KB; anything larger is not ours


def drawn_classes(models: Models) -> list[int]:
    """The classifier classes the generator can draw: all of them, or those the class map gives a class."""
    classifier = models.classifier
    if models.class_map is None or not models.generator.conditional:
        return list(range(classifier.num_classes))
    return torch.nonzero(models.class_map >= 0).flatten().tolist()


def inverter_key(models: Models, options: InverterOptions | None = None) -> dict:
    """Everything a cached inverter must match to be used (see the module's docstring); without `options`,
    what any inverter of this pair matches (every field but `options`)."""
    classifier, generator = models.classifier, models.generator
    if classifier.fingerprint is None:
        raise IsdaVizError(f"the classifier in {classifier.source} has no weights file to key an inverter by")
    # The generator's kind, not its name: a name holds the folder it was loaded from, and the same weights
    # in another checkout (or installed) must find the same inverter; its weights are in the fingerprint.
    identity = {"kind": getattr(generator, "kind", type(generator).__name__),
                "truncation": getattr(generator, "truncation", None)}
    dtype = next(iter(classifier.model.parameters())).dtype
    key = {"format": FORMAT, "classifier": str(classifier.fingerprint),
           "generator": module_fingerprint(generator, identity),
           "class_map": None if models.class_map is None else models.class_map.tolist(),
           "classes": drawn_classes(models), "num_classes": classifier.num_classes,
           "device": classifier.device.type, "dtype": str(dtype)}
    return key if options is None else {**key, "options": options_dict(options)}


def _folders(models: Models) -> list[Path]:
    """Where this pair's inverters are read from and written to, in order."""
    classifier = models.classifier
    folders = [classifier.cache_dir] if classifier.cache_dir is not None else []
    if classifier.fingerprint is not None:
        folders.append(cache_dir(CLASSIFIER_CACHE, create=False) / str(classifier.fingerprint))
    return [Path(f) / INVERTER_DIR for f in folders]


def _entry_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _read_key(path: Path) -> dict | None:
    """The key file's JSON object, or None where there is none; read as `readers.read_json` reads (a small
    regular UTF-8 file, strict JSON)."""
    if not os.path.lexists(path):
        return None
    key = read_json(path, "the inverter's key file", limit=MAX_KEY_BYTES)
    if not isinstance(key, dict):
        raise ValueError("not a JSON object")
    return key


def _read_entry(path: Path, key: dict, device) -> AmortizedInverter | None:
    """The inverter in `path` if its key is `key` (or, for a key without options, any options) and it loads
    whole; None (with a note where damaged)."""
    try:
        held = _read_key(path.with_suffix(".json"))
        if held is None or {k: v for k, v in held.items() if k in key} != key or set(held) - set(key) - {"options"}:
            return None
        state = load_checkpoint(path, "inverter cache")
        shape, passes = state["shape"], state["passes"]
        network = InverterNetwork(**{k: int(shape[k]) for k in ("feature_dim", "latent_dim", "num_classes", "hidden",
                                                                 "depth", "rank", "channels")})
        network.load_state_dict(state["state_dict"])
        options = InverterOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in held["options"].items()})
        info = {k: v for k, v in state.get("info", {}).items() if isinstance(v, (int, float, str))}
    except Exception as e:  # noqa: BLE001 - any damage (a pickled global, truncation, wrong tensors): not used
        _note(f"the cached inverter {path} is unusable ({str(e)[:120] or type(e).__name__}); "
              "`isda-viz train-inverter` trains it again")
        return None
    network = network.to(device).eval().requires_grad_(False)
    return AmortizedInverter(network, int(passes["reconstruct"]), int(passes["augment"]), options,
                             {**info, "path": str(path)})


def find_inverter(models: Models, options: InverterOptions | None = None) -> AmortizedInverter | None:
    """This pair's trained inverter, or None: never trains. With `options`, the one trained with exactly
    those; without, the most recently trained of the pair's (any training options)."""
    key = inverter_key(models, options)
    for folder in _folders(models):
        if options is not None:
            candidates = [folder / f"{_entry_name(key)}.pt"]
        else:
            try:
                candidates = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
            except OSError:
                candidates = []
        for path in candidates:
            found = _read_entry(path, key, models.classifier.device)
            if found is not None:
                return found
    return None


def save_inverter(models: Models, inverter: AmortizedInverter) -> Path:
    """Write `inverter` into the first writable cache folder of its pair; returns the `.pt` written."""
    key = inverter_key(models, inverter.options)
    name = _entry_name(key)
    network = inverter.network
    state = {"shape": network.shape(),
             "passes": {"reconstruct": inverter.reconstruct_passes, "augment": inverter.augment_passes},
             "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
             "info": {k: v for k, v in inverter.info.items() if isinstance(v, (int, float, str))}}
    failures = []
    for folder in _folders(models):
        path = folder / f"{name}.pt"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)   # no key for a file being replaced
            save_atomic(state, path)
            write_json_atomic(key, path.with_suffix(".json"))
            return path
        except (OSError, IsdaVizError) as e:
            failures.append(f"{folder} ({getattr(e, 'strerror', None) or e})")
    raise IsdaVizError("cannot save the inverter: " + "; ".join(failures))


def inverter_data(models: Models, options: InverterOptions, data_root=None, covariance: str = "full",
                  progress: bool = True) -> InverterData:
    """The real training images, features and class statistics an inverter of this pair trains on:
    `options.real_images` images drawn (seeded) from the classifier's training data (`statistics_data`:
    its dataset, or `data_root`), of the classes the generator draws."""
    classifier = models.classifier
    classes = drawn_classes(models)
    statistics = class_statistics(classifier, data_root, classes=classes, covariance=covariance, progress=progress)
    data = statistics_data(classifier, data_root, classes)
    rng = torch.Generator().manual_seed(options.seed)
    chosen = torch.randperm(len(data.images), generator=rng)[:options.real_images].tolist()
    images, labels, features = [], [], []
    with tqdm(total=len(chosen), desc="inverter: features of training images", unit="img", disable=not progress,
              leave=False) as bar:
        for start in range(0, len(chosen), 256):
            items = [data.images[i] for i in chosen[start:start + 256]]
            unit = classifier.fit_images(torch.stack([image for image, _ in items]).float() / 255)
            images.append(classifier.preprocess(unit.to(classifier.device)))
            labels.append(torch.tensor([label for _, label in items]))
            features.append(classifier.features(unit))
            bar.update(len(items))
    slots = statistics.slots(torch.arange(classifier.num_classes)) if len(statistics.classes) == \
        classifier.num_classes else None
    factors, vectors, values = _class_geometry(statistics, classifier.num_classes, options.directions, slots)
    return InverterData(torch.cat(images), torch.cat(labels).to(classifier.device), torch.cat(features),
                        factors, vectors, values, classes)


def _class_geometry(statistics, num_classes: int, k: int, slots):
    """Per classifier class, float32 on the CPU: square roots of Σ_c, top-`k` eigenvectors `(C, k, A)` and
    eigenvalues `(C, k)` (zeros for classes without statistics, never drawn)."""
    a = statistics.estimator.num_features
    diagonal = statistics.estimator.covariance.dim() == 2
    factors = torch.zeros((num_classes, a) if diagonal else (num_classes, a, a))
    vectors, values = torch.zeros(num_classes, min(k, a), a), torch.zeros(num_classes, min(k, a))
    present = torch.tensor(statistics.classes)
    roots = covariance_factors(statistics.estimator, torch.arange(len(statistics.classes))).float().cpu()
    factors[present] = roots
    for slot, c in enumerate(statistics.classes):
        top = class_directions(statistics.covariance(c), min(k, a))
        vectors[c], values[c] = top.vectors.float(), top.values.float()
    return factors, vectors, values


def train_pair_inverter(models: Models, options: InverterOptions | None = None, data_root=None,
                        covariance: str = "full", progress: bool = True) -> tuple[AmortizedInverter, Path]:
    """`isda-viz train-inverter`: train this pair's inverter (its budget in `options`) and cache it; returns it
    and the file written."""
    options = options or InverterOptions()
    cached = find_inverter(models, options)
    if cached is not None:  # the same options train the same weights: nothing to do
        cached.info["cached"] = True
        return cached, Path(cached.info["path"])
    adapter = models.adapter()
    data = inverter_data(models, options, data_root, covariance, progress)
    generator, classifier = models.generator, models.classifier

    def render_features(z_hat, labels):
        image = adapter(z_hat, labels if generator.conditional else None)
        return image, classifier.model.features(image)

    inverter = train_inverter(render_features, generator.sample_latent, generator.latent_dim, data, options,
                              progress)
    return inverter, save_inverter(models, inverter)
