"""`isda-viz train` on real Fashion-MNIST subsets: run directory contents, resume, errors."""

import json

import pytest
import torch
from click.testing import CliRunner

from isda_viz.cli.main import main
from isda_viz.classifiers.classifier import load_classifier
from isda_viz.training.loop import TrainConfig, fit

TINY = ["--arch", "resnet8", "--limit-train", "256", "--limit-test", "128", "--batch-size", "64"]


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_train_writes_a_complete_run_directory(tiny_run):
    ckpt = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["arch"] == "resnet8" and ckpt["config"]["loss"] == "isda"
    assert ckpt["class_names"][0] == "T-shirt/top" and len(ckpt["class_names"]) == 10
    assert ckpt["input"] == {"channels": 1, "size": 28}
    est = ckpt["estimator"]
    assert est["count"].sum() == 1024 and est["m2"].shape == (10, 64, 64)  # every training feature seen once
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and 0 <= metrics[0]["test_accuracy"] <= 1 and metrics[0]["seconds"] > 0
    assert json.loads((tiny_run / "config.json").read_text())["dataset"] == "fashion-mnist"
    clf = load_classifier(tiny_run)
    images = torch.rand(3, 1, 28, 28)
    assert clf.model.features(clf.preprocess(images)).shape == (3, 64)
    assert not clf.model.training and clf.estimator.covariance.shape == (10, 64, 64)


def test_training_learns_on_real_data(tiny_run):
    # 1024 images, one epoch: far above the 10% of chance on the test subset.
    assert json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[-1])["test_accuracy"] > 0.4


class _Killed(Exception):
    pass


def test_resume_after_a_kill_ends_identical_to_an_uninterrupted_run(tmp_path):
    cfg = dict(arch="resnet8", epochs=2, limit_train=192, limit_test=64, batch_size=64, seed=3)
    fit(TrainConfig(out=str(tmp_path / "straight"), **cfg), progress=False, log=lambda *a: None)

    def kill_after_first_epoch(message):
        if message.startswith("epoch 1/"):
            raise _Killed

    with pytest.raises(_Killed):
        fit(TrainConfig(out=str(tmp_path / "resumed"), **cfg), progress=False, log=kill_after_first_epoch)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    result = _invoke("train", *TINY[:2], "--limit-train", 192, "--limit-test", 64, "--batch-size", 64, "--seed", 3,
                     "--epochs", 2, "--out", tmp_path / "resumed", "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["estimator"]["m2"], b["estimator"]["m2"])
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 2


def test_same_seed_same_weights(tmp_path):
    for name in ("a", "b"):
        assert _invoke("train", *TINY, "--epochs", 1, "--out", tmp_path / name).exit_code == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ce_run_has_no_estimator(tmp_path):
    assert _invoke("train", *TINY, "--loss", "ce", "--epochs", 1, "--out", tmp_path / "ce").exit_code == 0
    assert torch.load(tmp_path / "ce" / "checkpoint.pt", weights_only=True)["estimator"] is None


def _one_line_error(result):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output
    return lines[0]


def test_errors_are_one_line(tiny_run, tmp_path):
    assert "already holds a run" in _one_line_error(_invoke("train", *TINY, "--out", tiny_run))
    assert "arch=resnet8, not resnet20" in _one_line_error(
        _invoke("train", "--arch", "resnet20", "--limit-train", 64, "--out", tiny_run, "--resume"))
    assert "'nope' is not one of" in _one_line_error(_invoke("train", "--dataset", "nope", "--out", tmp_path / "x"))
    assert "'vgg' is not one of" in _one_line_error(_invoke("train", "--arch", "vgg", "--out", tmp_path / "x"))
    missing = _one_line_error(_invoke("train", "--data-root", tmp_path / "nowhere", "--out", tmp_path / "x"))
    assert "does not exist" in missing
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README").write_text("not data")
    assert "could not be downloaded" in _one_line_error(
        _invoke("train", "--dataset", "cifar10", "--data-root", empty, "--out", tmp_path / "y"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert "corrupt" in _one_line_error(_invoke("train", *TINY, "--out", corrupt, "--resume"))
