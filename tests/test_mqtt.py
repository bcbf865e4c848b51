"""Decisions over MQTT, against a real Mosquitto broker on loopback (Debian's `mosquitto`;
.ci/run installs it, and LINESIDE_REQUIRE_MQTT makes these tests fail, not skip, without it)."""

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lineside.errors import LinesideError
from lineside.runtime.app import RunOptions, run_app
from lineside.runtime.model import open_model
from lineside.runtime.mqtt import parse_mqtt_url
from lineside.video import write_video

PREFIX = "acme/plant1/paint/line3/station7"


class Broker:
    """A Mosquitto broker on a free loopback port, with persistence so that a subscriber's
    session outlives a restart."""

    def __init__(self, binary: str, folder: Path):
        self.binary, self.folder = binary, folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {folder}/\nautosave_interval 1\n")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {self.proc.stderr.read()[-500:]}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)     # a clean stop saves the sessions
            self.proc.wait(10)

    @property
    def url(self):
        return f"mqtt://127.0.0.1:{self.port}/{PREFIX}"


@pytest.fixture
def broker(tmp_path):
    binary = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
    if binary is None:
        message = "no MQTT broker: apt-get install mosquitto"
        if os.environ.get("LINESIDE_REQUIRE_MQTT"):
            pytest.fail(message)
        pytest.skip(message)
    b = Broker(binary, tmp_path)
    b.start()
    yield b
    b.stop()


class Subscriber:
    """Collects what the broker delivers under PREFIX (a persistent session, QoS 1)."""

    def __init__(self, port: int, client_id: str = "test-subscriber"):
        import paho.mqtt.client as mqtt

        self.messages: dict[str, list] = {}
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.on_connect = lambda c, u, f, r, p: (c.subscribe(f"{PREFIX}/#", qos=1), self.ready.set())
        self.client.on_message = self._message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.ready.wait(10)
        time.sleep(0.3)

    def _message(self, client, userdata, msg):
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = msg.payload.decode()          # a bare trigger
        self.messages.setdefault(msg.topic.rsplit("/", 1)[-1], []).append((payload, msg.retain))

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def retained_status(port: int) -> dict:
    import paho.mqtt.client as mqtt

    got = threading.Event()
    box = {}

    def on_message(c, u, msg):
        box["status"] = json.loads(msg.payload)
        box["retain"] = msg.retain
        got.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-status-reader")
    client.on_connect = lambda c, u, f, r, p: c.subscribe(f"{PREFIX}/status", qos=1)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    got.wait(10)
    client.disconnect()
    client.loop_stop()
    return box


@pytest.fixture(scope="module")
def video(synth_test_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mqtt-video") / "parts.avi"
    return out, write_video(synth_test_dir, out, size=(160, 120), hold=2)


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return open_model(tiny_bundle[0], backend="openvino")


def test_mqtt_urls_are_checked():
    assert parse_mqtt_url("mqtt://u:p%40ss@broker:1884/a/b")["password"] == "p@ss"
    assert parse_mqtt_url("mqtts://broker/a")["port"] == 8883
    for bad in ("http://broker/a", "mqtt://broker", "mqtt://broker/a/#", "mqtt:///a"):
        with pytest.raises(LinesideError, match="--mqtt"):
            parse_mqtt_url(bad)


def test_every_decision_is_published_with_its_fields_and_the_status_is_retained(model, video, broker, tmp_path):
    path, info = video
    sub = Subscriber(broker.port)
    try:
        summary = run_app(model, RunOptions(source=str(path), log=str(tmp_path / "log.sqlite"), mqtt=broker.url,
                                            station="station7", ok_classes=model.labels[0]))
        deadline = time.time() + 10
        while time.time() < deadline and len({m["frame"] for m, _ in sub.messages.get("decision", [])}) < \
                summary["frames"]:
            time.sleep(0.1)
    finally:
        sub.close()
    decisions = [m for m, _ in sub.messages["decision"]]
    assert sorted({m["frame"] for m in decisions}) == list(range(1, info["frames"] + 1)) == \
        list(range(1, summary["frames"] + 1))
    first = decisions[0]
    for key in ("time", "ts", "station", "frame", "part_id", "label", "confidence", "verdict", "probabilities",
                "flags", "capture_to_decision_ms", "model_sha256", "labels_version"):
        assert key in first, key
    assert first["station"] == "station7" and first["model_sha256"] == model.checksum
    assert first["time"][-6] in "+-" and set(first["probabilities"]) == set(model.labels)
    assert summary["mqtt_dropped"] == 0 and summary["mqtt_published"] >= summary["frames"]
    status = retained_status(broker.port)
    assert status["retain"] and status["status"]["state"] == "offline"
    assert sum(status["status"]["counts"].values()) == summary["frames"]


def test_a_killed_station_reads_offline_through_its_last_will(tiny_bundle, video, broker, tmp_path):
    path, _ = video
    proc = subprocess.Popen([sys.executable, "-m", "lineside.cli", "run", str(tiny_bundle[0]), "--source", str(path),
                             "--loop", "--pace", "30", "--log", "none", "--mqtt", broker.url, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if retained_status(broker.port).get("status", {}).get("state") == "online":
                break
            time.sleep(0.5)
        else:
            pytest.fail("the station never published an online status")
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.time() + 10
    while time.time() < deadline and retained_status(broker.port)["status"]["state"] != "offline":
        time.sleep(0.2)
    assert retained_status(broker.port)["status"]["state"] == "offline"


def test_a_broker_away_for_a_few_seconds_loses_no_decision(model, video, broker, tmp_path):
    """The broker stops mid-run and comes back 3 s later: the decisions made meanwhile wait
    in the queue and arrive after the reconnect; the loop never waited."""
    path, _ = video
    sub = Subscriber(broker.port)
    result = {}
    run = threading.Thread(target=lambda: result.update(run_app(model, RunOptions(
        source=str(path), log=None, mqtt=broker.url, pace=30, loop=True, max_frames=300))))
    try:
        run.start()
        time.sleep(3.0)
        broker.stop()
        time.sleep(3.0)
        broker.start()
        run.join(60)
        deadline = time.time() + 20
        while time.time() < deadline and len({m["frame"] for m, _ in sub.messages.get("decision", [])}) < 300:
            time.sleep(0.2)
    finally:
        sub.close()
    frames = {m["frame"] for m, _ in sub.messages["decision"]}
    assert result["frames"] == 300 and frames == set(range(1, 301))
    assert result["mqtt_dropped"] == 0
    assert result["dropped"] < 5          # paced at 30 FPS: the broker's absence never held the loop back


def _publish(port: int, topic: str, payload: str):
    import paho.mqtt.publish as publish

    publish.single(topic, payload, qos=1, hostname="127.0.0.1", port=port)


def _wait_for(sub: Subscriber, topic: str, pred, timeout: float = 20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [m for m, _ in list(sub.messages.get(topic, [])) if isinstance(m, dict) and pred(m)]
        if found:
            return found[0]
        time.sleep(0.02)
    return None


def test_an_mqtt_trigger_is_answered_and_its_part_id_is_everywhere(model, video, broker, tmp_path):
    path, _ = video
    db = tmp_path / "log.sqlite"
    sub = Subscriber(broker.port, "test-trigger-subscriber")
    result = {}
    run = threading.Thread(target=lambda: result.update(run_app(model, RunOptions(
        source=str(path), log=str(db), mqtt=broker.url, pace=30, loop=True, seconds=6, trigger="mqtt",
        ok_classes=model.labels[0], vote="2/3"))))
    try:
        run.start()
        assert _wait_for(sub, "status", lambda m: m["state"] == "online")
        _publish(broker.port, f"{PREFIX}/trigger", json.dumps({"part_id": "A-1"}))
        answer = _wait_for(sub, "answer", lambda m: m["part_id"] == "A-1")
        run.join(60)
    finally:
        sub.close()
    assert answer and answer["reason"] == "decided" and answer["frames"] == 3 and answer["verdict"] in ("OK", "NG")
    tagged = [m for m, _ in sub.messages["decision"] if m["part_id"] == "A-1"]
    assert len(tagged) == 3
    rows = sqlite3.connect(db).execute("SELECT frame FROM decisions WHERE part_id = 'A-1'").fetchall()
    assert sorted(r[0] for r in rows) == sorted(m["frame"] for m in tagged)
    assert result["answers"] == {"decided": 1}


def test_a_trigger_while_the_source_is_gone_is_answered_ng_in_time(model, broker, tmp_path):
    """Fail safe: the camera is gone (a stream nobody serves); a trigger gets NG with the
    reason no_frame within the timeout and a small margin, never silence."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"rtsp://127.0.0.1:{s.getsockname()[1]}/x"
    sub = Subscriber(broker.port, "test-failsafe-subscriber")
    run = threading.Thread(target=lambda: run_app(model, RunOptions(
        source=dead, log=None, mqtt=broker.url, seconds=6, trigger="mqtt", trigger_timeout_ms=500,
        ok_classes=model.labels[0])))
    try:
        run.start()
        assert _wait_for(sub, "status", lambda m: m["state"] == "online")
        t0 = time.time()
        _publish(broker.port, f"{PREFIX}/trigger", "B-7")
        answer = _wait_for(sub, "answer", lambda m: m["part_id"] == "B-7", timeout=5)
        waited = time.time() - t0
        run.join(60)
    finally:
        sub.close()
    assert answer and (answer["verdict"], answer["reason"], answer["label"]) == ("NG", "no_frame", "unknown")
    assert 0.5 <= answer["latency_ms"] / 1000 < 0.5 + 0.2 and waited < 0.5 + 1.0


def test_the_online_status_counts_the_frames_dropped_so_far(broker):
    """The loop's own counters reach the retained status while the run goes on, not only
    in the final (offline) message."""
    from types import SimpleNamespace

    from lineside.runtime.mqtt import MqttOutput

    out = MqttOutput(broker.url, "station7", "sha", ["a", "b"])
    try:
        assert out.connected.wait(10)
        assert "dropped_frames" not in out._status("online")
        dropped = [3]
        out.observe(None, None, SimpleNamespace(dropped=lambda: dropped[0]))
        assert out._status("online")["dropped_frames"] == 3
        dropped[0] = 11
        out._publish_status(force=True)
        deadline = time.time() + 10
        while time.time() < deadline and retained_status(broker.port)["status"].get("dropped_frames") != 11:
            time.sleep(0.2)
        assert retained_status(broker.port)["status"]["dropped_frames"] == 11
    finally:
        out.close({"dropped": 12})
    assert retained_status(broker.port)["status"]["dropped_frames"] == 12


def test_an_opcua_trigger_is_answered_with_its_part_id_in_opcua_mqtt_and_the_log(model, video, broker, tmp_path,
                                                                                  monkeypatch):
    """A PLC triggers over OPC UA while the decisions go to MQTT as well: the part id it gave
    comes back in OPC UA's LastAnswer, on PREFIX/answer and PREFIX/decision, and in SQLite."""
    import asyncio

    from opcua_client import free_endpoint, trigger_and_wait, wait_for_server

    path, _ = video
    db = tmp_path / "log.sqlite"
    endpoint = free_endpoint()
    monkeypatch.setenv("LINESIDE_OPCUA_PASSWORD", "s3cret")
    sub = Subscriber(broker.port, "test-opcua-trigger-subscriber")
    result = {}
    run = threading.Thread(target=lambda: result.update(run_app(model, RunOptions(
        source=str(path), log=str(db), mqtt=broker.url, opcua=endpoint, opcua_user="plc", trigger="opcua",
        station="station7", pace=30, loop=True, seconds=8, ok_classes=model.labels[0], vote="2/3"))))

    async def plc():
        await wait_for_server(endpoint)
        return (await trigger_and_wait(endpoint, "station7", "P-77", "plc", "s3cret"))[1]

    try:
        run.start()
        assert _wait_for(sub, "status", lambda m: m["state"] == "online")
        opcua_answer = asyncio.run(plc())
        mqtt_answer = _wait_for(sub, "answer", lambda m: m["part_id"] == "P-77")
        run.join(60)
    finally:
        sub.close()
    assert opcua_answer and opcua_answer["reason"] == "decided" and opcua_answer["frames"] == 3
    assert mqtt_answer and {k: mqtt_answer[k] for k in ("label", "verdict", "frames")} == \
        {k: opcua_answer[k] for k in ("label", "verdict", "frames")}
    tagged = sorted(m["frame"] for m, _ in sub.messages["decision"] if m["part_id"] == "P-77")
    rows = sqlite3.connect(db).execute("SELECT frame FROM decisions WHERE part_id = 'P-77'").fetchall()
    assert len(tagged) == 3 and sorted(r[0] for r in rows) == tagged
    assert result["answers"] == {"decided": 1}


def test_the_product_is_switched_by_an_mqtt_message(tiny_bundle, video, broker, tmp_path):
    """PREFIX/product names the product (or its index); the decisions after it carry it, on
    MQTT and in the log; an unknown name is refused with an event and nothing changes."""
    from lineside.runtime.app import make_decider
    from lineside.runtime.model import open_model
    from lineside.runtime.products import open_products

    import cv2

    from test_products import Frames

    path, _ = video
    bundle = tiny_bundle[0]
    cap = cv2.VideoCapture(str(path))
    images = [cap.read()[1] for _ in range(6)]
    cap.release()
    done = threading.Event()
    products_file = tmp_path / "products.yaml"
    products_file.write_text(f"products:\n  - name: a\n    bundle: {bundle}\n  - name: b\n    bundle: {bundle}\n")
    products = open_products(products_file, "openvino", "fp32", "CPU", None, open_model, make_decider)
    db = tmp_path / "log.sqlite"
    sub = Subscriber(broker.port, "test-product-subscriber")
    result = {}
    run = threading.Thread(target=lambda: result.update(run_app(None, RunOptions(
        source=str(path), log=str(db), mqtt=broker.url, pace=30, seconds=120), products=products,
        opener=lambda info: Frames(images, done))))
    try:
        run.start()
        assert _wait_for(sub, "decision", lambda m: m.get("product") == "a")
        _publish(broker.port, f"{PREFIX}/product", "no-such-product")
        _publish(broker.port, f"{PREFIX}/product", "b")
        assert _wait_for(sub, "decision", lambda m: m.get("product") == "b")
        _publish(broker.port, f"{PREFIX}/product", "0")
        deadline = time.monotonic() + 20
        while sub.messages["decision"][-1][0].get("product") != "a":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        done.set()
        run.join(60)
        sub.close()
    assert result["products"] == {"active": "a", "switches": 2, "refused": 1}
    with sqlite3.connect(db) as con:
        products_logged = [p for p, in con.execute("SELECT product FROM decisions ORDER BY frame")]
        kinds = [k for k, in con.execute("SELECT kind FROM events")]
    assert products_logged[0] == "a" and "b" in products_logged and products_logged[-1] == "a"
    assert kinds.count("product_switch") == 2 and kinds.count("product_refused") == 1
