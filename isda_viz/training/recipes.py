"""The paper's training recipes (Appendix A; the public code's `training_configurations`).

`--recipe paper` fills epochs, batch size, initial learning rate, schedule
(step milestones in epochs and their decay factor, or cosine), weight decay,
Nesterov, lambda0 and the covariance type from the table below for the run's
architecture and dataset; options given explicitly on the command line win.
All SGD uses momentum 0.9.

CIFAR families follow the public CIFAR code (lambda0 0.5, its default and the
paper's choice for CIFAR). Its step schedule multiplies the learning rate at
the start of 1-based epoch m for each milestone m, one epoch before
`train.scheduled_lr`'s (and torch's MultiStepLR's) "after m epochs"; we keep the latter.
ImageNet follows the public DDP script and its README: 300 epochs, global batch
512, lr 0.2 with cosine decay, weight decay 1e-4, plain momentum (no Nesterov),
diagonal covariance, lambda0 7.5 for ResNets and ResNeXts, 5 for ResNet-101 and
1 for DenseNets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

from isda_viz.data.datasets import FOLDER_DATASETS
from isda_viz.errors import IsdaVizError

RECIPE_NAMES = ["paper"]


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one family; `milestones` in epochs (None: cosine schedule)."""
    epochs: int
    batch_size: int
    lr: float
    milestones: tuple[int, ...] | None
    lr_decay: float
    weight_decay: float
    nesterov: bool
    lambda0: float
    covariance: str = "full"

    def config_values(self) -> dict:
        """The TrainConfig fields this recipe sets."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "schedule": "cosine" if self.milestones is None else "step",
                "milestones": None if self.milestones is None else list(self.milestones),
                "lr_decay": self.lr_decay, "weight_decay": self.weight_decay, "nesterov": self.nesterov,
                "lambda0": self.lambda0, "covariance": self.covariance}


# The public CIFAR code's families (the ones without an architecture here are kept for reference and reuse).
CIFAR = {
    "resnet": Recipe(160, 128, 0.1, (80, 120), 0.1, 1e-4, True, 0.5),
    "wideresnet": Recipe(240, 128, 0.1, (60, 120, 160, 200), 0.2, 5e-4, True, 0.5),
    "se_resnet": Recipe(200, 128, 0.1, (80, 120, 160), 0.1, 1e-4, True, 0.5),
    "se_wideresnet": Recipe(240, 128, 0.1, (60, 120, 160, 200), 0.2, 5e-4, True, 0.5),
    "densenet_bc": Recipe(300, 64, 0.1, (150, 200, 250), 0.1, 1e-4, True, 0.5),
    "resnext": Recipe(350, 128, 0.05, (150, 225, 300), 0.1, 5e-4, True, 0.5),
}
IMAGENET = Recipe(300, 512, 0.2, None, 0.1, 1e-4, False, 7.5, "diagonal")

# Our architectures -> the CIFAR family whose recipe they take.
CIFAR_FAMILY = {"resnet8": "resnet", "resnet20": "resnet", "resnet32": "resnet", "resnet110": "resnet",
                "wrn28_10": "wideresnet"}
CIFAR_DATASETS = ("cifar10", "cifar100")


def imagenet_lambda0(arch: str) -> float:
    """The public ImageNet code's lambda0: 1 for DenseNets, 5 for ResNet-101, 7.5 for other ResNets/ResNeXts."""
    if arch.startswith("densenet"):
        return 1.0
    return 5.0 if arch == "resnet101" else 7.5


def paper_recipe(arch: str, dataset: str) -> Recipe:
    """The paper's recipe for `arch` trained on `dataset`; `IsdaVizError` where the paper has none."""
    if dataset in CIFAR_DATASETS and arch in CIFAR_FAMILY:
        return CIFAR[CIFAR_FAMILY[arch]]
    if dataset in FOLDER_DATASETS and arch not in CIFAR_FAMILY:
        return dataclasses.replace(IMAGENET, lambda0=imagenet_lambda0(arch))
    raise IsdaVizError(f"--recipe paper has no recipe for --arch {arch} on --dataset {dataset}; it covers "
                       f"{', '.join(CIFAR_FAMILY)} on CIFAR-10/100 and the ImageNet models on imagenet/folder")


def apply_recipe(cfg, explicit: Iterable[str] = ()):
    """`cfg` (a TrainConfig) with its recipe's values, except the fields named in `explicit`.

    Returns `cfg` unchanged when `cfg.recipe` is None. The arch is resolved first
    (the dataset's default when not given), since recipes are per architecture.
    """
    if cfg.recipe is None:
        return cfg
    if cfg.recipe not in RECIPE_NAMES:
        raise IsdaVizError(f"unknown recipe '{cfg.recipe}'; choose one of: {', '.join(RECIPE_NAMES)}")
    cfg = cfg.resolved() if cfg.arch is None else cfg
    keep = set(explicit)
    values = {k: v for k, v in paper_recipe(cfg.arch, cfg.dataset).config_values().items() if k not in keep}
    if "schedule" in keep and "milestones" not in keep and cfg.schedule == "cosine":
        values.pop("milestones", None)   # an explicit cosine schedule has no milestones
    return dataclasses.replace(cfg, **values)
