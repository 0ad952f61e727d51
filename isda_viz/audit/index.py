"""The audit's nearest-neighbour index: FAISS search, exact re-ranking, copy-score calibration, a cached directory.

Two spaces:
- `pixel`: the image at the dataset's resolution and channels, scaled to
  [0, 1] and flattened, `(C*H*W,)`; distance = Euclidean (L2).
- `feature`: the classifier's penultimate features, L2-normalised, `(A,)`;
  distance = cosine distance `1 - cos` in [0, 2]. It catches near-copies
  (shifted, recoloured) that pixel L2 misses.

Both are searched with squared L2 in FAISS (for unit vectors
`|a - b|^2 = 2 (1 - cos)`). An index is either `flat` (exact) or `ivfpq`
(PCA + inverted lists + product-quantised codes in memory, for large sets);
either way its candidates are re-ranked exactly, in float64, against the
training vectors kept on disk (`vectors.npy`: uint8 for pixels, so nothing is
lost; float32 for features). An index directory holds:

    manifest.json   what it was built from, its parameters, the copy-score calibration
    vectors.npy     (N, D) training vectors, written chunk by chunk (memory-mapped)
    labels.npy      (N,) int64 class of each row
    positions.npy   (N,) int64 position of each row in the training split, torchvision's order
    index.faiss     the trained IVF-PQ index (ivfpq only; a flat index is its vectors)

The manifest is written last, so a killed build is never mistaken for a
complete index. The copy score (`copy_score`) and its threshold (`calibrate`)
are calibrated here, on held-out test images, when the index is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from isda_viz._version import __version__
from isda_viz.cache import cache_dir
from isda_viz.data.batches import iterate_batches
from isda_viz.data.datasets import FOLDER_DATASETS, FolderImages, dataset_spec, load_split
from isda_viz.errors import IsdaVizError
from isda_viz.readers import read_json
from isda_viz.runs import write_json_atomic

SPACES = ("pixel", "feature")
INDEX_KINDS = ("flat", "ivfpq", "auto")
INDEX_FORMAT = 1
AUDIT_CACHE = "audit"  # pixel-space indexes: `cache_dir(AUDIT_CACHE)`, under `cache.cache_root()`
FLAT_MAX_BYTES = 2 * 2**30   # auto: flat while the float32 training vectors fit in 2 GiB, else ivfpq
MAX_IVFPQ_DIM = 16384        # the PCA before IVF-PQ holds a dim x dim matrix
FLAG_RATE = 0.01             # at most this fraction of held-out test images is flagged
CHUNK = 1024                 # images embedded per step while building


# ---------------------------------------------------------------------------------------------
# Vectors: images → the space the audit measures in


class Embedder:
    """Turns uint8 images `(N, C, H, W)` into vectors of one space.

    `stored(images)` gives the rows kept on disk and searched: uint8
    `(N, C*H*W)` pixels (standing for pixel / 255 in [0, 1]), or float32 `(N, A)`
    unit-length features. `space` is one of SPACES, "feature" with a classifier (checked once, by
    `AuditConfig`).
    """

    def __init__(self, space: str, classifier=None, device: torch.device | str = "cpu"):
        self.space, self.classifier, self.device = space, classifier, torch.device(device)
        self.store_dtype = np.uint8 if space == "pixel" else np.float32

    def stored(self, images: torch.Tensor) -> np.ndarray:
        """uint8 `(N, C, H, W)` → the rows kept for them, `(N, D)`."""
        if self.space == "pixel":
            return images.reshape(len(images), -1).numpy()
        f = self.classifier.features(images)
        return torch.nn.functional.normalize(f.float(), dim=1).cpu().numpy()

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """uint8 `(N, C, H, W)` → the vectors of this space, float32 `(N, D)`."""
        return _as_float32(self.stored(images))

    def distance(self, squared_l2: np.ndarray) -> np.ndarray:
        """Squared L2 between vectors → the space's distance (pixel: L2; feature: cosine distance)."""
        squared_l2 = np.maximum(squared_l2, 0.0)
        return np.sqrt(squared_l2) if self.space == "pixel" else squared_l2 / 2

    @property
    def distance_name(self) -> str:
        return "L2 distance of pixels in [0, 1]" if self.space == "pixel" else "cosine distance 1 - cos of features"


# ---------------------------------------------------------------------------------------------
# The index: FAISS candidates, re-ranked exactly


@dataclass
class IndexParams:
    """How an index is built and searched. `kind` is `flat` or `ivfpq`.

    ivfpq: vectors are PCA-rotated to `pca_dim` dims, assigned to one of
    `nlist` inverted lists (k-means on `train_size` random rows) and stored as
    `pq_m` codes of `nbits` bits (4 bits: FAISS's SIMD "fast scan" layout); a
    search visits `nprobe` lists and re-ranks `rerank * k` candidates exactly.
    """

    kind: str = "flat"
    nlist: int = 0
    pq_m: int = 0
    nbits: int = 4
    pca_dim: int = 0
    nprobe: int = 1
    rerank: int = 1
    train_size: int = 0

    def factory_string(self) -> str:
        codes = f"PQ{self.pq_m}x4fs" if self.nbits == 4 else f"PQ{self.pq_m}x{self.nbits}"
        return f"PCAR{self.pca_dim},IVF{self.nlist},{codes}"


def choose_index_params(kind: str, n: int, dim: int) -> IndexParams:
    """Index parameters for `n` vectors of `dim`: `auto` is flat while float32 vectors fit in FLAT_MAX_BYTES.

    IVF-PQ defaults, chosen with bench/audit.py: PCA (with a random rotation) to
    at most 128 dims, 4-bit codes of 2 dims each (32 bytes for 128 dims; 8-bit
    codes reach the same recall after re-ranking but train ~20x slower),
    nlist ≈ 4·sqrt(n) (a power of two, ≥ 39 training rows per list), nprobe 32,
    and 50·k candidates re-ranked exactly (on 1M vectors with clusters of
    near-identical copies, 20·k reached recall@5 0.90, 40·k 0.97).
    """
    if kind not in INDEX_KINDS:
        raise IsdaVizError(f"unknown index type '{kind}'; choose flat, ivfpq or auto")
    if kind == "auto":
        kind = "flat" if n * dim * 4 <= FLAT_MAX_BYTES else "ivfpq"
    if kind == "flat":
        return IndexParams("flat")
    if n < 39 * 16:
        raise IsdaVizError(f"--index ivfpq needs at least {39 * 16} training images (this set has {n}); use flat")
    if not 2 <= dim <= MAX_IVFPQ_DIM:
        raise IsdaVizError(f"an IVF-PQ index cannot take {dim}-d vectors here (its PCA needs a dim x dim matrix); "
                           "use --space feature, or --index flat if N x dim x 4 bytes fit in memory")
    pca_dim = min(dim, 128) // 2 * 2
    nlist = min(2 ** round(math.log2(4 * math.sqrt(n))), 2 ** int(math.log2(n / 39)), 65536)
    train_size = min(n, max(39 * nlist, 50_000))
    return IndexParams("ivfpq", nlist=nlist, pq_m=pca_dim // 2, nbits=4, pca_dim=pca_dim,
                       nprobe=min(nlist, 32), rerank=50, train_size=train_size)


def _as_float64(rows: np.ndarray) -> np.ndarray:
    """Stored rows → float64 vectors (uint8 pixels / 255)."""
    return rows.astype(np.float64) / 255 if rows.dtype == np.uint8 else rows.astype(np.float64)


def _as_float32(rows: np.ndarray) -> np.ndarray:
    """Stored rows → contiguous float32 vectors, as FAISS takes them (uint8 pixels / 255)."""
    rows = np.asarray(rows)
    out = rows.astype(np.float32) / np.float32(255) if rows.dtype == np.uint8 else rows.astype(np.float32, copy=False)
    return np.ascontiguousarray(out)


class NeighbourIndex:
    """k-nearest-neighbour search over stored vectors `(N, D)`, exact after re-ranking.

    `vectors` is any array `(N, D)` (typically a memory map): uint8 rows are
    pixels (searched as / 255), float rows are used as they are. `search`
    returns squared L2 distances (float64, exact) and row numbers.
    """

    def __init__(self, faiss_index, vectors: np.ndarray, params: IndexParams):
        self.faiss_index, self.vectors, self.params = faiss_index, vectors, params

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @staticmethod
    def _float_chunks(vectors: np.ndarray, chunk: int, desc: str | None = None, progress: bool = False):
        n = vectors.shape[0]
        for start in tqdm(range(0, n, chunk), desc=desc, disable=not progress, leave=False, unit="chunk"):
            yield _as_float32(vectors[start:start + chunk])

    @classmethod
    def flat(cls, vectors: np.ndarray, progress: bool = False) -> "NeighbourIndex":
        """An exact index: the vectors, added to FAISS in chunks (never converted to float32 all at once)."""
        import faiss

        index = faiss.IndexFlatL2(vectors.shape[1])
        for chunk in cls._float_chunks(vectors, 65536, "loading flat index", progress):
            index.add(chunk)
        return cls(index, vectors, IndexParams("flat"))

    @classmethod
    def train_ivfpq(cls, vectors: np.ndarray, params: IndexParams, seed: int = 0, progress: bool = False,
                    timings: dict | None = None) -> "NeighbourIndex":
        """An IVF-PQ index trained on `params.train_size` random rows, then given every row in chunks."""
        import faiss

        n, dim = vectors.shape
        started = time.perf_counter()
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, params.train_size), replace=False))
        sample = _as_float32(vectors[rows])
        index = faiss.index_factory(dim, params.factory_string(), faiss.METRIC_L2)
        index.train(sample)
        del sample
        trained = time.perf_counter()
        for chunk in cls._float_chunks(vectors, 65536, "adding to IVF-PQ index", progress):
            index.add(chunk)
        if timings is not None:
            timings.update(train=trained - started, add=time.perf_counter() - trained)
        out = cls(index, vectors, params)
        out.set_nprobe(params.nprobe)
        return out

    def set_nprobe(self, nprobe: int) -> None:
        import faiss

        if self.params.kind == "ivfpq":
            self.params = dataclasses.replace(self.params, nprobe=nprobe)
            faiss.extract_index_ivf(self.faiss_index).nprobe = nprobe

    def memory_bytes_per_vector(self) -> float:
        """Bytes of RAM the FAISS index takes per training vector (the re-ranking vectors stay on disk)."""
        import faiss

        if self.params.kind == "flat":
            return 4.0 * self.dim
        ivf = faiss.extract_index_ivf(self.faiss_index)
        return float(ivf.code_size + 8)  # a code and its int64 id in an inverted list

    def candidates(self, queries: np.ndarray, n_candidates: int) -> np.ndarray:
        """FAISS's own top `n_candidates` rows per query `(Q, n_candidates)`, -1 where there are fewer."""
        _, rows = self.faiss_index.search(_as_float32(queries), n_candidates)
        return rows

    def search(self, queries: np.ndarray, k: int, rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest rows of each query `(Q, D)`: exact squared L2 float64 `(Q, k)`, rows int64 `(Q, k)`.

        Queries are given like the stored rows (uint8 pixels are / 255). Ties are
        broken by the smaller row. Fewer than k stored rows: k is cut to N.
        """
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise IsdaVizError(f"queries of {queries.shape[-1]} dimensions do not fit an index of {self.dim}-d vectors")
        k = min(k, len(self))
        if self.params.kind == "flat":
            n_cand = min(len(self), max(2 * k, k + 10))  # float32 ordering is re-checked in float64
        else:
            n_cand = min(len(self), k * (rerank or self.params.rerank))
        cand = self.candidates(queries, n_cand)
        distances = np.full((len(queries), k), np.inf)
        rows_out = np.full((len(queries), k), -1, dtype=np.int64)
        for i, (query, rows) in enumerate(zip(queries, cand)):
            rows = rows[rows >= 0]
            d2 = self.exact_squared_distances(query, rows)
            order = np.lexsort((rows, d2))[:k]
            distances[i, :len(order)], rows_out[i, :len(order)] = d2[order], rows[order]
        return distances, rows_out

    def exact_squared_distances(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Squared L2 `(R,)` float64 from one query `(D,)` to the stored `rows` `(R,)`.

        uint8 pixels against a uint8 query are summed as integers, so the only
        rounding is the final division by 255^2.
        """
        stored = np.asarray(self.vectors[rows])
        if stored.dtype == np.uint8 and query.dtype == np.uint8:
            wide = np.int32 if len(query) * 255**2 < 2**31 else np.int64  # no overflow of the sum
            diff = stored.astype(wide) - query.astype(wide)
            return np.einsum("rd,rd->r", diff, diff).astype(np.float64) / 255.0**2
        diff = _as_float64(stored) - _as_float64(query)
        return np.einsum("rd,rd->r", diff, diff)


# ---------------------------------------------------------------------------------------------
# Copy-score calibration


def copy_score(nearest_distance, reference_median: float):
    """The copy score: distance to the nearest training image over the held-out reference median.

        copy_score = d(query, nearest training image) / median_t d(t, nearest training image)

    with t running over held-out test images. `nearest_distance` is a float or an
    array of any shape (the space's distance, >= 0); returns the same shape, float64.
    About 1 for a typical unseen image; near 0 for a copy.
    """
    return np.asarray(nearest_distance, dtype=np.float64) / float(reference_median)


def calibrate(nearest_distances: np.ndarray, flag_rate: float = FLAG_RATE) -> dict:
    """Scale and threshold of the copy score from held-out test images' nearest-neighbour distances `(T,)`.

    The scores are the test images' own `copy_score`s; the threshold is the smallest test score above the
    lowest `flag_rate` fraction, so `score < threshold` flags at most
    `floor(flag_rate * T)` test images.
    """
    d = np.sort(np.asarray(nearest_distances, dtype=np.float64))
    if len(d) == 0:
        raise IsdaVizError("no held-out test images to calibrate the copy score with")
    median = float(np.median(d))
    if median <= 0:
        raise IsdaVizError("over half the held-out test images are exact copies of training images; "
                           "the copy score cannot be calibrated on this split")
    scores = copy_score(d, median)
    threshold = float(scores[int(math.floor(flag_rate * len(d)))])
    return {"median_distance": median, "threshold": threshold, "flag_rate": flag_rate, "test_images": len(d),
            "test_flagged": int((scores < threshold).sum()),
            "test_distance_quantiles": {str(q): float(np.quantile(d, q)) for q in (0.01, 0.05, 0.5, 0.95)}}


# ---------------------------------------------------------------------------------------------
# Index directories: build once, reuse while what they were built from is unchanged


def training_images(dataset: str, data_root=None, limit: int | None = None):
    """The training split as the audit indexes it: no random augmentation (folders: resize + centre crop)."""
    if dataset in FOLDER_DATASETS:
        spec = dataset_spec(dataset, data_root)
        if data_root is None:
            raise IsdaVizError(f"--dataset {dataset} needs --data-root, a folder with train/ and val/ class folders")
        root = Path(data_root).expanduser() / "train"
        if not root.is_dir():
            raise IsdaVizError(f"no train/ folder of class folders under {data_root}")
        return FolderImages(root, spec.image_size, train=False).subset(limit)
    return load_split(dataset, True, data_root, limit)


def split_positions(split) -> np.ndarray:
    """Row → position in the full split, torchvision's order `(N,)` (folders subset a shuffled sample)."""
    indices = getattr(split, "_indices", None)
    return np.asarray(indices, dtype=np.int64) if indices is not None else np.arange(len(split), dtype=np.int64)


def split_fingerprint(split) -> str:
    """sha256 of what a split holds: all pixels and labels in memory, or file paths and labels of a folder."""
    h = hashlib.sha256()
    if hasattr(split, "images"):
        h.update(split.images.contiguous().numpy().tobytes())
        h.update(np.asarray(split.labels, dtype=np.int64).tobytes())
    else:
        root = Path(split.folder.root)
        for i in split_positions(split):
            path, label = split.folder.samples[i]
            h.update(f"{Path(path).relative_to(root)}\t{label}\n".encode())
    return h.hexdigest()


def default_index_dir(dataset: str, space: str, classifier_cache=None, data_root=None,
                      limit: int | None = None) -> Path:
    """Feature space: in the classifier's cache folder (`Classifier.cache_dir`: the run directory of an
    isda-viz run); pixel space: `$ISDA_VIZ_CACHE/audit` (default ~/.cache/isda-viz)."""
    name = f"{dataset}-{space}"
    if data_root is not None:
        name += "-" + hashlib.sha256(str(Path(data_root).expanduser().resolve()).encode()).hexdigest()[:8]
    if limit is not None:
        name += f"-first{limit}"
    if space == "feature":
        return Path(classifier_cache) / "audit-index" / name
    return cache_dir(AUDIT_CACHE) / name


@dataclass
class AuditIndex:
    """A built index directory: the searchable vectors, their labels and positions, the calibration."""
    directory: Path
    manifest: dict
    neighbours: NeighbourIndex
    labels: np.ndarray
    positions: np.ndarray

    @property
    def calibration(self) -> dict:
        return self.manifest["calibration"]


MANIFEST = "manifest.json"
# What must match for a cached index to be reused, with the reason printed when it does not.
_STALE_REASONS = {
    "format": "the index format of isda-viz changed",
    "train_size": "the training set has another size",
    "train_fingerprint": "the training images changed",
    "test_fingerprint": "the held-out test images changed",
    "classifier_sha256": "the classifier checkpoint changed",
    "computed_on": "the features were computed on another device or in another precision",
    "kind": "another index type was asked for",
    "index": "other index parameters were asked for",
}
_SEARCH_PARAMS = ("nprobe", "rerank")  # may change without a rebuild


def _manifest_key(dataset, space, train_split, test_split, classifier, params: IndexParams) -> dict:
    return {
        "format": INDEX_FORMAT, "dataset": dataset, "space": space,
        "train_size": len(train_split), "train_fingerprint": split_fingerprint(train_split),
        "test_size": len(test_split), "test_fingerprint": split_fingerprint(test_split),
        "classifier_sha256": classifier.fingerprint if classifier is not None else None,
        "computed_on": classifier.computed_on if classifier is not None else None,   # feature space only
        **_build_params(params),
    }


def _build_params(params: IndexParams) -> dict:
    """The manifest entries of the parameters that shape a built index (not the search-time ones)."""
    return {"kind": params.kind,
            "index": {k: v for k, v in dataclasses.asdict(params).items() if k not in _SEARCH_PARAMS}}


def _read_manifest(directory: Path) -> dict | None:
    try:
        manifest = read_json(directory / MANIFEST, "the audit index manifest", limit=1 << 20)
    except IsdaVizError:  # absent, a FIFO, broken: the index is built again
        return None
    return manifest if isinstance(manifest, dict) else None


def open_index(directory, mmap: bool = True) -> AuditIndex:
    """Load a built index directory (vectors memory-mapped)."""
    import faiss

    directory = Path(directory)
    manifest = _read_manifest(directory)
    if manifest is None:
        raise IsdaVizError(f"{directory} holds no audit index ({MANIFEST} missing or corrupt)")
    try:
        vectors = np.load(directory / "vectors.npy", mmap_mode="r" if mmap else None)
        labels = np.load(directory / "labels.npy")
        positions = np.load(directory / "positions.npy")
        params = IndexParams(**manifest["index"], **manifest["search"])
        if params.kind == "flat":
            neighbours = NeighbourIndex.flat(vectors)
        else:
            neighbours = NeighbourIndex(faiss.read_index(str(directory / "index.faiss")), vectors, params)
            neighbours.set_nprobe(params.nprobe)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise IsdaVizError(f"audit index in {directory} is incomplete or corrupt ({type(e).__name__}); "
                           "delete it to rebuild") from None
    if neighbours.faiss_index.d != vectors.shape[1] or vectors.shape[1] != manifest.get("dim"):
        raise IsdaVizError(f"audit index in {directory} is inconsistent (index of {neighbours.faiss_index.d}-d "
                           f"vectors, manifest says {manifest.get('dim')}); delete it to rebuild")
    return AuditIndex(directory, manifest, neighbours, labels, positions)


def _embed_split(split, embedder: Embedder, desc: str, progress: bool,
                 chunk: int = CHUNK) -> Iterable[tuple[int, np.ndarray]]:
    """Yield (start, stored rows) per chunk of a split, in order."""
    start = 0
    bar = tqdm(total=len(split), desc=desc, disable=not progress, leave=False, unit="img")
    for images, _ in iterate_batches(split, chunk, shuffle=False):
        rows = embedder.stored(images)
        yield start, rows
        start += len(rows)
        bar.update(len(rows))
    bar.close()


def build_index(directory, train_split, test_split, embedder: Embedder, params: IndexParams, key: dict,
                progress: bool = True) -> AuditIndex:
    """Embed the training split chunk by chunk into `directory/vectors.npy`, index it, calibrate on `test_split`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)  # the directory is incomplete until the manifest is back
    started = time.perf_counter()
    n = len(train_split)
    first_images, _ = next(iterate_batches(train_split, 1, shuffle=False))
    dim = embedder.stored(first_images).shape[1]
    tmp = directory / ".vectors.npy.tmp"
    vectors = np.lib.format.open_memmap(tmp, mode="w+", dtype=embedder.store_dtype, shape=(n, dim))
    for start, rows in _embed_split(train_split, embedder, f"indexing {n} training images", progress):
        vectors[start:start + len(rows)] = rows
    vectors.flush()
    del vectors
    os.replace(tmp, directory / "vectors.npy")
    np.save(directory / "labels.npy", np.asarray(train_split.labels, dtype=np.int64))
    np.save(directory / "positions.npy", split_positions(train_split))
    vectors = np.load(directory / "vectors.npy", mmap_mode="r")
    if params.kind == "flat":
        neighbours = NeighbourIndex.flat(vectors, progress=progress)
    else:
        import faiss

        neighbours = NeighbourIndex.train_ivfpq(vectors, params, progress=progress)
        faiss.write_index(neighbours.faiss_index, str(directory / ".index.faiss.tmp"))
        os.replace(directory / ".index.faiss.tmp", directory / "index.faiss")

    nearest = []
    for _, rows in _embed_split(test_split, embedder, f"calibrating on {len(test_split)} test images", progress):
        d2, _ = neighbours.search(rows, 1)
        nearest.append(embedder.distance(d2[:, 0]))
    calibration = calibrate(np.concatenate(nearest))
    manifest = {**key, "search": {k: getattr(params, k) for k in _SEARCH_PARAMS},
                "dim": dim, "vector_dtype": np.dtype(embedder.store_dtype).name,
                "memory_bytes_per_vector": neighbours.memory_bytes_per_vector(),
                "calibration": calibration, "distance": embedder.distance_name,
                "classifier_run": str(embedder.classifier.source) if embedder.classifier is not None else None,
                "built_seconds": round(time.perf_counter() - started, 2),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "isda_viz_version": __version__}
    write_json_atomic(manifest, directory / MANIFEST)
    return AuditIndex(directory, manifest, neighbours, np.load(directory / "labels.npy"),
                      np.load(directory / "positions.npy"))


def prepare_index(directory, dataset: str, space: str, train_split, test_split, embedder: Embedder,
                  index_kind: str = "auto", progress: bool = True,
                  log: Callable[[str], None] = print) -> tuple[AuditIndex, str]:
    """The index in `directory`, reused when built from the same data, space, classifier and type.

    Returns `(index, status)` with status `reused`, `built` or `rebuilt`. A
    directory holding an index of another dataset or space is never
    overwritten: that is an error.
    """
    directory = Path(directory)
    first_images, _ = next(iterate_batches(train_split, 1, shuffle=False))
    dim = embedder.stored(first_images).shape[1]
    params = choose_index_params(index_kind, len(train_split), dim)
    key = _manifest_key(dataset, space, train_split, test_split, embedder.classifier, params)
    old = _read_manifest(directory)
    if old is not None:
        for what in ("space", "dataset"):
            if old.get(what) != key[what]:
                raise IsdaVizError(f"{directory} holds an audit index of {old.get('dataset')} in {old.get('space')} "
                                   f"space, not {dataset} in {space} space; pass another --index-dir")
        if index_kind == "auto" and old.get("kind") in ("flat", "ivfpq"):
            # auto accepts whichever type is cached, as long as the rest matches
            params = choose_index_params(old["kind"], len(train_split), dim)
            key = {**key, **_build_params(params)}
        changed = [k for k in _STALE_REASONS if old.get(k) != key[k]]
        if not changed:
            return open_index(directory), "reused"
        log(f"rebuilding the audit index in {directory}: {_STALE_REASONS[changed[0]]}")
        status = "rebuilt"
    else:
        if directory.exists() and any(directory.iterdir()):
            log(f"{directory} holds an incomplete audit index; rebuilding it")
        else:
            log(f"building the {params.kind} audit index of {len(train_split)} {dataset} training images "
                f"({space} space) in {directory}")
        status = "built"
    return build_index(directory, train_split, test_split, embedder, params, key, progress), status
