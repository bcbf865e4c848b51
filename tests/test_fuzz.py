"""Property-based tests (Hypothesis): random and malformed input to the HTTP API, MQTT
trigger payloads, bundle manifests and dataset manifests never crashes anything, never
loses a logged decision, and always gives a 4xx or a one-line LinesideError.

Bounded in examples and without deadlines, so that they take the same time on any
machine and never fail for being slow: about 20 s in all on two cores."""

import json
import shutil
import socket
import sqlite3
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lineside.errors import LinesideError

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TOKEN = "fuzz-review-token-0123"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


# --- the HTTP API --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_bundle, synth_test_dir, tmp_path_factory):
    from lineside.runtime.app import RunOptions, run_app
    from lineside.runtime.model import open_model
    from lineside.runtime.review import ReviewStore
    from lineside.runtime.web import LivePage, StatusServer

    root = tmp_path_factory.mktemp("fuzz_http")
    folder = root / "frames"
    folder.mkdir()
    for i, p in enumerate(sorted((synth_test_dir / "hat").glob("*.png"))[:3]):
        (folder / f"{i}.png").write_bytes(p.read_bytes())
    log = root / "log.sqlite"
    model = open_model(tiny_bundle[0], backend="onnxruntime")
    run_app(model, RunOptions(source=str(folder), log=str(log), save_dir=root / "saved", save_when="all"))
    page = LivePage("fuzz", {"name": "b/m", "labels": model.labels, "precision": "fp32", "sha256": "x",
                             "backend": "onnxruntime"}, "frames")
    srv = StatusServer("127.0.0.1:0", page, ReviewStore(log, root / "saved", root / "reviewed"), TOKEN).start()
    yield srv
    srv.close()


def _status_of(port: int, raw: bytes, head: bool) -> int | None:
    """The status of the first response to raw bytes (None: the server closed without one)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        try:
            sock.shutdown(socket.SHUT_WR)        # no more: a request waiting for body bytes ends now
        except OSError:
            pass
        line = sock.makefile("rb").readline()
    if not line:
        return None
    return int(line.split()[1])


paths = st.one_of(
    st.sampled_from(["/", "/review", "/api/status", "/metrics", "/frame/last.jpg", "/api/review", "/live.js",
                     "/style.css", "/api/frames/1.jpg", "/api/review/1", "/../etc/passwd", "//", "/%00"]),
    st.builds(lambda base, tail: base + tail,
              st.sampled_from(["/api/review/", "/api/frames/", "/api/review?", "/", "/metrics?"]),
              st.text(st.characters(codec="utf-8"), max_size=40)))
header_values = st.one_of(st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=30),
                          st.sampled_from(["0", "5", "-1", "99999999999", "abc", "1e3", " 7 "]))


@given(method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "G\x00T", ""]),
       path=paths,
       version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1 x", ""]),
       host=st.sampled_from(["127.0.0.1", "localhost:80", "evil.example", "", None]),
       headers=st.dictionaries(st.sampled_from(["Content-Length", "Content-Type", "X-Lineside-Token",
                                                "Transfer-Encoding", "Connection", "Expect"]),
                               header_values, max_size=4),
       token=st.booleans(),
       body=st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                      st.builds(lambda n: b"[" * n, st.integers(0, 5000))))
@FUZZ
def test_the_http_api_answers_anything_with_a_4xx_at_worst(server, method, path, version, host, headers, token,
                                                             body):
    lines = [f"{method} {path} {version}".strip()]
    if host is not None:
        lines.append(f"Host: {host}")
    if token:
        lines.append(f"X-Lineside-Token: {TOKEN}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
    status = _status_of(server.port, raw, method == "HEAD")
    assert status is None or 200 <= status < 500 or status in (501, 505), status


def test_the_server_still_answers_after_the_fuzzing(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/api/status")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["station"] == "fuzz"
    conn.close()


# --- MQTT trigger payloads ------------------------------------------------------------------

@given(payload=st.one_of(st.binary(max_size=600), json_values.map(lambda v: json.dumps(v).encode()),
                         st.dictionaries(st.just("part_id"), json_values, min_size=1).map(
                             lambda v: json.dumps(v).encode()),
                         st.builds(lambda n: b'{"part_id": ' + b"[" * n, st.integers(0, 5000))))
@FUZZ
def test_any_trigger_payload_is_a_trigger_whose_answer_and_decision_are_logged(payload, tmp_path_factory):
    from lineside.runtime.mqtt import trigger_part_id
    from lineside.runtime.records import DecisionRow, Recorder
    from lineside.runtime.trigger import Triggers

    part = trigger_part_id(payload)
    assert part is None or (isinstance(part, str) and 0 < len(part) <= 200)
    answers = []
    triggers = Triggers(5.0, on_answer=answers.append)
    asked = triggers.request(part)
    answered = triggers.offer(time.perf_counter(), "ok", "OK", 0.9)
    triggers.close()
    assert answered == asked and [a.part_id for a in answers] == [asked] and answers[0].reason == "decided"
    path = tmp_path_factory.mktemp("trigger_log") / "log.sqlite"
    recorder = Recorder(path, {"source": "fuzz"})
    recorder.decision(DecisionRow(time.time(), 1, "fuzz", "", "ok", 0.9, "ok", "OK", "OK", {"ok": 0.9, "ng": 0.1},
                                  [], 1.0, 1.0, "x", answered))
    recorder.event("part_answer", json.dumps(answers[0].as_dict()))
    recorder.close({})
    assert recorder.counts()["logged"] == 1
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT count(*) FROM decisions").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM events").fetchone()[0] == 1


# --- bundle manifests -----------------------------------------------------------------------

def _paths(doc, prefix=()):
    """Every place in a JSON document (as key paths)."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


@pytest.fixture(scope="module")
def bundle_copy(tiny_bundle, tmp_path_factory):
    copy = tmp_path_factory.mktemp("fuzz_bundle") / "bundle"
    shutil.copytree(tiny_bundle[0], copy)
    return copy, json.loads((copy / "bundle.json").read_text())


@given(data=st.data(), backend=st.sampled_from(["openvino", "onnxruntime"]))
@settings(FUZZ, max_examples=60)
def test_a_mutated_bundle_manifest_opens_or_is_one_line(bundle_copy, data, backend):
    import copy as copying

    from lineside.runtime.model import RuntimeModel, open_model

    folder, original = bundle_copy
    doc = copying.deepcopy(original)
    places = [p for p in _paths(doc) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(places))
        parent = doc
        try:
            for k in where[:-1]:
                parent = parent[k]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(where[-1], None)
            else:
                parent[where[-1]] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass
    text = data.draw(st.one_of(st.just(json.dumps(doc)), st.just(json.dumps(doc)[:200]),
                               st.text(max_size=50)))
    (folder / "bundle.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        model = open_model(folder, backend=backend)
    except LinesideError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1000
    else:
        assert isinstance(model, RuntimeModel) and list(model.labels) == original["metadata"]["labels"]
    finally:
        (folder / "bundle.json").write_text(json.dumps(original))


# --- dataset manifests ----------------------------------------------------------------------

cells = st.one_of(st.text(max_size=15), st.sampled_from(["hat/hat_0000.png", "card/card_0001.png", "", " ",
                                                          "../x.png", "/etc/passwd", "a\x00b", "path", "label"]))


@given(rows=st.lists(st.lists(cells, max_size=4), max_size=8), header=st.booleans(), bom=st.booleans(),
       raw=st.binary(max_size=80))
@FUZZ
def test_a_malformed_dataset_manifest_loads_or_is_one_line(synth_test_dir, tmp_path_factory, rows, header, bom,
                                                           raw):
    import csv
    import io

    from lineside.dataset import ImageSet, load_image_set

    buf = io.StringIO()
    writer = csv.writer(buf)
    if header:
        writer.writerow(["path", "label"])
    for row in rows:
        writer.writerow(row)
    folder = tmp_path_factory.mktemp("fuzz_manifest")
    for name in ("hat", "card"):
        (folder / name).mkdir()
        for p in sorted((synth_test_dir / name).glob("*.png"))[:2]:
            shutil.copy(p, folder / name / p.name)
    manifest = folder / "manifest.csv"
    manifest.write_bytes(("\ufeff" if bom else "").encode() + buf.getvalue().encode("utf-8", "surrogateescape")
                         + (raw if not rows else b""))
    try:
        images = load_image_set(manifest)
    except LinesideError as exc:
        assert "\n" not in str(exc).strip() or "\n" in "".join(c for r in rows for c in r)
    else:
        assert isinstance(images, ImageSet) and len(images) >= 1 and len(images.classes) >= 2
