"""Audit at scale: FAISS flat vs brute force on Fashion-MNIST, and IVF-PQ + exact re-ranking on 1M vectors.

    python bench/audit.py [--million 1000000] [--skip-million] [--sweep]

Part 1, Fashion-MNIST train (60,000 x 784 pixels in [0, 1]), 64 test-image
queries, top-5: the flat index's build and search time (isda_viz.audit.index's
`NeighbourIndex`, FAISS candidates re-ranked in float64) beside a torch
brute-force search, and whether their neighbours agree.

Part 2, 1M vectors. We have no million real images here, so the vectors are
*synthetic*: the 60k Fashion-MNIST training images tiled 17 times (cut to
`--million`), copy 0 exact and every other copy with independent Gaussian
pixel noise (sigma 8/255, rounded and clipped to uint8). This makes each
query's neighbours clusters of near-equidistant noisy copies, which is harder
for an approximate index than real data of the same size. The approximate
index (library defaults from `choose_index_params`: PCA, IVF, PQ, exact
re-ranking of 50·k candidates) is timed for train/add/search and its recall@5
measured against the flat index, whose search time is measured in the same run.

Timings are wall-clock on whatever threads OpenMP gives (set OMP_NUM_THREADS
to pin); every ratio compares two measurements taken in this one run.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from isda_viz.audit.index import NeighbourIndex, choose_index_params
from isda_viz.data.datasets import load_split


def timed(fn, repeat: int = 3):
    """(best wall-clock seconds of `repeat` runs, last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def torch_brute_force(base: torch.Tensor, queries: torch.Tensor, k: int, dtype=torch.float32):
    """Exact top-k by squared L2 with one matrix product: `base (N, D)`, `queries (Q, D)` → (d2, rows)."""
    b, q = base.to(dtype), queries.to(dtype)
    d2 = (q * q).sum(1, keepdim=True) - 2 * q @ b.T + (b * b).sum(1)
    return torch.topk(d2, k, dim=1, largest=False)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def row(name, *cells):
    print(f"{name:<46}" + "".join(f"{c:>16}" for c in cells))


def fashion_mnist_part(train_u8: np.ndarray, queries_u8: np.ndarray, k: int) -> None:
    print(f"\n== Fashion-MNIST train: {train_u8.shape[0]} x {train_u8.shape[1]} pixels, "
          f"{len(queries_u8)} queries, top-{k}")
    build_s, flat = timed(lambda: NeighbourIndex.flat(train_u8), repeat=1)
    faiss_s, _ = timed(lambda: flat.faiss_index.search(queries_u8.astype(np.float32) / 255, k))
    search_s, (d2, rows) = timed(lambda: flat.search(queries_u8, k))
    base = torch.from_numpy(train_u8).float() / 255
    q = torch.from_numpy(queries_u8).float() / 255
    torch_s, (_, torch_rows) = timed(lambda: torch_brute_force(base, q, k))
    base64, q64 = torch.from_numpy(train_u8).double() / 255, torch.from_numpy(queries_u8).double() / 255
    _, (exact_d2, exact_rows) = timed(lambda: torch_brute_force(base64, q64, k, torch.float64), repeat=1)
    agree = float((rows == exact_rows.numpy()).mean())
    max_err = float(np.abs(d2 - exact_d2.numpy()).max())
    params = choose_index_params("ivfpq", len(train_u8), train_u8.shape[1])
    timings: dict = {}
    ivf = NeighbourIndex.train_ivfpq(train_u8, params, timings=timings)
    ivf_s, (_, ivf_rows) = timed(lambda: ivf.search(queries_u8, k))
    row("", "seconds", "vs torch")
    row("flat build (float32 add, chunked)", f"{build_s:.3f}", "")
    row(f"flat search, FAISS only ({len(q)} queries)", f"{faiss_s:.4f}", f"{faiss_s / torch_s:.2f}x")
    row("flat search + float64 re-rank (library)", f"{search_s:.4f}", f"{search_s / torch_s:.2f}x")
    row("torch brute force float32 (matmul + topk)", f"{torch_s:.4f}", "1.00x")
    row(f"ivfpq {params.factory_string()} train / add", f"{timings['train']:.2f} / {timings['add']:.2f}", "")
    row(f"ivfpq search nprobe {params.nprobe}, rerank {params.rerank}k", f"{ivf_s:.4f}", f"{ivf_s / torch_s:.2f}x")
    print(f"flat vs float64 brute force: same neighbour at {agree:.4f} of {rows.size} ranks, "
          f"max |d2 error| {max_err:.2e}; ivfpq recall@{k} vs flat {recall_at_k(ivf_rows, rows):.3f}")


def tiled_with_noise(train_u8: np.ndarray, n: int, sigma: float, seed: int = 0) -> np.ndarray:
    """`(n, D)` uint8: the training rows repeated, copy 0 exact, others + N(0, sigma) pixel noise, clipped."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, train_u8.shape[1]), dtype=np.uint8)
    base = len(train_u8)
    for start in range(0, n, base):
        stop = min(n, start + base)
        rows = train_u8[: stop - start].astype(np.float32)
        if start:
            rows += rng.standard_normal(size=rows.shape, dtype=np.float32) * np.float32(sigma * 255)
        out[start:stop] = np.clip(np.rint(rows), 0, 255).astype(np.uint8)
    return out


def million_part(train_u8: np.ndarray, queries_u8: np.ndarray, k: int, n: int, sweep: bool) -> None:
    started = time.perf_counter()
    vectors = tiled_with_noise(train_u8, n, 8 / 255)
    print(f"\n== {n:,} synthetic vectors x {vectors.shape[1]} (Fashion-MNIST train tiled, noise sigma 8/255; "
          f"made in {time.perf_counter() - started:.1f} s), {len(queries_u8)} test-image queries, top-{k}")
    build_s, flat = timed(lambda: NeighbourIndex.flat(vectors), repeat=1)
    flat_s, (_, truth) = timed(lambda: flat.search(queries_u8, k), repeat=2)
    flat_bytes = flat.memory_bytes_per_vector()
    del flat  # 3 GB of float32

    params = choose_index_params("ivfpq", n, vectors.shape[1])
    timings: dict = {}
    ivf = NeighbourIndex.train_ivfpq(vectors, params, timings=timings)
    row("", "seconds", "speed-up", f"recall@{k}", "RAM B/vector")
    row("flat build (float32 add, chunked)", f"{build_s:.2f}", "", "", "")
    row("flat search (exact)", f"{flat_s:.3f}", "1.0x", "1.000", f"{flat_bytes:.0f}")
    row(f"ivfpq {params.factory_string()} train on {params.train_size:,}", f"{timings['train']:.2f}", "", "", "")
    row("ivfpq add", f"{timings['add']:.2f}", "", "", "")
    settings = [(params.nprobe, params.rerank)]
    if sweep:
        settings += [(p, r) for p in (16, 32, 64) for r in (20, 50, 100) if (p, r) != settings[0]]
    mem = ivf.memory_bytes_per_vector()
    for nprobe, rerank in settings:
        ivf.set_nprobe(nprobe)
        s, (_, found) = timed(lambda: ivf.search(queries_u8, k, rerank=rerank))
        tag = " (default)" if (nprobe, rerank) == (params.nprobe, params.rerank) else ""
        row(f"ivfpq search nprobe {nprobe}, rerank {rerank}k{tag}", f"{s:.4f}", f"{flat_s / s:.1f}x",
            f"{recall_at_k(found, truth):.3f}", f"{mem:.0f}")
    print(f"(ivfpq RAM per vector = PQ code + 8-byte id; the exact re-ranking reads the uint8 vectors, "
          f"{vectors.shape[1]} B/vector, from a memory map on disk)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--million", type=int, default=1_000_000, help="Size of the synthetic set.")
    parser.add_argument("--skip-million", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="Try several nprobe / re-rank settings.")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--queries", type=int, default=64)
    args = parser.parse_args()

    import faiss

    print(f"cores {os.cpu_count()}, FAISS threads {faiss.omp_get_max_threads()}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} (other jobs share the machine)")
    train = load_split("fashion-mnist", True)
    test = load_split("fashion-mnist", False)
    train_u8 = train.images.reshape(len(train), -1).numpy()
    queries_u8 = test.images[: args.queries].reshape(args.queries, -1).numpy()
    fashion_mnist_part(train_u8, queries_u8, args.k)
    if not args.skip_million:
        million_part(train_u8, queries_u8, args.k, args.million, args.sweep)


if __name__ == "__main__":
    main()
