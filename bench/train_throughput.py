"""Training throughput, side by side in one run: a cross-entropy step vs an ISDA step, and 2 gloo ranks vs 1 process.

Part 1 (CE vs ISDA): images/s of one full training step (forward, loss, backward,
SGD) of a network with plain cross-entropy and with `ISDALoss` (estimator update
included), same batches, interleaved, median over iterations.

Part 2 (DDP on CPU): images/s of the same ISDA step with the global batch split
over 2 gloo ranks (DDP, each rank 1 thread) vs 1 process with 1 thread and with
2 threads: what a second CPU core buys either way.

    python bench/train_throughput.py                     # ResNet-32/CIFAR-100 and WRN-28-10 on CPU
    python bench/train_throughput.py --quick             # smallest sizes, to check it runs
    python bench/train_throughput.py --device cuda --amp bf16 --networks wrn28_10,resnet50
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from isda_viz.isda.loss import ISDALoss
from isda_viz import distributed
from isda_viz.classifiers.networks import build_model
from isda_viz.training.loop import amp_dtype

# arch: (batch, image size, classes, covariance)
NETWORKS = {
    "resnet32": (128, 32, 100, "full"),
    "wrn28_10": (128, 32, 100, "full"),
    "resnet50": (256, 224, 1000, "diagonal"),
}
DEFAULT_ITERS = {"resnet32": 20, "wrn28_10": 4, "resnet50": 10}


def _step_fn(model, criterion, optimizer, amp, loss):
    def step(x, y):
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            features = model.features(x)
        features = features.float()
        out = criterion(features, model.fc, y, 0.5) if loss == "isda" else F.cross_entropy(model.fc(features), y)
        optimizer.zero_grad(set_to_none=True)
        out.backward()
        optimizer.step()
    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ce_vs_isda(arch, batch, iters, device, amp):
    n, size, classes, covariance = NETWORKS[arch]
    n = batch or n
    torch.manual_seed(0)
    model = build_model(arch, classes, 3).to(device).to(memory_format=torch.channels_last)
    criterion = ISDALoss(model.feature_dim, classes, covariance)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(n, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (n,), device=device)
    steps = {loss: _step_fn(model, criterion, optimizer, amp, loss) for loss in ("ce", "isda")}
    times = {"ce": [], "isda": []}
    for i in range(iters + 1):
        for loss in ("ce", "isda"):
            _sync(device)
            t = time.perf_counter()
            steps[loss](x, y)
            _sync(device)
            if i:  # the first round warms up
                times[loss].append(time.perf_counter() - t)
    return {loss: n / statistics.median(t) for loss, t in times.items()}


def head_extra_ms(arch, batch, device, repeats: int = 30) -> float:
    """Milliseconds ISDA adds to a step's loss and its backward alone (estimator update included), on random
    features of the network's size: the cost the step-level ratio measures through the noise of whole steps."""
    n, _, classes, covariance = NETWORKS[arch]
    n = batch or n
    torch.manual_seed(0)
    fc = torch.nn.Linear(build_model(arch, classes, 3).feature_dim, classes).to(device)
    criterion = ISDALoss(fc.in_features, classes, covariance)
    features = torch.rand(n, fc.in_features, device=device, requires_grad=True)
    y = torch.randint(0, classes, (n,), device=device)
    losses = {"ce": lambda: F.cross_entropy(fc(features), y), "isda": lambda: criterion(features, fc, y, 0.5)}
    times = {}
    for name, loss in losses.items():
        for _ in range(5):
            loss().backward()
        _sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            loss().backward()
        _sync(device)
        times[name] = (time.perf_counter() - started) / repeats
    return 1e3 * (times["isda"] - times["ce"])


def _ddp_worker(rank, world, port, arch, batch, iters, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _, size, classes, covariance = NETWORKS[arch]
    torch.manual_seed(0)
    model = build_model(arch, classes, 3).to(memory_format=torch.channels_last)
    net = distributed.wrap(model, torch.device("cpu"))
    criterion = ISDALoss(model.feature_dim, classes, covariance)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    part = distributed.shard(batch)
    x = torch.randn(batch, 3, size, size)[part].contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))[part]
    times = []
    for i in range(iters + 1):
        dist.barrier()
        t = time.perf_counter()
        loss = criterion(net(x), model.fc, y, 0.5) * distributed.loss_weight(len(y), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t)
    if rank == 0:
        out.put(batch / statistics.median(times))
    dist.destroy_process_group()


def ddp_vs_single(arch, batch, iters):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_ddp_worker, args=(2, port, arch, batch, iters, queue), nprocs=2, join=True)
    two_ranks = queue.get()
    result = {"2 ranks x 1 thread": two_ranks}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        result[f"1 process x {threads} thread" + "s" * (threads > 1)] = ce_vs_isda(arch, batch, iters, torch.device("cpu"), None)["isda"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="resnet32,wrn28_10")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None)
    parser.add_argument("--batch", type=int, default=None, help="Override the batch size of every network.")
    parser.add_argument("--iters", type=int, default=None,
                        help="Timed steps per loss (default: enough for a stable median: 20 for resnet32, 4 for "
                             "wrn28_10 (30 s a step on 2 CPU cores), 10 for resnet50; with 5, ResNet-32's ISDA cost "
                             "swung by 15 points between runs).")
    parser.add_argument("--quick", action="store_true", help="resnet32, batch 16, 2 iterations (a smoke run).")
    parser.add_argument("--no-ddp", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.networks, args.batch, args.iters = "resnet32", 16, 2
    device = torch.device(args.device)
    amp = amp_dtype(args.amp, device)
    print(f"device {device}, amp {amp}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'network':<10} {'batch':>5} {'CE img/s':>10} {'ISDA img/s':>11} {'ISDA cost':>10} "
          f"{'head ms':>8} {'head share':>11}")
    for arch in args.networks.split(","):
        r = ce_vs_isda(arch, args.batch, args.iters or DEFAULT_ITERS[arch], device, amp)
        batch = args.batch or NETWORKS[arch][0]
        extra = head_extra_ms(arch, args.batch, device)
        share = extra / 1e3 / (batch / r["ce"])  # of a CE step's time
        print(f"{arch:<10} {batch:>5} {r['ce']:>10.1f} {r['isda']:>11.1f} {100 * (r['ce'] / r['isda'] - 1):>9.2f}% "
              f"{extra:>8.1f} {100 * share:>10.2f}%")
    print("ISDA cost: whole steps side by side (noisy on a shared CPU); head ms: what the ISDA loss and its backward "
          "add to CE's, timed alone; head share: that, as a share of a CE step")
    if device.type == "cpu" and not args.no_ddp:
        arch = args.networks.split(",")[0]
        batch = args.batch or NETWORKS[arch][0]
        r = ddp_vs_single(arch, batch, args.iters or DEFAULT_ITERS[arch])
        base = r["1 process x 1 thread"]
        print(f"\nISDA step, {arch}, global batch {batch}, CPU:")
        for name, ips in r.items():
            print(f"  {name:<24} {ips:>8.1f} img/s  x{ips / base:.2f}")


if __name__ == "__main__":
    main()
