"""`fit`: train a classifier with the ISDA loss (or plain cross-entropy, or explicit SDA), resumably,
supervised or semi-supervised.

The schedule follows the paper's Appendix A: SGD with momentum 0.9 (Nesterov by
default), learning rate by cosine (default) or step decay, and lambda = lambda0 * t / T,
with t/T the fraction of training done (per iteration, so short runs augment too).
Every epoch ends with an atomic checkpoint; the shuffling and augmentation of
epoch e are drawn from a generator seeded by (seed, e), so a run killed and
resumed ends bit-identical to one that was never interrupted.

Losses (`training_loss`, one step's policy): `isda` is Eq. 7, `ce` plain
cross-entropy, `explicit` Eq. 5 with `samples` sampled features per image; `isda`
and `explicit` use the same online covariance estimator and lambda schedule.

Semi-supervised runs (`labeled` = N): N class-balanced labels are kept
(`data.labeled_subset`, seeded by `seed`; the indices are saved in the
checkpoint), the rest of the training set is unlabeled. An epoch is one pass
over the unlabeled images; every global batch holds `labeled_batch` labeled
images (drawn from seeded random orders of the labeled set, laid end to end)
followed by `batch_size - labeled_batch` unlabeled ones (`ssl_batches`). The
loss is Eq. 19:

    L = L_sup(labeled) + r(t) * (eta1 * L_ISDA-U(unlabeled) + eta2 * L_base(all images)),

with L_sup the supervised loss above, L_ISDA-U the bound of Eq. 15
(`isda.semi_supervised_isda_loss`) and L_base the base method's consistency:
`pi` (Laine & Aila's Π-model: mean squared difference, averaged over classes,
between the softmax outputs of two augmentations of every image of the batch,
gradients through both) or `mean-teacher` (Tarvainen & Valpola: the same
between the student on one augmentation and an exponential moving average of
the student, the teacher, on another; the teacher gets no gradient). r(t) is
the sigmoid ramp-up exp(-5 (1 - t / rampup)^2) over the first `rampup`
fraction of training, on both unlabeled terms. The prediction p that Eq. 15
holds constant is the base method's target: the teacher's softmax (mean
teacher), the softmax of the other augmentation (Π), or the model's own
detached softmax of the same view (`none`; Eq. 15 then has zero gradient at
lambda = 0 and acts only through the augmentation). The pseudo label is
argmax p (Eq. 12). The covariance estimator sees labeled features only, so
Sigma of a pseudo label is estimated from labeled data.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from isda_viz import distributed
from isda_viz._version import __version__
from isda_viz.bounds import check_seed, derived_seed
from isda_viz.classifiers.networks import build_model
from isda_viz.classifiers.run_checkpoint import read_run_checkpoint
from isda_viz.data.batches import augment_batch, item_seed, iterate_batches, labeled_subset
from isda_viz.data.datasets import FOLDER_DATASETS, DatasetSpec, TensorImages, dataset_spec, load_split
from isda_viz.data.images import normalize
from isda_viz.devices import native_bf16, pick_device, use_deterministic, use_fast_kernels
from isda_viz.errors import IsdaVizError, require_finite
from isda_viz.isda.estimator import CovarianceEstimator, check_covariance
from isda_viz.isda.loss import isda_loss
from isda_viz.isda.sampling import expected_cross_entropy_mc, explicit_sda_loss
from isda_viz.isda.schedules import isda_strength, learning_rate, sigmoid_rampup, step_lr
from isda_viz.isda.semi import semi_supervised_isda_loss
from isda_viz.runs import (
    CHECKPOINT,
    append_jsonl,
    guarded_run_dir,
    open_run_dir,
    read_jsonl,
    save_atomic,
    truncate_metrics,
    write_json_atomic,
)

LOSSES = ("isda", "ce", "explicit")
_BAR_EVERY = 20   # steps between progress-bar updates (each reads the running sums from the device)
SSL_METHODS = ("none", "pi", "mean-teacher")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as the run's `config.json`."""
    out: str
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    arch: str | None = None            # None: the dataset's default (resnet32; resnet50 for ImageNet)
    loss: str = "isda"                 # "isda" (Eq. 7), "ce" or "explicit" (Eq. 5, `samples` per image)
    lambda0: float = 0.5
    covariance: str | None = None      # "full" | "diagonal"; None: the dataset's default
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 1e-4
    schedule: str = "cosine"           # "cosine" | "step" (x lr_decay after each milestone; x0.1 at 50%, 75%)
    milestones: list[int] | None = None  # step schedule: epochs after which the lr is multiplied by lr_decay
    lr_decay: float = 0.1
    nesterov: bool = True
    recipe: str | None = None          # "paper": the values above came from `recipes.apply_recipe`
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    device: str | None = None          # not part of the run's identity
    deterministic: bool = False        # CUDA: deterministic kernels, no TF32 (devices.use_deterministic); a setting
    workers: int = 0
    amp: str | None = None             # "bf16" | "fp16" | "off"; None: bf16 on CUDA where supported, else off
    sync_bn: bool = False              # under torchrun: batch-norm statistics of the global batch
    samples: int = 1                   # explicit SDA: augmented features sampled per image and step
    # semi-supervised (see the module docstring)
    labeled: int | None = None         # keep this many labels (class-balanced); None: supervised
    labeled_batch: int | None = None   # labeled images per global batch; None: half of batch_size
    ssl: str = "none"                  # base consistency method: "none" | "pi" | "mean-teacher"
    eta1: float = 1.0                  # weight of the ISDA consistency term (Eq. 15 in Eq. 19)
    eta2: float = 10.0                 # weight of the base method's consistency term
    rampup: float = 0.3                # sigmoid ramp-up of both unlabeled terms over this fraction of training
    ema_decay: float = 0.99            # mean teacher: teacher = decay * teacher + (1 - decay) * student
    # bound tightness (Fig. 9)
    track_bound: bool = False          # log `bound` and `expected_ce_mc` per epoch
    bound_samples: int = 1000          # Monte-Carlo draws per image
    bound_subset: int = 500            # fixed (labeled) training images, a seeded random subset
    skip_bad_images: bool = False      # image folders: skip unreadable files and empty classes (with a note)

    def __post_init__(self) -> None:
        """One-line `IsdaVizError`s for option values and combinations no run can use."""
        require_finite({"--lambda0": self.lambda0, "--lr": self.lr, "--weight-decay": self.weight_decay,
                        "--lr-decay": self.lr_decay, "--eta1": self.eta1, "--eta2": self.eta2,
                        "--rampup": self.rampup, "--ema-decay": self.ema_decay})
        check_seed(self.seed)
        if self.loss not in LOSSES:
            raise IsdaVizError(f"unknown loss '{self.loss}'; choose {', '.join(LOSSES)}")
        if self.covariance is not None:
            check_covariance(self.covariance)
        if self.schedule not in ("cosine", "step"):
            raise IsdaVizError(f"unknown schedule '{self.schedule}'; choose cosine or step")
        if self.ssl not in SSL_METHODS:
            raise IsdaVizError(f"unknown --ssl '{self.ssl}'; choose {', '.join(SSL_METHODS)}")
        if self.samples < 1:
            raise IsdaVizError(f"--samples must be at least 1, got {self.samples}")
        if self.labeled is None and self.ssl != "none":
            raise IsdaVizError(f"--ssl {self.ssl} is semi-supervised: give --labeled N, the number of labels to keep")
        if self.labeled is not None:
            if self.dataset in FOLDER_DATASETS:
                raise IsdaVizError("--labeled works with the in-memory datasets (fashion-mnist, cifar10, cifar100)")
            if not 1 <= labeled_batch_size(self) < self.batch_size:
                raise IsdaVizError(f"--labeled-batch must be between 1 and --batch-size - 1 ({self.batch_size - 1}), "
                                   f"got {labeled_batch_size(self)}")
            if not 0 <= self.ema_decay < 1 or not 0 <= self.rampup <= 1 or self.eta1 < 0 or self.eta2 < 0:
                raise IsdaVizError("--ema-decay must lie in [0, 1), --rampup in [0, 1], --eta1 and --eta2 be >= 0")
        if self.track_bound:
            if self.loss == "ce":
                raise IsdaVizError("--track-bound compares the ISDA loss with the expectation it bounds; "
                                   "use it with --loss isda or explicit")
            if self.bound_samples < 2 or self.bound_subset < 1:
                raise IsdaVizError("--bound-samples must be at least 2 and --bound-subset at least 1")

    def resolved(self) -> "TrainConfig":
        spec = dataset_spec(self.dataset, self.data_root)
        return dataclasses.replace(self, arch=self.arch or spec.default_arch,
                                   covariance=self.covariance or spec.default_covariance)


def scheduled_lr(cfg: TrainConfig, progress: float) -> float:
    """The learning rate at `progress` = t/T in [0, 1]: cosine, or step decay (x `lr_decay` from the first
    iteration after each of `milestones` epochs, as torch's MultiStepLR; without milestones x0.1 at 50% and 75%)."""
    if cfg.schedule == "step" and cfg.milestones:
        return step_lr(cfg.lr, sum(progress * cfg.epochs >= m for m in cfg.milestones), cfg.lr_decay)
    return learning_rate(cfg.schedule, cfg.lr, progress)


def amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `--amp` (None: float32 throughout) on `device` (the GPU asked for, `cuda:N`).
    CPU always runs in float32."""
    if amp not in (None, "off", "bf16", "fp16"):
        raise IsdaVizError(f"unknown --amp '{amp}'; choose bf16, fp16 or off")
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            raise IsdaVizError(f"--amp {amp} needs a CUDA device; CPU training runs in float32 (--amp off)")
        return None
    if amp is None:  # bf16 only where the GPU computes in it: emulated bf16 (sm_75) is slower than float32
        return torch.bfloat16 if native_bf16(device) else None
    if amp == "bf16" and not native_bf16(device):
        raise IsdaVizError(f"--amp bf16: {device} has no native bfloat16 (compute capability 8.0 or later); "
                           "use --amp fp16 or off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def evaluate(model, dataset, mean, std, device, batch_size: int = 500, amp: torch.dtype | None = None,
             workers: int = 0) -> float:
    """Top-1 accuracy in [0, 1] of `model` on a dataset of uint8 images (sharded over ranks under torchrun).

    Image folders are decoded by `workers` processes (kept alive between epochs) into pinned memory on CUDA;
    the count stays on the device until the end (one synchronisation per evaluation, not per batch)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    shard = (distributed.rank(), distributed.world_size()) if distributed.active() else None
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        for images, labels in iterate_batches(dataset, batch_size, shuffle=False, shard=shard, num_workers=workers,
                                              pin_memory=device.type == "cuda"):
            if len(labels) == 0:
                continue
            x = normalize(images.to(device, non_blocking=True).float() / 255, mean, std)
            correct += (model(x).argmax(1) == labels.to(device, non_blocking=True)).sum()
    correct, = distributed.all_sum([int(correct)])
    return correct / max(1, len(dataset))


def _open_run_dir(cfg: TrainConfig, resume: bool, num_classes: int, log) -> tuple[TrainConfig, dict | None]:
    """Check `cfg.out`, load the checkpoint to resume (None for a new run), write config.json.

    Returns the config to train with (the saved one when resuming, with the new
    epochs and this machine's settings) and the checkpoint.
    """
    out = Path(cfg.out)
    match = {"arch": cfg.arch, "dataset": cfg.dataset, "loss": cfg.loss}
    if cfg.labeled is not None:
        match.update(labeled=cfg.labeled, ssl=cfg.ssl)
    ckpt = open_run_dir(out, CHECKPOINT, resume, match, read=lambda path: read_run_checkpoint(path).state)
    if ckpt is not None:
        if len(ckpt.get("class_names", [])) != num_classes:
            raise IsdaVizError(f"{out / CHECKPOINT} holds a run with {len(ckpt.get('class_names', []))} classes, "
                               f"the dataset has {num_classes}; choose another --out")
        cfg = dataclasses.replace(TrainConfig(**ckpt["config"]), epochs=cfg.epochs, device=cfg.device, out=cfg.out,
                                  workers=cfg.workers, amp=cfg.amp, deterministic=cfg.deterministic)
        truncate_metrics(out / "metrics.jsonl", "epoch", ckpt["epoch"])  # lines of an epoch whose checkpoint never landed
        log(f"resuming {out} at epoch {ckpt['epoch']}/{cfg.epochs}")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({**dataclasses.asdict(cfg), "isda_viz_version": __version__, "torch": torch.__version__},
                      out / "config.json")
    return cfg, ckpt


def labeled_batch_size(cfg: TrainConfig) -> int:
    """Labeled images per global batch of a semi-supervised run (the rest of `batch_size` is unlabeled)."""
    return cfg.labeled_batch if cfg.labeled_batch is not None else cfg.batch_size // 2


def ssl_batches(dataset: TensorImages, labeled_idx: torch.Tensor, unlabeled_idx: torch.Tensor, labeled_batch: int,
                unlabeled_batch: int, generator: torch.Generator):
    """One epoch of semi-supervised global batches: `(images (B_l + b_u, C, H, W) uint8, labels (B_l,), b_u)`.

    The epoch is one pass over `unlabeled_idx` in a random order, `unlabeled_batch` per step (the last
    step may hold fewer); each step's `labeled_batch` labeled images come first, taken in turn from random
    orders of `labeled_idx` laid end to end (a fresh order whenever the set is used up). Both orders are
    drawn from `generator` before the first batch, so the epoch is fixed by its seed.
    """
    steps = math.ceil(len(unlabeled_idx) / unlabeled_batch)
    unlabeled_order = unlabeled_idx[torch.randperm(len(unlabeled_idx), generator=generator)]
    passes = math.ceil(steps * labeled_batch / len(labeled_idx))
    labeled_order = torch.cat([labeled_idx[torch.randperm(len(labeled_idx), generator=generator)]
                               for _ in range(passes)])
    for step in range(steps):
        lab = labeled_order[step * labeled_batch:(step + 1) * labeled_batch]
        unl = unlabeled_order[step * unlabeled_batch:(step + 1) * unlabeled_batch]
        yield dataset.images[torch.cat([lab, unl])], dataset.labels[lab], len(unl)


@dataclass
class BatchPlan:
    """How an epoch is cut into global batches: supervised (every training image, `batch_size` at a time) or
    semi-supervised (`labeled_batch` labeled + `unlabeled_batch` unlabeled images per step, see `ssl_batches`)."""

    labeled_idx: torch.Tensor               # (N_l,) training indices whose labels are used
    unlabeled_idx: torch.Tensor | None      # (N_u,) the others; None in supervised runs
    labeled_batch: int
    unlabeled_batch: int
    steps_per_epoch: int


def _batch_plan(cfg: TrainConfig, train_set, num_classes: int) -> BatchPlan:
    """The run's `BatchPlan`; `IsdaVizError` when a batch would leave some rank without images."""
    world = distributed.world_size()
    if cfg.labeled is None:
        if world > len(train_set) % cfg.batch_size > 0:
            raise IsdaVizError(f"the last batch would hold {len(train_set) % cfg.batch_size} images for "
                               f"{world} ranks; change --batch-size or --limit-train")
        return BatchPlan(torch.arange(len(train_set)), None, cfg.batch_size, 0,
                         math.ceil(len(train_set) / cfg.batch_size))
    labeled_idx, unlabeled_idx = labeled_subset(train_set.labels, cfg.labeled, cfg.seed, num_classes)
    labeled_batch = labeled_batch_size(cfg)
    unlabeled_batch = cfg.batch_size - labeled_batch
    if len(unlabeled_idx) == 0:
        raise IsdaVizError(f"--labeled {cfg.labeled} keeps every training image labeled; nothing is unlabeled")
    if world > labeled_batch or world > unlabeled_batch or world > len(unlabeled_idx) % unlabeled_batch > 0:
        raise IsdaVizError(f"every one of the {world} ranks needs labeled and unlabeled images in every batch; "
                           "change --batch-size, --labeled-batch or --limit-train")
    return BatchPlan(labeled_idx, unlabeled_idx, labeled_batch, unlabeled_batch,
                     math.ceil(len(unlabeled_idx) / unlabeled_batch))


@dataclass
class Views:
    """This rank's part of one global training batch, normalised on the device: labeled rows first."""
    x: torch.Tensor                 # (n_l + n_u, C, H, W)
    y: torch.Tensor                 # (n_l,) labels of the labeled rows
    second: torch.Tensor | None     # (n_l + n_u, C, H, W): another augmentation of the same images (Π, mean teacher)
    global_labeled: int             # labeled images in the whole global batch (all ranks)
    global_unlabeled: int           # unlabeled images in the whole global batch (0 in supervised runs)

    @property
    def n_labeled(self) -> int:
        return len(self.y)


def _views(images, labels, n_unlabeled: int, global_labeled: int, generator, pad: int, in_memory: bool,
           second_view: bool, to_input, device: torch.device) -> Views:
    """Augment and cut one batch. In-memory sets arrive as the whole global batch (`n_unlabeled` unlabeled rows
    last): every rank augments all of it with the same randomness as one process, then keeps its part of the
    labeled and of the unlabeled rows. Folders arrive as this rank's part, already loaded, and are not augmented."""
    second = None
    if in_memory:
        n_l = len(images) - n_unlabeled
        x = augment_batch(images, generator, pad)
        if second_view:
            second = augment_batch(images, generator, pad)
        keep = torch.cat([torch.arange(n_l)[distributed.shard(n_l)],
                          n_l + torch.arange(n_unlabeled)[distributed.shard(n_unlabeled)]])
        x, labels = x[keep], labels[distributed.shard(n_l)]
        second = second[keep] if second is not None else None
    else:
        x = images
    return Views(to_input(x), labels.to(device, non_blocking=True), to_input(second) if second is not None else None,
                 global_labeled, n_unlabeled)


def _forward(net, fc: nn.Linear, teacher: nn.Module | None, views: Views, ssl: str, device: torch.device,
             amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The student's features `(n, A)` of `views.x` (float32 or wider) and the base method's target logits
    `(n, C)`: Π, the student on the second augmentation (both in one forward pass, so DDP sees one forward per
    backward; gradients flow through both); mean teacher, the teacher on the second augmentation (no gradient);
    none: None."""
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        if ssl == "pi":
            features = net(torch.cat([views.x, views.second]))
        else:
            features = net(views.x)
        with torch.no_grad():
            teacher_logits = teacher(views.second) if teacher is not None else None
    if amp is not None:
        features = features.float()  # ISDA's statistics and quadratic forms stay in float32/float64
    if ssl == "pi":
        features, second = features[:len(views.x)], features[len(views.x):]
        return features, fc(second)
    return features, teacher_logits.float() if teacher_logits is not None else None


def training_loss(cfg: TrainConfig, fc: nn.Linear, estimator: CovarianceEstimator | None, features: torch.Tensor,
                  views: Views, strength: float, ramp: float = 1.0, target_logits: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """One step's loss: the supervised loss of the labeled rows and, in semi-supervised runs, Eq. 19's terms.

    `features (n, A)` of `views.x` (labeled rows first), `fc` the final layer, `estimator` the online
    covariance estimator (None for plain CE runs), updated here with the labeled features ONLY;
    `strength` = lambda of this step, `ramp` in [0, 1] the consistency ramp-up; `target_logits (n, C)`
    the base method's target (Π: the other augmentation, with gradient; mean teacher: the teacher's);
    `generator` the draws of explicit SDA. Returns the loss to back-propagate (each term's mean
    weighted by `distributed.loss_weight`, so DDP's gradient average is the global batch's), the terms'
    values on this rank's rows (detached float64 scalars on the device, so a step does not wait for them:
    `loss`, `supervised`, and `unlabeled_isda`, `consistency` when used) and the labeled rows' logits.
    """
    n_l, y = views.n_labeled, views.y
    logits = fc(features)
    labeled_logits = logits[:n_l]
    if estimator is not None:  # Sigma of a class (and of a pseudo label) from labeled features only
        estimator.update(features[:n_l].detach(), y, skip_non_finite=True)  # fp16 overflow: skipped, as by the scaler
    if cfg.loss == "isda":
        supervised = isda_loss(labeled_logits, fc.weight, y, estimator, strength)
    elif cfg.loss == "explicit" and strength > 0:
        supervised = explicit_sda_loss(features[:n_l], fc, y, estimator, strength, cfg.samples, generator)
    else:  # CE, and ISDA/explicit at lambda = 0
        supervised = F.cross_entropy(labeled_logits, y)
    total = supervised * distributed.loss_weight(n_l, views.global_labeled)
    value = supervised.detach().double()  # terms stay on the device: no synchronisation per step
    terms = {"supervised": value}
    if views.global_unlabeled:
        unlabeled = logits[n_l:]
        if cfg.eta1 > 0:
            # Eq. 15 with p the base method's target (held constant), pseudo label argmax p (Eq. 12)
            reference = target_logits[n_l:] if target_logits is not None else unlabeled
            isda_u = semi_supervised_isda_loss(unlabeled, fc.weight, F.softmax(reference.detach(), 1), estimator,
                                               strength)
            total = total + (ramp * cfg.eta1 * distributed.loss_weight(len(unlabeled), views.global_unlabeled)) * isda_u
            terms["unlabeled_isda"] = isda_u.detach().double()
            value = value + ramp * cfg.eta1 * terms["unlabeled_isda"]
        if cfg.ssl != "none" and cfg.eta2 > 0:
            consistency = (F.softmax(logits, 1) - F.softmax(target_logits, 1)).pow(2).mean(1).mean()
            global_n = views.global_labeled + views.global_unlabeled
            total = total + (ramp * cfg.eta2 * distributed.loss_weight(len(logits), global_n)) * consistency
            terms["consistency"] = consistency.detach().double()
            value = value + ramp * cfg.eta2 * terms["consistency"]
    terms["loss"] = value
    return total, terms, labeled_logits


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> None:
    """Mean teacher after optimisation step `step` (0-based): teacher = a * teacher + (1 - a) * student for each
    parameter, a = min(1 - 1 / (step + 1), decay), so early steps follow the student closely (Tarvainen & Valpola).
    Buffers (batch-norm statistics) are the teacher's own, from its forward passes."""
    a = min(1.0 - 1.0 / (step + 1), decay)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(a).add_(s.detach(), alpha=1 - a)


@torch.no_grad()
def bound_tightness(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, estimator: CovarianceEstimator,
                    strength: float, samples: int, generator: torch.Generator, batch_size: int = 250) -> dict:
    """Fig. 9 on fixed images: the ISDA loss (Eq. 7, the bound) and the Monte-Carlo expected cross-entropy over
    ã ~ N(a, strength Sigma_y) that it bounds, on the same features, lambda and Sigma; model in eval mode.

    `images (N, C, H, W)` normalised float input on the model's device, `labels (N,)`, `samples` draws per
    image. Returns `{"bound", "expected_ce_mc", "expected_ce_mc_stderr"}` in nats (means over the images).
    """
    model.eval()
    features = torch.cat([model.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    features = features.float()
    logits = model.fc(features)
    bound = isda_loss(logits, model.fc.weight, labels, estimator, strength)
    mc, stderr = expected_cross_entropy_mc(features, model.fc, labels, estimator, strength, samples, generator)
    return {"bound": bound.item(), "expected_ce_mc": mc, "expected_ce_mc_stderr": stderr}


def _bound_images(train_set, pool: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed images of `--track-bound`: `bound_subset` of `pool` (indices of labeled images), seeded."""
    chosen = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.bound_subset]]
    chosen = chosen.sort().values
    if isinstance(train_set, TensorImages):
        return train_set.images[chosen], train_set.labels[chosen]
    # a training folder crops at random: seeded per image, so a resumed run tracks the same crops
    items = [train_set[(i, item_seed(cfg.seed, i))] for i in chosen.tolist()]
    return torch.stack([im for im, _ in items]), torch.tensor([lab for _, lab in items])


def fit(cfg: TrainConfig, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train per `cfg`, writing the run directory `cfg.out`; returns the last epoch's metrics.

    Under torchrun (WORLD_SIZE > 1) this is one rank of a DistributedDataParallel
    run: see `distributed`. Only rank 0 writes files, logs and shows progress.
    """
    device = pick_device(cfg.device)
    if cfg.deterministic:  # before any model or cuBLAS handle exists
        use_deterministic(device)
    with distributed.session(device) as device, \
            guarded_run_dir(cfg.out, CHECKPOINT, enabled=distributed.is_main()):
        use_fast_kernels(device)
        return _fit(cfg, device, resume, progress, log)


@dataclass
class _Training:
    """Everything one run trains with, built by `_setup` (each rank holds its own)."""
    cfg: TrainConfig
    device: torch.device
    spec: DatasetSpec
    train_set: object                        # TensorImages, or a dataset of image files
    test_set: object
    class_names: list[str]
    plan: BatchPlan
    model: nn.Module                         # the bare network (its state is what checkpoints hold)
    net: nn.Module                           # `model.features`, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    estimator: CovarianceEstimator | None    # None for plain CE runs
    teacher: nn.Module | None                # mean teacher only
    channels_last: bool

    @property
    def semi(self) -> bool:
        return self.cfg.labeled is not None

    @property
    def in_memory(self) -> bool:
        return self.cfg.dataset not in FOLDER_DATASETS

    @property
    def uses_estimator(self) -> bool:
        return self.estimator is not None

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.plan.steps_per_epoch

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `(N, C, H, W)` → normalised float input on the device."""
        x = normalize(images.to(self.device, non_blocking=True).float() / 255, self.spec.mean, self.spec.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _setup(cfg: TrainConfig, device: torch.device, resume: bool, log) -> tuple[_Training, int]:
    """Data, network, optimizer, estimator and teacher of the run in `cfg.out`, restored from its checkpoint
    when resuming; returns them and the first epoch to train (0-based)."""
    spec = dataset_spec(cfg.dataset, cfg.data_root)
    train_set = load_split(cfg.dataset, True, cfg.data_root, cfg.limit_train, skip_bad_images=cfg.skip_bad_images)
    test_set = load_split(cfg.dataset, False, cfg.data_root, cfg.limit_test, skip_bad_images=cfg.skip_bad_images)
    class_names = list(train_set.classes)
    num_classes = len(class_names)
    plan = _batch_plan(cfg, train_set, num_classes)  # refuse impossible batch sizes before writing anything

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, num_classes, spec.channels).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    amp = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)  # fp16 gradients need scaling
    # Rank 0 reads and writes the run directory; every rank gets the (possibly resumed) config and state.
    cfg, ckpt = distributed.from_main(lambda: _open_run_dir(cfg, resume, num_classes, log))
    if ckpt is not None:
        plan = _batch_plan(cfg, train_set, num_classes)  # a resumed run's own settings
    uses_estimator = cfg.loss in ("isda", "explicit") or (cfg.labeled is not None and cfg.eta1 > 0)
    estimator = CovarianceEstimator(model.feature_dim, num_classes, cfg.covariance == "diagonal") \
        if uses_estimator else None
    if cfg.sync_bn and distributed.active():  # same parameters and names: the optimizer and checkpoints still fit
        model = distributed.convert_sync_batchnorm(model, device)
    # faster convolutions on CPU (0.33 s vs 0.40 s per ResNet-32 step) and with CUDA's tensor cores
    channels_last = device.type in ("cpu", "cuda")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # every rank holds the same teacher: the same student, the same averages
    teacher = copy.deepcopy(model).requires_grad_(False) if cfg.ssl == "mean-teacher" else None
    run = _Training(cfg=cfg, device=device, spec=spec, train_set=train_set, test_set=test_set,
                    class_names=class_names, plan=plan, model=model, net=model, optimizer=optimizer, scaler=scaler,
                    amp=amp, estimator=estimator, teacher=teacher, channels_last=channels_last)
    start_epoch = _restore(run, ckpt) if ckpt is not None else 0
    if estimator is not None:
        estimator.to(device)
    run.net = distributed.wrap(model, device)
    return run, start_epoch


# ---------------------------------------------------------------------------------------------
# The checkpoint: what is saved after each epoch, and how a resumed run reads it back


def _checkpoint(run: _Training, epoch: int) -> dict:
    """The state after `epoch` (1-based) epochs: everything `_restore` needs, and what `load_classifier` reads."""
    spec = run.spec
    return {
        "model": {k: v.contiguous() for k, v in run.model.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "estimator": run.estimator.state_dict() if run.estimator is not None else None,
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "epoch": epoch, "config": dataclasses.asdict(run.cfg), "class_names": run.class_names,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "input": {"channels": spec.channels, "size": spec.image_size},
        **({"labeled_indices": run.plan.labeled_idx} if run.semi else {}),
        **({"teacher": {k: v.contiguous() for k, v in run.teacher.state_dict().items()}} if run.teacher else {}),
    }


def _restore(run: _Training, ckpt: dict) -> int:
    """Load `_checkpoint`'s state into `run`; returns the epochs it had finished."""
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("estimator") and run.estimator is not None:
        run.estimator.load_state_dict(ckpt["estimator"])
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.semi and not torch.equal(ckpt.get("labeled_indices", torch.empty(0)), run.plan.labeled_idx):
        raise IsdaVizError(f"{Path(run.cfg.out) / CHECKPOINT} was trained on another labeled subset (the training "
                           "set changed); choose another --out")
    if run.teacher is not None:
        run.teacher.load_state_dict(ckpt["teacher"])
    return ckpt["epoch"]


# ---------------------------------------------------------------------------------------------
# One epoch, and its record


def _epoch_batches(run: _Training, generator: torch.Generator):
    """This epoch's global batches `(images, labels, n_unlabeled)`, drawn from `generator`."""
    cfg, plan = run.cfg, run.plan
    if run.semi:
        return ssl_batches(run.train_set, plan.labeled_idx, plan.unlabeled_idx, plan.labeled_batch,
                           plan.unlabeled_batch, generator)
    # Folders load only this rank's part of each global batch; in-memory sets are augmented as whole global
    # batches (the same randomness as one process) and cut in `_views`.
    shard = (distributed.rank(), distributed.world_size()) if distributed.active() and not run.in_memory else None
    return ((images, labels, 0) for images, labels in iterate_batches(
        run.train_set, cfg.batch_size, True, generator, cfg.workers, shard, pin_memory=run.device.type == "cuda"))


def _train_epoch(run: _Training, epoch: int, progress: bool) -> tuple[dict[str, float], float]:
    """One pass over the epoch's batches; returns the loss terms' means per labeled image (over all ranks)
    and the training accuracy of the labeled images."""
    cfg, plan, model = run.cfg, run.plan, run.model
    model.train()
    if run.teacher is not None:
        run.teacher.train()
    epoch_seed = derived_seed(cfg.seed * 100_003 + epoch)
    generator = torch.Generator().manual_seed(epoch_seed)
    # explicit SDA's draws: per rank (shards differ in size), apart from the shared augmentation generator
    sampler = torch.Generator().manual_seed(derived_seed(epoch_seed * 1_009 + 1 + distributed.rank()))
    pad = max(2, run.spec.image_size // 8)
    sums: dict[str, float] = {}
    correct, seen = 0, 0
    bar = tqdm(_epoch_batches(run, generator), total=plan.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not progress, leave=False)
    for i, (images, labels, n_unlabeled) in enumerate(bar):
        step = epoch * plan.steps_per_epoch + i
        for group in run.optimizer.param_groups:
            group["lr"] = scheduled_lr(cfg, step / run.total_steps)
        strength = isda_strength(cfg.lambda0, step / run.total_steps) if run.uses_estimator else 0.0
        global_labeled = plan.labeled_batch if run.semi else min(cfg.batch_size, len(run.train_set) - i * cfg.batch_size)
        views = _views(images, labels, n_unlabeled, global_labeled, generator, pad, run.in_memory,
                       cfg.ssl != "none", run.to_input, run.device)
        features, target_logits = _forward(run.net, model.fc, run.teacher, views, cfg.ssl, run.device, run.amp)
        ramp = sigmoid_rampup(step / run.total_steps, cfg.rampup) if run.semi else 1.0
        loss, terms, labeled_logits = training_loss(cfg, model.fc, run.estimator, features, views, strength, ramp,
                                                    target_logits, sampler)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.teacher is not None:
            update_teacher(run.teacher, model, cfg.ema_decay, step)
        with torch.no_grad():  # running sums on the device; read (a synchronisation) only for the bar
            correct = correct + (labeled_logits.argmax(1) == views.y).sum()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value * views.n_labeled
        seen += views.n_labeled
        if progress and (i % _BAR_EVERY == 0 or i + 1 == plan.steps_per_epoch):
            bar.set_postfix(loss=f"{float(sums['loss']) / seen:.3f}", acc=f"{int(correct) / seen:.3f}")
    bar.close()
    names = sorted(sums)
    *totals, correct, seen = distributed.all_sum([float(sums[n]) for n in names] + [int(correct), seen])
    return {n: t / seen for n, t in zip(names, totals)}, correct / seen


def _epoch_record(run: _Training, epoch: int, means: dict[str, float], train_accuracy: float,
                  test_accuracy: float, seconds: float) -> dict:
    """The metrics.jsonl line of epoch `epoch` (0-based): losses, accuracies, lambda and lr at its end."""
    cfg = run.cfg
    record = {"epoch": epoch + 1, "train_loss": means["loss"], "train_accuracy": train_accuracy,
              "test_accuracy": test_accuracy, "lambda": _epoch_strength(run, epoch),
              "lr": scheduled_lr(cfg, (epoch + 1) / cfg.epochs), "seconds": seconds}
    if run.semi:  # the terms of Eq. 19, per labeled image of this epoch
        record.update({f"train_{n}_loss": means[n] for n in sorted(means) if n != "loss"})
    return record


def _epoch_strength(run: _Training, epoch: int) -> float:
    """lambda at the end of epoch `epoch` (0-based)."""
    return isda_strength(run.cfg.lambda0, (epoch + 1) / run.cfg.epochs) if run.uses_estimator else 0.0


def _fit(cfg: TrainConfig, device: torch.device, resume: bool, progress: bool, log) -> dict:
    cfg = cfg.resolved()
    main = distributed.is_main()
    if not main:
        progress, log = False, (lambda *a, **k: None)
    run, start_epoch = _setup(cfg, device, resume, log)
    cfg, out = run.cfg, Path(run.cfg.out)
    if cfg.track_bound:
        bound_x, bound_y = _bound_images(run.train_set, run.plan.labeled_idx, cfg)
        bound_x, bound_y = run.to_input(bound_x), bound_y.to(device)
    record: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        means, train_accuracy = _train_epoch(run, epoch, progress)
        distributed.broadcast_buffers(run.model)  # without --sync-bn each rank's running statistics differ: use rank 0's
        test_acc = evaluate(run.model, run.test_set, run.spec.mean, run.spec.std, device, amp=run.amp,
                            workers=cfg.workers)
        record = _epoch_record(run, epoch, means, train_accuracy, test_acc, time.time() - started)
        if not main:
            continue
        if cfg.track_bound:  # rank 0 alone: no collective in eval mode, the same model and statistics as all ranks
            record.update(bound_tightness(run.model, bound_x, bound_y, run.estimator, _epoch_strength(run, epoch),
                                          cfg.bound_samples, torch.Generator().manual_seed(derived_seed(cfg.seed * 100_003 + epoch))))
        save_atomic(_checkpoint(run, epoch + 1), out / CHECKPOINT)
        append_jsonl(record, out / "metrics.jsonl")
        bound = f"  bound {record['bound']:.4f} >= MC {record['expected_ce_mc']:.4f}" if cfg.track_bound else ""
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  train acc {record['train_accuracy']:.4f}"
            f"  test acc {test_acc:.4f}{bound}  {record['seconds']:.0f}s")
    if not main:
        return {}  # the run's record is rank 0's to report
    if not record:
        history = read_jsonl(out / "metrics.jsonl")
        record = history[-1] if history else {}
    return record
