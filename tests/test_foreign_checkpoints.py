"""Checkpoints written elsewhere: the public ISDA CIFAR code's format, torchvision weights, and refusals.

The public checkpoint is written here exactly as its `train.py` writes it: the
feature network and `Full_layer` under `nn.DataParallel` (keys `module.*`), the
whole loss object pickled as `ISDA.ISDALoss` holding an `ISDA.EstimatorCV`, an
SGD state, tensors tagged as saved on CUDA, in torch's zip and legacy formats.
The fake `ISDA` module exists only while saving, as on a machine without the
public code.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import types

import pytest
import torch
import torch.nn as nn

from isda_viz.errors import IsdaVizError
from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.classifiers.foreign import read_public_isda_checkpoint
from isda_viz.classifiers.public import PUBLIC_CIFAR_MEAN, build_public_network
from isda_viz.classifiers.torchvision_models import load_torchvision_classifier
from isda_viz.classifiers.safe_load import PickledEstimatorCV, PickledISDALoss, load_torch_file

FORMATS = {"zip": True, "legacy": False}  # value: _use_new_zipfile_serialization


# ---------------------------------------------------------------- the public code's objects, as pickled

class EstimatorCV:
    """Stand-in for the public `ISDA.EstimatorCV`: per-class statistics, a plain object."""

    def __init__(self, feature_num, class_num, generator):
        a = torch.randn(class_num, feature_num, feature_num, generator=generator)
        self.class_num = class_num
        self.CoVariance = a @ a.transpose(1, 2) / feature_num
        self.Ave = torch.randn(class_num, feature_num, generator=generator)
        self.Amount = torch.randint(1, 500, (class_num,), generator=generator).float()


class ISDALoss(nn.Module):
    """Stand-in for the public `ISDA.ISDALoss`: an nn.Module holding the estimator and a CE loss."""

    def __init__(self, feature_num, class_num, generator):
        super().__init__()
        self.estimator = EstimatorCV(feature_num, class_num, generator)
        self.class_num = class_num
        self.cross_entropy = nn.CrossEntropyLoss()


EstimatorCV.__module__ = ISDALoss.__module__ = "ISDA"


@contextlib.contextmanager
def _public_isda_module():
    """`import ISDA` works (and torch's legacy writer finds the classes' source) only inside."""
    module = types.ModuleType("ISDA")
    module.__file__ = __file__
    module.ISDALoss, module.EstimatorCV = ISDALoss, EstimatorCV
    sys.modules["ISDA"] = module
    try:
        yield
    finally:
        del sys.modules["ISDA"]


_tag_as_cuda = False


def _cuda_tagger(storage):
    return "cuda:0" if _tag_as_cuda else None


# Storages written while `_tag_as_cuda` is set are recorded as living on cuda:0, as the public code's are.
torch.serialization.register_package(0, _cuda_tagger, lambda storage, location: None)


def _save(obj, path, zip_format: bool) -> None:
    global _tag_as_cuda
    _tag_as_cuda = True
    try:
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    finally:
        _tag_as_cuda = False


def _randomize_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Eval-mode BatchNorm that is not the identity, so a wrong layer order would show."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
            m.weight.data.copy_(0.5 + torch.rand(m.weight.shape, generator=generator))
            m.bias.data.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))


def _public_checkpoint(arch: str, num_classes: int, extra=None):
    """`(checkpoint dict as the public train.py saves it, feature net, Full_layer, loss object)`."""
    g = torch.Generator().manual_seed(0)
    net, full_layer = build_public_network(arch, num_classes)
    _randomize_batchnorm(net, g)
    model, fc = nn.DataParallel(net), nn.DataParallel(full_layer)
    criterion = ISDALoss(net.feature_num, num_classes, g)
    optimizer = torch.optim.SGD([{"params": net.parameters()}, {"params": full_layer.parameters()}],
                                lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for group in optimizer.param_groups:  # momentum buffers, as after a real epoch
        for p in group["params"]:
            optimizer.state[p] = {"momentum_buffer": torch.randn(p.shape, generator=g)}
    ckpt = {"epoch": 3, "state_dict": model.state_dict(), "fc": fc.state_dict(), "best_acc": 91.5,
            "optimizer": optimizer.state_dict(), "isda_criterion": criterion, "val_acc": [80.25, 91.5, 90.0]}
    ckpt.update(extra or {})
    return ckpt, net.eval(), full_layer.eval(), criterion


@pytest.fixture(scope="module")
def public_files(tmp_path_factory):
    """resnet32 / CIFAR-10 checkpoints in both formats, and the objects that wrote them."""
    folder = tmp_path_factory.mktemp("public")
    ckpt, net, full_layer, criterion = _public_checkpoint("resnet32", 10)
    assert all(k.startswith("module.") for k in ckpt["state_dict"]) and "module.fc.weight" in ckpt["fc"]
    paths = {}
    with _public_isda_module():
        for name, zip_format in FORMATS.items():
            paths[name] = folder / f"{name}.pth.tar"
            _save(ckpt, paths[name], zip_format)
    assert "ISDA" not in sys.modules
    return paths, net, full_layer, criterion


# ---------------------------------------------------------------- public ISDA checkpoints

@pytest.mark.parametrize("fmt", FORMATS)
def test_public_checkpoint_loads_strictly_with_the_same_predictions_and_statistics(public_files, fmt):
    paths, net, full_layer, criterion = public_files
    raw = paths[fmt].read_bytes()
    assert b"cuda:0" in raw and b"ISDALoss" in raw  # saved "on CUDA", with the loss object pickled whole
    if fmt == "legacy":
        assert b"class ISDALoss" in raw  # the legacy writer stored the module's source, checked on load
    with pytest.raises(pickle.UnpicklingError):
        torch.load(paths[fmt], map_location="cpu", weights_only=True)  # why an allow-list is needed at all

    ck = read_public_isda_checkpoint(paths[fmt], "resnet32")

    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = full_layer(net(x))
        assert torch.equal(ck.model(x), expected)
        assert torch.equal(ck.model.features(x), net(x))
        assert torch.equal(ck.model.fc(ck.model.features(x)), expected)
    assert not ck.model.training and ck.model.feature_dim == 64 and ck.model.fc.out_features == 10
    est = criterion.estimator
    assert ck.class_covariance.dtype == torch.float64 and ck.class_covariance.device.type == "cpu"
    assert torch.equal(ck.class_covariance, est.CoVariance.double())
    assert torch.equal(ck.class_mean, est.Ave.double())
    assert torch.equal(ck.class_count, est.Amount.double())
    assert (ck.num_classes, ck.dataset, ck.class_names[0], ck.image_size) == (10, "cifar10", "airplane", 32)
    assert ck.mean == PUBLIC_CIFAR_MEAN and (ck.epoch, ck.best_acc) == (3, 91.5)
    # The statistics drop into isda-viz's own estimator unchanged.
    ours = CovarianceEstimator.from_state_dict(ck.estimator_state())
    torch.testing.assert_close(ours.covariance, est.CoVariance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.mean, est.Ave)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pickled_loss_object_becomes_an_inert_attribute_bag(public_files, fmt):
    ckpt = load_torch_file(public_files[0][fmt])
    crit = ckpt["isda_criterion"]
    assert type(crit) is PickledISDALoss and type(crit.estimator) is PickledEstimatorCV
    assert crit.class_num == 10 and not callable(crit) and "ISDA" not in sys.modules
    assert ckpt["optimizer"]["param_groups"][0]["nesterov"] is True
    assert all(v["momentum_buffer"].device.type == "cpu" for v in ckpt["optimizer"]["state"].values())


def test_wide_resnet_checkpoint_for_cifar100(tmp_path):
    ckpt, net, full_layer, _ = _public_checkpoint("wrn10_2", 100)
    path = tmp_path / "model_best.pth.tar"
    with _public_isda_module():
        _save(ckpt, path, zip_format=False)
    ck = read_public_isda_checkpoint(path, "wrn10_2", num_classes=100)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ck.model(x), full_layer(net(x)))
    assert (ck.dataset, ck.class_names[-1], ck.model.feature_dim) == ("cifar100", "worm", 128)
    assert ck.class_covariance.shape == (100, 128, 128)


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_file_is_a_one_line_error(public_files, fmt, tmp_path):
    raw = public_files[0][fmt].read_bytes()
    for keep in (0.3, 0.97):
        cut = tmp_path / f"cut{keep}.pth.tar"
        cut.write_bytes(raw[: int(len(raw) * keep)])
        with pytest.raises(IsdaVizError) as e:
            read_public_isda_checkpoint(cut, "resnet32")
        assert "truncated" in _one_line_error(e) and str(cut) in str(e.value)


def test_mismatched_architecture_is_a_one_line_error_naming_the_likely_one(public_files, tmp_path):
    with pytest.raises(IsdaVizError) as e:
        read_public_isda_checkpoint(public_files[0]["zip"], "resnet110")
    message = _one_line_error(e)
    assert "missing" in message and "looks like resnet32" in message
    with pytest.raises(IsdaVizError) as e:
        read_public_isda_checkpoint(public_files[0]["zip"], "wrn10_1")
    assert "looks like resnet32" in _one_line_error(e)
    with pytest.raises(IsdaVizError) as e:
        read_public_isda_checkpoint(public_files[0]["zip"], "resnet32", num_classes=100)
    assert "10 classes" in _one_line_error(e)
    plain = tmp_path / "plain.pt"
    torch.save(build_public_network("resnet32", 10)[0].state_dict(), plain)
    with pytest.raises(IsdaVizError) as e:
        read_public_isda_checkpoint(plain, "resnet32")
    assert "not a checkpoint of the public ISDA" in _one_line_error(e)


class _RunsAShellCommand:
    """What a malicious checkpoint carries: unpickling it runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt", FORMATS)
def test_foreign_global_is_refused_and_never_runs(tmp_path, fmt):
    marker = tmp_path / "ran"
    ckpt, *_ = _public_checkpoint("resnet32", 10, extra={"val_acc": [_RunsAShellCommand(marker)]})
    path = tmp_path / "evil.pth.tar"
    with _public_isda_module():
        _save(ckpt, path, FORMATS[fmt])
    for read in (lambda: read_public_isda_checkpoint(path, "resnet32"), lambda: load_torch_file(path)):
        with pytest.raises(IsdaVizError) as e:
            read()
        message = _one_line_error(e)
        assert f"{os.system.__module__}.system" in message and "allow-list" in message
        assert not marker.exists()
    # The payload is live: torch's unrestricted loader runs it.
    live, live_marker = tmp_path / "live.pt", tmp_path / "ran-live"
    torch.save({"val_acc": [_RunsAShellCommand(live_marker)]}, live, _use_new_zipfile_serialization=FORMATS[fmt])
    torch.load(live, weights_only=False)
    assert live_marker.exists()


def _build_on_global(module: str, name: str, attribute: str) -> bytes:
    """A pickle that fetches a global and sets `global.attribute = True` on it (BUILD with slot state)."""
    key = pickle.dumps(attribute, protocol=2)[2:-1]
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"N}" + key + b"\x88s\x86b."


@pytest.mark.parametrize("target", [("ISDA", "ISDALoss", "dump_patches"),
                                    ("torch._utils", "_rebuild_tensor_v2", "__defaults__"),
                                    ("collections", "OrderedDict", "fromkeys")])
def test_allowed_globals_cannot_be_altered_by_a_file(tmp_path, target):
    import io

    from isda_viz.classifiers.safe_load import ALLOWED_GLOBALS, AllowListUnpickler

    module, name, attribute = target
    obj = ALLOWED_GLOBALS[(module, name)]
    before = getattr(obj, attribute, None)
    with pytest.raises((AttributeError, TypeError)):
        AllowListUnpickler(io.BytesIO(_build_on_global(module, name, attribute))).load()
    assert getattr(obj, attribute, None) == before
    assert PickledISDALoss.dump_patches is False


# ---------------------------------------------------------------- torchvision

def _torchvision_features(net, x):
    """torchvision ResNet's forward up to the input of `fc`, from its own layers."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)


@pytest.fixture(scope="module")
def resnet18_net():
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=7)
    _randomize_batchnorm(net, torch.Generator().manual_seed(2))
    return net.eval()


@pytest.mark.parametrize("layout", ["plain", "wrapped-legacy"])
def test_torchvision_state_dict_loads_with_hook_features(resnet18_net, tmp_path, layout):
    path = tmp_path / "resnet18.pth"
    state = resnet18_net.state_dict()
    if layout == "plain":
        torch.save(state, path)
    else:
        wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90, "arch": "resnet18"}
        torch.save(wrapped, path, _use_new_zipfile_serialization=False)
    weights = load_torchvision_classifier(path, "resnet18")
    clf = weights.model
    assert (weights.arch, weights.num_classes, weights.epoch) == ("torchvision:resnet18", 7,
                                                                   None if layout == "plain" else 90)
    assert (clf.num_classes, clf.feature_dim, clf.fc_name, clf.input_size) == (7, 512, "fc", 224)
    assert clf.mean == [0.485, 0.456, 0.406] and not clf.training
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = clf.features(x)
        assert features.shape == (3, 512)
        assert torch.equal(features, _torchvision_features(resnet18_net, x))
        assert torch.equal(clf(x), resnet18_net(x))
        assert torch.equal(clf.fc(features), resnet18_net(x))
    assert not clf.fc._forward_hooks  # the hook lives only during `features`


def test_torchvision_errors_are_one_line(resnet18_net, tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_net.state_dict(), path)
    with pytest.raises(IsdaVizError) as e:
        load_torchvision_classifier(path, "resnet34")
    assert "missing" in _one_line_error(e)
    with pytest.raises(IsdaVizError) as e:
        load_torchvision_classifier(path, "resnet18", num_classes=1000)
    assert "7 classes" in _one_line_error(e)
    with pytest.raises(IsdaVizError) as e:
        load_torchvision_classifier(path, "resnet_nonexistent")
    assert "no classification model" in _one_line_error(e)
    with pytest.raises(IsdaVizError) as e:
        load_torchvision_classifier(tmp_path / "absent.pth", "resnet18")
    assert "not found" in _one_line_error(e)
