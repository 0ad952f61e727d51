"""Under torch.distributed (2 gloo processes) every rank ends with the statistics of the global batch."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from isda_viz.isda.estimator import CovarianceEstimator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(a, c):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        y = torch.randint(0, c, (16,), generator=g)
        batches.append((torch.randn(16, a, generator=g) + y[:, None].float(), y))
    return batches


def _worker(rank, world, port, out_dir, diagonal):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        est = CovarianceEstimator(5, 4, diagonal=diagonal)
        for x, y in _data(5, 4):
            half = slice(rank * 8, rank * 8 + 8)  # each rank sees half of each global batch
            est.update(x[half], y[half])
        torch.save(est.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, diagonal):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), diagonal), nprocs=2, join=True)
    single = CovarianceEstimator(5, 4, diagonal=diagonal)
    for x, y in _data(5, 4):
        single.update(x, y)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ("m2", "mean64", "count"):
        assert torch.equal(states[0][key], states[1][key]), key  # identical on all ranks
        torch.testing.assert_close(states[0][key], single.state_dict()[key], rtol=1e-10, atol=1e-10)


def test_full_covariance_all_reduce(tmp_path):
    _run(tmp_path, diagonal=False)


def test_diagonal_covariance_all_reduce(tmp_path):
    _run(tmp_path, diagonal=True)
