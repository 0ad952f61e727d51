"""A compact class-conditional WGAN-GP for 28-32 px images, and `train_gan`, its resumable training loop.

Networks (sized so a CPU trains one to recognisable Fashion-MNIST in minutes):

* `WGANGenerator`: z `(N, latent_dim)` → linear → `(4W, S/4, S/4)` → two stages of
  [nearest 2x upsampling, 3x3 conv, conditional batch-norm, ReLU] → 3x3 conv → tanh,
  images `(N, C, S, S)` in [-1, 1]. Conditional batch-norm (de Vries et al. 2017;
  Miyato & Koyama 2018) gives each class its own per-channel scale and shift.
* `WGANCritic`: strided convs with LeakyReLU, no normalisation (the gradient
  penalty is per-sample), global sum pooling, and a projection head
  `f(x, y) = w·h(x) + embed(y)·h(x)` (Miyato & Koyama 2018).

Training (Gulrajani et al. 2017): the critic minimises `D(fake) - D(real) + λ·(‖∇D(x̂)‖ - 1)²`
on random interpolates x̂, `n_critic` critic steps per generator step, Adam with
β = (0.0 or 0.5, 0.9), learning rates decayed linearly to zero over the run.

Defaults are what reached the class-agreement target on a 2-core CPU: 2 critic
steps (not the paper's 5) at lr 1e-3 for both nets (not 1e-4) with β = (0.5, 0.9).
With lr 2e-4 the class-conditional batch-norm scales, which Adam moves by about
lr per step from the identity, barely separated the classes after 300 iterations;
at 1e-3 classes separate within a few hundred. channels_last was slower here, so
the networks stay in the default memory format.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz import __version__
from isda_viz.devices import pick_device
from isda_viz.errors import IsdaVizError
from isda_viz.runs import append_jsonl, load_checkpoint, read_jsonl, save_atomic, save_image_atomic, write_json_atomic

from .base import Generator

GENERATOR_FILE = "generator.pt"
STATE_FILE = "training_state.pt"  # critic, optimisers, RNG: what --resume needs beyond generator.pt


# ----------------------------------------------------------------------------------------------------- networks


class ConditionalBatchNorm2d(nn.Module):
    """Batch-norm whose affine scale and shift are looked up per class (plain affine when `num_classes` is None)."""

    def __init__(self, channels: int, num_classes: int | None):
        super().__init__()
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(channels, affine=num_classes is None)
        if num_classes is not None:
            self.embed = nn.Embedding(num_classes, 2 * channels)
            with torch.no_grad():  # start as the identity: scale 1, shift 0
                self.embed.weight[:, :channels].fill_(1.0)
                self.embed.weight[:, channels:].zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = self.bn(x)
        if self.num_classes is None:
            return out
        scale, shift = self.embed(y).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return out * scale + shift


class UpBlock(nn.Module):
    """Nearest 2x upsampling, 3x3 conv, conditional batch-norm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, num_classes: int | None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)
        self.bn = ConditionalBatchNorm2d(out_channels, num_classes)

    def forward(self, x, y):
        return F.relu(self.bn(self.conv(F.interpolate(x, scale_factor=2, mode="nearest")), y))


class WGANGenerator(Generator):
    """Class-conditional (or unconditional) generator: `(N, latent_dim)`, `(N,)` → `(N, C, S, S)` in [-1, 1]."""

    name = "wgan"
    output_range = (-1.0, 1.0)

    def __init__(self, latent_dim: int = 128, num_classes: int | None = 10, channels: int = 1, image_size: int = 28,
                 width: int = 32, class_names: list[str] | None = None):
        super().__init__()
        if image_size % 4:
            raise IsdaVizError(f"the WGAN generates sizes divisible by 4 (28, 32), not {image_size}")
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.channels, self.image_size = channels, image_size
        self.width = width
        self.class_names = list(class_names) if class_names else None
        self.base = image_size // 4
        self.fc = nn.Linear(latent_dim, 4 * width * self.base * self.base, bias=False)
        self.bn0 = ConditionalBatchNorm2d(4 * width, num_classes)
        self.up1 = UpBlock(4 * width, 2 * width, num_classes)
        self.up2 = UpBlock(2 * width, width, num_classes)
        self.to_image = nn.Conv2d(width, channels, 3, 1, 1)

    def arch_config(self) -> dict:
        """What rebuilds this network (saved in `generator.pt`)."""
        return {"latent_dim": self.latent_dim, "num_classes": self.num_classes, "channels": self.channels,
                "image_size": self.image_size, "width": self.width, "class_names": self.class_names}

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditional and y is None:
            raise IsdaVizError("this WGAN is class-conditional: pass labels y")
        h = self.fc(z).view(len(z), 4 * self.width, self.base, self.base)
        h = F.relu(self.bn0(h, y))
        h = self.up2(self.up1(h, y), y)
        return torch.tanh(self.to_image(h))

    def generate(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """`z (N, latent_dim)`, `y (N,)` class indices (None if unconditional) → `(N, C, S, S)` in [-1, 1]."""
        return self(z, y if self.conditional else None)


class WGANCritic(nn.Module):
    """Critic `(N, C, S, S)` in [-1, 1], `(N,)` → `(N,)` scores; projection head when class-conditional."""

    def __init__(self, num_classes: int | None = 10, channels: int = 1, width: int = 32):
        super().__init__()
        self.num_classes = num_classes
        # Strided from the first layer: at 28 px a full-resolution first conv costs more than the
        # rest of the critic under the gradient penalty's double backward, for little gain in samples.
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2),          # S/2
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),         # S/4
            nn.Conv2d(2 * width, 4 * width, 3, 1, 1), nn.LeakyReLU(0.2),
        )
        self.linear = nn.Linear(4 * width, 1)
        self.embed = nn.Embedding(num_classes, 4 * width) if num_classes is not None else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x).sum(dim=(2, 3))  # (N, 4W)
        out = self.linear(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(1)
        return out


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor | None,
                     eps: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's `E[(‖∇_x̂ D(x̂, y)‖₂ - 1)²]` at `x̂ = eps·real + (1 - eps)·fake`.

    `real`, `fake (N, C, S, S)`; `eps (N, 1, 1, 1)` in [0, 1]; returns a scalar.
    """
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat, y).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


# ------------------------------------------------------------------------------------------------- saving, loading


def save_generator(generator: WGANGenerator, path, iteration: int, dataset: str) -> None:
    """Write `generator.pt`: plain weights and the config that rebuilds the network (loads with weights_only=True)."""
    save_atomic({"format": "isda-viz-wgan", "config": generator.arch_config(), "dataset": dataset,
                 "iteration": iteration, "state_dict": {k: v.detach().cpu().contiguous()
                                                        for k, v in generator.state_dict().items()}}, path)


def load_wgan(path, device="cpu") -> WGANGenerator:
    """The frozen generator in a `generator.pt` written by `train_gan` (or the GAN_DIR holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / GENERATOR_FILE
    ckpt = load_checkpoint(path, "generator file")
    if not isinstance(ckpt, dict) or ckpt.get("format") != "isda-viz-wgan":
        raise IsdaVizError(f"{path} is not a generator written by isda-viz train-gan")
    try:
        generator = WGANGenerator(**ckpt["config"])
        generator.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise IsdaVizError(f"{path} is corrupt: its weights do not fit its config "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    generator.name = f"wgan:{path.parent}"
    return generator.to(device).freeze()


@torch.no_grad()
def recompute_batchnorm_statistics(generator: WGANGenerator, batches: int, batch_size: int,
                                   rng: torch.Generator) -> None:
    """Set the running statistics of every batch-norm to their average over `batches` random batches.

    Training normalises with batch statistics; the frozen generator (eval mode)
    uses running ones. Averages over many fresh batches ("standing statistics",
    Brock et al. 2019) make eval-mode samples match train-mode ones, one image at a time.
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    was_training = generator.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    generator.train()
    device = generator.device
    for _ in range(batches):
        z = torch.randn(batch_size, generator.latent_dim, generator=rng).to(device)
        y = torch.randint(generator.num_classes, (batch_size,), generator=rng).to(device) \
            if generator.conditional else None
        generator(z, y)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    generator.train(was_training)


def sample_grid(generator: Generator, z: torch.Tensor, class_names: list[str] | None, scale: int = 2):
    """A PIL image: one row per class (columns share latent codes), class names on the left.

    `z (K, latent_dim)`: K columns. Unconditional generators give one row per K codes.
    """
    import torchvision.utils as vutils
    from PIL import Image, ImageDraw

    k = len(z)
    with torch.no_grad():
        if generator.conditional:
            rows = generator.num_classes
            y = torch.arange(rows).repeat_interleave(k).to(generator.device)
            images = generator.generate(z.repeat(rows, 1), y)
        else:
            images = generator.generate(z)
    images = generator.to_unit(images).cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    grid = vutils.make_grid(images, nrow=k, padding=2, pad_value=1.0)
    grid = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    picture = Image.fromarray(grid)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    if not (generator.conditional and class_names):
        return picture
    margin = 90
    canvas = Image.new("RGB", (picture.width + margin, picture.height), "white")
    canvas.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    cell = (generator.image_size + 2) * scale
    for i, name in enumerate(class_names):
        draw.text((4, 2 * scale + i * cell + cell // 2 - 6), name, fill="black")
    return canvas


@torch.no_grad()
def class_agreement(generator: Generator, classifier, per_class: int, rng: torch.Generator,
                    batch_size: int = 250) -> float:
    """Fraction in [0, 1] of class-conditional samples the classifier labels as their conditioning class.

    `per_class` samples per class, latent codes drawn from `rng`; images pass
    through `isda_viz.adapter.to_classifier_input`.
    """
    from isda_viz.adapter import to_classifier_input

    y = torch.arange(generator.num_classes).repeat_interleave(per_class)
    z = torch.randn(len(y), generator.latent_dim, generator=rng)
    correct = 0
    for start in range(0, len(y), batch_size):
        yb = y[start:start + batch_size].to(generator.device)
        images = generator.generate(z[start:start + batch_size].to(generator.device), yb)
        x = to_classifier_input(images, generator.output_range, classifier).to(
            next(classifier.model.parameters()).device)
        correct += (classifier.model(x).argmax(1) == yb.to(x.device)).sum().item()
    return correct / len(y)


# ---------------------------------------------------------------------------------------------------- training


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
    width: int = 32                    # generator channels at full size (4x that at S/4)
    critic_width: int = 32             # critic channels after its first conv
    conditional: bool = True
    image_size: int | None = None      # None: the dataset's size (32 when larger)
    seed: int = 0
    limit_train: int | None = None
    classifier: str | None = None      # a `train` run: measure class agreement with it
    agreement_per_class: int = 50
    sample_every: int = 200            # iterations between samples.png / generator.pt / agreement
    log_every: int = 25                # iterations between metrics.jsonl lines
    device: str | None = None          # not part of the run's identity


def learning_rate(base: float, iteration: int, total: int) -> float:
    """Linear decay from `base` at iteration 0 to 0 at `total` (as in the WGAN-GP paper's CIFAR runs)."""
    return base * max(0.0, 1.0 - iteration / total)


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
        else:
            images = torch.stack([self.dataset[int(i)][0] for i in idx])
        x = images.to(self.device).float().div_(127.5).sub_(1.0)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return x, self.labels[idx].to(self.device)


# What a resumed run may change; everything else is taken from the run being resumed.
RESUME_OVERRIDES = ("iterations", "classifier", "agreement_per_class", "sample_every", "log_every", "device", "out")


def _resumed_config(saved: dict, cfg: GanConfig, path: Path) -> GanConfig:
    for key in ("dataset", "conditional"):
        if saved.get(key) != getattr(cfg, key):
            raise IsdaVizError(f"{path} holds a GAN with {key}={saved.get(key)}, not {getattr(cfg, key)}; "
                               "choose another --out or match the run")
    fields = {f.name for f in dataclasses.fields(GanConfig)}
    return GanConfig(**{**{k: v for k, v in saved.items() if k in fields},
                        **{k: getattr(cfg, k) for k in RESUME_OVERRIDES}})


def train_gan(cfg: GanConfig, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train a WGAN-GP per `cfg` into the directory `cfg.out`; returns the last metrics record.

    Writes `generator.pt` (see `save_generator`), `training_state.pt` (critic,
    optimisers, RNG: for `resume`), `samples.png`, `metrics.jsonl` and `config.json`.
    With `cfg.classifier`, measures class agreement every `sample_every` iterations.
    """
    from tqdm import tqdm

    from isda_viz.data import dataset_spec, load_split
    from isda_viz.classifier import load_classifier

    if cfg.iterations < 1 or cfg.batch_size < 1 or cfg.n_critic < 1:
        raise IsdaVizError("--iterations, --batch-size and --n-critic must be at least 1")
    device = pick_device(cfg.device)
    out = Path(cfg.out)
    state_path = out / STATE_FILE
    state = None
    if state_path.exists():
        if not resume:
            raise IsdaVizError(f"--out {out} already holds a GAN run; pass --resume to continue it, "
                               "or choose another --out")
        state = load_checkpoint(state_path, "GAN training state")
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise IsdaVizError(f"{state_path} is not a train-gan training state; choose another --out")
        cfg = _resumed_config(state["config"], cfg, state_path)
    elif resume and out.exists() and any(out.iterdir()):
        raise IsdaVizError(f"--resume: {out} holds no {STATE_FILE}")
    spec = dataset_spec(cfg.dataset, cfg.data_root)
    cfg = dataclasses.replace(cfg, image_size=cfg.image_size or min(spec.image_size, 32))
    train_set = load_split(cfg.dataset, True, cfg.data_root, cfg.limit_train)
    class_names = list(train_set.classes)
    num_classes = len(class_names) if cfg.conditional else None

    classifier = None
    if cfg.classifier:
        if not cfg.conditional:
            raise IsdaVizError("--classifier measures class agreement, which needs a class-conditional GAN")
        classifier = load_classifier(cfg.classifier, device)
        if classifier.class_names != class_names:
            raise IsdaVizError(f"the classifier in {classifier.run_dir} was trained on {classifier.dataset} "
                               f"({classifier.num_classes} classes), not on this GAN's {cfg.dataset} "
                               f"({len(class_names)} classes)")

    torch.manual_seed(cfg.seed)
    generator = WGANGenerator(cfg.latent_dim, num_classes, spec.channels, cfg.image_size, cfg.width,
                              class_names).to(device)
    critic = WGANCritic(num_classes, spec.channels, cfg.critic_width).to(device)
    opt_g = torch.optim.Adam(generator.parameters(), cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(critic.parameters(), cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
    rng = torch.Generator().manual_seed(cfg.seed)  # every random draw of training: batches, z, y, interpolation
    start, elapsed = 0, 0.0
    if state is not None:
        try:
            generator.load_state_dict(state["generator"])
            critic.load_state_dict(state["critic"])
            opt_g.load_state_dict(state["opt_g"])
            opt_d.load_state_dict(state["opt_d"])
            rng.set_state(state["rng"])
            start, elapsed = state["iteration"], state["seconds"]
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise IsdaVizError(f"{state_path} is corrupt ({type(e).__name__}); choose another --out") from None
        if start >= cfg.iterations:
            log(f"{out} already holds {start} iterations (asked for {cfg.iterations}); nothing to do")
        # Drop metric lines written after the state that is being resumed.
        kept = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("iteration", 0) <= start]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        log(f"resuming {out} at iteration {start}/{cfg.iterations}")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({**dataclasses.asdict(cfg), "isda_viz_version": __version__, "torch": torch.__version__},
                      out / "config.json")

    sample_batch = _BatchSampler(train_set, cfg.image_size, rng, device)
    grid_z = torch.randn(10, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)

    def draw_y(n):
        return torch.randint(num_classes, (n,), generator=rng).to(device) if cfg.conditional else None

    def snapshot(iteration: int) -> float | None:
        """Standing BN statistics, then generator.pt, samples.png, agreement; returns the agreement."""
        recompute_batchnorm_statistics(generator, 8, 2 * cfg.batch_size,  # 1024 samples at the default batch
                                       torch.Generator().manual_seed(cfg.seed * 7919 + iteration))
        generator.eval()
        agreement = None
        if classifier is not None:
            agreement = class_agreement(generator, classifier, cfg.agreement_per_class,
                                        torch.Generator().manual_seed(cfg.seed + 2))
        save_generator(generator, out / GENERATOR_FILE, iteration, cfg.dataset)
        save_image_atomic(sample_grid(generator, grid_z, class_names if cfg.conditional else None),
                          out / "samples.png")
        generator.train()
        return agreement

    def save_state(iteration: int, seconds: float) -> None:
        save_atomic({"generator": generator.state_dict(), "critic": critic.state_dict(), "opt_g": opt_g.state_dict(),
                     "opt_d": opt_d.state_dict(), "rng": rng.get_state(), "iteration": iteration,
                     "seconds": seconds, "config": dataclasses.asdict(cfg)}, state_path)

    generator.train()
    critic.train()
    sums = {"critic_loss": 0.0, "wasserstein": 0.0, "gradient_penalty": 0.0, "generator_loss": 0.0}
    count = 0
    record: dict = {}
    last_agreement = None
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="train-gan",
               disable=not progress)
    t0 = time.time()
    for it in bar:
        for opt, base in ((opt_g, cfg.lr_g), (opt_d, cfg.lr_d)):
            for group in opt.param_groups:
                group["lr"] = learning_rate(base, it, cfg.iterations)
        for _ in range(cfg.n_critic):
            real, y = sample_batch(cfg.batch_size)
            y = y if cfg.conditional else None
            z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=rng).to(device)
            eps = torch.rand(cfg.batch_size, 1, 1, 1, generator=rng).to(device)
            with torch.no_grad():
                fake = generator(z, y)  # fakes of the real batch's classes: the projection compares like with like
            d_real, d_fake = critic(real, y).mean(), critic(fake, y).mean()
            penalty = gradient_penalty(critic, real, fake, y, eps)
            loss_d = d_fake - d_real + cfg.gp * penalty
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=rng).to(device)
        y = draw_y(cfg.batch_size)
        critic.requires_grad_(False)
        loss_g = -critic(generator(z, y), y).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        critic.requires_grad_(True)

        sums["critic_loss"] += loss_d.item()
        sums["wasserstein"] += (d_real - d_fake).item()
        sums["gradient_penalty"] += penalty.item()
        sums["generator_loss"] += loss_g.item()
        count += 1
        done = it + 1
        agreement = None
        snap = done % cfg.sample_every == 0 or done == cfg.iterations
        if snap:
            agreement = snapshot(done)
        if done % cfg.log_every == 0 or snap:
            seconds = elapsed + time.time() - t0
            record = {"iteration": done, **{k: v / count for k, v in sums.items()},
                      "lr_g": learning_rate(cfg.lr_g, it, cfg.iterations), "seconds": round(seconds, 2)}
            if agreement is not None:
                record["agreement"] = agreement
                last_agreement = agreement
            sums = dict.fromkeys(sums, 0.0)
            count = 0
            if snap:
                save_state(done, seconds)  # after the metrics it covers are computed, before they are written
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
    return record
