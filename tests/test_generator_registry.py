"""The generator registry: one registration makes a family loadable, listed, helped and tabled."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from isda_viz.errors import IsdaVizError
from isda_viz.generators import registry
from isda_viz.generators.base import Generator
from isda_viz.generators.registry import (
    LoadRequest,
    generator_families,
    generator_help,
    generator_table,
    load_generator,
    register_generator,
)

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
KINDS = {"wgan", "biggan-deep", "dab-biggan", "studiogan-biggan", "biggan-pytorch"}


def test_the_readme_table_is_the_registrys():
    start, end = "<!-- generators-table: made by `python -m isda_viz.generators` -->\n", "\n<!-- /generators-table -->"
    table = README[README.index(start) + len(start):README.index(end)]
    assert table == generator_table(), "README's Generators table is stale: paste `python -m isda_viz.generators`"
    rows = [line for line in table.splitlines()[2:]]
    assert {re.match(r"\| `([a-z0-9-]+)` \|", row).group(1) for row in rows} == \
        {f.kind for f in generator_families()} >= KINDS
    for family in generator_families():  # every row says where the file comes from, its licence and a command
        assert family.source and family.licence and family.command.startswith("isda-viz ")
        assert "--generator " in family.command


def test_help_and_errors_list_every_family():
    from isda_viz.cli.main import main

    kinds = {f.kind for f in generator_families()}
    help_text = CliRunner().invoke(main, ["augment", "--help"], terminal_width=1000).output
    assert all(kind in generator_help() for kind in kinds)
    assert all(kind in " ".join(help_text.split()) for kind in kinds)
    with pytest.raises(IsdaVizError) as error:
        load_generator("nosuch:weights.pth")
    assert all(kind in str(error.value) for kind in kinds)


class Toy(Generator):
    latent_dim, num_classes, image_size, channels = 3, None, 4, 1

    def __init__(self, scale: float):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))

    def generate(self, z, y=None):
        return torch.tanh(self.scale * z.sum(1))[:, None, None, None].expand(-1, 1, 4, 4)


@pytest.fixture
def toy_family():
    """A family registered as a test module would be: one decorator. Removed again afterwards."""
    calls = []

    def recognise(request: LoadRequest) -> bool:
        if request.path.is_dir():  # a train-gan-style GAN_DIR whose generator.pt is of this family's format
            contents = LoadRequest(str(request.path / "generator.pt")).contents()
            return contents.get("format") == "toy"
        state = request.tensors()
        return state is not None and set(state) == {"toy.scale"}

    @register_generator("toy-gan", summary="a toy", file="toy.pt", dataset="none", resolution="4 px",
                        source="this test", licence="none", command="isda-viz augment --generator toy-gan:toy.pt",
                        recognise=recognise)
    def load_toy(request: LoadRequest) -> Generator:
        calls.append(request)
        if request.path.is_dir():
            return Toy(float(LoadRequest(str(request.path / "generator.pt")).contents()["scale"])).freeze()
        return Toy(float(request.tensors()["toy.scale"])).freeze()

    yield calls
    del registry._FAMILIES["toy-gan"]


def test_one_registration_makes_a_family_loadable_listed_and_recognised(toy_family, tmp_path):
    torch.save({"toy.scale": torch.tensor(2.0)}, tmp_path / "toy.pt")
    assert "toy-gan" in generator_help() and "`toy-gan`" in generator_table()
    by_kind = load_generator(f"toy-gan:{tmp_path / 'toy.pt'}", "cpu", standing_statistics=False)
    bare = load_generator(str(tmp_path / "toy.pt"))
    assert isinstance(by_kind, Toy) and isinstance(bare, Toy) and by_kind.kind == bare.kind == "toy-gan"
    assert float(by_kind.scale) == 2.0 and toy_family[0].standing_statistics is False
    assert toy_family[1].kind is None and toy_family[1].path == tmp_path / "toy.pt"
    with pytest.raises(IsdaVizError, match="unknown generator kind 'toy'.*toy-gan"):
        load_generator(f"toy:{tmp_path / 'toy.pt'}")
    # a GAN_DIR of another train-gan architecture is not taken for the WGAN's
    (tmp_path / "gan").mkdir()
    torch.save({"format": "toy", "scale": torch.tensor(3.0)}, tmp_path / "gan" / "generator.pt")
    gan = load_generator(str(tmp_path / "gan"))
    assert isinstance(gan, Toy) and float(gan.scale) == 3.0


def test_registration_is_checked():
    with pytest.raises(ValueError, match="lower case"):
        register_generator("Bad_Kind", summary="", file="", dataset="", resolution="", source="", licence="",
                           command="")
    with pytest.raises(ValueError, match="registered twice"):
        register_generator("wgan", summary="", file="", dataset="", resolution="", source="", licence="",
                           command="")(lambda request: None)


def test_a_path_with_a_colon_that_is_no_kind_is_a_path(tmp_path, gan_file):
    odd = tmp_path / "run:3"
    odd.mkdir()
    (odd / "generator.pt").write_bytes(gan_file.read_bytes())
    assert load_generator(str(odd)).kind == "wgan"


@pytest.fixture
def gan_file(tmp_path):
    from isda_viz.generators.wgan import WGANGenerator, save_generator

    path = tmp_path / "g" / "generator.pt"
    path.parent.mkdir()
    save_generator(WGANGenerator(latent_dim=8, width=4), path, iteration=0, dataset="fashion-mnist")
    return path
