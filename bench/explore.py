"""Explore's latency as a person sees it: a real headless browser drives the page of `isda-viz explore`.

    python bench/explore.py                  # the shipped pair and its cached inverter, 60 slider moves
    python bench/explore.py --train          # no inverter shipped yet: train one first (InverterOptions(), minutes),
                                             # in a temporary copy of the run (nothing is written beside the package)
    python bench/explore.py --device cuda    # the shipped pair on the GPU, then BigGAN-deep-128 + ResNet-50
                                             # (random weights, an inverter trained 50 steps: timing only)
    python bench/explore.py --screenshot docs/explore.png [--search]   # the README's picture of the page

The page itself times every picture (`window.exploreLatencies`): from the slider's input event (its
`timeStamp`) to the next animation frame after the new picture is decoded in the page. The bench sends real
key presses to a slider (headless chromium through chromedriver), one at a time, waiting for each picture,
alternating sliders and directions (PageUp/PageDown: a tenth of the range, 0.6 standard deviations), after a
warm-up. Printed side by side, per pair: the model work alone (`ExploreSession.move` called directly on the same
positions), the HTTP round trip without a browser (POST /api/move: + JSON, PNG, the server), and the browser's
input event → picture displayed; each median and 90th percentile, and the ratio of medians to the model work.
Then a drag: a pointer drag across a slider (one input event per pointer move, 10 ms apart) without waiting,
how many pictures were computed (the rest coalesced), and how long after the last input event its picture
showed. The target: a median of at most 100 ms for the shipped pair on a 2-core CPU (goal 30 ms).
Run on a quiet machine: only numbers measured in one run compare.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from isda_viz.app import ExploreOptions, explore
from isda_viz.app.browser import headless_chromium
from isda_viz.inversion.amortized import InverterOptions
from isda_viz.inversion.inverter_cache import find_inverter
from isda_viz.inversion.pipelines import VisualizeOptions, make_inverter
from isda_viz.outputs.figures import to_pil
from isda_viz.pretrained import default_classifier

TARGET_MS, GOAL_MS = 100, 30


def percentile(values, q: float) -> float:
    """The q-quantile (0..1) of `values`, linear between order statistics."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def wait_for(driver, script: str, timeout: float = 120.0, poll_ms: int = 2):
    """Wait in the page until `script` (a JS expression) is truthy; its value. The page checks it every
    `poll_ms` on its own timer: one WebDriver call per wait, not one per check, so the waiting does not take
    the CPU the pictures are computed with (a WebDriver round trip every 2 ms costs the 2-core machine about
    a third of a picture)."""
    driver.set_script_timeout(timeout)
    return driver.execute_async_script(
        f"const done = arguments[arguments.length - 1];"
        f"(function check() {{ const value = ({script}); if (value) done(value); else setTimeout(check, {poll_ms}); }})();")


def positions(moves: int, k: int):
    """Slider index and key for each move: sliders in turn, up one round and down the next (t stays in [0, 0.6])."""
    from selenium.webdriver.common.keys import Keys
    return [(i % k, Keys.PAGE_UP if (i // k) % 2 == 0 else Keys.PAGE_DOWN) for i in range(moves)]


def browser_moves(driver, plan) -> list[dict]:
    """The page's timings (`window.exploreLatencies` entries, ms) of the key presses `plan` [(slider, key)], each
    waited for."""
    sliders = driver.find_elements("css selector", "#sliders input")
    driver.execute_script("window.exploreLatencies = []")
    for i, (slider, key) in enumerate(plan):
        sliders[slider].send_keys(key)
        wait_for(driver, f"window.exploreLatencies.length > {i}")
    return driver.execute_script("return window.exploreLatencies")


def drag(driver, app, moves: int) -> dict:
    """A pointer drag across the first slider, `moves` pointer moves 10 ms apart, not waiting for pictures."""
    from selenium.webdriver.common.action_chains import ActionChains
    slider = driver.find_elements("css selector", "#sliders input")[0]
    width = slider.size["width"]
    computed, shown = app.worker.computed, driver.execute_script("return window.explorePictures")
    seq = driver.execute_script("return Number(document.getElementById('current').dataset.seq)")
    chain = ActionChains(driver, duration=10).move_to_element_with_offset(slider, -width // 2 + 2, 0).click_and_hold()
    for _ in range(moves):
        chain.move_by_offset(max(1, (width - 4) // moves), 0)
    started = time.time()
    chain.release().perform()
    sent = time.time() - started
    last = wait_for(driver, "state.seq")                 # the page's count of input events so far
    wait_for(driver, f"document.getElementById('current').dataset.seq === '{last}' && !state.inflight")
    entries = driver.execute_script("return window.exploreLatencies")
    final = next((e["ms"] for e in reversed(entries) if e["seq"] == last), None)
    return {"events": last - seq, "seconds": sent, "computed": app.worker.computed - computed,
            "shown": driver.execute_script("return window.explorePictures") - shown, "final_ms": final}


def slider_values(plan, k: int) -> list[list[float]]:
    """The t vectors a `plan` of key presses leaves the K sliders at (PageUp/PageDown: ±0.6)."""
    from selenium.webdriver.common.keys import Keys
    t, out = [0.0] * k, []
    for slider, key in plan:
        t[slider] = round(t[slider] + (0.6 if key == Keys.PAGE_UP else -0.6), 6)
        out.append(list(t))
    return out


def model_moves(app, view_id: str, targets: list[list[float]]) -> list[float]:
    """The model work alone: `ExploreSession.move` for each slider position, in ms, timed in the app's own worker
    thread (where the page's pictures are computed)."""
    def timed_move(t):
        started = time.perf_counter()
        app.session.move(view_id, t, app.session.options.strength)
        return 1000 * (time.perf_counter() - started)
    return [app.worker.submit(lambda t=t: timed_move(t)).result() for t in targets]


def http_moves(app, view_id: str, targets: list[list[float]]) -> list[float]:
    """POST /api/move round trips without a browser, in ms."""
    times = []
    for i, t in enumerate(targets):
        body = json.dumps({"view": view_id, "t": t, "strength": app.session.options.strength, "seq": i}).encode()
        request = urllib.request.Request(app.url + "api/move", data=body, headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        with urllib.request.urlopen(request) as response:
            response.read()
        times.append(1000 * (time.perf_counter() - started))
    return times


BLOCK = 10   # moves per block; the three ways take turns block by block, so a change of load hits all three


def measure(driver, app, args) -> dict[str, list[float]]:
    """The three ways on the same positions, interleaved in blocks of `BLOCK` moves after a warm-up."""
    k = app.session.k
    plan = positions(args.warmup + args.moves, k)
    browser_moves(driver, plan[:args.warmup])
    view_id = driver.execute_script("return state.view.view")
    values = slider_values(plan, k)
    shown = driver.execute_script("return position().t")
    if args.warmup and shown != values[args.warmup - 1]:   # the bench's model of the keys must be the page's
        raise SystemExit(f"the page's sliders are at {shown}, the bench expected {values[args.warmup - 1]}")
    times = {"model": [], "http": [], "browser": []}
    for start in range(args.warmup, len(plan), BLOCK):
        block = slice(start, min(start + BLOCK, len(plan)))
        times["browser"] += browser_moves(driver, plan[block])
        times["http"] += http_moves(app, view_id, values[block])
        times["model"] += model_moves(app, view_id, values[block])
        model_moves(app, view_id, values[block.stop - 1:block.stop])   # leave the view where the page's sliders are
    return times


def bench_pair(title: str, app, args, profile: Path, upload: Path | None = None) -> None:
    """Every measurement for one running app, printed as one table."""
    driver = headless_chromium(profile)
    try:
        driver.get(app.url)
        wait_for(driver, "document.body.dataset.ready === '1'")
        if upload is not None:   # no test images to pick: upload one, as class 1 (one the random pair has Σ of)
            driver.execute_script("document.getElementById('upload-label').value = '1'")
            driver.find_element("id", "upload-file").send_keys(str(upload))
            wait_for(driver, "state.view && state.view.source.startsWith('upload:')")
        wait_for(driver, "state.view && document.querySelectorAll('#sliders input').length > 0")
        times = measure(driver, app, args)
        dragged = drag(driver, app, args.drag)
    finally:
        driver.quit()
    model, http = times["model"], times["http"]
    browser = [entry["ms"] for entry in times["browser"]]
    base = statistics.median(model)
    threads = app.worker.submit(torch.get_num_threads).result()
    print(f"\n{title}\n  {threads} torch thread(s) in the app's worker, {torch.get_num_threads()} here · pictures by {app.session.move_source.name}, "
          f"{getattr(app.session.move_source, 'refine_steps', '-')} refine steps each · {args.moves} moves after "
          f"{args.warmup} warm-up")
    print(f"  {'':44s} {'median ms':>10s} {'p90 ms':>8s} {'x model':>8s}")
    for name, values in (("model work (ExploreSession.move)", model), ("HTTP round trip (POST /api/move)", http),
                         ("browser: input event -> picture displayed", browser)):
        print(f"  {name:44s} {statistics.median(values):10.1f} {percentile(values, 0.9):8.1f} "
              f"{statistics.median(values) / base:8.2f}")
    parts = {name: statistics.median(entry[name] for entry in times["browser"])
             for name in ("waited_ms", "request_ms", "display_ms")}
    print(f"  {'':4s}of which (medians): input event -> request {parts['waited_ms']:.1f}, request in the browser "
          f"{parts['request_ms']:.1f}, response -> picture displayed {parts['display_ms']:.1f}")
    median = statistics.median(browser)
    verdict = "met" if median <= TARGET_MS else "MISSED"
    goal = "met" if median <= GOAL_MS else "not met"
    print(f"  target median <= {TARGET_MS} ms: {verdict}; goal {GOAL_MS} ms: {goal}")
    final = "n/a" if dragged["final_ms"] is None else f"{dragged['final_ms']:.0f} ms"
    print(f"  drag: {dragged['events']} input events in {dragged['seconds']:.2f} s -> {dragged['computed']} pictures "
          f"computed, {dragged['shown']} shown ({dragged['events'] - dragged['computed']} coalesced); last event -> "
          f"its picture: {final}")


def shipped_app(args, work: Path):
    """The shipped pair (or --classifier) with its inverter, trained first into a copy of the run with --train."""
    classifier = args.classifier or str(default_classifier())
    options = VisualizeOptions(classifier=classifier, device=args.device, progress=False,
                               refine_steps=args.refine_steps)
    models = options.load_models()
    if find_inverter(models) is None:
        if not args.train:
            raise SystemExit(f"the classifier {classifier} has no trained inverter with this generator: ship or "
                             "train one (`isda-viz train-inverter`), or pass --train")
        copy = work / "run"
        shutil.copytree(classifier, copy)
        options = VisualizeOptions(classifier=str(copy), device=args.device, progress=False,
                                   refine_steps=args.refine_steps)
        started = time.time()
        make_inverter(options, InverterOptions(steps=args.train_steps))
        print(f"trained the pair's inverter ({args.train_steps} steps) in {time.time() - started:.0f} s")
        models = options.load_models()
    return explore(ExploreOptions(visualize=options, port=0, per_class=1, save_dir=str(work / "saves")),
                   models=models)


def gpu_app(args, work: Path):
    """BigGAN-deep-128 + ResNet-50 (random weights) with a briefly trained inverter (`bench/inversion.py`'s), and
    a picture of the generator's to upload."""
    sys.path.insert(0, str(Path(__file__).parent))
    from inversion import gpu_inverter, gpu_models
    models = gpu_models(args.device)
    inverter = gpu_inverter(models)
    with torch.no_grad():
        z = models.generator.sample_latent(1, torch.Generator().manual_seed(3), models.classifier.device)
        picture = models.adapter().pixels(z, torch.tensor([1], device=models.classifier.device))[0]
    upload = work / "sample.png"
    to_pil(picture.cpu()).save(upload)
    options = VisualizeOptions(classifier="torchvision:resnet50", device=args.device, progress=False,
                               refine_steps=args.refine_steps)
    app = explore(ExploreOptions(visualize=options, port=0, save_dir=str(work / "gpu-saves")), models=models,
                  inverter=inverter)
    return app, upload


def screenshot(app, path: Path, profile: Path, thumbnail: int, t: list[float]) -> None:
    """The README's picture of the page: test image `thumbnail` opened, the sliders at `t`, one draw."""
    driver = headless_chromium(profile, height=1120)
    try:
        driver.get(app.url)
        wait_for(driver, "document.body.dataset.ready === '1'", 3600)
        driver.execute_script(f"return openThumbnail({thumbnail})")
        wait_for(driver, f"state.view && document.querySelector('.thumb.selected').dataset.index === '{thumbnail}'"
                         " && document.getElementById('status').textContent === ''", 3600)
        driver.execute_script("document.querySelectorAll('#sliders input').forEach((s, k) => "
                              "{ s.value = arguments[0][k]; }); onSliderInput(null);", t)
        wait_for(driver, "!state.inflight && !state.latest && document.getElementById('current').dataset.seq === "
                         "String(state.seq)", 3600)
        driver.find_element("id", "draw").click()
        wait_for(driver, "document.querySelectorAll('#draws figure').length === 16", 3600)
        time.sleep(0.5)
        driver.save_screenshot(str(path))
    finally:
        driver.quit()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default=None, help="RUN_DIR (default: the shipped ISDA ResNet-32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--moves", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--drag", type=int, default=40, help="pointer moves in the drag")
    parser.add_argument("--refine-steps", type=int, default=None,
                        help="optimiser steps per slider picture (default: explore's, 0)")
    parser.add_argument("--train", action="store_true", help="train the pair's inverter first if it has none")
    parser.add_argument("--train-steps", type=int, default=InverterOptions().steps)
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="instead of timing: save a screenshot of the page here (test image --thumbnail, the "
                             "sliders at --t, one draw); with --search, the pictures of the search")
    parser.add_argument("--thumbnail", type=int, default=3)
    parser.add_argument("--t", type=lambda text: [float(v) for v in text.split(",")], default=[2.0, 0, -1.5, 0, 0])
    parser.add_argument("--search", action="store_true", help="--screenshot: the search makes the pictures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="isda-viz-bench-explore-") as folder:
        work = Path(folder)
        if args.screenshot is not None:
            options = VisualizeOptions(classifier=args.classifier, device=args.device, progress=False,
                                       refine_steps=args.refine_steps, inverter="search" if args.search else None)
            with explore(ExploreOptions(visualize=options, port=0, per_class=4, save_dir=str(work / "saves"))) as app:
                screenshot(app, args.screenshot, work / "profile", args.thumbnail, args.t)
            return
        with shipped_app(args, work) as app:
            bench_pair(f"shipped pair ({app.session.models.classifier.source}) on {args.device}", app, args,
                       work / "profile")
        if args.device.startswith("cuda"):
            app, upload = gpu_app(args, work)
            with app:
                bench_pair(f"BigGAN-deep-128 + ResNet-50 (random weights) on {args.device}", app, args,
                           work / "profile-gpu", upload)


if __name__ == "__main__":
    main()
