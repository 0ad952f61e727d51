"""`isda-viz augment` and `isda-viz grid` end to end with tiny real models; CE-run class statistics."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from isda_viz.cli.main import main
from isda_viz.data.datasets import load_split
from isda_viz.errors import IsdaVizError
from isda_viz.generators.wgan import WGANGenerator, recompute_batchnorm_statistics, save_generator
from isda_viz.classifiers.statistics import STATISTICS_DIR, class_statistics
from isda_viz.classifiers.classifier import load_classifier
from isda_viz.inversion.optimizer import InversionOptions, negative_target_floor
from isda_viz.outputs.report import read_report
from isda_viz.inversion.pipelines import VisualizeOptions, augment_images

FAST = ["--iterations", "8", "--restarts", "2", "--num-augmented", "2"]


def _gan(path, num_classes=10):
    torch.manual_seed(0)
    generator = WGANGenerator(latent_dim=16, num_classes=num_classes, width=8)
    recompute_batchnorm_statistics(generator, 2, 32, torch.Generator().manual_seed(0))
    save_generator(generator, path / "generator.pt", iteration=0, dataset="fashion-mnist")
    return path


@pytest.fixture(scope="module")
def tiny_gan(tmp_path_factory):
    return _gan(tmp_path_factory.mktemp("gan"))


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error_line(result):
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return [line for line in result.output.splitlines() if line.startswith("Error:")][-1]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    test = load_split("fashion-mnist", False, limit=2)
    big = Image.fromarray(test.images[0, 0].numpy()).resize((90, 70)).convert("RGBA")
    big.save(folder / "shirt.png")
    Image.fromarray(test.images[1, 0].numpy()).convert("RGB").save(folder / "other.jpg")
    return [folder / "shirt.png", folder / "other.jpg"]


def test_augment_writes_grid_pngs_and_report(tiny_run, tiny_ce_run, tiny_gan, image_files, tmp_path):
    out = tmp_path / "aug"
    result = _invoke("augment", "--image", image_files[0], "--image", image_files[1], "--label", "trouser",
                     "--classifier", tiny_run, "--judge", tiny_ce_run, "--generator", tiny_gan, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [r["source"] for r in report["images"]] == [str(p) for p in image_files]
    options = report["settings"]["options"]
    assert (options["reconstruct_iterations"], options["augment_iterations"], options["restarts"]) == (8, 12, 2)
    for record in report["images"]:
        assert record["label"] == 1 and 0 <= record["predicted"] < 10
        rec = record["reconstruction"]
        assert rec["feature_error"] >= 0 and np.isfinite(rec["psnr"]) and 0 <= rec["predicted"] < 10
        assert Image.open(out / rec["file"]).size == (28, 28)
        assert len(record["augmented"]) == 2
        for aug in record["augmented"]:
            assert set(aug) >= {"file", "reached_shift_error", "predicted", "judge_predicted", "pixel_distance",
                                "negative_target_floor"}
            assert 0 <= aug["judge_predicted"] < 10 and aug["pixel_distance"] >= 0
            # The floor is a bound: no image's (post-ReLU) features get closer to a~ than its negative part.
            assert 0 <= aug["negative_target_floor"] <= aug["reached_shift_error"] + 1e-6
            png = np.asarray(Image.open(out / aug["file"]))
            assert png.shape == (28, 28)
    grid = Image.open(out / "grid.png")
    assert grid.width > grid.height > 0  # 2 rows of 4 cells
    # The typed report reads back to exactly what was written, and lists every PNG it names.
    typed = read_report(out)
    assert typed.to_dict() == report
    assert all((out / file).is_file() for file, _, _ in typed.listed_images()) and len(typed.listed_images()) == 6
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".aug")]  # no temporary folder left


def test_augment_label_defaults_to_the_prediction_and_same_seed_same_output(tiny_run, tiny_gan, image_files, tmp_path):
    result = _invoke("augment", "--image", image_files[0], "--classifier", tiny_run, "--generator", tiny_gan,
                     *FAST, "--seed", 5, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    # The same run from Python: the library applies the command line's policy (Step II = 3/2 x Step I).
    options = VisualizeOptions(classifier=str(tiny_run), generator=str(tiny_gan), num_augmented=2, seed=5,
                               inversion=InversionOptions.make(iterations=8, restarts=2), progress=False)
    returned = augment_images([image_files[0]], out=tmp_path / "b", options=options)
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("a", "b")]
    assert returned.to_dict() == reports[1]
    first = reports[0]["images"][0]
    assert first["label"] == first["predicted"]
    assert reports[0]["images"] == reports[1]["images"]
    assert (tmp_path / "a" / first["augmented"][1]["file"]).read_bytes() == \
        (tmp_path / "b" / first["augmented"][1]["file"]).read_bytes()


def test_grid_rows_per_class_with_samples(tiny_run, tiny_gan, tmp_path):
    fig = tmp_path / "fig.png"
    result = _invoke("grid", "--classifier", tiny_run, "--generator", tiny_gan, "--classes", "Sneaker,0",
                     "--per-class", 2, "--samples", 3, *FAST, "--out", fig)
    assert result.exit_code == 0, result.output
    report = json.loads(fig.with_suffix(".json").read_text())
    assert [r["label"] for r in report["images"]] == [7, 7, 0, 0]
    assert all(r["source"].startswith("fashion-mnist:test[") for r in report["images"])
    for record in report["images"]:
        assert (tmp_path / record["augmented"][0]["file"]).exists()  # relative to the report
    # FIG_files holds the single PNGs and their report.json (what `audit --from` reads); the figure is FIG.png only
    assert not (tmp_path / "fig_files" / "grid.png").exists()
    inner = json.loads((tmp_path / "fig_files" / "report.json").read_text())
    assert [r["augmented"][0]["file"] for r in inner["images"]] == \
        [r["augmented"][0]["file"].split("/", 1)[1] for r in report["images"]]
    assert Image.open(fig).size[0] > 0 and fig.with_suffix(".html").is_file()
    assert 0 <= report["summary"]["reconstruction_true_label_rate"] <= 1


def test_errors_are_one_line_and_leave_no_output(tiny_run, tiny_gan, image_files, tmp_path):
    out = tmp_path / "never"
    base = ["--classifier", tiny_run, "--generator", tiny_gan, *FAST, "--out", out]
    assert "image not found" in _error_line(_invoke("augment", "--image", tmp_path / "nope.png", *base))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    assert "cannot read image" in _error_line(_invoke("augment", "--image", tmp_path / "bad.png", *base))
    assert "not a class" in _error_line(_invoke("augment", "--image", image_files[0], "--label", "Sock", *base))
    assert "--num-augmented" in _error_line(_invoke("augment", "--image", image_files[0], *base, "-k", 0))
    assert "--strength" in _error_line(_invoke("augment", "--image", image_files[0], *base, "--strength", -1))
    assert "needs --lr" in _error_line(_invoke("augment", "--image", image_files[0], *base, "--optimizer", "sgd"))
    five = _gan(tmp_path / "five", num_classes=5) if (tmp_path / "five").mkdir() is None else None
    assert "has 5 classes" in _error_line(_invoke("augment", "--image", image_files[0], "--classifier", tiny_run,
                                                  "--generator", five, *FAST, "--out", out))
    assert not out.exists()


def test_ce_run_statistics_are_computed_once_and_cached(tiny_ce_run, monkeypatch):
    classifier = load_classifier(tiny_ce_run)
    assert classifier.estimator is None
    shutil.rmtree(tiny_ce_run / STATISTICS_DIR, ignore_errors=True)
    statistics = class_statistics(classifier, progress=False)
    assert statistics.classes == list(range(10)) and len(list((tiny_ce_run / STATISTICS_DIR).glob("full-*.pt"))) == 1
    train = load_split("fashion-mnist", True, limit=1024)  # the images the run was trained on
    with torch.no_grad():
        features = classifier.model.features(classifier.preprocess(train.images.float() / 255)).double().numpy()
    labels = train.labels.numpy()
    for c in (0, 9):
        expected = np.cov(features[labels == c].T, bias=True)
        np.testing.assert_allclose(statistics.covariance(c).numpy(), expected, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr("isda_viz.classifiers.statistics._statistics_pass", None)  # a cached result must not iterate
    cached = class_statistics(classifier, classes=[9, 0], progress=False)
    assert cached.classes == [0, 9] and torch.equal(cached.covariance(9), statistics.covariance(9))


def test_augment_works_out_of_the_box_with_the_shipped_weights(image_files, tmp_path):
    result = _invoke("augment", "--image", image_files[0], "--iterations", 3, "--restarts", 1, "-k", 1,
                     "--out", tmp_path / "shipped")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "shipped" / "report.json").read_text())
    assert report["settings"]["classifier"].endswith("fmnist-isda-resnet32")
    assert report["settings"]["judge"].endswith("fmnist-ce-resnet32")
    record = report["images"][0]
    true_label = int(load_split("fashion-mnist", False, limit=1).labels[0])  # the image is test image 0
    assert record["label"] == record["predicted"] == true_label
    assert record["augmented"][0]["judge_predicted"] is not None


def test_negative_target_floor_is_the_distance_to_the_nonnegative_orthant():
    g = torch.Generator().manual_seed(3)
    wanted, shift = torch.randn(50, 7, generator=g, dtype=torch.float64), torch.randn(50, 7, generator=g,
                                                                                       dtype=torch.float64)
    floor = negative_target_floor(wanted, shift)
    for i in range(50):  # brute force: sum of squares of the negative entries, one row at a time
        negative = math.sqrt(sum(v * v for v in wanted[i].tolist() if v < 0))
        assert floor[i].item() == pytest.approx(negative / math.sqrt(sum(v * v for v in shift[i].tolist())))
    # and no non-negative vector is closer to a~ than that
    features = torch.rand(50, 1000, 7, generator=g, dtype=torch.float64) * 3
    closest = (features - wanted[:, None]).norm(dim=2).min(1).values / shift.norm(dim=1)
    assert (closest >= floor - 1e-12).all()


def test_classifier_takes_uint8_or_unit_floats_and_normalises_itself(tiny_run, tmp_path):
    classifier = load_classifier(tiny_run / "checkpoint.pt")
    assert classifier.source == tiny_run == classifier.cache_dir and classifier.device == torch.device("cpu")
    images = load_split("fashion-mnist", False, limit=16).images                        # uint8 (16, 1, 28, 28)
    with torch.no_grad():
        x = classifier.preprocess(images.float() / 255)
        expected_features, expected_logits = classifier.model.features(x), classifier.model(x)
    features = classifier.features(images)
    assert features.shape == (16, classifier.feature_dim) and not features.requires_grad
    torch.testing.assert_close(features, expected_features)
    torch.testing.assert_close(classifier.features(images.float() / 255), expected_features)
    torch.testing.assert_close(classifier.logits(images), expected_logits)
    assert torch.equal(classifier.predict(images), expected_logits.argmax(1))
    with pytest.raises(IsdaVizError, match="takes 1×28×28 images, not 3×28×28"):
        classifier.features(images.expand(-1, 3, -1, -1))
    with pytest.raises(IsdaVizError, match="no classifier run at .* holds no checkpoint.pt"):
        load_classifier(tmp_path)
