"""`isda-viz plot`: the PNG holds the runs' curves, and its CSV/JSON hold exactly the metrics files' numbers."""

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from isda_viz.classifiers.classifier import load_classifier
from isda_viz.cli.main import main
from isda_viz.data.datasets import load_split
from isda_viz.errors import IsdaVizError
from isda_viz.outputs.plot import CURVE_METRICS, plot_runs


# matplotlib's first two cycle colours (tab10): run 0 and run 1.
C0, C1 = (31, 119, 180), (255, 127, 14)


def _fake_run(path, config, metrics):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    lines = [json.dumps(m) for m in metrics]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"epoch": 9, "train_lo')  # a line cut by a kill
    return path


@pytest.fixture
def fake_runs(tmp_path):
    g = torch.Generator().manual_seed(0)
    isda, ce = [], []
    for epoch in range(1, 5):
        noise = torch.rand(6, generator=g, dtype=torch.float64).tolist()
        isda.append({"epoch": epoch, "train_loss": 2.0 / epoch + noise[0], "train_accuracy": 0.5 + noise[1] / 3,
                     "test_accuracy": 0.4 + 0.1 * epoch + noise[2] / 20, "lambda": 0.5 * epoch / 4, "lr": 0.1,
                     "seconds": 3.0, "bound": 1.5 / epoch + 0.3, "expected_ce_mc": 1.5 / epoch + 0.2 * noise[3],
                     "expected_ce_mc_stderr": 0.02 + noise[4] / 50})
        ce.append({"epoch": epoch, "train_loss": 1.8 / epoch + noise[5], "train_accuracy": 0.6,
                   "test_accuracy": 0.35 + 0.1 * epoch, "lambda": 0.0, "lr": 0.1, "seconds": 2.5})
    return (_fake_run(tmp_path / "isda", {"loss": "isda", "lambda0": 0.5, "labeled": 1000}, isda),
            _fake_run(tmp_path / "ce", {"loss": "ce", "lambda0": 0.5}, ce))


def _pixels_near(image, color, tol=12):
    arr = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(arr - np.array(color)).max(-1) <= tol).sum())


def test_plot_writes_a_figure_and_csv_json_equal_to_the_metrics(fake_runs, tmp_path):
    paths = plot_runs(list(fake_runs), tmp_path / "figs" / "fig.png", progress=False)
    assert paths == {"png": tmp_path / "figs" / "fig.png", "csv": tmp_path / "figs" / "fig.csv",
                     "json": tmp_path / "figs" / "fig.json"}
    image = Image.open(paths["png"])
    assert image.format == "PNG" and image.width >= 1200 and image.height >= 350  # 3 curve panels side by side
    colours = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0, return_counts=True)
    assert (colours[1] >= 30).sum() >= 4  # not blank: background, text and at least two line colours
    assert _pixels_near(image, C0) > 100 and _pixels_near(image, C1) > 100  # both runs are drawn

    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    summary = json.loads(paths["json"].read_text())
    expected = []
    for run_dir in fake_runs:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()[:-1]:  # the cut line is skipped
            record = json.loads(line)
            expected += [(run_dir.name, record["epoch"], m, record[m]) for m in CURVE_METRICS if m in record]
    assert [(r["run"], int(r["epoch"]), r["metric"], float(r["value"])) for r in rows] == expected
    by_name = {run["name"]: run for run in summary["runs"]}
    for name, epoch, metric, value in expected:
        curve = by_name[name]["curves"][metric]
        assert curve["value"][curve["epoch"].index(epoch)] == value
    assert by_name["isda"]["label"] == "isda (loss isda, λ0 0.5, labels 1000)"
    assert by_name["ce"]["label"] == "ce (loss ce)" and "bound" not in by_name["ce"]["curves"]


def test_plot_without_bound_metrics_draws_two_panels_and_rejects_bad_input(fake_runs, tmp_path):
    paths = plot_runs([fake_runs[1]], tmp_path / "ce.png", progress=False)
    image = Image.open(paths["png"])
    assert image.width < 1200 and _pixels_near(image, C0) > 100 and _pixels_near(image, C1) == 0
    with pytest.raises(IsdaVizError, match=".png"):
        plot_runs(list(fake_runs), tmp_path / "fig.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IsdaVizError, match="no metrics.jsonl"):
        plot_runs([tmp_path / "empty"], tmp_path / "fig.png")
    with pytest.raises(IsdaVizError, match="checkpoint.pt"):
        plot_runs(list(fake_runs), tmp_path / "fig.png", embedding="pca")
    assert not (tmp_path / "fig.png").exists() and not (tmp_path / "fig.csv").exists()


def test_plot_command(fake_runs, tmp_path):
    result = CliRunner().invoke(main, ["plot", *map(str, fake_runs), "--out", str(tmp_path / "cli.png")])
    assert result.exit_code == 0, result.output
    assert "cli.png" in result.output and (tmp_path / "cli.png").stat().st_size > 10_000
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and result.output.startswith("Error: run directory not found")


def test_pca_embedding_holds_the_classifiers_test_features(tiny_run, fake_runs, tmp_path):
    paths = plot_runs([tiny_run, fake_runs[1]], tmp_path / "emb.png", embedding="pca", embedding_points=120,
                      seed=3, progress=False)
    summary = json.loads(paths["json"].read_text())
    emb = summary["runs"][0]["embedding"]
    assert "embedding" not in summary["runs"][1]  # no checkpoint: curves only
    idx = emb["test_indices"]
    assert len(idx) == 120 == len(set(idx)) and emb["method"] == "pca"
    test = load_split("fashion-mnist", False)
    assert emb["label"] == test.labels[idx].tolist() and emb["class_names"][0] == "T-shirt/top"
    # The coordinates are the run's own features projected on their two leading principal axes.
    clf = load_classifier(tiny_run)
    with torch.no_grad():
        feats = clf.model.features(clf.preprocess(test.images[idx].float() / 255)).double().numpy()
    centred = feats - feats.mean(0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    ref = centred @ vectors[:, ::-1][:, :2]
    ours = np.stack([emb["x"], emb["y"]], 1)
    np.testing.assert_allclose(np.abs(ours), np.abs(ref), rtol=1e-3, atol=1e-4)
    assert emb["explained_variance"][0] >= emb["explained_variance"][1] > 0
    image = Image.open(paths["png"])
    assert image.height >= 700  # a second row for the embedding
    assert sum(_pixels_near(image, c, tol=4) > 5 for c in [(148, 103, 189), (140, 86, 75), (227, 119, 194)]) >= 2


def test_tsne_embedding_is_seeded(tiny_run, tmp_path):
    pytest.importorskip("sklearn")
    first = plot_runs([tiny_run], tmp_path / "a.png", embedding="tsne", embedding_points=60, progress=False)
    second = plot_runs([tiny_run], tmp_path / "b.png", embedding="tsne", embedding_points=60, progress=False)
    one, two = (json.loads(p["json"].read_text())["runs"][0]["embedding"] for p in (first, second))
    assert one["method"] == "tsne" and len(one["x"]) == 60 and np.isfinite(one["x"] + one["y"]).all()
    assert one["x"] == two["x"] and one["y"] == two["y"]
