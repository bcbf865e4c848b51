"""A status page for the box without a screen: `lineside run ... --http [HOST:]PORT` and
`lineside review LOG --save DIR`.

    GET  /                   the live page (refreshes itself once a second)
    GET  /review             the saved NG / unknown / flagged frames, newest first
    GET  /api/status         the live page's figures as JSON
    GET  /metrics            the same in Prometheus' text format
    GET  /frame/last.jpg     the last frame decided (?heatmap=1: an anomaly model's overlay of it)
    GET  /api/review         saved frames with their decisions (?label= &verdict= &before= &limit=), the
                             frames of one part sharing a `group`, and how many the filter matches
    GET  /api/frames/ID.jpg  the saved frame of decision ID in the log (?crop=roi: the part the model saw;
                             ?heatmap=1: an anomaly model's overlay saved beside it)
    POST /api/review/ID      {"label": "..."}: the true label of that frame (needs the token)

The server binds to loopback unless an address is given. Without a token the page is
read only; with one (`--http-token-file`, or LINESIDE_HTTP_TOKEN) a relabel must send it
in an `X-Lineside-Token` header. Every script and style is served from here (no CDN). The
camera loop only hands over references (the last frame, its decision, the loop's
counters); the server thread does every computation and encoding when a page asks.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from collections import Counter, deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

import cv2

from lineside.errors import LinesideError
from lineside.text import printable

from .outputs import Output, outcome
from .records import DecisionRow, Event

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
EVENTS_KEPT = 50
MAX_BODY = 4096
LOOPBACK = ("127.0.0.1", "::1", "localhost")
MAX_CONNECTIONS = 32         # connections served at once; one more is answered 503 and closed
IDLE_SECONDS = 15.0          # a connection idle this long (no request, or a request stalled) is closed
HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))*$")


def parse_address(text: str) -> tuple[str, int]:
    """'8080', ':8080', 'HOST:PORT' or '[v6]:PORT' -> (host, port); loopback unless a host is given."""
    text = str(text).strip()
    host, port = "127.0.0.1", text
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port.lstrip(":")
    elif ":" in text:
        host, _, port = text.rpartition(":")
        host = host or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise LinesideError(f"--http {text}: expected [HOST:]PORT, e.g. 127.0.0.1:8080") from None
    if not 0 <= number <= 65535:
        raise LinesideError(f"--http {text}: port {number} is out of range")
    return host, number


def read_token(path=None, env=None) -> str | None:
    """The relabelling token from a file (first line) or the environment; None: read only."""
    token = None
    if path:
        try:
            token = open(path, encoding="utf-8").readline().strip()
        except OSError as exc:
            raise LinesideError(f"--http-token-file {path}: {exc.strerror or exc}") from None
        if not token:
            raise LinesideError(f"--http-token-file {path}: the file is empty")
    else:
        token = (env if env is not None else os.environ.get("LINESIDE_HTTP_TOKEN") or "").strip() or None
    if token is not None and len(token) < 12:
        raise LinesideError("--http token: use at least 12 characters")
    return token


def model_summary(model) -> dict:
    """What the page says of a RuntimeModel: file (bundle/name), labels, precision, sha256, backend."""
    from pathlib import Path

    path = Path(model.path)
    return {"name": f"{path.parent.name}/{path.name}", "labels": list(model.labels), "task": model.metadata.task,
            "precision": model.metadata.precision, "sha256": model.checksum, "backend": model.backend,
            "signature": getattr(model, "signature", None) or {"state": "unsigned"}}


class LivePage(Output):
    """What the live page shows: an output (runtime/outputs.py) whose methods only store
    references and counters; snapshot() builds the page's figures in the server thread."""

    def __init__(self, station: str, model: dict, source: str, heatmap=None):
        self.station = station
        self.model = model
        self.heatmap = heatmap                  # an anomaly model's frame -> overlay (BGR), for ?heatmap=1
        self.source = source
        self.started = time.time()
        self.counts: Counter = Counter()
        self.labels: Counter = Counter()
        self.hour: deque = deque()              # (minute, Counter) for the last 60 minutes
        self.events: deque = deque(maxlen=EVENTS_KEPT)
        self.event_counts: Counter = Counter()
        self.last_row: DecisionRow | None = None
        self.drift = None                       # the run's DriftMonitor, when it has one
        self.shadow = None                      # the run's ShadowRunner (--shadow)
        self._frame = None                      # (frame index, image) of the last decision
        self._stats = None
        self._jpeg = (None, b"")
        self._heatmap_jpeg = (None, b"")
        self._rate = deque(maxlen=64)           # (time, frames) samples for a windowed FPS
        self._lock = threading.Lock()

    # -- the loop's thread ----------------------------------------------------------------

    def observe(self, frame, decision, stats):
        self._frame = (frame.index, frame.image)
        self._stats = stats

    def decision(self, row: DecisionRow):
        self.last_row = row
        counted = outcome(row) or "no verdict"
        self.counts[counted] += 1
        self.labels[row.label] += 1
        minute = int(row.ts // 60)
        if not self.hour or self.hour[-1][0] != minute:
            self.hour.append((minute, Counter()))
            while self.hour and self.hour[0][0] <= minute - 60:
                self.hour.popleft()
        self.hour[-1][1][counted] += 1

    def event(self, event: Event):
        self.events.append(event)
        self.event_counts[event.kind] += 1

    def watch(self, drift=None, shadow=None):
        self.drift, self.shadow = drift, shadow

    # -- the server's thread --------------------------------------------------------------

    def snapshot(self) -> dict:
        now = time.time()
        stats = self._stats
        frames = stats.frames if stats else 0
        with self._lock:
            self._rate.append((now, frames))
            while len(self._rate) > 2 and now - self._rate[1][0] >= 5.0:
                self._rate.popleft()
            t0, f0 = self._rate[0]
        fps = (frames - f0) / (now - t0) if now - t0 >= 0.5 else (frames / max(now - self.started, 1e-9))
        latency = {}
        if stats and stats.capture_to_decision.count:
            s = stats.capture_to_decision.summary()
            latency = {"p50": s["p50"], "p99": s["p99"]}
        hour_ago = int(now // 60) - 60
        last_hour = Counter()
        for minute, c in list(self.hour):
            if minute > hour_ago:
                last_hour.update(dict(c))     # a copy in one step: the loop may add a key meanwhile
        row = self.last_row
        return {
            "station": self.station, "host": socket.gethostname(), "time": now, "started": self.started,
            "uptime_s": round(now - self.started, 1), "model": self.model,
            "source": {"text": self.source, "state": self.state.source_state, "since": self.state.since},
            "frames": frames, "fps": round(fps, 2), "capture_to_decision_ms": latency,
            "dropped_frames": stats.dropped() if stats else 0,
            "counts": {"since_start": dict(self.counts), "last_hour": dict(last_hour), "labels": dict(self.labels)},
            "last": None if row is None else {
                "frame": row.frame, "time": row.ts, "label": row.label, "confidence": row.confidence,
                "verdict": row.verdict, "decision": row.decision, "part_id": row.part_id, "flags": row.flags},
            "events": [{"time": e.ts, "kind": e.kind, "detail": e.detail} for e in reversed(list(self.events))][:20],
            "event_counts": dict(self.event_counts), "last_error": self.state.last_error,
            "drift": self.drift.summary() if self.drift is not None else None,
            "shadow": self.shadow.summary() if self.shadow is not None else None,
        }

    def last_jpeg(self, heatmap: bool = False) -> bytes | None:
        """The last frame decided as a JPEG (cached per frame); with `heatmap`, an anomaly
        model's overlay of it instead, made here on request (the model runs once more, in
        the server's thread, for the frames the page asks for only)."""
        frame = self._frame
        if frame is None or (heatmap and self.heatmap is None):
            return None
        index, image = frame
        cached_index, data = self._heatmap_jpeg if heatmap else self._jpeg
        if cached_index != index:
            try:
                picture = self.heatmap(image) if heatmap else image
            except Exception as exc:  # noqa: BLE001 - an overlay is a courtesy; the page shows the frame
                log.warning("heatmap of frame %s not made: %s", index, exc)
                return None
            ok, buf = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 80])
            if not ok:
                return None
            data = buf.tobytes()
            if heatmap:
                self._heatmap_jpeg = (index, data)
            else:
                self._jpeg = (index, data)
        return data


def prometheus(s: dict) -> str:
    """The live figures in Prometheus' text exposition format (version 0.0.4)."""
    def esc(v) -> str:
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    station = f'station="{esc(s["station"])}"'
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP lineside_{name} {help_}")
        lines.append(f"# TYPE lineside_{name} {kind}")
        for labels, value in samples:
            lines.append(f"lineside_{name}{{{','.join([station, *labels])}}} {value}")

    m = s["model"]
    metric("info", "gauge", "The model and source of this station (value 1).",
           [([f'model="{esc(m.get("name"))}"', f'precision="{esc(m.get("precision"))}"',
              f'model_sha256="{esc(m.get("sha256"))}"', f'source="{esc(s["source"]["text"])}"'], 1)])
    metric("up", "gauge", "1 while the source delivers frames, 0 while it is reconnecting or has ended.",
           [([], int(s["source"]["state"] == "live"))])
    metric("frames_total", "counter", "Frames decided since start.", [([], s["frames"])])
    metric("decisions_total", "counter", "Decisions since start by outcome (OK, NG, unknown, no verdict).",
           [([f'outcome="{esc(k)}"'], v) for k, v in sorted(s["counts"]["since_start"].items())])
    metric("labels_total", "counter", "Decisions since start by label.",
           [([f'label="{esc(k)}"'], v) for k, v in sorted(s["counts"]["labels"].items())])
    metric("dropped_frames_total", "counter", "Frames the camera delivered that were replaced by a newer one "
                                              "before they could be decided.", [([], s["dropped_frames"])])
    metric("events_total", "counter", "Events since start by kind.",
           [([f'kind="{esc(k)}"'], v) for k, v in sorted(s["event_counts"].items())])
    metric("fps", "gauge", "Frames decided per second (last 5 s).", [([], s["fps"])])
    lat = s["capture_to_decision_ms"]
    metric("capture_to_decision_ms", "gauge", "Capture-to-decision time percentiles in milliseconds.",
           [([f'quantile="{q}"'], lat[k]) for q, k in (("0.5", "p50"), ("0.99", "p99")) if k in lat])
    metric("uptime_seconds", "gauge", "Seconds since the run started.", [([], s["uptime_s"])])
    shadow = s.get("shadow") or {}
    if shadow.get("agreement") is not None:
        metric("shadow_agreement", "gauge", "Share of the frames the shadow model decided as the line's did.",
               [([], shadow["agreement"])])
        metric("shadow_frames_total", "counter", "Frames the shadow model decided.", [([], shadow["frames"])])
    drift = s.get("drift") or {}
    psi = {k: v for k, v in (drift.get("psi") or {}).items() if v is not None}
    if psi:
        metric("drift_psi", "gauge", "Population stability index of the last frames against training "
                                     "(0.25 and above: drift).", [([f'stat="{esc(k)}"'], v) for k, v in sorted(psi.items())])
        metric("drift_alarm", "gauge", "1 while a statistic is in drift.",
               [([f'stat="{esc(k)}"'], int(k in drift.get("alarmed", []))) for k in sorted(psi)])
    return "\n".join(lines) + "\n"


def _asset(name: str) -> bytes:
    return resources.files("lineside.runtime").joinpath("web", name).read_bytes()


ASSETS = {"/style.css": ("style.css", "text/css; charset=utf-8"),
          "/live.js": ("live.js", "text/javascript; charset=utf-8"),
          "/review.js": ("review.js", "text/javascript; charset=utf-8"),
          "/": ("live.html", "text/html; charset=utf-8"),
          "/review": ("review.html", "text/html; charset=utf-8")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def allowed_hosts(bound: str, names=()) -> frozenset[str]:
    """The names a request's Host header may give besides IP addresses: localhost, this
    machine's names, the bound name and `names` (--http-host). A page reached by any
    other name is refused, so that a web page cannot point its own DNS name at the box
    (DNS rebinding) and read the status or frames from a browser on the plant network."""
    hosts = {"localhost", bound.lower()}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            hosts.add(name.lower())
    for name in names or ():
        name = str(name).strip().lower().rstrip(".")
        if not name or not HOST_NAME.match(name):
            raise LinesideError(f"--http-host {name!r}: not a host name")
        hosts.add(name)
    return frozenset(hosts)


def host_allowed(header: str | None, hosts: frozenset[str]) -> bool:
    """Whether a Host header ('name', 'name:port', '1.2.3.4:80', '[::1]:80') names this server."""
    if not header:
        return False
    text = header.strip().lower()
    if text.startswith("["):
        name = text[1:].partition("]")[0]
    else:
        name = text.rpartition(":")[0] if text.count(":") == 1 else text
    name = name.rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name in hosts


class _BoundedServer(ThreadingHTTPServer):
    """At most MAX_CONNECTIONS connections at once; one more is answered 503 and closed."""

    daemon_threads = True
    slots: threading.BoundedSemaphore

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            headers = "".join(f"{k}: {v}\r\n" for k, v in SECURITY_HEADERS.items())
            try:
                request.sendall(("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n"
                                 f"{headers}\r\n").encode())
            except OSError:
                pass
            self.shutdown_request(request)
            return
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


class StatusServer:
    """The HTTP server, in its own daemon threads. `page` (live) and `review` may each be None."""

    def __init__(self, address: str, page: LivePage | None = None, review=None, token: str | None = None,
                 hosts=(), switch=None, actions=None):
        self.host, port = parse_address(address)
        self.page, self.review, self.token = page, review, token
        self.switch = switch        # a ProductSwitch (--products): POST /api/product, with the token
        self.actions = actions if actions is not None else {}   # promote, rollback (--shadow), with the token
        self.hosts = allowed_hosts(self.host, hosts)
        handler = type("Handler", (_Handler,), {"app": self})
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_class = type("Server", (_BoundedServer,), {"address_family": family,
                                                          "slots": threading.BoundedSemaphore(MAX_CONNECTIONS)})
        try:
            self.httpd = server_class((self.host, port), handler)
        except OSError as exc:
            raise LinesideError(f"--http {address}: cannot listen there ({exc.strerror or exc})") from None
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="lineside-http", daemon=True)
        if self.host not in LOOPBACK:
            log.warning("--http: the page is reachable from the network on %s:%d (%s)", self.host, self.port,
                        "relabelling needs the token" if token else "read only: no token")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> "StatusServer":
        self._thread.start()
        return self

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class BadRequest(Exception):
    """A request that is malformed or not allowed: answered with its status, never a 500."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.close = status, close


def _query(url, max_fields: int) -> dict[str, str]:
    """A request's query as name -> its last value; too many fields is a 400."""
    try:
        return {k: v[-1] for k, v in parse_qs(url.query, max_num_fields=max_fields).items()}
    except ValueError:
        raise BadRequest(400, "too many query fields") from None


def _ident(text: str) -> int | None:
    """A decision id in a path: digits that fit SQLite's integers, else None."""
    return int(text) if text.isdigit() and len(text) <= 18 else None


def _number(q: dict, name: str, default: int | None) -> int | None:
    text = q.get(name)
    if text in (None, ""):
        return default
    if not (text.isdigit() and len(text) <= 18):
        raise BadRequest(400, f"{name}: '{text[:40]}' is not a whole number")
    return int(text)


class _Handler(BaseHTTPRequestHandler):
    app: StatusServer
    server_version = "lineside"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = IDLE_SECONDS        # a connection that sends nothing for this long is closed

    def log_message(self, fmt, *args):     # requests are not news; errors are logged where they happen
        log.debug("http %s " + fmt, self.client_address[0], *args)

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200):
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str):
        self._json({"error": message}, status)

    def send_error(self, code, message=None, explain=None):
        """The library's own errors (a malformed request line, an unknown method, headers too
        long) as the other answers: JSON, with the security headers, and the connection closed."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":    # a request line too broken to say: answer with headers
            self.request_version = "HTTP/1.0"
        try:
            self._error(int(code), message or HTTPStatus(int(code)).phrase)
        except (OSError, ValueError):
            pass

    def parse_request(self) -> bool:
        """HTTP/0.9 ('GET /' with no version) is refused: its answers carry no status line or
        headers, so neither the security headers nor a Content-Length could go with them."""
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 is not supported")
            return False
        return True

    def _body(self) -> bytes:
        """The request's body, read whole before anything is answered, so that nothing of it
        is left on a kept-alive connection to be read as the next request."""
        if self.headers.get("Transfer-Encoding"):
            raise BadRequest(411, "send the body with a Content-Length (no Transfer-Encoding)", close=True)
        text = (self.headers.get("Content-Length") or "0").strip()
        if not text.isdigit() or len(self.headers.get_all("Content-Length") or []) > 1:
            raise BadRequest(400, "a bad Content-Length", close=True)
        length = int(text)
        if length > MAX_BODY:
            raise BadRequest(413, f"the body must be at most {MAX_BODY} bytes", close=True)
        data = self.rfile.read(length) if length else b""
        if len(data) != length:
            raise BadRequest(400, "the body ended early", close=True)
        return data

    def _dispatch(self, handle):
        try:
            body = self._body()
            if not host_allowed(self.headers.get("Host"), self.app.hosts):
                raise BadRequest(400, "unknown Host: reach the page by its IP address or a name given "
                                      "with --http-host")
            handle(urlsplit(self.path), body)
        except BadRequest as exc:
            self.close_connection = self.close_connection or exc.close
            self._error(exc.status, str(exc))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - a page error never reaches the loop
            log.error("http: %s %s failed: %s", self.command, printable(self.path[:200]), exc)
            self.close_connection = True
            self._error(500, "internal error")

    def do_HEAD(self):
        self._dispatch(self._get)

    def do_GET(self):
        self._dispatch(self._get)

    def do_POST(self):
        self._dispatch(self._post)

    def _get(self, url, body: bytes):
        app, path = self.app, url.path
        if path in ASSETS:
            if path == "/" and app.page is None:
                self._send(302, b"", "text/plain", {"Location": "/review"})
                return
            name, ctype = ASSETS[path]
            self._send(200, _asset(name), ctype)
        elif path == "/api/status" and app.page is not None:
            status = app.page.snapshot()
            status["review"] = {"available": app.review is not None, "token_required": True,
                                "writable": app.token is not None}
            if app.switch is not None:
                status["product"] = {"active": app.switch.active.name, "index": app.switch.active.index,
                                     "products": [p.name for p in app.switch.products]}
            self._json(status)
        elif path == "/metrics" and app.page is not None:
            self._send(200, prometheus(app.page.snapshot()).encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/frame/last.jpg" and app.page is not None:
            data = app.page.last_jpeg(heatmap=_query(url, 5).get("heatmap") == "1")
            if data is None:
                self._error(404, "no frame decided yet")
            else:
                self._send(200, data, "image/jpeg")
        elif path == "/api/review" and app.review is not None:
            q = _query(url, 20)
            try:
                items = app.review.items(q.get("label") or None, q.get("verdict") or None,
                                         _number(q, "limit", 100), _number(q, "before", None))
            except LinesideError as exc:
                raise BadRequest(400, str(exc)) from None
            self._json({"items": items, "total": app.review.count(q.get("label") or None, q.get("verdict") or None),
                        "labels": app.review.known_labels(), "writable": app.token is not None,
                        "dataset": str(app.review.out_dir)})
        elif path.startswith("/api/frames/") and app.review is not None:
            ident = _ident(path[len("/api/frames/"):].removesuffix(".jpg"))
            q = _query(url, 5)
            data = app.review.frame_bytes(ident, crop=q.get("crop") == "roi", heatmap=q.get("heatmap") == "1") \
                if ident is not None else None
            if data is None:
                self._error(404, "no saved frame for that decision")
            else:
                self._send(200, data, "image/jpeg")
        else:
            self._error(404, "not found")

    def _authorised_json(self, body: bytes, what: str) -> dict:
        """The JSON object of a POST that changes something: the token first, then the body."""
        if self.app.token is None:
            raise BadRequest(403, f"read only: start with --http-token-file (or LINESIDE_HTTP_TOKEN) to {what}")
        sent = self.headers.get("X-Lineside-Token", "")
        if not hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), self.app.token.encode()):
            raise BadRequest(401, f"a valid X-Lineside-Token header is needed to {what}")
        if self.headers.get_content_type() != "application/json":
            raise BadRequest(415, "send a JSON object")
        if not body:
            raise BadRequest(400, f"the body must be 1..{MAX_BODY} bytes")
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise BadRequest(400, "the body is not a JSON object") from None
        if not isinstance(doc, dict):
            raise BadRequest(400, "the body is not a JSON object")
        return doc

    def _post(self, url, body: bytes):
        app, path = self.app, url.path
        if path == "/api/product" and app.switch is not None:
            wanted = self._authorised_json(body, "switch products").get("product")
            if not isinstance(wanted, (str, int)) or isinstance(wanted, bool):
                raise BadRequest(400, "the body needs a \"product\" (a name or an index)")
            product = app.switch.request(wanted)
            if product is None:
                raise BadRequest(404, f"no product {str(wanted)[:80]!r}")
            log.info("product %s asked for on the page", product.name)
            self._json({"requested": product.name, "index": product.index})
            return
        action = {"/api/shadow/promote": "promote", "/api/rollback": "rollback"}.get(path)
        if action in app.actions:
            self._authorised_json(body, action)
            who = f"the page ({self.client_address[0]})"
            try:
                self._json(app.actions[action](who))
            except LinesideError as exc:
                raise BadRequest(409, str(exc)) from None
            return
        ident = _ident(path[len("/api/review/"):]) if path.startswith("/api/review/") else None
        if app.review is None or ident is None:
            self._error(404, "not found")
            return
        label = self._authorised_json(body, "relabel").get("label")
        if not isinstance(label, str):
            raise BadRequest(400, "the body needs a \"label\"")
        try:
            entry = app.review.review(ident, label)
        except LookupError as exc:
            self._error(404, str(exc))
            return
        except LinesideError as exc:
            raise BadRequest(400, str(exc)) from None
        log.info("review: decision %s labelled %s", ident, entry["label"])
        self._json(entry, HTTPStatus.OK)
