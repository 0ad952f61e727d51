"""Every file format an ISDA user holds: what torch 1.0.1 wrote, the public ImageNet DDP checkpoint and
DenseNets, timm models (file and Hugging Face-style folder), `.safetensors` weights, covariances from elsewhere.

torch 1.0.1, which the public code pins, cannot run here, so `save_as_torch_1_0_1` writes its legacy
format byte for byte as its `torch.save` did: magic number, protocol 1001, sys info, a protocol-2
pickle in which every `nn.Module` carries `_backend` (pickled as a call of
`torch.nn.backends.thnn._get_thnn_function_backend`) and its class as a `('module', cls, file,
source)` persistent id, tensors as `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
OrderedDict())` over storages named `torch.cuda.FloatStorage` (etc.) at `cuda:0`, then the storage
keys and each storage as an int64 element count followed by its bytes.
"""

from __future__ import annotations

import contextlib
import copyreg
import inspect
import io
import json
import os
import pickle
import struct
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from click.testing import CliRunner
from torch.nn.backends.thnn import _get_thnn_function_backend  # still importable (as a no-op) in torch 2.x
from test_foreign_checkpoints import (
    _public_checkpoint,
    _public_isda_module,
    _randomize_batchnorm,
    _RunsAShellCommand,
    _torchvision_features,
)

import isda_viz.classifiers.classifier as classifier_module
import isda_viz.classifiers.covariance_file as covariance_file_module
import isda_viz.inversion.pipelines as pipelines_module
from isda_viz.classifiers.classifier import load_classifier
from isda_viz.classifiers.covariance_file import read_covariance_file
from isda_viz.classifiers.foreign import read_public_isda_checkpoint
from isda_viz.classifiers.imagenet_densenet import build_imagenet_densenet
from isda_viz.classifiers.safe_load import (
    AllowListUnpickler,
    PickledFunctionBackend,
    PickledImageNetISDALoss,
    load_torch_file,
)
from isda_viz.classifiers.statistics import class_statistics
from isda_viz.classifiers.torchvision_models import load_torchvision_classifier
from isda_viz.cli.main import main
from isda_viz.errors import IsdaVizError
from isda_viz.inversion.optimizer import InversionOptions
from isda_viz.inversion.pipelines import VisualizeOptions, augment_images
from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.pretrained import default_classifier


@pytest.fixture(autouse=True)
def classifier_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(classifier_module, "CLASSIFIER_CACHE", tmp_path / "cache")


def _one_line(excinfo) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


# ---------------------------------------------------------------- torch 1.0.1's legacy writer

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
SYS_INFO = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}
CUDA_STORAGES = {torch.float32: torch.cuda.FloatStorage, torch.float64: torch.cuda.DoubleStorage,
                 torch.int64: torch.cuda.LongStorage}


class _ThnnBackend:
    """torch 1.0.1's `thnn_backend`: every module's `_backend`, reduced to a call of the module-level getter."""

    def __reduce__(self):
        return _get_thnn_function_backend, ()


THNN_BACKEND = _ThnnBackend()


class _CudaStorage:
    """A tensor's data as the `torch.cuda.*Storage` a GPU-trained torch 1.0.1 tensor lived in."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach().contiguous().clone()


def _module_state_1_0_1(module: nn.Module) -> dict:
    """An nn.Module's `__dict__` as torch 1.0.1 had it: `_backend` first, its seven hook/member dicts, `training`."""
    state = {"_backend": THNN_BACKEND, "_parameters": OrderedDict(module._parameters),
             "_buffers": OrderedDict(module._buffers), "_backward_hooks": OrderedDict(),
             "_forward_hooks": OrderedDict(), "_forward_pre_hooks": OrderedDict(), "_state_dict_hooks": OrderedDict(),
             "_load_state_dict_pre_hooks": OrderedDict(), "_modules": OrderedDict(module._modules),
             "training": module.training}
    state.update({k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"})
    return state


class _Torch101Pickler(pickle.Pickler):
    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages: dict[str, torch.Tensor] = {}
        self.module_classes: set[type] = set()

    def persistent_id(self, obj):
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            if obj in self.module_classes:
                return None
            self.module_classes.add(obj)
            try:  # as torch 1.0.1: the source is optional
                return "module", obj, inspect.getsourcefile(obj), inspect.getsource(obj)
            except (OSError, TypeError):
                return "module", obj, None, None
        if isinstance(obj, _CudaStorage):
            key = str(len(self.storages))
            self.storages[key] = obj.tensor
            return "storage", CUDA_STORAGES[obj.tensor.dtype], key, "cuda:0", obj.tensor.numel(), None
        return None

    def reducer_override(self, obj):
        if isinstance(obj, nn.Parameter):
            return torch._utils._rebuild_parameter, (obj.data, obj.requires_grad, OrderedDict())
        if isinstance(obj, torch.Tensor):
            storage = _CudaStorage(obj)
            return torch._utils._rebuild_tensor_v2, (storage, 0, tuple(obj.shape), storage.tensor.stride(),
                                                     obj.requires_grad, OrderedDict())
        if isinstance(obj, nn.Module):
            return copyreg.__newobj__, (type(obj),), _module_state_1_0_1(obj)
        return NotImplemented


def save_as_torch_1_0_1(obj, path) -> None:
    """`torch.save(obj, path)` as torch 1.0.1 wrote it from a GPU run (see the module docstring)."""
    with open(path, "wb") as f:
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO):
            pickle.dump(header, f, protocol=2)
        pickler = _Torch101Pickler(f)
        pickler.dump(obj)
        pickle.dump(list(pickler.storages), f, protocol=2)
        for tensor in pickler.storages.values():
            f.write(struct.pack("<q", tensor.numel()))
            f.write(tensor.numpy().tobytes())


@pytest.fixture(scope="module")
def cifar_1_0_1(tmp_path_factory):
    """A resnet32 / CIFAR-10 checkpoint of the public `train.py`, written by torch 1.0.1."""
    ckpt, net, full_layer, criterion = _public_checkpoint("resnet32", 10)
    path = tmp_path_factory.mktemp("torch101") / "checkpoint.pth.tar"
    with _public_isda_module():
        save_as_torch_1_0_1(ckpt, path)
    return path, net, full_layer, criterion


def test_torch_1_0_1_checkpoint_loads_on_a_machine_without_cuda(cifar_1_0_1):
    path, net, full_layer, criterion = cifar_1_0_1
    raw = path.read_bytes()
    assert b"torch.nn.backends.thnn\n_get_thnn_function_backend" in raw and b"torch.cuda\nFloatStorage" in raw
    assert b"cuda:0" in raw and b"torch.cuda\nLongStorage" in raw and not torch.cuda.is_available()
    # torch's own unrestricted reader takes the file as a real one (with the public ISDA module importable)
    with _public_isda_module():
        live = torch.load(path, map_location="cpu", weights_only=False)
    assert torch.equal(live["isda_criterion"].estimator.CoVariance, criterion.estimator.CoVariance)

    ck = read_public_isda_checkpoint(path, "resnet32")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ck.model(x), full_layer(net(x)))
    assert torch.equal(ck.class_covariance, criterion.estimator.CoVariance.double())
    assert ck.class_covariance.device.type == "cpu" and ck.epoch == 3
    loss = load_torch_file(path)["isda_criterion"]
    assert type(loss._backend) is PickledFunctionBackend
    assert type(loss._modules["cross_entropy"]._backend) is PickledFunctionBackend
    assert loss._modules["cross_entropy"].ignore_index == -100 and "ISDA" not in sys.modules


def test_torch_1_0_1_file_with_a_foreign_global_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    ckpt, *_ = _public_checkpoint("resnet32", 10)
    ckpt["isda_criterion"].estimator.payload = _RunsAShellCommand(marker)
    path = tmp_path / "evil.pth.tar"
    with _public_isda_module():
        save_as_torch_1_0_1(ckpt, path)
    assert b"_get_thnn_function_backend" in path.read_bytes()
    for read in (lambda: load_torch_file(path), lambda: read_public_isda_checkpoint(path, "resnet32")):
        with pytest.raises(IsdaVizError) as e:
            read()
        assert f"{os.system.__module__}.system" in _one_line(e) and "allow-list" in str(e.value)
        assert not marker.exists()


# ---------------------------------------------------------------- the public ImageNet DDP checkpoint

class ImageNetEstimatorCV:
    """Stand-in for the public `ISDA_imagenet.EstimatorCV`: diagonal statistics `CoVariance (C, A)`."""

    def __init__(self, feature_num, class_num, generator):
        self.class_num = class_num
        self.CoVariance = torch.rand(class_num, feature_num, generator=generator)
        self.Ave = torch.randn(class_num, feature_num, generator=generator)
        self.Amount = torch.randint(1, 500, (class_num,), generator=generator).float()


class ImageNetISDALoss(nn.Module):
    def __init__(self, feature_num, class_num, generator):
        super().__init__()
        self.estimator = ImageNetEstimatorCV(feature_num, class_num, generator)
        self.class_num = class_num
        self.cross_entropy = nn.CrossEntropyLoss()


ImageNetEstimatorCV.__module__ = ImageNetISDALoss.__module__ = "ISDA_imagenet"
ImageNetEstimatorCV.__qualname__, ImageNetISDALoss.__qualname__ = "EstimatorCV", "ISDALoss"


@contextlib.contextmanager
def _imagenet_isda_module():
    module = types.ModuleType("ISDA_imagenet")
    module.__file__ = __file__
    module.ISDALoss, module.EstimatorCV = ImageNetISDALoss, ImageNetEstimatorCV
    sys.modules["ISDA_imagenet"] = module
    try:
        yield
    finally:
        del sys.modules["ISDA_imagenet"]


def _ddp_checkpoint(net: nn.Module, feature_num: int, num_classes: int) -> tuple[dict, ImageNetISDALoss]:
    """What `imagenet_DDP.py` saves: epoch, the DDP model's state dict, best_acc1 (a tensor), optimizer, loss."""
    g = torch.Generator().manual_seed(5)
    criterion = ImageNetISDALoss(feature_num, num_classes, g)
    optimizer = torch.optim.SGD(net.parameters(), 0.2, momentum=0.9, weight_decay=1e-4)
    return {"epoch": 300, "state_dict": nn.DataParallel(net).state_dict(), "best_acc1": torch.tensor(78.25),
            "optimizer": optimizer.state_dict(), "criterion_isda": criterion}, criterion


def _save_ddp(ckpt, path, fmt):
    with _imagenet_isda_module():
        if fmt == "torch-1.0.1":
            save_as_torch_1_0_1(ckpt, path)
        else:
            torch.save(ckpt, path)


@pytest.mark.parametrize("fmt", ["zip", "torch-1.0.1"])
def test_imagenet_ddp_checkpoint_of_a_resnet_gives_its_diagonal_statistics(tmp_path, fmt):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=6)
    _randomize_batchnorm(net, torch.Generator().manual_seed(1))
    ckpt, criterion = _ddp_checkpoint(net.eval(), 512, 6)
    path = tmp_path / "model_best.pth.tar"
    _save_ddp(ckpt, path, fmt)
    assert b"module.conv1.weight" in path.read_bytes() and "ISDA_imagenet" not in sys.modules
    with pytest.raises(pickle.UnpicklingError):  # the pickled loss is why an allow-list is needed
        torch.load(path, map_location="cpu", weights_only=True)
    assert type(load_torch_file(path)["criterion_isda"]) is PickledImageNetISDALoss

    clf = load_classifier(path, arch="torchvision:resnet18", class_names=[f"c{i}" for i in range(6)])
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        normalised = clf.preprocess(x)
        assert torch.equal(clf.features(x), _torchvision_features(net, normalised))
        assert torch.equal(clf.logits(x), net(normalised))
    est = clf.estimator
    assert est is not None and est.diagonal and clf.config["format"] == "torchvision"
    torch.testing.assert_close(est.covariance, criterion.estimator.CoVariance, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(est.mean, criterion.estimator.Ave)
    assert torch.equal(est.count, criterion.estimator.Amount.double())
    statistics = class_statistics(clf, classes=[4])  # the file's own: no data, no pass
    assert statistics.estimator is est
    torch.testing.assert_close(statistics.covariance(4), criterion.estimator.CoVariance[4], rtol=1e-6, atol=1e-7)


def test_imagenet_statistics_of_another_shape_are_a_one_line_error(tmp_path):
    net = torchvision.models.resnet18(weights=None, num_classes=6)
    ckpt, criterion = _ddp_checkpoint(net, 256, 6)  # statistics of 256 features for a 512-feature network
    path = tmp_path / "checkpoint.pth.tar"
    _save_ddp(ckpt, path, "zip")
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch="torchvision:resnet18", class_names=[f"c{i}" for i in range(6)])
    assert "criterion_isda.estimator.CoVariance" in _one_line(e) and "(6, 512)" in str(e.value)


def _torchvision_densenet(blocks, num_classes, seed=0):
    """torchvision's DenseNet-BC with the public widths (24 initial features): an independent implementation."""
    torch.manual_seed(seed)
    net = torchvision.models.DenseNet(growth_rate=32, block_config=blocks, num_init_features=24,
                                      num_classes=num_classes)
    _randomize_batchnorm(net, torch.Generator().manual_seed(seed + 1))
    return net.eval()


def _public_names(state):
    """torchvision's DenseNet keys → the public ImageNet code's (`norm5` → `norm_final`, `classifier` → `fc`)."""
    return OrderedDict((k.replace("features.norm5.", "features.norm_final.").replace("classifier.", "fc."), v)
                       for k, v in state.items())


@pytest.mark.parametrize("fmt", ["zip", "torch-1.0.1"])
def test_public_imagenet_densenet121_loads_strictly_and_predicts_as_the_module(tmp_path, fmt):
    reference = _torchvision_densenet((6, 12, 24, 16), 5)
    public = build_imagenet_densenet("densenet121", 5)
    public.load_state_dict(_public_names(reference.state_dict()), strict=True)
    assert public.feature_num == 1019 and "features.norm_final.weight" in public.state_dict()
    ckpt, criterion = _ddp_checkpoint(public, 1019, 5)
    path = tmp_path / "checkpoint.pth.tar"
    _save_ddp(ckpt, path, fmt)

    clf = load_classifier(path, arch="isda-imagenet:densenet121", class_names=list("abcde"))
    assert (clf.image_size, clf.mean, clf.feature_dim, clf.num_classes) == (224, [0.485, 0.456, 0.406], 1019, 5)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        normalised = clf.preprocess(x)
        expected = reference(normalised)
        torch.testing.assert_close(clf.logits(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(clf.model.fc(clf.features(x)), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(clf.estimator.covariance, criterion.estimator.CoVariance, rtol=1e-6, atol=1e-7)

    off = tmp_path / "one-key-off.pth"
    state = dict(ckpt["state_dict"])
    state["module.features.norm5.weight"] = state.pop("module.features.norm_final.weight")
    torch.save(state, off)
    with pytest.raises(IsdaVizError) as e:
        load_classifier(off, arch="isda-imagenet:densenet121", class_names=list("abcde"))
    assert "features.norm_final.weight" in _one_line(e) and "features.norm5.weight" in str(e.value)


def test_public_imagenet_densenet265_has_its_own_widths_and_names():
    public = build_imagenet_densenet("densenet265", 1000).state_dict()
    reference = _public_names(torchvision.models.DenseNet(32, (6, 12, 64, 48), 24).state_dict())
    assert {k: tuple(v.shape) for k, v in public.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert public["fc.weight"].shape == (1000, 2683)
    with pytest.raises(IsdaVizError) as e:
        load_classifier(__file__, arch="isda-imagenet:densenet999")
    assert "densenet121" in _one_line(e) and "densenet265" in str(e.value)


# ---------------------------------------------------------------- safetensors

def test_safetensors_weights_are_read_without_any_pickle(tmp_path, monkeypatch):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=4)
    _randomize_batchnorm(net, torch.Generator().manual_seed(1))
    net.eval()
    path = tmp_path / "resnet18.safetensors"
    safetensors_torch.save_file(net.state_dict(), str(path))

    def no_pickle(*args, **kwargs):
        raise AssertionError("a .safetensors file went through pickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(AllowListUnpickler, "load", no_pickle)
    clf = load_torchvision_classifier(path, "resnet18").model
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(clf(x), net(x))
    # a public CIFAR network as one flat file: its feature network's keys and the Full_layer's fc.*
    ckpt, public_net, full_layer, _ = _public_checkpoint("resnet32", 10)
    flat = tmp_path / "resnet32.safetensors"
    safetensors_torch.save_file({**public_net.state_dict(), **full_layer.state_dict()}, str(flat))
    ck = read_public_isda_checkpoint(flat, "resnet32")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ck.model(x), full_layer(public_net(x)))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(IsdaVizError) as e:
        load_torchvision_classifier(broken, "resnet18")
    assert "safetensors" in _one_line(e) and str(broken) in str(e.value)


# ---------------------------------------------------------------- timm

TIMM_MODEL = "test_resnet"


@pytest.fixture(scope="module")
def timm_net():
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'isda-viz[timm]')")
    pytest.importorskip("safetensors", reason="safetensors is not installed")
    torch.manual_seed(0)
    net = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=3)
    _randomize_batchnorm(net, torch.Generator().manual_seed(1))
    return net.eval()


@pytest.mark.parametrize("layout", ["state-dict", "safetensors", "hf-folder"])
def test_timm_weights_give_timms_own_pre_logits_features(timm_net, tmp_path, layout):
    from safetensors.torch import save_file

    state = timm_net.state_dict()
    if layout == "state-dict":
        path = tmp_path / "model.pth"
        torch.save(state, path)
    elif layout == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "hf"
        path.mkdir()
        save_file(state, str(path / "model.safetensors"))
        config = {"architecture": TIMM_MODEL, "num_classes": 3, "num_features": timm_net.num_features,
                  "label_names": ["x", "y", "z"],
                  "pretrained_cfg": {**timm_net.pretrained_cfg, "mean": [0.4, 0.5, 0.6], "input_size": [3, 128, 128]}}
        (path / "config.json").write_text(json.dumps(config))
    names = None if layout == "hf-folder" else ["x", "y", "z"]  # a folder's config.json names its classes
    clf = load_classifier(path, arch=f"timm:{TIMM_MODEL}", class_names=names)
    assert clf.class_names == ["x", "y", "z"]
    cfg = timm_net.pretrained_cfg
    if layout == "hf-folder":
        assert (clf.image_size, clf.mean) == (128, [0.4, 0.5, 0.6])  # the folder's pretrained_cfg wins
    else:
        assert (clf.image_size, clf.mean, clf.std) == (cfg["input_size"][-1], list(cfg["mean"]), list(cfg["std"]))
    x = torch.rand(2, 3, clf.image_size, clf.image_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        normalised = clf.preprocess(x)
        own = timm_net.forward_head(timm_net.forward_features(normalised), pre_logits=True)
        assert torch.equal(clf.features(x), own) and own.shape == (2, timm_net.num_features)
        assert torch.equal(clf.logits(x), timm_net(normalised))
        assert clf.model.fc is clf.model.net.get_classifier() and clf.feature_dim == timm_net.num_features
    assert clf.config["format"] == "timm" and clf.fingerprint is not None


def test_timm_errors_are_one_line(timm_net, tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    torch.save(timm_net.state_dict(), path)
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch="timm:test_vit", class_names=["x", "y", "z"])
    assert "has no head.weight, the final layer of timm test_vit" in _one_line(e)
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch="timm:no_such_model_xyz")
    assert "timm has no model" in _one_line(e)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "test_vit"}))
    torch.save(timm_net.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(IsdaVizError) as e:
        load_classifier(folder, arch=f"timm:{TIMM_MODEL}")
    assert "timm:test_vit" in _one_line(e)
    monkeypatch.setitem(sys.modules, "timm", None)  # as without the extra
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch=f"timm:{TIMM_MODEL}")
    assert "isda-viz[timm]" in _one_line(e)


# ---------------------------------------------------------------- covariances from elsewhere

def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error_line(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and len(result.output.strip().splitlines()) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def shipped():
    """The shipped classifier's class count and feature size."""
    clf = load_classifier(default_classifier())
    return clf.num_classes, clf.feature_dim


def _random_covariances(c, a, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(c, a, a + 3, generator=g, dtype=torch.float64)
    return m @ m.transpose(1, 2) / a


def test_covariance_file_errors_are_one_line_through_the_cli(shipped, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(covariance_file_module, "_EIGEN_CHUNK_BYTES", 1)  # one class per eigvalsh: offsets count
    c, a = shipped
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8), "L").save(image)
    sigma = _random_covariances(c, a, 0)
    not_psd = sigma.clone()
    not_psd[2] -= 3 * torch.eye(a, dtype=torch.float64) * torch.linalg.eigvalsh(sigma[2])[-1]
    asymmetric = sigma.clone()
    asymmetric[1, 0, 1] += 1.0
    cases = {"wrong-classes.npy": (sigma[:-1], "shape"), "wrong-features.pt": (sigma[:, :-1, :-1], "shape"),
             "not-psd.pt": ({"covariance": not_psd}, "class 2 is not positive semi-definite"),
             "asymmetric.npy": (asymmetric, "class 1 is not symmetric"),
             "nan.pt": (torch.full((c, a), float("nan")), "non-finite"),
             "negative-variance.npy": (-torch.ones(c, a), "negative variance"),
             "bad-mean.pt": ({"covariance": sigma, "mean": torch.zeros(c, a + 1)}, "'mean' has shape")}
    for name, (held, expected) in cases.items():
        path = tmp_path / name
        np.save(path, held.numpy()) if name.endswith(".npy") else torch.save(held, path)
        result = _invoke("augment", "--image", image, "--covariance-file", path, "--iterations", 1, "--restarts", 1,
                         "-k", 1, "--out", tmp_path / f"out-{name}")
        line = _error_line(result)
        assert expected in line and str(path) in line, line
        assert not (tmp_path / f"out-{name}").exists()
    result = _invoke("augment", "--image", image, "--covariance-file", tmp_path / "absent.npy", "--out", tmp_path / "o")
    assert "not found" in _error_line(result)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_covariance_file_gives_the_targets_of_the_same_sigma_held_by_an_estimator(shipped, tmp_path, monkeypatch,
                                                                                  suffix):
    from PIL import Image

    c, a = shipped
    # Σ as an estimator computes it from features, then written to a file
    estimator = CovarianceEstimator(a, c)
    g = torch.Generator().manual_seed(3)
    estimator.update(torch.randn(40 * c, a, generator=g) * torch.rand(a, generator=g), torch.arange(c).repeat(40))
    sigma = estimator.covariance.clone()
    path = tmp_path / f"sigma{suffix}"
    if suffix == ".npy":
        np.save(path, sigma.double().numpy())
    else:
        save_file = pytest.importorskip("safetensors.torch", reason="safetensors is not installed").save_file
        save_file({"covariance": sigma, "mean": estimator.mean.clone()}, str(path))
    from_file = read_covariance_file(path, c, a)
    assert torch.equal(from_file.covariance, sigma)

    targets = []
    real = pipelines_module.sample_augmented_features
    monkeypatch.setattr(pipelines_module, "sample_augmented_features",
                        lambda *args: targets.append((args[2].covariance.clone(), real(*args))) or targets[-1][1])
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8), "L").save(image)
    quick = InversionOptions.make(iterations=2, restarts=1)
    options = VisualizeOptions(covariance_file=str(path), inversion=quick, num_augmented=3, progress=False)
    augment_images([image], out=tmp_path / "file", options=options)
    held = VisualizeOptions(inversion=quick, num_augmented=3, progress=False)
    models = held.load_models()
    models.classifier.estimator = estimator   # the same Σ, held by an estimator
    augment_images([image], out=tmp_path / "estimator", options=held, models=models)
    (cov_file, wanted_file), (cov_estimator, wanted_estimator) = targets
    assert torch.equal(cov_file, cov_estimator) and torch.equal(wanted_file, wanted_estimator)
    assert wanted_file.shape == (1, 3, a)
    own = load_classifier(default_classifier()).estimator.covariance
    assert not torch.allclose(own, sigma)  # the file replaced the classifier's own statistics
    result = _invoke("augment", "--image", image, "--covariance-file", path, "--iterations", 2, "--restarts", 1,
                     "-k", 3, "--out", tmp_path / "cli")
    assert result.exit_code == 0, result.output
    assert torch.equal(targets[-1][1], wanted_file)


@pytest.mark.parametrize("target", [("torch.nn.backends.thnn", "_get_thnn_function_backend", "__call__"),
                                    ("ISDA_imagenet", "ISDALoss", "dump_patches"),
                                    ("ISDA_imagenet", "EstimatorCV", "pickled_as")])
def test_the_new_allowed_globals_cannot_be_altered_by_a_file(target):
    from test_foreign_checkpoints import _build_on_global

    from isda_viz.classifiers.safe_load import ALLOWED_GLOBALS

    module, name, attribute = target
    obj = ALLOWED_GLOBALS[(module, name)]
    before = getattr(obj, attribute)
    with pytest.raises((AttributeError, TypeError)):
        AllowListUnpickler(io.BytesIO(_build_on_global(module, name, attribute))).load()
    assert getattr(obj, attribute) == before
