"""The real on-disk layouts, synthetic content: torchvision's CIFAR-10/100 pickles and an ImageNet-style folder
tree, read by our loaders exactly as torchvision reads them, and the whole chain train -> train-gan -> augment ->
audit run on each through the command line. Also the paper's recipes."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from isda_viz.cli.main import main
from isda_viz.data.datasets import load_split
from isda_viz.errors import IsdaVizError
from isda_viz.training.recipes import apply_recipe
from isda_viz.data.synthetic import write_cifar10, write_cifar100, write_image_folders
from isda_viz.training.loop import TrainConfig, scheduled_lr


def _invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("name, writer", [("cifar10", write_cifar10), ("cifar100", write_cifar100)])
def test_cifar_files_read_as_torchvision_reads_them(tmp_path, monkeypatch, name, writer):
    import torchvision.datasets.cifar as tv

    writer(tmp_path, n_train=30, n_test=10)
    monkeypatch.setattr(tv, "check_integrity", lambda *a, **k: True)  # synthetic files: not the release's md5
    for train in (True, False):
        ours = load_split(name, train, tmp_path)
        theirs = (tv.CIFAR10 if name == "cifar10" else tv.CIFAR100)(str(tmp_path), train=train, download=False)
        assert torch.equal(ours.images, torch.from_numpy(theirs.data).permute(0, 3, 1, 2))
        assert ours.labels.tolist() == theirs.targets and ours.classes == theirs.classes


def test_cifar_pickle_with_foreign_code_is_refused(tmp_path):
    write_cifar10(tmp_path, n_train=10, n_test=5)
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("never runs",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(IsdaVizError, match="not a CIFAR python pickle"):
        load_split("cifar10", False, tmp_path)


def _query_image(dataset, root, path):
    x, _ = load_split(dataset, False, root)[0]
    Image.fromarray(x.permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.mark.parametrize("dataset, writer", [("cifar10", write_cifar10), ("cifar100", write_cifar100),
                                             ("folder", write_image_folders)])
def test_train_gan_augment_audit_chain(tmp_path, dataset, writer):
    root = writer(tmp_path / "data")
    run, gan, aug, audit = (tmp_path / d for d in ("run", "gan", "aug", "audit"))
    _invoke("train", "--dataset", dataset, "--data-root", root, "--arch", "resnet8", "--epochs", 1,
            "--batch-size", 12, "--out", run)
    _invoke("train-gan", "--dataset", dataset, "--data-root", root, "--iterations", 20, "--batch-size", 8,
            "--n-critic", 1, "--sample-every", 20, "--out", gan)
    image = _query_image(dataset, root, tmp_path / "query.png")
    _invoke("augment", "--image", image, "--classifier", run, "--generator", gan, "--iterations", 4,
            "--restarts", 1, "-k", 2, "--inverter", "search", "--out", aug)  # the chain
    _invoke("audit", "--from", aug, "--dataset", dataset, "--data-root", root, "--k", 3,
            "--index-dir", tmp_path / "index", "--out", audit)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    n_train = len(load_split(dataset, True, root))
    assert ckpt["estimator"]["count"].sum() == n_train
    assert len(ckpt["class_names"]) == {"cifar10": 10, "cifar100": 100, "folder": 3}[dataset]
    assert (gan / "generator.pt").is_file()
    report = json.loads((aug / "report.json").read_text())
    assert len(report["images"]) == 1 and len(report["images"][0]["augmented"]) == 2
    queries = json.loads((audit / "audit.json").read_text())["queries"]
    assert queries and all(len(q["neighbors"]) == 3 and 0 <= q["neighbors"][0]["index"] < n_train for q in queries)


def test_paper_recipes_and_explicit_options():
    wrn = apply_recipe(TrainConfig(out="x", dataset="cifar100", arch="wrn28_10", recipe="paper"))
    assert (wrn.epochs, wrn.lr, wrn.milestones, wrn.lr_decay, wrn.weight_decay, wrn.lambda0) == \
        (240, 0.1, [60, 120, 160, 200], 0.2, 5e-4, 0.5)
    r110 = apply_recipe(TrainConfig(out="x", dataset="cifar10", arch="resnet110", recipe="paper", epochs=3),
                        explicit={"epochs"})
    assert (r110.epochs, r110.milestones, r110.lr_decay, r110.nesterov) == (3, [80, 120], 0.1, True)
    r50 = apply_recipe(TrainConfig(out="x", dataset="imagenet", recipe="paper"))
    assert (r50.arch, r50.epochs, r50.batch_size, r50.lr, r50.schedule, r50.covariance, r50.lambda0,
            r50.nesterov) == ("resnet50", 300, 512, 0.2, "cosine", "diagonal", 7.5, False)
    with pytest.raises(IsdaVizError, match="no recipe"):
        apply_recipe(TrainConfig(out="x", dataset="fashion-mnist", arch="resnet32", recipe="paper"))
    # WRN: 0.1 until epoch 60, then x0.2 after each milestone
    assert scheduled_lr(wrn, 59.99 / 240) == 0.1
    assert scheduled_lr(wrn, 60 / 240) == pytest.approx(0.02)
    assert scheduled_lr(wrn, 200.5 / 240) == pytest.approx(0.1 * 0.2 ** 4)


def test_recipe_values_land_in_config_json(tmp_path):
    root = write_cifar10(tmp_path / "data", n_train=20, n_test=10)
    _invoke("train", "--dataset", "cifar10", "--data-root", root, "--arch", "resnet8", "--recipe", "paper",
            "--epochs", 1, "--batch-size", 10, "--out", tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["recipe"] == "paper" and config["milestones"] == [80, 120] and config["epochs"] == 1
    assert config["batch_size"] == 10 and config["weight_decay"] == 1e-4 and config["lambda0"] == 0.5
