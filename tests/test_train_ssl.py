"""`fit` beyond supervised ISDA: semi-supervised runs (Eq. 19), `--track-bound` (Fig. 9), explicit SDA (Eq. 5).

Tiny ResNet-8 runs on real Fashion-MNIST subsets: 256 training images, of which 64 labeled; global
batches of 16 labeled + 48 unlabeled images, so one epoch (4 steps over the 192 unlabeled images) uses
every labeled image exactly once.
"""

import csv
import datetime
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner

from isda_viz.training import loop as train
from isda_viz.cli.main import main
from isda_viz.data.datasets import TensorImages, load_split
from isda_viz.data.batches import labeled_subset
from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.classifiers.networks import build_model
from isda_viz.outputs.plot import plot_runs
from isda_viz.data.synthetic import write_cifar10
from isda_viz.training.loop import TrainConfig, bound_tightness, fit
from test_ddp import _float64  # float64 training: two ranks and one process then agree to rounding

SSL = dict(arch="resnet8", limit_train=256, limit_test=64, batch_size=64, labeled=64, labeled_batch=16)


def _quiet(*_args, **_kwargs):
    pass


def _fit(out, **options):
    return fit(TrainConfig(out=str(out), **{**SSL, **options}), progress=False, log=_quiet)


def _ckpt(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_labeled_subset_is_recorded_class_balanced_and_seeded(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _fit(tmp_path / name, seed=seed, epochs=1)
    a, b, c = (_ckpt(tmp_path / name)["labeled_indices"] for name in "abc")
    labels = load_split("fashion-mnist", True, limit=256).labels
    assert torch.equal(a, b) and not torch.equal(a, c)  # same seed, same labels kept
    assert torch.bincount(labels[a], minlength=10).tolist() == [7, 7, 7, 7, 6, 6, 6, 6, 6, 6]
    assert torch.equal(a, labeled_subset(labels, 64, 0, 10)[0])
    assert json.loads((tmp_path / "a" / "config.json").read_text())["labeled"] == 64
    record = _metrics(tmp_path / "a")[0]
    assert {"train_supervised_loss", "train_unlabeled_isda_loss"} <= set(record)  # the terms of Eq. 19


def test_unlabeled_images_never_reach_the_covariance_estimator(tmp_path, monkeypatch):
    """The labels of the unlabeled images are scrambled in a second run: if any unlabeled feature entered Sigma
    (under its true label or a pseudo label), the statistics would change. The split itself is pinned to the one
    of the true labels, as the scrambled labels would otherwise change which images are kept."""
    true = load_split("fashion-mnist", True, limit=256)
    labeled, unlabeled = labeled_subset(true.labels, 64, 0, 10)
    monkeypatch.setattr(train, "labeled_subset", lambda *a, **k: (labeled, unlabeled))
    scrambled_labels = true.labels.clone()
    scrambled_labels[unlabeled] = torch.randint(0, 10, (len(unlabeled),), generator=torch.Generator().manual_seed(9))
    assert (scrambled_labels[unlabeled] != true.labels[unlabeled]).sum() > 100
    options = dict(epochs=1, ssl="mean-teacher", eta1=1.0, lambda0=5.0)
    _fit(tmp_path / "true", **options)
    monkeypatch.setattr(train, "load_split", lambda name, is_train, *a, **k: (
        TensorImages(true.images, scrambled_labels, true.classes) if is_train else load_split(name, False, *a, **k)))
    _fit(tmp_path / "scrambled", **options)
    a, b = _ckpt(tmp_path / "true"), _ckpt(tmp_path / "scrambled")
    for key in ("m2", "mean64", "count"):
        assert torch.equal(a["estimator"][key], b["estimator"][key]), key
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # unlabeled labels are never read
    # One epoch draws every labeled image once: the counts are the labeled images' classes, nothing more.
    assert a["estimator"]["count"].tolist() == torch.bincount(true.labels[labeled], minlength=10).double().tolist()


class _Killed(Exception):
    pass


def test_semi_supervised_run_resumes_bit_identically(tmp_path):
    options = dict(epochs=2, ssl="mean-teacher", seed=4)
    _fit(tmp_path / "straight", **options)

    def kill_after_first_epoch(message):
        if message.startswith("epoch 1/"):
            raise _Killed

    with pytest.raises(_Killed):
        fit(TrainConfig(out=str(tmp_path / "resumed"), **{**SSL, **options}), progress=False,
            log=kill_after_first_epoch)
    result = _invoke("train", "--arch", "resnet8", "--limit-train", 256, "--limit-test", 64, "--batch-size", 64,
                     "--labeled", 64, "--labeled-batch", 16, "--ssl", "mean-teacher", "--seed", 4, "--epochs", 2,
                     "--out", tmp_path / "resumed", "--resume")
    assert result.exit_code == 0, result.output
    a, b = _ckpt(tmp_path / "straight"), _ckpt(tmp_path / "resumed")
    for part in ("model", "teacher", "estimator"):
        for key, value in a[part].items():
            assert (torch.equal(value, b[part][key]) if torch.is_tensor(value) else value == b[part][key]), (part, key)
    assert not torch.equal(a["teacher"]["fc.weight"], a["model"]["fc.weight"])  # a moving average, not a copy
    for x, y in zip(_metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed"), strict=True):
        assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}


@pytest.fixture(scope="module")
def bound_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bound") / "isda"
    fit(TrainConfig(out=str(out), arch="resnet8", epochs=2, limit_train=256, limit_test=64, batch_size=64,
                    lambda0=2.0, track_bound=True, bound_samples=400, bound_subset=96), progress=False, log=_quiet)
    return out


def test_tracked_bound_is_above_the_monte_carlo_estimate_and_is_the_checkpoints_own(bound_run):
    metrics = _metrics(bound_run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["expected_ce_mc_stderr"] > 0 and m["lambda"] > 0
        assert m["bound"] >= m["expected_ce_mc"] - 3 * m["expected_ce_mc_stderr"], m
    # The last line is recomputed from the checkpoint: the same 96 images, lambda, Sigma and draws.
    ckpt = _ckpt(bound_run)
    model = build_model("resnet8", 10, 1)
    model.load_state_dict(ckpt["model"])
    estimator = CovarianceEstimator.from_state_dict(ckpt["estimator"])
    train_set = load_split("fashion-mnist", True, limit=256)
    chosen = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:96].sort().values
    x = train.normalize(train_set.images[chosen].float() / 255, [0.2860], [0.3530])
    again = bound_tightness(model, x, train_set.labels[chosen], estimator, metrics[-1]["lambda"], 400,
                            torch.Generator().manual_seed(1))
    for key, value in again.items():
        assert value == pytest.approx(metrics[-1][key], rel=1e-5), key


def test_plot_draws_the_bound_panel_from_a_tracked_run(bound_run, tmp_path):
    from PIL import Image

    paths = plot_runs([bound_run], tmp_path / "fig.png", progress=False)
    assert Image.open(paths["png"]).width >= 1200  # three panels: accuracy, loss, bound vs Monte-Carlo
    with open(paths["csv"]) as f:
        rows = [(int(r["epoch"]), r["metric"], float(r["value"])) for r in csv.DictReader(f)]
    for m in _metrics(bound_run):
        for key in ("bound", "expected_ce_mc", "expected_ce_mc_stderr"):
            assert (m["epoch"], key, m[key]) in rows


def test_explicit_sda_trains_with_the_online_estimator(tmp_path):
    common = dict(arch="resnet8", epochs=1, limit_train=128, limit_test=64, batch_size=32, lambda0=5.0)
    fit(TrainConfig(out=str(tmp_path / "explicit"), loss="explicit", samples=4, **common), progress=False, log=_quiet)
    fit(TrainConfig(out=str(tmp_path / "isda"), **common), progress=False, log=_quiet)
    record = _metrics(tmp_path / "explicit")[0]
    assert 0 < record["train_loss"] < 10 and 0 <= record["test_accuracy"] <= 1 and record["lambda"] == 5.0
    ckpt, isda = _ckpt(tmp_path / "explicit"), _ckpt(tmp_path / "isda")
    assert ckpt["config"]["loss"] == "explicit" and ckpt["config"]["samples"] == 4
    assert ckpt["estimator"]["count"].sum() == 128
    assert not torch.equal(ckpt["model"]["fc.weight"], isda["model"]["fc.weight"])  # another loss was minimised
    # The first step (lambda = 0) is cross-entropy for both: the same features enter the estimator first.
    assert torch.equal(ckpt["estimator"]["count"], isda["estimator"]["count"])


def test_bad_semi_supervised_options_are_one_line_errors(tmp_path):
    tiny = ["train", "--arch", "resnet8", "--limit-train", 64, "--batch-size", 32, "--epochs", 1]
    cases = [(["--ssl", "pi"], "--ssl pi is semi-supervised: give --labeled N"),
             (["--loss", "ce", "--track-bound"], "--track-bound compares the ISDA loss"),
             (["--labeled", 20, "--labeled-batch", 32], "--labeled-batch must be between 1 and"),
             (["--labeled", 5], "--labeled must be between 10 (one per class)")]
    for extra, message in cases:
        result = _invoke(*tiny, *extra, "--out", tmp_path / "x")
        assert result.exit_code == 1 and result.output.startswith(f"Error: {message}"), result.output
        assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ two gloo ranks

RUN = dict(dataset="cifar10", arch="resnet8", limit_test=20, batch_size=20, labeled=20, labeled_batch=8,
           ssl="mean-teacher", eta1=1.0, seed=5, lr=0.05, lambda0=2.0, sync_bn=True, epochs=2,
           device="cpu")  # gloo: the CPU, on a GPU machine too


def _worker(rank, world, port, root, data):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        with _float64():
            fit(TrainConfig(out=f"{root}/ddp", data_root=data, **RUN), progress=False, log=_quiet)
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_in_a_semi_supervised_run(tmp_path):
    data = str(write_cifar10(tmp_path / "data", n_train=60, n_test=20))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path), data), nprocs=2, join=True)
    with _float64():
        fit(TrainConfig(out=str(tmp_path / "single"), data_root=data, **RUN), progress=False, log=_quiet)
    ddp, single = _ckpt(tmp_path / "ddp"), _ckpt(tmp_path / "single")
    # 40 unlabeled images in batches of 12 (shards 6/6, last 2/2), 8 labeled per batch (4/4) for 4 steps
    for part in ("model", "teacher"):
        for key, value in single[part].items():
            torch.testing.assert_close(ddp[part][key], value, rtol=1e-10, atol=1e-10, msg=f"{part} {key}")
    for key in ("m2", "mean64", "count"):
        torch.testing.assert_close(ddp["estimator"][key], single["estimator"][key], rtol=1e-10, atol=1e-10)
    assert ddp["estimator"]["count"].sum() == 2 * 4 * 8  # labeled features of the global batches, once each
