"""`fit`: train a classifier with the ISDA loss (or plain cross-entropy), resumably.

The schedule follows the paper's Appendix A: SGD with Nesterov momentum 0.9,
learning rate by cosine (default) or step decay, and lambda = lambda0 * t / T,
with t/T the fraction of training done (per iteration, so short runs augment too).
Every epoch ends with an atomic checkpoint; the shuffling and augmentation of
epoch e are drawn from a generator seeded by (seed, e), so a run killed and
resumed ends bit-identical to one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import __version__, distributed
from .data import augment_batch, dataset_spec, iterate_batches, load_split, normalize
from .devices import pick_device
from .errors import IsdaVizError
from .isda import ISDALoss
from .models import build_model
from .runs import (CHECKPOINT, append_jsonl, open_run_dir, read_jsonl, save_atomic, truncate_metrics,
                   write_json_atomic)
from .schedules import isda_strength, learning_rate, step_lr


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as the run's `config.json`."""

    out: str
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    arch: str | None = None            # None: the dataset's default (resnet32; resnet50 for ImageNet)
    loss: str = "isda"                 # "isda" or "ce"
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
    workers: int = 0
    amp: str | None = None             # "bf16" | "fp16" | "off"; None: bf16 on CUDA where supported, else off
    sync_bn: bool = False              # under torchrun: batch-norm statistics of the global batch

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
    """The autocast dtype of `--amp` (None: float32 throughout). CPU always runs in float32."""
    if amp not in (None, "off", "bf16", "fp16"):
        raise IsdaVizError(f"unknown --amp '{amp}'; choose bf16, fp16 or off")
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            raise IsdaVizError(f"--amp {amp} needs a CUDA device; CPU training runs in float32 (--amp off)")
        return None
    if amp is None:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise IsdaVizError("--amp bf16: this GPU has no bfloat16; use --amp fp16 or off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def evaluate(model, dataset, mean, std, device, batch_size: int = 500, amp: torch.dtype | None = None) -> float:
    """Top-1 accuracy in [0, 1] of `model` on a dataset of uint8 images (sharded over ranks under torchrun)."""
    model.eval()
    correct = 0
    shard = (distributed.rank(), distributed.world_size()) if distributed.active() else None
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        for images, labels in iterate_batches(dataset, batch_size, shuffle=False, shard=shard):
            if len(labels) == 0:
                continue
            x = normalize(images.to(device).float() / 255, mean, std)
            correct += (model(x).argmax(1).cpu() == labels).sum().item()
    correct, = distributed.all_sum([correct])
    return correct / max(1, len(dataset))


def _open_run_dir(cfg: TrainConfig, resume: bool, num_classes: int, log) -> tuple[TrainConfig, dict | None]:
    """Check `cfg.out`, load the checkpoint to resume (None for a new run), write config.json.

    Returns the config to train with (the saved one when resuming, with the new
    epochs and this machine's settings) and the checkpoint.
    """
    out = Path(cfg.out)
    ckpt = open_run_dir(out, CHECKPOINT, resume, {"arch": cfg.arch, "dataset": cfg.dataset, "loss": cfg.loss})
    if ckpt is not None:
        if len(ckpt.get("class_names", [])) != num_classes:
            raise IsdaVizError(f"{out / CHECKPOINT} holds a run with {len(ckpt.get('class_names', []))} classes, "
                               f"the dataset has {num_classes}; choose another --out")
        cfg = dataclasses.replace(TrainConfig(**ckpt["config"]), epochs=cfg.epochs, device=cfg.device, out=cfg.out,
                                  workers=cfg.workers, amp=cfg.amp)
        truncate_metrics(out / "metrics.jsonl", "epoch", ckpt["epoch"])  # lines of an epoch whose checkpoint never landed
        log(f"resuming {out} at epoch {ckpt['epoch']}/{cfg.epochs}")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({**dataclasses.asdict(cfg), "isda_viz_version": __version__, "torch": torch.__version__},
                      out / "config.json")
    return cfg, ckpt


def fit(cfg: TrainConfig, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train per `cfg`, writing the run directory `cfg.out`; returns the last epoch's metrics.

    Under torchrun (WORLD_SIZE > 1) this is one rank of a DistributedDataParallel
    run: see `distributed`. Only rank 0 writes files, logs and shows progress.
    """
    with distributed.session(pick_device(cfg.device)) as device:
        return _fit(cfg, device, resume, progress, log)


def _fit(cfg: TrainConfig, device: torch.device, resume: bool, progress: bool, log) -> dict:
    cfg = cfg.resolved()
    if cfg.loss not in ("isda", "ce"):
        raise IsdaVizError(f"unknown loss '{cfg.loss}'; choose isda or ce")
    if cfg.covariance not in ("full", "diagonal"):
        raise IsdaVizError(f"unknown covariance '{cfg.covariance}'; choose full or diagonal")
    if cfg.schedule not in ("cosine", "step"):
        raise IsdaVizError(f"unknown schedule '{cfg.schedule}'; choose cosine or step")
    main = distributed.is_main()
    if not main:
        progress, log = False, (lambda *a, **k: None)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    spec = dataset_spec(cfg.dataset, cfg.data_root)
    train_set = load_split(cfg.dataset, True, cfg.data_root, cfg.limit_train)
    test_set = load_split(cfg.dataset, False, cfg.data_root, cfg.limit_test)
    class_names = list(train_set.classes)
    num_classes = len(class_names)
    if distributed.world_size() > len(train_set) % cfg.batch_size > 0:
        raise IsdaVizError(f"the last batch would hold {len(train_set) % cfg.batch_size} images for "
                           f"{distributed.world_size()} ranks; change --batch-size or --limit-train")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, num_classes, spec.channels).to(device)
    criterion = ISDALoss(model.feature_dim, num_classes, cfg.covariance)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    amp = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)  # fp16 gradients need scaling
    # Rank 0 reads and writes the run directory; every rank gets the (possibly resumed) config and state.
    cfg, ckpt = distributed.from_main(lambda: _open_run_dir(cfg, resume, num_classes, log))
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("estimator"):
            criterion.set_extra_state(ckpt["estimator"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = ckpt["epoch"]
    if cfg.sync_bn and distributed.active():  # same parameters and names: the optimizer and checkpoints still fit
        model = distributed.convert_sync_batchnorm(model, device)

    # faster convolutions on CPU (0.33 s vs 0.40 s per ResNet-32 step) and with CUDA's tensor cores
    channels_last = device.type in ("cpu", "cuda")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = distributed.wrap(model, device)   # model.features, DDP-wrapped under torchrun
    in_memory = cfg.dataset not in ("imagenet", "folder")
    # Folders load only this rank's part of each global batch; in-memory sets are augmented as whole global
    # batches (the same randomness as one process) and cut below.
    shard = (distributed.rank(), distributed.world_size()) if distributed.active() and not in_memory else None
    pad = max(2, spec.image_size // 8)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    record: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        started = time.time()
        model.train()
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(iterate_batches(train_set, cfg.batch_size, True, generator, cfg.workers, shard,
                                   pin_memory=device.type == "cuda"), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for i, (images, labels) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = scheduled_lr(cfg, step / total_steps)
            strength = isda_strength(cfg.lambda0, step / total_steps) if cfg.loss == "isda" else 0.0
            global_n = min(cfg.batch_size, len(train_set) - i * cfg.batch_size)
            x = augment_batch(images, generator, pad) if in_memory else images
            if in_memory:  # this rank's part of the global batch (all of it in one process)
                part = distributed.shard(global_n)
                x, labels = x[part], labels[part]
            x = normalize(x.to(device, non_blocking=True).float() / 255, spec.mean, spec.std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                features = net(x)
            if amp is not None:
                features = features.float()  # ISDA's statistics and quadratic forms stay in float32/float64
            if cfg.loss == "isda":
                loss = criterion(features, model.fc, y, strength)
            else:
                loss = F.cross_entropy(model.fc(features), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss * distributed.loss_weight(len(y), global_n)).backward()
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                correct += (model.fc(features).argmax(1) == y).sum().item()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        loss_sum, correct, seen = distributed.all_sum([loss_sum, correct, seen])
        distributed.broadcast_buffers(model)  # without --sync-bn each rank's running statistics differ: use rank 0's
        test_acc = evaluate(model, test_set, spec.mean, spec.std, device, amp=amp)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                  "test_accuracy": test_acc,
                  "lambda": isda_strength(cfg.lambda0, (epoch + 1) / cfg.epochs) if cfg.loss == "isda" else 0.0,
                  "lr": scheduled_lr(cfg, (epoch + 1) / cfg.epochs), "seconds": time.time() - started}
        if not main:
            continue
        save_atomic({
            "model": {k: v.contiguous() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "estimator": criterion.estimator.state_dict() if cfg.loss == "isda" else None,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": epoch + 1, "config": dataclasses.asdict(cfg), "class_names": class_names,
            "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
            "input": {"channels": spec.channels, "size": spec.image_size},
        }, ckpt_path)
        append_jsonl(record, out / "metrics.jsonl")
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['train_loss']:.4f}  train acc {record['train_accuracy']:.4f}"
            f"  test acc {test_acc:.4f}  {record['seconds']:.0f}s")
    if not main:
        return {}  # the run's record is rank 0's to report
    if not record:
        history = read_jsonl(out / "metrics.jsonl")
        record = history[-1] if history else {}
    return record
