"""The classifier registry: the `--classifier-arch` help, the list an unknown name gets and the README's table are
all the registry's, and a new family is one file and one decorator."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import click
import pytest
import torch

import isda_viz.classifiers.classifier as classifier_module
from isda_viz.classifiers import registry
from isda_viz.classifiers.classifier import load_classifier
from isda_viz.classifiers.public import match_public_arch
from isda_viz.classifiers.registry import (
    ClassifierWeights,
    arch_help,
    classifier_families,
    find_family,
    known_archs,
    readme_table,
    register_classifier_family,
)
from isda_viz.cli.main import main
from isda_viz.errors import IsdaVizError

ROOT = Path(__file__).resolve().parents[1]

TOY_FAMILY = '''
"""A family written by a user: this file and its one decorator are all it takes."""
from pathlib import Path

import torch
import torch.nn as nn

from isda_viz.classifiers.registry import ClassifierWeights, ReadmeRow, register_classifier_family


class ToyNet(nn.Module):
    """Features: the 4 pixels of a 1x2x2 image; `fc`: Linear(4, 3)."""
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.feature_dim = 4

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


@register_classifier_family("toy", prefix="toy", names=("toy:NAME",), summary="toy weights of a test",
                            rows=(ReadmeRow("`toy:NAME`", "a test", "4", "isda-viz augment --classifier-arch toy:x"),))
def load_toy(path, name):
    model = ToyNet()
    model.fc.load_state_dict(torch.load(path, weights_only=True))
    return ClassifierWeights(path=Path(path), arch=f"toy:{name}", model=model.eval().requires_grad_(False),
                             mean=[0.5], std=[0.25], image_size=2, channels=1, class_names=["a", "b", "c"])
'''


@pytest.fixture(autouse=True)
def classifier_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(classifier_module, "CLASSIFIER_CACHE", tmp_path / "cache")


@pytest.fixture
def toy_family(tmp_path):
    """The family of `TOY_FAMILY`, registered by importing its file; unregistered afterwards."""
    path = tmp_path / "toy_family.py"
    path.write_text(TOY_FAMILY)
    spec = importlib.util.spec_from_file_location("toy_family", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    registry.unregister_classifier_family("toy")
    sys.modules.pop("toy_family", None)


def _readme_table() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- classifier families: [^\n]*-->\n(.*?)\n<!-- end of classifier families -->", text, re.S)
    assert found, "the README has no marked table of classifier families"
    return found.group(1)


def test_the_readme_table_is_the_registry_s():
    assert _readme_table() == readme_table()
    rows = readme_table().splitlines()[2:]
    assert len(rows) == sum(len(f.rows) for f in classifier_families()) >= 15


def test_every_command_s_classifier_arch_help_is_the_registry_s():
    helps = {}
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and "--classifier-arch" in param.opts:
                helps[name] = param.help
    assert {"augment", "grid", "audit", "train-gan"} <= set(helps)
    assert all(text == arch_help() for text in helps.values())
    for family in classifier_families():  # each family is named with what it reads
        assert f"{family.names[0]}" in arch_help() and family.summary in arch_help()


def test_an_unknown_name_lists_every_family_s_names(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch="lenet5")
    message = str(e.value)
    assert message == f"unknown --classifier-arch 'lenet5'; known: {known_archs()}" and "\n" not in message
    for family in classifier_families():
        assert all(name in message for name in (*family.names, *family.forms))


def test_every_listed_name_belongs_to_its_family():
    families = classifier_families()
    assert len({f.name for f in families}) == len(families) >= 11
    for family in families:
        for name in family.names:
            assert find_family(name) is family, name
            if family.prefix is None:  # the public CIFAR code: every listed name builds
                assert match_public_arch(name).name == name
    assert find_family("torchvision:resnet50").loader_name("torchvision:resnet50") == "resnet50"
    assert find_family("resnet110_cifar").name == "resnet" and find_family("lenet5") is None


def test_a_family_is_one_file_and_one_decorator(toy_family, tmp_path):
    assert "torchvision:NAME, toy:NAME, isda-imagenet:" in known_archs()  # order 100: after torchvision's
    assert find_family("toy:small").load is toy_family.load_toy
    assert "toy:NAME (toy weights of a test)" in arch_help()
    assert "| `toy:NAME` | a test | 4 | `isda-viz augment --classifier-arch toy:x` |" in readme_table()
    fc = torch.nn.Linear(4, 3)
    path = tmp_path / "toy.pt"
    torch.save(fc.state_dict(), path)
    clf = load_classifier(path, arch="toy:small")
    assert (clf.class_names, clf.config["format"], clf.config["arch"], clf.source) == (["a", "b", "c"], "toy",
                                                                                        "toy:small", path)
    images = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(clf.logits(images), fc(((images - 0.5) / 0.25).flatten(1)))
    with pytest.raises(IsdaVizError, match="names no model \\(e.g. toy:NAME\\)"):
        load_classifier(path, arch="toy:")
    with pytest.raises(IsdaVizError) as e:
        load_classifier(path, arch="lenet5")
    assert "toy:NAME" in str(e.value)


def test_the_family_is_gone_once_unregistered_and_two_claims_of_a_name_are_refused(toy_family):
    registry.unregister_classifier_family("toy")
    assert find_family("toy:small") is None and "toy:NAME" not in known_archs()

    def other_loader(path, name) -> ClassifierWeights:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="two classifier families named 'timm'"):
        register_classifier_family("timm", prefix="timm2", names=("timm2:NAME",), summary="x")(other_loader)
    with pytest.raises(ValueError, match="exactly one of prefix and pattern"):
        register_classifier_family("both", prefix="a", pattern="b", names=(), summary="x")
