"""`fit` as two gloo ranks on CPU: the same weights and ISDA statistics as one process with the same global batch,
resume under DDP, rank 0 alone writes; and the torchrun command line."""

import contextlib
import datetime
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from isda_viz.data.synthetic import write_cifar10
from isda_viz.training import loop as train
from isda_viz.training.loop import TrainConfig, fit

# 60 images, global batches of 25: 25, 25, 10 images, so the ranks' shards are 13/12 (unequal) and 5/5.
# gloo on the CPU, also on a GPU machine (gloo has no SyncBatchNorm on CUDA, and both ranks would share cuda:0).
RUN = dict(dataset="cifar10", arch="resnet8", limit_test=20, batch_size=25, seed=5, lr=0.05, device="cpu")
RUN_FILES = {"checkpoint.pt", "config.json", "metrics.jsonl"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet(*_args, **_kwargs):
    pass


@contextlib.contextmanager
def _float64():
    """Train in float64: then one process and two ranks must agree to rounding (~1e-14); in float32 the
    different summation orders alone, amplified by batch norm, move the weights by ~1e-5 within a few steps."""
    build, normalize = train.build_model, train.normalize
    train.build_model = lambda *a: build(*a).double()
    train.normalize = lambda x, mean, std: normalize(x.double(), mean, std)
    try:
        yield
    finally:
        train.build_model, train.normalize = build, normalize


class _Killed(Exception):
    pass


def _kill_rank0_after_first_epoch(rank, root, run):
    """Rank 0 dies right after writing epoch 1; rank 1, waiting in its next collective, must fail too (not
    hang). Each rank writes the exception it ended with."""
    append = train.append_jsonl

    def append_then_die(record, path):
        append(record, path)
        raise _Killed

    if rank == 0:
        train.append_jsonl = append_then_die
    try:
        fit(TrainConfig(out=f"{root}/resumed", epochs=2, sync_bn=True, **run), progress=False, log=_quiet)
        ended = "finished"
    except Exception as e:
        ended = type(e).__name__
    finally:
        train.append_jsonl = append
    with open(f"{root}/ended_rank{rank}.txt", "w") as f:
        f.write(ended)


def _worker(rank, world, ports, root, data):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        run = dict(RUN, data_root=data)
        with _float64():
            fit(TrainConfig(out=f"{root}/sync", epochs=2, sync_bn=True, **run), progress=False, log=_quiet)
            fit(TrainConfig(out=f"{root}/per_rank_bn", epochs=2, **run), progress=False, log=_quiet)
        fit(TrainConfig(out=f"{root}/straight", epochs=2, sync_bn=True, **run), progress=False, log=_quiet)
        # a short timeout for the run that loses rank 0: rank 1 (not killed by a launcher here) must give up
        dist.destroy_process_group()
        os.environ["MASTER_PORT"] = str(ports[1])
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=5))
        _kill_rank0_after_first_epoch(rank, root, run)  # ends the process group on both ranks
        os.environ["MASTER_PORT"] = str(ports[2])
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        fit(TrainConfig(out=f"{root}/resumed", epochs=2, sync_bn=True, **run), resume=True, progress=False,
            log=_quiet)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run directories written by two gloo ranks, and the same runs by one process."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_cifar10(root / "data", n_train=60, n_test=20)
    mp.spawn(_worker, args=(2, (_free_port(), _free_port(), _free_port()), str(root / "ddp"), str(data)), nprocs=2, join=True)
    with _float64():
        fit(TrainConfig(out=str(root / "single"), epochs=2, data_root=str(data), **RUN), progress=False, log=_quiet)
    return root


def _ckpt(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)


def test_two_ranks_with_sync_bn_match_one_process(runs):
    ddp, single = _ckpt(runs / "ddp" / "sync"), _ckpt(runs / "single")
    # 2 epochs of 3 steps, with shards of 13/12 and 5/5 images, ISDA with lambda > 0
    for key, value in single["model"].items():  # weights and batch-norm running statistics
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-10, atol=1e-10, msg=key)
    for key in ("m2", "mean64", "count"):
        torch.testing.assert_close(ddp["estimator"][key], single["estimator"][key], rtol=1e-10, atol=1e-10)
    assert ddp["estimator"]["count"].sum() == 120  # every training feature counted once, not once per rank
    a = json.loads((runs / "ddp" / "sync" / "metrics.jsonl").read_text().splitlines()[-1])
    b = json.loads((runs / "single" / "metrics.jsonl").read_text().splitlines()[-1])
    assert a["test_accuracy"] == b["test_accuracy"]  # sharded evaluation, reduced over ranks
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_without_sync_bn_statistics_are_per_rank(runs):
    # Each rank normalises with its own half-batch statistics: a different (valid) result, as documented.
    ddp, single = _ckpt(runs / "ddp" / "per_rank_bn"), _ckpt(runs / "single")
    assert not torch.allclose(ddp["model"]["conv1.weight"], single["model"]["conv1.weight"], atol=1e-4)


def test_a_failing_rank_ends_the_run_on_every_rank(runs):
    ended = [(runs / "ddp" / f"ended_rank{r}.txt").read_text() for r in range(2)]
    assert ended[0] == "_Killed" and ended[1] not in ("finished", "")  # rank 1 stopped with an error, no hang
    assert _ckpt(runs / "ddp" / "resumed")["epoch"] == 2


def test_resume_under_ddp_ends_at_the_same_weights(runs):
    straight, resumed = _ckpt(runs / "ddp" / "straight"), _ckpt(runs / "ddp" / "resumed")
    assert straight["epoch"] == resumed["epoch"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert torch.equal(resumed["estimator"]["m2"], straight["estimator"]["m2"])


def test_rank_zero_alone_writes(runs):
    for name in ("sync", "per_rank_bn", "straight", "resumed"):
        folder = runs / "ddp" / name
        assert {p.name for p in folder.iterdir()} == RUN_FILES, name  # no temporary or per-rank files
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == list(range(1, len(lines) + 1))  # one line per epoch
    assert json.loads((runs / "ddp" / "sync" / "config.json").read_text())["sync_bn"] is True


def test_torchrun_command_line(tmp_path):
    data = write_cifar10(tmp_path / "data", n_train=60, n_test=20)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "isda_viz.cli", "train", "--dataset", "cifar10", "--data-root", str(data),
           "--arch", "resnet8", "--epochs", "1", "--batch-size", "30", "--limit-test", "20", "--sync-bn",
           "--device", "cpu", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("run written to") == 1  # only rank 0 reports
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert _ckpt(out)["estimator"]["count"].sum() == 60
