"""Every architecture of the public ISDA CIFAR code, read from files written as its `train.py` writes them.

For each `--classifier-arch` name: isda-viz's network under the public parameter names gets random weights
(BatchNorm statistics too), is saved as `train.py` saves it (both parts under `nn.DataParallel`, the ISDA loss
pickled whole, tensors tagged as on cuda:0) in torch's zip and legacy formats, and is read back through
`load_classifier(FILE, arch=NAME)`. Its features and logits must equal the module's and those of an
independent check written here: a functional transcription of the public code's forward passes that reads
every parameter by its public name, in the public code's order (so a wrong name, stride, shortcut or layer
order anywhere would show). Parameter counts are checked against the numbers published for these networks.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_foreign_checkpoints import EstimatorCV, ISDALoss, _public_isda_module, _randomize_batchnorm, _save

import isda_viz.classifiers.classifier as classifier_module
from isda_viz.classifiers.classifier import load_classifier
from isda_viz.classifiers.networks import BasicBlock, CifarResNet, WideBlock
from isda_viz.classifiers.public import (
    PUBLIC_CIFAR_MEAN,
    PUBLIC_CIFAR_STD,
    build_public_network,
    guess_public_arch,
    parse_public_arch,
    public_arch_names,
)
from isda_viz.classifiers.statistics import class_statistics
from isda_viz.data.datasets import load_split
from isda_viz.data.images import normalize
from isda_viz.data.synthetic import write_cifar10
from isda_viz.errors import IsdaVizError

FORMATS = {"zip": True, "legacy": False}  # value: _use_new_zipfile_serialization


@pytest.fixture(autouse=True)
def classifier_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(classifier_module, "CLASSIFIER_CACHE", tmp_path / "cache")


# ---------------------------------------------------------------- the public forward passes, transcribed

def _conv(s, name, x, stride=1):
    w = s[f"{name}.weight"]
    return F.conv2d(x, w, s.get(f"{name}.bias"), stride, w.shape[-1] // 2, 1, x.shape[1] // w.shape[1])


def _bn(s, name, x):
    return F.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"],
                        s[f"{name}.bias"], False, 0.0, 1e-5)


def _se(s, name, x):
    """The public SELayer: channel gates from the global average through fc.0, ReLU, fc.2, sigmoid."""
    b, c = x.shape[:2]
    y = F.adaptive_avg_pool2d(x, 1).view(b, c)
    y = torch.sigmoid(F.linear(F.relu(F.linear(y, s[f"{name}.fc.0.weight"])), s[f"{name}.fc.2.weight"]))
    return x * y.view(b, c, 1, 1).expand_as(x)


def _blocks(s, stage):
    return sorted({int(k[len(stage) + 1:].split(".")[0]) for k in s if k.startswith(stage + ".")})


def _resnet(s, x):
    """ResNet_Cifar (networks/resnet.py, se_resnet.py): post-activation basic blocks, SE before the sum."""
    x = F.relu(_bn(s, "bn1", _conv(s, "conv1", x)))
    for layer in (1, 2, 3):
        for i in _blocks(s, f"layer{layer}"):
            p, stride = f"layer{layer}.{i}", 2 if layer > 1 and i == 0 else 1
            out = F.relu(_bn(s, f"{p}.bn1", _conv(s, f"{p}.conv1", x, stride)))
            out = _bn(s, f"{p}.bn2", _conv(s, f"{p}.conv2", out))
            if f"{p}.se.fc.0.weight" in s:
                out = _se(s, f"{p}.se", out)
            if f"{p}.downsample.0.weight" in s:
                x = _bn(s, f"{p}.downsample.1", _conv(s, f"{p}.downsample.0", x, stride))
            x = F.relu(out + x)
    return F.avg_pool2d(x, 8, stride=1).view(x.shape[0], -1)


def _wideresnet(s, x):
    """WideResNet (networks/wideresnet.py, se_wideresnet.py): the shortcut conv reads the activated input."""
    x = _conv(s, "conv1", x)
    for block in (1, 2, 3):
        for i in _blocks(s, f"block{block}.layer"):
            p, stride = f"block{block}.layer.{i}", 2 if block > 1 and i == 0 else 1
            equal = f"{p}.convShortcut.weight" not in s
            if equal:
                out = F.relu(_bn(s, f"{p}.bn1", x))
            else:
                x = F.relu(_bn(s, f"{p}.bn1", x))
            out = F.relu(_bn(s, f"{p}.bn2", _conv(s, f"{p}.conv1", out if equal else x, stride)))
            out = _conv(s, f"{p}.conv2", out)
            if f"{p}.se.fc.0.weight" in s:
                out = _se(s, f"{p}.se", out)
            x = torch.add(x if equal else _conv(s, f"{p}.convShortcut", x, stride), out)
    x = F.relu(_bn(s, "bn1", x))
    return F.avg_pool2d(x, 8).view(x.shape[0], -1)


def _preact_resnet(s, x):
    """PreAct_ResNet_Cifar (networks/resnet.py): basic or bottleneck pre-activation blocks, its own fc."""
    x = _conv(s, "conv1", x)
    for layer in (1, 2, 3):
        for i in _blocks(s, f"layer{layer}"):
            p, stride = f"layer{layer}.{i}", 2 if layer > 1 and i == 0 else 1
            out = F.relu(_bn(s, f"{p}.bn1", x))
            residual = _conv(s, f"{p}.downsample.0", out, stride) if f"{p}.downsample.0.weight" in s else x
            if f"{p}.conv3.weight" in s:
                out = F.relu(_bn(s, f"{p}.bn2", _conv(s, f"{p}.conv1", out)))
                out = F.relu(_bn(s, f"{p}.bn3", _conv(s, f"{p}.conv2", out, stride)))
                out = _conv(s, f"{p}.conv3", out)
            else:
                out = _conv(s, f"{p}.conv2", F.relu(_bn(s, f"{p}.bn2", _conv(s, f"{p}.conv1", out, stride))))
            x = out + residual
    x = F.relu(_bn(s, "bn", x))
    return F.avg_pool2d(x, 8, stride=1).view(x.shape[0], -1)


def _densenet(s, x):
    """DenseNet (networks/densenet_bc.py, small_inputs=True): dense blocks, transitions, norm_final."""
    x = _conv(s, "features.conv0", x)
    for block in (1, 2, 3):
        features = [x]
        for j in range(1, len({k.split(".")[2] for k in s if k.startswith(f"features.denseblock{block}.")}) + 1):
            p = f"features.denseblock{block}.denselayer{j}"
            out = _conv(s, f"{p}.conv1", F.relu(_bn(s, f"{p}.norm1", torch.cat(features, 1))))
            features.append(_conv(s, f"{p}.conv2", F.relu(_bn(s, f"{p}.norm2", out))))
        x = torch.cat(features, 1)
        if block < 3:
            p = f"features.transition{block}"
            x = F.avg_pool2d(_conv(s, f"{p}.conv", F.relu(_bn(s, f"{p}.norm", x))), 2, 2)
    x = F.relu(_bn(s, "features.norm_final", x))
    return F.avg_pool2d(x, 8).view(x.shape[0], -1)


def _resnext(s, x):
    """CifarResNeXt (networks/resnext.py): grouped 3x3 bottlenecks, projection downsample.{0,1}."""
    x = F.relu(_bn(s, "bn_1", _conv(s, "conv_1_3x3", x)))
    for stage in (1, 2, 3):
        for i in _blocks(s, f"stage_{stage}"):
            p, stride = f"stage_{stage}.{i}", 2 if stage > 1 and i == 0 else 1
            b = F.relu(_bn(s, f"{p}.bn_reduce", _conv(s, f"{p}.conv_reduce", x)))
            b = F.relu(_bn(s, f"{p}.bn", _conv(s, f"{p}.conv_conv", b, stride)))
            b = _bn(s, f"{p}.bn_expand", _conv(s, f"{p}.conv_expand", b))
            if f"{p}.downsample.0.weight" in s:
                x = _bn(s, f"{p}.downsample.1", _conv(s, f"{p}.downsample.0", x, stride))
            x = F.relu(x + b)
    return F.avg_pool2d(x, 8).view(x.shape[0], -1)


def _shake_shortcut(s, p, x, stride):
    h = F.relu(x)
    h1 = _conv(s, f"{p}.conv1", F.avg_pool2d(h, 1, stride))
    h2 = _conv(s, f"{p}.conv2", F.avg_pool2d(F.pad(h, (-1, 1, -1, 1)), 1, stride))
    return _bn(s, f"{p}.bn", torch.cat((h1, h2), 1))


def _shake(s, x, branch, stem, stages):
    """ShakeResNet / ShakeResNeXt (networks/shake_shake.py) in eval mode: alpha = 0.5."""
    x = stem(x)
    for stage in stages:
        for i in _blocks(s, stage):
            p, stride = f"{stage}.{i}", 2 if stage[-1] != "1" and i == 0 else 1
            h = 0.5 * branch(f"{p}.branch1", x, stride) + (1 - 0.5) * branch(f"{p}.branch2", x, stride)
            x = h + (_shake_shortcut(s, f"{p}.shortcut", x, stride) if f"{p}.shortcut.bn.weight" in s else x)
    x = F.relu(x)
    return F.avg_pool2d(x, 8).view(x.shape[0], -1)


def _shake_resnet(s, x):
    def branch(p, x, stride):
        h = _bn(s, f"{p}.2", _conv(s, f"{p}.1", F.relu(x), stride))
        return _bn(s, f"{p}.5", _conv(s, f"{p}.4", F.relu(h)))
    return _shake(s, x, branch, lambda x: _bn(s, "bn_1", _conv(s, "conv_1", x)), ("stage_1", "stage_2", "stage_3"))


def _shake_resnext(s, x):
    def branch(p, x, stride):
        h = F.relu(_bn(s, f"{p}.1", _conv(s, f"{p}.0", x)))
        h = F.relu(_bn(s, f"{p}.4", _conv(s, f"{p}.3", h, stride)))
        return _bn(s, f"{p}.7", _conv(s, f"{p}.6", h))
    return _shake(s, x, branch, lambda x: _conv(s, "c_in", x), ("layer1", "layer2", "layer3"))


def _pyramidnet(s, x):
    """PyramidNet (networks/shake_pyramidnet.py, cifar, bottleneck) in eval mode: residual times 1 - p_drop."""
    n = len(_blocks(s, "layer1"))
    p_drop = [1. - (1.0 - (0.5 / (3 * n)) * (i + 1)) for i in range(3 * n)]
    x = _bn(s, "bn1", _conv(s, "conv1", x))
    for layer in (1, 2, 3):
        for i in range(n):
            p, stride = f"layer{layer}.{i}", 2 if layer > 1 and i == 0 else 1
            out = F.relu(_bn(s, f"{p}.bn2", _conv(s, f"{p}.conv1", _bn(s, f"{p}.bn1", x))))
            out = F.relu(_bn(s, f"{p}.bn3", _conv(s, f"{p}.conv2", out, stride)))
            out = (1 - p_drop.pop(0)) * _bn(s, f"{p}.bn4", _conv(s, f"{p}.conv3", out))
            shortcut = F.avg_pool2d(x, (2, 2), stride=(2, 2), ceil_mode=True) if stride != 1 else x
            missing = out.shape[1] - shortcut.shape[1]
            if missing:
                zeros = torch.zeros(x.shape[0], missing, *shortcut.shape[2:])
                shortcut = torch.cat((shortcut, zeros), 1)
            x = out + shortcut
    x = F.relu(_bn(s, "bn_final", x))
    return F.avg_pool2d(x, 8).view(x.shape[0], -1)


TRANSCRIPTIONS = {"resnet": _resnet, "se_resnet": _resnet, "wrn": _wideresnet, "se_wrn": _wideresnet,
                  "preact_resnet": _preact_resnet, "densenet_bc": _densenet, "resnext": _resnext,
                  "shake_resnet": _shake_resnet, "shake_resnext": _shake_resnext, "shake_pyramidnet": _pyramidnet}


def _public_features(arch: str, state: dict, x: torch.Tensor) -> torch.Tensor:
    family = max((f for f in TRANSCRIPTIONS if arch.startswith(f)), key=len)
    return TRANSCRIPTIONS[family](state, x)


# ---------------------------------------------------------------- sizes against the published numbers

PUBLISHED = {  # name: (A, parameters in millions as published, classifier included, 10 classes)
    "resnet110": (64, 1.7), "se_resnet110": (64, 1.7), "preact_resnet164": (256, 1.7),
    "preact_resnet1001": (256, 10.2), "wrn16_8": (512, 11.0), "wrn28_10": (640, 36.5),
    "densenet_bc100": (342, 0.8), "resnext29_8_64": (1024, 34.4), "resnext29_16_64": (1024, 68.1),
    "shake_resnet26_2x32d": (128, 2.9), "shake_resnet26_2x64d": (256, 11.7),
    "shake_resnext29_2x4x64d": (1024, 34.4), "shake_pyramidnet272": (864, 26.0),
    "shake_pyramidnet164_48": (256, 1.7),  # train.py --layers 164 --alpha 48, PyramidNet-164 (bottleneck) alpha 48
}


def test_public_networks_have_the_published_sizes():
    assert all(parse_public_arch(n).name == n for n in (*public_arch_names(), *PUBLISHED))
    for name, (features, millions) in PUBLISHED.items():
        with torch.device("meta"):  # no memory, no initialisation
            net, fc = build_public_network(name, 10)
        params = sum(p.numel() for p in (*net.parameters(), *fc.parameters())) / 1e6
        assert net.feature_num == fc.fc.in_features == features, name
        assert abs(params - millions) <= 0.05 + 0.02 * millions, (name, params)


def test_public_resnets_are_built_from_the_blocks_isda_viz_trains():
    """One definition per block: only the projection's name differs, mapped when saving and loading."""
    with torch.device("meta"):
        resnet, wrn, preact = (build_public_network(a, 10)[0] for a in ("se_resnet20", "se_wrn16_8",
                                                                           "preact_resnet110"))
        ours = CifarResNet(20, 10)
    assert type(resnet.layer2[0]) is BasicBlock and resnet.layer2[0].se is not None
    assert type(wrn.block2.layer[0]) is WideBlock and type(preact.layer2[0]) is WideBlock
    assert "layer2.0.downsample.1.running_var" in resnet.state_dict()
    assert "block2.layer.0.convShortcut.weight" in wrn.state_dict()
    assert "layer2.0.downsample.0.weight" in preact.state_dict()
    assert not any("shortcut" in k for k in (*resnet.state_dict(), *preact.state_dict()))
    assert "layers.3.shortcut.0.weight" in ours.state_dict()  # isda-viz's own networks keep their names


# ---------------------------------------------------------------- files as train.py writes them

def _isda_loss(feature_num: int, num_classes: int, g: torch.Generator) -> ISDALoss:
    """The pickled `ISDA.ISDALoss` with cheap statistics (a random diagonal covariance per class)."""
    loss, estimator = ISDALoss.__new__(ISDALoss), EstimatorCV.__new__(EstimatorCV)
    nn.Module.__init__(loss)
    estimator.class_num = num_classes
    estimator.CoVariance = torch.diag_embed(torch.rand(num_classes, feature_num, generator=g))
    estimator.Ave = torch.randn(num_classes, feature_num, generator=g)
    estimator.Amount = torch.full((num_classes,), 5000.0)
    loss.estimator, loss.class_num, loss.cross_entropy = estimator, num_classes, nn.CrossEntropyLoss()
    return loss


def _public_file(arch: str, fmt: str, folder, num_classes=10, edit=None):
    """`(path, feature net, Full_layer, public state dict)`; `edit(ckpt)` may spoil the checkpoint first."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    net, full_layer = build_public_network(arch, num_classes)
    _randomize_batchnorm(net, g)
    state = {**net.state_dict(), **full_layer.state_dict()}
    if arch.startswith("preact_resnet"):   # the network holds its own fc; train.py cannot build it
        ckpt = {"epoch": 164, "state_dict": nn.DataParallel(_Both(net, full_layer)).state_dict()}
    else:
        optimizer = torch.optim.SGD([{"params": net.parameters()}, {"params": full_layer.parameters()}],
                                    lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        ckpt = {"epoch": 3, "state_dict": nn.DataParallel(net).state_dict(),
                "fc": nn.DataParallel(full_layer).state_dict(), "best_acc": 91.5, "optimizer": optimizer.state_dict(),
                "isda_criterion": _isda_loss(net.feature_num, num_classes, g), "val_acc": [80.25, 91.5, 90.0]}
    if edit is not None:
        edit(ckpt)
    path = folder / f"{arch}-{fmt}.pth.tar"
    with _public_isda_module():
        _save(ckpt, path, FORMATS[fmt])
    return path, net.eval(), full_layer.eval(), state


class _Both(nn.Module):
    """A pre-activation ResNet as the public module holds it: its layers and `fc` in one state dict."""
    def __init__(self, net, full_layer):
        super().__init__()
        for name, child in net.named_children():
            self.add_module(name, child)
        self.fc = full_layer.fc


# Both formats for the small networks; one for each large one (the format is read by one loader for every
# architecture). The widest (36-68 M parameters, 150-270 MB a file) are checked when ISDA_VIZ_TEST_WIDE_ARCHS=1;
# their family's code and their published sizes are checked always.
CASES = [(a, f) for a in ("se_resnet110", "se_wrn16_8", "preact_resnet110", "preact_resnet164", "densenet_bc100",
                          "shake_resnet26_2x32d") for f in FORMATS]
CASES += [("resnext29_8_64", "legacy"), ("shake_resnext29_2x4x64d", "zip"), ("shake_pyramidnet272", "legacy"),
          ("densenet_bc190", "zip"), ("shake_resnet26_2x64d", "legacy")]
WIDE_CASES = [("resnext29_8_64", "zip"), ("shake_resnext29_2x4x64d", "legacy"), ("shake_pyramidnet272", "zip"),
              ("se_wrn28_10", "zip"), ("resnext29_16_64", "legacy"), ("shake_resnet26_2x112d", "legacy")]
wide = pytest.mark.skipif(not os.environ.get("ISDA_VIZ_TEST_WIDE_ARCHS"), reason="set ISDA_VIZ_TEST_WIDE_ARCHS=1")


@pytest.mark.parametrize("arch,fmt", CASES + [pytest.param(*case, marks=wide) for case in WIDE_CASES])
def test_public_file_loads_strictly_and_predicts_as_the_public_network(arch, fmt, tmp_path):
    path, net, full_layer, state = _public_file(arch, fmt, tmp_path)
    raw = path.read_bytes()
    assert b"cuda:0" in raw and (b"module.fc.weight" in raw or b"module.layer1" in raw)

    clf = load_classifier(path, arch=arch)

    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = normalize(images.float() / 255, PUBLIC_CIFAR_MEAN, PUBLIC_CIFAR_STD)
    with torch.no_grad():
        features = net(x)
        logits = full_layer(features)
        public = _public_features(arch, state, x)
        assert torch.equal(features, public)
        assert torch.equal(F.linear(public, state["fc.weight"], state["fc.bias"]), logits)
        loaded = clf.features(images)
        assert torch.equal(loaded, features) and torch.equal(clf.model.fc(loaded), logits)
        assert torch.equal(clf.logits(images), logits)
    assert (clf.feature_dim, clf.num_classes, clf.class_names[0]) == (net.feature_num, 10, "airplane")
    assert not clf.model.training
    assert guess_public_arch({k: v for k, v in state.items() if not k.startswith("fc.")}) == arch  # for hints
    if not arch.startswith("preact"):
        assert clf.estimator is not None and clf.estimator.mean.shape == (10, net.feature_num)


def _rename_one_key(key: str, part: str = "state_dict"):
    def edit(ckpt):
        ckpt[part] = type(ckpt[part])((key + "_x" if k == key else k, v) for k, v in ckpt[part].items())
    return edit


@pytest.mark.parametrize("arch,key", [
    ("se_resnet20", "module.layer2.0.se.fc.2.weight"),
    ("se_wrn16_8", "module.block2.layer.0.convShortcut.weight"),
    ("preact_resnet110", "module.layer3.0.downsample.0.weight"),
    ("densenet_bc100", "module.features.transition2.norm.running_var"),
    ("resnext29_8_64", "module.stage_3.2.conv_conv.weight"),
    ("shake_resnet26_2x32d", "module.stage_2.0.shortcut.conv2.weight"),
    ("shake_pyramidnet164_48", "module.layer3.17.bn4.bias"),
])
def test_a_file_one_key_off_is_refused_naming_the_key(arch, key, tmp_path):
    path, *_ = _public_file(arch, "legacy", tmp_path, edit=_rename_one_key(key))
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch=arch)
    message = str(e.value)
    assert "\n" not in message and "1 missing" in message and "1 unexpected" in message
    assert key[len("module."):] in message and key[len("module."):] + "_x" in message


def test_a_file_of_another_public_architecture_is_refused_naming_the_one_it_looks_like(tmp_path):
    path, *_ = _public_file("densenet_bc100", "zip", tmp_path)
    for wrong, fragment in (("densenet_bc190", "looks like densenet_bc100"), ("se_resnet110", "looks like densenet")):
        with pytest.raises(IsdaVizError) as e:
            load_classifier(path, arch=wrong)
        assert fragment in str(e.value) and "\n" not in str(e.value)


def test_names_that_the_public_code_cannot_build_or_does_not_have(tmp_path):
    path, *_ = _public_file("se_resnet20", "zip", tmp_path)
    for arch in ("resnet164", "se_resnet1001"):
        with pytest.raises(IsdaVizError) as e:
            load_classifier(path, arch=arch)
        assert "cannot build" in str(e.value) and "dropout_rate" in str(e.value)
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch="se_resnext29")
    message = str(e.value)
    assert "unknown --classifier-arch 'se_resnext29'" in message and "\n" not in message
    assert all(name in message for name in ("se_resnet110", "densenet_bc190", "shake_pyramidnet272", "torchvision:"))


def test_a_preact_resnet_file_gets_its_class_statistics_from_a_pass_over_cifar(tmp_path):
    """Its file holds no ISDA loss: the class means and covariances come from its features on --data-root."""
    path, net, _, _ = _public_file("preact_resnet110", "zip", tmp_path)
    root = write_cifar10(tmp_path / "data", n_train=40)
    clf = load_classifier(path, arch="preact_resnet110", data_root=root)
    assert clf.estimator is None and clf.dataset == "cifar10"
    statistics = class_statistics(clf, classes=[3, 1], progress=False)
    train = load_split("cifar10", True, root)
    for c in (1, 3):
        images = torch.stack([image for image, label in train if label == c])
        with torch.no_grad():
            rows = net(normalize(images.float() / 255, PUBLIC_CIFAR_MEAN, PUBLIC_CIFAR_STD)).double()
        centred = rows - rows.mean(0)
        slot = statistics.slots(torch.tensor([c]))[0]
        torch.testing.assert_close(statistics.estimator.mean[slot].double(), rows.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(statistics.covariance(c).double(), centred.T @ centred / len(rows),
                                   rtol=1e-4, atol=1e-6)
