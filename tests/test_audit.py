"""`isda-viz audit`: exact search against float64 brute force, copy flagging, the index cache, one-line errors.

Indexes are built from the first 2000 Fashion-MNIST training images and
calibrated on the first 1000 test images, so the whole module runs in well
under a minute on 2 CPU cores.
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from isda_viz import audit
from isda_viz.audit import NeighbourIndex, calibrate, choose_index_params
from isda_viz.cli.main import main
from isda_viz.data import DEBIAN_FASHION_MNIST, load_split

N_TRAIN, N_TEST = 2000, 1000
LIMITS = ["--limit-train", str(N_TRAIN), "--limit-test", str(N_TEST)]

pytestmark = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(),
                                reason="needs Debian's dataset-fashion-mnist (tests never download)")


def brute_force(base: np.ndarray, queries: np.ndarray, k: int):
    """Independent reference: float64 squared L2 of every pair, sorted by (distance, row)."""
    b, q = base.astype(np.float64), queries.astype(np.float64)
    d2 = ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    order = np.array([np.lexsort((np.arange(len(b)), row))[:k] for row in d2])
    return np.take_along_axis(d2, order, 1), order


def run_cli(args, expect_ok=True):
    result = CliRunner().invoke(main, ["audit", *args])
    if expect_ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def save_gray(array_u8: np.ndarray, path: Path) -> Path:
    Image.fromarray(array_u8).save(path)
    return path


@pytest.fixture(scope="module")
def splits():
    return load_split("fashion-mnist", True, limit=N_TRAIN), load_split("fashion-mnist", False)


@pytest.fixture(scope="module")
def queries(splits, tmp_path_factory):
    """A folder: training image 5 (exact), training image 11 + noise, and 40 held-out test images."""
    train, test = splits
    folder = tmp_path_factory.mktemp("queries")
    save_gray(train.images[5, 0].numpy(), folder / "planted_exact.png")
    rng = np.random.default_rng(0)
    noisy = train.images[11, 0].numpy() + rng.normal(0, 0.02 * 255, (28, 28))
    save_gray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), folder / "planted_noisy.png")
    for i in range(9000, 9040):  # not among the N_TEST images used for calibration
        save_gray(test.images[i, 0].numpy(), folder / f"test_{i}.png")
    return folder


@pytest.fixture(scope="module")
def pixel_audit(queries, tmp_path_factory):
    """One pixel-space audit through the CLI; returns (index dir, out dir, first CLI result)."""
    root = tmp_path_factory.mktemp("pixel")
    result = run_cli(["--images", str(queries), "--dataset", "fashion-mnist", "--index-dir", str(root / "index"),
                      "--out", str(root / "out"), *LIMITS])
    return root / "index", root / "out", result


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    from isda_viz.train import TrainConfig, fit

    out = tmp_path_factory.mktemp("run") / "resnet8"
    fit(TrainConfig(out=str(out), arch="resnet8", epochs=1, limit_train=512, limit_test=256, device="cpu"),
        progress=False, log=lambda _: None)
    return out


# ------------------------------------------------------------------------------------- exact search


def test_flat_search_equals_float64_brute_force_on_pixels_and_features(splits):
    train, test = splits
    pixels = train.images.reshape(len(train), -1).numpy()
    queries = test.images[:32].reshape(32, -1).numpy()
    d2, rows = NeighbourIndex.flat(pixels).search(queries, 7)
    ref_d2, ref_rows = brute_force(pixels / 255.0, queries / 255.0, 7)
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(rows, ref_rows)

    rng = np.random.default_rng(1)
    features = rng.normal(size=(3000, 64)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    feature_queries = features[:20] + rng.normal(0, 0.3, size=(20, 64)).astype(np.float32)
    d2, rows = NeighbourIndex.flat(features).search(feature_queries, 5)
    ref_d2, ref_rows = brute_force(features, feature_queries, 5)
    np.testing.assert_allclose(d2, ref_d2, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(rows, ref_rows)


def test_ivfpq_returns_exact_distances_and_high_recall(splits):
    train, test = splits
    pixels = train.images.reshape(len(train), -1).numpy()
    queries = test.images[:64].reshape(64, -1).numpy()
    params = choose_index_params("ivfpq", len(pixels), pixels.shape[1])
    d2, rows = NeighbourIndex.train_ivfpq(pixels, params).search(queries, 5)
    ref_d2, ref_rows = brute_force(pixels / 255.0, queries / 255.0, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows, ref_rows)])
    assert recall >= 0.9
    own = ((pixels[rows].astype(np.float64) - queries[:, None, :]) ** 2).sum(-1) / 255.0**2
    np.testing.assert_allclose(d2, own, rtol=1e-12)  # whatever it found, distances are exact
    assert np.all(d2 >= ref_d2 - 1e-12)              # and never better than the true neighbours


def test_auto_picks_flat_for_small_sets_and_ivfpq_for_large():
    assert choose_index_params("auto", 60_000, 784).kind == "flat"
    big = choose_index_params("auto", 1_281_167, 2048)
    assert big.kind == "ivfpq" and big.nlist >= 1024 and big.pca_dim == 128


def test_calibration_flags_at_most_one_percent_and_no_tighter_threshold_exists():
    rng = np.random.default_rng(0)
    d = np.concatenate([rng.gamma(5, 1, 997), [0.0, 0.0, 0.5]])  # a few exact copies among them
    cal = calibrate(d)
    scores = d / np.median(d)
    assert cal["median_distance"] == pytest.approx(np.median(d))
    assert (scores < cal["threshold"]).sum() <= math.floor(0.01 * len(d))
    # reference: the largest candidate threshold that still flags at most 1%
    best = max(t for t in scores if (scores < t).sum() <= 0.01 * len(d))
    assert cal["threshold"] == pytest.approx(best)


# ------------------------------------------------------------------------------------- the audit


def test_planted_training_images_are_flagged_and_test_images_mostly_not(pixel_audit, splits):
    index_dir, out, result = pixel_audit
    report = json.loads((out / "audit.json").read_text())
    by_name = {Path(q["source"]).name: q for q in report["queries"]}
    exact, noisy = by_name["planted_exact.png"], by_name["planted_noisy.png"]
    assert exact["flagged"] and noisy["flagged"]
    assert exact["neighbors"][0]["index"] == 5 and exact["neighbors"][0]["distance"] == 0.0
    assert noisy["neighbors"][0]["index"] == 11
    assert 0 < noisy["neighbors"][0]["distance"] < 1.0  # sigma 0.02 over 784 pixels: ~0.56
    tests = [q for name, q in by_name.items() if name.startswith("test_")]
    assert len(tests) == 40 and sum(q["flagged"] for q in tests) <= 3
    assert report["flagged"] == sum(q["flagged"] for q in report["queries"])
    assert f"{report['flagged']} flagged" in result.output

    # neighbours are the brute-force ones, with the training labels, k of them
    train, _ = splits
    q = by_name["test_9000.png"]
    image = np.asarray(Image.open(q["source"]), dtype=np.float64).reshape(1, -1) / 255
    ref_d2, ref_rows = brute_force(train.images.reshape(len(train), -1).numpy() / 255.0, image, 5)
    assert [n["index"] for n in q["neighbors"]] == ref_rows[0].tolist()
    np.testing.assert_allclose([n["distance"] for n in q["neighbors"]], np.sqrt(ref_d2[0]), rtol=1e-12)
    assert [n["label"] for n in q["neighbors"]] == train.labels[ref_rows[0]].tolist()
    cal = json.loads((index_dir / "manifest.json").read_text())["calibration"]
    assert q["copy_score"] == pytest.approx(q["neighbors"][0]["distance"] / cal["median_distance"])
    assert report["threshold"] == cal["threshold"]

    png = Image.open(out / "audit.png")
    assert png.mode == "RGB" and png.width > 6 * 84 and png.height > len(report["queries"]) * 84
    assert np.asarray(png).std() > 10  # images were drawn, not a blank canvas


def test_queries_of_any_size_and_mode_are_converted(splits, tmp_path):
    train, _ = splits
    rgb_big = Image.fromarray(train.images[7, 0].numpy()).resize((112, 112), Image.Resampling.NEAREST).convert("RGBA")
    rgb_big.save(tmp_path / "big_rgba.png")
    image = audit.read_query_image(tmp_path / "big_rgba.png", channels=1, size=28)
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8
    assert (image.float() - train.images[7].float()).abs().mean() < 8  # the same picture, resampled
    rgb = audit.read_query_image(tmp_path / "big_rgba.png", channels=3, size=32)
    assert rgb.shape == (3, 32, 32)


def test_from_report_audits_augmented_and_reconstructions(splits, pixel_audit, tmp_path):
    index_dir, _, _ = pixel_audit
    train, test = splits
    run = tmp_path / "augment-run"
    (run / "images").mkdir(parents=True)
    save_gray(test.images[9100, 0].numpy(), run / "images" / "recon_0.png")
    save_gray(train.images[42, 0].numpy(), run / "images" / "aug_0_0.png")   # a copy slipped in
    save_gray(test.images[9101, 0].numpy(), run / "images" / "aug_0_1.png")
    (run / "report.json").write_text(json.dumps({"images": [{
        "source": "test:9100", "label": 3, "predicted": 3, "reconstruction": {"file": "images/recon_0.png"},
        "augmented": [{"file": "images/aug_0_0.png"}, {"file": "images/aug_0_1.png"}]}]}))
    run_cli(["--from", str(run), "--dataset", "fashion-mnist", "--index-dir", str(index_dir),
             "--out", str(tmp_path / "out"), *LIMITS])
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    sources = [q["source"] for q in report["queries"]]
    assert len(sources) == 3
    assert "reconstruction" in sources[0] and "recon_0.png" in sources[0]
    assert all("reconstruction" not in s for s in sources[1:])
    assert report["queries"][1]["flagged"] and report["queries"][1]["neighbors"][0]["index"] == 42
    assert report["index"]["status"] == "reused"


def test_feature_space_flags_planted_copy(queries, classifier_run, tmp_path):
    result = run_cli(["--images", str(queries / "planted_exact.png"), "--images", str(queries / "planted_noisy.png"),
                      "--images", str(queries / "test_9001.png"), "--dataset", "fashion-mnist", "--space", "feature",
                      "--classifier", str(classifier_run), "--device", "cpu", "--out", str(tmp_path / "out"), *LIMITS])
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert report["space"] == "feature" and report["index"]["status"] == "built"
    assert Path(report["index"]["dir"]).is_relative_to(classifier_run)  # default: inside the run
    exact, noisy, _ = report["queries"]
    assert exact["neighbors"][0]["index"] == 5 and exact["neighbors"][0]["distance"] < 1e-5 and exact["flagged"]
    assert noisy["flagged"]
    assert all(0 <= n["distance"] <= 2 for q in report["queries"] for n in q["neighbors"])  # cosine distances
    assert "built" in result.output


# ------------------------------------------------------------------------------------- the index cache


def _stamp(index_dir: Path):
    return {name: (index_dir / name).stat().st_mtime_ns for name in ("manifest.json", "vectors.npy")}


def test_cached_index_is_reused_when_it_matches(pixel_audit, queries, tmp_path):
    index_dir, _, _ = pixel_audit
    before = _stamp(index_dir)
    result = run_cli(["--images", str(queries / "planted_exact.png"), "--dataset", "fashion-mnist",
                      "--index-dir", str(index_dir), "--out", str(tmp_path / "out"), *LIMITS])
    assert _stamp(index_dir) == before
    assert "index reused" in result.output and "building" not in result.output


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_index_is_rebuilt_when_the_training_images_change(splits, queries, tmp_path):
    train, test = splits
    root = tmp_path / "data"
    root.mkdir()
    images = train.images[:, 0].numpy().copy()
    _write_idx(root / "train-images-idx3-ubyte.gz", images)
    _write_idx(root / "train-labels-idx1-ubyte.gz", train.labels.numpy())
    _write_idx(root / "t10k-images-idx3-ubyte.gz", test.images[:N_TEST, 0].numpy())
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", test.labels[:N_TEST].numpy())
    args = ["--images", str(queries / "planted_exact.png"), "--dataset", "fashion-mnist", "--data-root", str(root),
            "--index-dir", str(tmp_path / "index"), "--out", str(tmp_path / "out")]
    assert "index built" in run_cli(args).output
    images[1999, 0, 0] ^= 1  # one pixel of one image, same size
    _write_idx(root / "train-images-idx3-ubyte.gz", images)
    result = run_cli(args)
    assert "rebuilding the audit index" in result.output and "training images changed" in result.output
    assert "index rebuilt" in result.output
    result = run_cli([*args, "--limit-train", "1500"])  # another training split size
    assert "training set has another size" in result.output
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["index"]["train_size"] == 1500


def test_index_is_rebuilt_when_the_classifier_changes_and_spaces_keep_their_own(
        queries, classifier_run, tmp_path, monkeypatch):
    from isda_viz.train import TrainConfig, fit

    monkeypatch.setattr(audit, "AUDIT_CACHE", tmp_path / "cache")
    base = ["--images", str(queries / "planted_exact.png"), "--dataset", "fashion-mnist", "--device", "cpu",
            "--out", str(tmp_path / "out"), *LIMITS]
    run_cli([*base, "--space", "pixel"])
    pixel_dir = Path(json.loads((tmp_path / "out" / "audit.json").read_text())["index"]["dir"])
    assert pixel_dir.is_relative_to(tmp_path / "cache")
    pixel_stamp = _stamp(pixel_dir)

    run = tmp_path / "run"
    shutil.copytree(classifier_run, run, ignore=shutil.ignore_patterns("audit-index"))
    feature = [*base, "--space", "feature", "--classifier", str(run)]
    assert "index built" in run_cli(feature).output  # the space changed: its own index, not the pixel one
    assert "index reused" in run_cli(feature).output
    fit(TrainConfig(out=str(run), arch="resnet8", epochs=2, limit_train=512, limit_test=256, device="cpu"),
        resume=True, progress=False, log=lambda _: None)
    result = run_cli(feature)
    assert "classifier checkpoint changed" in result.output and "index rebuilt" in result.output
    assert _stamp(pixel_dir) == pixel_stamp


# ------------------------------------------------------------------------------------- one-line errors


def test_bad_input_gives_one_line_errors(pixel_audit, queries, tmp_path):
    index_dir, _, _ = pixel_audit
    out = ["--out", str(tmp_path / "out"), *LIMITS]
    common = ["--dataset", "fashion-mnist", "--index-dir", str(index_dir), *out]

    assert_one_line_error(run_cli(["--images", str(tmp_path / "missing.png"), *common], False),
                          "not found", "missing.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    assert_one_line_error(run_cli(["--images", str(tmp_path / "corrupt.png"), *common], False),
                          "cannot read image", "corrupt.png")
    assert_one_line_error(run_cli(["--images", str(queries), "--dataset", "fashion-mnist", "--space", "feature", *out],
                                  False), "--space feature needs --classifier")
    assert_one_line_error(run_cli(["--from", str(tmp_path), *common], False), "has no report.json")
    assert_one_line_error(run_cli(["--dataset", "fashion-mnist", *out], False), "--images", "--from")
    assert not (tmp_path / "out" / "audit.json").exists()


def test_index_from_another_space_is_refused(pixel_audit, queries, classifier_run, tmp_path):
    index_dir, _, _ = pixel_audit
    before = _stamp(index_dir)
    result = run_cli(["--images", str(queries), "--dataset", "fashion-mnist", "--space", "feature",
                      "--classifier", str(classifier_run), "--device", "cpu", "--index-dir", str(index_dir),
                      "--out", str(tmp_path / "out"), *LIMITS], False)
    assert_one_line_error(result, "pixel space", "another --index-dir")
    assert _stamp(index_dir) == before  # never overwritten
