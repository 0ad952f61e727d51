"""The run checkpoint (`RUN_DIR/checkpoint.pt`, written by `isda-viz train`): its one typed, validating reader.

`training.loop` writes it (a dict of plain tensors, lists and numbers: no pickled objects);
everything that reads one (a classifier loaded from a run, `train --resume`, the demo, the shipped
weights' maker) reads it through `read_run_checkpoint`, which checks as it reads:

- `model`: a dict of tensor weights, dense, finite, with `fc.weight (C, A)`;
- `class_names`: C distinct strings; `normalization`: `mean` and `std`, one finite number per input
  channel, std > 0; `input`: `channels` 1-4 and `size` 8-`MAX_INPUT_SIZE`;
- `config`: a dict naming the `arch`; `epoch` >= 0;
- `estimator` (ISDA runs): a `CovarianceEstimator` state of C classes and A features, finite as float32
  (`CovarianceEstimator.read_state`).

Any other content is one `IsdaVizError` naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from isda_viz.errors import IsdaVizError
from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.readers import Fields, check_class_names, check_tensor
from isda_viz.runs import CHECKPOINT, load_checkpoint

MAX_INPUT_SIZE = 1024          # pixels per side (ImageNet runs are 224)


@dataclass
class RunCheckpoint:
    """A run checkpoint as read and checked. `state`: the whole dict as read, for `train --resume` (optimizer,
    scaler, teacher, labeled indices); `estimator` on the device asked for, or None (CE runs)."""
    path: Path
    config: dict
    arch: str
    class_names: list[str]
    mean: list[float]
    std: list[float]
    channels: int
    image_size: int
    epoch: int
    model: dict
    feature_dim: int
    estimator: CovarianceEstimator | None
    state: dict


def _numbers(fields: Fields, key: str, length: int, positive: bool) -> list[float]:
    values = fields.items(key, (int, float), length=length)
    if positive and any(v <= 0 for v in values):
        fields.fail(key, f"must be > 0, not {values}")
    return [float(v) for v in values]


def read_run_checkpoint(path, device=None) -> RunCheckpoint:
    """The run checkpoint at `path` (a RUN_DIR or its checkpoint.pt), checked (see the module doc)."""
    path = Path(path)
    path = path / CHECKPOINT if path.is_dir() else path
    where = f"the run checkpoint {path}"
    state = load_checkpoint(path, "run checkpoint")
    fields = Fields(state, where, "a checkpoint of isda-viz (a dict)")
    config = fields.mapping("config")
    arch = config.text("arch", max_length=200)
    class_names = check_class_names(fields.data.get("class_names"), f"{where}: class_names")
    shape = fields.mapping("input")
    channels = shape.integer("channels", 1, 4)
    size = shape.integer("size", 8, MAX_INPUT_SIZE)
    normalization = fields.mapping("normalization")
    mean = _numbers(normalization, "mean", channels, positive=False)
    std = _numbers(normalization, "std", channels, positive=True)
    epoch = fields.integer("epoch", 0, 1 << 31)
    model = fields.data.get("model")
    if not isinstance(model, dict) or not model or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in model.items()):
        fields.fail("model", "must be a dict of named weight tensors")
    for name, tensor in model.items():
        check_tensor(tensor, f"{where}: model.{name}", dtype=None)
    fc = check_tensor(model.get("fc.weight"), f"{where}: model.fc.weight", ndim=2, dtype=None)
    if fc.shape[0] != len(class_names):
        fields.fail("class_names", f"names {len(class_names)} classes, but model.fc.weight has {fc.shape[0]} rows")
    estimator = None
    if fields.data.get("estimator") is not None:
        estimator = CovarianceEstimator.read_state(fields.data["estimator"], f"{where}: estimator",
                                                   num_features=fc.shape[1], num_classes=len(class_names),
                                                   device=device)
    for key in ("optimizer", "scaler", "teacher"):
        if fields.data.get(key) is not None and not isinstance(fields.data[key], dict):
            fields.fail(key, "must be a dict")
    return RunCheckpoint(path=path, config=config.data, arch=arch, class_names=class_names, mean=mean, std=std,
                         channels=channels, image_size=size, epoch=epoch, model=model, feature_dim=fc.shape[1],
                         estimator=estimator, state=state)


def finished_epochs(path) -> int:
    """The epochs a run checkpoint holds (0 when there is none)."""
    path = Path(path)
    return read_run_checkpoint(path).epoch if path.exists() else 0
