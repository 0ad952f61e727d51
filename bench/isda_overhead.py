"""Per-step cost of our ISDA loss against the dense reference formulation, and against a CE training step.

For each (N, A, C) configuration of the paper's experiments this times, side by
side in one run, the forward + backward pass of one ISDA step (estimator update
included):

  ours   `isda_viz.ISDALoss`: per-present-class quadratic forms, float64 statistics.
  dense  a faithful re-implementation of the public reference code (ISDA.py /
         ISDA_imagenet.py): one-hot-masked `(C, A, N) x (C, N, A)` statistics over all
         C classes, per-sample covariances gathered to `(N, A, A)` and
         `(N, C, A) x (N, A, A) x (N, A, C)` products of which only the diagonal of
         the `(N, C, C)` result is kept; diagonal case: `(N, C, A)` products.

It checks that both give the same loss and gradients, measures the peak extra
memory of one step of each in a fresh child process (see `_peak_extra_rss`), and
times a plain cross-entropy training step of a real network against the same step
with ISDA, for the overhead in percent.

    python bench/isda_overhead.py [--quick] [--configs resnext29,wrn28_10] [--networks resnet32]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.isda.loss import ISDALoss
from isda_viz.classifiers.networks import build_model

# name: (N, A, C, diagonal, what it is)
CONFIGS = {
    "resnet32_c10": (128, 64, 10, False, "ResNet-32 CIFAR-10"),
    "resnet110_c100": (128, 64, 100, False, "ResNet-110 CIFAR-100"),
    "wrn28_10": (128, 640, 100, False, "WRN-28-10 CIFAR-100"),
    "densenet_bc100": (64, 342, 100, False, "DenseNet-BC-100 CIFAR-100"),
    "resnext29": (128, 1024, 100, False, "ResNeXt-29 CIFAR-100"),
    "resnet50_diag": (256, 2048, 1000, True, "ResNet-50 ImageNet diag"),
}
# arch for build_model: (batch, input shape, classes)
NETWORKS = {
    "resnet32": (128, (3, 32, 32), 100),
    "resnet110": (128, (3, 32, 32), 100),
    "wrn28_10": (128, (3, 32, 32), 100),
    "resnet50": (256, (3, 224, 224), 1000),
}
STRENGTH = 0.5
WARM_BATCHES = 4


# ---------------------------------------------------------------- dense reference formulation

class DenseEstimator:
    """The reference EstimatorCV.update_CV (ISDA.py; ISDA_imagenet.py when diagonal), device-agnostic."""

    def __init__(self, num_features, num_classes, diagonal):
        self.class_num, self.diagonal = num_classes, diagonal
        shape = (num_classes, num_features) if diagonal else (num_classes, num_features, num_features)
        self.CoVariance = torch.zeros(shape)
        self.Ave = torch.zeros(num_classes, num_features)
        self.Amount = torch.zeros(num_classes)

    def update_CV(self, features, labels):
        N, A = features.shape
        C = self.class_num
        NxCxFeatures = features.view(N, 1, A).expand(N, C, A)
        onehot = torch.zeros(N, C)
        onehot.scatter_(1, labels.view(-1, 1), 1)
        NxCxA_onehot = onehot.view(N, C, 1).expand(N, C, A)
        features_by_sort = NxCxFeatures.mul(NxCxA_onehot)
        Amount_CxA = NxCxA_onehot.sum(0)
        Amount_CxA[Amount_CxA == 0] = 1
        ave_CxA = features_by_sort.sum(0) / Amount_CxA
        var_temp = features_by_sort - ave_CxA.expand(N, C, A).mul(NxCxA_onehot)
        if self.diagonal:
            var_temp = var_temp.pow(2).sum(0).div(Amount_CxA)
            sum_weight_CV = onehot.sum(0).view(C, 1).expand(C, A)
            weight_CV = sum_weight_CV.div(sum_weight_CV + self.Amount.view(C, 1).expand(C, A))
            weight_CV[weight_CV != weight_CV] = 0
            additional_CV = weight_CV.mul(1 - weight_CV).mul((self.Ave - ave_CxA).pow(2))
            self.CoVariance = (self.CoVariance.mul(1 - weight_CV) + var_temp.mul(weight_CV)).detach() \
                + additional_CV.detach()
            self.Ave = (self.Ave.mul(1 - weight_CV) + ave_CxA.mul(weight_CV)).detach()
        else:
            var_temp = torch.bmm(var_temp.permute(1, 2, 0), var_temp.permute(1, 0, 2)).div(
                Amount_CxA.view(C, A, 1).expand(C, A, A))
            sum_weight_CV = onehot.sum(0).view(C, 1, 1).expand(C, A, A)
            sum_weight_AV = onehot.sum(0).view(C, 1).expand(C, A)
            weight_CV = sum_weight_CV.div(sum_weight_CV + self.Amount.view(C, 1, 1).expand(C, A, A))
            weight_CV[weight_CV != weight_CV] = 0
            weight_AV = sum_weight_AV.div(sum_weight_AV + self.Amount.view(C, 1).expand(C, A))
            weight_AV[weight_AV != weight_AV] = 0
            additional_CV = weight_CV.mul(1 - weight_CV).mul(
                torch.bmm((self.Ave - ave_CxA).view(C, A, 1), (self.Ave - ave_CxA).view(C, 1, A)))
            self.CoVariance = (self.CoVariance.mul(1 - weight_CV) + var_temp.mul(weight_CV)).detach() \
                + additional_CV.detach()
            self.Ave = (self.Ave.mul(1 - weight_AV) + ave_CxA.mul(weight_AV)).detach()
        self.Amount += onehot.sum(0)


class DenseISDALoss(nn.Module):
    """The reference ISDALoss.isda_aug + forward, with features computed outside (as ours)."""

    def __init__(self, num_features, num_classes, diagonal):
        super().__init__()
        self.estimator = DenseEstimator(num_features, num_classes, diagonal)
        self.class_num, self.diagonal = num_classes, diagonal

    def isda_aug(self, fc, features, y, labels, cv_matrix, strength):
        N, A = features.shape
        C = self.class_num
        weight_m = list(fc.parameters())[0]
        NxW_ij = weight_m.expand(N, C, A)
        NxW_kj = torch.gather(NxW_ij, 1, labels.view(N, 1, 1).expand(N, C, A))
        CV_temp = cv_matrix[labels]
        if self.diagonal:
            sigma2 = strength * (weight_m - NxW_kj).pow(2).mul(CV_temp.view(N, 1, A).expand(N, C, A)).sum(2)
        else:
            sigma2 = strength * torch.bmm(torch.bmm(NxW_ij - NxW_kj, CV_temp), (NxW_ij - NxW_kj).permute(0, 2, 1))
            sigma2 = sigma2.mul(torch.eye(C).expand(N, C, C)).sum(2).view(N, C)
        return y + 0.5 * sigma2

    def forward(self, features, fc, targets, strength):
        y = fc(features)
        self.estimator.update_CV(features.detach(), targets)
        aug = self.isda_aug(fc, features, y, targets, self.estimator.CoVariance.detach(), strength)
        return F.cross_entropy(aug, targets)


# ---------------------------------------------------------------- workload

def _batches(n, a, c, count, seed=0):
    """`count` batches of realistic penultimate features: relu of class-dependent means plus noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, a, generator=g)
    mix = torch.randn(a, a, generator=g) / a ** 0.5  # correlated noise: non-trivial covariances
    out = []
    for _ in range(count):
        y = torch.randint(0, c, (n,), generator=g)
        x = F.relu(means[y] + torch.randn(n, a, generator=g) @ mix * 0.7)
        out.append((x, y))
    return out


def _setup(name, impl, seed=0):
    """(criterion, fc, step) with the estimator pre-warmed on WARM_BATCHES batches.

    The dense estimator starts from the same statistics as ours (its own update_CV
    on the warm-up batches would take minutes at ResNet-50 size); every timed step
    runs its update_CV.
    """
    n, a, c, diagonal, _ = CONFIGS[name]
    torch.manual_seed(seed)
    fc = nn.Linear(a, c)
    criterion = ISDALoss(a, c, covariance="diagonal" if diagonal else "full")
    for x, y in _batches(n, a, c, WARM_BATCHES, seed=seed + 1):
        criterion.estimator.update(x, y)
    if impl == "dense":
        est = criterion.estimator
        criterion = DenseISDALoss(a, c, diagonal)
        criterion.estimator.CoVariance = est.covariance.clone()
        criterion.estimator.Ave = est.mean.clone()
        criterion.estimator.Amount = est.count.float()
        del est
        gc.collect()
    stream = _batches(n, a, c, 2, seed=seed + 2)
    state = {"i": 0}

    def step():
        x, y = stream[state["i"] % len(stream)]
        state["i"] += 1
        features = x.clone().requires_grad_(True)
        fc.zero_grad(set_to_none=True)
        loss = criterion(features, fc, y, STRENGTH)
        loss.backward()
        return loss, features.grad, fc.weight.grad

    return criterion, fc, step


def _state_mib(criterion):
    if isinstance(criterion, ISDALoss):
        est = criterion.estimator
        tensors = [v for v in vars(est).values() if torch.is_tensor(v)]  # float64 M2 + float32 copy + buffers
    else:
        est = criterion.estimator
        tensors = [est.CoVariance, est.Ave, est.Amount]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


# ---------------------------------------------------------------- memory

def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _memory_child(name, impl):
    """Runs in a fresh process: peak RSS growth (MiB) over one step, after a warm-up step."""
    criterion, _, step = _setup(name, impl)
    step()
    gc.collect()
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    step()
    peak = _rss_kib("VmHWM")
    print(json.dumps({"extra_mib": (peak - before) / 1024, "state_mib": _state_mib(criterion)}))


def _peak_extra_rss(name, impl, threads):
    """Peak resident-memory growth of one step, in a fresh child process.

    glibc is told to serve every allocation above 64 KiB with its own mmap and to
    return freed memory at once (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), and
    torch's CPU allocator does not cache, so resident memory tracks live tensors; the
    kernel's peak-RSS counter (VmHWM) is reset just before the step via
    /proc/self/clear_refs, and the result is VmHWM after the step minus VmRSS before it.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--_memory-child", name, impl], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- timing

def _time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_config(name, repeats):
    """Median seconds per step of ours and dense, interleaved so both see the same machine load,
    and the largest relative difference of loss, feature and weight gradients over the two warm-up steps."""
    _, _, ours = _setup(name, "ours")
    _, _, dense = _setup(name, "dense")
    worst = 0.0
    for _ in range(2):  # warm-up, on the same batches from the same statistics: must agree
        for u, v in zip(ours(), dense()):
            worst = max(worst, ((u - v).abs().max() / v.abs().max().clamp(min=1e-30)).item())
    t_ours, t_dense = [], []
    for _ in range(repeats):
        # ours is cheap: take the best of a few inner runs per repeat to damp scheduler noise
        t_ours.append(min(_time(ours) for _ in range(3)))
        t_dense.append(_time(dense))
    return statistics.median(t_ours), statistics.median(t_dense), worst


def time_network(arch, repeats):
    """Median seconds of a CE training step and of the same step with ISDA (full covariance)."""
    n, shape, c = NETWORKS[arch]
    torch.manual_seed(0)
    model = build_model(arch, c, shape[0]).to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(n, *shape).to(memory_format=torch.channels_last)
    y = torch.randint(0, c, (n,))
    criterion = ISDALoss(model.feature_dim, c, "diagonal" if arch == "resnet50" else "full")
    for xw, yw in _batches(n, model.feature_dim, c, WARM_BATCHES, seed=1):
        criterion.estimator.update(xw, yw)

    def ce_step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def isda_step():
        opt.zero_grad(set_to_none=True)
        criterion(model.features(x), model.fc, y, STRENGTH).backward()
        opt.step()

    with torch.no_grad():
        feats = model.features(x)

    def ce_head():  # the loss part alone, on fixed features: what ISDA replaces
        f = feats.clone().requires_grad_(True)
        F.cross_entropy(model.fc(f), y).backward()

    def isda_head():
        f = feats.clone().requires_grad_(True)
        criterion(f, model.fc, y, STRENGTH).backward()

    ce_step(), isda_step()  # warm-up
    t_ce, t_isda = [], []
    for i in range(repeats):
        order = (ce_step, isda_step) if i % 2 == 0 else (isda_step, ce_step)
        for fn in order:
            (t_ce if fn is ce_step else t_isda).append(_time(fn))
    heads = [(_time(ce_head), _time(isda_head)) for _ in range(21)]
    model.zero_grad(set_to_none=True)
    return (statistics.median(t_ce), statistics.median(t_isda),
            statistics.median(h[0] for h in heads), statistics.median(h[1] for h in heads))


# ---------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few repeats, for development")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of: {','.join(CONFIGS)}")
    p.add_argument("--networks", default="resnet32,resnet110",
                   help=f"networks for the CE-step overhead, subset of {','.join(NETWORKS)} or 'none'")
    p.add_argument("--no-memory", action="store_true", help="skip the child-process memory measurements")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice); 1 is steadier on a busy machine")
    p.add_argument("--_memory-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._memory_child:
        _memory_child(*args._memory_child)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    names = [s for s in args.configs.split(",") if s]
    unknown = [s for s in names if s not in CONFIGS]
    if unknown:
        sys.exit(f"unknown config(s): {', '.join(unknown)}")
    print(f"torch {torch.__version__}, {threads} threads, ISDA strength {STRENGTH}, estimator pre-warmed with "
          f"{WARM_BATCHES} batches; times: median per step (forward + backward, estimator update included)")
    header = (f"{'config':<28}{'N':>5}{'A':>6}{'C':>6}  {'ours ms':>9}{'dense ms':>10}{'speedup':>9}"
              f"{'ours MiB':>10}{'dense MiB':>10}{'mem ratio':>10}{'state ours/dense MiB':>22}{'max rel diff':>13}")
    rows = []
    print(header)
    for name in names:
        n, a, c, diagonal, label = CONFIGS[name]
        heavy = a * a * c >= 640 * 640 * 100 or diagonal
        repeats = (2 if heavy else 5) if args.quick else (5 if heavy else 21)
        t_ours, t_dense, diff = time_config(name, repeats)
        if args.no_memory:
            m_ours = m_dense = {"extra_mib": float("nan"), "state_mib": float("nan")}
        else:
            m_ours, m_dense = _peak_extra_rss(name, "ours", threads), _peak_extra_rss(name, "dense", threads)
        ratio = m_dense["extra_mib"] / max(m_ours["extra_mib"], 0.01)
        row = (f"{label:<28}{n:>5}{a:>6}{c:>6}  {t_ours * 1e3:>9.2f}"
               f"{t_dense * 1e3:>10.1f}{t_dense / t_ours:>8.1f}x{m_ours['extra_mib']:>10.1f}"
               f"{m_dense['extra_mib']:>10.1f}{ratio:>9.1f}x"
               f"{m_ours['state_mib']:>11.1f}/{m_dense['state_mib']:<10.1f}{diff:>13.1e}")
        rows.append(row)
        print(row, flush=True)
        del t_ours, t_dense
        gc.collect()

    print("\nmemory: peak RSS growth over one step (after a warm-up step) in a fresh child process per cell, "
          "glibc mmap threshold 64 KiB, VmHWM reset via /proc/self/clear_refs; 'state' = persistent estimator "
          "buffers, not counted as extra.")

    archs = [s for s in args.networks.split(",") if s and s != "none"]
    if archs:
        print("\nISDA overhead on a training step (SGD step included, channels_last, ISDA strength "
              f"{STRENGTH}; ResNet-50 with diagonal covariance):")
        print("  'overhead' = (ISDA step - CE step) / CE step, medians of interleaved steps (noisy: the "
              "machine is shared);\n  'from parts' = (ISDA loss - CE loss, each forward + backward on the "
              "same fixed features) / CE step.")
        print(f"{'network':<12}{'input':>20}{'C':>6}{'steps':>6}{'CE step ms':>12}{'ISDA step ms':>14}"
              f"{'overhead':>10}{'CE loss ms':>12}{'ISDA loss ms':>14}{'from parts':>12}")
    for arch in archs:
        n, shape, c = NETWORKS[arch]
        repeats = {"resnet32": 15, "resnet110": 7}.get(arch, 1)
        repeats = min(repeats, 4) if args.quick else repeats
        t_ce, t_isda, h_ce, h_isda = time_network(arch, repeats)
        print(f"{arch:<12}{str((n, *shape)):>20}{c:>6}{repeats:>6}{t_ce * 1e3:>12.1f}{t_isda * 1e3:>14.1f}"
              f"{(t_isda - t_ce) / t_ce * 100:>9.2f}%{h_ce * 1e3:>12.2f}{h_isda * 1e3:>14.2f}"
              f"{(h_isda - h_ce) / t_ce * 100:>11.2f}%", flush=True)


if __name__ == "__main__":
    main()
