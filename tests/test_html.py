"""The HTML pages of augment, grid, audit and demo outputs, rendered by headless Chromium.

Real outputs are made once per session with the shipped weights (a few seconds); the page's own script
records each image's naturalWidth in the DOM, which Chromium's --dump-dom returns after scripts ran.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from isda_viz.errors import IsdaVizError
from isda_viz.outputs.html import HtmlView, html_fragment, write_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH: install Debian's "
                                   "chromium (./run setup does where apt exists)")


# ---------------------------------------------------------------------------------------------
# A small DOM: parse the written page or the browser's dump


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag=None, cls=None, **attrs):
        return [n for n in self.iter() if (tag is None or n.tag == tag)
                and (cls is None or cls in n.attrs.get("class", "").split())
                and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def find(self, *args, **kwargs):
        found = self.find_all(*args, **kwargs)
        return found[0] if found else None


class _Tree(HTMLParser):
    VOID = {"img", "meta", "br", "hr", "input", "link", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#root", {})

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.node)
        self.node.children.append(node)
        if tag not in self.VOID:
            self.node = node

    def handle_endtag(self, tag):
        node = self.node
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def parse(text: str) -> Node:
    tree = _Tree()
    tree.feed(text)
    return tree.root


def render(page: Path, tmp_path: Path, fragment: str = "") -> Node:
    """The page's DOM after its scripts ran, as headless Chromium serialises it."""
    result = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000",
                             "--dump-dom", page.as_uri() + fragment], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "<html" in result.stdout, result.stderr[-2000:]
    dom = parse(result.stdout)
    assert dom.find(cls="isda-viz").attrs.get("data-images-checked") is not None, "the page's script did not run"
    return dom


# ---------------------------------------------------------------------------------------------
# Real outputs, made once per session with the shipped weights


@pytest.fixture(scope="session")
def models():
    from isda_viz.generators import load_generator
    from isda_viz.pretrained import default_classifier, default_generator, default_judge
    from isda_viz.classifiers.classifier import load_classifier

    return {"classifier": load_classifier(default_classifier()), "judge": load_classifier(default_judge()),
            "generator": load_generator(str(default_generator()), "cpu")}


def _fast():
    from isda_viz.inversion.optimizer import InversionOptions

    return InversionOptions(reconstruct_iterations=10, augment_iterations=15, restarts=1)


def _options(**kwargs):
    from isda_viz.inversion.pipelines import VisualizeOptions

    return VisualizeOptions(inversion=_fast(), progress=False, **kwargs)


@pytest.fixture(scope="session")
def augment_report(tmp_path_factory, models):
    """`augment_images` of two Fashion-MNIST test images of different classes (PNG files), two augmentations
    each: the Report it returns (its page written beside it)."""
    from isda_viz.data.datasets import load_split
    from isda_viz.inversion.pipelines import Models, augment_images

    folder = tmp_path_factory.mktemp("augment")
    test = load_split("fashion-mnist", False, limit=2)
    paths = []
    for i in range(2):
        Image.fromarray(test.images[i, 0].numpy()).save(folder / f"test{i}.png")
        paths.append(folder / f"test{i}.png")
    return augment_images(paths, out=folder / "out", options=_options(num_augmented=2), models=Models(**models))


@pytest.fixture(scope="session")
def augment_dir(augment_report):
    return augment_report.path.parent


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, models):
    """A demo folder as `isda-viz demo` lays it out: figure.png/.json/.html/_files (grid of two classes, two
    random samples each), audit/ (FAISS audit of figure_files against 2,000 training images) and
    summary.json; with the Report of `make_grid` and the AuditResult of `run_audit`."""
    from isda_viz import demo
    from isda_viz.audit.run import AuditConfig, run_audit
    from isda_viz.pretrained import default_classifier, default_generator, default_judge
    from isda_viz.inversion.pipelines import Models, make_grid
    from isda_viz.outputs.summary import write_summary

    out = tmp_path_factory.mktemp("demo")
    report = make_grid(out=out / "figure.png", classes=[0, 8], num_samples=2, options=_options(num_augmented=2),
                       models=Models(**models))
    cfg = AuditConfig(out=str(out / "audit"), from_dir=str(out / "figure_files"), limit_train=2000, limit_test=200,
                      index_dir=str(tmp_path_factory.mktemp("index")))
    audit = run_audit(cfg, progress=False, log=lambda *a: None)
    paths = {"classifier": default_classifier(), "judge": default_judge(), "generator": default_generator()}
    write_summary(demo._summary(paths, report, audit.report, {"grid": 1.0, "audit": 1.0}, True, False),
                  out / "summary.json")
    return {"dir": out, "report": report, "audit": audit}


@pytest.fixture(scope="session")
def demo_dir(demo_run):
    return demo_run["dir"]


def _names(report) -> dict:
    return {e["label"]: e["label_name"] for e in report["images"]}


def _assert_number(node: Node, value, decimals: int = 3):
    """A `.num` element holds the report's value exactly (data-value) and shows it rounded."""
    assert json.loads(node.attrs["data-value"]) == value
    shown = float(node.find("b").text())
    assert abs(shown - value) <= 0.5 * 10 ** -decimals + 1e-12, (shown, value)


def _assert_images_loaded(dom: Node, expected: int):
    images = dom.find_all("img")
    assert len(images) == expected
    assert all(int(img.attrs["data-natural-width"]) > 0 for img in images), \
        [img.attrs.get("data-file") for img in images if int(img.attrs["data-natural-width"]) == 0]
    assert not dom.find_all(cls="missing")


def _no_network(html_text: str):
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html_text, re.I)
    assert "<link" not in html_text and "@import" not in html_text and "@font-face" not in html_text


# ---------------------------------------------------------------------------------------------
# Browser tests


def _card_images(report) -> int:
    """Images on a report's cards: original, reconstruction, augmented, samples."""
    return sum(2 + len(e["augmented"]) + len(e.get("samples", [])) for e in report["images"])


def _table_images(report) -> int:
    """Thumbnails in the per-image table: reconstruction and augmented."""
    return sum(1 + len(e["augmented"]) for e in report["images"])


def _assert_cards_show_the_report(dom: Node, report: dict, folder_prefix: str = ""):
    """Each card names the report's files in order and shows its numbers."""
    names = _names(report)
    for i, entry in enumerate(report["images"]):
        card = dom.find("section", data_image=str(i))
        assert entry["source"] in card.find("h3").text() and names[entry["label"]] in card.find("h3").text()
        tiles = [t for t in card.find_all("figure")]
        k, s = len(entry["augmented"]), len(entry.get("samples", []))
        assert [t.find("figcaption").text() for t in tiles] == ["original", "reconstruction",
                                                                 *[f"augmented {j + 1}" for j in range(k)],
                                                                 *[f"random {j + 1}" for j in range(s)]]
        files = [entry["original"]["file"], entry["reconstruction"]["file"], *[a["file"] for a in entry["augmented"]],
                 *[x["file"] for x in entry.get("samples", [])]]
        assert [t.find("img").attrs["data-file"] for t in tiles] == files
        assert entry["original"]["file"] == f"{folder_prefix}{i:03d}_original.png"
        assert [x["file"] for x in entry.get("samples", [])] == [f"{folder_prefix}{i:03d}_sample_{j}.png"
                                                                 for j in range(s)]
        recon = entry["reconstruction"]
        _assert_number(tiles[1].find(data_key="feature_error"), recon["feature_error"])
        _assert_number(tiles[1].find(data_key="psnr"), recon["psnr"], decimals=1)
        for tile, aug in zip(tiles[2:], entry["augmented"]):
            for key in ("reached_shift_error", "negative_target_floor", "pixel_distance"):
                _assert_number(tile.find(data_key=key), aug[key])
            for key in ("predicted", "judge_predicted"):
                shown = tile.find(data_key=key)
                assert json.loads(shown.attrs["data-value"]) == aug[key]
                assert shown.find("b").text() == names.get(aug[key], f"class {aug[key]}")


@needs_browser
def test_augment_writes_its_page_with_every_image_and_the_reports_numbers(augment_dir, tmp_path):
    report = json.loads((augment_dir / "report.json").read_text())
    page = augment_dir / "index.html"
    assert page.is_file()                                            # written by augment_images itself
    assert write_html(augment_dir) == page and page.read_text(encoding="utf-8") == write_html(augment_dir).read_text(
        encoding="utf-8")
    assert report["class_names"][0] == "T-shirt/top" and len(report["class_names"]) == 10
    _no_network(page.read_text(encoding="utf-8"))
    dom = render(page, tmp_path)
    _assert_images_loaded(dom, _card_images(report) + _table_images(report))
    _assert_cards_show_the_report(dom, report)
    summary = {row.attrs["data-key"]: json.loads(row.attrs["data-value"])
               for row in dom.find("table", cls="summary").find_all("tr")}
    assert summary == report["summary"]
    rows = dom.find("table", cls="data").find("tbody").find_all("tr")
    assert len(rows) == _table_images(report)


@needs_browser
def test_grid_writes_its_page_with_the_random_samples(demo_dir, tmp_path):
    report = json.loads((demo_dir / "figure.json").read_text())
    page = demo_dir / "figure.html"
    assert page.is_file()                                            # written by make_grid itself
    assert all(len(e["samples"]) == 2 for e in report["images"])
    for entry in report["images"]:                                   # the samples are the generator's images
        for sample in entry["samples"]:
            assert Image.open(demo_dir / sample["file"]).size == (28, 28)
    dom = render(page, tmp_path)
    _assert_images_loaded(dom, _card_images(report) + _table_images(report))
    _assert_cards_show_the_report(dom, report, folder_prefix="figure_files/")


def _shown_neighbours(tile: Node) -> list[dict]:
    return [{"index": json.loads(li.attrs["data-index"]), "distance": json.loads(li.attrs["data-distance"]),
             "label": json.loads(li.attrs["data-label"]), "file": li.find("img").attrs["data-file"]}
            for li in tile.find_all("li")]


def _assert_neighbour_files_are_the_training_images(audit: dict, audit_dir: Path):
    """Each neighbour's `file` is its training image at dataset resolution, pixel for pixel."""
    from isda_viz.data.datasets import load_split

    train = load_split("fashion-mnist", True, limit=2000)
    files = set()
    for query in audit["queries"]:
        for n in query["neighbors"]:
            assert n["file"] == f"audit_files/train_{n['index']:07d}.png"
            pixels = np.asarray(Image.open(audit_dir / n["file"]))
            assert pixels.shape == (28, 28) and (pixels == train.images[n["index"], 0].numpy()).all()
            files.add(n["file"])
    assert sorted(f"audit_files/{f.name}" for f in (audit_dir / "audit_files").iterdir()) == sorted(files)


@needs_browser
def test_audit_writes_its_page_with_neighbour_thumbnails(demo_dir, tmp_path):
    audit_dir = demo_dir / "audit"
    audit = json.loads((audit_dir / "audit.json").read_text())
    page = audit_dir / "index.html"
    assert page.is_file()                                            # written by run_audit itself
    _assert_neighbour_files_are_the_training_images(audit, audit_dir)
    dom = render(page, tmp_path)
    q, k = len(audit["queries"]), audit["k"]
    _assert_images_loaded(dom, q * (1 + k) + q)                      # query + neighbours; table thumbnails
    tiles = dom.find_all("figure")
    assert len(tiles) == q
    for tile, query in zip(tiles, audit["queries"]):
        _assert_number(tile.find(data_key="copy_score"), query["copy_score"])
        assert _shown_neighbours(tile) == query["neighbors"]


@needs_browser
def test_demo_page_joins_each_image_to_its_audit_neighbours(demo_dir, tmp_path):
    report = json.loads((demo_dir / "figure.json").read_text())
    audit = json.loads((demo_dir / "audit" / "audit.json").read_text())
    summary = json.loads((demo_dir / "summary.json").read_text())
    page = write_html(demo_dir)
    assert page == demo_dir / "index.html"
    _no_network(page.read_text(encoding="utf-8"))
    dom = render(page, tmp_path)
    joined_tiles = _table_images(report)
    _assert_images_loaded(dom, _card_images(report) + joined_tiles * audit["k"] + _table_images(report))
    _assert_cards_show_the_report(dom, report, folder_prefix="figure_files/")
    by_name = {Path(q["source"].split(" (")[0]).name: q for q in audit["queries"]}
    joined = 0
    for tile in dom.find_all("figure"):
        if tile.find("figcaption").text() == "original" or tile.find("figcaption").text().startswith("random"):
            assert tile.find(cls="nbrs") is None
            continue
        query = by_name[Path(tile.find("img").attrs["data-file"]).name]
        _assert_number(tile.find(data_key="copy_score"), query["copy_score"])
        shown = _shown_neighbours(tile)
        assert shown == query["neighbors"]                   # `file` as audit.json names it, relative to audit/
        assert all(audit["class_names"][n["label"]] in li.text() for n, li in zip(shown, tile.find_all("li")))
        joined += 1
    assert joined == len(audit["queries"]) == joined_tiles
    figures = {row.attrs["data-key"]: row for row in dom.find("table", cls="summary").find_all("tr")}
    for key in ("classifier_test_accuracy", "step1_median_feature_error", "step2_median_reached_shift_error",
                "median_pixel_distance_to_reconstruction"):
        assert json.loads(figures[key].attrs["data-value"]) == summary[key]
        assert figures[key].find("td").text() == f"{summary[key]:.3f}"
    assert figures["audit_flagged_copies"].find("td").text() == \
        f"{summary['audit_flagged_copies']} of {summary['audit_queries']}"


def _column(dom: Node, key: str) -> list:
    table = dom.find("table", cls="data")
    col = [th.attrs["data-key"] for th in table.find("thead").find_all("th")].index(key)
    cells = [tr.find_all("td")[col] for tr in table.find("tbody").find_all("tr")]
    return [json.loads(c.attrs["data-value"]) if c.attrs.get("data-value") else None for c in cells]


@needs_browser
@pytest.mark.parametrize("key, descending", [("reached_shift_error", False), ("copy_score", True)])
def test_sorting_by_a_column_reorders_the_rows(demo_dir, tmp_path, key, descending):
    page = write_html(demo_dir)
    before = _column(parse(page.read_text(encoding="utf-8")), key)
    dom = render(page, tmp_path, f"#sort={'-' if descending else ''}{key}")
    after = _column(dom, key)
    values = sorted((v for v in before if v is not None), reverse=descending)
    assert after == values + [None] * before.count(None)     # rows without this number stay last
    assert after != before                                   # the page's own order was not already this one
    th = dom.find("th", data_key=key)
    assert th.attrs["aria-sort"] == ("descending" if descending else "ascending")


@pytest.fixture
def odd_dir(augment_dir, tmp_path):
    """A hand-made report whose file, source and class names hold HTML-special and non-ASCII characters,
    one of whose images was deleted."""
    folder = tmp_path / "odd <&>"
    folder.mkdir()
    stem = 'Ü <i class="pwn">&\'#%?'
    for what in ("original", "reconstruction", "augmented_0"):
        shutil.copyfile(augment_dir / f"000_{what}.png", folder / f"{stem}_{what}.png")
    report = {"images": [{
        "source": 'shirt <i class="pwn">x</i> & ü.png', "label": 3, "label_name": '<i class="pwn">Dress</i> & Ü',
        "predicted": 3,
        "reconstruction": {"file": f"{stem}_reconstruction.png", "feature_error": 0.25, "psnr": 15.0,
                           "predicted": 3, "judge_predicted": None},
        "augmented": [{"file": f"{stem}_augmented_0.png", "reached_shift_error": 0.5, "shift_norm": 1.0,
                       "negative_target_floor": 0.2, "predicted": 3, "judge_predicted": 3, "pixel_distance": 0.1},
                      {"file": "gone é <b>.png", "reached_shift_error": 0.75, "shift_norm": 1.0,
                       "negative_target_floor": 0.125, "predicted": 7, "judge_predicted": 3, "pixel_distance": 0.2}]}],
        "summary": {"images": 1, "step1_median_feature_error": 0.25, "step1_median_psnr": 15.0,
                    "reconstruction_true_label_rate": 1.0, "step2_median_reached_shift_error": 0.75,
                    "step2_median_negative_target_floor": 0.2, "augmented_label_kept_rate": 0.5,
                    "augmented_judge_label_kept_rate": 1.0, "median_pixel_distance_to_reconstruction": 0.2}}
    (folder / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return folder, report


@needs_browser
def test_missing_images_and_special_characters(odd_dir, tmp_path):
    folder, report = odd_dir
    text = write_html(folder).read_text(encoding="utf-8")
    assert 'class="pwn"' not in text and "<b>.png" not in text
    dom = render(folder / "index.html", tmp_path)
    assert not dom.find_all(cls="pwn")                   # no name became markup
    entry = report["images"][0]
    assert entry["source"] in dom.find("h3").text() and entry["label_name"] in dom.find("h3").text()
    assert entry["label_name"] in [td.text() for td in dom.find("table", cls="data").find_all("td")]
    loaded = dom.find_all("img")
    assert len(loaded) == 3 + 2 and all(int(img.attrs["data-natural-width"]) > 0 for img in loaded)
    missing = dom.find_all(cls="missing")
    assert [m.attrs["data-missing"] for m in missing] == ["gone é <b>.png"] * 2   # its tile and its table row
    assert missing[0].text() == "missing: gone é <b>.png"
    assert dom.find(data_key="judge_predicted", data_value="3") is not None
    wrong = [n for n in dom.find_all(cls="wrong")]                 # predicted 7, true label 3
    assert [n.attrs["data-value"] for n in wrong] == ["7"] and wrong[0].find("b").text() == "class 7"


@needs_browser
def test_embedded_page_is_complete_alone(augment_dir, tmp_path):
    page = write_html(augment_dir, embed=True)
    alone = tmp_path / "mailed" / "index.html"
    alone.parent.mkdir()
    shutil.move(page, alone)
    text = alone.read_text(encoding="utf-8")
    _no_network(text)
    dom = render(alone, tmp_path)
    images = dom.find_all("img")
    assert images and all(img.attrs["src"].startswith("data:image/png;base64,") for img in images)
    assert all(int(img.attrs["data-natural-width"]) > 0 for img in images)


# ---------------------------------------------------------------------------------------------
# Without a browser


def test_grid_audit_and_figure_pages_are_written_where_documented(demo_dir):
    assert write_html(demo_dir / "figure.png") == demo_dir / "figure.html"
    assert write_html(demo_dir / "figure.json") == demo_dir / "figure.html"
    assert write_html(demo_dir / "audit") == demo_dir / "audit" / "index.html"
    from isda_viz.outputs.audit_report import read_audit
    from isda_viz.outputs.summary import read_summary

    audit = json.loads((demo_dir / "audit" / "audit.json").read_text())
    assert read_audit(demo_dir / "audit").to_dict() == audit       # the typed files read back to the same JSON
    assert read_summary(demo_dir).to_dict() == json.loads((demo_dir / "summary.json").read_text())
    dom = parse((demo_dir / "audit" / "index.html").read_text(encoding="utf-8"))
    tiles = dom.find_all("figure")
    assert len(tiles) == len(audit["queries"])
    for card, query in zip(tiles, audit["queries"]):
        # the query's own image, found from its recorded source path, relative to the page
        src = card.find("img").attrs["src"]
        assert (demo_dir / "audit" / src).resolve() == Path(query["source"].split(" (")[0]).resolve()
        assert json.loads(card.find(data_key="copy_score").attrs["data-value"]) == query["copy_score"]
    assert _column(dom, "copy_score") == [q["copy_score"] for q in audit["queries"]]


def test_flagged_copies_are_marked(demo_dir, tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(demo_dir, copy)
    audit = json.loads((copy / "audit" / "audit.json").read_text())
    audit["queries"][1]["flagged"] = True
    (copy / "audit" / "audit.json").write_text(json.dumps(audit))
    dom = parse(write_html(copy).read_text(encoding="utf-8"))
    flagged = dom.find_all("figure", cls="flagged")
    name = Path(audit["queries"][1]["source"].split(" (")[0]).name
    assert [Path(f.find("img").attrs["data-file"]).name for f in flagged] == [name]
    assert flagged[0].find(cls="flag").text() == "likely copy"
    assert len(dom.find("table", cls="data").find_all("tr", cls="flagged")) == 1


def _assert_inlined_fragment(fragment: str, images: int):
    assert fragment.startswith('<div class="isda-viz">') and "<html" not in fragment and "<body" not in fragment
    sources = [img.attrs["src"] for img in parse(fragment).find_all("img")]
    assert len(sources) == images and all(s.startswith("data:image/png;base64,") for s in sources)
    _no_network(fragment)


def test_results_display_their_page_inline_in_notebooks(augment_report, demo_run):
    """What augment_images, make_grid and run_audit return shows as the page, images inlined (Jupyter)."""
    augment_dir = augment_report.path.parent
    report = json.loads((augment_dir / "report.json").read_text())
    fragment = augment_report._repr_html_()
    assert fragment == html_fragment(augment_dir) == HtmlView(augment_dir)._repr_html_()
    _assert_inlined_fragment(fragment, _card_images(report) + _table_images(report))

    grid = demo_run["report"]
    assert grid.path == demo_run["dir"] / "figure.json"
    figure = json.loads(grid.path.read_text())
    _assert_inlined_fragment(grid._repr_html_(), _card_images(figure) + _table_images(figure))

    audit = demo_run["audit"]
    q, k = len(audit.report.queries), audit.report.k
    assert audit._repr_html_() == html_fragment(audit.out)
    _assert_inlined_fragment(audit._repr_html_(), q * (1 + k) + q)


def test_old_reports_without_the_new_keys_still_read(augment_dir, tmp_path):
    """Reports written before `original`, `samples` and `class_names` read back, and write back without them."""
    from isda_viz.outputs.report import Report, read_report

    data = json.loads((augment_dir / "report.json").read_text())
    del data["class_names"]
    for entry in data["images"]:
        del entry["original"], entry["samples"]
    (tmp_path / "report.json").write_text(json.dumps(data))
    old = read_report(tmp_path)
    assert old.class_names is None and all(e.original is None and e.samples == [] for e in old.images)
    assert Report.from_dict(old.to_dict()) == old and "original" not in old.to_dict()["images"][0]
    assert Report(images=old.images, summary=old.summary)._repr_html_() is None     # never written: no page
    assert read_report(augment_dir).to_dict() == json.loads((augment_dir / "report.json").read_text())


@needs_browser
def test_embed_flag_of_grid_and_audit_commands_inlines_every_image(tmp_path):
    """`grid --embed` and `audit --embed` print where their page went; it references no file beside it."""
    from click.testing import CliRunner

    from isda_viz.cli.main import main

    fig = tmp_path / "fig.png"
    fast = ["--iterations", "3", "--restarts", "1", "-k", "1"]
    result = CliRunner().invoke(main, ["grid", "--classes", "1", "--samples", "1", *fast, "--embed", "--out", str(fig)])
    assert result.exit_code == 0, result.output
    assert f"page: {tmp_path / 'fig.html'}" in result.output
    result = CliRunner().invoke(main, ["audit", "--from", str(tmp_path / "fig_files"), "--dataset", "fashion-mnist",
                                       "--limit-train", "500", "--limit-test", "100", "--k", "2", "--embed",
                                       "--index-dir", str(tmp_path / "index"), "--out", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    assert f"page: {tmp_path / 'audit' / 'index.html'}" in result.output
    expected = {tmp_path / "fig.html": 4 + 2, tmp_path / "audit" / "index.html": 2 * (1 + 2) + 2}
    for page, images in expected.items():
        text = page.read_text(encoding="utf-8")
        alone = tmp_path / "mailed" / page.parent.name / "index.html"     # the page alone, away from its files
        alone.parent.mkdir(parents=True)
        alone.write_text(text, encoding="utf-8")
        dom = render(alone, tmp_path)
        _assert_images_loaded(dom, images)
        assert all(img.attrs["src"].startswith("data:image/png;base64,") for img in dom.find_all("img"))
        assert not [a for a in dom.find_all("a") if not a.attrs.get("href", "#").startswith("#")]


def test_bad_paths_are_one_line_errors(tmp_path):
    with pytest.raises(IsdaVizError, match="no such folder"):
        write_html(tmp_path / "nothing")
    with pytest.raises(IsdaVizError, match="holds no summary.json, audit.json or report.json"):
        write_html(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(IsdaVizError, match="not valid JSON"):
        write_html(tmp_path)
    (tmp_path / "report.json").write_text('{"images": 3}')
    with pytest.raises(IsdaVizError, match="not a report of augment or grid"):
        write_html(tmp_path)
    assert not (tmp_path / "index.html").exists()
