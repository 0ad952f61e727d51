"""`isda-viz audit`: neighbours and copy flagging end to end, the figure's pages, the index cache, one-line errors.

Indexes are built from the first 2000 Fashion-MNIST training images and
calibrated on the first 1000 test images, so the whole module runs in well
under a minute on 2 CPU cores.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from isda_viz.audit import index

from isda_viz.cli.main import main
from isda_viz.data.datasets import DEBIAN_FASHION_MNIST, load_split
from test_index import brute_force

N_TRAIN, N_TEST = 2000, 1000
LIMITS = ["--limit-train", str(N_TRAIN), "--limit-test", str(N_TEST)]

pytestmark = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(),
                                reason="needs Debian's dataset-fashion-mnist (tests never download)")


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
    from isda_viz.training.loop import TrainConfig, fit

    out = tmp_path_factory.mktemp("run") / "resnet8"
    fit(TrainConfig(out=str(out), arch="resnet8", epochs=1, limit_train=512, limit_test=256, device="cpu"),
        progress=False, log=lambda _: None)
    return out


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
    from isda_viz.outputs.audit_report import read_audit

    assert read_audit(out).to_dict() == report           # the typed audit.json reads back to the same JSON
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



# ------------------------------------------------------------------------------------- the figure's pages


def test_figure_is_pages_of_at_most_16_queries_within_2000_px_listed_in_audit_json(pixel_audit, queries, tmp_path):
    _, out, result = pixel_audit
    report = json.loads((out / "audit.json").read_text())
    assert len(report["queries"]) == 42
    assert [p["file"] for p in report["pages"]] == ["audit.png", "audit_page2.png", "audit_page3.png"]
    assert [p["queries"] for p in report["pages"]] == [list(range(0, 16)), list(range(16, 32)), list(range(32, 42))]
    for page in report["pages"]:
        png = Image.open(out / page["file"])
        assert png.mode == "RGB" and max(png.size) <= 2000
        assert png.width >= 6 * 84 and png.height >= 4 * 84  # query + 5 neighbours per row, several rows
        assert np.asarray(png).std() > 10  # images were drawn, not a blank canvas
    assert sorted(f.name for f in out.glob("audit*.png")) == sorted(p["file"] for p in report["pages"])

    # a later, shorter audit into the same folder leaves no page of the earlier one behind
    again = tmp_path / "again"
    shutil.copytree(out, again)
    run_cli(["--images", str(queries / "planted_exact.png"), "--dataset", "fashion-mnist",
             "--index-dir", str(pixel_audit[0]), "--out", str(again), *LIMITS])
    report = json.loads((again / "audit.json").read_text())
    assert report["pages"] == [{"file": "audit.png", "queries": [0]}]
    assert [f.name for f in again.glob("audit*.png")] == ["audit.png"]


def _solid(colour, size: int) -> torch.Tensor:
    """A uint8 `(3, size, size)` image of one colour."""
    return torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand(3, size, size).clone()


def _square_sides(page: np.ndarray, colours: list) -> list[int]:
    """Per colour: the side of the one filled square of it on the RGB page `(H, W, 3)`, or 0 when its pixels
    are not exactly one filled square."""
    from scipy import ndimage

    key = (page[..., 0].astype(np.int64) << 16) | (page[..., 1].astype(np.int64) << 8) | page[..., 2]
    wanted = np.array([(r << 16) | (g << 8) | b for r, g, b in colours])
    order = np.argsort(wanted)
    at = np.clip(np.searchsorted(wanted[order], key), 0, len(wanted) - 1)
    labels = np.where(wanted[order][at] == key, order[at] + 1, 0)  # 1 + position in `colours`, 0 elsewhere
    sides = []
    for number, box in enumerate(ndimage.find_objects(labels, len(colours)), start=1):
        filled = box is not None and np.all(labels[box] == number)
        height, width = (box[0].stop - box[0].start, box[1].stop - box[1].start) if box else (0, 0)
        sides.append(height if filled and height == width else 0)
    return sides


@pytest.mark.parametrize("n, k, size", [(16, 5, 28), (16, 20, 32), (3, 2, 28)])
def test_audit_page_draws_every_query_and_neighbour_within_2000_px(n, k, size):
    from isda_viz.outputs.audit_report import AuditQuery, Neighbour
    from isda_viz.outputs.figures import audit_page

    # colours with green != blue, which no text (black, grey or red on white) produces
    queries = [(70 + 7 * i, 20, 240) for i in range(n)]
    neighbours = [[(10 + 12 * i, 100 + 7 * j, 0) for j in range(k)] for i in range(n)]
    records = [AuditQuery(source=f"/x/q{i}.png (augmented from test:{i})", role="augmented", copy_score=0.5 + i,
                          flagged=i == 0, neighbors=[Neighbour(index=j, distance=0.1 * j, label=j % 10)
                                                     for j in range(k)])
               for i in range(n)]
    page = audit_page([_solid(c, size) for c in queries], records,
                      [[_solid(c, size) for c in row] for row in neighbours],
                      [f"class {c}" for c in range(10)], ["heading"])
    array = np.asarray(page)
    assert page.mode == "RGB" and max(page.size) <= 2000
    sides = set(_square_sides(array, queries + [c for row in neighbours for c in row]))
    assert len(sides) == 1  # every query and every neighbour drawn once, as equal square tiles ...
    side = sides.pop()
    assert side >= size and side % size == 0  # ... enlarged by a whole factor
    assert np.any(np.all(array == (200, 0, 0), axis=2))  # the flagged query is marked in red


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
    from isda_viz.training.loop import TrainConfig, fit

    monkeypatch.setattr(index, "AUDIT_CACHE", tmp_path / "cache")
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
