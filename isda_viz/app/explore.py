"""`isda-viz explore` and `isda_viz.explore(...)`: start the app, show it, stop it.

`explore(options)` binds the port, loads the models, opens the session (`app.session`) and serves the page
(`app.server`) from background threads, and returns an `ExploreApp`: in Jupyter it shows the page inline (an
iframe); `.stop()` ends it; `.wait()` blocks until Ctrl-C (what the command does).
"""

from __future__ import annotations

import errno
import html
import math
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from isda_viz.app.server import ExploreServer, serve_in_thread
from isda_viz.app.session import ExploreSession
from isda_viz.app.worker import Worker
from isda_viz.errors import IsdaVizError
from isda_viz.inversion.adapter import Models
from isda_viz.inversion.amortized import AmortizedInverter
from isda_viz.inversion.pipelines import VisualizeOptions, check_distinct_classes, check_models

DEFAULT_PORT = 8765
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(kw_only=True)
class ExploreOptions:
    """What `isda-viz explore` serves: `visualize` (the models, λ's start `strength`, `inverter`,
    `refine_steps` for the slider's pictures, `device`, ...), `directions` K sliders, `per_class` thumbnails
    of each of `classes` (names or indices, default all), `save_dir` where "save" writes, and where it
    listens: `host` (default 127.0.0.1, this machine only) and `port` (0: a free one)."""

    visualize: VisualizeOptions = field(default_factory=VisualizeOptions)
    directions: int = 5
    per_class: int = 4
    classes: list[str] | None = None
    save_dir: str = "explore-saves"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        """Raise `IsdaVizError` for values no app can use (before any model is loaded)."""
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise IsdaVizError(f"--port must be a whole number from 0 to 65535 (0: a free port), not {self.port!r}")
        if not isinstance(self.host, str) or not self.host.strip():
            raise IsdaVizError("--host must name an address to listen on, e.g. 127.0.0.1")
        if isinstance(self.directions, bool) or not isinstance(self.directions, int) or self.directions < 1:
            raise IsdaVizError(f"--directions must be a whole number >= 1, not {self.directions!r}")
        if isinstance(self.per_class, bool) or not isinstance(self.per_class, int) or not 1 <= self.per_class <= 100:
            raise IsdaVizError(f"--per-class must be a whole number from 1 to 100, not {self.per_class!r}")
        check_distinct_classes(self.classes)
        if not math.isfinite(self.visualize.strength):   # VisualizeOptions checks it too; say it for explore
            raise IsdaVizError(f"--strength must be a finite number >= 0, not {self.visualize.strength}")

    @property
    def serves_network(self) -> bool:
        """Whether `host` lets other machines reach the page."""
        return self.host not in LOOPBACK and not self.host.startswith("127.")


class ExploreApp:
    """A running explorer: `url`; shown inline in Jupyter (`_repr_html_`, an iframe of the page); `stop()`
    ends it (also on leaving a `with` block); `wait()` serves until Ctrl-C or `stop()`."""

    def __init__(self, server: ExploreServer, session: ExploreSession, worker: Worker):
        self.server, self.session, self.worker = server, session, worker
        host, self.port = server.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        self.url = f"http://[{shown}]:{self.port}/" if ":" in shown and not shown.startswith("[") \
            else f"http://{shown}:{self.port}/"
        self._stopped = threading.Event()
        self._thread = serve_in_thread(server)

    @property
    def running(self) -> bool:
        return not self._stopped.is_set()

    def stop(self) -> None:
        """Stop serving: the listening socket is closed, waiting requests are answered "stopping", the model
        work under way finishes. Calling it again does nothing."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.worker.stop()        # first: requests waiting on it are answered, so no handler holds a slot
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    def wait(self) -> None:
        """Block until `stop()` is called or Ctrl-C (then stop cleanly)."""
        try:
            while not self._stopped.wait(0.5):
                pass
        finally:
            self.stop()

    def __enter__(self) -> "ExploreApp":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<isda-viz explore at {self.url}{'' if self.running else ' (stopped)'}>"

    def _repr_html_(self) -> str:
        if not self.running:
            return f"<p>isda-viz explore at {html.escape(self.url)} has stopped.</p>"
        url = html.escape(self.url, quote=True)
        return (f'<iframe src="{url}" width="100%" height="980" style="border:1px solid #ccc" '
                f'title="isda-viz explore"></iframe><p><a href="{url}" target="_blank">{url}</a> '
                f'(<code>.stop()</code> ends it)</p>')


def explore(options: ExploreOptions | None = None, *, models: Models | None = None,
            inverter: AmortizedInverter | None = None, warn=None) -> ExploreApp:
    """Start the explorer in background threads and return it (see `ExploreApp`). `models`: already loaded
    (default: `options.visualize.load_models()`); `inverter`: an amortized inverter trained for them (default:
    the pair's cached one); `warn(message)`: where the warning that a network-facing `host` serves the page to
    the network goes (default stderr)."""
    options = options or ExploreOptions()
    save_dir = Path(options.save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise IsdaVizError(f"--save-dir {save_dir} is a file, not a folder")
    if options.serves_network:
        (warn or _warn)(f"--host {options.host} serves the page to the network: anyone who can reach this machine "
                        "on that address can run the models, upload images and write into the save folder")
    server = bind(options.host, options.port)
    try:
        models = models or options.visualize.load_models()
        check_models(models)
        session = ExploreSession(models, options.visualize, directions=options.directions,
                                 per_class=options.per_class, classes=options.classes, save_dir=save_dir,
                                 inverter=inverter)
    except BaseException:
        server.server_close()
        raise
    worker = Worker(on_start=_one_cpu_thread if models.classifier.device.type == "cpu" else None)
    server.attach(session, worker)
    return ExploreApp(server, session, worker)


def _one_cpu_thread() -> None:
    """The worker computes one picture (or 16) at a time: on the CPU, one intra-op thread for it. torch's
    thread count is per thread here (the caller's, a notebook's, stays as it was). Measured with the shipped
    pair on the 2-core machine (`bench/explore.py`): a slider's picture takes 26 ms of model work with one
    thread, 72 ms with two (a batch of one image splits into pieces too small to share)."""
    torch.set_num_threads(1)


def bind(host: str, port: int) -> ExploreServer:
    """An `ExploreServer` listening on `host:port` (no session yet); a busy port, an unknown host or one this
    machine has no address of is an `IsdaVizError`."""
    try:
        return ExploreServer((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except socket.gaierror as e:
        raise IsdaVizError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise IsdaVizError(f"port {port} on {host} is in use (another explorer?); pick another with --port, "
                               "or --port 0 for a free one") from None
        if e.errno == errno.EACCES:
            raise IsdaVizError(f"port {port} on {host} needs privileges; pick one above 1023 with --port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise IsdaVizError(f"--host {host} is not an address of this machine") from None
        raise IsdaVizError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
