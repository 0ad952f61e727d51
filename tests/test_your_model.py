"""Classifiers users already have, end to end: a checkpoint of the public ISDA CIFAR code, torchvision weights with
class statistics computed on demand (and cached), and a 1000-class classifier driving a BigGAN.

Every file is written in its real format with random weights: the public checkpoint by the writer of
tests/test_foreign_checkpoints.py, torchvision weights as a plain state dict, BigGAN in
pytorch-pretrained-biggan's folder format (the tiny config of tests/test_generators.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from test_foreign_checkpoints import _public_checkpoint, _public_isda_module, _randomize_batchnorm, _save
from test_foreign_checkpoints import _torchvision_features
from test_generators import tiny_biggan

import isda_viz.classifiers.classifier as classifier_module
import isda_viz.classifiers.statistics as statistics_module
import isda_viz.inversion.pipelines as visualize_module
from isda_viz.classifiers.statistics import class_statistics
from isda_viz.classifiers.classifier import load_classifier
from isda_viz.cli.main import main
from isda_viz.data.images import eval_transform, load_image_file, normalize
from isda_viz.errors import IsdaVizError
from isda_viz.generators.biggan import BigGANGenerator
from isda_viz.generators.biggan_weights import save_biggan
from isda_viz.generators.wgan import WGANGenerator, recompute_batchnorm_statistics, save_generator


@pytest.fixture(autouse=True)
def classifier_cache(tmp_path, monkeypatch):
    """Caches of weights files go to a fresh folder per test, never to the user's."""
    folder = tmp_path / "cache"
    monkeypatch.setattr(classifier_module, "CLASSIFIER_CACHE", folder)
    return folder


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error_line(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def _one_line(excinfo) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def _random_png(path, size, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


# ---------------------------------------------------------------- a checkpoint of the public ISDA CIFAR code

@pytest.fixture(scope="module")
def public_file(tmp_path_factory):
    """`checkpoint.pth.tar` as the public CIFAR train.py writes it (resnet32, CIFAR-10), and what wrote it."""
    folder = tmp_path_factory.mktemp("public")
    ckpt, net, full_layer, criterion = _public_checkpoint("resnet32", 10)
    path = folder / "checkpoint.pth.tar"
    with _public_isda_module():
        _save(ckpt, path, zip_format=True)
    return path, net, full_layer, criterion


def test_public_checkpoint_through_load_classifier(public_file, classifier_cache, tmp_path):
    path, net, full_layer, criterion = public_file
    clf = load_classifier(path, arch="resnet32")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (clf.source, clf.fingerprint, clf.cache_dir) == (path, sha, classifier_cache / sha)
    assert (clf.class_names[0], clf.dataset, clf.channels, clf.image_size) == ("airplane", "cifar10", 3, 32)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = normalize(images.float() / 255, clf.mean, clf.std)
        torch.testing.assert_close(clf.features(images), net(x))
        assert torch.equal(clf.predict(images), full_layer(net(x)).argmax(1))
    stored = criterion.estimator
    statistics = class_statistics(clf, classes=[3])  # its own: no data needed
    assert statistics.estimator is clf.estimator and statistics.classes == list(range(10))
    torch.testing.assert_close(statistics.covariance(3), stored.CoVariance[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clf.estimator.mean, stored.Ave)

    with pytest.raises(IsdaVizError) as e:
        load_classifier(path)
    assert "--classifier-arch" in _one_line(e)
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch="resnet99x")
    assert "unknown --classifier-arch" in _one_line(e)
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch="resnet110")
    assert "looks like resnet32" in _one_line(e)
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch="torchvision:resnet18")
    assert "public ISDA CIFAR code" in _one_line(e) and "resnet32" in str(e.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(IsdaVizError) as e:
        load_classifier(garbage, arch="resnet32")
    assert "not a torch checkpoint" in _one_line(e)


def test_augment_with_a_public_checkpoint(public_file, tmp_path, monkeypatch):
    path, _, _, criterion = public_file
    torch.manual_seed(0)
    gan = WGANGenerator(latent_dim=16, num_classes=10, channels=3, image_size=32, width=8)
    recompute_batchnorm_statistics(gan, 2, 32, torch.Generator().manual_seed(0))
    save_generator(gan, tmp_path / "gan" / "generator.pt", iteration=0, dataset="cifar10")
    image = _random_png(tmp_path / "photo.png", 40, seed=1)
    used = []

    def spy(features, slots, estimator, *args):
        used.append((slots, estimator))
        return sample_augmented_features(features, slots, estimator, *args)

    sample_augmented_features = visualize_module.sample_augmented_features
    monkeypatch.setattr(visualize_module, "sample_augmented_features", spy)
    out = tmp_path / "out"
    result = _invoke("augment", "--image", image, "--classifier", path, "--classifier-arch", "resnet32",
                     "--generator", tmp_path / "gan", "--iterations", 5, "--restarts", 1, "-k", 2, "--inverter", "search",
                     "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    entry = report["images"][0]
    expected = int(load_classifier(path, arch="resnet32").predict(load_image_file(image, 3, 32)[None])[0])
    assert entry["predicted"] == entry["label"] == expected
    assert [a["predicted"] for a in entry["augmented"]] and report["settings"]["classifier"] == str(path)
    assert all((out / a["file"]).is_file() for a in entry["augmented"]) and (out / "grid.png").is_file()
    (slots, estimator), = used
    covariance = estimator.covariance[slots[0]]
    torch.testing.assert_close(covariance, criterion.estimator.CoVariance[expected], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- torchvision weights, statistics on demand

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """`train/` of 3 classes × 4 random 64 px images, `val/` of one image per class."""
    root = tmp_path_factory.mktemp("folder")
    for split, count in (("train", 4), ("val", 1)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                _random_png(root / split / name / f"{i}.png", 64, seed=100 * c + i + (50 if split == "val" else 0))
    return root


def _resnet18(num_classes, seed=0):
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    _randomize_batchnorm(net, torch.Generator().manual_seed(seed + 1))
    return net.eval()


@pytest.fixture()
def resnet18_file(tmp_path):
    net = _resnet18(len(CLASSES))
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path, net


def _brute_force(net, root, c):
    """float64 mean `(A,)` and population covariance `(A, A)` of class c's training images, one image at a time."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    rows = []
    for f in sorted((root / "train" / CLASSES[c]).iterdir()):
        x = eval_transform(224)(Image.open(f).convert("RGB"))[None].float() / 255
        with torch.no_grad():
            rows.append(_torchvision_features(net, normalize(x, mean, std)).double()[0])
    rows = torch.stack(rows)
    centred = rows - rows.mean(0)
    return rows.mean(0), centred.T @ centred / len(rows)


def test_statistics_pass_matches_brute_force_and_is_cached(resnet18_file, image_folder, tmp_path, monkeypatch):
    path, net = resnet18_file
    image_folder = Path(shutil.copytree(image_folder, tmp_path / "data"))  # this test changes an image
    passes = []
    real_pass = statistics_module._statistics_pass
    monkeypatch.setattr(statistics_module, "_statistics_pass", lambda *a, **k: passes.append(a[2]) or real_pass(*a, **k))

    clf = load_classifier(path, arch="torchvision:resnet18", data_root=image_folder)
    assert (clf.class_names, clf.dataset, clf.image_size, clf.feature_dim) == (CLASSES, "folder", 224, 512)
    statistics = class_statistics(clf, classes=[2, 0], progress=False)
    assert passes == [[0, 2]] and statistics.classes == [0, 2]
    assert statistics.estimator.count.tolist() == [4.0, 4.0]  # class 1's images were never read
    for c in (0, 2):
        mean, covariance = _brute_force(net, image_folder, c)
        slot = statistics.slots(torch.tensor([c]))[0]
        np.testing.assert_allclose(statistics.estimator.mean[slot].numpy(), mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(statistics.covariance(c).numpy(), covariance.numpy(), rtol=1e-4,
                                   atol=1e-6 * covariance.abs().max().item())
    assert statistics.covariance(0).abs().max() > 0

    again = class_statistics(load_classifier(path, arch="torchvision:resnet18", data_root=image_folder),
                             classes=[2], progress=False)                    # a subset of what is cached
    assert passes == [[0, 2]] and torch.equal(again.covariance(2), statistics.covariance(2))
    class_statistics(clf, classes=[1], progress=False)                          # not cached yet
    diagonal = class_statistics(clf, classes=[0], covariance="diagonal", progress=False)
    assert passes == [[0, 2], [1], [0]]
    torch.testing.assert_close(diagonal.covariance(0), statistics.covariance(0).diagonal())

    _random_png(image_folder / "train" / "ant" / "3.png", 64, seed=999)      # other images of class 0
    class_statistics(clf, classes=[0, 2], progress=False)
    assert passes[-1] == [0, 2]

    net.conv1.weight.data.mul_(1.5)                                            # other weights, same path
    torch.save(net.state_dict(), path)
    changed = load_classifier(path, arch="torchvision:resnet18", data_root=image_folder)
    assert changed.fingerprint != clf.fingerprint and changed.cache_dir != clf.cache_dir
    recomputed = class_statistics(changed, classes=[2], progress=False)
    assert passes[-1] == [2] and len(passes) == 5
    assert not torch.allclose(recomputed.covariance(2), statistics.covariance(2))


def test_torchvision_class_names_and_errors(resnet18_file, image_folder, tmp_path):
    path, _ = resnet18_file
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["x", "y", "z"]))
    assert load_classifier(path, arch="torchvision:resnet18", class_names=names).class_names == ["x", "y", "z"]
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch="torchvision:resnet18")
    assert "--class-names" in _one_line(e)
    names.write_text("a\nb\n")
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch="torchvision:resnet18", class_names=names)
    assert "names 2 classes" in _one_line(e)
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    clf = load_classifier(path, arch="torchvision:resnet18", class_names=three)    # no --data-root: no statistics
    with pytest.raises(IsdaVizError) as e:
        class_statistics(clf, classes=[0])
    assert "--data-root" in _one_line(e)
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch="resnet32")
    assert "not a checkpoint of the public ISDA" in _one_line(e)
    notes = []
    big = tmp_path / "big.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=1000).state_dict(), big)
    assert load_classifier(big, arch="torchvision:resnet18", log=notes.append).class_names[:3] == ["0", "1", "2"]
    assert len(notes) == 1 and "0-999" in notes[0]


def test_audit_in_feature_space_of_a_torchvision_classifier(resnet18_file, image_folder, tmp_path):
    path, _ = resnet18_file
    # training image bee/1.png (image 5 in ImageFolder order) as the index sees it: cropped to 224 px
    query = tmp_path / "query.png"
    Image.fromarray(eval_transform(224)(Image.open(image_folder / "train" / "bee" / "1.png")).permute(1, 2, 0)
                    .numpy()).save(query)
    out = tmp_path / "audit"
    result = _invoke("audit", "--images", query, "--dataset", "folder", "--data-root", image_folder, "--k", 2,
                     "--space", "feature", "--classifier", path, "--classifier-arch", "torchvision:resnet18",
                     "--index-dir", tmp_path / "index", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "audit.json").read_text())
    nearest = report["queries"][0]["neighbors"][0]
    assert (nearest["index"], report["class_names"][nearest["label"]]) == (5, "bee")
    assert nearest["distance"] < 1e-5 < report["queries"][0]["neighbors"][1]["distance"]


# ---------------------------------------------------------------- ImageNet-sized: 1000 classes and a BigGAN

@pytest.fixture(scope="module")
def imagenet_setup(tmp_path_factory):
    """A random 1000-class resnet18, its class names, a data root with images of one class, BigGANs."""
    root = tmp_path_factory.mktemp("imagenet")
    weights = root / "resnet18-1000.pth"
    torch.save(_resnet18(1000, seed=3).state_dict(), weights)
    names = root / "classes.txt"
    names.write_text("".join(f"class{i:04d}\n" for i in range(1000)))
    for i in range(2):
        (root / "data" / "train" / "class0005").mkdir(parents=True, exist_ok=True)
        _random_png(root / "data" / "train" / "class0005" / f"{i}.png", 64, seed=7 + i)
    save_biggan(tiny_biggan(num_classes=1000), root / "biggan-1000")
    save_biggan(tiny_biggan(num_classes=10), root / "biggan-10")
    image = _random_png(root / "photo.png", 96, seed=11)
    return root, weights, names, image


def _conditioning(monkeypatch):
    """The class labels BigGAN is asked for, and the sizes it draws."""
    seen = []
    generate = BigGANGenerator.generate

    def recording(self, z, y=None):
        images = generate(self, z, y)
        seen.append((set(y.tolist()), images.shape[-1]))
        return images

    monkeypatch.setattr(BigGANGenerator, "generate", recording)
    return seen


def test_imagenet_classifier_with_biggan_end_to_end(imagenet_setup, tmp_path, monkeypatch):
    root, weights, names, image = imagenet_setup
    seen = _conditioning(monkeypatch)
    common = ["--inverter", "search", "--image", image, "--label", "class0005", "--classifier", weights, "--classifier-arch",
              "torchvision:resnet18", "--class-names", names, "--data-root", root / "data", "--truncation", 0.4,
              "--iterations", 2, "--restarts", 1, "-k", 1]
    out = tmp_path / "out"
    result = _invoke("augment", *common, "--generator", root / "biggan-1000", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    entry = report["images"][0]
    assert (entry["label"], entry["label_name"]) == (5, "class0005") and isinstance(entry["predicted"], int)
    assert Image.open(out / entry["augmented"][0]["file"]).size == (224, 224)     # 128 → 224 by the adapter
    assert seen and all(labels == {5} and size == 128 for labels, size in seen)  # conditioned on its class

    message = _error_line(_invoke("augment", *common, "--generator", root / "biggan-10", "--out", tmp_path / "x"))
    assert "has 10 classes" in message and "--class-map" in message and not (tmp_path / "x").exists()

    class_map = tmp_path / "map.tsv"
    class_map.write_text("# classifier class\tgenerator class\nclass0005\t3\n")
    seen.clear()
    result = _invoke("augment", *common, "--generator", root / "biggan-10", "--class-map", class_map,
                     "--out", tmp_path / "mapped")
    assert result.exit_code == 0, result.output
    assert seen and all(labels == {3} for labels, _ in seen)
    assert json.loads((tmp_path / "mapped" / "report.json").read_text())["images"][0]["label"] == 5
    json_map = tmp_path / "map.json"
    json_map.write_text(json.dumps({"class0007": 3}))
    message = _error_line(_invoke("augment", *common, "--generator", root / "biggan-10", "--class-map", json_map,
                                  "--out", tmp_path / "y"))
    assert "no generator class for class 5" in message
