"""The HTTP side of `isda-viz explore`: the standard library's threading HTTP server, a few JSON routes, the page.

Routes (every other path, including any with `..`, encoded or not, is 404: files are served from a fixed
table of the page's own files, never from a path the request names):

    GET  /                      the page (static/index.html)
    GET  /static/NAME           the page's script and style, from `STATIC` (read once at start)
    GET  /api/state             classes, thumbnails (PNG data URIs), K, the slider range, λ, notes for the page
    POST /api/open              {"thumbnail": i}                 → the view: original, reconstruction, directions
    POST /api/upload?label=L&name=N   the image file's bytes     → the same (`augment --image`'s checks)
    POST /api/move              {"view", "t": [K], "strength", "seq"} → the picture (coalesced per view)
    POST /api/draw              {"view", "strength"}             → 8 ISDA and 8 isotropic pictures
    POST /api/refine            {"view"}                         → the picture on screen, refined
    POST /api/save              {"view", "name"?}                → the folder written under the save folder
    GET  /api/stats             the worker's counts (jobs computed, requests coalesced, waiting)

Errors are JSON {"error": message} with a 4xx/5xx status; the page shows the message and keeps working.
POST bodies must say their type (application/json, or application/octet-stream for uploads), which a page
of another site cannot send here without a CORS preflight that this server never grants; the Host header
must name this server (no DNS rebinding) unless it serves the network.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

import torch

from isda_viz.app.session import DRAWS, SLIDER_RANGE, ExploreSession, Picture, View
from isda_viz.app.worker import Busy, Stopped, Worker
from isda_viz.errors import IsdaVizError
from isda_viz.outputs.figures import to_pil

MAX_JSON_BYTES = 64 * 1024
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
"""The largest upload read (bytes); the decoded image's limits are `augment --image`'s (`open_image`)."""
MAX_CONNECTIONS = 32
"""Requests handled at once (each a thread); more wait in the listen queue."""
SOCKET_TIMEOUT = 60.0
"""Seconds a connection may stay silent while its request is read."""
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files by name, read once: the only files this server sends."""
    folder = resources.files("isda_viz.app") / "static"
    return {entry.name: (entry.read_bytes(), STATIC_TYPES[suffix]) for entry in folder.iterdir()
            if (suffix := "." + entry.name.rsplit(".", 1)[-1]) in STATIC_TYPES}


STATIC = _static_files()


def png_uri(pixels: torch.Tensor) -> str:
    """`(C, H, W)` in [0, 1] → a PNG data URI (the picture as `outputs.figures.to_pil` saves it)."""
    buffer = io.BytesIO()
    to_pil(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class ExploreServer(ThreadingHTTPServer):
    """The app's HTTP server: a thread per request (at most `MAX_CONNECTIONS` at once), model work on `worker`."""

    daemon_threads = True
    allow_reuse_address = True   # a restarted app may take its port back at once (not a busy one: bind fails)
    request_queue_size = 64

    def __init__(self, address, family: int = socket.AF_INET):
        self.address_family = family   # read by the socket server's constructor
        self.session: ExploreSession | None = None
        self.worker: Worker | None = None
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.state_json = None
        super().__init__(address, ExploreHandler)
        host, port = self.server_address[:2]
        network = host not in ("127.0.0.1", "::1", "localhost")
        self.allowed_hosts = None if network else {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}

    def attach(self, session: ExploreSession, worker: Worker) -> None:
        """What the routes serve; before `serve_forever`."""
        self.session, self.worker = session, worker

    def process_request(self, request, client_address):
        self.slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class ExploreHandler(BaseHTTPRequestHandler):
    """One request: route, run, answer JSON (or a page file)."""

    server: ExploreServer
    server_version = "isda-viz-explore"
    timeout = SOCKET_TIMEOUT
    # TCP_NODELAY: headers and body leave as two writes; with Nagle's algorithm the body waits for the
    # browser's delayed ACK of the headers (about 40 ms on Linux), a third of a slider move's budget
    disable_nagle_algorithm = True

    def log_message(self, format, *args):   # quiet: the terminal shows the URL and errors only
        pass

    # -- routing ------------------------------------------------------------------------------------------------
    def do_GET(self):
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self._file("index.html")
        if path.startswith("/static/") and path[len("/static/"):] in STATIC:
            return self._file(path[len("/static/"):])
        if path == "/api/state":
            return self._json(self._state())
        if path == "/api/stats":
            worker = self.server.worker
            return self._json({"computed": worker.computed, "coalesced": worker.coalesced,
                               "pending": worker.pending, "views": len(self.server.session.views)})
        return self._error(HTTPStatus.NOT_FOUND, "no such page")

    def do_POST(self):
        if not self._host_ok():
            return
        split = urlsplit(self.path)
        routes = {"/api/open": self._open, "/api/move": self._move, "/api/draw": self._draw,
                  "/api/refine": self._refine, "/api/save": self._save}
        try:
            if split.path == "/api/upload":
                return self._upload(parse_qs(split.query))
            if split.path not in routes:
                return self._error(HTTPStatus.NOT_FOUND, "no such action")
            return routes[split.path](self._read_json())
        except _HttpError as e:
            return self._error(e.status, e.message)

    # -- actions ----------------------------------------------------------------------------------------------
    def _open(self, body):
        index = body.get("thumbnail")
        if isinstance(index, bool) or not isinstance(index, int):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "give the thumbnail's index")
        session = self.server.session
        self._run(lambda: view_json(session, session.open_thumbnail(index)))

    def _upload(self, query):
        data = self._read_body("application/octet-stream", MAX_UPLOAD_BYTES, "an upload")
        label = query.get("label", [""])[0] or None
        name = query.get("name", ["upload"])[0][:100] or "upload"
        session = self.server.session
        self._run(lambda: view_json(session, session.open_upload(data, name, label)))

    def _move(self, body):
        session, view_id = self.server.session, _text(body, "view")
        t, strength, seq = body.get("t"), body.get("strength"), body.get("seq")

        def move():
            return {**picture_json(session.move(view_id, t, strength)), "seq": seq}
        self._run(move, key=("move", view_id))

    def _draw(self, body):
        session, view_id, strength = self.server.session, _text(body, "view"), body.get("strength")
        self._run(lambda: drawn_json(session, session.draw(view_id, strength)))

    def _refine(self, body):
        session, view_id = self.server.session, _text(body, "view")
        self._run(lambda: picture_json(session.refine(view_id)))

    def _save(self, body):
        session, view_id, name = self.server.session, _text(body, "view"), body.get("name") or None

        def save():
            folder = session.save(view_id, name)
            return {"folder": str(folder), "name": folder.name}
        self._run(save)

    def _run(self, job, key=None):
        """Run `job` on the worker (coalesced by `key`) and answer its result or its error."""
        try:
            result = self.server.worker.submit(job, key).result()
        except Busy as e:
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"busy: {e}; try again")
        except Stopped as e:
            return self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(e))
        except IsdaVizError as e:
            return self._error(HTTPStatus.BAD_REQUEST, str(e))
        except KeyError:
            return self._error(HTTPStatus.GONE, "this image is no longer open (the app keeps the last few); "
                                                "pick it again")
        except Exception as e:  # the worker printed the traceback; the page gets one line and the app serves on
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}: {e}")
        return self._json(result)

    def _state(self) -> dict:
        if self.server.state_json is None:
            self.server.state_json = state_json(self.server.session)
        return self.server.state_json

    # -- reading and answering ------------------------------------------------------------------------------
    def _host_ok(self) -> bool:
        allowed = self.server.allowed_hosts
        if allowed is None or self.headers.get("Host", "") in allowed:
            return True
        self._error(HTTPStatus.MISDIRECTED_REQUEST, "this app answers only requests addressed to it by its own "
                                                    "host name (127.0.0.1 or localhost)")
        return False

    def _read_body(self, content_type: str, limit: int, what: str) -> bytes:
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != content_type:
            raise _HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send {what} as {content_type}")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required") from None
        if length < 0 or length > limit:
            self.close_connection = True   # the body is not read
            raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"{what} may be at most {limit // (1024 * 1024) or 1} MiB; this one is {length:,} bytes")
        return self.rfile.read(length)

    def _read_json(self) -> dict:
        body = self._read_body("application/json", MAX_JSON_BYTES, "a request")
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "the request is not JSON") from None
        if not isinstance(data, dict):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "the request is not a JSON object")
        return data

    def _file(self, name: str):
        data, content_type = STATIC[name]
        self._send(HTTPStatus.OK, data, content_type)

    def _json(self, data, status=HTTPStatus.OK):
        self._send(status, json.dumps(data, allow_nan=False).encode(), "application/json")

    def _error(self, status, message: str):
        self._json({"error": message}, status)

    def _send(self, status, data: bytes, content_type: str):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                                        "frame-ancestors *")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):   # the page went away; nothing to answer
            self.close_connection = True


class _HttpError(Exception):
    def __init__(self, status, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _text(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise _HttpError(HTTPStatus.BAD_REQUEST, f"give {key!r}")
    return value


# -- what the page receives ---------------------------------------------------------------------------------------
def state_json(session: ExploreSession) -> dict:
    """What the page needs before any image is open."""
    classifier, models = session.models.classifier, session.models
    return {
        "class_names": list(classifier.class_names),
        "thumbnails": [{"index": i, "label": int(label), "source": source, "png": png_uri(image)}
                       for i, (image, label, source) in enumerate(zip(session.thumbnails, session.thumbnail_labels,
                                                                      session.thumbnail_sources))],
        "directions": session.k, "range": SLIDER_RANGE, "strength": session.options.strength,
        "strength_max": max(2.0, 2 * session.options.strength), "draws": DRAWS,
        "judge": models.judge is not None, "searching": session.searching, "notes": list(session.notes),
        "classifier": str(classifier.source), "generator": str(getattr(models.generator, "name", "generator")),
        "inverter": session.move_source.name, "save_dir": str(session.save_dir),
    }


def view_json(session: ExploreSession, view: View) -> dict:
    """An opened image: its original, reconstruction, classes and its class's directions."""
    step1, d = view.step1, view.directions
    return {
        "view": view.id, "source": view.source, "label": view.label,
        "original": png_uri(step1.images[0]), "original_top": view.original_top,
        "original_judged": view.original_judged, "original_predicted": step1.predicted[0],
        "reconstruction": {**picture_json(view.reconstruction), "feature_error": float(step1.feature_error[0]),
                           "psnr": float(step1.psnr[0])},
        "directions": [{"k": k + 1, "share": float(d.shares[k]), "eigenvalue": float(d.values[k])}
                       for k in range(len(d.shares))],
        "rest_share": d.rest_share,
    }


def picture_json(picture: Picture) -> dict:
    """A picture on screen: pixels and change map as PNG data URIs, classes, reached-shift error."""
    return {"png": png_uri(picture.pixels), "change": png_uri(picture.change), "predicted": picture.predicted,
            "top": picture.top, "judged": picture.judged, "reached_shift_error": picture.reached_shift_error,
            "pixel_distance": picture.pixel_distance, "t": picture.t, "strength": picture.strength}


def drawn_json(session: ExploreSession, drawn) -> dict:
    """A draw: the ISDA and isotropic pictures with the classifier's classes."""
    return {"strength": drawn.strength,
            "isda": [{"png": png_uri(p), "predicted": c} for p, c in zip(drawn.isda, drawn.isda_predicted)],
            "isotropic": [{"png": png_uri(p), "predicted": c}
                          for p, c in zip(drawn.isotropic, drawn.isotropic_predicted)]}


def serve_in_thread(server: ExploreServer) -> threading.Thread:
    """`server.serve_forever()` in a daemon thread."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="isda-viz explore server", daemon=True)
    thread.start()
    return thread

