"""`isda-viz plot`: the curves people compare across training runs, and a 2-D picture of test features.

From the `metrics.jsonl` of one or more run directories: test accuracy and training
loss per epoch on shared axes (ISDA vs CE, explicit M vs ISDA, a lambda0 sweep: the
paper's Figs. 10-11); when runs logged them, the ISDA loss (the bound) against the
Monte-Carlo expected cross-entropy with its standard-error band (Fig. 9); and, when
asked, test features of each run with a checkpoint embedded in 2-D and coloured by
class (Fig. 8; t-SNE or PCA). The figure is one PNG; the numbers behind every curve
go beside it as CSV (long format: run, epoch, metric, value) and JSON, which also
holds the embedding coordinates.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from isda_viz.classifiers.classifier import load_classifier
from isda_viz.data.datasets import TensorImages, load_split
from isda_viz.devices import pick_device
from isda_viz.errors import IsdaVizError
from isda_viz.outputs.folders import is_finite_number
from isda_viz.readers import read_json
from isda_viz.runs import read_jsonl, write_bytes_atomic, write_json_atomic

EMBEDDINGS = ("none", "pca", "tsne")
# Metrics drawn when present, in the order they go to the CSV.
CURVE_METRICS = ("test_accuracy", "train_loss", "bound", "expected_ce_mc", "expected_ce_mc_stderr")
# Config keys that tell runs apart in a legend: (key, label).
_LEGEND_KEYS = (("loss", "loss"), ("lambda0", "λ0"), ("samples", "M"), ("labeled", "labels"))


@dataclass
class Run:
    """One run directory: its `config.json` (empty if absent) and `metrics.jsonl` lines."""
    name: str
    path: Path
    config: dict
    metrics: list[dict]
    embedding: dict | None = field(default=None)

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """`(epochs, values)` of the lines that logged `metric`."""
        rows = [(r["epoch"], float(r[metric])) for r in self.metrics if r.get(metric) is not None and "epoch" in r]
        return [e for e, _ in rows], [v for _, v in rows]

    @property
    def label(self) -> str:
        """The directory name and what sets the run apart, e.g. `isda (loss isda, λ0 0.5)`."""
        cfg = self.config
        parts = []
        for key, name in _LEGEND_KEYS:
            value = cfg.get(key)
            if value is None or (key == "lambda0" and cfg.get("loss") == "ce") \
                    or (key == "samples" and cfg.get("loss") != "explicit"):
                continue
            parts.append(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}")
        return f"{self.name} ({', '.join(parts)})" if parts else self.name


def read_run(path) -> Run:
    """A run directory's config and metrics; `IsdaVizError` when it holds no metrics."""
    path = Path(path)
    if not path.is_dir():
        raise IsdaVizError(f"run directory not found: {path}")
    metrics = read_jsonl(path / "metrics.jsonl")
    if not metrics:
        raise IsdaVizError(f"{path} holds no metrics.jsonl lines; is it a run directory of isda-viz train?")
    config = {}
    if (path / "config.json").exists():
        config = read_json(path / "config.json", "the run config", limit=1 << 20)
    return Run(path.name, path, config, metrics)


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """`(N, 2)` coordinates on the two leading principal components of `features (N, A)`, and the share
    of variance each explains. Signs fixed (largest loading positive) so the same features give the same picture."""
    centred = features - features.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    axes = axes * np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(1)])[:, None]
    variance = s ** 2
    return centred @ axes.T, (variance[:2] / max(variance.sum(), 1e-30)).tolist()


def tsne_2d(features: np.ndarray, seed: int) -> np.ndarray:
    """`(N, 2)` t-SNE of `features (N, A)` (scikit-learn, PCA initialisation, seeded)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise IsdaVizError("--embedding tsne needs scikit-learn (pip install scikit-learn); "
                           "or use --embedding pca") from None
    perplexity = min(30.0, (len(features) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


@torch.no_grad()
def embedding_features(run_dir, points: int, data_root=None, device=None, seed: int = 0,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str], list[int]]:
    """Deep features `(n, A)` float64 of `points` test images of a run's dataset (a seeded random subset,
    or all when fewer), their labels `(n,)`, the class names and the test indices used."""
    clf = load_classifier(run_dir, pick_device(device))
    dataset = load_split(clf.dataset, False, data_root or clf.config.get("data_root"))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:points].sort().values
    device = next(clf.model.parameters()).device
    out = []
    for start in tqdm(range(0, len(chosen), 256), desc=f"features {Path(run_dir).name}", disable=not progress,
                      leave=False):
        idx = chosen[start:start + 256]
        if isinstance(dataset, TensorImages):
            images = dataset.images[idx]
        else:
            images = torch.stack([dataset[i][0] for i in idx.tolist()])
        x = clf.preprocess(images.to(device).float() / 255)
        out.append(clf.model.features(x).double().cpu())
    return torch.cat(out).numpy(), dataset.labels[chosen].numpy(), clf.class_names, chosen.tolist()


def _embed(run: Run, method: str, points: int, data_root, device, seed: int, progress: bool) -> dict:
    features, labels, class_names, indices = embedding_features(run.path, points, data_root, device, seed, progress)
    embedding = {"method": method, "test_indices": indices, "label": labels.tolist(), "class_names": class_names}
    if method == "pca":
        coords, share = pca_2d(features)
        embedding["explained_variance"] = share
    else:
        coords = tsne_2d(features, seed)
    embedding["x"], embedding["y"] = coords[:, 0].tolist(), coords[:, 1].tolist()
    return embedding


def _unique_names(runs: list[Run]) -> None:
    """Runs from different folders that share a name are told apart by their full path."""
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = str(run.path)


def _draw(runs: list[Run]):
    """The matplotlib figure: curve panels on top, one embedding per run below."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    with_bound = [r for r in runs if r.series("bound")[0] or r.series("expected_ce_mc")[0]]
    embedded = [r for r in runs if r.embedding]
    top = 3 if with_bound else 2
    cols = max(top, len(embedded))
    rows = 2 if embedded else 1
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)

    for ax, metric, title in ((axes[0, 0], "test_accuracy", "test accuracy"),
                              (axes[0, 1], "train_loss", "training loss")):
        ax.set_visible(True)
        for i, run in enumerate(runs):
            epochs, values = run.series(metric)
            ax.plot(epochs, values, marker="o", markersize=3, color=f"C{i % 10}", label=run.label)
        ax.set(title=title, xlabel="epoch", ylabel=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)

    if with_bound:  # Fig. 9: the ISDA loss against the expectation it bounds
        ax = axes[0, 2]
        ax.set_visible(True)
        for run in with_bound:
            color = f"C{runs.index(run) % 10}"
            epochs, bound = run.series("bound")
            ax.plot(epochs, bound, color=color, marker="o", markersize=3, label=f"{run.name}: ISDA loss (bound)")
            epochs, mc = run.series("expected_ce_mc")
            ax.plot(epochs, mc, color=color, linestyle="--", label=f"{run.name}: Monte-Carlo expected CE")
            stderr = dict(zip(*run.series("expected_ce_mc_stderr")))
            if stderr:
                err = np.array([stderr.get(e, 0.0) for e in epochs])
                ax.fill_between(epochs, np.array(mc) - 2 * err, np.array(mc) + 2 * err, color=color, alpha=0.25,
                                linewidth=0)
        ax.set(title="bound vs Monte-Carlo (band: ±2 s.e.)", xlabel="epoch", ylabel="loss (nats)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    for ax, run in zip(axes[1] if embedded else [], embedded):
        ax.set_visible(True)
        emb = run.embedding
        labels = np.array(emb["label"])
        names = emb["class_names"]
        cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "turbo")
        for c in np.unique(labels):
            keep = labels == c
            color = cmap(c % cmap.N) if len(names) <= 20 else cmap(c / max(1, len(names) - 1))
            ax.scatter(np.array(emb["x"])[keep], np.array(emb["y"])[keep], s=4, color=color,
                       label=names[c] if c < len(names) else str(c))
        ax.set(title=f"{run.name}: test features ({emb['method']})", xticks=[], yticks=[])
        if len(names) <= 20:
            ax.legend(fontsize=6, markerscale=2, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot_runs(run_dirs, out, embedding: str = "none", embedding_points: int = 2000, data_root=None,
              device=None, seed: int = 0, progress: bool = True) -> dict[str, Path]:
    """Draw the runs in `run_dirs` to `out` (a .png); write `out` with .csv and .json beside it.

    `embedding`: "none", "pca" or "tsne" (Fig. 8) of `embedding_points` test images (a subset
    seeded by `seed`) for every run holding a `checkpoint.pt`; `data_root` overrides the
    dataset folder the runs were trained from. Returns `{"png": ..., "csv": ..., "json": ...}`.
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise IsdaVizError(f"--out must name a .png file, got {out}")
    if embedding not in EMBEDDINGS:
        raise IsdaVizError(f"unknown embedding '{embedding}'; choose one of: {', '.join(EMBEDDINGS)}")
    if embedding_points < 10:
        raise IsdaVizError(f"--embedding-points must be at least 10, got {embedding_points}")
    if not run_dirs:
        raise IsdaVizError("give at least one run directory")
    runs = [read_run(p) for p in run_dirs]
    _unique_names(runs)
    if embedding != "none":
        with_checkpoint = [r for r in runs if (r.path / "checkpoint.pt").exists()]
        if not with_checkpoint:
            raise IsdaVizError(f"--embedding {embedding} needs a run with a checkpoint.pt; none of the runs has one")
        for run in with_checkpoint:
            run.embedding = _embed(run, embedding, embedding_points, data_root, device, seed, progress)

    rows = []  # run by run, epoch by epoch, as the metrics files hold them
    for run in runs:
        for record in run.metrics:
            rows += [(run.name, record["epoch"], m, float(record[m])) for m in CURVE_METRICS
                     if record.get(m) is not None and "epoch" in record]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["run", "epoch", "metric", "value"])
    writer.writerows((name, epoch, metric, repr(value)) for name, epoch, metric, value in rows)

    paths = {"png": out, "csv": out.with_suffix(".csv"), "json": out.with_suffix(".json")}
    summary = {"figure": out.name, "runs": [{
        "name": run.name, "path": str(run.path), "label": run.label,
        "config": {k: run.config.get(k) for k in ("dataset", "arch", "loss", "lambda0", "samples", "labeled",
                                                   "epochs", "seed") if k in run.config},
        "curves": {m: dict(zip(("epoch", "value"), run.series(m))) for m in CURVE_METRICS if run.series(m)[0]},
        **({"embedding": run.embedding} if run.embedding else {}),
    } for run in runs]}
    png = _draw(runs)
    write_bytes_atomic(table.getvalue().encode(), paths["csv"])
    write_json_atomic(_nonfinite_as_null(summary), paths["json"])
    write_bytes_atomic(png, paths["png"])
    return paths


def _nonfinite_as_null(obj):
    """JSON has no NaN/inf: such values (a diverged epoch) are written as null."""
    if isinstance(obj, float) and not is_finite_number(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nonfinite_as_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nonfinite_as_null(v) for v in obj]
    return obj
