"""`train_gan`: the resumable WGAN-GP training loop of `isda-viz train-gan`.

Training (Gulrajani et al. 2017): the critic minimises `D(fake) - D(real) + λ·(‖∇D(x̂)‖ - 1)²`
on random interpolates x̂, `n_critic` critic steps per generator step, Adam with
β = (0.0 or 0.5, 0.9), learning rates decayed linearly to zero over the run.

Two architectures (`GanConfig.arch`): "compact" (`wgan.py`, the default, sized for Fashion-MNIST on a CPU)
and "resnet" (`wgan_resnet.py`, Gulrajani et al.'s CIFAR ResNet, whose generator's exponential moving
average is what gets saved and inverted). `--recipe gulrajani` is their published schedule
(`wgan_resnet.GULRAJANI`); options given explicitly win.

The compact defaults are what reached the class-agreement target on a 2-core CPU: 2 critic
steps (not the paper's 5) at lr 1e-3 for both nets (not 1e-4) with β = (0.5, 0.9).
With lr 2e-4 the class-conditional batch-norm scales, which Adam moves by about
lr per step from the identity, barely separated the classes after 300 iterations;
at 1e-3 classes separate within a few hundred. channels_last was slower here, so
the networks stay in the default memory format.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from isda_viz._version import __version__
from isda_viz.bounds import derived_seed
from isda_viz.classifiers.classifier import load_classifier
from isda_viz.data.datasets import dataset_spec, load_split
from isda_viz.devices import pick_device, use_deterministic, use_fast_kernels
from isda_viz.errors import IsdaVizError, require_finite
from isda_viz.generators.base import to_classifier_pixels
from isda_viz.isda.schedules import learning_rate
from isda_viz.runs import (
    guarded_run_dir,
    append_jsonl,
    open_run_dir,
    read_jsonl,
    save_atomic,
    save_image_atomic,
    truncate_metrics,
    write_json_atomic,
)

from isda_viz.outputs.figures import sample_grid
from isda_viz.outputs.generator_report import GENERATOR_REPORT, write_generator_report

from .base import Generator
from .reach import ReachOptions, generator_reach
from .wgan import (
    GENERATOR_FILE,
    STATE_FILE,
    WGANCritic,
    WGANGenerator,
    load_wgan,
    recompute_batchnorm_statistics,
    save_generator,
)
from .wgan_resnet import DEFAULT_WIDTH, GULRAJANI, ResNetCritic, ResNetGenerator


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor | None,
                     eps: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's `E[(‖∇_x̂ D(x̂, y)‖₂ - 1)²]` at `x̂ = eps·real + (1 - eps)·fake`.

    `real`, `fake (N, C, S, S)`; `eps (N, 1, 1, 1)` in [0, 1]; returns a scalar.
    """
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat, y).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


@torch.no_grad()
def class_agreement(generator: Generator, classifier, per_class: int, rng: torch.Generator,
                    batch_size: int = 250) -> float:
    """Fraction in [0, 1] of class-conditional samples the classifier labels as their conditioning class.

    `per_class` samples per class, latent codes drawn from `rng`; images reach the
    classifier (an `isda_viz.classifiers.classifier.Classifier`) through `isda_viz.generators.base.to_classifier_pixels`.
    """

    y = torch.arange(generator.num_classes).repeat_interleave(per_class)
    z = torch.randn(len(y), generator.latent_dim, generator=rng)
    correct = 0
    for start in range(0, len(y), batch_size):
        yb = y[start:start + batch_size]
        images = generator.generate(z[start:start + batch_size].to(generator.device), yb.to(generator.device))
        unit = to_classifier_pixels(images, generator.output_range, classifier).to(classifier.device)
        correct += (classifier.predict(unit) == yb).sum().item()
    return correct / len(y)


@dataclass(frozen=True)
class GanArch:
    """One `train-gan --arch`: its networks and defaults (`ema_decay` None: no moving average; `critic_width` None:
    the generator's width)."""
    generator: type
    critic: type
    width: int
    critic_width: int | None
    ema_decay: float | None
    image_size: int | None   # None: the dataset's (at most 32)


GAN_ARCHS = {
    "compact": GanArch(WGANGenerator, WGANCritic, 32, 32, None, None),
    # EMA 0.999 (with `average_weights`' warm-up): Yazıcı et al. 2019 average GAN generators this way; BigGAN's
    # 0.9999 suits its 10^5-step runs, not the few thousand a CPU affords.
    "resnet": GanArch(ResNetGenerator, ResNetCritic, DEFAULT_WIDTH, None, 0.999, 32),
}
GAN_RECIPES = {"gulrajani": GULRAJANI}


def apply_gan_recipe(cfg: "GanConfig", explicit=()) -> "GanConfig":
    """`cfg` with its recipe's values (`GAN_RECIPES`), except the fields named in `explicit`; unchanged without one."""
    if cfg.recipe is None:
        return cfg
    return dataclasses.replace(cfg, **{k: v for k, v in GAN_RECIPES[cfg.recipe].items() if k not in set(explicit)})


@torch.no_grad()
def average_weights(average: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """The exponential moving average of `model`'s parameters in `average` after generator step `step` (0-based):
    `θ̄ ← d·θ̄ + (1 − d)·θ`, `d = min(decay, (1 + step) / (10 + step))` (the warm-up of TensorFlow's
    `ExponentialMovingAverage(num_updates)`, so early steps are not stuck at the initial weights). Buffers (batch-norm
    statistics) are not averaged: the saved average gets standing statistics of its own."""
    d = min(decay, (1 + step) / (10 + step))
    for mean, param in zip(average.parameters(), model.parameters()):
        mean.lerp_(param, 1 - d)


@dataclass
class GanConfig:
    """Everything that defines a `train-gan` run; saved as the GAN_DIR's `config.json`."""
    out: str
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    iterations: int = 3000             # generator steps
    batch_size: int = 64
    n_critic: int = 2                  # critic steps per generator step
    gp: float = 10.0                   # gradient-penalty weight λ
    lr_g: float = 1e-3
    lr_d: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.9
    latent_dim: int = 128
    arch: str = "compact"              # GAN_ARCHS: "compact" (wgan.py) or "resnet" (wgan_resnet.py)
    width: int | None = None           # generator channels (compact: at full size, 4x that at S/4); None: the arch's
    critic_width: int | None = None    # critic channels after its first conv; None: the arch's (resnet: width)
    generator_batch_size: int | None = None  # the generator step's batch; None: batch_size
    ema_decay: float | None = None     # moving average of the generator's weights; None: the arch's (compact: none)
    recipe: str | None = None          # GAN_RECIPES: a published schedule (fills what is not given explicitly)
    conditional: bool = True
    image_size: int | None = None      # None: the dataset's size (32 when larger)
    seed: int = 0
    limit_train: int | None = None
    classifier: str | None = None      # a `train` run or weights file: measure class agreement with it
    classifier_arch: str | None = None # what a weights file holds (see isda_viz.classifiers.classifier.load_classifier)
    class_names: str | None = None     # file naming a weights file's classes
    agreement_per_class: int = 50
    sample_every: int = 200            # iterations between samples.png / generator.pt / agreement
    log_every: int = 25                # iterations between metrics.jsonl lines
    device: str | None = None          # not part of the run's identity
    deterministic: bool = False        # CUDA: deterministic kernels, no TF32 (devices.use_deterministic); a setting

    def __post_init__(self) -> None:
        """The arch's widths and moving average where not given; one-line `IsdaVizError`s for options no run can use."""
        if self.arch not in GAN_ARCHS:
            raise IsdaVizError(f"unknown --arch {self.arch!r}; known: {', '.join(GAN_ARCHS)}")
        if self.recipe is not None and self.recipe not in GAN_RECIPES:
            raise IsdaVizError(f"unknown --recipe {self.recipe!r}; known: {', '.join(GAN_RECIPES)}")
        arch = GAN_ARCHS[self.arch]
        self.width = arch.width if self.width is None else self.width
        self.critic_width = (arch.critic_width or self.width) if self.critic_width is None else self.critic_width
        self.ema_decay = arch.ema_decay if self.ema_decay is None else self.ema_decay
        for option, value in (("--width", self.width), ("--critic-width", self.critic_width),
                              ("--generator-batch-size", self.generator_batch_size or 1)):
            if not isinstance(value, int) or value < 1:
                raise IsdaVizError(f"{option} must be a positive integer, got {value}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise IsdaVizError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.iterations < 1 or self.batch_size < 1 or self.n_critic < 1:
            raise IsdaVizError("--iterations, --batch-size and --n-critic must be at least 1")
        if self.classifier and not self.conditional:
            raise IsdaVizError("--classifier measures class agreement, which needs a class-conditional GAN")
        require_finite({"--lr-g": self.lr_g, "--lr-d": self.lr_d, "--beta1": self.beta1, "--beta2": self.beta2,
                        "--gp": self.gp})


class _BatchSampler:
    """Random training batches `(N, C, S, S)` in [-1, 1] and labels `(N,)`, drawn from a seeded generator."""
    def __init__(self, dataset, image_size: int, rng: torch.Generator, device):
        self.dataset, self.image_size, self.rng, self.device = dataset, image_size, rng, device
        self.images = getattr(dataset, "images", None)  # in-memory datasets: index, don't load
        self.labels = torch.as_tensor(dataset.labels)

    def __call__(self, n: int):
        idx = torch.randint(len(self.labels), (n,), generator=self.rng)
        if self.images is not None:
            images = self.images[idx]
        elif getattr(self.dataset, "random_items", False):  # a training folder's random crops: seeded per draw,
            seeds = torch.randint(0, 2**62, (n,), generator=self.rng)  # so a resumed run crops alike
            images = torch.stack([self.dataset[(int(i), int(s))][0] for i, s in zip(idx, seeds)])
        else:
            images = torch.stack([self.dataset[int(i)][0] for i in idx])
        x = images.to(self.device).float().div_(127.5).sub_(1.0)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return x, self.labels[idx].to(self.device)


# What a resumed run may change; everything else is taken from the run being resumed.
RESUME_OVERRIDES = ("iterations", "classifier", "classifier_arch", "class_names", "agreement_per_class", "sample_every",
                    "log_every", "device", "deterministic", "out")


def _resumed_config(saved: dict, cfg: GanConfig) -> GanConfig:
    fields = {f.name for f in dataclasses.fields(GanConfig)}
    return GanConfig(**{**{k: v for k, v in saved.items() if k in fields},
                        **{k: getattr(cfg, k) for k in RESUME_OVERRIDES}})


@dataclass
class _GanTraining:
    """Everything one `train_gan` run trains with, built by `_setup`."""
    cfg: GanConfig
    device: torch.device
    out: Path
    class_names: list[str]
    classifier: object | None            # a `Classifier` measuring class agreement, or None
    generator: Generator                 # the network trained
    critic: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    rng: torch.Generator                 # every random draw of training: batches, z, y, interpolation
    average: Generator | None = None     # the moving average of `generator` (cfg.ema_decay): what is saved
    sample_batch: _BatchSampler | None = None   # set once the run's state is restored
    grid_z: torch.Tensor | None = None          # (10, latent_dim) latent codes of samples.png

    @property
    def saved(self) -> Generator:
        """The generator written to generator.pt: the moving average where there is one."""
        return self.generator if self.average is None else self.average

    def draw_z(self, n: int | None = None) -> torch.Tensor:
        return torch.randn(n or self.cfg.batch_size, self.cfg.latent_dim, generator=self.rng).to(self.device)

    def draw_y(self, n: int | None = None) -> torch.Tensor | None:
        n = n or self.cfg.batch_size
        return torch.randint(len(self.class_names), (n,), generator=self.rng).to(self.device) \
            if self.cfg.conditional else None


def _setup(cfg: GanConfig, resume: bool, log) -> tuple[_GanTraining, int, float]:
    """The run in `cfg.out`: data, classifier, networks and optimisers, restored from its training state when
    resuming; writes config.json. Returns the run, the iterations done and the seconds they took."""
    device = pick_device(cfg.device)
    if cfg.deterministic:  # before any model or cuBLAS handle exists
        use_deterministic(device)
    use_fast_kernels(device)
    out = Path(cfg.out)
    state = open_run_dir(out, STATE_FILE, resume, {"dataset": cfg.dataset, "conditional": cfg.conditional},
                         what="GAN training state")
    if state is not None:
        cfg = _resumed_config(state["config"], cfg)
    spec = dataset_spec(cfg.dataset, cfg.data_root)
    arch = GAN_ARCHS[cfg.arch]
    cfg = dataclasses.replace(cfg, image_size=cfg.image_size or arch.image_size or min(spec.image_size, 32))
    train_set = load_split(cfg.dataset, True, cfg.data_root, cfg.limit_train)
    class_names = list(train_set.classes)
    num_classes = len(class_names) if cfg.conditional else None

    classifier = None
    if cfg.classifier:
        classifier = load_classifier(cfg.classifier, device, arch=cfg.classifier_arch, class_names=cfg.class_names,
                                     data_root=cfg.data_root)
        if classifier.class_names != class_names:
            raise IsdaVizError(f"the classifier in {classifier.source} was trained on {classifier.dataset} "
                               f"({classifier.num_classes} classes), not on this GAN's {cfg.dataset} "
                               f"({len(class_names)} classes)")

    torch.manual_seed(cfg.seed)
    generator = arch.generator(cfg.latent_dim, num_classes, spec.channels, cfg.image_size, cfg.width,
                               class_names).to(device)
    critic = arch.critic(num_classes, spec.channels, cfg.critic_width).to(device)
    opt_g = torch.optim.Adam(generator.parameters(), cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(critic.parameters(), cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    average = copy.deepcopy(generator).requires_grad_(False) if cfg.ema_decay is not None else None
    run = _GanTraining(cfg=cfg, device=device, out=out, class_names=class_names, classifier=classifier,
                       generator=generator, critic=critic, opt_g=opt_g, opt_d=opt_d, average=average,
                       rng=torch.Generator().manual_seed(cfg.seed))
    start, elapsed = 0, 0.0
    if state is not None:
        start, elapsed = _restore(run, state)
        if start >= cfg.iterations:
            log(f"{out} already holds {start} iterations (asked for {cfg.iterations}); nothing to do")
        truncate_metrics(out / "metrics.jsonl", "iteration", start)  # lines written after the state resumed
        log(f"resuming {out} at iteration {start}/{cfg.iterations}")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({**dataclasses.asdict(cfg), "isda_viz_version": __version__, "torch": torch.__version__},
                      out / "config.json")
    run.sample_batch = _BatchSampler(train_set, cfg.image_size, run.rng, device)
    run.grid_z = torch.randn(10, cfg.latent_dim, generator=torch.Generator().manual_seed(derived_seed(cfg.seed + 1))).to(device)
    return run, start, elapsed


# ---------------------------------------------------------------------------------------------
# The training state: what is saved at each snapshot, and how a resumed run reads it back


def _save_state(run: _GanTraining, iteration: int, seconds: float) -> None:
    """`training_state.pt` after `iteration` iterations that took `seconds`: everything `_restore` needs."""
    average = {} if run.average is None else {"average": run.average.state_dict()}
    save_atomic({"generator": run.generator.state_dict(), "critic": run.critic.state_dict(), **average,
                 "opt_g": run.opt_g.state_dict(), "opt_d": run.opt_d.state_dict(), "rng": run.rng.get_state(),
                 "iteration": iteration, "seconds": seconds, "config": dataclasses.asdict(run.cfg)},
                run.out / STATE_FILE)


def _restore(run: _GanTraining, state: dict) -> tuple[int, float]:
    """Load `_save_state`'s state into `run`; returns its iterations and seconds."""
    try:
        run.generator.load_state_dict(state["generator"])
        run.critic.load_state_dict(state["critic"])
        if run.average is not None:
            run.average.load_state_dict(state["average"])
        run.opt_g.load_state_dict(state["opt_g"])
        run.opt_d.load_state_dict(state["opt_d"])
        run.rng.set_state(state["rng"])
        return state["iteration"], state["seconds"]
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise IsdaVizError(f"{run.out / STATE_FILE} is corrupt ({type(e).__name__}); choose another --out") from None


# ---------------------------------------------------------------------------------------------
# One iteration, the snapshot, one record


def _iteration(run: _GanTraining, it: int) -> dict[str, float]:
    """Generator step `it` (0-based): `n_critic` critic steps, then one generator step; returns its losses."""
    cfg = run.cfg
    for opt, base in ((run.opt_g, cfg.lr_g), (run.opt_d, cfg.lr_d)):
        for group in opt.param_groups:
            group["lr"] = learning_rate("linear", base, it, cfg.iterations)
    for _ in range(cfg.n_critic):
        real, y = run.sample_batch(cfg.batch_size)
        y = y if cfg.conditional else None
        z = run.draw_z()
        eps = torch.rand(cfg.batch_size, 1, 1, 1, generator=run.rng).to(run.device)
        with torch.no_grad():
            fake = run.generator(z, y)  # fakes of the real batch's classes: the projection compares like with like
        d_real, d_fake = run.critic(real, y).mean(), run.critic(fake, y).mean()
        penalty = gradient_penalty(run.critic, real, fake, y, eps)
        loss_d = d_fake - d_real + cfg.gp * penalty
        run.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        run.opt_d.step()
    z = run.draw_z(cfg.generator_batch_size)
    y = run.draw_y(cfg.generator_batch_size)
    run.critic.requires_grad_(False)
    loss_g = -run.critic(run.generator(z, y), y).mean()
    run.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    run.opt_g.step()
    run.critic.requires_grad_(True)
    if run.average is not None:
        average_weights(run.average, run.generator, cfg.ema_decay, it)
    return {"critic_loss": loss_d.item(), "wasserstein": (d_real - d_fake).item(),
            "gradient_penalty": penalty.item(), "generator_loss": loss_g.item()}


def _snapshot(run: _GanTraining, iteration: int) -> float | None:
    """Standing BN statistics of the saved generator (the moving average where there is one), then generator.pt,
    samples.png, agreement; returns the agreement."""
    cfg, generator = run.cfg, run.saved
    recompute_batchnorm_statistics(generator, 8, 2 * cfg.batch_size,  # 1024 samples at the default batch
                                   torch.Generator().manual_seed(derived_seed(cfg.seed * 7919 + iteration)))
    generator.eval()
    agreement = None
    if run.classifier is not None:
        agreement = class_agreement(generator, run.classifier, cfg.agreement_per_class,
                                    torch.Generator().manual_seed(derived_seed(cfg.seed + 2)))
    save_generator(generator, run.out / GENERATOR_FILE, iteration, cfg.dataset)
    save_image_atomic(samples_picture(generator, run.grid_z, run.class_names if cfg.conditional else None),
                      run.out / "samples.png")
    generator.train()
    return agreement


def _record(run: _GanTraining, it: int, sums: dict[str, float], count: int, seconds: float,
            agreement: float | None) -> dict:
    """The metrics.jsonl line after iteration `it` (0-based): the losses' means since the last line."""
    record = {"iteration": it + 1, **{k: v / count for k, v in sums.items()},
              "lr_g": learning_rate("linear", run.cfg.lr_g, it, run.cfg.iterations), "seconds": round(seconds, 2)}
    if agreement is not None:
        record["agreement"] = agreement
    return record


def train_gan(cfg: GanConfig, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train a WGAN-GP per `cfg` into the directory `cfg.out`; returns the last metrics record.

    Writes `generator.pt` (see `save_generator`), `training_state.pt` (critic,
    optimisers, RNG: for `resume`), `samples.png`, `metrics.jsonl` and `config.json`.
    With `cfg.classifier`, measures class agreement every `sample_every` iterations, and at the end
    the generator report (`generator_report.json`, also cached for the pair: `generators.reach`).
    """
    with guarded_run_dir(cfg.out, STATE_FILE):  # one writer; a run failing before its first state leaves nothing
        return _train(cfg, resume, progress, log)


def _train(cfg: GanConfig, resume: bool, progress: bool, log) -> dict:
    """`train_gan`'s loop, inside its run-directory guard."""
    run, start, elapsed = _setup(cfg, resume, log)
    cfg, out = run.cfg, run.out
    run.generator.train()
    run.critic.train()
    sums = {"critic_loss": 0.0, "wasserstein": 0.0, "gradient_penalty": 0.0, "generator_loss": 0.0}
    count = 0
    record: dict = {}
    last_agreement = None
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="train-gan",
               disable=not progress)
    t0 = time.time()
    for it in bar:
        for name, value in _iteration(run, it).items():
            sums[name] += value
        count += 1
        done = it + 1
        snap = done % cfg.sample_every == 0 or done == cfg.iterations
        agreement = _snapshot(run, done) if snap else None
        if done % cfg.log_every == 0 or snap:
            seconds = elapsed + time.time() - t0
            record = _record(run, it, sums, count, seconds, agreement)
            last_agreement = agreement if agreement is not None else last_agreement
            sums, count = dict.fromkeys(sums, 0.0), 0
            if snap:
                _save_state(run, done, seconds)  # after the metrics it covers are computed, before they are written
            append_jsonl(record, out / "metrics.jsonl")
            postfix = {"W": f"{record['wasserstein']:.3f}", "gp": f"{record['gradient_penalty']:.3f}"}
            if last_agreement is not None:
                postfix["agree"] = f"{last_agreement:.3f}"
            bar.set_postfix(postfix)
            if snap:
                agreement_text = f"  class agreement {agreement:.3f}" if agreement is not None else ""
                log(f"iteration {done}/{cfg.iterations}{agreement_text}  {seconds / 60:.1f} min  "
                    f"(W {record['wasserstein']:.3f}, gp {record['gradient_penalty']:.3f})")
    bar.close()
    if not record:
        history = read_jsonl(out / "metrics.jsonl")
        record = history[-1] if history else {}
    if run.classifier is not None:
        _write_reach(run, progress, log)
    return record


def _write_reach(run: _GanTraining, progress: bool, log) -> None:
    """The generator report of the saved generator against the classifier (`generators.reach`): cached for the
    pair (so inversions record it) and copied into the GAN_DIR as generator_report.json."""
    options = ReachOptions(seed=run.cfg.seed)
    log(f"generator report: {2 * options.per_class} training images and {options.per_class} samples per class "
        "through the classifier")
    report = generator_reach(run.classifier, load_wgan(run.out, run.device), options, run.cfg.data_root,
                             progress=progress, log=log)
    write_generator_report(dataclasses.replace(report), run.out / GENERATOR_REPORT)
    o = report.overall
    log(f"generator report: Fréchet distance {o.frechet_distance:.4g} (tr Σ_real {o.real_trace:.4g}), precision "
        f"{o.precision:.3f}, recall {o.recall:.3f} over {len(report.classes)} classes "
        f"({run.out / GENERATOR_REPORT})")


def samples_picture(generator: Generator, z: torch.Tensor, class_names: list[str] | None, scale: int = 2):
    """A PIL image: one row per class (columns share latent codes), class names on the left.

    `z (K, latent_dim)`: K columns. Unconditional generators give one row per K codes.
    """

    k = len(z)
    with torch.no_grad():
        if generator.conditional:
            rows = generator.num_classes
            y = torch.arange(rows).repeat_interleave(k).to(generator.device)
            images = generator.generate(z.repeat(rows, 1), y)
        else:
            images = generator.generate(z)
    labels = class_names if generator.conditional else None
    return sample_grid(generator.to_unit(images).cpu(), k, labels, scale)
