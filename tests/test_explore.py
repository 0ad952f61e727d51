"""`isda-viz explore` (`isda_viz.app`) on a tiny pair: a ResNet-8 trained for one epoch, a small random WGAN
generator and a 12-step amortized inverter. The API against the library called directly (bit for bit), the
coalescing worker, concurrency, binding, file routes, saves, bad input through the console script, Ctrl-C,
and the page in a real browser (Debian's chromium through chromedriver and selenium; skipped without them)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from isda_viz.app import ExploreOptions, explore
from isda_viz.app.server import STATIC
from isda_viz.app.session import MAX_VIEWS, check_position
from isda_viz.app.worker import Busy, Worker
from isda_viz.classifiers.classifier import load_classifier
from isda_viz.classifiers.statistics import class_statistics
from isda_viz.errors import IsdaVizError
from isda_viz.generators import load_generator
from isda_viz.generators.wgan import WGANGenerator, recompute_batchnorm_statistics, save_generator
from isda_viz.inversion.adapter import Models
from isda_viz.inversion.amortized import InverterOptions
from isda_viz.inversion.inverter_cache import find_inverter
from isda_viz.inversion.optimizer import InversionOptions
from isda_viz.inversion.pipeline import augment_batch, draw_prior, reconstruct_batch
from isda_viz.inversion.pipelines import VisualizeOptions, images_per_class, make_inverter
from isda_viz.inversion.starts import REFINE_STEPS, AmortizedStart, FromCodes
from isda_viz.isda.directions import class_directions, combined_traversal_target, traversal_targets
from isda_viz.outputs.figures import to_pil
from isda_viz.outputs.report import read_report

TINY = InverterOptions(steps=12, batch_size=16, real_images=128, hidden=32, rank=4, lr=3e-3,
                       reconstruct_passes=2, augment_passes=2)
PER_CLASS = 2
STEPS = 2          # the tiny app's --refine-steps: Step I and every slider picture
SCRIPT = Path(sys.executable).parent / "isda-viz"


def _generator(folder: Path) -> Path:
    torch.manual_seed(0)
    generator = WGANGenerator(latent_dim=16, num_classes=10, width=8)
    recompute_batchnorm_statistics(generator, 2, 32, torch.Generator().manual_seed(0))
    folder.mkdir(parents=True, exist_ok=True)
    save_generator(generator, folder / "generator.pt", iteration=0, dataset="fashion-mnist")
    return folder


@pytest.fixture(scope="module")
def pair(tiny_run, tiny_ce_run, tmp_path_factory):
    """The classifier's run folder (copied: its inverter stays here), the generator, the judge; the inverter trained."""
    run = tmp_path_factory.mktemp("explore") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("inverters"))
    gan = _generator(tmp_path_factory.mktemp("explore-gan") / "gan")
    options = VisualizeOptions(classifier=str(run), generator=str(gan), judge=str(tiny_ce_run), progress=False)
    make_inverter(options, TINY)
    return run, gan, tiny_ce_run


def _options(pair, **overrides) -> VisualizeOptions:
    run, gan, judge = pair
    fields = dict(classifier=str(run), generator=str(gan), judge=str(judge), progress=False, refine_steps=STEPS,
                  strength=0.5)
    return VisualizeOptions(**{**fields, **overrides})


@pytest.fixture(scope="module")
def app(pair, tmp_path_factory):
    saves = tmp_path_factory.mktemp("explore-saves") / "saves"
    started = explore(ExploreOptions(visualize=_options(pair), per_class=PER_CLASS, port=0, save_dir=str(saves)))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def search_app(pair, tmp_path_factory):
    """The same pair without its inverter (a fresh copy of the run): the search, kept tiny."""
    run = tmp_path_factory.mktemp("explore-search") / "run"
    shutil.copytree(pair[0], run, ignore=shutil.ignore_patterns("inverters"))
    options = _options((run, *pair[1:]), refine_steps=None, inversion=InversionOptions.make(iterations=2, restarts=1))
    started = explore(ExploreOptions(visualize=options, per_class=1, port=0,
                                     save_dir=str(tmp_path_factory.mktemp("search-saves"))))
    yield started
    started.stop()


def _request(app, path: str, body=None, content_type="application/json", headers=None):
    """(status, JSON answer) of GET (no body) or POST `body` (a dict as JSON, or bytes)."""
    data = None if body is None else (json.dumps(body).encode() if isinstance(body, dict) else body)
    request = urllib.request.Request(app.url.rstrip("/") + path, data=data,
                                     headers={**({"Content-Type": content_type} if data is not None else {}),
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(app, path: str, body) -> dict:
    status, answer = _request(app, path, body)
    assert status == 200, answer
    return answer


def _png(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


# -- the maths and the library ---------------------------------------------------------------------------------
def test_combined_traversal_target_is_the_float64_sum_and_one_direction_is_traversal_targets_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 12, generator=g)
    vectors = torch.linalg.qr(torch.randn(3, 12, 12, generator=g, dtype=torch.float64))[0][:, :, :4].transpose(1, 2)
    values = torch.rand(3, 4, generator=g, dtype=torch.float64) * 5
    t = torch.rand(3, 4, generator=g, dtype=torch.float64) * 6 - 3
    got = combined_traversal_target(a, vectors, values, 0.7, t)
    reference = a.double() + sum(t[:, k, None] * (0.7 * values[:, k, None]).sqrt() * vectors[:, k] for k in range(4))
    assert got.dtype == a.dtype and torch.allclose(got.double(), reference, atol=1e-6, rtol=0)
    one = torch.zeros(3, 4, dtype=torch.float64)
    one[:, 2] = 1.3
    single = traversal_targets(a, vectors, values, 0.7, torch.tensor([1.3], dtype=torch.float64))[:, 2, 0]
    assert torch.equal(combined_traversal_target(a, vectors, values, 0.7, one), single)
    assert torch.equal(combined_traversal_target(a, vectors, values, 0.7, torch.zeros(3, 4)), a)


def test_the_api_gives_the_library_s_pictures_bit_for_bit(app):
    view = _post(app, "/api/open", {"thumbnail": 3})
    moved = _post(app, "/api/move", {"view": view["view"], "t": [0, 1.7, 0, 0, 0], "strength": 0.8, "seq": 7})
    assert moved["seq"] == 7
    session, models = app.session, app.session.models
    images, labels, _ = images_per_class(models.classifier, PER_CLASS, None)
    image, label = images[3:4], labels[3:4]
    inverter = find_inverter(models)
    options = session.options
    source = AmortizedStart(inverter, STEPS, options.inversion)
    prior = draw_prior(models, 1, options.inversion.restarts, torch.Generator().manual_seed(options.seed))
    in_worker = lambda fn: app.worker.submit(fn).result()  # noqa: E731 - the app's threads, so the same kernels
    step1 = in_worker(lambda: reconstruct_batch(models, image, label, source, prior, progress=False))
    sigma = class_statistics(models.classifier, classes=[int(label)]).covariance(int(label))
    directions = class_directions(sigma, 5)
    t = torch.tensor([1.7], dtype=torch.float64)
    wanted = traversal_targets(step1.features, directions.vectors[None], directions.values[None], 0.8, t)[:, 1]
    step2 = in_worker(lambda: augment_batch(models, step1, wanted, source, progress=False))
    shown = session.view(view["view"])
    assert torch.equal(shown.step1.reconstructions, step1.reconstructions)
    assert torch.equal(shown.current.pixels, step2.pictures[0, 0])
    assert _png(moved["png"]).tobytes() == to_pil(step2.pictures[0, 0]).tobytes()
    assert _png(view["reconstruction"]["png"]).tobytes() == to_pil(step1.reconstructions[0]).tobytes()
    assert moved["reached_shift_error"] == float(step2.reached_shift_error[0, 0])
    assert moved["predicted"] == step2.pictures_predicted[0][0] and moved["judged"] == step2.pictures_judged[0][0]
    logits = models.classifier.logits(step2.pictures[0]).double()
    assert moved["top"][0][0] == int(logits.argmax()) == moved["predicted"]
    assert abs(moved["top"][0][1] - float(torch.softmax(logits, 1).max())) < 1e-12
    assert [d["share"] for d in view["directions"]] == directions.shares.tolist()

    refined = _post(app, "/api/refine", {"view": view["view"]})       # REFINE_STEPS more from the code on screen
    again = in_worker(lambda: augment_batch(models, step1, wanted,
                                            FromCodes(None, step2.z, REFINE_STEPS, options.inversion), progress=False))
    assert _png(refined["png"]).tobytes() == to_pil(again.pictures[0, 0]).tobytes()
    assert refined["reached_shift_error"] == float(again.reached_shift_error[0, 0])

    home = _post(app, "/api/move", {"view": view["view"], "t": [0] * 5, "strength": 0.8, "seq": 8})
    assert home["reached_shift_error"] is None and home["png"] == view["reconstruction"]["png"]


def test_draw_inverts_8_isda_and_8_isotropic_draws_of_the_same_expected_norm(app):
    view = _post(app, "/api/open", {"thumbnail": 0})
    drawn = _post(app, "/api/draw", {"view": view["view"], "strength": 0.5})
    assert len(drawn["isda"]) == len(drawn["isotropic"]) == 8
    names = app.session.models.classifier.class_names
    for picture in drawn["isda"] + drawn["isotropic"]:
        assert _png(picture["png"]).size == (28, 28) and 0 <= picture["predicted"] < len(names)
    stored = app.session.view(view["view"]).drawn
    label = app.session.view(view["view"]).label
    shift = stored.wanted.double() - app.session.view(view["view"]).step1.features.double()
    trace = float(class_statistics(app.session.models.classifier, classes=[label]).covariance(label).trace())
    assert stored.isda.shape == stored.isotropic.shape == (8, 1, 28, 28)
    assert 0.05 * 0.5 * trace < float(shift.pow(2).sum(1).mean()) < 20 * 0.5 * trace    # ~ λ tr Σ_y each
    second = _post(app, "/api/draw", {"view": view["view"], "strength": 0.5})
    assert second["isda"][0]["png"] != drawn["isda"][0]["png"]                         # the next draw is new
    status, answer = _request(app, "/api/draw", {"view": view["view"], "strength": 0})
    assert status == 400 and "λ is 0" in answer["error"]


def test_save_writes_augment_s_folder_and_report_and_cannot_leave_the_save_folder(app):
    view = _post(app, "/api/open", {"thumbnail": 5})
    moved = _post(app, "/api/move", {"view": view["view"], "t": [1.0, 0, -0.5, 0, 0], "strength": 0.6, "seq": 1})
    _post(app, "/api/draw", {"view": view["view"], "strength": 0.6})
    saved = _post(app, "/api/save", {"view": view["view"], "name": "my-save"})
    folder = Path(saved["folder"])
    assert folder == app.session.save_dir / "my-save"
    report = read_report(folder)
    entry = report.images[0]
    assert len(entry.augmented) == 9 and report.settings.strength == 0.6 and report.settings.num_augmented == 9
    assert entry.augmented[0].reached_shift_error == moved["reached_shift_error"]
    assert Image.open(folder / entry.augmented[0].file).tobytes() == _png(moved["png"]).tobytes()
    assert Image.open(folder / entry.reconstruction.file).tobytes() == _png(view["reconstruction"]["png"]).tobytes()
    assert Image.open(folder / entry.original.file).tobytes() == _png(view["original"]).tobytes()
    assert all((folder / a.file).is_file() for a in entry.augmented) and (folder / "grid.png").is_file()
    assert entry.label == view["label"] and len(entry.augmented[0].direction_shares) == 6
    assert _post(app, "/api/save", {"view": view["view"], "name": "my-save"})["folder"] == str(folder)  # replaced
    automatic = Path(_post(app, "/api/save", {"view": view["view"]})["folder"])
    assert automatic.parent == app.session.save_dir and (automatic / "report.json").is_file()

    outside = sorted(p.name for p in app.session.save_dir.parent.iterdir())
    for name in ["../escape", "/tmp/escape", "..", ".", ".hidden", "a/b", "a\\b", "%2e%2e", "x" * 65, "", 3]:
        status, answer = _request(app, "/api/save", {"view": view["view"], "name": name})
        if name == "":   # empty: the automatic name
            assert status == 200 and Path(answer["folder"]).parent == app.session.save_dir
            continue
        assert status == 400 and "save name" in answer["error"], (name, answer)
    assert sorted(p.name for p in app.session.save_dir.parent.iterdir()) == outside
    (app.session.save_dir / "not-ours").mkdir()
    (app.session.save_dir / "not-ours" / "mine.txt").write_text("keep")
    status, answer = _request(app, "/api/save", {"view": view["view"], "name": "not-ours"})
    assert status == 400 and (app.session.save_dir / "not-ours" / "mine.txt").read_text() == "keep"


# -- the worker, concurrency, binding, routes --------------------------------------------------------------------
def test_the_worker_coalesces_waiting_moves_to_the_latest_and_bounds_its_queue():
    worker = Worker(max_pending=3)
    release = threading.Event()
    try:
        blocking = worker.submit(lambda: release.wait(10) and "first")
        time.sleep(0.05)
        futures = [worker.submit(lambda i=i: i, key="view") for i in range(10)]
        other = worker.submit(lambda: "other", key="another view")
        plain = worker.submit(lambda: "plain")
        with pytest.raises(Busy):
            worker.submit(lambda: "too many")
        assert worker.pending == 3
        release.set()
        assert blocking.result(10) == "first"
        assert [f.result(10) for f in futures] == [9] * 10          # every caller answered, with the latest
        assert other.result(10) == "other" and plain.result(10) == "plain"
        assert worker.computed == 4 and worker.coalesced == 9
        failing = worker.submit(lambda: (_ for _ in ()).throw(IsdaVizError("bad")))
        with pytest.raises(IsdaVizError):
            failing.result(10)
        assert worker.submit(lambda: "still serving").result(10) == "still serving"
    finally:
        release.set()
        worker.stop()


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_twenty_concurrent_requests_are_all_answered_and_memory_stays_bounded(app):
    views = [_post(app, "/api/open", {"thumbnail": i})["view"] for i in (1, 2)]
    asked = [(views[i % 2], [round(-2 + 0.2 * i, 1), 0, 0, 0, 0], i) for i in range(20)]

    def move(item):
        view, t, seq = item
        return _request(app, "/api/move", {"view": view, "t": t, "strength": 0.5, "seq": seq})

    threads, rss = threading.active_count(), _rss_bytes()
    before = app.worker.computed + app.worker.coalesced
    for _ in range(2):
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(move, asked))
        assert [status for status, _ in answers] == [200] * 20
        for (view, _, _), (_, answer) in zip(asked, answers):
            shown = asked[answer["seq"]]                      # its own position or a later one of its view
            assert shown[0] == view and answer["t"] == shown[1] and answer["png"].startswith("data:image/png")
    assert app.worker.computed + app.worker.coalesced - before == 40 and app.worker.pending == 0
    answered = {answer["seq"]: answer for _, answer in answers}
    for seq in sorted(answered)[-3:]:                         # a shared answer is the picture of its position
        view, t, _ = asked[seq]
        fresh = _post(app, "/api/move", {"view": view, "t": t, "strength": 0.5, "seq": 99})
        assert fresh["png"] == answered[seq]["png"]
    for i in range(MAX_VIEWS + 3):
        _post(app, "/api/open", {"thumbnail": i % len(app.session.thumbnails)})
    assert len(app.session.views) == MAX_VIEWS
    status, answer = _request(app, "/api/move", {"view": views[0], "t": [0] * 5, "strength": 0.5, "seq": 0})
    assert status == 410 and "pick it again" in answer["error"]
    deadline = time.time() + 5
    while threading.active_count() > threads and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= threads
    assert _rss_bytes() - rss < 300 * 2**20


def _other_addresses() -> set[str]:
    """IPv4 addresses of this machine that are not 127.0.0.1 (127.0.0.2 is always one on Linux)."""
    found = {"127.0.0.2"}
    try:
        found |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except OSError:
        pass
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:   # the source address of the default route; UDP connect sends nothing
        probe.connect(("192.0.2.1", 9))
        found.add(probe.getsockname()[0])
    except OSError:
        pass
    finally:
        probe.close()
    return found - {"127.0.0.1", "0.0.0.0"}


def test_the_app_binds_127_0_0_1_only(app):
    assert app.server.server_address[0] == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", app.port), timeout=5):
        pass
    for address in sorted(_other_addresses()):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, app.port), timeout=5).close()


def _raw_get(app, path: str, host: str | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", app.port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_file_routes_refuse_path_traversal_and_serve_only_the_page_s_files(app):
    status, page = _raw_get(app, "/")
    assert status == 200 and b"/static/explore.js" in page
    for name in STATIC:
        assert _raw_get(app, f"/static/{name}") == (200, STATIC[name][0])
    for path in ["/static/../session.py", "/static/%2e%2e/session.py", "/static/..%2fsession.py",
                 "/static/%2E%2E%2Fsession.py", "/static//etc/passwd", "/static/%2Fetc%2Fpasswd",
                 "/../../../etc/passwd",
                 "/static/explore.js/../../session.py", "/static/./explore.js", "/static/..\\session.py",
                 "/%2e%2e/%2e%2e/etc/passwd", "/static/", "/etc/passwd", "//etc/passwd", "/api/../static/explore.js",
                 "/static/%00explore.js"]:
        status, body = _raw_get(app, path)
        assert status == 404, path
        assert b"import" not in body and b"root:" not in body and json.loads(body)["error"] == "no such page"


def test_the_page_asks_nothing_of_the_network():
    for name, (data, _) in STATIC.items():
        text = data.decode("utf-8")
        assert not re.search(r"https?:|[\"'(]//|@import|<iframe", text), name


def test_bad_requests_get_a_message_and_the_app_keeps_serving(app):
    view = _post(app, "/api/open", {"thumbnail": 0})["view"]
    cases = [
        ("/api/move", {"view": view, "t": [9, 0, 0, 0, 0], "strength": 0.5}, 400, "must lie in"),
        ("/api/move", {"view": view, "t": [0, 0], "strength": 0.5}, 400, "5 numbers"),
        ("/api/move", {"view": view, "t": [0] * 5, "strength": -1}, 400, "λ must be >= 0"),
        ("/api/move", {"view": view, "t": ["x", 0, 0, 0, 0], "strength": 0.5}, 400, "finite numbers"),
        ("/api/move", {"view": "nope", "t": [0] * 5, "strength": 0.5}, 410, "pick it again"),
        ("/api/open", {"thumbnail": 10_000}, 400, "no thumbnail"),
        ("/api/open", {"thumbnail": "3"}, 400, "thumbnail's index"),
        ("/api/nothing", {}, 404, "no such action"),
    ]
    for path, body, status, message in cases:
        got, answer = _request(app, path, body)
        assert got == status and message in answer["error"], (path, body, answer)
    got, answer = _request(app, "/api/move", b'{"view": "%s", "t": [NaN, 0, 0, 0, 0], "strength": 0.5}' % view.encode())
    assert got == 400 and "finite" in answer["error"]
    got, answer = _request(app, "/api/move", b"not json")
    assert got == 400 and "not JSON" in answer["error"]
    got, answer = _request(app, "/api/move", b"{}", content_type="text/plain")
    assert got == 415
    got, answer = _request(app, "/api/upload?label=Unicorn", _png_bytes(), content_type="application/octet-stream")
    assert got == 400 and "class Unicorn is not a class" in answer["error"]
    got, answer = _request(app, "/api/upload", b"just some text", content_type="application/octet-stream")
    assert got == 400 and "cannot read image" in answer["error"] and "uploaded file" in answer["error"]
    got, answer = _request(app, "/api/upload?label=Bag&name=mine.png", _png_bytes(),
                           content_type="application/octet-stream")
    assert got == 200 and answer["label"] == 8 and answer["source"] == "upload:mine.png"
    assert _raw_get(app, "/api/state", host="evil.example:80")[0] == 421    # DNS rebinding
    with pytest.raises(IsdaVizError, match="finite"):
        check_position([float("inf")] * 5, 0.5, 5)
    assert _request(app, "/api/state")[0] == 200


def test_an_upload_over_the_limit_is_refused_before_it_is_read(app, monkeypatch):
    import isda_viz.app.server as server
    monkeypatch.setattr(server, "MAX_UPLOAD_BYTES", 1000)
    got, answer = _request(app, "/api/upload", b"x" * 2000, content_type="application/octet-stream")
    assert got == 413 and "at most" in answer["error"]
    monkeypatch.setenv("ISDA_VIZ_MAX_IMAGE_PIXELS", "100")      # augment's decompression-bomb limit
    got, answer = _request(app, "/api/upload", _png_bytes(), content_type="application/octet-stream")
    assert got == 400 and "decompression bomb" in answer["error"]


def _png_bytes(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_pair_without_an_inverter_searches_and_says_each_picture_takes_seconds(search_app):
    status, state = _request(search_app, "/api/state")
    assert status == 200 and state["searching"] and state["inverter"] == "search"
    assert any("seconds" in note for note in state["notes"])
    view = _post(search_app, "/api/open", {"thumbnail": 0})
    moved = _post(search_app, "/api/move", {"view": view["view"], "t": [1, 0, 0, 0, 0], "strength": 0.5, "seq": 1})
    assert moved["reached_shift_error"] is not None


# -- the Python object and the command --------------------------------------------------------------------------
def test_explore_from_python_shows_an_iframe_and_stops(pair, tmp_path):
    models = Models(load_classifier(pair[0], "cpu"), load_generator(str(pair[1]), "cpu"), None, None)
    with explore(ExploreOptions(visualize=_options(pair), per_class=1, port=0, save_dir=str(tmp_path / "s")),
                 models=models) as started:
        assert f'<iframe src="{started.url}"' in started._repr_html_() and started.running
        assert _request(started, "/api/state")[0] == 200
        port = started.port
    assert not started.running and "stopped" in repr(started) and "has stopped" in started._repr_html_()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert not (tmp_path / "s").exists()                                       # nothing saved, nothing made
    warnings = []
    with explore(ExploreOptions(visualize=_options(pair), per_class=1, port=0, host="0.0.0.0",
                                save_dir=str(tmp_path / "s")), models=models, warn=warnings.append):
        pass
    assert len(warnings) == 1 and "serves the page to the network" in warnings[0]


def _cli(args: list, cwd: Path, tmp_path: Path, **popen):
    environment = {**os.environ, "ISDA_VIZ_OFFLINE": "1", "ISDA_VIZ_CACHE": str(tmp_path / "cache"),
                   "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(SCRIPT), "explore", *map(str, args)], cwd=cwd, env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_bad_options_are_one_error_line_and_nothing_is_written(pair, tmp_path, monkeypatch):
    """Through the command group (`cli.main`, the one error boundary), in this process: the console script
    itself is run by the Ctrl-C test below."""
    from click.testing import CliRunner

    from isda_viz.cli.main import main
    run, gan, _ = pair
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    models = ["--classifier", run, "--generator", gan, "--port", "0"]
    cases = [(["--port", "70000"], "--port must be a whole number from 0 to 65535"),
             (["--port", busy.getsockname()[1]], "is in use"),
             (["--strength", "nan"], "--strength must be a finite number"),
             (["--directions", "0"], "--directions must be"),
             ([*models, "--classes", "Unicorn"], "--classes Unicorn is not a class"),
             ([*models, "--directions", "100"], "--directions must be between 1 and the classifier's 64"),
             (["--classifier", tmp_path / "nowhere", "--port", "0"], "no classifier run at"),
             (["--host", "203.0.113.7", "--port", "0"], "not an address of this machine")]
    try:
        for args, message in cases:
            work = tmp_path / f"work{len(list(tmp_path.iterdir()))}"
            work.mkdir()
            monkeypatch.chdir(work)
            result = CliRunner().invoke(main, ["explore", *map(str, args)])
            lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
            assert result.exit_code == 1 and "Traceback" not in result.output, (args, result.output)
            assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], (args, result.stderr)
            assert list(work.iterdir()) == [], args                              # no save folder made
    finally:
        busy.close()


def test_the_command_serves_until_ctrl_c_and_stops_cleanly(pair, tmp_path):
    run, gan, _ = pair
    process = _cli(["--classifier", run, "--generator", gan, "--port", "0", "--per-class", "1",
                    "--refine-steps", "0"], tmp_path, tmp_path)
    try:
        line = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert url, line + process.stderr.read()
        with urllib.request.urlopen(url.group(0) + "api/state", timeout=60) as response:
            state = json.loads(response.read())
        assert len(state["thumbnails"]) == 10 and state["inverter"] == "amortized"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and "stopped" in out and "Traceback" not in err, err
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(url.group(1))), timeout=5).close()


# -- the page in a real browser ---------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    SELENIUM = True
except ImportError:
    SELENIUM = False
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None or not SELENIUM,
    reason="the explore page's browser tests need Debian's chromium and chromium-driver and the selenium package "
           "(./run test installs them where apt exists)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from isda_viz.app.browser import headless_chromium
    driver = headless_chromium(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()


def _load(browser, app):
    browser.get(app.url)
    _wait(browser, lambda: browser.execute_script("return document.body.dataset.ready === '1'"), 60)


def _wait(browser, condition, seconds):
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, seconds, poll_frequency=0.02).until(lambda _: condition())


@needs_browser
def test_the_page_loads_with_no_failed_request(browser, app):
    browser.get_log("browser")   # empty the log
    _load(browser, app)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    resources = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => [e.name, e.responseStatus])")
    assert resources and all(name.startswith(app.url) and status == 200 for name, status in resources), resources
    assert len(browser.find_elements("css selector", ".thumb")) == 10 * PER_CLASS
    assert browser.find_element("id", "current").get_attribute("src").startswith("data:image/png")
    labels = [e.text for e in browser.find_elements("css selector", "#sliders label")]
    assert len(labels) == 5 and all(re.fullmatch(r"u\d · \d+\.\d% of tr Σ_y", text) for text in labels), labels


@needs_browser
def test_moving_a_direction_slider_changes_the_picture_and_its_class_text_within_2_s(browser, app):
    from selenium.webdriver.common.keys import Keys
    _load(browser, app)
    current, caption = browser.find_element("id", "current"), browser.find_element("id", "current-class")
    before, text = current.get_attribute("src"), caption.text
    slider = browser.find_element("id", "u1")
    for _ in range(12):
        slider.send_keys(Keys.ARROW_RIGHT)                 # real input events, t = +1.2
    _wait(browser, lambda: current.get_attribute("data-seq") == "12", 2)
    assert current.get_attribute("src") != before
    assert caption.text != text and "reached-shift error" in caption.text
    latencies = browser.execute_script("return window.exploreLatencies")
    assert latencies and latencies[-1]["seq"] == 12


@needs_browser
def test_draw_shows_16_pictures(browser, app):
    _load(browser, app)
    browser.find_element("id", "draw").click()
    _wait(browser, lambda: len(browser.find_elements("css selector", "#draws figure")) == 16, 60)
    captions = [e.text for e in browser.find_elements("css selector", "#draws figcaption")]
    assert all(c in app.session.models.classifier.class_names for c in captions), captions


@needs_browser
def test_an_uploaded_text_file_shows_an_error_and_the_next_slider_move_still_works(browser, app, tmp_path):
    from selenium.webdriver.common.keys import Keys
    _load(browser, app)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image\n")
    browser.find_element("id", "upload-file").send_keys(str(text_file))
    message = browser.find_element("id", "message")
    _wait(browser, lambda: message.is_displayed() and "cannot read image" in message.text, 30)
    current = browser.find_element("id", "current")
    before = current.get_attribute("src")
    browser.find_element("id", "u2").send_keys(Keys.ARROW_LEFT)
    _wait(browser, lambda: current.get_attribute("src") != before, 10)
    _wait(browser, lambda: not message.is_displayed(), 5)


@needs_browser
def test_the_page_of_a_pair_without_an_inverter_says_pictures_take_seconds(browser, search_app):
    _load(browser, search_app)
    assert "seconds" in browser.find_element("id", "notes").text


def test_the_worker_computes_with_one_cpu_thread_and_leaves_the_callers_alone(app):
    before = torch.get_num_threads()
    assert app.worker.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == before
