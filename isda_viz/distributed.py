"""torchrun / DistributedDataParallel helpers for `fit`.

`torchrun --nproc_per_node N -m isda_viz.cli train ...` starts N processes with
RANK, LOCAL_RANK and WORLD_SIZE in their environment; `session` turns that into
an initialised process group (NCCL on CUDA, gloo on CPU) and ends it cleanly.
Without those variables (or with WORLD_SIZE=1) nothing is initialised and every
helper here is the identity of a single process.

How a global batch is split: every rank draws the same seeded order and the
same augmentation randomness as a single process would, for the whole global
batch of `--batch-size` images, and keeps the contiguous part `shard(n)` of it
(sizes differ by at most one). DDP averages gradients over ranks, so each rank
scales its mean loss by `loss_weight(local_n, global_n)` = world * local_n /
global_n: the averaged gradient is then the gradient of the global batch's mean
loss, equal shards or not.

Failures: the process group gets a timeout (`ISDA_VIZ_DIST_TIMEOUT` seconds,
default 600) so a rank waiting for a dead peer ends with an error rather than
hanging, and a rank that raises aborts its group and says which rank failed;
torchrun then stops the other ranks.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from isda_viz.errors import IsdaVizError

TIMEOUT_ENV = "ISDA_VIZ_DIST_TIMEOUT"


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one rank that writes files, logs and shows progress."""
    return rank() == 0


def launched() -> bool:
    """True when torchrun (or any env:// launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "600")
    try:
        return datetime.timedelta(seconds=float(raw))
    except ValueError:
        raise IsdaVizError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def _device_for_rank(device: torch.device | None) -> torch.device:
    """Each rank's device: cuda:LOCAL_RANK on CUDA (one GPU per process), else the device asked for."""
    if device is not None and device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise IsdaVizError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPU(s); "
                               "start at most that many processes per node")
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device or torch.device("cpu")


def _abort() -> None:
    """End the process group without waiting for peers that may be gone."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "nccl" and hasattr(dist.distributed_c10d, "_abort_process_group"):
            dist.distributed_c10d._abort_process_group()   # NCCL: tear down without a collective
        else:
            dist.destroy_process_group()
    except Exception:  # already broken: nothing more to release
        pass


LEFT_KEY = "isda_viz/left"
LEAVE_TIMEOUT_S = 60.0


def _leave_together() -> None:
    """End a finished run's process group on every rank at once, so no rank exits while a peer still
    talks to it (a rank whose gloo threads lose their peer mid-teardown dies in `std::terminate`,
    SIGABRT, and torchrun reports a finished run as failed): a barrier (every collective done), each
    rank destroys its group and checks in on the store; rank 0, which hosts the store, waits for every
    check-in before it returns, so the store outlives every rank's teardown."""
    store = dist.distributed_c10d._get_default_store() if hasattr(dist.distributed_c10d, "_get_default_store") \
        else None
    world, me = dist.get_world_size(), dist.get_rank()
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if store is None:
        return
    try:
        store.add(LEFT_KEY, 1)
        deadline = time.monotonic() + LEAVE_TIMEOUT_S
        while me == 0 and store.add(LEFT_KEY, 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
    except Exception:  # a peer already gone: nothing more to wait for
        pass


@contextmanager
def session(device: torch.device):
    """Yield this rank's device, inside a process group when launched by torchrun.

    Initialises the group from torchrun's environment when it is not initialised
    yet (NCCL for CUDA devices, gloo otherwise) and destroys it at the end; a
    group initialised by the caller is used as is and left alone. An exception on
    this rank aborts the group after printing which rank failed.
    """
    created = False
    if launched() and not dist.is_initialized():
        device = _device_for_rank(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=_timeout(),
                                    **({"device_id": device} if device.type == "cuda" else {}))
        except Exception as e:
            raise IsdaVizError(f"rank {os.environ.get('RANK', '?')}: could not join the process group "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        created = True
    elif active():
        device = _device_for_rank(device)
    try:
        yield device
    except BaseException as e:
        if active():
            first = str(e).splitlines()[0][:200] if str(e) else ""
            print(f"rank {rank()} of {world_size()} failed: {type(e).__name__}: {first}; stopping the run",
                  file=sys.stderr, flush=True)
            _abort()
        raise
    if created:
        _leave_together()


def shard(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous part of a global batch of `n` items (sizes differ by at most one)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def loss_weight(local_n: int, global_n: int) -> float:
    """Factor on a rank's mean loss so DDP's gradient average equals the global batch's mean-loss gradient."""
    return world_size() * local_n / global_n


def all_sum(values: list[float]) -> list[float]:
    """Sum of `values` over ranks (float64), e.g. correct/seen counts of a sharded evaluation."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def from_main(fn):
    """Run `fn()` on rank 0 only and return its result on every rank.

    An `IsdaVizError` raised on rank 0 is raised on every rank with the same
    message, so all ranks stop together. The result travels by
    `broadcast_object_list` (pickled between our own ranks, never read from disk).
    """
    if not active():
        return fn()
    payload = [None]
    if is_main():
        try:
            payload[0] = ("ok", fn())
        except IsdaVizError as e:
            payload[0] = ("error", str(e))
    dist.broadcast_object_list(payload, src=0, device=_collective_device())
    status, value = payload[0]
    if status == "error":
        raise IsdaVizError(value)
    return value


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank, e.g. before evaluating."""
    if not active():
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is the sum over ranks of the incoming gradients: each rank then holds the
    gradient of the sum of every rank's loss with respect to its own input."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _BatchNormAcrossRanks(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch, on any device.

    torch's SyncBatchNorm only runs on GPUs; this one uses differentiable
    all-reduces (two passes: mean, then centred squares) so it works with gloo on
    CPU too. Parameter and buffer names are BatchNorm2d's, so checkpoints load into
    the plain model. Outside a process group, or in eval mode, it is BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        differentiable_sum = _SumOverRanks.apply
        c = x.shape[1]
        local_n = x.numel() // c
        count = differentiable_sum(torch.tensor([float(local_n)], dtype=x.dtype, device=x.device))
        mean = differentiable_sum(x.sum((0, 2, 3))) / count                       # (C,)
        centred = x - mean.view(1, c, 1, 1)
        var = differentiable_sum((centred * centred).sum((0, 2, 3))) / count       # (C,) population
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            n = float(count)
            with torch.no_grad():
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch-norm layers that normalise with the global batch's statistics: torch's SyncBatchNorm on CUDA,
    `_BatchNormAcrossRanks` elsewhere. Same parameter and buffer names as before."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = _BatchNormAcrossRanks(child.num_features, child.eps, child.momentum, child.affine,
                                        child.track_running_stats, device=device)
            # the same Parameter and buffer objects, as torch's converter: an optimizer built before still fits
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model


class FeatureNet(nn.Module):
    """`forward(x) = model.features(x)`: what DDP wraps, so the loss can use `model.fc` itself (ISDA needs the
    features and fc's weight, not just the logits). fc's parameters still get their gradients averaged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def wrap(model: nn.Module, device: torch.device):
    """`model.features` as a callable: DDP-wrapped under a process group, the bare method otherwise."""
    if not active():
        return model.features

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(FeatureNet(model), device_ids=ids)
