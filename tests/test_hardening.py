"""Faults a hostile or careless user can cause: none may cost a logged decision, crash the
loop, or give more than one line of error."""

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lineside.cli import main
from lineside.runtime.app import RunOptions, run_app
from lineside.runtime.model import open_model
from lineside.runtime.records import DecisionRow, Recorder
from lineside.text import printable, redact_url


@pytest.fixture(scope="module")
def model(tiny_bundle):
    bundle, _ = tiny_bundle
    return open_model(bundle, backend="openvino")


def _folder_with_a_latin1_name(src: Path, folder: Path) -> Path:
    folder.mkdir()
    pngs = sorted((src / "hat").glob("*.png"))[:5]
    for i, p in enumerate(pngs[:4]):
        (folder / f"{i}.png").write_bytes(p.read_bytes())
    # 'café.png' as Latin-1 bytes: not UTF-8, as names from a Windows share often are
    latin1 = os.path.join(os.fsencode(folder), b"caf\xe9.png")
    with open(latin1, "wb") as f:
        f.write(pngs[4].read_bytes())
    return folder


# --- 1. text that is not UTF-8 --------------------------------------------------------

def test_printable_keeps_the_raw_bytes_recoverable_and_encodes():
    name = os.fsdecode(b"caf\xe9.png")
    shown = printable(name)
    shown.encode("utf-8")
    assert shown == "caf\\xe9.png"
    printable("\ud800x").encode("utf-8")     # a lone surrogate that is no escaped byte
    assert printable("plain") == "plain" and printable(3) == "3"


@pytest.mark.parametrize("log_name", ["log.sqlite", "log.jsonl"])
def test_a_file_name_that_is_not_utf8_costs_no_decision(model, synth_test_dir, tmp_path, log_name):
    folder = _folder_with_a_latin1_name(synth_test_dir, tmp_path / "frames")
    log = tmp_path / log_name
    summary = run_app(model, RunOptions(source=str(folder), log=str(log)))
    assert summary["frames"] == summary["logged"] == 5
    assert summary["not_logged"] == summary["unwritable_rows"] == 0 and summary["exit_code"] == 0
    if log_name.endswith(".sqlite"):
        with sqlite3.connect(log) as con:
            origins = [r[0] for r in con.execute("SELECT origin FROM decisions")]
    else:
        origins = [json.loads(x)["origin"] for x in log.read_text().splitlines()
                   if json.loads(x)["type"] == "decision"]
    assert "caf\\xe9.png" in origins and len(origins) == 5


def test_run_cli_prints_a_summary_for_a_name_that_is_not_utf8(tiny_bundle, synth_test_dir, tmp_path):
    bundle, _ = tiny_bundle
    folder = _folder_with_a_latin1_name(synth_test_dir, tmp_path / "frames")
    result = CliRunner().invoke(main, ["run", str(bundle), "--source", str(folder), "--quiet", "--json",
                                       "--log", str(tmp_path / "log.sqlite")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["logged"] == 5


def _row(frame, **kw):
    fields = dict(ts=time.time(), frame=frame, source="s", origin="o", label="a", confidence=0.9, top="a",
                  verdict=None, decision=None, probabilities={"a": 0.9, "b": 0.1}, flags=[], latency_ms=1.0,
                  capture_to_decision_ms=2.0, model_sha256="x")
    fields.update(kw)
    return DecisionRow(**fields)


@pytest.mark.parametrize("log_name", ["log.sqlite", "log.jsonl"])
def test_a_row_the_log_cannot_hold_becomes_an_event_and_the_batch_is_written(tmp_path, log_name):
    path = tmp_path / log_name
    recorder = Recorder(path, {"source": "s"})
    for i in range(3):
        recorder.decision(_row(i))
    recorder.decision(_row(3, probabilities={"a": object()}))     # no log format can hold this
    for i in range(4, 7):
        recorder.decision(_row(i))
    recorder.close({})
    counts = recorder.counts()
    assert counts["logged"] == 6 and counts["unwritable_rows"] == 1 and counts["not_logged"] == 0
    if log_name.endswith(".sqlite"):
        with sqlite3.connect(path) as con:
            frames = [r[0] for r in con.execute("SELECT frame FROM decisions ORDER BY frame")]
            events = con.execute("SELECT kind, detail FROM events").fetchall()
    else:
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        frames = sorted(x["frame"] for x in lines if x["type"] == "decision")
        events = [(x["kind"], x["detail"]) for x in lines if x["type"] == "event"]
    assert frames == [0, 1, 2, 4, 5, 6]
    assert [k for k, _ in events] == ["row_unwritable"] and '"label": "a"' in events[0][1]


def test_redact_url_hides_passwords_only():
    assert redact_url("mqtt://plc:s3cret@broker:1883/a/b") == "mqtt://plc:***@broker:1883/a/b"
    assert redact_url("rtsp://cam:p%40ss@10.0.0.5/stream") == "rtsp://cam:***@10.0.0.5/stream"
    assert redact_url("rtsp://10.0.0.5/stream") == "rtsp://10.0.0.5/stream"
    assert "s3cret" not in redact_url("cannot open url source 'rtsp://u:s3cret@h/x' now")
    assert redact_url("/data/frames") == "/data/frames"


@pytest.mark.parametrize("url", ["mqtt://plc:s3cret@broker:abc/line", "mqtt://plc:s3cret@/line",
                                 "http://plc:s3cret@broker/line", "mqtt://plc:s3cret@broker/"])
def test_a_bad_mqtt_url_is_refused_without_its_password(url):
    from lineside.errors import LinesideError
    from lineside.runtime.mqtt import parse_mqtt_url

    with pytest.raises(LinesideError) as err:
        parse_mqtt_url(url)
    assert "s3cret" not in str(err.value) and "plc:***@" in str(err.value)


def test_a_camera_url_with_a_password_is_never_recorded_with_it():
    from lineside.runtime.sources import describe_source

    info = describe_source("rtsp://cam:s3cret@127.0.0.1:1/stream")
    assert info.text.endswith("s3cret@127.0.0.1:1/stream") and info.shown == "rtsp://cam:***@127.0.0.1:1/stream"


# --- 5. HTTP ---------------------------------------------------------------------------

TOKEN = "line3-review-token"


@pytest.fixture(scope="module")
def review_server(model, synth_test_dir, tmp_path_factory):
    """A review page over a real run's log and saved frames, in this process."""
    from lineside.runtime import web
    from lineside.runtime.review import ReviewStore

    root = tmp_path_factory.mktemp("review")
    folder = root / "frames"
    folder.mkdir()
    for i, p in enumerate(sorted((synth_test_dir / "hat").glob("*.png"))[:3]):
        (folder / f"{i}.png").write_bytes(p.read_bytes())
    log = root / "log.sqlite"
    run_app(model, RunOptions(source=str(folder), log=str(log), save_dir=root / "saved", save_when="all"))
    store = ReviewStore(log, root / "saved", root / "reviewed")
    server = web.StatusServer("127.0.0.1:0", None, store, TOKEN, hosts=("station7.plant.example",)).start()
    yield server, store, root
    server.close()


def _exchange(port: int, raw: bytes, responses: int, timeout: float = 20.0) -> list[tuple[int, dict, bytes]]:
    """Send raw bytes on one connection; read `responses` HTTP responses (or until closed)."""
    import socket

    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        f = sock.makefile("rb")
        while len(out) < responses:
            line = f.readline()
            if not line:
                break
            status = int(line.split()[1])
            headers = {}
            while (h := f.readline()) not in (b"\r\n", b""):
                k, _, v = h.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            body = f.read(int(headers.get("content-length", 0)))
            out.append((status, headers, body))
    return out


def _request(method: str, path: str, host: str = "127.0.0.1", body: bytes = b"", extra: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{length}{extra}\r\n".encode() + body


def test_a_refused_post_never_leaves_its_body_to_be_read_as_a_request(review_server):
    server, _, _ = review_server
    smuggled = _request("GET", "/smuggled")           # a 404, if it were ever read as a request
    raw = (_request("POST", "/api/review/1", body=smuggled, extra="Content-Type: application/json\r\n")
           + _request("GET", "/api/review?limit=2"))
    got = _exchange(server.port, raw, 2)
    assert [s for s, _, _ in got] == [401, 200]       # before: 401, then 404 for the body
    assert "items" in json.loads(got[1][2])


def test_the_page_answers_only_to_its_own_names(review_server):
    server, _, _ = review_server
    for host, status in [("127.0.0.1", 200), (f"127.0.0.1:{server.port}", 200), ("localhost", 200),
                         ("[::1]:80", 200), ("station7.plant.example", 200), ("evil.example", 400),
                         ("evil.example:80", 400), ("127.0.0.1.evil.example", 400)]:
        (got,) = _exchange(server.port, _request("GET", "/api/review", host=host), 1)
        assert got[0] == status, host
    (got,) = _exchange(server.port, b"GET /api/review HTTP/1.1\r\n\r\n", 1)      # no Host at all
    assert got[0] == 400


@pytest.mark.parametrize("raw, status", [
    (b"POST /api/review/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /api/review/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999\r\n\r\n", 413),
    (b"POST /api/review/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    (b"GET /api/review?limit=abc HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET /api/review?before=99999999999999999999999999 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET /api/review?verdict=maybe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET /api/frames/99999999999999999999999999.jpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
    (b"PUT /api/review/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 501),
    (b"GET /api/review HTTP/1.1 x\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"BROKEN\r\n\r\n", 400),
])
def test_malformed_requests_get_4xx_with_the_security_headers(review_server, raw, status):
    server, _, _ = review_server
    (got,) = _exchange(server.port, raw, 1)
    assert got[0] == status
    assert got[1].get("x-content-type-options") == "nosniff" and "content-security-policy" in got[1]


def test_deeply_nested_json_is_a_400(review_server):
    server, _, _ = review_server
    body = b'{"label": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    for data in (body, b"[" * 4000):
        raw = _request("POST", "/api/review/1", body=data,
                       extra=f"Content-Type: application/json\r\nX-Lineside-Token: {TOKEN}\r\n")
        (got,) = _exchange(server.port, raw, 1)
        assert got[0] in (400, 413), got


def test_a_link_in_the_save_folder_named_like_a_frame_is_not_served(review_server, tmp_path):
    server, store, root = review_server
    item = store.items(limit=1)[0]
    (got,) = _exchange(server.port, _request("GET", f"/api/frames/{item['id']}.jpg"), 1)
    assert got[0] == 200 and got[2][:2] == b"\xff\xd8"
    saved = store.frame_path(item["id"])
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the page")
    kept = saved.read_bytes()
    saved.unlink()
    saved.symlink_to(secret)
    try:
        (got,) = _exchange(server.port, _request("GET", f"/api/frames/{item['id']}.jpg"), 1)
        assert got[0] == 404 and b"not for the page" not in got[2]
    finally:
        saved.unlink()
        saved.write_bytes(kept)


def test_idle_connections_are_closed_and_their_number_is_bounded(review_server, monkeypatch):
    import socket

    from lineside.runtime import web

    monkeypatch.setattr(web, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(web._Handler, "timeout", 1.0)
    server = web.StatusServer("127.0.0.1:0", None, review_server[1], None).start()
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(2)]
        (got,) = _exchange(server.port, _request("GET", "/api/review"), 1)   # a third: refused, not queued
        assert got[0] == 503 and got[1].get("x-content-type-options") == "nosniff"
        t0 = time.monotonic()
        assert all(s.recv(1) == b"" for s in idle)     # closed by the server, having sent nothing
        assert time.monotonic() - t0 < 25
        for s in idle:
            s.close()
        deadline = time.monotonic() + 20
        while True:          # their slots are free again once their threads end
            (got,) = _exchange(server.port, _request("GET", "/api/review"), 1)
            if got[0] == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert got[0] == 200
    finally:
        server.close()


# --- 3. decompression bombs ------------------------------------------------------------

def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (a valid CRC): what a decompression
    bomb looks like to anything that reads the header."""
    import struct
    import zlib

    import cv2
    import numpy as np

    data = bytearray(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())
    ihdr = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def test_an_image_too_large_to_decode_is_refused_from_its_header(tmp_path, monkeypatch):
    from lineside.images import BadImage, image_size, read_image

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(30000, 30000))
    assert image_size(bomb.read_bytes()) == (30000, 30000)
    t0 = time.perf_counter()
    with pytest.raises(BadImage, match=r"bomb.png: 30000x30000 pixels is more than the limit .*LINESIDE_MAX_IMAGE"):
        read_image(bomb)
    assert time.perf_counter() - t0 < 5          # refused before decoding (decoding took 20 s and 3.6 GB)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a" + bytes(100))      # content no lineside format has: never decoded unsized
    with pytest.raises(BadImage, match="fake.png: not a readable image"):
        read_image(fake)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif", ".webp", ".ppm", ".pgm"])
def test_the_pixel_limit_holds_for_every_format_and_is_adjustable(tmp_path, monkeypatch, ext):
    import cv2
    import numpy as np

    from lineside.images import BadImage, read_image

    path = tmp_path / f"part{ext}"
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)
    cv2.imwrite(str(path), image[:, :, 0] if ext == ".pgm" else image)
    assert read_image(path).shape == (48, 64, 3)
    monkeypatch.setenv("LINESIDE_MAX_IMAGE_PIXELS", str(48 * 64 - 1))
    with pytest.raises(BadImage, match="64x48 pixels is more than the limit of 3,071"):
        read_image(path)
    monkeypatch.setenv("LINESIDE_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(Exception, match="LINESIDE_MAX_IMAGE_PIXELS='lots': not a number"):
        read_image(path)


def test_a_bomb_in_a_folder_source_is_an_event_and_the_loop_goes_on(model, synth_test_dir, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, p in enumerate(sorted((synth_test_dir / "hat").glob("*.png"))[:3]):
        (folder / f"{i}.png").write_bytes(p.read_bytes())
    (folder / "1b.png").write_bytes(_png_claiming(30000, 30000))
    log = tmp_path / "log.jsonl"
    summary = run_app(model, RunOptions(source=str(folder), log=str(log)))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert summary["frames"] == summary["logged"] == 3 and summary["exit_code"] == 0
    assert any(x["type"] == "event" and x["kind"] == "bad_image" and "1b.png: 30000x30000" in x["detail"]
               for x in lines)


def test_predict_on_a_bomb_is_one_line(tiny_bundle, tmp_path):
    bundle, _ = tiny_bundle
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(30000, 30000))
    result = CliRunner().invoke(main, ["predict", str(bundle), str(bomb)])
    assert result.exit_code == 2 and "30000x30000 pixels" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


# --- 4. every byte a model reads is in the manifest --------------------------------------

def _bundle_copy(tiny_bundle, tmp_path) -> tuple[Path, dict]:
    import shutil

    bundle, _ = tiny_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy, json.loads((copy / "bundle.json").read_text())


def _edit(copy: Path, doc: dict):
    (copy / "bundle.json").write_text(json.dumps(doc))


def test_weights_the_manifest_does_not_list_are_never_read(tiny_bundle, tmp_path):
    from lineside.errors import LinesideError

    copy, doc = _bundle_copy(tiny_bundle, tmp_path)
    del doc["models"]["openvino_fp32"]["files"]["model_fp32.bin"]
    _edit(copy, doc)
    weights = copy / "model_fp32.bin"
    weights.write_bytes(bytes(len(weights.read_bytes())))       # tampered, and unlisted
    with pytest.raises(LinesideError, match=r"model_fp32.bin: the model reads this file but bundle.json does not"):
        open_model(copy, backend="openvino")


def test_the_model_hash_covers_the_weights(tiny_bundle, tmp_path):
    import shutil

    bundle, _ = tiny_bundle
    genuine = open_model(bundle / "model_fp32.xml")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(bundle / "model_fp32.xml", lone / "m.xml")
    data = bytearray((bundle / "model_fp32.bin").read_bytes())
    data[-4:] = bytes(4)                                        # one weight changed
    (lone / "m.bin").write_bytes(bytes(data))
    tampered = open_model(lone / "m.xml")
    assert tampered.checksum != genuine.checksum              # before: both hashed the .xml only
    assert open_model(bundle, backend="openvino").checksum == genuine.checksum


def test_labels_edited_in_bundle_json_are_refused(tiny_bundle, tmp_path):
    from lineside.errors import LinesideError

    copy, doc = _bundle_copy(tiny_bundle, tmp_path)
    doc["metadata"]["labels"] = list(reversed(doc["metadata"]["labels"]))
    _edit(copy, doc)
    for backend in ("openvino", "onnxruntime"):
        with pytest.raises(LinesideError, match=r"bundle.json: its metadata \(labels\) does not match"):
            open_model(copy, backend=backend)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["models"]["openvino_fp32"].update(files={"model_fp32.xml": "abc"}), "no valid sha256"),
    (lambda d: d["models"]["openvino_fp32"].update(files=["model_fp32.xml"]), "lists no files"),
    (lambda d: d["models"]["openvino_fp32"]["files"].update({"../model.xml": {"sha256": "0" * 64}}),
     "not a plain file name"),
    (lambda d: d.update(models=[]), "'models' must be a mapping"),
    (lambda d: d.pop("metadata"), "metadata schema None is not supported"),
    (lambda d: d["models"]["openvino_fp32"]["files"].update({"extra.onnx": {"sha256": "0" * 64}}),
     "exactly one .onnx or .xml"),
])
def test_a_malformed_manifest_is_one_line(tiny_bundle, synth_test_dir, tmp_path, edit, needle):
    copy, doc = _bundle_copy(tiny_bundle, tmp_path)
    edit(doc)
    _edit(copy, doc)
    result = CliRunner().invoke(main, ["eval", str(copy), str(synth_test_dir), "--backend", "openvino"])
    assert result.exit_code == 2 and needle in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


# --- 8. one line where one line is promised --------------------------------------------

@pytest.mark.parametrize("content", [b"", b"\x00\x00\x00\x18ftypmp42" + bytes(2000)], ids=["empty", "truncated"])
def test_a_video_that_cannot_be_read_is_one_line_on_stderr(tiny_bundle, tmp_path, content):
    import subprocess
    import sys

    bundle, _ = tiny_bundle
    video = tmp_path / "parts.mp4"
    video.write_bytes(content)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    proc = subprocess.run([sys.executable, "-m", "lineside.cli", "run", str(bundle), "--source", str(video),
                           "--log", "none", "--quiet"], capture_output=True, text=True, timeout=120, env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: --source {video}: ") and "Traceback" not in proc.stderr


def test_a_camera_password_reaches_no_record(model, tmp_path):
    """A stream that never opens, named with a password: the log's run, rows and events and
    the summary never hold the password."""
    log = tmp_path / "log.sqlite"
    summary = run_app(model, RunOptions(source="rtsp://cam:s3cret@127.0.0.1:9/none", log=str(log),
                                        seconds=1.5, source_timeout=1.0))
    assert "s3cret" not in json.dumps(summary)
    with sqlite3.connect(log) as con:
        text = json.dumps([con.execute(f"SELECT * FROM {t}").fetchall() for t in ("runs", "decisions", "events")])
    assert "s3cret" not in text and "cam:***@127.0.0.1" in text


def test_export_json_is_json_alone_on_stdout(tiny_run, tmp_path):
    """NNCF's INFO lines and progress bars went to stdout before the JSON (the first-hour
    report): now to stderr."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lineside.cli", "export", str(tiny_run[0]), "--out",
                           str(tmp_path / "b"), "--speed-seconds", "0", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)                 # the whole of stdout is one JSON document
    assert "openvino" in result["report"]["int8"] and "INFO:nncf" not in proc.stdout


def test_log_keep_days_deletes_old_rows_and_keeps_the_counts_true(tmp_path, monkeypatch):
    """A station running for months fills its disk with the log (about 1 GB a day at 30 FPS)
    unless old rows go: --log-keep-days deletes the decisions, events and shadow rows older
    than it, oldest first in batches, at the start and every PRUNE_SECONDS; `logged` still
    counts the run's rows on disk."""
    from lineside.runtime import records

    monkeypatch.setattr(records, "PRUNE_BATCH", 7)        # several batches
    path = tmp_path / "log.sqlite"
    old = time.time() - 3 * 86400
    first = Recorder(path, {"source": "s"})
    for i in range(40):
        first.decision(_row(i, ts=old + i))
    first.close({})
    monkeypatch.setattr(records, "PRUNE_SECONDS", 0.0)     # prune at every batch
    second = Recorder(path, {"source": "s"}, keep_days=1.0)
    for i in range(20):                                   # this run's own old rows go too
        second.decision(_row(i, ts=old + 100 + i))
    for i in range(30):
        second.decision(_row(100 + i))
    second.close({})
    counts = second.counts()
    with sqlite3.connect(path) as con:
        frames = [f for (f,) in con.execute("SELECT frame FROM decisions ORDER BY id")]
        pruned = con.execute("SELECT detail FROM events WHERE kind = 'log_pruned'").fetchall()
        summary = json.loads(con.execute("SELECT summary FROM runs ORDER BY id DESC").fetchone()[0])
    assert frames == list(range(100, 130))
    assert counts["pruned"] == 60 and counts["logged"] == 30 == summary["logged"]
    assert pruned and all("older than 1 days" in d for (d,) in pruned)


def test_log_keep_days_wants_a_sqlite_log_and_a_positive_number(tmp_path):
    from lineside.errors import LinesideError

    with pytest.raises(LinesideError, match="--log-keep-days: only a SQLite --log"):
        Recorder(tmp_path / "log.jsonl", {"source": "s"}, keep_days=7)
    with pytest.raises(LinesideError, match="--log-keep-days: must be positive"):
        RunOptions(source="0", log_keep_days=0)


def test_a_disk_running_low_under_the_log_is_an_event_before_it_costs_decisions(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lineside.runtime import records

    free = {"bytes": 300 << 20}
    monkeypatch.setattr(records.os, "statvfs", lambda p: SimpleNamespace(f_bavail=free["bytes"] // 4096,
                                                                          f_frsize=4096))
    monkeypatch.setattr(records, "DISK_CHECK_SECONDS", 0.0)
    monkeypatch.setenv("LINESIDE_DISK_LOW_MB", "1024")
    path = tmp_path / "log.sqlite"
    recorder = Recorder(path, {"source": "s"})
    for i in range(3):
        recorder.decision(_row(i))
    assert "disk_low" in recorder.state.last_error and "300 MB free" in recorder.state.last_error
    free["bytes"] = 5 << 30
    recorder.decision(_row(3))
    free["bytes"] = 300 << 20
    recorder.decision(_row(4))
    recorder.close({})
    with sqlite3.connect(path) as con:
        kinds = [k for (k,) in con.execute("SELECT kind FROM events WHERE kind LIKE 'disk_%' ORDER BY id")]
        assert con.execute("SELECT count(*) FROM decisions").fetchone()[0] == 5
    assert kinds == ["disk_low", "disk_ok", "disk_low"]           # once per crossing, not per frame


@pytest.mark.parametrize("log_name", ["log.sqlite", "log.jsonl"])
def test_every_batch_is_on_the_disk_before_the_next(tmp_path, monkeypatch, log_name):
    """A power cut costs at most the batch being written: SQLite commits with
    synchronous=FULL (NORMAL in WAL mode may roll back every commit since the last
    checkpoint), and JSON lines are fsync'ed after each batch."""
    from lineside.runtime import records

    synced = []
    real = records.os.fsync
    monkeypatch.setattr(records.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    path = tmp_path / log_name
    recorder = Recorder(path, {"source": "s"})
    recorder.decision(_row(0))
    recorder.close({})
    if log_name.endswith(".sqlite"):
        assert recorder.writer.log.synchronous == 2          # FULL, as the writer's connection read it back
    else:
        assert len(synced) >= 2                  # the decision's batch and the run's end


def test_events_that_report_no_fault_never_become_the_last_error():
    """OPC UA's LastError, MQTT's status and the page show the station's last error: a
    product switch or a model update is no error, and once said, a real one stays shown."""
    from lineside.runtime.outputs import StationState
    from lineside.runtime.records import Event

    state = StationState()
    state.on_event(Event(time.time(), "product_switch", "a -> b"))
    state.on_event(Event(time.time(), "update_loaded", "u1 loaded"))
    assert state.last_error is None
    state.on_event(Event(time.time(), "update_refused", "u2: checksum"))
    state.on_event(Event(time.time(), "drift_cleared", "brightness back"))
    assert state.last_error == "update_refused: u2: checksum"


def test_a_clock_set_forward_does_not_make_the_runs_own_rows_old(tmp_path, monkeypatch):
    """A box without a battery clock that meets NTP a year late: --log-keep-days goes by
    the clock the run started with for the run's own rows, so none of them goes for the
    jump; an earlier run's rows older than the limit still go."""
    from lineside.runtime import records

    monkeypatch.setattr(records, "PRUNE_SECONDS", 0.0)
    path = tmp_path / "log.sqlite"
    earlier = Recorder(path, {"source": "s"})
    for i in range(10):
        earlier.decision(_row(i, ts=time.time() - 3 * 86400))
    earlier.close({})
    real = time.time
    recorder = Recorder(path, {"source": "s"}, keep_days=1.0)
    for i in range(20):
        recorder.decision(_row(100 + i))
    monkeypatch.setattr(records.time, "time", lambda: real() + 365 * 86400)
    for i in range(20):
        recorder.decision(_row(200 + i))
    recorder.close({})
    with sqlite3.connect(path) as con:
        frames = [f for (f,) in con.execute("SELECT frame FROM decisions ORDER BY id")]
    assert frames == [*range(100, 120), *range(200, 220)]
    assert recorder.counts()["pruned"] == 10 and recorder.counts()["logged"] == 40
