"""The drop-in (`isda_viz.compat`) against the public ISDA module it replaces, side by side in one run.

For each configuration of the paper, one training step of the loss as a public training script calls it
(`criterion(model, fc, x, target, ratio)` for CIFAR, `criterion(model, x, target, ratio)` for ImageNet):
the estimator's update, the augmented logits, the cross-entropy and its backward pass, with the public
module (`tests/public_isda.py`, a transcription of `ISDA.py` / `ISDA_imagenet.py`) and with the drop-in,
alternated, the median of `--repeats` timed steps each. `--networks` adds the same step with a real
network's forward and backward in front (what a user of the public `train.py` sees per iteration).
Both start from the same statistics (warmed on a few batches by the drop-in and copied into the public
module, whose own warm-up would take minutes at ImageNet size) and the loss values are checked equal.

    python bench/compat_speed.py                      # CIFAR configurations, CPU
    python bench/compat_speed.py --device cuda --configs all --networks resnet32,wrn28_10

Prints a table of ms per step and the speed-up (public / drop-in). Timings mean something only on a quiet
machine; the ratio is what the README quotes.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.classifiers.networks import build_model
from isda_viz.compat import cifar, imagenet

_spec = importlib.util.spec_from_file_location("public_isda", Path(__file__).parents[1] / "tests" / "public_isda.py")
public_isda = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(public_isda)

# name: (N, A, C, imagenet (diagonal covariance), what it is)
CONFIGS = {
    "resnet32_c10": (128, 64, 10, False, "ResNet-32 CIFAR-10"),
    "resnet110_c100": (128, 64, 100, False, "ResNet-110 CIFAR-100"),
    "wrn28_10_c100": (128, 640, 100, False, "WRN-28-10 CIFAR-100"),
    "resnet50_in": (256, 2048, 1000, True, "ResNet-50 ImageNet (diagonal)"),
}
DEFAULT_CONFIGS = ("resnet32_c10", "resnet110_c100", "wrn28_10_c100")
# --networks: arch for build_model, its config (for N, C) and input shape
NETWORKS = {"resnet32": ("resnet32_c10", (3, 32, 32)), "resnet110": ("resnet110_c100", (3, 32, 32)),
            "wrn28_10": ("wrn28_10_c100", (3, 32, 32)), "resnet50": ("resnet50_in", (3, 224, 224))}
RATIO = 0.5
WARM_BATCHES = 4


class _Features(nn.Module):
    """The `model` of a loss-only step: `x` already holds the features (CIFAR call)."""

    def forward(self, x):
        return x


class _WithFc(nn.Module):
    """`model(x, isda=True)` → `(logits, features)` and `model.module.fc`, as the public ImageNet code expects."""

    def __init__(self, body: nn.Module, fc: nn.Linear):
        super().__init__()
        self.module = self
        self.body, self.fc = body, fc

    def forward(self, x, isda=False):
        features = self.body(x)
        return self.fc(features), features


def _batches(n, a, c, count, device, seed=0):
    """`count` batches of penultimate-like features (ReLU of class means plus correlated noise) and labels."""
    g = torch.Generator().manual_seed(seed)
    means, mix = torch.randn(c, a, generator=g), torch.randn(a, a, generator=g) / a ** 0.5
    out = []
    for _ in range(count):
        y = torch.randint(0, c, (n,), generator=g)
        out.append((F.relu(means[y] + 0.7 * torch.randn(n, a, generator=g) @ mix).to(device), y.to(device)))
    return out


def _criteria(name, device):
    """`(public, drop-in)` losses of config `name`, both holding the same warmed-up statistics."""
    n, a, c, is_imagenet, _ = CONFIGS[name]
    ours = (imagenet if is_imagenet else cifar).ISDALoss(a, c).to(device)
    for x, y in _batches(n, a, c, WARM_BATCHES, device, seed=1):
        ours.estimator.update_CV(x, y)
    public = public_isda.PublicISDALoss(a, c, imagenet=is_imagenet, device=device)
    public.estimator.CoVariance = ours.estimator.CoVariance.clone()
    public.estimator.Ave = ours.estimator.Ave.clone()
    public.estimator.Amount = ours.estimator.Amount.clone()
    return public, ours


def _step_fn(name, criterion, device, network: nn.Module | None):
    """One timed step: the loss's forward and backward (after `network`'s forward when given); returns the loss."""
    n, a, c, is_imagenet, _ = CONFIGS[name]
    torch.manual_seed(0)
    fc = nn.Linear(a, c).to(device)
    body = network.features if network is not None else _Features()
    stream = _batches(n, a, c, 2, device, seed=2)
    inputs = None
    if network is not None:
        shape = NETWORKS[next(k for k, v in NETWORKS.items() if v[0] == name)][1]
        inputs = torch.randn(n, *shape, generator=torch.Generator().manual_seed(3)).to(device)
    model = _WithFc(body, fc) if is_imagenet else body
    state = {"i": 0}

    def step():
        features, y = stream[state["i"] % 2]
        state["i"] += 1
        x = inputs if inputs is not None else features.clone().requires_grad_(True)
        fc.zero_grad(set_to_none=True)
        loss, _ = criterion(model, x, y, RATIO) if is_imagenet else criterion(model, fc, x, y, RATIO)
        loss.backward()
        return loss.detach()

    return step


def _time(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(name, device, repeats: int, network_arch: str | None = None) -> dict:
    """Median seconds per step of the public module and of the drop-in, alternated, and their losses."""
    public, ours = _criteria(name, device)
    network = None
    if network_arch is not None:
        torch.manual_seed(0)
        network = build_model(network_arch, CONFIGS[name][2], 3).to(device).train()
    steps = {"public": _step_fn(name, public, device, network), "drop-in": _step_fn(name, ours, device, network)}
    losses = {k: step() for k, step in steps.items()}    # first step: warm-up and the values compared
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            times[k].append(_time(step, device))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"config": name, "network": network_arch or "-", "public_ms": 1e3 * medians["public"],
            "drop_in_ms": 1e3 * medians["drop-in"], "speedup": medians["public"] / medians["drop-in"],
            "loss_difference": abs(float(losses["public"]) - float(losses["drop-in"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated, or 'all': {', '.join(CONFIGS)}")
    parser.add_argument("--networks", default="", help=f"comma-separated, also a full step with: {', '.join(NETWORKS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    names = list(CONFIGS) if args.configs == "all" else [c for c in args.configs.split(",") if c]
    rows = [measure(name, device, args.repeats) for name in names]
    rows += [measure(NETWORKS[arch][0], device, args.repeats, arch) for arch in args.networks.split(",") if arch]
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats} steps each, alternated")
    print("| configuration | network | public ISDA.py (ms/step) | drop-in (ms/step) | speed-up | |loss difference| |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {CONFIGS[r['config']][4]} | {r['network']} | {r['public_ms']:.1f} | {r['drop_in_ms']:.1f} | "
              f"{r['speedup']:.2f}x | {r['loss_difference']:.1e} |")


if __name__ == "__main__":
    main()
