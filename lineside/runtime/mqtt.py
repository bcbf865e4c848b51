"""Decisions to the plant's MQTT broker: `lineside run ... --mqtt mqtt://[user:pass@]HOST[:PORT]/PREFIX`.

Topics under PREFIX (an ISA-95 style path such as `acme/plant1/paint/line3/station7`):

    PREFIX/decision   every decision, one JSON object, QoS 1
    PREFIX/event      every event (reconnects, faults), QoS 1
    PREFIX/answer     with --trigger: the answer for each triggered part (QoS 1)
    PREFIX/trigger    with --trigger mqtt: lineside listens here (a part id, or
                      {"part_id": ...}, or nothing)
    PREFIX/status     retained: online/offline (offline is also the last will, so a
                      killed process or a lost connection reads offline), source
                      state, FPS, OK/NG/unknown counts, dropped frames, last error;
                      every STATUS_SECONDS and on every change of state

The loop never waits on the broker: paho-mqtt's network thread sends, a lost broker is
reconnected with backoff (1 s doubling to 30 s), and unsent QoS 1 messages wait in a
bounded queue (`--mqtt-queue`, counted as `mqtt_dropped` when it is full) and go out
after the reconnect. `mqtts://` uses TLS (`--mqtt-ca FILE` for a private CA).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import socket
import threading
import time
from urllib.parse import unquote, urlsplit

from lineside.errors import LinesideError, require
from lineside.text import printable, redact_url

from .outputs import Output
from .records import DecisionRow, Event

log = logging.getLogger(__name__)

STATUS_SECONDS = 5.0
DEFAULT_QUEUE = 10_000


def parse_mqtt_url(url: str) -> dict:
    """mqtt://[user[:pass]@]host[:port]/topic/prefix -> its parts (one-line errors). A user
    without a password in the URL takes it from LINESIDE_MQTT_PASSWORD."""
    shown = redact_url(url)      # what errors say: never the password
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise LinesideError(f"--mqtt {shown}: not a URL ({exc})") from None
    if "#" in url or "?" in url:
        raise LinesideError(f"--mqtt {shown}: a topic prefix cannot hold # (a wildcard) or ?")
    if parts.scheme not in ("mqtt", "mqtts"):
        raise LinesideError(f"--mqtt {shown}: must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise LinesideError(f"--mqtt {shown}: no broker host")
    prefix = parts.path.strip("/")
    if not prefix or any(c in prefix for c in "+#") or "//" in prefix:
        raise LinesideError(f"--mqtt {shown}: needs a topic prefix without wildcards, e.g. mqtt://broker/plant/line3/station7")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise LinesideError(f"--mqtt {shown}: bad port") from None
    password = unquote(parts.password) if parts.password else None
    if parts.username and password is None:     # kept out of the command line, where `ps` shows it
        password = os.environ.get("LINESIDE_MQTT_PASSWORD")
    return {"tls": parts.scheme == "mqtts", "host": parts.hostname, "port": port, "prefix": prefix,
            "user": unquote(parts.username) if parts.username else None, "password": password}


MAX_TRIGGER_BYTES = 4096


def trigger_part_id(payload) -> str | None:
    """The part id a PREFIX/trigger message names: {"part_id": ...}, the bare text, or
    None (nothing, or a message that names none: the trigger still counts, with an id of
    lineside's). Never raises: any bytes are a trigger."""
    data = bytes(payload or b"")[:MAX_TRIGGER_BYTES]
    text = data.decode("utf-8", "replace").strip()
    if not text.startswith("{"):
        return printable(text)[:200] or None
    try:
        part = json.loads(text).get("part_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    if isinstance(part, (str, int)) and not isinstance(part, bool):
        return printable(str(part)).strip()[:200] or None
    return None


def iso_time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")


class MqttOutput(Output):
    """Decisions, events, answers and the station's status to an MQTT broker; paho's
    network thread sends them, so the loop never waits for the broker."""

    def __init__(self, url: str, station: str, model_sha256: str, labels: list[str], ca_file: str | None = None,
                 queue: int = DEFAULT_QUEUE, source: str = "", on_trigger=None, on_product=None, on_update=None):
        mqtt = require("paho.mqtt.client", None)
        self.cfg = parse_mqtt_url(url)
        self.url_shown = f"{'mqtts' if self.cfg['tls'] else 'mqtt'}://{self.cfg['host']}:{self.cfg['port']}/" \
                         f"{self.cfg['prefix']}"
        self.prefix = self.cfg["prefix"]
        self.station = station
        self.model_sha256 = model_sha256
        self.labels_version = hashlib.sha256(json.dumps(list(labels)).encode()).hexdigest()[:12]
        self.source = source
        self.published = 0
        self.dropped = 0
        self._state_sent = None
        self.connected = threading.Event()
        self._last_status = 0.0
        self._stats = None
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"lineside-{station}-{os.getpid()}", clean_session=True)
        if self.cfg["user"]:
            client.username_pw_set(self.cfg["user"], self.cfg["password"])
        if self.cfg["tls"]:
            if ca_file and not os.path.isfile(ca_file):
                raise LinesideError(f"--mqtt-ca {ca_file}: no such file")
            client.tls_set(ca_certs=ca_file)
        elif ca_file:
            raise LinesideError("--mqtt-ca: only with an mqtts:// URL")
        client.max_queued_messages_set(queue)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.will_set(self.topic("status"), json.dumps(self._status("offline")), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self.on_trigger = on_trigger
        self.on_product = on_product
        self.on_update = on_update
        if on_trigger is not None or on_product is not None or on_update is not None:
            client.on_message = self._on_message
        self.client = client
        try:
            client.connect_async(self.cfg["host"], self.cfg["port"], keepalive=30)
        except (OSError, ValueError) as exc:
            raise LinesideError(f"--mqtt {self.url_shown}: {exc}") from exc
        client.loop_start()

    def topic(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    # -- paho's network thread -----------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason, properties):
        if reason.is_failure:
            self.state.error(f"mqtt: broker refused the connection ({reason})")
            log.warning("%s", self.state.last_error)
            return
        self.connected.set()
        log.info("mqtt: connected to %s", self.url_shown)
        if self.on_trigger is not None:
            client.subscribe(self.topic("trigger"), qos=1)
        if self.on_product is not None:
            client.subscribe(self.topic("product"), qos=1)
        if self.on_update is not None:
            client.subscribe(self.topic("update"), qos=1)
        self._publish_status(force=True)

    def _on_disconnect(self, client, userdata, flags, reason, properties):
        self.connected.clear()
        if reason.is_failure:
            self.state.error(f"mqtt: connection to the broker lost ({reason}); reconnecting")
            log.warning("%s", self.state.last_error)

    def _on_message(self, client, userdata, msg):
        """PREFIX/trigger: a JSON object with a part_id, a bare part id, or nothing.
        PREFIX/product: the name or index of the product to switch to (--products).
        PREFIX/update: the name of a bundle folder in the --updates folder to switch to."""
        try:     # an exception here would end paho's network thread: never let one out
            text = bytes(msg.payload or b"")[:200].decode("utf-8", "replace").strip()
            if msg.topic == self.topic("product"):
                if self.on_product is not None:
                    self.on_product(text)
            elif msg.topic == self.topic("update"):
                if self.on_update is not None:
                    self.on_update(text)
            elif self.on_trigger is not None:
                self.on_trigger(trigger_part_id(msg.payload))
        except Exception as exc:  # noqa: BLE001
            log.error("mqtt: trigger message not understood (%s)", exc)

    # -- called by the loop --------------------------------------------------------------

    def answer(self, answer):
        """A triggered part's answer (see trigger.py) on PREFIX/answer."""
        self._publish(self.topic("answer"), dict(answer.as_dict(), station=self.station,
                                                 model_sha256=self.model_sha256))

    def observe(self, frame, decision, stats):
        """Called by the loop for every decision: the loop's counters, for the status."""
        self._stats = stats

    def decision(self, row: DecisionRow):
        verdict = row.verdict
        payload = {"time": iso_time(row.ts), "ts": row.ts, "station": self.station, "source": row.source,
                   "frame": row.frame, "part_id": getattr(row, "part_id", None), "label": row.label,
                   "confidence": row.confidence, "verdict": verdict, "decision": row.decision,
                   "probabilities": row.probabilities, "flags": row.flags,
                   "capture_to_decision_ms": row.capture_to_decision_ms, "model_sha256": row.model_sha256,
                   "labels_version": self.labels_version}
        if row.product is not None:
            payload["product"] = row.product
        if row.anomaly_score is not None:
            payload["anomaly_score"] = row.anomaly_score
        self._publish(self.topic("decision"), payload)
        self._publish_status()

    def event(self, event: Event):
        changed = self.state.source_state != self._state_sent
        self._publish(self.topic("event"), {"time": iso_time(event.ts), "ts": event.ts, "station": self.station,
                                            "kind": event.kind, "detail": event.detail})
        self._publish_status(force=changed)

    def close(self, summary: dict | None = None):
        """Publish the final status (offline, retained), give queued messages a few
        seconds to go out, and disconnect."""
        info = self.client.publish(self.topic("status"), json.dumps(self._status("offline", summary)), qos=1,
                                   retain=True)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and self.connected.is_set() and (
                self.client._out_messages or not info.is_published()):  # noqa: SLF001 - paho has no public count
            time.sleep(0.05)
        self.client.disconnect()
        self.client.loop_stop()

    def counters(self) -> dict:
        return {"mqtt_published": self.published, "mqtt_dropped": self.dropped}

    # -- helpers ----------------------------------------------------------------------

    def _publish(self, topic: str, payload: dict, retain: bool = False):
        info = self.client.publish(topic, json.dumps(payload), qos=1, retain=retain)
        rc = info.rc
        if rc == 0 or rc == 4:       # sent, or queued until the broker is back (MQTT_ERR_NO_CONN)
            self.published += 1
        else:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("mqtt: %d message(s) not queued (rc %d: the queue of unsent messages is full)",
                            self.dropped, rc)

    def _status(self, state: str, summary: dict | None = None) -> dict:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        s = self.state
        self._state_sent = s.source_state
        status = {"state": state, "time": iso_time(time.time()), "ts": time.time(), "station": self.station,
                  "host": socket.gethostname(), "source": self.source, "source_state": s.source_state,
                  "fps": round(s.decisions / elapsed, 2), "counts": dict(s.counts),
                  "decisions": s.decisions, "mqtt_dropped": self.dropped, "last_error": s.last_error,
                  "model_sha256": self.model_sha256}
        if summary:
            status["dropped_frames"] = summary.get("dropped")
        elif self._stats is not None:
            status["dropped_frames"] = self._stats.dropped()
        return status

    def _publish_status(self, force: bool = False):
        now = time.monotonic()
        if not force and now - self._last_status < STATUS_SECONDS:
            return
        self._last_status = now
        self.client.publish(self.topic("status"), json.dumps(self._status("online")), qos=1, retain=True)
